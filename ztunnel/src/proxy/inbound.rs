//! Inbound HBONE (15008): tunnels from other ztunnels to this pod.
//!
//! The connection is mutual TLS with the pod's own identity; the client's
//! identity comes from its certificate. Each CONNECT must name this pod's
//! address (the address the client dialled); the application is then reached
//! from inside the pod, with the client's own source address where the in-pod
//! routing allows it.
//!
//! Authorization happens per CONNECT, once the client's identity is known
//! from its certificate and before the application is dialled: a denied
//! CONNECT is answered 401 Unauthorized, as Istio's ztunnel does, and the
//! client's ztunnel resets the application's connection.
//!
//! Waypoints: a connection to a workload behind a waypoint is authorized
//! like any other (from the waypoint, the peer is the waypoint's identity);
//! as in Istio, one that skipped the waypoint is not refused by ztunnel
//! itself, only by the policies in scope. A pod that is a waypoint accepts
//! CONNECTs naming the destinations it fronts (their VIP or pod address),
//! and serves them on its own address.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::drain;
use mesh_core::hbone::server::Responder;
use mesh_core::hbone::ConnectRequest;
use mesh_core::identity::Identity;
use mesh_core::tls;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{Pod, ProxyError, ProxyInputs};
use crate::connections::{ConnProtocol, ConnectionInfo, Direction};
use crate::metrics::{ConnectionRecorder, Reporter, SecurityPolicy, TcpLabels, RESPONSE_FLAG_DENY};
use crate::rbac;
use crate::state::{Service, Workload};

pub async fn handle(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: &drain::Watch,
) {
    let span = tracing::info_span!("inbound", src.addr = %peer, dst.workload = %pod.name);
    async move {
        if let Err(e) = serve(pi, pod, stream, peer, drain).await {
            tracing::info!(error = %e, "inbound hbone connection ended with error");
        }
    }
    .instrument(span)
    .await
}

async fn serve(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: &drain::Watch,
) -> Result<(), ProxyError> {
    // With TPROXY the local address is the one the client dialled.
    let local = stream.local_addr()?;
    let cert = pi
        .certs
        .get(&pod.identity)
        .await
        .map_err(|source| ProxyError::Certificate {
            identity: pod.identity.to_string(),
            source,
        })?;
    let cfg = pod.server_tls(&cert)?;
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await?;
    let client_id = tls::peer_identity(tls.get_ref().1);
    tracing::debug!(src.identity = %display_identity(&client_id), "mTLS established");
    let handler = {
        let pi = pi.clone();
        let pod = pod.clone();
        move |req: ConnectRequest, responder: Responder| {
            let pi = pi.clone();
            let pod = pod.clone();
            let client_id = client_id.clone();
            async move { stream_request(pi, pod, req, responder, local, peer, client_id).await }
        }
    };
    mesh_core::hbone::server::serve_connection(tls, &pi.hbone_server, handler, drain.signaled())
        .await?;
    Ok(())
}

async fn stream_request(
    pi: Arc<ProxyInputs>,
    pod: Arc<Pod>,
    req: ConnectRequest,
    responder: Responder,
    local: SocketAddr,
    peer: SocketAddr,
    client_id: Option<Identity>,
) {
    let Some(authority) = req.authority.socket_addr() else {
        responder.reject(StatusCode::BAD_REQUEST);
        return;
    };
    let dst_wl = pi
        .state
        .wait_for_workload(&pod.uid, super::LOCAL_WORKLOAD_WAIT)
        .await;
    let network = pod.network(&pi);
    if authority.ip() != local.ip() {
        // Only a waypoint is sent HBONE naming another address: the
        // original service VIP or pod it stands in front of.
        let for_us = dst_wl
            .as_deref()
            .is_some_and(|me| pi.state.is_waypoint_for(&network, authority.ip(), me));
        if !for_us {
            tracing::warn!(authority = %authority, dialled = %local.ip(), "CONNECT authority is not this pod's address");
            responder.reject(StatusCode::BAD_REQUEST);
            return;
        }
        tracing::debug!(authority = %authority, "CONNECT to a destination this pod is the waypoint of");
    }
    // The application always listens on this pod's own address.
    let target = SocketAddr::new(local.ip(), authority.port());
    let src_wl = pi.state.workload_by_ip(&network, peer.ip());
    let service = dst_wl
        .as_ref()
        .and_then(|w| pi.state.service_for_target(w, target.port()));
    if let Some(w) = dst_wl.as_deref() {
        note_waypoint(&pi, &network, w, service.as_deref(), client_id.as_ref());
    }
    let labels = TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        client_id.as_ref().map(|i| i.to_string()),
        dst_wl.as_deref(),
        service.as_deref(),
        SecurityPolicy::mutual_tls,
    );
    // Registered before the decision, so a policy change landing after the
    // decision read the state is always followed by a re-check of this
    // connection (a denied one unregisters at once).
    let tracked = pi.connections.register(ConnectionInfo {
        pod: format!("{}/{}", pod.namespace, pod.name),
        pod_namespace: pod.namespace.clone(),
        pod_uid: pod.uid.clone(),
        direction: Direction::Inbound,
        protocol: ConnProtocol::Hbone,
        local,
        remote: peer,
        remote_target: target,
        src_identity: client_id.clone(),
        dst_identity: Some(pod.identity.clone()),
    });
    let conn = rbac::Connection {
        src_identity: client_id.clone(),
        src: peer,
        dst: target,
    };
    if super::authorize_inbound(&pi, &pod, dst_wl.as_deref(), &conn, &labels).is_err() {
        responder.reject(StatusCode::UNAUTHORIZED);
        return;
    }
    let mut app = match super::connect_upstream(&pi, &pod, target, Some(peer.ip())).await {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(error = %e, app = %target, "application refused the connection");
            let mut labels = labels;
            labels.response_flags = "UF".into();
            drop(ConnectionRecorder::start(pi.metrics.clone(), labels));
            responder.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    if tracked.is_closed() {
        // A policy change while the application was being dialled.
        responder.reject(StatusCode::UNAUTHORIZED);
        return;
    }
    let mut tunnel = match responder.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "client went away before the tunnel was up");
            return;
        }
    };
    let mut rec = ConnectionRecorder::start(pi.metrics.clone(), labels);
    let copied = tokio::select! {
        biased;
        // A policy change no longer allows it (logged by the registry).
        _ = tracked.closed() => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "closed: policy changed",
        )),
        r = rec.copy(&mut tunnel, &mut app) => r,
    };
    if tracked.is_closed() {
        rec.set_response_flags(RESPONSE_FLAG_DENY);
    }
    match copied {
        Ok((recv, sent)) => {
            tracing::info!(
                src.identity = %display_identity(&client_id),
                dst.addr = %target,
                bytes_recv = recv,
                bytes_sent = sent,
                "connection complete"
            );
        }
        Err(e) => tracing::debug!(error = %e, "inbound copy ended with error"),
    }
}

/// Log whether a connection to a workload behind a waypoint came from that
/// waypoint. It is not refused when it did not: Istio's ztunnel leaves this
/// to policy (an ALLOW policy naming the waypoint's service account is how
/// a mesh requires traffic to pass its waypoint), and so do we, so that the
/// same policies give the same answers. Connections from the waypoint are
/// authorized like any other, under the waypoint's identity.
fn note_waypoint(
    pi: &ProxyInputs,
    network: &str,
    dst: &Workload,
    service: Option<&Service>,
    client_id: Option<&Identity>,
) {
    // Only a log line: not worth a state lookup per connection otherwise.
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Some(gw) = pi.state.inbound_waypoint(dst, service) else {
        return;
    };
    let from_waypoint = client_id.is_some_and(|id| {
        pi.state
            .waypoint_identities(network, &gw)
            .iter()
            .any(|w| w == id)
    });
    if from_waypoint {
        tracing::debug!(waypoint = %gw.destination, "connection from the destination's waypoint");
    } else {
        tracing::debug!(
            waypoint = %gw.destination,
            src.identity = %display_identity(&client_id.cloned()),
            "connection did not come through the destination's waypoint; allowed unless a policy denies it"
        );
    }
}

fn display_identity(id: &Option<Identity>) -> String {
    id.as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use mesh_core::hbone::client::{Pool, PoolConfig};
    use mesh_core::hbone::HboneError;
    use mesh_core::proto::security::{
        string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope, StringMatch,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::test_support::{denied_count, setup};
    use crate::state::Delta;

    /// Open a CONNECT to `target` through the pod's HBONE listener at `hbone`
    /// as the client `sa` of namespace `ns`.
    async fn connect_as(
        pi: &ProxyInputs,
        pod: &Pod,
        ns: &str,
        sa: &str,
        hbone: SocketAddr,
        target: SocketAddr,
    ) -> Result<mesh_core::hbone::H2Stream, HboneError> {
        let cert = pi
            .certs
            .get(&Identity::new("cluster.local", ns, sa))
            .await
            .expect("client certificate");
        let expected = vec![pod.identity.clone()];
        let dial = move || async move {
            let tcp = TcpStream::connect(hbone).await?;
            let cfg = tls::client_config(&cert, &expected)
                .map_err(|e| HboneError::Io(std::io::Error::other(e)))?;
            let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok::<_, HboneError>(tls)
        };
        let pool: Pool<String> = Pool::new(PoolConfig::default());
        pool.connect(&format!("{ns}/{sa}"), dial, ConnectRequest::new(target))
            .await
    }

    #[tokio::test]
    async fn a_denied_connect_gets_401_and_an_allowed_one_reaches_the_app() {
        let (pi, pod) = setup();
        // Istio's example: deny one principal, everyone else gets through.
        pi.state.apply_delta(Delta {
            policies: vec![Authorization {
                name: "deny-ns2".into(),
                namespace: "ns1".into(),
                scope: Scope::Namespace as i32,
                action: Action::Deny as i32,
                rules: vec![Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            principals: vec![StringMatch {
                                match_type: Some(MatchType::Exact(
                                    "cluster.local/ns/ns2/sa/client".into(),
                                )),
                            }],
                            ..Default::default()
                        }],
                    }],
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hbone_addr = hbone.local_addr().unwrap();
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        let (_trigger, drain) = drain::new();
        let server = {
            let (pi, pod) = (pi.clone(), pod.clone());
            tokio::spawn(async move {
                loop {
                    let (s, peer) = hbone.accept().await.unwrap();
                    let (pi, pod, drain) = (pi.clone(), pod.clone(), drain.clone());
                    tokio::spawn(async move { handle(&pi, &pod, s, peer, &drain).await });
                }
            })
        };

        let denied = connect_as(&pi, &pod, "ns2", "client", hbone_addr, app_addr).await;
        match denied {
            Err(e) => assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}"),
            Ok(_) => panic!("the denied principal got a tunnel"),
        }
        assert_eq!(denied_count(&pi), 1);

        let mut tunnel = connect_as(&pi, &pod, "ns3", "client", hbone_addr, app_addr)
            .await
            .expect("allowed principal gets a tunnel");
        let (mut upstream, _) = app.accept().await.unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        upstream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        let dump = pi.connections.dump();
        let c = &dump["connections"][0];
        assert_eq!(c["protocol"], "HBONE");
        assert_eq!(c["srcIdentity"], "spiffe://cluster.local/ns/ns3/sa/client");
        assert_eq!(c["remoteTarget"], app_addr.to_string());

        // Now deny everyone: the open tunnel is closed by the re-check.
        pi.state.apply_delta(Delta {
            policies: vec![crate::proxy::test_support::deny_all("deny-all")],
            ..Default::default()
        });
        assert_eq!(pi.connections.revalidate(&pi.state), 1);
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            upstream.read_to_end(&mut rest),
        )
        .await
        .expect("the application side is closed");
        drop(ended);
        // It is counted as closed with the DENY flag, like a refused one.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while denied_count(&pi) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}",
                pi.metrics.encode()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(pi.connections.is_empty());
        server.abort();
    }

    /// A mesh where the pod (`u1`, 127.0.0.1, `ns1/server`) sits behind the
    /// waypoint `ns1/waypoint` (pod `wp`); with `pod_is_waypoint` the pod
    /// itself is the waypoint of the service `b` (VIP 10.96.0.10).
    fn waypoint_mesh(pi: &ProxyInputs, app_port: u16, pod_is_waypoint: bool) {
        use mesh_core::proto::workload as pb;
        let wp_host = "waypoint.ns1.svc.cluster.local";
        let gw = Some(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Hostname(
                pb::NamespacedHostname {
                    namespace: "ns1".into(),
                    hostname: wp_host.into(),
                },
            )),
            hbone_mtls_port: 15008,
        });
        let ports = |p: u16| pb::PortList {
            ports: vec![pb::Port {
                service_port: u32::from(p),
                target_port: u32::from(p),
                ..Default::default()
            }],
        };
        let wl = |uid: &str, sa: &str, ip: [u8; 4], svc: &str, waypoint| pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "ns1".into(),
                service_account: sa.into(),
                trust_domain: "cluster.local".into(),
                addresses: vec![ip.to_vec()],
                services: [(format!("ns1/{svc}"), ports(app_port))].into(),
                waypoint,
                ..Default::default()
            })),
        };
        let svc = |host: &str, vip: [u8; 4], waypoint| pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: host.split('.').next().unwrap_or_default().into(),
                namespace: "ns1".into(),
                hostname: host.into(),
                addresses: vec![pb::NetworkAddress {
                    address: vip.to_vec(),
                    ..Default::default()
                }],
                ports: ports(app_port).ports,
                waypoint,
                ..Default::default()
            })),
        };
        let addrs = if pod_is_waypoint {
            vec![
                wl("u1", "server", [127, 0, 0, 1], wp_host, None),
                svc(wp_host, [10, 96, 0, 99], None),
                svc("b.ns1.svc.cluster.local", [10, 96, 0, 10], gw),
            ]
        } else {
            vec![
                wl(
                    "u1",
                    "server",
                    [127, 0, 0, 1],
                    "b.ns1.svc.cluster.local",
                    gw.clone(),
                ),
                wl("wp", "waypoint", [10, 244, 0, 7], wp_host, None),
                svc(wp_host, [10, 96, 0, 99], None),
                svc("b.ns1.svc.cluster.local", [10, 96, 0, 10], gw),
            ]
        };
        let (snap, errs) = crate::state::Snapshot::from_resources(&addrs, &[]);
        assert!(errs.is_empty(), "{errs:?}");
        pi.state.apply_delta(Delta {
            workloads: snap.workloads,
            services: snap.services,
            ..Default::default()
        });
    }

    /// Serve the pod's HBONE listener; returns its address.
    async fn serve_hbone(pi: &Arc<ProxyInputs>, pod: &Arc<Pod>) -> SocketAddr {
        let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hbone.local_addr().unwrap();
        let (pi, pod) = (pi.clone(), pod.clone());
        tokio::spawn(async move {
            let (_trigger, drain) = drain::new();
            loop {
                let (s, peer) = hbone.accept().await.unwrap();
                let (pi, pod, drain) = (pi.clone(), pod.clone(), drain.clone());
                tokio::spawn(async move { handle(&pi, &pod, s, peer, &drain).await });
            }
        });
        addr
    }

    #[tokio::test]
    async fn behind_a_waypoint_policy_decides_as_in_istio() {
        let (pi, pod) = setup();
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        waypoint_mesh(&pi, app_addr.port(), false);
        let hbone = serve_hbone(&pi, &pod).await;

        // The waypoint's own connection is accepted...
        let t = connect_as(&pi, &pod, "ns1", "waypoint", hbone, app_addr).await;
        assert!(t.is_ok(), "the waypoint is accepted: {:?}", t.err());
        // ...and, as Istio's ztunnel does, so is one that skipped it while
        // no policy says otherwise.
        let t = connect_as(&pi, &pod, "ns2", "client", hbone, app_addr).await;
        assert!(t.is_ok(), "no policy: accepted: {:?}", t.err());

        // Istio's way to require the waypoint: allow only its identity.
        pi.state.apply_delta(Delta {
            policies: vec![Authorization {
                name: "only-waypoint".into(),
                namespace: "ns1".into(),
                scope: Scope::Namespace as i32,
                action: Action::Allow as i32,
                rules: vec![Rule {
                    clauses: vec![Clause {
                        matches: vec![Match {
                            principals: vec![StringMatch {
                                match_type: Some(MatchType::Exact(
                                    "cluster.local/ns/ns1/sa/waypoint".into(),
                                )),
                            }],
                            ..Default::default()
                        }],
                    }],
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        match connect_as(&pi, &pod, "ns2", "client", hbone, app_addr).await {
            Err(e) => assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}"),
            Ok(_) => panic!("a bypassing client got through an allow-only-waypoint policy"),
        }
        let t = connect_as(&pi, &pod, "ns1", "waypoint", hbone, app_addr).await;
        assert!(t.is_ok(), "the waypoint is still accepted: {:?}", t.err());
    }

    #[tokio::test]
    async fn a_waypoint_pod_accepts_the_destinations_it_fronts_only() {
        let (pi, pod) = setup();
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        waypoint_mesh(&pi, app_addr.port(), true);
        let hbone = serve_hbone(&pi, &pod).await;

        // The authority is the VIP this pod is the waypoint of: served on
        // the pod's own address.
        let vip: SocketAddr = format!("10.96.0.10:{}", app_addr.port()).parse().unwrap();
        let mut tunnel = connect_as(&pi, &pod, "ns2", "client", hbone, vip)
            .await
            .expect("the waypoint accepts its service's VIP");
        let (mut upstream, _) = app.accept().await.unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        upstream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Any other address is still refused.
        let other: SocketAddr = format!("10.96.0.11:{}", app_addr.port()).parse().unwrap();
        match connect_as(&pi, &pod, "ns2", "client", hbone, other).await {
            Err(e) => assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST), "{e}"),
            Ok(_) => panic!("an address this pod does not front was accepted"),
        }
    }
}
