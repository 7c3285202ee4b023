//! What every connection to the TLS listener goes through before its TLS handshake.
//!
//! 0. At start ([`raise_descriptor_limit`]) the soft descriptor limit is raised to the hard
//!    one, so the caps below, not the default 1,024 descriptors, decide who is refused.
//! 1. A cap on open connections per source (`limits.connections_per_source`; an IPv6 source
//!    is its /64, what one host is usually given): one address cannot take every descriptor.
//!    Over the cap, the connection is closed at once, before TLS (the client sees a reset;
//!    `gateway_connections_refused_total{reason="per_source_cap"}`). The slot is held until
//!    the connection closes, whatever closes it.
//! 2. Its first byte must arrive within `tls.hello_timeout_ms`: a connection that never
//!    speaks (half-open, or opened only to hold a descriptor) is closed then instead of
//!    after Pingora's 60-second handshake timeout. The byte is put back for the handshake.
//! 3. From a trusted load balancer, the PROXY header (`proxy_protocol`); the cap then counts
//!    the client address it names. A trusted load balancer's own connections without one
//!    (health checks, `LOCAL`) are not counted.
//! 4. Then the TLS handshake and the first request's whole head must arrive within
//!    `tls.head_timeout_seconds` ([`head`]).

pub mod head;
pub mod proxy_protocol;
pub mod tls;

use crate::edge::proxy_protocol::ProxyProtocol;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::upstreams::peer::{Tracer, Tracing};
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

pub struct Edge {
    pub hello_timeout: Duration,
    pub heads: Arc<head::HeadDeadlines>,
    pub proxy_protocol: Option<Arc<ProxyProtocol>>,
    pub slots: Arc<ConnectionSlots>,
    pub refused: prometheus::IntCounterVec,
}

/// Whom a connection (or a failed login, or a rate window) counts against: an IPv4 address,
/// or the /64 of an IPv6 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections per source, with a cap (`0`: none).
pub struct ConnectionSlots {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    gauge: prometheus::IntGauge,
}

impl ConnectionSlots {
    pub fn new(cap: usize, gauge: prometheus::IntGauge) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            cap,
            open: Mutex::new(HashMap::new()),
            gauge,
        })
    }

    /// A slot for one more connection from `ip`, or `None` when its source is at the cap.
    /// The slot is given back when the returned [`Slot`] is dropped or disconnected.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let source = source_of(ip);
        let mut open = crate::in_force::lock(&self.open);
        let n = open.entry(source).or_insert(0);
        if self.cap > 0 && *n >= self.cap {
            return None;
        }
        *n += 1;
        self.gauge.inc();
        Some(Slot {
            held: Arc::new(Held {
                slots: self.clone(),
                source,
                released: AtomicBool::new(false),
            }),
            owner: true,
        })
    }

    /// Open connections counted against `ip`'s source.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = crate::in_force::lock(&self.open);
        open.get(&source_of(ip)).copied().unwrap_or(0)
    }

    fn give_back(&self, source: IpAddr) {
        let mut open = crate::in_force::lock(&self.open);
        if let Some(n) = open.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&source);
            }
            self.gauge.dec();
        }
    }
}

struct Held {
    slots: Arc<ConnectionSlots>,
    source: IpAddr,
    released: AtomicBool,
}

impl Held {
    fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.slots.give_back(self.source);
        }
    }
}

/// One connection's place under its source's cap. It rides on the connection as Pingora's
/// connection [`Tracer`], whose `on_disconnected` runs when the stream is dropped; dropping
/// the slot itself gives the place back too (once, either way).
pub struct Slot {
    held: Arc<Held>,
    /// Copies made by `boxed_clone` share the place but do not give it back on drop.
    owner: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("source", &self.held.source)
            .finish()
    }
}

impl Tracing for Slot {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {
        self.held.release();
    }
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(Slot {
            held: self.held.clone(),
            owner: false,
        })
    }
}

impl Slot {
    /// The same place, not given back when this copy drops.
    fn shared(&self) -> Slot {
        Slot {
            held: self.held.clone(),
            owner: false,
        }
    }
}

/// What rides on a connection as Pingora's connection [`Tracer`]: its place under the cap
/// and its head deadline, both ended when the stream is dropped.
#[derive(Debug)]
struct OnClose {
    slot: Option<Slot>,
    head: Option<head::Guard>,
}

impl Tracing for OnClose {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {
        if let Some(s) = &self.slot {
            s.on_disconnected();
        }
        if let Some(h) = &self.head {
            h.end();
        }
    }
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(OnClose {
            slot: self.slot.as_ref().map(Slot::shared),
            head: self.head.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.owner {
            self.held.release();
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit (as Go programs do at start):
/// the default soft limit, often 1,024, would let a few sources at their cap use up every
/// descriptor. Returns the limit now in force; warns when one source's cap is a large share
/// of it.
pub fn raise_descriptor_limit(connections_per_source: usize) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let cap = connections_per_source as u64;
    if cap == 0 || cap.saturating_mul(4) > limit {
        tracing::warn!(
            descriptor_limit = limit,
            connections_per_source,
            "one source may hold a large share of the process's descriptors: raise the \
             hard limit (ulimit -Hn, LimitNOFILE=) or lower limits.connections_per_source"
        );
    } else {
        tracing::info!(
            descriptor_limit = limit,
            connections_per_source,
            "connection limits"
        );
    }
    Some(limit)
}

fn peer_ip(stream: &L4Stream) -> Option<IpAddr> {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().map(|a| a.ip())))
}

impl Edge {
    /// Takes a slot for `ip`, or refuses the connection.
    fn admit(&self, ip: IpAddr) -> pingora::Result<Slot> {
        match self.slots.take(ip) {
            Some(slot) => Ok(slot),
            None => {
                self.refused.with_label_values(&["per_source_cap"]).inc();
                tracing::debug!(source = %source_of(ip), "connection refused: per-source cap");
                Err(pingora::Error::explain(
                    pingora::ErrorType::ConnectRefused,
                    "too many connections from this source",
                ))
            }
        }
    }

    /// Waits for the first byte and puts it back.
    async fn hello(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let mut first = [0u8; 512];
        let n = match tokio::time::timeout(self.hello_timeout, stream.read(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(pingora::Error::because(
                    pingora::ErrorType::ReadError,
                    "reading the first bytes",
                    e,
                ));
            }
            Err(_) => {
                self.refused.with_label_values(&["hello_timeout"]).inc();
                return Err(pingora::Error::explain(
                    pingora::ErrorType::ReadTimedout,
                    "no TLS hello in time",
                ));
            }
        };
        if n == 0 {
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "closed before a TLS hello",
            ));
        }
        stream.rewind(&first[..n]);
        Ok(())
    }
}

#[async_trait::async_trait]
impl PreTlsProcess for Edge {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let peer = peer_ip(stream);
        let balancer = self
            .proxy_protocol
            .as_ref()
            .filter(|p| peer.is_some_and(|ip| p.trusts(ip)));
        let slot = match (balancer, peer) {
            (Some(p), _) => {
                // The client is known only once the PROXY header is read.
                self.hello(stream).await?;
                p.process(stream).await?;
                match peer_ip(stream) {
                    Some(client) if !p.trusts(client) => Some(self.admit(client)?),
                    _ => None,
                }
            }
            (None, Some(ip)) => {
                // Counted from accept on: silent connections hold their slot too (given
                // back when `slot` drops, if the hello does not come).
                let slot = self.admit(ip)?;
                self.hello(stream).await?;
                Some(slot)
            }
            (None, None) => {
                self.hello(stream).await?;
                None
            }
        };
        let head = stream
            .get_socket_digest()
            .map(|d| self.heads.watch(stream.as_raw_fd(), d));
        stream.tracer = Some(Tracer(Box::new(OnClose { slot, head })));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(cap: usize) -> Arc<ConnectionSlots> {
        ConnectionSlots::new(cap, prometheus::IntGauge::new("open", "open").unwrap())
    }

    #[test]
    fn a_source_gets_cap_slots_and_each_comes_back_once() {
        let s = slots(2);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        let one = s.take(a).unwrap();
        let two = s.take(a).unwrap();
        assert!(s.take(a).is_none(), "over the cap");
        let other = s.take(b).unwrap();
        assert_eq!((s.open(a), s.open(b)), (2, 1));
        // Pingora calls on_disconnected when the stream goes, then drops the tracer.
        one.on_disconnected();
        one.on_disconnected();
        let copy = one.boxed_clone();
        drop(copy);
        drop(one);
        assert_eq!(s.open(a), 1);
        let three = s.take(a).unwrap();
        assert!(s.take(a).is_none());
        drop((two, three, other));
        assert_eq!((s.open(a), s.open(b)), (0, 0));
        assert_eq!(s.gauge.get(), 0);
        assert!(s.open.lock().unwrap().is_empty(), "no entry left behind");
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64_and_mapped_v4_is_v4() {
        let s = slots(1);
        let _x = s.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(s.take("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        let _y = s.take("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let _z = s.take("::ffff:198.51.100.4".parse().unwrap()).unwrap();
        assert!(s.take("198.51.100.4".parse().unwrap()).is_none());
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(1024), hard).unwrap();
        let limit = raise_descriptor_limit(512).unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((soft, limit), (hard, hard));
    }

    #[test]
    fn no_cap_means_none() {
        let s = slots(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..10_000).map(|_| s.take(ip).unwrap()).collect();
        assert_eq!(s.open(ip), 10_000);
        drop(held);
        assert_eq!(s.open(ip), 0);
    }
}
