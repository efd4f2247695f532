//! ztunnel's half of waypoints: which connections go to a waypoint, which
//! pod of it they reach, and what the CONNECT to it carries. The resolution
//! tests go through the mesh state as an outbound connection does; the
//! proxy tests run the outbound path against a fake waypoint (an HBONE
//! server holding the waypoint's identity) and record what it received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::ca::CertificateAuthority;
use mesh_core::certs::{CertificateManager, LocalCaProvider, RotationConfig};
use mesh_core::hbone::server::Responder;
use mesh_core::hbone::ConnectRequest;
use mesh_core::identity::Identity;
use mesh_core::proto::workload as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::connections::ConnectionRegistry;
use ztunnel::proxy::{outbound, Pod, ProxyInputs};
use ztunnel::state::{OutboundRoute, ProxyState, Resolution, Snapshot};
use ztunnel::sys::Netns;

const NS: &str = "ns1";
const WAYPOINT_HOST: &str = "waypoint.ns1.svc.cluster.local";
const BACKEND_HOST: &str = "b.ns1.svc.cluster.local";
const WAYPOINT_VIP: [u8; 4] = [10, 96, 0, 99];
const BACKEND_VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND_IP: [u8; 4] = [10, 244, 0, 5];
const WAYPOINT_IP: [u8; 4] = [127, 0, 0, 2];

fn key(host: &str) -> String {
    format!("{NS}/{host}")
}

fn by_hostname(host: &str, port: u32) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: NS.into(),
                hostname: host.into(),
            },
        )),
        hbone_mtls_port: port,
    })
}

fn by_address(ip: [u8; 4], port: u32) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: String::new(),
                address: ip.to_vec(),
                ..Default::default()
            },
        )),
        hbone_mtls_port: port,
    })
}

fn workload(
    uid: &str,
    sa: &str,
    ip: [u8; 4],
    services: &[(&str, u32)],
    healthy: bool,
    waypoint: Option<pb::GatewayAddress>,
) -> pb::Address {
    let services: HashMap<String, pb::PortList> = services
        .iter()
        .map(|(host, port)| {
            (
                key(host),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: *port,
                        target_port: *port,
                        ..Default::default()
                    }],
                },
            )
        })
        .collect();
    pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: NS.into(),
            service_account: sa.into(),
            trust_domain: "cluster.local".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            status: if healthy { 0 } else { 1 },
            services,
            waypoint,
            ..Default::default()
        })),
    }
}

fn service(
    host: &str,
    vip: [u8; 4],
    port: u32,
    waypoint: Option<pb::GatewayAddress>,
) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(pb::Service {
            name: host.split('.').next().unwrap_or_default().into(),
            namespace: NS.into(),
            hostname: host.into(),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
                ..Default::default()
            }],
            ports: vec![pb::Port {
                service_port: port,
                target_port: port,
                ..Default::default()
            }],
            waypoint,
            ..Default::default()
        })),
    }
}

fn state(addrs: &[pb::Address]) -> ProxyState {
    let (snap, errs) = Snapshot::from_resources(addrs, &[]);
    assert!(errs.is_empty(), "{errs:?}");
    let s = ProxyState::new();
    s.replace(snap);
    s
}

/// A mesh with a waypoint (Service + one pod) and a backend service whose
/// waypoint is `backend_waypoint`; the backend pod's own waypoint is
/// `pod_waypoint`.
fn mesh(
    backend_waypoint: Option<pb::GatewayAddress>,
    pod_waypoint: Option<pb::GatewayAddress>,
    waypoint_healthy: bool,
) -> ProxyState {
    state(&[
        service(WAYPOINT_HOST, WAYPOINT_VIP, 15008, None),
        workload(
            "wp1",
            "waypoint",
            WAYPOINT_IP,
            &[(WAYPOINT_HOST, 15008)],
            waypoint_healthy,
            None,
        ),
        service(BACKEND_HOST, BACKEND_VIP, 80, backend_waypoint),
        workload(
            "b1",
            "backend",
            BACKEND_IP,
            &[(BACKEND_HOST, 80)],
            true,
            pod_waypoint,
        ),
        workload("c1", "client", [10, 244, 0, 9], &[], true, None),
    ])
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Asserts a route through the waypoint pod and returns its authority and
/// whether the client addressed a service.
fn expect_waypoint(route: OutboundRoute, hbone_port: u16) -> (SocketAddr, bool) {
    match route {
        OutboundRoute::Waypoint {
            waypoint,
            authority,
            service,
            ..
        } => {
            assert_eq!(waypoint.hbone_addr, addr(WAYPOINT_IP, hbone_port));
            assert_eq!(waypoint.workload.uid, "wp1");
            let ids: Vec<String> = waypoint
                .expected_identities()
                .iter()
                .map(|i| i.to_string())
                .collect();
            assert_eq!(ids, vec!["spiffe://cluster.local/ns/ns1/sa/waypoint"]);
            (authority, service.is_some())
        }
        other => panic!("expected a route through the waypoint, got {other:?}"),
    }
}

#[test]
fn service_with_waypoint_by_hostname_goes_to_a_waypoint_pod() {
    let s = mesh(by_hostname(WAYPOINT_HOST, 15008), None, true);
    let client = s.workload_by_uid("c1");
    let route = s.resolve_outbound("", client.as_deref(), addr(BACKEND_VIP, 80));
    let (authority, via_service) = expect_waypoint(route, 15008);
    assert_eq!(
        authority,
        addr(BACKEND_VIP, 80),
        "the VIP stays the authority"
    );
    assert!(via_service);
}

#[test]
fn service_with_waypoint_by_address_goes_to_a_waypoint_pod() {
    // The waypoint's Service VIP, or one waypoint pod's own address.
    for gw in [
        by_address(WAYPOINT_VIP, 15008),
        by_address(WAYPOINT_IP, 15008),
    ] {
        let s = mesh(gw, None, true);
        let route = s.resolve_outbound("", None, addr(BACKEND_VIP, 80));
        let (authority, _) = expect_waypoint(route, 15008);
        assert_eq!(authority, addr(BACKEND_VIP, 80));
    }
}

#[test]
fn pod_with_waypoint_is_reached_through_it_when_addressed_directly() {
    let s = mesh(None, by_hostname(WAYPOINT_HOST, 15008), true);
    let route = s.resolve_outbound("", None, addr(BACKEND_IP, 8080));
    let (authority, via_service) = expect_waypoint(route, 15008);
    assert_eq!(authority, addr(BACKEND_IP, 8080), "the pod address stays");
    assert!(!via_service);
    // Service-addressed traffic follows the Service's waypoint only (a
    // waypoint for workloads does not capture it).
    assert!(matches!(
        s.resolve_outbound("", None, addr(BACKEND_VIP, 80)),
        OutboundRoute::Direct(Resolution::Upstream(u)) if u.workload.uid == "b1"
    ));
}

#[test]
fn the_waypoint_itself_goes_direct() {
    let s = mesh(
        by_hostname(WAYPOINT_HOST, 15008),
        by_address(WAYPOINT_IP, 15008),
        true,
    );
    let wp = s.workload_by_uid("wp1");
    for dst in [addr(BACKEND_VIP, 80), addr(BACKEND_IP, 80)] {
        match s.resolve_outbound("", wp.as_deref(), dst) {
            OutboundRoute::Direct(Resolution::Upstream(u)) => {
                assert_eq!(u.workload.uid, "b1");
                assert_eq!(u.addr, addr(BACKEND_IP, 80));
            }
            other => panic!("{dst}: the waypoint must not loop to itself: {other:?}"),
        }
    }
}

#[test]
fn no_healthy_waypoint_fails_closed() {
    let cases = [
        // The waypoint pod is unhealthy.
        (by_hostname(WAYPOINT_HOST, 15008), false),
        // The waypoint's Service is unknown.
        (by_hostname("missing.ns1.svc.cluster.local", 15008), true),
        // Nothing at the waypoint address.
        (by_address([10, 96, 9, 9], 15008), true),
    ];
    for (gw, healthy) in cases {
        let s = mesh(gw.clone(), gw, healthy);
        for dst in [addr(BACKEND_VIP, 80), addr(BACKEND_IP, 80)] {
            match s.resolve_outbound("", None, dst) {
                OutboundRoute::NoHealthyWaypoint { reason, .. } => {
                    assert!(!reason.is_empty())
                }
                other => panic!("{dst}: must never bypass the waypoint: {other:?}"),
            }
        }
    }
}

#[test]
fn unset_hbone_port_means_15008_and_a_set_one_is_used() {
    let s = mesh(by_hostname(WAYPOINT_HOST, 0), None, true);
    expect_waypoint(s.resolve_outbound("", None, addr(BACKEND_VIP, 80)), 15008);
    let s = mesh(by_hostname(WAYPOINT_HOST, 15099), None, true);
    expect_waypoint(s.resolve_outbound("", None, addr(BACKEND_VIP, 80)), 15099);
}

#[test]
fn destinations_without_a_waypoint_resolve_as_before() {
    let s = mesh(None, None, true);
    assert!(matches!(
        s.resolve_outbound("", None, addr(BACKEND_VIP, 80)),
        OutboundRoute::Direct(Resolution::Upstream(u)) if u.addr == addr(BACKEND_IP, 80)
    ));
    assert!(matches!(
        s.resolve_outbound("", None, addr([192, 0, 2, 1], 80)),
        OutboundRoute::Direct(Resolution::Passthrough)
    ));
    // A port the service does not have is refused, waypoint or not.
    let s = mesh(by_hostname(WAYPOINT_HOST, 15008), None, true);
    assert!(matches!(
        s.resolve_outbound("", None, addr(BACKEND_VIP, 81)),
        OutboundRoute::Direct(Resolution::NoHealthyEndpoint { .. })
    ));
}

// ---- the outbound path against a fake waypoint ----

/// What the fake waypoint saw: one entry per CONNECT.
#[derive(Debug, Clone)]
struct Seen {
    authority: String,
    forwarded: Option<String>,
    traceparent: bool,
}

/// An HBONE server holding the waypoint's identity; it records each
/// CONNECT and echoes the tunnel's bytes.
async fn fake_waypoint(
    certs: &CertificateManager,
    ip: [u8; 4],
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let cert = certs
        .get(&Identity::new("cluster.local", NS, "waypoint"))
        .await
        .expect("waypoint certificate");
    let cfg = mesh_core::tls::server_config(&cert).expect("server config");
    let listener = TcpListener::bind(addr(ip, 0)).await.expect("bind waypoint");
    let local = listener.local_addr().expect("local addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (cfg, record) = (cfg.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                    return;
                };
                let handler = move |req: ConnectRequest, responder: Responder| {
                    let record = record.clone();
                    async move {
                        let header = |name: &str| {
                            req.headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        record.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                            authority: match &req.authority {
                                mesh_core::hbone::Authority::Addr(a) => a.to_string(),
                                mesh_core::hbone::Authority::Host { host, port } => {
                                    format!("{host}:{port}")
                                }
                            },
                            forwarded: header("forwarded"),
                            traceparent: header("traceparent").is_some(),
                        });
                        let Ok(mut tunnel) = responder.accept() else {
                            return;
                        };
                        let mut buf = [0u8; 64];
                        while let Ok(n) = tunnel.read(&mut buf).await {
                            if n == 0 || tunnel.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                };
                let cfg = mesh_core::hbone::server::ServerConfig::default();
                let _ = mesh_core::hbone::server::serve_connection(
                    tls,
                    &cfg,
                    handler,
                    std::future::pending(),
                )
                .await;
            });
        }
    });
    (local, seen)
}

/// Inputs for the client pod `c1`, whose "network namespace" is this test
/// process's own (entering it needs CAP_SYS_ADMIN).
fn client(state: ProxyState, certs: CertificateManager) -> Option<(Arc<ProxyInputs>, Arc<Pod>)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: entering a network namespace needs root");
        return None;
    }
    let cfg = ztunnel::config::Config::from_env(&[
        ("LOCAL_XDS_PATH", "unused"),
        ("LOCAL_CA_DIR", "unused"),
        ("NODE_NAME", "node1"),
    ])
    .expect("config");
    let pi = Arc::new(ProxyInputs {
        cfg: Arc::new(cfg),
        state,
        certs,
        pool: mesh_core::hbone::client::Pool::new(Default::default()),
        metrics: ztunnel::metrics::Metrics::new(),
        hbone_server: Default::default(),
        connections: ConnectionRegistry::new(),
    });
    let home = Arc::new(Netns::current().expect("netns"));
    let netns = Netns::new(Netns::current().expect("netns"), home).expect("netns");
    let pod = Arc::new(Pod::new(
        "c1".into(),
        "c1".into(),
        NS.into(),
        Identity::new("cluster.local", NS, "client"),
        netns,
    ));
    Some((pi, pod))
}

fn cert_manager() -> CertificateManager {
    let ca = CertificateAuthority::generate("cluster.local").expect("ca");
    CertificateManager::new(
        Arc::new(LocalCaProvider::new(
            Arc::new(ca),
            Duration::from_secs(3600),
        )),
        RotationConfig::default(),
    )
}

/// A captured application connection: the client's end and the accepted
/// end the proxy gets, as the outbound listener would hand it over.
async fn captured() -> (TcpStream, TcpStream, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, peer) = l.accept().await.expect("accept");
    (app, accepted, peer)
}

#[tokio::test]
async fn connect_goes_to_the_waypoint_with_the_original_authority() {
    let certs = cert_manager();
    let (wp_addr, seen) = fake_waypoint(&certs, WAYPOINT_IP).await;
    let port = u32::from(wp_addr.port());
    let state = mesh(
        by_hostname(WAYPOINT_HOST, port),
        by_hostname(WAYPOINT_HOST, port),
        true,
    );
    let Some((pi, pod)) = client(state, certs) else {
        return;
    };
    for (dst, host) in [
        (addr(BACKEND_VIP, 80), Some(BACKEND_HOST)),
        (addr(BACKEND_IP, 8080), None),
    ] {
        let (mut app, accepted, peer) = captured().await;
        let proxy = {
            let (pi, pod) = (pi.clone(), pod.clone());
            tokio::spawn(async move { outbound::forward(&pi, &pod, accepted, peer, dst).await })
        };
        app.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo through the waypoint");
        assert_eq!(&buf, b"hello");
        drop(app);
        tokio::time::timeout(Duration::from_secs(10), proxy)
            .await
            .expect("proxy ends")
            .expect("proxy task");
        let last = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
            .expect("the waypoint got a CONNECT");
        assert_eq!(last.authority, dst.to_string());
        assert!(last.traceparent);
        let fwd = last.forwarded.expect("forwarded header");
        assert!(fwd.contains(&format!("for=\"{peer}\"")), "{fwd}");
        match host {
            Some(h) => assert!(fwd.contains(&format!("host={h}")), "{fwd}"),
            None => assert!(!fwd.contains("host="), "{fwd}"),
        }
    }
    // Both went out as the client's HBONE connections, with the service as
    // the destination service of the first.
    let metrics = pi.metrics.encode();
    assert!(
        metrics.contains(&format!("destination_service=\"{BACKEND_HOST}\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_healthy_waypoint_resets_and_never_reaches_the_backend() {
    let certs = cert_manager();
    let (wp_addr, seen) = fake_waypoint(&certs, WAYPOINT_IP).await;
    let gw = by_hostname(WAYPOINT_HOST, u32::from(wp_addr.port()));
    let state = mesh(gw.clone(), gw, false);
    let Some((pi, pod)) = client(state, certs) else {
        return;
    };
    let (mut app, accepted, peer) = captured().await;
    outbound::forward(&pi, &pod, accepted, peer, addr(BACKEND_VIP, 80)).await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), app.read(&mut buf))
        .await
        .expect("closed in time");
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    assert!(seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    assert!(pi.pool.stats().is_empty(), "no HBONE connection was opened");
}
