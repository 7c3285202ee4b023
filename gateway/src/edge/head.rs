//! A total deadline for a connection's first request head (slow headers): from accept, the
//! TLS handshake and the whole head of the first request must arrive within
//! `tls.head_timeout_seconds`, or the connection is shut down
//! (`gateway_connections_refused_total{reason="head_timeout"}`). Pingora bounds each read of
//! a head, not the whole: one byte a minute would otherwise hold a connection for as long as
//! a head may grow.
//!
//! A connection is known by its socket digest (Pingora's, shared by the connection and every
//! request on it, HTTP/2 streams too; held by its watch, so its address is not reused while
//! the watch lives). Its deadline ends when a request's head arrives
//! ([`HeadDeadlines::arrived`]) or when the connection closes ([`Guard`], on the connection's
//! tracer, runs before its descriptor is closed), so a deadline never shuts down a descriptor
//! reused by another connection; either ends the timer too.
//!
//! Only the first head has a total deadline: later ones on a kept-alive connection are bounded
//! per read by `tls.idle_timeout_seconds` (and the per-source connection cap bounds how many
//! connections one address may hold that way).

use crate::in_force::lock;
use pingora::protocols::SocketDigest;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A connection's identity: the address of its socket digest.
type Key = usize;

fn key(digest: &Arc<SocketDigest>) -> Key {
    Arc::as_ptr(digest) as Key
}

pub struct HeadDeadlines {
    timeout: Duration,
    waiting: Mutex<HashMap<Key, Arc<Watch>>>,
    refused: prometheus::IntCounterVec,
}

/// One connection waiting for its first head.
struct Watch {
    fd: RawFd,
    /// Keeps the digest (and so the key) alive while the watch is.
    _digest: Arc<SocketDigest>,
    /// Whether the deadline still applies (false once a head arrived or the connection
    /// closed). Held while the descriptor is shut down.
    open: Mutex<bool>,
    /// The timer, stopped when the deadline ends early.
    timer: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Watch {
    /// The deadline no longer applies: the timer stops.
    fn close(&self) {
        *lock(&self.open) = false;
        if let Some(t) = lock(&self.timer).take() {
            t.abort();
        }
    }
}

impl HeadDeadlines {
    pub fn new(timeout: Duration, refused: prometheus::IntCounterVec) -> Arc<Self> {
        Arc::new(HeadDeadlines {
            timeout,
            waiting: Mutex::new(HashMap::new()),
            refused,
        })
    }

    /// Starts the deadline of the connection on descriptor `fd` whose socket digest is
    /// `digest` (on a Tokio runtime); the guard goes on the connection.
    pub fn watch(self: &Arc<Self>, fd: RawFd, digest: Arc<SocketDigest>) -> Guard {
        let k = key(&digest);
        let watch = Arc::new(Watch {
            fd,
            _digest: digest,
            open: Mutex::new(true),
            timer: Mutex::new(None),
        });
        lock(&self.waiting).insert(k, watch.clone());
        let (this, w) = (self.clone(), watch.clone());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(this.timeout).await;
            let mut open = lock(&w.open);
            if *open {
                *open = false;
                // Reads and writes end: Pingora sees the connection closed and drops it.
                let _ = nix::sys::socket::shutdown(w.fd, nix::sys::socket::Shutdown::Both);
                this.refused.with_label_values(&["head_timeout"]).inc();
                tracing::debug!("connection closed: no request head in time");
            }
            drop(open);
            this.forget(k, &w);
        });
        *lock(&watch.timer) = Some(timer.abort_handle());
        Guard {
            deadlines: self.clone(),
            key: k,
            watch,
        }
    }

    /// A request's head arrived on the connection whose socket digest is `digest`: its
    /// deadline ends.
    pub fn arrived(&self, digest: &Arc<SocketDigest>) {
        let found = lock(&self.waiting).remove(&key(digest));
        if let Some(w) = found {
            w.close();
        }
    }

    /// Forgets `watch` (not another's that took the same key since).
    fn forget(&self, k: Key, watch: &Arc<Watch>) {
        let mut waiting = lock(&self.waiting);
        if waiting.get(&k).is_some_and(|w| Arc::ptr_eq(w, watch)) {
            waiting.remove(&k);
        }
    }
}

/// Ends a connection's deadline when the connection closes.
#[derive(Clone)]
pub struct Guard {
    deadlines: Arc<HeadDeadlines>,
    key: Key,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("fd", &self.watch.fd).finish()
    }
}

impl Guard {
    /// The connection closes (its descriptor is still open).
    pub fn end(&self) {
        self.watch.close();
        self.deadlines.forget(self.key, &self.watch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;

    fn counter() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("refused", "refused"), &["reason"])
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_without_a_head_in_time_is_shut_down_and_one_with_a_head_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = counter();
        let deadlines = HeadDeadlines::new(Duration::from_millis(200), refused.clone());
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server_slow, _) = listener.accept().await.unwrap();
        let fast = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server_fast, _) = listener.accept().await.unwrap();
        let digest = |s: &tokio::net::TcpStream| Arc::new(SocketDigest::from_raw_fd(s.as_raw_fd()));
        let _g1 = deadlines.watch(server_slow.as_raw_fd(), digest(&server_slow));
        let fast_digest = digest(&server_fast);
        let _g2 = deadlines.watch(server_fast.as_raw_fd(), fast_digest.clone());
        deadlines.arrived(&fast_digest);
        // The slow one is shut down: its client reads the end of the stream.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
            .await
            .expect("shut down in time")
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(refused.with_label_values(&["head_timeout"]).get(), 1);
        // The one whose head arrived is not.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut fast = fast;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), fast.read(&mut buf))
                .await
                .is_err(),
            "the connection with a head was closed"
        );
        assert!(lock(&deadlines.waiting).is_empty());
        drop((server_slow, server_fast));
    }

    #[tokio::test]
    async fn a_closed_connection_ends_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = counter();
        let deadlines = HeadDeadlines::new(Duration::from_millis(100), refused.clone());
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let d = Arc::new(SocketDigest::from_raw_fd(server.as_raw_fd()));
        let guard = deadlines.watch(server.as_raw_fd(), d);
        guard.end();
        drop(server);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(refused.with_label_values(&["head_timeout"]).get(), 0);
        assert!(lock(&deadlines.waiting).is_empty());
    }
}
