//! The [`StateStore`] contract on the memory store, on Redis and through Sentinel, and
//! anonymous floods that must not push out sessions, revocations or lockouts.

use crate::eventually;
use gateway::state::{MemoryStore, StateStore};
use portcullis_tests::redis::{Redis, SentinelSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The whole [`StateStore`] contract; every implementation passes it.
async fn state_store_suite(s: Arc<dyn StateStore>, name: &str) {
    let ttl = Duration::from_secs(60);
    s.ping().await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), None, "{name}");
    s.set("k", vec![0, 1, 255], ttl).await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), Some(vec![0, 1, 255]), "{name}");
    s.delete("k").await.unwrap();
    assert_eq!(s.get("k").await.unwrap(), None, "{name}");

    // Time to live: gone after it, however it was written.
    s.set("short", b"x".to_vec(), Duration::from_millis(300))
        .await
        .unwrap();
    assert!(s.get("short").await.unwrap().is_some(), "{name}");
    eventually(5, "a 300 ms entry expires", || async {
        s.get("short").await.unwrap().is_none()
    })
    .await;

    // Durable entries and listing by prefix (glob characters are literal).
    s.put("robot:a", b"1".to_vec()).await.unwrap();
    s.put("robot:b*", b"2".to_vec()).await.unwrap();
    s.set("robot-not:c", b"3".to_vec(), ttl).await.unwrap();
    s.set("session:x", b"4".to_vec(), ttl).await.unwrap();
    let mut listed = s.scan("robot:").await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("robot:a".to_string(), b"1".to_vec()),
            ("robot:b*".to_string(), b"2".to_vec())
        ],
        "{name}"
    );
    assert_eq!(s.scan("robot:b*").await.unwrap().len(), 1, "{name}");
    assert!(s.scan("robot:[ab]").await.unwrap().is_empty(), "{name}");
    for i in 0..1500 {
        s.set(&format!("many:{i:04}"), vec![1], ttl).await.unwrap();
    }
    assert_eq!(s.scan("many:").await.unwrap().len(), 1500, "{name}");

    // take: exactly one of 16 racing callers gets a single-use value.
    s.set("once", b"state".to_vec(), ttl).await.unwrap();
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take("once").await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        if let Some(v) = r.await.unwrap() {
            assert_eq!(v, b"state", "{name}");
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "{name}: take is single-use");
    assert_eq!(s.get("once").await.unwrap(), None, "{name}");
    s.put("durable-once", b"d".to_vec()).await.unwrap();
    assert_eq!(
        s.take("durable-once").await.unwrap(),
        Some(b"d".to_vec()),
        "{name}"
    );
    assert_eq!(s.take("durable-once").await.unwrap(), None, "{name}");

    // replace: never brings back what is gone.
    assert!(
        !s.replace("absent", b"v".to_vec(), ttl).await.unwrap(),
        "{name}"
    );
    assert_eq!(s.get("absent").await.unwrap(), None, "{name}");
    s.set("present", b"old".to_vec(), ttl).await.unwrap();
    assert!(
        s.replace("present", b"new".to_vec(), ttl).await.unwrap(),
        "{name}"
    );
    assert_eq!(s.get("present").await.unwrap(), Some(b"new".to_vec()));

    // incr: atomic under contention, a fixed window that counting does not extend.
    let counters: Vec<_> = (0..100)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.incr("hits", Duration::from_secs(60)).await.unwrap() })
        })
        .collect();
    let mut seen = Vec::new();
    for c in counters {
        seen.push(c.await.unwrap());
    }
    seen.sort();
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>(), "{name}");
    assert_eq!(
        s.incr("window", Duration::from_millis(400)).await.unwrap(),
        1
    );
    assert_eq!(s.incr("window", Duration::from_secs(60)).await.unwrap(), 2);
    eventually(5, "the counter's window ends", || async {
        s.get("window").await.unwrap().is_none()
    })
    .await;
    assert_eq!(s.incr("window", Duration::from_secs(60)).await.unwrap(), 1);

    // A log appended to at once from many tasks: every number once, no gap, each entry
    // stored under its number.
    let appends: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.append("log:", format!("v{i}").into_bytes())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut numbers = Vec::new();
    for a in appends {
        numbers.push(a.await.unwrap());
    }
    numbers.sort();
    assert_eq!(numbers, (1..=50).collect::<Vec<u64>>(), "{name}");
    let keys: Vec<String> = (1..=50).map(|n| format!("log:{n:020}")).collect();
    let values = s.get_many(&keys).await.unwrap();
    assert!(
        values.iter().all(Option::is_some),
        "{name}: a numbered entry is missing"
    );
    assert_eq!(
        s.get("log:seq").await.unwrap().as_deref(),
        Some(&b"50"[..]),
        "{name}"
    );
}

/// 200 000 entries of the kinds unauthenticated clients make (OIDC login flows, rate windows),
/// then sessions, revocations, lockouts and failed-login counts are all still there. Returns
/// how many of the flood's writes the store refused (a full Redis with `noeviction`).
async fn anonymous_flood_leaves_security_state(s: Arc<dyn StateStore>, name: &str) -> usize {
    use futures_util::StreamExt;
    let hour = Duration::from_secs(3600);
    s.set("session:victim", b"s".to_vec(), hour).await.unwrap();
    s.set("revoked:jti:stolen", b"r".to_vec(), hour)
        .await
        .unwrap();
    s.set("lock:user:bob", b"9999999999".to_vec(), hour)
        .await
        .unwrap();
    for _ in 0..3 {
        s.incr("fail:user:carol", hour).await.unwrap();
    }
    let refused: usize = futures_util::stream::iter(0..200_000u32)
        .map(|i| {
            let s = s.clone();
            async move {
                let key = if i % 2 == 0 {
                    format!("oidc:flow:{i}")
                } else {
                    format!(
                        "rate:token:source:10.{}.{}.{}:1",
                        i >> 16,
                        (i >> 8) & 255,
                        i & 255
                    )
                };
                usize::from(s.set(&key, vec![7; 200], hour).await.is_err())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<usize>>()
        .await
        .into_iter()
        .sum();
    assert!(s.get("session:victim").await.unwrap().is_some(), "{name}");
    assert!(
        s.get("revoked:jti:stolen").await.unwrap().is_some(),
        "{name}"
    );
    assert!(s.get("lock:user:bob").await.unwrap().is_some(), "{name}");
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_floods_never_push_out_sessions_revocations_or_lockouts() {
    let memory = Arc::new(MemoryStore::default());
    let refused = anonymous_flood_leaves_security_state(memory.clone(), "memory").await;
    assert_eq!(
        refused, 0,
        "the memory store makes room among the flood's own kinds"
    );
    assert_eq!(
        memory
            .incr("fail:user:carol", Duration::from_secs(60))
            .await
            .unwrap(),
        4
    );
    // Redis with a memory limit the flood outgrows: with noeviction (the gateway warns about
    // any other policy) writes are refused when it is full, and nothing is evicted.
    let redis = Redis::start().unwrap();
    let store = gateway::state::redis::RedisStore::open(
        &toml::from_str(&format!("url = \"{}\"", redis.url)).unwrap(),
    )
    .unwrap();
    assert_eq!(store.eviction_policy().await.unwrap(), "noeviction");
    assert!(
        redis
            .command("CONFIG SET maxmemory 16mb")
            .unwrap()
            .starts_with("+OK")
    );
    let refused =
        anonymous_flood_leaves_security_state(redis_store(&redis, "flood:"), "redis").await;
    assert!(
        refused > 0,
        "the flood never filled Redis: the test proves nothing"
    );
}

/// A Redis store as the gateway opens it from its `[state]` table.
fn store_of(state_table: &str) -> Arc<dyn StateStore> {
    #[derive(serde::Deserialize)]
    struct Conf {
        state: gateway::state::StateConfig,
    }
    let c: Conf = toml::from_str(state_table).unwrap();
    Arc::new(gateway::state::redis::RedisStore::open(&c.state.redis.unwrap()).unwrap())
}

fn redis_store(redis: &Redis, prefix: &str) -> Arc<dyn StateStore> {
    store_of(&redis.state_table(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_store_suite_passes_on_memory_and_on_redis() {
    state_store_suite(Arc::new(MemoryStore::default()), "memory").await;
    let sentinel = SentinelSet::start().unwrap();
    state_store_suite(store_of(&sentinel.state_table("suite:")), "redis sentinel").await;
    drop(sentinel);
    let redis = Redis::start().unwrap();
    state_store_suite(redis_store(&redis, "suite:"), "redis").await;
    // Keys live under the prefix: another prefix sees none of them.
    let other = redis_store(&redis, "other:");
    assert!(other.scan("").await.unwrap().is_empty());
    assert!(
        redis
            .command("EXISTS suite:robot:a")
            .unwrap()
            .starts_with(":1")
    );
    assert!(redis.command("EXISTS robot:a").unwrap().starts_with(":0"));
    // Redis gone: a clear error, soon (not a hang); back: the same store works again.
    let mut redis = redis;
    let store = redis_store(&redis, "suite:");
    redis.stop();
    let t = Instant::now();
    let e = store.get("robot:a").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.to_string().contains("redis"), "{e}");
    assert!(store.ping().await.is_err());
    redis.start_again().unwrap();
    eventually(10, "the store reconnects", || async {
        store.ping().await.is_ok()
    })
    .await;
    store.put("back", b"1".to_vec()).await.unwrap();
}
