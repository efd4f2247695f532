//! The agent end to end on one host, without an API server: real network
//! namespaces, the real CNI plugin (`cni_plugin::run`) talking to the
//! agent's socket, a stand-in ztunnel on the ZDS socket, and an in-memory
//! API server. Needs root (`ip netns add`); skipped otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus};
use kube::api::ObjectMeta;
use mesh_core::drain;
use mesh_core::zds::{WorkloadEvent, ZdsClient};
use node_agent::agent::{
    self, Agent, BoxFuture, Cluster, ClusterError, Lookup, Settings, Snapshot,
    REDIRECTION_ANNOTATION,
};
use node_agent::metrics::Metrics;
use node_agent::rules::{self, RuleOptions, RuleStatus};
use node_agent::ztunnel::ZtunnelServer;
use serde_json::json;
use tokio::sync::mpsc;

/// A named namespace of this test alone, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn create(tag: &str) -> Result<Self> {
        let name = format!("na-{tag}-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Gives the namespace an interface with `ip`, as a pod's eth0 has.
    fn with_ip(self, ip: &str) -> Result<Self> {
        // A veth pair inside the namespace: always available, unlike the
        // dummy link type.
        self.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])?;
        self.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        self.ip(&["link", "set", "eth0", "up"])?;
        self.ip(&["link", "set", "eth1", "up"])?;
        Ok(self)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "delete", &self.name]);
    }
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipping {test}: needs root to create network namespaces");
    }
    root
}

/// A per-process address, so parallel test binaries never share one.
fn test_ip(n: u8) -> String {
    let pid = std::process::id();
    format!(
        "10.{}.{}.{n}",
        200 + (pid % 50) as u8,
        (pid / 50 % 250) as u8
    )
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn namespace(name: &str, l: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(l),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, l: &[(&str, &str)], annotations: &[(&str, &str)], ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            labels: labels(l),
            annotations: labels(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("web".into()),
            node_name: Some("node-a".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

const AMBIENT: &[(&str, &str)] = &[("istio.io/dataplane-mode", "ambient")];

/// An in-memory API server that records the annotations written.
#[derive(Default)]
struct FakeCluster {
    namespaces: Mutex<BTreeMap<String, Namespace>>,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    annotations: Mutex<Vec<String>>,
}

impl FakeCluster {
    fn add(&self, ns: Namespace, pods: &[Pod]) {
        let name = ns.metadata.name.clone().unwrap();
        self.namespaces.lock().unwrap().insert(name.clone(), ns);
        for p in pods {
            let key = (name.clone(), p.metadata.name.clone().unwrap());
            self.pods.lock().unwrap().insert(key, p.clone());
        }
    }

    async fn wait_annotation(&self, want: &str) {
        for _ in 0..500 {
            if self.annotations.lock().unwrap().iter().any(|a| a == want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "annotation {want} never written: {:?}",
            self.annotations.lock().unwrap()
        );
    }
}

impl Cluster for FakeCluster {
    fn lookup<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Lookup, ClusterError>> {
        let n = self.namespaces.lock().unwrap().get(namespace).cloned();
        let p = self
            .pods
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(async move { Ok((n, p)) })
    }

    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: &'static str,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        self.annotations
            .lock()
            .unwrap()
            .push(format!("{namespace}/{name}={value}"));
        Box::pin(async { Ok(()) })
    }
}

/// A stand-in ztunnel: connects, acks everything, reports what it was
/// told as `add UID`, `del UID`, `snapshot`.
async fn fake_ztunnel(sock: &Path) -> Result<mpsc::UnboundedReceiver<String>> {
    fake_ztunnel_refusing(sock, 0).await
}

/// As [`fake_ztunnel`], refusing the first `refuse` Adds.
async fn fake_ztunnel_refusing(
    sock: &Path,
    mut refuse: usize,
) -> Result<mpsc::UnboundedReceiver<String>> {
    let client = ZdsClient::connect(sock).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = client.next().await {
            let mut answer = Ok(());
            let line = match ev {
                WorkloadEvent::Add { uid, .. } if refuse > 0 => {
                    refuse -= 1;
                    answer = Err("not now".to_string());
                    format!("refused {uid}")
                }
                WorkloadEvent::Add { uid, .. } => format!("add {uid}"),
                WorkloadEvent::Del { uid } => format!("del {uid}"),
                WorkloadEvent::Keep { uid } => format!("keep {uid}"),
                WorkloadEvent::SnapshotSent => "snapshot".to_string(),
            };
            if client.ack(answer).await.is_err() || tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

async fn expect(rx: &mut mpsc::UnboundedReceiver<String>, want: &str) {
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("ztunnel never told {want}"));
    assert_eq!(got.as_deref(), Some(want));
}

async fn wait_connected(z: &ZtunnelServer) {
    for _ in 0..500 {
        if z.connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("ztunnel never connected");
}

fn settings() -> Settings {
    Settings {
        node_name: "node-a".into(),
        exclude_namespaces: vec!["kube-system".into()],
        netns_dirs: vec![PathBuf::from("/var/run/netns")],
        rule_options: RuleOptions::default(),
    }
}

/// Runs the plugin binary's logic for one command, as the runtime would.
async fn plugin(command: &str, socket: &Path, netns: &Path, ns: &str, name: &str) -> (i32, String) {
    let env = [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", format!("container-{name}")),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        (
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"),
        ),
    ];
    let conf = json!({
        "cniVersion": "1.0.0", "name": "podnet", "type": "mesh-cni",
        "agentSocket": socket, "agentTimeoutSeconds": 30,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/24"}]}
    })
    .to_string();
    let (code, out) = tokio::task::spawn_blocking(move || {
        struct E(Vec<(&'static str, String)>);
        impl cni_plugin::Env for E {
            fn var(&self, key: &str) -> Option<String> {
                self.0
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.clone())
            }
        }
        cni_plugin::run(&E(env.to_vec()), conf.as_bytes())
    })
    .await
    .unwrap();
    (code, String::from_utf8_lossy(&out).into_owned())
}

/// An agent serving its plugin socket in `dir`.
struct Running {
    agent: Arc<Agent>,
    socket: PathBuf,
    trigger: drain::Trigger,
    served: tokio::task::JoinHandle<()>,
}

fn start(dir: &Path, cluster: Arc<FakeCluster>, ztunnel: Arc<ZtunnelServer>) -> Result<Running> {
    let agent = Agent::new(
        settings(),
        ztunnel,
        cluster,
        Metrics::new(),
        Snapshot::default(),
        Vec::new(),
    );
    let socket = dir.join("plugin.sock");
    let listener = node_agent::server::bind(&socket)?;
    let (trigger, watch) = drain::new();
    let served = tokio::spawn(node_agent::server::serve(listener, agent.clone(), watch));
    Ok(Running {
        agent,
        socket,
        trigger,
        served,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_add_check_del_through_the_socket() -> Result<()> {
    if !root_or_skip("plugin_add_check_del_through_the_socket") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let netns = TestNetns::create("cni")?;
    let cluster = Arc::new(FakeCluster::default());
    cluster.add(
        namespace("shop", AMBIENT),
        &[pod("shop", "web-0", &[], &[], "10.0.0.1")],
    );
    cluster.add(namespace("plain", &[]), &[]);
    let zsock = dir.path().join("ztunnel.sock");
    let ztunnel = Arc::new(ZtunnelServer::bind(&zsock)?);
    let mut zt = fake_ztunnel(&zsock).await?;
    expect(&mut zt, "snapshot").await;
    wait_connected(&ztunnel).await;
    let r = start(dir.path(), cluster.clone(), ztunnel)?;

    // ADD of an enrolled pod: rules in place and ztunnel told before the
    // plugin returns.
    let (code, out) = plugin("ADD", &r.socket, &netns.path(), "shop", "web-0").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10.0.0.1/24"), "prevResult passed on: {out}");
    expect(&mut zt, "add Kubernetes//Pod/shop/web-0").await;
    assert_eq!(rules::check(&netns.path())?, RuleStatus::Complete);
    cluster.wait_annotation("shop/web-0=enabled").await;
    let metrics = r.agent.metrics().encode();
    assert!(
        metrics.contains("istio_cni_ambient_enrolled_pods 1"),
        "{metrics}"
    );

    // CHECK passes, and fails with error 11 once the rules are damaged.
    let (code, out) = plugin("CHECK", &r.socket, &netns.path(), "shop", "web-0").await;
    assert_eq!(code, 0, "{out}");
    run(&[
        "ip",
        "netns",
        "exec",
        &netns.name,
        "nft",
        "flush",
        "chain",
        "inet",
        rules::TABLE,
        "prerouting",
    ])?;
    let (code, out) = plugin("CHECK", &r.socket, &netns.path(), "shop", "web-0").await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"code\":11") && out.contains("prerouting"),
        "{out}"
    );

    // A pod outside the mesh: answered, not captured, nothing sent.
    let plain = TestNetns::create("cni-plain")?;
    let (code, out) = plugin("ADD", &r.socket, &plain.path(), "plain", "db-0").await;
    assert_eq!(code, 0, "{out}");
    assert!(!rules::check(&plain.path())?.is_complete());

    // DEL releases the enrolled pod.
    let (code, out) = plugin("DEL", &r.socket, &netns.path(), "shop", "web-0").await;
    assert_eq!(code, 0, "{out}");
    expect(&mut zt, "del Kubernetes//Pod/shop/web-0").await;
    assert!(r.agent.ztunnel().pods().is_empty());
    let metrics = r.agent.metrics().encode();
    assert!(
        metrics.contains("istio_cni_ambient_enrolled_pods 0"),
        "{metrics}"
    );

    assert_eq!(
        r.trigger.drain(Duration::from_secs(5)).await,
        drain::Outcome::Complete
    );
    r.served.await?;
    // Stopped: the plugin finds nobody listening.
    let (code, out) = plugin("ADD", &r.socket, &netns.path(), "shop", "web-0").await;
    assert_eq!(code, 1, "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_fails_closed_without_ztunnel() -> Result<()> {
    if !root_or_skip("add_fails_closed_without_ztunnel") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let netns = TestNetns::create("closed")?;
    let cluster = Arc::new(FakeCluster::default());
    cluster.add(namespace("shop", AMBIENT), &[]);
    let zsock = dir.path().join("ztunnel.sock");
    let ztunnel = Arc::new(ZtunnelServer::bind(&zsock)?);
    let r = start(dir.path(), cluster, ztunnel.clone())?;
    let (code, out) = plugin("ADD", &r.socket, &netns.path(), "shop", "web-1").await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"code\":11") && out.contains("ztunnel"),
        "{out}"
    );
    // Nothing half-done stays behind.
    assert!(ztunnel.pods().is_empty());
    assert!(!rules::check(&netns.path())?.is_complete());

    // Once ztunnel is there, the runtime's retry succeeds.
    let mut zt = fake_ztunnel(&zsock).await?;
    expect(&mut zt, "snapshot").await;
    wait_connected(&ztunnel).await;
    let (code, out) = plugin("ADD", &r.socket, &netns.path(), "shop", "web-1").await;
    assert_eq!(code, 0, "{out}");
    expect(&mut zt, "add Kubernetes//Pod/shop/web-1").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_pods_follow_their_labels() -> Result<()> {
    if !root_or_skip("running_pods_follow_their_labels") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let ip = test_ip(7);
    let netns = TestNetns::create("labels")?.with_ip(&ip)?;
    let cluster = Arc::new(FakeCluster::default());
    let zsock = dir.path().join("ztunnel.sock");
    let ztunnel = Arc::new(ZtunnelServer::bind(&zsock)?);
    let mut zt = fake_ztunnel(&zsock).await?;
    expect(&mut zt, "snapshot").await;
    wait_connected(&ztunnel).await;
    let web = pod("late", "web-2", &[], &[], &ip);
    let agent = Agent::new(
        settings(),
        ztunnel.clone(),
        cluster.clone(),
        Metrics::new(),
        Snapshot {
            pods: vec![web.clone()],
            namespaces: vec![namespace("late", &[])],
        },
        Vec::new(),
    );
    agent.reconcile_all().await;
    assert!(!rules::check(&netns.path())?.is_complete());

    // The namespace is labelled: the running pod is found by its IP and
    // captured without a restart.
    agent.namespace_changed(namespace("late", AMBIENT)).await;
    expect(&mut zt, "add Kubernetes//Pod/late/web-2").await;
    assert_eq!(rules::check(&netns.path())?, RuleStatus::Complete);
    let records = agent.records().await;
    assert_eq!(records[0].netns.as_deref(), Some(netns.path().as_path()));
    cluster.wait_annotation("late/web-2=enabled").await;

    // The pod opts out: rules removed, ztunnel told, annotation disabled.
    let opted = pod(
        "late",
        "web-2",
        &[("istio.io/dataplane-mode", "none")],
        &[(REDIRECTION_ANNOTATION, "enabled")],
        &ip,
    );
    agent.pod_changed(opted).await;
    expect(&mut zt, "del Kubernetes//Pod/late/web-2").await;
    assert!(!rules::check(&netns.path())?.is_complete());
    cluster.wait_annotation("late/web-2=disabled").await;

    // Back in, then deleted: ztunnel forgets it.
    agent.pod_changed(web).await;
    expect(&mut zt, "add Kubernetes//Pod/late/web-2").await;
    agent.pod_deleted("late", "web-2").await;
    expect(&mut zt, "del Kubernetes//Pod/late/web-2").await;
    assert!(agent.records().await.is_empty());

    // The periodic check with nothing enrolled is quiet and harmless.
    agent.check_and_repair().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_restores_capture_before_ztunnel_connects() -> Result<()> {
    if !root_or_skip("a_restarted_agent_restores_capture_before_ztunnel_connects") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (ip_a, ip_b) = (test_ip(21), test_ip(22));
    let enrolled = TestNetns::create("restore-a")?.with_ip(&ip_a)?;
    let left = TestNetns::create("restore-b")?.with_ip(&ip_b)?;
    // An earlier run captured both; meanwhile b's pod opted out.
    rules::install(&enrolled.path())?;
    rules::install(&left.path())?;
    run(&[
        "ip",
        "netns",
        "exec",
        &enrolled.name,
        "nft",
        "flush",
        "chain",
        "inet",
        rules::TABLE,
        "output",
    ])?;
    let snapshot = Snapshot {
        pods: vec![
            pod(
                "shop",
                "a",
                &[],
                &[(REDIRECTION_ANNOTATION, "enabled")],
                &ip_a,
            ),
            pod(
                "shop",
                "b",
                &[("istio.io/dataplane-mode", "none")],
                &[(REDIRECTION_ANNOTATION, "enabled")],
                &ip_b,
            ),
        ],
        namespaces: vec![namespace("shop", AMBIENT)],
    };
    let restored = agent::restore(&settings(), &snapshot).await;
    let captured: Vec<&str> = restored
        .iter()
        .filter(|r| r.captured)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(captured, ["a"]);
    assert_eq!(rules::check(&enrolled.path())?, RuleStatus::Complete);
    assert!(!rules::check(&left.path())?.is_complete());

    let cluster = Arc::new(FakeCluster::default());
    let zsock = dir.path().join("ztunnel.sock");
    let ztunnel = Arc::new(ZtunnelServer::bind(&zsock)?);
    let agent = Agent::new(
        settings(),
        ztunnel.clone(),
        cluster.clone(),
        Metrics::new(),
        snapshot,
        restored,
    );
    agent.sync_annotations().await;
    cluster.wait_annotation("shop/b=disabled").await;
    // ztunnel's first snapshot is the full set, and so is the next one's
    // after a ztunnel restart.
    for _ in 0..2 {
        let mut zt = fake_ztunnel(&zsock).await?;
        expect(&mut zt, "add Kubernetes//Pod/shop/a").await;
        expect(&mut zt, "snapshot").await;
    }
    let metrics = agent.metrics().encode();
    assert!(
        metrics.contains("istio_cni_ambient_enrolled_pods 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_check_repairs_rules_and_ztunnel() -> Result<()> {
    if !root_or_skip("the_periodic_check_repairs_rules_and_ztunnel") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let netns = TestNetns::create("repair")?;
    let cluster = Arc::new(FakeCluster::default());
    cluster.add(
        namespace("shop", AMBIENT),
        &[pod("shop", "web-3", &[], &[], "10.0.0.1")],
    );
    let zsock = dir.path().join("ztunnel.sock");
    let ztunnel = Arc::new(ZtunnelServer::bind(&zsock)?);
    let mut zt = fake_ztunnel(&zsock).await?;
    expect(&mut zt, "snapshot").await;
    wait_connected(&ztunnel).await;
    let r = start(dir.path(), cluster, ztunnel.clone())?;
    let (code, out) = plugin("ADD", &r.socket, &netns.path(), "shop", "web-3").await;
    assert_eq!(code, 0, "{out}");
    expect(&mut zt, "add Kubernetes//Pod/shop/web-3").await;

    // Someone flushes the pod's rules: the check puts them back.
    run(&[
        "ip",
        "netns",
        "exec",
        &netns.name,
        "nft",
        "flush",
        "chain",
        "inet",
        rules::TABLE,
        "nat_output",
    ])?;
    r.agent.check_and_repair().await;
    assert_eq!(rules::check(&netns.path())?, RuleStatus::Complete);

    // ztunnel restarts and refuses the pod in its snapshot: the check hands
    // it over again.
    let mut zt2 = fake_ztunnel_refusing(&zsock, 1).await?;
    expect(&mut zt2, "refused Kubernetes//Pod/shop/web-3").await;
    expect(&mut zt2, "snapshot").await;
    wait_connected(&ztunnel).await;
    assert!(!ztunnel.acknowledged("Kubernetes//Pod/shop/web-3"));
    r.agent.check_and_repair().await;
    expect(&mut zt2, "add Kubernetes//Pod/shop/web-3").await;
    assert!(ztunnel.acknowledged("Kubernetes//Pod/shop/web-3"));

    let text = r.agent.metrics().encode();
    for want in [
        "istio_cni_repair_pods_repaired_total{type=\"rules\"} 1",
        "istio_cni_repair_pods_repaired_total{type=\"ztunnel\"} 1",
        "istio_cni_ambient_enrolled_pods 1",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    drop(zt);
    Ok(())
}

/// One raw HTTP/1.1 exchange over the plugin socket: status and body.
async fn raw(socket: &Path, request: String) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    s.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    Ok((
        status,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

#[tokio::test]
async fn malformed_requests_are_refused_with_a_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = Arc::new(FakeCluster::default());
    let ztunnel = Arc::new(ZtunnelServer::bind(&dir.path().join("z.sock"))?);
    let r = start(dir.path(), cluster, ztunnel)?;
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let (status, body) = raw(&r.socket, post("/cmdadd", "not json")).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a pod event"), "{body}");
    let (status, _) = raw(&r.socket, post("/other", "{}")).await?;
    assert_eq!(status, 404);
    let (status, _) = raw(
        &r.socket,
        "GET /cmdadd HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into(),
    )
    .await?;
    assert_eq!(status, 405);
    // A DEL of a pod never seen is fine (the runtime retries DELs).
    let ev = json!({"containerId": "c", "netns": "", "ifname": "eth0",
                    "podName": "x", "podNamespace": "y"});
    let (status, body) = raw(&r.socket, post("/cmddel", &ev.to_string())).await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
