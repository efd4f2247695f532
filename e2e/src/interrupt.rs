//! Ctrl-C for the long-running harness commands (`mesh-demo`, `mesh-bench`):
//! SIGINT/SIGTERM set a flag that the command checks between steps, so every
//! exit goes through the normal drop of the mesh (processes stopped,
//! namespaces and files removed) instead of leaving them behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

/// The step was cut short by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Set once SIGINT or SIGTERM arrived.
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Installs the handlers before anything else starts, on a thread of
    /// their own. Handlers (unlike a blocked signal mask) are not inherited
    /// across exec, so the processes the mesh starts keep the default
    /// behaviour and still stop on the harness's SIGTERM. `what` is printed
    /// when a signal arrives.
    pub fn install(what: &'static str) -> std::io::Result<Interrupt> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (mut int, mut term) = {
            let _guard = rt.enter();
            (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            )
        };
        let flag = Arc::new(AtomicBool::new(false));
        let seen = flag.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        let name = tokio::select! {
                            Some(()) = int.recv() => "SIGINT",
                            Some(()) = term.recv() => "SIGTERM",
                            else => return,
                        };
                        seen.store(true, Ordering::SeqCst);
                        eprintln!("\n{name} received: {what}");
                    }
                })
            })?;
        Ok(Interrupt(flag))
    }

    pub fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err` once a signal arrived.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.raised() {
            return Err(Interrupted);
        }
        Ok(())
    }
}
