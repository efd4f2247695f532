//! End-to-end tests of ztunnel's L4 data path in network namespaces: two
//! nodes, a ztunnel per node, pods captured in-pod, traffic over HBONE.
//!
//! Needs root and the `ztunnel` and `mesh-app` binaries (`cargo build
//! --workspace --bins`); without root each test says so and returns.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::capture;
use e2e::mesh::{hostname, Mesh, MeshSpec};
use mesh_core::identity::Identity;

const VIP: [u8; 4] = [10, 96, 0, 10];
const VIP_STR: &str = "10.96.0.10";
/// `mesh-app http-get` exit codes (curl's): connection refused, reset.
const REFUSED: i32 = 7;
const RESET: i32 = 56;

fn root_or_skip() -> bool {
    if !e2e::is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return false;
    }
    true
}

/// client (n1), b1 (n2) and b2 (n1) in the mesh; outsider (n1) not; an
/// external host; service b = b1 on 80->8080, 9000 (hash), 9001 (echo).
fn spec() -> MeshSpec {
    MeshSpec::default()
        .node("n1")
        .node("n2")
        .mesh_pod("n1", "client", "sleep")
        .mesh_pod("n2", "b1", "b")
        .mesh_pod("n1", "b2", "b")
        .plain_pod("n1", "outsider")
        .external()
        .service("b", VIP, &[(80, 8080), (9000, 9000), (9001, 9001)], &["b1"])
}

fn start(spec: MeshSpec) -> Mesh {
    let mesh = Mesh::start(spec).expect("mesh starts");
    let t = &mesh.topo;
    for (pod, name) in [("b1", "b1"), ("b2", "b2")] {
        mesh.spawn_app(
            t.pod(pod),
            &format!("http-{name}"),
            &["http-server", "--port", "8080", "--name", name],
        )
        .unwrap();
        t.wait_for_tcp(t.pod(pod), t.pod(pod).addr(8080)).unwrap();
    }
    mesh.spawn_app(t.pod("b1"), "hash-b1", &["hash-server", "--port", "9000"])
        .unwrap();
    mesh.spawn_app(t.pod("b1"), "echo-b1", &["tcp-echo", "--port", "9001"])
        .unwrap();
    t.wait_for_tcp(t.pod("b1"), t.pod("b1").addr(9000)).unwrap();
    t.wait_for_tcp(t.pod("b1"), t.pod("b1").addr(9001)).unwrap();
    if t.try_external().is_some() {
        mesh.spawn_app(
            t.external(),
            "http-ext",
            &["http-server", "--port", "8080", "--name", "external"],
        )
        .unwrap();
        t.wait_for_tcp(t.external(), t.external().addr(8080))
            .unwrap();
    }
    mesh
}

/// `mesh-app http-get` from a pod; returns (exit code, parsed JSON body).
fn get(mesh: &Mesh, pod: &str, url: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["http-get", url];
    if !extra.contains(&"-m") {
        args.extend_from_slice(&["-m", "10"]);
    }
    args.extend_from_slice(extra);
    let out = mesh.app(mesh.topo.pod(pod), &args).unwrap();
    let code = out.code().unwrap_or(-1);
    // 2 is a usage error of mesh-app itself: a broken test, not a verdict.
    assert_ne!(code, 2, "mesh-app usage error: {}", out.stderr);
    // `HTTP/1.1 200 OK` then the JSON body.
    let json = out.stdout.find('{').map(|i| &out.stdout[i..]).unwrap_or("");
    let body = serde_json::from_str(json.trim()).unwrap_or(serde_json::Value::Null);
    (code, body)
}

fn metric_lines(text: &str, name: &str, must_contain: &[&str]) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|m| l.contains(m)))
        .map(String::from)
        .collect()
}

/// Assert that `node`'s ztunnel counted an opened connection with all of
/// `labels`; returns the metrics text for further checks.
fn assert_opened(mesh: &Mesh, node: &str, labels: &[&str], what: &str) -> String {
    let text = mesh.metrics(node).unwrap();
    assert!(
        !metric_lines(&text, "istio_tcp_connections_opened_total", labels).is_empty(),
        "{what}: no istio_tcp_connections_opened_total with {labels:?} on {node}:\n{text}"
    );
    text
}

/// A request that must succeed, answered by `server`, which must see the
/// client pod's own address.
fn get_ok(mesh: &Mesh, from: &str, url: &str, server: &str) -> serde_json::Value {
    let (code, body) = get(mesh, from, url, &[]);
    assert_eq!(code, 0, "{body}\n{}", mesh.ztunnel_logs());
    assert_eq!(body["server"], server, "{body}");
    assert_eq!(
        body["client_ip"],
        mesh.topo.pod(from).ip().to_string(),
        "{body}"
    );
    body
}

/// Poll `f` until it returns true (bounded; the bound only avoids hanging).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn http_through_service_vip_crosses_nodes_over_hbone() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let t = &mesh.topo;
    // The application sees the real client address, not a proxy's.
    let body = get_ok(&mesh, "client", &format!("http://{VIP_STR}/hello"), "b1");
    assert_eq!(body["path"], "/hello");
    // Source ztunnel reported it as mutual TLS to b's identity...
    assert_opened(
        &mesh,
        "n1",
        &[
            "reporter=\"source\"",
            "destination_service=\"b.default.svc.cluster.local\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/b\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
        "source side",
    );
    // ...and the destination ztunnel saw the client's certificate identity.
    assert_opened(
        &mesh,
        "n2",
        &[
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_workload=\"b1\"",
        ],
        "destination side",
    );
    eventually("bytes counted on n2", || {
        let m2 = mesh.metrics("n2").unwrap();
        metric_lines(
            &m2,
            "istio_tcp_received_bytes_total",
            &["reporter=\"destination\""],
        )
        .iter()
        .any(|l| !l.ends_with(" 0"))
    });

    // config_dump has Istio's shape.
    let dump = mesh.config_dump("n1").unwrap();
    let wl = dump["workloads"].as_array().unwrap();
    let b1 = wl.iter().find(|w| w["name"] == "b1").expect("b1 in dump");
    assert_eq!(b1["protocol"], "HBONE");
    assert_eq!(b1["workloadIps"][0], t.pod("b1").ip().to_string());
    assert_eq!(b1["serviceAccount"], "b");
    let svc = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "b")
        .expect("service b");
    assert_eq!(svc["hostname"], hostname("b"));
    assert_eq!(svc["vips"][0], format!("/{VIP_STR}"));
    assert_eq!(svc["endpoints"].as_object().unwrap().len(), 1);
    let certs = dump["certificates"].as_array().unwrap();
    assert!(
        certs
            .iter()
            .any(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/sleep"),
        "client certificate in dump: {certs:?}"
    );
    assert!(dump["workloadState"]
        .as_object()
        .unwrap()
        .contains_key(&e2e::mesh::uid("client")));
}

#[test]
fn tcp_stream_of_64_mib_arrives_intact() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let out = mesh
        .app(
            mesh.topo.pod("client"),
            &[
                "hash-client",
                &format!("{VIP_STR}:9000"),
                "--bytes",
                &(64u64 << 20).to_string(),
            ],
        )
        .unwrap();
    assert!(
        out.success(),
        "hash mismatch or failure: {}\n{}\n{}",
        out.stdout,
        out.stderr,
        mesh.ztunnel_logs()
    );
}

#[test]
fn pod_to_pod_on_the_same_node_goes_through_ztunnel() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let url = format!("http://{}:8080/same", mesh.topo.pod("b2").ip());
    get_ok(&mesh, "client", &url, "b2");
    assert_opened(
        &mesh,
        "n1",
        &[
            "reporter=\"destination\"",
            "destination_workload=\"b2\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
        "same-node traffic did not arrive over HBONE",
    );
}

#[test]
fn destination_outside_the_mesh_is_passed_through() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let url = format!("http://{}:8080/out", mesh.topo.external().ip());
    get_ok(&mesh, "client", &url, "external");
    assert_opened(
        &mesh,
        "n1",
        &[
            "reporter=\"source\"",
            "connection_security_policy=\"none\"",
            "destination_workload=\"unknown\"",
        ],
        "passthrough not recorded",
    );
}

#[test]
fn non_mesh_client_reaches_mesh_pod_through_inbound_plaintext() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let url = format!("http://{}:8080/in", mesh.topo.pod("b1").ip());
    get_ok(&mesh, "outsider", &url, "b1");
    assert_opened(
        &mesh,
        "n2",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"none\"",
            "destination_workload=\"b1\"",
            // Plaintext has no authenticated principal, even from a known pod.
            "source_principal=\"unknown\"",
            "source_workload=\"outsider\"",
        ],
        "plaintext inbound not recorded by ztunnel",
    );
}

#[test]
fn application_bytes_never_cross_the_node_link_in_clear() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let t = &mesh.topo;
    let marker = format!("MARKER-{}", std::process::id());
    // Mesh traffic n1 -> n2, captured on n2's port of the bridge.
    let cap = t
        .capture(t.bridge(), &t.node("n2").bridge_port(), "tcp")
        .unwrap();
    let (code, body) = get(
        &mesh,
        "client",
        &format!("http://{VIP_STR}/{marker}"),
        &["-H", &format!("x-marker: {marker}")],
    );
    assert_eq!(code, 0, "{body}");
    assert!(
        body.to_string().contains(&marker),
        "the server got the marker"
    );
    let pcap = cap.stop().unwrap();
    let packets = capture::packets(&pcap).unwrap();
    assert!(
        packets.len() > 4,
        "capture saw the tunnel ({} packets)",
        packets.len()
    );
    assert!(
        !capture::contains(&pcap, marker.as_bytes()),
        "marker seen in clear on the node link"
    );

    // Control: the same capture does see a marker sent in plaintext, so the
    // absence above means encryption, not a blind capture.
    let cap = t
        .capture(t.bridge(), t.external().bridge_port(), "tcp")
        .unwrap();
    let (code, _) = get(
        &mesh,
        "client",
        &format!("http://{}:8080/{marker}", t.external().ip()),
        &[],
    );
    assert_eq!(code, 0);
    let pcap = cap.stop().unwrap();
    assert!(
        capture::contains(&pcap, marker.as_bytes()),
        "control capture should see plaintext"
    );
}

#[test]
fn client_refuses_a_server_with_the_wrong_identity() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    // n1 now believes b1 runs as "imposter"; b1's ztunnel keeps presenting "b".
    let state = mesh
        .state_yaml()
        .replace("serviceAccount: b\n", "serviceAccount: imposter\n");
    assert!(state.contains("imposter"));
    mesh.write_state("n1", &state).unwrap();
    eventually("n1 reloads its state", || {
        mesh.config_dump("n1")
            .map(|d| {
                d["workloads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["serviceAccount"] == "imposter")
            })
            .unwrap_or(false)
    });
    let (code, body) = get(&mesh, "client", &format!("http://{VIP_STR}/"), &[]);
    assert_eq!(code, RESET, "request must be reset, got {body}");
    assert_ne!(body["server"], "b1");
    eventually("the refusal is logged", || {
        let logs = mesh.ztunnel_logs();
        logs.contains("imposter") && logs.contains("outbound connection failed")
    });
}

/// Dial b1's HBONE port from the outsider pod with the given client config.
fn dial_hbone(
    mesh: &Mesh,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let b1 = mesh.topo.pod("b1").addr(15008);
    let std =
        e2e::mesh::connect_from(mesh.topo.pod("outsider"), b1).map_err(std::io::Error::other)?;
    std.set_nonblocking(true)?;
    mesh.runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(std)?;
        let name = rustls::pki_types::ServerName::IpAddress(b1.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the server's verdict on our certificate arrives after the
        // client's handshake completes; a read surfaces it.
        use tokio::io::AsyncWriteExt;
        tls.flush().await?;
        Ok(tls)
    })
}

fn workload_cert(
    ca: &mesh_core::ca::CertificateAuthority,
    id: &Identity,
) -> mesh_core::tls::WorkloadCertificate {
    let (csr, key) = mesh_core::ca::generate_csr(id).unwrap();
    let chain = ca.sign_csr(&csr, id, Duration::from_secs(3600)).unwrap();
    let roots = chain.last().unwrap().clone();
    mesh_core::tls::WorkloadCertificate::from_pem(&chain.join(""), &key, &roots).unwrap()
}

/// Send CONNECTs over one HBONE connection; returns each status (0: the
/// connection failed).
fn connect_statuses(
    mesh: &Mesh,
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    reqs: Vec<(http::Method, String)>,
) -> Vec<u16> {
    mesh.runtime().block_on(async move {
        let Ok((mut client, conn)) = h2::client::handshake(tls).await else {
            return vec![0];
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut out = Vec::new();
        for (method, authority) in reqs {
            let uri = http::Uri::builder()
                .scheme("https")
                .authority(authority.as_str())
                .path_and_query("/")
                .build()
                .unwrap();
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(uri)
                .body(())
                .unwrap();
            if method == http::Method::CONNECT {
                *req.uri_mut() = authority.parse().unwrap();
            }
            client = match client.ready().await {
                Ok(c) => c,
                Err(_) => {
                    out.push(0);
                    break;
                }
            };
            let Ok((resp, _send)) = client.send_request(req, false) else {
                out.push(0);
                break;
            };
            out.push(resp.await.map(|r| r.status().as_u16()).unwrap_or(0));
        }
        out
    })
}

/// Accepts any server certificate: these tests are about what the *server*
/// does with the client's certificate.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_cfg(
    cert: Option<&mesh_core::tls::WorkloadCertificate>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        Some(c) => b
            .with_client_auth_cert(c.chain().to_vec(), c.private_key().clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(cfg)
}

/// Whether a CONNECT to b1's app succeeds with this client config.
fn hbone_works(mesh: &Mesh, cfg: std::sync::Arc<rustls::ClientConfig>) -> bool {
    match dial_hbone(mesh, cfg) {
        Ok(tls) => {
            connect_statuses(
                mesh,
                tls,
                vec![(
                    http::Method::CONNECT,
                    mesh.topo.pod("b1").addr(8080).to_string(),
                )],
            ) == vec![200]
        }
        Err(_) => false,
    }
}

#[test]
fn hbone_server_refuses_clients_without_a_mesh_certificate() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let me = Identity::new("cluster.local", "default", "outsider");
    let other = mesh_core::ca::CertificateAuthority::generate("cluster.local").unwrap();
    assert!(
        !hbone_works(&mesh, client_cfg(Some(&workload_cert(&other, &me)))),
        "a certificate from a foreign root was accepted"
    );
    assert!(
        !hbone_works(&mesh, client_cfg(None)),
        "a client without a certificate was accepted"
    );
    let other_td = Identity::new("evil.example", "default", "outsider");
    assert!(
        !hbone_works(
            &mesh,
            client_cfg(Some(&workload_cert(&mesh.ca().unwrap(), &other_td)))
        ),
        "a certificate of another trust domain was accepted"
    );
    // A mesh certificate works, so the refusals above were about the certificate.
    assert!(
        hbone_works(
            &mesh,
            client_cfg(Some(&workload_cert(&mesh.ca().unwrap(), &me)))
        ),
        "{}",
        mesh.ztunnel_logs()
    );
}

#[test]
fn malformed_connects_get_errors_and_the_proxy_keeps_serving() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let t = &mesh.topo;
    let b = Identity::new("cluster.local", "default", "b");
    let me = Identity::new("cluster.local", "default", "outsider");
    let cert = workload_cert(&mesh.ca().unwrap(), &me);
    let cfg = mesh_core::tls::client_config(&cert, &[b]).unwrap();
    let tls = dial_hbone(&mesh, cfg.clone()).expect("mesh client accepted");
    let b1 = t.pod("b1");
    let statuses = connect_statuses(
        &mesh,
        tls,
        vec![
            // wrong method
            (http::Method::GET, b1.addr(8080).to_string()),
            // authority not ip:port
            (http::Method::CONNECT, "b1.default:8080".into()),
            (http::Method::CONNECT, "10.244.2.2".into()),
            // an address this pod does not have
            (http::Method::CONNECT, "10.244.9.9:8080".into()),
            // nothing listens there
            (http::Method::CONNECT, b1.addr(1).to_string()),
            // and a good one on the same connection still works
            (http::Method::CONNECT, b1.addr(8080).to_string()),
        ],
    );
    assert_eq!(
        statuses,
        vec![400, 400, 400, 400, 503, 200],
        "{}",
        mesh.ztunnel_logs()
    );
    // The ztunnel still serves ordinary traffic.
    let (code, body) = get(&mesh, "client", &format!("http://{VIP_STR}/after"), &[]);
    assert_eq!(code, 0, "{body}");
    assert_eq!(body["server"], "b1");
    assert!(mesh.ztunnel("n2").unwrap().is_running());
}

#[test]
fn graceful_shutdown_lets_an_open_connection_finish() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec().ztunnel_env("DRAIN_TIMEOUT", "30s"));
    let t = &mesh.topo;
    let vip: SocketAddr = format!("{VIP_STR}:9001").parse().unwrap();
    let conn = e2e::mesh::connect_from(t.pod("client"), vip).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    w.write_all(b"before\n").unwrap();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");

    let z = mesh.ztunnel("n1").unwrap();
    z.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually("drain starts", || z.stdout().contains("draining"));
    // New connections are no longer accepted...
    let (code, _) = get(
        &mesh,
        "client",
        &format!("http://{VIP_STR}/new"),
        &["--connect-timeout", "2"],
    );
    assert_eq!(
        code, REFUSED,
        "a new connection was accepted while draining"
    );
    // ...while the open one keeps working.
    line.clear();
    w.write_all(b"during drain\n").unwrap();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "during drain\n");
    assert!(z.is_running(), "ztunnel must wait for the open connection");
    drop(w);
    drop(r);
    let status = z
        .wait_timeout(Duration::from_secs(25))
        .unwrap()
        .expect("ztunnel exits once the connection closed");
    assert!(status.success(), "exit status {status:?}\n{}", z.stdout());
    assert!(z.stdout().contains("drained"), "{}", z.stdout());
}

#[test]
fn pod_removed_by_the_agent_is_no_longer_served() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec().ztunnel_env("CONNECT_TIMEOUT", "2s"));
    let t = &mesh.topo;
    let url = format!("http://{}:8080/", t.pod("b2").ip());
    let (code, _) = get(&mesh, "client", &url, &[]);
    assert_eq!(code, 0, "b2 reachable before removal");
    mesh.remove_pod("b2").unwrap();
    let dump = mesh.config_dump("n1").unwrap();
    assert!(
        !dump["workloadState"]
            .as_object()
            .unwrap()
            .contains_key(&e2e::mesh::uid("b2")),
        "{}",
        dump["workloadState"]
    );
    // b2's own outbound capture has no listener any more: its traffic is
    // refused, never sent around the mesh.
    let (code, _) = get(
        &mesh,
        "b2",
        &format!("http://{}:8080/", t.pod("b1").ip()),
        &["--connect-timeout", "3"],
    );
    assert_eq!(code, REFUSED, "a removed pod's traffic went out");
    // And nothing answers HBONE for it: the client's connection fails.
    let (code, body) = get(
        &mesh,
        "client",
        &url,
        &["--connect-timeout", "3", "-m", "8"],
    );
    assert_eq!(code, RESET, "removed pod still served: {body}");
    // The other pods of the node are untouched.
    let (code, body) = get(&mesh, "client", &format!("http://{VIP_STR}/"), &[]);
    assert_eq!(code, 0, "{body}");
}

#[test]
fn restarted_ztunnel_gets_the_snapshot_again() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec());
    let z = mesh.ztunnel("n2").unwrap();
    mesh.restart_ztunnel("n2").unwrap();
    assert!(!z.is_running(), "old ztunnel stopped");
    let (code, body) = get(&mesh, "client", &format!("http://{VIP_STR}/again"), &[]);
    assert_eq!(code, 0, "{body}\n{}", mesh.ztunnel_logs());
    assert_eq!(body["server"], "b1");
}

#[test]
fn without_mesh_state_traffic_is_held_not_passed_through_in_plaintext() {
    if !root_or_skip() {
        return;
    }
    let mesh = start(spec().ztunnel_env("CONNECT_TIMEOUT", "2s"));
    let t = &mesh.topo;
    let good = mesh.state_yaml();
    // n1's ztunnel restarts with a state file it cannot use: it gets its pods
    // from the node agent but does not know the mesh.
    mesh.write_state(
        "n1",
        "addresses: [ {workload: {uid: 3, tunnelProtocol: NOPE}} ]\n",
    )
    .unwrap();
    mesh.start_ztunnel("n1").unwrap();
    eventually("pods handed over", || {
        mesh.config_dump("n1")
            .map(|d| d["workloadState"].as_object().is_some_and(|o| o.len() == 2))
            .unwrap_or(false)
    });
    let (ready, body) = mesh.http_get_node("n1", 15021, "/healthz/ready").unwrap();
    assert!(!ready, "ready without state: {body}");
    assert!(body.contains("state"), "{body}");
    // b1 would accept plaintext on 15006, so a pass-through would succeed:
    // the request must fail instead.
    let url = format!("http://{}:8080/held", t.pod("b1").ip());
    let (code, body) = get(&mesh, "client", &url, &["-m", "8"]);
    assert_eq!(
        code, RESET,
        "traffic left unprotected before the mesh state arrived: {body}"
    );
    mesh.write_state("n1", &good).unwrap();
    eventually("traffic flows once the state is loaded", || {
        get(&mesh, "client", &url, &[]).0 == 0
    });
    let m2 = mesh.metrics("n2").unwrap();
    assert!(
        metric_lines(
            &m2,
            "istio_tcp_connections_opened_total",
            &[
                "connection_security_policy=\"none\"",
                "source_workload=\"client\""
            ]
        )
        .is_empty(),
        "client traffic arrived in plaintext:\n{m2}"
    );
}
