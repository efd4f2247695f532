//! The mesh's chained CNI plugin (`mesh-cni`).
//!
//! The container runtime runs the CNI chain when it sets up a pod's network,
//! before any of the pod's processes start: the reference plugins give the
//! pod its interface and IPs, then this plugin tells the node agent about
//! the pod (see [`protocol`]) so that, if the pod is in the mesh, the agent
//! installs redirection inside the pod's network namespace and hands the
//! namespace to ztunnel before the application sends its first packet. The
//! plugin itself never touches the pod's network; it passes the previous
//! result on unchanged.
//!
//! Decisions, per command:
//! - ADD: not a pod (no `K8S_POD_*` in `CNI_ARGS`) or a pod of an excluded
//!   namespace: pass through. Otherwise `POST /cmdadd`; `captured` true or
//!   false: pass through; a failure reply: error 11 (the runtime retries).
//!   Agent unreachable: with a `kubeconfig`, read the pod's labels and those
//!   of its namespace — enrolled: error 11 (an enrolled pod must not run
//!   uncaptured); not enrolled: pass through (the mesh being down must not
//!   break other pods). Without a `kubeconfig`: error 11.
//! - CHECK: as ADD with `POST /cmdcheck`, printing nothing on success.
//! - DEL: `POST /cmddel`, best effort: always succeeds.
//! - VERSION: the versions we speak.
//!
//! [`run`] is the whole plugin as a function of environment and stdin, so
//! tests and the fuzzer drive exactly what the binary does.

#![forbid(unsafe_code)]

pub mod agent;
pub mod args;
pub mod config;
pub mod enroll;
pub mod protocol;

use std::future::Future;

use serde::{Deserialize, Serialize};

pub use mesh_core::env::{Env, ProcessEnv};

use crate::agent::{AgentClient, AgentError};
use crate::args::{ArgsError, CniArgs, Command, PodRef};
use crate::config::{ConfigError, NetConf};
use crate::enroll::EnrollError;
use crate::protocol::PodEvent;

/// CNI error codes (spec 1.0, "Error").
pub const CODE_INCOMPATIBLE_VERSION: u32 = 1;
pub const CODE_INVALID_ENV: u32 = 4;
pub const CODE_DECODE: u32 = 6;
pub const CODE_INVALID_CONFIG: u32 = 7;
pub const CODE_TRY_AGAIN_LATER: u32 = 11;
/// Ours: the plugin could not start its I/O runtime.
pub const CODE_INTERNAL: u32 = 100;

/// What VERSION prints.
pub const VERSION_OUTPUT: &str =
    r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#;

/// Everything that fails an invocation.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("CHECK is not defined for cniVersion {0}")]
    CheckUnsupported(String),
    /// The agent answered with a failure.
    #[error("node agent could not {action} pod {pod}: {source}")]
    Agent {
        action: &'static str,
        pod: String,
        #[source]
        source: AgentError,
    },
    /// Agent unreachable and the pod is enrolled.
    #[error("node agent unreachable; pod would run uncaptured: {pod} is in the mesh ({reason})")]
    Uncaptured {
        pod: String,
        reason: String,
        #[source]
        source: AgentError,
    },
    /// Agent unreachable and nothing to ask instead.
    #[error("node agent unreachable; pod would run uncaptured if it is in the mesh, and without a kubeconfig in the network configuration the plugin cannot tell whether {pod} is")]
    NoFallback {
        pod: String,
        #[source]
        source: AgentError,
    },
    /// Agent unreachable and the API server did not tell.
    #[error("node agent unreachable; cannot tell whether pod {pod} is in the mesh: {source}")]
    Lookup {
        pod: String,
        #[source]
        source: Box<EnrollError>,
        agent: AgentError,
    },
    #[error("cannot start the plugin's I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl PluginError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Args(_) => CODE_INVALID_ENV,
            PluginError::Config(e) => e.code(),
            PluginError::CheckUnsupported(_) => CODE_INCOMPATIBLE_VERSION,
            PluginError::Agent { .. }
            | PluginError::Uncaptured { .. }
            | PluginError::NoFallback { .. }
            | PluginError::Lookup { .. } => CODE_TRY_AGAIN_LATER,
            PluginError::Runtime(_) => CODE_INTERNAL,
        }
    }

    /// The `details` of the error result: why the agent was unreachable.
    pub fn details(&self) -> String {
        match self {
            PluginError::Uncaptured { source, .. } | PluginError::NoFallback { source, .. } => {
                source.to_string()
            }
            PluginError::Lookup { agent, .. } => agent.to_string(),
            _ => String::new(),
        }
    }
}

/// The error result a failed invocation prints on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl ErrorResult {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and a number always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One invocation: environment and stdin in, exit status and stdout out.
/// Never panics; logs go through `tracing` (stderr in the binary).
pub fn run(env: &dyn Env, stdin: &[u8]) -> (i32, Vec<u8>) {
    match execute(env, stdin) {
        Ok(out) => (0, out),
        Err(e) => {
            tracing::error!(code = e.code(), "{e}");
            let result = ErrorResult {
                cni_version: config::version_hint(stdin).to_string(),
                code: e.code(),
                msg: e.to_string(),
                details: e.details(),
            };
            (1, result.to_json())
        }
    }
}

fn execute(env: &dyn Env, stdin: &[u8]) -> Result<Vec<u8>, PluginError> {
    let command = args::command(env)?;
    if command == Command::Version {
        return Ok(VERSION_OUTPUT.as_bytes().to_vec());
    }
    let args = CniArgs::from_env(env, command)?;
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Add => {
            add(&args, &conf)?;
            let result = conf.passthrough();
            // A Value of parsed JSON always serializes.
            Ok(serde_json::to_vec(&result).unwrap_or_default())
        }
        Command::Check => check(&args, &conf).map(|()| Vec::new()),
        Command::Del => {
            del(&args, &conf);
            Ok(Vec::new())
        }
        Command::Version => Ok(VERSION_OUTPUT.as_bytes().to_vec()),
    }
}

/// The pod to tell the agent about, or `None` when the plugin has nothing
/// to do for this sandbox.
fn target<'a>(args: &'a CniArgs, conf: &NetConf) -> Option<&'a PodRef> {
    let Some(pod) = &args.pod else {
        tracing::info!(
            container = %args.container_id,
            "{}: not a Kubernetes pod; nothing to do",
            args.command.as_str()
        );
        return None;
    };
    if conf.excluded(&pod.namespace) {
        tracing::info!(
            pod = %pod,
            "{}: namespace is excluded; nothing to do",
            args.command.as_str()
        );
        return None;
    }
    Some(pod)
}

fn event(args: &CniArgs, pod: &PodRef, conf: &NetConf) -> PodEvent {
    PodEvent {
        container_id: args.container_id.clone(),
        netns: args.netns.clone(),
        ifname: args.ifname.clone(),
        pod_name: pod.name.clone(),
        pod_namespace: pod.namespace.clone(),
        pod_uid: pod.uid.clone(),
        pod_ips: conf.pod_ips.clone(),
    }
}

/// Runs `f` on a fresh current-thread runtime: one invocation, one task at
/// a time.
fn block_on<F: Future>(f: F) -> Result<F::Output, PluginError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PluginError::Runtime)?;
    Ok(rt.block_on(f))
}

fn add(args: &CniArgs, conf: &NetConf) -> Result<(), PluginError> {
    let Some(pod) = target(args, conf) else {
        return Ok(());
    };
    let agent = AgentClient::new(&conf.agent_socket, conf.agent_timeout);
    let ev = event(args, pod, conf);
    block_on(async {
        match agent.add(&ev).await {
            Ok(reply) => {
                tracing::info!(pod = %pod, captured = reply.captured, "ADD: node agent answered");
                Ok(())
            }
            Err(e) if e.unreachable() => without_agent(conf, pod, e).await,
            Err(source) => Err(PluginError::Agent {
                action: "set up",
                pod: pod.to_string(),
                source,
            }),
        }
    })?
}

fn check(args: &CniArgs, conf: &NetConf) -> Result<(), PluginError> {
    if !conf.allows_check() {
        return Err(PluginError::CheckUnsupported(conf.cni_version.clone()));
    }
    let Some(pod) = target(args, conf) else {
        return Ok(());
    };
    let agent = AgentClient::new(&conf.agent_socket, conf.agent_timeout);
    let ev = event(args, pod, conf);
    block_on(async {
        match agent.check(&ev).await {
            Ok(()) => Ok(()),
            Err(e) if e.unreachable() => without_agent(conf, pod, e).await,
            Err(source) => Err(PluginError::Agent {
                action: "verify",
                pod: pod.to_string(),
                source,
            }),
        }
    })?
}

/// Best effort: the runtime must be able to tear a pod down whatever state
/// the mesh is in, and the agent also learns of deleted pods from the API
/// server. Excluded namespaces are told too: the agent may have captured a
/// pod by other means than this plugin.
fn del(args: &CniArgs, conf: &NetConf) {
    let Some(pod) = &args.pod else {
        return;
    };
    let agent = AgentClient::new(&conf.agent_socket, conf.agent_timeout);
    let ev = event(args, pod, conf);
    match block_on(agent.del(&ev)) {
        Ok(Ok(())) => tracing::info!(pod = %pod, "DEL: node agent answered"),
        Ok(Err(e)) => tracing::warn!(pod = %pod, "DEL: {e}; the pod is torn down anyway"),
        Err(e) => tracing::warn!(pod = %pod, "DEL: {e}; the pod is torn down anyway"),
    }
}

/// The agent cannot be asked: decide from the API server whether letting
/// the pod run without the agent is safe.
async fn without_agent(conf: &NetConf, pod: &PodRef, agent: AgentError) -> Result<(), PluginError> {
    let Some(kubeconfig) = &conf.kubeconfig else {
        return Err(PluginError::NoFallback {
            pod: pod.to_string(),
            source: agent,
        });
    };
    match enroll::lookup(kubeconfig, pod, conf.agent_timeout).await {
        Ok(e) if e.enrolled() => Err(PluginError::Uncaptured {
            pod: pod.to_string(),
            reason: e.reason(pod),
            source: agent,
        }),
        Ok(e) => {
            tracing::warn!(
                pod = %pod,
                "{agent}; {}: the pod runs outside the mesh",
                e.reason(pod)
            );
            Ok(())
        }
        Err(source) => Err(PluginError::Lookup {
            pod: pod.to_string(),
            source: Box::new(source),
            agent,
        }),
    }
}

#[cfg(test)]
mod tests;
