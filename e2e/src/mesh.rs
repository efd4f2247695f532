//! A running mesh on top of a [`Topology`]: one ztunnel per node, the in-pod
//! rules in every enrolled pod, and the node agent's side of ZDS handing each
//! enrolled pod's network namespace to its node's ztunnel.
//!
//! Both node agent parts are the real agent's own (`node_agent::rules`,
//! `node_agent::ztunnel`); only the CNI ADD that would drive them is played
//! here, by enrolling the spec's pods before the ztunnels start.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_core::ca::CertificateAuthority;
use mesh_core::proto::zds::WorkloadInfo;
use node_agent::rules;
use node_agent::ztunnel::ZtunnelServer;

use crate::topology::{Process, Topology, TopologyError};
use crate::HasNetns;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("rules: {0}")]
    Rules(#[from] rules::RulesError),
    #[error("{0}")]
    Setup(String),
}

fn setup(msg: impl std::fmt::Display) -> MeshError {
    MeshError::Setup(msg.to_string())
}

/// A Kubernetes-like service: a VIP in front of some pods.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    /// (service port, target port)
    pub ports: Vec<(u16, u16)>,
    pub endpoints: Vec<String>,
}

/// What the mesh looks like.
#[derive(Debug, Clone, Default)]
pub struct MeshSpec {
    pub nodes: Vec<String>,
    /// (node, pod, service account) of enrolled pods.
    pub mesh_pods: Vec<(String, String, String)>,
    /// (node, pod) of pods outside the mesh.
    pub plain_pods: Vec<(String, String)>,
    pub services: Vec<ServiceSpec>,
    pub external: bool,
    /// Extra environment for every ztunnel.
    pub ztunnel_env: Vec<(String, String)>,
    /// Run istiod-lite against the real API server (pods and services
    /// become Kubernetes objects; ztunnels use xDS and the CA) instead of
    /// giving every ztunnel a local state file and CA.
    pub control_plane: bool,
}

impl MeshSpec {
    pub fn node(mut self, n: &str) -> Self {
        self.nodes.push(n.into());
        self
    }
    pub fn mesh_pod(mut self, node: &str, pod: &str, sa: &str) -> Self {
        self.mesh_pods.push((node.into(), pod.into(), sa.into()));
        self
    }
    pub fn plain_pod(mut self, node: &str, pod: &str) -> Self {
        self.plain_pods.push((node.into(), pod.into()));
        self
    }
    pub fn service(
        mut self,
        name: &str,
        vip: [u8; 4],
        ports: &[(u16, u16)],
        endpoints: &[&str],
    ) -> Self {
        self.services.push(ServiceSpec {
            name: name.into(),
            vip: Ipv4Addr::from(vip),
            ports: ports.to_vec(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        });
        self
    }
    pub fn external(mut self) -> Self {
        self.external = true;
        self
    }
    /// See [`MeshSpec::control_plane`].
    pub fn with_control_plane(mut self) -> Self {
        self.control_plane = true;
        self.external = true;
        self
    }
    pub fn ztunnel_env(mut self, k: &str, v: &str) -> Self {
        self.ztunnel_env.push((k.into(), v.into()));
        self
    }
}

/// The uid the Workload API gives a pod of the `default` namespace.
pub fn uid(pod: &str) -> String {
    uid_in(NAMESPACE, pod)
}

/// The uid the Workload API gives a pod.
pub fn uid_in(namespace: &str, pod: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{pod}")
}

pub fn hostname(service: &str) -> String {
    format!("{service}.{NAMESPACE}.svc.cluster.local")
}

struct NodeRun {
    ztunnel: Option<Process>,
    /// The ztunnel's projected token (control-plane mode).
    token_path: PathBuf,
    state_path: PathBuf,
    socket: PathBuf,
    /// The node agent's ZDS server: the node's enrolled pods and the
    /// current ztunnel connection.
    agent: ZtunnelServer,
}

/// A running mesh. Dropping it stops everything (the topology cleans up).
pub struct Mesh {
    pub spec: MeshSpec,
    /// Kubernetes namespace of the pods: `default` with local files, a
    /// namespace of this run's own with the control plane.
    pub namespace: String,
    /// istiod-lite, in control-plane mode.
    pub cp: Option<crate::controlplane::ControlPlane>,
    pub topo: Topology,
    pub ca_dir: PathBuf,
    rt: tokio::runtime::Runtime,
    nodes: Mutex<BTreeMap<String, NodeRun>>,
    spec_pods_removed: Mutex<Vec<String>>,
}

impl Mesh {
    /// Build the topology, install rules, write config, start the ztunnels
    /// and wait until every one is ready.
    pub fn start(spec: MeshSpec) -> Result<Mesh, MeshError> {
        let mut b = Topology::builder();
        for n in &spec.nodes {
            b = b.node(n);
        }
        for (n, p, _) in &spec.mesh_pods {
            b = b.pod(n, p);
        }
        for (n, p) in &spec.plain_pods {
            b = b.pod(n, p);
        }
        if spec.external {
            b = b.external();
        }
        let topo = b.build()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(setup)?;
        let ca_dir = topo.temp_path("ca");
        std::fs::create_dir_all(&ca_dir).map_err(setup)?;
        let ca = CertificateAuthority::generate(TRUST_DOMAIN).map_err(setup)?;
        ca.write_dir(&ca_dir).map_err(setup)?;
        for (_, p, _) in &spec.mesh_pods {
            rules::install(topo.pod(p))?;
        }
        let namespace = if spec.control_plane {
            topo.prefix().to_string()
        } else {
            NAMESPACE.to_string()
        };
        let mut mesh = Mesh {
            spec,
            namespace,
            cp: None,
            topo,
            ca_dir,
            rt,
            nodes: Mutex::new(BTreeMap::new()),
            spec_pods_removed: Mutex::new(Vec::new()),
        };
        if mesh.spec.control_plane {
            mesh.start_control_plane()
                .map_err(|e| setup(format!("{e:#}")))?;
        }
        let state = mesh.state_yaml();
        for n in mesh.spec.nodes.clone() {
            let dir = mesh.topo.temp_path(&format!("node-{n}"));
            std::fs::create_dir_all(&dir).map_err(setup)?;
            let state_path = dir.join("state.yaml");
            std::fs::write(&state_path, &state).map_err(setup)?;
            let socket = dir.join("ztunnel.sock");
            let agent = {
                let _g = mesh.rt.enter();
                ZtunnelServer::bind(&socket).map_err(setup)?
            };
            for (_, p, sa) in mesh.spec.mesh_pods.iter().filter(|(node, _, _)| *node == n) {
                let info = WorkloadInfo {
                    name: p.clone(),
                    namespace: mesh.namespace.clone(),
                    service_account: sa.clone(),
                };
                // The ztunnel starts below and gets these in its snapshot.
                agent.record_pod(
                    &uid_in(&mesh.namespace, p),
                    info,
                    &mesh.topo.pod(p).netns_path(),
                );
            }
            let token_path = dir.join("istio-token");
            if let Some(cp) = &mesh.cp {
                let token = mesh.rt.block_on(cp.ztunnel_token(&n)).map_err(setup)?;
                std::fs::write(&token_path, token).map_err(setup)?;
            }
            mesh.nodes.lock().unwrap().insert(
                n.clone(),
                NodeRun {
                    ztunnel: None,
                    token_path,
                    state_path,
                    socket,
                    agent,
                },
            );
            mesh.start_ztunnel(&n)?;
        }
        for n in mesh.spec.nodes.clone() {
            mesh.wait_ready(&n)?;
        }
        Ok(mesh)
    }

    /// The Workload API state every ztunnel is given.
    pub fn state_yaml(&self) -> String {
        let mut addresses = Vec::new();
        let svc_of = |pod: &str| -> serde_json::Value {
            let mut m = serde_json::Map::new();
            for s in &self.spec.services {
                if s.endpoints.iter().any(|e| e == pod) {
                    let ports: Vec<_> = s
                        .ports
                        .iter()
                        .map(|(sp, tp)| serde_json::json!({"servicePort": sp, "targetPort": tp}))
                        .collect();
                    m.insert(
                        format!("{NAMESPACE}/{}", hostname(&s.name)),
                        serde_json::json!({ "ports": ports }),
                    );
                }
            }
            serde_json::Value::Object(m)
        };
        for (node, p, sa) in &self.spec.mesh_pods {
            addresses.push(serde_json::json!({"workload": {
                "uid": uid(p), "name": p, "namespace": NAMESPACE, "serviceAccount": sa,
                "addresses": [self.topo.pod(p).ip().to_string()], "node": node,
                "tunnelProtocol": "HBONE", "trustDomain": TRUST_DOMAIN,
                "canonicalName": p, "canonicalRevision": "v1", "workloadName": p,
                "workloadType": "POD", "clusterId": "Kubernetes", "services": svc_of(p),
            }}));
        }
        for (node, p) in &self.spec.plain_pods {
            addresses.push(serde_json::json!({"workload": {
                "uid": uid(p), "name": p, "namespace": NAMESPACE, "serviceAccount": "default",
                "addresses": [self.topo.pod(p).ip().to_string()], "node": node,
                "tunnelProtocol": "NONE", "trustDomain": TRUST_DOMAIN, "workloadType": "POD",
                "clusterId": "Kubernetes", "services": svc_of(p),
            }}));
        }
        for s in &self.spec.services {
            let ports: Vec<_> = s
                .ports
                .iter()
                .map(|(sp, tp)| serde_json::json!({"servicePort": sp, "targetPort": tp}))
                .collect();
            addresses.push(serde_json::json!({"service": {
                "name": s.name, "namespace": NAMESPACE, "hostname": hostname(&s.name),
                "addresses": [{"network": "", "address": s.vip.to_string()}], "ports": ports,
            }}));
        }
        serde_yaml::to_string(&serde_json::json!({ "addresses": addresses, "authorizations": [] }))
            .unwrap_or_default()
    }

    /// Replace one node's state file (ztunnel reloads it).
    pub fn write_state(&self, node: &str, yaml: &str) -> Result<(), MeshError> {
        let path = self
            .nodes
            .lock()
            .unwrap()
            .get(node)
            .map(|n| n.state_path.clone())
            .ok_or_else(|| setup(format!("no node {node}")))?;
        std::fs::write(path, yaml).map_err(setup)
    }

    /// Start (or restart) the ztunnel of a node.
    pub fn start_ztunnel(&self, node: &str) -> Result<(), MeshError> {
        let bin = crate::app::ztunnel().map_err(setup)?;
        let mut nodes = self.nodes.lock().unwrap();
        let run = nodes
            .get_mut(node)
            .ok_or_else(|| setup(format!("no node {node}")))?;
        if let Some(old) = run.ztunnel.take() {
            let _ = old.kill();
        }
        let mut cmd = Command::new(bin);
        match &self.cp {
            None => {
                cmd.env("LOCAL_XDS_PATH", &run.state_path)
                    .env("LOCAL_CA_DIR", &self.ca_dir);
            }
            Some(cp) => {
                cmd.env("XDS_ADDRESS", crate::controlplane::xds_address())
                    .env("XDS_ROOT_CA", &cp.root_cert)
                    .env("AUTH_TOKEN_PATH", &run.token_path)
                    .env("POD_NAME", format!("ztunnel-{node}"))
                    .env("POD_NAMESPACE", &cp.istio_ns)
                    .env("INSTANCE_IP", self.topo.node(node).ip().to_string());
            }
        }
        cmd.env("INPOD_UDS", &run.socket)
            .env("NODE_NAME", node)
            .env(
                "RUST_LOG",
                std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            );
        for (k, v) in &self.spec.ztunnel_env {
            cmd.env(k, v);
        }
        let p = self
            .topo
            .spawn_named(self.topo.node(node), &format!("ztunnel-{node}"), cmd)?;
        run.ztunnel = Some(p);
        Ok(())
    }

    pub fn ztunnel(&self, node: &str) -> Option<Process> {
        self.nodes
            .lock()
            .unwrap()
            .get(node)
            .and_then(|n| n.ztunnel.clone())
    }

    /// GET a path of a node's ztunnel endpoint from inside the node.
    pub fn http_get_node(
        &self,
        node: &str,
        port: u16,
        path: &str,
    ) -> Result<(bool, String), MeshError> {
        let app = crate::app::mesh_app().map_err(setup)?;
        let url = format!("http://127.0.0.1:{port}{path}");
        let out = self.topo.exec(
            self.topo.node(node),
            &[app.to_str().unwrap_or("mesh-app"), "http-get", &url],
        )?;
        Ok((out.success(), out.stdout))
    }

    pub fn config_dump(&self, node: &str) -> Result<serde_json::Value, MeshError> {
        let (ok, body) = self.http_get_node(node, 15000, "/config_dump")?;
        if !ok {
            return Err(setup(format!("config_dump failed: {body}")));
        }
        let json = body.find('{').map(|i| &body[i..]).unwrap_or(&body);
        serde_json::from_str(json).map_err(|e| setup(format!("config_dump is not JSON: {e}")))
    }

    pub fn metrics(&self, node: &str) -> Result<String, MeshError> {
        Ok(self.http_get_node(node, 15020, "/metrics")?.1)
    }

    /// Wait until the node's ztunnel reports ready and serves every pod.
    pub fn wait_ready(&self, node: &str) -> Result<(), MeshError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let removed = self.spec_pods_removed.lock().unwrap().clone();
        let want = self
            .spec
            .mesh_pods
            .iter()
            .filter(|(n, p, _)| n == node && !removed.contains(p))
            .count();
        loop {
            if let Ok((true, _)) = self.http_get_node(node, 15021, "/healthz/ready") {
                if let Ok(dump) = self.config_dump(node) {
                    let pods = dump["workloadState"]
                        .as_object()
                        .map(|o| o.len())
                        .unwrap_or(0);
                    if pods == want {
                        return Ok(());
                    }
                }
            }
            if let Some(z) = self.ztunnel(node) {
                if !z.is_running() {
                    return Err(setup(format!(
                        "ztunnel on {node} exited:\n{}{}",
                        z.stdout(),
                        z.stderr()
                    )));
                }
            }
            if Instant::now() > deadline {
                let logs = self
                    .ztunnel(node)
                    .map(|z| z.stdout() + &z.stderr())
                    .unwrap_or_default();
                return Err(setup(format!(
                    "ztunnel on {node} not ready after 30s:\n{logs}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start a `mesh-app` subcommand in the background in a pod (or host).
    pub fn spawn_app(
        &self,
        ns: &impl HasNetns,
        label: &str,
        args: &[&str],
    ) -> Result<Process, MeshError> {
        let mut cmd = Command::new(crate::app::mesh_app().map_err(setup)?);
        cmd.args(args);
        Ok(self.topo.spawn_named(ns, label, cmd)?)
    }

    /// Run a `mesh-app` subcommand to completion in a pod (or host).
    pub fn app(&self, ns: &impl HasNetns, args: &[&str]) -> Result<crate::ExecOutput, MeshError> {
        let mut cmd = Command::new(crate::app::mesh_app().map_err(setup)?);
        cmd.args(args);
        Ok(self.topo.exec_command(ns, cmd)?)
    }

    /// Logs of every ztunnel, for failure messages.
    pub fn ztunnel_logs(&self) -> String {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .iter()
            .map(|(n, r)| {
                format!(
                    "--- ztunnel {n} ---\n{}",
                    r.ztunnel
                        .as_ref()
                        .map(|z| z.stdout() + &z.stderr())
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn ca(&self) -> Result<CertificateAuthority, MeshError> {
        CertificateAuthority::load_dir(&self.ca_dir).map_err(setup)
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    pub fn socket_path(&self, node: &str) -> Option<PathBuf> {
        self.nodes
            .lock()
            .unwrap()
            .get(node)
            .map(|n| n.socket.clone())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(cp) = self.cp.take() {
            // Leave the shared API server as found: the namespaces go, and
            // with them pods (deleted at once: no kubelet would confirm).
            let namespaces = [self.namespace.clone(), cp.istio_ns.clone()];
            let kube = cp.kube;
            drop(cp);
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), async {
                    let client = kube.client().await?;
                    for ns in namespaces {
                        crate::controlplane::delete_namespace(&client, &ns).await?;
                    }
                    anyhow::Ok(())
                })
                .await
            });
        }
    }
}

impl Mesh {
    /// Tell a node's ztunnel (as the node agent would) that a pod is gone.
    pub fn remove_pod(&self, pod: &str) -> Result<(), MeshError> {
        let node = self.topo.pod(pod).node_name().to_string();
        let nodes = self.nodes.lock().unwrap();
        let agent = &nodes
            .get(&node)
            .ok_or_else(|| setup(format!("no node {node}")))?
            .agent;
        if !agent.connected() {
            return Err(setup("ztunnel not connected"));
        }
        self.rt
            .block_on(agent.remove_pod(&self.uid(pod)))
            .map_err(setup)?;
        drop(nodes);
        self.spec_pods_removed.lock().unwrap().push(pod.to_string());
        Ok(())
    }

    /// Kill a node's ztunnel and start a new one; waits until it is ready.
    pub fn restart_ztunnel(&self, node: &str) -> Result<(), MeshError> {
        self.start_ztunnel(node)?;
        self.wait_ready(node)
    }
}

/// Connect to `addr` from inside a namespace (socket created there).
pub fn connect_from(
    ns: &impl HasNetns,
    addr: SocketAddr,
) -> Result<std::net::TcpStream, MeshError> {
    let s = ns
        .netns()
        .run_in(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .map_err(setup)?
        .map_err(setup)?;
    Ok(s)
}

/// Label that makes a pod an endpoint of a spec service (its selector).
pub fn service_label(service: &str) -> String {
    format!("svc.mesh.e2e/{service}")
}

impl Mesh {
    /// The uid the Workload API gives a pod of this mesh.
    pub fn uid(&self, pod: &str) -> String {
        uid_in(&self.namespace, pod)
    }

    /// A service's hostname in this mesh's namespace.
    pub fn hostname(&self, service: &str) -> String {
        format!("{service}.{}.svc.cluster.local", self.namespace)
    }

    /// The control plane; panics when the mesh runs on local files.
    pub fn control_plane(&self) -> &crate::controlplane::ControlPlane {
        self.cp
            .as_ref()
            .expect("mesh started without MeshSpec::with_control_plane")
    }

    /// An admin client of the API server (control-plane mode).
    pub fn kube_client(&self) -> Result<kube::Client, MeshError> {
        self.rt
            .block_on(self.control_plane().kube.client())
            .map_err(setup)
    }

    /// Registers the spec as Kubernetes objects (namespace labelled for
    /// ambient, nodes, pods with their IPs, services with their VIPs) and
    /// starts istiod-lite.
    fn start_control_plane(&mut self) -> anyhow::Result<()> {
        use crate::controlplane::{create_pod, ControlPlane, PodSpecOf, RUN_LABEL};
        use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as KSpec};
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

        let kube = self.rt.block_on(crate::kube::KubeCluster::shared())?;
        let ns = self.namespace.clone();
        let run = self.topo.prefix().to_string();
        let spec = self.spec.clone();
        let pods: Vec<(String, String, String, bool)> = spec
            .mesh_pods
            .iter()
            .map(|(n, p, sa)| (n.clone(), p.clone(), sa.clone(), true))
            .chain(
                spec.plain_pods
                    .iter()
                    .map(|(n, p)| (n.clone(), p.clone(), "default".to_string(), false)),
            )
            .collect();
        let ips: Vec<Ipv4Addr> = pods
            .iter()
            .map(|(_, p, _, _)| self.topo.pod(p).ip())
            .collect();
        self.rt.block_on(async {
            kube.create_namespace(
                &ns,
                &[("istio.io/dataplane-mode", "ambient"), (RUN_LABEL, &run)],
            )
            .await?;
            for n in &spec.nodes {
                kube.create_node(n).await?;
            }
            let client = kube.client().await?;
            for ((node, pod, sa, enrolled), ip) in pods.iter().zip(ips) {
                let mut labels = BTreeMap::from([("app".to_string(), pod.clone())]);
                if !enrolled {
                    labels.insert("istio.io/dataplane-mode".into(), "none".into());
                }
                for s in spec.services.iter().filter(|s| s.endpoints.contains(pod)) {
                    labels.insert(service_label(&s.name), "true".into());
                }
                create_pod(
                    &client,
                    &PodSpecOf {
                        namespace: &ns,
                        name: pod,
                        node,
                        service_account: sa,
                        labels,
                        ip: Some(ip),
                    },
                )
                .await?;
            }
            let api: kube::Api<Service> = kube::Api::namespaced(client, &ns);
            for s in &spec.services {
                let svc = Service {
                    metadata: kube::api::ObjectMeta {
                        name: Some(s.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(KSpec {
                        cluster_ip: Some(s.vip.to_string()),
                        selector: Some(BTreeMap::from([(service_label(&s.name), "true".into())])),
                        ports: Some(
                            s.ports
                                .iter()
                                .map(|(sp, tp)| ServicePort {
                                    name: Some(format!("tcp-{sp}")),
                                    port: i32::from(*sp),
                                    target_port: Some(IntOrString::Int(i32::from(*tp))),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                crate::kube::create_or_get(&api, &s.name, &svc).await?;
            }
            anyhow::Ok(())
        })?;
        self.cp = Some(ControlPlane::start(&self.topo, &self.rt, kube, &[])?);
        Ok(())
    }
}
