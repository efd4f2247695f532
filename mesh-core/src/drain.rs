//! The one drain mechanism every process of the mesh uses.
//!
//! A [`Trigger`] is held by `main`; every listener, connection and background
//! task holds a [`Watch`]. When the process is told to stop, `main` calls
//! [`Trigger::drain`]: every watch sees [`Watch::signaled`] resolve (listeners
//! stop accepting, HTTP/2 connections send GOAWAY), and `drain` returns once
//! every watch has been dropped — the last open connection has finished — or
//! the deadline passed, whichever is first.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Held by the owner of the process; starts the drain.
#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<std::convert::Infallible>,
}

/// Held by everything that must finish before the process exits.
#[derive(Clone, Debug)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    // Never sent on: its only job is to be dropped, so that the trigger's
    // receiver sees every watch gone.
    _alive: mpsc::Sender<std::convert::Infallible>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every watch was released before the deadline.
    Complete,
    /// The deadline passed with watches still held (connections still open).
    DeadlineExceeded,
}

/// A new drain pair.
pub fn new() -> (Trigger, Watch) {
    let (signal, signal_rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        Trigger { signal, done },
        Watch {
            signal: signal_rx,
            _alive: alive,
        },
    )
}

impl Trigger {
    /// Signal every watch, then wait until all are dropped or `deadline` passes.
    pub async fn drain(mut self, deadline: Duration) -> Outcome {
        let _ = self.signal.send(true);
        match tokio::time::timeout(deadline, self.done.recv()).await {
            Ok(_) => Outcome::Complete,
            Err(_) => Outcome::DeadlineExceeded,
        }
    }

    /// True once no watch is held any more (nothing to drain).
    pub fn is_idle(&self) -> bool {
        self.done.is_closed() && self.done.is_empty()
    }
}

impl Watch {
    /// Resolves once the drain has started. Resolves at once if it already has.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger was dropped without draining: treat that
        // as a drain too, so nothing waits forever on a vanished owner.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_completes_when_all_watches_dropped() {
        let (trigger, watch) = new();
        let w2 = watch.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            assert!(w2.is_draining());
            drop(w2);
        });
        drop(watch);
        assert_eq!(
            trigger.drain(Duration::from_secs(10)).await,
            Outcome::Complete
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_times_out_while_a_watch_is_held() {
        let (trigger, watch) = new();
        let held = watch.clone();
        drop(watch);
        assert_eq!(
            trigger.drain(Duration::from_millis(50)).await,
            Outcome::DeadlineExceeded
        );
        // The held watch saw the signal even though the drain gave up.
        assert!(held.is_draining());
    }

    #[tokio::test]
    async fn dropped_trigger_counts_as_signal() {
        let (trigger, watch) = new();
        drop(trigger);
        watch.signaled().await;
    }
}
