//! Pod volumes for the local kubelet: `emptyDir`, `configMap`, `secret` and
//! `projected` (ServiceAccount tokens, ConfigMaps, Secrets, downward API
//! names) written as files under the pod's directory, as a kubelet writes
//! them before the containers start.
//!
//! Processes of the local mesh share the host's filesystem (there is no
//! per-container mount namespace), so a container sees a volume at its
//! host directory: environment values and arguments that name a path under
//! a `volumeMount`'s `mountPath` are rewritten to it. ServiceAccount tokens
//! are requested bound to the pod, as the kubelet's projected tokens are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::Client;

/// Why a pod's volumes cannot be set up (yet); shown on the pod, retried.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {kind} {namespace}/{name} not found")]
    Missing {
        volume: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("volume {volume}: {source}")]
    Api {
        volume: String,
        #[source]
        source: kube::Error,
    },
    #[error("volume {volume}: writing {path}: {source}")]
    Write {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: {reason}")]
    Unsupported { volume: String, reason: String },
}

/// Lifetime asked for projected tokens when the pod does not say (the
/// kubelet default is one hour, refreshed; these are not refreshed).
const DEFAULT_TOKEN_SECONDS: i64 = 24 * 3600;

/// Writes every volume of `pod` under `dir/<volume name>/` and returns the
/// host directory of each volume by name.
pub async fn materialize(
    client: &Client,
    pod: &Pod,
    dir: &Path,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let vdir = dir.join(&v.name);
        write_volume(client, pod, &ns, v, &vdir).await?;
        out.insert(v.name.clone(), vdir);
    }
    Ok(out)
}

async fn write_volume(
    client: &Client,
    pod: &Pod,
    ns: &str,
    v: &Volume,
    vdir: &Path,
) -> Result<(), VolumeError> {
    let name = v.name.clone();
    let write = |rel: &str, data: &[u8]| -> Result<(), VolumeError> {
        // Paths are relative and may not climb out of the volume.
        if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
            return Err(VolumeError::Unsupported {
                volume: name.clone(),
                reason: format!("path {rel:?} leaves the volume"),
            });
        }
        let path = vdir.join(rel);
        let err = |source| VolumeError::Write {
            volume: name.clone(),
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        std::fs::write(&path, data).map_err(err)
    };
    std::fs::create_dir_all(vdir).map_err(|source| VolumeError::Write {
        volume: name.clone(),
        path: vdir.to_path_buf(),
        source,
    })?;
    if v.empty_dir.is_some() {
        return Ok(());
    }
    if let Some(cm) = &v.config_map {
        let data = config_map(client, ns, &cm.name, &name, cm.optional == Some(true)).await?;
        return write_items(&data, cm.items.as_deref(), write);
    }
    if let Some(s) = &v.secret {
        let sname = s.secret_name.clone().unwrap_or_default();
        let data = secret(client, ns, &sname, &name, s.optional == Some(true)).await?;
        return write_items(&data, s.items.as_deref(), write);
    }
    if let Some(p) = &v.projected {
        for src in p.sources.iter().flatten() {
            if let Some(t) = &src.service_account_token {
                let token = token(
                    client,
                    pod,
                    ns,
                    t.audience.as_deref(),
                    t.expiration_seconds,
                    &name,
                )
                .await?;
                write(&t.path, token.as_bytes())?;
            } else if let Some(cm) = &src.config_map {
                let data =
                    config_map(client, ns, &cm.name, &name, cm.optional == Some(true)).await?;
                write_items(&data, cm.items.as_deref(), write)?;
            } else if let Some(s) = &src.secret {
                let data = secret(client, ns, &s.name, &name, s.optional == Some(true)).await?;
                write_items(&data, s.items.as_deref(), write)?;
            } else if let Some(d) = &src.downward_api {
                for item in d.items.iter().flatten() {
                    let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                        Some("metadata.namespace") => ns.to_string(),
                        Some("metadata.uid") => pod.metadata.uid.clone().unwrap_or_default(),
                        other => {
                            return Err(VolumeError::Unsupported {
                                volume: name,
                                reason: format!("downward API field {other:?}"),
                            })
                        }
                    };
                    write(&item.path, value.as_bytes())?;
                }
            }
        }
        return Ok(());
    }
    Err(VolumeError::Unsupported {
        volume: name,
        reason: "only emptyDir, configMap, secret and projected volumes are supported by the local kubelet".into(),
    })
}

fn write_items(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    write: impl Fn(&str, &[u8]) -> Result<(), VolumeError>,
) -> Result<(), VolumeError> {
    match items {
        Some(items) => {
            for i in items {
                if let Some(d) = data.get(&i.key) {
                    write(&i.path, d)?;
                }
            }
        }
        None => {
            for (k, d) in data {
                write(k, d)?;
            }
        }
    }
    Ok(())
}

async fn config_map(
    client: &Client,
    ns: &str,
    name: &str,
    volume: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(cm)) => {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(out)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(VolumeError::Missing {
            volume: volume.into(),
            kind: "ConfigMap",
            namespace: ns.into(),
            name: name.into(),
        }),
        Err(source) => Err(VolumeError::Api {
            volume: volume.into(),
            source,
        }),
    }
}

async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    volume: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(s)) => {
            let mut out: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            out.extend(
                s.string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(out)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(VolumeError::Missing {
            volume: volume.into(),
            kind: "Secret",
            namespace: ns.into(),
            name: name.into(),
        }),
        Err(source) => Err(VolumeError::Api {
            volume: volume.into(),
            source,
        }),
    }
}

async fn token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    audience: Option<&str>,
    expiration: Option<i64>,
    volume: &str,
) -> Result<String, VolumeError> {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: Some(
                expiration
                    .unwrap_or(DEFAULT_TOKEN_SECONDS)
                    .max(DEFAULT_TOKEN_SECONDS),
            ),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let got = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(|source| VolumeError::Api {
            volume: volume.into(),
            source,
        })?;
    got.status
        .map(|s| s.token)
        .ok_or_else(|| VolumeError::Unsupported {
            volume: volume.into(),
            reason: "token request returned no token".into(),
        })
}

/// The container's mounts as (mount path, host directory), longest first
/// so that nested mounts win.
pub fn container_mounts(
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let dir = volumes.get(&m.name)?;
            let dir = match &m.sub_path {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir.clone(),
            };
            Some((m.mount_path.trim_end_matches('/').to_string(), dir))
        })
        .collect();
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    out
}

/// `value` with a leading mount path replaced by its host directory.
pub fn rewrite_path(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, dir) in mounts {
        if let Some(rest) = value.strip_prefix(mount.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{}{rest}", dir.display());
            }
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn paths_under_mounts_are_rewritten_longest_first() {
        let c = Container {
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "tokens".into(),
                    mount_path: "/var/run/secrets/tokens".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "secrets".into(),
                    mount_path: "/var/run/secrets/".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let vols = BTreeMap::from([
            ("tokens".to_string(), PathBuf::from("/pod/volumes/tokens")),
            ("secrets".to_string(), PathBuf::from("/pod/volumes/secrets")),
        ]);
        let m = container_mounts(&c, &vols);
        assert_eq!(
            rewrite_path("/var/run/secrets/tokens/istio-token", &m),
            "/pod/volumes/tokens/istio-token"
        );
        assert_eq!(
            rewrite_path("/var/run/secrets/x", &m),
            "/pod/volumes/secrets/x"
        );
        assert_eq!(rewrite_path("/var/run/secretsx", &m), "/var/run/secretsx");
        assert_eq!(
            rewrite_path("https://istiod:15012", &m),
            "https://istiod:15012"
        );
    }
}
