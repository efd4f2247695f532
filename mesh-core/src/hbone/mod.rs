//! HBONE: TCP carried inside HTTP/2 `CONNECT` streams.
//!
//! This is the hop between two nodes. The outbound side of a ztunnel (or a
//! waypoint) takes a captured TCP connection, asks the [`client::Pool`] for a
//! `CONNECT` stream to the destination's HBONE port (15008), and pumps bytes
//! between the two with [`crate::copy`]. The inbound side runs
//! [`server::serve_connection`] on every accepted connection and hands each
//! `CONNECT` to a handler that dials the destination pod.
//!
//! The module is transport-agnostic: both sides work over any
//! `AsyncRead + AsyncWrite` byte stream. Mutual TLS is wrapped around that
//! stream by the caller, which also knows the peer's identity.

pub mod client;
pub mod headers;
pub mod server;
pub mod stream;

use std::fmt;
use std::future::{pending, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

pub use client::{KeyStats, Pool, PoolConfig};
pub use server::{serve_connection, Responder, ServerConfig};
pub use stream::H2Stream;

/// The port HBONE servers listen on.
pub const HBONE_PORT: u16 = 15008;
/// HTTP/2 receive window of each stream.
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 receive window of the whole connection.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame payload we accept.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// How much unsent data one stream may queue inside h2 (bytes already in
/// the socket do not count, so this does not cap the bytes in flight).
/// Measured on loopback: 1 MiB and 4 MiB were slower than this, as more
/// queued data falls out of the CPU caches.
pub const DEFAULT_SEND_BUFFER: usize = 400 * 1024;
/// Interval between keepalive pings on an otherwise quiet connection.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is
/// considered dead.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of HBONE clients, servers and tunnels.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("transport: {0}")]
    Io(#[from] io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT answered with status {0}")]
    Status(StatusCode),
    #[error("bad authority {0:?}: want <ip>:<port> or <hostname>:<port>")]
    BadAuthority(String),
    #[error("bad header {name}: {reason}")]
    BadHeader { name: &'static str, reason: String },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error("connection pool is closed")]
    PoolClosed,
    #[error("no usable connection and no way left to dial one")]
    NoConnection,
    #[error("dialing the HBONE peer failed: {0}")]
    Dial(#[source] Arc<HboneError>),
    #[error("keepalive ping unanswered for {0:?}")]
    KeepaliveTimeout(Duration),
}

/// Which side of the hop an error points at, so callers can pick a metric
/// label, a log level and a status for their own client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Our own request was malformed or misaddressed (bad authority, 400).
    Request,
    /// The peer denied the connection by policy (401, 403).
    Policy,
    /// The peer could not reach the destination (503, 502, 504).
    Upstream,
    /// The transport failed: I/O error, reset, lost keepalive.
    Transport,
    /// The peer broke HTTP/2 or answered with something unexpected.
    Protocol,
    /// Local state: the pool is closed, a dial was abandoned.
    Local,
}

impl HboneError {
    /// Whose fault the error is.
    pub fn fault(&self) -> Fault {
        match self {
            HboneError::Io(_) | HboneError::KeepaliveTimeout(_) => Fault::Transport,
            HboneError::H2(e) => {
                if e.is_io() || e.is_reset() || e.is_go_away() {
                    Fault::Transport
                } else if e.is_library() {
                    Fault::Protocol
                } else {
                    Fault::Local
                }
            }
            HboneError::Status(s) => match s.as_u16() {
                400 => Fault::Request,
                401 | 403 => Fault::Policy,
                502..=504 => Fault::Upstream,
                _ => Fault::Protocol,
            },
            HboneError::BadAuthority(_) | HboneError::BadHeader { .. } | HboneError::Request(_) => {
                Fault::Request
            }
            HboneError::PoolClosed | HboneError::NoConnection => Fault::Local,
            HboneError::Dial(inner) => inner.fault(),
        }
    }

    /// Whether trying again (on another connection, or later) may succeed
    /// without anything else changing.
    pub fn is_retryable(&self) -> bool {
        match self {
            HboneError::Io(e) => io_retryable(e.kind()),
            HboneError::KeepaliveTimeout(_) => true,
            HboneError::H2(e) => {
                e.is_go_away()
                    || e.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || e.get_io().is_some_and(|io| io_retryable(io.kind()))
            }
            HboneError::Status(s) => matches!(s.as_u16(), 502..=504),
            HboneError::Dial(inner) => inner.is_retryable(),
            HboneError::NoConnection => true,
            HboneError::BadAuthority(_)
            | HboneError::BadHeader { .. }
            | HboneError::Request(_)
            | HboneError::PoolClosed => false,
        }
    }

    /// The HTTP status the peer answered with, if that is what failed.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Status(s) => Some(*s),
            HboneError::Dial(inner) => inner.status(),
            _ => None,
        }
    }
}

fn io_retryable(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::TimedOut
            | io::ErrorKind::UnexpectedEof
    )
}

/// The target of a `CONNECT`: an `ip:port` for ordinary HBONE, a
/// `hostname:port` for the inner tunnel of double HBONE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl Authority {
    /// Parses `ip:port`, `[ipv6]:port` or `hostname:port`. The port must be
    /// present and non-zero; a host made only of digits and dots is taken
    /// for a broken IPv4 address, not a name.
    pub fn parse(s: &str) -> Result<Self, HboneError> {
        let bad = || HboneError::BadAuthority(s.to_owned());
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(bad());
            }
            return Ok(Authority::Addr(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 || !is_hostname(host) {
            return Err(bad());
        }
        Ok(Authority::Host {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The address, when the authority names one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Authority::Addr(a) => Some(*a),
            Authority::Host { .. } => None,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(a) => a.port(),
            Authority::Host { port, .. } => *port,
        }
    }
}

/// DNS-name syntax: dot-separated labels of letters, digits, `-` and `_`
/// (the latter appears in some service names), no empty label.
fn is_hostname(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return false;
    }
    host.trim_end_matches('.').split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authority::Addr(a) => write!(f, "{a}"),
            Authority::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Authority {
    type Err = HboneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Authority::parse(s)
    }
}

impl From<SocketAddr> for Authority {
    fn from(a: SocketAddr) -> Self {
        Authority::Addr(a)
    }
}

/// One `CONNECT`: where to, plus the headers (`forwarded`, `baggage`,
/// `traceparent`, ...). The client sends it; the server hands the received
/// one to its handler.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub authority: Authority,
    pub headers: HeaderMap,
}

impl ConnectRequest {
    pub fn new(authority: impl Into<Authority>) -> Self {
        ConnectRequest {
            authority: authority.into(),
            headers: HeaderMap::new(),
        }
    }

    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }
}

/// Turns an h2 error into the `io::Error` a byte-stream user expects.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// HTTP/2 PING keepalive shared by client and server connections. `step`
/// is cancel-safe: all progress is recorded in `self` before each await
/// point completes, so it can sit in a `select!` next to the connection.
pub(crate) struct Keepalive {
    ping: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
}

impl Keepalive {
    pub(crate) fn new(
        ping: Option<h2::PingPong>,
        interval: Option<Duration>,
        timeout: Duration,
    ) -> Self {
        let interval = interval.unwrap_or(Duration::ZERO);
        Keepalive {
            ping: if interval.is_zero() { None } else { ping },
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            pong_deadline: None,
        }
    }

    /// Sends the next ping when due, or waits for its pong. Returns an
    /// error when the connection should be considered dead.
    pub(crate) async fn step(&mut self) -> Result<(), HboneError> {
        let Some(ping) = self.ping.as_mut() else {
            return pending().await;
        };
        match self.pong_deadline {
            None => {
                tokio::time::sleep_until(self.next_ping).await;
                ping.send_ping(h2::Ping::opaque())?;
                self.pong_deadline = Some(Instant::now() + self.timeout);
                Ok(())
            }
            Some(deadline) => {
                tokio::select! {
                    pong = poll_fn(|cx| ping.poll_pong(cx)) => {
                        pong?;
                        self.pong_deadline = None;
                        self.next_ping = Instant::now() + self.interval;
                        Ok(())
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        Err(HboneError::KeepaliveTimeout(self.timeout))
                    }
                }
            }
        }
    }
}

/// h2 asserts on frame sizes outside what RFC 9113 allows; keep
/// configuration mistakes from turning into panics.
pub(crate) fn clamp_frame_size(size: u32) -> u32 {
    size.clamp(16_384, 16_777_215)
}

pub(crate) fn clamp_send_buffer(size: usize) -> usize {
    size.clamp(16 * 1024, u32::MAX as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(
            Authority::parse("10.0.0.1:80").unwrap(),
            Authority::Addr("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            Authority::parse("[fd00::1]:8080").unwrap().socket_addr(),
            Some("[fd00::1]:8080".parse().unwrap())
        );
        let host = Authority::parse("Reviews.Default.svc.cluster.local:9080").unwrap();
        assert_eq!(host.to_string(), "reviews.default.svc.cluster.local:9080");
        assert_eq!(host.socket_addr(), None);
        assert_eq!(host.port(), 9080);
        for bad in [
            "foo",
            "1.2.3.4",
            "1.2.3.4:0",
            "1.2.3:80",
            ":80",
            "foo:",
            "foo:99999",
            "foo:+80",
            "fd00::1:80",
            "a..b:80",
            "a b:80",
            "",
        ] {
            assert!(Authority::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn error_classification() {
        let e = HboneError::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.fault(), Fault::Upstream);
        assert!(e.is_retryable());
        let e = HboneError::Status(StatusCode::UNAUTHORIZED);
        assert_eq!(e.fault(), Fault::Policy);
        assert!(!e.is_retryable());
        let e = HboneError::Dial(Arc::new(HboneError::Io(
            io::ErrorKind::ConnectionRefused.into(),
        )));
        assert_eq!(e.fault(), Fault::Transport);
        assert!(e.is_retryable());
        assert_eq!(HboneError::BadAuthority("x".into()).fault(), Fault::Request);
        assert!(!HboneError::PoolClosed.is_retryable());
    }
}
