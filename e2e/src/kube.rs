//! A real Kubernetes control plane for tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on loopback, started with
//! `scripts/kube-up.sh` from the binaries `scripts/kube-build.sh` caches.
//!
//! The control plane is what istiod-lite reads and what the CA asks to
//! review tokens, so tests that exercise those paths run against the real
//! thing rather than a mock. One control plane is shared by every test of a
//! test binary (each test uses its own namespaces and node names); a
//! watchdog process tears it down when the test process exits, however it
//! exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// A running control plane and how to reach it.
#[derive(Debug)]
pub struct KubeCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// The watchdog that stops the control plane if this process dies.
    watchdog: u32,
}

static SHARED: OnceLock<Result<KubeCluster, String>> = OnceLock::new();

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

impl KubeCluster {
    /// The control plane of this test process, started on first use.
    pub async fn shared() -> Result<&'static KubeCluster> {
        // Starting takes seconds and blocks; the OnceLock makes concurrent
        // tests wait for one start instead of racing several.
        let r = SHARED.get_or_init(|| Self::start().map_err(|e| format!("{e:#}")));
        match r {
            Ok(c) => Ok(c),
            Err(e) => bail!("kubernetes control plane unavailable: {e}"),
        }
    }

    fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-kube-{}", std::process::id()));
        Self::start_in(&dir)
    }

    /// Starts a control plane of its own in `dir` (emptied first). It stops
    /// with [`KubeCluster::stop`], or when this process is gone.
    pub fn start_in(dir: &Path) -> Result<Self> {
        let dir = dir.to_path_buf();
        let _ = std::fs::remove_dir_all(&dir);
        let up = scripts_dir().join("kube-up.sh");
        let out = Command::new("bash")
            .arg(&up)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", up.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                up.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Stop the control plane once this process is gone, even when the
        // test binary is killed; its own process group keeps it out of the
        // way of a Ctrl-C aimed at the tests.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec bash '{up}' --down '{dir}'",
            pid = std::process::id(),
            up = up.display(),
            dir = dir.display()
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the control-plane watchdog")?;
        Ok(Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            watchdog: watchdog.id(),
        })
    }

    /// Stops the control plane and removes its directory.
    pub fn stop(&self) {
        // The watchdog has its own process group; it is no longer needed.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.watchdog as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let up = scripts_dir().join("kube-up.sh");
        let _ = Command::new("bash")
            .arg(&up)
            .arg("--down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Writes a kubeconfig at `path` that authenticates as the existing
    /// ServiceAccount `namespace/sa` (a token for the API server's own
    /// audience, valid `valid_for`), so that a component runs with exactly
    /// the permissions its RBAC grants, as it would in a pod.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        sa: &str,
        path: &Path,
        valid_for: std::time::Duration,
    ) -> Result<()> {
        let admin = Kubeconfig::read_from(&self.kubeconfig).context("reading the kubeconfig")?;
        let cluster = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .context("kubeconfig has no cluster")?;
        let token = self
            .token_request(
                namespace,
                sa,
                "https://kubernetes.default.svc.cluster.local",
                None,
                valid_for.as_secs() as i64,
            )
            .await?;
        let server = cluster.server.unwrap_or_default();
        let ca = match (
            cluster.certificate_authority,
            cluster.certificate_authority_data,
        ) {
            (Some(file), _) => format!("certificate-authority: {file}"),
            (None, Some(data)) => format!("certificate-authority-data: {data}"),
            (None, None) => bail!("kubeconfig cluster has no certificate authority"),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    {ca}\nusers:\n- name: {namespace}-{sa}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: {namespace}-{sa}\ncurrent-context: local\n"
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The control plane's state directory (logs, PKI).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh admin client. Not cached: a client's connections belong to
    /// the runtime that made them, and every test has its own runtime.
    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig).context("reading the kubeconfig")?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
        Ok(Client::try_from(cfg)?)
    }

    /// Runs `kubectl` against this control plane; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Registers a Node object (no kubelet runs for it: pods bound to it
    /// stay as their creator sets them).
    pub async fn create_node(&self, name: &str) -> Result<Node> {
        let api: Api<Node> = Api::all(self.client().await?);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_get(&api, name, &node).await
    }

    /// Creates a namespace with the given labels (or returns it if present).
    pub async fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<Namespace> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_get(&api, name, &ns).await
    }

    /// A token of `namespace/sa` for `audience` (the ServiceAccount is
    /// created if missing), bound to `bound_pod` in the same namespace when
    /// given, the way a kubelet's projected token is.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        sa: &str,
        audience: &str,
        bound_pod: Option<&str>,
    ) -> Result<String> {
        let client = self.client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let obj = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(sa.to_string()),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_or_get(&sas, sa, &obj).await?;
        let bound = match bound_pod {
            Some(pod) => {
                let pods: Api<Pod> = Api::namespaced(client, namespace);
                let p = pods
                    .get(pod)
                    .await
                    .with_context(|| format!("pod {namespace}/{pod}"))?;
                Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: p.metadata.name,
                    uid: p.metadata.uid,
                })
            }
            None => None,
        };
        self.token_request(namespace, sa, audience, bound, 3600)
            .await
    }

    async fn token_request(
        &self,
        namespace: &str,
        sa: &str,
        audience: &str,
        bound: Option<BoundObjectReference>,
        expiration_seconds: i64,
    ) -> Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: bound,
            },
            ..Default::default()
        };
        let got = sas
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .with_context(|| format!("token request for {namespace}/{sa}"))?;
        match got.status {
            Some(s) if !s.token.is_empty() => Ok(s.token),
            _ => bail!("token request for {namespace}/{sa} returned no token"),
        }
    }
}

/// Creates `obj`, or returns the existing one of that name.
pub async fn create_or_get<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(name).await?),
        Err(e) => Err(e).with_context(|| format!("creating {name}")),
    }
}
