//! Static address book: the local state file ztunnel can run from instead of
//! (or before) a control plane.
//!
//! It sits where xDS would: the file yields the same [`workload::Address`] and
//! [`security::Authorization`] messages the delta xDS stream delivers, so the
//! rest of ztunnel cannot tell the two sources apart.
//!
//! Format (YAML, or JSON which is read as such):
//!
//! ```yaml
//! addresses:
//! - workload: {uid: "c1//v1/Pod/default/b-1", addresses: ["10.244.2.2"], ...}
//! - service: {hostname: b.default.svc.cluster.local, ...}
//! authorizations: []
//! ```
//!
//! Items follow the proto3 JSON mapping (camelCase names, snake_case names
//! accepted too, enums by name, 64-bit integers as strings or numbers). The one
//! convenience on top: `bytes` fields that carry IP addresses take a plain
//! `10.0.0.1` / `fd00::1` string as well as base64, because nobody writes
//! base64 IPs by hand.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::{security, workload};

const ADDRESSES: &str = "addresses";
const AUTHORIZATIONS: &str = "authorizations";

/// Contents of a local state file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalConfig {
    pub addresses: Vec<workload::Address>,
    pub authorizations: Vec<security::Authorization>,
}

/// Why a local state file was rejected. Every variant names the file (or
/// `<input>` when parsing a string) so an operator can find the mistake.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("reading local config {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", origin(.path))]
    Json {
        path: Option<PathBuf>,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: not valid YAML: {source}", origin(.path))]
    Yaml {
        path: Option<PathBuf>,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: {location}: {message}", origin(.path))]
    Shape {
        path: Option<PathBuf>,
        /// Where in the document, e.g. `addresses` or `addresses[2]`.
        location: String,
        message: String,
    },
    #[error("{}: {item}{}: {source}", origin(.path), at_field(.field))]
    Item {
        path: Option<PathBuf>,
        /// The list entry, e.g. `addresses[3]`.
        item: String,
        /// Path inside the entry, e.g. `workload.services.<key>.ports[0].servicePort`;
        /// empty when the entry itself has the wrong type.
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding local config: {source}")]
    Encode {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "<input>".to_string(),
    }
}

fn at_field(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(" field `{field}`")
    }
}

impl LocalConfigError {
    fn with_path(mut self, file: &Path) -> Self {
        match &mut self {
            Self::Json { path, .. }
            | Self::Yaml { path, .. }
            | Self::Shape { path, .. }
            | Self::Item { path, .. } => *path = Some(file.to_path_buf()),
            Self::Read { .. } | Self::Encode { .. } => {}
        }
        self
    }
}

/// Reads and parses a local state file.
pub fn load_local_config(path: &Path) -> Result<LocalConfig, LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_local_config(&text).map_err(|e| e.with_path(path))
}

/// Parses the text of a local state file (YAML or JSON).
pub fn parse_local_config(text: &str) -> Result<LocalConfig, LocalConfigError> {
    let doc = parse_document(text)?;
    let mut top = match doc {
        // An empty file is an empty address book, not a mistake.
        Value::Null => return Ok(LocalConfig::default()),
        Value::Object(map) => map,
        other => {
            return Err(shape(
                "top level",
                format!(
                    "expected a mapping with `{ADDRESSES}` and `{AUTHORIZATIONS}`, found {}",
                    kind(&other)
                ),
            ))
        }
    };
    if let Some(unknown) = top
        .keys()
        .find(|k| k.as_str() != ADDRESSES && k.as_str() != AUTHORIZATIONS)
    {
        return Err(shape(
            "top level",
            format!("unknown key `{unknown}`; expected `{ADDRESSES}` or `{AUTHORIZATIONS}`"),
        ));
    }

    let mut config = LocalConfig::default();
    for (index, mut item) in take_list(&mut top, ADDRESSES)?.into_iter().enumerate() {
        let name = format!("{ADDRESSES}[{index}]");
        if let Value::Object(obj) = &mut item {
            ips_in_address(obj);
        }
        let address: workload::Address = decode_item(&name, &item)?;
        if address.r#type.is_none() {
            return Err(shape(name, "needs a `workload` or a `service`".to_string()));
        }
        config.addresses.push(address);
    }
    for (index, mut item) in take_list(&mut top, AUTHORIZATIONS)?.into_iter().enumerate() {
        let name = format!("{AUTHORIZATIONS}[{index}]");
        if let Value::Object(obj) = &mut item {
            ips_in_authorization(obj);
        }
        config.authorizations.push(decode_item(&name, &item)?);
    }
    Ok(config)
}

/// Writes a config back in the file format. IPs come out base64-encoded, as
/// the proto3 JSON mapping has them; [`parse_local_config`] reads them back.
pub fn to_yaml(config: &LocalConfig) -> Result<String, LocalConfigError> {
    let encode = |e: serde_json::Error| LocalConfigError::Encode {
        source: Box::new(e),
    };
    // Serialization fails only for enum numbers this build does not know
    // (possible after a binary decode), hence a Result rather than a panic.
    let addresses = config
        .addresses
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode)?;
    let authorizations = config
        .authorizations
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode)?;
    let mut top = Map::new();
    top.insert(ADDRESSES.to_string(), Value::Array(addresses));
    top.insert(AUTHORIZATIONS.to_string(), Value::Array(authorizations));
    serde_yaml::to_string(&Value::Object(top)).map_err(|e| LocalConfigError::Encode {
        source: Box::new(e),
    })
}

fn parse_document(text: &str) -> Result<Value, LocalConfigError> {
    // JSON first when it looks like JSON: its errors point at the right spot,
    // and a few JSON spellings (tabs as indentation) are not valid YAML.
    if text.trim_start().starts_with(['{', '[']) {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => return Ok(v),
            // `{addresses: []}` is YAML flow style, not JSON; give YAML a try
            // and report the JSON error only if that fails too.
            Err(json_err) => {
                return serde_yaml::from_str::<Value>(text).map_err(|_| LocalConfigError::Json {
                    path: None,
                    source: json_err,
                })
            }
        }
    }
    serde_yaml::from_str::<Value>(text)
        .map_err(|source| LocalConfigError::Yaml { path: None, source })
}

fn take_list(top: &mut Map<String, Value>, key: &str) -> Result<Vec<Value>, LocalConfigError> {
    match top.remove(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(shape(
            key,
            format!("expected a list, found {}", kind(&other)),
        )),
    }
}

fn decode_item<T>(name: &str, value: &Value) -> Result<T, LocalConfigError>
where
    T: serde::de::DeserializeOwned,
{
    serde_path_to_error::deserialize(value).map_err(|e| {
        // serde_path_to_error renders the root as ".".
        let field = match e.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        LocalConfigError::Item {
            path: None,
            item: name.to_string(),
            field,
            source: e.into_inner(),
        }
    })
}

fn shape(location: impl Into<String>, message: String) -> LocalConfigError {
    LocalConfigError::Shape {
        path: None,
        location: location.into(),
        message,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

// --- IP strings in bytes fields ---
//
// The rewrite follows the message schema by field name (both JSON spellings)
// and touches only string values that parse as an IP. Base64 never contains
// `.` or `:`, so a valid IP string can never be a valid base64 value as well.
// Anything of the wrong shape is left alone for the strict decoder to report
// with its field path.

fn ip_to_base64(v: &mut Value) {
    if let Value::String(s) = v {
        let octets = match s.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip.octets().to_vec(),
            Ok(IpAddr::V6(ip)) => ip.octets().to_vec(),
            Err(_) => return,
        };
        *s = base64::engine::general_purpose::STANDARD.encode(octets);
    }
}

/// Mutable references to the values of `obj` under any of `names`.
fn fields<'a>(
    obj: &'a mut Map<String, Value>,
    names: &'a [&'a str],
) -> impl Iterator<Item = &'a mut Value> + 'a {
    obj.iter_mut()
        .filter(move |(k, _)| names.contains(&k.as_str()))
        .map(|(_, v)| v)
}

/// Elements of every list found under `names`.
fn list_items<'a>(
    obj: &'a mut Map<String, Value>,
    names: &'a [&'a str],
) -> impl Iterator<Item = &'a mut Value> + 'a {
    fields(obj, names).flat_map(|v| match v {
        Value::Array(items) => items.iter_mut(),
        _ => [].iter_mut(),
    })
}

fn as_object(v: &mut Value) -> Option<&mut Map<String, Value>> {
    match v {
        Value::Object(obj) => Some(obj),
        _ => None,
    }
}

fn ips_in_network_address(obj: &mut Map<String, Value>) {
    fields(obj, &["address"]).for_each(ip_to_base64);
}

fn ips_in_gateway(obj: &mut Map<String, Value>) {
    fields(obj, &["address"])
        .filter_map(as_object)
        .for_each(ips_in_network_address);
}

fn ips_in_address(obj: &mut Map<String, Value>) {
    for w in fields(obj, &["workload"]).filter_map(as_object) {
        list_items(w, &["addresses"]).for_each(ip_to_base64);
        fields(w, &["waypoint", "networkGateway", "network_gateway"])
            .filter_map(as_object)
            .for_each(ips_in_gateway);
    }
    for s in fields(obj, &["service"]).filter_map(as_object) {
        list_items(s, &["addresses"])
            .filter_map(as_object)
            .for_each(ips_in_network_address);
        fields(s, &["waypoint"])
            .filter_map(as_object)
            .for_each(ips_in_gateway);
        for ww in list_items(s, &["weightedWaypoints", "weighted_waypoints"]).filter_map(as_object)
        {
            fields(ww, &["destination"])
                .filter_map(as_object)
                .for_each(ips_in_gateway);
        }
    }
}

const MATCH_IP_FIELDS: &[&str] = &[
    "sourceIps",
    "source_ips",
    "notSourceIps",
    "not_source_ips",
    "destinationIps",
    "destination_ips",
    "notDestinationIps",
    "not_destination_ips",
];

fn ips_in_authorization(obj: &mut Map<String, Value>) {
    for rule in list_items(obj, &["rules"]).filter_map(as_object) {
        for clause in list_items(rule, &["clauses"]).filter_map(as_object) {
            for m in list_items(clause, &["matches"]).filter_map(as_object) {
                list_items(m, MATCH_IP_FIELDS)
                    .filter_map(as_object)
                    .for_each(|a| fields(a, &["address"]).for_each(ip_to_base64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const EXAMPLE: &str = r#"
addresses:
- workload: {uid: "cluster1//v1/Pod/default/b-1", name: b-1, namespace: default, addresses: ["10.244.2.2"], node: node2, serviceAccount: b, trustDomain: cluster.local, tunnelProtocol: HBONE, services: {"default/b.default.svc.cluster.local": {ports: [{servicePort: 80, targetPort: 8080}]}}}
- service: {name: b, namespace: default, hostname: b.default.svc.cluster.local, addresses: [{network: "", address: "10.96.0.10"}], ports: [{servicePort: 80, targetPort: 8080}]}
authorizations: []
"#;

    fn workload_of(a: &workload::Address) -> &workload::Workload {
        match &a.r#type {
            Some(workload::address::Type::Workload(w)) => w,
            other => panic!("expected a workload, got {other:?}"),
        }
    }

    fn service_of(a: &workload::Address) -> &workload::Service {
        match &a.r#type {
            Some(workload::address::Type::Service(s)) => s,
            other => panic!("expected a service, got {other:?}"),
        }
    }

    #[test]
    fn example_parses() {
        let cfg = parse_local_config(EXAMPLE).unwrap();
        assert_eq!(cfg.addresses.len(), 2);
        assert!(cfg.authorizations.is_empty());
        let w = workload_of(&cfg.addresses[0]);
        assert_eq!(w.uid, "cluster1//v1/Pod/default/b-1");
        assert_eq!(w.addresses, vec![vec![10u8, 244, 2, 2]]);
        assert_eq!(w.service_account, "b");
        assert_eq!(w.trust_domain, "cluster.local");
        assert_eq!(w.tunnel_protocol(), workload::TunnelProtocol::Hbone);
        let ports = &w.services["default/b.default.svc.cluster.local"].ports;
        assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
        let s = service_of(&cfg.addresses[1]);
        assert_eq!(s.hostname, "b.default.svc.cluster.local");
        assert_eq!(s.addresses[0].address, vec![10u8, 96, 0, 10]);
        assert_eq!(s.addresses[0].length, None);
    }

    #[test]
    fn snake_case_names_are_accepted() {
        let text = r#"
addresses:
- workload:
    uid: u1
    addresses: ["fd00::1"]
    service_account: sa
    trust_domain: td
    tunnel_protocol: HBONE
    network_gateway: {address: {network: n2, address: "192.0.2.1"}, hbone_mtls_port: 15008}
    services: {"ns/h": {ports: [{service_port: 80, target_port: 9080, app_protocol: HTTP2}]}}
"#;
        let cfg = parse_local_config(text).unwrap();
        let w = workload_of(&cfg.addresses[0]);
        assert_eq!(w.addresses[0].len(), 16);
        assert_eq!(w.addresses[0][0], 0xfd);
        assert_eq!(w.addresses[0][15], 1);
        assert_eq!(w.service_account, "sa");
        assert_eq!(w.trust_domain, "td");
        let gw = w.network_gateway.as_ref().unwrap();
        assert_eq!(gw.hbone_mtls_port, 15008);
        match &gw.destination {
            Some(workload::gateway_address::Destination::Address(a)) => {
                assert_eq!(a.address, vec![192u8, 0, 2, 1]);
                assert_eq!(a.network, "n2");
            }
            other => panic!("unexpected gateway destination {other:?}"),
        }
        let p = &w.services["ns/h"].ports[0];
        assert_eq!(p.target_port, 9080);
        assert_eq!(p.app_protocol(), workload::AppProtocol::Http2);
    }

    #[test]
    fn base64_addresses_still_work() {
        let text = r#"{"addresses": [{"workload": {"uid": "u", "addresses": ["CvQCAg=="]}}]}"#;
        let cfg = parse_local_config(text).unwrap();
        assert_eq!(workload_of(&cfg.addresses[0]).addresses[0], [10, 244, 2, 2]);
    }

    #[test]
    fn bad_port_names_item_and_field() {
        let text = r#"
addresses:
- service: {name: ok, hostname: ok.default.svc.cluster.local}
- workload: {uid: u, services: {"ns/h": {ports: [{servicePort: "abc"}]}}}
"#;
        let err = parse_local_config(text).unwrap_err();
        match &err {
            LocalConfigError::Item { item, field, .. } => {
                assert_eq!(item, "addresses[1]");
                assert!(field.contains("servicePort"), "field was {field}");
                assert!(field.contains("ports[0]"), "field was {field}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with("<input>: addresses[1]"), "{msg}");
    }

    #[test]
    fn unknown_enum_names_item_and_field() {
        let text = "addresses:\n- workload: {uid: u, tunnelProtocol: QUIC}\n";
        match parse_local_config(text).unwrap_err() {
            LocalConfigError::Item { item, field, .. } => {
                assert_eq!(item, "addresses[0]");
                assert_eq!(field, "workload.tunnelProtocol");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn wrong_item_type_names_only_the_item() {
        let err = parse_local_config("addresses: [1]").unwrap_err();
        match &err {
            LocalConfigError::Item { item, field, .. } => {
                assert_eq!(item, "addresses[0]");
                assert_eq!(field, "");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("<input>: addresses[0]: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_rejected() {
        let text = "addresses:\n- workload: {uid: u, serviceAcount: typo}\n";
        match parse_local_config(text).unwrap_err() {
            LocalConfigError::Item { item, source, .. } => {
                assert_eq!(item, "addresses[0]");
                assert!(source.to_string().contains("serviceAcount"), "{source}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn shape_errors() {
        let cases = [
            ("- a\n- b\n", "top level"),
            ("workloads: []\n", "top level"),
            ("addresses: {}\n", "addresses"),
            ("addresses:\n- {}\n", "addresses[0]"),
        ];
        for (text, want) in cases {
            match parse_local_config(text) {
                Err(LocalConfigError::Shape { location, .. }) => {
                    assert_eq!(location, want, "input {text:?}")
                }
                other => panic!("input {text:?}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn empty_document_is_empty_config() {
        assert_eq!(parse_local_config("").unwrap(), LocalConfig::default());
        assert_eq!(
            parse_local_config("addresses:\nauthorizations:\n").unwrap(),
            LocalConfig::default()
        );
    }

    #[test]
    fn syntax_errors_are_typed() {
        assert!(matches!(
            parse_local_config("{\"addresses\": [}"),
            Err(LocalConfigError::Json { .. })
        ));
        assert!(matches!(
            parse_local_config("addresses: [\n  - : :"),
            Err(LocalConfigError::Yaml { .. })
        ));
        // YAML flow mapping that is not JSON.
        assert!(parse_local_config("{addresses: []}").is_ok());
    }

    #[test]
    fn authorization_ips_and_presence() {
        let text = r#"
authorizations:
- name: deny-probe
  namespace: default
  scope: WORKLOAD_SELECTOR
  action: DENY
  rules:
  - clauses:
    - matches:
      - sourceIps: [{address: "10.0.0.0", length: 8}]
        not_destination_ips: [{address: "2001:db8::", length: 32}]
        principals: [{presence: {}}, {prefix: "cluster.local/ns/a/"}]
        serviceAccounts: [{namespace: a, serviceAccount: sa}]
        destinationPorts: [8080]
"#;
        let cfg = parse_local_config(text).unwrap();
        let a = &cfg.authorizations[0];
        assert_eq!(a.action(), security::Action::Deny);
        assert_eq!(a.scope(), security::Scope::WorkloadSelector);
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(m.source_ips[0].address, vec![10u8, 0, 0, 0]);
        assert_eq!(m.source_ips[0].length, 8);
        assert_eq!(m.not_destination_ips[0].address.len(), 16);
        assert_eq!(
            m.principals[0].match_type,
            Some(security::string_match::MatchType::Presence(
                pbjson_types::Empty {}
            ))
        );
        assert_eq!(m.service_accounts[0].service_account, "sa");
        assert_eq!(m.destination_ports, vec![8080]);
    }

    #[test]
    fn yaml_round_trip() {
        let cfg = parse_local_config(EXAMPLE).unwrap();
        let yaml = to_yaml(&cfg).unwrap();
        assert!(yaml.contains("servicePort: 80"), "{yaml}");
        assert_eq!(parse_local_config(&yaml).unwrap(), cfg);
    }

    #[test]
    fn to_yaml_reports_unknown_enum_numbers() {
        let cfg = LocalConfig {
            addresses: vec![workload::Address {
                r#type: Some(workload::address::Type::Workload(workload::Workload {
                    tunnel_protocol: 99,
                    ..Default::default()
                })),
            }],
            authorizations: Vec::new(),
        };
        assert!(matches!(
            to_yaml(&cfg),
            Err(LocalConfigError::Encode { .. })
        ));
    }

    #[test]
    fn load_names_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"addresses:\n- workload: {uid: u, status: SICK}\n")
            .unwrap();
        let err = load_local_config(f.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&f.path().display().to_string()), "{msg}");
        assert!(msg.contains("addresses[0]"), "{msg}");
        assert!(msg.contains("workload.status"), "{msg}");

        let missing = f.path().with_extension("missing");
        assert!(matches!(
            load_local_config(&missing),
            Err(LocalConfigError::Read { .. })
        ));

        let mut good = tempfile::NamedTempFile::new().unwrap();
        good.write_all(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(load_local_config(good.path()).unwrap().addresses.len(), 2);
    }

    #[test]
    fn odd_inputs_return_errors_not_panics() {
        let inputs = [
            "addresses: [1, true, null, \"x\", []]",
            "addresses:\n- workload: {addresses: [12, {a: 1}, \"1.2.3.4.5\", \"::g\"]}",
            "addresses:\n- service: {addresses: [\"10.0.0.1\"], waypoint: [1]}",
            "addresses:\n- workload: {waypoint: {address: \"10.0.0.1\"}}",
            "authorizations: [{rules: [{clauses: {}}]}]",
            "authorizations: [{rules: [{clauses: [{matches: [{sourceIps: [\"1.2.3.4\"]}]}]}]}]",
            "addresses:\n- workload: {uid: u, capacity: -1}",
            "addresses:\n- workload: {uid: u, capacity: 4294967296}",
            "addresses:\n- service: {ports: [{servicePort: 1e400}]}",
            "addresses:\n- workload: {services: {\"a\": null}}",
            "? [a]\n: b",
            "a: &x [*x]",
            "!!binary aGVsbG8=",
            "{\"addresses\": [{\"workload\": {\"uid\": \"\\ud800\"}}]}",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ];
        for text in inputs {
            assert!(parse_local_config(text).is_err(), "accepted {text:?}");
        }
    }
}
