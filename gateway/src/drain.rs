//! Draining: how a gateway stops without failing a client. On `SIGTERM` (or `SIGQUIT`) it
//! reports not ready on `/readyz` (a load balancer stops sending), closes its listeners (new
//! connections are refused), and goes on serving what is in flight — an upload of a big
//! layer too — until nothing is, or `drain_seconds` pass; then it exits. `SIGINT` stops at
//! once.
//!
//! Pingora's graceful terminate does the listening side and bounds the whole by its grace
//! period (`drain_seconds`); [`Drain`] counts the requests in flight ([`InFlight`], one per
//! request, dropped with it) and ends the process as soon as none is left.

use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Whether the gateway drains, and what it still serves.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

/// One request in flight: counted while it lives.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    /// A request starts.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Ends the process once draining and nothing is in flight (checked every 100 ms; at
    /// least `settle` after the drain began, so a request accepted just before it is counted).
    pub async fn exit_when_idle(self: Arc<Self>, settle: Duration) {
        while !self.draining() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(settle).await;
        loop {
            if self.in_flight() == 0 {
                tracing::info!("drained: nothing in flight; exiting");
                crate::audit::record("gateway-stop", "success", serde_json::json!({}));
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The signal watch Pingora runs with: `SIGTERM` and `SIGQUIT` drain, `SIGINT` stops.
    pub fn watch(self: &Arc<Self>) -> Box<dyn ShutdownSignalWatch> {
        Box::new(Signals(self.clone()))
    }
}

struct Signals(Arc<Drain>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot watch signals: the gateway stops at once on one");
            return std::future::pending().await;
        };
        let fast = tokio::select! {
            _ = term.recv() => false,
            _ = quit.recv() => false,
            _ = int.recv() => true,
        };
        if fast {
            return ShutdownSignal::FastShutdown;
        }
        self.0.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            in_flight = self.0.in_flight(),
            "draining: not ready, no new connections, finishing what is in flight"
        );
        ShutdownSignal::GracefulTerminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_while_they_live() {
        let d = Arc::new(Drain::default());
        let a = d.request();
        let b = d.request();
        assert_eq!(d.in_flight(), 2);
        drop(a);
        assert_eq!(d.in_flight(), 1);
        drop(b);
        assert_eq!(d.in_flight(), 0);
        assert!(!d.draining());
    }
}
