//! The waypoint's configuration, read once at start from the environment.
//!
//! Same names and conventions as ztunnel's (read through
//! [`mesh_core::env::Env`] so tests supply their own variables): either a
//! control plane (`XDS_ADDRESS`, `CA_ADDRESS`, ...) or local files
//! (`LOCAL_XDS_PATH`, `LOCAL_CA_DIR`) for tests and the local mesh.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::env::{duration_var, parse_var, EnvError};
pub use mesh_core::env::{Env, ProcessEnv};
use mesh_core::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Env(#[from] EnvError),
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

// The local file's YAML has `addresses:` (as ztunnel's) and `routes:`
// (ServiceRoutes in proto3 JSON).
pub use mesh_core::controlplane::{
    CaSource, ControlPlane, XdsSource, DEFAULT_ROOT_CA, DEFAULT_TOKEN_PATH,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub xds: XdsSource,
    pub ca: CaSource,
    /// xDS node id: `waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: Option<std::net::IpAddr>,
    pub trust_domain: String,
    pub service_account: String,
    pub cluster_id: String,
    /// Where HBONE is accepted (15008).
    pub hbone_addr: SocketAddr,
    /// Port of the endpoints' HBONE servers.
    pub upstream_hbone_port: u16,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub cert_ttl: Duration,
    /// Largest request body buffered for retries and mirroring.
    pub max_request_body: usize,
}

impl Config {
    /// The identity the waypoint presents on both sides.
    pub fn identity(&self) -> Identity {
        Identity::new(
            &self.trust_domain,
            &self.pod_namespace,
            &self.service_account,
        )
    }

    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let (xds, ca) = mesh_core::controlplane::sources_from_env(env)?;
        let pod_name = env.var("POD_NAME").unwrap_or_else(|| "waypoint".into());
        let pod_namespace = env.var("POD_NAMESPACE").unwrap_or_else(|| "default".into());
        let instance_ip = match env.var("INSTANCE_IP") {
            None => None,
            Some(v) => Some(v.parse::<std::net::IpAddr>().map_err(
                |e: std::net::AddrParseError| ConfigError::Invalid {
                    name: "INSTANCE_IP",
                    value: v.clone(),
                    reason: e.to_string(),
                },
            )?),
        };
        let node_id = format!(
            "waypoint~{}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local",
            instance_ip
                .map(|i: std::net::IpAddr| i.to_string())
                .unwrap_or_default()
        );
        Ok(Config {
            xds,
            ca,
            node_id,
            instance_ip,
            trust_domain: env
                .var("TRUST_DOMAIN")
                .unwrap_or_else(|| "cluster.local".into()),
            // A Gateway-provisioned waypoint runs as the ServiceAccount named
            // after the Gateway, which is also its pod name prefix.
            service_account: env
                .var("SERVICE_ACCOUNT")
                .unwrap_or_else(|| "waypoint".into()),
            cluster_id: env.var("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            pod_name,
            pod_namespace,
            hbone_addr: parse_var(env, "HBONE_ADDR", SocketAddr::from(([0, 0, 0, 0], 15008)))?,
            upstream_hbone_port: parse_var(
                env,
                "UPSTREAM_HBONE_PORT",
                mesh_core::hbone::HBONE_PORT,
            )?,
            admin_addr: parse_var(env, "ADMIN_ADDR", SocketAddr::from(([127, 0, 0, 1], 15000)))?,
            stats_addr: parse_var(env, "STATS_ADDR", SocketAddr::from(([0, 0, 0, 0], 15020)))?,
            readiness_addr: parse_var(
                env,
                "READINESS_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 15021)),
            )?,
            drain_timeout: duration_var(env, "DRAIN_TIMEOUT", Duration::from_secs(5))?,
            connect_timeout: duration_var(env, "CONNECT_TIMEOUT", Duration::from_secs(10))?,
            cert_ttl: duration_var(env, "WORKLOAD_CERT_TTL", Duration::from_secs(24 * 3600))?,
            max_request_body: parse_var(env, "MAX_REQUEST_BODY_BYTES", 4 * 1024 * 1024usize)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_defaults_and_errors() {
        let err = Config::from_env(&[("POD_NAME", "w")]).unwrap_err();
        assert!(err.to_string().contains("LOCAL_XDS_PATH"), "{err}");
        let err = Config::from_env(&[("XDS_ADDRESS", "istiod:15012")]).unwrap_err();
        assert!(err.to_string().starts_with("XDS_ADDRESS="), "{err}");
        let cfg = Config::from_env(&[
            ("XDS_ADDRESS", "https://istiod.istio-system.svc:15012"),
            ("POD_NAME", "waypoint-abc"),
            ("POD_NAMESPACE", "bookinfo"),
            ("INSTANCE_IP", "10.0.0.7"),
            ("SERVICE_ACCOUNT", "waypoint"),
        ])
        .unwrap();
        assert!(matches!(&cfg.ca, CaSource::ControlPlane(c) if c.address.ends_with(":15012")));
        assert_eq!(
            cfg.node_id,
            "waypoint~10.0.0.7~waypoint-abc.bookinfo~bookinfo.svc.cluster.local"
        );
        assert_eq!(
            cfg.identity().to_string(),
            "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
        );
        assert_eq!(cfg.hbone_addr.port(), 15008);
        assert_eq!(cfg.admin_addr, SocketAddr::from(([127, 0, 0, 1], 15000)));
        let cfg = Config::from_env(&[
            ("LOCAL_XDS_PATH", "/s.yaml"),
            ("LOCAL_CA_DIR", "/ca"),
            ("HBONE_ADDR", "127.0.0.1:25008"),
        ])
        .unwrap();
        assert_eq!(cfg.hbone_addr.port(), 25008);
        assert_eq!(cfg.ca, CaSource::LocalDir("/ca".into()));
        let err = Config::from_env(&[
            ("LOCAL_XDS_PATH", "/s.yaml"),
            ("LOCAL_CA_DIR", "/ca"),
            ("HBONE_ADDR", "nope"),
        ])
        .unwrap_err();
        assert!(err.to_string().starts_with("HBONE_ADDR="), "{err}");
    }
}
