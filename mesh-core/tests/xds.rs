//! Delta ADS end to end over a loopback TCP tonic server: the stream that
//! carries the Workload API from the control plane to ztunnel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::discovery::DeltaDiscoveryRequest;
use mesh_core::proto::workload::{address, Address, Workload};
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::xds::client::{
    ClientConfig, ClientHandle, Handler, Subscription, Upsert, XdsClient,
};
use mesh_core::xds::server::{ResourceStore, ServerEvent, XdsServer};
use pbjson_types::Any;
use prost::Message;
use tokio::sync::broadcast;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

const WAIT: Duration = Duration::from_secs(10);

fn workload(uid: &str, node: &str) -> Any {
    let addr = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            node: node.into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        })),
    };
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: addr.encode_to_vec().into(),
    }
}

async fn start(store: Arc<ResourceStore>) -> Result<(XdsServer, Channel)> {
    let server = XdsServer::new(store);
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    let svc = server.clone().into_service();
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    Ok((server, channel))
}

/// One `apply` call as seen by the handler.
#[derive(Debug, Clone)]
struct Applied {
    upserts: Vec<String>,
    removes: Vec<String>,
}

/// Records every response; rejects any resource named `reject`.
#[derive(Default)]
struct Recorder {
    reject: Option<String>,
    applied: Mutex<Vec<Applied>>,
    state: Mutex<HashMap<String, String>>,
}

impl Handler for Recorder {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        if type_url != ADDRESS_TYPE_URL {
            return Err(format!("unexpected type {type_url}"));
        }
        for (name, _, any) in &upserts {
            if Some(name) == self.reject.as_ref() {
                return Err(format!("refusing {name}"));
            }
            Address::decode(any.value.as_ref()).map_err(|e| e.to_string())?;
        }
        let mut state = self.state.lock().map_err(|e| e.to_string())?;
        for (name, version, _) in &upserts {
            state.insert(name.clone(), version.clone());
        }
        for n in &removes {
            state.remove(n);
        }
        self.applied
            .lock()
            .map_err(|e| e.to_string())?
            .push(Applied {
                upserts: upserts.into_iter().map(|(n, _, _)| n).collect(),
                removes,
            });
        Ok(())
    }
}

impl Recorder {
    fn applied(&self) -> Vec<Applied> {
        self.applied.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Bounded wait for the `n`th (1-based) applied response.
    async fn nth(&self, n: usize) -> Result<Applied> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(a) = self.applied().get(n - 1) {
                return Ok(a.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("response {n} never arrived; got {:?}", self.applied());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn spawn_client(
    channel: Channel,
    sub: Subscription,
    handler: Arc<Recorder>,
) -> (ClientHandle, tokio::task::JoinHandle<()>) {
    let mut config =
        ClientConfig::new("ztunnel~10.0.0.1~zt-1.istio-system~istio-system.svc.cluster.local")
            .subscribe(ADDRESS_TYPE_URL, sub);
    config.backoff_initial = Duration::from_millis(20);
    let client = XdsClient::new(channel, config, handler);
    let handle = client.handle();
    (handle, tokio::spawn(client.run()))
}

async fn wait_ready(handle: &ClientHandle) -> Result<()> {
    let mut ready = handle.ready();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r))
        .await
        .context("never ready")??;
    Ok(())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn snapshot_then_only_changes_then_removal() -> Result<()> {
    let store = ResourceStore::new();
    for uid in ["a", "b", "c"] {
        store.upsert(ADDRESS_TYPE_URL, uid, workload(uid, "n1"))?;
    }
    let (_server, channel) = start(store.clone()).await?;
    let rec = Arc::new(Recorder::default());
    let (handle, task) = spawn_client(channel, Subscription::wildcard(), rec.clone());
    wait_ready(&handle).await?;
    assert_eq!(sorted(rec.nth(1).await?.upserts), ["a", "b", "c"]);

    store.upsert(ADDRESS_TYPE_URL, "b", workload("b", "n2"))?;
    let second = rec.nth(2).await?;
    assert_eq!(second.upserts, ["b"]);
    assert!(second.removes.is_empty());

    assert!(store.remove(ADDRESS_TYPE_URL, "c")?);
    let third = rec.nth(3).await?;
    assert!(third.upserts.is_empty());
    assert_eq!(third.removes, ["c"]);
    assert_eq!(
        sorted(handle.held(ADDRESS_TYPE_URL)?.into_keys().collect()),
        ["a", "b"]
    );
    task.abort();
    Ok(())
}

async fn next_nack(events: &mut broadcast::Receiver<ServerEvent>) -> Result<(String, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .context("no NACK")??;
        if let ServerEvent::Nack { node, message, .. } = ev {
            return Ok((node, message));
        }
    }
}

#[tokio::test]
async fn nack_keeps_last_good_state() -> Result<()> {
    let store = ResourceStore::new();
    let va = store.upsert(ADDRESS_TYPE_URL, "a", workload("a", "n1"))?;
    let (server, channel) = start(store.clone()).await?;
    let mut events = server.events();
    let rec = Arc::new(Recorder {
        reject: Some("x".into()),
        ..Default::default()
    });
    let (handle, task) = spawn_client(channel, Subscription::wildcard(), rec.clone());
    wait_ready(&handle).await?;

    store.upsert(ADDRESS_TYPE_URL, "x", workload("x", "n1"))?;
    let (node, message) = next_nack(&mut events).await?;
    assert!(node.starts_with("ztunnel~10.0.0.1~"), "{node}");
    assert_eq!(message, "refusing x");
    let held = handle.held(ADDRESS_TYPE_URL)?;
    assert_eq!(held.get("a"), Some(&va));
    assert!(!held.contains_key("x"));

    // The stream survives a NACK: a later good change still lands, and the
    // rejected version is not pushed again with it.
    let va2 = store.upsert(ADDRESS_TYPE_URL, "a", workload("a", "n3"))?;
    let second = rec.nth(2).await?;
    assert_eq!(second.upserts, ["a"]);
    assert_eq!(handle.held(ADDRESS_TYPE_URL)?.get("a"), Some(&va2));
    task.abort();
    Ok(())
}

#[tokio::test]
async fn initial_resource_versions_skip_unchanged() -> Result<()> {
    let store = ResourceStore::new();
    let mut held = HashMap::new();
    for uid in ["a", "b", "c"] {
        held.insert(
            uid.to_string(),
            store.upsert(ADDRESS_TYPE_URL, uid, workload(uid, "n1"))?,
        );
    }
    // While the node was away: b changed, c went, d arrived.
    store.upsert(ADDRESS_TYPE_URL, "b", workload("b", "n2"))?;
    store.remove(ADDRESS_TYPE_URL, "c")?;
    store.upsert(ADDRESS_TYPE_URL, "d", workload("d", "n1"))?;
    let (_server, channel) = start(store.clone()).await?;

    let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
    let first = DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: held,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(first)?;
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut inbound = grpc
        .delta_aggregated_resources(outbound)
        .await?
        .into_inner();
    let resp = tokio::time::timeout(WAIT, inbound.message())
        .await
        .context("no response")??
        .context("stream ended")?;
    let names: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(sorted(names), ["b", "d"]);
    assert_eq!(resp.removed_resources, ["c"]);
    assert!(!resp.nonce.is_empty());
    Ok(())
}

#[tokio::test]
async fn client_reconnects_and_resumes_from_held_versions() -> Result<()> {
    let store = ResourceStore::new();
    for uid in ["a", "b", "c"] {
        store.upsert(ADDRESS_TYPE_URL, uid, workload(uid, "n1"))?;
    }
    let (server, channel) = start(store.clone()).await?;
    let rec = Arc::new(Recorder::default());
    let (handle, task) = spawn_client(channel, Subscription::wildcard(), rec.clone());
    wait_ready(&handle).await?;
    assert_eq!(rec.nth(1).await?.upserts.len(), 3);

    server.disconnect_all();
    // The reconnected stream's first response carries no resource: the
    // client's initial_resource_versions matched the store.
    let second = rec.nth(2).await?;
    assert!(
        second.upserts.is_empty() && second.removes.is_empty(),
        "{second:?}"
    );
    let vb = store.upsert(ADDRESS_TYPE_URL, "b", workload("b", "n9"))?;
    let third = rec.nth(3).await?;
    assert_eq!(third.upserts, ["b"]);
    assert_eq!(handle.held(ADDRESS_TYPE_URL)?.get("b"), Some(&vb));
    task.abort();
    Ok(())
}

#[tokio::test]
async fn explicit_subscription_receives_only_that_name() -> Result<()> {
    let store = ResourceStore::new();
    for uid in ["a", "b", "c"] {
        store.upsert(ADDRESS_TYPE_URL, uid, workload(uid, "n1"))?;
    }
    let (_server, channel) = start(store.clone()).await?;
    let rec = Arc::new(Recorder::default());
    let (handle, task) = spawn_client(channel, Subscription::names(["b"]), rec.clone());
    wait_ready(&handle).await?;
    assert_eq!(rec.nth(1).await?.upserts, ["b"]);

    store.upsert(ADDRESS_TYPE_URL, "a", workload("a", "n2"))?;
    store.upsert(ADDRESS_TYPE_URL, "b", workload("b", "n2"))?;
    let second = rec.nth(2).await?;
    assert_eq!(second.upserts, ["b"]);
    assert_eq!(
        sorted(handle.held(ADDRESS_TYPE_URL)?.into_keys().collect()),
        ["b"]
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn on_demand_first_request_pushes_nothing_until_subscribed() -> Result<()> {
    let store = ResourceStore::new();
    for uid in ["a", "b"] {
        store.upsert(ADDRESS_TYPE_URL, uid, workload(uid, "n1"))?;
    }
    let (_server, channel) = start(store.clone()).await?;
    let rec = Arc::new(Recorder::default());
    let (handle, task) = spawn_client(
        channel,
        Subscription::names(Vec::<String>::new()),
        rec.clone(),
    );
    wait_ready(&handle).await?;
    let first = rec.nth(1).await?;
    assert!(
        first.upserts.is_empty() && first.removes.is_empty(),
        "{first:?}"
    );

    // A store change for an unsubscribed name is not pushed; the next
    // response is the one answering the subscription.
    store.upsert(ADDRESS_TYPE_URL, "a", workload("a", "n2"))?;
    handle.subscribe(ADDRESS_TYPE_URL, &["b"])?;
    let second = rec.nth(2).await?;
    assert_eq!(second.upserts, ["b"]);
    assert_eq!(rec.applied().len(), 2);
    task.abort();
    Ok(())
}
