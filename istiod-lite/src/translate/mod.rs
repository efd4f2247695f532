//! Kubernetes objects in, Workload API address book out, incrementally.
//!
//! The translator sits between the sources (`kubesource.rs`, `dirsource.rs`)
//! and the delta xDS push (`push.rs`): it holds what it was told about
//! Namespaces, Pods and Services and turns them into the `Address`
//! resources ztunnel routes by — one `Workload` per pod, one `Service` per
//! Service. Events only record objects and mark the outputs they can affect;
//! [`Translator::take_changes`] recomputes just those and reports the ones
//! whose bytes differ, so a pod restarting in a 10,000-pod cluster costs one
//! workload, not a rebuild.
//!
//! It also turns `AuthorizationPolicy` and `PeerAuthentication` into the
//! `Authorization` resources ztunnel enforces (`authz.rs`, `peerauthn.rs`)
//! and lists the workload-selector ones in each selected workload's
//! `authorization_policies`.
//!
//! For services behind a waypoint it compiles `VirtualService` and
//! `DestinationRule` into the waypoint's `ServiceRoutes` (`l7.rs`), and
//! Gateway API `HTTPRoute`s attached to a service or its waypoint
//! (`httproute.rs`), which take precedence over a VirtualService.

pub mod authz;
pub mod httproute;
#[cfg(test)]
mod httproute_tests;
pub mod l7;
#[cfg(test)]
mod l7_tests;
pub mod peerauthn;
mod pod;
mod policy;
#[cfg(test)]
mod policy_tests;
mod service;
mod tcp;
#[cfg(test)]
mod tcp_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::proto::security::Authorization;
use mesh_core::proto::waypoint::ServiceRoutes;
use mesh_core::proto::workload::{
    address, gateway_address, Address, GatewayAddress, NamespacedHostname,
};

use authz::ApInfo;
use peerauthn::PaInfo;
use pod::PodInfo;
use service::SvcInfo;

type Labels = BTreeMap<String, String>;

/// Labels and annotations the translation reads.
mod labels {
    pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
    pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
    pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
    pub const NETWORK: &str = "topology.istio.io/network";
    pub const TLS_MODE: &str = "security.istio.io/tlsMode";
    pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
}

/// HBONE port of every waypoint.
const WAYPOINT_HBONE_PORT: u32 = 15008;

/// Mesh-wide settings that end up in every resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// Trust domain of workload identities (`spiffe://<td>/ns/..`).
    pub trust_domain: String,
    /// This cluster's id, the first part of every workload uid.
    pub cluster_id: String,
    /// Network of pods and VIPs unless a label says otherwise; empty is the
    /// default network.
    pub network: String,
    /// DNS suffix of service hostnames (`<svc>.<ns>.svc.<suffix>`).
    pub domain_suffix: String,
    /// Only namespaces carrying all these labels are part of the mesh
    /// (Istio's `discoverySelectors` with one `matchLabels`); empty = all.
    pub discovery_selector: Labels,
    /// Istio's root namespace: its security policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_string(),
            cluster_id: "Kubernetes".to_string(),
            network: String::new(),
            domain_suffix: "cluster.local".to_string(),
            discovery_selector: Labels::new(),
            root_namespace: "istio-system".to_string(),
        }
    }
}

/// An Istio security object (`AuthorizationPolicy`, `PeerAuthentication`) as
/// the sources hand it over: who it is, what the translation reads of its
/// metadata, and its `spec` as written. The translator validates the spec,
/// so both sources report the same errors with the same field paths.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// Annotations (`istio.io/dry-run`).
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 creation time, when known: the oldest of competing policies
    /// wins, as in Istio.
    pub creation_timestamp: Option<String>,
    /// `spec` as written (null when absent).
    pub spec: serde_json::Value,
}

impl PolicyObject {
    /// From an object's metadata and spec; None without a name. A missing
    /// namespace is `default`, as kubectl does.
    pub fn new(meta: &ObjectMeta, spec: serde_json::Value) -> Option<Self> {
        let (namespace, name) = object_key(meta)?;
        Some(Self {
            namespace,
            name,
            annotations: meta.annotations.clone().unwrap_or_default(),
            creation_timestamp: meta
                .creation_timestamp
                .as_ref()
                .and_then(|t| serde_json::to_value(t).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            spec,
        })
    }
}

/// One change seen by a source.
// Events live only from a source's batch to `apply`, which digests them;
// boxing every pod would cost an allocation each for no lasting saving.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Event {
    /// A namespace was created or changed.
    Namespace(Namespace),
    /// A namespace is gone (by name).
    NamespaceDeleted(String),
    /// A pod was created or changed.
    Pod(Pod),
    /// A pod is gone.
    PodDeleted {
        /// Namespace of the pod.
        namespace: String,
        /// Name of the pod.
        name: String,
    },
    /// A service was created or changed.
    Service(Service),
    /// A service is gone.
    ServiceDeleted {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
    },
    /// An AuthorizationPolicy was created or changed.
    AuthorizationPolicy(PolicyObject),
    /// An AuthorizationPolicy is gone.
    AuthorizationPolicyDeleted {
        /// Namespace of the policy.
        namespace: String,
        /// Name of the policy.
        name: String,
    },
    /// A PeerAuthentication was created or changed.
    PeerAuthentication(PolicyObject),
    /// A PeerAuthentication is gone.
    PeerAuthenticationDeleted {
        /// Namespace of the policy.
        namespace: String,
        /// Name of the policy.
        name: String,
    },
    /// A VirtualService (networking.istio.io) was created or changed.
    VirtualService(PolicyObject),
    /// A VirtualService is gone.
    VirtualServiceDeleted {
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
    },
    /// A DestinationRule (networking.istio.io) was created or changed.
    DestinationRule(PolicyObject),
    /// A DestinationRule is gone.
    DestinationRuleDeleted {
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
    },
    /// An HTTPRoute (gateway.networking.k8s.io) was created or changed.
    HttpRoute(PolicyObject),
    /// An HTTPRoute is gone.
    HttpRouteDeleted {
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
    },
}

/// Resources that differ from what `take_changes` returned before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// New or changed resources by name, sorted by name.
    pub upserts: Vec<(String, Address)>,
    /// Names returned before that no longer exist, sorted.
    pub removes: Vec<String>,
    /// New or changed `Authorization` resources by `<ns>/<name>`, sorted.
    pub policy_upserts: Vec<(String, Authorization)>,
    /// `Authorization` names returned before that no longer exist, sorted.
    pub policy_removes: Vec<String>,
    /// New or changed waypoint `ServiceRoutes` by service hostname, sorted.
    pub route_upserts: Vec<(String, ServiceRoutes)>,
    /// `ServiceRoutes` hostnames returned before that no longer exist, sorted.
    pub route_removes: Vec<String>,
}

impl Changes {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removes.is_empty()
            && self.policy_upserts.is_empty()
            && self.policy_removes.is_empty()
            && self.route_upserts.is_empty()
            && self.route_removes.is_empty()
    }
}

type Key = (String, String);

/// One `Authorization` output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PolicyKey {
    /// An AuthorizationPolicy (namespace, name).
    Authz(String, String),
    /// The converted form of a port-level PeerAuthentication.
    PeerAuthn(String, String),
    /// The shared STRICT policy.
    StaticStrict,
}

/// The incremental Kubernetes → Workload API translation.
#[derive(Debug)]
pub struct Translator {
    cfg: MeshConfig,
    namespaces: HashMap<String, Labels>,
    /// Pods by namespace, then name: the per-namespace index that keeps a
    /// service or namespace change from visiting other namespaces' pods.
    pods: HashMap<String, HashMap<String, PodInfo>>,
    /// Services by namespace, then name (ordered, for stable output).
    services: HashMap<String, BTreeMap<String, SvcInfo>>,
    /// (namespace, service account, node) → non-terminal pods, for the CA's
    /// "is this identity on the caller's node" check.
    identities: HashMap<(String, String, String), usize>,
    /// Valid AuthorizationPolicies for ztunnel, by namespace then name.
    authz: HashMap<String, BTreeMap<String, ApInfo>>,
    /// Valid PeerAuthentications, by namespace then name.
    peer_authn: HashMap<String, BTreeMap<String, PaInfo>>,
    /// Valid VirtualServices by (namespace, name).
    virtual_services: l7::VsMap,
    /// Valid DestinationRules by (namespace, name).
    destination_rules: l7::DrMap,
    /// Valid HTTPRoutes by (namespace, name).
    http_routes: httproute::HrMap,
    /// Services whose `ServiceRoutes` may have changed.
    dirty_routes: BTreeSet<Key>,
    /// `ServiceRoutes` as last returned, by hostname.
    routes: BTreeMap<String, ServiceRoutes>,
    /// Why a policy object is not (fully) applied, by `<Kind> <ns>/<name>`.
    problems: BTreeMap<String, String>,
    dirty_pods: BTreeSet<Key>,
    dirty_services: BTreeSet<Key>,
    dirty_policies: BTreeSet<PolicyKey>,
    resources: BTreeMap<String, Address>,
    policies: BTreeMap<String, Authorization>,
    workload_count: usize,
    service_count: usize,
    /// Outputs recomputed by the last `take_changes` (tests check that
    /// changes stay local).
    computed: usize,
}

impl Translator {
    /// An empty translator.
    pub fn new(cfg: MeshConfig) -> Self {
        Self {
            cfg,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            identities: HashMap::new(),
            authz: HashMap::new(),
            peer_authn: HashMap::new(),
            virtual_services: HashMap::new(),
            destination_rules: HashMap::new(),
            http_routes: HashMap::new(),
            dirty_routes: BTreeSet::new(),
            routes: BTreeMap::new(),
            problems: BTreeMap::new(),
            dirty_pods: BTreeSet::new(),
            dirty_services: BTreeSet::new(),
            dirty_policies: BTreeSet::new(),
            resources: BTreeMap::new(),
            policies: BTreeMap::new(),
            workload_count: 0,
            service_count: 0,
            computed: 0,
        }
    }

    /// The mesh settings this translator stamps on resources.
    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Records one event and marks the outputs it can affect.
    pub fn apply(&mut self, ev: Event) {
        match ev {
            Event::Namespace(ns) => {
                let Some(name) = ns.metadata.name.clone() else {
                    tracing::warn!("namespace without a name; ignored");
                    return;
                };
                let labels = ns.metadata.labels.unwrap_or_default();
                if self.namespaces.get(&name) != Some(&labels) {
                    self.namespaces.insert(name.clone(), labels);
                    self.mark_namespace(&name);
                }
            }
            Event::NamespaceDeleted(name) => {
                if self.namespaces.remove(&name).is_some() {
                    self.mark_namespace(&name);
                }
            }
            Event::Pod(p) => {
                let Some((ns, name)) = object_key(&p.metadata) else {
                    tracing::warn!("pod without a name; ignored");
                    return;
                };
                let info = PodInfo::from_pod(&p);
                let pods = self.pods.entry(ns.clone()).or_default();
                if pods.get(&name) == Some(&info) {
                    return;
                }
                let new_identity = identity_key(&ns, &info);
                // Only appearing, relabelling or turning terminal moves a
                // pod in or out of DestinationRule subsets.
                let new_member = (pods.get(&name).and_then(subset_member) != subset_member(&info))
                    .then(|| subset_member(&info).cloned());
                let old = pods.insert(name.clone(), info);
                self.track_identity(old.as_ref().and_then(|o| identity_key(&ns, o)), -1);
                self.track_identity(new_identity, 1);
                if let Some(new_member) = new_member {
                    let old_member = old.as_ref().and_then(subset_member);
                    self.mark_subset_routes(&ns, old_member, new_member.as_ref());
                }
                self.dirty_pods.insert((ns, name));
            }
            Event::PodDeleted { namespace, name } => {
                let Some(pods) = self.pods.get_mut(&namespace) else {
                    return;
                };
                let Some(old) = pods.remove(&name) else {
                    return;
                };
                if pods.is_empty() {
                    self.pods.remove(&namespace);
                }
                self.track_identity(identity_key(&namespace, &old), -1);
                self.mark_subset_routes(&namespace, subset_member(&old), None);
                self.dirty_pods.insert((namespace, name));
            }
            Event::Service(s) => {
                let Some((ns, name)) = object_key(&s.metadata) else {
                    tracing::warn!("service without a name; ignored");
                    return;
                };
                let info = SvcInfo::from_service(&s);
                let svcs = self.services.entry(ns.clone()).or_default();
                let old = svcs.get(&name);
                if old == Some(&info) {
                    return;
                }
                let pods_affected = !old.is_some_and(|o| o.same_for_pods(&info));
                let old = svcs.insert(name.clone(), info.clone());
                if pods_affected {
                    self.mark_selected(&ns, old.as_ref(), Some(&info));
                }
                self.dirty_services.insert((ns, name));
            }
            Event::ServiceDeleted { namespace, name } => {
                let Some(svcs) = self.services.get_mut(&namespace) else {
                    return;
                };
                let Some(old) = svcs.remove(&name) else {
                    return;
                };
                if svcs.is_empty() {
                    self.services.remove(&namespace);
                }
                self.mark_selected(&namespace, Some(&old), None);
                self.dirty_services.insert((namespace, name));
            }
            Event::AuthorizationPolicy(obj) => self.apply_authz(obj),
            Event::AuthorizationPolicyDeleted { namespace, name } => {
                self.problems
                    .remove(&format!("AuthorizationPolicy {namespace}/{name}"));
                self.set_authz(namespace, name, None);
            }
            Event::PeerAuthentication(obj) => self.apply_peer_authn(obj),
            Event::PeerAuthenticationDeleted { namespace, name } => {
                self.problems
                    .remove(&format!("PeerAuthentication {namespace}/{name}"));
                self.set_peer_authn(namespace, name, None);
            }
            Event::VirtualService(obj) => self.apply_virtual_service(obj),
            Event::VirtualServiceDeleted { namespace, name } => {
                self.delete_virtual_service(namespace, name)
            }
            Event::DestinationRule(obj) => self.apply_destination_rule(obj),
            Event::DestinationRuleDeleted { namespace, name } => {
                self.delete_destination_rule(namespace, name)
            }
            Event::HttpRoute(obj) => self.apply_http_route(obj),
            Event::HttpRouteDeleted { namespace, name } => self.delete_http_route(namespace, name),
        }
    }

    /// Recomputes what is dirty and returns what differs from last time.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes::default();
        let dirty_pods = std::mem::take(&mut self.dirty_pods);
        let dirty_services = std::mem::take(&mut self.dirty_services);
        let dirty_policies = std::mem::take(&mut self.dirty_policies);
        // A service appearing or going away may be an HTTPRoute's backend.
        self.mark_backend_dependents(&dirty_services);
        // A service's waypoint (its own or its namespace's label) and ports
        // decide its ServiceRoutes.
        let mut dirty_routes = std::mem::take(&mut self.dirty_routes);
        dirty_routes.extend(dirty_services.iter().cloned());
        self.computed = dirty_pods.len() + dirty_services.len() + dirty_policies.len();
        let mut out: Vec<(String, Option<Address>)> = Vec::with_capacity(self.computed);
        for (ns, name) in dirty_pods {
            let visible = self.discovered(&ns);
            let wl = self
                .pods
                .get(&ns)
                .and_then(|m| m.get(&name))
                .filter(|_| visible)
                .and_then(|p| {
                    let empty = BTreeMap::new();
                    let svcs = self.services.get(&ns).unwrap_or(&empty);
                    let mut w = p.to_workload(
                        &self.cfg,
                        &ns,
                        &name,
                        self.namespaces.get(&ns),
                        svcs.iter(),
                    )?;
                    w.authorization_policies = self.workload_policies(&ns, &p.labels);
                    Some(w)
                });
            out.push((
                workload_uid(&self.cfg, &ns, &name),
                wl.map(|w| Address {
                    r#type: Some(address::Type::Workload(w)),
                }),
            ));
        }
        for (ns, name) in dirty_services {
            let visible = self.discovered(&ns);
            let svc = self
                .services
                .get(&ns)
                .and_then(|m| m.get(&name))
                .filter(|_| visible)
                .and_then(|s| s.to_service(&self.cfg, &ns, &name, self.namespaces.get(&ns)));
            out.push((
                format!("{ns}/{}", service_hostname(&self.cfg, &ns, &name)),
                svc.map(|s| Address {
                    r#type: Some(address::Type::Service(s)),
                }),
            ));
        }
        for (key, new) in out {
            self.reconcile(key, new, &mut changes);
        }
        for key in dirty_policies {
            let (name, new) = self.compute_policy(&key);
            match (new, self.policies.get(&name)) {
                (Some(new), Some(old)) if *old == new => {}
                (Some(new), _) => {
                    self.policies.insert(name.clone(), new.clone());
                    changes.policy_upserts.push((name, new));
                }
                (None, Some(_)) => {
                    self.policies.remove(&name);
                    changes.policy_removes.push(name);
                }
                (None, None) => {}
            }
        }
        self.take_route_changes(
            dirty_routes,
            &mut changes.route_upserts,
            &mut changes.route_removes,
        );
        changes.upserts.sort_by(|a, b| a.0.cmp(&b.0));
        changes.route_upserts.sort_by(|a, b| a.0.cmp(&b.0));
        changes.route_removes.sort();
        changes.removes.sort();
        changes.policy_upserts.sort_by(|a, b| a.0.cmp(&b.0));
        changes.policy_removes.sort();
        changes
    }

    /// Every `Authorization` as last returned by `take_changes`, by
    /// `<ns>/<name>`.
    pub fn policies(&self) -> &BTreeMap<String, Authorization> {
        &self.policies
    }

    /// Policy objects that are rejected, skipped or only partly enforced,
    /// with why (`"AuthorizationPolicy ns/name" → message`).
    pub fn policy_problems(&self) -> &BTreeMap<String, String> {
        &self.problems
    }

    /// Every resource as last returned by `take_changes`.
    pub fn resources(&self) -> &BTreeMap<String, Address> {
        &self.resources
    }

    /// The node of a known pod, enrolled or not, emitted or not.
    pub fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .get(namespace)?
            .get(name)
            .map(|p| p.node.clone())
            .filter(|n| !n.is_empty())
    }

    /// Whether some known, non-terminal pod with this service account runs
    /// on `node`.
    pub fn identity_on_node(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        let key = (
            namespace.to_string(),
            service_account.to_string(),
            node.to_string(),
        );
        self.identities.get(&key).is_some_and(|n| *n > 0)
    }

    /// (workloads, services) currently emitted.
    pub fn counts(&self) -> (usize, usize) {
        (self.workload_count, self.service_count)
    }

    /// Whether the namespace is part of the mesh under the discovery
    /// selector. A namespace not seen yet has no labels to match.
    fn discovered(&self, ns: &str) -> bool {
        let sel = &self.cfg.discovery_selector;
        sel.is_empty()
            || self
                .namespaces
                .get(ns)
                .is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)))
    }

    fn reconcile(&mut self, key: String, new: Option<Address>, changes: &mut Changes) {
        match (new, self.resources.get(&key)) {
            (Some(new), Some(old)) if *old == new => {}
            (Some(new), old) => {
                if old.is_none() {
                    self.count(&new, 1);
                }
                self.resources.insert(key.clone(), new.clone());
                changes.upserts.push((key, new));
            }
            (None, Some(_)) => {
                if let Some(old) = self.resources.remove(&key) {
                    self.count(&old, -1);
                }
                changes.removes.push(key);
            }
            (None, None) => {}
        }
    }

    fn count(&mut self, a: &Address, delta: isize) {
        let c = match a.r#type {
            Some(address::Type::Workload(_)) => &mut self.workload_count,
            Some(address::Type::Service(_)) => &mut self.service_count,
            None => return,
        };
        *c = c.saturating_add_signed(delta);
    }

    fn mark_namespace(&mut self, ns: &str) {
        if let Some(pods) = self.pods.get(ns) {
            self.dirty_pods
                .extend(pods.keys().map(|p| (ns.to_string(), p.clone())));
        }
        if let Some(svcs) = self.services.get(ns) {
            self.dirty_services
                .extend(svcs.keys().map(|s| (ns.to_string(), s.clone())));
        }
        // Discovery decides whether a namespace's policies are served.
        if let Some(aps) = self.authz.get(ns) {
            self.dirty_policies.extend(
                aps.keys()
                    .map(|n| PolicyKey::Authz(ns.to_string(), n.clone())),
            );
        }
        self.mark_peer_authn_policies(Some(ns));
    }

    /// Marks the pods of `ns` that either version of a service selects.
    fn mark_selected(&mut self, ns: &str, old: Option<&SvcInfo>, new: Option<&SvcInfo>) {
        let Some(pods) = self.pods.get(ns) else {
            return;
        };
        for (name, p) in pods {
            let hit = old.is_some_and(|s| s.selects(&p.labels))
                || new.is_some_and(|s| s.selects(&p.labels));
            if hit {
                self.dirty_pods.insert((ns.to_string(), name.clone()));
            }
        }
    }

    fn track_identity(&mut self, key: Option<(String, String, String)>, delta: isize) {
        let Some(key) = key else { return };
        let n = self.identities.entry(key.clone()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.identities.remove(&key);
        }
    }

    #[cfg(test)]
    fn computed(&self) -> usize {
        self.computed
    }
}

fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    let ns = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    Some((ns, name))
}

/// The CA's identity index entry of a pod, if it can hold that identity now.
fn identity_key(ns: &str, p: &PodInfo) -> Option<(String, String, String)> {
    (!p.terminal && !p.node.is_empty())
        .then(|| (ns.to_string(), p.service_account.clone(), p.node.clone()))
}

/// The labels DestinationRule subsets see of a pod, None when it is no
/// subset member (terminal pods are not published).
fn subset_member(p: &PodInfo) -> Option<&Labels> {
    (!p.terminal).then_some(&p.labels)
}

/// Resource name of a pod's workload.
pub fn workload_uid(cfg: &MeshConfig, namespace: &str, name: &str) -> String {
    format!("{}//Pod/{namespace}/{name}", cfg.cluster_id)
}

/// Fully qualified hostname of a Service.
pub fn service_hostname(cfg: &MeshConfig, namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{}", cfg.domain_suffix)
}

/// The waypoint named by a `istio.io/use-waypoint` value; `none` opts out.
fn waypoint_address(cfg: &MeshConfig, name: &str, namespace: &str) -> Option<GatewayAddress> {
    if name.is_empty() || name == "none" {
        return None;
    }
    Some(GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: namespace.to_string(),
            hostname: service_hostname(cfg, namespace, name),
        })),
        hbone_mtls_port: WAYPOINT_HBONE_PORT,
    })
}
