//! Gateway API `HTTPRoute` for waypoints, as Istio's ambient mode reads it.
//!
//! Part of the translator, upstream of the delta xDS push, next to `l7.rs`:
//! a route attached to a Service (`parentRefs[].kind: Service`) or to a
//! waypoint Gateway (every service that uses that waypoint, narrowed by
//! `spec.hostnames`) becomes `HttpRoute`s of that service's
//! `ServiceRoutes`. Each (rule, match) pair is one `HttpRoute`, so the
//! combined routes of a service can be put in Gateway API precedence order
//! across objects. When a service has HTTPRoutes, a VirtualService for the
//! same service is ignored (HTTPRoute wins, as in Istio).
//!
//! Conversion happens when an object arrives (field paths in errors, the
//! object skipped when invalid); what depends on other objects — whether a
//! backend Service exists, which services a waypoint serves — is resolved
//! per service when its `ServiceRoutes` is computed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use mesh_core::proto::waypoint::{self as pb, header_match, http_route, query_param_match};
use mesh_core::proto::workload::{gateway_address, GatewayAddress};
use serde::Deserialize;
use serde_json::Value;

use super::l7::{deserialize, Ctx, L7Error, Rest};
use super::{Key, MeshConfig, PolicyObject, Translator};

/// Controller name written into `status.parents[]`.
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";
/// API group of the Gateway API kinds.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct HrSpec {
    parent_refs: Vec<ParentRefSpec>,
    hostnames: Vec<String>,
    rules: Vec<RuleSpec>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ParentRefSpec {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RuleSpec {
    name: Option<String>,
    matches: Vec<MatchSpec>,
    filters: Vec<FilterSpec>,
    backend_refs: Vec<BackendRefSpec>,
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MatchSpec {
    path: Option<PathSpec>,
    headers: Vec<KvMatchSpec>,
    query_params: Vec<KvMatchSpec>,
    method: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    value: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KvMatchSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    name: String,
    value: String,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct FilterSpec {
    #[serde(rename = "type")]
    type_: String,
    request_header_modifier: Option<HeaderModSpec>,
    response_header_modifier: Option<HeaderModSpec>,
    #[serde(rename = "urlRewrite")]
    url_rewrite: Option<RewriteSpec>,
    request_redirect: Option<RedirectSpec>,
    request_mirror: Option<MirrorSpec>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HeaderModSpec {
    set: Vec<NameValue>,
    add: Vec<NameValue>,
    remove: Vec<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RewriteSpec {
    hostname: Option<String>,
    path: Option<PathModSpec>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct PathModSpec {
    #[serde(rename = "type")]
    type_: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModSpec>,
    port: Option<u32>,
    status_code: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MirrorSpec {
    backend_ref: BackendRefSpec,
    percent: Option<u32>,
    fraction: Option<FractionSpec>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FractionSpec {
    numerator: u32,
    denominator: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BackendRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u32>,
    weight: Option<u32>,
    filters: Vec<Value>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TimeoutsSpec {
    request: Option<String>,
    backend_request: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RetrySpec {
    attempts: Option<u32>,
    codes: Vec<u32>,
    #[serde(flatten)]
    rest: Rest,
}

/// What a `parentRefs` entry attaches the route to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParentKind {
    /// A Service (GAMMA: traffic to that service).
    Service,
    /// A Gateway; for us only waypoints matter.
    Gateway,
}

/// A `parentRefs` entry, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// Service or Gateway.
    pub kind: ParentKind,
    /// (namespace, name) of the parent.
    pub key: Key,
    /// Only this service port; 0 = all.
    pub port: u32,
    /// The entry as written (echoed back in `status.parents[].parentRef`).
    pub raw: Value,
}

/// A `backendRefs` entry (or a mirror's `backendRef`), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The Service it names; None for other kinds (never resolvable here).
    pub service: Option<Key>,
    /// How to name it in messages (`Service ns/name`, `Kind ns/name`).
    pub label: String,
    /// FQDN of the service.
    pub host: String,
    /// Service port; 0 = the port the request came in on.
    pub port: u32,
    /// Gateway API weight (default 1).
    pub weight: u32,
}

/// One rule, converted; its action is finished per service.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Rule {
    /// At least one: no `matches` is `PathPrefix /`.
    matches: Vec<pb::HttpMatch>,
    /// Everything but `matches`; `action` is set only for a redirect.
    base: pb::HttpRoute,
    backends: Vec<Backend>,
    mirrors: Vec<(Key, pb::Mirror)>,
}

/// An HTTPRoute as the translator keeps it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HrInfo {
    pub parents: Vec<Parent>,
    hostnames: Vec<String>,
    rules: Vec<Rule>,
    pub created: Option<String>,
    pub unsupported: Vec<String>,
}

impl HrInfo {
    /// Every Service referenced as a backend or mirror.
    fn backend_services(&self) -> impl Iterator<Item = &Key> {
        self.rules.iter().flat_map(|r| {
            r.backends
                .iter()
                .filter_map(|b| b.service.as_ref())
                .chain(r.mirrors.iter().map(|(k, _)| k))
        })
    }
}

/// HTTPRoutes by (namespace, name).
pub(super) type HrMap = HashMap<Key, HrInfo>;

fn is_core(group: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("" | "core"))
}

/// Resolves the `parentRefs` of a route spec; entries of other kinds are
/// named in `unsupported`. Shared with the status writer.
pub fn parents(
    spec: &Value,
    namespace: &str,
    unsupported: &mut Vec<String>,
) -> Result<Vec<Parent>, String> {
    let refs = match spec.get("parentRefs") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err("spec.parentRefs: not a list".into()),
    };
    let mut out = Vec::new();
    for (i, raw) in refs.into_iter().enumerate() {
        let p: ParentRefSpec = serde_json::from_value(raw.clone())
            .map_err(|e| format!("spec.parentRefs[{i}]: {e}"))?;
        let path = format!("spec.parentRefs[{i}]");
        if p.name.is_empty() {
            return Err(format!("{path}.name: required"));
        }
        let kind = match (p.kind.as_deref().unwrap_or("Gateway"), &p.group) {
            ("Service", g) if is_core(g) => ParentKind::Service,
            ("Gateway", g) if g.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP => {
                ParentKind::Gateway
            }
            (k, g) => {
                unsupported.push(format!(
                    "{path} ({}/{k} parents are not served)",
                    g.as_deref().unwrap_or("")
                ));
                continue;
            }
        };
        if p.section_name.is_some() {
            unsupported.push(format!("{path}.sectionName"));
        }
        for k in p.rest.keys() {
            unsupported.push(format!("{path}.{k}"));
        }
        let port = p.port.unwrap_or(0);
        if port > 65535 {
            return Err(format!("{path}.port: not a port number"));
        }
        out.push(Parent {
            kind,
            key: (
                p.namespace
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| namespace.to_string()),
                p.name,
            ),
            port,
            raw,
        });
    }
    Ok(out)
}

/// Validates and converts an HTTPRoute.
pub(super) fn convert_http_route(obj: &PolicyObject, cfg: &MeshConfig) -> Result<HrInfo, L7Error> {
    let spec: HrSpec = deserialize("HTTPRoute", obj)?;
    let mut cx = Ctx {
        kind: "HTTPRoute",
        object: format!("{}/{}", obj.namespace, obj.name),
        namespace: &obj.namespace,
        cfg,
        unsupported: Vec::new(),
    };
    cx.rest("spec", &spec.rest);
    let mut unsupported = Vec::new();
    let parents = parents(&obj.spec, &obj.namespace, &mut unsupported).map_err(|e| {
        let (field, reason) = e.split_once(": ").unwrap_or(("spec.parentRefs", &e));
        cx.err(field, reason)
    })?;
    cx.unsupported.extend(unsupported);
    for (i, h) in spec.hostnames.iter().enumerate() {
        if h.is_empty() {
            return Err(cx.err(format!("spec.hostnames[{i}]"), "empty hostname"));
        }
    }
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, r) in spec.rules.iter().enumerate() {
        rules.push(convert_rule(&mut cx, &format!("spec.rules[{i}]"), r)?);
    }
    Ok(HrInfo {
        parents,
        hostnames: spec.hostnames.clone(),
        rules,
        created: obj.creation_timestamp.clone(),
        unsupported: cx.unsupported,
    })
}

fn convert_rule(cx: &mut Ctx<'_>, path: &str, r: &RuleSpec) -> Result<Rule, L7Error> {
    cx.rest(path, &r.rest);
    let mut matches = Vec::with_capacity(r.matches.len().max(1));
    for (j, m) in r.matches.iter().enumerate() {
        matches.push(convert_match(cx, &format!("{path}.matches[{j}]"), m)?);
    }
    if matches.is_empty() {
        matches.push(pb::HttpMatch {
            uri: Some(prefix("/")),
            ..Default::default()
        });
    }
    let mut base = pb::HttpRoute {
        name: r.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut mirrors = Vec::new();
    for (j, f) in r.filters.iter().enumerate() {
        let p = format!("{path}.filters[{j}]");
        filter(cx, &p, f, &matches, &mut base, &mut mirrors)?;
    }
    if base.rewrite.is_some() && base.action.is_some() {
        return Err(cx.err(
            format!("{path}.filters"),
            "URLRewrite and RequestRedirect cannot be combined",
        ));
    }
    let mut backends = Vec::with_capacity(r.backend_refs.len());
    for (j, b) in r.backend_refs.iter().enumerate() {
        let p = format!("{path}.backendRefs[{j}]");
        if !b.filters.is_empty() {
            cx.unsupported.push(format!("{p}.filters"));
        }
        backends.push(backend(cx, &p, b)?);
    }
    if let Some(t) = &r.timeouts {
        let p = format!("{path}.timeouts");
        cx.rest(&p, &t.rest);
        if let Some(d) = &t.request {
            base.timeout_ms = cx.duration_ms(&format!("{p}.request"), d)?;
        }
        if let Some(d) = &t.backend_request {
            let per_try = cx.duration_ms(&format!("{p}.backendRequest"), d)?;
            // Keeps the waypoint's default retries (two, on connect
            // failures and 503), now each bounded.
            base.retries = Some(pb::RetryPolicy {
                attempts: 2,
                per_try_timeout_ms: per_try,
                retry_on: vec![
                    "connect-failure".into(),
                    "refused-stream".into(),
                    "503".into(),
                ],
            });
        }
    }
    if let Some(rt) = &r.retry {
        let p = format!("{path}.retry");
        cx.rest(&p, &rt.rest);
        let mut policy = base.retries.take().unwrap_or_default();
        policy.attempts = rt.attempts.unwrap_or(policy.attempts);
        if !rt.codes.is_empty() {
            policy.retry_on = rt.codes.iter().map(u32::to_string).collect();
        }
        base.retries = Some(policy);
    }
    Ok(Rule {
        matches,
        base,
        backends,
        mirrors,
    })
}

fn prefix(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        r#match: Some(pb::string_match::Match::Prefix(v.to_string())),
        ignore_case: false,
    }
}

fn convert_match(cx: &mut Ctx<'_>, path: &str, m: &MatchSpec) -> Result<pb::HttpMatch, L7Error> {
    // An unknown condition cannot be dropped without widening the match.
    if let Some(k) = m.rest.keys().next() {
        return Err(cx.err(format!("{path}.{k}"), "unknown match condition"));
    }
    use pb::string_match::Match as S;
    let uri = match &m.path {
        None => prefix("/"),
        Some(p) => {
            let pp = format!("{path}.path");
            if let Some(k) = p.rest.keys().next() {
                return Err(cx.err(format!("{pp}.{k}"), "unknown field"));
            }
            let v = p.value.clone().unwrap_or_else(|| "/".to_string());
            let m = match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => S::Exact(v),
                "PathPrefix" => {
                    if !v.starts_with('/') {
                        return Err(cx.err(format!("{pp}.value"), "must start with /"));
                    }
                    S::Prefix(v)
                }
                "RegularExpression" => {
                    cx.regex(&format!("{pp}.value"), &v)?;
                    S::Regex(v)
                }
                other => {
                    return Err(cx.err(format!("{pp}.type"), format!("unknown type {other:?}")))
                }
            };
            pb::StringMatch {
                r#match: Some(m),
                ignore_case: false,
            }
        }
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (j, h) in m.headers.iter().enumerate() {
        let p = format!("{path}.headers[{j}]");
        let (name, value) = kv(cx, &p, h)?;
        headers.push(pb::HeaderMatch {
            name: name.to_ascii_lowercase(),
            r#match: Some(match value {
                S::Regex(v) => header_match::Match::Regex(v),
                S::Exact(v) | S::Prefix(v) => header_match::Match::Exact(v),
            }),
            ignore_case: false,
        });
    }
    let mut query_params = Vec::with_capacity(m.query_params.len());
    for (j, q) in m.query_params.iter().enumerate() {
        let p = format!("{path}.queryParams[{j}]");
        let (name, value) = kv(cx, &p, q)?;
        query_params.push(pb::QueryParamMatch {
            name,
            r#match: Some(match value {
                S::Regex(v) => query_param_match::Match::Regex(v),
                S::Exact(v) | S::Prefix(v) => query_param_match::Match::Exact(v),
            }),
        });
    }
    let method = match &m.method {
        Some(v) if !v.is_empty() => Some(pb::StringMatch {
            r#match: Some(S::Exact(v.clone())),
            ignore_case: false,
        }),
        _ => None,
    };
    Ok(pb::HttpMatch {
        uri: Some(uri),
        headers,
        query_params,
        method,
        authority: None,
        port: 0,
    })
}

/// A header or query parameter match: (name, Exact or Regex value).
fn kv(
    cx: &mut Ctx<'_>,
    path: &str,
    h: &KvMatchSpec,
) -> Result<(String, pb::string_match::Match), L7Error> {
    if let Some(k) = h.rest.keys().next() {
        return Err(cx.err(format!("{path}.{k}"), "unknown field"));
    }
    if h.name.is_empty() {
        return Err(cx.err(format!("{path}.name"), "required"));
    }
    let m = match h.type_.as_deref().unwrap_or("Exact") {
        "Exact" => pb::string_match::Match::Exact(h.value.clone()),
        "RegularExpression" => {
            cx.regex(&format!("{path}.value"), &h.value)?;
            pb::string_match::Match::Regex(h.value.clone())
        }
        other => return Err(cx.err(format!("{path}.type"), format!("unknown type {other:?}"))),
    };
    Ok((h.name.clone(), m))
}

fn header_mod(
    cx: &mut Ctx<'_>,
    path: &str,
    spec: &Option<HeaderModSpec>,
    into: &mut Option<pb::HeaderOperations>,
) -> Result<(), L7Error> {
    let Some(h) = spec else {
        return Err(cx.err(path, "required by the filter type"));
    };
    cx.rest(path, &h.rest);
    let ops = into.get_or_insert_with(Default::default);
    for nv in &h.set {
        ops.set.insert(nv.name.clone(), nv.value.clone());
    }
    for nv in &h.add {
        ops.add.insert(nv.name.clone(), nv.value.clone());
    }
    ops.remove.extend(h.remove.iter().cloned());
    Ok(())
}

fn filter(
    cx: &mut Ctx<'_>,
    p: &str,
    f: &FilterSpec,
    matches: &[pb::HttpMatch],
    base: &mut pb::HttpRoute,
    mirrors: &mut Vec<(Key, pb::Mirror)>,
) -> Result<(), L7Error> {
    cx.rest(p, &f.rest);
    match f.type_.as_str() {
        "RequestHeaderModifier" => header_mod(
            cx,
            &format!("{p}.requestHeaderModifier"),
            &f.request_header_modifier,
            &mut base.request_headers,
        ),
        "ResponseHeaderModifier" => header_mod(
            cx,
            &format!("{p}.responseHeaderModifier"),
            &f.response_header_modifier,
            &mut base.response_headers,
        ),
        "URLRewrite" => {
            let rp = format!("{p}.urlRewrite");
            let Some(rw) = &f.url_rewrite else {
                return Err(cx.err(rp, "required by the filter type"));
            };
            cx.rest(&rp, &rw.rest);
            let mut out = pb::Rewrite {
                authority: rw.hostname.clone().unwrap_or_default(),
                ..Default::default()
            };
            if let Some(pm) = &rw.path {
                let pp = format!("{rp}.path");
                cx.rest(&pp, &pm.rest);
                match pm.type_.as_str() {
                    "ReplaceFullPath" => {
                        out.full_path = pm.replace_full_path.clone().unwrap_or_default();
                    }
                    "ReplacePrefixMatch" => {
                        let only_prefixes = matches.iter().all(|m| {
                            matches!(
                                m.uri.as_ref().and_then(|u| u.r#match.as_ref()),
                                Some(pb::string_match::Match::Prefix(_))
                            )
                        });
                        if !only_prefixes {
                            return Err(cx.err(
                                format!("{pp}.type"),
                                "ReplacePrefixMatch needs PathPrefix matches",
                            ));
                        }
                        // "" means "the prefix goes away": the root.
                        let v = pm.replace_prefix_match.clone().unwrap_or_default();
                        out.uri_prefix = if v.is_empty() { "/".into() } else { v };
                    }
                    other => {
                        return Err(cx.err(format!("{pp}.type"), format!("unknown type {other:?}")))
                    }
                }
            }
            base.rewrite = Some(out);
            Ok(())
        }
        "RequestRedirect" => {
            let rp = format!("{p}.requestRedirect");
            let Some(r) = &f.request_redirect else {
                return Err(cx.err(rp, "required by the filter type"));
            };
            cx.rest(&rp, &r.rest);
            let mut out = pb::Redirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                authority: r.hostname.clone().unwrap_or_default(),
                // Gateway API's default is 302 (the waypoint's is 301).
                code: r.status_code.unwrap_or(302),
                uri: String::new(),
            };
            if !matches!(out.code, 301 | 302 | 303 | 307 | 308) {
                return Err(cx.err(
                    format!("{rp}.statusCode"),
                    format!("{} is not a redirect status", out.code),
                ));
            }
            if let Some(port) = r.port {
                if out.authority.is_empty() {
                    cx.unsupported
                        .push(format!("{rp}.port (only together with hostname)"));
                } else {
                    out.authority = format!("{}:{port}", out.authority);
                }
            }
            if let Some(pm) = &r.path {
                let pp = format!("{rp}.path");
                cx.rest(&pp, &pm.rest);
                match pm.type_.as_str() {
                    "ReplaceFullPath" => {
                        out.uri = pm.replace_full_path.clone().unwrap_or_default();
                    }
                    "ReplacePrefixMatch" => {
                        cx.unsupported.push(format!("{pp} (ReplacePrefixMatch)"))
                    }
                    other => {
                        return Err(cx.err(format!("{pp}.type"), format!("unknown type {other:?}")))
                    }
                }
            }
            base.action = Some(http_route::Action::Redirect(out));
            Ok(())
        }
        "RequestMirror" => {
            let mp = format!("{p}.requestMirror");
            let Some(m) = &f.request_mirror else {
                return Err(cx.err(mp, "required by the filter type"));
            };
            cx.rest(&mp, &m.rest);
            let b = backend(cx, &format!("{mp}.backendRef"), &m.backend_ref)?;
            let percent = match (m.percent, &m.fraction) {
                (Some(pc), _) => cx.percent(&format!("{mp}.percent"), f64::from(pc))?,
                (None, Some(fr)) => {
                    let den = fr.denominator.unwrap_or(100);
                    if den == 0 || fr.numerator > den {
                        return Err(cx.err(format!("{mp}.fraction"), "not a fraction in [0, 1]"));
                    }
                    f64::from(fr.numerator) * 100.0 / f64::from(den)
                }
                (None, None) => 100.0,
            };
            let Some(key) = b.service else {
                cx.unsupported
                    .push(format!("{mp}.backendRef ({} is not a Service)", b.label));
                return Ok(());
            };
            mirrors.push((
                key,
                pb::Mirror {
                    host: b.host,
                    subset: String::new(),
                    port: b.port,
                    percent,
                },
            ));
            Ok(())
        }
        other => {
            cx.unsupported.push(format!("{p} (type {other})"));
            Ok(())
        }
    }
}

fn backend(cx: &mut Ctx<'_>, path: &str, b: &BackendRefSpec) -> Result<Backend, L7Error> {
    cx.rest(path, &b.rest);
    if b.name.is_empty() {
        return Err(cx.err(format!("{path}.name"), "required"));
    }
    let ns = b
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| cx.namespace.to_string());
    let port = b.port.unwrap_or(0);
    if port > 65535 {
        return Err(cx.err(format!("{path}.port"), "not a port number"));
    }
    let kind = b.kind.as_deref().unwrap_or("Service");
    let service = (kind == "Service" && is_core(&b.group)).then(|| (ns.clone(), b.name.clone()));
    Ok(Backend {
        label: format!("{kind} {ns}/{}", b.name),
        host: super::service_hostname(cx.cfg, &ns, &b.name),
        service,
        port,
        weight: b.weight.unwrap_or(1),
    })
}

/// Whether `host` (a service FQDN) is one of `hostnames` (exact or a
/// `*.` wildcard); no hostnames means every host.
fn host_matches(hostnames: &[String], host: &str) -> bool {
    hostnames.is_empty()
        || hostnames.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            None => h == host,
        })
}

/// Gateway API precedence of one match, smallest first: exact path, then
/// regex (Istio ranks it between), then the longest prefix; then a
/// method; then more headers; then more query parameters.
type Precedence = (
    Reverse<u8>,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
);

fn precedence(m: &pb::HttpMatch) -> Precedence {
    use pb::string_match::Match as S;
    let (rank, len) = match m.uri.as_ref().and_then(|u| u.r#match.as_ref()) {
        Some(S::Exact(v)) => (3, v.len()),
        Some(S::Regex(v)) => (2, v.len()),
        Some(S::Prefix(v)) => (1, v.len()),
        None => (0, 0),
    };
    (
        Reverse(rank),
        Reverse(len),
        m.method.is_none(),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
    )
}

/// Does a parent apply to a service (its key, FQDN and waypoint)?
fn applies(
    p: &Parent,
    hostnames: &[String],
    svc: &Key,
    host: &str,
    waypoint: Option<&GatewayAddress>,
    cfg: &MeshConfig,
) -> bool {
    match p.kind {
        ParentKind::Service => p.key == *svc,
        ParentKind::Gateway => {
            let Some(gateway_address::Destination::Hostname(h)) =
                waypoint.and_then(|w| w.destination.as_ref())
            else {
                return false;
            };
            h.namespace == p.key.0
                && h.hostname == super::service_hostname(cfg, &p.key.0, &p.key.1)
                && host_matches(hostnames, host)
        }
    }
}

/// HTTPRoute routes of one service and the routes that produced them.
pub(super) struct Attached {
    pub routes: Vec<pb::HttpRoute>,
    pub objects: Vec<Key>,
}

impl Translator {
    pub(super) fn apply_http_route(&mut self, obj: PolicyObject) {
        let key = format!("HTTPRoute {}/{}", obj.namespace, obj.name);
        let info = convert_http_route(&obj, &self.cfg);
        self.l7_problem(key, info.as_ref().map(|i| i.unsupported.as_slice()));
        self.set_http_route((obj.namespace, obj.name), info.ok());
    }

    pub(super) fn delete_http_route(&mut self, namespace: String, name: String) {
        self.problems
            .remove(&format!("HTTPRoute {namespace}/{name}"));
        self.set_http_route((namespace, name), None);
    }

    fn set_http_route(&mut self, key: Key, new: Option<HrInfo>) {
        if self.http_routes.get(&key) == new.as_ref() {
            return;
        }
        let old = match new {
            Some(n) => self.http_routes.insert(key.clone(), n),
            None => self.http_routes.remove(&key),
        };
        let now = self.http_routes.get(&key).cloned();
        for info in old.iter().chain(now.iter()) {
            self.mark_route_targets(info);
        }
    }

    /// Marks every service an HTTPRoute may apply to.
    fn mark_route_targets(&mut self, info: &HrInfo) {
        for p in &info.parents {
            match p.kind {
                ParentKind::Service => {
                    self.dirty_routes.insert(p.key.clone());
                }
                // Which services use a waypoint is decided per service
                // (its label or its namespace's); a route change on a
                // waypoint is rare enough to revisit them all.
                ParentKind::Gateway => {
                    let all: Vec<Key> = self
                        .services
                        .iter()
                        .flat_map(|(ns, m)| m.keys().map(move |n| (ns.clone(), n.clone())))
                        .collect();
                    self.dirty_routes.extend(all);
                }
            }
        }
    }

    /// Services whose existence changed may be some route's backend: the
    /// services those routes apply to are recomputed.
    pub(super) fn mark_backend_dependents(&mut self, changed: &BTreeSet<Key>) {
        if changed.is_empty() || self.http_routes.is_empty() {
            return;
        }
        let hit: Vec<HrInfo> = self
            .http_routes
            .values()
            .filter(|i| i.backend_services().any(|k| changed.contains(k)))
            .cloned()
            .collect();
        for info in &hit {
            self.mark_route_targets(info);
        }
    }

    fn service_exists(&self, key: &Key) -> bool {
        self.services
            .get(&key.0)
            .is_some_and(|m| m.contains_key(&key.1))
    }

    /// The HTTPRoute routes of one service, in Gateway API precedence.
    pub(super) fn http_routes_for(
        &self,
        svc: &Key,
        host: &str,
        waypoint: Option<&GatewayAddress>,
    ) -> Attached {
        type Entry = (Precedence, (bool, Option<String>), Key, usize, usize, u32);
        let mut entries: Vec<(Entry, pb::HttpRoute)> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut objects = Vec::new();
        for (rk, info) in &self.http_routes {
            let mut attached = false;
            for p in &info.parents {
                if !applies(p, &info.hostnames, svc, host, waypoint, &self.cfg) {
                    continue;
                }
                attached = true;
                for (ri, rule) in info.rules.iter().enumerate() {
                    for (mi, m) in rule.matches.iter().enumerate() {
                        if !seen.insert((rk.clone(), ri, mi, p.port)) {
                            continue;
                        }
                        let mut m = m.clone();
                        m.port = p.port;
                        let route = self.instantiate(rk, rule, m.clone(), host);
                        let created = (info.created.is_none(), info.created.clone());
                        entries
                            .push(((precedence(&m), created, rk.clone(), ri, mi, p.port), route));
                    }
                }
            }
            if attached {
                objects.push(rk.clone());
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        objects.sort();
        Attached {
            routes: entries.into_iter().map(|(_, r)| r).collect(),
            objects,
        }
    }

    /// One (rule, match) as a route of the service `host`.
    fn instantiate(&self, rk: &Key, rule: &Rule, m: pb::HttpMatch, host: &str) -> pb::HttpRoute {
        let mut r = rule.base.clone();
        r.matches = vec![m];
        r.mirrors = rule
            .mirrors
            .iter()
            .filter(|(k, _)| self.service_exists(k))
            .map(|(_, m)| m.clone())
            .collect();
        if r.action.is_some() {
            return r;
        }
        if rule.backends.is_empty() {
            // A mesh route without backends keeps sending to its service.
            r.action = Some(http_route::Action::Route(pb::RouteAction {
                destinations: vec![pb::Destination {
                    host: host.to_string(),
                    subset: String::new(),
                    port: 0,
                    weight: 0,
                }],
            }));
            return r;
        }
        let (valid, invalid): (Vec<&Backend>, Vec<&Backend>) = rule
            .backends
            .iter()
            .partition(|b| b.service.as_ref().is_some_and(|k| self.service_exists(k)));
        if !invalid.is_empty() {
            let names: Vec<&str> = invalid.iter().map(|b| b.label.as_str()).collect();
            tracing::warn!(
                route = format!("{}/{}", rk.0, rk.1),
                service = host,
                missing = names.join(", "),
                "HTTPRoute backends not found; their share of traffic goes to the others"
            );
        }
        let destinations: Vec<pb::Destination> = valid
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| pb::Destination {
                host: b.host.clone(),
                subset: String::new(),
                port: b.port,
                weight: b.weight,
            })
            .collect();
        r.action = Some(if destinations.is_empty() {
            // Every backend invalid (or weighted 0): Gateway API's 500.
            http_route::Action::DirectResponse(pb::DirectResponse {
                status: 500,
                body: String::new(),
            })
        } else {
            http_route::Action::Route(pb::RouteAction { destinations })
        });
        r
    }
}

/// Validates an HTTPRoute as the translator would (for its status).
pub fn validate_http_route(obj: &PolicyObject, cfg: &MeshConfig) -> Result<(), L7Error> {
    convert_http_route(obj, cfg).map(|_| ())
}

/// Every backend an HTTPRoute spec names (`backendRefs` and mirror
/// `backendRef`s), read leniently: malformed entries are left out (the
/// validation reports them). Shared with the status writer.
pub fn backend_refs(spec: &Value, namespace: &str, cfg: &MeshConfig) -> Vec<Backend> {
    let mut cx = Ctx {
        kind: "HTTPRoute",
        object: String::new(),
        namespace,
        cfg,
        unsupported: Vec::new(),
    };
    let mut out = Vec::new();
    let rules = spec.get("rules").and_then(Value::as_array);
    for rule in rules.into_iter().flatten() {
        let refs = rule.get("backendRefs").and_then(Value::as_array);
        let mirrors = rule
            .get("filters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| f.pointer("/requestMirror/backendRef"));
        for b in refs.into_iter().flatten().chain(mirrors) {
            if let Ok(spec) = serde_json::from_value::<BackendRefSpec>(b.clone()) {
                if let Ok(b) = backend(&mut cx, "", &spec) {
                    out.push(b);
                }
            }
        }
    }
    out
}
