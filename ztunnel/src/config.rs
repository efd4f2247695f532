//! ztunnel's configuration, read once at start from the environment.
//!
//! Read through the [`Env`] trait so tests can supply their own variables
//! without touching the process environment. Names follow Istio's ztunnel
//! where one exists (`INPOD_UDS`, `LOCAL_XDS_PATH`, `TRUST_DOMAIN`, ...).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A source of environment variables.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} must be set")]
    Missing(&'static str),
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Sign in-process with a CA whose plug-in files (`ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`) are in this
    /// directory. Every ztunnel given the same files trusts the others.
    LocalDir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    /// YAML file of `Address`/`Authorization` resources, reloaded on change.
    pub local_xds_path: PathBuf,
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
    match env.var(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e: T::Err| ConfigError::Invalid {
            name,
            value: v.clone(),
            reason: e.to_string(),
        }),
    }
}

fn seconds(env: &dyn Env, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    match env.var(name) {
        None => Ok(default),
        Some(v) => parse_duration(&v).ok_or_else(|| ConfigError::Invalid {
            name,
            value: v.clone(),
            reason: "expected seconds (`30`) or a duration (`500ms`, `30s`, `5m`, `24h`)".into(),
        }),
    }
}

/// `30`, `30s`, `500ms`, `5m`, `24h`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

impl Config {
    pub fn from_env(env: &dyn Env) -> Result<Config, ConfigError> {
        let local_xds_path = env
            .var("LOCAL_XDS_PATH")
            .map(PathBuf::from)
            .ok_or(ConfigError::Missing("LOCAL_XDS_PATH"))?;
        let ca = match env.var("LOCAL_CA_DIR") {
            Some(dir) => CaSource::LocalDir(PathBuf::from(dir)),
            None => return Err(ConfigError::Missing("LOCAL_CA_DIR")),
        };
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
        Ok(Config {
            local_xds_path,
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
    fn durations() {
        for (s, want) in [
            ("30", Some(30_000)),
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("5m", Some(300_000)),
            ("24h", Some(86_400_000)),
            ("1.5s", Some(1_500)),
            ("", None),
            ("5x", None),
            ("-1", None),
            ("s", None),
        ] {
            assert_eq!(
                parse_duration(s).map(|d| d.as_millis() as u64),
                want,
                "{s:?}"
            );
        }
    }

    #[test]
    fn required_and_invalid_values_are_named() {
        let err = Config::from_env(&[("NODE_NAME", "n")]).unwrap_err();
        assert!(err.to_string().contains("LOCAL_XDS_PATH"), "{err}");
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
