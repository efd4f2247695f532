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
}
