//! The one readiness mechanism every process of the mesh uses.
//!
//! Start-up work that must finish before the process may take traffic (the
//! first full configuration, certificates, listeners bound) registers a
//! [`BlockReady`] guard. The process is ready when no guard is left; the
//! readiness endpoint (`/healthz/ready`) reports the names of those pending.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared readiness state of a process.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    inner: Arc<Mutex<Inner>>,
    released: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    pending: BTreeMap<u64, String>,
}

/// Keeps the process unready until dropped (or [`BlockReady::mark_ready`]).
#[derive(Debug)]
#[must_use = "the process becomes ready again as soon as the guard is dropped"]
pub struct BlockReady {
    ready: Ready,
    id: u64,
}

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    /// Block readiness until the returned guard is dropped.
    pub fn register_task(&self, name: impl Into<String>) -> BlockReady {
        let mut inner = self.lock();
        let id = inner.next;
        inner.next += 1;
        inner.pending.insert(id, name.into());
        BlockReady {
            ready: self.clone(),
            id,
        }
    }

    /// Names of the tasks still blocking readiness, sorted.
    pub fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().pending.values().cloned().collect();
        names.sort();
        names
    }

    pub fn is_ready(&self) -> bool {
        self.lock().pending.is_empty()
    }

    /// Returns once no task blocks readiness (for work that must not start
    /// before, e.g. serving configuration built from a partial view).
    pub async fn wait_ready(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is seen.
            released.as_mut().enable();
            if self.is_ready() {
                return;
            }
            released.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single insert or remove).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockReady {
    /// Explicitly mark this task done.
    pub fn mark_ready(self) {}
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready.lock().pending.remove(&self.id);
        self.ready.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_guards_released() {
        let ready = Ready::new();
        assert!(ready.is_ready());
        let a = ready.register_task("config");
        let b = ready.register_task("certificates");
        assert!(!ready.is_ready());
        assert_eq!(ready.pending(), vec!["certificates", "config"]);
        a.mark_ready();
        assert_eq!(ready.pending(), vec!["certificates"]);
        drop(b);
        assert!(ready.is_ready());
    }

    #[tokio::test]
    async fn wait_ready_returns_when_the_last_guard_goes() {
        let ready = Ready::new();
        let a = ready.register_task("config");
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.wait_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("waiter released")
            .unwrap();
        ready.wait_ready().await;
    }
}
