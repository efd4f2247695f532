//! ztunnel: the per-node L4 tunnel of the ambient mesh.
//!
//! It sits on every node, between each enrolled pod and the network: the
//! node agent hands it every pod's network namespace ([`inpod`]), it opens
//! its listeners inside each ([`proxy`]), carries the pod's outgoing TCP over
//! HBONE to the destination pod's ztunnel, and delivers incoming HBONE to the
//! application. What it knows of the mesh lives in [`state`], fed by the
//! control plane over delta xDS ([`xds`]) or a local file ([`source`]);
//! certificates come from the mesh CA (or a local one); its own endpoints
//! are in [`admin`]. It is the mesh's L4 authorization point: [`rbac`]
//! decides every inbound connection, and [`connections`] tracks the open
//! ones so a policy change can close those it no longer allows.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod connections;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod source;
pub mod state;
pub mod sys;
pub mod xds;

use std::sync::Arc;

use mesh_core::certs::{CertificateManager, RotationConfig};
use mesh_core::drain;
use mesh_core::hbone;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::readiness::{BlockReady, Ready};
use mesh_core::xds::client::{ClientConfig, Subscription, XdsClient};

use crate::config::{Config, XdsSource};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    ControlPlane(#[from] mesh_core::controlplane::ControlPlaneError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("opening ztunnel's own network namespace: {0}")]
    Netns(#[source] std::io::Error),
}

/// Readiness for certificates: once the state is complete, every HBONE
/// workload on this node has its certificate (fetched, not just asked for),
/// so the first connection of a pod does not wait on the CA.
async fn prefetch_local_certificates(
    cfg: Arc<Config>,
    state: state::ProxyState,
    certs: CertificateManager,
    ready: BlockReady,
) {
    state.wait_loaded().await;
    let ids = state.local_identities(&cfg.node_name);
    let mut pending = Vec::new();
    for id in ids {
        let certs = certs.clone();
        pending.push(tokio::spawn(async move {
            // The manager retries with backoff; keep asking until it has one.
            loop {
                match certs.get(&id).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(identity = %id, error = %e, "certificate not ready; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }));
    }
    for p in pending {
        let _ = p.await;
    }
    drop(ready);
}

/// A running ztunnel.
pub struct App {
    pub ready: Ready,
    pub admin: admin::AdminState,
}

/// Build and start everything; returns once the endpoints are bound.
pub async fn start(cfg: Config, drain: drain::Watch) -> Result<App, AppError> {
    let cfg = Arc::new(cfg);
    let ready = Ready::new();
    let provider =
        mesh_core::controlplane::certificate_provider(&cfg.ca, &cfg.cluster_id, cfg.cert_ttl)?;
    let certs = CertificateManager::new(provider, RotationConfig::default());
    let state = state::ProxyState::new();
    let metrics = metrics::Metrics::new();
    let pool_cfg = hbone::client::PoolConfig {
        max_streams_per_conn: cfg.pool_max_streams,
        idle_timeout: cfg.pool_idle_timeout,
        ..Default::default()
    };
    let conns = connections::ConnectionRegistry::new();
    tokio::spawn(connections::enforce_policy_changes(
        conns.clone(),
        state.clone(),
        drain.clone(),
    ));
    let inputs = Arc::new(proxy::ProxyInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        pool: hbone::client::Pool::new(pool_cfg),
        metrics: metrics.clone(),
        hbone_server: hbone::server::ServerConfig::default(),
        connections: conns.clone(),
    });
    let pods = inpod::PodRegistry::default();
    let admin = admin::AdminState {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        pods: pods.clone(),
        metrics,
        ready: ready.clone(),
        connections: conns,
    };
    for (what, addr, which) in [
        ("admin", cfg.admin_addr, admin::Endpoint::Admin),
        ("stats", cfg.stats_addr, admin::Endpoint::Stats),
        ("readiness", cfg.readiness_addr, admin::Endpoint::Readiness),
    ] {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { what, addr, source })?;
        tokio::spawn(admin::serve(l, which, admin.clone(), drain.clone()));
    }
    match &cfg.xds {
        XdsSource::LocalFile(path) => {
            let src = source::LocalFileSource::new(path.clone(), state.clone());
            tokio::spawn(src.run(ready.register_task("state"), drain.clone()));
        }
        XdsSource::ControlPlane(cp) => {
            let mut client_cfg = ClientConfig::new(cfg.node_id.clone())
                .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard())
                .subscribe(AUTHORIZATION_TYPE_URL, Subscription::wildcard());
            client_cfg.token_file = Some(cp.token_path.clone());
            let client = XdsClient::new(
                mesh_core::controlplane::channel(cp)?,
                client_cfg,
                Arc::new(
                    xds::StateHandler::new(state.clone())
                        .with_prefetch(cfg.node_name.clone(), certs.clone()),
                ),
            );
            let mut complete = client.handle().ready();
            let block = ready.register_task("state");
            let loaded = state.clone();
            tokio::spawn(async move {
                if complete.wait_for(|c| *c).await.is_ok() {
                    loaded.mark_loaded();
                    tracing::info!("control plane state complete");
                    drop(block);
                }
            });
            let d = drain.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = client.run() => {}
                    _ = d.signaled() => {}
                }
            });
        }
    }
    tokio::spawn(prefetch_local_certificates(
        cfg.clone(),
        state,
        certs,
        ready.register_task("certificates"),
    ));
    let home = Arc::new(sys::Netns::current().map_err(AppError::Netns)?);
    let mgr = inpod::InpodManager {
        path: cfg.inpod_uds.clone(),
        inputs,
        registry: pods,
        home,
        drain,
    };
    tokio::spawn(mgr.run(ready.register_task("pod snapshot")));
    Ok(App { ready, admin })
}
