//! The `ambientctl zc` command line end to end: from a saved dump (`-f`),
//! and through a local-mesh state directory whose node network namespace
//! holds a stand-in admin server (or none, for the "cannot reach" error).
//! Needs root for the network namespaces.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use e2e::netns::Netns;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn ambientctl(args: &[&str], state_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ambientctl"))
        .args(args)
        .env("AMBIENT_LOCAL_DIR", state_dir)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deletes the namespace when the test ends, even on failure.
struct NsGuard(Netns);
impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

/// A state directory that looks like a running one-node local mesh whose
/// node is `netns`.
fn fake_local_mesh(netns: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("nodes/node1")).unwrap();
    std::fs::write(dir.path().join("nodes/node1/netns"), netns).unwrap();
    std::fs::write(
        dir.path().join("ready.json"),
        format!(
            r#"{{"pid": {}, "kubeconfig": "{}/kube/kubeconfig", "nodes": ["node1"]}}"#,
            std::process::id(),
            dir.path().display()
        ),
    )
    .unwrap();
    dir
}

#[test]
fn tables_from_a_saved_dump() {
    let none = tempfile::tempdir().unwrap();
    let dump = format!("{DATA}/config_dump.json");
    let o = ambientctl(&["zc", "workload", "-f", &dump], none.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("NAMESPACE  POD NAME  "),
        "{}",
        stdout(&o)
    );
    // The long name and the filter flag's alias.
    let o = ambientctl(
        &[
            "ztunnel-config",
            "services",
            "-f",
            &dump,
            "--workload-namespace",
            "bookinfo",
        ],
        none.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("reviews       10.96.0.30,10.97.0.30  waypoint  1/2"),
        "{}",
        stdout(&o)
    );
    let o = ambientctl(&["zc", "policy", "-f", &dump, "-o", "yaml"], none.path());
    let v: serde_json::Value = serde_yaml::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let o = ambientctl(&["zc", "all", "-f", &dump, "-o", "json"], none.path());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let orig: serde_json::Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    assert_eq!(v, orig);
    let o = ambientctl(
        &[
            "zc",
            "connections",
            "-f",
            &format!("{DATA}/connections.json"),
            "--direction",
            "inbound",
        ],
        none.path(),
    );
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));
}

#[test]
fn missing_file_is_a_one_line_error() {
    let none = tempfile::tempdir().unwrap();
    let o = ambientctl(
        &["zc", "workload", "-f", "/nonexistent/dump.json"],
        none.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: reading /nonexistent/dump.json: No such file or directory (os error 2)\n"
    );
}

#[test]
fn unreachable_local_ztunnel() {
    let name = format!("actl-test-{}-a", std::process::id());
    let ns = NsGuard(Netns::create(&name).unwrap());
    let dir = fake_local_mesh(ns.0.name());
    let o = ambientctl(&["zc", "workload", "ztunnel-node1"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: cannot reach ztunnel ztunnel-node1 admin port 15000: connection refused (is ztunnel running on node1?)\n"
    );
    let o = ambientctl(&["zc", "workload", "ztunnel-node7"], dir.path());
    assert_eq!(
        stderr(&o),
        "error: no ztunnel ztunnel-node7 in the local mesh (ztunnels: ztunnel-node1)\n"
    );
}

#[test]
fn reads_the_admin_port_inside_the_node_namespace() {
    let name = format!("actl-test-{}-b", std::process::id());
    let ns = NsGuard(Netns::create(&name).unwrap());
    let listener =
        ns.0.run_in(|| TcpListener::bind("127.0.0.1:15000").unwrap())
            .unwrap();
    let body = std::fs::read(format!("{DATA}/config_dump.json")).unwrap();
    // A stand-in for ztunnel's admin server: one request per connection.
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut req = [0u8; 2048];
            let n = s.read(&mut req).unwrap_or(0);
            let req = String::from_utf8_lossy(&req[..n]);
            let resp = if req.starts_with("GET /config_dump ") {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            } else {
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\nnot found\n".to_vec()
            };
            let _ = s.write_all(&resp);
        }
    });
    let dir = fake_local_mesh(ns.0.name());
    // Default ztunnel (the first node), by name, and by --node.
    for args in [
        vec!["zc", "workload"],
        vec!["zc", "workload", "ztunnel-node1"],
        vec!["zc", "workload", "--node", "node1"],
    ] {
        let o = ambientctl(&args, dir.path());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o).lines().count(), 6, "{}", stdout(&o));
    }
    let o = ambientctl(&["zc", "connections"], dir.path());
    assert_eq!(
        stderr(&o),
        "error: ztunnel ztunnel-node1 does not serve /debug/connections (a ztunnel without this endpoint)\n"
    );
}

#[test]
fn precheck_in_a_local_mesh() {
    let name = format!("actl-test-{}-c", std::process::id());
    let ns = NsGuard(Netns::create(&name).unwrap());
    let dir = fake_local_mesh(ns.0.name());
    // Nothing answers 15021 yet.
    let o = ambientctl(&["precheck"], dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("✘ Kubernetes API server: reading kubeconfig "),
        "{out}"
    );
    assert!(out.contains("✔ istiod-lite: local mesh running"), "{out}");
    assert!(
        out.contains("✘ ztunnel on node1: cannot reach readiness port 15021: connection refused\n"),
        "{out}"
    );
    assert!(
        out.contains("✘ CNI agent on node1: no node-agent process for this node\n"),
        "{out}"
    );
    assert!(out.contains("✔ nftables"), "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("✘ 3 of 6 checks failed."),
        "{out}"
    );
    // A ready ztunnel.
    let listener =
        ns.0.run_in(|| TcpListener::bind("127.0.0.1:15021").unwrap())
            .unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
        }
    });
    let o = ambientctl(&["precheck"], dir.path());
    assert!(
        stdout(&o).contains("✔ ztunnel on node1: ready\n"),
        "{}",
        stdout(&o)
    );
}
