//! The local mesh end to end: pods created through the API server, run by
//! the local kubelets, networked by the CNI chain (bridge, host-local, then
//! our plugin, called per the spec) and captured by the node agent and
//! ztunnel; namespaces enrolled and released by label while their pods run;
//! restarts of ztunnel and the agent; damaged capture rules repaired.
//!
//! Every test owns a whole local mesh (its own API server); they run one at
//! a time because the agents look pods up by address across all namespaces
//! of the host.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::capture;
use e2e::local::{LocalMesh, LocalMeshSpec};
use e2e::netns::{HasNetns, Netns};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root_or_skip() -> bool {
    if !e2e::is_root() {
        eprintln!("skipping: needs root (network namespaces, nftables)");
        return false;
    }
    true
}

fn start(tag: &str) -> LocalMesh {
    let dir = std::env::temp_dir().join(format!("localmesh-{}-{tag}", std::process::id()));
    LocalMesh::start(LocalMeshSpec {
        nodes: vec!["node1".into(), "node2".into()],
        state_dir: dir,
    })
    .expect("local mesh starts")
}

/// A Deployment-less pod pinned to `node`, running `image` (and `command`).
fn pod_yaml(
    ns: &str,
    name: &str,
    node: &str,
    image: &str,
    command: &[&str],
    port: Option<u16>,
) -> String {
    let cmd = if command.is_empty() {
        String::new()
    } else {
        format!(
            "\n    command: [{}]",
            command
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let ports = port
        .map(|p| format!("\n    ports:\n    - containerPort: {p}"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels:
    app: {name}
spec:
  nodeSelector:
    kubernetes.io/hostname: {node}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: {name}
    image: {image}{cmd}{ports}
"#
    )
}

fn namespace_yaml(ns: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n")
}

const RATINGS: &str = "docker.io/istio/examples-bookinfo-ratings-v1:1.20.2";
const CURL: &str = "curlimages/curl";

fn service_yaml(ns: &str, name: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  selector:
    app: {name}
  ports:
  - name: http
    port: 9080
"#
    )
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn annotation(mesh: &LocalMesh, ns: &str, pod: &str) -> String {
    mesh.kubectl(&[
        "get",
        "pod",
        "-n",
        ns,
        pod,
        "-o",
        r#"jsonpath={.metadata.annotations.ambient\.istio\.io/redirection}"#,
    ])
    .unwrap_or_default()
}

fn has_capture_rules(mesh: &LocalMesh, ns: &str, pod: &str) -> bool {
    let rec = mesh.pod_record(ns, pod).expect("pod runs");
    let netns = Netns::from_name(&rec.netns);
    matches!(
        node_agent::rules::check(&netns),
        Ok(node_agent::rules::RuleStatus::Complete)
    )
}

fn opened(mesh: &LocalMesh, node: &str, needle: &str) -> usize {
    mesh.ztunnel_get(node, 15020, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .filter(|l| {
                    l.starts_with("istio_tcp_connections_opened_total") && l.contains(needle)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as usize
        })
        .unwrap_or(0)
}

/// The pods a node's ztunnel has been handed (its `workloadState`).
fn captured_pods(mesh: &LocalMesh, node: &str) -> Vec<String> {
    let Some((_, body)) = mesh.ztunnel_get(node, 15000, "/config_dump") else {
        return Vec::new();
    };
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    dump["workloadState"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn curl(mesh: &LocalMesh, ns: &str, pod: &str, url: &str) -> (bool, String) {
    let out = mesh
        .exec(ns, pod, &["curl", "-sS", "--max-time", "10", url])
        .expect("exec runs");
    (out.success(), format!("{}{}", out.stdout, out.stderr))
}

#[test]
fn cni_chain_captures_mesh_pods_before_they_start_and_leaves_others_alone() {
    if !root_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start("cni");
    mesh.apply(&namespace_yaml("mesh", true)).unwrap();
    mesh.apply(&namespace_yaml("plain", false)).unwrap();
    // A server in the mesh on node2; a client whose very first action is a
    // connection to it: if its process ran before capture, that connection
    // would bypass ztunnel.
    mesh.apply(&pod_yaml(
        "mesh",
        "ratings",
        "node2",
        RATINGS,
        &[],
        Some(9080),
    ))
    .unwrap();
    mesh.wait_pods_ready("mesh", Duration::from_secs(60))
        .unwrap();
    let server_ip = mesh.pod_record("mesh", "ratings").unwrap().ip;
    let first = format!(
        "curl -s -o /tmp/first-{pid} --max-time 10 http://{server_ip}:9080/ratings/1; sleep infinity",
        pid = std::process::id()
    );
    mesh.apply(&pod_yaml(
        "mesh",
        "early",
        "node1",
        CURL,
        &["sh", "-c", &first],
        None,
    ))
    .unwrap();
    mesh.apply(&pod_yaml("plain", "outside", "node1", CURL, &[], None))
        .unwrap();
    mesh.wait_pods_ready("mesh", Duration::from_secs(60))
        .unwrap();
    mesh.wait_pods_ready("plain", Duration::from_secs(60))
        .unwrap();

    // The client's first connection went through its node's ztunnel.
    let deadline = Instant::now() + Duration::from_secs(20);
    while opened(&mesh, "node1", "source_workload=\"early\"") == 0 {
        assert!(
            Instant::now() < deadline,
            "the early connection is not in ztunnel's metrics:\n{:?}",
            mesh.ztunnel_get("node1", 15020, "/metrics")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(annotation(&mesh, "mesh", "early"), "enabled");
    assert!(has_capture_rules(&mesh, "mesh", "early"));

    // The pod outside the mesh: no rules, no annotation, not in ztunnel.
    assert!(!has_capture_rules(&mesh, "plain", "outside"));
    assert_eq!(annotation(&mesh, "plain", "outside"), "");
    let captured = captured_pods(&mesh, "node1");
    assert!(
        captured.contains(&"Kubernetes//Pod/mesh/early".to_string())
            && !captured.iter().any(|p| p.contains("outside")),
        "{captured:?}"
    );
    let (ok, body) = curl(
        &mesh,
        "plain",
        "outside",
        &format!("http://{server_ip}:9080/health"),
    );
    assert!(ok, "plain pod still reaches others: {body}");

    // CHECK passes for both, then fails for the mesh pod once its rules are gone.
    mesh.cni_check("mesh", "early").unwrap();
    mesh.cni_check("plain", "outside").unwrap();
    let rec = mesh.pod_record("mesh", "early").unwrap();
    node_agent::rules::remove(&Netns::from_name(&rec.netns)).unwrap();
    let err = mesh.cni_check("mesh", "early").unwrap_err().to_string();
    assert!(err.contains("mesh-cni"), "CHECK names our plugin: {err}");

    // DEL: deleting the pod releases it in ztunnel and frees its address.
    let netns = rec.netns.clone();
    mesh.kubectl(&[
        "delete",
        "pod",
        "-n",
        "mesh",
        "early",
        "--wait=true",
        "--timeout=60s",
    ])
    .unwrap();
    assert!(!Netns::from_name(&netns).exists(), "pod namespace removed");
    wait_until("ztunnel to forget the pod", Duration::from_secs(20), || {
        (!captured_pods(&mesh, "node1")
            .iter()
            .any(|p| p.ends_with("/early")))
        .then(String::new)
    });
    let ipam = mesh.node("node1").dir.join("ipam/localmesh");
    let held: Vec<String> = std::fs::read_dir(&ipam)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !held.contains(&rec.ip),
        "host-local released {}: {held:?}",
        rec.ip
    );

    // The installed plugin answers bad input with a CNI error result (code
    // and message on stdout, non-zero exit), never a panic.
    let plugin = mesh.node("node1").dir.join("bin/mesh-cni");
    let run = |env: &[(&str, &str)], stdin: &[u8]| {
        use std::io::Write;
        let mut child = std::process::Command::new(&plugin)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{out:?}"
        );
        let err: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("error result is JSON");
        assert!(err["msg"].is_string(), "{err}");
        err["code"].as_u64().expect("error code")
    };
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/var/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    // Missing environment (no CNI_COMMAND at all), then only CNI_IFNAME missing.
    assert_eq!(run(&[], b""), 4);
    assert_eq!(
        run(
            &env[..3]
                .iter()
                .chain(&env[4..])
                .copied()
                .collect::<Vec<_>>(),
            b"{}"
        ),
        4
    );
    // Not JSON (6), and JSON of the wrong shape (7).
    assert_eq!(run(&env, b"{not json"), 6);
    assert_eq!(
        run(
            &env,
            br#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentTimeoutSeconds":"x"}"#
        ),
        7
    );
}

#[test]
fn labelling_a_namespace_captures_running_pods_and_unlabelling_releases_them() {
    if !root_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start("label");
    mesh.apply(&namespace_yaml("shop", false)).unwrap();
    mesh.apply(&service_yaml("shop", "ratings")).unwrap();
    mesh.apply(&pod_yaml(
        "shop",
        "ratings",
        "node2",
        RATINGS,
        &[],
        Some(9080),
    ))
    .unwrap();
    mesh.apply(&pod_yaml("shop", "client", "node1", CURL, &[], None))
        .unwrap();
    mesh.wait_pods_ready("shop", Duration::from_secs(60))
        .unwrap();
    let server_ip = mesh.pod_record("shop", "ratings").unwrap().ip;
    let url = format!("http://{server_ip}:9080/ratings/{}", std::process::id());
    let marker = format!("/ratings/{}", std::process::id());
    let link = mesh.topo.node("node2").bridge_port();

    // Before: direct, in plaintext on the node link, not seen by ztunnel.
    let cap = mesh.topo.capture(mesh.topo.bridge(), &link, "tcp").unwrap();
    let (ok, body) = curl(&mesh, "shop", "client", &url);
    assert!(ok, "{body}");
    let pcap = cap.stop().unwrap();
    assert!(
        capture::contains(&pcap, marker.as_bytes()),
        "plaintext before enrollment"
    );
    assert_eq!(opened(&mesh, "node1", "source_workload=\"client\""), 0);

    // Label: both running pods get captured without a restart.
    mesh.set_ambient("shop", true).unwrap();
    for pod in ["ratings", "client"] {
        wait_until(&format!("{pod} captured"), Duration::from_secs(30), || {
            (annotation(&mesh, "shop", pod) == "enabled" && has_capture_rules(&mesh, "shop", pod))
                .then(String::new)
        });
    }
    let cap = mesh.topo.capture(mesh.topo.bridge(), &link, "tcp").unwrap();
    let (ok, body) = curl(&mesh, "shop", "client", &url);
    assert!(ok, "{body}");
    let pcap = cap.stop().unwrap();
    assert!(
        !capture::contains(&pcap, marker.as_bytes()),
        "no plaintext once enrolled"
    );
    assert!(opened(&mesh, "node1", "source_workload=\"client\"") > 0);

    // Unlabel: released, traffic direct again.
    mesh.set_ambient("shop", false).unwrap();
    for pod in ["ratings", "client"] {
        wait_until(&format!("{pod} released"), Duration::from_secs(30), || {
            (annotation(&mesh, "shop", pod) == "disabled" && !has_capture_rules(&mesh, "shop", pod))
                .then(String::new)
        });
    }
    let before = opened(&mesh, "node1", "source_workload=\"client\"");
    let cap = mesh.topo.capture(mesh.topo.bridge(), &link, "tcp").unwrap();
    let (ok, body) = curl(&mesh, "shop", "client", &url);
    assert!(ok, "{body}");
    let pcap = cap.stop().unwrap();
    assert!(capture::contains(&pcap, marker.as_bytes()), "direct again");
    assert_eq!(opened(&mesh, "node1", "source_workload=\"client\""), before);
}

#[test]
fn restarts_recapture_every_pod_and_add_fails_closed_without_ztunnel() {
    if !root_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut mesh = start("restart");
    mesh.apply(&namespace_yaml("app", true)).unwrap();
    mesh.apply(&service_yaml("app", "ratings")).unwrap();
    mesh.apply(&pod_yaml(
        "app",
        "ratings",
        "node2",
        RATINGS,
        &[],
        Some(9080),
    ))
    .unwrap();
    mesh.apply(&pod_yaml("app", "client", "node1", CURL, &[], None))
        .unwrap();
    mesh.wait_pods_ready("app", Duration::from_secs(60))
        .unwrap();
    let server_ip = mesh.pod_record("app", "ratings").unwrap().ip;
    let url = format!("http://{server_ip}:9080/ratings/1");
    let through_mesh = |mesh: &LocalMesh| {
        let before = opened(mesh, "node1", "source_workload=\"client\"");
        let (ok, body) = curl(mesh, "app", "client", &url);
        assert!(ok, "{body}");
        assert!(
            opened(mesh, "node1", "source_workload=\"client\"") > before,
            "went through ztunnel"
        );
    };
    through_mesh(&mesh);

    // ztunnel restarts: it gets the snapshot again and serves the pod.
    mesh.restart_ztunnel("node1").unwrap();
    wait_until(
        "ztunnel to hold the client again",
        Duration::from_secs(30),
        || {
            captured_pods(&mesh, "node1")
                .contains(&"Kubernetes//Pod/app/client".to_string())
                .then(String::new)
        },
    );
    through_mesh(&mesh);

    // The agent restarts: it rebuilds its view, pods stay captured.
    mesh.restart_agent("node1").unwrap();
    assert!(has_capture_rules(&mesh, "app", "client"));
    through_mesh(&mesh);

    // Without ztunnel a new mesh pod's ADD fails closed; once ztunnel is
    // back the kubelet's retry succeeds.
    mesh.stop_ztunnel("node1").unwrap();
    mesh.apply(&pod_yaml("app", "late", "node1", CURL, &[], None))
        .unwrap();
    wait_until(
        "a FailedCreatePodSandBox event",
        Duration::from_secs(60),
        || {
            let ev = mesh
                .kubectl(&[
                    "get",
                    "events",
                    "-n",
                    "app",
                    "--field-selector",
                    "involvedObject.name=late",
                ])
                .ok()?;
            ev.contains("FailedCreatePodSandBox").then_some(ev)
        },
    );
    assert!(
        mesh.pod_record("app", "late").is_none(),
        "no process ran uncaptured"
    );
    mesh.restart_ztunnel("node1").unwrap();
    mesh.wait_pods_ready("app", Duration::from_secs(60))
        .unwrap();
    assert!(has_capture_rules(&mesh, "app", "late"));

    // Rules deleted by hand: the agent notices, repairs, and says so.
    let rec = mesh.pod_record("app", "client").unwrap();
    node_agent::rules::remove(&Netns::from_name(&rec.netns)).unwrap();
    wait_until(
        "the agent to repair the rules",
        Duration::from_secs(30),
        || has_capture_rules(&mesh, "app", "client").then(String::new),
    );
    let agent = mesh.node("node1").agent().unwrap();
    let logs = format!("{}{}", agent.stdout(), agent.stderr());
    assert!(
        logs.contains("app/client"),
        "the agent's log names the pod:\n{logs}"
    );
    let metrics = e2e::local::http_get(mesh.node("node1").agent_metrics, "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_cni_repair_pods_repaired_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let _ = mesh.topo.node("node1").netns();
}
