//! Stable-Rust smoke runs of the fuzz targets for mesh-core's parsers of
//! untrusted bytes.
//!
//! Everything a peer can put in front of the mesh passes one of these: the
//! HTTP/2 frames and `CONNECT` headers on the HBONE port, the SAN of a peer
//! certificate, the ZDS messages of the node agent, the local state file,
//! the CSR any caller hands the CA.
//! Each `pub fn` below is the body of one cargo-fuzz target (fuzz/ includes
//! this file), so what CI runs here is exactly what the fuzzer runs there:
//! here over a hand-written seed corpus of valid and nasty inputs plus a few
//! thousand deterministic mutations of it. The bodies assert that nothing
//! panics, that errors render, and a few cheap round trips.
//!
//! `MESH_FUZZ_SEEDS=<dir>` writes the seed corpora to `<dir>/<target>/` for
//! the fuzzer to start from.

use std::fs::File;
use std::future::pending;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_core::ca::{csr_identities, CaError, CertificateAuthority};
use mesh_core::hbone::headers::{
    forwarded, forwarded_for, parse_forwarded_for, Baggage, TraceParent, BAGGAGE, TRACEPARENT,
};
use mesh_core::hbone::{
    serve_connection, Authority, ConnectRequest, Fault, Responder, ServerConfig,
};
use mesh_core::identity::Identity;
use mesh_core::proto::local::{parse_local_config, to_yaml};
use mesh_core::proto::zds::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use mesh_core::tls::identity_from_cert;
use mesh_core::zds::{WorkloadEvent, ZdsAgentConn, ZdsClient, ZdsError, ZdsListener};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::time::timeout;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// Upper bound on any wait, so a stuck server fails the run instead of
/// hanging it; never a performance assertion.
const BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Fuzz bodies (one per target in fuzz/fuzz_targets).
// ---------------------------------------------------------------------------

/// `:authority`, `forwarded`, `baggage` and `traceparent` of a `CONNECT`.
pub fn hbone_headers(data: &[u8]) {
    let s = String::from_utf8_lossy(data);

    match Authority::parse(&s) {
        Ok(a) => {
            assert_ne!(a.port(), 0, "{s:?} parsed with port 0");
            let again = Authority::parse(&a.to_string())
                .unwrap_or_else(|e| panic!("{a} (from {s:?}) does not re-parse: {e}"));
            assert_eq!(again, a, "{s:?}");
        }
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(e.fault(), Fault::Request);
        }
    }

    if let Some(addr) = parse_forwarded_for(&s) {
        if addr.port() != 0 {
            let v = forwarded(addr, None).expect("an address always formats");
            let text = v.to_str().expect("formatted forwarded is ASCII");
            assert_eq!(parse_forwarded_for(text), Some(addr), "{s:?}");
        }
    }
    // Any host, however odd, must be quoted so that `for` still parses.
    let client = "[fd00::1]:4567".parse().expect("literal address");
    if let Ok(v) = forwarded(client, Some(&s)) {
        if let Ok(text) = v.to_str() {
            assert_eq!(parse_forwarded_for(text), Some(client), "host {s:?}");
        }
    }

    // Formatting normalises (drops empty members and unusable kinds) and
    // must never fail; a second pass changes nothing.
    let b = Baggage::parse(&s);
    let v = b.to_header_value().expect("baggage formats");
    let b2 = Baggage::parse(v.to_str().expect("baggage is ASCII"));
    let v2 = b2.to_header_value().expect("baggage formats");
    assert_eq!(Baggage::parse(v2.to_str().expect("baggage is ASCII")), b2);

    if let Some(t) = TraceParent::parse(&s) {
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t), "{s:?}");
        assert_eq!(
            t.to_header_value().to_str().ok(),
            Some(t.to_string().as_str())
        );
        assert_eq!(t.child().trace_id, t.trace_id);
    }
}

/// SPIFFE ids as text: `spiffe://td/ns/x/sa/y`; and, split on spaces,
/// the three parts given to [`Identity::try_new`].
pub fn identity(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    match s.parse::<Identity>() {
        Ok(id) => {
            let text = id.to_string();
            assert_eq!(text.parse::<Identity>().as_ref(), Ok(&id), "{s:?}");
            let json = serde_json::to_string(&id).expect("identity serializes");
            assert_eq!(
                serde_json::from_str::<Identity>(&json).ok(),
                Some(id.clone())
            );
            Identity::try_new(id.trust_domain(), id.namespace(), id.service_account())
                .unwrap_or_else(|e| panic!("parts of {s:?} rejected by try_new: {e}"));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let mut parts = s.splitn(3, ' ');
    let (td, ns, sa) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match Identity::try_new(td, ns, sa) {
        Ok(id) => {
            let parsed = id
                .to_string()
                .parse::<Identity>()
                .unwrap_or_else(|e| panic!("try_new({td:?}, {ns:?}, {sa:?}) does not parse: {e}"));
            // Parsing folds the trust domain to lower case and try_new does
            // not (see the ignored test below), so compare folded.
            assert_eq!(
                parsed,
                Identity::new(td.to_ascii_lowercase(), ns, sa),
                "{td:?} {ns:?} {sa:?}"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// DER of a peer's leaf certificate, as rustls hands it over.
pub fn cert_identity(data: &[u8]) {
    match identity_from_cert(&CertificateDer::from(data)) {
        Ok(id) => {
            assert_eq!(id.to_string().parse::<Identity>().as_ref(), Ok(&id));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The local state file (YAML or JSON).
pub fn local_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_local_config(&text) {
        Ok(cfg) => {
            // What we write back reads back the same.
            if let Ok(yaml) = to_yaml(&cfg) {
                let again = parse_local_config(&yaml)
                    .unwrap_or_else(|e| panic!("to_yaml output does not parse: {e}\n{yaml}"));
                assert_eq!(again, cfg, "round trip through\n{yaml}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// ZDS messages as prost decodes them, with binary and JSON round trips.
pub fn zds_decode(data: &[u8]) {
    fn check<M>(data: &[u8])
    where
        M: Message + Default + PartialEq + std::fmt::Debug + serde::Serialize,
        M: serde::de::DeserializeOwned,
    {
        let Ok(m) = M::decode(data) else { return };
        let bytes = m.encode_to_vec();
        assert_eq!(bytes.len(), m.encoded_len());
        assert_eq!(M::decode(bytes.as_slice()).ok().as_ref(), Some(&m));
        // Unknown enum numbers have no JSON name: an error, not a panic.
        if let Ok(json) = serde_json::to_string(&m) {
            let back: M = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
            assert_eq!(back, m);
        }
    }
    check::<WorkloadRequest>(data);
    check::<WorkloadResponse>(data);
    check::<ZdsHello>(data);
    check::<WorkloadInfo>(data);
}

/// A node agent socket in a temporary directory, reused across inputs; each
/// input gets its own connection.
pub struct ZdsHarness {
    rt: Runtime,
    listener: ZdsListener,
    path: PathBuf,
    /// Any descriptor will do as the "network namespace" of an AddWorkload.
    netns: File,
    _dir: tempfile::TempDir,
}

impl ZdsHarness {
    pub fn new() -> Self {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("zds.sock");
        let listener = {
            let _guard = rt.enter();
            ZdsListener::bind(&path).expect("bind zds socket")
        };
        ZdsHarness {
            rt,
            listener,
            path,
            netns: File::open("/dev/null").expect("open /dev/null"),
            _dir: dir,
        }
    }
}

impl Default for ZdsHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// Arbitrary bytes sent as one ZDS message.
struct RawMessage(Vec<u8>);

impl Message for RawMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// What the client must make of one message from the agent.
#[derive(Debug)]
enum ZdsExpect {
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
    },
    Keep(String),
    Del(String),
    SnapshotSent,
    /// Answered with an error ack and skipped.
    Nack,
    Decode,
    /// A zero-length message is indistinguishable from the end of the
    /// connection on SOCK_SEQPACKET.
    Closed,
}

fn zds_expect(body: &[u8], with_fd: bool) -> ZdsExpect {
    use workload_request::Payload;
    if body.is_empty() {
        return ZdsExpect::Closed;
    }
    let Ok(req) = WorkloadRequest::decode(body) else {
        return ZdsExpect::Decode;
    };
    match req.payload {
        None => ZdsExpect::Nack,
        Some(Payload::Add(a)) if with_fd && !a.uid.is_empty() => ZdsExpect::Add {
            uid: a.uid,
            info: a.workload_info,
        },
        Some(Payload::Add(_)) => ZdsExpect::Nack,
        Some(_) if with_fd => ZdsExpect::Nack,
        Some(Payload::Keep(k)) => ZdsExpect::Keep(k.uid),
        Some(Payload::Del(d)) => ZdsExpect::Del(d.uid),
        Some(Payload::SnapshotSent(_)) => ZdsExpect::SnapshotSent,
    }
}

const ZDS_SENTINEL: &str = "sentinel";

/// The first byte says whether a descriptor goes with the message (bit 0);
/// the rest is the message. The client must turn it into exactly the event
/// the protocol allows, or NACK it, and then still see the next message.
pub fn zds_client(h: &ZdsHarness, data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if body.len() > MAX_INPUT {
        return;
    }
    let with_fd = flags & 1 != 0;
    let expect = zds_expect(body, with_fd);
    h.rt.block_on(async {
        let (client, agent) = tokio::join!(
            ZdsClient::connect(&h.path),
            ZdsAgentConn::accept(&h.listener)
        );
        let (client, agent) = (client.expect("zds connect"), agent.expect("zds accept"));
        let fd = with_fd.then(|| h.netns.as_fd());
        agent
            .raw()
            .send(&RawMessage(body.to_vec()), fd)
            .await
            .expect("send raw message");
        let sentinel = WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: ZDS_SENTINEL.into(),
            })),
        };
        agent.raw().send(&sentinel, None).await.expect("send sentinel");

        let next = || async {
            timeout(BOUND, client.next())
                .await
                .expect("zds client answered")
        };
        let is_sentinel =
            |ev: &Result<WorkloadEvent, ZdsError>| matches!(ev, Ok(WorkloadEvent::Keep { uid }) if uid == ZDS_SENTINEL);
        // Acks the agent must see, in order: true for an error ack.
        let mut acks = Vec::new();
        let first = next().await;
        match (&expect, &first) {
            (ZdsExpect::Add { uid, info }, Ok(WorkloadEvent::Add { uid: u, info: i, .. }))
                if u == uid && i == info => {}
            (ZdsExpect::Keep(uid), Ok(WorkloadEvent::Keep { uid: u })) if u == uid => {}
            (ZdsExpect::Del(uid), Ok(WorkloadEvent::Del { uid: u })) if u == uid => {}
            (ZdsExpect::SnapshotSent, Ok(WorkloadEvent::SnapshotSent)) => {}
            (ZdsExpect::Nack, ev) if is_sentinel(ev) => acks.push(true),
            (ZdsExpect::Decode, Err(ZdsError::Decode(_))) => {}
            (ZdsExpect::Closed, Err(ZdsError::Closed)) => {}
            (want, got) => panic!("zds message {body:?} (fd: {with_fd}): want {want:?}, got {got:?}"),
        }
        let answered = first.is_ok();
        drop(first);
        if !matches!(expect, ZdsExpect::Nack) {
            if answered {
                client.ack(Ok(())).await.expect("ack");
                acks.push(false);
            }
            let second = next().await;
            assert!(is_sentinel(&second), "after {body:?}: got {second:?}");
        }
        client.ack(Ok(())).await.expect("ack sentinel");
        acks.push(false);

        for want_error in acks {
            let (resp, fds): (WorkloadResponse, _) = timeout(BOUND, agent.raw().recv())
                .await
                .expect("ack arrived")
                .expect("ack decodes");
            assert!(fds.is_empty());
            match resp.payload {
                Some(workload_response::Payload::Ack(Ack { error })) => {
                    assert_eq!(!error.is_empty(), want_error, "ack {error:?} for {body:?}")
                }
                None => panic!("response without ack"),
            }
        }
    });
}

/// A current-thread runtime for the bodies that need one.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Handler behaviour, from the first input byte.
const F_HOSTNAME: u8 = 1;
const F_ACCEPT: u8 = 2;
const F_ECHO: u8 = 4;

/// Scheduling rounds the client waits before closing its side.
const SETTLE_ROUNDS: usize = 64;

/// Marks a handler that unwound: tokio swallows panics of spawned tasks, so
/// the body checks this flag after the connection ends.
struct PanicFlag(Arc<AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// The HBONE server fed arbitrary bytes as the client side of its HTTP/2
/// connection. The first byte picks the handler's behaviour (accept with
/// or without echo, or reject; hostname authorities allowed); the rest is
/// written, the server gets time to answer, then the client half-closes.
/// The server must return, and every handler must finish once the
/// connection is gone. Returns what the server wrote (its first 64 KiB).
pub fn hbone_server(rt: &Runtime, data: &[u8]) -> Vec<u8> {
    let Some((&flags, bytes)) = data.split_first() else {
        return Vec::new();
    };
    let cfg = ServerConfig {
        accept_hostname_authority: flags & F_HOSTNAME != 0,
        keepalive_interval: None,
        ..ServerConfig::default()
    };
    let allow_hostname = cfg.accept_hostname_authority;
    let panicked = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let flag = panicked.clone();
    let handler = move |req: ConnectRequest, resp: Responder| {
        let done = done_tx.clone();
        let flag = PanicFlag(flag.clone());
        async move {
            let _done = done;
            let _flag = flag;
            assert!(
                allow_hostname || matches!(req.authority, Authority::Addr(_)),
                "hostname authority {} reached the handler",
                req.authority
            );
            let _ = forwarded_for(&req.headers);
            if let Some(v) = req.headers.get(BAGGAGE).and_then(|v| v.to_str().ok()) {
                let _ = Baggage::parse(v);
            }
            if let Some(v) = req.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
                let _ = TraceParent::parse(v);
            }
            if flags & F_ACCEPT == 0 {
                resp.reject(http::StatusCode::FORBIDDEN);
                return;
            }
            let Ok(mut tunnel) = resp.accept() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let mut total = 0usize;
            while let Ok(n @ 1..) = tunnel.read(&mut buf).await {
                total += n;
                if flags & F_ECHO != 0 && tunnel.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                if total > 1 << 20 {
                    break;
                }
            }
            let _ = tunnel.shutdown().await;
        }
    };
    let out = rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(client);
        let serve = serve_connection(server, &cfg, handler, pending());
        let feed = async {
            let _ = wr.write_all(bytes).await;
            // A real client keeps its connection open while tunnels run, so
            // let the handlers answer and echo before closing. On this
            // single-threaded runtime with in-memory I/O that is a fixed
            // number of scheduling rounds, the same on every run.
            for _ in 0..SETTLE_ROUNDS {
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let drain = async {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = rd.read(&mut buf).await {
                if out.len() < 64 * 1024 {
                    out.extend_from_slice(&buf[..n]);
                }
            }
            out
        };
        let (result, (), out) = timeout(BOUND, async { tokio::join!(serve, feed, drain) })
            .await
            .unwrap_or_else(|_| panic!("server did not return for {:?}", data.escape_ascii()));
        if let Err(e) = result {
            let _ = (e.to_string(), e.fault(), e.is_retryable());
        }
        timeout(BOUND, done_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("a handler is stuck after {:?}", data.escape_ascii()));
        out
    });
    assert!(!panicked.load(Ordering::SeqCst), "a handler panicked");
    out
}

#[path = "support/corpus.rs"]
mod corpus;
pub use corpus::{dump_seeds, mutate, run_corpus, MAX_INPUT};

fn strings(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.as_bytes().to_vec()).collect()
}

// ---------------------------------------------------------------------------
// Seed corpora.
// ---------------------------------------------------------------------------

pub fn seeds_hbone_headers() -> Vec<Vec<u8>> {
    strings(&[
        "10.0.0.1:80",
        "[fd00::1]:8080",
        "[fe80::1%2]:80",
        "[::ffff:10.1.2.3]:15008",
        "reviews.default.svc.cluster.local:9080",
        "Reviews.Default.SVC:9080",
        "a_b-c.d.:1",
        "1.2.3.4:0",
        "1.2.3:80",
        "fd00::1:80",
        "a..b:80",
        ":80",
        "foo:",
        "foo:65536",
        "foo:+80",
        "",
        "for=\"10.0.0.1:3456\"",
        "for=\"[fd00::1]:80\";host=reviews.default.svc.cluster.local",
        "for=\"10.0.0.1:3456\";host=\"a b\"",
        "host=x;For=10.1.1.1, for=10.2.2.2",
        "by=x;host=\"a;b,c\";for=\"1.2.3.4:5\"",
        "for=\"[2001:db8::17\"",
        "for=\"a\\\"b\"",
        "for=\"\\",
        "for=unknown, for=_hidden",
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,\
         service.name=reviews,service.version=v1%2C%20beta%3Bx=%25",
        "k8s.pod.name=p;prop=1, junk, service.name=%zz, other=1",
        "k8s..name=x,k8s.A B.name=y,service.name=%C3%A9,service.version=%FF",
        "service.name=%",
        "service.name=%e",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff ",
        "é:80",
        "\u{0}:1",
    ])
}

pub fn dict_hbone_headers() -> Vec<&'static [u8]> {
    [
        ":",
        "[",
        "]",
        "%",
        "\"",
        "\\",
        ",",
        ";",
        "=",
        "-",
        ".",
        "for=",
        "host=",
        "::",
        "65535",
        "99999",
        "0",
        "k8s.",
        ".name",
        "service.name=",
        "00-",
        "ffffffff",
        "é",
        "\u{0}",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

pub fn seeds_identity() -> Vec<Vec<u8>> {
    strings(&[
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "SPIFFE://Cluster.Local/ns/a/sa/b",
        "spiffe://td/ns/a.b_c-d/sa/x",
        "spiffe://td/ns/a/sa/b/extra",
        "spiffe://td/ns/./sa/b",
        "spiffe://td/ns/a/sa/..",
        "spiffe://td/ns//sa/b",
        "spiffe://td/ns/a/sa/",
        "spiffe:///ns/a/sa/b",
        "spiffe://td",
        "spiffe://td/",
        "spiffe://td/ns/a",
        "spiffe://td/sa/b/ns/a",
        "spiffe://t%64/ns/a/sa/b",
        "spiffe://td/ns/é/sa/b",
        "spiffé://td/ns/a/sa/b",
        "spiffe:/",
        "",
        "cluster.local default sa",
        "Cluster.Local default sa",
        "td a/b c",
        "td . c",
        " ns sa",
        "td ns sa extra",
    ])
}

pub fn dict_identity() -> Vec<&'static [u8]> {
    [
        "spiffe://",
        "/ns/",
        "/sa/",
        "/",
        ".",
        "..",
        " ",
        "%",
        "é",
        "_",
        "-",
        "A",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

/// A fixed Ed25519 key (PKCS#8 v1 around a constant seed): ring signs
/// Ed25519 deterministically, so the seed certificates are the same bytes
/// on every run.
fn fixed_key() -> rcgen::KeyPair {
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend([7u8; 32]);
    rcgen::KeyPair::try_from(pkcs8.as_slice()).expect("Ed25519 test key")
}

fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.serial_number = Some(rcgen::SerialNumber::from(vec![1, 2, 3, 4]));
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    params
        .self_signed(&fixed_key())
        .expect("self-signed test certificate")
        .der()
        .to_vec()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.try_into().expect("ASCII URI"))
}

pub fn seeds_cert_identity() -> Vec<Vec<u8>> {
    let good = cert_with_sans(vec![uri("spiffe://cluster.local/ns/default/sa/x")]);
    let mut trailing = good.clone();
    trailing.push(0);
    vec![
        good,
        cert_with_sans(vec![]),
        cert_with_sans(vec![
            rcgen::SanType::DnsName("x.example".try_into().expect("DNS name")),
            uri("SPIFFE://Cluster.Local/ns/a/sa/b"),
        ]),
        cert_with_sans(vec![
            uri("spiffe://a/ns/b/sa/c"),
            uri("spiffe://d/ns/e/sa/f"),
        ]),
        cert_with_sans(vec![uri("https://example.com/")]),
        cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b/c")]),
        trailing,
        vec![],
        vec![0x30, 0x80],
        vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
    ]
}

pub fn dict_der() -> Vec<&'static [u8]> {
    vec![
        &[0x30, 0x82],
        &[0x30, 0x80, 0x00, 0x00],
        &[0x06, 0x03, 0x55, 0x1d, 0x11], // subjectAltName OID
        &[0x86, 0x00],                   // URI general name, empty
        &[0x86, 0x81, 0xff],
        &[0x04, 0x00],
        &[0x01, 0x01, 0xff],
        b"spiffe://",
    ]
}

pub fn seeds_local_config() -> Vec<Vec<u8>> {
    strings(&[
        r#"
addresses:
- workload: {uid: "cluster1//v1/Pod/default/b-1", name: b-1, namespace: default, addresses: ["10.244.2.2", "fd00::2"], node: node2, serviceAccount: b, trustDomain: cluster.local, tunnelProtocol: HBONE, services: {"default/b.default.svc.cluster.local": {ports: [{servicePort: 80, targetPort: 8080}]}}, waypoint: {address: {network: "", address: "10.0.0.9"}, hboneMtlsPort: 15008}}
- service: {name: b, namespace: default, hostname: b.default.svc.cluster.local, addresses: [{network: "", address: "10.96.0.10"}], ports: [{servicePort: 80, targetPort: 8080}], subjectAltNames: ["spiffe://cluster.local/ns/default/sa/b"]}
authorizations:
- name: allow-a
  namespace: default
  scope: NAMESPACE
  action: ALLOW
  rules: [{clauses: [{matches: [{sourceIps: [{address: "10.0.0.0", length: 8}], destinationPorts: [80], principals: [{exact: "spiffe://cluster.local/ns/default/sa/a"}]}]}]}]
"#,
        r#"{"addresses": [{"workload": {"uid": "u1", "addresses": ["AAAAAA=="], "tunnel_protocol": 1, "workload_type": "POD", "status": "UNHEALTHY"}}], "authorizations": []}"#,
        "addresses:\n- service: {hostname: h, ports: [{service_port: \"80\", target_port: 99999999999}]}\n",
        "addresses:\n- workload: {uid: u, network_gateway: {hostname: {namespace: ns, hostname: gw}, hbone_mtls_port: 15008}}\n",
        "addresses:\n- service: {hostname: h, weightedWaypoints: [{destination: {address: {address: \"fd00::1\"}}, weight: 3}]}\n",
        "addresses: [{}]\n",
        "addresses: 5\n",
        "unknown: 1\n",
        "- 1\n- 2\n",
        "",
        "~\n",
        "---\n---\n",
        "{addresses: []}",
        "[",
        "{\"addresses\": [{\"workload\": {\"uid\": \"\\ud800\"}}]}",
        "a: &a [*a]\n",
        "a: &x [1,2]\nb: &y [*x,*x,*x,*x]\nc: [*y,*y,*y,*y]\n",
        "addresses:\n- !!binary aGVsbG8=\n",
        "addresses:\n- <<: {service: {hostname: h}}\n",
        "addresses:\n- {service: {hostname: h}, service: {hostname: i}}\n",
        "addresses:\n\t- x\n",
        "addresses:\n- workload: {uid: u, addresses: [\"10.0.0.1\", \" 10.0.0.2 \", \"ZZZ\"], capacity: 4294967296}\n",
        "addresses:\n- workload: {uid: u, extensions: [{name: x, config: {\"@type\": \"type.googleapis.com/google.protobuf.Empty\"}}]}\n",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        "addresses:\n- workload: {uid: u, tunnelProtocol: 7, status: 9, workloadType: -1}\n",
    ])
}

pub fn dict_local_config() -> Vec<&'static [u8]> {
    [
        "addresses:",
        "authorizations:",
        "workload:",
        "service:",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "\n",
        "\"",
        "&a ",
        "*a",
        "!!",
        "10.0.0.1",
        "fd00::1",
        "AAAA",
        "uid: u",
        "hostname: h",
        "servicePort: ",
        "4294967296",
        "-1",
        "null",
        "HBONE",
        "~",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

fn zds_message(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

/// Raw ZDS messages, without the flags byte.
pub fn seeds_zds_messages() -> Vec<Vec<u8>> {
    use workload_request::Payload;
    let info = WorkloadInfo {
        name: "p".into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    };
    vec![
        zds_message(Payload::Add(AddWorkload {
            uid: "uid-1".into(),
            workload_info: Some(info.clone()),
        })),
        zds_message(Payload::Add(AddWorkload {
            uid: String::new(),
            workload_info: None,
        })),
        zds_message(Payload::Keep(KeepWorkload { uid: "k".into() })),
        zds_message(Payload::Del(DelWorkload { uid: "d".into() })),
        zds_message(Payload::SnapshotSent(SnapshotSent {})),
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "no".into() })),
        }
        .encode_to_vec(),
        ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec(),
        ZdsHello { version: 77 }.encode_to_vec(),
        info.encode_to_vec(),
        vec![],
        vec![0x48, 0x01],                   // unknown field 9 only: no payload
        vec![0x0a, 0x03, 0x0a, 0x01, 0xff], // uid not UTF-8
        vec![0x0a, 0x7f],                   // length past the end
        vec![0x0f],                         // wire type 7
        vec![0x0b, 0x0c],                   // group
        vec![
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        // Two payloads: the last one wins.
        [
            zds_message(Payload::Del(DelWorkload { uid: "d".into() })),
            zds_message(Payload::SnapshotSent(SnapshotSent {})),
        ]
        .concat(),
    ]
}

pub fn dict_protobuf() -> Vec<&'static [u8]> {
    vec![
        &[0x0a, 0x00],
        &[0x12, 0x00],
        &[0x1a, 0x00],
        &[0x2a, 0x00],
        &[0x08, 0x01],
        &[0x80, 0x80, 0x80, 0x80, 0x10],
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0x0b],
        &[0x0c],
    ]
}

// HTTP/2 frames written by hand, so the seeds do not depend on any
// client's choices.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([ty, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literals without indexing, no Huffman coding.
fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_int(&mut out, 7, 0, name.len());
        out.extend(name.as_bytes());
        hpack_int(&mut out, 7, 0, value.len());
        out.extend(value.as_bytes());
    }
    out
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

fn connect(stream: u32, authority: &str, extra: &[(&str, &str)], flags: u8) -> Vec<u8> {
    let mut headers = vec![(":method", "CONNECT"), (":authority", authority)];
    headers.extend_from_slice(extra);
    frame(
        HEADERS,
        END_HEADERS | flags,
        stream,
        &header_block(&headers),
    )
}

/// A connection: flags byte, preface, empty SETTINGS, then `frames`.
fn conn(flags: u8, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend(PREFACE);
    out.extend(settings(&[]));
    for f in frames {
        out.extend(f);
    }
    out
}

pub fn seeds_hbone_server() -> Vec<Vec<u8>> {
    let ok = "10.0.0.1:80";
    let tracing = [
        (
            "forwarded",
            "for=\"10.1.1.1:3456\";host=reviews.default.svc",
        ),
        ("baggage", "k8s.namespace.name=default,k8s.pod.name=p"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let hello = frame(DATA, END_STREAM, 1, b"hello");
    let block = header_block(&[(":method", "CONNECT"), (":authority", ok)]);
    let (head, tail) = block.split_at(block.len() / 2);
    let mut padded = vec![4u8, 0, 0, 0, 0, 16];
    padded.extend(&block);
    padded.extend([0u8; 4]);
    let big = "x".repeat(70 * 1024);
    let mut many = Vec::new();
    for id in [1u32, 3, 5, 7, 9] {
        many.push(connect(id, ok, &[], 0));
        many.push(frame(DATA, 0, id, &[b'a'; 100]));
    }
    many.push(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
    many.push(frame(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()));
    many.push(frame(WINDOW_UPDATE, 0, 5, &1000u32.to_be_bytes()));
    many.push(frame(PING, 0, 0, &[1; 8]));
    many.push(frame(SETTINGS, 1, 0, &[]));
    many.push(frame(DATA, END_STREAM, 7, b"bye"));
    let mut goaway = 9u32.to_be_bytes().to_vec();
    goaway.extend(0u32.to_be_bytes());
    many.push(frame(GOAWAY, 0, 0, &goaway));
    let mut bulk = vec![connect(1, ok, &[], 0)];
    bulk.extend((0..15).map(|_| frame(DATA, 0, 1, &[b'z'; 4000])));
    bulk.push(frame(DATA, END_STREAM, 1, &[]));

    vec![
        conn(F_ACCEPT | F_ECHO, &[connect(1, ok, &[], 0), hello.clone()]),
        conn(F_ACCEPT, &[connect(1, ok, &tracing, 0), hello.clone()]),
        conn(0, &[connect(1, ok, &tracing, END_STREAM)]),
        conn(
            F_HOSTNAME | F_ACCEPT | F_ECHO,
            &[
                connect(1, "reviews.default.svc:9080", &[], 0),
                hello.clone(),
            ],
        ),
        conn(F_ACCEPT, &[connect(1, "reviews.default.svc:9080", &[], 0)]),
        conn(
            F_ACCEPT,
            &[
                connect(1, "[fd00::1]:8080", &[], 0),
                connect(3, "10.0.0.1:0", &[], 0),
                connect(5, "a..b:1", &[], 0),
            ],
        ),
        conn(
            F_ACCEPT,
            &[frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &header_block(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/"),
                    (":authority", ok),
                ]),
            )],
        ),
        conn(
            F_ACCEPT,
            &[frame(
                HEADERS,
                END_HEADERS,
                1,
                &header_block(&[(":method", "CONNECT")]),
            )],
        ),
        conn(
            F_ACCEPT,
            &[connect(
                1,
                ok,
                &[
                    (":protocol", "websocket"),
                    (":scheme", "https"),
                    (":path", "/"),
                ],
                0,
            )],
        ),
        conn(
            F_ACCEPT | F_ECHO,
            &[
                frame(HEADERS, 0, 1, head),
                frame(CONTINUATION, END_HEADERS, 1, tail),
                hello.clone(),
            ],
        ),
        conn(
            F_ACCEPT,
            &[frame(
                HEADERS,
                END_HEADERS | PADDED | PRIORITY_FLAG,
                1,
                &padded,
            )],
        ),
        conn(F_ACCEPT | F_ECHO, &many),
        conn(
            F_ACCEPT,
            &[
                frame(DATA, 0, 3, b"early"),
                connect(2, ok, &[], 0),
                connect(0, ok, &[], 0),
            ],
        ),
        // The client grants no window: the echo must give up when the
        // connection ends, not wait forever.
        {
            let mut v = vec![F_ACCEPT | F_ECHO];
            v.extend(PREFACE);
            v.extend(settings(&[(0x4, 0), (0x5, 16_384), (0x1, 0)]));
            v.extend(connect(1, ok, &[], 0));
            v.extend(frame(DATA, 0, 1, &[b'q'; 1000]));
            v
        },
        conn(F_ACCEPT | F_ECHO, &bulk),
        conn(F_ACCEPT, &[connect(1, ok, &[("x-big", &big)], 0)]),
        conn(
            F_ACCEPT,
            &[
                connect(1, ok, &[], 0),
                frame(WINDOW_UPDATE, 0, 1, &0x7fff_ffffu32.to_be_bytes()),
                frame(WINDOW_UPDATE, 0, 1, &0x7fff_ffffu32.to_be_bytes()),
            ],
        ),
        conn(F_ACCEPT, &[frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes())]),
        conn(
            F_ACCEPT,
            &[frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2])],
        ),
        conn(
            F_ACCEPT,
            &[frame(0xfa, 0xff, 1, b"unknown"), connect(1, ok, &[], 0)],
        ),
        conn(
            F_ACCEPT,
            &[
                frame(PRIORITY, 0, 1, &[0, 0, 0, 1, 16]),
                connect(1, ok, &[], 0),
            ],
        ),
        conn(
            F_ACCEPT,
            &[connect(
                1,
                ok,
                &[("Upper", "x"), ("connection", "keep-alive")],
                0,
            )],
        ),
        conn(
            F_ACCEPT,
            &[connect(1, ok, &[(":authority", "10.0.0.2:80")], 0)],
        ),
        conn(
            F_ACCEPT,
            &[
                connect(1, ok, &[], 0),
                frame(DATA, 0, 1, b"x"),
                frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    1,
                    &header_block(&[("trailer", "1")]),
                ),
            ],
        ),
        conn(
            F_ACCEPT,
            &[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03])],
        ), // table size update past the limit
        conn(
            F_ACCEPT,
            &[frame(HEADERS, END_HEADERS, 1, &[0xff, 0x80, 0x01])],
        ), // index out of range
        conn(
            F_ACCEPT,
            &[frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0x00, 0x81, 0xff, 0x81, 0xff],
            )],
        ), // bad Huffman
        {
            let mut v = conn(F_ACCEPT, &[]);
            v.extend([0x20, 0x00, 0x00, DATA, 0, 0, 0, 0, 1]); // frame of 2 MiB
            v
        },
        [&[F_ACCEPT][..], PREFACE].concat(),
        [&[F_ACCEPT][..], &PREFACE[..10]].concat(),
        b"\x02GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![F_ACCEPT],
        vec![],
    ]
}

pub fn dict_h2() -> Vec<&'static [u8]> {
    vec![
        PREFACE,
        &[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0],
        &[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0],
        &[0, 0, 8, PING, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 0, 4, WINDOW_UPDATE, 0, 0, 0, 0, 1, 0, 0, 0xff, 0xff],
        &[0, 0, 4, RST_STREAM, 0, 0, 0, 0, 1, 0, 0, 0, 8],
        &[0, 0, 0, DATA, END_STREAM, 0, 0, 0, 1],
        &[0, 0, 0, HEADERS, END_HEADERS, 0, 0, 0, 3],
        b"CONNECT",
        b":authority",
        b"10.0.0.1:80",
    ]
}

// ---------------------------------------------------------------------------
// The smoke runs.
// ---------------------------------------------------------------------------

#[test]
fn smoke_hbone_headers() {
    dump_seeds("hbone_headers", &seeds_hbone_headers());
    run_corpus(
        "hbone_headers",
        &seeds_hbone_headers(),
        &dict_hbone_headers(),
        30_000,
        hbone_headers,
    );
}

#[test]
fn smoke_identity() {
    dump_seeds("identity", &seeds_identity());
    run_corpus(
        "identity",
        &seeds_identity(),
        &dict_identity(),
        30_000,
        identity,
    );
}

#[test]
fn smoke_cert_identity() {
    let seeds = seeds_cert_identity();
    // The seeds mean what they were built to mean.
    let id = identity_from_cert(&CertificateDer::from(seeds[0].as_slice())).expect("good cert");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/x");
    let folded = identity_from_cert(&CertificateDer::from(seeds[2].as_slice())).expect("cert");
    assert_eq!(folded.trust_domain(), "cluster.local");
    for bad in [1, 3, 4, 5, 6, 7] {
        assert!(identity_from_cert(&CertificateDer::from(seeds[bad].as_slice())).is_err());
    }
    dump_seeds("cert_identity", &seeds);
    run_corpus("cert_identity", &seeds, &dict_der(), 30_000, cert_identity);
}

#[test]
fn smoke_local_config() {
    let seeds = seeds_local_config();
    let cfg = parse_local_config(std::str::from_utf8(&seeds[0]).expect("UTF-8")).expect("seed 0");
    assert_eq!((cfg.addresses.len(), cfg.authorizations.len()), (2, 1));
    dump_seeds("local_config", &seeds);
    run_corpus(
        "local_config",
        &seeds,
        &dict_local_config(),
        20_000,
        local_config,
    );
}

#[test]
fn smoke_zds_decode() {
    dump_seeds("zds_decode", &seeds_zds_messages());
    run_corpus(
        "zds_decode",
        &seeds_zds_messages(),
        &dict_protobuf(),
        30_000,
        zds_decode,
    );
}

#[test]
fn smoke_zds_client() {
    let seeds: Vec<Vec<u8>> = seeds_zds_messages()
        .into_iter()
        .flat_map(|m| [[&[0u8][..], &m].concat(), [&[1u8][..], &m].concat()])
        .collect();
    let h = ZdsHarness::new();
    dump_seeds("zds_client", &seeds);
    run_corpus("zds_client", &seeds, &dict_protobuf(), 10_000, |d| {
        zds_client(&h, d)
    });
}

/// Length of what `conn` puts before the frames: flags, preface, SETTINGS.
const CONN_HEAD: usize = 1 + PREFACE.len() + 9;

#[test]
fn smoke_hbone_server() {
    let rt = runtime();
    let seeds = seeds_hbone_server();
    // The seeds reach the handler: the first is echoed, the second is
    // accepted without echo, the third rejected.
    let contains = |out: &[u8], what: &[u8]| out.windows(what.len()).any(|w| w == what);
    assert!(contains(&hbone_server(&rt, &seeds[0]), b"hello"));
    assert!(!contains(&hbone_server(&rt, &seeds[1]), b"hello"));
    dump_seeds("hbone_server", &seeds);
    run_corpus("hbone_server", &seeds, &dict_h2(), 10_000, |d| {
        hbone_server(&rt, d);
    });
    // Mutating whole inputs mostly breaks the preface; also mutate only
    // the frames after it, with each handler behaviour in turn.
    let tails: Vec<Vec<u8>> = seeds
        .iter()
        .filter(|s| s.len() > CONN_HEAD && s[1..].starts_with(PREFACE))
        .map(|s| s[CONN_HEAD..].to_vec())
        .collect();
    let mut n = 0u8;
    run_corpus("hbone_server_frames", &tails, &dict_h2(), 10_000, |tail| {
        n = n.wrapping_add(1);
        hbone_server(&rt, &conn(n % 8, &[tail.to_vec()]));
    });
}

/// An upper-case trust domain given to `Identity::try_new` must equal the
/// identity parsed back from its text (parsing folds the trust domain), or a
/// workload whose record says `Cluster.Local` would not match the identity
/// read from its own certificate.
#[test]
fn identity_try_new_round_trips_exactly() {
    let id = Identity::try_new("Cluster.Local", "ns", "sa").expect("accepted");
    assert_eq!(id.to_string().parse::<Identity>(), Ok(id));
}

// ---------------------------------------------------------------------------
// The CA's view of a caller's CSR (target `ca_csr`).
// ---------------------------------------------------------------------------

/// Generating a CA costs a key and a self-check: one per process.
static FUZZ_CA: OnceLock<CertificateAuthority> = OnceLock::new();

fn fuzz_ca() -> &'static CertificateAuthority {
    FUZZ_CA.get_or_init(|| CertificateAuthority::generate("cluster.local").expect("generate CA"))
}

/// `der` as the PEM text a caller would send.
fn csr_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

/// One DER tag, length and value.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(n) if n < 0x80 => out.push(n),
        _ => {
            let len = (content.len() as u64).to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (len.len() - skip) as u8);
            out.extend(&len[skip..]);
        }
    }
    out.extend(content);
    out
}

/// `info` (a CertificationRequestInfo, or anything) signed with
/// [`fixed_key`] into a CSR's DER.
fn signed_csr(info: &[u8]) -> Vec<u8> {
    use rcgen::SigningKey;
    const ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    let sig = fixed_key().sign(info).expect("Ed25519 signs anything");
    let mut body = info.to_vec();
    body.extend(ED25519);
    body.extend(der_tlv(0x03, &[&[0u8][..], &sig].concat()));
    der_tlv(0x30, &body)
}

/// A CSR through `csr_identities` and `sign_csr`. Bits 0-1 of the first
/// byte say what the rest is: 0 the PEM text; 1 DER, wrapped as PEM here so
/// that mutations reach the ASN.1 instead of breaking the base64; 2 or 3 a
/// CertificationRequestInfo, signed here so that mutations of its names and
/// extensions get past the signature check. Whatever the CSR asks for, a
/// signed leaf names only the identity the CA was given, is no CA, and
/// carries the CSR's key; and both functions agree on whether the request
/// itself is valid.
pub fn ca_csr(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let pem = match flags & 3 {
        0 => String::from_utf8_lossy(body).into_owned(),
        1 => csr_pem(body),
        _ => csr_pem(&signed_csr(body)),
    };
    let asked = csr_identities(&pem);
    match &asked {
        Ok(uris) => {
            for u in uris {
                let _ = u.parse::<Identity>();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let ca = fuzz_ca();
    let id = Identity::new("cluster.local", "fuzz", "caller");
    let chain = match ca.sign_csr(&pem, &id, Duration::from_secs(3600)) {
        Ok(chain) => chain,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        matches!(
            &asked,
            Ok(_)
                | Err(CaError::Parse {
                    what: "CSR extension",
                    ..
                })
        ),
        "signed a CSR that csr_identities refuses: {asked:?}"
    );
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.root_pem());
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).expect("leaf is PEM");
    assert_eq!(identity_from_cert(&leaf).ok().as_ref(), Some(&id));
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("leaf parses");
    assert!(!cert.is_ca());
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).expect("CSR is PEM");
    let (_, req) = X509CertificationRequest::from_der(der.as_ref()).expect("CSR parses");
    let (have, want) = (
        cert.public_key(),
        &req.certification_request_info.subject_pki,
    );
    assert_eq!(have.algorithm.algorithm, want.algorithm.algorithm);
    assert_eq!(have.subject_public_key.data, want.subject_public_key.data);
}

/// Made with openssl; ECDSA signatures are randomised, so a fixed text keeps
/// the mutants the same on every run.
const CSR_P256: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBETCBuAIBADAPMQ0wCwYDVQQKDARmdXp6MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEWb4zcIiiS200B3OkTEAoE5m87BzkEZ9pNihjbKQfJsFGr1IF7z6grVZe
52ngxhr0onfnD8UjGIJZJFn2EZ+gYKBHMEUGCSqGSIb3DQEJDjE4MDYwNAYDVR0R
BC0wK4Ypc3BpZmZlOi8vY2x1c3Rlci5sb2NhbC9ucy9kZWZhdWx0L3NhL3AyNTYw
CgYIKoZIzj0EAwIDSAAwRQIhANIv0FodxOQvuYRsD6h+bqhoMW/HVFxSi7qbhDJo
4GxbAiBi8yMt9g4YsXBS8YdIK0XDPWAR85E5etv4DgGuagRXlQ==
-----END CERTIFICATE REQUEST-----
";

/// RSA 2048, SANs `spiffe://cluster.local/ns/a/sa/rsa` and `x.example`.
const CSR_RSA: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIICkDCCAXgCAQAwADCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAK93
ZHSrHMst2DPd1exLQLyKMuZnOCYEVndL5yV+m1vArGG9san4h5U67T9e5szttpyy
CbByStjP2TWIkVj9tG6VNB5tyeRIjk9JszWtuVjKWtdUF0pdYAb8uCHN3t3zdite
mEdjVaGvW2w4tMTPLsoQHdQKysfnfZpX0+8d1E/xpq2IpSuJIUkizAB3PKoOx6iH
8pxbymcWp2T+DJwx74Y6OzttL+0n9M2J/028xT6yVxG5dv3ZvXEfpqpfHPSVxVU7
bbl53Jp0hI0hJG41U3SXpylgnyXFjTf24i2RU4nzOuEMUA3rx+hHcQU4qsMvrOIE
XvZBA+PqvwJR9M9UkSkCAwEAAaBLMEkGCSqGSIb3DQEJDjE8MDowOAYDVR0RBDEw
L4Yic3BpZmZlOi8vY2x1c3Rlci5sb2NhbC9ucy9hL3NhL3JzYYIJeC5leGFtcGxl
MA0GCSqGSIb3DQEBCwUAA4IBAQBQVPLP9LIJ5XWTdJ/VcGfZkeSW88/1DKBWIbDY
PIkjo0lAmx08yl8cktw22m/V0N0m2i6WJkrPlYAuInz1M2RkUp9D4/iXitgptHVV
n2/4o05qWLkyMGHLGCgFq18cwXEwBeHtsFgz17iX/s3YbN3kopW3XVeixSOJZy3Z
i8b0kO4j30B8yfIsZEzgDaUzJs5IssF12bPhCb08LN4gIKxcN8g7JOo1FgkSHD5f
8YqSvt9VDV6kMx3O/IBMRuw2jyp0I01kqQvWjDYjw0hl+PMRpVSVyi2ddKaYpdDb
zQWeAPSR1/5ty8Z/Ki9mLwR1VOgBAl3SA35L5K8YaOASfPhU
-----END CERTIFICATE REQUEST-----
";

/// A CSR signed with [`fixed_key`] (Ed25519: the same bytes every run).
fn ed25519_csr(sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .serialize_request(&fixed_key())
        .expect("test CSR")
        .der()
        .to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("seed CSR")
        .to_vec()
}

/// The CertificationRequestInfo of a CSR.
fn csr_info(der: &[u8]) -> Vec<u8> {
    let (_, req) = X509CertificationRequest::from_der(der).expect("seed CSR parses");
    req.certification_request_info.raw.to_vec()
}

/// Flag byte, then PEM text (0), DER (1) or the part to sign (2).
pub fn seeds_ca_csr() -> Vec<Vec<u8>> {
    let der = |d: &[u8]| [&[1u8][..], d].concat();
    let pem = |p: &str| [&[0u8][..], p.as_bytes()].concat();
    let info = |d: &[u8]| [&[2u8][..], &csr_info(d)].concat();
    let good = ed25519_csr(vec![uri("spiffe://cluster.local/ns/default/sa/x")]);
    let many = ed25519_csr(vec![
        uri("spiffe://a/ns/b/sa/c"),
        uri("https://example.com/"),
        rcgen::SanType::DnsName("x.example".try_into().expect("DNS name")),
        rcgen::SanType::IpAddress([10, 0, 0, 1].into()),
    ]);
    let mut bad_signature = good.clone();
    if let Some(last) = bad_signature.last_mut() {
        *last ^= 1;
    }
    let mut trailing = good.clone();
    trailing.push(0);
    let p256 = pem_der(CSR_P256);
    vec![
        der(&good),
        pem(&csr_pem(&good)),
        pem(CSR_P256),
        der(&p256),
        pem(CSR_RSA),
        der(&pem_der(CSR_RSA)),
        der(&ed25519_csr(vec![])),
        der(&many),
        der(&bad_signature),
        der(&trailing),
        pem(&format!("{}{}", csr_pem(&good), CSR_P256)),
        pem(&CSR_P256.replace('\n', "\r\n")),
        pem(&CSR_P256.replace("CERTIFICATE REQUEST", "CERTIFICATE")),
        pem(&CSR_P256.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")),
        pem("-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n"),
        pem("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n"),
        der(&[0x30, 0x80]),
        der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
        der(&[]),
        vec![],
        info(&good),
        info(&many),
        info(&p256),
        [&[2u8][..], &[0x30, 0x00]].concat(),
    ]
}

pub fn dict_ca_csr() -> Vec<&'static [u8]> {
    vec![
        &[0x30, 0x82],
        &[0x30, 0x80, 0x00, 0x00],
        &[0xa0, 0x00], // empty attributes
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e,
        ], // extensionRequest
        &[0x06, 0x03, 0x55, 0x1d, 0x11], // subjectAltName
        &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01], // id-ecPublicKey
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07], // P-256
        &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], // P-384
        &[0x06, 0x03, 0x2b, 0x65, 0x70], // Ed25519
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
        ], // rsaEncryption
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ], // sha256WithRSA
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02], // ecdsa-with-SHA256
        &[0x86, 0x00],
        &[0x82, 0x01, b'x'],
        &[0x87, 0x04, 10, 0, 0, 1],
        &[0x04, 0x00],
        &[0x01, 0x01, 0xff], // critical
        b"spiffe://",
        b"-----BEGIN CERTIFICATE REQUEST-----\n",
        b"-----END CERTIFICATE REQUEST-----\n",
        b"\n",
        b"=",
    ]
}

#[test]
fn smoke_ca_csr() {
    let seeds = seeds_ca_csr();
    // The seeds mean what they were built to mean.
    let id = Identity::new("cluster.local", "fuzz", "caller");
    let ca = fuzz_ca();
    let text = |s: &[u8]| String::from_utf8(s[1..].to_vec()).expect("PEM seed");
    for (i, want) in [
        (1, "spiffe://cluster.local/ns/default/sa/x"),
        (2, "spiffe://cluster.local/ns/default/sa/p256"),
        (4, "spiffe://cluster.local/ns/a/sa/rsa"),
    ] {
        let pem = text(&seeds[i]);
        assert_eq!(csr_identities(&pem).expect("seed CSR"), [want], "seed {i}");
        ca.sign_csr(&pem, &id, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("seed {i} not signed: {e}"));
    }
    let bad = csr_pem(&seeds[8][1..]);
    assert!(matches!(csr_identities(&bad), Err(CaError::CsrSignature)));
    assert!(matches!(
        ca.sign_csr(&bad, &id, Duration::from_secs(60)),
        Err(CaError::CsrSignature)
    ));
    // Signing the info part again gives back the same CSR.
    assert_eq!(signed_csr(&seeds[20][1..]), seeds[0][1..]);
    dump_seeds("ca_csr", &seeds);
    run_corpus("ca_csr", &seeds, &dict_ca_csr(), 20_000, ca_csr);
}
