//! `ambientctl precheck`: before enrolling workloads, is everything the
//! ambient data plane needs in place? The API server (istiod-lite and the
//! node agent watch it), the Istio and Gateway API CRDs (policies and
//! routes are stored as them), istiod-lite (xDS and the CA), a ztunnel and
//! a CNI agent on every node (capture and HBONE), and the kernel features
//! the redirection rules use. One line per check, like `istioctl
//! precheck`, a summary, and exit code 1 if anything failed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::Api;

use crate::kubeclient::{self, LocalMesh, Target};
use crate::zc::http;

/// The CRDs the mesh's configuration is stored as.
pub const REQUIRED_CRDS: &[&str] = &[
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "gateways.gateway.networking.k8s.io",
    "httproutes.gateway.networking.k8s.io",
];

#[derive(Debug, thiserror::Error)]
pub enum PrecheckError {
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[derive(Args)]
pub struct PrecheckArgs {
    /// Kubernetes configuration file (default: KUBECONFIG, else the local
    /// mesh when it runs, else ~/.kube/config or in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Namespace of istiod-lite, ztunnel and the CNI agent.
    #[arg(
        short = 'i',
        long = "istio-namespace",
        alias = "istioNamespace",
        default_value = "istio-system"
    )]
    istio_namespace: String,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        }
    }
    pub fn fail(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        }
    }
}

/// The printed report and the exit code: a line per check, then a summary.
pub fn report(checks: &[Check]) -> (String, i32) {
    let mut out = String::new();
    for c in checks {
        let mark = if c.ok { '✔' } else { '✘' };
        if c.detail.is_empty() {
            out.push_str(&format!("{mark} {}\n", c.name));
        } else {
            out.push_str(&format!("{mark} {}: {}\n", c.name, c.detail));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        out.push_str(&format!(
            "✔ No issues found: all {} checks passed.\n",
            checks.len()
        ));
        (out, 0)
    } else {
        out.push_str(&format!("✘ {failed} of {} checks failed.\n", checks.len()));
        (out, 1)
    }
}

/// Which of the required CRDs are missing from `present`.
pub fn missing_crds<'a>(present: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let present: std::collections::HashSet<&str> = present.into_iter().collect();
    REQUIRED_CRDS
        .iter()
        .copied()
        .filter(|c| !present.contains(c))
        .collect()
}

async fn api_checks(
    client: &kube::Client,
    istio_ns: &str,
    local: Option<&LocalMesh>,
    checks: &mut Vec<Check>,
) {
    match client.apiserver_version().await {
        Ok(v) => checks.push(Check::pass(
            "Kubernetes API server",
            format!("reachable, version {}", v.git_version),
        )),
        Err(e) => {
            checks.push(Check::fail(
                "Kubernetes API server",
                format!("unreachable: {e}"),
            ));
            return;
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.list_metadata(&ListParams::default()).await {
        Ok(list) => {
            let names: Vec<String> = list
                .items
                .into_iter()
                .filter_map(|c| c.metadata.name)
                .collect();
            let missing = missing_crds(names.iter().map(String::as_str));
            if missing.is_empty() {
                checks.push(Check::pass(
                    "CRDs",
                    format!(
                        "Istio and Gateway API CRDs present ({})",
                        REQUIRED_CRDS.len()
                    ),
                ));
            } else {
                checks.push(Check::fail(
                    "CRDs",
                    format!("missing {}", missing.join(", ")),
                ));
            }
        }
        Err(e) => checks.push(Check::fail("CRDs", format!("listing CRDs: {e}"))),
    }
    // In the local mesh istiod-lite, ztunnel and the agent are processes,
    // checked without the API server.
    if local.is_some() {
        return;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), istio_ns);
    let list = |label: &'static str| {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default().labels(label)).await }
    };
    match list("app=istiod").await {
        Ok(l) => {
            let ready = l.items.iter().filter(|p| kubeclient::pod_ready(p)).count();
            if ready > 0 {
                checks.push(Check::pass(
                    "istiod-lite",
                    format!("{ready}/{} pods ready in {istio_ns}", l.items.len()),
                ));
            } else {
                checks.push(Check::fail(
                    "istiod-lite",
                    format!(
                        "no ready pod with label app=istiod in {istio_ns} ({} found)",
                        l.items.len()
                    ),
                ));
            }
        }
        Err(e) => checks.push(Check::fail("istiod-lite", format!("listing pods: {e}"))),
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = match nodes.list_metadata(&ListParams::default()).await {
        Ok(l) => l
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect::<Vec<_>>(),
        Err(e) => {
            checks.push(Check::fail("nodes", format!("listing nodes: {e}")));
            return;
        }
    };
    for (what, label) in [
        ("ztunnel", "app=ztunnel"),
        ("CNI agent", "k8s-app=istio-cni-node"),
    ] {
        let pods = match list(label).await {
            Ok(l) => l.items,
            Err(e) => {
                checks.push(Check::fail(what, format!("listing pods ({label}): {e}")));
                continue;
            }
        };
        for node in &nodes {
            let on_node: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
                .collect();
            let name = format!("{what} on {node}");
            match on_node.iter().find(|p| kubeclient::pod_ready(p)) {
                Some(p) => checks.push(Check::pass(
                    name,
                    format!("pod {} ready", p.metadata.name.clone().unwrap_or_default()),
                )),
                None if on_node.is_empty() => checks.push(Check::fail(
                    name,
                    format!("no pod with label {label} in {istio_ns}"),
                )),
                None => checks.push(Check::fail(
                    name,
                    format!(
                        "pod {} not ready",
                        on_node[0].metadata.name.clone().unwrap_or_default()
                    ),
                )),
            }
        }
    }
}

/// ztunnel's readiness endpoint inside a node's network namespace.
fn ztunnel_ready(netns: &str) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 15021));
    let r = e2e::netns::Netns::from_name(netns)
        .run_in(move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| {
                    format!(
                        "cannot reach readiness port 15021: {}",
                        crate::zc::connect_reason(&e)
                    )
                })?;
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            http::get_blocking(&mut s, "/healthz/ready").map_err(|e| e.to_string())
        })
        .map_err(|e| format!("entering network namespace {netns}: {e}"))??;
    if r.status == 200 {
        Ok(())
    } else {
        Err(format!(
            "HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        ))
    }
}

/// The local mesh runs each node's agent as a host process with
/// `NODE_NAME=<node>`; find it in /proc.
fn node_agent_pid(node: &str) -> Option<u32> {
    let want = format!("NODE_NAME={node}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            if exe.file_name()?.to_str()? != "node-agent" {
                return None;
            }
            let env = std::fs::read(e.path().join("environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|kv| kv == want.as_bytes())
                .then_some(pid)
        })
}

fn local_checks(mesh: &LocalMesh, checks: &mut Vec<Check>) {
    if mesh.supervisor_alive() {
        checks.push(Check::pass(
            "istiod-lite",
            format!(
                "local mesh running ({})",
                mesh.dir.join("ready.json").display()
            ),
        ));
    } else {
        checks.push(Check::fail(
            "istiod-lite",
            "the local mesh supervisor is gone (restart it: `ambientctl local down && ambientctl local up`)",
        ));
    }
    for node in &mesh.nodes {
        let Some(netns) = mesh.node_netns(node) else {
            checks.push(Check::fail(
                format!("ztunnel on {node}"),
                "no network namespace recorded for the node",
            ));
            continue;
        };
        match ztunnel_ready(&netns) {
            Ok(()) => checks.push(Check::pass(format!("ztunnel on {node}"), "ready")),
            Err(e) => checks.push(Check::fail(format!("ztunnel on {node}"), e)),
        }
        match node_agent_pid(node) {
            Some(pid) => checks.push(Check::pass(
                format!("CNI agent on {node}"),
                format!("running (pid {pid})"),
            )),
            None => checks.push(Check::fail(
                format!("CNI agent on {node}"),
                "no node-agent process for this node",
            )),
        }
    }
}

fn kernel_checks(checks: &mut Vec<Check>) {
    match Command::new("nft").args(["list", "tables"]).output() {
        Ok(o) if o.status.success() => {
            checks.push(Check::pass("nftables", "`nft list tables` works"))
        }
        Ok(o) => checks.push(Check::fail(
            "nftables",
            format!(
                "`nft list tables` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        )),
        Err(e) => checks.push(Check::fail("nftables", format!("cannot run nft: {e}"))),
    }
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    match std::fs::read_to_string(path) {
        Ok(v) => checks.push(Check::pass(
            "IPv4 forwarding sysctl",
            format!("{} readable (= {})", path.display(), v.trim()),
        )),
        Err(e) => checks.push(Check::fail(
            "IPv4 forwarding sysctl",
            format!("reading {}: {e}", path.display()),
        )),
    }
}

pub fn run(args: PrecheckArgs) -> Result<i32, PrecheckError> {
    let local = LocalMesh::detect(&kubeclient::state_dir());
    let target = kubeclient::target(args.kubeconfig.as_deref(), local.as_ref());
    // The local mesh's processes only count when it is the target.
    let local = match target {
        Target::Local(_) => local,
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PrecheckError::Runtime)?;
    let mut checks = Vec::new();
    rt.block_on(async {
        match kubeclient::client(&target).await {
            Ok(client) => {
                let work = api_checks(&client, &args.istio_namespace, local.as_ref(), &mut checks);
                if tokio::time::timeout(Duration::from_secs(30), work)
                    .await
                    .is_err()
                {
                    checks.push(Check::fail("Kubernetes API server", "timed out after 30s"));
                }
            }
            Err(e) => checks.push(Check::fail("Kubernetes API server", e.to_string())),
        }
    });
    if let Some(mesh) = &local {
        local_checks(mesh, &mut checks);
    }
    kernel_checks(&mut checks);
    let (text, code) = report(&checks);
    print!("{text}");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_and_exit_code() {
        let ok = [
            Check::pass("Kubernetes API server", "reachable, version v1.33.0"),
            Check::pass("ztunnel on node1", "ready"),
        ];
        let (text, code) = report(&ok);
        assert_eq!(
            text,
            "✔ Kubernetes API server: reachable, version v1.33.0\n✔ ztunnel on node1: ready\n✔ No issues found: all 2 checks passed.\n"
        );
        assert_eq!(code, 0);
        let bad = [
            Check::pass("CRDs", ""),
            Check::fail("ztunnel on node2", "HTTP 503 not ready: xds"),
        ];
        let (text, code) = report(&bad);
        assert_eq!(
            text,
            "✔ CRDs\n✘ ztunnel on node2: HTTP 503 not ready: xds\n✘ 1 of 2 checks failed.\n"
        );
        assert_eq!(code, 1);
    }

    #[test]
    fn missing_crds_are_named() {
        let present = [
            "authorizationpolicies.security.istio.io",
            "virtualservices.networking.istio.io",
            "gateways.gateway.networking.k8s.io",
            "httproutes.gateway.networking.k8s.io",
            "destinationrules.networking.istio.io",
        ];
        assert_eq!(
            missing_crds(present),
            ["peerauthentications.security.istio.io"]
        );
        assert!(missing_crds(REQUIRED_CRDS.iter().copied()).is_empty());
    }

    fn crd(name: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": name}})
    }

    #[tokio::test]
    async fn cluster_checks() {
        use crate::kubeclient::mock::{self, route};
        use serde_json::json;
        let pods = |label: &str, items| {
            route(
                "GET",
                &format!("/api/v1/namespaces/istio-system/pods?&labelSelector={label}"),
                200,
                mock::list("PodList", items),
            )
        };
        let (client, _) = mock::client(vec![
            route(
                "GET",
                "/version",
                200,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.1",
                "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}),
            ),
            route(
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                200,
                json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
                "items": REQUIRED_CRDS[1..].iter().map(|c| crd(c)).collect::<Vec<_>>()}),
            ),
            route(
                "GET",
                "/api/v1/nodes",
                200,
                json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
                "items": [{"metadata": {"name": "node1"}}, {"metadata": {"name": "node2"}}]}),
            ),
            pods(
                "app%3Distiod",
                vec![mock::pod(
                    "istiod-1",
                    "node1",
                    json!({"app": "istiod"}),
                    true,
                )],
            ),
            pods(
                "app%3Dztunnel",
                vec![
                    mock::pod("ztunnel-a", "node1", json!({"app": "ztunnel"}), true),
                    mock::pod("ztunnel-b", "node2", json!({"app": "ztunnel"}), false),
                ],
            ),
            pods(
                "k8s-app%3Distio-cni-node",
                vec![mock::pod(
                    "istio-cni-a",
                    "node1",
                    json!({"k8s-app": "istio-cni-node"}),
                    true,
                )],
            ),
        ]);
        let mut checks = Vec::new();
        api_checks(&client, "istio-system", None, &mut checks).await;
        let (text, code) = report(&checks);
        assert_eq!(
            text,
            "\
✔ Kubernetes API server: reachable, version v1.33.1
✘ CRDs: missing authorizationpolicies.security.istio.io
✔ istiod-lite: 1/1 pods ready in istio-system
✔ ztunnel on node1: pod ztunnel-a ready
✘ ztunnel on node2: pod ztunnel-b not ready
✔ CNI agent on node1: pod istio-cni-a ready
✘ CNI agent on node2: no pod with label k8s-app=istio-cni-node in istio-system
✘ 3 of 7 checks failed.
"
        );
        assert_eq!(code, 1);
    }

    #[test]
    fn kernel_checks_report_ip_forward() {
        let mut checks = Vec::new();
        kernel_checks(&mut checks);
        let fwd = checks
            .iter()
            .find(|c| c.name == "IPv4 forwarding sysctl")
            .unwrap();
        assert!(fwd.ok, "{fwd:?}");
        assert_eq!(checks.len(), 2);
    }
}
