//! The certificate manager: one workload certificate per identity the
//! ztunnel serves, fetched on first use and rotated in the background.
//!
//! Every outbound HBONE connection asks [`CertificateManager::get`] for the
//! source workload's certificate, and every inbound listener for the
//! destination's; the first ask for an identity triggers a fetch from a
//! [`CertificateProvider`] (the control plane's CA, or an in-process CA) and
//! everyone else asking meanwhile waits for that same fetch. A task per
//! identity renews the certificate at a fraction of its lifetime and keeps
//! serving the old one while renewal fails, until it actually expires.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::ca::{generate_csr, CaError, CertificateAuthority};
use crate::identity::Identity;
use crate::tls::{CertDetails, TlsError, WorkloadCertificate};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("signing the certificate failed")]
    Ca(#[source] Arc<CaError>),
    #[error("the issued certificate is unusable")]
    Tls(#[source] Arc<TlsError>),
    #[error("fetching the certificate failed")]
    Fetch(#[source] Arc<dyn StdError + Send + Sync>),
    #[error("asked for a certificate for {requested} but got one for {got}")]
    IdentityMismatch {
        requested: Box<Identity>,
        got: Box<Identity>,
    },
    #[error("the certificate for {0} has expired")]
    Expired(Identity),
    #[error("certificate management for {0} stopped (identity forgotten or manager dropped)")]
    Stopped(Identity),
}

impl CertError {
    /// Wraps a provider's own error (a gRPC status, an I/O error...).
    pub fn fetch(err: impl StdError + Send + Sync + 'static) -> Self {
        CertError::Fetch(Arc::new(err))
    }
}

impl From<CaError> for CertError {
    fn from(e: CaError) -> Self {
        CertError::Ca(Arc::new(e))
    }
}

impl From<TlsError> for CertError {
    fn from(e: TlsError) -> Self {
        CertError::Tls(Arc::new(e))
    }
}

/// The error and its causes on one line, for the admin dump and logs.
fn error_chain(err: &dyn StdError) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Where certificates come from.
pub trait CertificateProvider: Send + Sync + 'static {
    /// A fresh certificate (with a new key) for `id`.
    fn fetch(&self, id: &Identity) -> BoxFuture<'static, Result<WorkloadCertificate, CertError>>;
}

/// Signs certificates with a CA in this process.
pub struct LocalCaProvider {
    ca: Arc<CertificateAuthority>,
    ttl: Duration,
}

impl LocalCaProvider {
    pub fn new(ca: Arc<CertificateAuthority>, ttl: Duration) -> Self {
        LocalCaProvider { ca, ttl }
    }
}

impl CertificateProvider for LocalCaProvider {
    fn fetch(&self, id: &Identity) -> BoxFuture<'static, Result<WorkloadCertificate, CertError>> {
        let ca = self.ca.clone();
        let id = id.clone();
        let ttl = self.ttl;
        Box::pin(async move {
            let (csr, key) = generate_csr(&id)?;
            let chain = ca.sign_csr(&csr, &id, ttl)?;
            Ok(WorkloadCertificate::from_pem(
                &chain.concat(),
                &key,
                &ca.root_pem(),
            )?)
        })
    }
}

/// When certificates are renewed and how failures are retried.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// Renew once this fraction of the lifetime has passed.
    pub refresh_at_fraction: f64,
    /// First retry delay after a failed fetch; also the shortest time
    /// between two fetches of the same identity.
    pub initial_backoff: Duration,
    /// Retry delays double up to this.
    pub max_backoff: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            refresh_at_fraction: 0.5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
enum CertState {
    Initializing,
    Available(Arc<WorkloadCertificate>),
    Unavailable(CertError),
}

/// One identity's certificate as the admin `config_dump` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateDump {
    pub identity: String,
    /// `Initializing`, `Available` or `Unavailable: <error>`.
    pub state: String,
    pub cert_chain: Vec<CertDetails>,
    pub root_certs: Vec<CertDetails>,
}

struct Entry {
    state: watch::Receiver<CertState>,
    task: AbortHandle,
}

struct Inner {
    provider: Arc<dyn CertificateProvider>,
    config: RotationConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl Inner {
    fn entries(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // The map stays consistent even if a holder panicked: every update is
        // a single insert or remove.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for entry in self.entries().values() {
            entry.task.abort();
        }
    }
}

/// Fetches, caches and rotates workload certificates. Clones share state;
/// background work stops when the last clone is dropped.
///
/// Must be used from within a Tokio runtime.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("config", &self.inner.config)
            .field("identities", &self.inner.entries().len())
            .finish()
    }
}

impl CertificateManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, config: RotationConfig) -> Self {
        CertificateManager {
            inner: Arc::new(Inner {
                provider,
                config,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current certificate for `id`, fetching it first if this is the
    /// first request for it. Concurrent first requests share one fetch.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = self.track(id);
        let state = rx
            .wait_for(|s| !matches!(s, CertState::Initializing))
            .await
            .map(|s| s.clone())
            .map_err(|_| CertError::Stopped(id.clone()))?;
        match state {
            CertState::Available(cert) if cert.is_expired(SystemTime::now()) => {
                Err(CertError::Expired(id.clone()))
            }
            CertState::Available(cert) => Ok(cert),
            CertState::Unavailable(err) => Err(err),
            CertState::Initializing => Err(CertError::Stopped(id.clone())),
        }
    }

    /// Starts fetching and rotating `id`'s certificate without waiting, so
    /// that it is ready when the first connection needs it.
    pub fn prefetch(&self, id: &Identity) {
        self.track(id);
    }

    /// Stops rotating `id`'s certificate and drops it (its last workload
    /// left this node). Callers still waiting in `get` see `Stopped`.
    pub fn forget(&self, id: &Identity) {
        if let Some(entry) = self.inner.entries().remove(id) {
            entry.task.abort();
            debug!(identity = %id, "forgot certificate");
        }
    }

    /// Identities currently tracked, sorted.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.inner.entries().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every tracked certificate, sorted by identity, for `config_dump`.
    pub fn dump(&self) -> Vec<CertificateDump> {
        let entries = self.inner.entries();
        let mut out: Vec<CertificateDump> = entries
            .iter()
            .map(|(id, entry)| {
                let state = entry.state.borrow().clone();
                let mut dump = CertificateDump {
                    identity: id.to_string(),
                    state: String::new(),
                    cert_chain: Vec::new(),
                    root_certs: Vec::new(),
                };
                match state {
                    CertState::Initializing => dump.state = "Initializing".into(),
                    CertState::Unavailable(err) => {
                        dump.state = format!("Unavailable: {}", error_chain(&err))
                    }
                    CertState::Available(cert) => {
                        dump.state = "Available".into();
                        dump.cert_chain = cert.chain_details().to_vec();
                        dump.root_certs = cert.root_details().to_vec();
                    }
                }
                dump
            })
            .collect();
        drop(entries);
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The state channel for `id`, starting its rotation task if needed.
    fn track(&self, id: &Identity) -> watch::Receiver<CertState> {
        let mut entries = self.inner.entries();
        if let Some(entry) = entries.get(id) {
            return entry.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::Initializing);
        let task = tokio::spawn(rotate(
            self.inner.provider.clone(),
            self.inner.config.clone(),
            id.clone(),
            tx,
        ));
        entries.insert(
            id.clone(),
            Entry {
                state: rx.clone(),
                task: task.abort_handle(),
            },
        );
        rx
    }
}

fn check(id: &Identity, cert: WorkloadCertificate) -> Result<WorkloadCertificate, CertError> {
    if cert.identity() != id {
        return Err(CertError::IdentityMismatch {
            requested: Box::new(id.clone()),
            got: Box::new(cert.identity().clone()),
        });
    }
    if cert.is_expired(SystemTime::now()) {
        return Err(CertError::Expired(id.clone()));
    }
    Ok(cert)
}

/// The per-identity loop: fetch, publish, sleep until renewal; on failure
/// retry with backoff, keeping a still-valid certificate published. It holds
/// no reference to the manager, so dropping the manager (which aborts this
/// task) is what ends it.
async fn rotate(
    provider: Arc<dyn CertificateProvider>,
    config: RotationConfig,
    id: Identity,
    tx: watch::Sender<CertState>,
) {
    let mut current: Option<Arc<WorkloadCertificate>> = None;
    let mut backoff = config.initial_backoff;
    loop {
        let result = provider.fetch(&id).await.and_then(|c| check(&id, c));
        let now = SystemTime::now();
        let wait = match result {
            Ok(cert) => {
                backoff = config.initial_backoff;
                let cert = Arc::new(cert);
                let refresh_at = cert.refresh_at(config.refresh_at_fraction);
                info!(
                    identity = %id,
                    serial = cert.serial(),
                    valid_for_s = cert.not_after().duration_since(now).unwrap_or_default().as_secs(),
                    "certificate issued"
                );
                tx.send_replace(CertState::Available(cert.clone()));
                current = Some(cert);
                refresh_at
                    .duration_since(now)
                    .unwrap_or_default()
                    .max(config.initial_backoff)
            }
            Err(err) => {
                let wait = backoff;
                backoff = backoff.saturating_mul(2).min(config.max_backoff);
                match &current {
                    Some(cert) if !cert.is_expired(now) => {
                        warn!(
                            identity = %id,
                            error = error_chain(&err),
                            retry_in_ms = wait.as_millis() as u64,
                            "certificate renewal failed; the current certificate stays in use until it expires"
                        );
                        // Wake at expiry at the latest, to report the outage.
                        wait.min(cert.not_after().duration_since(now).unwrap_or_default())
                    }
                    _ => {
                        warn!(
                            identity = %id,
                            error = error_chain(&err),
                            retry_in_ms = wait.as_millis() as u64,
                            "certificate fetch failed"
                        );
                        current = None;
                        tx.send_replace(CertState::Unavailable(err));
                        wait
                    }
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Bounded wait for a condition the background task brings about.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gave up waiting for: {what}");
    }

    struct Flaky {
        inner: LocalCaProvider,
        fail: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
        issue_for: Option<Identity>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("CA unreachable")]
    struct Unreachable;

    impl CertificateProvider for Flaky {
        fn fetch(
            &self,
            id: &Identity,
        ) -> BoxFuture<'static, Result<WorkloadCertificate, CertError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err(CertError::fetch(Unreachable)) });
            }
            self.inner.fetch(self.issue_for.as_ref().unwrap_or(id))
        }
    }

    fn flaky(
        ttl: Duration,
        issue_for: Option<Identity>,
    ) -> (Flaky, Arc<AtomicBool>, Arc<AtomicUsize>) {
        let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        (
            Flaky {
                inner: LocalCaProvider::new(ca, ttl),
                fail: fail.clone(),
                calls: calls.clone(),
                issue_for,
            },
            fail,
            calls,
        )
    }

    fn fast() -> RotationConfig {
        RotationConfig {
            refresh_at_fraction: 0.5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn rejects_a_certificate_for_another_identity() {
        let wanted = Identity::new("cluster.local", "a", "wanted");
        let other = Identity::new("cluster.local", "a", "other");
        let (provider, _, _) = flaky(Duration::from_secs(3600), Some(other.clone()));
        let mgr = CertificateManager::new(Arc::new(provider), fast());
        match mgr.get(&wanted).await {
            Err(CertError::IdentityMismatch { requested, got }) => {
                assert_eq!(*requested, wanted);
                assert_eq!(*got, other);
            }
            other => panic!("unexpected {other:?}"),
        }
        let dump = mgr.dump();
        assert!(
            dump[0].state.starts_with("Unavailable: "),
            "{}",
            dump[0].state
        );
        assert!(dump[0].cert_chain.is_empty());
    }

    #[tokio::test]
    async fn failure_is_reported_then_recovered_with_retries() {
        let id = Identity::new("cluster.local", "a", "b");
        let (provider, fail, calls) = flaky(Duration::from_secs(3600), None);
        fail.store(true, Ordering::SeqCst);
        let mgr = CertificateManager::new(Arc::new(provider), fast());
        let err = mgr.get(&id).await.unwrap_err();
        assert!(matches!(err, CertError::Fetch(_)), "{err:?}");
        assert_eq!(
            mgr.dump()[0].state,
            "Unavailable: fetching the certificate failed: CA unreachable"
        );
        eventually("a retry", || calls.load(Ordering::SeqCst) >= 2).await;
        fail.store(false, Ordering::SeqCst);
        eventually("recovery", || mgr.dump()[0].state == "Available").await;
        let cert = mgr.get(&id).await.unwrap();
        assert_eq!(cert.identity(), &id);
        let dump = &mgr.dump()[0];
        assert_eq!(dump.identity, id.to_string());
        assert_eq!(dump.cert_chain.len(), 1);
        assert_eq!(dump.root_certs.len(), 1);
    }

    #[tokio::test]
    async fn keeps_a_valid_certificate_while_renewal_fails() {
        let id = Identity::new("cluster.local", "a", "b");
        let (provider, fail, calls) = flaky(Duration::from_secs(4), None);
        let mgr = CertificateManager::new(Arc::new(provider), fast());
        let first = mgr.get(&id).await.unwrap();
        fail.store(true, Ordering::SeqCst);
        // Renewal starts at about half-life; it fails, and the old cert stays.
        eventually("a failed renewal", || calls.load(Ordering::SeqCst) >= 2).await;
        if !first.is_expired(SystemTime::now()) {
            let again = mgr.get(&id).await.unwrap();
            assert_eq!(again.serial(), first.serial());
        }
        // Once it expires, it is withdrawn.
        eventually("expiry", || mgr.dump()[0].state.starts_with("Unavailable")).await;
        assert!(mgr.get(&id).await.is_err());
    }

    #[tokio::test]
    async fn forget_and_drop_stop_the_task() {
        let id = Identity::new("cluster.local", "a", "b");
        let (provider, _, _) = flaky(Duration::from_secs(3600), None);
        let mgr = CertificateManager::new(Arc::new(provider), fast());
        mgr.get(&id).await.unwrap();
        let mut rx = mgr.inner.entries().get(&id).unwrap().state.clone();
        mgr.forget(&id);
        assert!(mgr.identities().is_empty());
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while rx.changed().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "rotation task still running after forget");

        let id2 = Identity::new("cluster.local", "a", "c");
        mgr.prefetch(&id2);
        let mut rx = mgr.inner.entries().get(&id2).unwrap().state.clone();
        drop(mgr);
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while rx.changed().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "rotation task still running after drop");
    }
}
