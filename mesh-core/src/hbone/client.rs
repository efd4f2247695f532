//! The outbound end of HBONE: a pool of HTTP/2 connections.
//!
//! The ztunnel's outbound path asks [`Pool::connect`] for a tunnel to a
//! destination. The pool key names everything that must match for two
//! tunnels to share one mutual-TLS connection (source identity, expected
//! destination identities, source IP, destination address), so the key type
//! is the caller's. The caller also supplies the dial closure (TCP connect
//! plus TLS handshake); the pool calls it only when no existing connection
//! can take another stream.
//!
//! Rules: a connection carries at most `max_streams_per_conn` streams at
//! once; callers arriving while a connection is being dialled wait for it
//! (up to the number of streams it will carry) instead of dialling their
//! own; a connection without streams for `idle_timeout` is closed; one that
//! fails, stops answering pings or receives GOAWAY leaves the pool.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::stream::H2Stream;
use super::{
    clamp_frame_size, clamp_send_buffer, ConnectRequest, HboneError, Keepalive,
    DEFAULT_CONNECTION_WINDOW, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_SEND_BUFFER, DEFAULT_STREAM_WINDOW,
};

/// Attempts to place one request when connections turn out to be going
/// away under us (GOAWAY between checkout and send).
const MAX_ATTEMPTS: usize = 3;

/// Pool behaviour and the HTTP/2 settings of its connections.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Concurrent streams per connection before another is opened.
    pub max_streams_per_conn: usize,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Receive window of each stream.
    pub stream_window: u32,
    /// Receive window of each connection.
    pub connection_window: u32,
    /// Largest frame payload the server may send.
    pub max_frame_size: u32,
    /// Unsent data one stream may queue inside h2.
    pub send_buffer: usize,
    /// Ping interval; `None` disables keepalive.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(5 * 60),
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            send_buffer: DEFAULT_SEND_BUFFER,
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// What the pool holds for one key, as seen by [`Pool::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Live connections.
    pub connections: usize,
    /// Streams open over them.
    pub streams: usize,
    /// Dials in progress.
    pub dialing: usize,
}

/// A pool of HBONE client connections keyed by `K`. Cloning is cheap and
/// shares the pool.
pub struct Pool<K: Hash + Eq + Clone + Send + Sync + 'static> {
    inner: Arc<Inner<K>>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K> {
    cfg: PoolConfig,
    state: Mutex<State<K>>,
    next_id: AtomicU64,
}

struct State<K> {
    closed: bool,
    keys: HashMap<K, Entry>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    dials: Vec<PendingDial>,
}

struct PendingDial {
    id: u64,
    /// Callers that may still wait on this dial: the streams the new
    /// connection will carry besides the dialler's own.
    spare: usize,
    outcome: watch::Receiver<DialOutcome>,
}

#[derive(Clone)]
enum DialOutcome {
    Pending,
    Ready(Arc<Conn>),
    Failed(Arc<HboneError>),
}

/// One pooled connection. `active` and `claims` only grow under the pool
/// lock, which is what makes claim-versus-idle-expiry race free.
struct Conn {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    claims: AtomicU64,
    dead: AtomicBool,
    /// Signalled when the last stream goes away.
    idle: Notify,
}

impl Conn {
    fn usable(&self, max: usize) -> bool {
        !self.dead.load(Ordering::Acquire) && self.active.load(Ordering::Acquire) < max
    }

    fn claim(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.claims.fetch_add(1, Ordering::AcqRel);
        Lease { conn: self.clone() }
    }
}

/// A stream's hold on its connection's capacity, released when the stream
/// (which carries it) is dropped.
pub(crate) struct Lease {
    conn: Arc<Conn>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.idle.notify_one();
        }
    }
}

/// Removes an abandoned dial's entry if the dialling caller is cancelled;
/// its waiters then see the outcome sender dropped and try again.
struct DialGuard<'a, K: Hash + Eq + Clone + Send + Sync + 'static> {
    pool: &'a Pool<K>,
    key: &'a K,
    id: u64,
    armed: bool,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Drop for DialGuard<'_, K> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.pool.lock();
            remove_dial(&mut st, self.key, self.id);
        }
    }
}

fn remove_dial<K: Hash + Eq>(st: &mut State<K>, key: &K, id: u64) {
    if let Some(entry) = st.keys.get_mut(key) {
        entry.dials.retain(|d| d.id != id);
        if entry.conns.is_empty() && entry.dials.is_empty() {
            st.keys.remove(key);
        }
    }
}

enum Step {
    Wait(watch::Receiver<DialOutcome>),
    Dial(u64, watch::Sender<DialOutcome>),
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Pool<K> {
    pub fn new(cfg: PoolConfig) -> Self {
        let cfg = PoolConfig {
            max_streams_per_conn: cfg.max_streams_per_conn.max(1),
            ..cfg
        };
        Pool {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State {
                    closed: false,
                    keys: HashMap::new(),
                }),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // The state stays consistent even if a holder panicked: every
        // critical section is a handful of infallible collection updates.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a `CONNECT` tunnel for `req` over a connection of `key`,
    /// dialling one with `dial` when none can take another stream. A status
    /// other than 200 is returned as [`HboneError::Status`].
    pub async fn connect<C, Fut, IO, E>(
        &self,
        key: &K,
        dial: C,
        req: ConnectRequest,
    ) -> Result<H2Stream, HboneError>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: Into<HboneError>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Validate before taking any capacity.
        build_request(&req)?;
        let mut dial = Some(dial);
        let mut last_err = None;
        for _ in 0..MAX_ATTEMPTS {
            let lease = match self.checkout(key, &mut dial).await {
                Ok(lease) => lease,
                Err(HboneError::NoConnection) => break,
                Err(e) => return Err(e),
            };
            match send_connect(&lease.conn, &req).await {
                Ok((send, recv)) => return Ok(H2Stream::new(send, recv).with_lease(lease)),
                Err(SendFailure::Unprocessed(e)) => {
                    debug!(conn = lease.conn.id, error = %e, "HBONE connection going away; retrying elsewhere");
                    self.retire(key, &lease.conn);
                    last_err = Some(e);
                }
                Err(SendFailure::Final(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(HboneError::NoConnection))
    }

    /// Per-key counts of connections, streams and dials in progress.
    pub fn stats(&self) -> HashMap<K, KeyStats> {
        let st = self.lock();
        st.keys
            .iter()
            .map(|(k, e)| {
                let live = e.conns.iter().filter(|c| !c.dead.load(Ordering::Acquire));
                let (connections, streams) = live.fold((0, 0), |(n, s), c| {
                    (n + 1, s + c.active.load(Ordering::Acquire))
                });
                (
                    k.clone(),
                    KeyStats {
                        connections,
                        streams,
                        dialing: e.dials.len(),
                    },
                )
            })
            .collect()
    }

    /// Stops handing out connections; open tunnels run on, and their
    /// connections close when the last one ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for (_, entry) in st.keys.drain() {
            for conn in entry.conns {
                conn.dead.store(true, Ordering::Release);
                conn.idle.notify_one();
            }
        }
    }

    /// Takes a stream slot on a live connection of `key`, waiting for or
    /// performing a dial when there is none.
    async fn checkout<C, Fut, IO, E>(
        &self,
        key: &K,
        dial: &mut Option<C>,
    ) -> Result<Lease, HboneError>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: Into<HboneError>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let max = self.inner.cfg.max_streams_per_conn;
        loop {
            let step = {
                let mut st = self.lock();
                if st.closed {
                    return Err(HboneError::PoolClosed);
                }
                let entry = st.keys.entry(key.clone()).or_default();
                entry.conns.retain(|c| !c.dead.load(Ordering::Acquire));
                // Fill the first connection with room, so the others drain
                // and can expire.
                if let Some(conn) = entry.conns.iter().find(|c| c.usable(max)) {
                    return Ok(conn.claim());
                }
                if let Some(d) = entry.dials.iter_mut().find(|d| d.spare > 0) {
                    d.spare -= 1;
                    Step::Wait(d.outcome.clone())
                } else if dial.is_some() {
                    let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(DialOutcome::Pending);
                    entry.dials.push(PendingDial {
                        id,
                        spare: max - 1,
                        outcome: rx,
                    });
                    Step::Dial(id, tx)
                } else {
                    if entry.conns.is_empty() && entry.dials.is_empty() {
                        st.keys.remove(key);
                    }
                    return Err(HboneError::NoConnection);
                }
            };
            match step {
                Step::Wait(rx) => match wait_dial(rx).await {
                    Some(DialOutcome::Ready(conn)) => {
                        let st = self.lock();
                        if st.closed {
                            return Err(HboneError::PoolClosed);
                        }
                        if conn.usable(max) {
                            return Ok(conn.claim());
                        }
                        // Newcomers took the slots first; go round again.
                    }
                    Some(DialOutcome::Failed(e)) => return Err(HboneError::Dial(e)),
                    // The dialler gave up (its caller was cancelled).
                    Some(DialOutcome::Pending) | None => {}
                },
                Step::Dial(id, tx) => {
                    let mut guard = DialGuard {
                        pool: self,
                        key,
                        id,
                        armed: true,
                    };
                    let Some(dial) = dial.take() else {
                        return Err(HboneError::NoConnection);
                    };
                    let result = self.establish(key, dial).await;
                    let mut st = self.lock();
                    remove_dial(&mut st, key, id);
                    guard.armed = false;
                    return match result {
                        Ok(conn) => {
                            let lease = conn.claim();
                            if st.closed {
                                conn.dead.store(true, Ordering::Release);
                            } else {
                                st.keys
                                    .entry(key.clone())
                                    .or_default()
                                    .conns
                                    .push(conn.clone());
                            }
                            drop(st);
                            tx.send_replace(DialOutcome::Ready(conn));
                            Ok(lease)
                        }
                        Err(e) => {
                            drop(st);
                            let e = Arc::new(e);
                            tx.send_replace(DialOutcome::Failed(e.clone()));
                            Err(HboneError::Dial(e))
                        }
                    };
                }
            }
        }
    }

    /// Dials, runs the HTTP/2 handshake and starts the connection's task.
    async fn establish<C, Fut, IO, E>(&self, key: &K, dial: C) -> Result<Arc<Conn>, HboneError>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = Result<IO, E>>,
        E: Into<HboneError>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.cfg;
        let io = dial().await.map_err(Into::into)?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.connection_window)
            .max_frame_size(clamp_frame_size(cfg.max_frame_size))
            .max_send_buffer_size(clamp_send_buffer(cfg.send_buffer))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            active: AtomicUsize::new(0),
            claims: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            idle: Notify::new(),
        });
        debug!(conn = conn.id, "HBONE connection established");
        tokio::spawn(drive(
            connection,
            conn.clone(),
            Arc::downgrade(&self.inner),
            key.clone(),
        ));
        Ok(conn)
    }

    /// Takes a connection that refused new streams out of the pool.
    fn retire(&self, key: &K, conn: &Arc<Conn>) {
        conn.dead.store(true, Ordering::Release);
        let mut st = self.lock();
        remove_conn(&mut st, key, conn);
    }
}

fn remove_conn<K: Hash + Eq>(st: &mut State<K>, key: &K, conn: &Arc<Conn>) {
    if let Some(entry) = st.keys.get_mut(key) {
        entry.conns.retain(|c| !Arc::ptr_eq(c, conn));
        if entry.conns.is_empty() && entry.dials.is_empty() {
            st.keys.remove(key);
        }
    }
}

async fn wait_dial(mut rx: watch::Receiver<DialOutcome>) -> Option<DialOutcome> {
    loop {
        {
            let outcome = rx.borrow_and_update();
            if !matches!(*outcome, DialOutcome::Pending) {
                return Some(outcome.clone());
            }
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

enum SendFailure {
    /// The server never processed the request; another connection may.
    Unprocessed(HboneError),
    Final(HboneError),
}

fn build_request(req: &ConnectRequest) -> Result<Request<()>, HboneError> {
    let authority = req.authority.to_string();
    let uri: Uri = authority
        .parse()
        .map_err(|_| HboneError::BadAuthority(authority.clone()))?;
    if uri.authority().is_none() {
        return Err(HboneError::BadAuthority(authority));
    }
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(())?;
    *request.headers_mut() = req.headers.clone();
    Ok(request)
}

async fn send_connect(
    conn: &Conn,
    req: &ConnectRequest,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), SendFailure> {
    let request = build_request(req).map_err(SendFailure::Final)?;
    let unprocessed = |e: h2::Error| SendFailure::Unprocessed(e.into());
    let mut sender = conn.sender.clone().ready().await.map_err(unprocessed)?;
    let (response, send) = sender.send_request(request, false).map_err(unprocessed)?;
    let response = match response.await {
        Ok(r) => r,
        Err(e) if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
            return Err(SendFailure::Unprocessed(e.into()))
        }
        Err(e) => return Err(SendFailure::Final(e.into())),
    };
    if response.status() != StatusCode::OK {
        return Err(SendFailure::Final(HboneError::Status(response.status())));
    }
    Ok((send, response.into_body()))
}

/// Drives one connection: polls h2, pings, and closes it once idle. Removes
/// it from the pool however it ends.
async fn drive<K, IO>(
    mut connection: h2::client::Connection<IO, Bytes>,
    conn: Arc<Conn>,
    pool: Weak<Inner<K>>,
    key: K,
) where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (idle_timeout, mut keepalive) = {
        let Some(inner) = pool.upgrade() else { return };
        (
            inner.cfg.idle_timeout,
            Keepalive::new(
                connection.ping_pong(),
                inner.cfg.keepalive_interval,
                inner.cfg.keepalive_timeout,
            ),
        )
    };
    let mut idle_epoch = conn.claims.load(Ordering::Acquire);
    let mut idle_deadline = Instant::now() + idle_timeout;
    loop {
        let idle = conn.active.load(Ordering::Acquire) == 0;
        tokio::select! {
            res = &mut connection => {
                match res {
                    Ok(()) => debug!(conn = conn.id, "HBONE connection closed"),
                    Err(e) => debug!(conn = conn.id, error = %e, "HBONE connection failed"),
                }
                break;
            }
            () = conn.idle.notified() => {
                idle_epoch = conn.claims.load(Ordering::Acquire);
                idle_deadline = Instant::now() + idle_timeout;
                if conn.dead.load(Ordering::Acquire) && conn.active.load(Ordering::Acquire) == 0 {
                    debug!(conn = conn.id, "retired HBONE connection has no streams left; closing");
                    break;
                }
            }
            () = tokio::time::sleep_until(idle_deadline), if idle => {
                if expire_if_idle(&pool, &key, &conn, idle_epoch) {
                    debug!(conn = conn.id, "closing idle HBONE connection");
                    break;
                }
                idle_epoch = conn.claims.load(Ordering::Acquire);
                idle_deadline = Instant::now() + idle_timeout;
            }
            res = keepalive.step() => {
                if let Err(e) = res {
                    warn!(conn = conn.id, error = %e, "HBONE server stopped answering pings; closing");
                    break;
                }
            }
        }
    }
    conn.dead.store(true, Ordering::Release);
    if let Some(inner) = pool.upgrade() {
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        remove_conn(&mut st, &key, &conn);
    }
}

/// Removes `conn` if no stream was claimed on it since `epoch` and none is
/// open. Under the pool lock, so no caller can claim it meanwhile.
fn expire_if_idle<K: Hash + Eq>(
    pool: &Weak<Inner<K>>,
    key: &K,
    conn: &Arc<Conn>,
    epoch: u64,
) -> bool {
    let Some(inner) = pool.upgrade() else {
        return conn.active.load(Ordering::Acquire) == 0;
    };
    let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    if conn.active.load(Ordering::Acquire) != 0 || conn.claims.load(Ordering::Acquire) != epoch {
        return false;
    }
    conn.dead.store(true, Ordering::Release);
    remove_conn(&mut st, key, conn);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::Authority;

    #[test]
    fn request_carries_authority_and_headers() {
        let mut req = ConnectRequest::new(Authority::parse("[fd00::7]:9080").unwrap());
        req.headers
            .insert("traceparent", http::HeaderValue::from_static("x"));
        let r = build_request(&req).unwrap();
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().authority().unwrap().as_str(), "[fd00::7]:9080");
        assert!(r.uri().path_and_query().is_none());
        assert_eq!(r.headers()["traceparent"], "x");

        let host = ConnectRequest::new(Authority::parse("svc.ns.svc.cluster.local:80").unwrap());
        let r = build_request(&host).unwrap();
        assert_eq!(
            r.uri().authority().unwrap().as_str(),
            "svc.ns.svc.cluster.local:80"
        );
    }
}
