//! The node agent's side of ZDS: the server the node's ztunnel connects to.
//!
//! Sits between the CNI plugin's ADD/DEL of a pod and ztunnel's in-pod
//! listeners: an ADD ends in [`ZtunnelServer::add_pod`], which hands the pod's
//! network namespace to ztunnel and waits until ztunnel acknowledged it (so
//! the pod's processes only start once ztunnel listens inside it); a DEL ends
//! in [`ZtunnelServer::remove_pod`]. The server remembers every enrolled pod
//! and, whenever a ztunnel (re)connects, sends all of them as Adds followed by
//! SnapshotSent, so a restarted ztunnel resumes exactly the current set.
//! Only one ztunnel connection is current; a new one replaces it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::proto::zds::WorkloadInfo;
use mesh_core::zds::{ZdsAgentConn, ZdsError, ZdsListener};
use tracing::Instrument;

/// Errors of handing pods to ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum ZtunnelError {
    #[error("listening for ztunnel at {path}")]
    Bind {
        path: String,
        #[source]
        source: ZdsError,
    },
    #[error("no ztunnel is connected to take pod {uid}")]
    NotConnected { uid: String },
    #[error("opening the network namespace {path} of pod {uid}")]
    OpenNetns {
        uid: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ztunnel refused pod {uid}: {reason}")]
    Refused { uid: String, reason: String },
    #[error("talking to ztunnel about pod {uid}")]
    Zds {
        uid: String,
        #[source]
        source: ZdsError,
    },
}

/// A pod the agent has enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The Workload API uid (`Kubernetes//Pod/NAMESPACE/NAME`).
    pub uid: String,
    pub info: WorkloadInfo,
    /// Path of the pod's network namespace (what the CNI runtime passed).
    pub netns: PathBuf,
}

/// The current ztunnel connection and the span its requests log in.
struct Current {
    conn: ZdsAgentConn,
    span: tracing::Span,
}

struct Inner {
    pods: Mutex<BTreeMap<String, EnrolledPod>>,
    /// Held across each request and across a whole snapshot, so that a pod
    /// added while ztunnel connects is sent exactly once, in order.
    current: tokio::sync::Mutex<Option<Current>>,
    connected: AtomicBool,
    /// Uids the current connection has acknowledged (cleared when it goes).
    acked: Mutex<BTreeSet<String>>,
}

/// Accepts ztunnel connections on a unix socket and hands pods to the
/// current one. Dropping it stops accepting.
pub struct ZtunnelServer {
    path: PathBuf,
    inner: Arc<Inner>,
    accept: tokio::task::JoinHandle<()>,
}

impl ZtunnelServer {
    /// Listens at `path` (replacing a stale socket) and starts accepting.
    /// Must be called inside a Tokio runtime, which runs the accept loop.
    pub fn bind(path: &Path) -> Result<Self, ZtunnelError> {
        let listener = ZdsListener::bind(path).map_err(|source| ZtunnelError::Bind {
            path: path.display().to_string(),
            source,
        })?;
        let inner = Arc::new(Inner {
            pods: Mutex::new(BTreeMap::new()),
            current: tokio::sync::Mutex::new(None),
            connected: AtomicBool::new(false),
            acked: Mutex::new(BTreeSet::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        tracing::info!(socket = %path.display(), "waiting for ztunnel");
        Ok(Self {
            path: path.to_path_buf(),
            inner,
            accept,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Whether a ztunnel connection is current. A ztunnel that went away is
    /// noticed at the next request to it (or when the next one connects).
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// The enrolled pods, ordered by uid.
    pub fn pods(&self) -> Vec<EnrolledPod> {
        lock(&self.inner.pods).values().cloned().collect()
    }

    /// Whether the current ztunnel connection acknowledged the pod (in its
    /// snapshot or since). False without a connection.
    pub fn acknowledged(&self, uid: &str) -> bool {
        lock(&self.inner.acked).contains(uid)
    }

    /// The enrolled pods the current connection has not acknowledged (it
    /// refused them in its snapshot, or none is connected).
    pub fn unacknowledged(&self) -> Vec<EnrolledPod> {
        let acked = lock(&self.inner.acked);
        lock(&self.inner.pods)
            .values()
            .filter(|p| !acked.contains(&p.uid))
            .cloned()
            .collect()
    }

    /// Drops the current ztunnel connection. ztunnel reconnects and gets a
    /// fresh snapshot: the way back to a known state after a request whose
    /// answer was not waited for (a timeout), which would otherwise be read
    /// as the answer to the next request.
    pub async fn disconnect(&self) {
        let mut current = self.inner.current.lock().await;
        if current.is_some() {
            tracing::warn!("dropping the ztunnel connection; it reconnects for a new snapshot");
        }
        self.inner.drop_current(&mut current);
    }

    /// Records a pod without telling ztunnel now: it is part of the snapshot
    /// of the next connection. For pods enrolled before ztunnel runs (an
    /// agent restoring its state at start).
    pub fn record_pod(&self, uid: &str, info: WorkloadInfo, netns: &Path) {
        lock(&self.inner.pods).insert(
            uid.to_string(),
            EnrolledPod {
                uid: uid.to_string(),
                info,
                netns: netns.to_path_buf(),
            },
        );
    }

    /// Enrolls a pod: records it and, when ztunnel is connected, sends it and
    /// waits for the acknowledgement. Without a connection the pod stays
    /// recorded (the next snapshot carries it) and the call fails with
    /// [`ZtunnelError::NotConnected`]; a refused pod is forgotten. Either
    /// error should fail the CNI ADD, since the pod would start unproxied.
    pub async fn add_pod(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &Path,
    ) -> Result<(), ZtunnelError> {
        let file = std::fs::File::open(netns).map_err(|source| ZtunnelError::OpenNetns {
            uid: uid.to_string(),
            path: netns.display().to_string(),
            source,
        })?;
        let mut current = self.inner.current.lock().await;
        self.record_pod(uid, info.clone(), netns);
        let Some(cur) = current.as_ref() else {
            tracing::warn!(uid, "pod recorded, but no ztunnel is connected");
            return Err(ZtunnelError::NotConnected {
                uid: uid.to_string(),
            });
        };
        let span = cur.span.clone();
        let result = cur
            .conn
            .add(uid, info, file.as_fd())
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
        match result {
            Ok(()) => {
                tracing::info!(uid, "pod handed to ztunnel");
                lock(&self.inner.acked).insert(uid.to_string());
                Ok(())
            }
            Err(ZdsError::Nack { error, .. }) => {
                tracing::warn!(uid, reason = %error, "ztunnel refused pod");
                lock(&self.inner.pods).remove(uid);
                lock(&self.inner.acked).remove(uid);
                Err(ZtunnelError::Refused {
                    uid: uid.to_string(),
                    reason: error,
                })
            }
            Err(source) => {
                tracing::warn!(uid, error = %source, "ztunnel connection failed");
                self.inner.drop_current(&mut current);
                Err(ZtunnelError::Zds {
                    uid: uid.to_string(),
                    source,
                })
            }
        }
    }

    /// Forgets a pod and, when ztunnel is connected, tells it the pod is
    /// gone. Without a connection there is nothing to tell: the next snapshot
    /// no longer carries the pod, and ztunnel drops it then.
    pub async fn remove_pod(&self, uid: &str) -> Result<(), ZtunnelError> {
        let mut current = self.inner.current.lock().await;
        lock(&self.inner.pods).remove(uid);
        lock(&self.inner.acked).remove(uid);
        let Some(cur) = current.as_ref() else {
            return Ok(());
        };
        let span = cur.span.clone();
        let result = cur.conn.del(uid).instrument(span.clone()).await;
        let _enter = span.enter();
        match result {
            Ok(()) => {
                tracing::info!(uid, "pod removed from ztunnel");
                Ok(())
            }
            Err(ZdsError::Nack { error, .. }) => {
                tracing::warn!(uid, reason = %error, "ztunnel refused to remove pod");
                Err(ZtunnelError::Refused {
                    uid: uid.to_string(),
                    reason: error,
                })
            }
            Err(source) => {
                tracing::warn!(uid, error = %source, "ztunnel connection failed");
                self.inner.drop_current(&mut current);
                Err(ZtunnelError::Zds {
                    uid: uid.to_string(),
                    source,
                })
            }
        }
    }
}

impl Drop for ZtunnelServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Inner {
    fn drop_current(&self, current: &mut Option<Current>) {
        *current = None;
        self.connected.store(false, Ordering::SeqCst);
        lock(&self.acked).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent across a panic (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: ZdsListener, inner: Arc<Inner>) {
    static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    loop {
        let conn = match ZdsAgentConn::accept(&listener).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a ztunnel connection failed");
                // Bounded back-off: an fd shortage would otherwise spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("ztunnel_conn", id);
        let mut current = inner.current.lock().await;
        // The old connection is replaced whatever happens to the new one.
        inner.drop_current(&mut current);
        let pods: Vec<EnrolledPod> = lock(&inner.pods).values().cloned().collect();
        match send_snapshot(&conn, &pods).instrument(span.clone()).await {
            Ok(acked) => {
                *lock(&inner.acked) = acked;
                *current = Some(Current { conn, span });
                inner.connected.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                let _enter = span.enter();
                tracing::warn!(error = %e, "sending the snapshot failed; waiting for a new connection");
            }
        }
    }
}

/// Every pod as an Add, then SnapshotSent. A pod whose namespace is gone or
/// that ztunnel refuses is skipped (its CNI DEL follows); a broken connection
/// ends the snapshot. Returns the uids ztunnel acknowledged.
async fn send_snapshot(
    conn: &ZdsAgentConn,
    pods: &[EnrolledPod],
) -> Result<BTreeSet<String>, ZdsError> {
    tracing::info!(pods = pods.len(), "ztunnel connected; sending snapshot");
    let mut acked = BTreeSet::new();
    for pod in pods {
        let file = match std::fs::File::open(&pod.netns) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(uid = %pod.uid, netns = %pod.netns.display(), error = %e,
                    "skipping pod whose network namespace cannot be opened");
                continue;
            }
        };
        match conn.add(&pod.uid, pod.info.clone(), file.as_fd()).await {
            Ok(()) => {
                acked.insert(pod.uid.clone());
            }
            Err(ZdsError::Nack { error, .. }) => {
                tracing::warn!(uid = %pod.uid, reason = %error, "ztunnel refused pod in snapshot");
            }
            Err(e) => return Err(e),
        }
    }
    conn.snapshot_sent().await?;
    tracing::info!("snapshot sent");
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::zds::{WorkloadEvent, ZdsClient};

    fn info(name: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
        }
    }

    fn uid(name: &str) -> String {
        format!("Kubernetes//Pod/default/{name}")
    }

    /// Any openable file stands in for a namespace: ZDS only passes the fd.
    const NETNS: &str = "/proc/self/ns/net";

    async fn wait_connected(server: &ZtunnelServer, want: bool) {
        for _ in 0..500 {
            if server.connected() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("connected() never became {want}");
    }

    /// Reads the snapshot, acking every request, and returns the added uids.
    async fn read_snapshot(client: &ZdsClient) -> Vec<String> {
        let mut uids = Vec::new();
        loop {
            match client.next().await.unwrap() {
                WorkloadEvent::Add { uid, info, .. } => {
                    assert_eq!(info.unwrap().namespace, "default");
                    uids.push(uid);
                }
                WorkloadEvent::SnapshotSent => {
                    client.ack(Ok(())).await.unwrap();
                    return uids;
                }
                other => panic!("unexpected {other:?} in snapshot"),
            }
            client.ack(Ok(())).await.unwrap();
        }
    }

    #[tokio::test]
    async fn every_connection_gets_the_full_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ztunnel.sock");
        let server = ZtunnelServer::bind(&sock).unwrap();
        server.record_pod(&uid("a"), info("a"), Path::new(NETNS));
        server.record_pod(&uid("b"), info("b"), Path::new(NETNS));
        assert!(!server.connected());

        assert_eq!(server.unacknowledged().len(), 2);
        let first = ZdsClient::connect(&sock).await.unwrap();
        assert_eq!(read_snapshot(&first).await, [uid("a"), uid("b")]);
        wait_connected(&server, true).await;
        assert!(server.acknowledged(&uid("a")) && server.acknowledged(&uid("b")));
        assert!(server.unacknowledged().is_empty());

        // A restarted ztunnel replaces the first connection.
        let second = ZdsClient::connect(&sock).await.unwrap();
        assert_eq!(read_snapshot(&second).await, [uid("a"), uid("b")]);
        drop(first);
        wait_connected(&server, true).await;
        assert_eq!(server.pods().len(), 2);
    }

    #[tokio::test]
    async fn add_without_ztunnel_records_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ztunnel.sock");
        let server = ZtunnelServer::bind(&sock).unwrap();
        let err = server
            .add_pod(&uid("a"), info("a"), Path::new(NETNS))
            .await
            .unwrap_err();
        assert!(matches!(err, ZtunnelError::NotConnected { .. }), "{err}");
        let client = ZdsClient::connect(&sock).await.unwrap();
        assert_eq!(read_snapshot(&client).await, [uid("a")]);
    }

    #[tokio::test]
    async fn add_and_remove_wait_for_ztunnel() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ztunnel.sock");
        let server = Arc::new(ZtunnelServer::bind(&sock).unwrap());
        let client = ZdsClient::connect(&sock).await.unwrap();
        assert!(read_snapshot(&client).await.is_empty());
        wait_connected(&server, true).await;

        let ztunnel = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in [Ok(()), Err("no room".to_string()), Ok(())] {
                let ev = client.next().await.unwrap();
                seen.push(match ev {
                    WorkloadEvent::Add { uid, .. } => format!("add {uid}"),
                    WorkloadEvent::Del { uid } => format!("del {uid}"),
                    other => format!("{other:?}"),
                });
                client.ack(answer).await.unwrap();
            }
            seen
        });
        server
            .add_pod(&uid("a"), info("a"), Path::new(NETNS))
            .await
            .unwrap();
        let err = server
            .add_pod(&uid("b"), info("b"), Path::new(NETNS))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ZtunnelError::Refused { reason, .. } if reason == "no room"),
            "{err}"
        );
        let uids: Vec<String> = server.pods().into_iter().map(|p| p.uid).collect();
        assert_eq!(uids, [uid("a")]);
        server.remove_pod(&uid("a")).await.unwrap();
        assert!(server.pods().is_empty());
        assert_eq!(
            ztunnel.await.unwrap(),
            [
                format!("add {}", uid("a")),
                format!("add {}", uid("b")),
                format!("del {}", uid("a"))
            ]
        );
        assert!(server.connected());
    }

    #[tokio::test]
    async fn a_missing_netns_fails_the_add() {
        let dir = tempfile::tempdir().unwrap();
        let server = ZtunnelServer::bind(&dir.path().join("z.sock")).unwrap();
        let err = server
            .add_pod(&uid("a"), info("a"), &dir.path().join("absent"))
            .await
            .unwrap_err();
        assert!(matches!(err, ZtunnelError::OpenNetns { .. }), "{err}");
        assert!(server.pods().is_empty());
    }

    #[tokio::test]
    async fn disconnect_forces_a_new_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("z.sock");
        let server = ZtunnelServer::bind(&sock).unwrap();
        server.record_pod(&uid("a"), info("a"), Path::new(NETNS));
        let first = ZdsClient::connect(&sock).await.unwrap();
        assert_eq!(read_snapshot(&first).await, [uid("a")]);
        wait_connected(&server, true).await;
        server.disconnect().await;
        assert!(!server.connected());
        assert!(!server.acknowledged(&uid("a")));
        assert!(first.next().await.is_err(), "the old connection is closed");
        let second = ZdsClient::connect(&sock).await.unwrap();
        assert_eq!(read_snapshot(&second).await, [uid("a")]);
        wait_connected(&server, true).await;
        assert!(server.acknowledged(&uid("a")));
    }
}
