//! The real API server the control-plane tests run against: a v1.20
//! control plane of its own per test binary (scripts/kube-up.sh), the
//! Gateway API CRDs from manifests/crds/gateway-api.yaml, and polling.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;

pub const KUBE_BIN: &str = "/var/cache/ambient-mesh/kube/v1.20.2/bin";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The control plane; stopped and removed when dropped.
pub struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// Starts a control plane in a directory named after `name`.
    pub fn start(name: &str) -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("{name}-kube-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let up = repo().join("scripts/kube-up.sh");
        let out = Command::new("bash")
            .arg(&up)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .context("running kube-up.sh")?;
        let cluster = Cluster { dir };
        if !out.status.success() {
            bail!(
                "kube-up.sh failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(cluster)
    }

    pub async fn client(&self) -> Result<Client> {
        let kc = Kubeconfig::read_from(self.dir.join("kubeconfig"))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(cfg)?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/kube-up.sh"))
            .arg("--down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn skip_reason() -> Option<String> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if uid != 0 {
        return Some("not root".into());
    }
    if !Path::new(KUBE_BIN).join("kube-apiserver").exists() {
        return Some(format!("{KUBE_BIN} missing"));
    }
    None
}

pub async fn install_crds(client: &Client) -> Result<()> {
    let text = std::fs::read_to_string(repo().join("manifests/crds/gateway-api.yaml"))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = vec![];
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let crd: CustomResourceDefinition = serde_json::from_value(v)?;
        names.push(crd.metadata.name.clone().unwrap_or_default());
        api.create(&PostParams::default(), &crd).await?;
    }
    for name in names {
        eventually(&format!("CRD {name} established"), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await.ok()?;
                let conds = crd.status?.conditions?;
                conds
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await?;
    }
    Ok(())
}

/// Creates a Namespace.
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Polls `f` until it gives `Some`, for up to 30 s.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, Duration::from_secs(30), f).await
}

/// Polls `f` until it gives `Some`, for up to `limit`.
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
