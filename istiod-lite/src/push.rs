//! From translator to the wire: applies source batches to the translator
//! and publishes what changed into the xDS resource store, which pushes it
//! to every connected ztunnel, and the waypoint `ServiceRoutes` to every
//! connected waypoint.
//!
//! Batches that arrive together are applied together, so a burst of
//! Kubernetes events (a Deployment rolling) becomes one store update and
//! one push, not one per pod.

use std::sync::{Arc, Mutex, MutexGuard};

use mesh_core::drain;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use mesh_core::xds::server::ResourceStore;
use pbjson_types::Any;
use prost::Message;
use tokio::sync::mpsc;

use crate::ca::NodeLookup;
use crate::translate::{Changes, Event, Translator};

/// Errors publishing to the store.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The resource store is unusable.
    #[error("resource store: {0}")]
    Store(#[from] mesh_core::xds::server::ServerError),
}

/// The translator, shared by the push loop and the CA's node checks.
#[derive(Clone)]
pub struct SharedTranslator(Arc<Mutex<Translator>>);

impl SharedTranslator {
    /// Wraps a translator.
    pub fn new(t: Translator) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }

    /// Exclusive access; a panic while held does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, Translator> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NodeLookup for SharedTranslator {
    fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        self.lock().pod_node(namespace, name)
    }

    fn identity_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.lock()
            .identity_on_node(namespace, service_account, node)
    }
}

/// Encodes translator output into the store: new and changed
/// `Authorization`s first, then addresses, then removed `Authorization`s, so
/// a workload never names a policy the proxies have not been sent yet, and
/// a policy is withdrawn only after the workloads stopped naming it.
/// Waypoint `ServiceRoutes` follow (they name services, which are in by
/// then). Returns the number of resources written.
pub fn publish(store: &ResourceStore, changes: Changes) -> Result<usize, PushError> {
    let mut n = 0;
    if !changes.policy_upserts.is_empty() {
        n += store.apply(
            AUTHORIZATION_TYPE_URL,
            changes
                .policy_upserts
                .into_iter()
                .map(|(name, p)| (name, pack(AUTHORIZATION_TYPE_URL, &p))),
            Vec::new(),
        )?;
    }
    if !changes.upserts.is_empty() || !changes.removes.is_empty() {
        n += store.apply(
            ADDRESS_TYPE_URL,
            changes
                .upserts
                .into_iter()
                .map(|(name, a)| (name, pack(ADDRESS_TYPE_URL, &a))),
            changes.removes,
        )?;
    }
    if !changes.route_upserts.is_empty() || !changes.route_removes.is_empty() {
        n += store.apply(
            SERVICE_ROUTES_TYPE_URL,
            changes
                .route_upserts
                .into_iter()
                .map(|(name, r)| (name, pack(SERVICE_ROUTES_TYPE_URL, &r))),
            changes.route_removes,
        )?;
    }
    if !changes.policy_removes.is_empty() {
        n += store.apply(
            AUTHORIZATION_TYPE_URL,
            std::iter::empty(),
            changes.policy_removes,
        )?;
    }
    Ok(n)
}

fn pack(type_url: &str, m: &impl Message) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec().into(),
    }
}

/// Asks [`run`] to confirm once everything queued before the request is in
/// the store (the answer comes on the enclosed sender).
pub type FlushRequest = tokio::sync::oneshot::Sender<()>;

/// Applies batches from the sources until they close or drain begins. A
/// request on `flush` is answered after every batch sent before it has been
/// published (how start-up knows the first full view is in the store).
pub async fn run(
    mut batches: mpsc::UnboundedReceiver<Vec<Event>>,
    mut flush: mpsc::UnboundedReceiver<FlushRequest>,
    translator: SharedTranslator,
    store: Arc<ResourceStore>,
    drain: drain::Watch,
) -> Result<(), PushError> {
    let mut flush_open = true;
    loop {
        let (first, reply) = tokio::select! {
            b = batches.recv() => match b {
                Some(b) => (b, None),
                None => return Ok(()),
            },
            f = flush.recv(), if flush_open => match f {
                Some(reply) => (Vec::new(), Some(reply)),
                None => {
                    flush_open = false;
                    continue;
                }
            },
            _ = drain.signaled() => return Ok(()),
        };
        let changes = {
            let mut t = translator.lock();
            let mut events = first.len();
            for ev in first {
                t.apply(ev);
            }
            // Take whatever else is already queued: one push for a burst.
            while let Ok(more) = batches.try_recv() {
                events += more.len();
                for ev in more {
                    t.apply(ev);
                }
            }
            let c = t.take_changes();
            tracing::debug!(
                events,
                upserts = c.upserts.len(),
                removes = c.removes.len(),
                routes = c.route_upserts.len() + c.route_removes.len(),
                "translated"
            );
            c
        };
        if !changes.is_empty() {
            publish(&store, changes)?;
        }
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::MeshConfig;
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::ObjectMeta;

    fn service(name: &str) -> Event {
        Event::Service(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(Default::default()),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_flush_is_answered_after_everything_queued_before_it() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let store = ResourceStore::new();
        let (_trigger, drain) = drain::new();
        // Queued before the loop even runs, in several batches.
        tx.send(vec![Event::Namespace(Namespace {
            metadata: ObjectMeta {
                name: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        })])
        .unwrap();
        for i in 0..50 {
            tx.send(vec![service(&format!("s{i}"))]).unwrap();
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        flush_tx.send(done_tx).unwrap();
        tokio::spawn(run(
            rx,
            flush_rx,
            SharedTranslator::new(Translator::new(MeshConfig::default())),
            store.clone(),
            drain,
        ));
        tokio::time::timeout(std::time::Duration::from_secs(10), done_rx)
            .await
            .expect("flush answered")
            .unwrap();
        assert_eq!(store.snapshot(ADDRESS_TYPE_URL).unwrap().len(), 50);
    }
}
