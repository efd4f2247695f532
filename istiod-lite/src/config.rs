//! istiod-lite's configuration, read once at start from the environment
//! (names follow istiod's where one exists: `CLUSTER_ID`, `TRUST_DOMAIN`,
//! `POD_NAMESPACE`, `CA_TRUSTED_NODE_ACCOUNTS`, `XDS_AUTH`,
//! `DEFAULT_WORKLOAD_CERT_TTL`, `MAX_WORKLOAD_CERT_TTL`, `ROOT_NAMESPACE`),
//! plus `WAYPOINT_IMAGE` and `WAYPOINT_XDS_ADDRESS` for the waypoints it
//! provisions.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::env::{duration_var, parse_var, Env, EnvError};
use mesh_core::identity::Identity;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable does not parse.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A variable parses but makes no sense.
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The Kubernetes API server (in-cluster or `KUBECONFIG`).
    Kubernetes,
    /// A folder of Kubernetes YAML, watched for changes.
    Dir(PathBuf),
}

/// Everything istiod-lite is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Input objects.
    pub source: Source,
    /// TLS gRPC listener serving delta xDS and the CA (istiod's 15012).
    pub grpc_addr: SocketAddr,
    /// Plain HTTP: `/ready` (istiod's 8080).
    pub http_addr: SocketAddr,
    /// Trust domain of every identity.
    pub trust_domain: String,
    /// This cluster's id, prefixed to workload uids.
    pub cluster_id: String,
    /// Network of this cluster's pods (`topology.istio.io/network`).
    pub network: String,
    /// Cluster DNS suffix.
    pub domain_suffix: String,
    /// Namespace istiod-lite runs in: where its CA Secret lives.
    pub namespace: String,
    /// Istio's root namespace (`ROOT_NAMESPACE`, default `istio-system`):
    /// security policies there apply mesh-wide.
    pub root_namespace: String,
    /// Plug-in CA files, used when `ca-cert.pem` is present there.
    pub cacerts_dir: PathBuf,
    /// Without Kubernetes, the self-signed root is persisted here.
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of a workload certificate when the caller asks for none.
    pub default_cert_ttl: Duration,
    /// Longest workload certificate issued.
    pub max_cert_ttl: Duration,
    /// Service accounts (`<ns>/<sa>`) allowed to ask for certificates of
    /// pods on their own node: the ztunnels.
    pub trusted_node_accounts: Vec<Identity>,
    /// Extra names and addresses in the serving certificate.
    pub extra_dns_sans: Vec<String>,
    /// Extra IPs in the serving certificate.
    pub extra_ip_sans: Vec<IpAddr>,
    /// Write the root certificate here (for local consumers).
    pub root_cert_out: Option<PathBuf>,
    /// Require a valid token on every xDS stream.
    pub xds_auth: bool,
    /// Only namespaces carrying all these labels are part of the mesh
    /// (Istio's `discoverySelectors`, one `matchLabels`); empty = all.
    pub discovery_selector: BTreeMap<String, String>,
    /// Image of the waypoints it provisions (`WAYPOINT_IMAGE`).
    pub waypoint_image: String,
    /// The address waypoints get xDS and certificates from
    /// (`WAYPOINT_XDS_ADDRESS`, default `https://istiod.<namespace>.svc:15012`).
    pub waypoint_xds_address: String,
}

impl Config {
    /// Reads the configuration.
    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let trust_domain = env
            .var("TRUST_DOMAIN")
            .unwrap_or_else(|| "cluster.local".into());
        let source = match env.var("CONFIG_DIR") {
            Some(d) => Source::Dir(PathBuf::from(d)),
            None => Source::Kubernetes,
        };
        let accounts = env
            .var("CA_TRUSTED_NODE_ACCOUNTS")
            .unwrap_or_else(|| "istio-system/ztunnel".into());
        let mut trusted_node_accounts = Vec::new();
        for a in accounts.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let Some((ns, sa)) = a.split_once('/') else {
                return Err(ConfigError::Invalid {
                    name: "CA_TRUSTED_NODE_ACCOUNTS",
                    value: accounts.clone(),
                    reason: format!("{a:?} is not <namespace>/<serviceaccount>"),
                });
            };
            trusted_node_accounts.push(Identity::new(&trust_domain, ns, sa));
        }
        let mut extra_dns_sans = Vec::new();
        let mut extra_ip_sans = Vec::new();
        for s in env
            .var("ISTIOD_SANS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match s.parse::<IpAddr>() {
                Ok(ip) => extra_ip_sans.push(ip),
                Err(_) => extra_dns_sans.push(s.to_string()),
            }
        }
        let default_cert_ttl = duration_var(
            env,
            "DEFAULT_WORKLOAD_CERT_TTL",
            Duration::from_secs(24 * 3600),
        )?;
        let max_cert_ttl = duration_var(
            env,
            "MAX_WORKLOAD_CERT_TTL",
            Duration::from_secs(90 * 24 * 3600),
        )?;
        if default_cert_ttl > max_cert_ttl || default_cert_ttl < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                name: "DEFAULT_WORKLOAD_CERT_TTL",
                value: format!("{default_cert_ttl:?}"),
                reason: format!("must be between 1m and MAX_WORKLOAD_CERT_TTL ({max_cert_ttl:?})"),
            });
        }
        let mut discovery_selector = BTreeMap::new();
        let sel = env.var("DISCOVERY_SELECTORS").unwrap_or_default();
        for kv in sel.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    discovery_selector.insert(k.trim().to_string(), v.trim().to_string());
                }
                _ => {
                    return Err(ConfigError::Invalid {
                        name: "DISCOVERY_SELECTORS",
                        value: sel.clone(),
                        reason: format!("{kv:?} is not <label>=<value>"),
                    })
                }
            }
        }
        let namespace = env
            .var("POD_NAMESPACE")
            .unwrap_or_else(|| "istio-system".into());
        Ok(Config {
            waypoint_image: env
                .var("WAYPOINT_IMAGE")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| crate::waypoints::DEFAULT_IMAGE.into()),
            waypoint_xds_address: env
                .var("WAYPOINT_XDS_ADDRESS")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| format!("https://istiod.{namespace}.svc:15012")),
            discovery_selector,
            source,
            grpc_addr: parse_var(env, "GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 15012)))?,
            http_addr: parse_var(env, "HTTP_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            trust_domain,
            cluster_id: env.var("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            network: env.var("NETWORK").unwrap_or_default(),
            domain_suffix: env
                .var("DOMAIN_SUFFIX")
                .unwrap_or_else(|| "cluster.local".into()),
            namespace,
            root_namespace: env
                .var("ROOT_NAMESPACE")
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "istio-system".into()),
            cacerts_dir: PathBuf::from(
                env.var("CACERTS_DIR")
                    .unwrap_or_else(|| "/etc/cacerts".into()),
            ),
            ca_dir: env.var("CA_DIR").map(PathBuf::from),
            default_cert_ttl,
            max_cert_ttl,
            trusted_node_accounts,
            extra_dns_sans,
            extra_ip_sans,
            root_cert_out: env.var("ROOT_CERT_OUT").map(PathBuf::from),
            xds_auth: parse_var(env, "XDS_AUTH", true)?,
        })
    }

    /// DNS names of the serving certificate: how ztunnels address us.
    pub fn dns_sans(&self) -> Vec<String> {
        let ns = &self.namespace;
        let mut v = vec![
            format!("istiod.{ns}.svc"),
            format!("istiod.{ns}.svc.{}", self.domain_suffix),
            format!("istiod-lite.{ns}.svc"),
            format!("istiod-lite.{ns}.svc.{}", self.domain_suffix),
            "localhost".to_string(),
        ];
        v.extend(self.extra_dns_sans.iter().cloned());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::from_env(&[("CLUSTER_ID", "c1")]).unwrap();
        assert_eq!(c.source, Source::Kubernetes);
        assert_eq!(c.root_namespace, "istio-system");
        let r = Config::from_env(&[("ROOT_NAMESPACE", "mesh-root")]).unwrap();
        assert_eq!(r.root_namespace, "mesh-root");
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(
            c.trusted_node_accounts,
            [Identity::new("cluster.local", "istio-system", "ztunnel")]
        );
        assert!(c.xds_auth);
        assert_eq!(c.waypoint_image, "ghcr.io/ambient-mesh/waypoint:0.1.0");
        assert_eq!(
            c.waypoint_xds_address,
            "https://istiod.istio-system.svc:15012"
        );
        let w = Config::from_env(&[
            ("POD_NAMESPACE", "mesh"),
            ("WAYPOINT_IMAGE", "example/wp:1"),
        ])
        .unwrap();
        assert_eq!(w.waypoint_image, "example/wp:1");
        assert_eq!(w.waypoint_xds_address, "https://istiod.mesh.svc:15012");
        let c = Config::from_env(&[
            ("CONFIG_DIR", "/x"),
            ("ISTIOD_SANS", "10.0.0.1, istiod.example"),
        ])
        .unwrap();
        assert_eq!(c.source, Source::Dir("/x".into()));
        assert_eq!(c.extra_ip_sans, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(c.dns_sans().contains(&"istiod.example".to_string()));
        let e = Config::from_env(&[("CA_TRUSTED_NODE_ACCOUNTS", "ztunnel")]).unwrap_err();
        assert!(
            e.to_string().starts_with("CA_TRUSTED_NODE_ACCOUNTS="),
            "{e}"
        );
        let e = Config::from_env(&[("DEFAULT_WORKLOAD_CERT_TTL", "100d")]).unwrap_err();
        assert!(e.to_string().contains("MAX_WORKLOAD_CERT_TTL"), "{e}");
        let c = Config::from_env(&[("DISCOVERY_SELECTORS", "a=b, c=")]).unwrap();
        assert_eq!(c.discovery_selector.len(), 2);
        assert_eq!(c.discovery_selector["c"], "");
        let e = Config::from_env(&[("DISCOVERY_SELECTORS", "a")]).unwrap_err();
        assert!(e.to_string().starts_with("DISCOVERY_SELECTORS="), "{e}");
        let e = Config::from_env(&[("GRPC_ADDR", "x")]).unwrap_err();
        assert!(e.to_string().starts_with("GRPC_ADDR="), "{e}");
    }
}
