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

use crate::cluster::{Cluster, Lease, Limits, RequestSlot};
use crate::proxy::{ConnCtx, Target};
use crate::routing::{
    apply_header_ops, connection_pool_for, hash_input, load_balancer_for, outlier_detection_for,
    pick_weighted, redirect_location, rewrite_path, Action, RequestView, Route, StrMatch,
};
use crate::state::{Endpoint, Service};
use crate::upstream::{TunnelInfo, UpstreamError};

/// Response body of every request the waypoint answers.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Overrides the route timeout for this request (ms; 0 = none).
const X_RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
/// Overrides the per-try timeout (ms), when below the request timeout.
const X_PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
/// Tells the upstream how long the waypoint will wait for it (ms).
const X_EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
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
        /// Circuit breakers and connections; its name is the round-robin key.
        cluster: Arc<Cluster>,
        lb: Option<pb::LoadBalancer>,
        outlier: Option<pb::OutlierDetection>,
    },
    Pod(Endpoint, Arc<Cluster>),
    /// The destination names a service or subset that does not exist.
    Unknown,
}

impl Dest {
    fn cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            Dest::Service { cluster, .. } | Dest::Pod(_, cluster) => Some(cluster),
            Dest::Unknown => None,
        }
    }
}

/// What an upstream response holds on to until its body has been sent:
/// the connection (back to the pool afterwards) and the request's share
/// of the cluster's request limit.
struct Held {
    _lease: Lease,
    _slot: RequestSlot,
}

/// What the request ended with, for metrics and the log.
struct Outcome {
    response: Response<Body>,
    flags: &'static str,
    endpoint: Option<Endpoint>,
    held: Option<Held>,
}

impl Outcome {
    fn local(response: Response<Body>, flags: &'static str) -> Self {
        Outcome {
            response,
            flags,
            endpoint: None,
            held: None,
        }
    }
}

/// The request's timeouts after the `x-envoy-*` request headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub global: Option<Duration>,
    pub per_try: Option<Duration>,
}

impl Timeouts {
    /// Envoy's rules: `x-envoy-upstream-rq-timeout-ms` replaces the route
    /// timeout (0 = none); `x-envoy-upstream-rq-per-try-timeout-ms` replaces
    /// the per-try timeout unless it is not below the request timeout.
    /// Values that are not plain milliseconds are ignored. Both headers are
    /// removed: they are for this hop only.
    pub fn from_request(headers: &mut HeaderMap, route: Option<Duration>, per_try_ms: u64) -> Self {
        let ms = |v: Option<HeaderValue>| -> Option<u64> {
            let v = v?;
            let s = v.to_str().ok()?;
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let global = match ms(headers.remove(&X_RQ_TIMEOUT)) {
            Some(0) => None,
            Some(n) => Some(Duration::from_millis(n)),
            None => route,
        };
        let mut per_try = (per_try_ms > 0).then(|| Duration::from_millis(per_try_ms));
        if let Some(n) = ms(headers.remove(&X_PER_TRY_TIMEOUT)).filter(|n| *n > 0) {
            let d = Duration::from_millis(n);
            if global.is_none_or(|g| d < g) {
                per_try = Some(d);
            }
        }
        Timeouts { global, per_try }
    }

    /// The value of `x-envoy-expected-rq-timeout-ms` for the upstream.
    fn expected_ms(&self) -> Option<u64> {
        self.per_try
            .or(self.global)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl ConnCtx {
    fn resolve(&self, d: Option<&pb::Destination>, namespace: &str) -> Dest {
        let in_port = self.target.port();
        let Some(d) = d else {
            return match &self.target {
                Target::Service { svc, port } => {
                    let routes = self.inputs.state.routes_for(&svc.hostname);
                    let r = routes.as_deref();
                    let pool = r.and_then(|r| connection_pool_for(r, "", *port));
                    Dest::Service {
                        svc: svc.clone(),
                        port: *port,
                        selector: None,
                        cluster: self.inputs.clusters.get(
                            &svc.hostname,
                            "",
                            *port,
                            Limits::from_pool(pool.as_ref()),
                        ),
                        lb: r.and_then(|r| load_balancer_for(r, "", *port)),
                        outlier: r.and_then(|r| outlier_detection_for(r, "", *port)),
                    }
                }
                Target::Pod { workload, port } => match workload.ips.first() {
                    Some(ip) => Dest::Pod(
                        Endpoint {
                            workload: workload.clone(),
                            ip: *ip,
                            port: *port,
                        },
                        self.inputs
                            .clusters
                            .pod(std::net::SocketAddr::new(*ip, *port)),
                    ),
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
        let pool = routes
            .as_deref()
            .and_then(|r| connection_pool_for(r, &d.subset, port));
        Dest::Service {
            cluster: self.inputs.clusters.get(
                &svc.hostname,
                &d.subset,
                port,
                Limits::from_pool(pool.as_ref()),
            ),
            lb: routes
                .as_deref()
                .and_then(|r| load_balancer_for(r, &d.subset, port)),
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
                cluster,
                lb,
                outlier,
            } => {
                let mut eps = self.inputs.state.endpoints(svc, *port, selector.as_ref());
                if let Some(o) = outlier {
                    let (kept, ejected) = self.inputs.outliers.filter_counted(eps, o);
                    cluster.stats.ejections_active.set(ejected as i64);
                    eps = kept;
                }
                let hash = hash_input(lb.as_ref(), headers, self.src.ip());
                self.inputs.pick_lb(lb.as_ref(), &cluster.name, &eps, hash)
            }
            Dest::Pod(ep, _) => ep.workload.healthy.then(|| ep.clone()),
            Dest::Unknown => None,
        }
    }
}

/// Approximate wire size of a header block (`name: value\r\n` each).
fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
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
    // Request line and headers as received.
    let mut req_bytes = header_bytes(&parts.headers)
        + (parts.method.as_str().len() + parts.uri.path().len() + 12) as u64;
    prepare_headers(&ctx, &mut parts.headers);
    let request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    let max = ctx.inputs.cfg.max_request_body;
    // gRPC streams both ways: holding the request until its end would
    // deadlock a bidirectional call, so it is sent on as it arrives (and
    // then only tried once, since the body cannot be replayed).
    let outcome = if grpc {
        req_bytes += parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let body = ReqBody::Streaming(std::sync::Mutex::new(Some(body)));
        route_request(&ctx, &mut parts, &authority, body).await
    } else {
        match Limited::new(body, max).collect().await {
            Err(e) => Outcome::local(
                local_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body rejected: {e}"),
                ),
                "-",
            ),
            Ok(collected) => {
                let bytes = collected.to_bytes();
                req_bytes += bytes.len() as u64;
                let body = ReqBody::Buffered(bytes);
                route_request(&ctx, &mut parts, &authority, body).await
            }
        }
    };

    let mut response = outcome.response;
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok());
    // Requests of one connection mostly end alike: their label set (and so
    // their series) is looked up once and reused while it stays the same.
    let handles = ctx.metric_handles(
        grpc,
        outcome.endpoint.as_ref(),
        response.status(),
        outcome.flags,
        grpc_status,
    );
    if !request_id.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().entry(X_REQUEST_ID).or_insert(v);
        }
    }
    let millis = start.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access_log",
        src = %ctx.src,
        src.identity = %ctx.client_id.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
        method = %parts.method,
        path = %parts.uri.path(),
        authority = %authority,
        protocol = if grpc { "grpc" } else { "http" },
        status = response.status().as_u16(),
        flags = outcome.flags,
        upstream = %outcome.endpoint.as_ref().map(|e| format!("{}:{}", e.ip, e.port)).unwrap_or_else(|| "-".into()),
        dst.service = match &ctx.target { Target::Service { svc, .. } => svc.hostname.as_str(), Target::Pod { .. } => "-" },
        dst.workload = outcome.endpoint.as_ref().map_or("-", |e| e.workload.name.as_str()),
        request_id = %request_id,
        duration_ms = millis as u64,
        "request"
    );
    // The sample is taken when the response has been sent, so its size and
    // the full duration are known; the upstream connection goes back to its
    // pool at the same moment.
    let (rparts, rbody) = response.into_parts();
    let finish = Finish {
        resp_bytes: header_bytes(&rparts.headers) + 17,
        handles,
        start,
        req_bytes,
        _held: outcome.held,
    };
    let body = RecordingBody {
        inner: rbody,
        finish: Some(Box::new(finish)),
    };
    Response::from_parts(rparts, body.boxed())
}

/// Everything needed to record a request once its response is complete.
struct Finish {
    handles: crate::metrics::RequestHandles,
    start: Instant,
    req_bytes: u64,
    resp_bytes: u64,
    _held: Option<Held>,
}

/// A response body that counts its bytes and records the request's
/// metrics when it ends (or is dropped unfinished).
struct RecordingBody {
    inner: Body,
    finish: Option<Box<Finish>>,
}

impl RecordingBody {
    fn done(&mut self) {
        if let Some(f) = self.finish.take() {
            let millis = f.start.elapsed().as_secs_f64() * 1000.0;
            f.handles.record(millis, f.req_bytes, f.resp_bytes);
        }
    }
}

impl hyper::body::Body for RecordingBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(f)) = (frame.data_ref(), this.finish.as_mut()) {
                    f.resp_bytes += d.len() as u64;
                }
                // Recorded before the last bytes leave, so whoever sees the
                // end of the response also sees the sample.
                if this.inner.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(_) => this.done(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        self.done();
    }
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(x >> 4)] as char);
        out.push(HEX[usize::from(x & 0x0f)] as char);
    }
    out
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
                return Outcome::local(
                    local_response(StatusCode::NOT_FOUND, "route not found"),
                    "NR",
                )
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
                return Outcome::local(local_response(status, "fault filter abort"), "FI");
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
            return Outcome::local(r, "-");
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
            return Outcome::local(r, "-");
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
    let per_try_ms = route.retries.as_ref().map_or(0, |r| r.per_try_timeout_ms);
    let timeouts = Timeouts::from_request(&mut parts.headers, route.timeout, per_try_ms);

    if let ReqBody::Buffered(bytes) = &body {
        for m in &route.mirrors {
            if roll(m.percent) {
                mirror(ctx, m, &namespace, parts, &authority, bytes.clone());
            }
        }
    }

    let mut outcome = forward(ctx, route, &dest, parts, &authority, body, timeouts).await;
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
    let Some(cluster) = dest.cluster().cloned() else {
        return;
    };
    let shadow = shadow_authority(authority);
    let Ok(req) = build_upstream(parts, &shadow, full(body), None) else {
        return;
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let tunnel = tunnel_info(&ctx);
        match ctx.inputs.connector.send(&cluster, &ep, tunnel, req).await {
            Ok((resp, lease)) => {
                // Drain the body so the upstream sees a complete exchange
                // and the connection can be reused.
                let _ = resp.into_body().collect().await;
                drop(lease);
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

fn tunnel_info(ctx: &ConnCtx) -> TunnelInfo<'_> {
    TunnelInfo {
        src: ctx.src,
        host: match &ctx.target {
            Target::Service { svc, .. } => Some(svc.hostname.as_str()),
            Target::Pod { .. } => None,
        },
    }
}

/// The upstream form of the request: origin-form URI and `host` for
/// HTTP/1.1, absolute URI (`:scheme`/`:authority`) for HTTP/2.
fn build_upstream(
    parts: &http::request::Parts,
    authority: &str,
    body: Body,
    expected_timeout_ms: Option<u64>,
) -> Result<Request<Body>, http::Error> {
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers = parts.headers.clone();
    if let Some(ms) = expected_timeout_ms {
        headers.insert(X_EXPECTED_TIMEOUT, HeaderValue::from(ms));
    }
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
    Response(Box<(Response<Incoming>, Held)>),
    ConnectFailure(UpstreamError),
    Reset(UpstreamError),
    Timeout,
    /// A circuit breaker refused it; never retried, as in Envoy.
    Overflow,
}

/// What outlier detection learns from a try (nothing from an overflow,
/// which never reached the endpoint).
fn try_result(t: &Try) -> Option<crate::policy::TryResult> {
    use crate::policy::TryResult;
    Some(match t {
        Try::Response(x) if matches!(x.0.status().as_u16(), 502..=504) => TryResult::GatewayError,
        Try::Response(x) if x.0.status().is_server_error() => TryResult::ServerError,
        Try::Response(_) => TryResult::Success,
        Try::ConnectFailure(_) | Try::Reset(_) | Try::Timeout => TryResult::GatewayError,
        Try::Overflow => return None,
    })
}

fn retriable(on: &[String], t: &Try) -> bool {
    if matches!(t, Try::Overflow) {
        return false;
    }
    on.iter().any(|c| match (c.as_str(), t) {
        ("5xx", Try::Response(x)) => x.0.status().is_server_error(),
        ("5xx", _) => true,
        ("gateway-error", Try::Response(x)) => matches!(x.0.status().as_u16(), 502..=504),
        ("gateway-error", Try::Timeout) => true,
        ("connect-failure", Try::ConnectFailure(_)) => true,
        ("reset", Try::Reset(_) | Try::ConnectFailure(_) | Try::Timeout) => true,
        ("refused-stream", Try::ConnectFailure(_)) => true,
        ("retriable-4xx", Try::Response(x)) => x.0.status() == StatusCode::CONFLICT,
        (code, Try::Response(x)) => code
            .parse::<u16>()
            .is_ok_and(|c| c == x.0.status().as_u16()),
        _ => false,
    })
}

/// Istio's default when a route sets no retry policy: two retries on
/// connection failures and 503.
fn default_retries() -> &'static pb::RetryPolicy {
    static DEFAULT: std::sync::OnceLock<pb::RetryPolicy> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| pb::RetryPolicy {
        attempts: 2,
        per_try_timeout_ms: 0,
        retry_on: vec![
            "connect-failure".into(),
            "refused-stream".into(),
            "503".into(),
        ],
    })
}

/// One try: a request slot of the cluster, a pooled connection, the
/// exchange up to the response headers.
async fn send_once(
    ctx: &Arc<ConnCtx>,
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    req: Request<Body>,
) -> Result<(Response<Incoming>, Held), UpstreamError> {
    let slot = cluster.try_request()?;
    let (resp, lease) = ctx
        .inputs
        .connector
        .send(cluster, ep, tunnel_info(ctx), req)
        .await?;
    Ok((
        resp,
        Held {
            _lease: lease,
            _slot: slot,
        },
    ))
}

async fn forward(
    ctx: &Arc<ConnCtx>,
    route: &Route,
    dest: &Dest,
    parts: &http::request::Parts,
    authority: &str,
    body: ReqBody,
    timeouts: Timeouts,
) -> Outcome {
    let policy = route.retries.as_ref().unwrap_or_else(|| default_retries());
    let attempts = if matches!(body, ReqBody::Streaming(_)) {
        0
    } else {
        policy.attempts
    };
    let outlier = match dest {
        Dest::Service { outlier, .. } => outlier.as_ref(),
        _ => None,
    };
    let expected = timeouts.expected_ms();
    let tries = async {
        let mut last: Option<Outcome> = None;
        // Held while a retry is outstanding (Envoy's `maxRetries`).
        let mut _retry: Option<crate::cluster::RetrySlot> = None;
        for attempt in 0..=attempts {
            if attempt > 0 {
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            let (Some(ep), Some(cluster)) = (ctx.endpoint(dest, &parts.headers), dest.cluster())
            else {
                // Nothing (left) to send to: report the last failure, or
                // that there never was an endpoint.
                return last.unwrap_or_else(no_healthy_upstream);
            };
            let req = match build_upstream(parts, authority, body.take(), expected) {
                Ok(r) => r,
                Err(e) => {
                    return Outcome::local(
                        local_response(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
                        "-",
                    )
                }
            };
            let _active = ctx.inputs.track(&ep);
            let send = send_once(ctx, cluster, &ep, req);
            let t = match timeouts.per_try {
                Some(d) => match tokio::time::timeout(d, send).await {
                    Ok(r) => classify(r),
                    Err(_) => Try::Timeout,
                },
                None => classify(send.await),
            };
            if let (Some(o), Some(result)) = (outlier, try_result(&t)) {
                if ctx.inputs.outliers.record(&ep, o, result) {
                    cluster.stats.ejections_enforced_total.inc();
                }
            }
            let mut retry = attempt < attempts && retriable(&policy.retry_on, &t);
            if retry {
                _retry = None;
                match cluster.try_retry() {
                    Some(slot) => _retry = Some(slot),
                    None => retry = false,
                }
            }
            if !retry {
                return into_outcome(t, Some(ep), attempt > 0);
            }
            tracing::debug!(attempt, upstream = %ep.ip, "retrying request");
            // The failed response is let go now, so its connection is free
            // for the retry; only its head is kept in case nothing is left
            // to retry on.
            let mut o = into_outcome(t, Some(ep), true);
            o.held = None;
            let (p, _) = o.response.into_parts();
            o.response = Response::from_parts(p, full(Bytes::new()));
            last = Some(o);
        }
        last.unwrap_or_else(no_healthy_upstream)
    };
    match timeouts.global {
        Some(d) => match tokio::time::timeout(d, tries).await {
            Ok(o) => o,
            Err(_) => Outcome::local(
                local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                "UT",
            ),
        },
        None => tries.await,
    }
}

fn no_healthy_upstream() -> Outcome {
    Outcome::local(
        local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        "UH",
    )
}

fn classify(r: Result<(Response<Incoming>, Held), UpstreamError>) -> Try {
    match r {
        Ok(x) => Try::Response(Box::new(x)),
        Err(UpstreamError::Overflow(_)) => Try::Overflow,
        Err(e) if e.is_connect_failure() => Try::ConnectFailure(e),
        Err(e) => Try::Reset(e),
    }
}

fn into_outcome(t: Try, endpoint: Option<Endpoint>, retried: bool) -> Outcome {
    let failed = |status, body: &str, flags| Outcome {
        response: local_response(status, body),
        flags,
        endpoint: endpoint.clone(),
        held: None,
    };
    match t {
        Try::Response(x) => {
            let (r, held) = *x;
            let (parts, body) = r.into_parts();
            let body = body
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .boxed();
            Outcome {
                response: Response::from_parts(parts, body),
                flags: if retried { "URX" } else { "-" },
                endpoint,
                held: Some(held),
            }
        }
        Try::ConnectFailure(e) => {
            tracing::info!(error = %e, "upstream connect failed");
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                "UF",
            )
        }
        Try::Reset(e) => {
            tracing::info!(error = %e, "upstream reset");
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                "UC",
            )
        }
        Try::Timeout => failed(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            "UT",
        ),
        Try::Overflow => Outcome::local(
            local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            "UO",
        ),
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
