//! Storage nodes by name: [`Dns`] resolves `[upstream] nodes` again every [`RESOLVE_EVERY`],
//! so a storage node that comes back with another address (a container recreated by
//! docker-compose or Kubernetes) is found without restarting the gateway. A name that does
//! not resolve for a while keeps the addresses it had; every name must resolve at start (a
//! typo is an error, not a silent empty pool). A name with several addresses is several
//! backends.

use pingora::lb::Backend;
use pingora::lb::discovery::ServiceDiscovery;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Storage nodes, `host:port`.
    pub nodes: Vec<String>,
    /// Active health check (`GET /healthz`) interval.
    #[serde(default = "default_health_ms")]
    pub health_check_interval_ms: u64,
    /// Idle timeout of upstream reads and writes (not a total timeout: big blobs stream on).
    #[serde(default = "default_idle_s")]
    pub idle_timeout_seconds: u64,
    /// File with the internal secret; `PORTCULLIS_INTERNAL_SECRET` when unset.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The storage nodes' filesystem root (their `[storage] root`), when this gateway runs
    /// beside them on that filesystem: blob reads are answered from its files, without the hop
    /// ([`super::local`]).
    #[serde(default)]
    pub local_root: Option<PathBuf>,
}

fn default_health_ms() -> u64 {
    1000
}
fn default_idle_s() -> u64 {
    60
}

/// How often node names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

pub struct Dns {
    nodes: Vec<String>,
    /// Each node's addresses at the last resolution that worked.
    last: Mutex<HashMap<String, BTreeSet<Backend>>>,
    /// Whether the first discovery (answered from [`Dns::new`]'s resolution, with no I/O, so
    /// it completes outside a runtime) is done.
    started: AtomicBool,
}

fn backends(addrs: impl Iterator<Item = std::net::SocketAddr>) -> BTreeSet<Backend> {
    addrs
        .filter_map(|a| Backend::new(&a.to_string()).ok())
        .collect()
}

impl Dns {
    /// Resolves every node now (blocking; before the server runs).
    pub fn new(nodes: &[String]) -> anyhow::Result<Self> {
        let mut last = HashMap::new();
        for n in nodes {
            let found = backends(
                n.to_socket_addrs()
                    .map_err(|e| anyhow::anyhow!("upstream node {n:?}: {e}"))?,
            );
            anyhow::ensure!(!found.is_empty(), "upstream node {n:?} has no address");
            last.insert(n.clone(), found);
        }
        Ok(Dns {
            nodes: nodes.to_vec(),
            last: Mutex::new(last),
            started: AtomicBool::new(false),
        })
    }

    fn all(&self) -> BTreeSet<Backend> {
        self.last
            .lock()
            .map(|l| l.values().flatten().cloned().collect())
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl ServiceDiscovery for Dns {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        if !self.started.swap(true, Ordering::Relaxed) {
            return Ok((self.all(), HashMap::new()));
        }
        for n in &self.nodes {
            match tokio::net::lookup_host(n.as_str()).await {
                Ok(addrs) => {
                    let found = backends(addrs);
                    if found.is_empty() {
                        continue;
                    }
                    if let Ok(mut last) = self.last.lock()
                        && last.get(n) != Some(&found)
                    {
                        tracing::info!(node = %n, addresses = ?found.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(), "storage node resolved to new addresses");
                        last.insert(n.clone(), found);
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %n, error = %e, "cannot resolve a storage node; keeping its last addresses");
                }
            }
        }
        Ok((self.all(), HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_resolve_at_start_and_keep_their_addresses_when_resolution_fails() {
        let dns = Dns::new(&["127.0.0.1:5000".into(), "localhost:5001".into()]).unwrap();
        let first = futures_util::FutureExt::now_or_never(dns.discover());
        assert!(first.is_some(), "the first discovery does no I/O");
        let (found, _) = dns.discover().await.unwrap();
        let addrs: Vec<String> = found.iter().map(|b| b.addr.to_string()).collect();
        assert!(addrs.contains(&"127.0.0.1:5000".to_string()), "{addrs:?}");
        assert!(addrs.iter().any(|a| a.ends_with(":5001")), "{addrs:?}");
        assert!(Dns::new(&["no-such-host.invalid:5000".into()]).is_err());
        // A name that stops resolving keeps what it had.
        let dns = Dns {
            nodes: vec!["no-such-host.invalid:5000".into()],
            last: Mutex::new(HashMap::from([(
                "no-such-host.invalid:5000".to_string(),
                BTreeSet::from([Backend::new("10.9.8.7:5000").unwrap()]),
            )])),
            started: AtomicBool::new(true),
        };
        let (found, _) = dns.discover().await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found.iter().next().unwrap().addr.to_string(),
            "10.9.8.7:5000"
        );
    }
}
