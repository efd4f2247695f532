//! Which mesh the CLI talks to, and a kube-rs client for it. The
//! inspection verbs (`zc`, `label`, `precheck`) work on a real cluster
//! (KUBECONFIG or in-cluster credentials) and on the local mesh, where
//! ztunnel and the node agent are processes in each node's network
//! namespace rather than DaemonSet pods. The local mesh is used when it
//! runs and the user did not point the CLI at another cluster.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;

/// Where `ambientctl local up` keeps its state (same default and variable
/// as `ambientctl local`).
pub const DEFAULT_STATE_DIR: &str = "/var/run/ambient-mesh/local";
pub const STATE_DIR_ENV: &str = "AMBIENT_LOCAL_DIR";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes cluster found: the local mesh is not running (start it with `ambientctl local up`), KUBECONFIG is unset, there is no ~/.kube/config and this is not a pod")]
    NoCluster,
    #[error("no usable Kubernetes credentials (set KUBECONFIG or pass --kubeconfig): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The state directory: `AMBIENT_LOCAL_DIR` or the default.
pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// What the local mesh's supervisor writes to `ready.json` once it is up.
#[derive(Debug, Deserialize)]
struct ReadyInfo {
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    nodes: Vec<String>,
}

/// A running local mesh.
#[derive(Debug, Clone)]
pub struct LocalMesh {
    pub dir: PathBuf,
    pub nodes: Vec<String>,
    pub kubeconfig: PathBuf,
    pub supervisor_pid: Option<u32>,
}

impl LocalMesh {
    /// The local mesh of `dir`, if its `ready.json` is there.
    pub fn detect(dir: &Path) -> Option<LocalMesh> {
        let text = std::fs::read(dir.join("ready.json")).ok()?;
        let info: ReadyInfo = serde_json::from_slice(&text).ok()?;
        let mut nodes = info.nodes;
        if nodes.is_empty() {
            // An older ready.json without nodes: the node directories.
            if let Ok(rd) = std::fs::read_dir(dir.join("nodes")) {
                nodes = rd
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect();
                nodes.sort();
            }
        }
        Some(LocalMesh {
            kubeconfig: info
                .kubeconfig
                .unwrap_or_else(|| dir.join("kube").join("kubeconfig")),
            dir: dir.to_path_buf(),
            nodes,
            supervisor_pid: info.pid,
        })
    }

    /// Whether the supervisor process recorded in `ready.json` is alive.
    pub fn supervisor_alive(&self) -> bool {
        match self.supervisor_pid {
            Some(pid) => Path::new("/proc").join(pid.to_string()).exists(),
            None => true,
        }
    }

    /// The network namespace name of `node`.
    pub fn node_netns(&self, node: &str) -> Option<String> {
        let name = std::fs::read_to_string(self.dir.join("nodes").join(node).join("netns")).ok()?;
        let name = name.trim();
        (!name.is_empty()).then(|| name.to_string())
    }
}

/// Whether a pod reports the `Ready` condition.
pub fn pod_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The local mesh (its admin kubeconfig).
    Local(PathBuf),
    /// A kubeconfig file the user named.
    Kubeconfig(PathBuf),
    /// KUBECONFIG unset and no local mesh: `~/.kube/config` or in-cluster.
    Infer,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Chooses the cluster: an explicit `--kubeconfig` or KUBECONFIG wins
/// unless it is the local mesh's own kubeconfig (what `local up` tells
/// users to export), then the running local mesh, then kube-rs's inference.
pub fn target(explicit: Option<&Path>, local: Option<&LocalMesh>) -> Target {
    let env = std::env::var_os("KUBECONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let named = explicit.map(Path::to_path_buf).or(env);
    match (named, local) {
        (Some(path), Some(l)) if same_file(&path, &l.kubeconfig) => Target::Local(path),
        (Some(path), _) => Target::Kubeconfig(path),
        (None, Some(l)) => Target::Local(l.kubeconfig.clone()),
        (None, None) => Target::Infer,
    }
}

/// A client for `target`. KUBECONFIG may hold a list of files; kube-rs's
/// inference merges them, so only a single named file is read directly.
pub async fn client(target: &Target) -> Result<kube::Client, KubeError> {
    let config = match target {
        Target::Local(path) | Target::Kubeconfig(path)
            if !path.as_os_str().to_string_lossy().contains(':') =>
        {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        _ => kube::Config::infer().await.map_err(|e| {
            // The common case (nothing configured at all) gets a short
            // message instead of kube-rs's account of every place it looked.
            let home_config = std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".kube/config").exists())
                .unwrap_or(false);
            if !home_config && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
                KubeError::NoCluster
            } else {
                KubeError::Infer(e)
            }
        })?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_local_mesh_from_its_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LocalMesh::detect(dir.path()).is_none());
        std::fs::create_dir_all(dir.path().join("nodes/node1")).unwrap();
        std::fs::write(dir.path().join("nodes/node1/netns"), "lm-abc-node1\n").unwrap();
        std::fs::write(
            dir.path().join("ready.json"),
            r#"{"pid": 1, "kubeconfig": "/x/kubeconfig", "nodes": ["node1", "node2"]}"#,
        )
        .unwrap();
        let l = LocalMesh::detect(dir.path()).unwrap();
        assert_eq!(l.nodes, ["node1", "node2"]);
        assert_eq!(l.kubeconfig, Path::new("/x/kubeconfig"));
        assert_eq!(l.node_netns("node1").as_deref(), Some("lm-abc-node1"));
        assert_eq!(l.node_netns("node2"), None);
        assert_eq!(
            target(Some(Path::new("/x/kubeconfig")), Some(&l)),
            Target::Local("/x/kubeconfig".into())
        );
        assert_eq!(
            target(Some(Path::new("/other")), Some(&l)),
            Target::Kubeconfig("/other".into())
        );
    }
}

/// A kube-rs client answered by canned responses, for the unit tests of the
/// commands that talk to the API server.
#[cfg(test)]
pub mod mock {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use kube::client::Body;

    /// A canned answer: method, path-and-query prefix, status, JSON body.
    pub struct Route {
        pub method: &'static str,
        pub prefix: String,
        pub status: u16,
        pub body: serde_json::Value,
    }

    pub fn route(
        method: &'static str,
        prefix: &str,
        status: u16,
        body: serde_json::Value,
    ) -> Route {
        Route {
            method,
            prefix: prefix.to_string(),
            status,
            body,
        }
    }

    /// The client, and the requests it saw (`METHOD path?query content-type`).
    pub fn client(routes: Vec<Route>) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(routes);
        let log = seen.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let routes = routes.clone();
            let log = log.clone();
            async move {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let ctype = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                log.lock().unwrap().push(
                    format!("{} {pq} {ctype}", req.method())
                        .trim_end()
                        .to_string(),
                );
                let hit = routes
                    .iter()
                    .find(|r| r.method == req.method().as_str() && pq.starts_with(&r.prefix));
                let (status, body) = match hit {
                    Some(r) => (r.status, r.body.clone()),
                    None => (
                        404,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": format!("no route for {pq}"), "reason": "NotFound", "code": 404}),
                    ),
                };
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap();
                Ok::<_, Infallible>(resp)
            }
        });
        (kube::Client::new(svc, "default"), seen)
    }

    /// A pod as the API server lists it.
    pub fn pod(
        name: &str,
        node: &str,
        labels: serde_json::Value,
        ready: bool,
    ) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name, "namespace": "istio-system", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}
            ]},
        })
    }

    pub fn list(kind: &str, items: Vec<serde_json::Value>) -> serde_json::Value {
        serde_json::json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
    }
}
