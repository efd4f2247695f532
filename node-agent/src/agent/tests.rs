//! Table tests of the agent's decisions on plain Kubernetes objects, and of
//! the paths that touch no network namespace (the ones that do are in
//! `node-agent/tests/agent.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{NamespaceSpec, PodIP, PodSpec, PodStatus};
use kube::api::ObjectMeta;

use super::*;

fn map(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    if pairs.is_empty() {
        return None;
    }
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: map(labels),
            ..Default::default()
        },
        spec: Some(NamespaceSpec::default()),
        ..Default::default()
    }
}

#[derive(Default, Clone)]
struct P<'a> {
    labels: &'a [(&'a str, &'a str)],
    annotations: &'a [(&'a str, &'a str)],
    host_network: bool,
    phase: Option<&'a str>,
    ip: Option<&'a str>,
}

fn pod(namespace: &str, name: &str, p: P<'_>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            labels: map(p.labels),
            annotations: map(p.annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            host_network: Some(p.host_network),
            service_account_name: Some("web".into()),
            node_name: Some("node-a".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: p.phase.map(str::to_string),
            pod_ip: p.ip.map(str::to_string),
            pod_ips: p.ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

const AMBIENT: &[(&str, &str)] = &[("istio.io/dataplane-mode", "ambient")];
const NONE: &[(&str, &str)] = &[("istio.io/dataplane-mode", "none")];

#[test]
fn decision_table() {
    use Enrollment::*;
    let excluded = vec!["kube-system".to_string()];
    let cases: Vec<(&str, Namespace, Option<Pod>, Decision)> = vec![
        (
            "namespace label",
            ns("shop", AMBIENT),
            Some(pod("shop", "a", P::default())),
            Decision::Capture(NamespaceLabel),
        ),
        (
            "pod label in a plain namespace",
            ns("shop", &[]),
            Some(pod(
                "shop",
                "a",
                P {
                    labels: AMBIENT,
                    ..Default::default()
                },
            )),
            Decision::Capture(PodLabel),
        ),
        (
            "pod opts out",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    labels: NONE,
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::Labels(OptedOut)),
        ),
        (
            "no labels",
            ns("shop", &[]),
            Some(pod("shop", "a", P::default())),
            Decision::Skip(Skip::Labels(NotEnrolled)),
        ),
        (
            "sidecar by label",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    labels: &[("security.istio.io/tlsMode", "istio")],
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::Sidecar),
        ),
        (
            "sidecar by annotation",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    annotations: &[("sidecar.istio.io/status", "{}")],
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::Sidecar),
        ),
        (
            "host network",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    host_network: true,
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::HostNetwork),
        ),
        (
            "terminated",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    phase: Some("Succeeded"),
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::Terminal),
        ),
        (
            "running",
            ns("shop", AMBIENT),
            Some(pod(
                "shop",
                "a",
                P {
                    phase: Some("Running"),
                    ..Default::default()
                },
            )),
            Decision::Capture(NamespaceLabel),
        ),
        (
            "excluded namespace even when labelled",
            ns("kube-system", AMBIENT),
            Some(pod(
                "kube-system",
                "a",
                P {
                    labels: AMBIENT,
                    ..Default::default()
                },
            )),
            Decision::Skip(Skip::ExcludedNamespace),
        ),
        (
            "pod not found yet: the namespace decides",
            ns("shop", AMBIENT),
            None,
            Decision::Capture(NamespaceLabel),
        ),
    ];
    for (what, n, p, want) in cases {
        assert_eq!(decide(p.as_ref(), Some(&n), &excluded), want, "{what}");
    }
    // A namespace that is not found has no labels.
    let p = pod("gone", "a", P::default());
    assert_eq!(
        decide(Some(&p), None, &excluded),
        Decision::Skip(Skip::Labels(NotEnrolled))
    );
}

#[test]
fn annotation_table() {
    let enabled: &[(&str, &str)] = &[(REDIRECTION_ANNOTATION, "enabled")];
    let disabled: &[(&str, &str)] = &[(REDIRECTION_ANNOTATION, "disabled")];
    type Pairs<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Pairs<'_>, bool, Option<&str>); 6] = [
        (&[], true, Some("enabled")),
        (disabled, true, Some("enabled")),
        (enabled, true, None),
        (enabled, false, Some("disabled")),
        (disabled, false, None),
        (&[], false, None),
    ];
    for (annotations, captured, want) in cases {
        let p = pod(
            "shop",
            "a",
            P {
                annotations,
                ..Default::default()
            },
        );
        assert_eq!(
            annotation_update(&p, captured),
            want,
            "{annotations:?} {captured}"
        );
    }
}

#[test]
fn ips_and_uids() {
    let p = pod(
        "shop",
        "a",
        P {
            ip: Some("10.1.0.5"),
            ..Default::default()
        },
    );
    assert_eq!(pod_ips(&p), ["10.1.0.5".parse::<IpAddr>().unwrap()]);
    assert!(pod_ips(&pod("shop", "a", P::default())).is_empty());
    assert_eq!(workload_uid("shop", "a"), "Kubernetes//Pod/shop/a");
}

/// An API server of fixed objects that records the annotations written.
#[derive(Default)]
struct FakeCluster {
    namespaces: Mutex<BTreeMap<String, Namespace>>,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    annotations: Mutex<Vec<(String, String, &'static str)>>,
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
            .push((namespace.to_string(), name.to_string(), value));
        Box::pin(async { Ok(()) })
    }
}

fn agent_with(cluster: Arc<FakeCluster>, dir: &Path, snapshot: Snapshot) -> Arc<Agent> {
    let z = Arc::new(ZtunnelServer::bind(&dir.join("z.sock")).unwrap());
    Agent::new(
        Settings {
            node_name: "node-a".into(),
            exclude_namespaces: vec!["kube-system".into()],
            netns_dirs: vec![dir.join("netns")],
            rule_options: RuleOptions::default(),
        },
        z,
        cluster,
        Metrics::new(),
        snapshot,
        Vec::new(),
    )
}

fn event(namespace: &str, name: &str, container: &str, netns: &str) -> PodEvent {
    PodEvent {
        container_id: container.into(),
        netns: netns.into(),
        ifname: "eth0".into(),
        pod_name: name.into(),
        pod_namespace: namespace.into(),
        pod_uid: String::new(),
        pod_ips: vec!["10.1.0.5".parse().unwrap()],
    }
}

#[tokio::test]
async fn a_pod_outside_the_mesh_is_remembered_not_captured() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(FakeCluster::default());
    cluster
        .namespaces
        .lock()
        .unwrap()
        .insert("shop".into(), ns("shop", &[]));
    let agent = agent_with(cluster.clone(), dir.path(), Snapshot::default());
    let reply = agent
        .cni_add(&event("shop", "a", "c1", "/var/run/netns/x"))
        .await
        .unwrap();
    assert!(!reply.captured);
    let records = agent.records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].netns, Some(PathBuf::from("/var/run/netns/x")));
    assert!(!records[0].captured);
    // Nothing to check for a pod outside the mesh.
    agent
        .cni_check(&event("shop", "a", "c1", "/var/run/netns/x"))
        .await
        .unwrap();
    // A DEL of another container keeps the record; the current one's drops it.
    agent.cni_del(&event("shop", "a", "c0", "")).await.unwrap();
    assert_eq!(agent.records().await.len(), 1);
    agent.cni_del(&event("shop", "a", "c1", "")).await.unwrap();
    assert!(agent.records().await.is_empty());
    assert!(cluster.annotations.lock().unwrap().is_empty());
    let text = agent.metrics().encode();
    assert!(text.contains("istio_cni_ambient_enrolled_pods 0"), "{text}");
    assert!(
        text.contains("istio_cni_plugin_events_total{event=\"add\",result=\"not_captured\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_and_unknown_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(FakeCluster::default());
    cluster
        .namespaces
        .lock()
        .unwrap()
        .insert("shop".into(), ns("shop", AMBIENT));
    let agent = agent_with(cluster, dir.path(), Snapshot::default());
    let e = agent
        .cni_add(&event("shop", "a", "c1", ""))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
    // Enrolled, but the namespace path does not exist: fails closed.
    let e = agent
        .cni_add(&event("shop", "a", "c1", "/nonexistent/netns"))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Rules { .. }), "{e}");
    assert_eq!(
        agent.records().await.iter().filter(|r| r.captured).count(),
        0
    );
}

#[tokio::test]
async fn an_enrolled_pod_whose_namespace_cannot_be_found_waits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(FakeCluster::default());
    let agent = agent_with(
        cluster.clone(),
        dir.path(),
        Snapshot {
            pods: vec![pod(
                "shop",
                "a",
                P {
                    ip: Some("10.1.0.5"),
                    phase: Some("Running"),
                    ..Default::default()
                },
            )],
            namespaces: vec![ns("shop", &[])],
        },
    );
    agent.reconcile_all().await;
    assert!(agent.records().await.iter().all(|r| !r.captured));
    // Labelled: no namespace holds the IP (the scan directory is empty).
    agent.namespace_changed(ns("shop", AMBIENT)).await;
    let records = agent.records().await;
    assert_eq!(records.len(), 1);
    assert!(!records[0].captured && records[0].netns.is_none());
    // CHECK reports the enrolled pod that is not captured.
    let e = agent
        .cni_check(&event("shop", "a", "c1", "/x"))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::NotCaptured { .. }), "{e}");
    agent.pod_deleted("shop", "a").await;
    assert!(agent.records().await.is_empty());
}
