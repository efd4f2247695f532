//! The node agent's settings, read once at start from the environment (the
//! DaemonSet's `env:`). Nothing here touches the traffic path directly; it
//! says where the agent listens for the CNI plugin and for ztunnel, where it
//! looks for pod network namespaces, and whether it installs the plugin into
//! the node's CNI configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::env::{self, Env, EnvError};

/// Default socket of the plugin-event protocol (the plugin's default too).
pub const DEFAULT_PLUGIN_SOCKET: &str = cni_plugin::protocol::DEFAULT_AGENT_SOCKET;
/// Default socket ztunnel connects to.
pub const DEFAULT_ZTUNNEL_SOCKET: &str = mesh_core::zds::DEFAULT_SOCKET_PATH;
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:8000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15014";
pub const DEFAULT_REPAIR_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_NETNS_DIRS: &str = "/var/run/netns";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_EXCLUDE_NAMESPACES: &str = "kube-system";
/// How often the CNI configuration directory is looked at.
pub const DEFAULT_CNI_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Name of the plugin binary, and its `type` in the network configuration.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// Errors of reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be set")]
    Missing(&'static str),
    #[error(transparent)]
    Invalid(#[from] EnvError),
    #[error("cannot locate the node agent executable to find {PLUGIN_TYPE} next to it: {0}")]
    CurrentExe(#[source] std::io::Error),
}

/// Installing the plugin into the node's CNI configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInstall {
    /// `CNI_BIN_DIR`: where the runtime looks for plugin binaries.
    pub bin_dir: PathBuf,
    /// `CNI_NET_DIR`: where the runtime reads `*.conflist` files.
    pub net_dir: PathBuf,
    /// `CNI_PLUGIN_SOURCE`: the plugin binary to copy.
    pub plugin_source: PathBuf,
    /// `UNINSTALL_CNI_ON_EXIT`: remove our entry (and binary) on a clean stop.
    pub uninstall_on_exit: bool,
    /// `CNI_POLL_INTERVAL`: how often the configuration is checked (it may
    /// not exist yet, or be rewritten by the primary network plugin).
    pub poll_interval: Duration,
}

/// Everything the agent needs to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `NODE_NAME`: only pods of this node are watched and captured.
    pub node_name: String,
    /// `KUBECONFIG`: a kubeconfig file; in-cluster configuration otherwise.
    pub kubeconfig: Option<PathBuf>,
    /// `PLUGIN_EVENT_SOCKET`.
    pub plugin_socket: PathBuf,
    /// `ZTUNNEL_SOCKET`.
    pub ztunnel_socket: PathBuf,
    /// `READINESS_ADDR`: `GET /readyz`.
    pub readiness_addr: SocketAddr,
    /// `METRICS_ADDR`: `GET /metrics`.
    pub metrics_addr: SocketAddr,
    /// `REPAIR_INTERVAL`; `None` (`0`) disables the periodic check.
    pub repair_interval: Option<Duration>,
    /// `NETNS_DIRS` (colon-separated): named network namespaces to scan for
    /// pods the agent has not heard of from the plugin.
    pub netns_dirs: Vec<PathBuf>,
    /// `EXCLUDE_NAMESPACES` (comma-separated): never captured.
    pub exclude_namespaces: Vec<String>,
    /// `DNS_CAPTURE`: also redirect the pods' DNS to ztunnel (15053).
    pub dns_capture: bool,
    /// Set when both `CNI_BIN_DIR` and `CNI_NET_DIR` are.
    pub cni: Option<CniInstall>,
    /// `DRAIN_TIMEOUT`: how long a stop waits for requests in flight.
    pub drain_timeout: Duration,
}

fn list(v: &str, sep: char) -> Vec<String> {
    v.split(sep)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Config {
    /// Reads the configuration; see the field docs for the variables.
    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let node_name = env
            .var("NODE_NAME")
            .ok_or(ConfigError::Missing("NODE_NAME"))?;
        let path = |name: &'static str, default: &str| {
            PathBuf::from(env.var(name).unwrap_or_else(|| default.to_string()))
        };
        let repair = env::duration_var(env, "REPAIR_INTERVAL", DEFAULT_REPAIR_INTERVAL)?;
        let cni = match (env.var("CNI_BIN_DIR"), env.var("CNI_NET_DIR")) {
            (Some(bin), Some(net)) => {
                let plugin_source = match env.var("CNI_PLUGIN_SOURCE") {
                    Some(p) => PathBuf::from(p),
                    None => {
                        let exe = std::env::current_exe().map_err(ConfigError::CurrentExe)?;
                        exe.with_file_name(PLUGIN_TYPE)
                    }
                };
                Some(CniInstall {
                    bin_dir: PathBuf::from(bin),
                    net_dir: PathBuf::from(net),
                    plugin_source,
                    uninstall_on_exit: env::parse_var(env, "UNINSTALL_CNI_ON_EXIT", false)?,
                    poll_interval: env::duration_var(
                        env,
                        "CNI_POLL_INTERVAL",
                        DEFAULT_CNI_POLL_INTERVAL,
                    )?,
                })
            }
            _ => None,
        };
        Ok(Config {
            node_name,
            kubeconfig: env.var("KUBECONFIG").map(PathBuf::from),
            plugin_socket: path("PLUGIN_EVENT_SOCKET", DEFAULT_PLUGIN_SOCKET),
            ztunnel_socket: path("ZTUNNEL_SOCKET", DEFAULT_ZTUNNEL_SOCKET),
            readiness_addr: env::parse_var(
                env,
                "READINESS_ADDR",
                DEFAULT_READINESS_ADDR.parse().expect("valid default"),
            )?,
            metrics_addr: env::parse_var(
                env,
                "METRICS_ADDR",
                DEFAULT_METRICS_ADDR.parse().expect("valid default"),
            )?,
            repair_interval: Some(repair).filter(|d| !d.is_zero()),
            netns_dirs: list(
                &env.var("NETNS_DIRS")
                    .unwrap_or_else(|| DEFAULT_NETNS_DIRS.to_string()),
                ':',
            )
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            exclude_namespaces: list(
                &env.var("EXCLUDE_NAMESPACES")
                    .unwrap_or_else(|| DEFAULT_EXCLUDE_NAMESPACES.to_string()),
                ',',
            ),
            dns_capture: env::parse_var(env, "DNS_CAPTURE", false)?,
            cni,
            drain_timeout: env::duration_var(env, "DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_env(&[("NODE_NAME", "n1")]).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.kubeconfig, None);
        assert_eq!(
            c.plugin_socket,
            PathBuf::from("/var/run/istio-cni/pluginevent.sock")
        );
        assert_eq!(
            c.ztunnel_socket,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(c.readiness_addr, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.metrics_addr, "0.0.0.0:15014".parse().unwrap());
        assert_eq!(c.repair_interval, Some(Duration::from_secs(10)));
        assert_eq!(c.netns_dirs, [PathBuf::from("/var/run/netns")]);
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        assert!(!c.dns_capture);
        assert_eq!(c.cni, None);
    }

    #[test]
    fn everything_set() {
        let c = Config::from_env(&[
            ("NODE_NAME", "n1"),
            ("KUBECONFIG", "/k"),
            ("PLUGIN_EVENT_SOCKET", "/p.sock"),
            ("ZTUNNEL_SOCKET", "/z.sock"),
            ("READINESS_ADDR", "127.0.0.1:1"),
            ("METRICS_ADDR", "127.0.0.1:2"),
            ("REPAIR_INTERVAL", "0"),
            ("NETNS_DIRS", "/a:/b:"),
            ("EXCLUDE_NAMESPACES", "kube-system, istio-system"),
            ("DNS_CAPTURE", "true"),
            ("CNI_BIN_DIR", "/opt/cni/bin"),
            ("CNI_NET_DIR", "/etc/cni/net.d"),
            ("CNI_PLUGIN_SOURCE", "/src/mesh-cni"),
            ("UNINSTALL_CNI_ON_EXIT", "true"),
        ])
        .unwrap();
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(c.repair_interval, None);
        assert_eq!(c.netns_dirs, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.exclude_namespaces, ["kube-system", "istio-system"]);
        assert!(c.dns_capture);
        let cni = c.cni.unwrap();
        assert_eq!(cni.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(cni.plugin_source, PathBuf::from("/src/mesh-cni"));
        assert!(cni.uninstall_on_exit);
    }

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_env(&[("X", "y")]).unwrap_err();
        assert!(e.to_string().contains("NODE_NAME"), "{e}");
        let e = Config::from_env(&[("NODE_NAME", "n"), ("REPAIR_INTERVAL", "soon")]).unwrap_err();
        assert!(e.to_string().contains("REPAIR_INTERVAL"), "{e}");
        let e = Config::from_env(&[("NODE_NAME", "n"), ("READINESS_ADDR", "nope")]).unwrap_err();
        assert!(e.to_string().contains("READINESS_ADDR"), "{e}");
        // Only one of the two CNI directories: no install.
        let c = Config::from_env(&[("NODE_NAME", "n"), ("CNI_BIN_DIR", "/b")]).unwrap();
        assert_eq!(c.cni, None);
    }
}
