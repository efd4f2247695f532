//! ztunnel: the per-node L4 tunnel of the ambient mesh.
//!
//! It sits on every node, between each enrolled pod and the network: the
//! node agent hands it every pod's network namespace ([`inpod`]), it opens
//! its listeners inside each ([`proxy`]), carries the pod's outgoing TCP over
//! HBONE to the destination pod's ztunnel, and delivers incoming HBONE to the
//! application. What it knows of the mesh lives in [`state`], fed by a
//! [`source`]; its own endpoints are in [`admin`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod source;
pub mod state;
pub mod sys;

use std::sync::Arc;

use mesh_core::ca::CertificateAuthority;
use mesh_core::certs::{CertificateManager, LocalCaProvider, RotationConfig};
use mesh_core::drain;
use mesh_core::hbone;
use mesh_core::readiness::Ready;

use crate::config::{CaSource, Config};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("loading the CA from {dir}: {source}")]
    Ca {
        dir: String,
        #[source]
        source: mesh_core::ca::CaError,
    },
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

/// A running ztunnel.
pub struct App {
    pub ready: Ready,
    pub admin: admin::AdminState,
}

/// Build and start everything; returns once the endpoints are bound.
pub async fn start(cfg: Config, drain: drain::Watch) -> Result<App, AppError> {
    let cfg = Arc::new(cfg);
    let ready = Ready::new();
    let CaSource::LocalDir(dir) = &cfg.ca;
    let ca = CertificateAuthority::load_dir(dir).map_err(|source| AppError::Ca {
        dir: dir.display().to_string(),
        source,
    })?;
    let provider = LocalCaProvider::new(Arc::new(ca), cfg.cert_ttl);
    let certs = CertificateManager::new(Arc::new(provider), RotationConfig::default());
    let state = state::ProxyState::new();
    let metrics = metrics::Metrics::new();
    let pool_cfg = hbone::client::PoolConfig {
        max_streams_per_conn: cfg.pool_max_streams,
        idle_timeout: cfg.pool_idle_timeout,
        ..Default::default()
    };
    let inputs = Arc::new(proxy::ProxyInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        pool: hbone::client::Pool::new(pool_cfg),
        metrics: metrics.clone(),
        hbone_server: hbone::server::ServerConfig::default(),
    });
    let pods = inpod::PodRegistry::default();
    let admin = admin::AdminState {
        cfg: cfg.clone(),
        state: state.clone(),
        certs,
        pods: pods.clone(),
        metrics,
        ready: ready.clone(),
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
    let src = source::LocalFileSource::new(cfg.local_xds_path.clone(), state);
    tokio::spawn(src.run(ready.register_task("state"), drain.clone()));
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
