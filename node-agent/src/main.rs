//! `node-agent`: the per-node agent binary (Istio's CNI node agent role).
//! It installs the CNI plugin, answers the plugin's events, captures the
//! node's enrolled pods and hands them to ztunnel. Configuration comes from
//! the environment (see `node-agent/src/config.rs`); SIGTERM or SIGINT stop
//! it after the requests in flight are answered.

use anyhow::Context;
use mesh_core::drain;
use mesh_core::env::ProcessEnv;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = node_agent::Config::from_env(&ProcessEnv).context("configuration")?;
    let deadline = config.drain_timeout;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    let (trigger, watch) = drain::new();
    let mut agent = tokio::spawn(node_agent::run(config, watch));
    tokio::select! {
        r = &mut agent => {
            // The agent only returns by itself on a fatal error.
            r.context("agent task")?.context("node agent")?;
            return Ok(());
        }
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    if trigger.drain(deadline).await == drain::Outcome::DeadlineExceeded {
        tracing::warn!(
            ?deadline,
            "drain deadline passed with requests still in flight"
        );
        return Ok(());
    }
    agent.await.context("agent task")?.context("node agent")?;
    tracing::info!("stopped");
    Ok(())
}
