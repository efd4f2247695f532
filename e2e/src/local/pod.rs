//! One pod's life on a local kubelet: sandbox (network namespace, CNI ADD
//! with retries, cluster DNS in its `/etc/resolv.conf`), containers
//! (processes started through `ip netns exec`, restarted per
//! `restartPolicy`), readiness, status reports, and teardown on deletion.
//!
//! A failed CNI ADD (for example the mesh plugin failing closed because
//! ztunnel is not there) is reported as a `FailedCreatePodSandBox` event and
//! retried with backoff; no process of the pod runs until ADD succeeded.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cni::{self, Sandbox};
use super::containers::{self, Launch};
use super::kubelet::{event, finalize_delete, pod_key, KubeletConfig};
use crate::netns::Netns;

/// What `local exec` and `local status` read about a running pod.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// Network namespace name (under `/var/run/netns`).
    pub netns: String,
    pub ip: String,
    pub host_network: bool,
    /// Per container: name and pid (0 when not running).
    pub containers: Vec<(String, u32)>,
    /// The runtime's cached CNI state (what `CHECK` and `DEL` are given).
    pub cni: Option<CniRecord>,
}

/// The cached result of a pod's CNI ADD.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniRecord {
    pub container_id: String,
    pub ifname: String,
    pub netns_path: PathBuf,
    pub result: Value,
}

/// Where a node keeps the record of a pod.
pub fn record_path(state_dir: &std::path::Path, namespace: &str, name: &str) -> PathBuf {
    state_dir
        .join("pods")
        .join(namespace)
        .join(format!("{name}.json"))
}

struct SandboxRun {
    netns: Netns,
    host_network: bool,
    cni: Option<(Sandbox, Value)>,
    ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting { reason: String, message: String },
    Running { started: String },
    Terminated { code: i32, reason: String },
}

struct ContainerRun {
    spec: Container,
    child: Option<tokio::process::Child>,
    pid: u32,
    restarts: i32,
    state: State,
    last: Option<State>,
    ready: bool,
    next_start: Instant,
    started_at: Option<Instant>,
}

pub(crate) struct PodRunner {
    client: Client,
    cfg: Arc<KubeletConfig>,
    rx: watch::Receiver<Pod>,
    gone: CancellationToken,
    shutdown: CancellationToken,
    start_time: String,
    last_status: Option<Value>,
    /// Host directory of each of the pod's volumes.
    volumes: BTreeMap<String, PathBuf>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(500);
const MAX_GRACE: Duration = Duration::from_secs(10);

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl PodRunner {
    pub(crate) fn new(
        client: Client,
        cfg: Arc<KubeletConfig>,
        rx: watch::Receiver<Pod>,
        gone: CancellationToken,
        shutdown: CancellationToken,
    ) -> Self {
        PodRunner {
            client,
            cfg,
            rx,
            gone,
            shutdown,
            start_time: now(),
            last_status: None,
            volumes: BTreeMap::new(),
        }
    }

    fn pod(&self) -> Pod {
        self.rx.borrow().clone()
    }

    fn deleting(&self) -> bool {
        self.rx.borrow().metadata.deletion_timestamp.is_some()
    }

    fn stopped(&self) -> bool {
        self.gone.is_cancelled() || self.shutdown.is_cancelled()
    }

    pub(crate) async fn run(mut self) {
        let pod = self.pod();
        let key = pod_key(&pod);
        let span = tracing::info_span!("pod", pod = %key, node = %self.cfg.node_name);
        let mut attempt: u32 = 0;
        let sandbox = loop {
            if self.stopped() {
                return;
            }
            if self.deleting() {
                finalize_delete(&self.client, &self.pod()).await;
                return;
            }
            let pod = self.pod();
            let cfg = self.cfg.clone();
            let made = tokio::task::spawn_blocking(move || create_sandbox(&cfg, &pod, attempt))
                .await
                .unwrap_or_else(|e| Err(format!("sandbox task failed: {e}")));
            match made {
                Ok(sb) => break sb,
                Err(msg) => {
                    tracing::warn!(parent: &span, error = %msg, attempt, "pod sandbox not created; will retry");
                    event(
                        &self.client,
                        &self.pod(),
                        &self.cfg.node_name,
                        "Warning",
                        "FailedCreatePodSandBox",
                        &format!("Failed to create pod sandbox: {msg}"),
                    )
                    .await;
                    self.report_pending("ContainerCreating", &msg).await;
                    let wait =
                        Duration::from_millis(500 * (1u64 << attempt.min(5))).min(MAX_BACKOFF);
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.gone.cancelled() => return,
                        _ = self.shutdown.cancelled() => return,
                        r = self.rx.changed() => if r.is_err() { return },
                    }
                }
            }
        };
        tracing::info!(parent: &span, ip = %sandbox.ip, netns = sandbox.netns.name(), "pod sandbox ready");
        // Volumes before any container, retried while what they need (a
        // ConfigMap, a Secret) does not exist yet, as a kubelet does.
        let vol_dir = volume_dir(&self.cfg, &self.pod());
        let mut attempt: u32 = 0;
        loop {
            match super::volumes::materialize(&self.client, &self.pod(), &vol_dir).await {
                Ok(v) => {
                    self.volumes = v;
                    break;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if attempt == 0 {
                        event(
                            &self.client,
                            &self.pod(),
                            &self.cfg.node_name,
                            "Warning",
                            "FailedMount",
                            &msg,
                        )
                        .await;
                    }
                    self.report_pending("ContainerCreating", &msg).await;
                    let wait =
                        Duration::from_millis(500 * (1u64 << attempt.min(4))).min(MAX_BACKOFF);
                    attempt += 1;
                    let stop = tokio::select! {
                        _ = tokio::time::sleep(wait) => false,
                        _ = self.gone.cancelled() => true,
                        _ = self.shutdown.cancelled() => true,
                        r = self.rx.changed() => r.is_err() || self.deleting(),
                    };
                    if stop {
                        let cfg = self.cfg.clone();
                        let pod = self.pod();
                        let _ = tokio::task::spawn_blocking(move || teardown(&cfg, &pod, sandbox))
                            .await;
                        if self.deleting() && !self.gone.is_cancelled() {
                            finalize_delete(&self.client, &self.pod()).await;
                        }
                        return;
                    }
                }
            }
        }
        let pod = self.pod();
        let mut runs: Vec<ContainerRun> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|spec| ContainerRun {
                spec,
                child: None,
                pid: 0,
                restarts: 0,
                state: State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                },
                last: None,
                ready: false,
                next_start: Instant::now(),
                started_at: None,
            })
            .collect();
        let mut tick = tokio::time::interval(TICK);
        loop {
            self.step_containers(&sandbox, &mut runs, &span).await;
            self.write_record(&sandbox, &runs);
            self.report_running(&sandbox, &runs).await;
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.gone.cancelled() => break,
                _ = self.shutdown.cancelled() => break,
                r = self.rx.changed() => {
                    if r.is_err() { break }
                    if self.deleting() { break }
                }
            }
        }
        let grace = self
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(Duration::from_secs(30))
            .min(MAX_GRACE);
        stop_all(&mut runs, grace).await;
        let cfg = self.cfg.clone();
        let pod = self.pod();
        let _ = tokio::task::spawn_blocking(move || teardown(&cfg, &pod, sandbox)).await;
        tracing::info!(parent: &span, "pod torn down");
        if self.deleting() && !self.gone.is_cancelled() {
            finalize_delete(&self.client, &self.pod()).await;
        }
    }

    async fn step_containers(
        &self,
        sb: &SandboxRun,
        runs: &mut [ContainerRun],
        span: &tracing::Span,
    ) {
        let pod = self.pod();
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        for run in runs.iter_mut() {
            if let Some(child) = run.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        let code = status.code().unwrap_or(128 + 9);
                        tracing::info!(parent: span, container = %run.spec.name, code, "container exited");
                        run.child = None;
                        run.pid = 0;
                        run.ready = false;
                        let term = State::Terminated {
                            code,
                            reason: if code == 0 { "Completed" } else { "Error" }.into(),
                        };
                        let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
                        if restart {
                            run.last = Some(term);
                            run.restarts += 1;
                            let backoff =
                                Duration::from_secs(1u64 << run.restarts.clamp(0, 4) as u64);
                            run.next_start = Instant::now() + backoff.min(MAX_BACKOFF);
                            run.state = State::Waiting {
                                reason: "CrashLoopBackOff".into(),
                                message: format!(
                                    "back-off restarting failed container {}",
                                    run.spec.name
                                ),
                            };
                        } else {
                            run.state = term;
                        }
                    }
                    Err(e) => tracing::warn!(parent: span, error = %e, "waiting for container"),
                }
            }
            let can_start = run.child.is_none()
                && matches!(run.state, State::Waiting { .. })
                && Instant::now() >= run.next_start;
            if can_start {
                self.start_container(sb, &pod, run, span);
            }
        }
        // Readiness: probes run off the async threads.
        for run in runs.iter_mut() {
            run.ready = match (&run.state, run.started_at) {
                (State::Running { .. }, Some(started)) => {
                    let probe = readiness_target(&run.spec);
                    let delay = run
                        .spec
                        .readiness_probe
                        .as_ref()
                        .and_then(|p| p.initial_delay_seconds)
                        .unwrap_or(0)
                        .max(0) as u64;
                    if started.elapsed() < Duration::from_secs(delay) {
                        false
                    } else {
                        match probe {
                            None => true,
                            Some(target) => {
                                let netns = sb.netns.clone();
                                tokio::task::spawn_blocking(move || probe_ok(&netns, &target))
                                    .await
                                    .unwrap_or(false)
                            }
                        }
                    }
                }
                _ => false,
            };
        }
    }

    fn start_container(
        &self,
        sb: &SandboxRun,
        pod: &Pod,
        run: &mut ContainerRun,
        span: &tracing::Span,
    ) {
        let rt = containers::Runtime {
            pod_ip: sb.ip.to_string(),
            host_ip: self.cfg.node_ip.to_string(),
            mounts: super::volumes::container_mounts(&run.spec, &self.volumes),
        };
        let launch = match containers::resolve(pod, &run.spec, &rt, &self.cfg.sample_app) {
            Ok(l) => l,
            Err(e) => {
                let waiting = State::Waiting {
                    reason: e.reason().into(),
                    message: e.to_string(),
                };
                if run.state != waiting {
                    tracing::warn!(parent: span, container = %run.spec.name, error = %e, "container cannot start");
                }
                run.state = waiting;
                run.next_start = Instant::now() + MAX_BACKOFF;
                return;
            }
        };
        match spawn(&self.cfg, pod, &sb.netns, &run.spec.name, &launch) {
            Ok(child) => {
                run.pid = child.id().unwrap_or(0);
                run.child = Some(child);
                run.state = State::Running { started: now() };
                run.started_at = Some(Instant::now());
                tracing::info!(parent: span, container = %run.spec.name, pid = run.pid, "container started");
            }
            Err(e) => {
                run.state = State::Waiting {
                    reason: "CreateContainerError".into(),
                    message: e.to_string(),
                };
                run.next_start = Instant::now() + MAX_BACKOFF;
            }
        }
    }

    fn write_record(&self, sb: &SandboxRun, runs: &[ContainerRun]) {
        let pod = self.pod();
        let rec = PodRecord {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: self.cfg.node_name.clone(),
            netns: sb.netns.name().to_string(),
            ip: sb.ip.to_string(),
            host_network: sb.host_network,
            containers: runs.iter().map(|r| (r.spec.name.clone(), r.pid)).collect(),
            cni: sb.cni.as_ref().map(|(sb, result)| CniRecord {
                container_id: sb.container_id.clone(),
                ifname: sb.ifname.clone(),
                netns_path: sb.netns_path.clone(),
                result: result.clone(),
            }),
        };
        let path = record_path(&self.cfg.state_dir, &rec.namespace, &rec.name);
        if let Some(dir) = path.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("json.tmp");
        if fs::write(&tmp, serde_json::to_vec_pretty(&rec).unwrap_or_default()).is_ok() {
            let _ = fs::rename(&tmp, &path);
        }
    }

    async fn report_pending(&mut self, reason: &str, message: &str) {
        let pod = self.pod();
        let statuses: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                json!({"name": c.name, "image": c.image, "imageID": "", "ready": false,
                       "restartCount": 0, "started": false,
                       "state": {"waiting": {"reason": reason}}})
            })
            .collect();
        let status = json!({
            "phase": "Pending",
            "hostIP": self.cfg.node_ip.to_string(),
            "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                 "message": message.chars().take(512).collect::<String>()},
            ],
            "containerStatuses": statuses,
        });
        self.patch_status(status).await;
    }

    async fn report_running(&mut self, sb: &SandboxRun, runs: &[ContainerRun]) {
        let pod = self.pod();
        let statuses: Vec<Value> = runs
            .iter()
            .map(|r| {
                let state = state_json(&r.state);
                let mut s = json!({
                    "name": r.spec.name, "image": r.spec.image, "imageID": "",
                    "containerID": format!("local://{}", r.pid),
                    "ready": r.ready, "restartCount": r.restarts,
                    "started": matches!(r.state, State::Running { .. }),
                    "state": state,
                });
                if let Some(last) = &r.last {
                    s["lastState"] = state_json(last);
                }
                s
            })
            .collect();
        let all_ready = !runs.is_empty() && runs.iter().all(|r| r.ready);
        let all_done = !runs.is_empty()
            && runs
                .iter()
                .all(|r| matches!(r.state, State::Terminated { .. }));
        let phase = if all_done {
            if runs
                .iter()
                .all(|r| matches!(r.state, State::Terminated { code: 0, .. }))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if runs
            .iter()
            .any(|r| matches!(r.state, State::Running { .. }) || r.restarts > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let ready = if all_ready { "True" } else { "False" };
        let ip = sb.ip.to_string();
        let status = json!({
            "phase": phase,
            "hostIP": self.cfg.node_ip.to_string(),
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
            ],
            "containerStatuses": statuses,
        });
        let _ = pod;
        self.patch_status(status).await;
    }

    async fn patch_status(&mut self, status: Value) {
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let pod = self.pod();
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        match api
            .patch_status(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::debug!(pod = %pod_key(&pod), error = %e, "status update failed"),
        }
    }
}

fn state_json(s: &State) -> Value {
    match s {
        State::Waiting { reason, message } if message.is_empty() => {
            json!({"waiting": {"reason": reason}})
        }
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { started } => json!({"running": {"startedAt": started}}),
        State::Terminated { code, reason } => {
            json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": now()}})
        }
    }
}

/// Pod namespace name: the node's prefix plus the start of the pod uid
/// (unique per pod, short enough for interface-name tooling).
fn netns_name(cfg: &KubeletConfig, pod: &Pod) -> String {
    let uid = pod
        .metadata
        .uid
        .as_deref()
        .unwrap_or_default()
        .replace('-', "");
    format!("{}-{}", cfg.netns_prefix, &uid[..uid.len().min(12)])
}

fn create_sandbox(cfg: &KubeletConfig, pod: &Pod, attempt: u32) -> Result<SandboxRun, String> {
    let spec = pod.spec.as_ref().ok_or("pod has no spec")?;
    if spec.host_network == Some(true) {
        return Ok(SandboxRun {
            netns: cfg.node_netns.clone(),
            host_network: true,
            cni: None,
            ip: cfg.node_ip,
        });
    }
    let name = netns_name(cfg, pod);
    let ns = Netns::from_name(&name);
    if ns.exists() {
        // A previous attempt's leftovers.
        let _ = ns.delete();
    }
    let ns = Netns::create(&name).map_err(|e| format!("creating network namespace: {e}"))?;
    let cleanup = |ns: &Netns| {
        let _ = ns.delete();
        let _ = fs::remove_dir_all(etc_dir(ns));
    };
    // Cluster DNS as `ip netns exec` bind-mounts it over /etc/resolv.conf.
    let etc = etc_dir(&ns);
    let ns_name = pod.metadata.namespace.clone().unwrap_or_default();
    let resolv = format!(
        "nameserver {}\nsearch {ns_name}.svc.{d} svc.{d} {d}\noptions ndots:5\n",
        cfg.cluster_dns,
        d = cfg.cluster_domain
    );
    let hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string();
    if let Err(e) = fs::create_dir_all(&etc)
        .and_then(|_| fs::write(etc.join("resolv.conf"), &resolv))
        .and_then(|_| fs::write(etc.join("hosts"), &hosts))
    {
        cleanup(&ns);
        return Err(format!("writing {}: {e}", etc.display()));
    }
    let sb = Sandbox {
        container_id: sandbox_id(pod, attempt),
        netns_path: ns.path(),
        ifname: "eth0".into(),
        pod_namespace: ns_name,
        pod_name: pod.metadata.name.clone().unwrap_or_default(),
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    match cfg.network.add(&sb) {
        Ok(result) => {
            let Some(ip) = cni::result_ipv4(&result) else {
                let _ = cfg.network.del(&sb, Some(&result));
                cleanup(&ns);
                return Err(format!("CNI result has no IPv4 address: {result}"));
            };
            // Pod hostname-to-IP entry, as the kubelet writes /etc/hosts.
            let _ = fs::write(
                etc.join("hosts"),
                format!(
                    "{hosts}{ip}\t{}\n",
                    pod.metadata.name.as_deref().unwrap_or_default()
                ),
            );
            Ok(SandboxRun {
                netns: ns,
                host_network: false,
                cni: Some((sb, result)),
                ip,
            })
        }
        Err(e) => {
            cleanup(&ns);
            Err(e.to_string())
        }
    }
}

fn etc_dir(ns: &Netns) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns.name())
}

fn sandbox_id(pod: &Pod, attempt: u32) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!(
        "{}/{attempt}",
        pod.metadata.uid.as_deref().unwrap_or_default()
    ));
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a pod's volumes live on the node.
fn volume_dir(cfg: &KubeletConfig, pod: &Pod) -> PathBuf {
    cfg.state_dir.join("volumes").join(format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    ))
}

fn teardown(cfg: &KubeletConfig, pod: &Pod, sb: SandboxRun) {
    let _ = fs::remove_dir_all(volume_dir(cfg, pod));
    if let Some((sandbox, result)) = &sb.cni {
        if let Err(e) = cfg.network.del(sandbox, Some(result)) {
            tracing::warn!(pod = %pod_key(pod), error = %e, "CNI DEL failed");
        }
    }
    if !sb.host_network {
        if let Err(e) = sb.netns.delete() {
            tracing::warn!(pod = %pod_key(pod), error = %e, "removing the pod namespace");
        }
        let _ = fs::remove_dir_all(etc_dir(&sb.netns));
    }
    let _ = fs::remove_file(record_path(
        &cfg.state_dir,
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
    ));
}

fn spawn(
    cfg: &KubeletConfig,
    pod: &Pod,
    netns: &Netns,
    container: &str,
    launch: &Launch,
) -> std::io::Result<tokio::process::Child> {
    let dir = cfg.state_dir.join("logs").join(format!(
        "{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    ));
    fs::create_dir_all(&dir)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{container}.log")))?;
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", netns.name()])
        .arg(&launch.program)
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
}

async fn stop_all(runs: &mut [ContainerRun], grace: Duration) {
    for run in runs.iter() {
        if run.pid != 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(run.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for run in runs.iter_mut() {
        if let Some(child) = run.child.as_mut() {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(run.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait().await;
            }
        }
        run.child = None;
        run.pid = 0;
    }
}

/// What a readiness check connects to, inside the pod: the probe's port
/// (and path for HTTP), else the container's first declared TCP port.
#[derive(Debug, Clone)]
struct ProbeTarget {
    port: u16,
    http_path: Option<String>,
}

fn readiness_target(c: &Container) -> Option<ProbeTarget> {
    let resolve = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    if let Some(Probe {
        http_get,
        tcp_socket,
        ..
    }) = &c.readiness_probe
    {
        if let Some(h) = http_get {
            return resolve(&h.port).map(|port| ProbeTarget {
                port,
                http_path: Some(h.path.clone().unwrap_or_else(|| "/".into())),
            });
        }
        if let Some(t) = tcp_socket {
            return resolve(&t.port).map(|port| ProbeTarget {
                port,
                http_path: None,
            });
        }
    }
    c.ports
        .iter()
        .flatten()
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| u16::try_from(p.container_port).ok())
        .map(|port| ProbeTarget {
            port,
            http_path: None,
        })
}

/// Probes from inside the pod's namespace on loopback, so that a probe never
/// depends on the mesh's capture of the pod's own address.
fn probe_ok(netns: &Netns, t: &ProbeTarget) -> bool {
    use std::io::{Read, Write};
    let t = t.clone();
    netns
        .run_in(move || -> bool {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, t.port));
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                return false;
            };
            let Some(path) = &t.http_path else {
                return true;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: kube-probe/1.20\r\nConnection: close\r\n\r\n",
                t.port
            );
            if s.write_all(req.as_bytes()).is_err() {
                return false;
            }
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_err() {
                return false;
            }
            let code: u16 = std::str::from_utf8(&head[9..12])
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (200..400).contains(&code)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    #[test]
    fn readiness_target_prefers_probe_then_first_tcp_port() {
        let mut c = Container {
            name: "app".into(),
            ports: Some(vec![
                ContainerPort {
                    container_port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
                ContainerPort {
                    container_port: 9080,
                    name: Some("http".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(readiness_target(&c).map(|t| t.port), Some(9080));
        c.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("/health".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let t = readiness_target(&c).unwrap();
        assert_eq!((t.port, t.http_path.as_deref()), (9080, Some("/health")));
    }
}
