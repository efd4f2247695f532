//! Data-plane side of delta ADS: how ztunnel learns workloads, services and
//! policies from the control plane before it routes pod traffic.
//!
//! The client keeps, per type URL, the versions of the resources it last
//! applied successfully. A response is handed to a [`Handler`]; success is
//! ACKed and recorded, failure is NACKed and the held state stays as it
//! was. On any stream failure it reconnects with exponential backoff and
//! tells the server what it holds (`initial_resource_versions`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pbjson_types::Any;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use super::WILDCARD;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::google::rpc::Status as RpcStatus;

/// Errors ending one stream attempt (the client then reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gRPC call or stream failed.
    #[error("xds stream: {0}")]
    Grpc(#[from] tonic::Status),
    /// The server closed the stream.
    #[error("xds stream closed by server")]
    Closed,
    /// The client's state lock was poisoned.
    #[error("xds client state lock poisoned")]
    Poisoned,
    /// The token file could not be read.
    #[error("reading the xds token {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The token holds bytes a header cannot carry.
    #[error("the xds token in {0} is not a valid header value")]
    TokenFormat(String),
}

/// A resource as received: name, version, packed message.
pub type Upsert = (String, String, Any);

/// Applies pushed resources to the data plane.
pub trait Handler: Send + Sync + 'static {
    /// Applies one response. `Err` NACKs it with that message: the handler
    /// must keep serving its last good version of every resource it
    /// rejected; it may apply the valid rest (as Istio's ztunnel does), since
    /// the server will not resend resources it already pushed.
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String>;
}

/// What the client asks for, per type URL.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// Receive every resource of the type.
    pub wildcard: bool,
    /// Explicitly named resources (on-demand).
    pub names: BTreeSet<String>,
}

impl Subscription {
    /// Every resource of the type.
    pub fn wildcard() -> Self {
        Self {
            wildcard: true,
            names: BTreeSet::new(),
        }
    }

    /// Only the given names (none yet is allowed: on-demand).
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self {
            wildcard: false,
            names: names.into_iter().map(Into::into).collect(),
        }
    }
}

/// Static client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The node presented on the first request of each type.
    pub node: Node,
    /// Types to subscribe to, in order.
    pub subscriptions: Vec<(String, Subscription)>,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Cap on the reconnect delay.
    pub backoff_max: Duration,
    /// File holding the bearer token presented on every stream; re-read on
    /// each connect because projected tokens rotate.
    pub token_file: Option<std::path::PathBuf>,
}

impl ClientConfig {
    /// Defaults: 100 ms doubling to 15 s.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node: Node {
                id: node_id.into(),
                ..Default::default()
            },
            subscriptions: Vec::new(),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
            token_file: None,
        }
    }

    /// Adds a subscription.
    pub fn subscribe(mut self, type_url: impl Into<String>, sub: Subscription) -> Self {
        self.subscriptions.push((type_url.into(), sub));
        self
    }
}

struct State {
    subs: Vec<(String, Subscription)>,
    /// type URL -> name -> version last applied.
    held: HashMap<String, HashMap<String, String>>,
    /// Request sink of the live stream, if any.
    live: Option<mpsc::UnboundedSender<DeltaDiscoveryRequest>>,
    /// Types with at least one applied response (ever, across streams).
    responded: HashSet<String>,
}

impl State {
    /// Complete once every wildcard type has been answered: until then a
    /// missing resource cannot be told apart from one not yet sent.
    /// On-demand types never hold readiness up.
    fn complete(&self) -> bool {
        self.subs
            .iter()
            .filter(|(_, s)| s.wildcard)
            .all(|(t, _)| self.responded.contains(t))
    }
}

/// Handle to change subscriptions and observe readiness while
/// [`XdsClient::run`] drives the stream.
#[derive(Clone)]
pub struct ClientHandle {
    state: Arc<Mutex<State>>,
    ready: watch::Receiver<bool>,
}

impl ClientHandle {
    /// Becomes `true` once every wildcard-subscribed type has had a
    /// response applied (the control plane's full view has arrived).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Subscribes to more names of a type (kept across reconnects).
    pub fn subscribe(&self, type_url: &str, names: &[&str]) -> Result<(), ClientError> {
        let mut st = self.state.lock().map_err(|_| ClientError::Poisoned)?;
        match st.subs.iter_mut().find(|(t, _)| t == type_url) {
            Some((_, sub)) => sub.names.extend(names.iter().map(|n| n.to_string())),
            None => st.subs.push((
                type_url.to_string(),
                Subscription::names(names.iter().copied()),
            )),
        }
        if let Some(live) = &st.live {
            let _ = live.send(DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            });
        }
        Ok(())
    }

    /// Versions currently held for a type, as applied by the handler.
    pub fn held(&self, type_url: &str) -> Result<HashMap<String, String>, ClientError> {
        let st = self.state.lock().map_err(|_| ClientError::Poisoned)?;
        Ok(st.held.get(type_url).cloned().unwrap_or_default())
    }
}

/// Delta ADS client; see the module docs.
pub struct XdsClient {
    channel: Channel,
    config: ClientConfig,
    handler: Arc<dyn Handler>,
    state: Arc<Mutex<State>>,
    ready_tx: watch::Sender<bool>,
    ready_rx: watch::Receiver<bool>,
}

impl XdsClient {
    /// A client over `channel` (plain or TLS, as the caller built it).
    pub fn new(channel: Channel, config: ClientConfig, handler: Arc<dyn Handler>) -> Self {
        let (ready_tx, ready_rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(State {
            subs: config.subscriptions.clone(),
            held: HashMap::new(),
            live: None,
            responded: HashSet::new(),
        }));
        Self {
            channel,
            config,
            handler,
            state,
            ready_tx,
            ready_rx,
        }
    }

    /// Handle for readiness and on-demand subscriptions.
    pub fn handle(&self) -> ClientHandle {
        ClientHandle {
            state: self.state.clone(),
            ready: self.ready_rx.clone(),
        }
    }

    /// Runs forever, reconnecting with exponential backoff.
    pub async fn run(self) {
        let mut delay = self.config.backoff_initial;
        loop {
            let got_response = match self.run_once().await {
                Ok(got) => got,
                Err((got, e)) => {
                    tracing::warn!(error = %e, "xds stream failed");
                    got
                }
            };
            if let Ok(mut st) = self.state.lock() {
                st.live = None;
            }
            // A stream that worked resets the backoff.
            if got_response {
                delay = self.config.backoff_initial;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// One stream; returns whether any response arrived.
    async fn run_once(&self) -> Result<bool, (bool, ClientError)> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self
                .state
                .lock()
                .map_err(|_| (false, ClientError::Poisoned))?;
            for (type_url, sub) in &st.subs {
                let _ = tx.send(self.initial_request(type_url, sub, st.held.get(type_url)));
            }
            st.live = Some(tx.clone());
        }
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut grpc = AggregatedDiscoveryServiceClient::new(self.channel.clone());
        let mut request = tonic::Request::new(outbound);
        if let Some(path) = &self.config.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                (
                    false,
                    ClientError::Token {
                        path: path.display().to_string(),
                        source: e,
                    },
                )
            })?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| (false, ClientError::TokenFormat(path.display().to_string())))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = grpc
            .delta_aggregated_resources(request)
            .await
            .map_err(|e| (false, e.into()))?
            .into_inner();
        let mut got = false;
        loop {
            match inbound.message().await {
                Ok(Some(resp)) => {
                    got = true;
                    let ack = self.on_response(resp).map_err(|e| (got, e))?;
                    let _ = tx.send(ack);
                }
                Ok(None) => return Err((got, ClientError::Closed)),
                Err(e) => return Err((got, e.into())),
            }
        }
    }

    fn initial_request(
        &self,
        type_url: &str,
        sub: &Subscription,
        held: Option<&HashMap<String, String>>,
    ) -> DeltaDiscoveryRequest {
        let mut subscribe = vec![WILDCARD.to_string()];
        subscribe.extend(sub.names.iter().cloned());
        let unsubscribe = if sub.wildcard {
            Vec::new()
        } else {
            // Istio's on-demand form: "*" in and out means "only names".
            vec![WILDCARD.to_string()]
        };
        DeltaDiscoveryRequest {
            node: Some(self.config.node.clone()),
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: held.cloned().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn on_response(
        &self,
        resp: DeltaDiscoveryResponse,
    ) -> Result<DeltaDiscoveryRequest, ClientError> {
        let upserts: Vec<Upsert> = resp
            .resources
            .into_iter()
            .map(|r| (r.name, r.version, r.resource.unwrap_or_default()))
            .collect();
        let versions: Vec<(String, String)> = upserts
            .iter()
            .map(|(n, v, _)| (n.clone(), v.clone()))
            .collect();
        let removes = resp.removed_resources;
        let result = self.handler.apply(&resp.type_url, upserts, removes.clone());
        let error_detail = match result {
            Ok(()) => {
                let mut st = self.state.lock().map_err(|_| ClientError::Poisoned)?;
                let held = st.held.entry(resp.type_url.clone()).or_default();
                for (n, v) in versions {
                    held.insert(n, v);
                }
                for n in &removes {
                    held.remove(n);
                }
                st.responded.insert(resp.type_url.clone());
                let complete = st.complete();
                drop(st);
                if complete {
                    self.ready_tx.send_replace(true);
                }
                None
            }
            Err(message) => {
                tracing::warn!(type_url = %resp.type_url, error = %message, "rejecting xds response");
                Some(RpcStatus {
                    // INVALID_ARGUMENT, as Envoy reports rejected config.
                    code: 3,
                    message,
                    details: Vec::new(),
                })
            }
        };
        Ok(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        })
    }
}
