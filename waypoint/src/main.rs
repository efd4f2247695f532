//! The waypoint binary: reads its configuration from the environment,
//! starts, waits for SIGTERM/SIGINT, then drains open connections.

#![forbid(unsafe_code)]

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> anyhow::Result<()> {
    // One access-log event per request (target `access_log`), so a request
    // can be followed through the waypoint by default. It costs about as
    // much CPU as proxying the request: `RUST_LOG=info,access_log=off`
    // turns it off where the metrics are enough.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = waypoint::config::Config::from_env(&waypoint::config::ProcessEnv)
        .context("configuration")?;
    let deadline = cfg.drain_timeout;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (trigger, watch) = mesh_core::drain::new();
        let _app = waypoint::start(cfg, watch).await?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(deadline = ?deadline, "shutting down: draining connections");
        match trigger.drain(deadline).await {
            mesh_core::drain::Outcome::Complete => tracing::info!("drained"),
            mesh_core::drain::Outcome::DeadlineExceeded => {
                tracing::warn!("drain deadline passed with connections still open; closing them")
            }
        }
        anyhow::Ok(())
    })
}
