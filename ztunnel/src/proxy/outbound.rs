//! Outbound (15001): a pod's own outgoing connection, redirected in-pod.
//!
//! The original destination is resolved against the mesh state: a service
//! VIP picks a healthy endpoint (round robin), a pod IP is that pod. A mesh
//! (HBONE) destination is reached over HBONE at its 15008 with its identity
//! expected — never in plaintext; a destination outside the mesh is passed
//! through as it was addressed.
//!
//! A destination behind a waypoint (a service VIP whose Service has one, or
//! a pod IP whose Workload has one) is sent over HBONE to a waypoint pod's
//! HBONE port instead, with the original `<vip>:<port>` / `<pod ip>:<port>`
//! as the CONNECT authority and the waypoint's identity expected; if no
//! waypoint pod is healthy the connection is reset, never sent around the
//! waypoint. A pod that is itself the waypoint goes direct (no loop).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::hbone::headers;
use mesh_core::hbone::{ConnectRequest, HboneError};
use mesh_core::identity::Identity;
use mesh_core::tls;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{reset, Pod, PoolKey, ProxyError, ProxyInputs, HBONE_PORT};
use crate::connections::{ConnProtocol, ConnectionInfo, Direction};
use crate::metrics::{ConnectionRecorder, Reporter, SecurityPolicy, TcpLabels};
use crate::state::{OutboundRoute, Protocol, Resolution, Service, Workload};

pub async fn handle(pi: &Arc<ProxyInputs>, pod: &Arc<Pod>, stream: TcpStream, peer: SocketAddr) {
    let dst = match crate::sys::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, %peer, "outbound connection without an original destination");
            return reset(stream);
        }
    };
    forward(pi, pod, stream, peer, dst).await
}

/// Carry one captured connection of `pod` (from `peer`) whose original
/// destination was `dst`: to the destination's waypoint, to the destination
/// itself over HBONE, or passed through, as the mesh state says.
pub async fn forward(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    let span = tracing::info_span!("outbound", src.addr = %peer, dst.addr = %dst, src.workload = %pod.name);
    async move {
        // Fail closed: before the first state arrives a mesh destination
        // looks like one outside the mesh and would be passed through in
        // plaintext. Hold the connection for a while, then refuse it.
        if tokio::time::timeout(pi.cfg.connect_timeout, pi.state.wait_loaded())
            .await
            .is_err()
        {
            tracing::warn!(
                "mesh state not loaded yet; refusing the connection rather than passing it through"
            );
            return reset(stream);
        }
        let src = pi
            .state
            .wait_for_workload(&pod.uid, super::LOCAL_WORKLOAD_WAIT)
            .await;
        if src.is_none() {
            tracing::debug!(
                "the pod's own workload is not in the mesh state yet; going on without it"
            );
        }
        let network = pod.network(pi);
        let resolution = match pi.state.resolve_outbound(&network, src.as_deref(), dst) {
            OutboundRoute::Direct(r) => r,
            OutboundRoute::Waypoint {
                waypoint,
                authority,
                service,
                workload: _,
            } => {
                tracing::debug!(
                    waypoint = %waypoint.workload.name,
                    waypoint.addr = %waypoint.hbone_addr,
                    "destination has a waypoint; sending through it"
                );
                let target = Target {
                    hbone_addr: waypoint.hbone_addr,
                    authority,
                    expected: waypoint.expected_identities(),
                    // The peer we reach and whose identity we check is the
                    // waypoint; the addressed service stays the metrics'
                    // destination service.
                    peer: waypoint.workload.clone(),
                    service,
                    via_waypoint: true,
                };
                if let Err(e) = hbone_upstream(pi, pod, stream, peer, dst, target).await {
                    tracing::warn!(error = %e, "outbound connection through waypoint failed");
                }
                return;
            }
            OutboundRoute::NoHealthyWaypoint {
                destination,
                waypoint,
                reason,
            } => {
                // Never around the waypoint: its policies would be bypassed.
                tracing::warn!(
                    destination = %destination,
                    waypoint = %waypoint,
                    error = %reason,
                    "no healthy waypoint: resetting connection"
                );
                return reset(stream);
            }
        };
        match resolution {
            Resolution::Upstream(up) if up.workload.protocol == Protocol::Hbone => {
                let target = Target {
                    hbone_addr: SocketAddr::new(up.addr.ip(), HBONE_PORT),
                    authority: up.addr,
                    expected: up.expected_identities(),
                    peer: up.workload.clone(),
                    service: up.service.clone(),
                    via_waypoint: false,
                };
                if let Err(e) = hbone_upstream(pi, pod, stream, peer, dst, target).await {
                    tracing::warn!(error = %e, "outbound connection failed");
                }
            }
            Resolution::Upstream(up) => {
                let labels = labels(
                    pi,
                    pod,
                    Some(&up.workload),
                    up.service.as_deref(),
                    SecurityPolicy::none,
                );
                plain(pi, pod, stream, up.addr, labels).await
            }
            Resolution::NoHealthyEndpoint { service, port } => {
                let e = ProxyError::NoHealthyEndpoint { service, port };
                tracing::warn!(error = %e, "access denied: resetting connection");
                reset(stream)
            }
            Resolution::Passthrough => {
                let labels = labels(pi, pod, None, None, SecurityPolicy::none);
                plain(pi, pod, stream, dst, labels).await
            }
        }
    }
    .instrument(span)
    .await
}

/// Where one HBONE tunnel goes: the next hop (the destination pod or its
/// waypoint) and what is asked of it.
struct Target {
    /// The next hop's HBONE address.
    hbone_addr: SocketAddr,
    /// The CONNECT authority: the chosen endpoint, or the original
    /// destination when going through a waypoint.
    authority: SocketAddr,
    /// Identities the next hop may present.
    expected: Vec<Identity>,
    /// The next hop's workload.
    peer: Arc<Workload>,
    /// The service the client addressed, if any.
    service: Option<Arc<Service>>,
    via_waypoint: bool,
}

fn labels(
    pi: &ProxyInputs,
    pod: &Pod,
    dst: Option<&Workload>,
    service: Option<&Service>,
    sec: SecurityPolicy,
) -> TcpLabels {
    let src = pi.state.workload_by_uid(&pod.uid);
    TcpLabels::new(
        Reporter::source,
        src.as_deref(),
        Some(pod.identity.to_string()),
        dst,
        service,
        sec,
    )
}

/// Plain TCP to a destination outside the mesh (or a mesh workload that
/// does not speak HBONE).
async fn plain(
    pi: &ProxyInputs,
    pod: &Pod,
    mut stream: TcpStream,
    dst: SocketAddr,
    labels: TcpLabels,
) {
    let mut upstream = match super::connect_upstream(pi, pod, dst, None).await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(error = %e, "passthrough connect failed");
            return reset(stream);
        }
    };
    let _tracked = pi.connections.register(ConnectionInfo {
        pod: format!("{}/{}", pod.namespace, pod.name),
        pod_namespace: pod.namespace.clone(),
        pod_uid: pod.uid.clone(),
        direction: Direction::Outbound,
        protocol: ConnProtocol::Tcp,
        local: stream.peer_addr().unwrap_or(dst),
        remote: dst,
        remote_target: dst,
        src_identity: None,
        dst_identity: None,
    });
    let rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
    tracing::debug!("passthrough");
    match rec.copy(&mut stream, &mut upstream).await {
        Ok((up, down)) => {
            tracing::info!(
                bytes_sent = up,
                bytes_recv = down,
                "connection complete (passthrough)"
            );
        }
        Err(e) => tracing::debug!(error = %e, "passthrough copy ended with error"),
    }
}

async fn hbone_upstream(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    mut stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    target: Target,
) -> Result<(), ProxyError> {
    let cert = match pi.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(source) => {
            reset(stream);
            return Err(ProxyError::Certificate {
                identity: pod.identity.to_string(),
                source,
            });
        }
    };
    let expected = target.expected.clone();
    let mut dst_identities = expected.clone();
    dst_identities.sort();
    let hbone_addr = target.hbone_addr;
    let key = PoolKey {
        src_identity: pod.identity.clone(),
        dst_identities,
        src_ip: peer.ip(),
        dst: hbone_addr,
    };
    let dial_pi = pi.clone();
    let dial_pod = pod.clone();
    let dial = move || async move {
        let tcp = super::connect_upstream(&dial_pi, &dial_pod, hbone_addr, None)
            .await
            .map_err(|e| HboneError::Io(std::io::Error::other(e)))?;
        let cfg = tls::client_config(&cert, &expected)
            .map_err(|e| HboneError::Io(std::io::Error::other(e)))?;
        let server_name = rustls::pki_types::ServerName::IpAddress(hbone_addr.ip().into());
        let handshake = tokio_rustls::TlsConnector::from(cfg).connect(server_name, tcp);
        let tls = tokio::time::timeout(dial_pi.cfg.connect_timeout, handshake)
            .await
            .map_err(|_| {
                HboneError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            })?
            .map_err(HboneError::Io)?;
        Ok::<_, HboneError>(tls)
    };
    let mut hdrs = http::HeaderMap::new();
    let host = target.service.as_ref().map(|s| s.hostname.as_str());
    if let Ok(v) = headers::forwarded(peer, host) {
        hdrs.insert(http::header::FORWARDED, v);
    }
    hdrs.insert(
        headers::TRACEPARENT,
        headers::TraceParent::new_random(false).to_header_value(),
    );
    if let Some(src) = pi.state.workload_by_uid(&pod.uid) {
        let some = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
        let baggage = headers::Baggage {
            cluster: some(&src.cluster_id),
            namespace: some(&src.namespace),
            workload_type: some(src.workload_type),
            workload_name: some(if src.workload_name.is_empty() {
                &src.name
            } else {
                &src.workload_name
            }),
            service_name: some(&src.canonical_name),
            service_version: some(&src.canonical_revision),
        };
        if let Ok(v) = baggage.to_header_value() {
            hdrs.insert(headers::BAGGAGE, v);
        }
    }
    let req = ConnectRequest::new(target.authority).with_headers(hdrs);
    let mut labels = labels(
        pi,
        pod,
        Some(&target.peer),
        target.service.as_deref(),
        SecurityPolicy::mutual_tls,
    );
    let mut tunnel = match pi.pool.connect(&key, dial, req).await {
        Ok(t) => t,
        Err(e) => {
            labels.response_flags = "CONNECT".into();
            drop(ConnectionRecorder::start(pi.metrics.clone(), labels));
            reset(stream);
            return Err(e.into());
        }
    };
    // Listed for `ambientctl zc connections`; outbound connections are never
    // re-checked against policy (that is the destination's job).
    let _tracked = pi.connections.register(ConnectionInfo {
        pod: format!("{}/{}", pod.namespace, pod.name),
        pod_namespace: pod.namespace.clone(),
        pod_uid: pod.uid.clone(),
        direction: Direction::Outbound,
        protocol: ConnProtocol::Hbone,
        local: peer,
        remote: hbone_addr,
        remote_target: target.authority,
        src_identity: Some(pod.identity.clone()),
        dst_identity: Some(target.peer.identity()),
    });
    let rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
    tracing::debug!(
        authority = %target.authority,
        dst.workload = %target.peer.name,
        original = %dst,
        waypoint = target.via_waypoint,
        "hbone tunnel established"
    );
    match rec.copy(&mut stream, &mut tunnel).await {
        Ok((sent, recv)) => {
            tracing::info!(
                dst.workload = %target.peer.name,
                dst.identity = %target.peer.identity(),
                waypoint = target.via_waypoint,
                dst.hbone_addr = %hbone_addr,
                bytes_sent = sent,
                bytes_recv = recv,
                "connection complete"
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
