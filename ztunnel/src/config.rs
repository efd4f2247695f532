//! ztunnel's configuration, read once at start from the environment.
//!
//! Read through the [`Env`] trait so tests can supply their own variables
//! without touching the process environment. Names follow Istio's ztunnel
//! where one exists (`INPOD_UDS`, `LOCAL_XDS_PATH`, `TRUST_DOMAIN`, ...).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::env::{duration_var, parse_var};
pub use mesh_core::env::{Env, ProcessEnv};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Env(#[from] mesh_core::env::EnvError),
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} must be set")]
    Missing(&'static str),
    #[error(transparent)]
    ControlPlane(#[from] mesh_core::controlplane::ControlPlaneError),
}

pub use mesh_core::controlplane::{
    CaSource, ControlPlane, XdsSource, DEFAULT_ROOT_CA, DEFAULT_TOKEN_PATH,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub xds: XdsSource,
    /// xDS node id: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    /// The node agent's ZDS socket.
    pub inpod_uds: PathBuf,
    pub ca: CaSource,
    pub trust_domain: String,
    pub cluster_id: String,
    pub network: String,
    pub node_name: String,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_timeout: Duration,
    /// Bound on establishing an upstream TCP connection.
    pub connect_timeout: Duration,
    pub cert_ttl: Duration,
    /// Outbound HBONE connections idle this long are closed.
    pub pool_idle_timeout: Duration,
    /// Streams on one HBONE connection before the pool opens another.
    pub pool_max_streams: usize,
}

fn parse<T: std::str::FromStr>(
    env: &dyn Env,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    Ok(parse_var(env, name, default)?)
}

fn seconds(env: &dyn Env, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    Ok(duration_var(env, name, default)?)
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let (xds, ca) = mesh_core::controlplane::sources_from_env(env)?;
        let node_name = env
            .var("NODE_NAME")
            .ok_or(ConfigError::Missing("NODE_NAME"))?;
        let pool_max_streams = parse(env, "POOL_MAX_STREAMS_PER_CONNECTION", 100usize)?;
        if pool_max_streams == 0 {
            return Err(ConfigError::Invalid {
                name: "POOL_MAX_STREAMS_PER_CONNECTION",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let pod_name = env
            .var("POD_NAME")
            .unwrap_or_else(|| format!("ztunnel-{node_name}"));
        let pod_ns = env
            .var("POD_NAMESPACE")
            .unwrap_or_else(|| "istio-system".into());
        let node_id = format!(
            "ztunnel~{}~{pod_name}.{pod_ns}~{pod_ns}.svc.cluster.local",
            env.var("INSTANCE_IP").unwrap_or_default()
        );
        Ok(Config {
            xds,
            node_id,
            inpod_uds: env
                .var("INPOD_UDS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(mesh_core::zds::DEFAULT_SOCKET_PATH)),
            ca,
            trust_domain: env
                .var("TRUST_DOMAIN")
                .unwrap_or_else(|| "cluster.local".into()),
            cluster_id: env.var("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            network: env.var("NETWORK").unwrap_or_default(),
            node_name,
            admin_addr: parse(env, "ADMIN_ADDR", SocketAddr::from(([127, 0, 0, 1], 15000)))?,
            stats_addr: parse(env, "STATS_ADDR", SocketAddr::from(([0, 0, 0, 0], 15020)))?,
            readiness_addr: parse(
                env,
                "READINESS_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 15021)),
            )?,
            drain_timeout: seconds(env, "DRAIN_TIMEOUT", Duration::from_secs(5))?,
            connect_timeout: seconds(env, "CONNECT_TIMEOUT", Duration::from_secs(10))?,
            cert_ttl: seconds(env, "WORKLOAD_CERT_TTL", Duration::from_secs(24 * 3600))?,
            pool_idle_timeout: seconds(env, "POOL_IDLE_TIMEOUT", Duration::from_secs(300))?,
            pool_max_streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_and_invalid_values_are_named() {
        let err = Config::from_env(&[("NODE_NAME", "n")]).unwrap_err();
        assert!(err.to_string().contains("LOCAL_XDS_PATH"), "{err}");
        let err =
            Config::from_env(&[("NODE_NAME", "n"), ("XDS_ADDRESS", "istiod:15012")]).unwrap_err();
        assert!(err.to_string().starts_with("XDS_ADDRESS="), "{err}");
        let cfg = Config::from_env(&[
            ("NODE_NAME", "n"),
            ("XDS_ADDRESS", "https://istiod.istio-system.svc:15012"),
            ("POD_NAME", "ztunnel-abc"),
            ("INSTANCE_IP", "10.0.0.7"),
        ])
        .unwrap();
        let XdsSource::ControlPlane(cp) = &cfg.xds else {
            panic!("{:?}", cfg.xds)
        };
        assert_eq!(cp.root_ca, PathBuf::from(DEFAULT_ROOT_CA));
        assert!(matches!(&cfg.ca, CaSource::ControlPlane(c) if c.address == cp.address));
        assert_eq!(
            cfg.node_id,
            "ztunnel~10.0.0.7~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let err = Config::from_env(&[
            ("LOCAL_XDS_PATH", "/s.yaml"),
            ("LOCAL_CA_DIR", "/ca"),
            ("NODE_NAME", "n"),
            ("ADMIN_ADDR", "nope"),
        ])
        .unwrap_err();
        assert!(err.to_string().starts_with("ADMIN_ADDR=\"nope\""), "{err}");
        let cfg = Config::from_env(&[
            ("LOCAL_XDS_PATH", "/s.yaml"),
            ("LOCAL_CA_DIR", "/ca"),
            ("NODE_NAME", "n"),
            ("DRAIN_TIMEOUT", "2s"),
        ])
        .unwrap();
        assert_eq!(cfg.drain_timeout, Duration::from_secs(2));
        assert_eq!(cfg.admin_addr.port(), 15000);
        assert_eq!(cfg.trust_domain, "cluster.local");
    }
}
