//! The agent's view of the API server: watches of this node's Pods and of
//! every Namespace (kube-runtime watchers: list, then watch, relisting with
//! backoff when the watch breaks), turned into [`Change`]s for the agent,
//! and the direct reads and writes of [`Cluster`] (the pod lookup of a CNI
//! ADD, the redirection annotation). Pods enrolled by a label added while
//! they run are captured from here, without a restart.

use std::collections::HashSet;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};

use crate::agent::{BoxFuture, Cluster, ClusterError, Snapshot, REDIRECTION_ANNOTATION};

/// Errors of connecting to the API server.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("finding the cluster configuration (in-cluster or $KUBECONFIG)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the kube client")]
    Client(#[source] kube::Error),
    #[error("the kubernetes watches ended before listing everything")]
    Ended,
}

/// A client from a kubeconfig file, or the in-cluster configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, WatchError> {
    let cfg = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                WatchError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| WatchError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(WatchError::Infer)?,
    };
    Client::try_from(cfg).map_err(WatchError::Client)
}

/// [`Cluster`] on a real API server.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
}

impl KubeCluster {
    pub fn new(client: Client) -> Self {
        KubeCluster { client }
    }
}

impl Cluster for KubeCluster {
    fn lookup<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(Option<Namespace>, Option<Pod>), ClusterError>> {
        Box::pin(async move {
            let namespaces: Api<Namespace> = Api::all(self.client.clone());
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let (ns, pod) = tokio::join!(namespaces.get_opt(namespace), pods.get_opt(name));
            let ns = ns.map_err(|e| ClusterError {
                what: format!("reading namespace {namespace}"),
                reason: e.to_string(),
            })?;
            let pod = pod.map_err(|e| ClusterError {
                what: format!("reading pod {namespace}/{name}"),
                reason: e.to_string(),
            })?;
            Ok((ns, pod))
        })
    }

    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: &'static str,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({
                "metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}
            });
            pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|e| ClusterError {
                    what: format!("annotating pod {namespace}/{name}"),
                    reason: e.to_string(),
                })
        })
    }
}

/// One change the agent reacts to.
#[derive(Debug, Clone)]
pub enum Change {
    Pod(Box<Pod>),
    PodDeleted { namespace: String, name: String },
    Namespace(Box<Namespace>),
    NamespaceDeleted(String),
}

fn key<K: ResourceExt>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// Keys seen so far in a relist, and the changes it produced.
type Relist = (HashSet<(String, String)>, Vec<Change>);

/// Turns one watcher's events into changes; a relist is diffed against
/// what was known before, so objects deleted while the watch was down are
/// still reported deleted.
struct Tracker<K> {
    known: HashSet<(String, String)>,
    relist: Option<Relist>,
    upsert: fn(K) -> Change,
    deleted: fn((String, String)) -> Change,
}

impl<K: ResourceExt> Tracker<K> {
    /// The changes to apply now, and whether a full list just completed.
    fn on_event(&mut self, ev: WatchEvent<K>) -> (Vec<Change>, bool) {
        match ev {
            WatchEvent::Apply(o) => {
                self.known.insert(key(&o));
                (vec![(self.upsert)(o)], false)
            }
            WatchEvent::Delete(o) => {
                let k = key(&o);
                self.known.remove(&k);
                (vec![(self.deleted)(k)], false)
            }
            WatchEvent::Init => {
                self.relist = Some(Default::default());
                (Vec::new(), false)
            }
            WatchEvent::InitApply(o) => {
                let (seen, batch) = self.relist.get_or_insert_with(Default::default);
                seen.insert(key(&o));
                batch.push((self.upsert)(o));
                (Vec::new(), false)
            }
            WatchEvent::InitDone => {
                let (seen, mut batch) = self.relist.take().unwrap_or_default();
                batch.extend(self.known.difference(&seen).cloned().map(self.deleted));
                self.known = seen;
                (batch, true)
            }
        }
    }
}

type Tagged = Pin<Box<dyn Stream<Item = (usize, Vec<Change>, bool)> + Send>>;

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
    mut tracker: Tracker<K>,
    kind: &'static str,
) -> Tagged
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    Box::pin(
        watcher::watcher(api, config)
            .default_backoff()
            .filter_map(move |r| {
                let out = match r {
                    Ok(ev) => {
                        let (b, done) = tracker.on_event(ev);
                        Some((index, b, done))
                    }
                    Err(e) => {
                        // The watcher retries by itself; the agent keeps
                        // acting on its last view meanwhile.
                        tracing::warn!(kind, error = %e, "kubernetes watch failed; retrying");
                        None
                    }
                };
                futures::future::ready(out)
            }),
    )
}

/// The merged watches of this node's pods and of all namespaces.
pub struct Watches {
    stream: futures::stream::SelectAll<Tagged>,
}

impl Watches {
    pub fn new(client: Client, node_name: &str) -> Self {
        let pods = watch(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            0,
            Tracker {
                known: HashSet::new(),
                relist: None,
                upsert: |p| Change::Pod(Box::new(p)),
                deleted: |(namespace, name)| Change::PodDeleted { namespace, name },
            },
            "pods",
        );
        let namespaces = watch(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            1,
            Tracker {
                known: HashSet::new(),
                relist: None,
                upsert: |n| Change::Namespace(Box::new(n)),
                deleted: |(_, name)| Change::NamespaceDeleted(name),
            },
            "namespaces",
        );
        Watches {
            stream: futures::stream::select_all([pods, namespaces]),
        }
    }

    /// Waits until both kinds are listed completely and returns the lists.
    pub async fn initial(&mut self) -> Result<Snapshot, WatchError> {
        let mut listed = [false; 2];
        let mut snapshot = Snapshot::default();
        while !listed.iter().all(|l| *l) {
            let Some((i, batch, done)) = self.stream.next().await else {
                return Err(WatchError::Ended);
            };
            apply_to_snapshot(&mut snapshot, batch);
            if done {
                listed[i] = true;
            }
        }
        tracing::info!(
            pods = snapshot.pods.len(),
            namespaces = snapshot.namespaces.len(),
            "kubernetes pods and namespaces listed"
        );
        Ok(snapshot)
    }

    /// The next batch of changes; `None` when the watches ended.
    pub async fn next(&mut self) -> Option<Vec<Change>> {
        loop {
            let (_, batch, _) = self.stream.next().await?;
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }
}

/// Folds changes into a list (the initial list arrives as changes too).
pub fn apply_to_snapshot(snapshot: &mut Snapshot, batch: Vec<Change>) {
    for c in batch {
        match c {
            Change::Pod(p) => {
                let k = key(p.as_ref());
                snapshot.pods.retain(|o| key(o) != k);
                snapshot.pods.push(*p);
            }
            Change::PodDeleted { namespace, name } => {
                snapshot
                    .pods
                    .retain(|o| key(o) != (namespace.clone(), name.clone()));
            }
            Change::Namespace(n) => {
                let k = n.name_any();
                snapshot.namespaces.retain(|o| o.name_any() != k);
                snapshot.namespaces.push(*n);
            }
            Change::NamespaceDeleted(name) => snapshot.namespaces.retain(|o| o.name_any() != name),
        }
    }
}

/// Hands changes to the agent until the watches end or `stop` resolves.
pub async fn feed(
    agent: std::sync::Arc<crate::agent::Agent>,
    mut watches: Watches,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            b = watches.next() => match b {
                Some(b) => b,
                None => return,
            },
            _ = &mut stop => return,
        };
        for change in batch {
            apply(&agent, change).await;
        }
    }
}

/// Applies one change to the agent.
pub async fn apply(agent: &std::sync::Arc<crate::agent::Agent>, change: Change) {
    match change {
        Change::Pod(p) => agent.pod_changed(*p).await,
        Change::PodDeleted { namespace, name } => agent.pod_deleted(&namespace, &name).await,
        Change::Namespace(n) => agent.namespace_changed(*n).await,
        Change::NamespaceDeleted(name) => agent.namespace_deleted(&name).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("a".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn tracker() -> Tracker<Pod> {
        Tracker {
            known: HashSet::new(),
            relist: None,
            upsert: |p| Change::Pod(Box::new(p)),
            deleted: |(namespace, name)| Change::PodDeleted { namespace, name },
        }
    }

    fn names(b: &[Change]) -> Vec<String> {
        let mut v: Vec<String> = b
            .iter()
            .map(|c| match c {
                Change::Pod(p) => format!("+{}", p.name_any()),
                Change::PodDeleted { name, .. } => format!("-{name}"),
                other => format!("{other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn relist_reports_deletions_missed_while_down() {
        let mut t = tracker();
        t.on_event(WatchEvent::Init);
        t.on_event(WatchEvent::InitApply(pod("p1")));
        t.on_event(WatchEvent::InitApply(pod("p2")));
        let (b, done) = t.on_event(WatchEvent::InitDone);
        assert!(done);
        assert_eq!(names(&b), ["+p1", "+p2"]);
        let mut snap = Snapshot::default();
        apply_to_snapshot(&mut snap, b);
        assert_eq!(snap.pods.len(), 2);
        t.on_event(WatchEvent::Init);
        t.on_event(WatchEvent::InitApply(pod("p2")));
        let (b, _) = t.on_event(WatchEvent::InitDone);
        assert_eq!(names(&b), ["+p2", "-p1"]);
        apply_to_snapshot(&mut snap, b);
        assert_eq!(snap.pods.len(), 1);
        assert_eq!(names(&t.on_event(WatchEvent::Delete(pod("p2"))).0), ["-p2"]);
    }
}
