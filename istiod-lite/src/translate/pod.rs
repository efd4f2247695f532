//! Pods as the translator keeps them, and their Workload API form.
//!
//! Each pod becomes one `Workload` in the address book ztunnel routes by: its
//! IPs, identity, tunnel protocol (HBONE when enrolled in ambient mode), the
//! waypoint its inbound traffic must cross and, per selecting Service, the
//! port it actually listens on. Only the fields the translation reads are
//! kept, so 10,000 pods stay cheap to hold and to compare.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use mesh_core::proto::workload::{
    GatewayAddress, Port, PortList, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};

use super::service::{SvcInfo, TargetPort};
use super::{labels, waypoint_address, Labels, MeshConfig};

/// Who created a pod, as far as telemetry naming cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Owner {
    pub kind: String,
    pub name: String,
}

/// The parts of a Pod the translation depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodInfo {
    pub labels: Labels,
    /// Runs an Istio sidecar, which does its own mTLS: never captured by
    /// ztunnel even in an ambient namespace.
    pub has_sidecar: bool,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Phase Succeeded or Failed: its IP may already belong to another pod.
    pub terminal: bool,
    pub node: String,
    pub service_account: String,
    pub owner: Option<Owner>,
    pub ready: bool,
    pub deleting: bool,
    /// Container port names to numbers, for Services with a named targetPort.
    pub named_ports: HashMap<String, u32>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let has_sidecar = labels.get(labels::TLS_MODE).map(String::as_str) == Some("istio")
            || meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(labels::SIDECAR_STATUS));
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();

        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = status.and_then(|s| s.pod_ips.as_ref());
        let raw: Vec<&str> = match listed {
            Some(l) if !l.is_empty() => l.iter().map(|p| p.ip.as_str()).collect(),
            _ => status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .collect(),
        };
        for r in raw {
            match r.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    pod = meta.name.as_deref().unwrap_or_default(),
                    ip = r,
                    "pod IP is not an address; ignored"
                ),
            }
        }

        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        // The controller owner is the one that names the workload; fall back
        // to the first owner for objects made by hand without `controller`.
        let owner = meta.owner_references.as_ref().and_then(|refs| {
            refs.iter()
                .find(|r| r.controller == Some(true))
                .or_else(|| refs.first())
                .map(|r| Owner {
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                })
        });
        let mut named_ports = HashMap::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for p in c.ports.as_deref().unwrap_or_default() {
                if let (Some(name), Some(num)) =
                    (&p.name, super::service::tcp_port(p.container_port))
                {
                    named_ports.entry(name.clone()).or_insert(num);
                }
            }
        }
        PodInfo {
            labels,
            has_sidecar,
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminal: matches!(phase, "Succeeded" | "Failed"),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            owner,
            ready,
            deleting: meta.deletion_timestamp.is_some(),
            named_ports,
        }
    }

    /// Whether ztunnel captures this pod and reaches it over HBONE.
    pub fn enrolled(&self, ns_labels: Option<&Labels>) -> bool {
        if self.has_sidecar {
            return false;
        }
        match self.labels.get(labels::DATAPLANE_MODE).map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => ns_labels
                .and_then(|l| l.get(labels::DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient"),
        }
    }

    /// Whether the pod is in the address book at all.
    pub fn emitted(&self) -> bool {
        !self.ips.is_empty() && !self.host_network && !self.terminal
    }

    /// Workload type and name for telemetry, from the owning controller.
    fn workload_type_name(&self, pod_name: &str) -> (WorkloadType, String) {
        let Some(owner) = &self.owner else {
            return (WorkloadType::Pod, pod_name.to_string());
        };
        match owner.kind.as_str() {
            "ReplicaSet" => {
                // A Deployment names its ReplicaSets `<deployment>-<hash>`
                // and stamps the hash on the pods; without that mark the
                // ReplicaSet stands on its own.
                let hash = self.labels.get("pod-template-hash");
                match hash.and_then(|h| {
                    owner
                        .name
                        .strip_suffix(h.as_str())
                        .and_then(|n| n.strip_suffix('-'))
                }) {
                    Some(dep) if !dep.is_empty() => (WorkloadType::Deployment, dep.to_string()),
                    _ => (WorkloadType::Pod, owner.name.clone()),
                }
            }
            "Deployment" => (WorkloadType::Deployment, owner.name.clone()),
            // A CronJob names its Jobs `<cronjob>-<scheduled minute>`, but a
            // hand-made Job can end in digits too, and the Job's own owner is
            // not visible from the pod: reporting JOB is never wrong.
            "Job" => (WorkloadType::Job, owner.name.clone()),
            "CronJob" => (WorkloadType::Cronjob, owner.name.clone()),
            _ => (WorkloadType::Pod, owner.name.clone()),
        }
    }

    /// The Workload for this pod, or None when it is not in the address book.
    /// `services` are the Services of the pod's namespace, by name.
    pub fn to_workload<'a>(
        &self,
        cfg: &MeshConfig,
        namespace: &str,
        name: &str,
        ns_labels: Option<&Labels>,
        services: impl Iterator<Item = (&'a String, &'a SvcInfo)>,
    ) -> Option<Workload> {
        if !self.emitted() {
            return None;
        }
        let tunnel = if self.enrolled(ns_labels) {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        };
        let network = self
            .labels
            .get(labels::NETWORK)
            .or_else(|| ns_labels.and_then(|l| l.get(labels::NETWORK)))
            .cloned()
            .unwrap_or_else(|| cfg.network.clone());
        let (workload_type, workload_name) = self.workload_type_name(name);
        let canonical_name = first_label(
            &self.labels,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .unwrap_or(&workload_name)
        .clone();
        let canonical_revision = first_label(
            &self.labels,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .cloned()
        .unwrap_or_else(|| "latest".to_string());
        let status = if self.ready && !self.deleting {
            WorkloadStatus::Healthy
        } else {
            WorkloadStatus::Unhealthy
        };
        // Only the pod's own label gives a workload a waypoint: a waypoint
        // named on the namespace serves Services by default
        // (`istio.io/waypoint-for: service`), so the namespace label is
        // applied to Services, not to workloads.
        let waypoint = self.waypoint(cfg, namespace);

        let mut svc_map = std::collections::HashMap::new();
        for (svc_name, svc) in services {
            if !svc.selects(&self.labels) {
                continue;
            }
            svc_map.insert(
                format!(
                    "{namespace}/{}",
                    super::service_hostname(cfg, namespace, svc_name)
                ),
                self.port_list(svc),
            );
        }

        Some(Workload {
            uid: super::workload_uid(cfg, namespace, name),
            name: name.to_string(),
            namespace: namespace.to_string(),
            addresses: self.ips.iter().map(ip_bytes).collect(),
            network,
            tunnel_protocol: tunnel as i32,
            trust_domain: cfg.trust_domain.clone(),
            service_account: self.service_account.clone(),
            waypoint,
            node: self.node.clone(),
            cluster_id: cfg.cluster_id.clone(),
            canonical_name,
            canonical_revision,
            workload_type: workload_type as i32,
            workload_name,
            services: svc_map,
            status: status as i32,
            ..Default::default()
        })
    }

    fn waypoint(&self, cfg: &MeshConfig, namespace: &str) -> Option<GatewayAddress> {
        let name = self.labels.get(labels::USE_WAYPOINT)?;
        let wp_ns = self
            .labels
            .get(labels::USE_WAYPOINT_NAMESPACE)
            .filter(|n| !n.is_empty())
            .map(String::as_str)
            .unwrap_or(namespace);
        waypoint_address(cfg, name, wp_ns)
    }

    /// This pod's ports for one selecting Service. A named targetPort the pod
    /// does not declare leaves that port out: the pod cannot serve it.
    fn port_list(&self, svc: &SvcInfo) -> PortList {
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target {
                    TargetPort::Same => p.port,
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(n) => *self.named_ports.get(n)?,
                };
                Some(Port {
                    service_port: p.port,
                    target_port: target,
                    app_protocol: p.app_protocol as i32,
                })
            })
            .collect();
        PortList { ports }
    }
}

fn first_label<'a>(labels: &'a Labels, keys: &[&str]) -> Option<&'a String> {
    keys.iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
}

/// Raw network-order bytes, as the Workload API carries addresses.
pub(super) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Whether `selector` is non-empty and every pair of it is in `labels`.
pub(super) fn selector_matches(selector: &BTreeMap<String, String>, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
