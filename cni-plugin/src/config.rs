//! The network configuration the runtime writes on the plugin's stdin.
//!
//! When a pod's network is set up, the runtime runs the plugins of the
//! chain one after the other (the reference plugins first, then this one)
//! and hands each the same configuration plus, as `prevResult`, what the
//! plugins before it produced: the pod's interfaces and IPs. This plugin
//! only reads it and gives `prevResult` back unchanged.
//!
//! Plugin keys, next to the standard `cniVersion`, `name`, `type`:
//! `agentSocket` (default [`DEFAULT_AGENT_SOCKET`]), `agentTimeoutSeconds`
//! (default 30, 1..=3600; bounds the request to the agent and, separately,
//! the API lookup when the agent is unreachable), `kubeconfig` (path; empty
//! or absent = none), `excludeNamespaces` (default `["kube-system"]`).
//! Other keys are ignored.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

pub use crate::protocol::DEFAULT_AGENT_SOCKET;

/// Versions of the CNI spec this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Default for `agentTimeoutSeconds`.
pub const DEFAULT_AGENT_TIMEOUT_SECONDS: u64 = 30;
const MAX_AGENT_TIMEOUT_SECONDS: u64 = 3600;

/// Errors of reading the configuration; each maps to its CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON at all (code 6).
    #[error("network configuration on stdin is not valid JSON: {0}")]
    Decode(#[source] serde_json::Error),
    /// JSON of the wrong shape (code 7); the path names the field.
    #[error("network configuration: field {path}: {source}")]
    Field {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A value of the right type that makes no sense (code 7).
    #[error("network configuration: field {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A spec version we do not speak (code 1).
    #[error("cniVersion {0:?} is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0)")]
    Version(String),
}

impl ConfigError {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            ConfigError::Decode(_) => crate::CODE_DECODE,
            ConfigError::Field { .. } | ConfigError::Invalid { .. } => crate::CODE_INVALID_CONFIG,
            ConfigError::Version(_) => crate::CODE_INCOMPATIBLE_VERSION,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default)]
    agent_socket: Option<String>,
    #[serde(default)]
    agent_timeout_seconds: Option<u64>,
    #[serde(default)]
    kubeconfig: Option<String>,
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
}

/// The part of a CNI result this plugin reads (same shape from 0.3.0 to
/// 1.0.0).
#[derive(Deserialize)]
struct PrevIps {
    #[serde(default)]
    ips: Option<Vec<PrevIp>>,
}

#[derive(Deserialize)]
struct PrevIp {
    address: String,
}

/// The typed network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The previous plugins' result, passed on unchanged.
    pub prev_result: Option<Value>,
    /// Pod IPs from `prevResult.ips[].address`, without prefix length.
    pub pod_ips: Vec<IpAddr>,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    pub kubeconfig: Option<PathBuf>,
    pub exclude_namespaces: Vec<String>,
}

impl NetConf {
    /// Parses stdin. Syntax errors are [`ConfigError::Decode`]; wrong
    /// types, missing fields and bad values name the field.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
        // Syntax first (code 6), then shape (code 7): a JSON array or
        // number is a configuration of the wrong shape, not bad JSON.
        let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
        if !value.is_object() {
            return Err(invalid("(top level)", "must be a JSON object"));
        }
        let raw: RawConf =
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Field {
                path: e.path().to_string(),
                source: e.into_inner(),
            })?;

        if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
            return Err(ConfigError::Version(raw.cni_version));
        }
        let pod_ips = match &raw.prev_result {
            Some(prev) => prev_ips(prev)?,
            None => Vec::new(),
        };
        let agent_socket = match raw.agent_socket {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(s) if s.is_empty() || s.contains('\0') => {
                return Err(invalid("agentSocket", "must be a non-empty path"))
            }
            Some(s) => PathBuf::from(s),
        };
        let secs = raw
            .agent_timeout_seconds
            .unwrap_or(DEFAULT_AGENT_TIMEOUT_SECONDS);
        if !(1..=MAX_AGENT_TIMEOUT_SECONDS).contains(&secs) {
            return Err(invalid(
                "agentTimeoutSeconds",
                &format!("{secs} is outside 1..={MAX_AGENT_TIMEOUT_SECONDS}"),
            ));
        }
        let kubeconfig = match raw.kubeconfig {
            Some(s) if s.contains('\0') => return Err(invalid("kubeconfig", "contains NUL")),
            Some(s) if !s.is_empty() => Some(PathBuf::from(s)),
            _ => None,
        };
        Ok(NetConf {
            cni_version: raw.cni_version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            prev_result: raw.prev_result,
            pod_ips,
            agent_socket,
            agent_timeout: Duration::from_secs(secs),
            kubeconfig,
            exclude_namespaces: raw
                .exclude_namespaces
                .unwrap_or_else(|| vec!["kube-system".to_string()]),
        })
    }

    /// Whether pods of `namespace` are left alone.
    pub fn excluded(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }

    /// What ADD prints on success: `prevResult` as given, or an empty
    /// result of our version when this plugin runs first in the chain.
    pub fn passthrough(&self) -> Value {
        match &self.prev_result {
            Some(v) => v.clone(),
            None => serde_json::json!({ "cniVersion": self.cni_version }),
        }
    }

    /// Whether the configured version knows CHECK (0.4.0 and later).
    pub fn allows_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }
}

fn invalid(field: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, ConfigError> {
    if !prev.is_object() {
        return Err(invalid("prevResult", "must be a JSON object"));
    }
    let parsed: PrevIps =
        serde_path_to_error::deserialize(prev).map_err(|e| ConfigError::Field {
            path: format!("prevResult.{}", e.path()),
            source: e.into_inner(),
        })?;
    let mut ips = Vec::new();
    for (i, ip) in parsed.ips.unwrap_or_default().iter().enumerate() {
        let addr = ip.address.split_once('/').map_or(&*ip.address, |(a, _)| a);
        let addr = addr.parse().map_err(|_| {
            invalid(
                &format!("prevResult.ips[{i}].address"),
                &format!("{:?} is not an address in CIDR notation", ip.address),
            )
        })?;
        ips.push(addr);
    }
    Ok(ips)
}

/// The `cniVersion` to put on an error: the configuration's when it is
/// one we speak, 1.0.0 otherwise (also when stdin does not parse).
pub fn version_hint(stdin: &[u8]) -> &'static str {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    let v = serde_json::from_slice::<V>(stdin)
        .ok()
        .and_then(|v| v.cni_version);
    SUPPORTED_VERSIONS
        .iter()
        .find(|s| v.as_deref() == Some(**s))
        .copied()
        .unwrap_or("1.0.0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, ConfigError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn defaults() {
        let c = parse(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-cni"})).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.agent_timeout, Duration::from_secs(30));
        assert_eq!(c.kubeconfig, None);
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        assert_eq!(c.prev_result, None);
        assert!(c.pod_ips.is_empty());
        assert_eq!(c.passthrough(), json!({"cniVersion": "1.0.0"}));
    }

    #[test]
    fn plugin_keys_and_unknown_keys() {
        let c = parse(json!({
            "cniVersion": "0.4.0", "name": "k8s", "type": "mesh-cni",
            "agentSocket": "/tmp/a.sock", "agentTimeoutSeconds": 5,
            "kubeconfig": "/etc/kube.conf", "excludeNamespaces": ["a", "b"],
            "somethingElse": {"x": [1, 2]}, "capabilities": {"portMappings": true},
            "prevResult": {"cniVersion": "0.4.0", "ips": [
                {"version": "4", "address": "10.1.2.3/24", "gateway": "10.1.2.1"},
                {"address": "fd00::7/64"}
            ]}
        }))
        .unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.agent_timeout, Duration::from_secs(5));
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/kube.conf")));
        assert!(c.excluded("b") && !c.excluded("kube-system"));
        assert_eq!(
            c.pod_ips,
            [
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert!(c.allows_check());
    }

    #[test]
    fn errors_name_the_field() {
        let base = || json!({"cniVersion": "1.0.0", "name": "k8s", "type": "mesh-cni"});
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let without = |k: &str| {
            let mut b = base();
            b.as_object_mut().unwrap().remove(k);
            b
        };
        let cases: Vec<(Value, u32, &str)> = vec![
            (without("cniVersion"), 7, "cniVersion"),
            (without("name"), 7, "`name`"),
            (without("type"), 7, "`type`"),
            (with("cniVersion", json!("2.0.0")), 1, "\"2.0.0\""),
            (with("name", json!(3)), 7, "field name"),
            (with("agentSocket", json!("")), 7, "agentSocket"),
            (with("agentSocket", json!(1)), 7, "agentSocket"),
            (
                with("agentTimeoutSeconds", json!(0)),
                7,
                "agentTimeoutSeconds",
            ),
            (
                with("agentTimeoutSeconds", json!(-1)),
                7,
                "agentTimeoutSeconds",
            ),
            (
                with("agentTimeoutSeconds", json!(1.5)),
                7,
                "agentTimeoutSeconds",
            ),
            (
                with("agentTimeoutSeconds", json!(1e30)),
                7,
                "agentTimeoutSeconds",
            ),
            (
                with("excludeNamespaces", json!("kube-system")),
                7,
                "excludeNamespaces",
            ),
            (
                with("excludeNamespaces", json!([1])),
                7,
                "excludeNamespaces[0]",
            ),
            (with("kubeconfig", json!(false)), 7, "kubeconfig"),
            (with("prevResult", json!([])), 7, "prevResult"),
            (with("prevResult", json!({"ips": {}})), 7, "prevResult.ips"),
            (
                with("prevResult", json!({"ips": [{"gateway": "1.1.1.1"}]})),
                7,
                "prevResult.ips[0]",
            ),
            (
                with("prevResult", json!({"ips": [{"address": "x/24"}]})),
                7,
                "prevResult.ips[0].address",
            ),
            (json!([1, 2]), 7, "JSON object"),
            (json!("1.0.0"), 7, "JSON object"),
        ];
        for (input, code, needle) in cases {
            let e = parse(input.clone()).unwrap_err();
            assert_eq!(e.code(), code, "{input}: {e}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn syntax_errors_are_decode_errors() {
        for input in [
            &b""[..],
            b"{",
            b"{\"cniVersion\": \"1.0.0\",}",
            b"{\"cniVersion\": \"1.0.0\", \"name\": \"a\", \"type\": \"b\"} x",
            b"\xff\xfe",
            b"nul",
        ] {
            let e = NetConf::parse(input).unwrap_err();
            assert_eq!(e.code(), 6, "{:?}: {e}", input.escape_ascii().to_string());
        }
    }

    #[test]
    fn version_hints() {
        assert_eq!(version_hint(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
        assert_eq!(version_hint(br#"{"cniVersion":"9"}"#), "1.0.0");
        assert_eq!(version_hint(b"{"), "1.0.0");
        assert_eq!(version_hint(br#"{"cniVersion":7}"#), "1.0.0");
    }
}
