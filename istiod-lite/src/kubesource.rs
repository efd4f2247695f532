//! The Kubernetes source: watches Namespaces, Pods and Services, and the
//! `security.istio.io/v1` AuthorizationPolicies and PeerAuthentications and
//! the `networking.istio.io/v1` VirtualServices and DestinationRules, and
//! the Gateway API `HTTPRoute`s (`gateway.networking.k8s.io/v1`), on the
//! API server and feeds them to the translator as [`Event`]s.
//!
//! The Istio and Gateway API kinds are CustomResources that may not be installed yet: while
//! their CRD is missing the watch does not hold readiness (the mesh works
//! without policies) and keeps checking every few seconds; once it exists
//! its first full list is waited for like any other kind.
//!
//! It is the control plane's only view of the cluster, upstream of every
//! Workload API push. Watches are kube-runtime watchers (list, then watch,
//! relisting with backoff when the watch breaks). A relist is turned into
//! a diff against what the watcher had reported before, so objects deleted
//! while the watch was down are still removed downstream.

use std::collections::HashSet;
use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use mesh_core::drain;
use mesh_core::readiness::BlockReady;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::translate::{Event, PolicyObject};

/// How often a missing Istio CRD is looked for again.
const CRD_RETRY: Duration = Duration::from_secs(10);

/// API group and version of the Istio security kinds.
const SECURITY_GROUP: &str = "security.istio.io";
const SECURITY_VERSION: &str = "v1";
/// API group and version of the Istio traffic kinds.
const NETWORKING_GROUP: &str = "networking.istio.io";
const NETWORKING_VERSION: &str = "v1";
/// API group and version of the Gateway API route kinds.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const GATEWAY_VERSION: &str = "v1";

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The translator side of the channel is gone (shutting down).
    #[error("translator input closed")]
    Closed,
}

/// Which object kind a watch reports, and how to turn it into events.
trait Kind: Clone + Debug + Send + Sync + 'static {
    const NAME: &'static str;
    fn key(&self) -> (String, String);
    fn upsert(self) -> Event;
    fn deleted(key: (String, String)) -> Event;
}

/// A built-in kind watched with its own typed API.
trait BuiltinKind: Kind + Resource<DynamicType = ()> + DeserializeOwned {}

impl<K: Kind + Resource<DynamicType = ()> + DeserializeOwned> BuiltinKind for K {}

fn meta_key(meta: &kube::api::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// An AuthorizationPolicy as the dynamic API returns it.
#[derive(Debug, Clone)]
struct AuthzPolicy(DynamicObject);

/// A PeerAuthentication as the dynamic API returns it.
#[derive(Debug, Clone)]
struct PeerAuthn(DynamicObject);

fn policy_object(o: &DynamicObject) -> Option<PolicyObject> {
    let spec = o.data.get("spec").cloned().unwrap_or_default();
    PolicyObject::new(&o.metadata, spec)
}

/// A VirtualService as the dynamic API returns it.
#[derive(Debug, Clone)]
struct VirtualSvc(DynamicObject);

/// A DestinationRule as the dynamic API returns it.
#[derive(Debug, Clone)]
struct DestRule(DynamicObject);

impl Kind for VirtualSvc {
    const NAME: &'static str = "virtualservices";
    fn key(&self) -> (String, String) {
        meta_key(&self.0.metadata)
    }
    fn upsert(self) -> Event {
        match policy_object(&self.0) {
            Some(p) => Event::VirtualService(p),
            None => Self::deleted(self.key()),
        }
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::VirtualServiceDeleted { namespace, name }
    }
}

/// An HTTPRoute as the dynamic API returns it.
#[derive(Debug, Clone)]
struct HttpRt(DynamicObject);

impl Kind for HttpRt {
    const NAME: &'static str = "httproutes";
    fn key(&self) -> (String, String) {
        meta_key(&self.0.metadata)
    }
    fn upsert(self) -> Event {
        match policy_object(&self.0) {
            Some(p) => Event::HttpRoute(p),
            None => Self::deleted(self.key()),
        }
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::HttpRouteDeleted { namespace, name }
    }
}

impl Kind for DestRule {
    const NAME: &'static str = "destinationrules";
    fn key(&self) -> (String, String) {
        meta_key(&self.0.metadata)
    }
    fn upsert(self) -> Event {
        match policy_object(&self.0) {
            Some(p) => Event::DestinationRule(p),
            None => Self::deleted(self.key()),
        }
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::DestinationRuleDeleted { namespace, name }
    }
}

impl Kind for AuthzPolicy {
    const NAME: &'static str = "authorizationpolicies";
    fn key(&self) -> (String, String) {
        meta_key(&self.0.metadata)
    }
    fn upsert(self) -> Event {
        match policy_object(&self.0) {
            Some(p) => Event::AuthorizationPolicy(p),
            // The API server never returns a nameless object; if it did,
            // nothing can refer to it.
            None => Self::deleted(self.key()),
        }
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::AuthorizationPolicyDeleted { namespace, name }
    }
}

impl Kind for PeerAuthn {
    const NAME: &'static str = "peerauthentications";
    fn key(&self) -> (String, String) {
        meta_key(&self.0.metadata)
    }
    fn upsert(self) -> Event {
        match policy_object(&self.0) {
            Some(p) => Event::PeerAuthentication(p),
            None => Self::deleted(self.key()),
        }
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::PeerAuthenticationDeleted { namespace, name }
    }
}

impl Kind for Namespace {
    fn key(&self) -> (String, String) {
        (self.namespace().unwrap_or_default(), self.name_any())
    }
    const NAME: &'static str = "namespaces";
    fn upsert(self) -> Event {
        Event::Namespace(self)
    }
    fn deleted((_, name): (String, String)) -> Event {
        Event::NamespaceDeleted(name)
    }
}

impl Kind for Pod {
    fn key(&self) -> (String, String) {
        (self.namespace().unwrap_or_default(), self.name_any())
    }
    const NAME: &'static str = "pods";
    fn upsert(self) -> Event {
        Event::Pod(self)
    }
    fn deleted((namespace, name): (String, String)) -> Event {
        Event::PodDeleted { namespace, name }
    }
}

impl Kind for Service {
    fn key(&self) -> (String, String) {
        (self.namespace().unwrap_or_default(), self.name_any())
    }
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

fn watch<K: BuiltinKind>(client: Client) -> impl Stream<Item = (Vec<Event>, bool)> + Send {
    let api: Api<K> = Api::all(client);
    track::<K, K>(api, |o| o)
}

/// Runs a watcher over `api`, wrapping each object into the kind `K`.
fn track<O, K>(api: Api<O>, wrap: fn(O) -> K) -> impl Stream<Item = (Vec<Event>, bool)> + Send
where
    O: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K: Kind,
{
    let mut tracker = Tracker::<K>::new();
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |r| {
            let out = match r {
                Ok(ev) => Some(tracker.on_event(map_event(ev, wrap))),
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

fn map_event<A, B>(ev: WatchEvent<A>, f: fn(A) -> B) -> WatchEvent<B> {
    match ev {
        WatchEvent::Apply(o) => WatchEvent::Apply(f(o)),
        WatchEvent::Delete(o) => WatchEvent::Delete(f(o)),
        WatchEvent::Init => WatchEvent::Init,
        WatchEvent::InitApply(o) => WatchEvent::InitApply(f(o)),
        WatchEvent::InitDone => WatchEvent::InitDone,
    }
}

/// Watches an Istio kind once its CRD is served. While the API answers
/// "not found" (CRD not installed) or "forbidden" (no RBAC for it), one
/// `(empty, true)` item says "listed, nothing there" so readiness does not
/// wait for a kind that may never come, and the API is asked again every
/// [`CRD_RETRY`]; then the normal watch takes over.
fn watch_crd<K: Kind>(
    client: Client,
    (group, version): (&str, &str),
    kind: &str,
    plural: &str,
    wrap: fn(DynamicObject) -> K,
) -> impl Stream<Item = (Vec<Event>, bool)> + Send {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let probe_api = api.clone();
    // State: Some(released readiness already?) while probing, None once the
    // kind is served.
    let probe = futures::stream::unfold(Some(false), move |state| {
        let api = probe_api.clone();
        async move {
            let mut released = state?;
            loop {
                match api.list(&ListParams::default().limit(1)).await {
                    Ok(_) => {
                        if released {
                            tracing::info!(kind = K::NAME, "CRD now served; watching");
                        }
                        return Some((None, None));
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {
                        if !released {
                            tracing::warn!(
                                kind = K::NAME,
                                error = %s,
                                "Istio CRD not served (not installed or not allowed); \
                                 running without it and checking again"
                            );
                            released = true;
                            return Some((Some((Vec::new(), true)), Some(released)));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(kind = K::NAME, error = %e, "listing failed; retrying");
                    }
                }
                tokio::time::sleep(CRD_RETRY).await;
            }
        }
    })
    .filter_map(futures::future::ready);
    probe.chain(track::<DynamicObject, K>(api, wrap))
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
        tagged(2, Box::pin(watch::<Service>(client.clone()))),
        tagged(
            3,
            Box::pin(watch_crd(
                client.clone(),
                (SECURITY_GROUP, SECURITY_VERSION),
                "AuthorizationPolicy",
                "authorizationpolicies",
                AuthzPolicy,
            )),
        ),
        tagged(
            4,
            Box::pin(watch_crd(
                client.clone(),
                (SECURITY_GROUP, SECURITY_VERSION),
                "PeerAuthentication",
                "peerauthentications",
                PeerAuthn,
            )),
        ),
        tagged(
            5,
            Box::pin(watch_crd(
                client.clone(),
                (NETWORKING_GROUP, NETWORKING_VERSION),
                "VirtualService",
                "virtualservices",
                VirtualSvc,
            )),
        ),
        tagged(
            6,
            Box::pin(watch_crd(
                client.clone(),
                (NETWORKING_GROUP, NETWORKING_VERSION),
                "DestinationRule",
                "destinationrules",
                DestRule,
            )),
        ),
        tagged(
            7,
            Box::pin(watch_crd(
                client,
                (GATEWAY_GROUP, GATEWAY_VERSION),
                "HTTPRoute",
                "httproutes",
                HttpRt,
            )),
        ),
    ]);
    let mut listed = [false; 8];
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
                        tracing::info!("kubernetes namespaces, pods, services, Istio policies and traffic rules and HTTPRoutes listed");
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
    fn traffic_objects_become_l7_events() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"namespace": "a", "name": "vs"},
            "spec": {"hosts": ["reviews"]}
        }))
        .unwrap();
        let mut t = Tracker::<VirtualSvc>::new();
        let (b, _) = t.on_event(WatchEvent::Apply(VirtualSvc(o.clone())));
        assert!(
            matches!(b.as_slice(), [Event::VirtualService(p)] if p.spec["hosts"][0] == "reviews"),
            "{b:?}"
        );
        let (b, _) = t.on_event(WatchEvent::Delete(VirtualSvc(o.clone())));
        assert!(
            matches!(b.as_slice(), [Event::VirtualServiceDeleted { name, .. }] if name == "vs"),
            "{b:?}"
        );
        let mut t = Tracker::<DestRule>::new();
        let (b, _) = t.on_event(WatchEvent::Apply(DestRule(o.clone())));
        assert!(matches!(b.as_slice(), [Event::DestinationRule(_)]), "{b:?}");
        let mut t = Tracker::<HttpRt>::new();
        let (b, _) = t.on_event(WatchEvent::Apply(HttpRt(o.clone())));
        assert!(matches!(b.as_slice(), [Event::HttpRoute(_)]), "{b:?}");
        let (b, _) = t.on_event(WatchEvent::Delete(HttpRt(o)));
        assert!(
            matches!(b.as_slice(), [Event::HttpRouteDeleted { name, .. }] if name == "vs"),
            "{b:?}"
        );
    }

    #[test]
    fn istio_objects_become_policy_events() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "a", "name": "p",
                         "creationTimestamp": "2025-01-02T03:04:05Z"},
            "spec": {"action": "DENY"}
        }))
        .unwrap();
        let mut t = Tracker::<AuthzPolicy>::new();
        let (b, _) = t.on_event(WatchEvent::Apply(AuthzPolicy(o.clone())));
        let [Event::AuthorizationPolicy(p)] = b.as_slice() else {
            panic!("{b:?}")
        };
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("a", "p"));
        assert_eq!(p.spec["action"], "DENY");
        assert_eq!(
            p.creation_timestamp.as_deref(),
            Some("2025-01-02T03:04:05Z")
        );
        let (b, _) = t.on_event(WatchEvent::Delete(AuthzPolicy(o.clone())));
        assert!(matches!(
            b.as_slice(),
            [Event::AuthorizationPolicyDeleted { namespace, name }] if namespace == "a" && name == "p"
        ));
        let b = PeerAuthn(o).upsert();
        assert!(matches!(b, Event::PeerAuthentication(_)), "{b:?}");
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
