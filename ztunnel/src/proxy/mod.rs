//! The data path: the three listeners ztunnel opens inside each pod.
//!
//! - [`outbound`] (15001): the pod's own outgoing TCP, redirected by the
//!   in-pod rules; resolved against the mesh state and sent over HBONE to the
//!   destination pod, or passed through when the destination is not in the mesh.
//! - [`inbound`] (15008): HBONE from other ztunnels; mutual TLS as the pod's
//!   identity, then a plain connection to the application.
//! - [`passthrough`] (15006): plaintext arriving from outside the mesh.
//!
//! Each accepted connection runs in its own task with one tracing span.
//! Both inbound listeners authorize every connection against the L4
//! policies ([`authorize_inbound`]) before the application sees a byte, and
//! register it in the open-connection registry while it lives.

pub mod inbound;
pub mod outbound;
pub mod passthrough;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::certs::CertificateManager;
use mesh_core::drain;
use mesh_core::hbone;
use mesh_core::identity::Identity;

use crate::config::Config;
use crate::connections::ConnectionRegistry;
use crate::metrics::{Metrics, TcpLabels};
use crate::rbac::{self, Decision, DenyReason};
use crate::state::{ProxyState, Workload};

/// How long a pod's connection waits for the pod's own workload to reach
/// the mesh state (it can be handed over before the control plane has
/// seen its address); after that it goes on without it.
pub(crate) const LOCAL_WORKLOAD_WAIT: Duration = Duration::from_secs(5);
use crate::sys::Netns;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificate for {identity}: {source}")]
    Certificate {
        identity: String,
        #[source]
        source: mesh_core::certs::CertError,
    },
    #[error("tls: {0}")]
    Tls(#[from] mesh_core::tls::TlsError),
    #[error("hbone: {0}")]
    Hbone(#[from] hbone::HboneError),
    #[error("no healthy endpoint for {service}:{port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The pool key: one HBONE connection serves one source identity talking to
/// one destination (with the same expected identities) from one source IP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    pub dst_identities: Vec<Identity>,
    pub src_ip: IpAddr,
    pub dst: SocketAddr,
}

/// What every connection handler needs; shared by all pods of the node.
pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub state: ProxyState,
    pub certs: CertificateManager,
    pub pool: hbone::client::Pool<PoolKey>,
    pub metrics: Arc<Metrics>,
    pub hbone_server: hbone::server::ServerConfig,
    /// Open connections, re-checked when policies change.
    pub connections: ConnectionRegistry,
}

/// Authorize an inbound connection to `pod` (the L4 authorization point).
/// A dry-run policy's outcome is logged but never enforced. On denial the
/// access log says why ("policy rejection: denied by policy ns/name" or
/// "...: no ALLOW policy matched") and the connection is counted with
/// `response_flags="DENY"`; the caller then refuses it (401 on HBONE, a
/// reset on plaintext).
pub(crate) fn authorize_inbound(
    pi: &ProxyInputs,
    pod: &Pod,
    dst_wl: Option<&Workload>,
    conn: &rbac::Connection,
    labels: &TcpLabels,
) -> Result<(), DenyReason> {
    let verdict = pi.state.authorize(dst_wl, &pod.namespace, conn);
    let src_identity = conn
        .src_identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let dst_workload = format!("{}/{}", pod.namespace, pod.name);
    if let Some(Decision::Deny(reason)) = &verdict.dry_run {
        tracing::event!(
            target: "access",
            tracing::Level::INFO,
            src.addr = %conn.src,
            src.identity = %src_identity,
            dst.addr = %conn.dst,
            dst.workload = %dst_workload,
            direction = "inbound",
            reason = %format!("policy rejection: {reason}"),
            "dry-run: connection would be denied"
        );
    }
    match verdict.decision {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => {
            tracing::event!(
                target: "access",
                tracing::Level::INFO,
                src.addr = %conn.src,
                src.identity = %src_identity,
                dst.addr = %conn.dst,
                dst.workload = %dst_workload,
                dst.identity = %pod.identity,
                direction = "inbound",
                error = %format!("policy rejection: {reason}"),
                "connection denied"
            );
            crate::metrics::record_denied(pi.metrics.clone(), labels.clone());
            Err(reason)
        }
    }
}

/// One enrolled pod, as the data path sees it.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub netns: Netns,
    /// The TLS server config for the pod's current certificate: building one
    /// (verifier, key parsing) costs far more than a handshake, so it is made
    /// once per certificate, not per connection.
    server_tls: std::sync::Mutex<Option<(String, Arc<rustls::ServerConfig>)>>,
}

impl Pod {
    pub fn new(
        uid: String,
        name: String,
        namespace: String,
        identity: Identity,
        netns: Netns,
    ) -> Self {
        Pod {
            uid,
            name,
            namespace,
            identity,
            netns,
            server_tls: Default::default(),
        }
    }

    /// The server config for `cert`, reusing the cached one while the
    /// certificate is unchanged (rotation replaces it).
    pub fn server_tls(
        &self,
        cert: &mesh_core::tls::WorkloadCertificate,
    ) -> Result<Arc<rustls::ServerConfig>, mesh_core::tls::TlsError> {
        let mut cache = self.server_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((serial, cfg)) = cache.as_ref() {
            if serial == cert.serial() {
                return Ok(cfg.clone());
            }
        }
        let cfg = mesh_core::tls::server_config(cert)?;
        *cache = Some((cert.serial().to_string(), cfg.clone()));
        Ok(cfg)
    }

    /// The network the pod's addresses belong to.
    pub fn network(&self, pi: &ProxyInputs) -> String {
        pi.state
            .workload_by_uid(&self.uid)
            .map(|w| w.network.clone())
            .unwrap_or_else(|| pi.cfg.network.clone())
    }
}

/// The pod's three listeners, bound inside its network namespace.
pub struct PodListeners {
    outbound: tokio::net::TcpListener,
    plaintext: tokio::net::TcpListener,
    hbone: tokio::net::TcpListener,
}

/// Bind the pod's listeners. Done before the pod is acknowledged to the node
/// agent, so an acknowledged pod is always captured.
pub fn bind_pod(pod: &Pod) -> Result<PodListeners, std::io::Error> {
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    Ok(PodListeners {
        outbound: pod.netns.listener(any(OUTBOUND_PORT), false)?,
        plaintext: pod.netns.listener(any(INBOUND_PLAINTEXT_PORT), true)?,
        hbone: pod.netns.listener(any(HBONE_PORT), true)?,
    })
}

/// Serve the pod's listeners until `stop` (pod removed) or the drain.
pub async fn serve_pod(
    pi: Arc<ProxyInputs>,
    pod: Arc<Pod>,
    l: PodListeners,
    stop: tokio_util::sync::CancellationToken,
    drain: drain::Watch,
) {
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), uid = %pod.uid, "listening in pod network namespace");
    let tasks = [
        tokio::spawn(accept_loop(
            l.outbound,
            pi.clone(),
            pod.clone(),
            stop.clone(),
            drain.clone(),
            Kind::Outbound,
        )),
        tokio::spawn(accept_loop(
            l.plaintext,
            pi.clone(),
            pod.clone(),
            stop.clone(),
            drain.clone(),
            Kind::Plaintext,
        )),
        tokio::spawn(accept_loop(l.hbone, pi, pod, stop, drain, Kind::Hbone)),
    ];
    for t in tasks {
        let _ = t.await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Outbound,
    Plaintext,
    Hbone,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    pi: Arc<ProxyInputs>,
    pod: Arc<Pod>,
    stop: tokio_util::sync::CancellationToken,
    drain: drain::Watch,
    kind: Kind,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
            _ = drain.signaled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, ?kind, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (pi, pod, stop, conn_drain) = (pi.clone(), pod.clone(), stop.clone(), drain.clone());
        tokio::spawn(async move {
            let run = async {
                match kind {
                    Kind::Outbound => outbound::handle(&pi, &pod, stream, peer).await,
                    Kind::Plaintext => passthrough::handle(&pi, &pod, stream, peer).await,
                    Kind::Hbone => inbound::handle(&pi, &pod, stream, peer, &conn_drain).await,
                }
            };
            tokio::select! {
                _ = run => {}
                // The pod went away: its connections go with it.
                _ = stop.cancelled() => {}
            }
            drop(conn_drain);
        });
    }
}

/// Connect from inside the pod, bounded by the configured connect timeout.
pub async fn connect_upstream(
    pi: &ProxyInputs,
    pod: &Pod,
    dst: SocketAddr,
    source: Option<IpAddr>,
) -> Result<tokio::net::TcpStream, ProxyError> {
    match tokio::time::timeout(pi.cfg.connect_timeout, pod.netns.connect(dst, source)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ProxyError::Connect { addr: dst, source }),
        Err(_) => Err(ProxyError::Connect {
            addr: dst,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        }),
    }
}

/// Close a client connection with a TCP reset, as Istio does on a denial or
/// a failed upstream, so the client sees "connection reset" rather than a
/// clean end of stream.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// What the data-path tests share: a pod that is the test process's own
/// network namespace, with the mesh state and inputs around it.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::time::Duration;

    use mesh_core::ca::CertificateAuthority;
    use mesh_core::certs::{CertificateManager, LocalCaProvider, RotationConfig};
    use mesh_core::identity::Identity;
    use mesh_core::proto::security::{Action, Authorization, Rule, Scope};
    use mesh_core::proto::workload as pb;

    use super::{Pod, ProxyInputs};
    use crate::config::Config;
    use crate::connections::ConnectionRegistry;
    use crate::state::{ProxyState, Snapshot};
    use crate::sys::Netns;

    /// The pod is this test process's own network namespace; its address is
    /// loopback, so the "application" is the test's listener itself.
    pub fn setup() -> (Arc<ProxyInputs>, Arc<Pod>) {
        let cfg = Config::from_env(&[
            ("LOCAL_XDS_PATH", "unused"),
            ("LOCAL_CA_DIR", "unused"),
            ("NODE_NAME", "node1"),
        ])
        .expect("config");
        let ca = CertificateAuthority::generate("cluster.local").expect("ca");
        let certs = CertificateManager::new(
            Arc::new(LocalCaProvider::new(
                Arc::new(ca),
                Duration::from_secs(3600),
            )),
            RotationConfig::default(),
        );
        let wl = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "u1".into(),
                name: "server".into(),
                namespace: "ns1".into(),
                service_account: "server".into(),
                trust_domain: "cluster.local".into(),
                addresses: vec![vec![127, 0, 0, 1]],
                ..Default::default()
            })),
        };
        let (snap, errs) = Snapshot::from_resources(&[wl], &[]);
        assert!(errs.is_empty());
        let state = ProxyState::new();
        state.replace(snap);
        let pi = Arc::new(ProxyInputs {
            cfg: Arc::new(cfg),
            state,
            certs,
            pool: mesh_core::hbone::client::Pool::new(Default::default()),
            metrics: crate::metrics::Metrics::new(),
            hbone_server: Default::default(),
            connections: ConnectionRegistry::new(),
        });
        let home = Arc::new(Netns::current().expect("netns"));
        let netns = Netns::new(Netns::current().expect("netns"), home).expect("netns");
        let pod = Arc::new(Pod::new(
            "u1".into(),
            "server".into(),
            "ns1".into(),
            Identity::new("cluster.local", "ns1", "server"),
            netns,
        ));
        (pi, pod)
    }

    pub fn deny_all(name: &str) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "ns1".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            rules: vec![Rule { clauses: vec![] }],
            ..Default::default()
        }
    }

    pub fn denied_count(pi: &ProxyInputs) -> usize {
        pi.metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_closed_total")
                    && l.contains("response_flags=\"DENY\"")
            })
            .count()
    }
}
