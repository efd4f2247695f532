//! Per-request L7 processing inside a tunnel: pick the route, apply faults,
//! redirects and rewrites, choose a destination and endpoint, forward over
//! HBONE with timeout and retries, mirror, and record metrics and the
//! access log. Every request is routed on its own, so one HTTP/2
//! connection's requests may land on different endpoints.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mesh_core::hbone::headers;
use mesh_core::proto::waypoint as pb;

use crate::metrics::RequestLabels;
use crate::proxy::{ConnCtx, Target};
use crate::routing::{
    apply_header_ops, connection_pool_for, hash_input, load_balancer_for, max_in_flight,
    outlier_detection_for, pick_weighted, redirect_location, rewrite_path, Action, RequestView,
    Route, StrMatch,
};
use crate::state::{Endpoint, Service};
use crate::upstream::UpstreamError;

/// Response body of every request the waypoint answers.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Pause between tries, as Envoy's default retry back-off base.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Headers that describe one hop and must not be forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
];

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn local_response(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    r
}

fn roll(percent: f64) -> bool {
    percent > 0.0 && rand::random::<f64>() * 100.0 < percent
}

/// Where a request goes after routing: a service (or subset of it) or one
/// pod when the tunnel addressed a pod.
enum Dest {
    Service {
        svc: Arc<Service>,
        port: u16,
        selector: Option<std::collections::BTreeMap<String, String>>,
        /// Round-robin key.
        key: String,
        lb: Option<pb::LoadBalancer>,
        pool: Option<pb::ConnectionPool>,
        outlier: Option<pb::OutlierDetection>,
    },
    Pod(Endpoint),
    /// The destination names a service or subset that does not exist.
    Unknown,
}

/// What the request ended with, for metrics and the log.
struct Outcome {
    response: Response<Body>,
    flags: &'static str,
    endpoint: Option<Endpoint>,
}

impl ConnCtx {
    fn resolve(&self, d: Option<&pb::Destination>, namespace: &str) -> Dest {
        let in_port = self.target.port();
        let Some(d) = d else {
            return match &self.target {
                Target::Service { svc, port } => {
                    let routes = self.inputs.state.routes_for(&svc.hostname);
                    let r = routes.as_deref();
                    Dest::Service {
                        svc: svc.clone(),
                        port: *port,
                        selector: None,
                        key: format!("{}||{port}", svc.hostname),
                        lb: r.and_then(|r| load_balancer_for(r, "", *port)),
                        pool: r.and_then(|r| connection_pool_for(r, "", *port)),
                        outlier: r.and_then(|r| outlier_detection_for(r, "", *port)),
                    }
                }
                Target::Pod { workload, port } => match workload.ips.first() {
                    Some(ip) => Dest::Pod(Endpoint {
                        workload: workload.clone(),
                        ip: *ip,
                        port: *port,
                    }),
                    None => Dest::Unknown,
                },
            };
        };
        let Some((svc, routes)) = self.inputs.state.service_by_host(&d.host, namespace) else {
            return Dest::Unknown;
        };
        let selector = if d.subset.is_empty() {
            None
        } else {
            match routes
                .as_ref()
                .and_then(|r| r.subsets.get(&d.subset).cloned())
            {
                Some(s) => Some(s),
                None => return Dest::Unknown,
            }
        };
        let port = u16::try_from(d.port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(in_port);
        Dest::Service {
            key: format!("{}|{}|{port}", svc.hostname, d.subset),
            lb: routes
                .as_deref()
                .and_then(|r| load_balancer_for(r, &d.subset, port)),
            pool: routes
                .as_deref()
                .and_then(|r| connection_pool_for(r, &d.subset, port)),
            outlier: routes
                .as_deref()
                .and_then(|r| outlier_detection_for(r, &d.subset, port)),
            svc,
            port,
            selector,
        }
    }

    fn endpoint(&self, dest: &Dest, headers: &HeaderMap) -> Option<Endpoint> {
        match dest {
            Dest::Service {
                svc,
                port,
                selector,
                key,
                lb,
                outlier,
                ..
            } => {
                let mut eps = self.inputs.state.endpoints(svc, *port, selector.as_ref());
                if let Some(o) = outlier {
                    eps = self.inputs.outliers.filter(eps, o);
                }
                let hash = hash_input(lb.as_ref(), headers, self.src.ip());
                self.inputs.pick_lb(lb.as_ref(), key, &eps, hash)
            }
            Dest::Pod(ep) => ep.workload.healthy.then(|| ep.clone()),
            Dest::Unknown => None,
        }
    }
}

/// Handles one request; never fails (errors become local responses).
pub async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    prepare_headers(&ctx, &mut parts.headers);
    let request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    let mut labels = RequestLabels::new().with_source(
        ctx.src_workload.as_deref(),
        ctx.client_id.as_ref().map(|i| i.to_string()),
    );
    labels.request_protocol = if grpc { "grpc" } else { "http" }.into();
    if let Target::Service { svc, .. } = &ctx.target {
        labels = labels.with_service(svc);
    }

    let max = ctx.inputs.cfg.max_request_body;
    // gRPC streams both ways: holding the request until its end would
    // deadlock a bidirectional call, so it is sent on as it arrives (and
    // then only tried once, since the body cannot be replayed).
    let outcome = if grpc {
        let body = ReqBody::Streaming(std::sync::Mutex::new(Some(body)));
        route_request(&ctx, &mut parts, &authority, body).await
    } else {
        match Limited::new(body, max).collect().await {
            Err(e) => Outcome {
                response: local_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body rejected: {e}"),
                ),
                flags: "-",
                endpoint: None,
            },
            Ok(collected) => {
                let body = ReqBody::Buffered(collected.to_bytes());
                route_request(&ctx, &mut parts, &authority, body).await
            }
        }
    };

    let mut response = outcome.response;
    if let Some(ep) = &outcome.endpoint {
        labels = labels.with_destination(&ep.workload);
    }
    labels.response_code = response.status().as_u16().to_string();
    labels.response_flags = outcome.flags.into();
    if let Some(s) = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        labels.grpc_response_status = s.to_string();
    }
    if !request_id.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().entry(X_REQUEST_ID).or_insert(v);
        }
    }
    let millis = start.elapsed().as_secs_f64() * 1000.0;
    ctx.inputs.metrics.record(&labels, millis);
    tracing::info!(
        target: "access_log",
        src = %ctx.src,
        src.identity = %labels.source_principal,
        method = %parts.method,
        path = %parts.uri.path(),
        authority = %authority,
        protocol = %labels.request_protocol,
        status = response.status().as_u16(),
        flags = outcome.flags,
        upstream = %outcome.endpoint.as_ref().map(|e| format!("{}:{}", e.ip, e.port)).unwrap_or_else(|| "-".into()),
        dst.service = %labels.destination_service,
        dst.workload = %labels.destination_workload,
        request_id = %request_id,
        duration_ms = millis as u64,
        "request"
    );
    response
}

/// `x-forwarded-for`, `x-request-id`, `traceparent`, hop-by-hop removal.
fn prepare_headers(ctx: &ConnCtx, h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(name);
    }
    let ip = ctx.src.ip().to_string();
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !h.contains_key(&X_REQUEST_ID) {
        if let Ok(v) = HeaderValue::from_str(&new_request_id()) {
            h.insert(X_REQUEST_ID, v);
        }
    }
    let valid_trace = h
        .get(&headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(headers::TraceParent::parse)
        .is_some();
    if !valid_trace {
        h.insert(
            headers::TRACEPARENT,
            headers::TraceParent::new_random(false).to_header_value(),
        );
    }
}

/// A random UUID (version 4) in its text form.
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

async fn route_request(
    ctx: &Arc<ConnCtx>,
    parts: &mut http::request::Parts,
    authority: &str,
    body: ReqBody,
) -> Outcome {
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let (routes, namespace) = match &ctx.target {
        Target::Service { svc, .. } => (
            ctx.inputs.state.routes_for(&svc.hostname),
            svc.namespace.clone(),
        ),
        Target::Pod { workload, .. } => (None, workload.namespace.clone()),
    };
    let view = RequestView {
        method: parts.method.as_str(),
        path: &path,
        query: query.as_deref(),
        authority,
        headers: &parts.headers,
        port: ctx.target.port(),
    };
    let default_route;
    let (route, matched): (&Route, Option<usize>) = match routes.as_ref() {
        Some(r) if !r.http.is_empty() => match r.select(&view) {
            Some(x) => x,
            None => {
                return Outcome {
                    response: local_response(StatusCode::NOT_FOUND, "route not found"),
                    flags: "NR",
                    endpoint: None,
                }
            }
        },
        _ => {
            default_route = Route::default_route();
            (&default_route, None)
        }
    };
    let namespace = match routes.as_ref() {
        Some(r) if !r.namespace.is_empty() => r.namespace.clone(),
        _ => namespace,
    };

    if let Some(fault) = &route.fault {
        if let Some(abort) = &fault.abort {
            if roll(abort.percent) {
                let status = u16::try_from(abort.http_status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Outcome {
                    response: local_response(status, "fault filter abort"),
                    flags: "FI",
                    endpoint: None,
                };
            }
        }
        if let Some(delay) = &fault.delay {
            if roll(delay.percent) {
                tokio::time::sleep(Duration::from_millis(delay.fixed_delay_ms)).await;
            }
        }
    }

    let dests = match &route.action {
        Action::Direct { status, body } => {
            let mut r = local_response(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                body,
            );
            if let Some(ops) = &route.response_headers {
                apply_header_ops(ops, r.headers_mut());
            }
            return Outcome {
                response: r,
                flags: "-",
                endpoint: None,
            };
        }
        Action::Redirect(rd) => {
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            let location = redirect_location(rd, "http", authority, &pq);
            let code = if rd.code == 0 { 301 } else { rd.code as u16 };
            let mut r = local_response(
                StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                "",
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(http::header::LOCATION, v);
            }
            return Outcome {
                response: r,
                flags: "-",
                endpoint: None,
            };
        }
        Action::Route(d) => d,
    };

    // Rewrites and header operations, applied once for every try.
    let mut authority = authority.to_string();
    if let Some(rw) = &route.rewrite {
        let matched_prefix =
            matched
                .and_then(|i| route.matches.get(i))
                .and_then(|m| match &m.uri {
                    Some(StrMatch::Prefix { value, .. }) => Some(value.as_str()),
                    _ => None,
                });
        if let Some(new) = rewrite_path(rw, &path, query.as_deref(), matched_prefix) {
            if let Ok(pq) = new.parse::<http::uri::PathAndQuery>() {
                let mut up = parts.uri.clone().into_parts();
                up.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(up) {
                    parts.uri = u;
                }
            }
        }
        if !rw.authority.is_empty() {
            authority = rw.authority.clone();
        }
    }
    if let Some(ops) = &route.request_headers {
        apply_header_ops(ops, &mut parts.headers);
    }

    let chosen = pick_weighted(dests, rand::random::<f64>());
    let dest = ctx.resolve(chosen, &namespace);

    if let ReqBody::Buffered(bytes) = &body {
        for m in &route.mirrors {
            if roll(m.percent) {
                mirror(ctx, m, &namespace, parts, &authority, bytes.clone());
            }
        }
    }

    let mut outcome = forward(ctx, route, &dest, parts, &authority, body).await;
    if let Some(ops) = &route.response_headers {
        apply_header_ops(ops, outcome.response.headers_mut());
    }
    outcome
}

/// Sends a copy of the request to the mirror destination and forgets it.
fn mirror(
    ctx: &Arc<ConnCtx>,
    m: &pb::Mirror,
    namespace: &str,
    parts: &http::request::Parts,
    authority: &str,
    body: Bytes,
) {
    let d = pb::Destination {
        host: m.host.clone(),
        subset: m.subset.clone(),
        port: m.port,
        weight: 0,
    };
    let dest = ctx.resolve(Some(&d), namespace);
    let Some(ep) = ctx.endpoint(&dest, &parts.headers) else {
        tracing::debug!(host = %m.host, "mirror: no healthy upstream");
        return;
    };
    let shadow = shadow_authority(authority);
    let Ok(req) = build_upstream(parts, &shadow, full(body)) else {
        return;
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let tunnel = tunnel_headers(&ctx);
        match ctx.inputs.connector.send(&ep, tunnel, req).await {
            Ok(resp) => {
                // Drain the body so the upstream sees a complete exchange.
                let _ = resp.into_body().collect().await;
            }
            Err(e) => tracing::debug!(error = %e, "mirror request failed"),
        }
    });
}

/// `reviews:9080` -> `reviews-shadow:9080`, as Envoy names mirrored traffic.
pub fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

fn tunnel_headers(ctx: &ConnCtx) -> HeaderMap {
    let mut h = HeaderMap::new();
    let host = match &ctx.target {
        Target::Service { svc, .. } => Some(svc.hostname.as_str()),
        Target::Pod { .. } => None,
    };
    if let Ok(v) = headers::forwarded(ctx.src, host) {
        h.insert(http::header::FORWARDED, v);
    }
    h
}

/// The upstream form of the request: origin-form URI and `host` for
/// HTTP/1.1, absolute URI (`:scheme`/`:authority`) for HTTP/2.
fn build_upstream(
    parts: &http::request::Parts,
    authority: &str,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers = parts.headers.clone();
    let uri = if parts.version == Version::HTTP_2 {
        headers.remove(HOST);
        Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(pq)
            .build()?
    } else {
        if let Ok(v) = HeaderValue::from_str(authority) {
            headers.insert(HOST, v);
        }
        Uri::builder().path_and_query(pq).build()?
    };
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if parts.version == Version::HTTP_2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(body)?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// A request body: read whole (replayable for retries and mirrors) or
/// passed on as it streams in (one try only).
enum ReqBody {
    Buffered(Bytes),
    Streaming(std::sync::Mutex<Option<Incoming>>),
}

impl ReqBody {
    /// The body for the next try.
    fn take(&self) -> Body {
        match self {
            ReqBody::Buffered(b) => full(b.clone()),
            ReqBody::Streaming(slot) => match slot.lock().unwrap_or_else(|p| p.into_inner()).take()
            {
                Some(b) => b
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed(),
                None => full(Bytes::new()),
            },
        }
    }
}

/// How one try ended, for the retry decision.
enum Try {
    Response(Response<Incoming>),
    ConnectFailure(UpstreamError),
    Reset(UpstreamError),
    Timeout,
}

fn try_result(t: &Try) -> crate::policy::TryResult {
    use crate::policy::TryResult;
    match t {
        Try::Response(r) if matches!(r.status().as_u16(), 502..=504) => TryResult::GatewayError,
        Try::Response(r) if r.status().is_server_error() => TryResult::ServerError,
        Try::Response(_) => TryResult::Success,
        Try::ConnectFailure(_) | Try::Reset(_) | Try::Timeout => TryResult::GatewayError,
    }
}

fn retriable(on: &[String], t: &Try) -> bool {
    on.iter().any(|c| match (c.as_str(), t) {
        ("5xx", Try::Response(r)) => r.status().is_server_error(),
        ("5xx", _) => true,
        ("gateway-error", Try::Response(r)) => matches!(r.status().as_u16(), 502..=504),
        ("gateway-error", Try::Timeout) => true,
        ("connect-failure", Try::ConnectFailure(_)) => true,
        ("reset", Try::Reset(_) | Try::ConnectFailure(_) | Try::Timeout) => true,
        ("refused-stream", Try::ConnectFailure(_)) => true,
        ("retriable-4xx", Try::Response(r)) => r.status() == StatusCode::CONFLICT,
        (code, Try::Response(r)) => code.parse::<u16>().is_ok_and(|c| c == r.status().as_u16()),
        _ => false,
    })
}

/// Istio's default when a route sets no retry policy: two retries on
/// connection failures and 503.
fn default_retries() -> pb::RetryPolicy {
    pb::RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: 0,
        retry_on: vec![
            "connect-failure".into(),
            "refused-stream".into(),
            "503".into(),
        ],
    }
}

async fn forward(
    ctx: &Arc<ConnCtx>,
    route: &Route,
    dest: &Dest,
    parts: &http::request::Parts,
    authority: &str,
    body: ReqBody,
) -> Outcome {
    let mut policy = route.retries.clone().unwrap_or_else(default_retries);
    if matches!(body, ReqBody::Streaming(_)) {
        policy.attempts = 0;
    }
    let (pool, outlier) = match dest {
        Dest::Service {
            pool, outlier, key, ..
        } => (pool.as_ref().map(|p| (p, key)), outlier.as_ref()),
        _ => (None, None),
    };
    let _slot = match pool.and_then(|(p, key)| {
        max_in_flight(p, parts.version == Version::HTTP_2).map(|max| (key, max))
    }) {
        Some((key, max)) => match ctx.inputs.limits.try_acquire(key, max) {
            Some(slot) => Some(slot),
            None => {
                return Outcome {
                    response: local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                    ),
                    flags: "UO",
                    endpoint: None,
                }
            }
        },
        None => None,
    };
    let per_try =
        (policy.per_try_timeout_ms > 0).then(|| Duration::from_millis(policy.per_try_timeout_ms));
    let tries = async {
        let mut last: Option<(Try, Option<Endpoint>)> = None;
        for attempt in 0..=policy.attempts {
            if attempt > 0 {
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            let Some(ep) = ctx.endpoint(dest, &parts.headers) else {
                // Nothing (left) to send to: report the last failure, or
                // that there never was an endpoint.
                return match last {
                    Some((t, ep)) => into_outcome(t, ep, true),
                    None => no_healthy_upstream(),
                };
            };
            let req = match build_upstream(parts, authority, body.take()) {
                Ok(r) => r,
                Err(e) => {
                    return Outcome {
                        response: local_response(
                            StatusCode::BAD_REQUEST,
                            &format!("bad request: {e}"),
                        ),
                        flags: "-",
                        endpoint: None,
                    }
                }
            };
            let _active = ctx.inputs.track(&ep);
            let send = ctx.inputs.connector.send(&ep, tunnel_headers(ctx), req);
            let t = match per_try {
                Some(d) => match tokio::time::timeout(d, send).await {
                    Ok(r) => classify(r),
                    Err(_) => Try::Timeout,
                },
                None => classify(send.await),
            };
            if let Some(o) = outlier {
                ctx.inputs.outliers.record(&ep, o, try_result(&t));
            }
            let retry = attempt < policy.attempts && retriable(&policy.retry_on, &t);
            if !retry {
                return into_outcome(t, Some(ep), attempt > 0);
            }
            tracing::debug!(attempt, upstream = %ep.ip, "retrying request");
            last = Some((t, Some(ep)));
        }
        match last {
            Some((t, ep)) => into_outcome(t, ep, true),
            None => no_healthy_upstream(),
        }
    };
    match route.timeout {
        Some(d) => match tokio::time::timeout(d, tries).await {
            Ok(o) => o,
            Err(_) => Outcome {
                response: local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                flags: "UT",
                endpoint: None,
            },
        },
        None => tries.await,
    }
}

fn no_healthy_upstream() -> Outcome {
    Outcome {
        response: local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        flags: "UH",
        endpoint: None,
    }
}

fn classify(r: Result<Response<Incoming>, UpstreamError>) -> Try {
    match r {
        Ok(resp) => Try::Response(resp),
        Err(e) if e.is_connect_failure() => Try::ConnectFailure(e),
        Err(e) => Try::Reset(e),
    }
}

fn into_outcome(t: Try, endpoint: Option<Endpoint>, retried: bool) -> Outcome {
    match t {
        Try::Response(r) => {
            let (parts, body) = r.into_parts();
            let body = body
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .boxed();
            Outcome {
                response: Response::from_parts(parts, body),
                flags: if retried { "URX" } else { "-" },
                endpoint,
            }
        }
        Try::ConnectFailure(e) => {
            tracing::info!(error = %e, "upstream connect failed");
            Outcome {
                response: local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                ),
                flags: "UF",
                endpoint,
            }
        }
        Try::Reset(e) => {
            tracing::info!(error = %e, "upstream reset");
            Outcome {
                response: local_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                ),
                flags: "UC",
                endpoint,
            }
        }
        Try::Timeout => Outcome {
            response: local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            flags: "UT",
            endpoint,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_names() {
        assert_eq!(shadow_authority("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_authority("reviews"), "reviews-shadow");
        assert_eq!(shadow_authority("10.0.0.1:80"), "10.0.0.1-shadow:80");
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_request_id());
    }
}
