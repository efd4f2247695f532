//! Whether a pod belongs in the mesh, asked of the API server directly.
//!
//! Only used while a pod's network is being set up and the node agent
//! cannot be reached: the plugin must not let an enrolled pod start without
//! capture (its traffic would leave the node in clear), and must not block
//! pods outside the mesh because the mesh is down. So it reads the pod's
//! namespace and the pod itself with the configured kubeconfig and applies
//! the same labels the agent does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use crate::args::PodRef;

/// Label on a namespace or pod: `ambient` enrolls, `none` on a pod opts it
/// out of an enrolled namespace.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

/// Errors of the API lookup.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    // Only the first line: parse errors go on to quote the file, and a
    // kubeconfig holds credentials.
    #[error("reading kubeconfig {path}: {}", first_line(source))]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kube client from {path}: {source}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    #[error("reading {what} from the API server: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The outcome, with the reason kept for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrollment {
    /// The pod carries `istio.io/dataplane-mode=ambient`.
    PodLabel,
    /// Its namespace carries `istio.io/dataplane-mode=ambient`.
    NamespaceLabel,
    /// The pod carries `istio.io/dataplane-mode=none`.
    OptedOut,
    /// Neither carries the label.
    NotEnrolled,
}

impl Enrollment {
    pub fn enrolled(self) -> bool {
        matches!(self, Enrollment::PodLabel | Enrollment::NamespaceLabel)
    }

    /// Why, for messages about `pod`.
    pub fn reason(self, pod: &PodRef) -> String {
        let l = DATAPLANE_MODE_LABEL;
        match self {
            Enrollment::PodLabel => format!("pod {pod} has {l}={DATAPLANE_MODE_AMBIENT}"),
            Enrollment::NamespaceLabel => format!(
                "namespace {} has {l}={DATAPLANE_MODE_AMBIENT}",
                pod.namespace
            ),
            Enrollment::OptedOut => format!("pod {pod} has {l}={DATAPLANE_MODE_NONE}"),
            Enrollment::NotEnrolled => {
                format!("neither pod {pod} nor its namespace has {l}={DATAPLANE_MODE_AMBIENT}")
            }
        }
    }
}

/// The decision from the labels (`None`: object not found, no labels).
pub fn decide(
    namespace: Option<&BTreeMap<String, String>>,
    pod: Option<&BTreeMap<String, String>>,
) -> Enrollment {
    fn mode(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
        labels
            .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str)
    }
    match (mode(pod), mode(namespace)) {
        (Some(DATAPLANE_MODE_NONE), _) => Enrollment::OptedOut,
        (Some(DATAPLANE_MODE_AMBIENT), _) => Enrollment::PodLabel,
        (_, Some(DATAPLANE_MODE_AMBIENT)) => Enrollment::NamespaceLabel,
        _ => Enrollment::NotEnrolled,
    }
}

/// Reads the namespace and pod with `kubeconfig`, all within `timeout`.
/// A pod or namespace that is not found counts as unlabelled: the kubelet
/// may start a static pod before its mirror object exists.
pub async fn lookup(
    kubeconfig: &Path,
    pod: &PodRef,
    timeout: Duration,
) -> Result<Enrollment, EnrollError> {
    tokio::time::timeout(timeout, lookup_inner(kubeconfig, pod, timeout))
        .await
        .unwrap_or(Err(EnrollError::Timeout(timeout)))
}

async fn lookup_inner(
    kubeconfig: &Path,
    pod: &PodRef,
    timeout: Duration,
) -> Result<Enrollment, EnrollError> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|source| EnrollError::Kubeconfig {
        path: kubeconfig.to_path_buf(),
        source,
    })?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| EnrollError::Kubeconfig {
            path: kubeconfig.to_path_buf(),
            source,
        })?;
    cfg.connect_timeout = Some(timeout);
    cfg.read_timeout = Some(timeout);
    let client = Client::try_from(cfg).map_err(|source| EnrollError::Client {
        path: kubeconfig.to_path_buf(),
        source,
    })?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
    let (ns, p) = tokio::join!(namespaces.get_opt(&pod.namespace), pods.get_opt(&pod.name));
    let ns = ns.map_err(|source| EnrollError::Api {
        what: format!("namespace {}", pod.namespace),
        source,
    })?;
    let p = p.map_err(|source| EnrollError::Api {
        what: format!("pod {pod}"),
        source,
    })?;
    Ok(decide(
        ns.as_ref().and_then(|n| n.metadata.labels.as_ref()),
        p.as_ref().and_then(|p| p.metadata.labels.as_ref()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(mode: Option<&str>) -> Option<BTreeMap<String, String>> {
        mode.map(|m| {
            BTreeMap::from([
                (DATAPLANE_MODE_LABEL.to_string(), m.to_string()),
                ("app".to_string(), "web".to_string()),
            ])
        })
    }

    #[test]
    fn label_table() {
        use Enrollment::*;
        let cases = [
            (None, None, NotEnrolled),
            (Some("ambient"), None, NamespaceLabel),
            (Some("ambient"), Some("none"), OptedOut),
            (Some("ambient"), Some("sidecar"), NamespaceLabel),
            (None, Some("ambient"), PodLabel),
            (Some("none"), Some("ambient"), PodLabel),
            (Some("none"), None, NotEnrolled),
            (Some("Ambient"), None, NotEnrolled),
            (None, Some("none"), OptedOut),
        ];
        for (ns, pod, want) in cases {
            let got = decide(labels(ns).as_ref(), labels(pod).as_ref());
            assert_eq!(got, want, "namespace {ns:?}, pod {pod:?}");
        }
        // An object with labels but not this one.
        let other = BTreeMap::from([("app".to_string(), "x".to_string())]);
        assert_eq!(decide(Some(&other), Some(&other)), NotEnrolled);
    }

    #[tokio::test]
    async fn unreadable_kubeconfig_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "token: s3cr3t\nnot: [valid").unwrap();
        let pod = PodRef {
            name: "p".into(),
            namespace: "n".into(),
            uid: String::new(),
        };
        for p in [path.clone(), dir.path().join("missing")] {
            let e = lookup(&p, &pod, Duration::from_secs(5)).await.unwrap_err();
            assert!(matches!(e, EnrollError::Kubeconfig { .. }), "{e}");
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            assert!(!e.to_string().contains("s3cr3t"), "{e}");
        }
    }
}
