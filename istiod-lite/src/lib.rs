//! istiod-lite: the control plane of the ambient mesh.
//!
//! It sits beside the data plane, never in the traffic path: it reads
//! Kubernetes objects (from the API server, [`kubesource`], or from a folder
//! of YAML, [`dirsource`]), turns them into Istio's Workload API
//! ([`translate`]) and, for services behind a waypoint, into the waypoint's
//! `ServiceRoutes` (VirtualService, DestinationRule, HTTPRoute), pushes what changed to
//! every ztunnel and waypoint over delta xDS ([`push`]), signs the
//! certificates ztunnels use for HBONE ([`ca`]) and publishes the root they
//! trust ([`rootcm`]), provisions the waypoints Gateways ask for
//! ([`waypoints`]) and reports HTTPRoute status ([`routestatus`]).
//! [`server`] holds its listeners; [`start`] wires it all.

#![forbid(unsafe_code)]

pub mod ca;
pub mod config;
pub mod dirsource;
pub mod kubesource;
pub mod push;
pub mod rootcm;
pub mod routestatus;
pub mod server;
pub mod translate;
pub mod waypoints;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_core::ca::CertificateAuthority;
use mesh_core::drain;
use mesh_core::readiness::Ready;
use mesh_core::xds::server::{ResourceStore, XdsServer};

use crate::ca::{
    AuthError, Authenticator, CaService, CaServiceConfig, Caller, RootSource,
    TokenReviewAuthenticator,
};
use crate::config::{Config, Source};
use crate::push::SharedTranslator;
use crate::translate::{MeshConfig, Translator};

/// How long istiod-lite's own serving certificate lives. It is re-issued
/// at every start; a process running longer than this needs a restart.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Errors starting istiod-lite.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No Kubernetes client could be built.
    #[error("kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    /// The CA root could not be loaded or created.
    #[error("CA root: {0}")]
    Root(#[from] ca::RootError),
    /// The CA could not issue istiod-lite's own certificate.
    #[error("serving certificate: {0}")]
    ServingCert(#[source] mesh_core::ca::CaError),
    /// TLS setup failed.
    #[error("gRPC TLS: {0}")]
    Grpc(#[from] mesh_core::grpc::GrpcError),
    /// The root certificate could not be written where asked.
    #[error("writing the root certificate to {path}: {source}")]
    RootOut {
        /// Where.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A listener failed.
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// A running istiod-lite.
pub struct App {
    /// Start-up tasks still pending.
    pub ready: Ready,
    /// The resources being served.
    pub store: Arc<ResourceStore>,
    /// The xDS server (events for tests and metrics).
    pub xds: XdsServer,
    /// Where gRPC is served (after readiness).
    pub grpc_addr: SocketAddr,
}

/// Refuses every token: the CA without a Kubernetes API to review tokens
/// with (config-directory mode). Failing closed beats signing for anyone.
struct NoAuthenticator;

impl Authenticator for NoAuthenticator {
    fn authenticate(&self, _: &str) -> BoxFuture<'static, Result<Caller, AuthError>> {
        Box::pin(async {
            Err(AuthError::Rejected(
                "no token reviewer: this control plane runs without Kubernetes".into(),
            ))
        })
    }
}

async fn load_root(
    cfg: &Config,
    client: Option<&kube::Client>,
) -> Result<CertificateAuthority, AppError> {
    let source = if cfg.cacerts_dir.join(mesh_core::ca::CA_CERT_FILE).exists() {
        RootSource::PluginDir(cfg.cacerts_dir.clone())
    } else if let Some(path) = &cfg.ca_dir {
        RootSource::Dir {
            path: path.clone(),
            trust_domain: cfg.trust_domain.clone(),
        }
    } else if let Some(client) = client {
        RootSource::Secret {
            client: client.clone(),
            namespace: cfg.namespace.clone(),
            name: ca::DEFAULT_ROOT_SECRET.to_string(),
            trust_domain: cfg.trust_domain.clone(),
        }
    } else {
        tracing::warn!("no CA_DIR, plug-in files or Kubernetes: using a root that lives only as long as this process");
        return CertificateAuthority::generate(&cfg.trust_domain).map_err(AppError::ServingCert);
    };
    Ok(ca::load_or_create_root(source).await?)
}

/// Builds and starts everything; gRPC is served only once the sources have
/// delivered a complete view (a ztunnel must never take a partial list of
/// workloads for the whole mesh).
pub async fn start(cfg: Config, drain: drain::Watch) -> Result<App, AppError> {
    let ready = Ready::new();
    let client = match &cfg.source {
        Source::Kubernetes => Some(kube::Client::try_default().await.map_err(AppError::Kube)?),
        Source::Dir(_) => None,
    };
    let root = load_root(&cfg, client.as_ref()).await?;
    let root_pem = root.root_pem();
    if let Some(path) = &cfg.root_cert_out {
        std::fs::write(path, &root_pem).map_err(|source| AppError::RootOut {
            path: path.display().to_string(),
            source,
        })?;
    }
    let mut ips = cfg.extra_ip_sans.clone();
    if !cfg.grpc_addr.ip().is_unspecified() {
        ips.push(cfg.grpc_addr.ip());
    }
    let (chain, key) = root
        .issue_server_cert(&cfg.dns_sans(), &ips, SERVING_CERT_TTL)
        .map_err(AppError::ServingCert)?;
    let tls = mesh_core::grpc::server_tls(&chain, &key)?;

    let translator = SharedTranslator::new(Translator::new(MeshConfig {
        trust_domain: cfg.trust_domain.clone(),
        cluster_id: cfg.cluster_id.clone(),
        network: cfg.network.clone(),
        domain_suffix: cfg.domain_suffix.clone(),
        discovery_selector: cfg.discovery_selector.clone(),
        root_namespace: cfg.root_namespace.clone(),
    }));
    let store = ResourceStore::new();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The process is ready once gRPC serves, which waits for the sources
    // to have listed everything (their own readiness, below).
    let serving = ready.register_task("listing the cluster");
    let sources = Ready::new();
    let synced = sources.register_task("sources");
    if let Some(c) = &client {
        tokio::spawn(kubesource::run(c.clone(), tx, synced, drain.clone()));
        tokio::spawn(rootcm::run(
            c.clone(),
            root_pem.clone(),
            cfg.discovery_selector.clone(),
            drain.clone(),
        ));
        tokio::spawn(routestatus::run(
            c.clone(),
            translator.lock().config().clone(),
            drain.clone(),
        ));
        tokio::spawn(waypoints::run(
            c.clone(),
            waypoints::WaypointSettings {
                image: cfg.waypoint_image.clone(),
                xds_address: cfg.waypoint_xds_address.clone(),
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
            },
            drain.clone(),
        ));
    } else if let Source::Dir(dir) = &cfg.source {
        {
            let mut src = dirsource::DirSource::new(dir.clone());
            // The first scan is synchronous: readiness means "read it all".
            let first = src.scan().map_err(|e| {
                tracing::error!(dir = %dir.display(), error = %e, "config directory unreadable");
                e
            });
            if let Ok(events) = first {
                let _ = tx.send(events);
            }
            drop(synced);
            tokio::spawn(src.run(tx, drain.clone()));
        }
    }
    let (flush_tx, flush_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(push::run(
        rx,
        flush_rx,
        translator.clone(),
        store.clone(),
        drain.clone(),
    ));

    let authn: Arc<dyn Authenticator> = match &client {
        Some(c) => Arc::new(TokenReviewAuthenticator::new(
            c.clone(),
            vec!["istio-ca".to_string()],
            cfg.trust_domain.clone(),
        )),
        None => Arc::new(NoAuthenticator),
    };
    let ca_cfg = CaServiceConfig {
        default_ttl: cfg.default_cert_ttl,
        max_ttl: cfg.max_cert_ttl,
        trust_domain: cfg.trust_domain.clone(),
        impersonators: cfg.trusted_node_accounts.clone(),
    };
    let ca_service = CaService::new(
        Arc::new(root.with_max_ttl(cfg.max_cert_ttl)),
        authn.clone(),
        Arc::new(translator.clone()),
        ca_cfg,
    );
    let mut xds = XdsServer::new(store.clone());
    if cfg.xds_auth && client.is_some() {
        xds = xds.with_authenticator(Arc::new(server::TokenStreamAuth(authn)));
    }

    let http = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|source| server::ServerError::Bind {
            what: "http",
            addr: cfg.http_addr,
            source,
        })?;
    tokio::spawn(server::serve_http(http, ready.clone(), drain.clone()));
    let grpc = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|source| server::ServerError::Bind {
            what: "grpc",
            addr: cfg.grpc_addr,
            source,
        })?;
    let grpc_addr = grpc.local_addr().unwrap_or(cfg.grpc_addr);
    {
        let xds = xds.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            // Bound but not accepting until the first full translation is
            // in the store: connections queue in the backlog meanwhile.
            sources.wait_ready().await;
            // Everything the sources listed was queued before they became
            // ready; once the push loop has published up to here, the
            // store holds the complete first view.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            if flush_tx.send(done_tx).is_err() || done_rx.await.is_err() {
                tracing::error!("push loop ended before the first full view was published");
                return;
            }
            drop(serving);
            tracing::info!(addr = %grpc_addr, "serving xDS and CA");
            let incoming = mesh_core::grpc::tls_incoming(grpc, tls);
            let res = tonic::transport::Server::builder()
                .add_service(xds.into_service())
                .add_service(ca_service.into_service())
                .serve_with_incoming_shutdown(incoming, drain.signaled())
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
    }
    Ok(App {
        ready,
        store,
        xds,
        grpc_addr,
    })
}
