//! Upstream clusters as Envoy models them, between choosing an endpoint
//! ([`crate::http`]) and sending to it ([`crate::upstream`]): one cluster per
//! service, subset and port (`outbound|9080|v1|reviews.default.svc.cluster.local`),
//! each with the circuit breakers of its DestinationRule `connectionPool`
//! (connections, pending requests, requests, retries), a keep-alive pool of
//! HTTP connections carried inside HBONE tunnels, and the Envoy counters
//! Istio's circuit-breaking task reads.
//!
//! The semantics follow Envoy's HTTP connection pool: a request that finds no
//! ready connection is *pending* (bounded by `http1MaxPendingRequests`, the
//! overflow is a local 503 with flag `UO`) until a connection is free or a
//! new one is up; new connections are bounded by `maxConnections` per cluster,
//! except that an endpoint without any connection may always open one; a
//! connection is closed after `maxRequestsPerConnection` requests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use mesh_core::proto::waypoint as pb;
use tokio::sync::Notify;

use crate::metrics::{ClusterStats, Metrics};

/// An idle upstream connection older than this is closed instead of used:
/// applications commonly drop keep-alive connections after a minute.
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);

/// A circuit breaker refused the request or retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("pending requests overflow")]
    Pending,
    #[error("active requests overflow")]
    Requests,
}

/// Circuit-breaker thresholds of one cluster; `usize::MAX` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub max_requests: usize,
    pub max_retries: usize,
    /// Requests one connection carries before it is closed; 0 = no limit.
    pub max_requests_per_connection: u32,
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        max_connections: usize::MAX,
        max_pending: usize::MAX,
        max_requests: usize::MAX,
        max_retries: usize::MAX,
        max_requests_per_connection: 0,
    };

    /// Istio's mapping of `connectionPool`: every 0 means unlimited.
    pub fn from_pool(p: Option<&pb::ConnectionPool>) -> Self {
        let Some(p) = p else {
            return Limits::UNLIMITED;
        };
        let lim = |v: u32| if v == 0 { usize::MAX } else { v as usize };
        Limits {
            max_connections: lim(p.max_connections),
            max_pending: lim(p.http1_max_pending_requests),
            max_requests: lim(p.http2_max_requests),
            max_retries: lim(p.max_retries),
            max_requests_per_connection: p.max_requests_per_connection,
        }
    }
}

/// Envoy's cluster name for a service port, optionally narrowed to a subset.
pub fn cluster_name(hostname: &str, subset: &str, port: u16) -> String {
    format!("outbound|{port}|{subset}|{hostname}")
}

/// What an upstream connection may be shared by: the endpoint, the identity
/// it must present, the original client (named in the tunnel's `Forwarded`
/// header, so connections are not shared across clients) and the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub dst: SocketAddr,
    pub identity: Identity,
    pub src: IpAddr,
    pub http2: bool,
}

/// A ready HTTP client connection inside one tunnel.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<crate::http::Body>),
    H2(hyper::client::conn::http2::SendRequest<crate::http::Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// A pooled connection and how many requests it has carried.
pub struct Pooled {
    pub sender: Sender,
    pub used: u32,
    id: u64,
    idle_since: Instant,
}

#[derive(Default)]
struct ClusterState {
    connections: usize,
    /// Open connections per endpoint address.
    per_host: HashMap<SocketAddr, usize>,
    pending: usize,
    requests: usize,
    retries: usize,
    /// HTTP/1.1: idle connections, taken out while used. HTTP/2: every
    /// live connection, shared by concurrent requests.
    idle: HashMap<ConnKey, Vec<Pooled>>,
    next_id: u64,
}

/// One upstream cluster.
pub struct Cluster {
    pub name: Arc<str>,
    pub stats: ClusterStats,
    limits: Mutex<Limits>,
    state: Mutex<ClusterState>,
    /// Signalled whenever a connection or request slot frees up.
    changed: Notify,
}

/// The outcome of asking for a connection.
pub enum Checkout {
    /// An existing connection (HTTP/1.1: now exclusively ours).
    Reuse(Pooled),
    /// Open a new one; the permit counts it against `maxConnections`.
    Dial(DialPermit),
}

/// Permission to open one connection; the request stays pending until the
/// connection is up (the permit is turned into a [`ConnToken`]).
pub struct DialPermit {
    pub token: ConnToken,
    pub pending: PendingGuard,
}

/// Held by a connection's task for its whole life: its share of
/// `maxConnections`.
pub struct ConnToken {
    cluster: Arc<Cluster>,
    dst: SocketAddr,
}

impl Drop for ConnToken {
    fn drop(&mut self) {
        {
            let mut st = self.cluster.lock();
            st.connections = st.connections.saturating_sub(1);
            if let Some(n) = st.per_host.get_mut(&self.dst) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.per_host.remove(&self.dst);
                }
            }
        }
        self.cluster.changed.notify_waiters();
    }
}

/// A request's place among the cluster's pending requests.
pub struct PendingGuard(Arc<Cluster>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.pending = st.pending.saturating_sub(1);
    }
}

/// One request's share of `http2MaxRequests` (Envoy's `max_requests`).
pub struct RequestSlot(Arc<Cluster>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        {
            let mut st = self.0.lock();
            st.requests = st.requests.saturating_sub(1);
        }
        self.0.changed.notify_waiters();
    }
}

/// One retry's share of `maxRetries`, held until the retried try ends.
pub struct RetrySlot(Arc<Cluster>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.retries = st.retries.saturating_sub(1);
    }
}

/// A connection in use by one request; given back (or closed, when it has
/// carried `maxRequestsPerConnection`) when the response has been read.
pub struct Lease {
    cluster: Arc<Cluster>,
    key: ConnKey,
    conn: Option<Pooled>,
}

impl Lease {
    pub fn new(cluster: Arc<Cluster>, key: ConnKey, conn: Pooled) -> Self {
        Lease {
            cluster,
            key,
            conn: Some(conn),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let max = self.cluster.limits().max_requests_per_connection;
        if max != 0 && conn.used >= max {
            if let Sender::H2(_) = conn.sender {
                // Shared: take it out of the pool so no one else starts on it.
                let mut st = self.cluster.lock();
                if let Some(list) = st.idle.get_mut(&self.key) {
                    list.retain(|c| c.id != conn.id);
                }
            }
            // Dropping the last sender ends the connection once idle; its
            // token then frees the connection slot.
            return;
        }
        if let Sender::H1(_) = conn.sender {
            if conn.sender.is_closed() {
                return;
            }
            conn.idle_since = Instant::now();
            self.cluster
                .lock()
                .idle
                .entry(self.key.clone())
                .or_default()
                .push(conn);
        }
        self.cluster.changed.notify_waiters();
    }
}

impl Cluster {
    fn new(name: &str, stats: ClusterStats, limits: Limits) -> Self {
        Cluster {
            name: Arc::from(name),
            stats,
            limits: Mutex::new(limits),
            state: Mutex::new(ClusterState::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_limits(&self, l: Limits) {
        let mut cur = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != l {
            *cur = l;
            drop(cur);
            self.changed.notify_waiters();
        }
    }

    /// Room for one more request (`http2MaxRequests`); an overflow is
    /// counted in `upstream_rq_pending_overflow`, as Envoy does.
    pub fn try_request(self: &Arc<Self>) -> Result<RequestSlot, Overflow> {
        let max = self.limits().max_requests;
        let mut st = self.lock();
        if st.requests >= max {
            drop(st);
            self.stats.rq_pending_overflow.inc();
            return Err(Overflow::Requests);
        }
        st.requests += 1;
        Ok(RequestSlot(self.clone()))
    }

    /// Room for one more concurrent retry (`maxRetries`); a refusal is
    /// counted in `upstream_rq_retry_overflow`.
    pub fn try_retry(self: &Arc<Self>) -> Option<RetrySlot> {
        let max = self.limits().max_retries;
        let mut st = self.lock();
        if st.retries >= max {
            drop(st);
            self.stats.rq_retry_overflow.inc();
            return None;
        }
        st.retries += 1;
        Some(RetrySlot(self.clone()))
    }

    /// A connection for `key`: an idle one, permission to dial, or (after
    /// waiting as a pending request) whichever comes first.
    pub async fn checkout(self: &Arc<Self>, key: &ConnKey) -> Result<Checkout, Overflow> {
        let mut pending: Option<PendingGuard> = None;
        let mut counted_cx_overflow = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let limits = self.limits();
            let evicted;
            {
                let mut st = self.lock();
                if let Some(c) = take_ready(&mut st, key, limits.max_requests_per_connection) {
                    return Ok(Checkout::Reuse(c));
                }
                if pending.is_none() {
                    if st.pending >= limits.max_pending {
                        drop(st);
                        self.stats.rq_pending_overflow.inc();
                        return Err(Overflow::Pending);
                    }
                    st.pending += 1;
                    self.stats.rq_pending_total.inc();
                    pending = Some(PendingGuard(self.clone()));
                }
                let host_open = st.per_host.get(&key.dst).copied().unwrap_or(0);
                // An endpoint without connections may always open one, or
                // its pending requests could never be served.
                if st.connections < limits.max_connections || host_open == 0 {
                    st.connections += 1;
                    *st.per_host.entry(key.dst).or_insert(0) += 1;
                    let token = ConnToken {
                        cluster: self.clone(),
                        dst: key.dst,
                    };
                    return Ok(Checkout::Dial(DialPermit {
                        token,
                        pending: pending.take().expect("pending slot taken above"),
                    }));
                }
                if !counted_cx_overflow {
                    counted_cx_overflow = true;
                    self.stats.cx_overflow.inc();
                }
                // An idle connection kept for another client would hold the
                // slot forever: close one to make room (its task's token
                // frees the slot and wakes us).
                evicted = evict_idle(&mut st);
            }
            // Closed outside the lock: dropping it may run the token's drop.
            drop(evicted);
            notified.await;
        }
    }

    /// Adds a freshly dialled connection (HTTP/2 ones are shared at once;
    /// HTTP/1.1 ones come back through their [`Lease`]) and returns it.
    pub fn register(&self, key: &ConnKey, sender: Sender) -> Pooled {
        let mut st = self.lock();
        st.next_id += 1;
        let pooled = Pooled {
            sender,
            used: 1,
            id: st.next_id,
            idle_since: Instant::now(),
        };
        if let Sender::H2(s) = &pooled.sender {
            st.idle.entry(key.clone()).or_default().push(Pooled {
                sender: Sender::H2(s.clone()),
                used: 1,
                id: pooled.id,
                idle_since: pooled.idle_since,
            });
        }
        drop(st);
        self.changed.notify_waiters();
        pooled
    }

    /// Open connections and idle HTTP/1.1 ones, for tests and the log.
    pub fn connection_counts(&self) -> (usize, usize) {
        let st = self.lock();
        let idle = st
            .idle
            .iter()
            .filter(|(k, _)| !k.http2)
            .map(|(_, v)| v.len())
            .sum();
        (st.connections, idle)
    }
}

/// Takes one idle HTTP/1.1 connection out of the pool, to be closed.
fn evict_idle(st: &mut ClusterState) -> Option<Pooled> {
    let key = st
        .idle
        .iter()
        .find(|(k, v)| !k.http2 && !v.is_empty())
        .map(|(k, _)| k.clone())?;
    let list = st.idle.get_mut(&key)?;
    let c = list.pop();
    if list.is_empty() {
        st.idle.remove(&key);
    }
    c
}

/// An idle HTTP/1.1 connection (taken) or a shared HTTP/2 one (cloned)
/// for `key`, dropping closed and stale ones on the way.
fn take_ready(st: &mut ClusterState, key: &ConnKey, max_per_conn: u32) -> Option<Pooled> {
    let list = st.idle.get_mut(key)?;
    let now = Instant::now();
    list.retain(|c| {
        // An HTTP/1.1 entry is idle; an HTTP/2 one shared.
        !c.sender.is_closed()
            && (key.http2 || now.duration_since(c.idle_since) < IDLE_TIMEOUT)
            && (max_per_conn == 0 || c.used < max_per_conn)
    });
    let out = if key.http2 {
        list.iter_mut().find_map(|c| {
            let Sender::H2(s) = &c.sender else {
                return None;
            };
            c.used += 1;
            Some(Pooled {
                sender: Sender::H2(s.clone()),
                used: c.used,
                id: c.id,
                idle_since: c.idle_since,
            })
        })
    } else {
        // Most recently used first: it is the least likely to have been
        // closed by the application.
        list.pop().map(|mut c| {
            c.used += 1;
            c
        })
    };
    if list.is_empty() {
        st.idle.remove(key);
    }
    out
}

/// hostname -> (subset, port, cluster).
type ByHost = HashMap<String, Vec<(String, u16, Arc<Cluster>)>>;

/// Every cluster the waypoint has sent to, by hostname, then subset and
/// port (so the per-request lookup builds no key string).
pub struct Clusters {
    metrics: Metrics,
    by_host: RwLock<ByHost>,
    /// Requests addressed to one pod (no service, no policy, no counters).
    pods: Mutex<HashMap<SocketAddr, Arc<Cluster>>>,
}

impl Clusters {
    pub fn new(metrics: Metrics) -> Self {
        Clusters {
            metrics,
            by_host: RwLock::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// The unlimited cluster of requests addressed to the pod at `addr`.
    pub fn pod(&self, addr: SocketAddr) -> Arc<Cluster> {
        let mut m = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr)
            .or_insert_with(|| {
                Arc::new(Cluster::new(
                    &format!("inbound-pod|{addr}"),
                    ClusterStats::default(),
                    Limits::UNLIMITED,
                ))
            })
            .clone()
    }

    /// The cluster of `hostname`/`subset`/`port` with `limits` applied
    /// (a changed DestinationRule takes effect on the next request).
    pub fn get(&self, hostname: &str, subset: &str, port: u16, limits: Limits) -> Arc<Cluster> {
        let find = |m: &ByHost| {
            m.get(hostname)?
                .iter()
                .find(|(s, p, _)| s == subset && *p == port)
                .map(|(_, _, c)| c.clone())
        };
        let found = find(&self.by_host.read().unwrap_or_else(|p| p.into_inner()));
        let c = match found {
            Some(c) => c,
            None => {
                let mut m = self.by_host.write().unwrap_or_else(|p| p.into_inner());
                match find(&m) {
                    Some(c) => c,
                    None => {
                        let name = cluster_name(hostname, subset, port);
                        let c = Arc::new(Cluster::new(&name, self.metrics.cluster(&name), limits));
                        m.entry(hostname.to_string()).or_default().push((
                            subset.to_string(),
                            port,
                            c.clone(),
                        ));
                        c
                    }
                }
            }
        };
        c.set_limits(limits);
        c
    }

    /// The counters of a cluster, if it has been used.
    pub fn stats(&self, hostname: &str, subset: &str, port: u16) -> Option<ClusterStats> {
        let m = self.by_host.read().unwrap_or_else(|p| p.into_inner());
        m.get(hostname)?
            .iter()
            .find(|(s, p, _)| s == subset && *p == port)
            .map(|(_, _, c)| c.stats.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ConnKey {
        ConnKey {
            dst: "10.0.0.1:80".parse().unwrap(),
            identity: Identity::new("cluster.local", "default", "sa"),
            src: "10.0.0.9".parse().unwrap(),
            http2: false,
        }
    }

    #[tokio::test]
    async fn pending_and_connection_limits() {
        let clusters = Clusters::new(Metrics::new());
        let limits = Limits {
            max_connections: 1,
            max_pending: 1,
            ..Limits::UNLIMITED
        };
        let c = clusters.get("h", "", 80, limits);
        let k = key();
        // First request dials; while it is connecting it is pending, so a
        // second one overflows (Envoy counts connecting requests as pending).
        let Ok(Checkout::Dial(first)) = c.checkout(&k).await else {
            panic!("first request dials");
        };
        assert!(matches!(c.checkout(&k).await, Err(Overflow::Pending)));
        assert_eq!(c.stats.rq_pending_overflow.get(), 1);
        // Connected: the pending slot frees; the connection is busy and the
        // cluster at its connection limit, so the next request waits.
        let token = first.token;
        drop(first.pending);
        let c2 = c.clone();
        let k2 = k.clone();
        let waiter = tokio::spawn(async move { c2.checkout(&k2).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert!(matches!(c.checkout(&k).await, Err(Overflow::Pending)));
        assert_eq!(c.stats.cx_overflow.get(), 1);
        // The connection closes: the waiter may dial.
        drop(token);
        assert!(waiter.await.unwrap());
        assert_eq!(c.stats.rq_pending_overflow.get(), 2);
        assert_eq!(c.stats.rq_pending_total.get(), 2);
    }

    #[test]
    fn request_and_retry_limits() {
        let clusters = Clusters::new(Metrics::new());
        let limits = Limits {
            max_requests: 1,
            max_retries: 1,
            ..Limits::UNLIMITED
        };
        let c = clusters.get("h", "v1", 80, limits);
        assert_eq!(&*c.name, "outbound|80|v1|h");
        let a = c.try_request().unwrap();
        assert!(c.try_request().is_err());
        drop(a);
        assert!(c.try_request().is_ok());
        let r = c.try_retry().unwrap();
        assert!(c.try_retry().is_none());
        assert_eq!(c.stats.rq_retry_overflow.get(), 1);
        drop(r);
        assert!(c.try_retry().is_some());
        assert!(Arc::ptr_eq(&c, &clusters.get("h", "v1", 80, limits)));
        assert_eq!(Limits::from_pool(None), Limits::UNLIMITED);
    }
}
