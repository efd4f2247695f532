//! `ambientctl local` as a new user runs it: `local up`, apply Istio's
//! Bookinfo and curl samples, label the namespace, `local exec` curl in a
//! pod to productpage (crossing nodes over HBONE), `local down` leaving no
//! namespace, process, mount or file behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ambientctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(e2e::app::binary("ambientctl").expect("ambientctl is built"))
        .arg("local")
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("ambientctl runs")
}

/// `ambientctl ARGS` against the local mesh in `dir`.
fn actl(dir: &Path, args: &[&str]) -> Output {
    Command::new(e2e::app::binary("ambientctl").expect("ambientctl is built"))
        .args(args)
        .env("AMBIENT_LOCAL_DIR", dir)
        .env_remove("KUBECONFIG")
        .output()
        .expect("ambientctl runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let o = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Everything on the host whose name says it belongs to this state dir.
fn leftovers(dir: &Path, netns_before: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    let now = e2e::netns::list().unwrap_or_default();
    // Only the mesh's own names: other tests may make namespaces meanwhile.
    let ours = |n: &String| n.starts_with(e2e::topology::RUN_PREFIX) && !netns_before.contains(n);
    left.extend(now.into_iter().filter(ours).map(|n| format!("netns {n}")));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&*dir.to_string_lossy()))
            .map(|l| format!("mount {l}")),
    );
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                left.push(format!("/etc/netns/{name}"));
            }
        }
    }
    left
}

#[test]
fn local_up_bookinfo_exec_curl_over_hbone_and_down_leaves_nothing() {
    if !e2e::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ambientctl-local-{}", std::process::id()));
    let netns_before = e2e::netns::list().unwrap_or_default();
    let up = ambientctl(&dir, &["up"]);
    assert!(up.status.success(), "{}", text(&up));
    let out = String::from_utf8_lossy(&up.stdout).into_owned();
    let kubeconfig = dir.join("kube/kubeconfig");
    assert!(
        out.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "prints how to point kubectl at it:\n{out}"
    );
    let guard = Down(dir.clone());

    let status = ambientctl(&dir, &["status"]);
    assert!(status.status.success(), "{}", text(&status));
    let st = String::from_utf8_lossy(&status.stdout);
    assert!(
        st.contains("node1") && st.contains("node2") && st.contains("Ready"),
        "{st}"
    );

    // Every precheck passes on a healthy local mesh.
    let pre = actl(&dir, &["precheck"]);
    assert!(pre.status.success(), "{}", text(&pre));
    assert!(
        !String::from_utf8_lossy(&pre.stdout).contains('✘'),
        "{}",
        text(&pre)
    );

    let samples = repo().join("samples");
    kubectl(
        &kubeconfig,
        &[
            "apply",
            "-f",
            &samples.join("bookinfo/bookinfo.yaml").to_string_lossy(),
        ],
    );
    kubectl(
        &kubeconfig,
        &[
            "apply",
            "-f",
            &samples.join("curl/curl.yaml").to_string_lossy(),
        ],
    );
    let label = actl(&dir, &["label", "namespace", "default"]);
    assert!(label.status.success(), "{}", text(&label));
    assert_eq!(
        String::from_utf8_lossy(&label.stdout).trim(),
        "namespace/default labeled"
    );
    assert_eq!(
        kubectl(
            &kubeconfig,
            &[
                "get",
                "namespace",
                "default",
                "-o",
                r#"jsonpath={.metadata.labels.istio\.io/dataplane-mode}"#
            ]
        ),
        "ambient"
    );
    kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "pods",
            "--all",
            "-n",
            "default",
            "--timeout=180s",
        ],
    );
    let curl_pod = kubectl(
        &kubeconfig,
        &[
            "get",
            "pods",
            "-l",
            "app=curl",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    // Labelled after the pods started: the agent captures them in place.
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let o = ambientctl(
            &dir,
            &[
                "exec",
                &curl_pod,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "10",
                "http://productpage:9080/productpage",
            ],
        );
        let body = String::from_utf8_lossy(&o.stdout).into_owned();
        let captured = kubectl(
            &kubeconfig,
            &[
                "get",
                "pod",
                &curl_pod,
                "-o",
                r#"jsonpath={.metadata.annotations.ambient\.istio\.io/redirection}"#,
            ],
        ) == "enabled";
        if o.status.success() && captured && body.contains("Simple Bookstore App") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "productpage not reached through the mesh: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(page.contains("Reviews served by"), "{page}");

    // The request crossed nodes over HBONE: some ztunnel counted it as
    // mutual TLS with the productpage identity on the destination side.
    let mut seen = String::new();
    for node in ["node1", "node2"] {
        let ns = e2e::local::node_netns_name(&dir, node).expect("node namespace recorded");
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-s",
                "http://127.0.0.1:15020/metrics",
            ])
            .output()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    assert!(
        seen.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("destination_workload=\"productpage-v1\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "no mutual-TLS productpage connection in ztunnel metrics:\n{seen}"
    );

    // `ambientctl zc` reads the ztunnels' admin endpoints directly.
    let zc = |args: &[&str]| {
        Command::new(e2e::app::binary("ambientctl").expect("ambientctl is built"))
            .arg("zc")
            .args(args)
            .env("AMBIENT_LOCAL_DIR", &dir)
            .output()
            .expect("ambientctl runs")
    };
    let mut services = String::new();
    for node in ["node1", "node2"] {
        let o = zc(&["service", "--node", node]);
        assert!(o.status.success(), "{}", text(&o));
        services.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    let header = services.lines().next().unwrap_or_default().to_string();
    for col in [
        "NAMESPACE",
        "SERVICE NAME",
        "SERVICE VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ] {
        assert!(header.contains(col), "service header {header:?}");
    }
    let row = services
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["default", "productpage"]))
        .unwrap_or_else(|| panic!("no productpage row:\n{services}"));
    assert!(
        row.contains("None") && row.trim_end().ends_with("1/1"),
        "{row}"
    );
    let reviews = services
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["default", "reviews"]))
        .unwrap_or_else(|| panic!("no reviews row:\n{services}"));
    assert!(reviews.trim_end().ends_with("3/3"), "{reviews}");
    let o = zc(&["workload", "ztunnel-node1"]);
    assert!(o.status.success(), "{}", text(&o));
    let workloads = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        workloads
            .lines()
            .next()
            .unwrap_or_default()
            .contains("PROTOCOL"),
        "{workloads}"
    );
    let pp = workloads
        .lines()
        .find(|l| l.contains("productpage-v1"))
        .unwrap_or_else(|| panic!("no productpage workload:\n{workloads}"));
    assert!(pp.contains("HBONE") && pp.starts_with("default"), "{pp}");
    let o = zc(&["workload", "--node", "node1", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("-o json is JSON");
    let again: serde_json::Value =
        serde_json::from_str(&serde_json::to_string_pretty(&json).unwrap()).unwrap();
    assert_eq!(json, again);
    assert!(json.to_string().contains("productpage-v1"), "{json}");

    // A ztunnel that is down gives a one-line error, not a stack trace.
    let node2 = e2e::local::node_netns_name(&dir, "node2").unwrap();
    let _ = Command::new("ip")
        .args(["netns", "pids", &node2])
        .output()
        .map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if cmdline(pid.parse().unwrap_or(0)).contains("ztunnel") {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        });
    std::thread::sleep(Duration::from_millis(500));
    let o = zc(&["workload", "--node", "node2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error:") && err.contains("node2") && !err.contains("panicked"),
        "{err}"
    );

    let pids = mesh_processes(&dir);
    assert!(pids.len() > 10, "found the mesh's processes: {pids:?}");
    drop(guard);
    let mut left = leftovers(&dir, &netns_before);
    left.extend(
        pids.iter()
            .filter(|p| running(**p))
            .map(|p| format!("process {p}: {}", cmdline(*p))),
    );
    assert!(left.is_empty(), "local down left: {left:?}");
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Alive and not a zombie waiting for its parent.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Every process of the running mesh: the supervisor, the pods' processes
/// its kubelets recorded, and whatever names the state directory in its
/// command line or environment (control plane, istiod-lite, ztunnels,
/// agents).
fn mesh_processes(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(p) = std::fs::read_to_string(dir.join("supervisor.pid")) {
        pids.extend(p.trim().parse::<u32>());
    }
    let needle = dir.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if cmdline(pid).contains(&needle) || String::from_utf8_lossy(&env).contains(&needle) {
            pids.push(pid);
        }
    }
    for node in std::fs::read_dir(dir.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for ns in std::fs::read_dir(node.path().join("pods"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for rec in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let Ok(text) = std::fs::read(rec.path()) else {
                    continue;
                };
                let Ok(r) = serde_json::from_slice::<e2e::local::pod::PodRecord>(&text) else {
                    continue;
                };
                pids.extend(r.containers.iter().map(|(_, p)| *p).filter(|p| *p != 0));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != std::process::id());
    pids
}

/// `local down` also when an assertion failed.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let o = ambientctl(&self.0, &["down"]);
        assert!(
            o.status.success() || std::thread::panicking(),
            "{}",
            text(&o)
        );
    }
}
