//! HTTP plumbing shared by the sample apps: the HTTP/1.1 server loop every
//! app listens with (the originals are HTTP/1.1 servers, which is what the
//! mesh's protocol detection and waypoints see), and the one-shot client the
//! Bookinfo services call each other with, resolving names through the pod's
//! resolver so cluster DNS (`details`, `reviews.default.svc.cluster.local`)
//! applies exactly as for the real images.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::images::PORT_ENV;
use super::SampleError;

/// A request as the apps see it: body already read, plus the connection's
/// addresses (httpbin reports the peer as `origin`).
pub(crate) struct Req {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
}

impl Req {
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn query(&self) -> &str {
        self.uri.query().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(crate) type Resp = Response<Full<Bytes>>;

/// One sample app's request handling.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Req) -> impl Future<Output = Resp> + Send;
}

/// A response with a body and content type.
pub(crate) fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "application/json", body)
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    respond(status, "text/plain; charset=utf-8", body)
}

pub(crate) fn html(body: impl Into<Bytes>) -> Resp {
    respond(StatusCode::OK, "text/html; charset=utf-8", body)
}

pub(crate) fn redirect(location: &str) -> Resp {
    let mut resp = respond(StatusCode::FOUND, "text/html; charset=utf-8", Bytes::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

pub(crate) fn not_found() -> Resp {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// The port to listen on: [`PORT_ENV`] wins (tests, local runs), then what
/// the app's own arguments or environment said, then the image's default.
pub(crate) fn listen_port(from_app: Option<u16>, default: u16) -> u16 {
    env_port(PORT_ENV).or(from_app).unwrap_or(default)
}

/// A port number from an environment variable, ignoring unparsable values
/// (Kubernetes service links set `*_PORT=tcp://...`, never ours).
pub(crate) fn env_port(name: &str) -> Option<u16> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Binds `0.0.0.0:<port>` as the real images do and announces the bound
/// address on stderr (port 0 picks a free one; tests read the line).
pub(crate) async fn bind(port: u16) -> Result<TcpListener, SampleError> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SampleError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(SampleError::Io)?;
    eprintln!("listening on {bound}");
    Ok(listener)
}

/// Serves HTTP/1.1 with keep-alive on `listener` until the process ends.
pub(crate) async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
) -> Result<(), SampleError> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Running out of descriptors must not end the server: the
                // real apps keep serving once connections close.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match body.collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "request body not read");
                            return Ok::<_, Infallible>(text(
                                StatusCode::BAD_REQUEST,
                                "bad request\n",
                            ));
                        }
                    };
                    let req = Req {
                        method: parts.method,
                        uri: parts.uri,
                        version: parts.version,
                        headers: parts.headers,
                        body,
                        peer,
                    };
                    Ok(handler.handle(req).await)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Errors of an outgoing request.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unsupported URL {0:?} (only http://host[:port]/path)")]
    BadUrl(String),
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The parts of an `http://` URL a client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host as written (brackets removed from IPv6 literals).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    pub path_and_query: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path][?query]`; the scheme may be left
    /// out, as fortio and curl allow.
    pub fn parse(url: &str) -> Result<Self, FetchError> {
        let bad = || FetchError::BadUrl(url.to_string());
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad()),
            None => url,
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path_and_query = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 80,
                None => return Err(bad()),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(HttpUrl {
            host,
            port,
            authority: authority.to_string(),
            path_and_query,
        })
    }
}

/// A whole response.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Resolves through the system resolver (the pod's `/etc/resolv.conf`, with
/// its search domains) and returns the first address, as the originals'
/// HTTP libraries do.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<SocketAddr, FetchError> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| FetchError::Resolve {
            host: host.to_string(),
            source,
        })?;
    addrs.next().ok_or_else(|| FetchError::NoAddress {
        host: host.to_string(),
    })
}

/// One request on a fresh connection, the whole exchange (resolve, connect,
/// response and body) bounded by `timeout` like the originals' client
/// timeouts.
pub(crate) async fn fetch(
    method: Method,
    url: &str,
    headers: &HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let url = HttpUrl::parse(url)?;
    tokio::time::timeout(timeout, fetch_inner(method, url, headers, body))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn fetch_inner(
    method: Method,
    url: HttpUrl,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Fetched, FetchError> {
    let addr = resolve(&url.host, url.port).await?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    });
    let mut req = Request::builder()
        .method(method)
        .uri(url.path_and_query.as_str())
        .body(Full::new(body))?;
    *req.headers_mut() = headers.clone();
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(&url.authority) {
            req.headers_mut().insert(HOST, v);
        }
    }
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Fetched {
        status: parts.status,
        body,
    })
}

/// Copies the listed headers (case-insensitive names) from `from` into a new
/// map: the propagation the Bookinfo services do by hand.
pub(crate) fn forward_headers(from: &HeaderMap, names: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            for value in from.get_all(&name) {
                out.append(name.clone(), value.clone());
            }
        }
    }
    out
}

/// Headers the Bookinfo services propagate to their callees (what Istio's
/// sample sources list), for tracing and for routing on `end-user`.
pub(crate) const PROPAGATED: &[&str] = &[
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Query string pairs, percent-decoded (`+` as space).
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Go's and werkzeug's canonical header spelling: `x-b3-traceid` ->
/// `X-B3-Traceid`.
pub(crate) fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = HttpUrl::parse("http://details:9080/details/0").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("details", 9080, "/details/0")
        );
        let u = HttpUrl::parse("httpbin.default.svc.cluster.local/get?a=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("httpbin.default.svc.cluster.local", 80, "/get?a=1")
        );
        let u = HttpUrl::parse("http://[::1]:8000?x").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path_and_query.as_str(),
                u.authority.as_str()
            ),
            ("::1", 8000, "/?x", "[::1]:8000")
        );
        assert!(HttpUrl::parse("https://x/").is_err());
        assert!(HttpUrl::parse("http://:80/").is_err());
        assert!(HttpUrl::parse("http://x:port/").is_err());
    }

    #[test]
    fn query_and_headers() {
        assert_eq!(
            query_pairs("a=1&b=x+y%21&c"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y!".into()),
                ("c".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(canonical_header("x-b3-traceid"), "X-B3-Traceid");
        assert_eq!(canonical_header("user-agent"), "User-Agent");
    }
}
