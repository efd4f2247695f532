//! The local-file source of ztunnel's state.
//!
//! Before any traffic is proxied, ztunnel needs the mesh's workloads and
//! services. This source reads them from a YAML file of Workload API
//! resources (`LOCAL_XDS_PATH`) and reloads it whenever its contents change.
//! A file that does not parse is reported and the last good state keeps
//! serving; individual invalid resources are reported by name and field and
//! left out while the rest is applied.

use std::path::PathBuf;
use std::time::Duration;

use mesh_core::drain;
use mesh_core::proto::local::parse_local_config;
use mesh_core::readiness::BlockReady;

use crate::state::{ProxyState, Snapshot};

/// How often the file is checked. Cheap: a stat and, on change, a read.
const POLL: Duration = Duration::from_millis(250);

/// Watches one file and applies it to the state.
pub struct LocalFileSource {
    path: PathBuf,
    state: ProxyState,
    last: Option<Vec<u8>>,
    applied: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: mesh_core::proto::local::LocalConfigError,
    },
}

impl LocalFileSource {
    pub fn new(path: PathBuf, state: ProxyState) -> Self {
        let (applied, _) = tokio::sync::watch::channel(0);
        Self {
            path,
            state,
            last: None,
            applied,
        }
    }

    /// Counts successful applications; lets other parts react to a change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Apply the file if it changed. Returns whether something was applied.
    pub fn poll_once(&mut self) -> Result<bool, SourceError> {
        let bytes = std::fs::read(&self.path).map_err(|source| SourceError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        if self.last.as_deref() == Some(&bytes[..]) {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&bytes);
        let parsed = parse_local_config(&text);
        // Remember the bytes even when they are bad, so one bad version is
        // reported once rather than on every poll.
        self.last = Some(bytes);
        let cfg = parsed.map_err(|source| SourceError::Parse {
            path: self.path.display().to_string(),
            source,
        })?;
        let (snap, errors) = Snapshot::from_resources(&cfg.addresses, &cfg.authorizations);
        for e in &errors {
            tracing::error!(file = %self.path.display(), error = %e, "rejected resource; the rest of the file is applied");
        }
        self.state.replace(snap);
        let (w, s, p) = self.state.counts();
        tracing::info!(file = %self.path.display(), workloads = w, services = s, policies = p, "applied local config");
        self.applied.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Poll until drained. `ready` is released after the first good load.
    pub async fn run(mut self, ready: BlockReady, drain: drain::Watch) {
        let mut ready = Some(ready);
        loop {
            match self.poll_once() {
                Ok(true) => {
                    ready.take();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "local config not applied; keeping the last good state")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = drain.signaled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
addresses:
- workload:
    uid: w1
    name: w1
    namespace: default
    serviceAccount: sa
    addresses: ["10.244.1.2"]
    tunnelProtocol: HBONE
"#;

    #[test]
    fn bad_file_keeps_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let state = ProxyState::new();
        let mut src = LocalFileSource::new(path.clone(), state.clone());
        assert!(src.poll_once().unwrap());
        assert!(!src.poll_once().unwrap());
        assert_eq!(state.counts().0, 1);
        std::fs::write(
            &path,
            "addresses: [ {workload: {uid: 3, tunnelProtocol: NOPE}} ]",
        )
        .unwrap();
        let err = src.poll_once().unwrap_err().to_string();
        assert!(err.contains("state.yaml"), "{err}");
        assert!(
            state.workload_by_uid("w1").is_some(),
            "last good state must keep serving"
        );
        std::fs::write(&path, GOOD.replace("w1", "w2")).unwrap();
        assert!(src.poll_once().unwrap());
        assert!(state.workload_by_uid("w2").is_some());
        assert!(state.workload_by_uid("w1").is_none());
    }
}
