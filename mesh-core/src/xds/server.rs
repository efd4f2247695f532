//! Control-plane side of delta ADS: the stream istiod-lite serves to each
//! ztunnel, carrying Workload API resources out of a shared store.
//!
//! Each connection tracks, per type URL, what the node subscribed to and
//! which version of each resource it holds, so a store change results in a
//! response with only the changed resources and the removals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::Stream;
use pbjson_types::Any;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::WILDCARD;
use crate::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

/// Errors of the xDS server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store lock was poisoned by a panicking writer.
    #[error("resource store lock poisoned")]
    Poisoned,
}

/// One stored resource: its version and encoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Opaque per-resource version, changed on every content change.
    pub version: String,
    /// The resource, packed with its type URL.
    pub resource: Any,
}

#[derive(Default)]
struct StoreInner {
    /// Copy-on-write per type: a push takes an `Arc` of the map instead of
    /// copying every resource, and a writer copies only while a push still
    /// holds the previous map.
    types: HashMap<String, Arc<BTreeMap<String, Entry>>>,
    next_version: u64,
}

/// Versioned resources by type URL then name, shared by every connection.
pub struct ResourceStore {
    inner: RwLock<StoreInner>,
    changed: watch::Sender<u64>,
}

impl Default for ResourceStore {
    fn default() -> Self {
        Self {
            inner: RwLock::new(StoreInner::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl ResourceStore {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Inserts or replaces a resource; returns its version. Re-upserting the
    /// same bytes keeps the version so nodes are not pushed a no-op.
    pub fn upsert(&self, type_url: &str, name: &str, resource: Any) -> Result<String, ServerError> {
        let mut inner = self.inner.write().map_err(|_| ServerError::Poisoned)?;
        if let Some(e) = inner.types.get(type_url).and_then(|m| m.get(name)) {
            if e.resource == resource {
                return Ok(e.version.clone());
            }
        }
        inner.next_version += 1;
        let version = inner.next_version.to_string();
        Arc::make_mut(inner.types.entry(type_url.to_string()).or_default()).insert(
            name.to_string(),
            Entry {
                version: version.clone(),
                resource,
            },
        );
        drop(inner);
        self.changed.send_modify(|n| *n += 1);
        Ok(version)
    }

    /// Applies many upserts and removals of one type under one lock and
    /// one change notification (a translation batch). Unchanged bytes keep
    /// their version. Returns how many entries changed.
    pub fn apply(
        &self,
        type_url: &str,
        upserts: impl IntoIterator<Item = (String, Any)>,
        removes: impl IntoIterator<Item = String>,
    ) -> Result<usize, ServerError> {
        let mut inner = self.inner.write().map_err(|_| ServerError::Poisoned)?;
        let StoreInner {
            types,
            next_version,
        } = &mut *inner;
        let map = Arc::make_mut(types.entry(type_url.to_string()).or_default());
        let mut changed = 0;
        for (name, resource) in upserts {
            if map.get(&name).is_some_and(|e| e.resource == resource) {
                continue;
            }
            *next_version += 1;
            map.insert(
                name,
                Entry {
                    version: next_version.to_string(),
                    resource,
                },
            );
            changed += 1;
        }
        for name in removes {
            if map.remove(&name).is_some() {
                changed += 1;
            }
        }
        drop(inner);
        if changed > 0 {
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(changed)
    }

    /// Removes a resource; returns whether it existed.
    pub fn remove(&self, type_url: &str, name: &str) -> Result<bool, ServerError> {
        let mut inner = self.inner.write().map_err(|_| ServerError::Poisoned)?;
        let existed = inner
            .types
            .get_mut(type_url)
            .is_some_and(|m| m.contains_key(name) && Arc::make_mut(m).remove(name).is_some());
        drop(inner);
        if existed {
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(existed)
    }

    /// Every resource of one type, as of now (a shared, immutable view).
    pub fn snapshot(&self, type_url: &str) -> Result<Arc<BTreeMap<String, Entry>>, ServerError> {
        let inner = self.inner.read().map_err(|_| ServerError::Poisoned)?;
        Ok(inner.types.get(type_url).cloned().unwrap_or_default())
    }

    /// Notifies on every change (the value is a change counter).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Decides what a node may see; called for every resource pushed.
pub trait Authorizer: Send + Sync + 'static {
    /// Whether `node_id` may receive resource `name` of `type_url`.
    fn allow(&self, node_id: &str, type_url: &str, name: &str) -> bool;
}

/// Lets every node see everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn allow(&self, _: &str, _: &str, _: &str) -> bool {
        true
    }
}

/// Authenticates a stream before anything is sent on it (the bearer token
/// in its metadata, in the control plane). Returns who the caller is, for
/// logs.
pub trait StreamAuthenticator: Send + Sync + 'static {
    /// `Err` ends the stream with that status before any response.
    fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> futures::future::BoxFuture<'static, Result<String, Status>>;
}

/// What happened on a connection, for metrics and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A new stream started.
    Connected,
    /// A response was sent.
    Sent {
        /// Node id of the stream.
        node: String,
        /// Type URL of the response.
        type_url: String,
        /// Number of resources upserted.
        resources: usize,
        /// Number of names removed.
        removed: usize,
    },
    /// The node accepted a response.
    Ack {
        /// Node id of the stream.
        node: String,
        /// Type URL answered.
        type_url: String,
        /// Nonce answered.
        nonce: String,
    },
    /// The node rejected a response.
    Nack {
        /// Node id of the stream.
        node: String,
        /// Type URL answered.
        type_url: String,
        /// Nonce answered.
        nonce: String,
        /// The node's error message.
        message: String,
    },
}

/// The delta ADS service; wrap with [`XdsServer::into_service`].
#[derive(Clone)]
pub struct XdsServer {
    store: Arc<ResourceStore>,
    authorizer: Arc<dyn Authorizer>,
    authenticator: Option<Arc<dyn StreamAuthenticator>>,
    debounce: Duration,
    events: broadcast::Sender<ServerEvent>,
    kick: watch::Sender<u64>,
}

impl XdsServer {
    /// A server over `store` letting every node see everything.
    pub fn new(store: Arc<ResourceStore>) -> Self {
        Self {
            store,
            authorizer: Arc::new(AllowAll),
            authenticator: None,
            debounce: Duration::from_millis(10),
            events: broadcast::channel(1024).0,
            kick: watch::channel(0).0,
        }
    }

    /// Restricts what each node may see.
    pub fn with_authorizer(mut self, authorizer: Arc<dyn Authorizer>) -> Self {
        self.authorizer = authorizer;
        self
    }

    /// Requires every stream to authenticate first.
    pub fn with_authenticator(mut self, authn: Arc<dyn StreamAuthenticator>) -> Self {
        self.authenticator = Some(authn);
        self
    }

    /// How long to gather store changes before pushing.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Connection events (sends, ACKs, NACKs).
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.events.subscribe()
    }

    /// Ends every open stream with `UNAVAILABLE` so nodes reconnect (e.g.
    /// to rebalance across control-plane replicas).
    pub fn disconnect_all(&self) {
        self.kick.send_modify(|n| *n += 1);
    }

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        if let Some(authn) = &self.authenticator {
            match authn.authenticate(request.metadata()).await {
                Ok(caller) => tracing::debug!(%caller, "xds stream authenticated"),
                Err(status) => {
                    tracing::warn!(error = %status.message(), "xds stream refused");
                    return Err(status);
                }
            }
        }
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection {
            server: self.clone(),
            node: String::new(),
            types: HashMap::new(),
            nonce: 0,
            tx,
        };
        let _ = self.events.send(ServerEvent::Connected);
        tokio::spawn(conn.run(incoming));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: HashSet<String>,
    /// name -> version the node holds (or was last sent).
    sent: HashMap<String, String>,
    responded: bool,
}

struct Connection {
    server: XdsServer,
    node: String,
    types: HashMap<String, TypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Connection {
    async fn run(mut self, mut incoming: Streaming<DeltaDiscoveryRequest>) {
        let mut changes = self.server.store.watch();
        changes.mark_unchanged();
        let mut kick = self.server.kick.subscribe();
        kick.mark_unchanged();
        loop {
            tokio::select! {
                msg = incoming.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(e) = self.on_request(req).await {
                            tracing::debug!(node = %self.node, error = %e, "xds stream closed");
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(node = %self.node, error = %e, "xds stream ended");
                        return;
                    }
                },
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Gather a burst of store writes into one push.
                    tokio::time::sleep(self.server.debounce).await;
                    changes.mark_unchanged();
                    // New and changed resources go out referenced-first, removals
                    // referencing-first, so a client never holds a reference
                    // (a workload's policy names) to something it lacks.
                    let order = push_order(self.types.keys().cloned().collect());
                    for t in &order {
                        if self.push(t, Part::Upserts).await.is_err() {
                            return;
                        }
                    }
                    for t in order.iter().rev() {
                        if self.push(t, Part::Removals).await.is_err() {
                            return;
                        }
                    }
                },
                _ = kick.changed() => {
                    let _ = self.tx.send(Err(Status::unavailable("control plane asked to reconnect"))).await;
                    return;
                }
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), SendFailed> {
        if self.node.is_empty() {
            if let Some(node) = &req.node {
                self.node = node.id.clone();
            }
        }
        let type_url = req.type_url.clone();
        if !req.response_nonce.is_empty() {
            let event = match &req.error_detail {
                Some(status) => {
                    // The node keeps its last good state; resending the
                    // same version would only be rejected again.
                    tracing::warn!(node = %self.node, type_url = %type_url,
                        nonce = %req.response_nonce, error = %status.message, "xds NACK");
                    ServerEvent::Nack {
                        node: self.node.clone(),
                        type_url: type_url.clone(),
                        nonce: req.response_nonce.clone(),
                        message: status.message.clone(),
                    }
                }
                None => ServerEvent::Ack {
                    node: self.node.clone(),
                    type_url: type_url.clone(),
                    nonce: req.response_nonce.clone(),
                },
            };
            let _ = self.server.events.send(event);
        }
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        let mut interest_changed = first;
        if first {
            state.sent = req.initial_resource_versions.clone().into_iter().collect();
            let sub_wild = req.resource_names_subscribe.iter().any(|n| n == WILDCARD);
            let unsub_wild = req.resource_names_unsubscribe.iter().any(|n| n == WILDCARD);
            // Istio's on-demand rule: `*` both subscribed and unsubscribed
            // in the first request means "nothing yet"; an empty first
            // request is the legacy implicit wildcard.
            state.wildcard = if sub_wild && unsub_wild {
                false
            } else {
                sub_wild || req.resource_names_subscribe.is_empty()
            };
        } else {
            for n in &req.resource_names_subscribe {
                if n == WILDCARD {
                    state.wildcard = true;
                }
                interest_changed = true;
            }
            for n in &req.resource_names_unsubscribe {
                if n == WILDCARD {
                    state.wildcard = false;
                }
                interest_changed = true;
            }
        }
        for n in &req.resource_names_subscribe {
            if n != WILDCARD {
                state.names.insert(n.clone());
                // Subscribing must always be answered, even if the server
                // believes the node already holds it.
                if !first {
                    state.sent.remove(n);
                }
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n != WILDCARD {
                state.names.remove(n);
                state.sent.remove(n);
            }
        }
        if interest_changed {
            self.push(&type_url, Part::Both).await?;
        }
        Ok(())
    }

    async fn push(&mut self, type_url: &str, part: Part) -> Result<(), SendFailed> {
        let snapshot = match self.server.store.snapshot(type_url) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "xds store unreadable");
                return Ok(());
            }
        };
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let mut resources = Vec::new();
        let mut wanted = HashSet::new();
        for (name, entry) in snapshot.iter() {
            if !(state.wildcard || state.names.contains(name)) {
                continue;
            }
            if !self.server.authorizer.allow(&self.node, type_url, name) {
                continue;
            }
            wanted.insert(name.as_str());
            if part != Part::Removals && state.sent.get(name) != Some(&entry.version) {
                resources.push(Resource {
                    version: entry.version.clone(),
                    resource: Some(entry.resource.clone()),
                    name: name.clone(),
                    aliases: Vec::new(),
                });
            }
        }
        let mut removed: Vec<String> = if part == Part::Upserts {
            Vec::new()
        } else {
            state
                .sent
                .keys()
                .filter(|n| !wanted.contains(n.as_str()))
                .cloned()
                .collect()
        };
        removed.sort();
        // The first response is sent even when empty: it tells the node it
        // has seen the control plane's full view (readiness).
        if resources.is_empty() && removed.is_empty() && state.responded {
            return Ok(());
        }
        state.responded = true;
        for r in &resources {
            state.sent.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            state.sent.remove(n);
        }
        self.nonce += 1;
        let event = ServerEvent::Sent {
            node: self.node.clone(),
            type_url: type_url.to_string(),
            resources: resources.len(),
            removed: removed.len(),
        };
        let resp = DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: type_url.to_string(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        };
        self.tx.send(Ok(resp)).await.map_err(|_| SendFailed)?;
        let _ = self.server.events.send(event);
        Ok(())
    }
}

/// Which changes of a type one push sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Upserts,
    Removals,
    Both,
}

/// Types other types refer to by name, sent before them (Istio's
/// `Workload.authorization_policies` names `Authorization` resources).
const REFERENCED_FIRST: &[&str] = &["type.googleapis.com/istio.security.Authorization"];

/// Subscribed types in push order: referenced types first, then the rest by
/// name (deterministic).
fn push_order(mut types: Vec<String>) -> Vec<String> {
    types.sort_by_key(|t| {
        let rank = REFERENCED_FIRST
            .iter()
            .position(|r| r == t)
            .unwrap_or(REFERENCED_FIRST.len());
        (rank, t.clone())
    });
    types
}

/// The response channel closed: the peer is gone.
#[derive(Debug)]
struct SendFailed;

impl std::fmt::Display for SendFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response stream closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: u8) -> Any {
        Any {
            type_url: "t".into(),
            value: vec![v].into(),
        }
    }

    #[test]
    fn same_bytes_keep_version_and_do_not_notify() {
        let store = ResourceStore::new();
        let rx = store.watch();
        let v1 = store.upsert("t", "a", any(1)).unwrap();
        assert!(rx.has_changed().unwrap());
        let mut rx = store.watch();
        rx.mark_unchanged();
        assert_eq!(store.upsert("t", "a", any(1)).unwrap(), v1);
        assert!(!rx.has_changed().unwrap());
        let v2 = store.upsert("t", "a", any(2)).unwrap();
        assert_ne!(v1, v2);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn remove_reports_existence() {
        let store = ResourceStore::new();
        store.upsert("t", "a", any(1)).unwrap();
        assert!(store.remove("t", "a").unwrap());
        assert!(!store.remove("t", "a").unwrap());
        assert!(store.snapshot("t").unwrap().is_empty());
    }
}

#[cfg(test)]
mod order_tests {
    use super::push_order;

    #[test]
    fn authorizations_are_pushed_before_the_addresses_that_name_them() {
        let order = push_order(vec![
            "type.googleapis.com/istio.workload.Address".into(),
            "type.googleapis.com/istio.security.Authorization".into(),
            "type.googleapis.com/a.Other".into(),
        ]);
        assert_eq!(
            order,
            [
                "type.googleapis.com/istio.security.Authorization",
                "type.googleapis.com/a.Other",
                "type.googleapis.com/istio.workload.Address",
            ]
        );
    }
}
