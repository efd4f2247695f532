//! `AuthorizationPolicy` (security.istio.io v1 / v1beta1) in, the L4
//! `istio.security.Authorization` ztunnel enforces out.
//!
//! Sits in the translator, between the sources and the delta xDS push: each
//! policy object is validated and converted once, when it arrives; the
//! translator then only decides where it applies (which workloads list it).
//! The rules follow Istio's documented behaviour for ztunnel
//! (istio.io "Ambient and Istio's authorization policies", "Layer 4
//! authorization policy"):
//!
//! - scope: root namespace without selector → GLOBAL, any other namespace
//!   without selector → NAMESPACE, `selector.matchLabels` → WORKLOAD_SELECTOR;
//!   policies with `targetRef`/`targetRefs` belong to waypoints and are not
//!   sent to ztunnel;
//! - ALLOW/DENY as written, AUDIT becomes a dry-run DENY (logged, never
//!   enforced), CUSTOM is skipped (ztunnel has no external authorizer);
//! - a rule using an L7 attribute can never be evaluated by ztunnel: in an
//!   ALLOW policy the whole rule is dropped (allows less), in a DENY policy
//!   only its L7 parts are dropped (denies more). Either way a warning names
//!   the policy and the fields.

use std::collections::BTreeMap;

use ipnet::IpNet;
use mesh_core::proto::security::{
    string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
use serde::Deserialize;
use serde_json::Value;

use super::{Labels, PolicyObject};

/// Annotation that turns any policy into a dry run.
pub(super) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// A policy that cannot be translated: which object, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {reason}")]
pub struct PolicyError {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: &'static str,
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// Dotted path of the offending field (`spec.rules[0].to[0].operation.ports[1]`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl PolicyError {
    pub(super) fn new(
        kind: &'static str,
        obj: &PolicyObject,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            namespace: obj.namespace.clone(),
            name: obj.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

const KIND: &str = "AuthorizationPolicy";

/// A string list entry that YAML authors sometimes write as a number
/// (`ports: [8080]` next to the API's `ports: ["8080"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Scalar {
    Str(String),
    Num(serde_json::Number),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Str(s) => s.clone(),
            Scalar::Num(n) => n.to_string(),
        }
    }
}

/// `selector` of a security policy: only `matchLabels` exists in the API.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SelectorSpec {
    match_labels: Option<BTreeMap<String, Option<String>>>,
}

impl SelectorSpec {
    /// The labels, or None when they select every workload of the
    /// namespace (an empty selector is the same as none).
    pub(super) fn labels(sel: Option<&SelectorSpec>) -> Option<Labels> {
        let l: Labels = sel?
            .match_labels
            .as_ref()?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
            .collect();
        (!l.is_empty()).then_some(l)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApSpec {
    selector: Option<SelectorSpec>,
    target_ref: Option<Value>,
    target_refs: Option<Vec<Value>>,
    action: Option<String>,
    rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Default, Deserialize)]
struct RuleSpec {
    from: Option<Vec<FromSpec>>,
    to: Option<Vec<ToSpec>>,
    when: Option<Vec<ConditionSpec>>,
}

#[derive(Debug, Default, Deserialize)]
struct FromSpec {
    source: Option<SourceSpec>,
}

type Strings = Option<Vec<Scalar>>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceSpec {
    principals: Strings,
    not_principals: Strings,
    request_principals: Strings,
    not_request_principals: Strings,
    namespaces: Strings,
    not_namespaces: Strings,
    service_accounts: Strings,
    not_service_accounts: Strings,
    ip_blocks: Strings,
    not_ip_blocks: Strings,
    remote_ip_blocks: Strings,
    not_remote_ip_blocks: Strings,
}

#[derive(Debug, Default, Deserialize)]
struct ToSpec {
    operation: Option<OperationSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationSpec {
    hosts: Strings,
    not_hosts: Strings,
    ports: Strings,
    not_ports: Strings,
    methods: Strings,
    not_methods: Strings,
    paths: Strings,
    not_paths: Strings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConditionSpec {
    key: Option<String>,
    values: Strings,
    not_values: Strings,
}

/// A policy ready to serve, with where it applies.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ApInfo {
    /// Workload labels it selects; None for GLOBAL / NAMESPACE scope.
    pub selector: Option<Labels>,
    pub auth: Authorization,
    /// L7 fields dropped, as `<field path>` strings, for the warning.
    pub ignored_l7: Vec<String>,
}

/// What became of a valid policy object.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ApOutcome {
    /// Sent to ztunnel.
    Policy(ApInfo),
    /// Valid but not ztunnel's (waypoint-attached, CUSTOM): why.
    Skipped(String),
}

/// Parses `spec` into `T`, naming the field path of any shape error.
pub(super) fn parse_spec<T: serde::de::DeserializeOwned + Default>(
    kind: &'static str,
    obj: &PolicyObject,
) -> Result<T, PolicyError> {
    if obj.spec.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(&obj.spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        PolicyError::new(kind, obj, field, e.into_inner().to_string())
    })
}

/// Validates and converts one AuthorizationPolicy.
pub(super) fn convert(obj: &PolicyObject, root_namespace: &str) -> Result<ApOutcome, PolicyError> {
    let spec: ApSpec = parse_spec(KIND, obj)?;
    let err = |field: String, reason: String| PolicyError::new(KIND, obj, field, reason);
    let (action, dry_run) = match spec.action.as_deref().unwrap_or("ALLOW") {
        "" | "ALLOW" => (Action::Allow, false),
        "DENY" => (Action::Deny, false),
        // AUDIT only records; as a dry-run DENY ztunnel logs what it would
        // have denied and lets it through.
        "AUDIT" => (Action::Deny, true),
        "CUSTOM" => (Action::Deny, false),
        other => {
            return Err(err(
                "spec.action".into(),
                format!("unknown action {other:?} (ALLOW, DENY, AUDIT or CUSTOM)"),
            ))
        }
    };
    let has_target =
        spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    let selector = SelectorSpec::labels(spec.selector.as_ref());
    if has_target && selector.is_some() {
        return Err(err(
            "spec.selector".into(),
            "only one of selector, targetRef or targetRefs may be set".into(),
        ));
    }
    let deny = action == Action::Deny;
    // Validate every rule before deciding to skip, so a broken policy is
    // reported whatever it is attached to.
    let mut rules = Vec::new();
    let mut ignored_l7 = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        let converted = convert_rule(obj, r, &format!("spec.rules[{i}]"))?;
        if converted.l7.is_empty() {
            rules.push(converted.rule);
        } else {
            // ALLOW: ztunnel cannot see the request, so the rule can never
            // be known to match; dropping it allows less. DENY: ignoring
            // the L7 parts matches a superset; denying more is the safe side.
            if deny {
                rules.push(converted.rule);
            }
            ignored_l7.extend(converted.l7);
        }
    }
    if has_target {
        return Ok(ApOutcome::Skipped(
            "attached with targetRef(s): enforced by a waypoint, not ztunnel".into(),
        ));
    }
    if spec.action.as_deref() == Some("CUSTOM") {
        return Ok(ApOutcome::Skipped(
            "action CUSTOM needs an external authorizer; ztunnel has none".into(),
        ));
    }
    let scope = match (&selector, obj.namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let annotated_dry_run = obj
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    Ok(ApOutcome::Policy(ApInfo {
        selector,
        auth: Authorization {
            name: obj.name.clone(),
            namespace: obj.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: dry_run || annotated_dry_run,
            extensions: Vec::new(),
        },
        ignored_l7,
    }))
}

struct ConvertedRule {
    rule: Rule,
    /// Paths of L7 fields in it (dropped from `rule`).
    l7: Vec<String>,
}

fn convert_rule(obj: &PolicyObject, r: &RuleSpec, at: &str) -> Result<ConvertedRule, PolicyError> {
    let mut clauses = Vec::new();
    let mut l7 = Vec::new();
    if let Some(from) = r.from.as_ref().filter(|f| !f.is_empty()) {
        let mut matches = Vec::new();
        for (j, f) in from.iter().enumerate() {
            let at = format!("{at}.from[{j}].source");
            let empty = SourceSpec::default();
            let s = f.source.as_ref().unwrap_or(&empty);
            for (name, v) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if v.as_ref().is_some_and(|v| !v.is_empty()) {
                    l7.push(format!("{at}.{name}"));
                }
            }
            let mut m = Match {
                principals: strings(&s.principals),
                not_principals: strings(&s.not_principals),
                namespaces: strings(&s.namespaces),
                not_namespaces: strings(&s.not_namespaces),
                service_accounts: service_accounts(
                    obj,
                    &s.service_accounts,
                    &format!("{at}.serviceAccounts"),
                )?,
                not_service_accounts: service_accounts(
                    obj,
                    &s.not_service_accounts,
                    &format!("{at}.notServiceAccounts"),
                )?,
                ..Default::default()
            };
            // ztunnel sees no proxy in front of it: the connection's peer
            // address is both the direct and the "remote" source.
            m.source_ips = addresses(obj, &s.ip_blocks, &format!("{at}.ipBlocks"))?;
            m.source_ips.extend(addresses(
                obj,
                &s.remote_ip_blocks,
                &format!("{at}.remoteIpBlocks"),
            )?);
            m.not_source_ips = addresses(obj, &s.not_ip_blocks, &format!("{at}.notIpBlocks"))?;
            m.not_source_ips.extend(addresses(
                obj,
                &s.not_remote_ip_blocks,
                &format!("{at}.notRemoteIpBlocks"),
            )?);
            matches.push(m);
        }
        clauses.push(Clause { matches });
    }
    if let Some(to) = r.to.as_ref().filter(|t| !t.is_empty()) {
        let mut matches = Vec::new();
        for (j, t) in to.iter().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            let empty = OperationSpec::default();
            let o = t.operation.as_ref().unwrap_or(&empty);
            for (name, v) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if v.as_ref().is_some_and(|v| !v.is_empty()) {
                    l7.push(format!("{at}.{name}"));
                }
            }
            matches.push(Match {
                destination_ports: ports(obj, &o.ports, &format!("{at}.ports"))?,
                not_destination_ports: ports(obj, &o.not_ports, &format!("{at}.notPorts"))?,
                ..Default::default()
            });
        }
        clauses.push(Clause { matches });
    }
    for (k, c) in r.when.iter().flatten().enumerate() {
        let at = format!("{at}.when[{k}]");
        let key = c.key.as_deref().unwrap_or_default();
        let none = |v: &Strings| v.as_ref().is_none_or(|v| v.is_empty());
        if none(&c.values) && none(&c.not_values) {
            return Err(PolicyError::new(
                KIND,
                obj,
                at,
                "at least one of values or notValues must be set",
            ));
        }
        let (vals, not_vals) = (format!("{at}.values"), format!("{at}.notValues"));
        let m = match key {
            "source.ip" | "remote.ip" => Match {
                source_ips: addresses(obj, &c.values, &vals)?,
                not_source_ips: addresses(obj, &c.not_values, &not_vals)?,
                ..Default::default()
            },
            "source.namespace" => Match {
                namespaces: strings(&c.values),
                not_namespaces: strings(&c.not_values),
                ..Default::default()
            },
            "source.principal" => Match {
                principals: strings(&c.values),
                not_principals: strings(&c.not_values),
                ..Default::default()
            },
            "source.serviceAccount" => Match {
                service_accounts: service_accounts(obj, &c.values, &vals)?,
                not_service_accounts: service_accounts(obj, &c.not_values, &not_vals)?,
                ..Default::default()
            },
            "destination.ip" => Match {
                destination_ips: addresses(obj, &c.values, &vals)?,
                not_destination_ips: addresses(obj, &c.not_values, &not_vals)?,
                ..Default::default()
            },
            "destination.port" => Match {
                destination_ports: ports(obj, &c.values, &vals)?,
                not_destination_ports: ports(obj, &c.not_values, &not_vals)?,
                ..Default::default()
            },
            k if is_l7_key(k) => {
                l7.push(format!("{at} ({k})"));
                continue;
            }
            other => {
                return Err(PolicyError::new(
                    KIND,
                    obj,
                    format!("{at}.key"),
                    format!("unknown condition key {other:?}"),
                ))
            }
        };
        clauses.push(Clause { matches: vec![m] });
    }
    Ok(ConvertedRule {
        rule: Rule { clauses },
        l7,
    })
}

/// Condition keys Istio accepts that only an HTTP proxy can evaluate.
fn is_l7_key(k: &str) -> bool {
    k.starts_with("request.headers[")
        || k.starts_with("request.auth.claims[")
        || matches!(
            k,
            "request.auth.principal"
                | "request.auth.audiences"
                | "request.auth.presenter"
                | "connection.sni"
        )
        || k.starts_with("experimental.envoy.filters.")
}

/// Istio's string matching: `*` any non-empty value, `x*` prefix, `*x`
/// suffix, anything else exact.
pub(super) fn string_match(s: &str) -> StringMatch {
    let t = if s == "*" {
        MatchType::Presence(pbjson_types::Empty {})
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.to_string())
    } else if let Some(x) = s.strip_prefix('*') {
        MatchType::Suffix(x.to_string())
    } else {
        MatchType::Exact(s.to_string())
    };
    StringMatch {
        match_type: Some(t),
    }
}

fn strings(v: &Strings) -> Vec<StringMatch> {
    v.iter()
        .flatten()
        .map(|s| string_match(&s.text()))
        .collect()
}

/// `ns/sa`, or a bare `sa` in the policy's own namespace.
fn service_accounts(
    obj: &PolicyObject,
    v: &Strings,
    at: &str,
) -> Result<Vec<ServiceAccountMatch>, PolicyError> {
    let mut out = Vec::new();
    for (i, s) in v.iter().flatten().enumerate() {
        let s = s.text();
        let (ns, sa) = match s.split_once('/') {
            Some((ns, sa)) => (ns.to_string(), sa.to_string()),
            None => (obj.namespace.clone(), s.clone()),
        };
        if ns.is_empty() || sa.is_empty() || sa.contains('/') || s.contains('*') {
            return Err(PolicyError::new(
                KIND,
                obj,
                format!("{at}[{i}]"),
                format!("invalid service account {s:?} (want <namespace>/<name> or <name>)"),
            ));
        }
        out.push(ServiceAccountMatch {
            namespace: ns,
            service_account: sa,
        });
    }
    Ok(out)
}

/// A CIDR or a bare address (a /32 or /128).
pub(super) fn parse_cidr(s: &str) -> Option<Address> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()?.trunc()
    } else {
        IpNet::from(s.parse::<std::net::IpAddr>().ok()?)
    };
    Some(Address {
        address: super::pod::ip_bytes(&net.addr()),
        length: u32::from(net.prefix_len()),
    })
}

fn addresses(obj: &PolicyObject, v: &Strings, at: &str) -> Result<Vec<Address>, PolicyError> {
    let mut out = Vec::new();
    for (i, s) in v.iter().flatten().enumerate() {
        let s = s.text();
        out.push(parse_cidr(s.trim()).ok_or_else(|| {
            PolicyError::new(
                KIND,
                obj,
                format!("{at}[{i}]"),
                format!("invalid CIDR {s:?}"),
            )
        })?);
    }
    Ok(out)
}

/// A port number 1-65535.
pub(super) fn parse_port(s: &str) -> Option<u32> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| (1..=65535).contains(p))
}

fn ports(obj: &PolicyObject, v: &Strings, at: &str) -> Result<Vec<u32>, PolicyError> {
    let mut out = Vec::new();
    for (i, s) in v.iter().flatten().enumerate() {
        let s = s.text();
        out.push(parse_port(&s).ok_or_else(|| {
            PolicyError::new(
                KIND,
                obj,
                format!("{at}[{i}]"),
                format!("invalid port {s:?} (want 1-65535)"),
            )
        })?);
    }
    Ok(out)
}
