//! `mesh-app`: the application at both ends of the traffic the mesh carries in
//! end-to-end tests and benchmarks. Run inside pod namespaces, its clients'
//! connections are what in-pod capture hands to ztunnel, and its servers are
//! what ztunnel finally connects to. Servers report what they saw (peer
//! address, headers) so tests can check what the mesh changed; clients exit
//! with curl's codes so tests read like the documentation they follow.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// curl's exit codes, which tests compare against documented outcomes.
mod exit {
    pub const HTTP_ERROR: u8 = 22;
    pub const RESOLVE: u8 = 6;
    pub const CONNECT: u8 = 7;
    pub const PARTIAL: u8 = 18;
    pub const TIMEOUT: u8 = 28;
    pub const EMPTY_REPLY: u8 = 52;
    pub const RECV: u8 = 56;
    pub const OTHER: u8 = 1;
}

#[derive(Parser)]
#[command(name = "mesh-app", about = "Test client and servers for the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 server answering every request with JSON describing it;
    /// `/status/<code>` answers with that code.
    HttpServer {
        #[arg(long)]
        port: u16,
        /// Name reported in every response (e.g. the pod name).
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
    },
    /// HTTP/1.1 request; prints the status line and the body. Exit codes as
    /// curl -f: 0 on 2xx, 22 other status, 6 resolve, 7 connect, 28 timeout,
    /// 52 connection closed without a response, 56 reset, 18 truncated body.
    HttpGet {
        url: String,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long, short = 'X', default_value = "GET")]
        method: String,
        /// Request body.
        #[arg(long, short = 'd')]
        data: Option<String>,
        /// Also print the response headers after the status line.
        #[arg(long, short = 'i')]
        include: bool,
        #[arg(long, default_value_t = 10.0)]
        connect_timeout: f64,
        #[arg(long, short = 'm', default_value_t = 30.0)]
        max_time: f64,
    },
    /// Echoes bytes back; with --prefix, line by line as `<prefix> <line>`
    /// (like Istio's tcp-echo sample).
    TcpEcho {
        /// Port(s) to listen on, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        port: Vec<u16>,
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Reads each connection to EOF, answers `<sha256 hex> <byte count>\n`.
    HashServer {
        #[arg(long)]
        port: u16,
    },
    /// Sends seeded pseudo-random bytes, half-closes, and checks the server's
    /// hash against its own. Exit 0 only on a match.
    HashClient {
        addr: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// Throughput and latency tools; every result is one JSON line.
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Discards what it reads; one JSON line per finished connection.
    Sink {
        #[arg(long)]
        port: u16,
    },
    /// Writes as fast as possible on K connections for S seconds.
    Source {
        addr: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Echo server for request/response and connection-rate clients.
    RrServer {
        #[arg(long)]
        port: u16,
    },
    /// Request/response latency on one connection.
    RrClient {
        addr: String,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// New connection plus a 1-byte echo per iteration.
    CpsClient {
        addr: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-app: cannot start the runtime: {e}");
            return ExitCode::from(exit::OTHER);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Cmd::HttpServer { port, name, bind } => http_server(SocketAddr::new(bind, port), name)
                .await
                .map(|()| 0),
            Cmd::HttpGet {
                url,
                headers,
                method,
                data,
                include,
                connect_timeout,
                max_time,
            } => Ok(http_get(HttpGet {
                url,
                headers,
                method,
                data,
                include,
                connect_timeout: secs(connect_timeout)?,
                max_time: secs(max_time)?,
            })
            .await),
            Cmd::TcpEcho { port, prefix } => tcp_echo(port, prefix).await.map(|()| 0),
            Cmd::HashServer { port } => hash_server(port).await.map(|()| 0),
            Cmd::HashClient {
                addr,
                bytes,
                seed,
                timeout,
            } => Ok(hash_client(&addr, bytes, seed, secs(timeout)?).await),
            Cmd::Bench { command } => bench(command).await.map(|()| 0),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mesh-app: {e:#}");
            ExitCode::from(exit::OTHER)
        }
    }
}

fn secs(value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("invalid duration {value}"))
}

async fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("mesh-app: listening on {addr}");
    Ok(listener)
}

fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

// ---------------------------------------------------------------- HTTP server

async fn http_server(addr: SocketAddr, name: String) -> anyhow::Result<()> {
    let listener = listen(addr).await?;
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        let local = stream.local_addr().context("local address")?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| describe_request(req, peer, local, name.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn describe_request(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    name: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let status = requested_status(req.uri().path()).unwrap_or(StatusCode::OK);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(key.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let body_bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => 0,
    };
    tracing::info!(%peer, %method, %path, status = status.as_u16(), "request");
    let body = json!({
        "server": &*name,
        "method": method,
        "path": path,
        "client": peer.to_string(),
        "client_ip": peer.ip().to_string(),
        "local": local.to_string(),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// `/status/<code>` asks for that status code.
fn requested_status(path: &str) -> Option<StatusCode> {
    let code = path.strip_prefix("/status/")?.trim_end_matches('/');
    code.parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
}

// ---------------------------------------------------------------- HTTP client

struct HttpGet {
    url: String,
    headers: Vec<String>,
    method: String,
    data: Option<String>,
    include: bool,
    connect_timeout: Duration,
    max_time: Duration,
}

/// A failure with the curl exit code it corresponds to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

async fn http_get(args: HttpGet) -> u8 {
    match http_get_inner(&args).await {
        Ok(code) => code,
        Err(f) => {
            eprintln!("mesh-app: ({}) {}", f.code, f.message);
            f.code
        }
    }
}

async fn http_get_inner(args: &HttpGet) -> Result<u8, Failure> {
    let started = Instant::now();
    let uri: http::Uri = args
        .url
        .parse()
        .map_err(|e| Failure::new(exit::OTHER, format!("invalid URL {}: {e}", args.url)))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        return Err(Failure::new(exit::OTHER, "only http:// URLs are supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| Failure::new(exit::OTHER, format!("URL {} has no host", args.url)))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');

    let target = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Failure::new(exit::RESOLVE, format!("could not resolve host {host}")))?;
    let stream = match tokio::time::timeout(args.connect_timeout, TcpStream::connect(target)).await
    {
        Err(_) => {
            return Err(Failure::new(
                exit::TIMEOUT,
                format!("connection to {target} timed out"),
            ))
        }
        // A reset that lands before the connect completes is still a reset
        // (the handshake succeeded; the peer then aborted), not a refusal.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(Failure::new(
                exit::RECV,
                format!("connection to {target} reset by peer: {e}"),
            ))
        }
        Ok(Err(e)) => {
            return Err(Failure::new(
                exit::CONNECT,
                format!("failed to connect to {target}: {e}"),
            ))
        }
        Ok(Ok(stream)) => stream,
    };

    let mut builder = Request::builder()
        .method(args.method.as_str())
        .uri(
            uri.path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
        )
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, "mesh-app")
        .header(http::header::ACCEPT, "*/*");
    for header in &args.headers {
        let (key, value) = header.split_once(':').ok_or_else(|| {
            Failure::new(
                exit::OTHER,
                format!("header {header:?} is not `Name: value`"),
            )
        })?;
        builder = builder.header(key.trim(), value.trim());
    }
    let body = args.data.clone().map(Bytes::from).unwrap_or_default();
    let request = builder
        .body(Full::new(body))
        .map_err(|e| Failure::new(exit::OTHER, format!("invalid request: {e}")))?;

    let remaining = args.max_time.saturating_sub(started.elapsed());
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify(&e, exit::EMPTY_REPLY))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| classify(&e, exit::EMPTY_REPLY))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| classify(&e, exit::PARTIAL))?
            .to_bytes();
        Ok::<_, Failure>((parts, body))
    };
    let (parts, body) = tokio::time::timeout(remaining, exchange)
        .await
        .map_err(|_| {
            Failure::new(
                exit::TIMEOUT,
                format!("no complete response within {:?}", args.max_time),
            )
        })??;

    let mut out = format!(
        "HTTP/1.1 {} {}\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    if args.include {
        for (key, value) in &parts.headers {
            out.push_str(&format!(
                "{key}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        out.push('\n');
    }
    out.push_str(&String::from_utf8_lossy(&body));
    print!("{out}");
    Ok(if parts.status.is_success() {
        0
    } else {
        exit::HTTP_ERROR
    })
}

/// Maps a client error to curl's code: a reset is 56, a clean close where
/// something was still expected is `eof_code`.
fn classify(err: &hyper::Error, eof_code: u8) -> Failure {
    if let Some(io) = io_cause(err) {
        use std::io::ErrorKind::*;
        if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) {
            return Failure::new(exit::RECV, format!("connection reset by peer: {io}"));
        }
        return Failure::new(exit::RECV, format!("receive failure: {io}"));
    }
    if err.is_incomplete_message() {
        let what = if eof_code == exit::EMPTY_REPLY {
            "empty reply from server"
        } else {
            "transfer closed with outstanding read data remaining"
        };
        return Failure::new(eof_code, what);
    }
    Failure::new(exit::RECV, format!("receive failure: {err}"))
}

fn io_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

// ---------------------------------------------------------------- TCP servers

async fn tcp_echo(ports: Vec<u16>, prefix: Option<String>) -> anyhow::Result<()> {
    let prefix: Option<Arc<str>> = prefix.map(Into::into);
    let mut servers = tokio::task::JoinSet::new();
    for port in ports {
        let listener = listen(any_addr(port)).await?;
        let prefix = prefix.clone();
        servers.spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await?;
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let result = match prefix {
                        Some(prefix) => echo_lines(stream, &prefix).await,
                        None => echo(stream).await,
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "echo ended");
                    }
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        });
    }
    while let Some(done) = servers.join_next().await {
        done.context("echo server task")?.context("accepting")?;
    }
    Ok(())
}

async fn echo(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

async fn echo_lines(stream: TcpStream, prefix: &str) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        if rd.read_until(b'\n', &mut line).await? == 0 {
            return wr.shutdown().await;
        }
        let mut reply = Vec::with_capacity(prefix.len() + 1 + line.len());
        reply.extend_from_slice(prefix.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(&line);
        wr.write_all(&reply).await?;
    }
}

async fn hash_server(port: u16) -> anyhow::Result<()> {
    let listener = listen(any_addr(port)).await?;
    loop {
        let (mut stream, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            let result = async {
                let mut hasher = Sha256::new();
                let mut count = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    count += n as u64;
                }
                let reply = format!("{} {count}\n", hex(&hasher.finalize()));
                stream.write_all(reply.as_bytes()).await?;
                stream.shutdown().await?;
                tracing::info!(%peer, bytes = count, "hashed");
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = result.await {
                tracing::warn!(%peer, error = %e, "hash connection failed");
            }
        });
    }
}

async fn hash_client(addr: &str, bytes: u64, seed: u64, timeout: Duration) -> u8 {
    let run = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| {
            Failure::new(exit::CONNECT, format!("failed to connect to {addr}: {e}"))
        })?;
        let mut rng = SplitMix64(seed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            rng.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            stream.write_all(&buf[..n]).await.map_err(io_failure)?;
            left -= n as u64;
        }
        stream.shutdown().await.map_err(io_failure)?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .await
            .map_err(io_failure)?;
        Ok::<_, Failure>((hex(&hasher.finalize()), reply))
    };
    let (local, reply) = match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            eprintln!("mesh-app: ({}) no reply within {timeout:?}", exit::TIMEOUT);
            return exit::TIMEOUT;
        }
        Ok(Err(f)) => {
            eprintln!("mesh-app: ({}) {}", f.code, f.message);
            return f.code;
        }
        Ok(Ok(done)) => done,
    };
    let mut fields = reply.split_whitespace();
    let remote = fields.next().unwrap_or("").to_string();
    let remote_bytes: Option<u64> = fields.next().and_then(|n| n.parse().ok());
    let matched = remote == local && remote_bytes == Some(bytes);
    println!(
        "{}",
        json!({
            "bytes": bytes,
            "sha256": local,
            "remote_sha256": remote,
            "remote_bytes": remote_bytes,
            "match": matched,
        })
    );
    if matched {
        0
    } else {
        eprintln!("mesh-app: hash mismatch (server replied {reply:?})");
        exit::OTHER
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    use std::io::ErrorKind::*;
    let code = if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) {
        exit::RECV
    } else {
        exit::OTHER
    };
    Failure::new(code, e.to_string())
}

/// Deterministic byte stream for a seed (SplitMix64), so both sides of a
/// transfer can be recomputed anywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- benchmarks

async fn bench(command: BenchCmd) -> anyhow::Result<()> {
    match command {
        BenchCmd::Sink { port } => sink(port).await,
        BenchCmd::Source {
            addr,
            seconds,
            streams,
        } => source(&addr, secs(seconds)?, streams).await,
        BenchCmd::RrServer { port } => rr_server(port).await,
        BenchCmd::RrClient { addr, size, count } => rr_client(&addr, size, count).await,
        BenchCmd::CpsClient {
            addr,
            seconds,
            concurrency,
        } => cps_client(&addr, secs(seconds)?, concurrency).await,
    }
}

async fn sink(port: u16) -> anyhow::Result<()> {
    let listener = listen(any_addr(port)).await?;
    loop {
        let (mut stream, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "sink read failed");
                        break;
                    }
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({
                    "bench": "sink",
                    "peer": peer.to_string(),
                    "bytes": total,
                    "seconds": seconds,
                    "mb_per_s": rate(total as f64 / 1e6, seconds),
                })
            );
        });
    }
}

async fn source(addr: &str, duration: Duration, streams: usize) -> anyhow::Result<()> {
    if streams == 0 {
        bail!("--streams must be at least 1");
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let addr = addr.to_string();
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(&addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let buf = vec![0x5au8; 128 * 1024];
            let mut sent = 0u64;
            while tokio::time::Instant::now() < deadline {
                stream.write_all(&buf).await.context("writing")?;
                sent += buf.len() as u64;
            }
            // The sink closes once it has read everything: waiting for that
            // makes the rate count delivered bytes, not buffered ones.
            stream.shutdown().await.context("half-closing")?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.context("draining")?;
            Ok::<u64, anyhow::Error>(sent)
        });
    }
    let mut total = 0u64;
    while let Some(done) = tasks.join_next().await {
        total += done.context("source task")??;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "source",
            "streams": streams,
            "bytes": total,
            "seconds": seconds,
            "mb_per_s": rate(total as f64 / 1e6, seconds),
            "gbit_per_s": rate(total as f64 * 8.0 / 1e9, seconds),
        })
    );
    Ok(())
}

async fn rr_server(port: u16) -> anyhow::Result<()> {
    let listener = listen(any_addr(port)).await?;
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            if let Err(e) = echo(stream).await {
                tracing::debug!(%peer, error = %e, "echo ended");
            }
        });
    }
}

async fn rr_client(addr: &str, size: usize, count: usize) -> anyhow::Result<()> {
    if size == 0 || count == 0 {
        bail!("--size and --count must be at least 1");
    }
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let request = vec![0xa5u8; size];
    let mut reply = vec![0u8; size];
    let warmup = (count / 10).min(1000);
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let started = Instant::now();
        stream.write_all(&request).await.context("writing")?;
        stream.read_exact(&mut reply).await.context("reading")?;
        if i >= warmup {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let stats = Percentiles::of(samples);
    println!(
        "{}",
        json!({
            "bench": "rr",
            "size": size,
            "count": count,
            "p50_us": stats.at(0.50),
            "p90_us": stats.at(0.90),
            "p99_us": stats.at(0.99),
            "mean_us": stats.mean(),
            "min_us": stats.at(0.0),
            "max_us": stats.at(1.0),
        })
    );
    Ok(())
}

async fn cps_client(addr: &str, duration: Duration, concurrency: usize) -> anyhow::Result<()> {
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let target: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .with_context(|| format!("no address for {addr}"))?,
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            let mut last_error = None;
            while tokio::time::Instant::now() < deadline {
                let begun = Instant::now();
                let attempt = async {
                    let mut stream = TcpStream::connect(target).await?;
                    stream.set_nodelay(true)?;
                    stream.write_all(b"x").await?;
                    let mut byte = [0u8; 1];
                    stream.read_exact(&mut byte).await?;
                    Ok::<(), std::io::Error>(())
                };
                match attempt.await {
                    Ok(()) => samples.push(begun.elapsed().as_secs_f64() * 1e6),
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e.to_string());
                    }
                }
            }
            (samples, errors, last_error)
        });
    }
    let mut samples = Vec::new();
    let mut errors = 0u64;
    let mut last_error = None;
    while let Some(done) = tasks.join_next().await {
        let (s, e, last) = done.context("client task")?;
        samples.extend(s);
        errors += e;
        last_error = last.or(last_error);
    }
    let seconds = started.elapsed().as_secs_f64();
    let connections = samples.len();
    let stats = Percentiles::of(samples);
    println!(
        "{}",
        json!({
            "bench": "cps",
            "concurrency": concurrency,
            "connections": connections,
            "errors": errors,
            "last_error": last_error,
            "seconds": seconds,
            "per_second": rate(connections as f64, seconds),
            "p50_us": stats.at(0.50),
            "p99_us": stats.at(0.99),
        })
    );
    Ok(())
}

fn rate(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        amount / seconds
    } else {
        0.0
    }
}

/// Sorted latency samples (microseconds).
struct Percentiles(Vec<f64>);

impl Percentiles {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Percentiles(samples)
    }

    /// Nearest-rank percentile, `q` in 0..=1; `None` without samples.
    fn at(&self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.0.len()) - 1;
        self.0.get(index).copied()
    }

    fn mean(&self) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.iter().sum::<f64>() / self.0.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_paths() {
        assert_eq!(
            requested_status("/status/503"),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            requested_status("/status/418/"),
            Some(StatusCode::IM_A_TEAPOT)
        );
        assert_eq!(requested_status("/status/abc"), None);
        assert_eq!(requested_status("/status/99"), None);
        assert_eq!(requested_status("/other"), None);
    }

    #[test]
    fn seeded_streams_repeat_and_differ() {
        let mut a = [0u8; 20];
        let mut b = [0u8; 20];
        SplitMix64(7).fill(&mut a);
        SplitMix64(7).fill(&mut b);
        assert_eq!(a, b);
        SplitMix64(8).fill(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(p.at(0.5), Some(50.0));
        assert_eq!(p.at(0.99), Some(99.0));
        assert_eq!(p.at(0.0), Some(1.0));
        assert_eq!(p.at(1.0), Some(100.0));
        assert_eq!(p.mean(), Some(50.5));
        assert_eq!(Percentiles::of(Vec::new()).at(0.5), None);
    }

    #[test]
    fn hex_encodes_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
