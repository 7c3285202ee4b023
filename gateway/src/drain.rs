//! Draining: how a gateway stops without failing a client. On `SIGTERM` (or `SIGQUIT`) it
//! reports not ready on `/readyz` (a load balancer stops sending), after
//! `drain_delay_seconds` closes its listeners (new connections are refused), and goes on
//! serving what is in flight — an upload of a big layer too — until nothing is, or
//! `drain_seconds` pass; then it exits (status 1 when requests were cut short). `SIGINT`
//! stops at once, during a drain too.
//!
//! With `upgrade_socket` set, `SIGQUIT` is an in-place upgrade instead: the listening sockets
//! go to a new process started with `gateway serve --upgrade` (Pingora's graceful upgrade),
//! which serves the same ports at once; this one stays ready, finishes what is in flight the
//! same way, and exits.
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
    /// How long `/readyz` says not ready before the listeners close (`drain_delay_seconds`).
    delay: Duration,
    /// `SIGQUIT` hands the listening sockets to a new process through this Unix socket
    /// (`upgrade_socket`).
    upgrade_socket: Option<std::path::PathBuf>,
    /// When it did: the drain of an upgrade (the new process serves; `/readyz` stays ready).
    upgraded_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// After the signal, Pingora may try for up to 5 s to reach the new process, then keeps
/// accepting for 5 s (the new process starts taking connections); the old one ends no sooner
/// than this after the signal.
const HANDOVER: Duration = Duration::from_secs(12);

/// One request in flight: counted while it lives.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    /// A drain that keeps the listeners open `delay` after `/readyz` turns not ready;
    /// `upgrade_socket`: `SIGQUIT` hands the listening sockets to a new process through it
    /// instead.
    pub fn new(delay: Duration, upgrade_socket: Option<std::path::PathBuf>) -> Self {
        Drain {
            delay,
            upgrade_socket,
            ..Default::default()
        }
    }

    /// Whether the sockets went to a new process (which is ready; this one finishes).
    pub fn upgrading(&self) -> bool {
        self.upgraded_at.lock().map(|t| t.is_some()).unwrap_or(true)
    }

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

    /// Ends the process once draining and nothing has been in flight for `settle` (an
    /// HTTP/2 answer's last bytes leave after its request ended; audit events reach their
    /// sinks); a `SIGINT` meanwhile ends it at once.
    pub async fn exit_when_idle(self: Arc<Self>, settle: Duration) {
        while !self.draining() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::spawn(async {
            if let Ok(mut int) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            {
                int.recv().await;
                tracing::warn!("SIGINT while draining: stopping at once");
                std::process::exit(1);
            }
        });
        let mut idle_since: Option<std::time::Instant> = None;
        loop {
            let handing_over = self
                .upgraded_at
                .lock()
                .ok()
                .and_then(|t| *t)
                .is_some_and(|t| t.elapsed() < HANDOVER);
            if self.in_flight() > 0 || handing_over {
                idle_since = None;
            } else if idle_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= settle
            {
                tracing::info!("drained: nothing in flight; exiting");
                crate::audit::record("gateway-stop", "success", serde_json::json!({}));
                // The audit sinks' queues get a moment to send it.
                tokio::time::sleep(Duration::from_millis(200)).await;
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of a drain that `drain_seconds` cut short: audited with what was still in
    /// flight; the process's exit status says so.
    pub fn timed_out(&self) -> i32 {
        let left = self.in_flight();
        if left == 0 {
            return 0;
        }
        tracing::warn!(
            in_flight = left,
            "drain_seconds passed with requests in flight"
        );
        crate::audit::record(
            "gateway-stop",
            "failure",
            serde_json::json!({"event.reason": format!("drain_seconds passed with {left} requests in flight")}),
        );
        std::thread::sleep(Duration::from_millis(200));
        1
    }

    /// The signal watch Pingora runs with: `SIGTERM` drains, `SIGQUIT` upgrades (with an
    /// `upgrade_socket`; else it drains), `SIGINT` stops.
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
        let (fast, quit) = loop {
            let (fast, quit) = tokio::select! {
                _ = term.recv() => (false, false),
                _ = quit.recv() => (false, true),
                _ = int.recv() => (true, false),
            };
            // An upgrade with no new process waiting would hand the sockets to no one: the
            // gateway goes on serving instead.
            if let (true, Some(s)) = (quit, &self.0.upgrade_socket)
                && let Err(why) = waiting_process(s)
            {
                tracing::error!(socket = %s.display(), error = %why, "SIGQUIT: no new process waits for the sockets (start it with `gateway serve --upgrade` first); still serving");
                crate::audit::record(
                    "gateway-upgrade",
                    "failure",
                    serde_json::json!({"event.reason": why}),
                );
                continue;
            }
            break (fast, quit);
        };
        if fast {
            return ShutdownSignal::FastShutdown;
        }
        if quit && self.0.upgrade_socket.is_some() {
            crate::audit::record("gateway-upgrade", "success", serde_json::json!({}));
            if let Ok(mut t) = self.0.upgraded_at.lock() {
                *t = Some(std::time::Instant::now());
            }
            self.0.draining.store(true, Ordering::SeqCst);
            tracing::info!(
                in_flight = self.0.in_flight(),
                "upgrade: handing the listening sockets to the new process, then finishing what is in flight"
            );
            return ShutdownSignal::GracefulUpgrade;
        }
        self.0.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            in_flight = self.0.in_flight(),
            delay_seconds = self.0.delay.as_secs(),
            "draining: not ready; the listeners close after the delay, then what is in flight is finished"
        );
        // Load balancers see /readyz first; connections keep being taken meanwhile.
        tokio::time::sleep(self.0.delay).await;
        ShutdownSignal::GracefulTerminate
    }
}

/// Whether a new process waits at `socket`: a Unix socket there, owned by this process's
/// user (another user's would be handed the listening sockets).
fn waiting_process(socket: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    if !m.file_type().is_socket() {
        return Err(format!("{} is not a socket", socket.display()));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!("{} belongs to another user", socket.display()));
    }
    Ok(())
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
