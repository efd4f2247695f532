//! The local source of the waypoint's state: a YAML file holding the same
//! resources the control plane would push, for tests and the local mesh.
//!
//! ```yaml
//! addresses:            # as ztunnel's local file (Workload API, proto3 JSON)
//! - service: {...}
//! - workload: {...}
//! routes:               # ambient.waypoint.v1.ServiceRoutes, proto3 JSON
//! - hostname: reviews.default.svc.cluster.local
//!   httpRoutes: [...]
//! ```
//!
//! The file is polled and reloaded whole when it changes; a file that does
//! not parse leaves the last good state in place.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::drain;
use mesh_core::proto::local::{parse_local_config, LocalConfigError};
use mesh_core::proto::waypoint::ServiceRoutes;
use mesh_core::readiness::BlockReady;

use crate::state::{compile_routes, convert_addresses, State, StateError};

const ROUTES: &str = "routes";
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {what}: {source}")]
    Json {
        path: String,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Addresses {
        path: String,
        #[source]
        source: LocalConfigError,
    },
    #[error("{path}: {source}")]
    State {
        path: String,
        #[source]
        source: StateError,
    },
}

/// Parses the file's text and replaces `state` with it.
pub fn load_into(text: &str, path: &Path, state: &State) -> Result<(), LocalError> {
    let p = || path.display().to_string();
    let doc: serde_json::Value =
        serde_yaml::from_str(text).map_err(|source| LocalError::Yaml { path: p(), source })?;
    let mut doc = match doc {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let routes_json = doc
        .remove(ROUTES)
        .unwrap_or(serde_json::Value::Array(Vec::new()));
    let routes: Vec<ServiceRoutes> = match routes_json {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item).map_err(|source| LocalError::Json {
                    path: p(),
                    what: format!("{ROUTES}[{i}]"),
                    source,
                })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(LocalError::Json {
                path: p(),
                what: ROUTES.into(),
                source: serde_json::Error::io(std::io::Error::other("expected a list")),
            })
        }
    };
    let rest = serde_json::Value::Object(doc).to_string();
    let addresses =
        parse_local_config(&rest).map_err(|source| LocalError::Addresses { path: p(), source })?;
    let (workloads, services) = convert_addresses(&addresses.addresses)
        .map_err(|source| LocalError::State { path: p(), source })?;
    let routes =
        compile_routes(routes).map_err(|source| LocalError::State { path: p(), source })?;
    state.replace(workloads, services, routes);
    Ok(())
}

fn load_file(path: &Path, state: &State) -> Result<(), LocalError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalError::Read {
        path: path.display().to_string(),
        source,
    })?;
    load_into(&text, path, state)
}

/// Loads the file, marks the state loaded (releasing `ready`), then
/// reloads on every change until the drain starts.
pub async fn run(path: PathBuf, state: State, ready: BlockReady, drain: drain::Watch) {
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut ready = Some(ready);
    loop {
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp != seen {
            seen = stamp;
            match load_file(&path, &state) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "local config loaded");
                    state.mark_loaded();
                    drop(ready.take());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "local config rejected; keeping the last good one")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = drain.signaled() => return,
        }
    }
}
