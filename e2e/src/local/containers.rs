//! What the local kubelet starts for a container: the built-in sample app an
//! image names (`sample-app`), or for tool images such as curl the
//! container's own command run from the host's binaries, with the
//! container's environment resolved the way a kubelet does (`value`,
//! downward-API `fieldRef`s, `HOSTNAME`).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};

/// Why a container cannot be started; shown in its waiting state.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Reported as `ErrImagePull`, as a kubelet would for an image it
    /// cannot get.
    #[error("image {0:?} is not a built-in app of the local mesh (see the sample apps list)")]
    UnknownImage(String),
    /// Reported as `CreateContainerConfigError`.
    #[error("container {container}: env {var}: {reason}")]
    Env {
        container: String,
        var: String,
        reason: String,
    },
    #[error("container {container}: executable {program:?} not found")]
    NoExecutable { container: String, program: String },
}

impl ContainerError {
    /// The waiting reason a kubelet reports for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ContainerError::UnknownImage(_) => "ErrImagePull",
            ContainerError::Env { .. } => "CreateContainerConfigError",
            ContainerError::NoExecutable { .. } => "CreateContainerError",
        }
    }
}

/// A resolved container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Facts only known once the pod runs (downward API values, where its
/// volumes are).
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub pod_ip: String,
    pub host_ip: String,
    /// The container's volume mounts as (mount path, host directory).
    pub mounts: Vec<(String, PathBuf)>,
}

/// The mesh's own images (as `manifests/` and provisioned waypoints name
/// them) run the workspace binary of the same name.
fn mesh_binary(image: &str) -> Option<&'static str> {
    let repo = image.split('@').next().unwrap_or(image);
    let repo = match repo.rfind(':') {
        Some(i) if !repo[i..].contains('/') => &repo[..i],
        _ => repo,
    };
    let mut parts = repo.rsplit('/');
    let name = parts.next()?;
    if parts.next()? != "ambient-mesh" {
        return None;
    }
    ["waypoint", "ztunnel", "istiod-lite", "node-agent"]
        .into_iter()
        .find(|b| *b == name)
}

/// Resolves `container` of `pod` into a process. `sample_app` is the path of
/// the `sample-app` binary.
pub fn resolve(
    pod: &Pod,
    container: &Container,
    rt: &Runtime,
    sample_app: &Path,
) -> Result<Launch, ContainerError> {
    let image = container.image.clone().unwrap_or_default();
    let env: Vec<(String, String)> = environment(pod, container, rt)?
        .into_iter()
        .map(|(k, v)| (k, super::volumes::rewrite_path(&v, &rt.mounts)))
        .collect();
    let command = container.command.clone().unwrap_or_default();
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|a| super::volumes::rewrite_path(a, &rt.mounts))
        .collect();
    if let Some(bin) = mesh_binary(&image) {
        let program = crate::app::binary(bin).map_err(|_| ContainerError::NoExecutable {
            container: container.name.clone(),
            program: bin.into(),
        })?;
        return Ok(Launch { program, args, env });
    }
    if let Some(app) = crate::samples::app_for_image(&image) {
        if app.is_tool() {
            // The image's own tools are the host's: run what the manifest
            // says, or idle as such images' entrypoints do when given none.
            let mut argv: Vec<String> = command.into_iter().chain(args).collect();
            if argv.is_empty() {
                argv = vec!["sleep".into(), "infinity".into()];
            }
            let program = which(&argv[0]).ok_or_else(|| ContainerError::NoExecutable {
                container: container.name.clone(),
                program: argv[0].clone(),
            })?;
            return Ok(Launch {
                program,
                args: argv[1..].to_vec(),
                env,
            });
        }
        // An app image runs the built-in, given the container's command
        // without the image's own entrypoint, and its args.
        if let Some(argv) = app.argv(&command, &args) {
            return Ok(Launch {
                program: sample_app.to_path_buf(),
                args: argv,
                env,
            });
        }
    }
    Err(ContainerError::UnknownImage(image))
}

/// Looks a program up like a shell: a path as is (its base name on the host
/// if the image's path does not exist here, e.g. `/usr/bin/curl` vs
/// `/bin/curl`), else on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.is_absolute() && p.is_file() {
        return Some(p.to_path_buf());
    }
    let base = p.file_name()?.to_str()?;
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(base))
        .find(|c| c.is_file())
}

fn environment(
    pod: &Pod,
    container: &Container,
    rt: &Runtime,
) -> Result<Vec<(String, String)>, ContainerError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let name = meta.name.clone().unwrap_or_default();
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOSTNAME".to_string(), name.clone()),
        ("HOME".to_string(), "/root".to_string()),
    ];
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &env),
            (None, None) => String::new(),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.as_str())
                    .ok_or_else(|| ContainerError::Env {
                        container: container.name.clone(),
                        var: var.name.clone(),
                        reason: "only `value` and `valueFrom.fieldRef` are supported by the local kubelet".into(),
                    })?;
                match field {
                    "metadata.name" => name.clone(),
                    "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                    "metadata.uid" => meta.uid.clone().unwrap_or_default(),
                    "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
                    "spec.serviceAccountName" => spec
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into()),
                    "status.podIP" => rt.pod_ip.clone(),
                    "status.hostIP" => rt.host_ip.clone(),
                    other => {
                        if let Some(key) = other
                            .strip_prefix("metadata.labels['")
                            .and_then(|k| k.strip_suffix("']"))
                        {
                            meta.labels
                                .as_ref()
                                .and_then(|l| l.get(key).cloned())
                                .unwrap_or_default()
                        } else if let Some(key) = other
                            .strip_prefix("metadata.annotations['")
                            .and_then(|k| k.strip_suffix("']"))
                        {
                            meta.annotations
                                .as_ref()
                                .and_then(|l| l.get(key).cloned())
                                .unwrap_or_default()
                        } else {
                            return Err(ContainerError::Env {
                                container: container.name.clone(),
                                var: var.name.clone(),
                                reason: format!("unsupported fieldRef {other:?}"),
                            });
                        }
                    }
                }
            }
        };
        env.retain(|(k, _)| k != &var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// `$(VAR)` references to earlier variables, as the kubelet expands them;
/// `$$` escapes.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(end) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let key = &tail[2..2 + end];
            match env.iter().rev().find(|(k, _)| k == key) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &tail[end + 3..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec};
    use kube::api::ObjectMeta;

    fn pod(container: Container) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("reviews-v2-abc".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![container],
                node_name: Some("node1".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field(var: &str, path: &str) -> EnvVar {
        EnvVar {
            name: var.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn env_resolves_values_field_refs_and_references() {
        let c = Container {
            name: "app".into(),
            env: Some(vec![
                EnvVar {
                    name: "A".into(),
                    value: Some("x".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "B".into(),
                    value: Some("$(A)-$(HOSTNAME)-$$(A)-$(NOPE)".into()),
                    ..Default::default()
                },
                field("NODE", "spec.nodeName"),
                field("IP", "status.podIP"),
            ]),
            ..Default::default()
        };
        let p = pod(c.clone());
        let rt = Runtime {
            pod_ip: "10.244.1.7".into(),
            host_ip: "172.30.0.11".into(),
            mounts: Vec::new(),
        };
        let env = environment(&p, &c, &rt).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOSTNAME"), Some("reviews-v2-abc"));
        assert_eq!(get("B"), Some("x-reviews-v2-abc-$(A)-$(NOPE)"));
        assert_eq!(get("NODE"), Some("node1"));
        assert_eq!(get("IP"), Some("10.244.1.7"));
    }

    #[test]
    fn unsupported_sources_and_unknown_images_are_named() {
        let mut bad = field("X", "metadata.generation");
        let c = Container {
            name: "app".into(),
            image: Some("docker.io/istio/examples-bookinfo-ratings-v1:1.20.1".into()),
            env: Some(vec![bad.clone()]),
            ..Default::default()
        };
        let err = resolve(&pod(c.clone()), &c, &Runtime::default(), Path::new("/x")).unwrap_err();
        assert_eq!(err.reason(), "CreateContainerConfigError");
        assert!(err.to_string().contains("metadata.generation"), "{err}");
        bad.value_from = None;
        bad.value = Some("1".into());
        let c = Container {
            name: "app".into(),
            image: Some("example.com/unknown:1".into()),
            env: Some(vec![bad]),
            ..Default::default()
        };
        let err = resolve(&pod(c.clone()), &c, &Runtime::default(), Path::new("/x")).unwrap_err();
        assert_eq!(err.reason(), "ErrImagePull");
    }

    #[test]
    fn mesh_images_name_workspace_binaries() {
        assert_eq!(
            mesh_binary("ghcr.io/ambient-mesh/waypoint:0.1.0"),
            Some("waypoint")
        );
        assert_eq!(mesh_binary("ambient-mesh/ztunnel"), Some("ztunnel"));
        assert_eq!(mesh_binary("ghcr.io/other/waypoint:1"), None);
        assert_eq!(mesh_binary("localhost:5000/ambient-mesh/nope:1"), None);
    }

    #[test]
    fn tool_images_run_host_commands_and_apps_run_the_builtin() {
        let c = Container {
            name: "curl".into(),
            image: Some("curlimages/curl".into()),
            command: Some(vec!["/bin/sleep".into(), "infinity".into()]),
            ..Default::default()
        };
        let l = resolve(&pod(c.clone()), &c, &Runtime::default(), Path::new("/x")).unwrap();
        assert!(l.program.ends_with("sleep"), "{l:?}");
        assert_eq!(l.args, vec!["infinity".to_string()]);
        let c = Container {
            name: "ratings".into(),
            image: Some("docker.io/istio/examples-bookinfo-ratings-v1:1.20.1".into()),
            ..Default::default()
        };
        let l = resolve(
            &pod(c.clone()),
            &c,
            &Runtime::default(),
            Path::new("/x/sample-app"),
        )
        .unwrap();
        assert_eq!(l.program, Path::new("/x/sample-app"));
        assert!(!l.args.is_empty());
    }
}
