//! What `ambientctl zc` prints from a ztunnel's admin dump: `istioctl
//! ztunnel-config`'s tables (same column headers, same derived values:
//! ENDPOINTS as healthy/total, VIPs without their network, WAYPOINT as the
//! waypoint's service name or `None`, certificate serials in hex) aligned
//! like kubectl's, or the selected part of the dump as JSON/YAML.

use std::collections::HashMap;

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::dump::{Cert, ConfigDump, Connection, Entry, GatewayAddress, Service, Workload};

/// `-o`: istioctl calls the table `short`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[value(alias = "short")]
    Table,
    Json,
    Yaml,
}

/// Narrows what is shown. Namespace and node compare case-insensitively,
/// as istioctl's filters do.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The namespace of the workloads (services, policies, identities).
    pub namespace: Option<String>,
    /// A workload IP.
    pub address: Option<String>,
    /// The node the workloads run on.
    pub node: Option<String>,
    /// `inbound` or `outbound` (connections).
    pub direction: Option<String>,
}

fn eq(a: &str, b: &Option<String>) -> bool {
    b.as_ref().is_none_or(|b| a.eq_ignore_ascii_case(b))
}

impl Filter {
    pub fn workload(&self, w: &Workload) -> bool {
        eq(&w.namespace, &self.namespace)
            && eq(&w.node, &self.node)
            && self
                .address
                .as_ref()
                .is_none_or(|a| w.workload_ips.iter().any(|ip| ip.eq_ignore_ascii_case(a)))
    }
    pub fn namespace(&self, ns: &str) -> bool {
        eq(ns, &self.namespace)
    }
    pub fn connection(&self, c: &Connection) -> bool {
        eq(c.namespace(), &self.namespace) && eq(&c.direction, &self.direction)
    }
}

/// Aligns cells in columns separated by two spaces; the last column is not
/// padded (as Go's tabwriter, which kubectl and istioctl use).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncol = headers.len();
    let mut width = vec![0usize; ncol];
    let all = std::iter::once(headers.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned())
        .collect::<Vec<_>>();
    for row in &all {
        for (i, cell) in row.iter().enumerate().take(ncol) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(ncol) {
            line.push_str(cell);
            if i + 1 < ncol {
                let pad = width[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The name of the service a waypoint address points at; `None` without
/// one. istioctl prints `NA` when the service is unknown; the destination
/// itself says more.
fn waypoint_name(wp: &Option<GatewayAddress>, services: &[Entry<Service>]) -> String {
    let Some(wp) = wp else {
        return "None".into();
    };
    services
        .iter()
        .map(|s| &s.item)
        .find(|s| {
            format!("{}/{}", s.namespace, s.hostname) == wp.destination
                || s.vips.contains(&wp.destination)
        })
        .map(|s| s.name.clone())
        .unwrap_or_else(|| wp.destination.clone())
}

pub const WORKLOAD_HEADERS: &[&str] = &[
    "NAMESPACE",
    "POD NAME",
    "ADDRESS",
    "NODE",
    "WAYPOINT",
    "PROTOCOL",
];
pub const SERVICE_HEADERS: &[&str] = &[
    "NAMESPACE",
    "SERVICE NAME",
    "SERVICE VIP",
    "WAYPOINT",
    "ENDPOINTS",
];
pub const POLICY_HEADERS: &[&str] = &["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"];
pub const CERTIFICATE_HEADERS: &[&str] = &[
    "CERTIFICATE NAME",
    "TYPE",
    "STATUS",
    "VALID CERT",
    "SERIAL NUMBER",
    "NOT AFTER",
    "NOT BEFORE",
];
pub const CONNECTION_HEADERS: &[&str] = &[
    "WORKLOAD",
    "DIRECTION",
    "LOCAL",
    "REMOTE",
    "REMOTE TARGET",
    "PROTOCOL",
];

pub fn workload_table(d: &ConfigDump, f: &Filter) -> String {
    let mut ws: Vec<&Workload> = d
        .workloads
        .iter()
        .map(|e| &e.item)
        .filter(|w| f.workload(w))
        .collect();
    ws.sort_by(|a, b| (&a.namespace, &a.name, &a.node).cmp(&(&b.namespace, &b.name, &b.node)));
    let rows: Vec<Vec<String>> = ws
        .iter()
        .map(|w| {
            let address = if w.workload_ips.is_empty() {
                w.hostname.clone()
            } else {
                w.workload_ips.join(",")
            };
            vec![
                w.namespace.clone(),
                w.name.clone(),
                address,
                w.node.clone(),
                waypoint_name(&w.waypoint, &d.services),
                w.protocol.clone(),
            ]
        })
        .collect();
    table(WORKLOAD_HEADERS, &rows)
}

pub fn service_table(d: &ConfigDump, f: &Filter) -> String {
    let status: HashMap<&str, &str> = d
        .workloads
        .iter()
        .map(|w| (w.item.uid.as_str(), w.item.status.as_str()))
        .collect();
    let mut ss: Vec<&Service> = d
        .services
        .iter()
        .map(|e| &e.item)
        .filter(|s| f.namespace(&s.namespace))
        .collect();
    ss.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.hostname).cmp(&(&b.namespace, &b.name, &b.hostname))
    });
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            let total = s.endpoints.len();
            // The workload's own status is authoritative; the endpoint's
            // copy covers a workload missing from the dump.
            let healthy = s
                .endpoints
                .values()
                .filter(|ep| {
                    status
                        .get(ep.workload_uid.as_str())
                        .copied()
                        .unwrap_or(ep.status.as_str())
                        == "Healthy"
                })
                .count();
            vec![
                s.namespace.clone(),
                s.name.clone(),
                s.ips().join(","),
                waypoint_name(&s.waypoint, &d.services),
                format!("{healthy}/{total}"),
            ]
        })
        .collect();
    table(SERVICE_HEADERS, &rows)
}

pub fn policy_table(d: &ConfigDump, f: &Filter) -> String {
    let mut ps: Vec<_> = d
        .policies
        .iter()
        .map(|e| &e.item)
        .filter(|p| f.namespace(&p.namespace))
        .collect();
    ps.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let rows: Vec<Vec<String>> = ps
        .iter()
        .map(|p| {
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.action.clone(),
                p.scope.clone(),
            ]
        })
        .collect();
    table(POLICY_HEADERS, &rows)
}

/// A decimal serial number in lowercase hex without leading zeros (what
/// istioctl prints); the input unchanged if it is not decimal.
pub fn serial_hex(decimal: &str) -> String {
    if decimal.is_empty() || !decimal.bytes().all(|b| b.is_ascii_digit()) {
        return decimal.to_string();
    }
    // Long division of the decimal digits by 16, collecting remainders.
    let mut digits: Vec<u8> = decimal.bytes().map(|b| b - b'0').collect();
    let mut hex = Vec::new();
    while digits.iter().any(|&d| d != 0) {
        let mut rem = 0u32;
        let mut next = Vec::with_capacity(digits.len());
        for &d in &digits {
            let cur = rem * 10 + d as u32;
            let q = cur / 16;
            rem = cur % 16;
            if !(next.is_empty() && q == 0) {
                next.push(q as u8);
            }
        }
        hex.push(char::from_digit(rem, 16).unwrap_or('0'));
        digits = next;
    }
    if hex.is_empty() {
        return "0".into();
    }
    hex.iter().rev().collect()
}

/// Whether `now` is inside the certificate's validity.
pub fn cert_valid(c: &Cert, now: OffsetDateTime) -> bool {
    let (Ok(from), Ok(to)) = (
        OffsetDateTime::parse(&c.valid_from, &Rfc3339),
        OffsetDateTime::parse(&c.expiration_time, &Rfc3339),
    ) else {
        return false;
    };
    from <= now && now < to
}

fn or_na(s: &str) -> String {
    if s.is_empty() {
        "NA".into()
    } else {
        s.to_string()
    }
}

pub fn certificate_table(d: &ConfigDump, f: &Filter, now: OffsetDateTime) -> String {
    let mut rows = Vec::new();
    for c in d.certificates.iter().map(|e| &e.item) {
        if f.namespace.is_some() && !f.namespace(c.namespace().unwrap_or_default()) {
            continue;
        }
        // `Unavailable: <why>` is shortened as istioctl does; the reason
        // is in `-o json`.
        let state = if c.state.starts_with("Unavailable") {
            "Unavailable".to_string()
        } else {
            c.state.clone()
        };
        if c.cert_chain.is_empty() {
            rows.push(vec![
                c.identity.clone(),
                "NA".into(),
                state,
                "false".into(),
                "NA".into(),
                "NA".into(),
                "NA".into(),
            ]);
            continue;
        }
        let chain = c
            .cert_chain
            .iter()
            .enumerate()
            .map(|(i, cert)| (if i == 0 { "Leaf" } else { "Intermediate" }, cert));
        let roots = c.root_certs.iter().map(|cert| ("Root", cert));
        for (kind, cert) in chain.chain(roots) {
            rows.push(vec![
                c.identity.clone(),
                kind.into(),
                state.clone(),
                cert_valid(cert, now).to_string(),
                or_na(&serial_hex(&cert.serial_number)),
                or_na(&cert.expiration_time),
                or_na(&cert.valid_from),
            ]);
        }
    }
    table(CERTIFICATE_HEADERS, &rows)
}

/// Names for addresses: a service VIP becomes its hostname, a workload IP
/// `<name>.<namespace>`, as istioctl shows them unless `--raw`.
struct Names(HashMap<String, String>);

impl Names {
    fn new(d: Option<&ConfigDump>) -> Names {
        let mut m = HashMap::new();
        if let Some(d) = d {
            for w in d.workloads.iter().map(|e| &e.item) {
                for ip in &w.workload_ips {
                    m.insert(ip.clone(), format!("{}.{}", w.name, w.namespace));
                }
            }
            // Services second: a VIP names the service even if a workload
            // somewhere shares the address.
            for s in d.services.iter().map(|e| &e.item) {
                for ip in s.ips() {
                    m.insert(ip.to_string(), s.hostname.clone());
                }
            }
        }
        Names(m)
    }

    fn name(&self, addr: &str) -> String {
        let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
            return addr.to_string();
        };
        match self.0.get(&sa.ip().to_string()) {
            Some(n) => format!("{n}:{}", sa.port()),
            None => addr.to_string(),
        }
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `dump` (when it could be read) turns addresses into names.
pub fn connection_table(
    conns: &[Entry<Connection>],
    dump: Option<&ConfigDump>,
    f: &Filter,
) -> String {
    let names = Names::new(dump);
    let mut cs: Vec<&Connection> = conns
        .iter()
        .map(|e| &e.item)
        .filter(|c| f.connection(c))
        .collect();
    cs.sort_by(|a, b| {
        (a.namespace(), a.name(), &a.direction).cmp(&(b.namespace(), b.name(), &b.direction))
    });
    let rows: Vec<Vec<String>> = cs
        .iter()
        .map(|c| {
            let workload = if c.pod.contains('/') {
                format!("{}.{}", c.name(), c.namespace())
            } else {
                c.pod.clone()
            };
            // Inbound, the target is what the peer asked for: shown as is.
            let target = if c.direction.eq_ignore_ascii_case("inbound") {
                c.remote_target.clone()
            } else {
                names.name(&c.remote_target)
            };
            vec![
                workload,
                capitalized(&c.direction),
                names.name(&c.local),
                names.name(&c.remote),
                target,
                c.protocol.clone(),
            ]
        })
        .collect();
    table(CONNECTION_HEADERS, &rows)
}

/// `zc all`: services, workloads, policies, certificates, in istioctl's
/// order, separated by blank lines.
pub fn all_tables(d: &ConfigDump, f: &Filter, now: OffsetDateTime) -> String {
    [
        service_table(d, f),
        workload_table(d, f),
        policy_table(d, f),
        certificate_table(d, f, now),
    ]
    .join("\n")
}

fn raws<T>(list: &[Entry<T>], keep: impl Fn(&T) -> bool) -> Value {
    Value::Array(
        list.iter()
            .filter(|e| keep(&e.item))
            .map(|e| e.raw.clone())
            .collect(),
    )
}

/// Which part of the dump `-o json|yaml` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Workloads,
    Services,
    Policies,
    Certificates,
    All,
}

pub fn select(d: &ConfigDump, part: Part, f: &Filter) -> Value {
    let workloads = || raws(&d.workloads, |w| f.workload(w));
    let services = || raws(&d.services, |s| f.namespace(&s.namespace));
    let policies = || raws(&d.policies, |p| f.namespace(&p.namespace));
    let certificates = || {
        raws(&d.certificates, |c| {
            f.namespace.is_none() || f.namespace(c.namespace().unwrap_or_default())
        })
    };
    match part {
        Part::Workloads => workloads(),
        Part::Services => services(),
        Part::Policies => policies(),
        Part::Certificates => certificates(),
        Part::All => {
            let mut all = d.raw.clone();
            if let Some(obj) = all.as_object_mut() {
                obj.insert("workloads".into(), workloads());
                obj.insert("services".into(), services());
                obj.insert("policies".into(), policies());
                obj.insert("certificates".into(), certificates());
            }
            all
        }
    }
}

pub fn select_connections(conns: &[Entry<Connection>], f: &Filter) -> Value {
    serde_json::json!({ "connections": raws(conns, |c| f.connection(c)) })
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// JSON (pretty, with a final newline) or YAML of a selected value.
pub fn encode(v: &Value, format: Format) -> Result<String, RenderError> {
    Ok(match format {
        Format::Yaml => serde_yaml::to_string(v)?,
        Format::Json | Format::Table => {
            let mut s = serde_json::to_string_pretty(v)?;
            s.push('\n');
            s
        }
    })
}
