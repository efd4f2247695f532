//! Services as the translator keeps them, and their Workload API form.
//!
//! A Service becomes the VIP entry ztunnel load-balances on: hostname, VIPs
//! per network, ports with their application protocol, and the waypoint that
//! traffic to it must cross. Its selector and ports also feed every selected
//! pod's `services` map (see `pod.rs`), which is how endpoints are expressed.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::proto::workload::{AppProtocol, NetworkAddress, Port, Service as WlService};

use super::pod::{ip_bytes, selector_matches};
use super::{labels, service_hostname, waypoint_address, Labels, MeshConfig};

/// Where a service port lands on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TargetPort {
    /// No targetPort: the pod listens on the service port.
    Same,
    Number(u32),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SvcPort {
    pub port: u32,
    pub target: TargetPort,
    pub app_protocol: AppProtocol,
}

/// The parts of a Service the translation depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SvcInfo {
    pub labels: Labels,
    pub selector: Labels,
    pub ports: Vec<SvcPort>,
    pub vips: Vec<IpAddr>,
    /// A DNS alias, not a set of endpoints: neither emitted nor selecting.
    pub external_name: bool,
}

impl SvcInfo {
    pub fn from_service(svc: &Service) -> Self {
        let spec = svc.spec.as_ref();
        let mut vips: Vec<IpAddr> = Vec::new();
        let listed = spec.and_then(|s| s.cluster_ips.as_ref());
        let raw: Vec<&str> = match listed {
            Some(l) if !l.is_empty() => l.iter().map(String::as_str).collect(),
            _ => spec
                .and_then(|s| s.cluster_ip.as_deref())
                .into_iter()
                .collect(),
        };
        // Headless services say "None" here; they have endpoints but no VIP.
        for ip in raw.iter().filter_map(|r| r.parse::<IpAddr>().ok()) {
            if !vips.contains(&ip) {
                vips.push(ip);
            }
        }
        let ports = spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                // The API server validates ports; a config folder does not,
                // and a proxy rejects what is not a TCP port.
                let Some(port) = tcp_port(p.port) else {
                    tracing::warn!(service = ?svc.metadata.name, port = p.port, "spec.ports[].port is not a TCP port; left out");
                    return None;
                };
                let target = match &p.target_port {
                    None => TargetPort::Same,
                    Some(IntOrString::Int(n)) => match tcp_port(*n) {
                        Some(n) => TargetPort::Number(n),
                        None => {
                            tracing::warn!(service = ?svc.metadata.name, target_port = n, "spec.ports[].targetPort is not a TCP port; left out");
                            return None;
                        }
                    },
                    // Hand-written YAML sometimes quotes a number.
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) if n > 0 => TargetPort::Number(u32::from(n)),
                        _ if s.is_empty() => TargetPort::Same,
                        _ => TargetPort::Name(s.clone()),
                    },
                };
                Some(SvcPort {
                    port,
                    target,
                    app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
                })
            })
            .collect();
        SvcInfo {
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
            ports,
            vips,
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
        }
    }

    /// Whether this service has `labels`' pod among its endpoints.
    pub fn selects(&self, labels: &Labels) -> bool {
        !self.external_name && selector_matches(&self.selector, labels)
    }

    /// Whether two versions of a service give selected pods the same
    /// `services` entries; if so, a change to it need not touch any pod.
    pub fn same_for_pods(&self, other: &SvcInfo) -> bool {
        self.external_name == other.external_name
            && self.selector == other.selector
            && self.ports == other.ports
    }

    /// The Service entry, or None for kinds the address book does not hold.
    pub fn to_service(
        &self,
        cfg: &MeshConfig,
        namespace: &str,
        name: &str,
        ns_labels: Option<&Labels>,
    ) -> Option<WlService> {
        if self.external_name {
            return None;
        }
        // VIPs live on the network of the namespace's pods, so clients there
        // find them under their own network.
        let network = ns_labels
            .and_then(|l| l.get(labels::NETWORK))
            .cloned()
            .unwrap_or_else(|| cfg.network.clone());
        // The service's own label wins over its namespace's, including the
        // value "none" that turns an inherited waypoint off.
        let (wp_source, wp_name) = match self.labels.get(labels::USE_WAYPOINT) {
            Some(n) => (Some(&self.labels), Some(n)),
            None => (
                ns_labels,
                ns_labels.and_then(|l| l.get(labels::USE_WAYPOINT)),
            ),
        };
        let waypoint = wp_name.and_then(|wp| {
            let wp_ns = wp_source
                .and_then(|l| l.get(labels::USE_WAYPOINT_NAMESPACE))
                .filter(|n| !n.is_empty())
                .map(String::as_str)
                .unwrap_or(namespace);
            waypoint_address(cfg, wp, wp_ns)
        });
        Some(WlService {
            name: name.to_string(),
            namespace: namespace.to_string(),
            hostname: service_hostname(cfg, namespace, name),
            addresses: self
                .vips
                .iter()
                .map(|ip| NetworkAddress {
                    network: network.clone(),
                    address: ip_bytes(ip),
                    length: None,
                })
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|p| Port {
                    service_port: p.port,
                    // Named ports resolve per pod, in each workload's map.
                    target_port: match &p.target {
                        TargetPort::Same => p.port,
                        TargetPort::Number(n) => *n,
                        TargetPort::Name(_) => 0,
                    },
                    app_protocol: p.app_protocol as i32,
                })
                .collect(),
            waypoint,
            ..Default::default()
        })
    }
}

/// `n` when it is a TCP port number (1..=65535).
pub(super) fn tcp_port(n: i32) -> Option<u32> {
    u16::try_from(n).ok().filter(|p| *p > 0).map(u32::from)
}

/// Application protocol of a service port: `appProtocol` when set, else the
/// Istio port-name convention `<protocol>[-<suffix>]`.
pub(super) fn app_protocol(app_protocol: Option<&str>, port_name: Option<&str>) -> AppProtocol {
    if let Some(ap) = app_protocol.filter(|a| !a.is_empty()) {
        return match ap.to_ascii_lowercase().as_str() {
            "http" | "kubernetes.io/ws" => AppProtocol::Http11,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            "tls" | "https" | "kubernetes.io/wss" => AppProtocol::Tls,
            _ => AppProtocol::Unknown,
        };
    }
    let Some(name) = port_name else {
        return AppProtocol::Unknown;
    };
    let prefix = name.split('-').next().unwrap_or_default();
    match prefix.to_ascii_lowercase().as_str() {
        "http" => AppProtocol::Http11,
        "http2" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        "tcp" => AppProtocol::Tcp,
        "tls" | "https" => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    }
}
