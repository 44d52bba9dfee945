//! The agent's one shutdown path (as linkerd2-proxy's drain): SIGTERM or
//! SIGINT starts it; each part that watches it stops taking new work and
//! finishes what it holds; the composition root (`main`) then waits for
//! them in order, each within a deadline, and exits. What must survive
//! the agent does: the datapath's programs and maps stay pinned and keep
//! enforcing, the HTTP proxy process keeps running, the state is on disk.

use std::sync::Arc;

/// A handle on the drain: cheap to clone, one per part that watches it.
/// The channel's value is the state: true once draining.
#[derive(Clone)]
pub struct Drain(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Drain(Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Starts draining (again: nothing more happens).
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.0.subscribe();
        // An error means the sender is gone, which it is not while `self`
        // lives; either way there is nothing more to wait for.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Starts the drain on SIGTERM or SIGINT (a thread of its own, waiting
    /// on the signals through tokio's handlers: they are reset on exec, so
    /// processes the agent starts keep the default ones).
    pub fn on_signals(&self, then: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let (mut term, mut int) = {
            let _guard = rt.enter();
            (
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            )
        };
        let drain = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let name = rt.block_on(async {
                    tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    }
                });
                tracing::info!(signal = name, "draining");
                drain.start();
                then();
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_see_the_drain_start_once() {
        let drain = Drain::new();
        let watcher = drain.clone();
        assert!(!watcher.is_draining());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let waited = std::thread::spawn(move || {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(5), watcher.signaled())
                    .await
                    .is_ok()
            })
        });
        drain.start();
        drain.start();
        assert!(drain.is_draining());
        assert!(waited.join().unwrap(), "the watcher was woken");
    }
}
