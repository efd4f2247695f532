//! The JSON ztunnel serves on its admin port (`/config_dump`, and
//! `/debug/connections`), as `ambientctl zc` reads it. Each entry is kept
//! twice: the raw JSON (what `-o json|yaml` prints, unchanged, so that
//! fields this CLI does not know survive) and a typed view of the few fields
//! the tables show. Missing fields default to empty so that a ztunnel that
//! omits one still gets a table rather than an error.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("the response is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the response is not a JSON object")]
    NotObject,
    #[error("`{key}` is not a list")]
    NotList { key: &'static str },
    #[error("`{key}[{index}]`: {source}")]
    Entry {
        key: &'static str,
        index: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Where a waypoint or network gateway is reached: `<ns>/<hostname>` or
/// `<network>/<ip>`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayAddress {
    pub destination: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_ips: Vec<String>,
    pub hostname: String,
    pub protocol: String,
    pub node: String,
    pub status: String,
    pub waypoint: Option<GatewayAddress>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Endpoint {
    pub workload_uid: String,
    pub status: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `<network>/<ip>`.
    pub vips: Vec<String>,
    pub endpoints: BTreeMap<String, Endpoint>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The VIPs without their network prefix.
    pub fn ips(&self) -> Vec<&str> {
        self.vips
            .iter()
            .map(|v| v.split_once('/').map_or(v.as_str(), |(_, ip)| ip))
            .collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: String,
    pub action: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Cert {
    pub pem: String,
    /// Decimal, as ztunnel writes it.
    pub serial_number: String,
    /// RFC 3339.
    pub valid_from: String,
    /// RFC 3339.
    pub expiration_time: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Certificate {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub identity: String,
    /// `Initializing`, `Available` or `Unavailable: <why>`.
    pub state: String,
    pub cert_chain: Vec<Cert>,
    pub root_certs: Vec<Cert>,
}

impl Certificate {
    /// The namespace of the identity, if it is a SPIFFE workload identity.
    pub fn namespace(&self) -> Option<&str> {
        let rest = self.identity.split("/ns/").nth(1)?;
        Some(rest.split('/').next().unwrap_or(rest))
    }
}

/// One proxied connection (`/debug/connections`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Connection {
    /// `<ns>/<name>` of the pod on this node.
    pub pod: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// `HBONE` or `TCP`.
    pub protocol: String,
    pub local: String,
    pub remote: String,
    pub remote_target: String,
    pub src_identity: String,
    pub dst_identity: String,
}

impl Connection {
    pub fn namespace(&self) -> &str {
        self.pod.split_once('/').map_or("", |(ns, _)| ns)
    }
    pub fn name(&self) -> &str {
        self.pod
            .split_once('/')
            .map_or(self.pod.as_str(), |(_, n)| n)
    }
}

/// A typed view and the JSON it came from.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub item: T,
    pub raw: Value,
}

/// A parsed `/config_dump`.
#[derive(Debug, Clone)]
pub struct ConfigDump {
    pub raw: Value,
    pub workloads: Vec<Entry<Workload>>,
    pub services: Vec<Entry<Service>>,
    pub policies: Vec<Entry<Policy>>,
    pub certificates: Vec<Entry<Certificate>>,
}

fn entries<T: DeserializeOwned>(
    obj: &serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<Vec<Entry<T>>, DumpError> {
    let Some(v) = obj.get(key) else {
        return Ok(Vec::new());
    };
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) => list,
        _ => return Err(DumpError::NotList { key }),
    };
    list.iter()
        .enumerate()
        .map(|(index, raw)| {
            serde_json::from_value(raw.clone())
                .map(|item| Entry {
                    item,
                    raw: raw.clone(),
                })
                .map_err(|source| DumpError::Entry { key, index, source })
        })
        .collect()
}

impl ConfigDump {
    pub fn parse(bytes: &[u8]) -> Result<ConfigDump, DumpError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(DumpError::NotJson)?;
        let obj = raw.as_object().ok_or(DumpError::NotObject)?;
        Ok(ConfigDump {
            workloads: entries(obj, "workloads")?,
            services: entries(obj, "services")?,
            policies: entries(obj, "policies")?,
            certificates: entries(obj, "certificates")?,
            raw,
        })
    }
}

/// A parsed `/debug/connections`.
#[derive(Debug, Clone)]
pub struct Connections {
    pub connections: Vec<Entry<Connection>>,
}

impl Connections {
    pub fn parse(bytes: &[u8]) -> Result<Connections, DumpError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(DumpError::NotJson)?;
        let obj = raw.as_object().ok_or(DumpError::NotObject)?;
        Ok(Connections {
            connections: entries(obj, "connections")?,
        })
    }
}
