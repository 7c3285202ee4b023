//! Load-balanced deployment: the shared state store (memory and a real `redis-server`),
//! several gateways sharing Redis, lockouts and rate limits across replicas, and Redis going
//! away and coming back. `cargo test --release --test ha` runs exactly these.
//!
//! By concern: [`state_store`] (the store's contract, and floods that must not push out
//! security state), [`shared_state`] (sessions, robots, revocations, lockouts, device flows
//! and rate limits shared by gateways on Redis), [`redis_outage`] (Redis going away, Sentinel
//! failovers), [`behind_haproxy`] (client addresses through the PROXY protocol, storage
//! nodes and gateways killed behind HAProxy, a rolling replacement of every process with no
//! failed client operation), [`events`] (webhooks delivered by one gateway
//! at a time, the other taking over), [`manifests`] (manifests answered from a gateway's
//! memory, read-after-write across gateways); [`replicas`] starts the gateways and asks them
//! for tokens.

mod behind_haproxy;
mod events;
mod manifests;
mod redis_outage;
mod replicas;
mod shared_state;
mod state_store;

use std::time::{Duration, Instant};

const BOB: (&str, &str) = ("bob", "bob-password");
const ALICE: (&str, &str) = ("alice", "alice-password");

/// Polls `check` every 50 ms until it holds or `secs` pass.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
