//! The `mesh-cni` plugin deciding on its own while the node agent is down:
//! it reads the pod and its namespace from a real API server and refuses to
//! set up enrolled pods (they would run uncaptured) while letting every
//! other pod start.
//!
//! Needs the API server binaries (`scripts/kube-build.sh`) and the plugin
//! binary (`cargo build -p cni-plugin --bin mesh-cni`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use e2e::controlplane::{create_pod, delete_namespace, PodSpecOf};
use e2e::kube::KubeCluster;
use serde_json::{json, Value};

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(what: &str) -> String {
    format!(
        "cni-{}-{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

const MODE: &str = "istio.io/dataplane-mode";

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-e2e"}],
        "ips": [{"address": "10.244.9.9/24", "interface": 0}]
    })
}

/// ADD for `namespace/name` with the agent's socket missing.
fn add(kube: &KubeCluster, agent_socket: &Path, namespace: &str, name: &str) -> Result<Outcome> {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "agentSocket": agent_socket, "agentTimeoutSeconds": 10,
        "kubeconfig": kube.kubeconfig(), "prevResult": prev()
    });
    let mut child = Command::new(e2e::app::binary("mesh-cni")?)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", "/var/run/netns/cni-e2e")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mesh-cni")?;
    let mut stdin = child.stdin.take().context("plugin stdin")?;
    stdin.write_all(conf.to_string().as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    Ok(Outcome {
        status: out.status.code(),
        stdout: serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "plugin output is not JSON: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[derive(Debug)]
struct Outcome {
    status: Option<i32>,
    stdout: Value,
    stderr: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_only_enrolled_pods_are_held_back() -> Result<()> {
    let kube = KubeCluster::shared().await?;
    let client = kube.client().await?;
    let ambient = unique("ambient");
    let plain = unique("plain");
    kube.create_namespace(&ambient, &[(MODE, "ambient")])
        .await?;
    kube.create_namespace(&plain, &[]).await?;
    let labels = |mode: Option<&str>| {
        let mut l = BTreeMap::from([("app".to_string(), "web".to_string())]);
        if let Some(m) = mode {
            l.insert(MODE.to_string(), m.to_string());
        }
        l
    };
    for (namespace, name, mode) in [
        (&ambient, "enrolled", None),
        (&ambient, "opted-out", Some("none")),
        (&plain, "plain", None),
        (&plain, "pod-enrolled", Some("ambient")),
    ] {
        create_pod(
            &client,
            &PodSpecOf {
                namespace,
                name,
                node: "cni-node",
                service_account: "default",
                labels: labels(mode),
                ip: None,
            },
        )
        .await?;
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("pluginevent.sock");

    // Held back: the runtime retries until the agent is back.
    for (namespace, name, reason) in [
        (
            &ambient,
            "enrolled",
            format!("namespace {ambient} has {MODE}=ambient"),
        ),
        (
            &plain,
            "pod-enrolled",
            format!("pod {plain}/pod-enrolled has {MODE}=ambient"),
        ),
    ] {
        let out = add(kube, &socket, namespace, name)?;
        assert_eq!(out.status, Some(1), "{name}: {out:?}");
        assert_eq!(out.stdout["code"], 11, "{name}: {out:?}");
        let msg = out.stdout["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("node agent unreachable; pod would run uncaptured"),
            "{name}: {out:?}"
        );
        assert!(msg.contains(&reason), "{name}: {out:?}");
    }

    // Not in the mesh: they start, with the network the chain gave them.
    for (namespace, name) in [(&ambient, "opted-out"), (&plain, "plain")] {
        let out = add(kube, &socket, namespace, name)?;
        assert_eq!(out.status, Some(0), "{name}: {out:?}");
        assert_eq!(out.stdout, prev(), "{name}");
        assert!(
            out.stderr.contains("runs outside the mesh"),
            "{name}: {out:?}"
        );
    }

    // A pod the API server does not know (yet) is judged by its namespace.
    let out = add(kube, &socket, &plain, "not-created")?;
    assert_eq!(out.status, Some(0), "{out:?}");
    let out = add(kube, &socket, &ambient, "not-created")?;
    assert_eq!(out.stdout["code"], 11, "{out:?}");

    delete_namespace(&client, &ambient).await?;
    delete_namespace(&client, &plain).await?;
    Ok(())
}
