//! End-to-end routing through an in-process waypoint, no root needed: a
//! client opens an HBONE `CONNECT` to the waypoint for `VIP:port` and
//! speaks HTTP/1.1 or h2c inside it; the waypoint routes each request and
//! forwards it over HBONE to backends that are mesh-core HBONE servers in
//! front of a tiny HTTP app, each on its own loopback address.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::ca::CertificateAuthority;
use mesh_core::certs::{CertificateManager, LocalCaProvider, RotationConfig};
use mesh_core::hbone::{self, ConnectRequest, Pool, Responder, ServerConfig};
use mesh_core::identity::Identity;
use serde_json::{json, Value};

const VIP: &str = "10.96.0.20";
const PORT: u16 = 9080;
const HOST: &str = "reviews.default.svc.cluster.local";

/// Each test gets its own 127.77.<block>.0/24 for backends, so tests can
/// run in parallel on the same port.
static NEXT_BLOCK: AtomicU8 = AtomicU8::new(1);

/// `<pod> <authority> <path>` of every request any backend served.
static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// HBONE tunnels each backend pod accepted (one per upstream connection).
static TUNNELS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

fn tunnels_of(pod: &str) -> usize {
    TUNNELS
        .lock()
        .unwrap()
        .iter()
        .filter(|p| **p == pod)
        .count()
}

const MIRROR_HOST: &str = "reviews-mirror.default.svc.cluster.local";
const MIRROR_VIP: &str = "10.96.0.21";

struct Mesh {
    _dir: tempfile::TempDir,
    _drain: mesh_core::drain::Trigger,
    waypoint: SocketAddr,
    admin: SocketAddr,
    client_certs: CertificateManager,
    metrics: waypoint::metrics::Metrics,
    /// Each backend's HBONE address and pod name.
    backends: Vec<(SocketAddr, &'static str)>,
    /// The environment the waypoint was configured from.
    env: Vec<(String, String)>,
}

/// A backend pod: name, version label, and the address it listens on.
struct Backend {
    name: &'static str,
    version: &'static str,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny app behind each backend: echoes what it saw as JSON;
/// `/delay/<ms>` sleeps first.
async fn app(
    pod: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if pod.contains("bad") && path.starts_with("/flaky") {
        if path == "/flaky/slow" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut r = Response::new(Full::new(Bytes::from_static(b"flaky")));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(r);
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| h("host"));
    SEEN.lock()
        .unwrap()
        .push(format!("{pod} {authority} {path}"));
    let body = json!({
        "pod": pod,
        "path": path,
        "query": req.uri().query().unwrap_or(""),
        "authority": authority,
        "version": format!("{:?}", req.version()),
        "xff": h("x-forwarded-for"),
        "request_id": h("x-request-id"),
        "traceparent": h("traceparent"),
        "x_added": h("x-added"),
        "expected_timeout": h("x-envoy-expected-rq-timeout-ms"),
        "rq_timeout": h("x-envoy-upstream-rq-timeout-ms"),
        "per_try_timeout": h("x-envoy-upstream-rq-per-try-timeout-ms"),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

async fn start_backend(
    ca: Arc<CertificateAuthority>,
    addr: SocketAddr,
    b: &Backend,
) -> anyhow::Result<()> {
    let certs = CertificateManager::new(
        Arc::new(LocalCaProvider::new(ca, Duration::from_secs(3600))),
        RotationConfig::default(),
    );
    let id = Identity::new("cluster.local", "default", format!("sa-{}", b.name));
    let cert = certs.get(&id).await?;
    let tls = mesh_core::tls::server_config(&cert)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding backend {addr}"))?;
    let pod = b.name;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                    return;
                };
                let handler = move |_req: ConnectRequest, responder: Responder| async move {
                    let Ok(tunnel) = responder.accept() else {
                        return;
                    };
                    TUNNELS.lock().unwrap().push(pod);
                    let svc = hyper::service::service_fn(move |r| app(pod, r));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tunnel), svc)
                        .await;
                };
                let _ = hbone::serve_connection(
                    stream,
                    &ServerConfig::default(),
                    handler,
                    std::future::pending(),
                )
                .await;
            });
        }
    });
    Ok(())
}

fn workload(name: &str, version: &str, ip: IpAddr, host: &str) -> Value {
    json!({"workload": {
        "uid": format!("Kubernetes//Pod/default/{name}"),
        "name": name,
        "namespace": "default",
        "addresses": [ip.to_string()],
        "serviceAccount": format!("sa-{name}"),
        "tunnelProtocol": "HBONE",
        "canonicalName": "reviews",
        "canonicalRevision": version,
        "workloadName": format!("reviews-{version}"),
        "services": {format!("default/{host}"): {"ports": [{"servicePort": PORT, "targetPort": PORT}]}},
    }})
}

/// Starts backends and a waypoint whose local config has the `reviews`
/// service, the backends as its endpoints, and `routes` (ServiceRoutes
/// JSON for `reviews`, or null for none).
async fn mesh(backends: &[Backend], routes: Value) -> anyhow::Result<Mesh> {
    mesh_with_mirror(backends, &[], routes).await
}

/// As [`mesh`], plus a `reviews-mirror` service served by `mirrors`.
async fn mesh_with_mirror(
    backends: &[Backend],
    mirrors: &[Backend],
    routes: Value,
) -> anyhow::Result<Mesh> {
    let block = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed);
    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::generate("cluster.local")?;
    ca.write_dir(dir.path().join("ca"))?;
    let ca = Arc::new(ca);
    let port = free_port();
    let mut addresses = vec![json!({"service": {
        "name": "reviews", "namespace": "default", "hostname": HOST,
        "addresses": [{"address": VIP}],
        "ports": [{"servicePort": PORT, "targetPort": PORT}],
    }})];
    addresses.push(json!({"service": {
        "name": "reviews-mirror", "namespace": "default", "hostname": MIRROR_HOST,
        "addresses": [{"address": MIRROR_VIP}],
        "ports": [{"servicePort": PORT, "targetPort": PORT}],
    }}));
    let all = backends
        .iter()
        .map(|b| (b, HOST))
        .chain(mirrors.iter().map(|b| (b, MIRROR_HOST)));
    let mut started = Vec::new();
    for (i, (b, host)) in all.enumerate() {
        let ip: IpAddr = format!("127.77.{block}.{}", i + 1).parse()?;
        start_backend(ca.clone(), SocketAddr::new(ip, port), b).await?;
        started.push((SocketAddr::new(ip, port), b.name));
        addresses.push(workload(b.name, b.version, ip, host));
    }
    let routes = if routes.is_null() {
        json!([])
    } else {
        json!([routes])
    };
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&json!({"addresses": addresses, "routes": routes}))?,
    )?;
    let ca_dir = dir.path().join("ca").display().to_string();
    let file_s = file.display().to_string();
    let port_s = port.to_string();
    let env = [
        ("LOCAL_XDS_PATH", file_s.as_str()),
        ("LOCAL_CA_DIR", ca_dir.as_str()),
        ("HBONE_ADDR", "127.0.0.1:0"),
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("STATS_ADDR", "127.0.0.1:0"),
        ("READINESS_ADDR", "127.0.0.1:0"),
        ("UPSTREAM_HBONE_PORT", port_s.as_str()),
        ("POD_NAMESPACE", "default"),
        ("SERVICE_ACCOUNT", "waypoint"),
    ];
    let cfg = waypoint::config::Config::from_env(&env)?;
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (trigger, watch) = mesh_core::drain::new();
    let app = waypoint::start(cfg, watch).await?;
    tokio::time::timeout(Duration::from_secs(10), app.ready.wait_ready())
        .await
        .context("waypoint not ready")?;
    let client_certs = CertificateManager::new(
        Arc::new(LocalCaProvider::new(ca, Duration::from_secs(3600))),
        RotationConfig::default(),
    );
    Ok(Mesh {
        _dir: dir,
        _drain: trigger,
        waypoint: app.hbone_addr,
        admin: app.admin_addr,
        client_certs,
        metrics: app.metrics,
        backends: started,
        env,
    })
}

/// One HTTP connection inside one HBONE tunnel to the waypoint.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn pod(&self) -> String {
        self.json()["pod"].as_str().unwrap_or("").to_string()
    }
}

impl Mesh {
    async fn client(&self, h2: bool) -> anyhow::Result<Client> {
        let io = TokioIo::new(self.tunnel().await?);
        Ok(if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Client::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Client::H1(s)
        })
    }

    /// An HBONE tunnel to the waypoint for the reviews VIP.
    async fn tunnel(&self) -> anyhow::Result<hbone::H2Stream> {
        let waypoint = Identity::new("cluster.local", "default", "waypoint");
        self.tunnel_to(self.waypoint, waypoint).await
    }

    /// An HTTP/1.1 client to another waypoint (a separate process).
    async fn client_via(&self, wp: SocketAddr) -> anyhow::Result<Client> {
        let waypoint = Identity::new("cluster.local", "default", "waypoint");
        let io = TokioIo::new(self.tunnel_to(wp, waypoint).await?);
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Client::H1(s))
    }

    /// An HTTP/1.1 client straight to a backend pod, bypassing the waypoint.
    async fn direct_client(&self, i: usize) -> anyhow::Result<Client> {
        let (addr, pod) = self.backends[i];
        let id = Identity::new("cluster.local", "default", format!("sa-{pod}"));
        let io = TokioIo::new(self.tunnel_to(addr, id).await?);
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Client::H1(s))
    }

    async fn tunnel_to(&self, wp: SocketAddr, peer: Identity) -> anyhow::Result<hbone::H2Stream> {
        self.tunnel_from(wp, peer, "10.244.1.5:40000".parse()?)
            .await
    }

    /// A tunnel whose `Forwarded` header names `client` as the source.
    async fn tunnel_from(
        &self,
        wp: SocketAddr,
        peer: Identity,
        client: SocketAddr,
    ) -> anyhow::Result<hbone::H2Stream> {
        let id = Identity::new("cluster.local", "default", "productpage");
        let cert = self.client_certs.get(&id).await?;
        let expected = vec![peer];
        let dial = move || async move {
            let tcp = tokio::net::TcpStream::connect(wp).await?;
            let cfg =
                mesh_core::tls::client_config(&cert, &expected).map_err(std::io::Error::other)?;
            let name = rustls::pki_types::ServerName::IpAddress(wp.ip().into());
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
        };
        let pool: Pool<u8> = Pool::new(hbone::PoolConfig::default());
        let vip: SocketAddr = SocketAddr::new(VIP.parse()?, PORT);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::FORWARDED,
            hbone::headers::forwarded(client, Some(HOST))?,
        );
        Ok(pool
            .connect(&0, dial, ConnectRequest::new(vip).with_headers(headers))
            .await?)
    }
}

impl Client {
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        let mut b = Request::builder().method("GET");
        b = match self {
            Client::H1(_) => b.uri(path).header("host", "reviews:9080"),
            Client::H2(_) => b
                .uri(format!("http://reviews:9080{path}"))
                .version(http::Version::HTTP_2),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new()))?;
        let resp = match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Client::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))?;
    let resp = s.send_request(req).await?;
    Ok(String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned())
}

fn reviews_backends() -> Vec<Backend> {
    vec![
        Backend {
            name: "reviews-v1-a",
            version: "v1",
        },
        Backend {
            name: "reviews-v2-a",
            version: "v2",
        },
    ]
}

fn subsets() -> Value {
    json!([
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
    ])
}

#[tokio::test]
async fn default_route_reaches_backends_over_http1_and_h2c() -> anyhow::Result<()> {
    let mesh = mesh(&reviews_backends(), Value::Null).await?;
    let mut seen = std::collections::BTreeSet::new();
    for h2 in [false, true] {
        let mut c = mesh.client(h2).await?;
        for _ in 0..4 {
            let r = c
                .get("/reviews/1?x=1", &[("x-request-id", "rid-1")])
                .await?;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let j = r.json();
            assert_eq!(j["path"], "/reviews/1");
            assert_eq!(j["query"], "x=1");
            assert_eq!(
                j["xff"], "10.244.1.5",
                "x-forwarded-for is the original client"
            );
            assert_eq!(j["request_id"], "rid-1");
            assert_eq!(j["traceparent"].as_str().unwrap().len(), 55);
            assert_eq!(j["version"], if h2 { "HTTP/2.0" } else { "HTTP/1.1" });
            assert_eq!(j["authority"], "reviews:9080");
            seen.insert(r.pod());
        }
        // A generated request id when the client sent none.
        let r = c.get("/", &[]).await?;
        assert_eq!(r.json()["request_id"].as_str().unwrap().len(), 36);
    }
    assert_eq!(seen.len(), 2, "round robin over both endpoints: {seen:?}");
    let dump = admin_get(mesh.admin, "/config_dump").await?;
    assert!(
        dump.contains("reviews-v1-a") && dump.contains(HOST),
        "{dump}"
    );
    assert!(
        dump.contains("spiffe://cluster.local/ns/default/sa/waypoint"),
        "{dump}"
    );
    let text = mesh.metrics.encode();
    assert!(
        text.contains("istio_requests_total{reporter=\"waypoint\""),
        "{text}"
    );
    assert!(text.contains("destination_service=\"reviews.default.svc.cluster.local\""));
    assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/productpage\""));
    assert!(text.contains("istio_request_duration_milliseconds_bucket"));
    Ok(())
}

#[tokio::test]
async fn header_match_routes_to_subset() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "ports": [{"port": PORT, "protocol": "HTTP"}],
        "httpRoutes": [
            {"name": "jason",
             "matches": [{"headers": [{"name": "end-user", "exact": "jason"}]}],
             "route": {"destinations": [{"host": HOST, "subset": "v2"}]},
             "requestHeaders": {"set": {"x-added": "yes"}},
             "responseHeaders": {"add": {"x-route": "jason"}}},
            {"name": "rest", "route": {"destinations": [{"host": "reviews", "subset": "v1"}]}},
        ],
        "subsets": subsets(),
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    for h2 in [false, true] {
        let mut c = mesh.client(h2).await?;
        for _ in 0..5 {
            let r = c.get("/", &[("end-user", "jason")]).await?;
            assert_eq!(r.pod(), "reviews-v2-a", "{}", r.body);
            assert_eq!(r.json()["x_added"], "yes");
            assert_eq!(r.headers["x-route"], "jason");
            let r = c.get("/", &[("end-user", "other")]).await?;
            assert_eq!(r.pod(), "reviews-v1-a", "{}", r.body);
            assert!(!r.headers.contains_key("x-route"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn subsets_resolved_by_the_control_plane_use_its_uid_list() -> anyhow::Result<()> {
    let to = |subset: &str| {
        json!({"name": subset,
               "matches": [{"headers": [{"name": "x-subset", "exact": subset}]}],
               "route": {"destinations": [{"host": HOST, "subset": subset}]}})
    };
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "ports": [{"port": PORT, "protocol": "HTTP"}],
        "httpRoutes": [to("canary"), to("pinned"), to("nomatch"), to("v2")],
        "subsets": [
            // A pod label the Workload API does not carry.
            {"name": "canary", "labels": {"track": "canary"},
             "workloadUids": ["Kubernetes//Pod/default/reviews-v2-a"], "labelsResolved": true},
            // The list wins over the labels the workloads imply.
            {"name": "pinned", "labels": {"version": "v2", "env": "prod"},
             "workloadUids": ["Kubernetes//Pod/default/reviews-v1-a"], "labelsResolved": true},
            // Resolved to nothing: no pod matches.
            {"name": "nomatch", "labels": {"version": "v1", "env": "prod"},
             "workloadUids": [], "labelsResolved": true},
            // An older control plane: the waypoint matches the labels.
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    for h2 in [false, true] {
        let mut c = mesh.client(h2).await?;
        for _ in 0..3 {
            let r = c.get("/", &[("x-subset", "canary")]).await?;
            assert_eq!(r.pod(), "reviews-v2-a", "{}", r.body);
            let r = c.get("/", &[("x-subset", "pinned")]).await?;
            assert_eq!(r.pod(), "reviews-v1-a", "{}", r.body);
            let r = c.get("/", &[("x-subset", "v2")]).await?;
            assert_eq!(r.pod(), "reviews-v2-a", "{}", r.body);
        }
        let r = c.get("/", &[("x-subset", "nomatch")]).await?;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "no healthy upstream");
    }
    Ok(())
}

#[tokio::test]
async fn weights_split_80_20() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "split", "route": {"destinations": [
            {"host": HOST, "subset": "v1", "weight": 80},
            {"host": HOST, "subset": "v2", "weight": 20},
        ]}}],
        "subsets": subsets(),
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    let mut c = mesh.client(true).await?;
    let mut v1 = 0;
    for _ in 0..200 {
        let r = c.get("/", &[]).await?;
        assert_eq!(r.status, StatusCode::OK);
        if r.pod() == "reviews-v1-a" {
            v1 += 1;
        }
    }
    // Binomial(200, 0.8): mean 160, sd ~5.7; +-25 is over 4 sd.
    assert!((135..=185).contains(&v1), "v1 got {v1} of 200");
    Ok(())
}

#[tokio::test]
async fn fault_abort_and_delay() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [
            {"name": "abort", "matches": [{"uri": {"prefix": "/abort"}}],
             "fault": {"abort": {"httpStatus": 503, "percent": 100.0}}},
            {"name": "never", "matches": [{"uri": {"prefix": "/never"}}],
             "fault": {"abort": {"httpStatus": 500, "percent": 0.0}}},
            {"name": "delay", "matches": [{"uri": {"prefix": "/slow"}}],
             "fault": {"delay": {"fixedDelayMs": "300", "percent": 100.0}}},
        ],
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    let mut c = mesh.client(false).await?;
    let r = c.get("/abort", &[]).await?;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "fault filter abort");
    let r = c.get("/never", &[]).await?;
    assert_eq!(r.status, StatusCode::OK);
    let t = Instant::now();
    let r = c.get("/slow", &[]).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // No route matched: 404 like Envoy's NR.
    let r = c.get("/other", &[]).await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(mesh.metrics.encode().contains("response_flags=\"FI\""));
    Ok(())
}

#[tokio::test]
async fn timeout_gives_504() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "t", "timeoutMs": "200"}],
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    for h2 in [false, true] {
        let mut c = mesh.client(h2).await?;
        let t = Instant::now();
        let r = c.get("/delay/2000", &[]).await?;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.body, "upstream request timeout");
        assert!(t.elapsed() < Duration::from_millis(1500));
        if h2 {
            let r = c.get("/delay/10", &[]).await?;
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    Ok(())
}

#[tokio::test]
async fn redirect_and_rewrite() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [
            {"name": "moved", "matches": [{"uri": {"exact": "/old"}}],
             "redirect": {"uri": "/new", "authority": "reviews.other:9080"}},
            {"name": "rw", "matches": [{"uri": {"prefix": "/api/"}}],
             "rewrite": {"uriPrefix": "/v2/", "authority": "reviews-internal"}},
        ],
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    let mut c = mesh.client(false).await?;
    let r = c.get("/old", &[]).await?;
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.headers["location"], "http://reviews.other:9080/new");
    let r = c.get("/api/x?q=1", &[]).await?;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["path"], "/v2/x");
    assert_eq!(r.json()["query"], "q=1");
    assert_eq!(r.json()["authority"], "reviews-internal");
    Ok(())
}

#[tokio::test]
async fn no_endpoints_gives_503() -> anyhow::Result<()> {
    let mesh = mesh(&[], Value::Null).await?;
    for h2 in [false, true] {
        let mut c = mesh.client(h2).await?;
        let r = c.get("/", &[]).await?;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "no healthy upstream");
    }
    Ok(())
}

#[tokio::test]
async fn retries_move_to_another_endpoint() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [
            {"name": "no-retry", "matches": [{"headers": [{"name": "x-no-retry", "present": true}]}],
             "retries": {"attempts": 0}},
            {"name": "retry", "retries": {"attempts": 3, "retryOn": ["5xx"], "perTryTimeoutMs": "1000"}},
        ],
    });
    let backends = vec![
        Backend {
            name: "reviews-bad",
            version: "v1",
        },
        Backend {
            name: "reviews-good",
            version: "v1",
        },
    ];
    let mesh = mesh(&backends, routes).await?;
    let mut c = mesh.client(true).await?;
    for _ in 0..10 {
        let r = c.get("/flaky", &[]).await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.pod(), "reviews-good");
    }
    let mut failed = 0;
    for _ in 0..10 {
        let r = c.get("/flaky", &[("x-no-retry", "1")]).await?;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.body, "flaky");
            failed += 1;
        }
    }
    assert_eq!(
        failed, 5,
        "round robin without retries hits the bad endpoint half the time"
    );
    Ok(())
}

#[tokio::test]
async fn mirror_sends_shadow_copy() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "m", "mirrors": [{"host": MIRROR_HOST, "percent": 100.0}]}],
    });
    let backends = vec![Backend {
        name: "reviews-primary",
        version: "v1",
    }];
    let mirrors = vec![Backend {
        name: "reviews-shadow-pod",
        version: "v1",
    }];
    let mesh = mesh_with_mirror(&backends, &mirrors, routes).await?;
    let mut c = mesh.client(false).await?;
    let r = c.get("/mirrored", &[]).await?;
    assert_eq!(r.pod(), "reviews-primary");
    let want = "reviews-shadow-pod reviews-shadow:9080 /mirrored";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !SEEN.lock().unwrap().iter().any(|l| l == want) {
        assert!(
            Instant::now() < deadline,
            "mirror never arrived: {:?}",
            SEEN.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn tcp_port_is_passed_through() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "ports": [{"port": PORT, "protocol": "TCP"}],
        // Never applied: the port is opaque TCP.
        "httpRoutes": [{"name": "abort", "fault": {"abort": {"httpStatus": 500, "percent": 100.0}}}],
    });
    let mesh = mesh(
        &[Backend {
            name: "reviews-tcp",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let mut c = mesh.client(false).await?;
    let r = c.get("/raw", &[]).await?;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    assert_eq!(j["pod"], "reviews-tcp");
    // The waypoint did not touch the HTTP: no headers were added.
    assert_eq!(j["xff"], "");
    assert_eq!(j["request_id"], "");
    Ok(())
}

#[tokio::test]
async fn consistent_hash_on_header_is_sticky() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
    });
    let backends = vec![
        Backend {
            name: "reviews-h1",
            version: "v1",
        },
        Backend {
            name: "reviews-h2",
            version: "v1",
        },
        Backend {
            name: "reviews-h3",
            version: "v1",
        },
    ];
    let mesh = mesh(&backends, routes).await?;
    let mut c = mesh.client(true).await?;
    let mut pods = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let first = c.get("/", &[("x-user", user)]).await?.pod();
        for _ in 0..4 {
            assert_eq!(
                c.get("/", &[("x-user", user)]).await?.pod(),
                first,
                "{user}"
            );
        }
        pods.insert(first);
    }
    assert!(pods.len() > 1, "eight users all hashed to {pods:?}");
    Ok(())
}

#[tokio::test]
async fn grpc_request_body_is_streamed() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use hyper::body::Frame;
    let mesh = mesh(
        &[Backend {
            name: "reviews-grpc",
            version: "v1",
        }],
        Value::Null,
    )
    .await?;
    let io = TokioIo::new(mesh.tunnel().await?);
    let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    let body = http_body_util::StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let req = Request::post("http://reviews:9080/pkg.Svc/Stream")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .body(body)?;
    tx.unbounded_send(Bytes::from_static(b"\0\0\0\0\0"))?;
    // The request stays open: a proxy that waited for its end would never
    // answer.
    let resp = tokio::time::timeout(Duration::from_secs(5), s.send_request(req))
        .await
        .context("response while the request body is still open")??;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await?.to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("reviews-grpc"));
    drop(tx);
    let text = mesh.metrics.encode();
    assert!(text.contains("request_protocol=\"grpc\""), "{text}");
    Ok(())
}

#[tokio::test]
async fn circuit_breaker_overflows() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"connectionPool": {"maxConnections": 1, "http2MaxRequests": 1}},
    });
    let mesh = mesh(
        &[Backend {
            name: "reviews-cb",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut c = mesh.client(true).await?;
        calls.push(tokio::spawn(async move { c.get("/delay/1000", &[]).await }));
    }
    let mut codes = Vec::new();
    for call in calls {
        let r = call.await??;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(r.body.ends_with("reset reason: overflow"), "{}", r.body);
        }
        codes.push(r.status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [200, 503, 503], "one in flight at a time");
    assert!(mesh.metrics.encode().contains("response_flags=\"UO\""));
    Ok(())
}

#[tokio::test]
async fn outlier_detection_ejects_failing_endpoint() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "no-retry", "retries": {"attempts": 0}}],
        "trafficPolicy": {"outlierDetection": {
            "consecutive5xxErrors": 1, "maxEjectionPercent": 100, "baseEjectionTimeMs": "60000"}},
    });
    let backends = vec![
        Backend {
            name: "reviews-od-bad",
            version: "v1",
        },
        Backend {
            name: "reviews-od-good",
            version: "v1",
        },
    ];
    let mesh = mesh(&backends, routes).await?;
    let mut c = mesh.client(false).await?;
    let mut failures = 0;
    for _ in 0..12 {
        if c.get("/flaky", &[]).await?.status != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 1,
        "the bad endpoint is ejected after its first 5xx"
    );
    // The ejection is counted in Envoy's stats.
    let stats = admin_get(mesh.admin, "/stats").await?;
    for want in [
        format!("cluster.outbound|{PORT}||{HOST}.outlier_detection.ejections_enforced_total: 1"),
        format!("cluster.outbound|{PORT}||{HOST}.outlier_detection.ejections_active: 1"),
    ] {
        assert!(stats.lines().any(|l| l == want), "{want}\n{stats}");
    }
    Ok(())
}

#[tokio::test]
async fn envoy_timeout_headers_override_the_route() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "t", "timeoutMs": "200",
                        "retries": {"attempts": 0, "perTryTimeoutMs": "150"}}],
    });
    let mesh = mesh(&reviews_backends(), routes).await?;
    let mut c = mesh.client(false).await?;
    // The route's 200 ms would cut this off; the header gives it 3 s, and
    // the per-try timeout of the route (150 ms) is not below it, so the
    // header's per-try value (2500 ms) applies.
    let r = c
        .get(
            "/delay/400",
            &[
                ("x-envoy-upstream-rq-timeout-ms", "3000"),
                ("x-envoy-upstream-rq-per-try-timeout-ms", "2500"),
            ],
        )
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let j = r.json();
    assert_eq!(j["rq_timeout"], "", "stripped from the upstream request");
    assert_eq!(j["per_try_timeout"], "");
    assert_eq!(j["expected_timeout"], "2500");
    // 0 turns the timeout off (the route's per-try timeout still holds).
    let r = c
        .get("/delay/100", &[("x-envoy-upstream-rq-timeout-ms", "0")])
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["expected_timeout"], "150");
    // Not a number: ignored, the route's timeout applies.
    let r = c
        .get("/delay/400", &[("x-envoy-upstream-rq-timeout-ms", "1s")])
        .await?;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    // A shorter timeout than the route's.
    let t = Instant::now();
    let r = c
        .get("/delay/1000", &[("x-envoy-upstream-rq-timeout-ms", "50")])
        .await?;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        t.elapsed() < Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
    // Without headers the upstream learns the route's per-try timeout.
    let r = c.get("/", &[]).await?;
    assert_eq!(r.json()["expected_timeout"], "150");
    Ok(())
}

#[tokio::test]
async fn upstream_connections_are_reused_up_to_max_requests_per_connection() -> anyhow::Result<()> {
    let one = |name: &'static str| {
        vec![Backend {
            name,
            version: "v1",
        }]
    };
    let plain = mesh(&one("reviews-keepalive"), Value::Null).await?;
    for h2 in [false, true] {
        let mut c = plain.client(h2).await?;
        for _ in 0..10 {
            assert_eq!(c.get("/", &[]).await?.status, StatusCode::OK);
        }
    }
    assert_eq!(
        tunnels_of("reviews-keepalive"),
        2,
        "one kept-alive upstream connection per protocol"
    );

    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"connectionPool": {"maxRequestsPerConnection": 3}},
    });
    let limited = mesh(&one("reviews-per-conn"), routes).await?;
    let mut c = limited.client(false).await?;
    for _ in 0..9 {
        assert_eq!(c.get("/", &[]).await?.status, StatusCode::OK);
    }
    assert_eq!(
        tunnels_of("reviews-per-conn"),
        3,
        "a new connection every 3 requests"
    );
    Ok(())
}

/// Istio's circuit-breaking task: maxConnections 1, http1MaxPendingRequests
/// 1, maxRequestsPerConnection 1, and a load generator with 2 then 3
/// concurrent connections of 20 requests each.
#[tokio::test]
async fn istio_circuit_breaking_task() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"connectionPool": {
            "maxConnections": 1, "http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}},
    });
    let mesh = mesh(
        &[Backend {
            name: "reviews-cbtask",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let mut results = Vec::new();
    for conns in [2, 3] {
        let mut calls = Vec::new();
        for _ in 0..conns {
            let mut c = mesh.client(false).await?;
            calls.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..20 {
                    let r = c.get("/delay/2", &[]).await?;
                    if r.status == StatusCode::SERVICE_UNAVAILABLE {
                        anyhow::ensure!(r.body.ends_with("reset reason: overflow"), "{}", r.body);
                    }
                    codes.push(r.status.as_u16());
                }
                anyhow::Ok(codes)
            }));
        }
        let (mut ok, mut overflow) = (0, 0);
        for call in calls {
            for code in call.await?? {
                match code {
                    200 => ok += 1,
                    503 => overflow += 1,
                    other => anyhow::bail!("unexpected status {other}"),
                }
            }
        }
        println!("{conns} connections: {ok} x 200, {overflow} x 503");
        results.push((ok, overflow));
    }
    let (ok2, of2) = results[0];
    let (ok3, of3) = results[1];
    assert!(
        ok2 > of2,
        "most requests pass with 2 connections: {results:?}"
    );
    assert!(of3 > 0 && ok3 > 0, "{results:?}");
    let stats = admin_get(mesh.admin, "/stats").await?;
    let line = format!(
        "cluster.outbound|{PORT}||{HOST}.upstream_rq_pending_overflow: {}",
        of2 + of3
    );
    assert!(
        stats.lines().any(|l| l == line),
        "each overflow is counted once: want {line}\n{stats}"
    );
    let filtered = admin_get(mesh.admin, "/stats?filter=reviews.default.*pending_total").await?;
    assert_eq!(filtered.lines().count(), 1, "{filtered}");
    let text = mesh.metrics.encode();
    let want = format!(
        "envoy_cluster_upstream_rq_pending_overflow{{cluster_name=\"outbound|{PORT}||{HOST}\"}} {}",
        of2 + of3
    );
    assert!(text.contains(&want), "{want}\n{text}");
    let uo: u64 = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"UO\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(uo, (of2 + of3) as u64);
    assert!(text.contains("istio_response_bytes_bucket{"));
    assert!(text.contains("istio_request_bytes_sum{"));
    Ok(())
}

#[tokio::test]
async fn concurrent_retries_beyond_max_retries_overflow() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "httpRoutes": [{"name": "r", "retries": {"attempts": 1, "retryOn": ["5xx"]}}],
        "trafficPolicy": {"connectionPool": {"maxRetries": 1}},
    });
    let mesh = mesh(
        &[Backend {
            name: "reviews-bad-retry",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut c = mesh.client(false).await?;
        calls.push(tokio::spawn(async move { c.get("/flaky/slow", &[]).await }));
    }
    for call in calls {
        assert_eq!(call.await??.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let text = mesh.metrics.encode();
    let want = format!(
        "envoy_cluster_upstream_rq_retry_overflow{{cluster_name=\"outbound|{PORT}||{HOST}\"}} 2"
    );
    assert!(text.contains(&want), "{want}\n{text}");
    Ok(())
}

/// CPU seconds this process has used (user + system), from /proc.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks of 1/100 s.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// Not a timed test: prints the CPU cost of a request through the waypoint
/// next to the same request sent straight to the backend's HBONE server.
/// Run with `cargo test --release -p waypoint --test routing -- --ignored
/// --nocapture cpu_per_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn cpu_per_request() -> anyhow::Result<()> {
    const N: usize = 5000;
    let bench = mesh(
        &[Backend {
            name: "reviews-bench",
            version: "v1",
        }],
        Value::Null,
    )
    .await?;
    let mut c = bench.client(false).await?;
    for _ in 0..200 {
        c.get("/", &[]).await?;
    }
    let (cpu0, t0) = (process_cpu_seconds(), Instant::now());
    for _ in 0..N {
        c.get("/", &[]).await?;
    }
    let (via_cpu, via_wall) = (process_cpu_seconds() - cpu0, t0.elapsed());

    // Direct: the same client stack to the backend's HBONE port.
    let mut d = bench.direct_client(0).await?;
    for _ in 0..200 {
        d.get("/", &[]).await?;
    }
    let (cpu0, t0) = (process_cpu_seconds(), Instant::now());
    for _ in 0..N {
        d.get("/", &[]).await?;
    }
    let (direct_cpu, direct_wall) = (process_cpu_seconds() - cpu0, t0.elapsed());
    let us = |cpu: f64| cpu * 1e6 / N as f64;
    println!(
        "through the waypoint: {:.1} us CPU/request, {:.0} req/s (client and backend included)",
        us(via_cpu),
        N as f64 / via_wall.as_secs_f64()
    );
    println!(
        "direct: {:.1} us CPU/request, {:.0} req/s",
        us(direct_cpu),
        N as f64 / direct_wall.as_secs_f64()
    );
    println!(
        "waypoint's own share: {:.1} us CPU/request = {:.3} cores at 1000 req/s; ratio {:.2}",
        us(via_cpu - direct_cpu),
        (via_cpu - direct_cpu) * 1000.0 / N as f64,
        via_cpu / direct_cpu.max(1e-9)
    );

    // A new upstream tunnel and connection per request (what
    // maxRequestsPerConnection 1 asks for), for comparison with reuse.
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"connectionPool": {"maxRequestsPerConnection": 1}},
    });
    let fresh = mesh(
        &[Backend {
            name: "reviews-bench-fresh",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let mut c = fresh.client(false).await?;
    for _ in 0..200 {
        c.get("/", &[]).await?;
    }
    let (cpu0, t0) = (process_cpu_seconds(), Instant::now());
    for _ in 0..N {
        c.get("/", &[]).await?;
    }
    let (fresh_cpu, fresh_wall) = (process_cpu_seconds() - cpu0, t0.elapsed());
    println!(
        "through the waypoint, one upstream connection per request: {:.1} us CPU/request, {:.0} req/s",
        us(fresh_cpu),
        N as f64 / fresh_wall.as_secs_f64()
    );
    Ok(())
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 100.0
}

/// Not a timed test: runs the waypoint binary (build it with `--release`
/// for meaningful numbers), prints its RSS at idle, then paces 1,000
/// HTTP/1.1 requests/s through it for a few seconds and prints the cores
/// and RSS it used. Run with `cargo test --release -p waypoint --test
/// routing -- --ignored --nocapture binary_cost_at_1000_rps`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn binary_cost_at_1000_rps() -> anyhow::Result<()> {
    const SECONDS: u64 = 5;
    let m = mesh(
        &[Backend {
            name: "reviews-binary",
            version: "v1",
        }],
        Value::Null,
    )
    .await?;
    let hbone = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ready = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .envs(m.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("HBONE_ADDR", hbone.to_string())
        .env("READINESS_ADDR", ready.to_string())
        .env("ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("STATS_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(b) = admin_get(ready, "/healthz/ready").await {
                if b.starts_with("ready") {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "waypoint binary never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("idle RSS: {} kB", proc_field(pid, "VmRSS:"));
        let mut c = m.client_via(hbone).await?;
        for _ in 0..100 {
            c.get("/", &[]).await?;
        }
        let cpu0 = proc_cpu_seconds(pid);
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let n = SECONDS * 1000;
        for _ in 0..n {
            tick.tick().await;
            let r = c.get("/", &[]).await?;
            anyhow::ensure!(r.status == StatusCode::OK, "{}", r.body);
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = proc_cpu_seconds(pid) - cpu0;
        println!(
            "{n} requests in {wall:.2} s ({:.0} req/s): waypoint used {cpu:.2} s CPU = {:.3} cores, \
             {:.1} us/request; RSS {} kB (peak {} kB)",
            n as f64 / wall,
            cpu / wall,
            cpu * 1e6 / n as f64,
            proc_field(pid, "VmRSS:"),
            proc_field(pid, "VmHWM:"),
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[tokio::test]
async fn idle_connection_of_another_client_makes_room() -> anyhow::Result<()> {
    let routes = json!({
        "hostname": HOST, "namespace": "default",
        "trafficPolicy": {"connectionPool": {"maxConnections": 1}},
    });
    let mesh = mesh(
        &[Backend {
            name: "reviews-evict",
            version: "v1",
        }],
        routes,
    )
    .await?;
    let waypoint = Identity::new("cluster.local", "default", "waypoint");
    for client in ["10.244.1.7:1000", "10.244.1.8:1000", "10.244.1.7:1001"] {
        let io = TokioIo::new(
            mesh.tunnel_from(mesh.waypoint, waypoint.clone(), client.parse()?)
                .await?,
        );
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let mut c = Client::H1(s);
        // The first client's idle upstream connection holds the only slot;
        // the next client's request closes it instead of waiting forever.
        let r = tokio::time::timeout(Duration::from_secs(5), c.get("/", &[]))
            .await
            .context("request waited for an idle connection of another client")??;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    Ok(())
}
