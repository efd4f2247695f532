//! Waypoint L7 configuration: `VirtualService` and `DestinationRule` in,
//! one `ambient.waypoint.v1.ServiceRoutes` per service behind a waypoint out.
//!
//! Part of the translator, upstream of the delta xDS push: the waypoint a
//! service's traffic crosses routes HTTP requests by what this file emits.
//! A service gets a resource only while its Workload API entry names a
//! waypoint (`istio.io/use-waypoint` on the service or its namespace); one
//! without a VirtualService still gets its hostname and ports, the default
//! route. Objects are validated here (both sources hand over the raw
//! `spec`), so an invalid one is reported with its field path and treated
//! as absent, and fields this slice does not carry are named in a warning
//! instead of being silently dropped. `tcp` routes are converted in
//! `tcp.rs`; Gateway API HTTPRoutes (`httproute.rs`) attached to a service
//! replace its VirtualService here.
//!
//! DestinationRule subsets select pods by label, which the waypoint cannot
//! see (the Workload API carries none), so each subset goes out with the
//! uids of the service's pods it selects; a pod appearing, going or being
//! relabelled republishes the ServiceRoutes whose subsets it can change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use mesh_core::proto::waypoint::{
    self as pb, consistent_hash::HashKey, header_match, http_route, load_balancer,
    query_param_match, string_match,
};
use mesh_core::proto::workload::AppProtocol;
use serde::Deserialize;
use serde_json::Value;

use super::pod::PodInfo;
use super::service::SvcInfo;
use super::{Key, Labels, MeshConfig, PolicyObject, Translator};

/// Why a VirtualService or DestinationRule is refused.
#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    /// A field has the wrong shape (type, unknown enum value, ...).
    #[error("{kind} {object}: {field}: {reason}")]
    Field {
        /// `VirtualService` or `DestinationRule`.
        kind: &'static str,
        /// `<namespace>/<name>`.
        object: String,
        /// Path of the offending field, e.g. `spec.http[0].timeout`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A VirtualService as the translator keeps it: the services it routes and
/// its routes, with destination hosts already resolved in its namespace.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct VsInfo {
    /// Services named by `hosts` (namespace, name).
    pub hosts: BTreeSet<Key>,
    pub routes: Vec<pb::HttpRoute>,
    /// `tcp` routes (`tcp.rs`).
    pub tcp_routes: Vec<pb::TcpRoute>,
    pub created: Option<String>,
    /// Fields ignored because they are not supported yet.
    pub unsupported: Vec<String>,
}

/// A DestinationRule as the translator keeps it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DrInfo {
    /// The service it applies to, when `host` names one.
    pub host: Option<Key>,
    pub traffic_policy: Option<pb::TrafficPolicy>,
    pub subsets: Vec<pb::Subset>,
    pub created: Option<String>,
    pub unsupported: Vec<String>,
}

pub(super) type Rest = BTreeMap<String, Value>;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsSpec {
    hosts: Vec<String>,
    gateways: Vec<String>,
    http: Vec<VsHttp>,
    tcp: Vec<super::tcp::VsTcp>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsHttp {
    name: String,
    #[serde(rename = "match")]
    matches: Vec<VsMatch>,
    route: Vec<VsRouteDest>,
    redirect: Option<VsRedirect>,
    direct_response: Option<VsDirect>,
    rewrite: Option<VsRewrite>,
    timeout: Option<String>,
    retries: Option<VsRetries>,
    fault: Option<VsFault>,
    mirror: Option<VsDestination>,
    mirror_percentage: Option<Percent>,
    mirror_percent: Option<u32>,
    headers: Option<VsHeaders>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsMatch {
    uri: Option<VsString>,
    method: Option<VsString>,
    authority: Option<VsString>,
    headers: BTreeMap<String, VsString>,
    query_params: BTreeMap<String, VsString>,
    port: Option<u32>,
    ignore_uri_case: bool,
    gateways: Vec<String>,
    /// Only a label (stats, logs); nothing to enforce.
    #[allow(dead_code)]
    name: String,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsString {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsRouteDest {
    destination: VsDestination,
    weight: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsDestination {
    host: String,
    subset: String,
    port: Option<PortSelector>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PortSelector {
    number: u32,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Percent {
    value: f64,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsRedirect {
    uri: String,
    authority: String,
    scheme: String,
    redirect_code: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsDirect {
    status: u32,
    body: Option<VsBody>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsBody {
    string: String,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsRewrite {
    uri: String,
    authority: String,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsRetries {
    attempts: Option<u32>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsFault {
    delay: Option<VsDelay>,
    abort: Option<VsAbort>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsDelay {
    fixed_delay: Option<String>,
    percentage: Option<Percent>,
    percent: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VsAbort {
    http_status: Option<u32>,
    percentage: Option<Percent>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsHeaders {
    request: Option<VsHeaderOps>,
    response: Option<VsHeaderOps>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VsHeaderOps {
    set: BTreeMap<String, String>,
    add: BTreeMap<String, String>,
    remove: Vec<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrSpec {
    host: String,
    subsets: Vec<DrSubset>,
    traffic_policy: Option<DrPolicy>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrSubset {
    name: String,
    labels: BTreeMap<String, String>,
    traffic_policy: Option<DrPolicy>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrPolicy {
    load_balancer: Option<DrLb>,
    connection_pool: Option<DrPool>,
    outlier_detection: Option<DrOutlier>,
    port_level_settings: Vec<DrPortPolicy>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrPortPolicy {
    port: Option<PortSelector>,
    load_balancer: Option<DrLb>,
    connection_pool: Option<DrPool>,
    outlier_detection: Option<DrOutlier>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrLb {
    simple: Option<String>,
    consistent_hash: Option<DrHash>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrHash {
    http_header_name: Option<String>,
    http_cookie: Option<DrCookie>,
    use_source_ip: Option<bool>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DrCookie {
    name: String,
    ttl: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DrPool {
    tcp: Option<DrTcpPool>,
    http: Option<DrHttpPool>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrTcpPool {
    max_connections: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrHttpPool {
    http1_max_pending_requests: Option<u32>,
    http2_max_requests: Option<u32>,
    max_requests_per_connection: Option<u32>,
    max_retries: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DrOutlier {
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

/// Field-path aware conversion of one object.
pub(super) struct Ctx<'a> {
    pub kind: &'static str,
    pub object: String,
    pub namespace: &'a str,
    pub cfg: &'a MeshConfig,
    pub unsupported: Vec<String>,
}

impl Ctx<'_> {
    pub(super) fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> L7Error {
        L7Error::Field {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Notes every field this slice ignores.
    pub(super) fn rest(&mut self, path: &str, rest: &Rest) {
        self.unsupported
            .extend(rest.keys().map(|k| format!("{path}.{k}")));
    }

    pub(super) fn duration_ms(&self, path: &str, s: &str) -> Result<u64, L7Error> {
        parse_duration_ms(s).ok_or_else(|| self.err(path, format!("invalid duration {s:?}")))
    }

    pub(super) fn percent(&self, path: &str, v: f64) -> Result<f64, L7Error> {
        if (0.0..=100.0).contains(&v) {
            Ok(v)
        } else {
            Err(self.err(path, format!("{v} is not a percentage in [0, 100]")))
        }
    }

    pub(super) fn regex(&self, path: &str, re: &str) -> Result<(), L7Error> {
        regex::Regex::new(re)
            .map(|_| ())
            .map_err(|e| self.err(path, format!("invalid regex: {e}")))
    }

    /// `host` as an FQDN: a name without dots lives in the object's
    /// namespace, anything else is taken as written.
    pub(super) fn fqdn(&self, host: &str) -> String {
        if host.contains('.') || host.contains('*') {
            host.to_string()
        } else {
            format!("{host}.{}.svc.{}", self.namespace, self.cfg.domain_suffix)
        }
    }
}

/// (namespace, name) of the Service an FQDN names, if it is one.
pub(super) fn service_key(cfg: &MeshConfig, fqdn: &str) -> Option<Key> {
    let rest = fqdn.strip_suffix(&format!(".svc.{}", cfg.domain_suffix))?;
    let (name, ns) = rest.split_once('.')?;
    (!name.is_empty() && !ns.is_empty() && !ns.contains('.'))
        .then(|| (ns.to_string(), name.to_string()))
}

/// A Go/protobuf duration (`7s`, `0.5s`, `100ms`, `1m30s`) in
/// milliseconds; a non-zero duration below 1 ms rounds up to 1 ms so it
/// never turns into "none".
pub(super) fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total_ns += value * scale;
        rest = tail;
    }
    if !total_ns.is_finite() || total_ns > u64::MAX as f64 {
        return None;
    }
    let ms = (total_ns / 1e6).floor() as u64;
    Some(if ms == 0 && total_ns > 0.0 { 1 } else { ms })
}

pub(super) fn deserialize<T: serde::de::DeserializeOwned + Default>(
    kind: &'static str,
    obj: &PolicyObject,
) -> Result<T, L7Error> {
    if obj.spec.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(obj.spec.clone()).map_err(|e| {
        let path = e.path().to_string();
        L7Error::Field {
            kind,
            object: format!("{}/{}", obj.namespace, obj.name),
            field: if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            },
            reason: e.into_inner().to_string(),
        }
    })
}

/// Validates and converts a VirtualService.
pub(super) fn convert_virtual_service(
    obj: &PolicyObject,
    cfg: &MeshConfig,
) -> Result<VsInfo, L7Error> {
    let spec: VsSpec = deserialize("VirtualService", obj)?;
    let mut cx = Ctx {
        kind: "VirtualService",
        object: format!("{}/{}", obj.namespace, obj.name),
        namespace: &obj.namespace,
        cfg,
        unsupported: Vec::new(),
    };
    cx.rest("spec", &spec.rest);
    // Bound to gateways only: not the mesh's, so not the waypoint's.
    let for_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    let mut hosts = BTreeSet::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.is_empty() {
            return Err(cx.err(format!("spec.hosts[{i}]"), "empty host"));
        }
        if h.contains('*') {
            cx.unsupported.push(format!("spec.hosts[{i}] (wildcard)"));
            continue;
        }
        if let Some(k) = service_key(cfg, &cx.fqdn(h)) {
            hosts.insert(k);
        }
    }
    if !for_mesh {
        hosts.clear();
    }
    let mut routes = Vec::with_capacity(spec.http.len());
    for (i, h) in spec.http.iter().enumerate() {
        if let Some(r) = convert_http(&mut cx, &format!("spec.http[{i}]"), h)? {
            routes.push(r);
        }
    }
    let mut tcp_routes = Vec::new();
    for (i, t) in spec.tcp.iter().enumerate() {
        tcp_routes.extend(super::tcp::convert_tcp(
            &mut cx,
            &format!("spec.tcp[{i}]"),
            t,
        )?);
    }
    Ok(VsInfo {
        hosts,
        routes,
        tcp_routes,
        created: obj.creation_timestamp.clone(),
        unsupported: cx.unsupported,
    })
}

/// One `http` entry; None when every match of it was dropped.
fn convert_http(
    cx: &mut Ctx<'_>,
    path: &str,
    h: &VsHttp,
) -> Result<Option<pb::HttpRoute>, L7Error> {
    cx.rest(path, &h.rest);
    let mut matches = Vec::new();
    for (j, m) in h.matches.iter().enumerate() {
        if let Some(m) = convert_match(cx, &format!("{path}.match[{j}]"), m)? {
            matches.push(m);
        }
    }
    if !h.matches.is_empty() && matches.is_empty() {
        // Dropping conditions would widen the route; dropping it narrows.
        return Ok(None);
    }
    let exclusive = [
        h.redirect.is_some(),
        h.direct_response.is_some(),
        !h.route.is_empty(),
    ];
    if exclusive.iter().filter(|b| **b).count() > 1 {
        return Err(cx.err(
            path,
            "route, redirect and directResponse are mutually exclusive",
        ));
    }
    let action = if let Some(r) = &h.redirect {
        cx.rest(&format!("{path}.redirect"), &r.rest);
        Some(http_route::Action::Redirect(pb::Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            scheme: r.scheme.clone(),
            code: r.redirect_code.unwrap_or(0),
        }))
    } else if let Some(d) = &h.direct_response {
        let p = format!("{path}.directResponse");
        cx.rest(&p, &d.rest);
        if !(200..=599).contains(&d.status) {
            return Err(cx.err(
                format!("{p}.status"),
                format!("{} is not an HTTP status", d.status),
            ));
        }
        let body = match &d.body {
            Some(b) => {
                cx.rest(&format!("{p}.body"), &b.rest);
                b.string.clone()
            }
            None => String::new(),
        };
        Some(http_route::Action::DirectResponse(pb::DirectResponse {
            status: d.status,
            body,
        }))
    } else if !h.route.is_empty() {
        let mut destinations = Vec::with_capacity(h.route.len());
        for (j, d) in h.route.iter().enumerate() {
            let p = format!("{path}.route[{j}]");
            cx.rest(&p, &d.rest);
            let mut dest = destination(cx, &format!("{p}.destination"), &d.destination)?;
            dest.weight = d.weight.unwrap_or(0);
            destinations.push(dest);
        }
        Some(http_route::Action::Route(pb::RouteAction { destinations }))
    } else {
        None
    };
    let Some(action) = action else {
        return Err(cx.err(path, "needs a route, redirect or directResponse"));
    };
    let rewrite = h.rewrite.as_ref().map(|r| {
        cx.rest(&format!("{path}.rewrite"), &r.rest);
        pb::Rewrite {
            uri_prefix: r.uri.clone(),
            full_path: String::new(),
            authority: r.authority.clone(),
        }
    });
    let timeout_ms = match &h.timeout {
        Some(t) => cx.duration_ms(&format!("{path}.timeout"), t)?,
        None => 0,
    };
    let retries = match &h.retries {
        Some(r) => {
            let p = format!("{path}.retries");
            cx.rest(&p, &r.rest);
            Some(pb::RetryPolicy {
                attempts: r.attempts.unwrap_or(0),
                per_try_timeout_ms: match &r.per_try_timeout {
                    Some(t) => cx.duration_ms(&format!("{p}.perTryTimeout"), t)?,
                    None => 0,
                },
                retry_on: r
                    .retry_on
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        }
        None => None,
    };
    let fault = match &h.fault {
        Some(f) => Some(convert_fault(cx, &format!("{path}.fault"), f)?),
        None => None,
    };
    let mut mirrors = Vec::new();
    if let Some(m) = &h.mirror {
        let d = destination(cx, &format!("{path}.mirror"), m)?;
        let percent = match (&h.mirror_percentage, h.mirror_percent) {
            (Some(p), _) => cx.percent(&format!("{path}.mirrorPercentage.value"), p.value)?,
            (None, Some(p)) => cx.percent(&format!("{path}.mirrorPercent"), f64::from(p))?,
            (None, None) => 100.0,
        };
        mirrors.push(pb::Mirror {
            host: d.host,
            subset: d.subset,
            port: d.port,
            percent,
        });
    }
    let (request_headers, response_headers) = match &h.headers {
        Some(hd) => {
            let p = format!("{path}.headers");
            cx.rest(&p, &hd.rest);
            (
                hd.request
                    .as_ref()
                    .map(|o| header_ops(cx, &format!("{p}.request"), o)),
                hd.response
                    .as_ref()
                    .map(|o| header_ops(cx, &format!("{p}.response"), o)),
            )
        }
        None => (None, None),
    };
    Ok(Some(pb::HttpRoute {
        name: h.name.clone(),
        matches,
        action: Some(action),
        rewrite,
        request_headers,
        response_headers,
        timeout_ms,
        retries,
        fault,
        mirrors,
    }))
}

fn destination(
    cx: &mut Ctx<'_>,
    path: &str,
    d: &VsDestination,
) -> Result<pb::Destination, L7Error> {
    cx.rest(path, &d.rest);
    if d.host.is_empty() {
        return Err(cx.err(format!("{path}.host"), "required"));
    }
    let port = match &d.port {
        Some(p) => {
            cx.rest(&format!("{path}.port"), &p.rest);
            if p.number > 65535 {
                return Err(cx.err(format!("{path}.port.number"), "not a port number"));
            }
            p.number
        }
        None => 0,
    };
    Ok(pb::Destination {
        host: cx.fqdn(&d.host),
        subset: d.subset.clone(),
        port,
        weight: 0,
    })
}

fn header_ops(cx: &mut Ctx<'_>, path: &str, o: &VsHeaderOps) -> pb::HeaderOperations {
    cx.rest(path, &o.rest);
    pb::HeaderOperations {
        set: o.set.clone().into_iter().collect(),
        add: o.add.clone().into_iter().collect(),
        remove: o.remove.clone(),
    }
}

fn convert_fault(cx: &mut Ctx<'_>, path: &str, f: &VsFault) -> Result<pb::FaultInjection, L7Error> {
    cx.rest(path, &f.rest);
    let delay = match &f.delay {
        Some(d) => {
            let p = format!("{path}.delay");
            cx.rest(&p, &d.rest);
            let Some(fixed) = &d.fixed_delay else {
                return Err(cx.err(format!("{p}.fixedDelay"), "required"));
            };
            let percent = match (&d.percentage, d.percent) {
                (Some(pc), _) => cx.percent(&format!("{p}.percentage.value"), pc.value)?,
                (None, Some(pc)) => cx.percent(&format!("{p}.percent"), f64::from(pc))?,
                (None, None) => 100.0,
            };
            Some(pb::DelayFault {
                fixed_delay_ms: cx.duration_ms(&format!("{p}.fixedDelay"), fixed)?,
                percent,
            })
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let p = format!("{path}.abort");
            cx.rest(&p, &a.rest);
            let status = match a.http_status {
                Some(s) if (200..=599).contains(&s) => s,
                Some(s) => {
                    return Err(cx.err(
                        format!("{p}.httpStatus"),
                        format!("{s} is not an HTTP status"),
                    ))
                }
                None => return Err(cx.err(format!("{p}.httpStatus"), "required")),
            };
            let percent = match &a.percentage {
                Some(pc) => cx.percent(&format!("{p}.percentage.value"), pc.value)?,
                None => 100.0,
            };
            Some(pb::AbortFault {
                http_status: status,
                percent,
            })
        }
        None => None,
    };
    Ok(pb::FaultInjection { delay, abort })
}

/// One `match` entry; None when it holds a condition the waypoint cannot
/// check (the entry is dropped rather than matched too widely).
fn convert_match(
    cx: &mut Ctx<'_>,
    path: &str,
    m: &VsMatch,
) -> Result<Option<pb::HttpMatch>, L7Error> {
    if !m.rest.is_empty() {
        cx.rest(path, &m.rest);
        cx.unsupported.push(format!("{path} (match entry dropped)"));
        return Ok(None);
    }
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
        return Ok(None);
    }
    // An empty matcher (`uri: {}`) puts no condition on the request.
    let string = |cx: &mut Ctx<'_>, p: &str, s: &VsString, ignore_case: bool| {
        string_match(cx, p, s).map(|m| {
            m.map(|m| pb::StringMatch {
                r#match: Some(m),
                ignore_case,
            })
        })
    };
    let uri = match &m.uri {
        Some(u) => string(cx, &format!("{path}.uri"), u, m.ignore_uri_case)?,
        None => None,
    };
    let method = match &m.method {
        Some(u) => string(cx, &format!("{path}.method"), u, false)?,
        None => None,
    };
    let authority = match &m.authority {
        Some(u) => string(cx, &format!("{path}.authority"), u, false)?,
        None => None,
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (name, s) in &m.headers {
        let sm = string_match(cx, &format!("{path}.headers.{name}"), s)?;
        headers.push(pb::HeaderMatch {
            name: name.to_ascii_lowercase(),
            r#match: Some(match sm {
                Some(string_match::Match::Exact(v)) => header_match::Match::Exact(v),
                Some(string_match::Match::Prefix(v)) => header_match::Match::Prefix(v),
                Some(string_match::Match::Regex(v)) => header_match::Match::Regex(v),
                // `{}`: the header only has to be there.
                None => header_match::Match::Present(true),
            }),
            ignore_case: false,
        });
    }
    let mut query_params = Vec::with_capacity(m.query_params.len());
    for (name, s) in &m.query_params {
        let sm = string_match(cx, &format!("{path}.queryParams.{name}"), s)?;
        query_params.push(pb::QueryParamMatch {
            name: name.clone(),
            r#match: Some(match sm {
                Some(string_match::Match::Exact(v)) => query_param_match::Match::Exact(v),
                Some(string_match::Match::Prefix(v)) => query_param_match::Match::Prefix(v),
                Some(string_match::Match::Regex(v)) => query_param_match::Match::Regex(v),
                None => query_param_match::Match::Present(true),
            }),
        });
    }
    let port = m.port.unwrap_or(0);
    if port > 65535 {
        return Err(cx.err(format!("{path}.port"), "not a port number"));
    }
    Ok(Some(pb::HttpMatch {
        uri,
        headers,
        query_params,
        method,
        authority,
        port,
    }))
}

fn string_match(
    cx: &mut Ctx<'_>,
    path: &str,
    s: &VsString,
) -> Result<Option<string_match::Match>, L7Error> {
    // An unknown operator (say `suffix`) cannot be ignored without
    // widening the match, and Istio's schema refuses it too.
    if let Some(k) = s.rest.keys().next() {
        return Err(cx.err(format!("{path}.{k}"), "unknown string match operator"));
    }
    match (&s.exact, &s.prefix, &s.regex) {
        (Some(v), None, None) => Ok(Some(string_match::Match::Exact(v.clone()))),
        (None, Some(v), None) => Ok(Some(string_match::Match::Prefix(v.clone()))),
        (None, None, Some(v)) => {
            cx.regex(&format!("{path}.regex"), v)?;
            Ok(Some(string_match::Match::Regex(v.clone())))
        }
        (None, None, None) => Ok(None),
        _ => Err(cx.err(path, "only one of exact, prefix, regex")),
    }
}

/// Validates and converts a DestinationRule.
pub(super) fn convert_destination_rule(
    obj: &PolicyObject,
    cfg: &MeshConfig,
) -> Result<DrInfo, L7Error> {
    let spec: DrSpec = deserialize("DestinationRule", obj)?;
    let mut cx = Ctx {
        kind: "DestinationRule",
        object: format!("{}/{}", obj.namespace, obj.name),
        namespace: &obj.namespace,
        cfg,
        unsupported: Vec::new(),
    };
    cx.rest("spec", &spec.rest);
    if spec.host.is_empty() {
        return Err(cx.err("spec.host", "required"));
    }
    let host = service_key(cfg, &cx.fqdn(&spec.host));
    let traffic_policy = match &spec.traffic_policy {
        Some(p) => Some(policy(&mut cx, "spec.trafficPolicy", p)?),
        None => None,
    };
    let mut subsets = Vec::with_capacity(spec.subsets.len());
    let mut names = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        cx.rest(&p, &s.rest);
        if s.name.is_empty() {
            return Err(cx.err(format!("{p}.name"), "required"));
        }
        if !names.insert(s.name.as_str()) {
            return Err(cx.err(
                format!("{p}.name"),
                format!("duplicate subset {:?}", s.name),
            ));
        }
        // Any pod label works: the members are resolved against the pods
        // when the ServiceRoutes is computed (`resolve_subsets`).
        subsets.push(pb::Subset {
            name: s.name.clone(),
            labels: s.labels.clone().into_iter().collect(),
            traffic_policy: match &s.traffic_policy {
                Some(tp) => Some(policy(&mut cx, &format!("{p}.trafficPolicy"), tp)?),
                None => None,
            },
            workload_uids: Vec::new(),
            labels_resolved: false,
        });
    }
    Ok(DrInfo {
        host,
        traffic_policy,
        subsets,
        created: obj.creation_timestamp.clone(),
        unsupported: cx.unsupported,
    })
}

fn policy(cx: &mut Ctx<'_>, path: &str, p: &DrPolicy) -> Result<pb::TrafficPolicy, L7Error> {
    // Mesh traffic between ambient workloads is always mutual TLS (HBONE),
    // so `tls: {mode: ISTIO_MUTUAL}` asks for what already happens.
    let mut rest = p.rest.clone();
    if rest
        .get("tls")
        .and_then(|t| t.get("mode"))
        .and_then(Value::as_str)
        == Some("ISTIO_MUTUAL")
    {
        rest.remove("tls");
    }
    cx.rest(path, &rest);
    let mut port_level_settings = Vec::with_capacity(p.port_level_settings.len());
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        cx.rest(&pp, &pl.rest);
        let port = match &pl.port {
            Some(s) if (1..=65535).contains(&s.number) => s.number,
            _ => return Err(cx.err(format!("{pp}.port.number"), "a port number is required")),
        };
        port_level_settings.push(pb::PortTrafficPolicy {
            port,
            load_balancer: opt(cx, &format!("{pp}.loadBalancer"), &pl.load_balancer, lb)?,
            connection_pool: opt(
                cx,
                &format!("{pp}.connectionPool"),
                &pl.connection_pool,
                pool,
            )?,
            outlier_detection: opt(
                cx,
                &format!("{pp}.outlierDetection"),
                &pl.outlier_detection,
                outlier,
            )?,
        });
    }
    Ok(pb::TrafficPolicy {
        load_balancer: opt(cx, &format!("{path}.loadBalancer"), &p.load_balancer, lb)?,
        connection_pool: opt(
            cx,
            &format!("{path}.connectionPool"),
            &p.connection_pool,
            pool,
        )?,
        outlier_detection: opt(
            cx,
            &format!("{path}.outlierDetection"),
            &p.outlier_detection,
            outlier,
        )?,
        port_level_settings,
    })
}

type Conv<'c, S, T> = fn(&mut Ctx<'c>, &str, &S) -> Result<T, L7Error>;

fn opt<'c, S, T>(
    cx: &mut Ctx<'c>,
    path: &str,
    v: &Option<S>,
    f: Conv<'c, S, T>,
) -> Result<Option<T>, L7Error> {
    v.as_ref().map(|v| f(cx, path, v)).transpose()
}

fn lb(cx: &mut Ctx<'_>, path: &str, l: &DrLb) -> Result<pb::LoadBalancer, L7Error> {
    cx.rest(path, &l.rest);
    let simple = match l.simple.as_deref() {
        None | Some("UNSPECIFIED" | "ROUND_ROBIN") => load_balancer::Simple::RoundRobin,
        Some("RANDOM") => load_balancer::Simple::Random,
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        Some("LEAST_REQUEST" | "LEAST_CONN") => load_balancer::Simple::LeastRequest,
        Some("PASSTHROUGH") => {
            cx.unsupported.push(format!("{path}.simple=PASSTHROUGH"));
            load_balancer::Simple::RoundRobin
        }
        Some(other) => {
            return Err(cx.err(format!("{path}.simple"), format!("unknown value {other:?}")))
        }
    };
    let consistent_hash = match &l.consistent_hash {
        Some(h) => {
            let p = format!("{path}.consistentHash");
            cx.rest(&p, &h.rest);
            let key = match (&h.http_header_name, &h.http_cookie, h.use_source_ip) {
                (Some(n), None, None | Some(false)) => {
                    HashKey::HttpHeaderName(n.to_ascii_lowercase())
                }
                (None, Some(c), None | Some(false)) => {
                    let cp = format!("{p}.httpCookie");
                    cx.rest(&cp, &c.rest);
                    if c.name.is_empty() {
                        return Err(cx.err(format!("{cp}.name"), "required"));
                    }
                    HashKey::HttpCookie(pb::HttpCookie {
                        name: c.name.clone(),
                        ttl_ms: match &c.ttl {
                            Some(t) => cx.duration_ms(&format!("{cp}.ttl"), t)?,
                            None => 0,
                        },
                    })
                }
                (None, None, Some(true)) => HashKey::UseSourceIp(true),
                (None, None, _) => {
                    return Err(cx.err(&p, "needs httpHeaderName, httpCookie or useSourceIp"))
                }
                _ => return Err(cx.err(&p, "only one hash key may be set")),
            };
            Some(pb::ConsistentHash {
                hash_key: Some(key),
            })
        }
        None => None,
    };
    Ok(pb::LoadBalancer {
        simple: simple as i32,
        consistent_hash,
    })
}

fn pool(cx: &mut Ctx<'_>, path: &str, p: &DrPool) -> Result<pb::ConnectionPool, L7Error> {
    cx.rest(path, &p.rest);
    let mut out = pb::ConnectionPool::default();
    if let Some(t) = &p.tcp {
        cx.rest(&format!("{path}.tcp"), &t.rest);
        out.max_connections = t.max_connections.unwrap_or(0);
    }
    if let Some(h) = &p.http {
        cx.rest(&format!("{path}.http"), &h.rest);
        out.http1_max_pending_requests = h.http1_max_pending_requests.unwrap_or(0);
        out.http2_max_requests = h.http2_max_requests.unwrap_or(0);
        out.max_requests_per_connection = h.max_requests_per_connection.unwrap_or(0);
        out.max_retries = h.max_retries.unwrap_or(0);
    }
    Ok(out)
}

fn outlier(cx: &mut Ctx<'_>, path: &str, o: &DrOutlier) -> Result<pb::OutlierDetection, L7Error> {
    cx.rest(path, &o.rest);
    let ms = |cx: &Ctx<'_>, field: &str, v: &Option<String>| match v {
        Some(s) => cx.duration_ms(&format!("{path}.{field}"), s),
        None => Ok(0),
    };
    let max = o.max_ejection_percent.unwrap_or(0);
    if max > 100 {
        return Err(cx.err(format!("{path}.maxEjectionPercent"), "not a percentage"));
    }
    Ok(pb::OutlierDetection {
        // Istio's default when the threshold is left out.
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval_ms: ms(cx, "interval", &o.interval)?,
        base_ejection_time_ms: ms(cx, "baseEjectionTime", &o.base_ejection_time)?,
        max_ejection_percent: max,
    })
}

/// Istio protocol name of a Workload API app protocol.
fn protocol_name(p: AppProtocol) -> &'static str {
    match p {
        AppProtocol::Http11 => "HTTP",
        AppProtocol::Http2 => "HTTP2",
        AppProtocol::Grpc => "GRPC",
        AppProtocol::Tcp => "TCP",
        AppProtocol::Tls => "TLS",
        _ => "",
    }
}

/// Oldest first, then by namespace and name: which of competing objects
/// wins, as in Istio.
pub(super) fn older(a: (&Option<String>, &Key), b: (&Option<String>, &Key)) -> bool {
    let rank = |c: &Option<String>| (c.is_none(), c.clone());
    (rank(a.0), a.1) < (rank(b.0), b.1)
}

impl Translator {
    /// Records the warnings (or the error) of one L7 object.
    pub(super) fn l7_problem(&mut self, key: String, result: Result<&[String], &L7Error>) {
        match result {
            Ok([]) => {
                self.problems.remove(&key);
            }
            Ok(unsupported) => {
                let msg = format!("not yet supported, ignored: {}", unsupported.join(", "));
                if self.problems.get(&key) != Some(&msg) {
                    tracing::warn!(object = %key, "{msg}");
                }
                self.problems.insert(key, msg);
            }
            Err(e) => {
                let msg = e.to_string();
                if self.problems.get(&key) != Some(&msg) {
                    tracing::error!(error = %msg, "invalid object ignored");
                }
                self.problems.insert(key, msg);
            }
        }
    }

    pub(super) fn apply_virtual_service(&mut self, obj: PolicyObject) {
        let key = format!("VirtualService {}/{}", obj.namespace, obj.name);
        let info = convert_virtual_service(&obj, &self.cfg);
        self.l7_problem(key, info.as_ref().map(|i| i.unsupported.as_slice()));
        self.set_virtual_service((obj.namespace, obj.name), info.ok());
    }

    pub(super) fn delete_virtual_service(&mut self, namespace: String, name: String) {
        self.problems
            .remove(&format!("VirtualService {namespace}/{name}"));
        self.set_virtual_service((namespace, name), None);
    }

    fn set_virtual_service(&mut self, key: Key, new: Option<VsInfo>) {
        if self.virtual_services.get(&key) == new.as_ref() {
            return;
        }
        let old = match new {
            Some(n) => self.virtual_services.insert(key.clone(), n),
            None => self.virtual_services.remove(&key),
        };
        let now = self.virtual_services.get(&key);
        for h in old.iter().chain(now).flat_map(|i| i.hosts.iter()) {
            self.dirty_routes.insert(h.clone());
        }
    }

    pub(super) fn apply_destination_rule(&mut self, obj: PolicyObject) {
        let key = format!("DestinationRule {}/{}", obj.namespace, obj.name);
        let info = convert_destination_rule(&obj, &self.cfg);
        self.l7_problem(key, info.as_ref().map(|i| i.unsupported.as_slice()));
        self.set_destination_rule((obj.namespace, obj.name), info.ok());
    }

    pub(super) fn delete_destination_rule(&mut self, namespace: String, name: String) {
        self.problems
            .remove(&format!("DestinationRule {namespace}/{name}"));
        self.set_destination_rule((namespace, name), None);
    }

    fn set_destination_rule(&mut self, key: Key, new: Option<DrInfo>) {
        if self.destination_rules.get(&key) == new.as_ref() {
            return;
        }
        let old = match new {
            Some(n) => self.destination_rules.insert(key.clone(), n),
            None => self.destination_rules.remove(&key),
        };
        let now = self.destination_rules.get(&key);
        for h in old.iter().chain(now).filter_map(|i| i.host.as_ref()) {
            self.dirty_routes.insert(h.clone());
        }
    }

    /// The ServiceRoutes of one service, or None when no waypoint serves it.
    pub(super) fn compute_routes(&self, key: &Key) -> Option<(String, pb::ServiceRoutes)> {
        let (ns, name) = key;
        if !self.discovered(ns) {
            return None;
        }
        let svc = self.services.get(ns)?.get(name)?;
        let wl = svc.to_service(&self.cfg, ns, name, self.namespaces.get(ns))?;
        wl.waypoint.as_ref()?;
        let attached = self.http_routes_for(key, &wl.hostname, wl.waypoint.as_ref());
        let vs = self
            .virtual_services
            .iter()
            .filter(|(_, v)| v.hosts.contains(key))
            .reduce(|a, b| {
                if older((&b.1.created, b.0), (&a.1.created, a.0)) {
                    b
                } else {
                    a
                }
            });
        // A rule in the service's own namespace wins over one elsewhere.
        let dr = self
            .destination_rules
            .iter()
            .filter(|(_, d)| d.host.as_ref() == Some(key))
            .reduce(|a, b| {
                let a_rank = (a.0 .0 != *ns, a.1.created.is_none(), &a.1.created, a.0);
                let b_rank = (b.0 .0 != *ns, b.1.created.is_none(), &b.1.created, b.0);
                if b_rank < a_rank {
                    b
                } else {
                    a
                }
            });
        let routes = pb::ServiceRoutes {
            hostname: wl.hostname.clone(),
            namespace: ns.clone(),
            ports: svc
                .ports
                .iter()
                .map(|p| pb::PortProtocol {
                    port: p.port,
                    protocol: protocol_name(p.app_protocol).to_string(),
                })
                .collect(),
            http_routes: if attached.routes.is_empty() {
                vs.map(|(_, v)| v.routes.clone()).unwrap_or_default()
            } else {
                if let Some(((vns, vname), _)) = vs {
                    let routes: Vec<String> = attached
                        .objects
                        .iter()
                        .map(|(n, r)| format!("HTTPRoute {n}/{r}"))
                        .collect();
                    tracing::warn!(
                        service = %wl.hostname,
                        "VirtualService {vns}/{vname} ignored: {} take precedence",
                        routes.join(", ")
                    );
                }
                attached.routes.clone()
            },
            // An HTTPRoute on the service sets the whole VirtualService aside.
            tcp_routes: match vs {
                Some((_, v)) if attached.routes.is_empty() => v.tcp_routes.clone(),
                _ => Vec::new(),
            },
            traffic_policy: dr.and_then(|(_, d)| d.traffic_policy.clone()),
            subsets: dr
                .map(|(_, d)| self.resolve_subsets(ns, svc, &d.subsets))
                .unwrap_or_default(),
        };
        Some((wl.hostname, routes))
    }

    /// The subsets with their members filled in: the uids of the pods of
    /// `svc` (in `ns`) whose labels include every label of the subset. The
    /// waypoint cannot match pod labels itself, since the Workload API
    /// carries only a workload's canonical name and revision. Terminal pods
    /// are left out: their workloads are not published.
    fn resolve_subsets(&self, ns: &str, svc: &SvcInfo, subsets: &[pb::Subset]) -> Vec<pb::Subset> {
        let empty = HashMap::new();
        let pods = self.pods.get(ns).unwrap_or(&empty);
        let members: Vec<(&String, &PodInfo)> = pods
            .iter()
            .filter(|(_, p)| !p.terminal && svc.selects(&p.labels))
            .collect();
        subsets
            .iter()
            .map(|s| {
                let mut uids: Vec<String> = members
                    .iter()
                    .filter(|(_, p)| s.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                    .map(|(name, _)| super::workload_uid(&self.cfg, ns, name))
                    .collect();
                // Sorted, so an unchanged set compares (and encodes) equal.
                uids.sort_unstable();
                pb::Subset {
                    workload_uids: uids,
                    labels_resolved: true,
                    ..s.clone()
                }
            })
            .collect()
    }

    /// Marks the ServiceRoutes a pod's membership in DestinationRule subsets
    /// can change: those of the services in `ns` that select the pod under
    /// its old or new labels and have a DestinationRule with subsets. Only
    /// called when the pod appears, goes, is relabelled or turns terminal.
    pub(super) fn mark_subset_routes(
        &mut self,
        ns: &str,
        old: Option<&Labels>,
        new: Option<&Labels>,
    ) {
        let Some(svcs) = self.services.get(ns) else {
            return;
        };
        let selecting: Vec<Key> = svcs
            .iter()
            .filter(|(_, s)| old.is_some_and(|l| s.selects(l)) || new.is_some_and(|l| s.selects(l)))
            .map(|(name, _)| (ns.to_string(), name.clone()))
            .collect();
        if selecting.is_empty() {
            return;
        }
        let with_subsets: BTreeSet<&Key> = self
            .destination_rules
            .values()
            .filter(|d| !d.subsets.is_empty())
            .filter_map(|d| d.host.as_ref())
            .collect();
        for key in selecting {
            if with_subsets.contains(&key) {
                self.dirty_routes.insert(key);
            }
        }
    }

    /// Recomputes the dirty ServiceRoutes into `changes`.
    pub(super) fn take_route_changes(
        &mut self,
        dirty: BTreeSet<Key>,
        upserts: &mut Vec<(String, pb::ServiceRoutes)>,
        removes: &mut Vec<String>,
    ) {
        for key in dirty {
            let hostname = super::service_hostname(&self.cfg, &key.0, &key.1);
            match (self.compute_routes(&key), self.routes.get(&hostname)) {
                (Some((_, new)), Some(old)) if *old == new => {}
                (Some((h, new)), _) => {
                    self.routes.insert(h.clone(), new.clone());
                    upserts.push((h, new));
                }
                (None, Some(_)) => {
                    self.routes.remove(&hostname);
                    removes.push(hostname);
                }
                (None, None) => {}
            }
        }
    }

    /// Every ServiceRoutes as last returned by `take_changes`, by hostname.
    pub fn service_routes(&self) -> &BTreeMap<String, pb::ServiceRoutes> {
        &self.routes
    }
}

/// VirtualServices by (namespace, name).
pub(super) type VsMap = HashMap<Key, VsInfo>;
/// DestinationRules by (namespace, name).
pub(super) type DrMap = HashMap<Key, DrInfo>;
