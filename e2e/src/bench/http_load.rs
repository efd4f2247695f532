//! The HTTP/1.1 load generator of `waypoint-bench`. It runs inside the
//! client pod's network namespace, so its connections to the service are
//! the ones the mesh captures there: straight to the server (direct), through
//! the node's ztunnel over HBONE (ztunnel only), or through ztunnel to the
//! namespace's waypoint and on to the server (waypoint).
//!
//! Two ways to load: a closed loop (every connection sends its next request
//! as soon as the previous response is in; the figure is requests/s), and a
//! fixed rate (every connection has a schedule of intended send times; the
//! figure is the latency distribution at that rate). The fixed-rate latency
//! counts from the intended send time whenever the connection was still busy
//! with an earlier response at that time, so a stall of the system shows in
//! every request it held back instead of in one sample only (coordinated
//! omission).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("response status {0}")]
    Status(u16),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("a connection task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What to send, where, and how hard.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// `Host` header (the service name, as a client in the cluster uses it).
    pub host: String,
    pub path: String,
    pub connections: usize,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Load that is sent but not counted: connection setup (for the mesh
    /// modes that includes mutual TLS to ztunnel or the waypoint) and the
    /// first requests on cold paths.
    pub warmup: Duration,
    /// Requests per second over all connections; `None` for a closed loop.
    pub rate: Option<f64>,
    /// Worker threads of the generator's runtime (1: a current-thread
    /// runtime, which leaves the most CPU to what is measured).
    pub threads: usize,
}

/// What one run measured (what the `client` subcommand prints as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub connections: usize,
    /// The fixed rate asked for; `None` for a closed loop.
    pub target_rps: Option<f64>,
    /// Length of the measured window.
    pub seconds: f64,
    /// Successful requests in the measured window.
    pub requests: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Fixed rate only: requests that left after their intended time because
    /// the previous response on the connection came in late.
    pub held_back: u64,
}

/// What one connection saw.
#[derive(Default)]
struct ConnStats {
    latencies_ns: Vec<u64>,
    errors: u64,
    last_error: Option<String>,
    held_back: u64,
}

/// Runs the load on a runtime of its own and reports.
pub fn run(spec: LoadSpec) -> Result<LoadReport, LoadError> {
    let rt = if spec.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads)
            .enable_all()
            .build()
    }
    .map_err(LoadError::Runtime)?;
    rt.block_on(run_async(spec))
}

async fn run_async(spec: LoadSpec) -> Result<LoadReport, LoadError> {
    let spec = Arc::new(spec);
    let start = Instant::now();
    let tasks: Vec<_> = (0..spec.connections.max(1))
        .map(|i| tokio::spawn(connection(spec.clone(), i, start)))
        .collect();
    let mut all = ConnStats::default();
    for t in tasks {
        let s = t.await?;
        all.latencies_ns.extend(s.latencies_ns);
        all.errors += s.errors;
        all.held_back += s.held_back;
        if s.last_error.is_some() {
            all.last_error = s.last_error;
        }
    }
    // The window ends when the last counted response came in, which for a
    // closed loop is a little after the deadline.
    let seconds = (Instant::now() - start)
        .saturating_sub(spec.warmup)
        .as_secs_f64()
        .max(spec.duration.as_secs_f64());
    all.latencies_ns.sort_unstable();
    let pct = |q: f64| percentile(&all.latencies_ns, q) as f64 / 1e6;
    let requests = all.latencies_ns.len() as u64;
    Ok(LoadReport {
        connections: spec.connections,
        target_rps: spec.rate,
        seconds,
        requests,
        errors: all.errors,
        last_error: all.last_error,
        rps: requests as f64 / seconds.max(1e-9),
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.latencies_ns.last().copied().unwrap_or(0) as f64 / 1e6,
        held_back: all.held_back,
    })
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank; 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One keep-alive connection's loop. A failed exchange drops the
/// connection; the next request opens a new one (and counts the handshake
/// in its latency, as a real client would feel it).
async fn connection(spec: Arc<LoadSpec>, index: usize, start: Instant) -> ConnStats {
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    // Each connection carries an equal share of the rate; their schedules
    // are staggered so the requests of different connections interleave
    // instead of leaving together.
    let interval = spec
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(spec.connections.max(1) as f64 / r));
    let offset = interval.map(|i| i.mul_f64(index as f64 / spec.connections.max(1) as f64));
    let mut stats = ConnStats::default();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let mut prev_done = start;
    let mut n: u64 = 0;
    loop {
        let now = Instant::now();
        let intended = match (interval, offset) {
            (Some(i), Some(o)) => start + o + i.mul_f64(n as f64),
            _ => now,
        };
        if intended >= end {
            break;
        }
        if intended > now {
            tokio::time::sleep_until(intended.into()).await;
        }
        let sent = Instant::now();
        // The system held this request back only if the previous response
        // was not in at the intended time; otherwise any gap between
        // intended and actual send is the generator's own timer slack,
        // which is not the system's latency.
        let held_back = interval.is_some() && prev_done > intended;
        let from = if held_back { intended } else { sent };
        let result = exchange(&mut sender, &spec).await;
        let done = Instant::now();
        prev_done = done;
        n += 1;
        let counted = intended >= measure_from;
        match result {
            Ok(()) if counted => {
                stats.latencies_ns.push((done - from).as_nanos() as u64);
                if held_back {
                    stats.held_back += 1;
                }
            }
            Ok(()) => {}
            Err(e) => {
                sender = None;
                if counted {
                    stats.errors += 1;
                    stats.last_error = Some(e.to_string());
                }
                // Do not spin on a path that refuses every connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    stats
}

/// One GET on the connection (opened first if there is none), reading the
/// whole response body.
async fn exchange(
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    spec: &LoadSpec,
) -> Result<(), LoadError> {
    let s = match sender {
        Some(s) => s,
        None => sender.insert(connect(spec.addr).await?),
    };
    s.ready().await?;
    let req = Request::get(spec.path.as_str())
        .header(HOST, spec.host.as_str())
        .body(Empty::new())?;
    let resp = s.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        return Err(LoadError::Status(status.as_u16()));
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, LoadError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| LoadError::Connect { addr, source })?;
    // Small requests and responses: do not let Nagle delay them.
    stream
        .set_nodelay(true)
        .map_err(|source| LoadError::Connect { addr, source })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "load connection closed");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.90), 90);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
    }

    /// A keep-alive HTTP/1.1 responder on loopback: reads requests up to
    /// the blank line, answers each with a two-byte body.
    async fn tiny_server() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(resp).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn spec(addr: SocketAddr, rate: Option<f64>) -> LoadSpec {
        LoadSpec {
            addr,
            host: "server:8080".into(),
            path: "/".into(),
            connections: 2,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            rate,
            threads: 1,
        }
    }

    #[test]
    fn closed_loop_and_fixed_rate_against_a_local_server() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = rt.block_on(tiny_server());
        let closed = run(spec(addr, None)).unwrap();
        assert_eq!(closed.errors, 0, "{:?}", closed.last_error);
        assert!(closed.requests > 100, "{closed:?}");
        assert!(closed.p50_ms <= closed.p90_ms && closed.p90_ms <= closed.p99_ms);
        let fixed = run(spec(addr, Some(200.0))).unwrap();
        assert_eq!(fixed.errors, 0, "{:?}", fixed.last_error);
        // 200/s for 0.5 s: 100 intended sends in the window.
        assert!((95..=101).contains(&fixed.requests), "{fixed:?}");
    }

    #[test]
    fn a_refused_connection_counts_as_errors() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = run(spec(port, Some(100.0))).unwrap();
        assert_eq!(r.requests, 0);
        assert!(r.errors > 0 && r.last_error.is_some(), "{r:?}");
    }
}
