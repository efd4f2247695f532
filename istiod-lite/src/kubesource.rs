//! The Kubernetes source: watches Namespaces, Pods and Services on the API
//! server and feeds them to the translator as [`Event`]s.
//!
//! It is the control plane's only view of the cluster, upstream of every
//! Workload API push. Watches are kube-runtime watchers (list, then watch,
//! relisting with backoff when the watch breaks). A relist is turned into
//! a diff against what the watcher had reported before, so objects deleted
//! while the watch was down are still removed downstream.

use std::collections::HashSet;
use std::fmt::Debug;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use mesh_core::drain;
use mesh_core::readiness::BlockReady;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::translate::Event;

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The translator side of the channel is gone (shutting down).
    #[error("translator input closed")]
    Closed,
}

/// Which object kind a watch reports, and how to turn it into events.
trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const NAME: &'static str;
    fn key(&self) -> (String, String) {
        (self.namespace().unwrap_or_default(), self.name_any())
    }
    fn upsert(self) -> Event;
    fn deleted(key: (String, String)) -> Event;
}

impl Kind for Namespace {
    const NAME: &'static str = "namespaces";
    fn upsert(self) -> Event {
        Event::Namespace(self)
    }
    fn deleted((_, name): (String, String)) -> Event {
        Event::NamespaceDeleted(name)
    }
}

impl Kind for Pod {
    const NAME: &'static str = "pods";
    fn upsert(self) -> Event {
        Event::Pod(self)
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::PodDeleted { namespace, name }
    }
}

impl Kind for Service {
    const NAME: &'static str = "services";
    fn upsert(self) -> Event {
        Event::Service(self)
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::ServiceDeleted { namespace, name }
    }
}

/// Keys seen so far in a relist, and the events it produced.
type Relist = (HashSet<(String, String)>, Vec<Event>);

/// Turns one watcher's events into translator batches. Keeps the keys it
/// has reported so a relist can emit the deletions it implies.
struct Tracker<K: Kind> {
    known: HashSet<(String, String)>,
    relist: Option<Relist>,
    _kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Tracker<K> {
    fn new() -> Self {
        Self {
            known: HashSet::new(),
            relist: None,
            _kind: std::marker::PhantomData,
        }
    }

    /// Returns a batch to send (empty while a relist is being buffered) and
    /// whether a full list has just completed.
    fn on_event(&mut self, ev: WatchEvent<K>) -> (Vec<Event>, bool) {
        match ev {
            WatchEvent::Apply(o) => {
                self.known.insert(o.key());
                (vec![o.upsert()], false)
            }
            WatchEvent::Delete(o) => {
                let key = o.key();
                self.known.remove(&key);
                (vec![K::deleted(key)], false)
            }
            WatchEvent::Init => {
                self.relist = Some((HashSet::new(), Vec::new()));
                (Vec::new(), false)
            }
            WatchEvent::InitApply(o) => {
                let (seen, batch) = self.relist.get_or_insert_with(Default::default);
                seen.insert(o.key());
                batch.push(o.upsert());
                (Vec::new(), false)
            }
            WatchEvent::InitDone => {
                let (seen, mut batch) = self.relist.take().unwrap_or_default();
                // Whatever was known but is not in the new list was deleted
                // while the watch was down.
                batch.extend(
                    self.known
                        .difference(&seen)
                        .cloned()
                        .map(K::deleted)
                        .collect::<Vec<_>>(),
                );
                self.known = seen;
                (batch, true)
            }
        }
    }
}

fn watch<K: Kind>(client: Client) -> impl Stream<Item = (Vec<Event>, bool)> + Send {
    let api: Api<K> = Api::all(client);
    let mut tracker = Tracker::<K>::new();
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| {
            let out = match r {
                Ok(ev) => Some(tracker.on_event(ev)),
                Err(e) => {
                    // The watcher retries by itself (with backoff); the
                    // last good view keeps serving meanwhile.
                    tracing::warn!(kind = K::NAME, error = %e, "kubernetes watch failed; retrying");
                    None
                }
            };
            futures::future::ready(out)
        })
}

/// Watches the cluster until drained. Batches go to `sink`; `ready` is
/// released once every kind has been listed completely, so nothing is
/// served from a partial view of the cluster.
pub async fn run(
    client: Client,
    sink: mpsc::UnboundedSender<Vec<Event>>,
    ready: BlockReady,
    drain: drain::Watch,
) -> Result<(), KubeSourceError> {
    let tagged = |i: usize, s: std::pin::Pin<Box<dyn Stream<Item = (Vec<Event>, bool)> + Send>>| {
        s.map(move |(b, done)| (i, b, done))
    };
    let mut all = futures::stream::select_all([
        tagged(0, Box::pin(watch::<Namespace>(client.clone()))),
        tagged(1, Box::pin(watch::<Pod>(client.clone()))),
        tagged(2, Box::pin(watch::<Service>(client))),
    ]);
    let mut listed = [false; 3];
    let mut ready = Some(ready);
    loop {
        tokio::select! {
            next = all.next() => {
                let Some((i, batch, done)) = next else { return Ok(()) };
                if !batch.is_empty() {
                    sink.send(batch).map_err(|_| KubeSourceError::Closed)?;
                }
                if done && !listed[i] {
                    listed[i] = true;
                    if listed.iter().all(|l| *l) {
                        tracing::info!("kubernetes namespaces, pods and services listed");
                        ready.take();
                    }
                }
            }
            _ = drain.signaled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(ns: &str, name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(batch: &[Event]) -> Vec<String> {
        batch
            .iter()
            .map(|e| match e {
                Event::Pod(p) => format!("+{}", p.name_any()),
                Event::PodDeleted { name, .. } => format!("-{name}"),
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn relist_reports_what_vanished_meanwhile() {
        let mut t = Tracker::<Pod>::new();
        for ev in [
            WatchEvent::Init,
            WatchEvent::InitApply(pod("a", "p1")),
            WatchEvent::InitApply(pod("a", "p2")),
        ] {
            assert!(t.on_event(ev).0.is_empty(), "a list is buffered until done");
        }
        let (b, done) = t.on_event(WatchEvent::InitDone);
        assert!(done);
        assert_eq!(names(&b), ["+p1", "+p2"]);
        assert_eq!(
            names(&t.on_event(WatchEvent::Apply(pod("a", "p3"))).0),
            ["+p3"]
        );
        // The watch breaks; p1 and p3 are deleted before the relist.
        t.on_event(WatchEvent::Init);
        t.on_event(WatchEvent::InitApply(pod("a", "p2")));
        let (b, _) = t.on_event(WatchEvent::InitDone);
        let mut got = names(&b);
        got.sort();
        assert_eq!(got, ["+p2", "-p1", "-p3"]);
        assert_eq!(
            names(&t.on_event(WatchEvent::Delete(pod("a", "p2"))).0),
            ["-p2"]
        );
    }
}
