//! The built-in sample apps as users observe them, on loopback (no root):
//! each app runs as the `sample-app` binary on a free port
//! (`SAMPLE_APP_PORT=0`), wired to the others through the same variables
//! the Bookinfo images read (`DETAILS_HOSTNAME`, `REVIEWS_SERVICE_PORT`, ...).
//! Small stub servers stand in for callees where a test needs to see what a
//! service sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const REVIEWS_ERROR: &str = "Sorry, product reviews are currently unavailable for this book.";
const DETAILS_ERROR: &str = "Sorry, product details are currently unavailable for this book.";

fn binary() -> std::path::PathBuf {
    e2e::app::binary("sample-app").expect("sample-app binary")
}

/// A running sample app, killed when dropped.
struct App {
    child: Child,
    port: u16,
}

impl App {
    fn start(args: &[&str], env: &[(&str, String)]) -> App {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env("SAMPLE_APP_PORT", "0")
            .env_remove("HOSTNAME")
            .env_remove("CLUSTER_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start sample-app");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                        let _ = tx.send(port);
                        sent = true;
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{args:?} did not announce its port"));
        App { child, port }
    }

    fn host(&self) -> String {
        "127.0.0.1".to_string()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 exchange on a fresh connection: (status, head, body).
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = request(port, "GET", path, &[], "");
    (status, body)
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A stub HTTP server answering every request with `status` and `body`
/// (after `delay`), recording each request's head (lower-cased).
struct Stub {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    fn start(status: u16, body: &'static str, delay: Duration) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line.to_ascii_lowercase());
                    }
                    record.lock().unwrap().push(head);
                    std::thread::sleep(delay);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes());
                });
            }
        });
        Stub { port, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn env(pairs: &[(&str, String)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .map(|(k, v)| (Box::leak(k.to_string().into_boxed_str()) as &str, v.clone()))
        .collect()
}

fn upstream_env(prefix: &str, port: u16) -> Vec<(&'static str, String)> {
    env(&[
        (&format!("{prefix}_HOSTNAME"), "127.0.0.1".to_string()),
        (&format!("{prefix}_SERVICE_PORT"), port.to_string()),
    ])
}

const REVIEWS_STUB: &str =
    r#"{"id": "0","podname": "reviews-stub","clustername": "null","reviews": []}"#;

#[test]
fn productpage_shows_details_and_black_star_reviews() {
    let ratings = App::start(&["ratings"], &[]);
    let details = App::start(&["details"], &[]);
    let mut reviews_env = upstream_env("RATINGS", ratings.port);
    reviews_env.push(("HOSTNAME", "reviews-v2-5b667bcbf8-abcde".to_string()));
    reviews_env.push(("CLUSTER_NAME", "cluster-east".to_string()));
    let reviews = App::start(&["reviews-v2"], &reviews_env);
    let mut page_env = upstream_env("DETAILS", details.port);
    page_env.extend(upstream_env("REVIEWS", reviews.port));
    let page = App::start(&["productpage"], &page_env);

    let (status, body) = get(page.port, "/productpage");
    assert_eq!(status, 200);
    assert!(
        body.contains("<title>Simple Bookstore App</title>"),
        "{body}"
    );
    assert!(
        body.contains("PublisherA") && body.contains("123-1234567890"),
        "{body}"
    );
    assert!(body.contains("text-black-500"), "{body}");
    assert!(!body.contains("text-red-500"));
    assert!(
        body.contains("data-stars=\"5\"") && body.contains("data-stars=\"4\""),
        "{body}"
    );
    assert!(body.contains("Reviews served by:"));
    assert!(body.contains("reviews-v2-5b667bcbf8-abcde"));
    assert!(body.contains("on cluster <u>cluster-east</u>"), "{body}");

    assert_eq!(
        get(page.port, "/health"),
        (200, "Product page is healthy".to_string())
    );
    let (status, api) = get(page.port, "/api/v1/products/0/reviews");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&api).unwrap();
    assert_eq!(v["podname"], "reviews-v2-5b667bcbf8-abcde");
    assert_eq!(v["reviews"][0]["rating"]["color"], "black");
    let mut with_ratings = page_env.clone();
    with_ratings.extend(upstream_env("RATINGS", ratings.port));
    let page2 = App::start(&["productpage"], &with_ratings);
    let (status, api) = get(page2.port, "/api/v1/products/0/ratings");
    assert_eq!(
        (status, api.as_str()),
        (200, r#"{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}"#)
    );
    let (status, api) = get(page.port, "/api/v1/products");
    assert_eq!(status, 200);
    assert!(api.contains("The Comedy of Errors"));
}

#[test]
fn productpage_reports_unavailable_callees() {
    let page = App::start(
        &["productpage"],
        &[
            upstream_env("DETAILS", closed_port()),
            upstream_env("REVIEWS", closed_port()),
        ]
        .concat(),
    );
    let started = Instant::now();
    let (status, body) = get(page.port, "/productpage");
    assert_eq!(status, 200);
    assert!(body.contains("Error fetching product reviews"), "{body}");
    assert!(body.contains(REVIEWS_ERROR));
    assert!(body.contains("Error fetching product details"));
    assert!(body.contains(DETAILS_ERROR));
    assert!(!body.contains("Reviews served by:"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused connections fail fast"
    );
    let (status, api) = get(page.port, "/api/v1/products/0/reviews");
    assert_eq!(status, 500);
    assert_eq!(
        serde_json::from_str::<Value>(&api).unwrap()["error"],
        REVIEWS_ERROR
    );
}

#[test]
fn productpage_propagates_end_user_and_retries_reviews_once() {
    let reviews = Stub::start(200, REVIEWS_STUB, Duration::ZERO);
    let failing = Stub::start(503, "{}", Duration::ZERO);
    let details = App::start(&["details"], &[]);
    let page = App::start(
        &["productpage"],
        &[
            upstream_env("DETAILS", details.port),
            upstream_env("REVIEWS", reviews.port),
        ]
        .concat(),
    );
    let (status, head, _) = request(
        page.port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "username=jason&passwd=jason",
    );
    assert_eq!(status, 302);
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("session cookie");
    let cookie = cookie_line["set-cookie:".len()..]
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (status, _, body) = request(
        page.port,
        "GET",
        "/productpage",
        &[
            ("Cookie", &cookie),
            ("x-request-id", "req-42"),
            ("x-b3-traceid", "abc123"),
            ("traceparent", "00-1-2-01"),
        ],
        "",
    );
    assert_eq!(status, 200);
    assert!(body.contains("jason"), "{body}");
    assert!(body.contains("reviews-stub"));
    let seen = reviews.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("get /reviews/0 "), "{seen:?}");
    for header in [
        "end-user: jason",
        "x-request-id: req-42",
        "x-b3-traceid: abc123",
        "traceparent: 00-1-2-01",
    ] {
        assert!(seen[0].contains(header), "{header} missing in {}", seen[0]);
    }

    // After logout no end-user goes out.
    let (status, head, _) = request(page.port, "GET", "/logout", &[("Cookie", &cookie)], "");
    assert_eq!(status, 302);
    assert!(head.to_ascii_lowercase().contains("set-cookie: session=;"));
    get(page.port, "/productpage");
    assert!(!reviews.requests()[1].contains("end-user"));

    // A failing reviews service is tried twice, then reported.
    let page = App::start(
        &["productpage"],
        &[
            upstream_env("DETAILS", details.port),
            upstream_env("REVIEWS", failing.port),
        ]
        .concat(),
    );
    let (_, body) = get(page.port, "/productpage");
    assert!(body.contains(REVIEWS_ERROR));
    assert_eq!(failing.requests().len(), 2);
}

#[test]
fn reviews_versions_and_ratings_propagation() {
    let ratings_stub = Stub::start(
        200,
        r#"{"id":0,"ratings":{"Reviewer1":3,"Reviewer2":1}}"#,
        Duration::ZERO,
    );
    let mut v3_env = upstream_env("RATINGS", ratings_stub.port);
    v3_env.push(("HOSTNAME", "reviews-v3-pod".to_string()));
    let v3 = App::start(&["reviews-v3"], &v3_env);
    let (status, _, body) = request(
        v3.port,
        "GET",
        "/reviews/0",
        &[("end-user", "jason"), ("x-request-id", "r1")],
        "",
    );
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "0");
    assert_eq!(v["podname"], "reviews-v3-pod");
    assert_eq!(v["clustername"], "null");
    assert_eq!(
        v["reviews"][0]["rating"],
        serde_json::json!({"stars": 3, "color": "red"})
    );
    assert_eq!(v["reviews"][1]["rating"]["stars"], 1);
    let seen = ratings_stub.requests();
    assert!(seen[0].starts_with("get /ratings/0 "));
    assert!(
        seen[0].contains("end-user: jason") && seen[0].contains("x-request-id: r1"),
        "{seen:?}"
    );

    let v1 = App::start(&["reviews-v1"], &upstream_env("RATINGS", ratings_stub.port));
    let v: Value = serde_json::from_str(&get(v1.port, "/reviews/0").1).unwrap();
    assert!(v["reviews"][0].get("rating").is_none());
    assert_eq!(ratings_stub.requests().len(), 1, "v1 never calls ratings");

    let v2_down = App::start(&["reviews-v2"], &upstream_env("RATINGS", closed_port()));
    let v: Value = serde_json::from_str(&get(v2_down.port, "/reviews/0").1).unwrap();
    assert_eq!(
        v["reviews"][1]["rating"]["error"],
        "Ratings service is currently unavailable"
    );
    assert_eq!(
        get(v2_down.port, "/health"),
        (200, r#"{"status": "Reviews is healthy"}"#.to_string())
    );
}

#[test]
fn ratings_and_details_json() {
    let ratings = App::start(&["ratings"], &[]);
    assert_eq!(
        get(ratings.port, "/ratings/0"),
        (
            200,
            r#"{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}"#.to_string()
        )
    );
    assert_eq!(
        get(ratings.port, "/health"),
        (200, r#"{"status":"Ratings is healthy"}"#.to_string())
    );
    assert_eq!(get(ratings.port, "/ratings/x").0, 400);

    let details = App::start(&["details"], &[]);
    let (status, body) = get(details.port, "/details/7");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"id": 7, "author": "William Shakespeare", "year": 1595, "type": "paperback",
            "pages": 200, "publisher": "PublisherA", "language": "English",
            "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"})
    );
    assert_eq!(
        get(details.port, "/health"),
        (200, r#"{"status":"Details is healthy"}"#.to_string())
    );

    // details v2 asks the external book service; without plain-HTTP egress
    // configured it reports the failure as the original does (400 + error).
    let v2 = App::start(&["details-v2"], &[]);
    let (status, body) = get(v2.port, "/details/0");
    assert_eq!(status, 400);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
}

#[test]
fn httpbin_flavors() {
    let go = App::start(&["httpbin-go"], &[]);
    let (status, head, body) = request(go.port, "GET", "/status/418", &[], "");
    assert_eq!(status, 418);
    assert!(body.contains("teapot"));
    assert!(head.to_ascii_lowercase().contains("x-more-info"));
    let (status, _, body) = request(go.port, "GET", "/headers", &[("X-Test", "a")], "");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["X-Test"], serde_json::json!(["a"]));
    let v: Value = serde_json::from_str(&get(go.port, "/get?x=1").1).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["args"]["x"], serde_json::json!(["1"]));
    assert_eq!(v["origin"], "127.0.0.1");
    let (status, _, body) = request(
        go.port,
        "POST",
        "/post",
        &[("Content-Type", "application/json")],
        r#"{"k":1}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["json"]["k"],
        1
    );
    let started = Instant::now();
    assert_eq!(get(go.port, "/delay/0.2").0, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(get(go.port, "/status/503").0, 503);

    let old = App::start(&["httpbin-kennethreitz"], &[]);
    let (_, _, body) = request(
        old.port,
        "GET",
        "/headers",
        &[("X-Test", "a"), ("X-Request-Id", "hidden")],
        "",
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["X-Test"], "a");
    assert!(v["headers"].get("X-Request-Id").is_none());
    assert_eq!(get(old.port, "/status/418").0, 418);
    let v: Value = serde_json::from_str(&get(old.port, "/ip").1).unwrap();
    assert_eq!(v["origin"], "127.0.0.1");
}

#[test]
fn tcp_echo_prefixes_lines() {
    let echo = App::start(&["tcp-echo", "0", "hello"], &[]);
    let mut stream = TcpStream::connect(("127.0.0.1", echo.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"world\nagain\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello world\n");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello again\n");
}

fn fortio(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("fortio")
        .args(args)
        .output()
        .expect("run fortio");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fortio_load_and_curl() {
    let httpbin = App::start(&["httpbin-go"], &[]);
    let url = format!("http://{}:{}/get", httpbin.host(), httpbin.port);
    let (code, out, err) = fortio(&[
        "load",
        "-c",
        "2",
        "-qps",
        "0",
        "-n",
        "20",
        "-loglevel",
        "Warning",
        &url,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("running at 0 queries per second"), "{out}");
    assert!(
        out.contains("for exactly 20 calls (10 per thread + 0)"),
        "{out}"
    );
    assert!(out.contains("Code 200 : 20 (100.0 %)"), "{out}");
    assert!(
        out.contains("Sockets used: 2 (for perfect keepalive, would be 2)"),
        "{out}"
    );
    assert!(out.contains("All done 20 calls (plus 0 warmup)"), "{out}");

    // Every non-2xx answer costs a new connection, as with the real fortio.
    let server = App::start(&["fortio", "server", "-tcp-port", "0"], &[]);
    let url = format!("http://127.0.0.1:{}/echo?status=503", server.port);
    let (code, out, _) = fortio(&[
        "load",
        "-c",
        "1",
        "-qps",
        "0",
        "-n",
        "3",
        "-allow-initial-errors",
        "-loglevel",
        "Error",
        &url,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Code 503 : 3 (100.0 %)"), "{out}");
    assert!(
        out.contains("Sockets used: 3 (for perfect keepalive, would be 1)"),
        "{out}"
    );
    // An HTTP error on a first request is counted, not fatal (the
    // circuit-breaking task's threads get 503s on their first call); a
    // first request that cannot connect ends the run.
    let (code, out, _) = fortio(&["load", "-c", "1", "-qps", "0", "-n", "3", &url]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Code 503 : 3 (100.0 %)"), "{out}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let (code, _, err) = fortio(&["load", "-c", "1", "-qps", "0", "-n", "3", &refused]);
    assert_eq!(code, 1);
    assert!(err.contains("Aborting"), "{err}");

    let (code, out, _) = fortio(&[
        "curl",
        &format!("http://127.0.0.1:{}/headers", httpbin.port),
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("\"User-Agent\""), "{out}");
}

#[test]
fn helloworld_and_podinfo_name_the_pod() {
    let hello = App::start(
        &["helloworld-v2"],
        &env(&[("HOSTNAME", "helloworld-v2-abc".to_string())]),
    );
    assert_eq!(
        get(hello.port, "/hello"),
        (
            200,
            "Hello version: v2, instance: helloworld-v2-abc\n".to_string()
        )
    );
    let podinfo = App::start(
        &["podinfo", "--port=9898"],
        &env(&[("HOSTNAME", "podinfo-xyz".to_string())]),
    );
    let v: Value = serde_json::from_str(&get(podinfo.port, "/").1).unwrap();
    assert_eq!(v["hostname"], "podinfo-xyz");
}

#[test]
fn sigterm_ends_an_app_cleanly() {
    let mut app = App::start(&["details"], &[]);
    let pid = nix::unistd::Pid::from_raw(app.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = app.port;
}

/// The one slow test: a details service that never answers costs the page
/// exactly productpage's 3 s timeout (no retry), not more.
#[test]
fn productpage_times_out_details_after_three_seconds() {
    let hanging = Stub::start(200, "{}", Duration::from_secs(30));
    let page = App::start(
        &["productpage"],
        &[
            upstream_env("DETAILS", hanging.port),
            upstream_env("REVIEWS", closed_port()),
        ]
        .concat(),
    );
    let started = Instant::now();
    let (_, body) = get(page.port, "/api/v1/products/0");
    let took = started.elapsed();
    assert!(body.contains(DETAILS_ERROR), "{body}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
        "{took:?}"
    );
    assert_eq!(hanging.requests().len(), 1);
}
