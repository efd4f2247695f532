//! Publishes the mesh's root certificate as the ConfigMap
//! `istio-ca-root-cert` (key `root-cert.pem`) in every discovered namespace,
//! as istiod does.
//!
//! It is how workloads and node proxies learn what to trust before they
//! hold any certificate: the ztunnel DaemonSet mounts it to verify
//! istiod-lite's serving certificate on 15012. Off the traffic path.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use mesh_core::drain;

/// Name of the ConfigMap, as Istio names it.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Key of the PEM inside it.
pub const ROOT_KEY: &str = "root-cert.pem";
const FIELD_MANAGER: &str = "istiod-lite";

/// Errors writing one namespace's ConfigMap.
#[derive(Debug, thiserror::Error)]
pub enum RootCmError {
    /// The API server refused or could not be reached.
    #[error("publishing {ROOT_CONFIGMAP} in {namespace}: {source}")]
    Apply {
        /// The namespace.
        namespace: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// Writes (server-side apply) the ConfigMap into one namespace.
pub async fn publish(client: &Client, namespace: &str, root_pem: &str) -> Result<(), RootCmError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "istio.io/config".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ROOT_KEY.to_string(),
            root_pem.to_string(),
        )])),
        ..Default::default()
    };
    // Typed apply needs apiVersion/kind in the body.
    let mut body = serde_json::to_value(&cm).unwrap_or_default();
    body["apiVersion"] = "v1".into();
    body["kind"] = "ConfigMap".into();
    api.patch(
        ROOT_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(|source| RootCmError::Apply {
        namespace: namespace.to_string(),
        source,
    })
}

fn selected(ns: &Namespace, selector: &BTreeMap<String, String>) -> bool {
    let labels = ns.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Keeps the ConfigMap in every namespace matching `selector` (all when
/// empty) until drained: on start (the watch's initial list) and whenever
/// a namespace appears or starts matching.
pub async fn run(
    client: Client,
    root_pem: String,
    selector: BTreeMap<String, String>,
    drain: drain::Watch,
) {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut stream = Box::pin(
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .filter_map(|r| async move {
                match r {
                    Ok(Event::Apply(ns) | Event::InitApply(ns)) => Some(ns),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "namespace watch failed; retrying");
                        None
                    }
                }
            }),
    );
    loop {
        let ns = tokio::select! {
            n = stream.next() => match n {
                Some(ns) => ns,
                None => return,
            },
            _ = drain.signaled() => return,
        };
        if ns.metadata.deletion_timestamp.is_some() || !selected(&ns, &selector) {
            continue;
        }
        let name = ns.name_any();
        // Server-side apply of identical content is a no-op on the server.
        if let Err(e) = publish(&client, &name, &root_pem).await {
            tracing::warn!(error = %e, "root certificate not published");
        }
    }
}
