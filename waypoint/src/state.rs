//! What the waypoint knows of the mesh: the workloads and services of the
//! Workload API (to find the service a tunnel is addressed to and the
//! endpoints a request may go to) and the compiled routes per service.
//!
//! Fed by delta xDS ([`crate::xds`]) or the local file ([`crate::local`]);
//! read on every tunnel and request by [`crate::proxy`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock};

use mesh_core::identity::Identity;
use mesh_core::proto::waypoint as wpb;
use mesh_core::proto::workload as pb;
use serde::Serialize;

use crate::routing::{CompiledRoutes, RouteError};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{kind} {name}: {reason}")]
    Invalid {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("routes of {name}: {source}")]
    Routes {
        name: String,
        #[source]
        source: RouteError,
    },
}

/// An endpoint pod (or VM) as the waypoint needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub ips: Vec<IpAddr>,
    pub healthy: bool,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub cluster_id: String,
    /// `ns/hostname` -> service port -> target port.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Labels subsets select on when the control plane did not resolve
    /// them to workload uids. The Workload API carries no pod labels, so
    /// these are the ones it implies: `app` and `version` (and their
    /// canonical-service forms) from the canonical name and revision.
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether the workload carries every label of `selector`.
    pub fn matches_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// service port -> target port (0: take the workload's mapping).
    pub ports: BTreeMap<u16, u16>,
}

impl Service {
    /// `ns/hostname`, the key workloads use to name their services.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// One concrete place to send a request: a workload and the port on it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub ip: IpAddr,
    pub port: u16,
}

/// The healthy workloads of one service, shared with readers.
type Members = Arc<[Arc<Workload>]>;

#[derive(Default)]
struct Inner {
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    routes: HashMap<String, Arc<CompiledRoutes>>,
    by_vip: HashMap<IpAddr, String>,
    by_ip: HashMap<IpAddr, String>,
    by_hostname: HashMap<String, String>,
    /// namespace -> hostname -> healthy workloads serving that service,
    /// sorted by uid. Rebuilt on every change so the per-request lookup is
    /// two map probes instead of a scan of every workload.
    by_service: HashMap<String, HashMap<String, Members>>,
    loaded: bool,
}

impl Inner {
    /// The healthy workloads of `svc`, shared with the index.
    fn members(&self, svc: &Service) -> Option<Members> {
        self.by_service
            .get(svc.namespace.as_str())?
            .get(svc.hostname.as_str())
            .cloned()
    }

    fn reindex(&mut self) {
        self.by_vip.clear();
        self.by_hostname.clear();
        for (key, s) in &self.services {
            for vip in &s.vips {
                self.by_vip.insert(*vip, key.clone());
            }
            self.by_hostname.insert(s.hostname.clone(), key.clone());
        }
        self.by_ip.clear();
        let mut by_service: HashMap<String, HashMap<String, Vec<Arc<Workload>>>> = HashMap::new();
        for (uid, w) in &self.workloads {
            for ip in &w.ips {
                self.by_ip.insert(*ip, uid.clone());
            }
            if !w.healthy || w.ips.is_empty() {
                continue;
            }
            for key in w.services.keys() {
                let Some((ns, host)) = key.split_once('/') else {
                    continue;
                };
                by_service
                    .entry(ns.to_string())
                    .or_default()
                    .entry(host.to_string())
                    .or_default()
                    .push(w.clone());
            }
        }
        self.by_service = by_service
            .into_iter()
            .map(|(ns, hosts)| {
                let hosts = hosts
                    .into_iter()
                    .map(|(h, mut ws)| {
                        // A stable order makes round robin fair across calls.
                        ws.sort_by(|a, b| a.uid.cmp(&b.uid));
                        (h, Arc::from(ws))
                    })
                    .collect();
                (ns, hosts)
            })
            .collect();
    }
}

/// Shared, cheaply cloned view of the mesh.
#[derive(Clone, Default)]
pub struct State {
    inner: Arc<RwLock<Inner>>,
    loaded: Arc<tokio::sync::Notify>,
}

/// A service as found by hostname, with its routes if it has any.
pub type ServiceWithRoutes = (Arc<Service>, Option<Arc<CompiledRoutes>>);

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces everything (a local file reload).
    pub fn replace(
        &self,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        routes: Vec<CompiledRoutes>,
    ) {
        let mut st = self.write();
        st.workloads = workloads
            .into_iter()
            .map(|w| (w.uid.clone(), Arc::new(w)))
            .collect();
        st.services = services
            .into_iter()
            .map(|s| (s.key(), Arc::new(s)))
            .collect();
        st.routes = routes
            .into_iter()
            .map(|r| (r.hostname.clone(), Arc::new(r)))
            .collect();
        st.reindex();
    }

    /// Applies Workload API upserts and removals (by resource name).
    pub fn apply_addresses(
        &self,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        removed: &[String],
    ) {
        let mut st = self.write();
        for name in removed {
            st.workloads.remove(name);
            st.services.remove(name);
        }
        for w in workloads {
            st.workloads.insert(w.uid.clone(), Arc::new(w));
        }
        for s in services {
            st.services.insert(s.key(), Arc::new(s));
        }
        st.reindex();
    }

    /// Applies ServiceRoutes upserts and removals (by hostname).
    pub fn apply_routes(&self, routes: Vec<CompiledRoutes>, removed: &[String]) {
        let mut st = self.write();
        for name in removed {
            st.routes.remove(name);
        }
        for r in routes {
            st.routes.insert(r.hostname.clone(), Arc::new(r));
        }
    }

    pub fn mark_loaded(&self) {
        self.write().loaded = true;
        self.loaded.notify_waiters();
    }

    pub fn is_loaded(&self) -> bool {
        self.read().loaded
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        let st = self.read();
        st.by_vip.get(&ip).and_then(|k| st.services.get(k)).cloned()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let st = self.read();
        st.by_ip.get(&ip).and_then(|k| st.workloads.get(k)).cloned()
    }

    pub fn routes_for(&self, hostname: &str) -> Option<Arc<CompiledRoutes>> {
        self.read().routes.get(hostname).cloned()
    }

    /// The service named `host` (an FQDN, or a short name resolved in
    /// `namespace` the way Kubernetes DNS would).
    pub fn service_by_host(&self, host: &str, namespace: &str) -> Option<ServiceWithRoutes> {
        let st = self.read();
        let candidates = [
            host.to_string(),
            format!("{host}.{namespace}.svc.cluster.local"),
            format!("{host}.svc.cluster.local"),
        ];
        candidates.iter().find_map(|h| {
            let svc = st.by_hostname.get(h).and_then(|k| st.services.get(k))?;
            Some((svc.clone(), st.routes.get(h).cloned()))
        })
    }

    /// Healthy endpoints of `svc` serving `port`, restricted to the subset
    /// whose labels are `selector`: the members the control plane listed
    /// for it in `svc`'s routes when it resolved them, else the workloads
    /// carrying every label of `selector`.
    pub fn endpoints(
        &self,
        svc: &Service,
        port: u16,
        selector: Option<&BTreeMap<String, String>>,
    ) -> Vec<Endpoint> {
        let (members, resolved) = {
            let st = self.read();
            let Some(members) = st.members(svc) else {
                return Vec::new();
            };
            let resolved =
                selector.and_then(|s| st.routes.get(svc.hostname.as_str())?.subset_members(s));
            (members, resolved)
        };
        members
            .iter()
            .filter(|w| match (selector, &resolved) {
                (None, _) => true,
                (Some(_), Some(uids)) => uids.contains(&w.uid),
                (Some(s), None) => w.matches_labels(s),
            })
            .filter_map(|w| {
                // The index only holds workloads of this service with an IP.
                let ports = w
                    .services
                    .iter()
                    .find(|(k, _)| is_service_key(k, svc))
                    .map(|(_, p)| p)?;
                let ip = *w.ips.first()?;
                let target = ports
                    .get(&port)
                    .copied()
                    .filter(|p| *p != 0)
                    .or_else(|| svc.ports.get(&port).copied().filter(|p| *p != 0))
                    .unwrap_or(port);
                Some(Endpoint {
                    workload: w.clone(),
                    ip,
                    port: target,
                })
            })
            .collect()
    }

    /// Every service with its routes (if any), for the admin `/stats`.
    pub fn services_with_routes(&self) -> Vec<ServiceWithRoutes> {
        let st = self.read();
        let mut out: Vec<ServiceWithRoutes> = st
            .services
            .values()
            .map(|s| (s.clone(), st.routes.get(&s.hostname).cloned()))
            .collect();
        out.sort_by(|a, b| a.0.hostname.cmp(&b.0.hostname));
        out
    }

    /// Everything, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let st = self.read();
        let mut workloads: Vec<_> = st.workloads.values().cloned().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<_> = st.services.values().cloned().collect();
        services.sort_by_key(|s| s.key());
        let mut routes: Vec<&wpb::ServiceRoutes> = st.routes.values().map(|r| &r.source).collect();
        routes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        let workloads: Vec<&Workload> = workloads.iter().map(|w| w.as_ref()).collect();
        let services: Vec<&Service> = services.iter().map(|s| s.as_ref()).collect();
        serde_json::json!({
            "workloads": workloads,
            "services": services,
            "routes": routes,
        })
    }
}

/// Whether `key` (`ns/hostname`) names `svc`, without building the key.
fn is_service_key(key: &str, svc: &Service) -> bool {
    key.len() == svc.namespace.len() + 1 + svc.hostname.len()
        && key.starts_with(svc.namespace.as_str())
        && key.as_bytes()[svc.namespace.len()] == b'/'
        && key.ends_with(svc.hostname.as_str())
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

fn port(kind: &'static str, name: &str, p: u32) -> Result<u16, StateError> {
    u16::try_from(p).map_err(|_| StateError::Invalid {
        kind,
        name: name.to_string(),
        reason: format!("port {p} out of range"),
    })
}

pub fn convert_workload(w: &pb::Workload) -> Result<Workload, StateError> {
    let invalid = |reason: String| StateError::Invalid {
        kind: "workload",
        name: w.uid.clone(),
        reason,
    };
    if w.uid.is_empty() {
        return Err(invalid("empty uid".into()));
    }
    let ips = w
        .addresses
        .iter()
        .map(|a| ip_from_bytes(a).ok_or_else(|| invalid(format!("address of {} bytes", a.len()))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let mut ports = BTreeMap::new();
        for p in &list.ports {
            ports.insert(
                port("workload", &w.uid, p.service_port)?,
                port("workload", &w.uid, p.target_port)?,
            );
        }
        services.insert(key.clone(), ports);
    }
    let mut labels = BTreeMap::new();
    if !w.canonical_name.is_empty() {
        labels.insert("app".into(), w.canonical_name.clone());
        labels.insert(
            "service.istio.io/canonical-name".into(),
            w.canonical_name.clone(),
        );
    }
    if !w.canonical_revision.is_empty() {
        labels.insert("version".into(), w.canonical_revision.clone());
        labels.insert(
            "service.istio.io/canonical-revision".into(),
            w.canonical_revision.clone(),
        );
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
        ips,
        healthy: w.status == pb::WorkloadStatus::Healthy as i32,
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        cluster_id: w.cluster_id.clone(),
        services,
        labels,
    })
}

pub fn convert_service(s: &pb::Service) -> Result<Service, StateError> {
    let name = format!("{}/{}", s.namespace, s.hostname);
    if s.hostname.is_empty() {
        return Err(StateError::Invalid {
            kind: "service",
            name,
            reason: "empty hostname".into(),
        });
    }
    let vips = s
        .addresses
        .iter()
        .map(|a| {
            ip_from_bytes(&a.address).ok_or_else(|| StateError::Invalid {
                kind: "service",
                name: name.clone(),
                reason: format!("address of {} bytes", a.address.len()),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = BTreeMap::new();
    for p in &s.ports {
        ports.insert(
            port("service", &name, p.service_port)?,
            port("service", &name, p.target_port)?,
        );
    }
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
    })
}

/// Splits Workload API addresses into converted workloads and services.
pub fn convert_addresses(
    addresses: &[pb::Address],
) -> Result<(Vec<Workload>, Vec<Service>), StateError> {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for a in addresses {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => workloads.push(convert_workload(w)?),
            Some(pb::address::Type::Service(s)) => services.push(convert_service(s)?),
            None => {}
        }
    }
    Ok((workloads, services))
}

/// Compiles every ServiceRoutes, naming the first invalid one.
pub fn compile_routes(routes: Vec<wpb::ServiceRoutes>) -> Result<Vec<CompiledRoutes>, StateError> {
    routes
        .into_iter()
        .map(|r| {
            let name = r.hostname.clone();
            CompiledRoutes::compile(r).map_err(|source| StateError::Routes { name, source })
        })
        .collect()
}
