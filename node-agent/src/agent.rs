//! The agent's decisions and its record of the node's pods.
//!
//! Three inputs meet here: the CNI plugin's events (a pod's network was set
//! up or torn down; see [`crate::server`]), the API server's view of the
//! node's pods and of every namespace (see [`crate::watch`]), and the
//! periodic check. For each pod the agent decides whether it is in the mesh
//! ([`decide`]) and, when that changes, captures it (in-pod rules, then
//! ztunnel over ZDS) or releases it, and records the outcome on the pod as
//! Istio's `ambient.istio.io/redirection` annotation.
//!
//! Every change of a pod's capture happens under one lock, so a CNI ADD and
//! a label change of the same pod never interleave.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cni_plugin::enroll::{self as labels, Enrollment};
use cni_plugin::protocol::{AddReply, PodEvent};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use mesh_core::proto::zds::WorkloadInfo;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::repair::RepairLabels;
use crate::rules::{self, RuleOptions, RuleStatus};
use crate::ztunnel::{ZtunnelError, ZtunnelServer};

/// Istio's annotation saying whether a pod's traffic is redirected.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
pub const REDIRECTION_DISABLED: &str = "disabled";
/// Label of pods with an Istio sidecar (they do their own mTLS).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Annotation of sidecar-injected pods.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// How long ztunnel may take to acknowledge one pod.
pub const ZTUNNEL_ACK_TIMEOUT: Duration = Duration::from_secs(20);

/// A boxed future, for the object-safe [`Cluster`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A pod's namespace and the pod, as the API server has them (`None`: not
/// found).
pub type Lookup = (Option<Namespace>, Option<Pod>);

/// Errors of the API server.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ClusterError {
    pub what: String,
    pub reason: String,
}

/// The API server, as far as the agent needs it beyond its watches.
pub trait Cluster: Send + Sync + 'static {
    /// The namespace and the pod (`None` when not found).
    fn lookup<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Lookup, ClusterError>>;
    /// Sets [`REDIRECTION_ANNOTATION`] on the pod.
    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: &'static str,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
}

/// Errors that fail a plugin event; the text reaches the runtime.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("cannot tell whether pod {pod} is in the mesh")]
    Lookup {
        pod: String,
        #[source]
        source: ClusterError,
    },
    #[error("installing the capture rules of pod {pod}")]
    Rules {
        pod: String,
        #[source]
        source: rules::RulesError,
    },
    #[error("handing pod {pod} to ztunnel")]
    Ztunnel {
        pod: String,
        #[source]
        source: ZtunnelError,
    },
    #[error("ztunnel did not acknowledge pod {pod} within {after:?}")]
    ZtunnelTimeout { pod: String, after: Duration },
    #[error("pod {pod} is in the mesh but its capture rules are incomplete: missing {missing}")]
    RulesMissing { pod: String, missing: String },
    #[error("pod {pod} is in the mesh ({reason}) but is not captured")]
    NotCaptured { pod: String, reason: String },
    #[error("a task of the agent failed: {0}")]
    Task(String),
}

impl AgentError {
    /// Whether retrying later may succeed (ztunnel or the API server was
    /// not there) rather than the request being wrong.
    pub fn unavailable(&self) -> bool {
        matches!(
            self,
            AgentError::Lookup { .. }
                | AgentError::ZtunnelTimeout { .. }
                | AgentError::Ztunnel {
                    source: ZtunnelError::NotConnected { .. } | ZtunnelError::Zds { .. },
                    ..
                }
        )
    }
}

/// `e` and all its causes, `: `-separated: the one line a log or the
/// runtime's error message shows.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The labels say so (not enrolled, or opted out).
    Labels(Enrollment),
    /// An Istio sidecar does the pod's mTLS.
    Sidecar,
    /// The pod shares the node's network namespace.
    HostNetwork,
    /// The namespace is in `EXCLUDE_NAMESPACES`.
    ExcludedNamespace,
    /// Succeeded or Failed: its processes are gone.
    Terminal,
}

/// Whether a pod is captured, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Capture(Enrollment),
    Skip(Skip),
}

impl Decision {
    pub fn captured(self) -> bool {
        matches!(self, Decision::Capture(_))
    }

    fn reason(self, namespace: &str, name: &str) -> String {
        let pod = cni_plugin::args::PodRef {
            name: name.to_string(),
            namespace: namespace.to_string(),
            uid: String::new(),
        };
        match self {
            Decision::Capture(e) | Decision::Skip(Skip::Labels(e)) => e.reason(&pod),
            Decision::Skip(Skip::Sidecar) => "the pod has an Istio sidecar".into(),
            Decision::Skip(Skip::HostNetwork) => "the pod uses the host network".into(),
            Decision::Skip(Skip::ExcludedNamespace) => {
                format!("namespace {namespace} is excluded")
            }
            Decision::Skip(Skip::Terminal) => "the pod has terminated".into(),
        }
    }
}

/// The enrollment decision from the API server's objects, the same labels
/// the plugin and istiod-lite read. `pod` may be unknown (a static pod
/// whose mirror object does not exist yet): the namespace decides then.
pub fn decide(pod: Option<&Pod>, namespace: Option<&Namespace>, excluded: &[String]) -> Decision {
    let ns_name = pod
        .and_then(|p| p.metadata.namespace.as_deref())
        .or_else(|| namespace.and_then(|n| n.metadata.name.as_deref()))
        .unwrap_or_default();
    if excluded.iter().any(|e| e == ns_name) {
        return Decision::Skip(Skip::ExcludedNamespace);
    }
    if let Some(pod) = pod {
        let meta = &pod.metadata;
        let sidecar = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(TLS_MODE_LABEL))
            .is_some_and(|m| m == "istio")
            || meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION));
        if sidecar {
            return Decision::Skip(Skip::Sidecar);
        }
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            return Decision::Skip(Skip::HostNetwork);
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Decision::Skip(Skip::Terminal);
        }
    }
    let e = labels::decide(
        namespace.and_then(|n| n.metadata.labels.as_ref()),
        pod.and_then(|p| p.metadata.labels.as_ref()),
    );
    if e.enrolled() {
        Decision::Capture(e)
    } else {
        Decision::Skip(Skip::Labels(e))
    }
}

/// The annotation to write on a pod, if it does not say the right thing
/// already: `enabled` while captured; `disabled` once a pod that said
/// `enabled` is no longer captured. Pods never captured are not annotated.
pub fn annotation_update(pod: &Pod, captured: bool) -> Option<&'static str> {
    let current = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
        .map(String::as_str);
    match (captured, current) {
        (true, Some(REDIRECTION_ENABLED)) => None,
        (true, _) => Some(REDIRECTION_ENABLED),
        (false, Some(REDIRECTION_ENABLED)) => Some(REDIRECTION_DISABLED),
        (false, _) => None,
    }
}

/// The pod's IPs from its status.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut raw: Vec<&str> = status
        .pod_ips
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| p.ip.as_str())
        .collect();
    if raw.is_empty() {
        raw.extend(status.pod_ip.as_deref());
    }
    let mut ips: Vec<IpAddr> = raw.iter().filter_map(|r| r.parse().ok()).collect();
    ips.dedup();
    ips
}

/// The ZDS uid of a pod: the Workload API's `Kubernetes//Pod/NS/NAME`.
pub fn workload_uid(namespace: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{name}")
}

fn service_account(pod: Option<&Pod>) -> String {
    pod.and_then(|p| p.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

fn key_of(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// The API server's objects, as last listed or watched.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
}

/// What the agent knows of one pod of its node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    /// The Kubernetes uid (a pod recreated under the same name differs).
    pub k8s_uid: String,
    /// The pod container (`CNI_CONTAINERID`) the CNI plugin told us of.
    pub container_id: Option<String>,
    /// Its network namespace, from the plugin or found by scanning.
    pub netns: Option<PathBuf>,
    pub ips: Vec<IpAddr>,
    /// Rules installed and pod handed to ztunnel (or recorded for its next
    /// connection).
    pub captured: bool,
    pub service_account: String,
}

impl PodRecord {
    fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Default)]
struct State {
    records: BTreeMap<(String, String), PodRecord>,
    pods: BTreeMap<(String, String), Pod>,
    namespaces: BTreeMap<String, Namespace>,
}

impl State {
    fn captured_count(&self) -> i64 {
        self.records.values().filter(|r| r.captured).count() as i64
    }
}

/// The knobs of the agent that are not its connections.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub node_name: String,
    pub exclude_namespaces: Vec<String>,
    pub netns_dirs: Vec<PathBuf>,
    pub rule_options: RuleOptions,
}

/// The node agent's state and operations.
pub struct Agent {
    settings: Settings,
    ztunnel: Arc<ZtunnelServer>,
    cluster: Arc<dyn Cluster>,
    metrics: Metrics,
    state: tokio::sync::Mutex<State>,
}

/// Runs blocking rule work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))
}

/// The node's network namespaces with their addresses.
type Scanned = Vec<(PathBuf, std::collections::BTreeSet<IpAddr>)>;

async fn scan_dirs(dirs: &[PathBuf]) -> Scanned {
    let dirs = dirs.to_vec();
    blocking(move || crate::sys::scan(&dirs))
        .await
        .unwrap_or_default()
}

/// Restores the capture of the node's pods after the agent (re)started,
/// before ztunnel is let in: every pod the labels enroll, or that an
/// earlier run annotated `enabled`, is looked up by IP among the node's
/// network namespaces; enrolled ones get their rules (re)installed, the
/// others lose them. Returns the records for [`Agent::new`].
pub async fn restore(settings: &Settings, snapshot: &Snapshot) -> Vec<PodRecord> {
    let namespaces: BTreeMap<&str, &Namespace> = snapshot
        .namespaces
        .iter()
        .filter_map(|n| n.metadata.name.as_deref().map(|name| (name, n)))
        .collect();
    let candidates: Vec<(&Pod, Decision)> = snapshot
        .pods
        .iter()
        .map(|p| {
            let ns = p
                .metadata
                .namespace
                .as_deref()
                .and_then(|n| namespaces.get(n).copied());
            (p, decide(Some(p), ns, &settings.exclude_namespaces))
        })
        .filter(|(p, d)| d.captured() || annotation_update(p, false).is_some())
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let scanned = scan_dirs(&settings.netns_dirs).await;
    let mut out = Vec::new();
    for (pod, decision) in candidates {
        let (namespace, name) = key_of(pod);
        let span = tracing::info_span!("restore", pod = %format!("{namespace}/{name}"));
        let ips = pod_ips(pod);
        let Some(netns) = crate::sys::find_by_ips(&scanned, &ips).map(Path::to_path_buf) else {
            if decision.captured() {
                span.in_scope(|| tracing::warn!(ips = ?ips, "enrolled pod's network namespace not found; waiting for its CNI ADD"));
            }
            continue;
        };
        let mut record = PodRecord {
            namespace,
            name,
            k8s_uid: pod.metadata.uid.clone().unwrap_or_default(),
            container_id: None,
            netns: Some(netns.clone()),
            ips,
            captured: false,
            service_account: service_account(Some(pod)),
        };
        let options = settings.rule_options.clone();
        if decision.captured() {
            let r = blocking(move || rules::install_with(&netns, &options)).await;
            match r {
                Ok(Ok(())) => {
                    record.captured = true;
                    span.in_scope(|| tracing::info!(netns = %record.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "capture restored"));
                }
                Ok(Err(e)) => span.in_scope(
                    || tracing::error!(error = %chain(&e), "cannot restore the capture rules"),
                ),
                Err(e) => span.in_scope(
                    || tracing::error!(error = %chain(&e), "cannot restore the capture rules"),
                ),
            }
        } else {
            match blocking(move || rules::remove(&netns)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => span.in_scope(|| tracing::warn!(error = %chain(&e), "cannot remove the capture rules of a pod no longer enrolled")),
                Err(e) => span.in_scope(|| tracing::warn!(error = %chain(&e), "cannot remove the capture rules of a pod no longer enrolled")),
            }
        }
        out.push(record);
    }
    out
}

impl Agent {
    /// The agent with the objects of the first complete list and the pods
    /// [`restore`] captured, which are recorded for ztunnel's first snapshot.
    pub fn new(
        settings: Settings,
        ztunnel: Arc<ZtunnelServer>,
        cluster: Arc<dyn Cluster>,
        metrics: Metrics,
        snapshot: Snapshot,
        restored: Vec<PodRecord>,
    ) -> Arc<Self> {
        let mut state = State::default();
        for p in snapshot.pods {
            state.pods.insert(key_of(&p), p);
        }
        for n in snapshot.namespaces {
            if let Some(name) = n.metadata.name.clone() {
                state.namespaces.insert(name, n);
            }
        }
        for r in restored {
            if let Some(netns) = r.netns.as_ref().filter(|_| r.captured) {
                ztunnel.record_pod(
                    &workload_uid(&r.namespace, &r.name),
                    WorkloadInfo {
                        name: r.name.clone(),
                        namespace: r.namespace.clone(),
                        service_account: r.service_account.clone(),
                    },
                    netns,
                );
            }
            state
                .records
                .insert((r.namespace.clone(), r.name.clone()), r);
        }
        metrics.enrolled.set(state.captured_count());
        Arc::new(Agent {
            settings,
            ztunnel,
            cluster,
            metrics,
            state: tokio::sync::Mutex::new(state),
        })
    }

    pub fn ztunnel(&self) -> &Arc<ZtunnelServer> {
        &self.ztunnel
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The records of every pod the agent knows, ordered by namespace/name.
    pub async fn records(&self) -> Vec<PodRecord> {
        self.state.lock().await.records.values().cloned().collect()
    }

    /// Brings every pod annotation in line with the capture (after a start).
    pub async fn sync_annotations(self: &Arc<Self>) {
        let state = self.state.lock().await;
        for (key, pod) in &state.pods {
            let captured = state.records.get(key).is_some_and(|r| r.captured);
            self.annotate(pod, captured);
        }
    }

    fn annotate(self: &Arc<Self>, pod: &Pod, captured: bool) {
        let Some(value) = annotation_update(pod, captured) else {
            return;
        };
        let (namespace, name) = key_of(pod);
        let cluster = self.cluster.clone();
        // The annotation reports the capture; nothing waits for it.
        tokio::spawn(async move {
            match cluster.set_redirection(&namespace, &name, value).await {
                Ok(()) => tracing::debug!(pod = %format!("{namespace}/{name}"), value, "annotated"),
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot annotate the pod")
                }
            }
        });
    }

    /// Installs the rules in `record`'s namespace and hands it to ztunnel.
    /// `strict` (a CNI ADD, the pod not started yet): ztunnel must have
    /// acknowledged, otherwise everything is undone and it is an error. Not
    /// strict (a running pod): a pod recorded while no ztunnel is connected
    /// counts as captured, since the next connection's snapshot carries it.
    async fn capture(&self, record: &mut PodRecord, strict: bool) -> Result<(), AgentError> {
        let pod = record.display();
        let Some(netns) = record.netns.clone() else {
            return Err(AgentError::BadRequest(format!(
                "pod {pod} has no known network namespace"
            )));
        };
        let options = self.settings.rule_options.clone();
        let ns = netns.clone();
        blocking(move || rules::install_with(&ns, &options))
            .await?
            .map_err(|source| AgentError::Rules {
                pod: pod.clone(),
                source,
            })?;
        let uid = workload_uid(&record.namespace, &record.name);
        let info = WorkloadInfo {
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            service_account: record.service_account.clone(),
        };
        let added = tokio::time::timeout(
            ZTUNNEL_ACK_TIMEOUT,
            self.ztunnel.add_pod(&uid, info, &netns),
        )
        .await;
        let failure = match added {
            Ok(Ok(())) => None,
            Ok(Err(ZtunnelError::NotConnected { .. })) if !strict => {
                tracing::warn!(
                    pod,
                    "no ztunnel connected; the pod is handed over when it connects"
                );
                None
            }
            Ok(Err(source)) => Some(AgentError::Ztunnel {
                pod: pod.clone(),
                source,
            }),
            Err(_) => {
                self.ztunnel.disconnect().await;
                Some(AgentError::ZtunnelTimeout {
                    pod: pod.clone(),
                    after: ZTUNNEL_ACK_TIMEOUT,
                })
            }
        };
        if let Some(e) = failure {
            // Fail closed for a new pod (the runtime retries the ADD); a
            // running pod keeps working uncaptured and is retried later.
            self.ztunnel_remove(&pod, &uid).await;
            let ns = netns.clone();
            if let Ok(Err(re)) = blocking(move || rules::remove(&ns)).await {
                tracing::warn!(pod, error = %chain(&re), "cannot undo the capture rules");
            }
            record.captured = false;
            return Err(e);
        }
        record.captured = true;
        tracing::info!(pod, netns = %netns.display(), "pod captured");
        Ok(())
    }

    /// Tells ztunnel a pod is gone, within [`ZTUNNEL_ACK_TIMEOUT`]. The
    /// pod is forgotten whatever ztunnel answers: a later snapshot does not
    /// carry it, which removes it from ztunnel.
    async fn ztunnel_remove(&self, pod: &str, uid: &str) {
        match tokio::time::timeout(ZTUNNEL_ACK_TIMEOUT, self.ztunnel.remove_pod(uid)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(pod, error = %chain(&e), "ztunnel did not confirm the removal")
            }
            Err(_) => {
                tracing::warn!(pod, "ztunnel did not answer the removal");
                self.ztunnel.disconnect().await;
            }
        }
    }

    /// Takes a pod out of ztunnel and (with `remove_rules`, when its
    /// namespace still exists) removes its rules.
    async fn release(&self, record: &mut PodRecord, remove_rules: bool) {
        let pod = record.display();
        let uid = workload_uid(&record.namespace, &record.name);
        self.ztunnel_remove(&pod, &uid).await;
        if let (true, Some(netns)) = (remove_rules, record.netns.clone()) {
            match blocking(move || rules::remove(&netns)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(pod, error = %chain(&e), "cannot remove the capture rules")
                }
                Err(e) => {
                    tracing::warn!(pod, error = %chain(&e), "cannot remove the capture rules")
                }
            }
        }
        record.captured = false;
        tracing::info!(pod, "pod released");
    }

    fn update_gauge(&self, state: &State) {
        self.metrics.enrolled.set(state.captured_count());
    }

    /// `POST /cmdadd`: decide from the API server and capture when enrolled.
    pub async fn cni_add(self: &Arc<Self>, ev: &PodEvent) -> Result<AddReply, AgentError> {
        let span =
            tracing::info_span!("cmdadd", pod = %format!("{}/{}", ev.pod_namespace, ev.pod_name));
        let r = self.cni_add_inner(ev).instrument(span).await;
        let result = match &r {
            Ok(AddReply { captured: true }) => "captured",
            Ok(_) => "not_captured",
            Err(_) => "error",
        };
        self.metrics.count_event("add", result);
        r
    }

    async fn cni_add_inner(self: &Arc<Self>, ev: &PodEvent) -> Result<AddReply, AgentError> {
        if ev.netns.is_empty() || ev.pod_name.is_empty() || ev.pod_namespace.is_empty() {
            return Err(AgentError::BadRequest(
                "netns, podName and podNamespace are required".into(),
            ));
        }
        let key = (ev.pod_namespace.clone(), ev.pod_name.clone());
        let pod_name = format!("{}/{}", key.0, key.1);
        let (namespace, pod) = match self.cluster.lookup(&key.0, &key.1).await {
            Ok(found) => found,
            Err(source) => {
                // The watch's copy serves while the API server does not
                // answer, but only if it knows the pod: without it an
                // opt-out label could be missed.
                let state = self.state.lock().await;
                match state.pods.get(&key) {
                    Some(p) => {
                        tracing::warn!(error = %chain(&source), "API server lookup failed; deciding from the watched copy");
                        (state.namespaces.get(&key.0).cloned(), Some(p.clone()))
                    }
                    None => {
                        return Err(AgentError::Lookup {
                            pod: pod_name,
                            source,
                        })
                    }
                }
            }
        };
        let decision = decide(
            pod.as_ref(),
            namespace.as_ref(),
            &self.settings.exclude_namespaces,
        );
        let mut state = self.state.lock().await;
        // Later reconciles must know what this decision was made from; the
        // watches' copies, when there are some, are kept (they are applied
        // in the API server's order, this lookup is not).
        if let Some(p) = &pod {
            state.pods.entry(key.clone()).or_insert_with(|| p.clone());
        }
        if let Some(n) = &namespace {
            state
                .namespaces
                .entry(key.0.clone())
                .or_insert_with(|| n.clone());
        }
        let mut record = state.records.remove(&key).unwrap_or_default();
        let k8s_uid = pod
            .as_ref()
            .and_then(|p| p.metadata.uid.clone())
            .unwrap_or_else(|| ev.pod_uid.clone());
        record.namespace = key.0.clone();
        record.name = key.1.clone();
        record.k8s_uid = k8s_uid;
        record.container_id = Some(ev.container_id.clone());
        record.netns = Some(PathBuf::from(&ev.netns));
        if !ev.pod_ips.is_empty() {
            record.ips = ev.pod_ips.clone();
        }
        record.service_account = service_account(pod.as_ref());
        let result = if decision.captured() {
            tracing::info!(reason = %decision.reason(&key.0, &key.1), "pod is in the mesh; capturing");
            self.capture(&mut record, true)
                .await
                .map(|()| AddReply { captured: true })
        } else {
            if record.captured {
                // A new pod container of a pod that has left the mesh.
                self.release(&mut record, true).await;
            }
            tracing::info!(reason = %decision.reason(&key.0, &key.1), "pod is not in the mesh");
            Ok(AddReply { captured: false })
        };
        state.records.insert(key, record);
        self.update_gauge(&state);
        drop(state);
        if let (Ok(reply), Some(p)) = (&result, &pod) {
            self.annotate(p, reply.captured);
        }
        result
    }

    /// `POST /cmdcheck`: an enrolled pod must have its rules.
    pub async fn cni_check(&self, ev: &PodEvent) -> Result<(), AgentError> {
        let span =
            tracing::info_span!("cmdcheck", pod = %format!("{}/{}", ev.pod_namespace, ev.pod_name));
        let r = self.cni_check_inner(ev).instrument(span).await;
        self.metrics
            .count_event("check", if r.is_ok() { "ok" } else { "error" });
        r
    }

    async fn cni_check_inner(&self, ev: &PodEvent) -> Result<(), AgentError> {
        let key = (ev.pod_namespace.clone(), ev.pod_name.clone());
        let pod = format!("{}/{}", key.0, key.1);
        let state = self.state.lock().await;
        let record = state.records.get(&key).cloned();
        let decision = decide(
            state.pods.get(&key),
            state.namespaces.get(&key.0),
            &self.settings.exclude_namespaces,
        );
        drop(state);
        match record {
            Some(PodRecord {
                captured: true,
                netns: Some(netns),
                ..
            }) => {
                let options = self.settings.rule_options.clone();
                let status = blocking(move || rules::check_with(&netns, &options))
                    .await?
                    .map_err(|source| AgentError::Rules {
                        pod: pod.clone(),
                        source,
                    })?;
                match status {
                    RuleStatus::Complete => Ok(()),
                    RuleStatus::Incomplete(missing) => Err(AgentError::RulesMissing {
                        pod,
                        missing: missing.join(", "),
                    }),
                }
            }
            _ if decision.captured() => Err(AgentError::NotCaptured {
                reason: decision.reason(&key.0, &key.1),
                pod,
            }),
            _ => Ok(()),
        }
    }

    /// `POST /cmddel`: the pod's network is gone; release and forget the pod.
    /// A DEL of an older pod container than the one recorded changes nothing.
    pub async fn cni_del(&self, ev: &PodEvent) -> Result<(), AgentError> {
        let span =
            tracing::info_span!("cmddel", pod = %format!("{}/{}", ev.pod_namespace, ev.pod_name));
        async {
            let key = (ev.pod_namespace.clone(), ev.pod_name.clone());
            let mut state = self.state.lock().await;
            let Some(mut record) = state.records.remove(&key) else {
                return;
            };
            let stale = matches!(&record.container_id, Some(c) if !ev.container_id.is_empty() && *c != ev.container_id);
            if stale {
                tracing::info!(container = %ev.container_id, "DEL of an earlier pod container; keeping the current one");
                state.records.insert(key, record);
                return;
            }
            if record.captured {
                // The runtime deletes the namespace next: no rules to remove.
                self.release(&mut record, false).await;
            }
            self.update_gauge(&state);
        }
        .instrument(span)
        .await;
        self.metrics.count_event("del", "ok");
        Ok(())
    }

    /// A pod of this node was added or changed in the API server.
    pub async fn pod_changed(self: &Arc<Self>, pod: Pod) {
        let key = key_of(&pod);
        let mut state = self.state.lock().await;
        state.pods.insert(key.clone(), pod);
        self.reconcile(&mut state, &key, &mut None).await;
    }

    /// A pod of this node was deleted in the API server.
    pub async fn pod_deleted(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let span = tracing::info_span!("reconcile", pod = %format!("{namespace}/{name}"));
        async {
            let mut state = self.state.lock().await;
            state.pods.remove(&key);
            if let Some(mut record) = state.records.remove(&key) {
                if record.captured {
                    self.release(&mut record, false).await;
                }
            }
            self.update_gauge(&state);
        }
        .instrument(span)
        .await;
    }

    /// A namespace was added or changed: its pods on this node may have
    /// entered or left the mesh.
    pub async fn namespace_changed(self: &Arc<Self>, namespace: Namespace) {
        let Some(name) = namespace.metadata.name.clone() else {
            return;
        };
        let mut state = self.state.lock().await;
        state.namespaces.insert(name.clone(), namespace);
        self.reconcile_namespace(&mut state, &name).await;
    }

    pub async fn namespace_deleted(self: &Arc<Self>, name: &str) {
        let mut state = self.state.lock().await;
        state.namespaces.remove(name);
        self.reconcile_namespace(&mut state, name).await;
    }

    async fn reconcile_namespace(self: &Arc<Self>, state: &mut State, name: &str) {
        let keys: Vec<(String, String)> = state
            .pods
            .keys()
            .filter(|(ns, _)| ns == name)
            .cloned()
            .collect();
        let mut scan = None;
        for key in keys {
            self.reconcile(state, &key, &mut scan).await;
        }
    }

    /// Reconciles every known pod: captures that could not be done earlier
    /// (namespace not found yet, ztunnel refused) are retried.
    pub async fn reconcile_all(self: &Arc<Self>) {
        let mut state = self.state.lock().await;
        let keys: Vec<(String, String)> = state.pods.keys().cloned().collect();
        let mut scan = None;
        for key in keys {
            self.reconcile(&mut state, &key, &mut scan).await;
        }
    }

    /// Brings one pod's capture in line with the decision about it.
    /// `scan` is the namespace scan of this round, made on first need.
    async fn reconcile(
        self: &Arc<Self>,
        state: &mut State,
        key: &(String, String),
        scan: &mut Option<Scanned>,
    ) {
        let Some(pod) = state.pods.get(key).cloned() else {
            return;
        };
        let span = tracing::info_span!("reconcile", pod = %format!("{}/{}", key.0, key.1));
        async {
            let decision = decide(
                Some(&pod),
                state.namespaces.get(&key.0),
                &self.settings.exclude_namespaces,
            );
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let mut record = state.records.remove(key).unwrap_or_else(|| PodRecord {
                namespace: key.0.clone(),
                name: key.1.clone(),
                k8s_uid: uid.clone(),
                ..Default::default()
            });
            if !record.k8s_uid.is_empty() && !uid.is_empty() && record.k8s_uid != uid {
                // Same name, new pod: what we knew was about the old one.
                if record.captured {
                    self.release(&mut record, false).await;
                }
                record = PodRecord {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    ..Default::default()
                };
            }
            record.k8s_uid = uid;
            record.service_account = service_account(Some(&pod));
            let ips = pod_ips(&pod);
            if !ips.is_empty() {
                record.ips = ips;
            }
            match (decision.captured(), record.captured) {
                (true, false) => {
                    if record.netns.is_none() && !record.ips.is_empty() {
                        if scan.is_none() {
                            *scan = Some(scan_dirs(&self.settings.netns_dirs).await);
                        }
                        record.netns = scan.as_deref().and_then(|s| {
                            crate::sys::find_by_ips(s, &record.ips).map(Path::to_path_buf)
                        });
                    }
                    if record.netns.is_some() {
                        tracing::info!(reason = %decision.reason(&key.0, &key.1), "pod entered the mesh; capturing");
                        if let Err(e) = self.capture(&mut record, false).await {
                            tracing::error!(error = %chain(&e), "cannot capture the running pod; retrying later");
                        }
                    } else if !record.ips.is_empty() {
                        tracing::warn!(ips = ?record.ips, "pod entered the mesh but its network namespace was not found; retrying later");
                    }
                }
                (false, true) => {
                    tracing::info!(reason = %decision.reason(&key.0, &key.1), "pod left the mesh; releasing");
                    self.release(&mut record, true).await;
                }
                _ => {}
            }
            self.annotate(&pod, record.captured);
            state.records.insert(key.clone(), record);
            self.update_gauge(state);
        }
        .instrument(span)
        .await;
    }

    /// Checks every captured pod's rules (repairing them) and that the
    /// connected ztunnel acknowledged it (handing it over again if not);
    /// retries pending captures first.
    pub async fn check_and_repair(self: &Arc<Self>) {
        self.reconcile_all().await;
        let pods = self.ztunnel.pods();
        let (options, metrics) = (
            self.settings.rule_options.clone(),
            self.metrics.repair.clone(),
        );
        let checked = blocking(move || {
            for p in &pods {
                crate::repair::check_and_repair(p, &options, &metrics);
            }
        })
        .await;
        if let Err(e) = checked {
            tracing::error!(error = %e, "rule check task failed");
        }
        if !self.ztunnel.connected() {
            if !self.ztunnel.pods().is_empty() {
                tracing::warn!(
                    pods = self.ztunnel.pods().len(),
                    "no ztunnel connected: enrolled pods have no listeners until it comes back"
                );
            }
            return;
        }
        let label = RepairLabels {
            r#type: "ztunnel".into(),
        };
        // Under the lock, so that no CNI event changes the pod meanwhile.
        let mut state = self.state.lock().await;
        for p in self.ztunnel.unacknowledged() {
            let pod = format!("{}/{}", p.info.namespace, p.info.name);
            tracing::warn!(
                pod,
                "ztunnel has not acknowledged the pod; handing it over again"
            );
            let added = tokio::time::timeout(
                ZTUNNEL_ACK_TIMEOUT,
                self.ztunnel.add_pod(&p.uid, p.info.clone(), &p.netns),
            )
            .await;
            match added {
                Ok(Ok(())) => {
                    self.metrics.repair.repaired.get_or_create(&label).inc();
                    tracing::info!(pod, "ztunnel acknowledged the pod");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(pod, error = %chain(&e), "ztunnel still does not take the pod")
                }
                Err(_) => {
                    tracing::error!(pod, "ztunnel did not answer about the pod");
                    self.ztunnel.disconnect().await;
                }
            }
            self.metrics.repair.failed.get_or_create(&label).inc();
            // A refused pod was forgotten by the ZDS server: the next
            // reconcile captures it again from scratch.
            let key = (p.info.namespace.clone(), p.info.name.clone());
            let known = self.ztunnel.pods().iter().any(|q| q.uid == p.uid);
            if let (false, Some(r)) = (known, state.records.get_mut(&key)) {
                r.captured = false;
            }
        }
        self.update_gauge(&state);
    }

    /// Runs [`Agent::check_and_repair`] every `interval` until `stop`.
    pub async fn maintain(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return,
            }
            self.check_and_repair()
                .instrument(tracing::info_span!("repair"))
                .await;
        }
    }
}

#[cfg(test)]
mod tests;
