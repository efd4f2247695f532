//! L4 security on the local mesh, as Istio's ambient docs show it: the
//! getting-started task's `productpage-viewer` policy (only the gateway's
//! ServiceAccount may reach productpage; curl's connection is reset, exit
//! code 56), `allow-nothing`, a policy change closing an open connection it
//! no longer allows, and PeerAuthentication STRICT / PERMISSIVE for
//! plaintext clients outside the mesh.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::local::{LocalMesh, LocalMeshSpec};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root_or_skip() -> bool {
    if !e2e::is_root() {
        eprintln!("skipping: needs root (network namespaces, nftables)");
        return false;
    }
    true
}

fn start(tag: &str) -> LocalMesh {
    let dir = std::env::temp_dir().join(format!("l4policy-{}-{tag}", std::process::id()));
    LocalMesh::start(LocalMeshSpec {
        nodes: vec!["node1".into(), "node2".into()],
        state_dir: dir,
    })
    .expect("local mesh starts")
}

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Bookinfo and curl in `default`, enrolled, all pods ready and captured.
fn bookinfo(mesh: &LocalMesh) {
    mesh.apply(&repo_file("samples/bookinfo/bookinfo.yaml"))
        .unwrap();
    mesh.apply(&repo_file("samples/curl/curl.yaml")).unwrap();
    mesh.set_ambient("default", true).unwrap();
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
    wait_captured(mesh, "default");
}

fn wait_captured(mesh: &LocalMesh, ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = mesh
            .kubectl(&[
                "get",
                "pods",
                "-n",
                ns,
                "-o",
                r#"jsonpath={range .items[*]}{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}"#,
            ])
            .unwrap();
        if out.lines().all(|l| l == "enabled") && !out.trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pods in {ns} not captured:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn pod_of(mesh: &LocalMesh, ns: &str, app: &str) -> String {
    mesh.kubectl(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
    .unwrap()
}

/// curl's exit code and output, from inside `pod`.
fn curl(mesh: &LocalMesh, ns: &str, pod: &str, url: &str) -> (Option<i32>, String) {
    let out = mesh
        .exec(ns, pod, &["curl", "-sS", "--max-time", "10", url])
        .unwrap();
    (out.code(), format!("{}{}", out.stdout, out.stderr))
}

/// Retries until curl's exit code is `want` (policies take a moment to
/// reach every ztunnel).
fn curl_until(mesh: &LocalMesh, ns: &str, pod: &str, url: &str, want: i32) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = curl(mesh, ns, pod, url);
        if code == Some(want) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "curl {url} from {ns}/{pod}: exit {code:?}, wanted {want}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

const PRODUCTPAGE: &str = "http://productpage:9080/productpage";

fn ztunnel_logs(mesh: &LocalMesh) -> String {
    mesh.nodes
        .iter()
        .filter_map(|n| n.ztunnel())
        .map(|p| p.stdout() + &p.stderr())
        .collect()
}

#[test]
fn authorization_policies_allow_by_service_account_deny_all_and_close_open_connections() {
    if !root_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start("authz");
    bookinfo(&mesh);
    // A client running as the ingress gateway's account, as in the
    // getting-started task.
    mesh.apply(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bookinfo-gateway-istio
---
apiVersion: v1
kind: Pod
metadata:
  name: gateway-client
  labels:
    app: gateway-client
spec:
  serviceAccountName: bookinfo-gateway-istio
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
  - name: curl
    image: curlimages/curl
    command: ["/bin/sleep", "infinity"]
"#,
    )
    .unwrap();
    mesh.wait_pods_ready("default", Duration::from_secs(60))
        .unwrap();
    wait_captured(&mesh, "default");
    let curl_pod = pod_of(&mesh, "default", "curl");
    let page = curl_until(&mesh, "default", &curl_pod, PRODUCTPAGE, 0);
    assert!(page.contains("Simple Bookstore App"), "{page}");

    mesh.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/bookinfo-gateway-istio
"#,
    )
    .unwrap();
    // curl: connection reset, exit code 56, as the task shows.
    curl_until(&mesh, "default", &curl_pod, PRODUCTPAGE, 56);
    let page = curl_until(&mesh, "default", "gateway-client", PRODUCTPAGE, 0);
    assert!(page.contains("Simple Bookstore App"), "{page}");
    // Other services are not covered by the policy.
    curl_until(
        &mesh,
        "default",
        &curl_pod,
        "http://ratings:9080/ratings/1",
        0,
    );
    let logs = ztunnel_logs(&mesh);
    assert!(
        logs.contains("no ALLOW policy matched") || logs.contains("productpage-viewer"),
        "the denial is logged with its reason:\n{logs}"
    );

    // allow-nothing in the namespace blocks everything in it.
    mesh.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: default\nspec: {}\n",
    )
    .unwrap();
    curl_until(
        &mesh,
        "default",
        &curl_pod,
        "http://ratings:9080/ratings/1",
        56,
    );
    curl_until(
        &mesh,
        "default",
        "gateway-client",
        "http://ratings:9080/ratings/1",
        56,
    );
    // ALLOW policies add up: allow-nothing plus productpage-viewer is the
    // documented way to let only the gateway in.
    curl_until(&mesh, "default", "gateway-client", PRODUCTPAGE, 0);
    curl_until(&mesh, "default", &curl_pod, PRODUCTPAGE, 56);
    mesh.kubectl(&[
        "delete",
        "authorizationpolicy",
        "allow-nothing",
        "productpage-viewer",
    ])
    .unwrap();
    curl_until(&mesh, "default", &curl_pod, PRODUCTPAGE, 0);

    // An open connection that a new policy no longer allows is closed.
    mesh.apply(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
spec:
  selector:
    app: tcp-echo
  ports:
  - name: tcp
    port: 9000
---
apiVersion: v1
kind: Pod
metadata:
  name: tcp-echo
  labels:
    app: tcp-echo
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
  - name: tcp-echo
    image: docker.io/istio/tcp-echo-server:1.3
    args: ["9000", "hello"]
    ports:
    - containerPort: 9000
"#,
    )
    .unwrap();
    mesh.wait_pods_ready("default", Duration::from_secs(60))
        .unwrap();
    wait_captured(&mesh, "default");
    let rec = mesh.pod_record("default", &curl_pod).unwrap();
    let netns = e2e::netns::Netns::from_name(&rec.netns);
    let mut cmd = std::process::Command::new("bash");
    cmd.args([
        "-c",
        "exec 3<>/dev/tcp/tcp-echo/9000 && echo ping >&3 && read -r line <&3 && echo \"got $line\" && while read -r more <&3; do :; done; echo closed",
    ]);
    let client = mesh.topo.spawn(&netns, cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client.stdout().contains("got hello ping") {
        assert!(
            Instant::now() < deadline && client.is_running(),
            "echo connection not up: {}{}",
            client.stdout(),
            client.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    mesh.apply(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-curl
  namespace: default
spec:
  selector:
    matchLabels:
      app: tcp-echo
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/curl"]
"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.is_running() {
        assert!(
            Instant::now() < deadline,
            "the open connection was not closed after the policy change"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(client.stdout().contains("closed"), "{}", client.stdout());
}

#[test]
fn peer_authentication_strict_rejects_plaintext_from_outside_and_permissive_allows_it() {
    if !root_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = start("peerauthn");
    bookinfo(&mesh);
    mesh.apply(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: outsider
  namespace: legacy
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
  - name: curl
    image: curlimages/curl
    command: ["/bin/sleep", "infinity"]
"#,
    )
    .unwrap();
    mesh.wait_pods_ready("legacy", Duration::from_secs(60))
        .unwrap();
    let url = "http://productpage.default:9080/productpage";
    let page = curl_until(&mesh, "legacy", "outsider", url, 0);
    assert!(
        page.contains("Simple Bookstore App"),
        "PERMISSIVE by default: {page}"
    );

    mesh.apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    // Plaintext from outside the mesh is refused; mesh clients still work.
    curl_until(&mesh, "legacy", "outsider", url, 56);
    let curl_pod = pod_of(&mesh, "default", "curl");
    curl_until(&mesh, "default", &curl_pod, PRODUCTPAGE, 0);

    // A namespace-level PERMISSIVE overrides the mesh-wide STRICT.
    mesh.apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    )
    .unwrap();
    curl_until(&mesh, "legacy", "outsider", url, 0);
}
