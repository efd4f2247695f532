//! Waypoints on the local mesh, as Istio's ambient L7 tasks start:
//! `ambientctl waypoint apply --enroll-namespace --wait` provisions a
//! waypoint (Deployment, Service, ServiceAccount owned by the Gateway),
//! the local kubelet runs it, and service traffic in the namespace now
//! passes through it (its `istio_requests_total`, `reporter="waypoint"`)
//! while the page still works.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::local::{LocalMesh, LocalMeshSpec};

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn waypoint_apply_enrolls_the_namespace_and_carries_its_service_traffic() {
    if !e2e::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("waypoint-{}", std::process::id()));
    let mesh = LocalMesh::start(LocalMeshSpec {
        nodes: vec!["node1".into(), "node2".into()],
        state_dir: dir.clone(),
    })
    .expect("local mesh starts");
    mesh.apply(&repo_file("samples/bookinfo/bookinfo.yaml"))
        .unwrap();
    mesh.apply(&repo_file("samples/curl/curl.yaml")).unwrap();
    mesh.set_ambient("default", true).unwrap();

    let out = Command::new(e2e::app::binary("ambientctl").unwrap())
        .args([
            "waypoint",
            "apply",
            "-n",
            "default",
            "--enroll-namespace",
            "--wait",
            "--kubeconfig",
        ])
        .arg(mesh.kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("waypoint default/waypoint applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("namespace default labeled with \"istio.io/use-waypoint: waypoint\""),
        "{stdout}"
    );
    mesh.kubectl(&[
        "wait",
        "--for=condition=Available",
        "deployments",
        "--all",
        "--timeout=180s",
    ])
    .unwrap();
    mesh.wait_pods_ready("default", Duration::from_secs(120))
        .unwrap();
    let curl_pod = mesh
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "app=curl",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    let waypoint_pod = mesh
        .kubectl(&[
            "get",
            "pods",
            "-l",
            "gateway.networking.k8s.io/gateway-name=waypoint",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = mesh
            .exec(
                "default",
                &curl_pod,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "http://productpage:9080/productpage",
                ],
            )
            .unwrap();
        let metrics = mesh
            .exec(
                "default",
                &waypoint_pod,
                &["curl", "-s", "http://127.0.0.1:15020/metrics"],
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
        let through_waypoint = metrics.lines().any(|l| {
            l.starts_with("istio_requests_total")
                && l.contains("reporter=\"waypoint\"")
                && l.contains("productpage")
        });
        if out.success() && out.stdout.contains("Simple Bookstore App") && through_waypoint {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "productpage not served through the waypoint:\n{}{}\nwaypoint metrics:\n{metrics}",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
