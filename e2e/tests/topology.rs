//! Tests of the namespace harness itself: connectivity of the local network,
//! cleanup, captures, the test application, and the in-pod redirect rules
//! checked with plain sockets standing in for ztunnel's listeners.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::capture;
use e2e::netns::{HasNetns, Netns};
use e2e::topology::{self, Topology};
use node_agent::rules::{self, RuleOptions};
use socket2::{Domain, SockRef, Socket, Type};

const MESH_APP: &str = env!("CARGO_BIN_EXE_mesh-app");
/// Bound on single network steps so a broken rule fails the test instead of
/// hanging it.
const STEP: Duration = Duration::from_secs(10);

fn root_or_skip(test: &str) -> bool {
    if e2e::is_root() {
        return true;
    }
    eprintln!("skipping {test}: network namespaces need root");
    false
}

/// node1: a1, a2; node2: b1, b2; plus the external host.
fn two_nodes() -> Result<Topology> {
    Ok(Topology::builder()
        .node("node1")
        .node("node2")
        .pod("node1", "a1")
        .pod("node1", "a2")
        .pod("node2", "b1")
        .pod("node2", "b2")
        .external()
        .build()?)
}

fn mesh_app(args: &[&str]) -> Command {
    let mut cmd = Command::new(MESH_APP);
    cmd.args(args);
    cmd
}

fn http_server(topo: &Topology, ns: &impl HasNetns, addr: SocketAddr, name: &str) -> Result<()> {
    let port = addr.port().to_string();
    topo.spawn(
        ns,
        mesh_app(&["http-server", "--port", &port, "--name", name]),
    )?;
    topo.wait_for_tcp(ns, addr)?;
    Ok(())
}

/// Runs `mesh-app http-get` and returns its exit code and the JSON body.
fn http_get(
    topo: &Topology,
    from: &impl HasNetns,
    url: &str,
) -> Result<(Option<i32>, String, Option<serde_json::Value>)> {
    let out = topo.exec(from, &[MESH_APP, "http-get", url])?;
    let body = out
        .stdout
        .split_once('\n')
        .and_then(|(_, body)| serde_json::from_str(body).ok());
    Ok((out.code(), format!("{}{}", out.stdout, out.stderr), body))
}

// ------------------------------------------------------------ connectivity

#[test]
fn pods_reach_each_other_and_the_external_host() -> Result<()> {
    if !root_or_skip("pods_reach_each_other_and_the_external_host") {
        return Ok(());
    }
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    let topo = two_nodes()?;
    let ext = topo.external();
    for pod in topo.pods() {
        http_server(&topo, pod, pod.addr(8080), pod.name())?;
    }
    http_server(&topo, ext, ext.addr(8080), "external")?;

    let a1 = topo.pod("a1");
    for (target, ip) in [
        ("a2", topo.pod("a2").ip()),
        ("b1", topo.pod("b1").ip()),
        ("b2", topo.pod("b2").ip()),
        ("external", ext.ip()),
    ] {
        let (code, text, body) = http_get(&topo, a1, &format!("http://{ip}:8080/hello?x=1"))?;
        ensure!(code == Some(0), "a1 -> {target}: {text}");
        let body = body.with_context(|| format!("a1 -> {target}: no JSON body in {text}"))?;
        assert_eq!(body["server"], target);
        assert_eq!(body["path"], "/hello?x=1");
        assert_eq!(body["method"], "GET");
        // No NAT anywhere: servers see the pod's own address.
        assert_eq!(body["client_ip"], a1.ip().to_string(), "a1 -> {target}");
    }
    // The external host reaches pods and is seen with its own address.
    let b2 = topo.pod("b2");
    let (code, text, body) = http_get(&topo, ext, &format!("http://{}:8080/", b2.ip()))?;
    ensure!(code == Some(0), "external -> b2: {text}");
    assert_eq!(
        body.context("JSON body")?["client_ip"],
        ext.ip().to_string()
    );

    for node in topo.nodes() {
        assert_eq!(node.netns().sysctl("net.ipv4.ip_forward")?, "1");
    }
    assert_eq!(a1.netns().sysctl("net.ipv4.conf.all.rp_filter")?, "0");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?,
        host_forward,
        "the host's own forwarding setting must not change"
    );
    Ok(())
}

#[test]
fn topology_accessors_describe_the_layout() -> Result<()> {
    if !root_or_skip("topology_accessors_describe_the_layout") {
        return Ok(());
    }
    let mut topo = Topology::builder().node("n1").node("n2").build()?;
    let added = topo.add_pod("n2", "late")?;
    assert_eq!(added.ip(), Ipv4Addr::new(10, 244, 2, 2));
    assert_eq!(added.gateway(), Ipv4Addr::new(10, 244, 2, 1));
    assert_eq!(added.node_name(), "n2");
    assert!(added.netns_name().starts_with(topo.prefix()));
    assert_eq!(
        added.netns_path(),
        std::path::Path::new("/var/run/netns").join(added.netns_name())
    );
    assert!(added.netns_path().exists());
    let n2 = topo.node("n2");
    assert_eq!(n2.ip(), Ipv4Addr::new(172, 30, 0, 12));
    assert_eq!(n2.pod_cidr().to_string(), "10.244.2.0/24");
    assert!(topo.try_external().is_none());
    assert!(matches!(
        topo.add_pod("nope", "x"),
        Err(topology::TopologyError::UnknownNode(_))
    ));
    assert!(matches!(
        topo.add_pod("n1", "late"),
        Err(topology::TopologyError::DuplicateName(_))
    ));
    // exec reports exit codes and output without failing on non-zero.
    let out = topo.exec(&added, &["sh", "-c", "echo out; echo err >&2; exit 3"])?;
    assert_eq!(out.code(), Some(3));
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert!(out.ok().is_err());
    // Commands see the pod's network, not the host's.
    let addrs = topo.exec(&added, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addrs.stdout.contains("10.244.2.2/24"), "{}", addrs.stdout);
    assert_eq!(e2e::app::mesh_app()?, std::path::PathBuf::from(MESH_APP));
    Ok(())
}

// ------------------------------------------------------------ cleanup

#[test]
fn dropping_the_topology_removes_everything() -> Result<()> {
    if !root_or_skip("dropping_the_topology_removes_everything") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let prefix = topo.prefix().to_string();
    let dir = topo.dir().to_path_buf();
    let b1 = topo.pod("b1").clone();
    let server = topo.spawn(&b1, mesh_app(&["tcp-echo", "--port", "9000"]))?;
    topo.wait_for_tcp(&b1, b1.addr(9000))?;
    assert_eq!(topology::namespaces_with_prefix(&prefix)?.len(), 8);
    drop(topo);
    assert_eq!(
        topology::namespaces_with_prefix(&prefix)?,
        Vec::<String>::new()
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!server.is_running());
    assert!(!std::path::Path::new("/proc")
        .join(server.pid().to_string())
        .exists());

    // The same holds when the test body panics.
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::builder()
            .node("n1")
            .pod("n1", "p")
            .build()
            .expect("build");
        seen = Some((topo.prefix().to_string(), topo.dir().to_path_buf()));
        panic!("test failure inside the topology's scope");
    }));
    assert!(result.is_err());
    let (prefix, dir) = seen.context("topology was built")?;
    assert_eq!(
        topology::namespaces_with_prefix(&prefix)?,
        Vec::<String>::new()
    );
    assert!(!dir.exists());
    Ok(())
}

#[test]
fn cleanup_stale_removes_only_dead_runs() -> Result<()> {
    if !root_or_skip("cleanup_stale_removes_only_dead_runs") {
        return Ok(());
    }
    // A pid that certainly belonged to a process that has exited.
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let stale = Netns::create(&format!("e2e-{dead}-0-p-left"))?;
    let live = Netns::create(&format!("e2e-{}-9999-p-mine", std::process::id()))?;
    let removed = topology::cleanup_stale()?;
    let still_there = stale.exists();
    let live_kept = live.exists();
    live.delete()?;
    stale.delete()?;
    assert!(!still_there, "stale namespace kept; removed: {removed:?}");
    assert!(removed.contains(&stale.name().to_string()));
    assert!(live_kept, "a live run's namespace was removed");
    Ok(())
}

// ------------------------------------------------------------ capture and app

#[test]
fn capture_on_the_bridge_sees_cross_node_payloads() -> Result<()> {
    if !root_or_skip("capture_on_the_bridge_sees_cross_node_payloads") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    topo.spawn(
        b1,
        mesh_app(&["tcp-echo", "--port", "9000,9001", "--prefix", "hello"]),
    )?;
    topo.wait_for_tcp(b1, b1.addr(9000))?;
    topo.wait_for_tcp(b1, b1.addr(9001))?;

    let node1 = topo.node("node1");
    let cap = topo.capture(topo.bridge(), &node1.bridge_port(), "tcp port 9001")?;
    let reply = exchange(a1, b1.addr(9001), b"needle-4711\nsecond\n", None, None)?;
    assert_eq!(reply, "hello needle-4711\nhello second\n");
    let pcap = cap.stop()?;
    assert!(!capture::packets(&pcap)?.is_empty());
    assert!(capture::contains(&pcap, b"needle-4711"));
    assert!(capture::contains(&pcap, b"hello second"));
    assert!(!capture::contains(&pcap, b"never-sent-5813"));
    Ok(())
}

#[test]
fn mesh_app_clients_report_like_curl() -> Result<()> {
    if !root_or_skip("mesh_app_clients_report_like_curl") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    http_server(&topo, b1, b1.addr(8080), "b1")?;
    topo.spawn(b1, mesh_app(&["hash-server", "--port", "9100"]))?;
    topo.spawn(b1, mesh_app(&["bench", "sink", "--port", "9200"]))?;
    topo.spawn(b1, mesh_app(&["bench", "rr-server", "--port", "9300"]))?;
    for port in [9100, 9200, 9300] {
        topo.wait_for_tcp(b1, b1.addr(port))?;
    }
    let b1ip = b1.ip();

    let (code, text, _) = http_get(&topo, a1, &format!("http://{b1ip}:8080/status/503"))?;
    assert_eq!(code, Some(22), "{text}");
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\n"),
        "{text}"
    );
    let (code, text, _) = http_get(&topo, a1, &format!("http://{b1ip}:8081/"))?;
    assert_eq!(code, Some(7), "{text}");
    let out = topo.exec(
        a1,
        &[
            MESH_APP,
            "http-get",
            "-H",
            "x-test: yes",
            &format!("http://{b1ip}:8080/h"),
        ],
    )?;
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.contains(r#""x-test":"yes""#), "{}", out.stdout);

    // A server that resets, and one that closes without answering.
    let reset = serve_in(b1, b1.addr(8090), None, false, Behaviour::Reset)?;
    let (code, text, _) = http_get(&topo, a1, &format!("http://{b1ip}:8090/"))?;
    assert_eq!(code, Some(56), "{text}");
    drop(reset);
    let close = serve_in(b1, b1.addr(8091), None, false, Behaviour::ReadAndClose)?;
    let (code, text, _) = http_get(&topo, a1, &format!("http://{b1ip}:8091/"))?;
    assert_eq!(code, Some(52), "{text}");
    drop(close);

    let out = topo
        .exec(
            a1,
            &[
                MESH_APP,
                "hash-client",
                &format!("{b1ip}:9100"),
                "--bytes",
                "3000001",
                "--seed",
                "9",
            ],
        )?
        .ok()?;
    let result: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(result["match"], true);
    assert_eq!(result["remote_bytes"], 3000001);

    let out = topo
        .exec(
            a1,
            &[
                MESH_APP,
                "bench",
                "source",
                &format!("{b1ip}:9200"),
                "--seconds",
                "0.5",
                "--streams",
                "2",
            ],
        )?
        .ok()?;
    let source: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert!(source["bytes"].as_u64().context("bytes")? > 0);
    assert!(source["mb_per_s"].as_f64().context("rate")? > 0.0);

    let out = topo
        .exec(
            a1,
            &[
                MESH_APP,
                "bench",
                "rr-client",
                &format!("{b1ip}:9300"),
                "--count",
                "200",
            ],
        )?
        .ok()?;
    let rr: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(rr["count"], 200);
    assert!(rr["p50_us"].as_f64().context("p50")? <= rr["p99_us"].as_f64().context("p99")?);

    let out = topo
        .exec(
            a1,
            &[
                MESH_APP,
                "bench",
                "cps-client",
                &format!("{b1ip}:9300"),
                "--seconds",
                "0.3",
            ],
        )?
        .ok()?;
    let cps: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert!(cps["connections"].as_u64().context("connections")? > 0);
    assert_eq!(cps["errors"], 0);
    Ok(())
}

// ------------------------------------------------------------ in-pod rules

#[test]
fn outbound_tcp_is_redirected_to_15001_except_marked_and_local() -> Result<()> {
    if !root_or_skip("outbound_tcp_is_redirected_to_15001_except_marked_and_local") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    rules::install(a1)?;
    let _outbound = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], rules::OUTBOUND_PORT)),
        Some(rules::SKIP_MARK),
        false,
        Behaviour::Report("outbound"),
    )?;
    let _app_b1 = serve_in(b1, b1.addr(8080), None, false, Behaviour::Report("b1"))?;
    let _local = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], 8081)),
        None,
        false,
        Behaviour::Report("a1-local"),
    )?;

    let report =
        ask(a1, b1.addr(8080), None, None).with_context(|| rules::dump(a1).unwrap_or_default())?;
    assert_eq!(field(&report, "name"), "outbound", "{report}");
    assert_eq!(field(&report, "orig"), b1.addr(8080).to_string());
    assert_eq!(field(&report, "peer_ip"), a1.ip().to_string());

    // ztunnel's own sockets (mark 0x539) go straight out.
    let report = ask(a1, b1.addr(8080), Some(rules::SKIP_MARK), None)?;
    assert_eq!(field(&report, "name"), "b1", "{report}");
    assert_eq!(field(&report, "peer_ip"), a1.ip().to_string());

    // Connections to the pod itself and to loopback stay local.
    let report = ask(a1, a1.addr(8081), None, None)?;
    assert_eq!(field(&report, "name"), "a1-local", "{report}");
    let report = ask(a1, SocketAddr::from(([127, 0, 0, 1], 8081)), None, None)?;
    assert_eq!(field(&report, "name"), "a1-local", "{report}");

    // Pods without rules are not affected.
    let report = ask(topo.pod("a2"), b1.addr(8080), None, None)?;
    assert_eq!(field(&report, "name"), "b1", "{report}");
    Ok(())
}

#[test]
fn inbound_tcp_is_tproxied_to_15006_and_hbone_to_15008() -> Result<()> {
    if !root_or_skip("inbound_tcp_is_tproxied_to_15006_and_hbone_to_15008") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    rules::install(a1)?;
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    let _inbound = serve_in(
        a1,
        any(rules::INBOUND_PORT),
        Some(rules::SKIP_MARK),
        true,
        Behaviour::Report("inbound"),
    )?;
    let _hbone = serve_in(
        a1,
        any(rules::HBONE_PORT),
        Some(rules::SKIP_MARK),
        true,
        Behaviour::Report("hbone"),
    )?;
    let _app = serve_in(a1, any(8080), None, false, Behaviour::Report("app"))?;

    for port in [8080, 9999] {
        let report = ask(b1, a1.addr(port), None, None)
            .with_context(|| rules::dump(a1).unwrap_or_default())?;
        assert_eq!(field(&report, "name"), "inbound", "{report}");
        // The original destination is the accepted socket's local address.
        assert_eq!(field(&report, "local"), a1.addr(port).to_string());
        assert_eq!(field(&report, "peer_ip"), b1.ip().to_string());
    }
    let report = ask(b1, a1.addr(rules::HBONE_PORT), None, None)?;
    assert_eq!(field(&report, "name"), "hbone", "{report}");
    assert_eq!(
        field(&report, "local"),
        a1.addr(rules::HBONE_PORT).to_string()
    );

    // The pod's own traffic to itself over loopback is not captured.
    let report = ask(a1, SocketAddr::from(([127, 0, 0, 1], 8080)), None, None)?;
    assert_eq!(field(&report, "name"), "app", "{report}");
    Ok(())
}

#[test]
fn inbound_without_a_transparent_listener_is_dropped_not_delivered() -> Result<()> {
    if !root_or_skip("inbound_without_a_transparent_listener_is_dropped_not_delivered") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    let _app = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], 8080)),
        None,
        false,
        Behaviour::Report("app"),
    )?;
    rules::install(a1)?;
    // ztunnel is not listening: the SYN must not reach the app behind its back.
    let err = connect_in(b1, a1.addr(8080), None, None, Duration::from_secs(2))
        .expect_err("connection bypassed the inbound capture");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let err = connect_in(
        b1,
        a1.addr(rules::HBONE_PORT),
        None,
        None,
        Duration::from_secs(2),
    )
    .expect_err("15008 reached without a listener");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    rules::remove(a1)?;
    let report = ask(b1, a1.addr(8080), None, None)?;
    assert_eq!(field(&report, "name"), "app", "{report}");
    Ok(())
}

#[test]
fn foreign_source_connections_to_the_app_get_their_replies() -> Result<()> {
    if !root_or_skip("foreign_source_connections_to_the_app_get_their_replies") {
        return Ok(());
    }
    // What ztunnel does after accepting inbound: connect to the app with the
    // client's address as source, from a transparent socket marked 0x539.
    let topo = two_nodes()?;
    let (a1, b1) = (topo.pod("a1"), topo.pod("b1"));
    let _app = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], 8080)),
        None,
        false,
        Behaviour::Report("app"),
    )?;
    let spoofed = Some(SocketAddr::from((b1.ip(), 0)));
    rules::install(a1)?;
    let report = ask(a1, a1.addr(8080), Some(rules::SKIP_MARK), spoofed)
        .with_context(|| rules::dump(a1).unwrap_or_default())?;
    assert_eq!(field(&report, "name"), "app", "{report}");
    assert_eq!(field(&report, "peer_ip"), b1.ip().to_string());

    // Without the connection mark and the local route the app's answer
    // leaves through eth0 towards b1, and the handshake never completes.
    rules::remove(a1)?;
    let err = connect_in(
        a1,
        a1.addr(8080),
        Some(rules::SKIP_MARK),
        spoofed,
        Duration::from_secs(2),
    )
    .expect_err("a spoofed connection worked without the policy route");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn probe_traffic_from_the_node_is_not_captured() -> Result<()> {
    if !root_or_skip("probe_traffic_from_the_node_is_not_captured") {
        return Ok(());
    }
    let topo = two_nodes()?;
    let a1 = topo.pod("a1");
    let node1 = topo.node("node1");
    // The node's SNAT address for kubelet probes.
    node1
        .netns()
        .ip(&["addr", "add", "169.254.7.127/32", "dev", "cni0"])?;
    rules::install(a1)?;
    let _inbound = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], rules::INBOUND_PORT)),
        Some(rules::SKIP_MARK),
        true,
        Behaviour::Report("inbound"),
    )?;
    let _app = serve_in(
        a1,
        SocketAddr::from(([0, 0, 0, 0], 8080)),
        None,
        false,
        Behaviour::Report("app"),
    )?;
    let probe_src = SocketAddr::from(([169, 254, 7, 127], 0));
    let report = ask(node1, a1.addr(8080), None, Some(probe_src))?;
    assert_eq!(field(&report, "name"), "app", "{report}");
    assert_eq!(field(&report, "peer_ip"), "169.254.7.127");
    // The same node from its own address is captured.
    let report = ask(node1, a1.addr(8080), None, None)?;
    assert_eq!(field(&report, "name"), "inbound", "{report}");
    Ok(())
}

#[test]
fn dns_capture_redirects_udp_53_to_15053() -> Result<()> {
    if !root_or_skip("dns_capture_redirects_udp_53_to_15053") {
        return Ok(());
    }
    let topo = Topology::builder().node("n1").pod("n1", "p").build()?;
    let pod = topo.pod("p");
    rules::install_with(pod, &RuleOptions { dns_capture: true })?;
    let dump = rules::dump(pod)?;
    assert!(dump.contains("redirect to :15053"), "{dump}");
    // REDIRECT of the pod's own traffic rewrites the destination to
    // 127.0.0.1; an answer from any other source would not be un-NATed.
    let server = pod.netns().run_in(|| {
        let s = UdpSocket::bind(("127.0.0.1", rules::DNS_PORT))?;
        SockRef::from(&s).set_mark(rules::SKIP_MARK)?;
        s.set_read_timeout(Some(STEP))?;
        Ok::<_, std::io::Error>(s)
    })??;
    let client = pod.netns().run_in(|| {
        let c = UdpSocket::bind(("0.0.0.0", 0))?;
        c.connect(("10.96.0.10", 53))?;
        c.set_read_timeout(Some(STEP))?;
        Ok::<_, std::io::Error>(c)
    })??;
    client.send(b"query")?;
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).context("redirected query")?;
    assert_eq!(&buf[..n], b"query");
    assert_eq!(from.ip(), IpAddr::V4(pod.ip()));
    server.send_to(b"answer", from)?;
    // The reply comes back as if from 10.96.0.10:53 (the connected peer).
    let n = client.recv(&mut buf).context("reply")?;
    assert_eq!(&buf[..n], b"answer");
    Ok(())
}

#[test]
fn rules_install_is_idempotent_and_remove_is_complete() -> Result<()> {
    if !root_or_skip("rules_install_is_idempotent_and_remove_is_complete") {
        return Ok(());
    }
    let topo = Topology::builder().node("n1").pod("n1", "p").build()?;
    let pod = topo.pod("p");
    rules::install(pod)?;
    rules::install(pod)?;
    let dump = rules::dump(pod)?;
    assert_eq!(dump.matches("table inet mesh_inpod").count(), 1, "{dump}");
    assert_eq!(dump.matches("lookup 100").count(), 1, "{dump}");
    assert!(dump.contains("local default dev lo"), "{dump}");
    rules::remove(pod)?;
    rules::remove(pod)?;
    let dump = rules::dump(pod)?;
    assert!(!dump.contains("mesh_inpod"), "{dump}");
    assert!(!dump.contains("lookup 100"), "{dump}");
    assert!(!dump.contains("local default"), "{dump}");
    Ok(())
}

// ------------------------------------------------------------ socket helpers

/// What a test server does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Writes `name=.. local=.. peer=.. peer_ip=.. orig=..` and closes.
    Report(&'static str),
    /// Resets the connection right away.
    Reset,
    /// Reads what the client sent, then closes without answering.
    ReadAndClose,
}

/// A listener inside a namespace served by a thread until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_in(
    ns: &impl HasNetns,
    addr: SocketAddr,
    mark: Option<u32>,
    transparent: bool,
    behaviour: Behaviour,
) -> Result<Server> {
    let listener = ns.netns().run_in(move || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        if transparent {
            socket.set_ip_transparent_v4(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(64)?;
        socket.set_nonblocking(true)?;
        Ok::<TcpListener, std::io::Error>(socket.into())
    })??;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => handle(stream, peer, behaviour),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => return,
            }
        }
    });
    Ok(Server {
        stop,
        thread: Some(thread),
    })
}

fn handle(mut stream: TcpStream, peer: SocketAddr, behaviour: Behaviour) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(STEP));
    match behaviour {
        Behaviour::Report(name) => {
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let orig = SockRef::from(&stream)
                .original_dst_v4()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into());
            let line = format!(
                "name={name} local={local} peer={peer} peer_ip={} orig={orig}\n",
                peer.ip()
            );
            let _ = stream.write_all(line.as_bytes());
        }
        Behaviour::Reset => {
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        Behaviour::ReadAndClose => {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
        }
    }
}

/// Connects from inside `ns`, optionally with a socket mark and a bound
/// (possibly foreign, hence transparent) source address.
fn connect_in(
    ns: &impl HasNetns,
    to: SocketAddr,
    mark: Option<u32>,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    ns.netns()
        .run_in(move || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            if let Some(mark) = mark {
                socket.set_mark(mark)?;
            }
            if let Some(bind) = bind {
                socket.set_ip_transparent_v4(true)?;
                socket.bind(&bind.into())?;
            }
            socket.connect_timeout(&to.into(), timeout)?;
            Ok(socket.into())
        })
        .map_err(std::io::Error::other)?
}

/// Connects and returns the server's one-line report.
fn ask(
    ns: &impl HasNetns,
    to: SocketAddr,
    mark: Option<u32>,
    bind: Option<SocketAddr>,
) -> Result<String> {
    let mut stream =
        connect_in(ns, to, mark, bind, STEP).with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(STEP))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("reading the report of {to}"))?;
    if reply.is_empty() {
        bail!("{to} closed without a report");
    }
    Ok(reply)
}

/// Sends `data`, half-closes, and returns everything the peer sent back.
fn exchange(
    ns: &impl HasNetns,
    to: SocketAddr,
    data: &[u8],
    mark: Option<u32>,
    bind: Option<SocketAddr>,
) -> Result<String> {
    let mut stream = connect_in(ns, to, mark, bind, STEP)?;
    stream.set_read_timeout(Some(STEP))?;
    stream.write_all(data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let deadline = Instant::now() + STEP;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf)? {
            0 => break,
            n => reply.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// The value of `key=` in a server report.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or("")
}
