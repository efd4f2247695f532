//! Where the CA's signing key comes from when istiod-lite starts: operator
//! plug-in files, a Kubernetes Secret shared by every replica, or a local
//! folder for offline use. Every workload certificate in the mesh chains to
//! what this returns, so a root is generated at most once and then reused.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use mesh_core::ca::{
    CaError, CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE,
};
use tracing::info;

/// Name of the Secret holding a generated self-signed root, as Istio names it.
pub const DEFAULT_ROOT_SECRET: &str = "istio-ca-secret";
/// Secret type Istio gives that Secret.
const ROOT_SECRET_TYPE: &str = "istio.io/ca-root";

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("loading the CA")]
    Ca(#[from] CaError),
    #[error("{action} Secret {namespace}/{name}")]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} exists but lacks the key {key}")]
    SecretIncomplete {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: {key} is not UTF-8 PEM")]
    SecretNotPem {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name} was deleted while being created")]
    SecretVanished { namespace: String, name: String },
}

/// Where the CA key and certificates live.
pub enum RootSource {
    /// Operator-provided plug-in files (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, optional `cert-chain.pem`); never generated.
    PluginDir(PathBuf),
    /// A Secret with the same four keys; generated with a self-signed root
    /// (and created) when missing.
    Secret {
        client: kube::Client,
        namespace: String,
        name: String,
        trust_domain: String,
    },
    /// Plug-in files in a local folder, generated there on first start.
    Dir { path: PathBuf, trust_domain: String },
}

impl std::fmt::Debug for RootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootSource::PluginDir(p) => f.debug_tuple("PluginDir").field(p).finish(),
            RootSource::Secret {
                namespace,
                name,
                trust_domain,
                ..
            } => f
                .debug_struct("Secret")
                .field("namespace", namespace)
                .field("name", name)
                .field("trust_domain", trust_domain)
                .finish_non_exhaustive(),
            RootSource::Dir { path, trust_domain } => f
                .debug_struct("Dir")
                .field("path", path)
                .field("trust_domain", trust_domain)
                .finish(),
        }
    }
}

/// Loads the CA from `source`, generating and storing a self-signed root
/// first where the source allows it.
pub async fn load_or_create_root(source: RootSource) -> Result<CertificateAuthority, RootError> {
    match source {
        RootSource::PluginDir(dir) => {
            let ca = CertificateAuthority::load_dir(&dir)?;
            info!(dir = %dir.display(), "CA loaded from plug-in files");
            Ok(ca)
        }
        RootSource::Dir { path, trust_domain } => {
            let path2 = path.clone();
            tokio::task::spawn_blocking(move || load_or_create_dir(path2, &trust_domain))
                .await
                .map_err(|e| {
                    RootError::Ca(CaError::Io {
                        path,
                        source: std::io::Error::other(e),
                    })
                })?
        }
        RootSource::Secret {
            client,
            namespace,
            name,
            trust_domain,
        } => load_or_create_secret(client, namespace, name, &trust_domain).await,
    }
}

fn load_or_create_dir(
    path: PathBuf,
    trust_domain: &str,
) -> Result<CertificateAuthority, RootError> {
    // The certificate is the marker: with it present, whatever else is
    // missing is an error to report, not a reason to mint a new root that
    // would orphan every certificate already issued.
    if path.join(CA_CERT_FILE).exists() {
        let ca = CertificateAuthority::load_dir(&path)?;
        info!(dir = %path.display(), "CA loaded");
        return Ok(ca);
    }
    let ca = CertificateAuthority::generate(trust_domain)?;
    ca.write_dir(&path)?;
    info!(dir = %path.display(), trust_domain, "generated a self-signed CA root");
    Ok(ca)
}

fn secret_data(ca: &CertificateAuthority) -> BTreeMap<String, ByteString> {
    [
        (CA_CERT_FILE, ca.ca_cert_pem()),
        (CA_KEY_FILE, ca.ca_key_pem()),
        (ROOT_CERT_FILE, ca.root_pem()),
        (CERT_CHAIN_FILE, ca.cert_chain_pem()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect()
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> Result<CertificateAuthority, RootError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let get = |key: &'static str| -> Result<Option<String>, RootError> {
        match data.get(key) {
            None => Ok(None),
            Some(v) => {
                String::from_utf8(v.0.clone())
                    .map(Some)
                    .map_err(|_| RootError::SecretNotPem {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        key,
                    })
            }
        }
    };
    let required = |key: &'static str| -> Result<String, RootError> {
        get(key)?.ok_or_else(|| RootError::SecretIncomplete {
            namespace: namespace.to_string(),
            name: name.to_string(),
            key,
        })
    };
    let cert = required(CA_CERT_FILE)?;
    let key = required(CA_KEY_FILE)?;
    let root = get(ROOT_CERT_FILE)?.unwrap_or_else(|| cert.clone());
    let chain = get(CERT_CHAIN_FILE)?.filter(|c| !c.trim().is_empty());
    Ok(CertificateAuthority::from_pem(
        &cert,
        &key,
        &root,
        chain.as_deref(),
    )?)
}

async fn load_or_create_secret(
    client: kube::Client,
    namespace: String,
    name: String,
    trust_domain: &str,
) -> Result<CertificateAuthority, RootError> {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let kube_err = |action: &'static str| {
        let (namespace, name) = (namespace.clone(), name.clone());
        move |source| RootError::Kube {
            action,
            namespace,
            name,
            source: Box::new(source),
        }
    };
    if let Some(secret) = api.get_opt(&name).await.map_err(kube_err("reading"))? {
        let ca = from_secret(&secret, &namespace, &name)?;
        info!(%namespace, %name, "CA loaded from Secret");
        return Ok(ca);
    }
    let ca = CertificateAuthority::generate(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        type_: Some(ROOT_SECRET_TYPE.to_string()),
        data: Some(secret_data(&ca)),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(%namespace, %name, trust_domain, "generated a self-signed CA root and stored it");
            Ok(ca)
        }
        // Another replica won the race: use its root, not ours.
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            let secret = api
                .get_opt(&name)
                .await
                .map_err(kube_err("re-reading"))?
                .ok_or_else(|| RootError::SecretVanished {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })?;
            let ca = from_secret(&secret, &namespace, &name)?;
            info!(%namespace, %name, "CA loaded from a Secret another instance created");
            Ok(ca)
        }
        Err(e) => Err(kube_err("creating")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dir_is_generated_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let src = || RootSource::Dir {
            path: dir.clone(),
            trust_domain: "cluster.local".into(),
        };
        let first = load_or_create_root(src()).await.unwrap();
        let second = load_or_create_root(src()).await.unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        let plugged = load_or_create_root(RootSource::PluginDir(dir.clone()))
            .await
            .unwrap();
        assert_eq!(plugged.root_pem(), first.root_pem());

        // A half-present folder is reported, not regenerated.
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        let err = load_or_create_root(src()).await.unwrap_err();
        assert!(
            format!("{:?}", err).contains(CA_KEY_FILE),
            "error must name the missing file: {err:?}"
        );
    }

    #[tokio::test]
    async fn plugin_dir_names_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_or_create_root(RootSource::PluginDir(tmp.path().into()))
            .await
            .unwrap_err();
        let text = format!("{}: {}", err, std::error::Error::source(&err).unwrap());
        assert!(text.contains(CA_CERT_FILE), "{text}");
    }

    #[test]
    fn secret_round_trip_and_incomplete() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let mut secret = Secret {
            data: Some(secret_data(&ca)),
            ..Default::default()
        };
        let loaded = from_secret(&secret, "istio-system", "s").unwrap();
        assert_eq!(loaded.root_pem(), ca.root_pem());
        secret.data.as_mut().unwrap().remove(CA_KEY_FILE);
        assert!(matches!(
            from_secret(&secret, "istio-system", "s"),
            Err(RootError::SecretIncomplete {
                key: CA_KEY_FILE,
                ..
            })
        ));
    }
}
