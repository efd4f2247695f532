//! The open connections ztunnel is proxying, for the admin view and for
//! policy changes.
//!
//! Each proxied inbound connection (HBONE 15008 and plaintext 15006)
//! registers here once it is authorized and stays registered until it ends
//! (the registration is a guard dropped with the connection). The registry
//! serves two purposes:
//!
//! - `GET /debug/connections` on the admin endpoint lists them (the shape
//!   `ztunnel-config connections` reads);
//! - when the mesh state changes, [`enforce_policy_changes`] re-checks every
//!   open inbound connection against the new policies and closes those no
//!   longer allowed, as Istio's ztunnel does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mesh_core::drain;
use mesh_core::identity::Identity;
use serde::Serialize;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::rbac::{self, Decision};
use crate::state::ProxyState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Direction {
    #[serde(rename = "inbound")]
    Inbound,
    #[serde(rename = "outbound")]
    Outbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConnProtocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

/// What is known of one open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The pod on this node the connection belongs to, `ns/name`.
    pub pod: String,
    /// That pod's namespace and uid (how its workload is found again).
    pub pod_namespace: String,
    pub pod_uid: String,
    pub direction: Direction,
    pub protocol: ConnProtocol,
    /// Our end of the connection as the peer reached it.
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Where the traffic is headed: for inbound, the pod address and target
    /// port the client asked for (what `destination.ip`/`port` match).
    pub remote_target: SocketAddr,
    /// The client's authenticated identity (none for plaintext).
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
}

impl ConnectionInfo {
    /// The facts authorization looks at, for an inbound connection.
    pub fn rbac_connection(&self) -> rbac::Connection {
        rbac::Connection {
            src_identity: self.src_identity.clone(),
            src: self.remote,
            dst: self.remote_target,
        }
    }

    fn json(&self) -> serde_json::Value {
        let id = |i: &Option<Identity>| i.as_ref().map(|i| i.to_string()).unwrap_or_default();
        serde_json::json!({
            "pod": self.pod,
            "direction": self.direction,
            "protocol": self.protocol,
            "local": self.local.to_string(),
            "remote": self.remote.to_string(),
            "remoteTarget": self.remote_target.to_string(),
            "srcIdentity": id(&self.src_identity),
            "dstIdentity": id(&self.dst_identity),
        })
    }
}

struct Entry {
    info: Arc<ConnectionInfo>,
    close: CancellationToken,
}

#[derive(Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, Entry>,
}

/// The node's open connections; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct ConnectionRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for ConnectionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRegistry")
            .field("open", &self.len())
            .finish()
    }
}

/// A registered connection: unregisters on drop; [`Tracked::closed`]
/// resolves when the connection must be torn down (policy change).
pub struct Tracked {
    registry: ConnectionRegistry,
    id: u64,
    close: CancellationToken,
}

impl Tracked {
    /// Resolves when ztunnel decides to close the connection.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.lock().open.remove(&self.id);
    }
}

impl ConnectionRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a connection for as long as the returned guard lives.
    pub fn register(&self, info: ConnectionInfo) -> Tracked {
        let close = CancellationToken::new();
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.open.insert(
            id,
            Entry {
                info: Arc::new(info),
                close: close.clone(),
            },
        );
        drop(inner);
        Tracked {
            registry: self.clone(),
            id,
            close,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open connections, in a stable order (pod, direction, remote).
    pub fn snapshot(&self) -> Vec<Arc<ConnectionInfo>> {
        let mut v: Vec<Arc<ConnectionInfo>> =
            self.lock().open.values().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| {
            (
                &a.pod,
                a.direction == Direction::Outbound,
                a.remote,
                a.local,
            )
                .cmp(&(
                    &b.pod,
                    b.direction == Direction::Outbound,
                    b.remote,
                    b.local,
                ))
        });
        v
    }

    /// `GET /debug/connections`: `{"connections": [...]}`.
    pub fn dump(&self) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self.snapshot().iter().map(|c| c.json()).collect();
        serde_json::json!({ "connections": list })
    }

    /// Re-check every open inbound connection against the current policies
    /// and close those no longer allowed. Returns how many were closed.
    pub fn revalidate(&self, state: &ProxyState) -> usize {
        // Decide outside the registry lock: evaluation takes the state's.
        let inbound: Vec<(Arc<ConnectionInfo>, CancellationToken)> = self
            .lock()
            .open
            .values()
            .filter(|e| e.info.direction == Direction::Inbound && !e.close.is_cancelled())
            .map(|e| (e.info.clone(), e.close.clone()))
            .collect();
        let mut closed = 0;
        for (info, close) in inbound {
            let dst = state.workload_by_uid(&info.pod_uid);
            let verdict =
                state.authorize(dst.as_deref(), &info.pod_namespace, &info.rbac_connection());
            if let Decision::Deny(reason) = verdict.decision {
                tracing::event!(
                    target: "access",
                    tracing::Level::INFO,
                    src.addr = %info.remote,
                    src.identity = %info.src_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    dst.addr = %info.remote_target,
                    dst.workload = %info.pod,
                    dst.identity = %info.dst_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    direction = "inbound",
                    reason = %format!("policy rejection: {reason}"),
                    "connection closed: policy changed"
                );
                close.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Follow the mesh state and re-check open connections on every change,
/// until the drain. Bursts of changes are coalesced by the watch channel.
pub async fn enforce_policy_changes(
    registry: ConnectionRegistry,
    state: ProxyState,
    drain: drain::Watch,
) {
    let mut changes = state.subscribe_changes();
    // Whatever changed before the subscription is covered by one pass now.
    registry.revalidate(&state);
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = drain.signaled() => return,
        }
        changes.borrow_and_update();
        if registry.is_empty() {
            continue;
        }
        let n = registry.revalidate(&state);
        if n > 0 {
            tracing::info!(
                closed = n,
                "policy change closed connections it no longer allows"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::proto::security::{self as pb, Action, Authorization, Scope};

    fn info(uid: &str, remote: &str) -> ConnectionInfo {
        ConnectionInfo {
            pod: format!("ns1/{uid}"),
            pod_namespace: "ns1".into(),
            pod_uid: uid.into(),
            direction: Direction::Inbound,
            protocol: ConnProtocol::Hbone,
            local: "10.0.0.2:15008".parse().unwrap(),
            remote: remote.parse().unwrap(),
            remote_target: "10.0.0.2:8080".parse().unwrap(),
            src_identity: Some(Identity::new("cluster.local", "ns2", "client")),
            dst_identity: Some(Identity::new("cluster.local", "ns1", "server")),
        }
    }

    #[test]
    fn registration_lives_as_long_as_the_guard_and_dumps_the_admin_shape() {
        let reg = ConnectionRegistry::new();
        let a = reg.register(info("a", "10.0.0.9:4000"));
        {
            let _b = reg.register(info("b", "10.0.0.8:4000"));
            assert_eq!(reg.len(), 2);
        }
        assert_eq!(reg.len(), 1);
        let dump = reg.dump();
        let c = &dump["connections"][0];
        assert_eq!(c["pod"], "ns1/a");
        assert_eq!(c["direction"], "inbound");
        assert_eq!(c["protocol"], "HBONE");
        assert_eq!(c["local"], "10.0.0.2:15008");
        assert_eq!(c["remote"], "10.0.0.9:4000");
        assert_eq!(c["remoteTarget"], "10.0.0.2:8080");
        assert_eq!(c["srcIdentity"], "spiffe://cluster.local/ns/ns2/sa/client");
        assert_eq!(c["dstIdentity"], "spiffe://cluster.local/ns/ns1/sa/server");
        drop(a);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_new_deny_policy_closes_open_connections_it_matches() {
        let state = ProxyState::new();
        state.replace(Default::default());
        let reg = ConnectionRegistry::new();
        let from_ns2 = reg.register(info("a", "10.0.0.9:4000"));
        let mut other = info("a", "10.0.0.7:4000");
        other.src_identity = Some(Identity::new("cluster.local", "ns3", "client"));
        let from_ns3 = reg.register(other);
        // The trigger must outlive the test: dropping it counts as a drain.
        let (_trigger, watch) = drain::new();
        let task = tokio::spawn(enforce_policy_changes(reg.clone(), state.clone(), watch));
        let deny_ns2 = Authorization {
            name: "deny-ns2".into(),
            namespace: "ns1".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        namespaces: vec![pb::StringMatch {
                            match_type: Some(pb::string_match::MatchType::Exact("ns2".into())),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        state.apply_delta(crate::state::Delta {
            policies: vec![deny_ns2],
            ..Default::default()
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), from_ns2.closed())
            .await
            .expect("the connection from ns2 is closed");
        assert!(!from_ns3.is_closed());
        task.abort();
    }
}
