//! istiod-lite against a real Kubernetes API server: what a connected xDS
//! client receives as objects change, and the two-node mesh running on the
//! control plane (xDS + CA) instead of local files.
//!
//! Needs the API server binaries (`scripts/kube-build.sh`) and, for the
//! mesh tests, root.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::controlplane::{create_pod, delete_namespace, delete_pod, PodSpecOf, RUN_LABEL};
use e2e::kube::KubeCluster;
use e2e::mesh::{Mesh, MeshSpec};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use mesh_core::proto::workload::{self as pb, address::Type};
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::xds::client::{ClientConfig, Handler, Subscription, Upsert, XdsClient};
use prost::Message;

static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn unique(what: &str) -> String {
    format!(
        "cp-{}-{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// istiod-lite as a plain process on loopback, scoped to one run label.
struct Istiod {
    child: Child,
    grpc: SocketAddr,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Istiod {
    fn start(kube: &KubeCluster, run: &str, istio_ns: &str) -> Result<Istiod> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("root-cert.pem");
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let http = free_port();
        let log = std::fs::File::create(dir.path().join("istiod.log"))?;
        let child = Command::new(e2e::app::binary("istiod-lite")?)
            .env("KUBECONFIG", kube.kubeconfig())
            .env("GRPC_ADDR", grpc.to_string())
            .env("HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("POD_NAMESPACE", istio_ns)
            .env("ROOT_CERT_OUT", &root)
            .env("DISCOVERY_SELECTORS", format!("{RUN_LABEL}={run}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut me = Istiod {
            child,
            grpc,
            root,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(me.root.exists() && std::net::TcpStream::connect(grpc).is_ok()) {
            if let Ok(Some(status)) = me.child.try_wait() {
                anyhow::bail!("istiod-lite exited {status}: {}", me.log());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "istiod-lite not up: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("istiod.log")).unwrap_or_default()
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare xDS client's view: current resources, and every response.
#[derive(Default)]
struct Recorder {
    held: Mutex<BTreeMap<String, pb::Address>>,
    responses: Mutex<Vec<(Vec<String>, Vec<String>)>>,
}

impl Handler for Recorder {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        if type_url != ADDRESS_TYPE_URL {
            return Ok(());
        }
        let mut held = self.held.lock().unwrap();
        let mut names = Vec::new();
        for (name, _, any) in upserts {
            let a = pb::Address::decode(any.value.as_ref()).map_err(|e| e.to_string())?;
            names.push(name.clone());
            held.insert(name, a);
        }
        for r in &removes {
            held.remove(r);
        }
        self.responses.lock().unwrap().push((names, removes));
        Ok(())
    }
}

impl Recorder {
    fn workload(&self, name: &str) -> Option<pb::Workload> {
        match self.held.lock().unwrap().get(name)?.r#type.clone()? {
            Type::Workload(w) => Some(w),
            Type::Service(_) => None,
        }
    }
    fn service(&self, name: &str) -> Option<pb::Service> {
        match self.held.lock().unwrap().get(name)?.r#type.clone()? {
            Type::Service(s) => Some(s),
            Type::Workload(_) => None,
        }
    }
    fn names(&self) -> Vec<String> {
        self.held.lock().unwrap().keys().cloned().collect()
    }
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn service(name: &str, selector: &[(&str, &str)], ports: &[(i32, IntOrString)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(
                selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(p, t)| ServicePort {
                        name: Some(format!("http-{p}")),
                        port: *p,
                        target_port: Some(t.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ports_of(w: &pb::Workload, svc_key: &str) -> Vec<(u32, u32)> {
    w.services
        .get(svc_key)
        .map(|pl| {
            pl.ports
                .iter()
                .map(|p| (p.service_port, p.target_port))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_objects_become_workload_api_resources_and_deltas() -> Result<()> {
    let kube = KubeCluster::shared().await?;
    let client = kube.client().await?;
    let run = unique("xds");
    let ns = run.clone();
    let istio_ns = format!("{run}-istio");
    kube.create_namespace(
        &ns,
        &[("istio.io/dataplane-mode", "ambient"), (RUN_LABEL, &run)],
    )
    .await?;
    kube.create_namespace(&istio_ns, &[(RUN_LABEL, &run)])
        .await?;
    // A namespace of another mesh on the same API server: out of scope.
    let other = unique("other");
    kube.create_namespace(&other, &[("istio.io/dataplane-mode", "ambient")])
        .await?;
    kube.create_node("cp-node-a").await?;
    let pod = |name: &'static str, labels: &[(&str, &str)], ip: [u8; 4]| PodSpecOf {
        namespace: "",
        name,
        node: "cp-node-a",
        service_account: "web",
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ip: Some(ip.into()),
    };
    for p in [
        pod("web-1", &[("app", "web"), ("version", "v1")], [10, 9, 0, 1]),
        pod("web-2", &[("app", "web")], [10, 9, 0, 2]),
        pod(
            "legacy",
            &[("app", "legacy"), ("istio.io/dataplane-mode", "none")],
            [10, 9, 0, 3],
        ),
    ] {
        create_pod(
            &client,
            &PodSpecOf {
                namespace: &ns,
                ..p
            },
        )
        .await?;
    }
    create_pod(
        &client,
        &PodSpecOf {
            namespace: &other,
            name: "stranger",
            node: "cp-node-a",
            service_account: "default",
            labels: BTreeMap::new(),
            ip: Some([10, 9, 0, 9].into()),
        },
    )
    .await?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    svcs.create(
        &PostParams::default(),
        &service("web", &[("app", "web")], &[(80, IntOrString::Int(8080))]),
    )
    .await?;

    let istiod = Istiod::start(kube, &run, &istio_ns)?;
    let root = std::fs::read_to_string(&istiod.root)?;
    let channel = mesh_core::grpc::channel(
        &format!("https://{}", istiod.grpc),
        mesh_core::grpc::client_tls(&root)?,
    )?;
    // xDS streams need a token the API server vouches for, like the CA.
    let token_dir = tempfile::tempdir()?;
    let token_path = token_dir.path().join("token");
    std::fs::write(
        &token_path,
        kube.service_account_token(&istio_ns, "probe", "istio-ca", None)
            .await?,
    )?;
    let mut cfg = ClientConfig::new("ztunnel~10.0.0.1~probe.ns~ns.svc.cluster.local")
        .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard());
    cfg.token_file = Some(token_path);
    let rec = Arc::new(Recorder::default());
    let xds = XdsClient::new(channel, cfg, rec.clone());
    let mut ready = xds.handle().ready();
    let task = tokio::spawn(xds.run());
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .with_context(|| format!("no complete state; istiod log:\n{}", istiod.log()))??;

    let uid = |p: &str| format!("Kubernetes//Pod/{ns}/{p}");
    let svc_key = format!("{ns}/web.{ns}.svc.cluster.local");
    // Exactly our objects: the other mesh's namespace is not discovered.
    let mut want = vec![uid("legacy"), uid("web-1"), uid("web-2"), svc_key.clone()];
    want.sort();
    assert_eq!(rec.names(), want, "istiod log:\n{}", istiod.log());
    let w1 = rec.workload(&uid("web-1")).unwrap();
    assert_eq!(w1.tunnel_protocol, pb::TunnelProtocol::Hbone as i32);
    assert_eq!(w1.service_account, "web");
    assert_eq!(w1.node, "cp-node-a");
    assert_eq!(w1.addresses, vec![vec![10u8, 9, 0, 1]]);
    assert_eq!(w1.canonical_name, "web");
    assert_eq!(w1.canonical_revision, "v1");
    assert_eq!(ports_of(&w1, &svc_key), [(80, 8080)]);
    let legacy = rec.workload(&uid("legacy")).unwrap();
    assert_eq!(
        legacy.tunnel_protocol,
        pb::TunnelProtocol::None as i32,
        "opt-out is TCP"
    );
    let s = rec.service(&svc_key).unwrap();
    assert_eq!(s.hostname, format!("web.{ns}.svc.cluster.local"));
    assert_eq!(s.addresses.len(), 1, "a ClusterIP");
    assert_eq!(s.ports[0].service_port, 80);

    // Service port change: the service and both endpoints change.
    let before = rec.responses.lock().unwrap().len();
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"ports": [
            {"name": "http-80", "port": 80, "targetPort": 9090}
        ]}})),
    )
    .await?;
    eventually("target port 9090 pushed", || {
        rec.workload(&uid("web-1"))
            .is_some_and(|w| ports_of(&w, &svc_key) == [(80, 9090)])
    })
    .await;
    let changed: Vec<String> = rec.responses.lock().unwrap()[before..]
        .iter()
        .flat_map(|(u, _)| u.clone())
        .collect();
    assert!(
        !changed.contains(&uid("legacy")),
        "unrelated workload resent: {changed:?}"
    );

    // Selector change: web-2 leaves the service, web-1 stays.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"selector": {"app": "web", "version": "v1"}}})),
    )
    .await?;
    eventually("web-2 no longer an endpoint", || {
        rec.workload(&uid("web-2"))
            .is_some_and(|w| !w.services.contains_key(&svc_key))
    })
    .await;
    assert_eq!(
        ports_of(&rec.workload(&uid("web-1")).unwrap(), &svc_key),
        [(80, 9090)]
    );

    // Pod deletion: a removal.
    delete_pod(&client, &ns, "web-2").await?;
    eventually("web-2 removed", || rec.workload(&uid("web-2")).is_none()).await;
    assert!(rec
        .responses
        .lock()
        .unwrap()
        .iter()
        .any(|(_, removed)| removed.contains(&uid("web-2"))));

    // Namespace label removal: the pods leave the mesh (TCP, not HBONE).
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.patch(
        &ns,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}}),
        ),
    )
    .await?;
    eventually("web-1 is TCP", || {
        rec.workload(&uid("web-1"))
            .is_some_and(|w| w.tunnel_protocol == pb::TunnelProtocol::None as i32)
    })
    .await;

    // The root every pod may trust is published in the namespace.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    let mut published = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while published.is_none() && Instant::now() < deadline {
        published = cms.get_opt("istio-ca-root-cert").await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cm = published.context("istio-ca-root-cert never published")?;
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("root-cert.pem")
            .map(|s| s.trim()),
        Some(root.trim())
    );

    task.abort();
    drop(istiod);
    for n in [&ns, &istio_ns, &other] {
        delete_namespace(&client, n).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_refuses_streams_without_a_valid_token() -> Result<()> {
    let kube = KubeCluster::shared().await?;
    let run = unique("auth");
    let istio_ns = format!("{run}-istio");
    kube.create_namespace(&istio_ns, &[(RUN_LABEL, &run)])
        .await?;
    let istiod = Istiod::start(kube, &run, &istio_ns)?;
    let root = std::fs::read_to_string(&istiod.root)?;
    let channel = mesh_core::grpc::channel(
        &format!("https://{}", istiod.grpc),
        mesh_core::grpc::client_tls(&root)?,
    )?;
    let mut grpc = mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel);
    for token in [None, Some("Bearer not-a-token")] {
        let mut req = tonic::Request::new(futures::stream::iter(vec![
            mesh_core::proto::discovery::DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE_URL.into(),
                resource_names_subscribe: vec!["*".into()],
                ..Default::default()
            },
        ]));
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", t.parse()?);
        }
        let status = match grpc.delta_aggregated_resources(req).await {
            Err(s) => s,
            Ok(resp) => resp
                .into_inner()
                .message()
                .await
                .expect_err("no resources without a valid token"),
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let client = kube.client().await?;
    delete_namespace(&client, &istio_ns).await?;
    Ok(())
}

// --- the two-node mesh on the control plane --------------------------------

/// Each mesh test has its own VIP: they share one API server, which
/// allocates ClusterIPs cluster-wide.
const VIP_CA: [u8; 4] = [10, 96, 7, 10];
const VIP_RESTART: [u8; 4] = [10, 96, 7, 11];

fn vip_str(vip: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(vip).to_string()
}

fn root_or_skip() -> bool {
    if !e2e::is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return false;
    }
    true
}

fn cp_mesh(vip: [u8; 4]) -> Mesh {
    let spec = MeshSpec::default()
        .node("n1")
        .node("n2")
        .mesh_pod("n1", "client", "sleep")
        .mesh_pod("n2", "b1", "b")
        .service("b", vip, &[(80, 8080), (9001, 9001)], &["b1"])
        .with_control_plane();
    let mesh = Mesh::start(spec).expect("mesh on the control plane starts");
    let t = &mesh.topo;
    mesh.spawn_app(
        t.pod("b1"),
        "http-b1",
        &["http-server", "--port", "8080", "--name", "b1"],
    )
    .unwrap();
    mesh.spawn_app(t.pod("b1"), "echo-b1", &["tcp-echo", "--port", "9001"])
        .unwrap();
    t.wait_for_tcp(t.pod("b1"), t.pod("b1").addr(8080)).unwrap();
    t.wait_for_tcp(t.pod("b1"), t.pod("b1").addr(9001)).unwrap();
    mesh
}

fn http_get(mesh: &Mesh, pod: &str, url: &str) -> (i32, serde_json::Value) {
    let out = mesh
        .app(mesh.topo.pod(pod), &["http-get", url, "-m", "10"])
        .unwrap();
    let json = out.stdout.find('{').map(|i| &out.stdout[i..]).unwrap_or("");
    (
        out.code().unwrap_or(-1),
        serde_json::from_str(json.trim()).unwrap_or(serde_json::Value::Null),
    )
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pod_to_service_crosses_nodes_with_ca_issued_certificates() {
    if !root_or_skip() {
        return;
    }
    let mesh = cp_mesh(VIP_CA);
    let cp = mesh.control_plane();
    let vip = vip_str(VIP_CA);
    let (code, body) = http_get(&mesh, "client", &format!("http://{vip}/hello"));
    assert_eq!(code, 0, "{body}\n{}\n{}", mesh.ztunnel_logs(), cp.logs());
    assert_eq!(body["server"], "b1");
    assert_eq!(body["client_ip"], mesh.topo.pod("client").ip().to_string());

    // Both ends hold certificates the control plane's CA issued.
    let root = std::fs::read_to_string(&cp.root_cert).unwrap();
    for (node, sa) in [("n1", "sleep"), ("n2", "b")] {
        let dump = mesh.config_dump(node).unwrap();
        let id = format!("spiffe://cluster.local/ns/{}/sa/{sa}", mesh.namespace);
        let cert = dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["identity"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} on {node}: {}", dump["certificates"]))
            .clone();
        use base64::Engine as _;
        let roots: Vec<String> = cert["rootCerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(r["pem"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                String::from_utf8_lossy(&pem).trim().to_string()
            })
            .collect();
        assert_eq!(roots, [root.trim()], "{node}: root is not istiod-lite's");
        // The ztunnel learned the mesh from xDS, not a file.
        assert!(
            dump["config"]["xdsSource"]["address"].is_string(),
            "{}",
            dump["config"]
        );
        // Exactly this mesh's pods and service, as the control plane
        // translated them.
        let wl = dump["workloads"].as_array().unwrap();
        let mut names: Vec<&str> = wl.iter().filter_map(|w| w["name"].as_str()).collect();
        names.sort();
        assert_eq!(names, ["b1", "client"], "{wl:?}");
        assert!(wl.iter().all(|w| w["protocol"] == "HBONE"), "{wl:?}");
        let b1 = wl.iter().find(|w| w["name"] == "b1").unwrap();
        assert_eq!(b1["node"], "n2");
        assert_eq!(b1["serviceAccount"], "b");
        let svcs = dump["services"].as_array().unwrap();
        assert_eq!(svcs.len(), 1, "{svcs:?}");
        assert_eq!(svcs[0]["hostname"], mesh.hostname("b").as_str());
        assert_eq!(svcs[0]["vips"][0], format!("/{vip}"));
    }
}

#[test]
fn istiod_restart_keeps_connections_and_resyncs() {
    if !root_or_skip() {
        return;
    }
    let mesh = cp_mesh(VIP_RESTART);
    let cp = mesh.control_plane();
    let vip_s = vip_str(VIP_RESTART);
    let vip: SocketAddr = format!("{vip_s}:9001").parse().unwrap();
    let conn = e2e::mesh::connect_from(mesh.topo.pod("client"), vip).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut echo = |msg: &str| -> String {
        w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line
    };
    assert_eq!(echo("before"), "before\n");

    cp.stop();
    // Without the control plane the data plane keeps its last state.
    assert_eq!(echo("while down"), "while down\n");
    let (code, body) = http_get(&mesh, "client", &format!("http://{vip_s}/down"));
    assert_eq!(code, 0, "{body}");

    // A change made while istiod-lite is down reaches the ztunnels after
    // it comes back: they reconnect and resync.
    let client = mesh.kube_client().unwrap();
    mesh.runtime()
        .block_on(async {
            let api: Api<Service> = Api::namespaced(client, &mesh.namespace);
            api.create(
                &PostParams::default(),
                &service("late", &[("app", "b1")], &[(81, IntOrString::Int(8080))]),
            )
            .await
        })
        .unwrap();
    cp.restart(&mesh.topo).unwrap();
    let late = mesh.hostname("late");
    for node in ["n1", "n2"] {
        wait_until(&format!("{node} learns service late"), || {
            mesh.config_dump(node).is_ok_and(|d| {
                d["services"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["hostname"] == late.as_str()))
            })
        });
    }
    // The connection opened before the restart never noticed.
    assert_eq!(echo("after"), "after\n");
}
