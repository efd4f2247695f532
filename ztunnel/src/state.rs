//! What ztunnel knows about the mesh: workloads, services and policies.
//!
//! Every connection consults this before it is forwarded: the outbound side
//! resolves its original destination (a service VIP or a pod IP) to a
//! workload and the identity it must present; the inbound side finds the
//! workload it serves. The state is fed Workload API resources (from the local
//! file today, from xDS later); each resource is validated on the way in, and
//! a bad one is rejected with its name and the field at fault while the rest
//! keeps serving. Which destinations sit behind a waypoint, and which
//! waypoint pod they go to, is in `state/waypoint.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_core::identity::Identity;
use mesh_core::proto::security::Authorization;
use mesh_core::proto::workload as pb;
use serde::Serialize;

mod waypoint;
pub use waypoint::{OutboundRoute, WaypointUpstream};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{kind} {name}: field {field}: {reason}")]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
}

fn invalid(
    kind: &'static str,
    name: &str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> StateError {
    StateError::Invalid {
        kind,
        name: name.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
}

/// Where a waypoint or network gateway is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// `<network>/<ip>` or `<namespace>/<hostname>`, as the admin dump shows it.
    pub destination: String,
    pub hbone_mtls_port: u32,
    /// The same destination, kept typed: the string alone cannot tell a
    /// hostname from an address.
    #[serde(skip)]
    pub target: GatewayTarget,
}

/// What a [`GatewayAddress`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayTarget {
    /// A Service (usually the waypoint's own), by `<namespace>/<hostname>`.
    Hostname { namespace: String, hostname: String },
    /// A service VIP or a workload address on a network.
    Address { network: String, ip: IpAddr },
}

impl GatewayAddress {
    /// The port to dial: the declared HBONE port, 15008 when left unset.
    pub fn port(&self) -> u16 {
        u16::try_from(self.hbone_mtls_port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(crate::proxy::HBONE_PORT)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub node: String,
    pub network: String,
    pub ips: Vec<IpAddr>,
    pub hostname: String,
    pub protocol: Protocol,
    pub status: HealthStatus,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: &'static str,
    pub cluster_id: String,
    pub waypoint: Option<GatewayAddress>,
    pub network_gateway: Option<GatewayAddress>,
    /// `ns/hostname` -> service port -> target port on this workload.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    pub authorization_policies: Vec<String>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<(String, IpAddr)>,
    /// service port -> target port (0: same as the workload's mapping or the service port).
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The key Workload API uses for a service: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// An upstream chosen for a connection.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub workload: Arc<Workload>,
    /// Where the application listens on that workload.
    pub addr: SocketAddr,
    /// The service the client addressed, if it addressed one.
    pub service: Option<Arc<Service>>,
}

impl Upstream {
    /// Identities the destination may present: its own, plus the service's
    /// declared `subject_alt_names` when it was reached through a service.
    pub fn expected_identities(&self) -> Vec<Identity> {
        let mut ids = vec![self.workload.identity()];
        if let Some(svc) = &self.service {
            for san in &svc.subject_alt_names {
                match san.parse::<Identity>() {
                    Ok(id) if !ids.contains(&id) => ids.push(id),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(service = %svc.hostname, san, error = %e, "ignoring non-SPIFFE subject alt name")
                    }
                }
            }
        }
        ids
    }
}

/// The outcome of looking up an original destination.
#[derive(Debug)]
pub enum Resolution {
    /// A mesh (or known) workload, possibly picked behind a service VIP.
    Upstream(Upstream),
    /// A service VIP with no healthy endpoint on that port.
    NoHealthyEndpoint { service: String, port: u16 },
    /// Not a mesh address: pass it through unchanged.
    Passthrough,
}

#[derive(Debug, Default)]
struct Inner {
    workloads: HashMap<String, Arc<Workload>>,
    /// Address -> uids holding it, the most recent last (the owner). Two
    /// workloads can briefly claim one address (a pod replaced faster than
    /// the old one is removed); removing one must hand the address back to
    /// the other, never drop it (it would then be passed through in clear).
    by_ip: HashMap<(String, IpAddr), Vec<String>>,
    services: HashMap<String, Arc<Service>>,
    /// VIP -> service keys holding it, the most recent last (as `by_ip`).
    by_vip: HashMap<(String, IpAddr), Vec<String>>,
    /// Service key -> uids of the workloads that list it, so picking an
    /// endpoint does not scan every workload of the mesh.
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: BTreeMap<String, Arc<Authorization>>,
    /// Policies by where they apply without a selector: GLOBAL ones under
    /// "" (they live in the root namespace but apply everywhere), NAMESPACE
    /// ones under their namespace; each policy is in exactly one slot. A
    /// connection's lookup is then two map reads plus its workload's own
    /// list, not a scan of every policy.
    policy_index: HashMap<String, BTreeMap<String, Arc<Authorization>>>,
    /// Namespaces with at least one WORKLOAD_SELECTOR policy, with a count:
    /// for a destination workload missing from the state, only these can
    /// hold policies we cannot see (see [`ProxyState::authorize`]).
    selector_namespaces: HashMap<String, usize>,
}

type AddrIndex = HashMap<(String, IpAddr), Vec<String>>;

fn claim(index: &mut AddrIndex, k: (String, IpAddr), owner: &str) {
    let owners = index.entry(k).or_default();
    owners.retain(|o| o != owner);
    owners.push(owner.to_string());
}

fn release(index: &mut AddrIndex, k: (String, IpAddr), owner: &str) {
    if let Some(owners) = index.get_mut(&k) {
        owners.retain(|o| o != owner);
        if owners.is_empty() {
            index.remove(&k);
        }
    }
}

/// The current owner of an address: the latest claim.
fn owner<'a>(index: &'a AddrIndex, k: &(String, IpAddr)) -> Option<&'a str> {
    index.get(k).and_then(|o| o.last()).map(String::as_str)
}

/// Where a policy's scope puts it in [`Inner::policy_index`]; `None` for
/// WORKLOAD_SELECTOR (found through the workload's own list).
fn index_slot(p: &Authorization) -> Option<String> {
    use mesh_core::proto::security::Scope;
    match Scope::try_from(p.scope) {
        Ok(Scope::Global) => Some(String::new()),
        Ok(Scope::WorkloadSelector) => None,
        // An unknown scope is treated as NAMESPACE: it still applies where
        // it is, rather than silently to nothing.
        Ok(Scope::Namespace) | Err(_) => Some(p.namespace.clone()),
    }
}

impl Inner {
    fn insert_policy(&mut self, p: Authorization) {
        let key = format!("{}/{}", p.namespace, p.name);
        self.remove_policy(&key);
        let p = Arc::new(p);
        match index_slot(&p) {
            Some(slot) => {
                self.policy_index
                    .entry(slot)
                    .or_default()
                    .insert(key.clone(), p.clone());
            }
            None => {
                *self
                    .selector_namespaces
                    .entry(p.namespace.clone())
                    .or_default() += 1
            }
        }
        self.policies.insert(key, p);
    }

    fn remove_policy(&mut self, key: &str) {
        let Some(old) = self.policies.remove(key) else {
            return;
        };
        match index_slot(&old) {
            Some(slot) => {
                if let Some(set) = self.policy_index.get_mut(&slot) {
                    set.remove(key);
                    if set.is_empty() {
                        self.policy_index.remove(&slot);
                    }
                }
            }
            None => {
                if let Some(n) = self.selector_namespaces.get_mut(&old.namespace) {
                    *n -= 1;
                    if *n == 0 {
                        self.selector_namespaces.remove(&old.namespace);
                    }
                }
            }
        }
    }

    fn insert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid);
        for ip in &w.ips {
            claim(&mut self.by_ip, (w.network.clone(), *ip), &w.uid);
        }
        for key in w.services.keys() {
            self.endpoints
                .entry(key.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        self.workloads.insert(w.uid.clone(), Arc::new(w));
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for ip in &old.ips {
            let k = (old.network.clone(), *ip);
            // Another workload may have taken the address meanwhile.
            release(&mut self.by_ip, k, uid);
        }
        for key in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(key) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
        true
    }

    fn insert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        for (net, ip) in &s.vips {
            claim(&mut self.by_vip, (net.clone(), *ip), &key);
        }
        self.services.insert(key, Arc::new(s));
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for (net, ip) in &old.vips {
            let k = (net.clone(), *ip);
            release(&mut self.by_vip, k, key);
        }
        true
    }
}

/// A change to part of the state, as one xDS response carries it.
#[derive(Debug, Default)]
pub struct Delta {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Resource names (workload uid or `<ns>/<hostname>`) to drop.
    pub removed_addresses: Vec<String>,
    pub policies: Vec<Authorization>,
    /// Policy names (`<ns>/<name>`) to drop.
    pub removed_policies: Vec<String>,
}

/// Shared, concurrently readable view of the mesh.
#[derive(Debug, Clone)]
pub struct ProxyState {
    inner: Arc<RwLock<Inner>>,
    /// Becomes true with the first full state. Until then no destination
    /// can be told apart from one outside the mesh, so connections wait.
    loaded: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped on every change, for connections waiting for a workload.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for ProxyState {
    fn default() -> Self {
        ProxyState {
            inner: Default::default(),
            loaded: Arc::new(tokio::sync::watch::channel(false).0),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

/// A validated set of resources, ready to replace the state in one step.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
}

impl Snapshot {
    /// Validate every resource. Invalid ones are returned as errors and left
    /// out; the caller decides whether a partial snapshot is acceptable.
    pub fn from_resources(
        addresses: &[pb::Address],
        authorizations: &[Authorization],
    ) -> (Snapshot, Vec<StateError>) {
        let mut snap = Snapshot::default();
        let mut errors = Vec::new();
        let mut uids = HashSet::new();
        let mut service_keys = HashSet::new();
        for (i, addr) in addresses.iter().enumerate() {
            match &addr.r#type {
                Some(pb::address::Type::Workload(w)) => match convert_workload(w) {
                    // A uid names one workload: a second resource with the
                    // same uid is a conflict, and keeping the first is the
                    // only choice that leaves every address pointing at the
                    // workload that owns it.
                    Ok(w) if !uids.insert(w.uid.clone()) => errors.push(invalid(
                        "workload",
                        &w.uid,
                        "uid",
                        format!("duplicate of an earlier workload (addresses[{i}])"),
                    )),
                    Ok(w) => snap.workloads.push(w),
                    Err(e) => errors.push(e),
                },
                Some(pb::address::Type::Service(s)) => match convert_service(s) {
                    Ok(s) if !service_keys.insert(s.key()) => errors.push(invalid(
                        "service",
                        &s.key(),
                        "hostname",
                        format!("duplicate of an earlier service (addresses[{i}])"),
                    )),
                    Ok(s) => snap.services.push(s),
                    Err(e) => errors.push(e),
                },
                None => errors.push(invalid(
                    "address",
                    &format!("addresses[{i}]"),
                    "type",
                    "neither workload nor service",
                )),
            }
        }
        for a in authorizations {
            if a.name.is_empty() {
                errors.push(invalid(
                    "authorization",
                    &format!("{}/", a.namespace),
                    "name",
                    "empty",
                ));
            } else {
                snap.policies.push(a.clone());
            }
        }
        (snap, errors)
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

fn port(kind: &'static str, name: &str, field: String, v: u32) -> Result<u16, StateError> {
    u16::try_from(v).map_err(|_| invalid(kind, name, field, format!("{v} is not a port")))
}

fn gateway(
    kind: &'static str,
    name: &str,
    field: &str,
    g: &Option<pb::GatewayAddress>,
) -> Result<Option<GatewayAddress>, StateError> {
    let Some(g) = g else { return Ok(None) };
    let target = match &g.destination {
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayTarget::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        Some(pb::gateway_address::Destination::Address(a)) => {
            let ip = ip_from_bytes(&a.address).ok_or_else(|| {
                invalid(
                    kind,
                    name,
                    format!("{field}.address.address"),
                    "not an IPv4 or IPv6 address",
                )
            })?;
            GatewayTarget::Address {
                network: a.network.clone(),
                ip,
            }
        }
        None => return Err(invalid(kind, name, field, "no destination")),
    };
    let destination = match &target {
        GatewayTarget::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayTarget::Address { network, ip } => format!("{network}/{ip}"),
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: g.hbone_mtls_port,
        target,
    }))
}

pub fn convert_workload(w: &pb::Workload) -> Result<Workload, StateError> {
    const K: &str = "workload";
    let name = if w.uid.is_empty() {
        format!("{}/{}", w.namespace, w.name)
    } else {
        w.uid.clone()
    };
    if w.uid.is_empty() {
        return Err(invalid(K, &name, "uid", "empty"));
    }
    let mut ips = Vec::new();
    for (i, a) in w.addresses.iter().enumerate() {
        ips.push(ip_from_bytes(a).ok_or_else(|| {
            invalid(
                K,
                &name,
                format!("addresses[{i}]"),
                format!("{} bytes is not an IPv4 or IPv6 address", a.len()),
            )
        })?);
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(pb::TunnelProtocol::None) => Protocol::Tcp,
        Ok(other) => {
            return Err(invalid(
                K,
                &name,
                "tunnelProtocol",
                format!("{other:?} is not supported"),
            ))
        }
        Err(_) => {
            return Err(invalid(
                K,
                &name,
                "tunnelProtocol",
                format!("unknown value {}", w.tunnel_protocol),
            ))
        }
    };
    let status = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => {
            return Err(invalid(
                K,
                &name,
                "status",
                format!("unknown value {}", w.status),
            ))
        }
    };
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(pb::WorkloadType::Deployment) => "deployment",
        Ok(pb::WorkloadType::Cronjob) => "cronjob",
        Ok(pb::WorkloadType::Pod) => "pod",
        Ok(pb::WorkloadType::Job) => "job",
        Err(_) => {
            return Err(invalid(
                K,
                &name,
                "workloadType",
                format!("unknown value {}", w.workload_type),
            ))
        }
    };
    if protocol == Protocol::Hbone && (w.namespace.is_empty() || w.service_account.is_empty()) {
        return Err(invalid(
            K,
            &name,
            "serviceAccount",
            "an HBONE workload needs a namespace and service account for its identity",
        ));
    }
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(invalid(
                K,
                &name,
                format!("services[{key}]"),
                "key must be <namespace>/<hostname>",
            ));
        }
        let mut ports = BTreeMap::new();
        for (i, p) in list.ports.iter().enumerate() {
            let sp = port(
                K,
                &name,
                format!("services[{key}].ports[{i}].servicePort"),
                p.service_port,
            )?;
            let tp = port(
                K,
                &name,
                format!("services[{key}].ports[{i}].targetPort"),
                p.target_port,
            )?;
            ports.insert(sp, tp);
        }
        services.insert(key.clone(), ports);
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: if w.service_account.is_empty() {
            "default".into()
        } else {
            w.service_account.clone()
        },
        trust_domain: if w.trust_domain.is_empty() {
            "cluster.local".into()
        } else {
            w.trust_domain.clone()
        },
        node: w.node.clone(),
        network: w.network.clone(),
        ips,
        hostname: w.hostname.clone(),
        protocol,
        status,
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        workload_type,
        cluster_id: w.cluster_id.clone(),
        waypoint: gateway(K, &name, "waypoint", &w.waypoint)?,
        network_gateway: gateway(K, &name, "networkGateway", &w.network_gateway)?,
        services,
        authorization_policies: w.authorization_policies.clone(),
    })
}

pub fn convert_service(s: &pb::Service) -> Result<Service, StateError> {
    const K: &str = "service";
    let name = format!("{}/{}", s.namespace, s.hostname);
    if s.hostname.is_empty() {
        return Err(invalid(K, &name, "hostname", "empty"));
    }
    let mut vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&a.address).ok_or_else(|| {
            invalid(
                K,
                &name,
                format!("addresses[{i}].address"),
                "not an IPv4 or IPv6 address",
            )
        })?;
        vips.push((a.network.clone(), ip));
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        let sp = port(K, &name, format!("ports[{i}].servicePort"), p.service_port)?;
        if sp == 0 {
            return Err(invalid(
                K,
                &name,
                format!("ports[{i}].servicePort"),
                "must not be 0",
            ));
        }
        let tp = port(K, &name, format!("ports[{i}].targetPort"), p.target_port)?;
        ports.insert(sp, tp);
    }
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: gateway(K, &name, "waypoint", &s.waypoint)?,
    })
}

/// The port a workload serves `svc_port` of `svc` on: the workload's own
/// mapping, else the service's target port, else the service port itself.
pub fn target_port(svc: &Service, wl: &Workload, svc_port: u16) -> u16 {
    let own = wl
        .services
        .get(&svc.key())
        .and_then(|p| p.get(&svc_port))
        .copied();
    match (own, svc.ports.get(&svc_port).copied()) {
        (Some(t), _) if t != 0 => t,
        (_, Some(t)) if t != 0 => t,
        _ => svc_port,
    }
}

impl ProxyState {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace everything with `snap` in one step.
    pub fn replace(&self, snap: Snapshot) {
        let mut next = Inner::default();
        for w in snap.workloads {
            next.insert_workload(w);
        }
        for s in snap.services {
            next.insert_service(s);
        }
        for p in snap.policies {
            next.insert_policy(p);
        }
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = next;
        self.loaded.send_replace(true);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Apply part of the state in one step (one xDS response).
    pub fn apply_delta(&self, delta: Delta) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for name in &delta.removed_addresses {
            if !inner.remove_workload(name) {
                inner.remove_service(name);
            }
        }
        for w in delta.workloads {
            inner.insert_workload(w);
        }
        for s in delta.services {
            inner.insert_service(s);
        }
        for name in &delta.removed_policies {
            inner.remove_policy(name);
        }
        for p in delta.policies {
            inner.insert_policy(p);
        }
        drop(inner);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Identities of the HBONE workloads scheduled on `node`.
    pub fn local_identities(&self, node: &str) -> Vec<Identity> {
        let inner = self.read();
        let mut ids: Vec<Identity> = inner
            .workloads
            .values()
            .filter(|w| w.node == node && w.protocol == Protocol::Hbone)
            .map(|w| w.identity())
            .collect();
        ids.sort_by_key(|i| i.to_string());
        ids.dedup();
        ids
    }

    /// Declares the state complete: connections waiting for it proceed.
    pub fn mark_loaded(&self) {
        self.loaded.send_replace(true);
    }

    /// Wait until a first full state has been applied.
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    /// A receiver that sees every change of the state (its generation), for
    /// work that must follow it, such as re-checking open connections.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The policies in scope for a connection to `dst` (Istio's rules):
    /// GLOBAL ones from the root namespace, NAMESPACE ones of its namespace,
    /// and the WORKLOAD_SELECTOR ones it lists. Each at most once.
    pub fn policies_for(&self, dst: &Workload) -> Vec<Arc<Authorization>> {
        let inner = self.read();
        Self::in_scope(&inner, &dst.namespace, &dst.authorization_policies)
            .into_iter()
            .cloned()
            .collect()
    }

    fn in_scope<'a>(
        inner: &'a Inner,
        namespace: &str,
        selected: &[String],
    ) -> Vec<&'a Arc<Authorization>> {
        let mut out: Vec<&Arc<Authorization>> = Vec::new();
        // A namespace named "" would be the global slot itself: read it once.
        let slots: &[&str] = if namespace.is_empty() {
            &[""]
        } else {
            &["", namespace]
        };
        for slot in slots {
            if let Some(set) = inner.policy_index.get(*slot) {
                out.extend(set.values());
            }
        }
        for k in selected {
            if let Some(p) = inner.policies.get(k) {
                // Only a selector policy is reached through the workload's
                // list; a listed GLOBAL/NAMESPACE one is already in.
                if index_slot(p).is_none() {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Authorize a connection to the pod `namespace`/`dst`. The policies are
    /// evaluated under the read lock (no copies per connection). When the
    /// destination workload is not in the state, GLOBAL and NAMESPACE
    /// policies still apply; if its namespace has selector policies we
    /// cannot tell which apply, so the connection is refused (fail closed).
    pub fn authorize(
        &self,
        dst: Option<&Workload>,
        namespace: &str,
        conn: &crate::rbac::Connection,
    ) -> crate::rbac::Verdict {
        let inner = self.read();
        let selected: &[String] = dst
            .map(|w| w.authorization_policies.as_slice())
            .unwrap_or(&[]);
        let namespace = dst.map(|w| w.namespace.as_str()).unwrap_or(namespace);
        if dst.is_none() && inner.selector_namespaces.contains_key(namespace) {
            return crate::rbac::Verdict {
                decision: crate::rbac::Decision::Deny(crate::rbac::DenyReason::Unevaluable {
                    reason: format!(
                        "destination workload is not in the mesh state and namespace {namespace} has workload-selector policies"
                    ),
                }),
                dry_run: None,
            };
        }
        let policies = Self::in_scope(&inner, namespace, selected);
        crate::rbac::evaluate(policies.into_iter().map(|p| p.as_ref()), conn)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.read().workloads.get(uid).cloned()
    }

    /// The workload `uid`, waiting up to `timeout` for it to arrive. A pod
    /// is handed to ztunnel (and may connect) before the control plane has
    /// seen its address; its first connections wait for its own workload
    /// so that they carry its name and labels like every later one.
    pub async fn wait_for_workload(&self, uid: &str, timeout: Duration) -> Option<Arc<Workload>> {
        let mut changes = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(w) = self.workload_by_uid(uid) {
                return Some(w);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        let inner = self.read();
        owner(&inner.by_ip, &(network.to_string(), ip))
            .and_then(|uid| inner.workloads.get(uid).cloned())
    }

    /// Workloads that back a service key, in a stable order.
    fn endpoints(inner: &Inner, key: &str) -> Vec<Arc<Workload>> {
        // The index is a BTreeSet of uids: already in a stable order.
        inner
            .endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|uid| inner.workloads.get(uid).cloned())
            .collect()
    }

    /// Resolve an original destination as seen from `network`.
    pub fn resolve(&self, network: &str, dst: SocketAddr) -> Resolution {
        let inner = self.read();
        if let Some(key) = owner(&inner.by_vip, &(network.to_string(), dst.ip())) {
            let Some(svc) = inner.services.get(key).cloned() else {
                return Resolution::Passthrough;
            };
            if !svc.ports.contains_key(&dst.port()) {
                return Resolution::NoHealthyEndpoint {
                    service: svc.hostname.clone(),
                    port: dst.port(),
                };
            };
            let healthy: Vec<Arc<Workload>> = Self::endpoints(&inner, key)
                .into_iter()
                .filter(|w| w.status == HealthStatus::Healthy && !w.ips.is_empty())
                .collect();
            if healthy.is_empty() {
                return Resolution::NoHealthyEndpoint {
                    service: svc.hostname.clone(),
                    port: dst.port(),
                };
            }
            // A random endpoint per connection, as Istio's ztunnel does. A
            // shared round-robin cursor would lock step with a client that
            // calls several services in a fixed order (Bookinfo's
            // productpage makes three calls per page: with three reviews
            // endpoints every page would land on the same one).
            let pick = rand::random_range(0..healthy.len());
            let wl = healthy[pick].clone();
            let target = target_port(&svc, &wl, dst.port());
            let ip = wl
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or(wl.ips.first())
                .copied();
            let Some(ip) = ip else {
                return Resolution::NoHealthyEndpoint {
                    service: svc.hostname.clone(),
                    port: dst.port(),
                };
            };
            return Resolution::Upstream(Upstream {
                workload: wl,
                addr: SocketAddr::new(ip, target),
                service: Some(svc),
            });
        }
        if let Some(uid) = owner(&inner.by_ip, &(network.to_string(), dst.ip())) {
            if let Some(wl) = inner.workloads.get(uid) {
                return Resolution::Upstream(Upstream {
                    workload: wl.clone(),
                    addr: dst,
                    service: None,
                });
            }
        }
        Resolution::Passthrough
    }

    /// The service of `w` that `port` on it serves, if any (for telling
    /// which service an inbound connection belongs to).
    pub fn service_for_target(&self, w: &Workload, port: u16) -> Option<Arc<Service>> {
        let inner = self.read();
        w.services
            .keys()
            .filter_map(|k| inner.services.get(k))
            .find(|s| s.ports.keys().any(|sp| target_port(s, w, *sp) == port))
            .cloned()
    }

    /// The JSON the admin endpoint serves (`/config_dump`), in the shape
    /// `istioctl ztunnel-config` reads.
    pub fn dump(
        &self,
    ) -> (
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
        Vec<serde_json::Value>,
    ) {
        let inner = self.read();
        let mut workloads: Vec<&Arc<Workload>> = inner.workloads.values().collect();
        workloads
            .sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
        let workloads = workloads
            .into_iter()
            .map(|w| {
                serde_json::json!({
                    "uid": w.uid,
                    "name": w.name,
                    "namespace": w.namespace,
                    "serviceAccount": w.service_account,
                    "workloadIps": w.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                    "protocol": w.protocol,
                    "node": w.node,
                    "status": w.status,
                    "waypoint": w.waypoint,
                    "networkGateway": w.network_gateway,
                    "trustDomain": w.trust_domain,
                    "clusterId": w.cluster_id,
                    "network": w.network,
                    "canonicalName": w.canonical_name,
                    "canonicalRevision": w.canonical_revision,
                    "workloadName": w.workload_name,
                    "workloadType": w.workload_type,
                    "services": w.services.keys().collect::<Vec<_>>(),
                    "authorizationPolicies": w.authorization_policies,
                })
            })
            .collect();
        let mut services: Vec<&Arc<Service>> = inner.services.values().collect();
        services.sort_by_key(|s| s.key());
        let services = services
            .into_iter()
            .map(|s| {
                let key = s.key();
                let mut endpoints = serde_json::Map::new();
                for w in Self::endpoints(&inner, &key) {
                    let port: BTreeMap<String, u16> = s
                        .ports
                        .keys()
                        .map(|sp| (sp.to_string(), target_port(s, &w, *sp)))
                        .collect();
                    endpoints.insert(
                        w.uid.clone(),
                        serde_json::json!({"workloadUid": w.uid, "service": "", "port": port, "status": w.status}),
                    );
                }
                serde_json::json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname,
                    "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                    "endpoints": endpoints,
                    "subjectAltNames": s.subject_alt_names,
                    "waypoint": s.waypoint,
                })
            })
            .collect();
        let policies = inner
            .policies
            .values()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "namespace": p.namespace,
                    "scope": mesh_core::proto::security::Scope::try_from(p.scope).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
                    "action": mesh_core::proto::security::Action::try_from(p.action).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
                    "rules": serde_json::to_value(&p.rules).unwrap_or_default(),
                    "dryRun": p.dry_run,
                })
            })
            .collect();
        (workloads, services, policies)
    }

    /// Counts for logs and readiness.
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.read();
        (
            inner.workloads.len(),
            inner.services.len(),
            inner.policies.len(),
        )
    }

    /// Uids known to the state.
    pub fn uids(&self) -> HashSet<String> {
        self.read().workloads.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(uid: &str, ip: [u8; 4], svc: Option<(&str, u32, u32)>, healthy: bool) -> pb::Address {
        let mut services = HashMap::new();
        if let Some((key, sp, tp)) = svc {
            services.insert(
                key.to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: sp,
                        target_port: tp,
                        ..Default::default()
                    }],
                },
            );
        }
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                service_account: "sa".into(),
                trust_domain: "cluster.local".into(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                status: if healthy { 0 } else { 1 },
                services,
                ..Default::default()
            })),
        }
    }

    fn svc(host: &str, vip: [u8; 4], port: u32, target: u32) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: host.split('.').next().unwrap().into(),
                namespace: "default".into(),
                hostname: host.into(),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vip.to_vec(),
                    ..Default::default()
                }],
                ports: vec![pb::Port {
                    service_port: port,
                    target_port: target,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }
    }

    const KEY: &str = "default/b.default.svc.cluster.local";

    fn state(addrs: &[pb::Address]) -> ProxyState {
        let (snap, errs) = Snapshot::from_resources(addrs, &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let s = ProxyState::new();
        s.replace(snap);
        s
    }

    #[test]
    fn vip_spreads_over_healthy_endpoints_with_target_ports() {
        let s = state(&[
            svc("b.default.svc.cluster.local", [10, 96, 0, 10], 80, 8080),
            wl("b1", [10, 244, 1, 2], Some((KEY, 80, 0)), true),
            wl("b2", [10, 244, 2, 2], Some((KEY, 80, 9090)), true),
            wl("b3", [10, 244, 2, 3], Some((KEY, 80, 8080)), false),
        ]);
        let mut seen = HashSet::new();
        // Random picks: 200 draws miss one of two endpoints with
        // probability 2^-199.
        for _ in 0..200 {
            match s.resolve("", "10.96.0.10:80".parse().unwrap()) {
                Resolution::Upstream(u) => {
                    assert!(u.service.is_some());
                    seen.insert(u.addr.to_string());
                }
                other => panic!("{other:?}"),
            }
        }
        // b1 uses the service's target port, b2 its own; b3 is unhealthy.
        let want: HashSet<String> = ["10.244.1.2:8080", "10.244.2.2:9090"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn connections_wait_for_their_own_workload_then_give_up() {
        let st = state(&[]);
        let late = wl("late", [10, 0, 0, 9], None, true);
        let waiter = {
            let st = st.clone();
            tokio::spawn(async move { st.wait_for_workload("late", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        let (snap, errs) = Snapshot::from_resources(&[late], &[]);
        assert!(errs.is_empty());
        st.apply_delta(Delta {
            workloads: snap.workloads,
            ..Default::default()
        });
        assert_eq!(
            waiter.await.unwrap().map(|w| w.uid.clone()),
            Some("late".to_string())
        );
        let none = st
            .wait_for_workload("never", Duration::from_millis(50))
            .await;
        assert!(none.is_none());
    }

    #[test]
    fn pod_ip_unknown_ip_and_empty_service() {
        let s = state(&[
            svc("b.default.svc.cluster.local", [10, 96, 0, 10], 80, 8080),
            svc("c.default.svc.cluster.local", [10, 96, 0, 11], 80, 8080),
            wl("b1", [10, 244, 1, 2], Some((KEY, 80, 0)), true),
        ]);
        assert!(
            matches!(s.resolve("", "10.244.1.2:1234".parse().unwrap()), Resolution::Upstream(u) if u.addr.port() == 1234 && u.service.is_none())
        );
        assert!(matches!(
            s.resolve("", "192.0.2.1:80".parse().unwrap()),
            Resolution::Passthrough
        ));
        assert!(matches!(
            s.resolve("", "10.96.0.11:80".parse().unwrap()),
            Resolution::NoHealthyEndpoint { .. }
        ));
        assert!(matches!(
            s.resolve("", "10.96.0.10:81".parse().unwrap()),
            Resolution::NoHealthyEndpoint { .. }
        ));
        // Another network does not see these addresses.
        assert!(matches!(
            s.resolve("net2", "10.244.1.2:80".parse().unwrap()),
            Resolution::Passthrough
        ));
    }

    #[test]
    fn invalid_resources_name_the_field_and_keep_the_rest() {
        let mut bad = wl("bad", [10, 0, 0, 1], None, true);
        if let Some(pb::address::Type::Workload(w)) = &mut bad.r#type {
            w.addresses = vec![vec![1, 2, 3]];
        }
        let mut bad_port = svc("x.default.svc.cluster.local", [10, 96, 0, 1], 80, 70000);
        if let Some(pb::address::Type::Service(s)) = &mut bad_port.r#type {
            s.ports[0].target_port = 70000;
        }
        let good = wl("good", [10, 0, 0, 2], None, true);
        let (snap, errs) = Snapshot::from_resources(&[bad, bad_port, good], &[]);
        assert_eq!(snap.workloads.len(), 1);
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs[0],
            "workload bad: field addresses[0]: 3 bytes is not an IPv4 or IPv6 address"
        );
        assert!(
            msgs[1].starts_with(
                "service default/x.default.svc.cluster.local: field ports[0].targetPort"
            ),
            "{}",
            msgs[1]
        );
    }

    #[test]
    fn expected_identities_include_service_sans() {
        let mut s = svc("b.default.svc.cluster.local", [10, 96, 0, 10], 80, 8080);
        if let Some(pb::address::Type::Service(s)) = &mut s.r#type {
            s.subject_alt_names = vec![
                "spiffe://cluster.local/ns/default/sa/other".into(),
                "not-spiffe".into(),
            ];
        }
        let st = state(&[s, wl("b1", [10, 244, 1, 2], Some((KEY, 80, 0)), true)]);
        let Resolution::Upstream(u) = st.resolve("", "10.96.0.10:80".parse().unwrap()) else {
            panic!()
        };
        let ids: Vec<String> = u
            .expected_identities()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            ids,
            vec![
                "spiffe://cluster.local/ns/default/sa/sa",
                "spiffe://cluster.local/ns/default/sa/other"
            ]
        );
    }
}
