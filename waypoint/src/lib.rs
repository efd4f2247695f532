//! waypoint: the per-namespace L7 proxy of the ambient mesh.
//!
//! ztunnel sends traffic for services that use a waypoint here over HBONE.
//! The waypoint terminates the tunnel with its own identity ([`proxy`]),
//! parses the HTTP inside (HTTP/1.1 or HTTP/2, detected per connection),
//! routes every request on its own ([`routing`]) with the routes the control
//! plane compiled for the service ([`state`], fed by [`xds`] or [`local`]),
//! and sends it on over pooled HBONE to the chosen endpoint pod. Non-HTTP
//! ports are passed through as TCP.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod config;
pub mod http;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod state;
pub mod upstream;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::certs::{CertificateManager, RotationConfig};
use mesh_core::drain;
use mesh_core::proto::{ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
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
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Ready once the waypoint's own certificate is in hand.
async fn fetch_own_certificate(
    certs: CertificateManager,
    id: mesh_core::identity::Identity,
    ready: BlockReady,
) {
    loop {
        match certs.get(&id).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(identity = %id, error = %e, "waypoint certificate not ready; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    drop(ready);
}

/// A running waypoint.
pub struct App {
    pub ready: Ready,
    pub state: state::State,
    pub metrics: metrics::Metrics,
    /// Where HBONE is actually bound (the port may have been 0).
    pub hbone_addr: SocketAddr,
    /// Where the admin endpoint (`/config_dump`) is bound.
    pub admin_addr: SocketAddr,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, AppError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

/// Builds and starts everything; returns once the listeners are bound.
pub async fn start(cfg: Config, drain: drain::Watch) -> Result<App, AppError> {
    let cfg = Arc::new(cfg);
    let ready = Ready::new();
    let certs = CertificateManager::new(
        mesh_core::controlplane::certificate_provider(&cfg.ca, &cfg.cluster_id, cfg.cert_ttl)?,
        RotationConfig::default(),
    );
    let identity = cfg.identity();
    let state = state::State::new();
    let metrics = metrics::Metrics::new();
    let connector = upstream::Connector {
        pool: upstream::new_pool(),
        certs: certs.clone(),
        identity: identity.clone(),
        hbone_port: cfg.upstream_hbone_port,
        connect_timeout: cfg.connect_timeout,
    };
    let inputs = Arc::new(proxy::Inputs::new(
        cfg.clone(),
        state.clone(),
        connector,
        metrics.clone(),
    ));
    let admin = admin::AdminState {
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        clusters: inputs.clusters.clone(),
    };
    let mut admin_addr = cfg.admin_addr;
    for (what, addr, which) in [
        ("admin", cfg.admin_addr, admin::Endpoint::Admin),
        ("stats", cfg.stats_addr, admin::Endpoint::Stats),
        ("readiness", cfg.readiness_addr, admin::Endpoint::Readiness),
    ] {
        let l = bind(what, addr).await?;
        if which == admin::Endpoint::Admin {
            admin_addr = l
                .local_addr()
                .map_err(|source| AppError::Bind { what, addr, source })?;
        }
        tokio::spawn(admin::serve(l, which, admin.clone(), drain.clone()));
    }
    tokio::spawn(fetch_own_certificate(
        certs.clone(),
        identity,
        ready.register_task("certificate"),
    ));
    match &cfg.xds {
        XdsSource::LocalFile(path) => {
            tokio::spawn(local::run(
                path.clone(),
                state.clone(),
                ready.register_task("state"),
                drain.clone(),
            ));
        }
        XdsSource::ControlPlane(cp) => {
            let mut client_cfg = ClientConfig::new(cfg.node_id.clone())
                .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard())
                .subscribe(SERVICE_ROUTES_TYPE_URL, Subscription::wildcard());
            client_cfg.token_file = Some(cp.token_path.clone());
            let client = XdsClient::new(
                mesh_core::controlplane::channel(cp)?,
                client_cfg,
                Arc::new(xds::StateHandler::new(state.clone())),
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
                    () = d.signaled() => {}
                }
            });
        }
    }
    let listener = bind("HBONE", cfg.hbone_addr).await?;
    let hbone_addr = listener.local_addr().map_err(|source| AppError::Bind {
        what: "HBONE",
        addr: cfg.hbone_addr,
        source,
    })?;
    tokio::spawn(proxy::serve_hbone(listener, inputs, drain));
    Ok(App {
        ready,
        state,
        metrics,
        hbone_addr,
        admin_addr,
    })
}
