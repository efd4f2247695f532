//! The local kubelet: one per node of the local mesh. It registers its Node
//! and keeps it Ready, watches the Pods the scheduler binds to it and runs
//! them the way a kubelet with a container runtime does: a network namespace
//! per pod, the node's CNI chain (the reference plugins, then ours) called
//! per the spec before any process starts, the containers' processes inside
//! the namespace, and the pod's status (IP, phase, readiness, restarts) and
//! events written back to the API server. Deleting a pod stops its
//! processes, calls CNI DEL and removes the namespace before the Pod object
//! is finally removed.
//!
//! Where this sits in the traffic path: nowhere itself; it is what makes a
//! pod's traffic pass through the mesh plugin's capture before the pod's
//! first process runs, exactly as on a cluster.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Event, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::Client;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cni::NetworkConfig;
use super::pod::PodRunner;
use crate::netns::Netns;

/// Annotation marking a pod whose process the node runs itself (outside
/// this kubelet), like a static pod: the mesh's own per-node components in
/// the local mesh. The kubelet leaves such pods alone.
pub const EXTERNAL_RUNTIME_ANNOTATION: &str = "local.ambient-mesh.io/runtime";

/// Errors of the kubelet's own loop (a pod's failures are reported on the
/// pod, not here).
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("registering node {node}: {source}")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Everything one node's kubelet needs.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub node_netns: Netns,
    /// Pod namespaces are named `<prefix>-<uid prefix>`.
    pub netns_prefix: String,
    /// The node's state: pod records (`pods/<ns>/<name>.json`), logs, CNI cache.
    pub state_dir: PathBuf,
    pub network: NetworkConfig,
    pub cluster_dns: Ipv4Addr,
    pub cluster_domain: String,
    pub sample_app: PathBuf,
}

/// Runs the kubelet until `shutdown`; then tears down every pod it runs
/// (processes, CNI DEL, namespaces) without deleting the Pod objects, as a
/// node going away would.
pub async fn run(
    client: Client,
    cfg: KubeletConfig,
    shutdown: CancellationToken,
) -> Result<(), KubeletError> {
    let cfg = Arc::new(cfg);
    register_node(&client, &cfg).await?;
    let heartbeat = tokio::spawn(heartbeat(client.clone(), cfg.clone(), shutdown.clone()));
    let pods: Api<Pod> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name));
    let mut stream = watcher(pods, wc).boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut seen_in_relist: Option<Vec<String>> = None;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = stream.next() => ev,
        };
        let Some(ev) = ev else { break };
        match ev {
            Ok(watcher::Event::Apply(pod)) => dispatch(&client, &cfg, &mut workers, pod, &shutdown),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    seen_in_relist.get_or_insert_with(Vec::new).push(uid);
                }
                dispatch(&client, &cfg, &mut workers, pod, &shutdown);
            }
            Ok(watcher::Event::Init) => seen_in_relist = Some(Vec::new()),
            Ok(watcher::Event::InitDone) => {
                // Pods gone while the watch was down are force-deleted ones.
                let seen = seen_in_relist.take().unwrap_or_default();
                workers.retain(|uid, w| {
                    let keep = seen.contains(uid);
                    if !keep {
                        w.gone.cancel();
                    }
                    keep
                });
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(w) = pod.metadata.uid.as_ref().and_then(|u| workers.remove(u)) {
                    w.gone.cancel();
                }
            }
            Err(e) => {
                tracing::warn!(node = %cfg.node_name, error = %e, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        workers.retain(|_, w| !w.task.is_finished());
    }
    heartbeat.abort();
    // Workers see the shutdown token and tear their pods down.
    for (_, w) in workers {
        let _ = w.task.await;
    }
    Ok(())
}

struct Worker {
    tx: watch::Sender<Pod>,
    gone: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn dispatch(
    client: &Client,
    cfg: &Arc<KubeletConfig>,
    workers: &mut HashMap<String, Worker>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(EXTERNAL_RUNTIME_ANNOTATION))
    {
        return;
    }
    if let Some(w) = workers.get(&uid) {
        if !w.task.is_finished() {
            let _ = w.tx.send(pod);
            return;
        }
    }
    let (tx, rx) = watch::channel(pod);
    let gone = CancellationToken::new();
    let runner = PodRunner::new(
        client.clone(),
        cfg.clone(),
        rx,
        gone.clone(),
        shutdown.clone(),
    );
    let task = tokio::spawn(runner.run());
    workers.insert(uid, Worker { tx, gone, task });
}

fn node_object(cfg: &KubeletConfig) -> Node {
    serde_json::from_value(json!({
        "metadata": {
            "name": cfg.node_name,
            "labels": {
                "kubernetes.io/hostname": cfg.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "beta.kubernetes.io/os": "linux",
            },
        },
        "spec": {"podCIDR": cfg.pod_cidr.to_string(), "podCIDRs": [cfg.pod_cidr.to_string()]},
    }))
    .expect("node object is valid")
}

fn node_status(cfg: &KubeletConfig) -> serde_json::Value {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let resources =
        json!({"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "50Gi"});
    json!({
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": cfg.node_ip.to_string()},
                {"type": "Hostname", "address": cfg.node_name},
            ],
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "local kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": kernel_version(), "osImage": "local mesh node",
                "containerRuntimeVersion": "local://0.1.0",
                "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn register_node(client: &Client, cfg: &KubeletConfig) -> Result<(), KubeletError> {
    let api: Api<Node> = Api::all(client.clone());
    let err = |source| KubeletError::Register {
        node: cfg.node_name.clone(),
        source,
    };
    match api.create(&PostParams::default(), &node_object(cfg)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.patch(
                &cfg.node_name,
                &PatchParams::default(),
                &Patch::Merge(node_object(cfg)),
            )
            .await
            .map_err(err)?;
        }
        Err(e) => return Err(err(e)),
    }
    api.patch_status(
        &cfg.node_name,
        &PatchParams::default(),
        &Patch::Merge(node_status(cfg)),
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// Ready heartbeats, so the node lifecycle controller never taints the node.
async fn heartbeat(client: Client, cfg: Arc<KubeletConfig>, shutdown: CancellationToken) {
    let api: Api<Node> = Api::all(client);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        if let Err(e) = api
            .patch_status(
                &cfg.node_name,
                &PatchParams::default(),
                &Patch::Merge(node_status(&cfg)),
            )
            .await
        {
            tracing::warn!(node = %cfg.node_name, error = %e, "node heartbeat failed");
        }
    }
}

/// Records an Event on a pod, as `kubectl describe pod` shows them.
pub(crate) async fn event(
    client: &Client,
    pod: &Pod,
    node: &str,
    ty: &str,
    reason: &str,
    message: &str,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Pod".into()),
            api_version: Some("v1".into()),
            namespace: Some(ns.clone()),
            name: Some(name),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message.chars().take(1024).collect()),
        type_: Some(ty.into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("kubelet".into()),
            host: Some(node.into()),
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: None::<MicroTime>,
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) = Api::<Event>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &ev)
        .await
    {
        tracing::debug!(error = %e, "could not record event");
    }
}

/// Removes the Pod object once its resources are released (the kubelet's
/// final delete with grace period 0, guarded by the uid).
pub(crate) async fn finalize_delete(client: &Client, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(&name, &dp)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "final delete failed"),
    }
}

/// Labels of a pod, for logs.
pub(crate) fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}
