//! L7 route selection: the decision the waypoint makes for every request
//! between reading its headers and choosing an upstream.
//!
//! A service's `ServiceRoutes` is compiled once when it arrives (regexes
//! built, ports indexed) so the per-request work is plain comparisons. The
//! first `HttpRoute` with a matching `HttpMatch` wins, as in Istio.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::proto::waypoint as pb;
use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?}: regex {pattern:?}: {source}")]
    Regex {
        route: String,
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("route {route:?}: {reason}")]
    Invalid { route: String, reason: String },
}

/// A compiled string condition.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact { value: String, ignore_case: bool },
    Prefix { value: String, ignore_case: bool },
    Regex(Regex),
}

impl StrMatch {
    fn compile(route: &str, m: &pb::StringMatch) -> Result<Option<Self>, RouteError> {
        use pb::string_match::Match;
        Ok(match &m.r#match {
            None => None,
            Some(Match::Exact(v)) => Some(StrMatch::Exact {
                value: v.clone(),
                ignore_case: m.ignore_case,
            }),
            Some(Match::Prefix(v)) => Some(StrMatch::Prefix {
                value: v.clone(),
                ignore_case: m.ignore_case,
            }),
            Some(Match::Regex(r)) => Some(StrMatch::Regex(regex(route, r, m.ignore_case)?)),
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact { value, ignore_case } => {
                if *ignore_case {
                    v.eq_ignore_ascii_case(value)
                } else {
                    v == value
                }
            }
            StrMatch::Prefix { value, ignore_case } => {
                v.len() >= value.len()
                    && v.is_char_boundary(value.len())
                    && if *ignore_case {
                        v[..value.len()].eq_ignore_ascii_case(value)
                    } else {
                        v.starts_with(value.as_str())
                    }
            }
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// Whole-value match, as Envoy's `safe_regex` does.
fn regex(route: &str, pattern: &str, ignore_case: bool) -> Result<Regex, RouteError> {
    let flags = if ignore_case { "(?i)" } else { "" };
    Regex::new(&format!("{flags}^(?:{pattern})$")).map_err(|source| RouteError::Regex {
        route: route.to_string(),
        pattern: pattern.to_string(),
        source: Box::new(source),
    })
}

#[derive(Debug, Clone)]
pub enum HeaderCond {
    Value(StrMatch),
    Present,
    Absent,
}

#[derive(Debug, Clone)]
pub struct Match {
    pub uri: Option<StrMatch>,
    pub headers: Vec<(HeaderName, HeaderCond)>,
    pub query: Vec<(String, HeaderCond)>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub port: u16,
}

/// The parts of a request routes look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request arrived on.
    pub port: u16,
}

impl Match {
    fn compile(route: &str, m: &pb::HttpMatch) -> Result<Self, RouteError> {
        let headers =
            m.headers
                .iter()
                .map(|h| {
                    let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                        .map_err(|e| RouteError::Invalid {
                            route: route.to_string(),
                            reason: format!("header name {:?}: {e}", h.name),
                        })?;
                    Ok((name, header_cond(route, h)?))
                })
                .collect::<Result<_, RouteError>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), query_cond(route, q)?)))
            .collect::<Result<_, RouteError>>()?;
        let opt = |s: &Option<pb::StringMatch>| -> Result<Option<StrMatch>, RouteError> {
            match s {
                Some(s) => StrMatch::compile(route, s),
                None => Ok(None),
            }
        };
        Ok(Match {
            uri: opt(&m.uri)?,
            headers,
            query,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            port: u16::try_from(m.port).map_err(|_| RouteError::Invalid {
                route: route.to_string(),
                reason: format!("port {} out of range", m.port),
            })?,
        })
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if self.port != 0 && self.port != req.port {
            return false;
        }
        if let Some(m) = &self.uri {
            if !m.matches(req.path) {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(req.method) {
                return false;
            }
        }
        if let Some(m) = &self.authority {
            if !m.matches(req.authority) {
                return false;
            }
        }
        let header_ok = self.headers.iter().all(|(name, cond)| {
            let mut values = req.headers.get_all(name).iter().peekable();
            match cond {
                HeaderCond::Present => values.peek().is_some(),
                HeaderCond::Absent => values.peek().is_none(),
                HeaderCond::Value(m) => values.any(|v| v.to_str().is_ok_and(|v| m.matches(v))),
            }
        });
        if !header_ok {
            return false;
        }
        self.query.iter().all(|(name, cond)| {
            let mut values = query_values(req.query, name).peekable();
            match cond {
                HeaderCond::Present => values.peek().is_some(),
                HeaderCond::Absent => values.peek().is_none(),
                HeaderCond::Value(m) => values.any(|v| m.matches(v)),
            }
        })
    }
}

fn header_cond(route: &str, h: &pb::HeaderMatch) -> Result<HeaderCond, RouteError> {
    use pb::header_match::Match as M;
    let sm = |m| {
        StrMatch::compile(
            route,
            &pb::StringMatch {
                r#match: Some(m),
                ignore_case: h.ignore_case,
            },
        )
    };
    Ok(match &h.r#match {
        None => HeaderCond::Present,
        Some(M::Present(true)) => HeaderCond::Present,
        Some(M::Present(false)) | Some(M::Absent(true)) => HeaderCond::Absent,
        Some(M::Absent(false)) => HeaderCond::Present,
        Some(M::Exact(v)) => sm(pb::string_match::Match::Exact(v.clone()))?
            .map_or(HeaderCond::Present, HeaderCond::Value),
        Some(M::Prefix(v)) => sm(pb::string_match::Match::Prefix(v.clone()))?
            .map_or(HeaderCond::Present, HeaderCond::Value),
        Some(M::Regex(v)) => sm(pb::string_match::Match::Regex(v.clone()))?
            .map_or(HeaderCond::Present, HeaderCond::Value),
    })
}

fn query_cond(route: &str, q: &pb::QueryParamMatch) -> Result<HeaderCond, RouteError> {
    use pb::query_param_match::Match as M;
    let value = |m| {
        StrMatch::compile(
            route,
            &pb::StringMatch {
                r#match: Some(m),
                ignore_case: false,
            },
        )
        .map(|s| s.map_or(HeaderCond::Present, HeaderCond::Value))
    };
    match &q.r#match {
        None | Some(M::Present(true)) => Ok(HeaderCond::Present),
        Some(M::Present(false)) => Ok(HeaderCond::Absent),
        Some(M::Exact(v)) => value(pb::string_match::Match::Exact(v.clone())),
        Some(M::Prefix(v)) => value(pb::string_match::Match::Prefix(v.clone())),
        Some(M::Regex(v)) => value(pb::string_match::Match::Regex(v.clone())),
    }
}

/// Values of `name` in a raw query string (`a=1&b=2&a=3`). A key without
/// `=` has the empty value.
fn query_values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter_map(move |kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
}

/// What a matched route does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Forward to one of these, by weight. Empty: the service itself.
    Route(Vec<pb::Destination>),
    Redirect(pb::Redirect),
    Direct {
        status: u16,
        body: String,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matches: Vec<Match>,
    pub action: Action,
    pub rewrite: Option<pb::Rewrite>,
    pub request_headers: Option<pb::HeaderOperations>,
    pub response_headers: Option<pb::HeaderOperations>,
    pub timeout: Option<Duration>,
    pub retries: Option<pb::RetryPolicy>,
    pub fault: Option<pb::FaultInjection>,
    pub mirrors: Vec<pb::Mirror>,
}

impl Route {
    /// The route an unconfigured service gets: everything to itself.
    pub fn default_route() -> Self {
        Route {
            name: "default".into(),
            matches: Vec::new(),
            action: Action::Route(Vec::new()),
            rewrite: None,
            request_headers: None,
            response_headers: None,
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
        }
    }

    fn compile(r: &pb::HttpRoute) -> Result<Self, RouteError> {
        use pb::http_route::Action as A;
        let matches = r
            .matches
            .iter()
            .map(|m| Match::compile(&r.name, m))
            .collect::<Result<_, _>>()?;
        let action = match &r.action {
            None => Action::Route(Vec::new()),
            Some(A::Route(ra)) => Action::Route(ra.destinations.clone()),
            Some(A::Redirect(rd)) => Action::Redirect(rd.clone()),
            Some(A::DirectResponse(d)) => {
                if !(100..=599).contains(&d.status) {
                    return Err(RouteError::Invalid {
                        route: r.name.clone(),
                        reason: format!("direct response status {}", d.status),
                    });
                }
                Action::Direct {
                    status: d.status as u16,
                    body: d.body.clone(),
                }
            }
        };
        Ok(Route {
            name: r.name.clone(),
            matches,
            action,
            rewrite: r.rewrite.clone(),
            request_headers: r.request_headers.clone(),
            response_headers: r.response_headers.clone(),
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            retries: r.retries.clone(),
            fault: r.fault,
            mirrors: r.mirrors.clone(),
        })
    }

    /// The index of the first of this route's matches that `req` meets
    /// (`Some(None)` for a route without matches), or `None`.
    pub fn select(&self, req: &RequestView<'_>) -> Option<Option<usize>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().position(|m| m.matches(req)).map(Some)
    }
}

/// One service's routes and policy, ready for per-request use.
#[derive(Debug, Clone)]
pub struct CompiledRoutes {
    pub hostname: String,
    pub namespace: String,
    /// Declared protocol per port (upper case).
    pub protocols: HashMap<u16, String>,
    pub http: Vec<Route>,
    pub tcp: Vec<pb::TcpRoute>,
    /// Subset name -> its labels, the endpoint selector callers hand to
    /// `State::endpoints`.
    pub subsets: HashMap<String, BTreeMap<String, String>>,
    /// Members (workload uids) of the subsets the control plane resolved,
    /// by the subset's labels: the selector is all `State::endpoints` is
    /// given. Subsets of one service with equal labels have equal members,
    /// so the key is unambiguous.
    pub resolved_subsets: HashMap<BTreeMap<String, String>, Arc<HashSet<String>>>,
    pub traffic_policy: Option<pb::TrafficPolicy>,
    /// As received, for `/config_dump`.
    pub source: pb::ServiceRoutes,
}

impl CompiledRoutes {
    pub fn compile(src: pb::ServiceRoutes) -> Result<Self, RouteError> {
        if src.hostname.is_empty() {
            return Err(RouteError::Invalid {
                route: String::new(),
                reason: "ServiceRoutes without hostname".into(),
            });
        }
        let http = src
            .http_routes
            .iter()
            .map(Route::compile)
            .collect::<Result<_, _>>()?;
        Ok(CompiledRoutes {
            hostname: src.hostname.clone(),
            namespace: src.namespace.clone(),
            protocols: src
                .ports
                .iter()
                .filter_map(|p| {
                    Some((u16::try_from(p.port).ok()?, p.protocol.to_ascii_uppercase()))
                })
                .collect(),
            http,
            tcp: src.tcp_routes.clone(),
            subsets: src
                .subsets
                .iter()
                .map(|s| (s.name.clone(), s.labels.clone().into_iter().collect()))
                .collect(),
            resolved_subsets: src
                .subsets
                .iter()
                .filter(|s| s.labels_resolved)
                .map(|s| {
                    let members = s.workload_uids.iter().cloned().collect();
                    (s.labels.clone().into_iter().collect(), Arc::new(members))
                })
                .collect(),
            traffic_policy: src.traffic_policy.clone(),
            source: src,
        })
    }

    /// The workload uids of the subset selected by `labels`, when the
    /// control plane resolved it (it knows pod labels; the Workload API
    /// only implies `app` and `version`). None means: match the labels.
    pub fn subset_members(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Option<Arc<HashSet<String>>> {
        self.resolved_subsets.get(labels).cloned()
    }

    /// The first route `req` matches, with the index of the match that
    /// selected it.
    pub fn select(&self, req: &RequestView<'_>) -> Option<(&Route, Option<usize>)> {
        self.http.iter().find_map(|r| r.select(req).map(|m| (r, m)))
    }

    /// TCP destinations for `port`: the first TCP route for the port.
    pub fn tcp_destinations(&self, port: u16) -> Option<&[pb::Destination]> {
        self.tcp
            .iter()
            .find(|t| t.port == 0 || t.port == u32::from(port))
            .map(|t| t.destinations.as_slice())
    }
}

/// One setting of the traffic policy for `subset` on `port`: the subset's
/// policy wins over the service's, and within a policy a port-level
/// setting wins over the policy-wide one.
fn policy_setting<T: Clone>(
    routes: &CompiledRoutes,
    subset: &str,
    port: u16,
    at_port: impl Fn(&pb::PortTrafficPolicy) -> Option<&T>,
    at_policy: impl Fn(&pb::TrafficPolicy) -> Option<&T>,
) -> Option<T> {
    let subset_policy = routes
        .source
        .subsets
        .iter()
        .find(|s| !subset.is_empty() && s.name == subset)
        .and_then(|s| s.traffic_policy.as_ref());
    for policy in [subset_policy, routes.traffic_policy.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(v) = policy
            .port_level_settings
            .iter()
            .find(|p| p.port == u32::from(port))
            .and_then(&at_port)
        {
            return Some(v.clone());
        }
        if let Some(v) = at_policy(policy) {
            return Some(v.clone());
        }
    }
    None
}

/// The load-balancer settings for `subset` on `port`.
pub fn load_balancer_for(
    routes: &CompiledRoutes,
    subset: &str,
    port: u16,
) -> Option<pb::LoadBalancer> {
    policy_setting(
        routes,
        subset,
        port,
        |p| p.load_balancer.as_ref(),
        |p| p.load_balancer.as_ref(),
    )
}

/// The connection-pool (circuit-breaker) settings for `subset` on `port`.
pub fn connection_pool_for(
    routes: &CompiledRoutes,
    subset: &str,
    port: u16,
) -> Option<pb::ConnectionPool> {
    policy_setting(
        routes,
        subset,
        port,
        |p| p.connection_pool.as_ref(),
        |p| p.connection_pool.as_ref(),
    )
}

/// The outlier-detection settings for `subset` on `port`.
pub fn outlier_detection_for(
    routes: &CompiledRoutes,
    subset: &str,
    port: u16,
) -> Option<pb::OutlierDetection> {
    policy_setting(
        routes,
        subset,
        port,
        |p| p.outlier_detection.as_ref(),
        |p| p.outlier_detection.as_ref(),
    )
}

/// The consistent-hash input of a request, when the policy has one.
pub fn hash_input(
    lb: Option<&pb::LoadBalancer>,
    headers: &HeaderMap,
    src: std::net::IpAddr,
) -> Option<u64> {
    use pb::consistent_hash::HashKey;
    use std::hash::{Hash, Hasher};
    let key = lb?.consistent_hash.as_ref()?.hash_key.as_ref()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        HashKey::HttpHeaderName(name) => headers.get(name.as_str())?.as_bytes().hash(&mut h),
        HashKey::HttpCookie(c) => {
            let cookie = headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == c.name).then_some(v)
                })?;
            cookie.hash(&mut h)
        }
        HashKey::UseSourceIp(true) => src.hash(&mut h),
        HashKey::UseSourceIp(false) => return None,
    }
    Some(h.finish())
}

/// Picks one destination by weight; `roll` is uniform in `[0, 1)`.
pub fn pick_weighted(dests: &[pb::Destination], roll: f64) -> Option<&pb::Destination> {
    if dests.is_empty() {
        return None;
    }
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        let i = ((roll * dests.len() as f64) as usize).min(dests.len() - 1);
        return dests.get(i);
    }
    let mut point = (roll * total as f64) as u64;
    for d in dests {
        let w = u64::from(d.weight);
        if point < w {
            return Some(d);
        }
        point -= w;
    }
    dests.iter().rev().find(|d| d.weight > 0)
}

/// The new path (with query) after a rewrite. `matched_prefix` is the
/// `uri.prefix` that selected the route, if that is how it matched.
pub fn rewrite_path(
    rw: &pb::Rewrite,
    path: &str,
    query: Option<&str>,
    matched_prefix: Option<&str>,
) -> Option<String> {
    let new_path = if !rw.full_path.is_empty() {
        rw.full_path.clone()
    } else if !rw.uri_prefix.is_empty() {
        match matched_prefix {
            Some(p) if path.len() >= p.len() => {
                let rest = &path[p.len()..];
                // `/api` -> `/` on `/api/x` must not give `//x`.
                if rw.uri_prefix.ends_with('/') && rest.starts_with('/') {
                    format!("{}{}", rw.uri_prefix, &rest[1..])
                } else {
                    format!("{}{rest}", rw.uri_prefix)
                }
            }
            _ => rw.uri_prefix.clone(),
        }
    } else {
        return None;
    };
    Some(match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    })
}

/// The `location` of a redirect.
pub fn redirect_location(
    rd: &pb::Redirect,
    scheme: &str,
    authority: &str,
    path_and_query: &str,
) -> String {
    let scheme = if rd.scheme.is_empty() {
        scheme
    } else {
        &rd.scheme
    };
    let authority = if rd.authority.is_empty() {
        authority
    } else {
        &rd.authority
    };
    let path = if rd.uri.is_empty() {
        path_and_query
    } else {
        &rd.uri
    };
    format!("{scheme}://{authority}{path}")
}

/// Applies set/add/remove to a header map; invalid names or values are
/// skipped (they were accepted by the control plane, but a bad one must
/// not break the request).
pub fn apply_header_ops(ops: &pb::HeaderOperations, headers: &mut HeaderMap) {
    let pair = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &ops.set {
        if let Some((k, v)) = pair(k, v) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let Some((k, v)) = pair(k, v) {
            headers.append(k, v);
        }
    }
    for k in &ops.remove {
        if let Ok(k) = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()) {
            headers.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::string_match::Match as S;

    fn sm(m: S, ignore_case: bool) -> Option<pb::StringMatch> {
        Some(pb::StringMatch {
            r#match: Some(m),
            ignore_case,
        })
    }

    fn hm(name: &str, m: pb::header_match::Match) -> pb::HeaderMatch {
        pb::HeaderMatch {
            name: name.into(),
            r#match: Some(m),
            ignore_case: false,
        }
    }

    fn view<'a>(
        method: &'a str,
        target: &'a str,
        headers: &'a HeaderMap,
        port: u16,
    ) -> RequestView<'a> {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        RequestView {
            method,
            path,
            query,
            authority: "reviews:9080",
            headers,
            port,
        }
    }

    #[test]
    fn match_table() {
        use pb::header_match::Match as H;
        use pb::query_param_match::Match as Q;
        let mut hdrs = HeaderMap::new();
        hdrs.insert("end-user", "jason".parse().unwrap());
        hdrs.insert("x-env", "Canary-1".parse().unwrap());
        let empty = HeaderMap::new();
        let cases: Vec<(&str, pb::HttpMatch, &str, &str, &HeaderMap, bool)> = vec![
            (
                "empty matches all",
                pb::HttpMatch::default(),
                "GET",
                "/x",
                &empty,
                true,
            ),
            (
                "uri exact",
                pb::HttpMatch {
                    uri: sm(S::Exact("/reviews".into()), false),
                    ..Default::default()
                },
                "GET",
                "/reviews",
                &empty,
                true,
            ),
            (
                "uri exact ignores query",
                pb::HttpMatch {
                    uri: sm(S::Exact("/reviews".into()), false),
                    ..Default::default()
                },
                "GET",
                "/reviews?x=1",
                &empty,
                true,
            ),
            (
                "uri exact differs",
                pb::HttpMatch {
                    uri: sm(S::Exact("/reviews".into()), false),
                    ..Default::default()
                },
                "GET",
                "/reviews/1",
                &empty,
                false,
            ),
            (
                "uri prefix",
                pb::HttpMatch {
                    uri: sm(S::Prefix("/api/".into()), false),
                    ..Default::default()
                },
                "GET",
                "/api/v1",
                &empty,
                true,
            ),
            (
                "uri prefix case",
                pb::HttpMatch {
                    uri: sm(S::Prefix("/API/".into()), false),
                    ..Default::default()
                },
                "GET",
                "/api/v1",
                &empty,
                false,
            ),
            (
                "uri prefix ignore case",
                pb::HttpMatch {
                    uri: sm(S::Prefix("/API/".into()), true),
                    ..Default::default()
                },
                "GET",
                "/api/v1",
                &empty,
                true,
            ),
            (
                "uri regex anchored",
                pb::HttpMatch {
                    uri: sm(S::Regex("/r[0-9]+".into()), false),
                    ..Default::default()
                },
                "GET",
                "/r12/x",
                &empty,
                false,
            ),
            (
                "uri regex",
                pb::HttpMatch {
                    uri: sm(S::Regex("/r[0-9]+/.*".into()), false),
                    ..Default::default()
                },
                "GET",
                "/r12/x",
                &empty,
                true,
            ),
            (
                "header exact",
                pb::HttpMatch {
                    headers: vec![hm("end-user", H::Exact("jason".into()))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                true,
            ),
            (
                "header exact absent",
                pb::HttpMatch {
                    headers: vec![hm("end-user", H::Exact("jason".into()))],
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                false,
            ),
            (
                "header name case-insensitive",
                pb::HttpMatch {
                    headers: vec![hm("End-User", H::Exact("jason".into()))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                true,
            ),
            (
                "header prefix",
                pb::HttpMatch {
                    headers: vec![hm("x-env", H::Prefix("Canary".into()))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                true,
            ),
            (
                "header regex",
                pb::HttpMatch {
                    headers: vec![hm("x-env", H::Regex("canary-\\d".into()))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                false,
            ),
            (
                "header regex ignore case",
                pb::HttpMatch {
                    headers: vec![pb::HeaderMatch {
                        ignore_case: true,
                        ..hm("x-env", H::Regex("canary-\\d".into()))
                    }],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                true,
            ),
            (
                "header present",
                pb::HttpMatch {
                    headers: vec![hm("x-env", H::Present(true))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                true,
            ),
            (
                "header absent",
                pb::HttpMatch {
                    headers: vec![hm("x-env", H::Absent(true))],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                false,
            ),
            (
                "header absent ok",
                pb::HttpMatch {
                    headers: vec![hm("x-env", H::Absent(true))],
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                true,
            ),
            (
                "all headers must hold",
                pb::HttpMatch {
                    headers: vec![
                        hm("end-user", H::Exact("jason".into())),
                        hm("x-env", H::Exact("prod".into())),
                    ],
                    ..Default::default()
                },
                "GET",
                "/",
                &hdrs,
                false,
            ),
            (
                "query exact",
                pb::HttpMatch {
                    query_params: vec![pb::QueryParamMatch {
                        name: "v".into(),
                        r#match: Some(Q::Exact("2".into())),
                    }],
                    ..Default::default()
                },
                "GET",
                "/p?a=1&v=2",
                &empty,
                true,
            ),
            (
                "query exact differs",
                pb::HttpMatch {
                    query_params: vec![pb::QueryParamMatch {
                        name: "v".into(),
                        r#match: Some(Q::Exact("2".into())),
                    }],
                    ..Default::default()
                },
                "GET",
                "/p?v=3",
                &empty,
                false,
            ),
            (
                "query present without value",
                pb::HttpMatch {
                    query_params: vec![pb::QueryParamMatch {
                        name: "debug".into(),
                        r#match: Some(Q::Present(true)),
                    }],
                    ..Default::default()
                },
                "GET",
                "/p?debug",
                &empty,
                true,
            ),
            (
                "query regex",
                pb::HttpMatch {
                    query_params: vec![pb::QueryParamMatch {
                        name: "id".into(),
                        r#match: Some(Q::Regex("[0-9]+".into())),
                    }],
                    ..Default::default()
                },
                "GET",
                "/p?id=12a",
                &empty,
                false,
            ),
            (
                "method",
                pb::HttpMatch {
                    method: sm(S::Exact("POST".into()), false),
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                false,
            ),
            (
                "method ok",
                pb::HttpMatch {
                    method: sm(S::Exact("GET".into()), false),
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                true,
            ),
            (
                "authority prefix",
                pb::HttpMatch {
                    authority: sm(S::Prefix("reviews".into()), false),
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                true,
            ),
            (
                "port mismatch",
                pb::HttpMatch {
                    port: 9090,
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                false,
            ),
            (
                "port match",
                pb::HttpMatch {
                    port: 9080,
                    ..Default::default()
                },
                "GET",
                "/",
                &empty,
                true,
            ),
        ];
        for (name, m, method, target, headers, want) in cases {
            let compiled = Match::compile("r", &m).unwrap();
            let got = compiled.matches(&view(method, target, headers, 9080));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn first_matching_route_wins_and_any_match_selects() {
        let routes = pb::ServiceRoutes {
            hostname: "reviews.default.svc.cluster.local".into(),
            http_routes: vec![
                pb::HttpRoute {
                    name: "jason".into(),
                    matches: vec![
                        pb::HttpMatch {
                            uri: sm(S::Exact("/never".into()), false),
                            ..Default::default()
                        },
                        pb::HttpMatch {
                            headers: vec![hm(
                                "end-user",
                                pb::header_match::Match::Exact("jason".into()),
                            )],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                pb::HttpRoute {
                    name: "all".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let c = CompiledRoutes::compile(routes).unwrap();
        let mut h = HeaderMap::new();
        h.insert("end-user", "jason".parse().unwrap());
        let (r, m) = c.select(&view("GET", "/", &h, 9080)).unwrap();
        assert_eq!((r.name.as_str(), m), ("jason", Some(1)));
        let empty = HeaderMap::new();
        let (r, m) = c.select(&view("GET", "/", &empty, 9080)).unwrap();
        assert_eq!((r.name.as_str(), m), ("all", None));
    }

    #[test]
    fn bad_regex_is_reported_with_the_route() {
        let routes = pb::ServiceRoutes {
            hostname: "h".into(),
            http_routes: vec![pb::HttpRoute {
                name: "broken".into(),
                matches: vec![pb::HttpMatch {
                    uri: sm(S::Regex("(".into()), false),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = CompiledRoutes::compile(routes).unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }

    #[test]
    fn weighted_pick() {
        let d = |host: &str, weight| pb::Destination {
            host: host.into(),
            weight,
            ..Default::default()
        };
        let dests = vec![d("a", 80), d("b", 20)];
        for (roll, want) in [(0.0, "a"), (0.79, "a"), (0.8, "b"), (0.999, "b")] {
            assert_eq!(pick_weighted(&dests, roll).unwrap().host, want, "{roll}");
        }
        let zero = vec![d("a", 0), d("b", 0)];
        assert_eq!(pick_weighted(&zero, 0.6).unwrap().host, "b");
        let one = vec![d("a", 0), d("b", 100)];
        assert_eq!(pick_weighted(&one, 0.0).unwrap().host, "b");
        assert!(pick_weighted(&[], 0.5).is_none());
    }

    #[test]
    fn rewrites_and_redirects() {
        let rw = |prefix: &str, full: &str| pb::Rewrite {
            uri_prefix: prefix.into(),
            full_path: full.into(),
            authority: String::new(),
        };
        for (r, path, q, matched, want) in [
            (rw("/v2/", ""), "/v1/x", None, Some("/v1/"), Some("/v2/x")),
            (
                rw("/", ""),
                "/api/x",
                Some("a=1"),
                Some("/api"),
                Some("/x?a=1"),
            ),
            (rw("/new", ""), "/old", None, None, Some("/new")),
            (rw("", "/fixed"), "/old", Some("q"), None, Some("/fixed?q")),
            (rw("", ""), "/old", None, None, None),
        ] {
            assert_eq!(
                rewrite_path(&r, path, q, matched).as_deref(),
                want,
                "{path}"
            );
        }
        let rd = pb::Redirect {
            uri: "/v1/bookinfo".into(),
            authority: "newnamespace.svc".into(),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&rd, "http", "reviews:9080", "/x"),
            "http://newnamespace.svc/v1/bookinfo"
        );
        let rd = pb::Redirect {
            scheme: "https".into(),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&rd, "http", "reviews:9080", "/x?y"),
            "https://reviews:9080/x?y"
        );
    }

    #[test]
    fn load_balancer_precedence_and_hash_inputs() {
        use pb::load_balancer::Simple;
        let lb = |s: Simple| pb::LoadBalancer {
            simple: s as i32,
            consistent_hash: None,
        };
        let routes = CompiledRoutes::compile(pb::ServiceRoutes {
            hostname: "h".into(),
            traffic_policy: Some(pb::TrafficPolicy {
                load_balancer: Some(lb(Simple::Random)),
                port_level_settings: vec![pb::PortTrafficPolicy {
                    port: 9090,
                    load_balancer: Some(lb(Simple::LeastRequest)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            subsets: vec![pb::Subset {
                name: "v1".into(),
                labels: Default::default(),
                traffic_policy: Some(pb::TrafficPolicy {
                    load_balancer: Some(lb(Simple::RoundRobin)),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let simple = |subset, port| load_balancer_for(&routes, subset, port).map(|l| l.simple());
        assert_eq!(simple("", 9080), Some(Simple::Random));
        assert_eq!(simple("", 9090), Some(Simple::LeastRequest));
        assert_eq!(simple("v1", 9090), Some(Simple::RoundRobin));
        assert_eq!(simple("v2", 9080), Some(Simple::Random));

        let by = |key| pb::LoadBalancer {
            simple: 0,
            consistent_hash: Some(pb::ConsistentHash {
                hash_key: Some(key),
            }),
        };
        use pb::consistent_hash::HashKey;
        let mut h = HeaderMap::new();
        h.insert("x-user", "a".parse().unwrap());
        h.insert("cookie", "x=1; session=abc".parse().unwrap());
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let header = by(HashKey::HttpHeaderName("x-user".into()));
        assert_eq!(
            hash_input(Some(&header), &h, ip),
            hash_input(Some(&header), &h, "10.0.0.2".parse().unwrap())
        );
        assert!(hash_input(Some(&header), &HeaderMap::new(), ip).is_none());
        let cookie = by(HashKey::HttpCookie(pb::HttpCookie {
            name: "session".into(),
            ttl_ms: 0,
        }));
        assert!(hash_input(Some(&cookie), &h, ip).is_some());
        let src = by(HashKey::UseSourceIp(true));
        assert_ne!(
            hash_input(Some(&src), &h, ip),
            hash_input(Some(&src), &h, "10.0.0.2".parse().unwrap())
        );
        assert!(hash_input(None, &h, ip).is_none());
    }

    #[test]
    fn header_operations() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-drop", "1".parse().unwrap());
        let ops = pb::HeaderOperations {
            set: [("X-A".to_string(), "2".to_string())].into(),
            add: [("x-b".to_string(), "3".to_string())].into(),
            remove: vec!["X-Drop".into()],
        };
        apply_header_ops(&ops, &mut h);
        assert_eq!(h["x-a"], "2");
        assert_eq!(h["x-b"], "3");
        assert!(!h.contains_key("x-drop"));
    }
}
