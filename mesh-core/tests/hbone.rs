//! HBONE client pool against HBONE server over plain TCP loopback (TLS is
//! layered on by the caller in production and is irrelevant to HTTP/2
//! behaviour).

use std::future::{pending, Future};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_core::copy::{copy_bidirectional_with_policy, BufferPolicy, Counters};
use mesh_core::hbone::headers::{self, Baggage, TraceParent};
use mesh_core::hbone::{
    serve_connection, Authority, ConnectRequest, HboneError, Pool, PoolConfig, Responder,
    ServerConfig, DEFAULT_SEND_BUFFER,
};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

/// Upper bound on any single wait, so a broken build fails instead of
/// hanging; never a performance assertion.
const BOUND: Duration = Duration::from_secs(20);

/// Ports the test handler gives meaning to; any other port echoes.
const PORT_DENY: u16 = 401;
const PORT_NO_ROUTE: u16 = 503;
const PORT_HEADERS: u16 = 7000;
const PORT_SINK: u16 = 9999;

#[derive(Clone, Default)]
struct Calls(Arc<AtomicUsize>);

impl Calls {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn handler(
    calls: Calls,
    policy: BufferPolicy,
) -> impl Fn(ConnectRequest, Responder) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
       + Clone
       + Send
       + 'static {
    move |req, responder| {
        calls.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match req.authority.port() {
                PORT_DENY => responder.reject(StatusCode::UNAUTHORIZED),
                PORT_NO_ROUTE => responder.reject(StatusCode::SERVICE_UNAVAILABLE),
                PORT_HEADERS => {
                    let Ok(mut s) = responder.accept() else {
                        return;
                    };
                    let fwd = headers::forwarded_for(&req.headers)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let bag = req
                        .headers
                        .get(headers::BAGGAGE)
                        .and_then(|v| v.to_str().ok())
                        .map(Baggage::parse)
                        .and_then(|b| b.workload_name)
                        .unwrap_or_default();
                    let trace = req
                        .headers
                        .get(headers::TRACEPARENT)
                        .and_then(|v| v.to_str().ok())
                        .and_then(TraceParent::parse)
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    let _ = s.write_all(format!("{fwd}|{bag}|{trace}").as_bytes()).await;
                    let _ = s.shutdown().await;
                    let _ = s.read_to_end(&mut Vec::new()).await;
                }
                PORT_SINK => {
                    let Ok(mut s) = responder.accept() else {
                        return;
                    };
                    // Count what arrives, then answer the count: the
                    // throughput report's receiver.
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
                port => {
                    let Ok(mut s) = responder.accept() else {
                        return;
                    };
                    if port == PORT_SINK + 1 {
                        // Proxy-style: hand the tunnel to copy_bidirectional
                        // against a TCP sink server named by the header.
                        let target = req
                            .headers
                            .get("x-test-target")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<SocketAddr>().ok());
                        let Some(target) = target else { return };
                        let Ok(mut up) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = copy_bidirectional_with_policy(
                            &mut s,
                            &mut up,
                            &Counters::new(),
                            policy,
                        )
                        .await;
                        return;
                    }
                    let (mut r, mut w) = tokio::io::split(s);
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                }
            }
        })
    }
}

struct Server {
    addr: SocketAddr,
    calls: Calls,
}

async fn start_server(cfg: ServerConfig) -> Result<Server> {
    start_server_with_policy(cfg, BufferPolicy::default()).await
}

async fn start_server_with_policy(cfg: ServerConfig, policy: BufferPolicy) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Calls::default();
    let h = handler(calls.clone(), policy);
    tokio::spawn(accept_loop(listener, cfg, h));
    Ok(Server { addr, calls })
}

async fn accept_loop<H, F>(listener: TcpListener, cfg: ServerConfig, h: H)
where
    H: Fn(ConnectRequest, Responder) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let (cfg, h) = (cfg.clone(), h.clone());
        tokio::spawn(async move {
            let _ = serve_connection(tcp, &cfg, h, pending()).await;
        });
    }
}

/// A dial closure that counts its calls.
fn dialer(
    addr: SocketAddr,
    dials: &Arc<AtomicUsize>,
    delay: Duration,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> {
    let dials = dials.clone();
    move || {
        dials.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        })
    }
}

fn target(port: u16) -> ConnectRequest {
    ConnectRequest::new(SocketAddr::from(([10, 0, 0, 1], port)))
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > BOUND {
            bail!("gave up waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn echo_8mib_random_byte_for_byte() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let stream = pool
        .connect(
            &"k",
            dialer(server.addr, &dials, Duration::ZERO),
            target(8080),
        )
        .await?;

    let mut data = vec![0u8; 8 << 20];
    rand::rng().fill_bytes(&mut data);
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        // Odd-sized writes exercise partial-capacity paths.
        for chunk in sent.chunks(77_777) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        anyhow::Ok(w)
    });
    let mut got = Vec::with_capacity(data.len());
    timeout(BOUND, r.read_to_end(&mut got)).await??;
    let _w = writer.await??;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    assert_eq!(server.calls.get(), 1);
    Ok(())
}

#[tokio::test]
async fn half_close_still_reads_echo() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &1u8,
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    s.write_all(b"ping before close").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"ping before close");
    // Writing after the half close is refused locally.
    assert!(s.write_all(b"more").await.is_err());
    Ok(())
}

#[tokio::test]
async fn headers_reach_the_handler() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let client: SocketAddr = "[fd00::5]:43210".parse()?;
    let trace = TraceParent::new_random(true);
    let mut req = target(PORT_HEADERS);
    req.headers.insert(
        http::header::FORWARDED,
        headers::forwarded(client, Some("reviews.default.svc.cluster.local"))?,
    );
    let baggage = Baggage {
        namespace: Some("default".into()),
        workload_type: Some("deployment".into()),
        workload_name: Some("productpage-v1".into()),
        ..Baggage::default()
    };
    req.headers
        .insert(headers::BAGGAGE, baggage.to_header_value()?);
    req.headers
        .insert(headers::TRACEPARENT, trace.to_header_value());
    let mut s = pool
        .connect(&(), dialer(server.addr, &dials, Duration::ZERO), req)
        .await?;
    s.shutdown().await?;
    let mut got = String::new();
    timeout(BOUND, s.read_to_string(&mut got)).await??;
    assert_eq!(got, format!("{client}|productpage-v1|{trace}"));
    Ok(())
}

/// Sends one request with a bare h2 client, which lets us send what the
/// pool would refuse to build. Returns the status.
async fn raw_h2_request(addr: SocketAddr, method: Method, uri: &str) -> Result<StatusCode> {
    let tcp = TcpStream::connect(addr).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await?;
    let req = Request::builder().method(method).uri(uri).body(())?;
    let (resp, _body) = send.send_request(req, false)?;
    let resp = timeout(BOUND, resp).await??;
    Ok(resp.status())
}

#[tokio::test]
async fn malformed_requests_get_400_without_the_handler() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    for (method, uri) in [
        (Method::GET, "http://10.0.0.1:80/"),
        (Method::POST, "https://10.0.0.1:80/x"),
        (Method::CONNECT, "foo"),
        (Method::CONNECT, "1.2.3.4"),
        (Method::CONNECT, "1.2.3.4:0"),
        (Method::CONNECT, "reviews.default.svc:9080"),
    ] {
        let status = raw_h2_request(server.addr, method.clone(), uri).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}");
    }
    assert_eq!(server.calls.get(), 0, "handler saw a malformed request");

    // The same hostname authority reaches the handler when allowed.
    let gateway = start_server(ServerConfig {
        accept_hostname_authority: true,
        ..ServerConfig::default()
    })
    .await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &0,
            dialer(gateway.addr, &dials, Duration::ZERO),
            ConnectRequest::new(Authority::parse("reviews.default.svc:9080")?),
        )
        .await?;
    s.write_all(b"via hostname").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"via hostname");
    assert_eq!(gateway.calls.get(), 1);
    Ok(())
}

#[tokio::test]
async fn handler_rejections_surface_as_status() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    for (port, want) in [
        (PORT_DENY, StatusCode::UNAUTHORIZED),
        (PORT_NO_ROUTE, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let err = pool
            .connect(
                &"k",
                dialer(server.addr, &dials, Duration::ZERO),
                target(port),
            )
            .await
            .expect_err("rejected CONNECT returned a stream");
        match err {
            HboneError::Status(s) => assert_eq!(s, want),
            other => bail!("want Status({want}), got {other:?}"),
        }
    }
    assert_eq!(server.calls.get(), 2);
    // Rejections do not poison the connection.
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats()[&"k"].connections, 1);
    assert_eq!(pool.stats()[&"k"].streams, 0);
    Ok(())
}

// ---- raw HTTP/2 frames, for a CONNECT no HTTP/2 library will send ----

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn read_frame(tcp: &mut TcpStream) -> Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

#[tokio::test]
async fn connect_without_authority_is_refused_and_server_keeps_serving() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let mut tcp = TcpStream::connect(server.addr).await?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    // HPACK: literal without indexing, name = static index 2 (:method),
    // value "CONNECT". No :authority at all.
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    out.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
    tcp.write_all(&out).await?;

    let verdict = timeout(BOUND, async {
        loop {
            let (kind, flags, stream, payload) = read_frame(&mut tcp).await?;
            match kind {
                FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                    tcp.write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                        .await?;
                }
                // 0x8c: indexed static entry 12, ":status: 400".
                FRAME_HEADERS if stream == 1 => {
                    return anyhow::Ok(format!("headers {:02x?}", payload.first()))
                }
                FRAME_RST_STREAM if stream == 1 => return Ok("reset".to_owned()),
                FRAME_GOAWAY => bail!("server closed the whole connection"),
                _ => {}
            }
        }
    })
    .await??;
    println!("CONNECT without :authority answered with {verdict}");
    assert!(
        verdict == "reset" || verdict == "headers Some(8c)",
        "unexpected answer: {verdict}"
    );
    assert_eq!(server.calls.get(), 0);

    // The server process carries on with the next, good, client.
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &"k",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    s.write_all(b"still here").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"still here");
    Ok(())
}

#[tokio::test]
async fn garbage_bytes_do_not_take_the_server_down() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x01\x00\x00\x00\x00\x01",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x02\x01\x04\x00\x00\x00\x01\xff\xff",
    ] {
        let mut tcp = TcpStream::connect(server.addr).await?;
        tcp.write_all(junk).await?;
        // The server answers with a GOAWAY or just closes; either way the
        // connection ends.
        let _ = timeout(BOUND, tcp.read_to_end(&mut Vec::new())).await?;
    }
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &"k",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    s.write_all(b"ok").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"ok");
    Ok(())
}

// ---- pool ----

#[tokio::test]
async fn pool_150_concurrent_streams_use_exactly_two_connections() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let connects = (0..150).map(|_| {
        pool.connect(
            &"dest",
            dialer(server.addr, &dials, Duration::from_millis(50)),
            target(80),
        )
    });
    let streams = timeout(BOUND, futures::future::try_join_all(connects)).await??;
    assert_eq!(streams.len(), 150);
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    let stats = pool.stats()[&"dest"];
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.streams, 150);

    // Every one of them is a working tunnel.
    let mut checks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        checks.push(tokio::spawn(async move {
            let msg = format!("stream {i}");
            s.write_all(msg.as_bytes()).await?;
            s.shutdown().await?;
            let mut got = String::new();
            s.read_to_string(&mut got).await?;
            anyhow::ensure!(got == msg, "stream {i} echoed {got:?}");
            anyhow::Ok(())
        }));
    }
    for c in checks {
        timeout(BOUND, c).await???;
    }
    assert_eq!(pool.stats()[&"dest"].streams, 0);
    Ok(())
}

#[tokio::test]
async fn pool_reuses_one_connection_for_sequential_requests() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    for i in 0..10 {
        let mut s = pool
            .connect(
                &"dest",
                dialer(server.addr, &dials, Duration::ZERO),
                target(80),
            )
            .await?;
        s.write_all(&[i]).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        timeout(BOUND, s.read_to_end(&mut got)).await??;
        assert_eq!(got, [i]);
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats()[&"dest"].connections, 1);
    // A different key gets its own connection.
    let _other = pool
        .connect(
            &"other",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().len(), 2);
    Ok(())
}

#[tokio::test]
async fn pool_expires_idle_connections() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &"dest",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    s.write_all(b"x").await?;
    s.shutdown().await?;
    timeout(BOUND, s.read_to_end(&mut Vec::new())).await??;
    // Still in use: must not expire however long we wait for the other
    // connection below.
    let busy = pool
        .connect(
            &"busy",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    drop(s);
    eventually("idle connection to be removed", || {
        !pool.stats().contains_key(&"dest")
    })
    .await?;
    assert_eq!(pool.stats()[&"busy"].connections, 1);
    drop(busy);
    // The next request dials afresh.
    let _s = pool
        .connect(
            &"dest",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test]
async fn pool_concurrent_first_connects_dial_once() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (pool, dial) = (
            pool.clone(),
            dialer(server.addr, &dials, Duration::from_millis(200)),
        );
        tasks.push(tokio::spawn(async move {
            pool.connect(&"dest", dial, target(80)).await
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(timeout(BOUND, t).await???);
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats()[&"dest"].connections, 1);
    assert_eq!(pool.stats()[&"dest"].streams, 20);
    Ok(())
}

#[tokio::test]
async fn pool_shares_a_failed_dial_with_its_waiters() -> Result<()> {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let pool: Pool<&str> = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let connects = (0..5).map(|_| {
        pool.connect(
            &"dest",
            dialer(closed, &dials, Duration::from_millis(100)),
            target(80),
        )
    });
    let results = timeout(BOUND, futures::future::join_all(connects)).await?;
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    for r in results {
        match r {
            Err(e @ HboneError::Dial(_)) => assert!(e.is_retryable(), "{e}"),
            other => bail!("want a dial error, got {other:?}"),
        }
    }
    assert!(pool.stats().is_empty());
    Ok(())
}

#[tokio::test]
async fn pool_respects_max_streams_per_connection() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig {
        max_streams_per_conn: 3,
        ..PoolConfig::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(
            pool.connect(
                &"d",
                dialer(server.addr, &dials, Duration::ZERO),
                target(80),
            )
            .await?,
        );
    }
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    assert_eq!(pool.stats()[&"d"].connections, 3);
    // Freeing a slot on a full connection makes it usable again.
    held.remove(0);
    held.push(
        pool.connect(
            &"d",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?,
    );
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_lets_open_tunnels_finish() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Calls::default();
    let h = handler(calls.clone(), BufferPolicy::default());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let cfg = ServerConfig::default();
    let first = {
        let (cfg, h) = (cfg.clone(), h.clone());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let serving = tokio::spawn(async move {
                serve_connection(tcp, &cfg, h, async {
                    let _ = stop_rx.await;
                })
                .await
            });
            // Later connections are served without a shutdown signal.
            tokio::spawn(accept_loop(
                listener,
                ServerConfig::default(),
                handler(Calls::default(), BufferPolicy::default()),
            ));
            anyhow::Ok(serving.await?)
        })
    };

    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut tunnel = pool
        .connect(&"k", dialer(addr, &dials, Duration::ZERO), target(80))
        .await?;
    tunnel.write_all(b"before").await?;
    let mut buf = [0u8; 6];
    timeout(BOUND, tunnel.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"before");

    stop_tx.send(()).ok();
    // Once the client has seen the GOAWAY, the pool stops using the
    // draining connection and dials a new one for new tunnels.
    let start = Instant::now();
    while dials.load(Ordering::SeqCst) < 2 {
        anyhow::ensure!(
            start.elapsed() < BOUND,
            "pool never left the draining connection"
        );
        let s = pool
            .connect(&"k", dialer(addr, &dials, Duration::ZERO), target(80))
            .await
            .context("new tunnel during drain")?;
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!first.is_finished(), "server returned with a tunnel open");

    // The tunnel opened before the drain still carries data both ways.
    tunnel.write_all(b"after").await?;
    let mut buf = [0u8; 5];
    timeout(BOUND, tunnel.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"after");
    tunnel.shutdown().await?;
    timeout(BOUND, tunnel.read_to_end(&mut Vec::new())).await??;
    drop(tunnel);

    let served = timeout(BOUND, first).await???;
    served?;
    Ok(())
}

#[tokio::test]
async fn pool_recovers_when_a_dialling_caller_is_cancelled() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let (dialing_tx, dialing_rx) = oneshot::channel::<()>();
    let stuck = {
        let (pool, dials) = (pool.clone(), dials.clone());
        tokio::spawn(async move {
            let dial = move || {
                dials.fetch_add(1, Ordering::SeqCst);
                let _ = dialing_tx.send(());
                pending::<std::io::Result<TcpStream>>()
            };
            pool.connect(&"dest", dial, target(80)).await
        })
    };
    timeout(BOUND, dialing_rx).await??;
    // This caller queues behind the stuck dial...
    let waiter = {
        let pool = pool.clone();
        let dial = dialer(server.addr, &dials, Duration::ZERO);
        tokio::spawn(async move { pool.connect(&"dest", dial, target(80)).await })
    };
    eventually("the second caller to queue", || {
        pool.stats().get(&"dest").is_some_and(|s| s.dialing == 1)
    })
    .await?;
    // ...and dials itself once the first caller goes away.
    stuck.abort();
    let mut s = timeout(BOUND, waiter).await???;
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    s.write_all(b"ok").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, s.read_to_end(&mut got)).await??;
    assert_eq!(got, b"ok");
    assert_eq!(pool.stats()[&"dest"].dialing, 0);
    Ok(())
}

#[tokio::test]
async fn pool_close_refuses_new_tunnels_and_keeps_open_ones() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut open = pool
        .connect(
            &"k",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await?;
    pool.close();
    let err = pool
        .connect(
            &"k",
            dialer(server.addr, &dials, Duration::ZERO),
            target(80),
        )
        .await
        .expect_err("closed pool handed out a tunnel");
    assert!(matches!(err, HboneError::PoolClosed), "{err:?}");
    open.write_all(b"still open").await?;
    open.shutdown().await?;
    let mut got = Vec::new();
    timeout(BOUND, open.read_to_end(&mut got)).await??;
    assert_eq!(got, b"still open");
    Ok(())
}

/// A TCP relay that can stop forwarding, to simulate a peer that vanished
/// without closing anything.
async fn freezable_relay(upstream: SocketAddr) -> Result<(SocketAddr, Arc<AtomicBool>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(relay_half(dr, uw, f.clone()));
            tokio::spawn(relay_half(ur, dw, f.clone()));
        }
    });
    Ok((addr, frozen))
}

async fn relay_half(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, holding both sockets open.
            pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn keepalive_drops_a_connection_whose_peer_went_silent() -> Result<()> {
    let server = start_server(ServerConfig::default()).await?;
    let (relay, frozen) = freezable_relay(server.addr).await?;
    let pool = Pool::new(PoolConfig {
        keepalive_interval: Some(Duration::from_millis(50)),
        keepalive_timeout: Duration::from_secs(2),
        ..PoolConfig::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(&"k", dialer(relay, &dials, Duration::ZERO), target(80))
        .await?;
    s.write_all(b"hi").await?;
    let mut buf = [0u8; 2];
    timeout(BOUND, s.read_exact(&mut buf)).await??;
    // Several ping rounds succeed while the path is healthy.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.stats()[&"k"].connections, 1);

    frozen.store(true, Ordering::SeqCst);
    eventually("the silent connection to leave the pool", || {
        !pool.stats().contains_key(&"k")
    })
    .await?;
    // The tunnel over it fails instead of hanging.
    let r = timeout(BOUND, s.read(&mut buf)).await?;
    assert!(r.is_err(), "read on a dead connection returned {r:?}");
    Ok(())
}

#[tokio::test]
async fn flow_control_bounds_what_a_writer_can_queue() -> Result<()> {
    // A receiver that does not read must stall the sender after about one
    // stream window plus h2's send buffer, not let it queue without end.
    let stream_window = 256 * 1024;
    let send_buffer = 128 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let h = move |_req: ConnectRequest, responder: Responder| {
        let mut go = go_rx.clone();
        async move {
            let Ok(mut s) = responder.accept() else {
                return;
            };
            let _ = go.wait_for(|go| *go).await;
            let mut n = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(r) = s.read(&mut buf).await {
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            let _ = s.write_all(&n.to_be_bytes()).await;
            let _ = s.shutdown().await;
        }
    };
    tokio::spawn(accept_loop(
        listener,
        ServerConfig {
            stream_window,
            ..ServerConfig::default()
        },
        h,
    ));
    let pool = Pool::new(PoolConfig {
        send_buffer,
        ..PoolConfig::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let s = pool
        .connect(&"k", dialer(addr, &dials, Duration::ZERO), target(80))
        .await?;
    let (mut r, mut w) = tokio::io::split(s);
    let written = Arc::new(AtomicUsize::new(0));
    let total = 32 << 20;
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let chunk = vec![1u8; 16 * 1024];
            while written.load(Ordering::SeqCst) < total {
                w.write_all(&chunk).await?;
                written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            w.shutdown().await?;
            anyhow::Ok(w)
        })
    };
    // Wait until the writer stops making progress.
    let mut last = usize::MAX;
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
        anyhow::ensure!(start.elapsed() < BOUND, "writer never stalled");
    }
    assert!(
        last <= stream_window as usize + send_buffer + 64 * 1024,
        "writer queued {last} bytes against a {stream_window}-byte window"
    );
    assert!(
        last >= stream_window as usize / 2,
        "writer stalled early at {last}"
    );

    // Once the receiver reads, everything flows.
    go_tx.send(true)?;
    let _w = timeout(BOUND, writer).await???;
    let mut count = [0u8; 8];
    timeout(BOUND, r.read_exact(&mut count)).await??;
    assert_eq!(u64::from_be_bytes(count), total as u64);
    Ok(())
}

#[tokio::test]
async fn dropping_a_tunnel_resets_it() -> Result<()> {
    // Server side sees an error (not a clean EOF) when the client drops the
    // tunnel without shutdown.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (seen_tx, seen_rx) = oneshot::channel::<std::io::Result<usize>>();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let h = move |_req: ConnectRequest, responder: Responder| {
        let seen_tx = seen_tx.clone();
        async move {
            let Ok(mut s) = responder.accept() else {
                return;
            };
            let r = s.read_to_end(&mut Vec::new()).await;
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(r);
            }
        }
    };
    tokio::spawn(accept_loop(listener, ServerConfig::default(), h));
    let pool = Pool::new(PoolConfig::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(&"k", dialer(addr, &dials, Duration::ZERO), target(80))
        .await?;
    s.write_all(b"partial").await?;
    drop(s);
    let r = timeout(BOUND, seen_rx).await??;
    assert!(
        r.is_err(),
        "server read a clean EOF from a dropped tunnel: {r:?}"
    );
    Ok(())
}

// ---- throughput report (not a timed test: prints figures only) ----

/// Runs with `cargo test --release -p mesh-core --test hbone -- --ignored
/// --nocapture throughput`. `HBONE_BENCH_MIB` sets the payload (default
/// 1024), `HBONE_BENCH_REPS` the measured runs per case after one warm-up
/// run (median printed, default 3),
/// `HBONE_BENCH_ONLY` a substring of the case names to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; prints throughput figures"]
async fn throughput_report() -> Result<()> {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let total = env("HBONE_BENCH_MIB", 1024) << 20;
    let reps = env("HBONE_BENCH_REPS", 3).max(1);
    let only = std::env::var("HBONE_BENCH_ONLY").unwrap_or_default();
    println!("payload {} MiB, median of {reps} runs", total >> 20);

    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(r) = tcp.read(&mut buf).await {
                    if r == 0 {
                        break;
                    }
                    n += r as u64;
                }
                let _ = tcp.write_all(&n.to_be_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });

    let policies = [
        ("fixed 16K", BufferPolicy::fixed(16 * 1024)),
        ("fixed 256K", BufferPolicy::fixed(256 * 1024)),
        ("adaptive 16K..256K", BufferPolicy::default()),
        (
            "adaptive 16K..1M",
            BufferPolicy {
                max: 1 << 20,
                ..BufferPolicy::default()
            },
        ),
    ];
    let mut cases: Vec<(String, Case)> = vec![("direct TCP, no proxy".into(), Case::Direct)];
    for send_buffer in [400 * 1024, 1 << 20, 4 << 20] {
        cases.push((
            format!("H2Stream only, h2 send buffer {} KiB", send_buffer / 1024),
            Case::Tunnel { send_buffer },
        ));
    }
    for (name, policy) in policies {
        cases.push((
            format!("TCP>copy>TCP [{name}]"),
            Case::Proxy {
                policy,
                hbone: None,
            },
        ));
        for send_buffer in [400 * 1024, 1 << 20, 4 << 20] {
            cases.push((
                format!(
                    "TCP>copy>HBONE>copy>TCP [{name}, h2 buf {}K]",
                    send_buffer / 1024
                ),
                Case::Proxy {
                    policy,
                    hbone: Some(send_buffer),
                },
            ));
        }
    }
    for (name, case) in cases {
        if !name.contains(&only) {
            continue;
        }
        let mut runs = Vec::new();
        // The first run only warms the allocator and caches up: a fresh
        // process pays page faults a long-running proxy does not.
        for rep in 0..=reps {
            let secs = match case {
                Case::Direct => {
                    let start = Instant::now();
                    let mut direct = TcpStream::connect(sink_addr).await?;
                    send_and_count(&mut direct, total).await?;
                    start.elapsed().as_secs_f64()
                }
                Case::Tunnel { send_buffer } => tunnel_run(total, send_buffer).await?,
                Case::Proxy { policy, hbone } => proxy_run(total, sink_addr, policy, hbone).await?,
            };
            if rep > 0 {
                runs.push(gbit(total, secs));
            }
        }
        runs.sort_by(f64::total_cmp);
        println!(
            "{name:<46} {:>6.2} Gbit/s  (min {:.2}, max {:.2})",
            runs[runs.len() / 2],
            runs[0],
            runs[runs.len() - 1]
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Case {
    Direct,
    Tunnel {
        send_buffer: usize,
    },
    Proxy {
        policy: BufferPolicy,
        hbone: Option<usize>,
    },
}

/// A client writes straight into the tunnel; the server counts.
async fn tunnel_run(total: u64, send_buffer: usize) -> Result<f64> {
    let server = start_server(ServerConfig {
        send_buffer,
        ..ServerConfig::default()
    })
    .await?;
    let pool = Pool::new(PoolConfig {
        send_buffer,
        ..PoolConfig::default()
    });
    let dials = Arc::new(AtomicUsize::new(0));
    let mut s = pool
        .connect(
            &0,
            dialer(server.addr, &dials, Duration::ZERO),
            target(PORT_SINK),
        )
        .await?;
    let chunk = Bytes::from(vec![0x5a; 256 * 1024]);
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        u64::from_be_bytes(count) == total,
        "sink counted a different total"
    );
    Ok(secs)
}

fn gbit(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

async fn send_and_count(s: &mut TcpStream, total: u64) -> Result<()> {
    let chunk = vec![0x33u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    anyhow::ensure!(
        u64::from_be_bytes(count) == total,
        "sink counted a different total"
    );
    Ok(())
}

/// One proxied transfer; returns seconds.
/// `hbone` is the h2 send buffer to tunnel with, or `None` for plain TCP.
async fn proxy_run(
    total: u64,
    sink: SocketAddr,
    policy: BufferPolicy,
    hbone: Option<usize>,
) -> Result<f64> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let front_addr = front.local_addr()?;
    let send_buffer = hbone.unwrap_or(DEFAULT_SEND_BUFFER);
    let server = start_server_with_policy(
        ServerConfig {
            send_buffer,
            ..ServerConfig::default()
        },
        policy,
    )
    .await?;
    let proxy = tokio::spawn(async move {
        let (mut inbound, _) = front.accept().await?;
        inbound.set_nodelay(true)?;
        let counters = Counters::new();
        if hbone.is_some() {
            let pool = Pool::new(PoolConfig {
                send_buffer,
                ..PoolConfig::default()
            });
            let dials = Arc::new(AtomicUsize::new(0));
            let mut req = target(PORT_SINK + 1);
            req.headers
                .insert("x-test-target", sink.to_string().parse()?);
            let mut tunnel = pool
                .connect(&0, dialer(server.addr, &dials, Duration::ZERO), req)
                .await?;
            copy_bidirectional_with_policy(&mut inbound, &mut tunnel, &counters, policy).await?;
        } else {
            let mut up = TcpStream::connect(sink).await?;
            up.set_nodelay(true)?;
            copy_bidirectional_with_policy(&mut inbound, &mut up, &counters, policy).await?;
        }
        anyhow::Ok(counters.a_to_b())
    });
    let start = Instant::now();
    let mut client = TcpStream::connect(front_addr).await?;
    client.set_nodelay(true)?;
    send_and_count(&mut client, total).await?;
    let secs = start.elapsed().as_secs_f64();
    let forwarded = proxy.await??;
    anyhow::ensure!(forwarded == total, "proxy forwarded {forwarded} of {total}");
    Ok(secs)
}
