//! Cluster DNS and the service proxy against a real API server: a "node"
//! namespace runs both, a "client pod" and a "server pod" hang off it on
//! veths (default route via the node), and a Service with hand-made
//! Endpoints is resolved and reached from the client pod by its ClusterIP.
//!
//! Needs root and the API server binaries (`scripts/kube-build.sh`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::clusterdns;
use e2e::kube::{create_or_get, KubeCluster};
use e2e::svcproxy;
use e2e::Netns;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Allocated by hand (spec.clusterIP) from a corner of the service range
/// that the allocator is unlikely to hand out to other tests.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 10);
/// Local to the node namespace; not a Service of the API server.
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 10);
/// Two endpoint addresses, both on the server pod's interface.
const SERVER_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 250, 2, 2), Ipv4Addr::new(10, 250, 2, 3)];
const TARGET_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

/// The namespaces of one test; deleted on drop whatever happened.
struct Namespaces(Vec<Netns>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Err(e) = ns.delete() {
                eprintln!("deleting netns {}: {e}", ns.name());
            }
        }
    }
}

/// node <-> client pod (10.250.1.0/24) and node <-> server pod
/// (10.250.2.0/24), each pod's default route via the node.
fn topology() -> Result<(Namespaces, Netns, Netns, Netns)> {
    let pid = std::process::id();
    let mut guard = Namespaces(Vec::new());
    let mut make = |role: &str| -> Result<Netns> {
        let ns = Netns::create(&format!("cdns-{pid}-{role}"))?;
        guard.0.push(ns.clone());
        Ok(ns)
    };
    let node = make("node")?;
    let client = make("client")?;
    let server = make("server")?;
    node.set_sysctl("net.ipv4.ip_forward", "1")?;
    for (pod, idx, tag) in [(&client, 1, "c"), (&server, 2, "s")] {
        // Interface names are at most 15 bytes.
        let node_if = format!("cd{pid}{tag}n");
        let pod_if = format!("cd{pid}{tag}p");
        node.ip(&[
            "link",
            "add",
            &node_if,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
            "netns",
            pod.name(),
        ])?;
        node.ip(&[
            "addr",
            "add",
            &format!("10.250.{idx}.1/24"),
            "dev",
            &node_if,
        ])?;
        node.ip(&["link", "set", &node_if, "up"])?;
        pod.ip(&["addr", "add", &format!("10.250.{idx}.2/24"), "dev", &pod_if])?;
        if tag == "s" {
            pod.ip(&[
                "addr",
                "add",
                &format!("{}/24", SERVER_IPS[1]),
                "dev",
                &pod_if,
            ])?;
        }
        pod.ip(&["link", "set", &pod_if, "up"])?;
        pod.ip(&["route", "add", "default", "via", &format!("10.250.{idx}.1")])?;
    }
    Ok((guard, node, client, server))
}

/// Runs blocking `f` inside `ns` without stalling the runtime.
async fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = ns.clone();
    Ok(tokio::task::spawn_blocking(move || ns.run_in(f)).await??)
}

/// One UDP DNS query from inside `ns` (or TCP with `tcp`).
async fn resolve(ns: &Netns, name: &str, tcp: bool) -> Result<Message> {
    let mut q = Message::new();
    q.set_id(rand::random())
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let bytes = q.to_vec()?;
    let server = SocketAddr::from((DNS_IP, 53));
    let reply = in_ns(ns, move || -> std::io::Result<Vec<u8>> {
        if tcp {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
            s.write_all(&len.to_be_bytes())?;
            s.write_all(&bytes)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf)?;
            Ok(buf)
        } else {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(server)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send(&bytes)?;
            let mut buf = vec![0u8; 4096];
            let n = s.recv(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        }
    })
    .await??;
    let m = Message::from_vec(&reply)?;
    if m.id() != q.id() {
        bail!("reply id {} for query {}", m.id(), q.id());
    }
    Ok(m)
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Connects from inside `ns` to the service and reads what the server
/// sends.
async fn fetch(ns: &Netns) -> Result<std::io::Result<Vec<u8>>> {
    in_ns(ns, || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((CLUSTER_IP, 80)),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    })
    .await
}

/// Polls `check` until it returns `Ok(Some(_))` or [`WAIT`] passes.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < WAIT {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: gave up after {WAIT:?}; last: {last}")
}

fn endpoints(ns: &str, ready: bool) -> Endpoints {
    Endpoints {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        subsets: ready.then(|| {
            vec![EndpointSubset {
                addresses: Some(
                    SERVER_IPS
                        .iter()
                        .map(|ip| EndpointAddress {
                            ip: ip.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ports: Some(vec![EndpointPort {
                    name: Some("http".into()),
                    port: i32::from(TARGET_PORT),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }]
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_resolves_and_routes_from_a_pod() -> Result<()> {
    if !e2e::is_root() {
        eprintln!("skipping: needs root to create network namespaces");
        return Ok(());
    }
    let kube = KubeCluster::shared().await?;
    let client = kube.client().await?;
    let ns = format!("cdns-{}", std::process::id());
    kube.create_namespace(&ns, &[]).await?;

    // A Service without selector: its Endpoints are ours to write.
    let svc = Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(CLUSTER_IP.to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::Int(i32::from(TARGET_PORT))),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    create_or_get(&svcs, "web", &svc).await?;
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
    create_or_get(&eps, "web", &endpoints(&ns, true)).await?;

    let (_guard, node, pod, server) = topology()?;

    // The server pod answers every connection with the address it was
    // reached at, which tells the endpoints apart.
    let listener = in_ns(&server, || {
        std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, TARGET_PORT)))
    })
    .await??;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            if let Ok(local) = conn.local_addr() {
                let _ = conn.write_all(local.ip().to_string().as_bytes());
            }
        }
    });

    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(svcproxy::run(
        client.clone(),
        node.clone(),
        shutdown.clone(),
    ));
    let dns = tokio::spawn({
        let (client, node, shutdown) = (client.clone(), node.clone(), shutdown.clone());
        async move { clusterdns::run(client, node, DNS_IP, "cluster.local", shutdown).await }
    });

    let result = async {
        let fqdn = format!("web.{ns}.svc.cluster.local.");
        let got = eventually("ClusterIP over DNS", || async {
            let m = resolve(&pod, &fqdn, false).await?;
            Ok((m.response_code() == ResponseCode::NoError).then_some(m))
        })
        .await?;
        assert!(got.authoritative());
        assert_eq!(a_records(&got), [CLUSTER_IP]);
        let tcp = resolve(&pod, &fqdn, true).await?;
        assert_eq!(a_records(&tcp), [CLUSTER_IP], "the same over TCP");
        let unknown = resolve(&pod, &format!("nope.{ns}.svc.cluster.local."), false).await?;
        assert_eq!(unknown.response_code(), ResponseCode::NXDomain);
        let outside = resolve(&pod, "example.com.", false).await?;
        assert_eq!(outside.response_code(), ResponseCode::ServFail);

        let body = eventually("connect to the ClusterIP", || async {
            Ok(fetch(&pod).await?.ok())
        })
        .await?;
        let first: Ipv4Addr = String::from_utf8(body)?.parse()?;
        assert!(SERVER_IPS.contains(&first), "reached {first}");
        // The endpoint is chosen at random per connection: both serve.
        let mut seen = std::collections::BTreeSet::from([first]);
        for _ in 0..40 {
            if seen.len() == SERVER_IPS.len() {
                break;
            }
            let body = fetch(&pod).await??;
            seen.insert(String::from_utf8(body)?.parse()?);
        }
        assert_eq!(
            seen,
            SERVER_IPS.into_iter().collect(),
            "both endpoints serve"
        );

        // No endpoints left: new connections are refused at the node.
        eps.replace("web", &PostParams::default(), &{
            let mut e = eps.get("web").await?;
            e.subsets = None;
            e
        })
        .await
        .context("emptying the endpoints")?;
        eventually("connection refused without endpoints", || async {
            Ok(match fetch(&pod).await? {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            })
        })
        .await?;
        anyhow::Ok(())
    }
    .await;

    shutdown.cancel();
    let proxy_done = proxy.await?;
    let dns_done = dns.await?;
    let table_left = node.run(&["nft", "list", "tables"], None)?;
    let _ = e2e::controlplane::delete_namespace(&client, &ns).await;
    result?;
    proxy_done.context("svcproxy")?;
    dns_done.context("clusterdns")?;
    assert!(
        !table_left.contains(svcproxy::TABLE),
        "the table is removed at shutdown: {table_left}"
    );
    Ok(())
}
