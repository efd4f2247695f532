//! fortio, the load generator of Istio's circuit-breaking and
//! fault-injection tasks: `fortio load` drives concurrent HTTP/1.1 traffic
//! through the mesh and prints the summary users compare against the
//! documentation (`Code 200 : 17 (85.0 %)`, `Sockets used: ...`); `fortio
//! curl` fetches once; `fortio server` is the echo server the image runs by
//! default (HTTP on 8080, TCP echo on 8078).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{self as h, FetchError, Handler, HttpUrl, Req, Resp};
use super::{hostname, SampleError};

/// The fortio release whose output this reproduces.
const VERSION: &str = "1.69.5";

/// Flags that take no value (everything else takes one, Go `flag` style).
const BOOL_FLAGS: &[&str] = &[
    "quiet",
    "allow-initial-errors",
    "stdclient",
    "k",
    "https-insecure",
    "h2",
    "nocatchup",
    "uniform",
    "jitter",
    "L",
    "no-reresolve",
    "sequential-warmup",
    "compression",
    "grpc",
    "ping",
    "healthcheck",
    "a",
    "keepalive",
    "log-errors",
    "stream",
    "json-omit-timestamp",
];

/// Parsed `fortio <command> [flags] [target]`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Args {
    pub command: String,
    pub flags: BTreeMap<String, Vec<String>>,
    pub positional: Vec<String>,
}

impl Args {
    pub fn parse(argv: &[String]) -> Self {
        let mut args = Args {
            command: "server".to_string(),
            ..Args::default()
        };
        let mut it = argv.iter().peekable();
        if let Some(first) = it.peek() {
            if !first.starts_with('-') {
                args.command = (*first).clone();
                it.next();
            }
        }
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                args.positional.push(arg.clone());
                continue;
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None if BOOL_FLAGS.contains(&flag) => (flag.to_string(), "true".to_string()),
                None => (flag.to_string(), it.next().cloned().unwrap_or_default()),
            };
            args.flags.entry(name).or_default().push(value);
        }
        args
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.flags
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn all(&self, name: &str) -> &[String] {
        self.flags.get(name).map_or(&[], Vec::as_slice)
    }

    fn bool(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| v != "false")
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn duration(&self, name: &str, default: Duration) -> Duration {
        self.get(name)
            .and_then(parse_go_duration)
            .unwrap_or(default)
    }

    /// Warnings show unless the log level is above Warning.
    fn warnings(&self) -> bool {
        !self.bool("quiet")
            && !matches!(
                self.get("loglevel").map(str::to_ascii_lowercase).as_deref(),
                Some("error" | "critical" | "fatal")
            )
    }
}

/// Go's `time.ParseDuration` for the forms fortio users write (`5s`,
/// `250ms`, `1m30s`, `1.5s`); a bare number is seconds.
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

pub(crate) async fn run(argv: &[String]) -> Result<u8, SampleError> {
    let args = Args::parse(argv);
    match args.command.as_str() {
        "server" => server(&args).await.map(|()| 0),
        "curl" => curl(&args).await,
        "load" => load(&args).await,
        "version" => {
            println!("{VERSION}");
            Ok(0)
        }
        other => Err(SampleError::Usage(format!(
            "fortio command {other:?} is not built in (server, load, curl, version)"
        ))),
    }
}

// ------------------------------------------------------------------- client

/// One response as fortio accounts for it.
struct Outcome {
    /// HTTP status, or -1 for a transport error (fortio's convention).
    code: i32,
    header_bytes: usize,
    body_bytes: usize,
    close: bool,
    body: Bytes,
    head: String,
}

struct Target {
    url: HttpUrl,
    addr: SocketAddr,
    method: Method,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
}

impl Target {
    async fn new(args: &Args) -> Result<Self, SampleError> {
        let url_arg = args
            .positional
            .last()
            .ok_or_else(|| SampleError::Usage("fortio needs a target URL".to_string()))?;
        let url = HttpUrl::parse(url_arg)?;
        let addr = h::resolve(&url.host, url.port).await?;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("fortio.org/fortio-1.69.5"),
        );
        for header in args.all("H") {
            if let Some((name, value)) = header.split_once(':') {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                ) {
                    headers.insert(n, v);
                }
            }
        }
        if !headers.contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(&url.authority) {
                headers.insert(HOST, v);
            }
        }
        let payload = Bytes::from(args.get("payload").unwrap_or("").to_string());
        if let Some(ct) = args
            .get("content-type")
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            headers.insert(http::header::CONTENT_TYPE, ct);
        }
        let method = match args.get("X") {
            Some(m) => Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET),
            None if !payload.is_empty() => Method::POST,
            None => Method::GET,
        };
        Ok(Target {
            url,
            addr,
            method,
            headers,
            payload,
            timeout: args.duration("timeout", Duration::from_secs(3)),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, FetchError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|source| FetchError::Connect {
                addr: self.addr,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(&self, sender: &mut SendRequest<Full<Bytes>>) -> Result<Outcome, FetchError> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.url.path_and_query.as_str())
            .body(Full::new(self.payload.clone()))?;
        *req.headers_mut() = self.headers.clone();
        let exchange = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, FetchError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        let status_line = format!(
            "{:?} {} {}",
            parts.version,
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        );
        let mut head = format!("{status_line}\r\n");
        for (name, value) in &parts.headers {
            head.push_str(&format!(
                "{}: {}\r\n",
                name,
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        head.push_str("\r\n");
        let close = parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        Ok(Outcome {
            code: i32::from(parts.status.as_u16()),
            header_bytes: head.len(),
            body_bytes: body.len(),
            close,
            body,
            head,
        })
    }
}

async fn curl(args: &Args) -> Result<u8, SampleError> {
    let target = Target::new(args).await?;
    let outcome = async {
        let mut sender = target.connect().await?;
        target.send(&mut sender).await
    }
    .await;
    match outcome {
        Ok(o) => {
            let mut out = tokio::io::stdout();
            let _ = out.write_all(o.head.as_bytes()).await;
            let _ = out.write_all(&o.body).await;
            let _ = out.flush().await;
            if (200..300).contains(&o.code) {
                Ok(0)
            } else {
                if !args.bool("quiet") {
                    eprintln!(
                        "E Error status {} : {}",
                        o.code,
                        String::from_utf8_lossy(&o.body)
                    );
                }
                Ok(1)
            }
        }
        Err(e) => {
            eprintln!("E Unable to connect to {}: {e}", target.addr);
            Ok(1)
        }
    }
}

// --------------------------------------------------------------------- load

/// What one worker observed.
#[derive(Default)]
struct WorkerStats {
    latencies: Vec<f64>,
    codes: BTreeMap<i32, u64>,
    header_sizes: Vec<f64>,
    total_sizes: Vec<f64>,
    sockets: u64,
    aborted: Option<String>,
}

async fn worker(
    target: Arc<Target>,
    calls: Option<u64>,
    deadline: Instant,
    interval: Option<Duration>,
    allow_initial_errors: bool,
    warnings: bool,
) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        match calls {
            Some(n) if done >= n => break,
            None if Instant::now() >= deadline => break,
            _ => {}
        }
        if let Some(every) = interval {
            let due = start + every.mul_f64(done as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let began = Instant::now();
        let result = async {
            if sender.is_none() {
                stats.sockets += 1;
                sender = Some(target.connect().await?);
            }
            match sender.as_mut() {
                Some(s) => target.send(s).await,
                None => Err(FetchError::NoAddress {
                    host: target.url.host.clone(),
                }),
            }
        }
        .await;
        let elapsed = began.elapsed().as_secs_f64();
        let (code, header, total, reconnect) = match &result {
            Ok(o) => {
                // fortio drops the connection after any non-2xx answer.
                let ok = (200..300).contains(&o.code);
                if !ok && warnings {
                    eprintln!("W Non ok http code {} (HTTP/1.1 {})", o.code, o.code);
                }
                (
                    o.code,
                    o.header_bytes,
                    o.header_bytes + o.body_bytes,
                    o.close || !ok,
                )
            }
            Err(e) => {
                if warnings {
                    eprintln!("W Error fetching {}: {e}", target.addr);
                }
                (-1, 0, 0, true)
            }
        };
        if reconnect {
            sender = None;
        }
        // Only a first request that never got an answer ends the run: an
        // HTTP error status is counted like any other (Istio's
        // circuit-breaking task shows a 503 on a thread's run 0 and the
        // load going on).
        if done == 0 && !allow_initial_errors && code < 0 {
            stats.aborted = Some(format!("error {code} for {}", target.addr));
            return stats;
        }
        done += 1;
        stats.latencies.push(elapsed);
        *stats.codes.entry(code).or_default() += 1;
        stats.header_sizes.push(header as f64);
        stats.total_sizes.push(total as f64);
    }
    stats
}

/// `count N avg A +/- S min M max X sum T`, fortio's summary of a series.
fn summary(values: &[f64]) -> String {
    if values.is_empty() {
        return "count 0 avg NaN +/- NaN min 0 max 0 sum 0".to_string();
    }
    let n = values.len() as f64;
    let sum: f64 = values.iter().sum();
    let avg = sum / n;
    let var = values.iter().map(|v| (v - avg).powi(2)).sum::<f64>() / n;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "count {} avg {} +/- {} min {} max {} sum {}",
        values.len(),
        g(avg),
        g(var.sqrt()),
        g(min),
        g(max),
        g(sum)
    )
}

/// Go's `%g`-like short float: up to 6 significant digits, no trailing zeros.
fn g(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (5 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Upper bounds of fortio's default histogram buckets, in milliseconds.
const BUCKETS_MS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 14.0, 16.0, 18.0, 20.0, 25.0,
    30.0, 35.0, 40.0, 45.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 7500.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
    60000.0, 70000.0, 80000.0, 90000.0, 100000.0,
];

/// fortio's `# range, mid point, percentile, count` table over sorted
/// samples (seconds): one line per non-empty bucket, clipped to min/max.
fn histogram_lines(sorted: &[f64]) -> Vec<String> {
    let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let mut lower = 0.0;
    let mut seen = 0usize;
    let bounds = BUCKETS_MS
        .iter()
        .map(|ms| ms / 1000.0)
        .chain(std::iter::once(f64::INFINITY));
    for upper in bounds {
        let count = sorted[seen..].iter().take_while(|v| **v <= upper).count();
        if count > 0 {
            let start = if seen == 0 { min } else { f64::max(lower, min) };
            let end = f64::min(upper, max);
            seen += count;
            lines.push(format!(
                "{} {} <= {} , {} , {:.2}, {count}",
                if lines.is_empty() { ">=" } else { ">" },
                g(start),
                g(end),
                g((start + end) / 2.0),
                100.0 * seen as f64 / sorted.len() as f64
            ));
        }
        lower = upper;
        if seen == sorted.len() {
            break;
        }
    }
    lines
}

/// The value below which `p` percent of the sorted samples fall.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn load(args: &Args) -> Result<u8, SampleError> {
    let target = Arc::new(Target::new(args).await?);
    let url = args.positional.last().cloned().unwrap_or_default();
    let threads: u64 = args.num("c", 8u64).max(1);
    let qps: f64 = args.num("qps", 8.0);
    let total: u64 = args.num("n", 0u64);
    let duration = args.duration("t", Duration::from_secs(5));
    let procs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max_qps = qps <= 0.0;

    let qps_text = if max_qps { "0".to_string() } else { g(qps) };
    let what = if total > 0 {
        format!("{total} calls")
    } else {
        format!("{duration:?}")
    };
    println!("Fortio {VERSION} running at {qps_text} queries per second, {procs}->{procs} procs, for {what}: {url}");
    let per_thread = total / threads;
    let extra = total % threads;
    let rate = if max_qps {
        "max qps".to_string()
    } else {
        format!("{} qps", g(qps))
    };
    if total > 0 {
        println!(
            "Starting at {rate} with {threads} thread(s) [gomax {procs}] for exactly {total} calls ({per_thread} per thread + {extra})"
        );
    } else {
        println!("Starting at {rate} with {threads} thread(s) [gomax {procs}] for {duration:?}");
    }

    let interval = (!max_qps).then(|| Duration::from_secs_f64(threads as f64 / qps));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..threads {
        let calls = (total > 0).then(|| per_thread + u64::from(i < extra));
        set.spawn(worker(
            target.clone(),
            calls,
            deadline,
            interval,
            args.bool("allow-initial-errors"),
            args.warnings(),
        ));
    }
    let mut all = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(stats) = joined {
            all.push(stats);
        }
    }
    let elapsed = started.elapsed();
    if let Some(reason) = all.iter().find_map(|s| s.aborted.clone()) {
        eprintln!("E Aborting because of {reason}");
        return Ok(1);
    }

    let mut latencies: Vec<f64> = all
        .iter()
        .flat_map(|s| s.latencies.iter().copied())
        .collect();
    let count = latencies.len() as u64;
    let actual_qps = count as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "Ended after {elapsed:?} : {count} calls. qps={}",
        g(actual_qps)
    );
    println!("Aggregated Function Time : {}", summary(&latencies));
    latencies.sort_by(f64::total_cmp);
    println!("# range, mid point, percentile, count");
    for line in histogram_lines(&latencies) {
        println!("{line}");
    }
    for p in [50.0, 75.0, 90.0, 99.0, 99.9] {
        println!("# target {p}% {}", g(percentile(&latencies, p)));
    }
    let sockets: u64 = all.iter().map(|s| s.sockets).sum();
    println!("# Socket and IP used for each connection:");
    for (i, s) in all.iter().enumerate() {
        println!(
            "[{i}] {:>3} socket used, resolved to {}",
            s.sockets, target.addr
        );
    }
    println!("Sockets used: {sockets} (for perfect keepalive, would be {threads})");
    println!(
        "Uniform: false, Jitter: false, Catchup allowed: {}",
        !args.bool("nocatchup")
    );
    println!("IP addresses distribution:");
    println!("{}: {sockets}", target.addr);
    let mut codes: BTreeMap<i32, u64> = BTreeMap::new();
    for s in &all {
        for (code, n) in &s.codes {
            *codes.entry(*code).or_default() += n;
        }
    }
    for (code, n) in &codes {
        let pct = if count == 0 {
            0.0
        } else {
            100.0 * *n as f64 / count as f64
        };
        println!("Code {code} : {n} ({pct:.1} %)");
    }
    let headers: Vec<f64> = all
        .iter()
        .flat_map(|s| s.header_sizes.iter().copied())
        .collect();
    let totals: Vec<f64> = all
        .iter()
        .flat_map(|s| s.total_sizes.iter().copied())
        .collect();
    println!("Response Header Sizes : {}", summary(&headers));
    println!("Response Body/Total Sizes : {}", summary(&totals));
    let avg_ms = if count == 0 {
        0.0
    } else {
        1000.0 * latencies.iter().sum::<f64>() / count as f64
    };
    println!(
        "All done {count} calls (plus 0 warmup) {avg_ms:.3} ms avg, {:.1} qps",
        actual_qps
    );
    Ok(0)
}

// ------------------------------------------------------------------- server

struct EchoServer {
    hostname: String,
    started: Instant,
}

/// `503`, or fortio's weighted form `503:20,429:10` (percentages; the rest
/// gets the default).
fn pick_weighted(spec: &str) -> Option<&str> {
    let mut roll = rand::rng().random_range(0.0..100.0);
    for part in spec.split(',') {
        match part.split_once(':') {
            Some((value, pct)) => {
                let pct: f64 = pct.parse().ok()?;
                if roll < pct {
                    return Some(value);
                }
                roll -= pct;
            }
            None => return Some(part),
        }
    }
    None
}

impl Handler for EchoServer {
    async fn handle(&self, req: Req) -> Resp {
        let query = h::query_pairs(req.query());
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(delay) = param("delay")
            .and_then(pick_weighted)
            .and_then(parse_go_duration)
        {
            tokio::time::sleep(delay.min(Duration::from_secs(1_000))).await;
        }
        let status = param("status")
            .and_then(pick_weighted)
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        let mut resp = if req.path().starts_with("/debug") {
            let mut text = format!(
                "Φορτίο version {VERSION} echo debug server up for {:.1} seconds on {} - request from {}\n\n{} {} {:?}\n\nheaders:\n\n",
                self.started.elapsed().as_secs_f64(),
                self.hostname,
                req.peer,
                req.method,
                req.uri,
                req.version
            );
            for (name, value) in &req.headers {
                text.push_str(&format!(
                    "{}: {}\n",
                    h::canonical_header(name.as_str()),
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            text.push_str(&format!(
                "\nbody:\n\n{}\n",
                String::from_utf8_lossy(&req.body)
            ));
            h::text(status, text)
        } else {
            let ct = req
                .header("content-type")
                .unwrap_or("application/octet-stream")
                .to_string();
            h::respond(status, &ct, req.body.clone())
        };
        for header in query.iter().filter(|(k, _)| k == "header").map(|(_, v)| v) {
            if let Some((n, v)) = header.split_once(':') {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    resp.headers_mut().append(n, v);
                }
            }
        }
        resp
    }
}

async fn server(args: &Args) -> Result<(), SampleError> {
    let port_of = |flag: &str, default: u16| {
        args.get(flag)
            .and_then(|v| v.rsplit(':').next().and_then(|p| p.parse().ok()))
            .unwrap_or(default)
    };
    let http_port = h::listen_port(Some(port_of("http-port", 8080)), 8080);
    let tcp_port = port_of("tcp-port", 8078);
    let http = h::bind(http_port).await?;
    let tcp = h::bind(tcp_port).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    h::serve(
        http,
        Arc::new(EchoServer {
            hostname: hostname(),
            started: Instant::now(),
        }),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_go_style() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let a = Args::parse(&s(&[
            "load",
            "-c",
            "2",
            "-qps",
            "0",
            "-n",
            "20",
            "-loglevel",
            "Warning",
            "-quiet",
            "--t=1s",
            "http://h:8000/get",
        ]));
        assert_eq!(a.command, "load");
        assert_eq!(a.get("c"), Some("2"));
        assert_eq!(a.get("loglevel"), Some("Warning"));
        assert!(a.bool("quiet"));
        assert_eq!(a.duration("t", Duration::ZERO), Duration::from_secs(1));
        assert_eq!(a.positional, s(&["http://h:8000/get"]));
        assert_eq!(Args::parse(&[]).command, "server");
    }

    #[test]
    fn durations_and_numbers() {
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_go_duration("x"), None);
        assert_eq!(g(0.0056869123), "0.00568691");
        assert_eq!(g(334.16), "334.16");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(
            histogram_lines(&[0.0005, 0.0008, 0.0015]),
            vec![
                ">= 0.0005 <= 0.001 , 0.00075 , 66.67, 2".to_string(),
                "> 0.001 <= 0.0015 , 0.00125 , 100.00, 1".to_string(),
            ]
        );
        assert_eq!(pick_weighted("503"), Some("503"));
        assert_eq!(pick_weighted("503:100"), Some("503"));
        assert_eq!(pick_weighted("503:0"), None);
    }
}
