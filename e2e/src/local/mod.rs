//! The local mesh: the product's embedded default (see the design notes).
//! A real Kubernetes control plane on loopback, nodes as network
//! namespaces, and on every node what a cluster node runs: a kubelet
//! ([`kubelet`]) calling the CNI chain ([`cni`]) with the reference plugins
//! and ours, the cluster DNS and service proxy, the node agent and ztunnel.
//! istiod-lite runs beside the API server.
//!
//! The mesh's own per-node components run as the node's static processes,
//! configured like the DaemonSets in `manifests/` (same binaries, same
//! environment), not as pods: the API server only listens on the host's
//! loopback, which the node and pod networks cannot reach.

pub mod cni;
pub mod containers;
pub mod kubelet;
pub mod pod;
pub mod volumes;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::controlplane::{ControlPlane, ControlPlaneOptions};
use crate::kube::KubeCluster;
use crate::netns::HasNetns;
use crate::topology::{Process, Topology};

/// Namespace of istiod-lite and the ztunnels, as in Istio.
pub const ISTIO_NAMESPACE: &str = "istio-system";
/// The cluster DNS Service IP every pod's resolv.conf names.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Lifetime of the components' ServiceAccount tokens.
const TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The install manifests, in the order they apply.
const MANIFESTS: [&str; 7] = [
    "namespace.yaml",
    "crds/istio.yaml",
    "crds/gateway-api.yaml",
    "gatewayclasses.yaml",
    "istiod-lite.yaml",
    "ztunnel.yaml",
    "node-agent.yaml",
];

/// Workload kinds of the manifests that the local mesh runs as the nodes'
/// static processes instead (see the module documentation).
const RUN_NATIVELY: [&str; 2] = ["Deployment", "DaemonSet"];

/// `manifests/` of the source tree.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct LocalMeshSpec {
    pub nodes: Vec<String>,
    /// Where node state, pod records and the control plane live.
    pub state_dir: PathBuf,
}

impl Default for LocalMeshSpec {
    fn default() -> Self {
        LocalMeshSpec {
            nodes: vec!["node1".into(), "node2".into()],
            state_dir: PathBuf::from("/var/run/ambient-mesh/local"),
        }
    }
}

/// Per-node processes and paths.
pub struct NodeRun {
    pub name: String,
    pub dir: PathBuf,
    pub plugin_socket: PathBuf,
    pub ztunnel_socket: PathBuf,
    pub token_path: PathBuf,
    pub agent_readiness: SocketAddr,
    pub agent_metrics: SocketAddr,
    agent: Option<Process>,
    ztunnel: Option<Process>,
}

impl NodeRun {
    pub fn agent(&self) -> Option<&Process> {
        self.agent.as_ref()
    }
    pub fn ztunnel(&self) -> Option<&Process> {
        self.ztunnel.as_ref()
    }
}

/// A running local mesh; dropping it removes everything it made.
pub struct LocalMesh {
    pub spec: LocalMeshSpec,
    pub kube: &'static KubeCluster,
    pub cp: Option<ControlPlane>,
    pub topo: Topology,
    pub nodes: Vec<NodeRun>,
    rt: tokio::runtime::Runtime,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalMesh {
    /// Brings everything up and waits until every node's agent and ztunnel
    /// are ready.
    pub fn start(spec: LocalMeshSpec) -> Result<LocalMesh> {
        std::fs::create_dir_all(&spec.state_dir)
            .with_context(|| format!("creating {}", spec.state_dir.display()))?;
        let kube: &'static KubeCluster = Box::leak(Box::new(KubeCluster::start_in(
            &spec.state_dir.join("kube"),
        )?));
        let mut b = Topology::builder();
        for n in &spec.nodes {
            b = b.node(n);
        }
        let topo = b.external().build()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut mesh = LocalMesh {
            spec,
            kube,
            cp: None,
            topo,
            nodes: Vec::new(),
            rt,
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        };
        mesh.apply_manifests()?;
        let creds = mesh.spec.state_dir.join("credentials");
        std::fs::create_dir_all(&creds)?;
        // Each component authenticates as its own ServiceAccount, so the
        // manifests' RBAC is what it runs with.
        let istiod_kubeconfig = creds.join("istiod.kubeconfig");
        mesh.rt.block_on(kube.service_account_kubeconfig(
            ISTIO_NAMESPACE,
            "istiod",
            &istiod_kubeconfig,
            TOKEN_LIFETIME,
        ))?;
        mesh.rt.block_on(kube.service_account_kubeconfig(
            ISTIO_NAMESPACE,
            "istio-cni",
            &creds.join("istio-cni.kubeconfig"),
            TOKEN_LIFETIME,
        ))?;
        let cp = ControlPlane::start_with(
            &mesh.topo,
            &mesh.rt,
            kube,
            ControlPlaneOptions {
                istio_ns: Some(ISTIO_NAMESPACE.into()),
                unscoped: true,
                kubeconfig: Some(istiod_kubeconfig),
                // Waypoint pods reach istiod-lite where the nodes do.
                extra_env: vec![(
                    "WAYPOINT_XDS_ADDRESS".into(),
                    crate::controlplane::xds_address(),
                )],
            },
        )?;
        mesh.cp = Some(cp);
        for name in mesh.spec.nodes.clone() {
            let run = mesh.prepare_node(&name)?;
            mesh.nodes.push(run);
        }
        for i in 0..mesh.nodes.len() {
            mesh.start_agent(i)?;
            mesh.start_ztunnel(i)?;
        }
        for i in 0..mesh.nodes.len() {
            mesh.wait_node_ready(i)?;
        }
        mesh.start_node_services()?;
        Ok(mesh)
    }

    /// Applies `manifests/`: CRDs, namespace, ServiceAccounts, RBAC,
    /// Services and GatewayClasses; the Deployment and DaemonSets are the
    /// processes this mesh starts itself.
    fn apply_manifests(&self) -> Result<()> {
        let dir = manifests_dir();
        for (i, file) in MANIFESTS.iter().enumerate() {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut docs = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc)
                    .with_context(|| format!("parsing {}", path.display()))?;
                let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
                if v.is_null() || RUN_NATIVELY.contains(&kind) {
                    continue;
                }
                docs.push(serde_yaml::to_string(&v)?);
            }
            if docs.is_empty() {
                continue;
            }
            self.apply(&docs.join("---\n"))
                .with_context(|| format!("applying {}", path.display()))?;
            if file.starts_with("crds/")
                && MANIFESTS
                    .get(i + 1)
                    .is_some_and(|n| !n.starts_with("crds/"))
            {
                self.kubectl(&[
                    "wait",
                    "--for=condition=Established",
                    "crd",
                    "--all",
                    "--timeout=60s",
                ])?;
            }
        }
        Ok(())
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    pub fn kubeconfig(&self) -> &Path {
        self.kube.kubeconfig()
    }

    pub fn client(&self) -> Result<kube::Client> {
        self.rt.block_on(self.kube.client())
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kube.kubectl(args)
    }

    pub fn node(&self, name: &str) -> &NodeRun {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in the local mesh"))
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.spec.state_dir.join("nodes").join(name)
    }

    fn prepare_node(&self, name: &str) -> Result<NodeRun> {
        let dir = self.node_dir(name);
        let node = self.topo.node(name);
        for sub in [
            "net.d",
            "bin",
            "ipam",
            "run/istio-cni",
            "run/ztunnel",
            "pods",
            "logs",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // The node's network before the mesh: bridge + host-local, as a
        // cluster's default CNI would install it.
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "localmesh",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.pod_cidr().to_string(), "gateway": node.pod_gateway().to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }],
        });
        std::fs::write(
            dir.join("net.d/10-localmesh.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        std::fs::write(dir.join("netns"), node.netns().name())?;
        let token_path = dir.join("istio-token");
        let cp = self.cp.as_ref().context("control plane not started")?;
        let token = self.rt.block_on(cp.ztunnel_token(name))?;
        std::fs::write(&token_path, token)?;
        Ok(NodeRun {
            name: name.to_string(),
            plugin_socket: dir.join("run/istio-cni/pluginevent.sock"),
            ztunnel_socket: dir.join("run/ztunnel/ztunnel.sock"),
            token_path,
            agent_readiness: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            agent_metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            dir,
            agent: None,
            ztunnel: None,
        })
    }

    /// (Re)starts a node's agent, as its DaemonSet pod would run.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let bin = crate::app::binary("node-agent")?;
        let plugin = crate::app::binary("mesh-cni")?;
        let n = &self.nodes[i];
        let mut cmd = Command::new(bin);
        cmd.env("NODE_NAME", &n.name)
            .env(
                "KUBECONFIG",
                self.spec.state_dir.join("credentials/istio-cni.kubeconfig"),
            )
            .env("PLUGIN_EVENT_SOCKET", &n.plugin_socket)
            .env("ZTUNNEL_SOCKET", &n.ztunnel_socket)
            .env("READINESS_ADDR", n.agent_readiness.to_string())
            .env("METRICS_ADDR", n.agent_metrics.to_string())
            .env("CNI_BIN_DIR", n.dir.join("bin"))
            .env("CNI_NET_DIR", n.dir.join("net.d"))
            .env("CNI_PLUGIN_SOURCE", plugin)
            .env("REPAIR_INTERVAL", "2s")
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            );
        if let Some(old) = self.nodes[i].agent.take() {
            let _ = old.kill();
        }
        let p = self
            .topo
            .spawn_host(&format!("node-agent-{}", self.nodes[i].name), cmd)?;
        self.nodes[i].agent = Some(p);
        Ok(())
    }

    /// (Re)starts a node's ztunnel with its DaemonSet's configuration.
    pub fn start_ztunnel(&mut self, i: usize) -> Result<()> {
        let bin = crate::app::ztunnel()?;
        let cp = self.cp.as_ref().context("control plane not started")?;
        let n = &self.nodes[i];
        let node = self.topo.node(&n.name);
        let mut cmd = Command::new(bin);
        cmd.env("XDS_ADDRESS", crate::controlplane::xds_address())
            .env("XDS_ROOT_CA", &cp.root_cert)
            .env("AUTH_TOKEN_PATH", &n.token_path)
            .env("POD_NAME", format!("ztunnel-{}", n.name))
            .env("POD_NAMESPACE", ISTIO_NAMESPACE)
            .env("INSTANCE_IP", node.ip().to_string())
            .env("INPOD_UDS", &n.ztunnel_socket)
            .env("NODE_NAME", &n.name)
            .env(
                "RUST_LOG",
                std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            );
        if let Some(old) = self.nodes[i].ztunnel.take() {
            let _ = old.kill();
        }
        let p = self
            .topo
            .spawn_named(node, &format!("ztunnel-{}", self.nodes[i].name), cmd)?;
        self.nodes[i].ztunnel = Some(p);
        Ok(())
    }

    /// Stops a node's ztunnel (a crash or rollout in progress).
    pub fn stop_ztunnel(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        if let Some(z) = self.nodes[i].ztunnel.take() {
            z.kill()?;
        }
        Ok(())
    }

    /// Stops a node's agent.
    pub fn stop_agent(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        if let Some(a) = self.nodes[i].agent.take() {
            a.kill()?;
        }
        Ok(())
    }

    pub fn restart_ztunnel(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        self.start_ztunnel(i)?;
        self.wait_node_ready(i)
    }

    pub fn restart_agent(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        self.start_agent(i)?;
        self.wait_node_ready(i)
    }

    fn index(&self, node: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node:?}"))
    }

    /// Until the node's agent answers `/readyz` and its ztunnel
    /// `/healthz/ready`.
    pub fn wait_node_ready(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let node = self.topo.node(&n.name);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let agent_ok = http_status(n.agent_readiness, "/readyz") == Some(200);
            let zt_ok = node
                .netns()
                .run_in(|| {
                    http_status(
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 15021)),
                        "/healthz/ready",
                    )
                })
                .ok()
                .flatten()
                == Some(200);
            if agent_ok && zt_ok {
                return Ok(());
            }
            for p in [&n.agent, &n.ztunnel].into_iter().flatten() {
                if !p.is_running() {
                    bail!("{} exited:\n{}{}", p.label(), p.stdout(), p.stderr());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not ready after 60s (agent ready: {agent_ok}, ztunnel ready: {zt_ok})\n{}",
                    n.name,
                    self.topo.dump_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start_node_services(&mut self) -> Result<()> {
        let client = self.client()?;
        let sample_app = crate::app::binary("sample-app")?;
        for n in &self.nodes {
            let node = self.topo.node(&n.name);
            let cfg = kubelet::KubeletConfig {
                node_name: n.name.clone(),
                node_ip: node.ip(),
                pod_cidr: node.pod_cidr(),
                node_netns: node.netns().clone(),
                netns_prefix: format!("{}-p{}", self.topo.prefix(), node.index()),
                state_dir: n.dir.clone(),
                network: self.network(&n.name),
                cluster_dns: CLUSTER_DNS,
                cluster_domain: CLUSTER_DOMAIN.into(),
                sample_app: sample_app.clone(),
            };
            let (c, s) = (client.clone(), self.shutdown.clone());
            let name = n.name.clone();
            self.tasks.push(self.rt.spawn(async move {
                if let Err(e) = kubelet::run(c, cfg, s).await {
                    tracing::error!(node = %name, error = %e, "kubelet stopped");
                }
            }));
            let (c, s, ns) = (client.clone(), self.shutdown.clone(), node.netns().clone());
            self.tasks.push(self.rt.spawn(async move {
                if let Err(e) = crate::clusterdns::run(c, ns, CLUSTER_DNS, CLUSTER_DOMAIN, s).await
                {
                    tracing::error!(error = %e, "cluster DNS stopped");
                }
            }));
            let (c, s, ns) = (client.clone(), self.shutdown.clone(), node.netns().clone());
            self.tasks.push(self.rt.spawn(async move {
                if let Err(e) = crate::svcproxy::run(c, ns, s).await {
                    tracing::error!(error = %e, "service proxy stopped");
                }
            }));
        }
        Ok(())
    }

    /// Labels a namespace for ambient mode (or removes the label).
    pub fn set_ambient(&self, namespace: &str, on: bool) -> Result<()> {
        let client = self.client()?;
        let api: Api<Namespace> = Api::all(client);
        let value = if on {
            json!("ambient")
        } else {
            serde_json::Value::Null
        };
        self.rt.block_on(api.patch(
            namespace,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": value}}})),
        ))?;
        Ok(())
    }

    /// The record a node's kubelet keeps of a running pod.
    pub fn pod_record(&self, namespace: &str, name: &str) -> Option<pod::PodRecord> {
        find_pod_record(&self.spec.state_dir, namespace, name)
    }

    /// What a container of a pod has written to stdout and stderr so far
    /// (as `kubectl logs POD -c CONTAINER`); empty when it has not run.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        let Some(rec) = self.pod_record(namespace, pod) else {
            return String::new();
        };
        let path = self
            .node_dir(&rec.node)
            .join("logs")
            .join(format!("{namespace}_{pod}"))
            .join(format!("{container}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Runs `argv` inside a pod's network namespace (as `kubectl exec`).
    pub fn exec(&self, namespace: &str, pod: &str, argv: &[&str]) -> Result<crate::ExecOutput> {
        let rec = self
            .pod_record(namespace, pod)
            .with_context(|| format!("pod {namespace}/{pod} is not running on any node"))?;
        let ns = crate::netns::Netns::from_name(&rec.netns);
        Ok(self.topo.exec(&ns, argv)?)
    }

    /// GET on one of a node's ztunnel's local ports (15000 admin, 15020
    /// metrics, 15021 readiness), from inside the node.
    pub fn ztunnel_get(&self, node: &str, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_string();
        self.topo
            .node(node)
            .netns()
            .run_in(move || http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &path))
            .ok()
            .flatten()
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// `kubectl ARGS` with `stdin`.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The CNI network of a node, as its kubelet uses it.
    pub fn network(&self, node: &str) -> cni::NetworkConfig {
        let n = self.node(node);
        let ns = self.topo.node(node).netns().clone();
        cni::NetworkConfig {
            conf_dir: n.dir.join("net.d"),
            cni_path: format!("{}:/usr/lib/cni:/opt/cni/bin", n.dir.join("bin").display()),
            node: ns,
        }
    }

    /// CNI `CHECK` of a running pod's network with its cached ADD result,
    /// as a runtime would run it.
    pub fn cni_check(&self, namespace: &str, name: &str) -> Result<()> {
        let rec = self
            .pod_record(namespace, name)
            .with_context(|| format!("pod {namespace}/{name} is not running"))?;
        let c = rec.cni.context("pod has no CNI state (host network)")?;
        let sb = cni::Sandbox {
            container_id: c.container_id,
            netns_path: c.netns_path,
            ifname: c.ifname,
            pod_namespace: rec.namespace,
            pod_name: rec.name,
            pod_uid: rec.uid,
        };
        Ok(self.network(&rec.node).check(&sb, &c.result)?)
    }

    /// Until every pod of `namespace` is Ready (and there is at least one).
    pub fn wait_pods_ready(&self, namespace: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(&[
                "get", "pods", "-n", namespace, "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ])?;
            let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            if !lines.is_empty() && lines.iter().all(|l| l.ends_with(" True")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pods in {namespace} not ready after {timeout:?}:\n{out}\n{}",
                    self.kubectl(&["get", "events", "-n", namespace])
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// The network namespace of a node of a running local mesh.
pub fn node_netns_name(state_dir: &Path, node: &str) -> Option<String> {
    let name = std::fs::read_to_string(state_dir.join("nodes").join(node).join("netns")).ok()?;
    Some(name.trim().to_string())
}

/// Looks a pod's record up under every node of a state directory.
pub fn find_pod_record(state_dir: &Path, namespace: &str, name: &str) -> Option<pod::PodRecord> {
    let nodes = std::fs::read_dir(state_dir.join("nodes")).ok()?;
    nodes.filter_map(|e| e.ok()).find_map(|e| {
        let text = std::fs::read(pod::record_path(&e.path(), namespace, name)).ok()?;
        serde_json::from_slice(&text).ok()
    })
}

/// A plain HTTP/1.1 GET (`Connection: close`); status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let code = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(c, _)| c)
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.topo.print_logs();
        }
        // Kubelets tear their pods down (processes, CNI DEL, namespaces).
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        self.rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks))
                .await;
        });
        for n in &mut self.nodes {
            for p in [n.agent.take(), n.ztunnel.take()].into_iter().flatten() {
                let _ = p.kill();
            }
        }
        self.cp = None;
        // Anything a kubelet could not tear down.
        if let Ok(left) =
            crate::topology::namespaces_with_prefix(&format!("{}-p", self.topo.prefix()))
        {
            for name in left {
                let _ = crate::netns::Netns::from_name(&name).delete();
                let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
            }
        }
        self.kube.stop();
        let _ = std::fs::remove_dir_all(&self.spec.state_dir);
    }
}
