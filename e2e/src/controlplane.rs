//! The control plane of an end-to-end mesh: istiod-lite against the real
//! Kubernetes API server of [`crate::kube`], and the kubelet's part for the
//! pods of a [`crate::Topology`] (their Pod objects, status and IPs, and the
//! ztunnels' projected tokens).
//!
//! istiod-lite runs on the host, next to the API server on loopback. The
//! ztunnels live in node namespaces that cannot see the host, so the harness
//! plays the cluster network: a forwarder in the external host's namespace
//! listens on `172.30.0.200:15012` (the address the nodes dial, and a SAN of
//! istiod-lite's serving certificate) and relays to istiod-lite's port.
//! Connections through it break when istiod-lite stops, as they would.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;

use crate::kube::KubeCluster;
use crate::topology::{Process, Topology, EXTERNAL_IP};
use crate::HasNetns;

/// Where ztunnels reach istiod-lite.
pub const ISTIOD_PORT: u16 = 15012;
/// Label that scopes an istiod-lite to the namespaces of one test mesh
/// (its discovery selector), so meshes sharing one API server never see
/// each other's pods.
pub const RUN_LABEL: &str = "mesh.e2e/run";

/// `https://172.30.0.200:15012`.
pub fn xds_address() -> String {
    format!("https://{EXTERNAL_IP}:{ISTIOD_PORT}")
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running istiod-lite for one test mesh.
pub struct ControlPlane {
    pub kube: &'static KubeCluster,
    /// The run label value (the topology prefix).
    pub run: String,
    /// Namespace of istiod-lite and the ztunnels (its CA Secret lives here).
    pub istio_ns: String,
    /// Root certificate istiod-lite wrote (trust anchor for its TLS).
    pub root_cert: PathBuf,
    grpc_port: u16,
    http_port: u16,
    process: Mutex<Option<Process>>,
    forwarder: tokio::task::JoinHandle<()>,
    extra_env: Vec<(String, String)>,
    discovery_selector: bool,
    kubeconfig: PathBuf,
}

/// How [`ControlPlane::start_with`] sets istiod-lite up.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Namespace of istiod-lite and the ztunnels; default `<run>-istio`.
    pub istio_ns: Option<String>,
    /// Scope istiod-lite to namespaces labelled with this run (tests sharing
    /// one API server); off for a mesh that owns its API server.
    pub unscoped: bool,
    /// Credentials istiod-lite uses; default the admin's.
    pub kubeconfig: Option<PathBuf>,
    pub extra_env: Vec<(String, String)>,
}

impl ControlPlane {
    /// Creates the istio namespace, starts istiod-lite and the forwarder,
    /// and waits until istiod-lite is ready.
    pub fn start(
        topo: &Topology,
        rt: &tokio::runtime::Runtime,
        kube: &'static KubeCluster,
        extra_env: &[(&str, &str)],
    ) -> Result<ControlPlane> {
        let opts = ControlPlaneOptions {
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        Self::start_with(topo, rt, kube, opts)
    }

    /// [`ControlPlane::start`] with options.
    pub fn start_with(
        topo: &Topology,
        rt: &tokio::runtime::Runtime,
        kube: &'static KubeCluster,
        opts: ControlPlaneOptions,
    ) -> Result<ControlPlane> {
        let run = topo.prefix().to_string();
        let istio_ns = opts
            .istio_ns
            .clone()
            .unwrap_or_else(|| format!("{run}-istio"));
        rt.block_on(kube.create_namespace(&istio_ns, &[(RUN_LABEL, &run)]))?;
        let grpc_port = free_port()?;
        let http_port = free_port()?;
        let ext = topo
            .try_external()
            .context("the control plane needs the topology's external host")?;
        let listener = ext
            .netns()
            .run_in(|| StdListener::bind(SocketAddr::from((EXTERNAL_IP, ISTIOD_PORT))))
            .context("entering the external host's namespace")?
            .context("binding the istiod forwarder")?;
        listener.set_nonblocking(true)?;
        let forwarder = {
            let _g = rt.enter();
            let l = tokio::net::TcpListener::from_std(listener)?;
            rt.spawn(forward(
                l,
                SocketAddr::from((Ipv4Addr::LOCALHOST, grpc_port)),
            ))
        };
        let cp = ControlPlane {
            kube,
            root_cert: topo.temp_path("root-cert.pem"),
            run,
            istio_ns,
            grpc_port,
            http_port,
            process: Mutex::new(None),
            forwarder,
            extra_env: opts.extra_env,
            discovery_selector: !opts.unscoped,
            kubeconfig: opts
                .kubeconfig
                .unwrap_or_else(|| kube.kubeconfig().to_path_buf()),
        };
        cp.launch(topo)?;
        Ok(cp)
    }

    fn launch(&self, topo: &Topology) -> Result<()> {
        let bin = crate::app::binary("istiod-lite")?;
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("GRPC_ADDR", format!("127.0.0.1:{}", self.grpc_port))
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .env("POD_NAMESPACE", &self.istio_ns)
            .env(
                "CA_TRUSTED_NODE_ACCOUNTS",
                format!("{}/ztunnel", self.istio_ns),
            )
            .env("ISTIOD_SANS", EXTERNAL_IP.to_string())
            .env("ROOT_CERT_OUT", &self.root_cert)
            .env(
                "RUST_LOG",
                std::env::var("ISTIOD_LOG").unwrap_or_else(|_| "info".into()),
            );
        if self.discovery_selector {
            cmd.env("DISCOVERY_SELECTORS", format!("{RUN_LABEL}={}", self.run));
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let p = topo.spawn_host("istiod-lite", cmd)?;
        *self.process.lock().unwrap() = Some(p);
        self.wait_ready()
    }

    /// Polls `/ready` until istiod-lite has listed the cluster and serves.
    pub fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_ok(
                SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port)),
                "/ready",
            ) && self.root_cert.exists()
            {
                return Ok(());
            }
            if let Some(p) = self.process() {
                if !p.is_running() {
                    bail!("istiod-lite exited:\n{}{}", p.stdout(), p.stderr());
                }
            }
            if Instant::now() > deadline {
                bail!("istiod-lite not ready after 60s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current istiod-lite process.
    pub fn process(&self) -> Option<Process> {
        self.process.lock().unwrap().clone()
    }

    /// Its output, for failure messages.
    pub fn logs(&self) -> String {
        self.process()
            .map(|p| p.stdout() + &p.stderr())
            .unwrap_or_default()
    }

    /// Stops istiod-lite (SIGKILL: no goodbye to the ztunnels).
    pub fn stop(&self) {
        if let Some(p) = self.process.lock().unwrap().take() {
            let _ = p.kill();
        }
    }

    /// Stops and starts istiod-lite; returns once the new one is ready.
    pub fn restart(&self, topo: &Topology) -> Result<()> {
        self.stop();
        self.launch(topo)
    }

    /// The token a node's ztunnel presents: its ServiceAccount `ztunnel`,
    /// bound to a `ztunnel-<node>` Pod scheduled on that node, audience
    /// `istio-ca` (what the DaemonSet's projected volume holds).
    pub async fn ztunnel_token(&self, node: &str) -> Result<String> {
        let client = self.kube.client().await?;
        let name = format!("ztunnel-{node}");
        create_pod(
            &client,
            &PodSpecOf {
                namespace: &self.istio_ns,
                name: &name,
                node,
                service_account: "ztunnel",
                labels: BTreeMap::from([("app".to_string(), "ztunnel".to_string())]),
                ip: None,
            },
        )
        .await?;
        self.kube
            .service_account_token(&self.istio_ns, "ztunnel", "istio-ca", Some(&name))
            .await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.forwarder.abort();
        self.stop();
    }
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

async fn forward(listener: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// What the harness's kubelet needs to know of a pod.
pub struct PodSpecOf<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    pub labels: BTreeMap<String, String>,
    /// Its IP once running; `None` leaves it Pending.
    pub ip: Option<Ipv4Addr>,
}

/// Creates a Pod bound to `node` and, when it has an IP, reports it
/// Running and Ready with that IP, as the node's kubelet would.
pub async fn create_pod(client: &Client, p: &PodSpecOf<'_>) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), p.namespace);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(p.name.to_string()),
            namespace: Some(p.namespace.to_string()),
            labels: Some(p.labels.clone()),
            // Its process is the harness's, not a kubelet's.
            annotations: Some(BTreeMap::from([(
                crate::local::kubelet::EXTERNAL_RUNTIME_ANNOTATION.to_string(),
                "harness".to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(p.node.to_string()),
            service_account_name: Some(p.service_account.to_string()),
            // The v1.20 token controller may not have made the account's
            // legacy token yet; nothing here mounts it anyway.
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("mesh-app".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    // The ServiceAccount admission plugin refuses pods whose account does
    // not exist yet.
    crate::kube::create_or_get(
        &Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), p.namespace),
        p.service_account,
        &k8s_openapi::api::core::v1::ServiceAccount {
            metadata: ObjectMeta {
                name: Some(p.service_account.to_string()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let created = match api.create(&PostParams::default(), &pod).await {
        Ok(c) => c,
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(p.name).await?,
        Err(e) => {
            return Err(e).with_context(|| format!("creating pod {}/{}", p.namespace, p.name))
        }
    };
    let Some(ip) = p.ip else {
        return Ok(created);
    };
    set_pod_status(client, p.namespace, p.name, ip, true).await
}

/// Reports a pod Running with `ip`, Ready or not.
pub async fn set_pod_status(
    client: &Client,
    namespace: &str,
    name: &str,
    ip: Ipv4Addr,
    ready: bool,
) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
                {"type": "ContainersReady", "status": if ready { "True" } else { "False" }},
            ],
            "containerStatuses": [{
                "name": "app", "image": "mesh-app", "imageID": "", "ready": ready,
                "restartCount": 0, "started": true, "state": {"running": {}},
            }],
        }
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("reporting the status of pod {namespace}/{name}"))
}

/// Deletes a pod at once (no kubelet will confirm a graceful stop).
pub async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting pod {namespace}/{name}")),
    }
}

/// Deletes a namespace, its pods first and at once (no kubelet would
/// confirm a graceful stop, which would leave the namespace terminating).
pub async fn delete_namespace(client: &Client, namespace: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let _ = pods
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &Default::default(),
        )
        .await;
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    match nss.delete(namespace, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting namespace {namespace}")),
    }
}
