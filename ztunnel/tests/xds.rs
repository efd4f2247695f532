//! ztunnel's xDS handler behind a real delta ADS stream: what it does when
//! the control plane sends something it cannot accept.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::proto::workload as pb;
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::xds::client::{ClientConfig, Subscription, XdsClient};
use mesh_core::xds::server::{ResourceStore, ServerEvent, XdsServer};
use pbjson_types::Any;
use prost::Message;
use ztunnel::state::{ProxyState, Resolution};
use ztunnel::xds::StateHandler;

fn workload(uid: &str, ip: Vec<u8>) -> Any {
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                service_account: "sa".into(),
                trust_domain: "cluster.local".into(),
                addresses: vec![ip],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                ..Default::default()
            })),
        }
        .encode_to_vec()
        .into(),
    }
}

async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<ServerEvent>,
    mut want: impl FnMut(&ServerEvent) -> bool,
) -> ServerEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.recv().await.expect("server events");
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event in time")
}

#[tokio::test]
async fn rejected_resource_is_nacked_and_the_rest_keeps_serving() {
    let store = ResourceStore::new();
    store
        .upsert(ADDRESS_TYPE_URL, "w1", workload("w1", vec![10, 0, 0, 1]))
        .unwrap();
    let server = XdsServer::new(store.clone());
    let mut events = server.events();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = server.clone().into_service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_of(listener))
            .await
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let state = ProxyState::new();
    let cfg = ClientConfig::new("ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local")
        .subscribe(ADDRESS_TYPE_URL, Subscription::wildcard());
    let client = XdsClient::new(channel, cfg, Arc::new(StateHandler::new(state.clone())));
    let mut ready = client.handle().ready();
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let dst = "10.0.0.1:80".parse().unwrap();
    assert!(matches!(state.resolve("", dst), Resolution::Upstream(_)));

    // A workload with a 3-byte address, next to a good change.
    store
        .apply(
            ADDRESS_TYPE_URL,
            [
                ("w1".to_string(), workload("w1", vec![10, 0, 0, 7])),
                ("bad".to_string(), workload("bad", vec![1, 2, 3])),
            ],
            [],
        )
        .unwrap();
    let nack = next_event(&mut events, |e| matches!(e, ServerEvent::Nack { .. })).await;
    let ServerEvent::Nack { message, node, .. } = nack else {
        unreachable!()
    };
    assert!(message.contains("bad"), "{message}");
    assert!(node.starts_with("ztunnel~"), "{node}");
    // The bad resource is not applied; the good change next to it is.
    assert!(state.workload_by_uid("bad").is_none());
    let w1 = state.workload_by_uid("w1").unwrap();
    assert_eq!(w1.ips, ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
    assert!(matches!(state.resolve("", dst), Resolution::Passthrough));

    // Fixing the resource is accepted and applied.
    store
        .upsert(ADDRESS_TYPE_URL, "bad", workload("bad", vec![10, 0, 0, 9]))
        .unwrap();
    next_event(&mut events, |e| matches!(e, ServerEvent::Ack { .. })).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.workload_by_uid("bad").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

fn tokio_stream_of(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
