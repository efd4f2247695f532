//! The node agent of the ambient mesh, one per node (the CNI DaemonSet in
//! Kubernetes). It sits between the CNI plugin's ADD/DEL of a pod and the
//! node's ztunnel: it installs the in-pod capture rules ([`rules`]) that send
//! the pod's TCP traffic to ztunnel's in-pod listeners, and hands the pod's
//! network namespace to ztunnel over ZDS ([`ztunnel`]), and keeps checking
//! that no enrolled pod has lost its rules ([`repair`]).
//!
//! [`run`] is the whole agent: it serves the plugin's events ([`server`]),
//! watches the node's pods and all namespaces ([`watch`]) so that pods
//! enrolled while running are captured too ([`agent`]), installs the plugin
//! into the node's CNI chain ([`install`]) and serves `/readyz` and
//! `/metrics` ([`metrics`]).

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod install;
pub mod metrics;
pub mod repair;
pub mod rules;
pub mod server;
pub mod sys;
pub mod watch;
pub mod ztunnel;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use mesh_core::drain;
use mesh_core::readiness::{BlockReady, Ready};

pub use config::Config;

/// Runs a short configuration command (`nft`, `ip`) to completion with
/// `stdin` fed to it (or none), capturing stdout and stderr.
pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>) -> std::io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin {
        None => cmd.stdin(Stdio::null()).output(),
        Some(input) => {
            cmd.stdin(Stdio::piped());
            let mut child = cmd.spawn()?;
            if let Some(mut pipe) = child.stdin.take() {
                pipe.write_all(input)?;
            }
            child.wait_with_output()
        }
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("installing the CNI plugin")]
    Install(#[from] install::InstallError),
    #[error("connecting to the API server")]
    Watch(#[from] watch::WatchError),
    #[error("serving ztunnel")]
    Ztunnel(#[from] ztunnel::ZtunnelError),
    #[error("serving the CNI plugin")]
    Server(#[from] server::ServerError),
    #[error("creating the directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Names of what `/readyz` waits for.
pub const READY_WATCHES: &str = "kubernetes watches synced";
pub const READY_PLUGIN_SOCKET: &str = "plugin event socket listening";

/// The agent until `drain` is signalled, with its own readiness state.
pub async fn run(config: Config, drain: drain::Watch) -> Result<(), RunError> {
    run_with(config, Ready::new(), drain).await
}

/// The agent until `drain` is signalled; `ready` turns ready once the
/// Kubernetes watches are synced and the plugin socket listens (what
/// `/readyz` reports). Returns after the drain, once every plugin request
/// in flight was answered.
///
/// Order of start-up: endpoints, CNI install, the first complete list of
/// pods and namespaces, the restore of every enrolled pod's capture, and
/// only then the ztunnel socket (so a reconnecting ztunnel's first
/// snapshot is the full set) and the plugin socket.
pub async fn run_with(config: Config, ready: Ready, drain: drain::Watch) -> Result<(), RunError> {
    let synced = ready.register_task(READY_WATCHES);
    let listening = ready.register_task(READY_PLUGIN_SOCKET);
    let metrics = metrics::Metrics::new();
    let (_, readiness_task) =
        metrics::serve_readiness(config.readiness_addr, ready.clone(), drain.clone()).await?;
    let (_, metrics_task) =
        metrics::serve_metrics(config.metrics_addr, metrics.clone(), drain.clone()).await?;

    let mut background = Vec::new();
    if let Some(cni) = &config.cni {
        let target = install::install_binary(&cni.plugin_source, &cni.bin_dir)?;
        tracing::info!(binary = %target.display(), "CNI plugin installed");
        let entry = install::PluginEntry {
            agent_socket: config.plugin_socket.clone(),
            kubeconfig: config.kubeconfig.clone(),
            exclude_namespaces: config.exclude_namespaces.clone(),
        };
        let d = drain.clone();
        background.push(tokio::spawn(install::keep_installed(
            cni.clone(),
            entry,
            async move { d.signaled().await },
        )));
    }

    let result = serve_node(&config, synced, listening, metrics, &drain, &mut background).await;
    if result.is_err() {
        // A fatal error: nothing will signal the background tasks.
        for task in &background {
            task.abort();
        }
    }
    for task in background {
        match task.await {
            Err(e) if !e.is_cancelled() => tracing::warn!(error = %e, "background task failed"),
            _ => {}
        }
    }
    let _ = std::fs::remove_file(&config.plugin_socket);
    // Only a clean stop uninstalls: an agent that failed is restarted by
    // its DaemonSet and needs the chain as it was.
    if let Some(cni) = config
        .cni
        .as_ref()
        .filter(|c| c.uninstall_on_exit && result.is_ok())
    {
        let cni = cni.clone();
        match tokio::task::spawn_blocking(move || install::uninstall(&cni)).await {
            Ok(Ok(())) => tracing::info!("CNI plugin uninstalled"),
            Ok(Err(e)) => {
                tracing::error!(error = %agent::chain(&e), "cannot uninstall the CNI plugin")
            }
            Err(e) => tracing::error!(error = %e, "CNI uninstall task failed"),
        }
    }
    readiness_task.abort();
    metrics_task.abort();
    result
}

/// From the first list of the API server to the end of the drain.
async fn serve_node(
    config: &Config,
    synced: BlockReady,
    listening: BlockReady,
    metrics: metrics::Metrics,
    drain: &drain::Watch,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), RunError> {
    let client = watch::client(config.kubeconfig.as_deref()).await?;
    let mut watches = watch::Watches::new(client.clone(), &config.node_name);
    let snapshot = tokio::select! {
        s = watches.initial() => s?,
        _ = drain.signaled() => {
            tracing::info!("stopped before the first list completed");
            return Ok(());
        }
    };
    let settings = agent::Settings {
        node_name: config.node_name.clone(),
        exclude_namespaces: config.exclude_namespaces.clone(),
        netns_dirs: config.netns_dirs.clone(),
        rule_options: rules::RuleOptions {
            dns_capture: config.dns_capture,
        },
    };
    let restored = agent::restore(&settings, &snapshot).await;
    tracing::info!(
        captured = restored.iter().filter(|r| r.captured).count(),
        "capture of running pods restored"
    );

    if let Some(dir) = config.ztunnel_socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RunError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let ztunnel = Arc::new(ztunnel::ZtunnelServer::bind(&config.ztunnel_socket)?);
    let cluster = Arc::new(watch::KubeCluster::new(client));
    let agent = agent::Agent::new(settings, ztunnel, cluster, metrics, snapshot, restored);
    agent.sync_annotations().await;
    drop(synced);

    let listener = server::bind(&config.plugin_socket)?;
    tracing::info!(socket = %config.plugin_socket.display(), "serving CNI plugin events");
    drop(listening);

    let d = drain.clone();
    background.push(tokio::spawn(watch::feed(
        agent.clone(),
        watches,
        async move { d.signaled().await },
    )));
    if let Some(interval) = config.repair_interval {
        let d = drain.clone();
        background.push(tokio::spawn(
            agent
                .clone()
                .maintain(interval, async move { d.signaled().await }),
        ));
    }

    server::serve(listener, agent.clone(), drain.clone()).await;
    tracing::info!("plugin socket closed; stopping");
    Ok(())
}
