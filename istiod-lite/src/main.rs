//! The istiod-lite binary: read config, start, wait for a signal, drain.

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cfg = istiod_lite::config::Config::from_env(&mesh_core::env::ProcessEnv)
        .context("configuration")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (trigger, watch) = mesh_core::drain::new();
        let _app = istiod_lite::start(cfg, watch).await?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        // Streams end with the server; ztunnels keep their last state and
        // reconnect to another (or the restarted) control plane.
        let _ = trigger.drain(std::time::Duration::from_secs(5)).await;
        anyhow::Ok(())
    })
}
