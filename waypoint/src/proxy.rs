//! Inbound side of the waypoint: HBONE on 15008 with the waypoint's own
//! identity. Each `CONNECT` names a service VIP (or a pod IP) and port; the
//! tunnel's bytes are classified once (HTTP/1.1, HTTP/2 preface, or other)
//! and then served as HTTP by [`crate::http`] or passed through as TCP to a
//! chosen endpoint over another HBONE tunnel.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::drain;
use mesh_core::hbone::headers;
use mesh_core::hbone::{ConnectRequest, H2Stream, Responder, ServerConfig};
use mesh_core::identity::Identity;
use mesh_core::tls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::metrics::{Metrics, RequestHandles, RequestLabels};
use crate::routing::pick_weighted;
use crate::state::{Endpoint, Service, State, Workload};
use crate::upstream::Connector;
use mesh_core::proto::waypoint::load_balancer::Simple;
use mesh_core::proto::waypoint::LoadBalancer;

/// How long a tunnel of undeclared protocol may stay silent before it is
/// treated as TCP (server-first protocols never speak first).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("waypoint certificate: {0}")]
    Certificate(#[from] mesh_core::certs::CertError),
    #[error("TLS: {0}")]
    Tls(#[from] mesh_core::tls::TlsError),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("HBONE: {0}")]
    Hbone(#[from] mesh_core::hbone::HboneError),
}

/// Everything the data path reads.
pub struct Inputs {
    pub cfg: Arc<Config>,
    pub state: State,
    pub connector: Connector,
    pub metrics: Metrics,
    pub hbone_server: ServerConfig,
    rr: Mutex<HashMap<String, usize>>,
    /// Requests in flight per endpoint address, for LEAST_REQUEST.
    active: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    /// Upstream clusters: circuit breakers, connection pools, counters.
    pub clusters: Arc<crate::cluster::Clusters>,
    /// Outlier detection per endpoint.
    pub outliers: crate::policy::Outliers,
}

/// Counts one request in flight to an endpoint while held.
pub struct ActiveGuard {
    map: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    addr: SocketAddr,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

impl Inputs {
    pub fn new(cfg: Arc<Config>, state: State, connector: Connector, metrics: Metrics) -> Self {
        Inputs {
            cfg,
            state,
            connector,
            hbone_server: ServerConfig::default(),
            rr: Mutex::new(HashMap::new()),
            active: Arc::new(Mutex::new(HashMap::new())),
            clusters: Arc::new(crate::cluster::Clusters::new(metrics.clone())),
            metrics,
            outliers: Default::default(),
        }
    }

    /// Marks a request in flight to `ep` until the guard is dropped.
    pub fn track(&self, ep: &Endpoint) -> ActiveGuard {
        let addr = SocketAddr::new(ep.ip, ep.port);
        *self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_insert(0) += 1;
        ActiveGuard {
            map: self.active.clone(),
            addr,
        }
    }

    /// Chooses among `eps` as the destination's load-balancer settings
    /// say. `hash` is the consistent-hash input when one is configured
    /// (the same input picks the same endpoint while the set is stable).
    pub fn pick_lb(
        &self,
        lb: Option<&LoadBalancer>,
        key: &str,
        eps: &[Endpoint],
        hash: Option<u64>,
    ) -> Option<Endpoint> {
        if eps.is_empty() {
            return None;
        }
        if let (Some(h), Some(lb)) = (hash, lb) {
            if lb.consistent_hash.is_some() {
                return eps.get((h % eps.len() as u64) as usize).cloned();
            }
        }
        match lb.map(|l| l.simple()) {
            Some(Simple::Random) => eps.get(rand::random_range(0..eps.len())).cloned(),
            Some(Simple::LeastRequest) => {
                // Power of two choices: the less loaded of two random picks.
                let a = &eps[rand::random_range(0..eps.len())];
                let b = &eps[rand::random_range(0..eps.len())];
                let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                let load = |e: &Endpoint| {
                    active
                        .get(&SocketAddr::new(e.ip, e.port))
                        .copied()
                        .unwrap_or(0)
                };
                Some(if load(b) < load(a) { b } else { a }.clone())
            }
            _ => self.pick(key, eps),
        }
    }

    /// Round robin over `eps`, one counter per `key` (service, subset, port).
    pub fn pick(&self, key: &str, eps: &[Endpoint]) -> Option<Endpoint> {
        if eps.is_empty() {
            return None;
        }
        let mut rr = self.rr.lock().unwrap_or_else(|p| p.into_inner());
        // Only a key seen for the first time is copied.
        let n = match rr.get_mut(key) {
            Some(n) => n,
            None => rr.entry(key.to_string()).or_insert(0),
        };
        let ep = eps[*n % eps.len()].clone();
        *n = n.wrapping_add(1);
        Some(ep)
    }
}

/// What a tunnel is addressed to.
#[derive(Debug, Clone)]
pub enum Target {
    Service { svc: Arc<Service>, port: u16 },
    Pod { workload: Arc<Workload>, port: u16 },
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } | Target::Pod { port, .. } => *port,
        }
    }
}

/// One tunnel's context, shared by the requests carried in it.
pub struct ConnCtx {
    pub inputs: Arc<Inputs>,
    pub target: Target,
    /// The original client (from `forwarded`), else the HBONE peer.
    pub src: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub client_id: Option<Identity>,
    /// The series of the last request's label set (see
    /// [`ConnCtx::metric_handles`]).
    last_series: Mutex<Option<(SeriesKey, RequestHandles)>>,
}

/// What, besides the connection, decides a request's metric labels.
struct SeriesKey {
    grpc: bool,
    /// The destination workload, compared by identity of the shared state
    /// entry (held, so its address cannot be reused by another).
    dest: Option<Arc<Workload>>,
    status: u16,
    flags: &'static str,
    grpc_status: Option<String>,
}

impl ConnCtx {
    pub fn new(
        inputs: Arc<Inputs>,
        target: Target,
        src: SocketAddr,
        src_workload: Option<Arc<Workload>>,
        client_id: Option<Identity>,
    ) -> Self {
        ConnCtx {
            inputs,
            target,
            src,
            src_workload,
            client_id,
            last_series: Mutex::new(None),
        }
    }

    /// The Istio request series for a request that ended this way, built
    /// (label strings, family lookups) only when it differs from the
    /// previous request of this connection.
    pub fn metric_handles(
        &self,
        grpc: bool,
        dest: Option<&Endpoint>,
        status: StatusCode,
        flags: &'static str,
        grpc_status: Option<&str>,
    ) -> RequestHandles {
        let key = SeriesKey {
            grpc,
            dest: dest.map(|e| e.workload.clone()),
            status: status.as_u16(),
            flags,
            grpc_status: grpc_status.map(str::to_string),
        };
        let mut last = self.last_series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, h)) = last.as_ref() {
            let same_dest = match (&k.dest, &key.dest) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same_dest
                && k.grpc == key.grpc
                && k.status == key.status
                && k.flags == key.flags
                && k.grpc_status == key.grpc_status
            {
                return h.clone();
            }
        }
        let mut labels = RequestLabels::new().with_source(
            self.src_workload.as_deref(),
            self.client_id.as_ref().map(|i| i.to_string()),
        );
        labels.request_protocol = if grpc { "grpc" } else { "http" }.into();
        if let Target::Service { svc, .. } = &self.target {
            labels = labels.with_service(svc);
        }
        if let Some(ep) = dest {
            labels = labels.with_destination(&ep.workload);
        }
        labels.response_code = key.status.to_string();
        labels.response_flags = flags.into();
        if let Some(s) = &key.grpc_status {
            labels.grpc_response_status = s.clone();
        }
        let h = self.inputs.metrics.handles(&labels);
        *last = Some((key, h.clone()));
        h
    }
}

/// Accepts HBONE connections until the drain starts.
pub async fn serve_hbone(listener: TcpListener, inputs: Arc<Inputs>, drain: drain::Watch) {
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.signaled() => return,
        };
        let inputs = inputs.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(inputs, tcp, peer, drain).await {
                tracing::debug!(%peer, error = %e, "HBONE connection ended with error");
            }
        });
    }
}

async fn serve_conn(
    inputs: Arc<Inputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: drain::Watch,
) -> Result<(), ProxyError> {
    let _ = tcp.set_nodelay(true);
    let cert = inputs
        .connector
        .certs
        .get(&inputs.connector.identity)
        .await?;
    let cfg = tls::server_config(&cert)?;
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await?;
    let client_id = tls::peer_identity(tls.get_ref().1);
    let handler = {
        let inputs = inputs.clone();
        let drain = drain.clone();
        move |req: ConnectRequest, responder: Responder| {
            let inputs = inputs.clone();
            let client_id = client_id.clone();
            let drain = drain.clone();
            async move {
                handle_connect(inputs, req, responder, peer, client_id).await;
                drop(drain);
            }
        }
    };
    let hbone_server = inputs.hbone_server.clone();
    mesh_core::hbone::serve_connection(tls, &hbone_server, handler, drain.signaled()).await?;
    Ok(())
}

async fn handle_connect(
    inputs: Arc<Inputs>,
    req: ConnectRequest,
    responder: Responder,
    peer: SocketAddr,
    client_id: Option<Identity>,
) {
    let Some(addr) = req.authority.socket_addr() else {
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    };
    let target = if let Some(svc) = inputs.state.service_by_vip(addr.ip()) {
        Target::Service {
            svc,
            port: addr.port(),
        }
    } else if let Some(workload) = inputs.state.workload_by_ip(addr.ip()) {
        Target::Pod {
            workload,
            port: addr.port(),
        }
    } else {
        tracing::info!(authority = %addr, "CONNECT for an address the waypoint does not know");
        responder.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let src = headers::forwarded_for(&req.headers).unwrap_or(peer);
    let src_workload = inputs.state.workload_by_ip(src.ip());
    let declared = match &target {
        Target::Service { svc, port } => inputs
            .state
            .routes_for(&svc.hostname)
            .and_then(|r| r.protocols.get(port).cloned()),
        Target::Pod { .. } => None,
    };
    let mut stream = match responder.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "accepting the tunnel failed");
            return;
        }
    };
    let ctx = Arc::new(ConnCtx::new(inputs, target, src, src_workload, client_id));
    let (prefix, is_http) = match declared.as_deref().map(classify_declared) {
        Some(Some(http)) => (Bytes::new(), http),
        _ => match sniff(&mut stream).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel closed before its protocol was known");
                return;
            }
        },
    };
    let io = Rewind {
        prefix,
        inner: stream,
    };
    if is_http {
        serve_http(ctx, io).await;
    } else {
        passthrough(ctx, io).await;
    }
}

/// `Some(true)` for HTTP protocols, `Some(false)` for opaque ones, `None`
/// to detect.
fn classify_declared(protocol: &str) -> Option<bool> {
    match protocol {
        "HTTP" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-WEB" => Some(true),
        "TCP" | "TLS" | "HTTPS" | "MONGO" | "MYSQL" | "REDIS" => Some(false),
        _ => None,
    }
}

/// What the first bytes say: `Some(true)` HTTP, `Some(false)` not, `None`
/// too few bytes yet.
pub fn classify_prefix(buf: &[u8]) -> Option<bool> {
    if buf.len() >= H2_PREFACE.len() {
        if buf.starts_with(H2_PREFACE) {
            return Some(true);
        }
    } else if H2_PREFACE.starts_with(buf) {
        return None;
    }
    const METHODS: [&[u8]; 9] = [
        b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
    ];
    match buf.iter().position(|b| *b == b' ') {
        Some(i) => Some(METHODS.contains(&&buf[..i])),
        None if buf.len() >= 8 => Some(false),
        None => {
            if METHODS.iter().any(|m| m.starts_with(buf)) {
                None
            } else {
                Some(false)
            }
        }
    }
}

async fn sniff(stream: &mut H2Stream) -> io::Result<(Bytes, bool)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        if let Some(http) = classify_prefix(&buf) {
            return Ok((buf.freeze(), http));
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => return Ok((buf.freeze(), false)),
            Ok(Ok(0)) => {
                if buf.is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                return Ok((buf.freeze(), false));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn serve_http(ctx: Arc<ConnCtx>, io: Rewind<H2Stream>) {
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::http::handle(ctx, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "HTTP connection in tunnel ended with error");
    }
}

/// Opaque bytes: pick an endpoint (TCP routes first, else the addressed
/// service or pod) and copy both ways.
async fn passthrough(ctx: Arc<ConnCtx>, mut io: Rewind<H2Stream>) {
    let inputs = &ctx.inputs;
    let port = ctx.target.port();
    let ep = match &ctx.target {
        Target::Pod { workload, port } => workload.ips.first().map(|ip| Endpoint {
            workload: workload.clone(),
            ip: *ip,
            port: *port,
        }),
        Target::Service { svc, port } => {
            let routes = inputs.state.routes_for(&svc.hostname);
            let dest = routes
                .as_ref()
                .and_then(|r| r.tcp_destinations(*port))
                .and_then(|d| pick_weighted(d, rand::random::<f64>()).cloned());
            let (svc, dport, selector) = match &dest {
                Some(d) => {
                    let ns = routes.as_ref().map(|r| r.namespace.as_str()).unwrap_or("");
                    match inputs.state.service_by_host(&d.host, ns) {
                        Some((s, r)) => {
                            let sel = r.and_then(|r| r.subsets.get(&d.subset).cloned());
                            let p = if d.port == 0 { *port } else { d.port as u16 };
                            (s, p, sel)
                        }
                        None => (svc.clone(), *port, None),
                    }
                }
                None => (svc.clone(), *port, None),
            };
            let eps = inputs.state.endpoints(&svc, dport, selector.as_ref());
            inputs.pick(
                &crate::cluster::cluster_name(&svc.hostname, "tcp", dport),
                &eps,
            )
        }
    };
    let Some(ep) = ep else {
        tracing::info!(port, "TCP passthrough: no healthy upstream");
        return;
    };
    let mut hdrs = http::HeaderMap::new();
    if let Ok(v) = headers::forwarded(ctx.src, None) {
        hdrs.insert(http::header::FORWARDED, v);
    }
    match inputs.connector.tunnel(&ep, hdrs).await {
        Ok(mut tunnel) => match mesh_core::copy::copy_bidirectional(&mut io, &mut tunnel).await {
            Ok((sent, recv)) => tracing::info!(
                src = %ctx.src,
                upstream = %SocketAddr::new(ep.ip, ep.port),
                bytes_sent = sent,
                bytes_recv = recv,
                "TCP passthrough complete"
            ),
            Err(e) => tracing::debug!(error = %e, "TCP passthrough ended with error"),
        },
        Err(e) => tracing::info!(error = %e, "TCP passthrough: upstream connect failed"),
    }
}

/// A stream whose first bytes were already read: they are replayed before
/// the rest.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_detection() {
        for (bytes, want) in [
            (&b""[..], None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(true)),
            (b"PRI * HTT", None),
            (b"GET / HTTP/1.1\r\n", Some(true)),
            (b"POST /x", Some(true)),
            (b"GE", None),
            (b"\x16\x03\x01\x02\x00", Some(false)),
            (b"SSH-2.0-OpenSSH", Some(false)),
            (b"FOO / HTTP/1.1", Some(false)),
        ] {
            assert_eq!(
                classify_prefix(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
