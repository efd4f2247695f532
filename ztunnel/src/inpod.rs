//! In-pod mode: pods handed over by the node agent, and their listeners.
//!
//! Before a pod's traffic can flow, the node agent sends its network
//! namespace over ZDS. For each pod this module opens the data-path listeners
//! inside that namespace (see [`crate::proxy`]) and acknowledges only once
//! they are listening, so the agent never lets a pod run uncaptured. A pod
//! removed by the agent — or left out of the snapshot after a reconnect —
//! has its listeners and connections closed.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::drain;
use mesh_core::identity::Identity;
use mesh_core::readiness::BlockReady;
use mesh_core::zds::{WorkloadEvent, ZdsClient};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::proxy::{self, Pod, ProxyInputs};
use crate::sys::Netns;

/// What the admin endpoint shows for a pod (`workloadState`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub netns_inode: u64,
    pub state: &'static str,
}

struct Running {
    stop: CancellationToken,
    inode: u64,
    info: PodState,
}

/// Pods currently served, shared with the admin endpoint.
#[derive(Clone, Default)]
pub struct PodRegistry {
    pods: Arc<Mutex<BTreeMap<String, Running>>>,
}

impl PodRegistry {
    pub fn snapshot(&self) -> BTreeMap<String, PodState> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.info.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, uid: &str) {
        if let Some(r) = self.lock().remove(uid) {
            r.stop.cancel();
            tracing::info!(uid, pod = %format!("{}/{}", r.info.namespace, r.info.name), "pod removed; listeners closed");
        }
    }
}

pub struct InpodManager {
    pub path: PathBuf,
    pub inputs: Arc<ProxyInputs>,
    pub registry: PodRegistry,
    pub home: Arc<OwnedFd>,
    pub drain: drain::Watch,
}

#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    #[error("pod {uid}: {reason}")]
    Pod { uid: String, reason: String },
    #[error(transparent)]
    Zds(#[from] mesh_core::zds::ZdsError),
}

impl InpodManager {
    /// Keep a ZDS connection to the agent, reconnecting with backoff.
    /// `ready` is released after the first snapshot has been applied.
    pub async fn run(self, ready: BlockReady) {
        let mut ready = Some(ready);
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = tokio::select! {
                r = self.session(&mut ready) => r,
                _ = self.drain.signaled() => return,
            };
            match res {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, socket = %self.path.display(), "zds connection lost; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.drain.signaled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self, ready: &mut Option<BlockReady>) -> Result<(), InpodError> {
        let client = ZdsClient::connect(&self.path).await?;
        tracing::info!(socket = %self.path.display(), "connected to node agent");
        let mut seen: HashSet<String> = HashSet::new();
        let mut snapshot_done = false;
        loop {
            let ev = client.next().await?;
            let result = match ev {
                WorkloadEvent::Add { uid, info, netns } => {
                    if !snapshot_done {
                        seen.insert(uid.clone());
                    }
                    self.add(uid, info, netns).await
                }
                WorkloadEvent::Keep { uid } => {
                    if !snapshot_done {
                        seen.insert(uid.clone());
                    }
                    if self.registry.lock().contains_key(&uid) {
                        Ok(())
                    } else {
                        Err(InpodError::Pod {
                            uid,
                            reason: "asked to keep a pod this ztunnel does not have".into(),
                        })
                    }
                }
                WorkloadEvent::Del { uid } => {
                    seen.remove(&uid);
                    self.registry.remove(&uid);
                    Ok(())
                }
                WorkloadEvent::SnapshotSent => {
                    let stale: Vec<String> = self
                        .registry
                        .lock()
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for uid in stale {
                        self.registry.remove(&uid);
                    }
                    snapshot_done = true;
                    ready.take();
                    tracing::info!(pods = self.registry.lock().len(), "zds snapshot applied");
                    Ok(())
                }
            };
            let ack = result.map_err(|e| {
                tracing::warn!(error = %e, "zds request refused");
                e.to_string()
            });
            client.ack(ack).await?;
        }
    }

    async fn add(
        &self,
        uid: String,
        info: Option<mesh_core::proto::zds::WorkloadInfo>,
        netns: OwnedFd,
    ) -> Result<(), InpodError> {
        let err = |reason: String| InpodError::Pod {
            uid: uid.clone(),
            reason,
        };
        let netns = Netns::new(netns, self.home.clone())
            .map_err(|e| err(format!("bad network namespace descriptor: {e}")))?;
        if let Some(existing) = self.registry.lock().get(&uid) {
            if existing.inode == netns.inode() {
                return Ok(());
            }
        }
        // A new namespace for a known uid (pod re-created): replace it.
        self.registry.remove(&uid);
        let state_wl = self.inputs.state.workload_by_uid(&uid);
        let (name, namespace, sa) = match (&info, &state_wl) {
            (Some(i), _) if !i.namespace.is_empty() => (
                i.name.clone(),
                i.namespace.clone(),
                if i.service_account.is_empty() {
                    "default".into()
                } else {
                    i.service_account.clone()
                },
            ),
            (_, Some(w)) => (
                w.name.clone(),
                w.namespace.clone(),
                w.service_account.clone(),
            ),
            _ => {
                return Err(err(
                    "no workload info and not in the mesh state: identity unknown".into(),
                ))
            }
        };
        let td = state_wl
            .as_ref()
            .map(|w| w.trust_domain.clone())
            .unwrap_or_else(|| self.inputs.cfg.trust_domain.clone());
        let identity = Identity::new(&td, &namespace, &sa);
        // Certificates are fetched ahead so the first connection does not wait.
        self.inputs.certs.prefetch(&identity);
        let pod = Arc::new(Pod::new(
            uid.clone(),
            name.clone(),
            namespace.clone(),
            identity,
            netns.clone(),
        ));
        let stop = CancellationToken::new();
        // Bind synchronously so the ack means "listening".
        let listeners =
            proxy::bind_pod(&pod).map_err(|e| err(format!("opening listeners in the pod: {e}")))?;
        tokio::spawn(proxy::serve_pod(
            self.inputs.clone(),
            pod,
            listeners,
            stop.clone(),
            self.drain.clone(),
        ));
        self.registry.lock().insert(
            uid.clone(),
            Running {
                stop,
                inode: netns.inode(),
                info: PodState {
                    name,
                    namespace,
                    service_account: sa,
                    netns_inode: netns.inode(),
                    state: "Up",
                },
            },
        );
        tracing::info!(uid, "pod added");
        Ok(())
    }
}
