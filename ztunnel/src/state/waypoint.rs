//! Waypoints in the mesh state: which original destinations sit behind a
//! waypoint, which waypoint pod a connection goes to, and whether a
//! workload is itself a waypoint (so its own traffic is not looped back).
//!
//! The outbound path asks [`ProxyState::resolve_outbound`] instead of
//! [`ProxyState::resolve`]; the inbound path uses the rest to accept
//! CONNECTs a waypoint pod is sent and to tell where a connection came from.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::identity::Identity;

use super::{
    owner, GatewayAddress, GatewayTarget, HealthStatus, Inner, ProxyState, Resolution, Service,
    Upstream, Workload,
};

/// The waypoint pod a connection is sent to.
#[derive(Debug, Clone)]
pub struct WaypointUpstream {
    /// The waypoint pod chosen (one healthy endpoint of the waypoint's Service).
    pub workload: Arc<Workload>,
    /// Where it terminates HBONE: its pod IP and the gateway's HBONE port.
    pub hbone_addr: SocketAddr,
    /// The waypoint's own Service, when the gateway address named one.
    pub service: Option<Arc<Service>>,
}

impl WaypointUpstream {
    /// Identities the waypoint may present: its pod's own, plus its
    /// Service's declared `subject_alt_names`.
    pub fn expected_identities(&self) -> Vec<Identity> {
        Upstream {
            workload: self.workload.clone(),
            addr: self.hbone_addr,
            service: self.service.clone(),
        }
        .expected_identities()
    }
}

/// How an outbound connection is carried, waypoints included.
#[derive(Debug)]
pub enum OutboundRoute {
    /// No waypoint in the way (or the source is that waypoint itself): as
    /// [`ProxyState::resolve`] decides.
    Direct(Resolution),
    /// Through the destination's waypoint. The CONNECT keeps the original
    /// destination as its authority: the waypoint picks the endpoint.
    Waypoint {
        waypoint: WaypointUpstream,
        /// The original destination (`<vip>:<port>` or `<pod ip>:<port>`).
        authority: SocketAddr,
        /// The service the client addressed (service-addressed traffic).
        service: Option<Arc<Service>>,
        /// The workload the client addressed (workload-addressed traffic).
        workload: Option<Arc<Workload>>,
    },
    /// The destination has a waypoint but no healthy waypoint pod can be
    /// found: the connection is refused, never sent around the waypoint.
    NoHealthyWaypoint {
        /// The addressed service hostname or workload name.
        destination: String,
        /// The gateway address as the admin dump shows it.
        waypoint: String,
        reason: String,
    },
}

/// The waypoint in front of an original destination, found under one read
/// of the state.
enum Fronted {
    Service(Arc<Service>, GatewayAddress),
    Workload(Arc<Workload>, GatewayAddress),
}

impl ProxyState {
    /// Resolve an original destination for a connection from `source`,
    /// sending it to the destination's waypoint when it has one (Istio's
    /// ambient rules): a service VIP goes through the Service's waypoint, a
    /// pod IP through the Workload's. A source that is itself that waypoint
    /// goes direct, so a waypoint's own connections never loop back to it.
    pub fn resolve_outbound(
        &self,
        network: &str,
        source: Option<&Workload>,
        dst: SocketAddr,
    ) -> OutboundRoute {
        let fronted = {
            let inner = self.read();
            Self::fronted_by(&inner, network, dst)
        };
        let (gw, service, workload, name) = match fronted {
            None => return OutboundRoute::Direct(self.resolve(network, dst)),
            Some(Fronted::Service(s, gw)) => {
                let name = s.hostname.clone();
                (gw, Some(s), None, name)
            }
            Some(Fronted::Workload(w, gw)) => {
                let name = format!("{}/{}", w.namespace, w.name);
                (gw, None, Some(w), name)
            }
        };
        if source.is_some_and(|src| self.is_waypoint(&gw, src)) {
            tracing::debug!(destination = %name, waypoint = %gw.destination, "source is the destination's waypoint; going direct");
            return OutboundRoute::Direct(self.resolve(network, dst));
        }
        match self.waypoint_upstream(network, &gw, dst.is_ipv4()) {
            Ok(waypoint) => OutboundRoute::Waypoint {
                waypoint,
                authority: dst,
                service,
                workload,
            },
            Err(reason) => OutboundRoute::NoHealthyWaypoint {
                destination: name,
                waypoint: gw.destination,
                reason,
            },
        }
    }

    /// The waypoint the original destination `dst` must go through, if any.
    fn fronted_by(inner: &Inner, network: &str, dst: SocketAddr) -> Option<Fronted> {
        if let Some(key) = owner(&inner.by_vip, &(network.to_string(), dst.ip())) {
            let svc = inner.services.get(key)?;
            // A port the service does not have is refused by `resolve` as
            // it is without a waypoint.
            if !svc.ports.contains_key(&dst.port()) {
                return None;
            }
            return svc
                .waypoint
                .clone()
                .map(|gw| Fronted::Service(svc.clone(), gw));
        }
        let uid = owner(&inner.by_ip, &(network.to_string(), dst.ip()))?;
        let wl = inner.workloads.get(uid)?;
        wl.waypoint
            .clone()
            .map(|gw| Fronted::Workload(wl.clone(), gw))
    }

    /// Whether `w` is (one of the pods of) the waypoint `gw` names.
    pub fn is_waypoint(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        match &gw.target {
            GatewayTarget::Hostname {
                namespace,
                hostname,
            } => w.services.contains_key(&format!("{namespace}/{hostname}")),
            GatewayTarget::Address { network, ip } => {
                // An address without a network is on the workload's own.
                let network = if network.is_empty() {
                    &w.network
                } else {
                    network
                };
                let inner = self.read();
                match owner(&inner.by_vip, &(network.clone(), *ip)) {
                    Some(key) => w.services.contains_key(key),
                    None => w.network == *network && w.ips.contains(ip),
                }
            }
        }
    }

    /// Whether `me` is the waypoint of whatever holds `ip` on `network` (a
    /// service VIP or a workload address). A waypoint receives HBONE whose
    /// authority is that original destination, not its own address.
    pub fn is_waypoint_for(&self, network: &str, ip: IpAddr, me: &Workload) -> bool {
        let gw = {
            let inner = self.read();
            let k = (network.to_string(), ip);
            match owner(&inner.by_vip, &k) {
                Some(key) => inner.services.get(key).and_then(|s| s.waypoint.clone()),
                None => owner(&inner.by_ip, &k)
                    .and_then(|uid| inner.workloads.get(uid))
                    .and_then(|w| w.waypoint.clone()),
            }
        };
        gw.is_some_and(|gw| self.is_waypoint(&gw, me))
    }

    /// Pick a healthy pod of the waypoint `gw` names: the endpoints of its
    /// Service (by hostname or VIP), or the workload at its address. The
    /// error says why none is usable.
    pub fn waypoint_upstream(
        &self,
        network: &str,
        gw: &GatewayAddress,
        prefer_v4: bool,
    ) -> Result<WaypointUpstream, String> {
        let inner = self.read();
        let key = match &gw.target {
            GatewayTarget::Hostname {
                namespace,
                hostname,
            } => {
                let key = format!("{namespace}/{hostname}");
                if !inner.services.contains_key(&key) {
                    return Err(format!("waypoint service {key} is not known"));
                }
                key
            }
            GatewayTarget::Address { network: net, ip } => {
                // An address without a network is on the client's own.
                let net = if net.is_empty() { network } else { net };
                match owner(&inner.by_vip, &(net.to_string(), *ip)) {
                    Some(key) => key.to_string(),
                    None => {
                        let uid = owner(&inner.by_ip, &(net.to_string(), *ip))
                            .ok_or_else(|| format!("no waypoint at address {net}/{ip}"))?;
                        let wl = inner
                            .workloads
                            .get(uid)
                            .ok_or_else(|| format!("no waypoint at address {net}/{ip}"))?;
                        if wl.status != HealthStatus::Healthy {
                            return Err(format!("waypoint {} is unhealthy", wl.name));
                        }
                        return Ok(WaypointUpstream {
                            workload: wl.clone(),
                            hbone_addr: SocketAddr::new(*ip, gw.port()),
                            service: None,
                        });
                    }
                }
            }
        };
        let service = inner.services.get(&key).cloned();
        let healthy: Vec<Arc<Workload>> = Self::endpoints(&inner, &key)
            .into_iter()
            .filter(|w| w.status == HealthStatus::Healthy && !w.ips.is_empty())
            .collect();
        if healthy.is_empty() {
            return Err(format!("waypoint service {key} has no healthy endpoint"));
        }
        let wl = healthy[rand::random_range(0..healthy.len())].clone();
        let ip = wl
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == prefer_v4)
            .or(wl.ips.first())
            .copied()
            .ok_or_else(|| format!("waypoint {} has no address", wl.name))?;
        Ok(WaypointUpstream {
            workload: wl,
            hbone_addr: SocketAddr::new(ip, gw.port()),
            service,
        })
    }

    /// The identities of every pod of the waypoint `gw` names (healthy or
    /// not: a connection a waypoint opened stays its own while it drains).
    pub fn waypoint_identities(&self, network: &str, gw: &GatewayAddress) -> Vec<Identity> {
        let inner = self.read();
        let key = match &gw.target {
            GatewayTarget::Hostname {
                namespace,
                hostname,
            } => format!("{namespace}/{hostname}"),
            GatewayTarget::Address { network: net, ip } => {
                let net = if net.is_empty() { network } else { net };
                match owner(&inner.by_vip, &(net.to_string(), *ip)) {
                    Some(key) => key.to_string(),
                    None => {
                        return owner(&inner.by_ip, &(net.to_string(), *ip))
                            .and_then(|uid| inner.workloads.get(uid))
                            .map(|w| vec![w.identity()])
                            .unwrap_or_default()
                    }
                }
            }
        };
        let mut ids: Vec<Identity> = Self::endpoints(&inner, &key)
            .iter()
            .map(|w| w.identity())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The waypoint of an inbound connection's destination: the Service it
    /// was addressed through if that has one, else the workload's own.
    pub fn inbound_waypoint(
        &self,
        dst: &Workload,
        service: Option<&Service>,
    ) -> Option<GatewayAddress> {
        service
            .and_then(|s| s.waypoint.clone())
            .or_else(|| dst.waypoint.clone())
    }
}
