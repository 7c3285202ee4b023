//! Load-balanced deployment: the shared state store (memory and a real `redis-server`),
//! several gateways sharing Redis, lockouts and rate limits across replicas, and Redis going
//! away and coming back. `cargo test --release --test ha` runs exactly these.

use gateway::state::{MemoryStore, StateStore};
use portcullis_tests::client::{Client, TokenAuth, https};
use portcullis_tests::deployment::{
    SERVICE, share_identity, start_gateway_with, storage_node, user_client,
};
use portcullis_tests::haproxy::{Backend, Haproxy, TRUST_PROXY};
use portcullis_tests::redis::{Redis, SentinelSet};
use portcullis_tests::server::{GatewayServer, StorageServer};
use serde_json::{Value, json};
use std::sync::Arc;
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

/// `n` gateways with the `state` table, listing `m` storage nodes that share
/// `<dir>/storage`, with one signing key and one certificate (as behind one name), each with
/// its own audit file `<dir>/gw<i>/audit.jsonl`.
fn start_gateways(
    dir: &std::path::Path,
    n: usize,
    m: usize,
    state: &str,
    extra: &str,
    env: &[(&'static str, &'static str)],
) -> (Vec<GatewayServer>, Vec<StorageServer>) {
    let storages: Vec<StorageServer> = (0..m)
        .map(|_| storage_node(&dir.join("storage")).unwrap())
        .collect();
    let nodes: Vec<&StorageServer> = storages.iter().collect();
    let key = gateway::token::keys::generate_pem().unwrap();
    let tls = gateway::edge::tls::ensure_dev_certificates(&dir.join("tls")).unwrap();
    let gateways = (0..n)
        .map(|i| {
            let d = dir.join(format!("gw{i}"));
            share_identity(&d, &tls, &key).unwrap();
            let table = format!(
                "{state}[audit]\nfile = \"{}/audit.jsonl\"\nstdout = true\n{extra}",
                d.display()
            );
            start_gateway_with(&d, &nodes, &[BOB, ALICE], 4, &table, env).unwrap()
        })
        .collect();
    (gateways, storages)
}

/// Gateways sharing one Redis (and one signing key, one certificate) in front of storage
/// nodes on one data root, each gateway with its own audit file.
struct Replicas {
    gateways: Vec<GatewayServer>,
    storages: Vec<StorageServer>,
    redis: Redis,
    env: Vec<(&'static str, &'static str)>,
    dir: tempfile::TempDir,
}

impl Replicas {
    fn start(n: usize, redis: Redis, extra: &str) -> Self {
        Self::start_full(n, 1, redis, extra, &[])
    }

    fn start_env(
        n: usize,
        redis: Redis,
        extra: &str,
        env: &[(&'static str, &'static str)],
    ) -> Self {
        Self::start_full(n, 1, redis, extra, env)
    }

    /// `n` gateways listing `m` storage nodes that share `<dir>/storage`.
    fn start_full(
        n: usize,
        m: usize,
        redis: Redis,
        extra: &str,
        env: &[(&'static str, &'static str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (gateways, storages) =
            start_gateways(dir.path(), n, m, &redis.state_table("ha:"), extra, env);
        Replicas {
            gateways,
            storages,
            redis,
            env: env.to_vec(),
            dir,
        }
    }

    /// `kill -9` of gateway `i` (its process only; [`Replicas::start_gateway_again`] brings
    /// it back on the same ports).
    fn kill_gateway(&self, i: usize) {
        let pid = self.gateways[i].pid().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn start_gateway_again(&mut self, i: usize) {
        let g = &self.gateways[i];
        let port: u16 = g.host.rsplit(':').next().unwrap().parse().unwrap();
        let mut env = self.env.clone();
        env.push((
            "PORTCULLIS_INTERNAL_SECRET",
            portcullis_tests::deployment::SECRET,
        ));
        let conf = self.dir.path().join(format!("gw{i}/gateway.toml"));
        self.gateways[i] =
            GatewayServer::start_config(&conf, port, g.ca_pem.clone(), &env).unwrap();
    }

    fn audit(&self, i: usize) -> Vec<Value> {
        let f = self.dir.path().join(format!("gw{i}/audit.jsonl"));
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

async fn token_form(g: &GatewayServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = https(&g.ca_pem, false)
        .post(format!("{}/token", g.base))
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `GET /token` with Basic credentials: status, `Retry-After`, body.
async fn basic_token(
    g: &GatewayServer,
    user: &str,
    password: &str,
    scope: &str,
) -> (u16, Option<u64>, Value) {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/token?service={SERVICE}&scope={scope}", g.base))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (
        r.status().as_u16(),
        retry,
        r.json().await.unwrap_or(Value::Null),
    )
}

/// Bob's password grant with `access_type=offline` on `g`: the refresh token (remembered
/// for the leak check) and the whole answer.
async fn bobs_session(g: &GatewayServer, scope: Option<&str>) -> (String, Value) {
    let mut form = vec![
        ("grant_type", "password"),
        ("username", BOB.0),
        ("password", BOB.1),
        ("client_id", "ha-test"),
        ("access_type", "offline"),
        ("service", SERVICE),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let (status, v) = token_form(g, &form).await;
    assert_eq!(status, 200, "{v}");
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&refresh);
    (refresh, v)
}

/// Alice (an administrator) creates `robot$team-a+<name>` on `g` with `actions` on
/// `team-a/**` for an hour; its secret.
async fn create_robot(g: &GatewayServer, name: &str, actions: &[&str]) -> String {
    let resp = https(&g.ca_pem, false)
        .post(format!("{}/admin/robots", g.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .json(&json!({
            "project": "team-a", "name": name,
            "scope": [{"repositories": ["team-a/**"], "actions": actions}],
            "expires_in_seconds": 3600,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let robot: Value = resp.json().await.unwrap();
    let secret = robot["secret"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&secret);
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_tokens_robots_and_lockouts_are_shared_by_gateways_on_redis() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        "[limits]\nuser_failures = 5\nlockout_seconds = 120\n",
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);

    // A refresh token from A is redeemed on B; revoked on B, it is dead on A.
    let (refresh, _) = bobs_session(a, None).await;
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "ha-test"),
        ("service", SERVICE),
        ("scope", "repository:team-a/app:pull,push"),
    ];
    let (status, v) = token_form(b, &grant).await;
    assert_eq!(status, 200, "{v}");
    let access = v["access_token"].as_str().unwrap().to_string();
    // An access token from B is good on A (one signing key).
    let resp = https(&a.ca_pem, false)
        .get(format!("{}/v2/team-a/app/tags/list", a.base))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "an unknown repository, but authorized");
    let resp = https(&b.ca_pem, false)
        .post(format!("{}/auth/revoke", b.base))
        .form(&[("token", refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, v) = token_form(a, &grant).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

    // A robot created on A logs in on B and pushes through A.
    let secret = create_robot(a, "ci", &["pull", "push"]).await;
    let (status, _, v) =
        basic_token(b, "robot$team-a+ci", &secret, "repository:team-a/x:push").await;
    assert_eq!(status, 200, "{v}");
    user_client(a, "robot$team-a+ci", &secret)
        .push_image("team-a/x", "v1", &[b"layer"])
        .await
        .unwrap();
    // Listed on B too.
    let resp = https(&b.ca_pem, false)
        .get(format!("{}/admin/robots", b.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    let listed: Value = resp.json().await.unwrap();
    assert!(listed.to_string().contains("robot$team-a+ci"), "{listed}");

    // Five failed logins spread over A and B lock bob out on both, even with his password.
    for i in 0..5 {
        let g = &r.gateways[i % 2];
        let (status, _, v) = basic_token(g, "Bob", "wrong", "").await;
        assert_eq!(status, 401, "attempt {i}: {v}");
    }
    for g in [a, b] {
        let (status, retry, v) = basic_token(g, BOB.0, BOB.1, "").await;
        assert_eq!(status, 429, "{v}");
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS", "{v}");
        let retry = retry.expect("Retry-After");
        assert!((100..=120).contains(&retry), "{retry}");
    }
    // POST password grants are refused the same way; other users are not locked.
    let (status, _) = token_form(
        b,
        &[
            ("grant_type", "password"),
            ("username", BOB.0),
            ("password", BOB.1),
            ("client_id", "ha-test"),
            ("service", SERVICE),
        ],
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(basic_token(a, ALICE.0, ALICE.1, "").await.0, 200);

    // Audited: the lockout once (where the fifth failure landed), each locked refusal.
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let lockouts: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "login-lockout")
        .collect();
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
    let l = lockouts[0];
    assert_eq!(l["user.name"], "Bob");
    assert_eq!(l["lockout.by"], "user");
    assert_eq!(l["lockout.seconds"], 120);
    assert_eq!(l["lockout.failures"], 5);
    assert_eq!(l["source.ip"], "127.0.0.1");
    let locked = events
        .iter()
        .filter(|e| e["event.action"] == "login" && e["event.reason"] == "locked out (user)")
        .count();
    assert_eq!(locked, 3);
    // The state is in Redis under the prefix, with a time to live.
    let ttl = r.redis.command("TTL ha:lock:user:bob").unwrap();
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!((100..=120).contains(&ttl), "{ttl}");
}

/// `GET /v2/team-a/app/tags/list` with `token`: 404 (authorized, no such repository) or
/// 401 (refused), and the error message.
async fn tags_with(g: &GatewayServer, token: &str) -> (u16, String) {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/v2/team-a/app/tags/list", g.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn bearer_of(g: &GatewayServer, user: &str, password: &str) -> String {
    let (status, _, v) = basic_token(g, user, password, "repository:team-a/app:pull").await;
    assert_eq!(status, 200, "{v}");
    let t = v["token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&t);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_tokens_revoked_on_one_gateway_are_refused_by_every_gateway() {
    let r = Replicas::start(2, Redis::start().unwrap(), "");
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    let t1 = bearer_of(a, BOB.0, BOB.1).await;
    let t2 = bearer_of(a, BOB.0, BOB.1).await;
    assert_eq!(tags_with(b, &t1).await.0, 404);

    // Its holder revokes t1 on B (RFC 7009): B refuses it at once, A within a sync interval.
    let resp = https(&b.ca_pem, false)
        .post(format!("{}/auth/revoke", b.base))
        .form(&[("token", t1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = tags_with(b, &t1).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    eventually(10, "A refuses the revoked token", || async {
        tags_with(a, &t1).await.0 == 401
    })
    .await;
    assert_eq!(tags_with(a, &t2).await.0, 404, "only that token is revoked");
    assert_eq!(tags_with(b, &t2).await.0, 404);

    // Only administrators revoke other people's tokens.
    let revoke_all = |g: &GatewayServer, who: (&str, &str), query: &str| {
        https(&g.ca_pem, false)
            .delete(format!("{}/auth/tokens?{query}", g.base))
            .basic_auth(who.0, Some(who.1))
            .send()
    };
    let resp = revoke_all(a, BOB, "user=alice").await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = revoke_all(a, ALICE, "user=bob&kind=nobody").await.unwrap();
    assert_eq!(resp.status(), 400);
    // An administrator revokes all of bob's tokens on A; B refuses t2 soon after, and a
    // token bob fetches right away works everywhere.
    let resp = revoke_all(a, ALICE, "user=bob").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tags_with(a, &t2).await.0, 401);
    eventually(10, "B refuses bob's earlier token", || async {
        tags_with(b, &t2).await.0 == 401
    })
    .await;
    let t3 = bearer_of(a, BOB.0, BOB.1).await;
    assert_eq!(tags_with(a, &t3).await.0, 404);
    assert_eq!(tags_with(b, &t3).await.0, 404);
    // One token by its jti (from the audit trail), by an administrator.
    let jti = r
        .audit(0)
        .into_iter()
        .rev()
        .find(|e| e["event.action"] == "token" && e["user.name"] == "bob")
        .and_then(|e| e["token.jti"].as_str().map(str::to_owned))
        .expect("the token event of t3");
    let resp = https(&b.ca_pem, false)
        .delete(format!("{}/auth/tokens/{jti}", b.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    eventually(10, "A refuses the token revoked by jti", || async {
        tags_with(a, &t3).await.0 == 401
    })
    .await;

    // A deleted robot's token stops working on every gateway.
    let secret = create_robot(a, "gone", &["pull"]).await;
    let rt = bearer_of(b, "robot$team-a+gone", &secret).await;
    assert_eq!(tags_with(a, &rt).await.0, 404);
    let resp = https(&a.ca_pem, false)
        .delete(format!("{}/admin/robots/robot$team-a+gone", a.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tags_with(a, &rt).await.0, 401);
    eventually(10, "B refuses the deleted robot's token", || async {
        tags_with(b, &rt).await.0 == 401
    })
    .await;

    // Audited, without the tokens themselves.
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let revokes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "token-revoke")
        .collect();
    let by = |outcome: &str, revoked_by: &str| {
        revokes
            .iter()
            .filter(|e| e["event.outcome"] == outcome && e["revoked_by"] == revoked_by)
            .count()
    };
    assert_eq!(by("success", "holder (RFC 7009)"), 1, "{revokes:?}");
    assert_eq!(by("success", "admin"), 2, "{revokes:?}");
    assert!(
        revokes
            .iter()
            .any(|e| e["event.outcome"] == "failure" && e["user.name"] == "bob"),
        "{revokes:?}"
    );
    let all = serde_json::to_string(&events).unwrap();
    for t in [&t1, &t2, &t3, &rt] {
        assert!(!all.contains(t.as_str()), "a token in the audit trail");
    }
    // Shared through Redis under the prefix, with a time to live.
    let ttl = r.redis.command("TTL ha:revoked:sub:user:bob").unwrap();
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!((300..=360).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_flow_started_on_one_gateway_finishes_on_the_other() {
    let idp_port = portcullis_tests::tools::free_port().unwrap();
    let oidc = format!(
        "[oidc]\nissuer = \"http://127.0.0.1:{idp_port}\"\nclient_id = \"portcullis\"\n\
         scopes = [\"openid\", \"profile\", \"groups\", \"offline_access\"]\n\
         groups_filter = \"^(team-|registry-)\"\n"
    );
    let r = Replicas::start_env(
        2,
        Redis::start().unwrap(),
        &oidc,
        &[(
            "PORTCULLIS_OIDC_CLIENT_SECRET",
            portcullis_tests::oidc::CLIENT_SECRET,
        )],
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    let clients = json!([{
        "client_id": "portcullis",
        "client_secret": portcullis_tests::oidc::CLIENT_SECRET,
        "redirect_uris": [format!("{}/auth/oidc/callback", a.base),
                          format!("{}/auth/oidc/callback", b.base)],
        "grant_types": ["authorization_code", "refresh_token",
                        "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"],
    }]);
    let users = json!({"bob": {"password": "bob-idp-pw", "groups": ["team-a"]}});
    let idp = portcullis_tests::oidc::Idp::start(idp_port, &clients, &users).unwrap();

    let resp = https(&a.ca_pem, false)
        .post(format!("{}/auth/oidc/device", a.base))
        .form(&[("client_id", "ha-test"), ("device", "build-box")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start: Value = resp.json().await.unwrap();
    let code = start["device_code"].as_str().unwrap().to_string();
    let poll = |g: &GatewayServer| {
        let g_base = g.base.clone();
        let ca = g.ca_pem.clone();
        let code = code.clone();
        async move {
            let r = https(&ca, false)
                .post(format!("{g_base}/token"))
                .form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", code.as_str()),
                    ("client_id", "ha-test"),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Pending on B before the user signs in (B knows the flow A started).
    let (status, v) = poll(b).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    portcullis_tests::oidc::device_login(
        &https(&a.ca_pem, false),
        &idp,
        start["user_code"].as_str().unwrap(),
        "bob",
        "bob-idp-pw",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, v) = loop {
        let (status, v) = poll(b).await;
        let waiting = v["error"] == "authorization_pending" || v["error"] == "slow_down";
        if !waiting {
            break (status, v);
        }
        assert!(
            Instant::now() < deadline,
            "the device flow never completed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status, 200, "{v}");
    portcullis_tests::remember_secret(v["refresh_token"].as_str().unwrap());
    let claims = portcullis_tests::client::jwt_claims(v["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["sub"], "bob");
    // Spent everywhere: A does not hand out a second session.
    let (status, v) = poll(a).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_fails_logins_clearly_while_issued_tokens_keep_working() {
    let mut r = Replicas::start(2, Redis::start_persistent().unwrap(), "");
    let (a, b) = (r.gateways[0].base.clone(), r.gateways[1].base.clone());
    let ca = r.gateways[0].ca_pem.clone();
    user_client(&r.gateways[1], BOB.0, BOB.1)
        .push_image("team-a/app", "v1", &[b"layer one"])
        .await
        .unwrap();
    let (refresh, v) = bobs_session(&r.gateways[0], Some("repository:team-a/app:pull")).await;
    let access = v["access_token"].as_str().unwrap().to_string();
    // A token revoked before the outage.
    let doomed = bearer_of(&r.gateways[0], BOB.0, BOB.1).await;
    let revoke = |base: String, token: String| {
        let http = https(&ca, false);
        async move {
            http.post(format!("{base}/auth/revoke"))
                .form(&[("token", token.as_str())])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(revoke(b.clone(), doomed.clone()).await, 200);
    for g in &r.gateways {
        eventually(10, "the revoked token refused", || async {
            tags_with(g, &doomed).await.0 == 401
        })
        .await;
    }

    // Pulls with the access token, alternating gateways, all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, ca, access) = (stop.clone(), ca.clone(), access.clone());
        let bases = [a.clone(), b.clone()];
        tokio::spawn(async move {
            let http = https(&ca, false);
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = http
                    .get(format!("{}/v2/team-a/app/manifests/v1", bases[i % 2]))
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .bearer_auth(&access)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (ok, failed)
        })
    };

    r.redis.stop();
    let http = https(&ca, false);
    for g in &r.gateways {
        let admin = g.admin.clone();
        eventually(10, "readiness reports Redis down", || {
            let admin = admin.clone();
            async move {
                let resp = reqwest::get(format!("{admin}/readyz")).await.unwrap();
                resp.status() == 503 && resp.text().await.unwrap().contains("redis")
            }
        })
        .await;
        let metrics = reqwest::get(format!("{}/metrics", g.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("gateway_state_store_up 0"), "{metrics}");
    }
    // Logins that need Redis: a clear 503, soon.
    let t = Instant::now();
    let (status, _, v) = basic_token(&r.gateways[0], BOB.0, BOB.1, "").await;
    assert_eq!(status, 503, "{v}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "ha-test"),
        ("service", SERVICE),
        ("scope", "repository:team-a/app:pull"),
    ];
    let (status, v) = token_form(&r.gateways[1], &grant).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (503, Some("temporarily_unavailable"))
    );
    let resp = http
        .get(format!("{b}/token?service={SERVICE}"))
        .basic_auth("<token>", Some(&refresh))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // Revocations: the ones made before stay in force (several failed reloads later); a new
    // one cannot be shared, so it is refused clearly.
    for g in &r.gateways {
        let failed_reloads = || async {
            let m = reqwest::get(format!("{}/metrics", g.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.lines()
                .find_map(|l| {
                    l.strip_prefix("gateway_revocation_reloads_total{outcome=\"failed\"} ")
                })
                .map_or(0, |v| v.trim().parse::<u64>().unwrap())
        };
        eventually(10, "two failed reloads of the revocation list", || async {
            failed_reloads().await >= 2
        })
        .await;
        assert_eq!(tags_with(g, &doomed).await.0, 401);
    }
    assert_eq!(revoke(a.clone(), access.clone()).await, 503);

    // Back: the gateways reconnect by themselves; the session survived (Redis persists).
    r.redis.start_again().unwrap();
    for g in &r.gateways {
        let admin = g.admin.clone();
        eventually(15, "readiness after Redis is back", || {
            let admin = admin.clone();
            async move {
                reqwest::get(format!("{admin}/readyz"))
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
        assert_eq!(basic_token(g, BOB.0, BOB.1, "").await.0, 200);
        let (status, v) = token_form(g, &grant).await;
        assert_eq!(status, 200, "{v}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "pulls failed while Redis was away: {failed:?}"
    );
    assert!(ok > 10, "{ok} pulls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_sentinel_the_gateways_follow_the_master_through_failovers() {
    let mut set = SentinelSet::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateways, _storages) = start_gateways(dir.path(), 2, 1, &set.state_table("ha:"), "", &[]);
    let (refresh, _) = bobs_session(&gateways[0], None).await;
    // On the replica before the master goes (replication is asynchronous).
    let acked = set.master.command("WAIT 1 5000").unwrap();
    assert_eq!(acked.trim(), ":1", "{acked}");

    // Refresh-token grants (a read and a write in Redis each) on both gateways, all along.
    let grant = |g: usize| {
        let g = &gateways[g];
        let refresh = refresh.clone();
        async move {
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", "ha-test"),
                ("service", SERVICE),
            ];
            token_form(g, &form).await.0
        }
    };
    for g in 0..2 {
        assert_eq!(grant(g).await, 200);
    }

    // kill -9 of the master: the sentinel promotes the replica; both gateways move to it by
    // themselves, and the session written before is there.
    let first = set.master.port;
    set.master.stop();
    let killed = Instant::now();
    eventually(30, "the sentinel promotes the replica", || async {
        set.master_port() == Some(set.replica.port)
    })
    .await;
    let promoted = killed.elapsed();
    for g in 0..2 {
        eventually(15, "grants work again after the failover", || async {
            grant(g).await == 200
        })
        .await;
    }
    let recovered = killed.elapsed();
    eprintln!("failover: promoted after {promoted:?}, both gateways serving after {recovered:?}");

    // The old master comes back and is made a replica; then a manual failover makes it the
    // master again while the gateways hold connections to the other (READONLY or dropped).
    set.master.start_again().unwrap();
    eventually(30, "the old master rejoins as a replica", || async {
        set.master.role().is_ok_and(|r| r == "slave")
            && set
                .master
                .command("INFO replication")
                .is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    for g in 0..2 {
        assert_eq!(
            grant(g).await,
            200,
            "writes go to the master, not the replica"
        );
    }
    let failover = set
        .sentinel(&format!(
            "SENTINEL FAILOVER {}",
            portcullis_tests::redis::SENTINEL_MASTER
        ))
        .unwrap();
    assert!(failover.starts_with("+OK"), "{failover}");
    eventually(30, "the manual failover", || async {
        set.master_port() == Some(first) && set.master.role().is_ok_and(|r| r == "master")
    })
    .await;
    let switched = Instant::now();
    for g in 0..2 {
        eventually(15, "grants work on the new master", || async {
            grant(g).await == 200
        })
        .await;
    }
    eprintln!(
        "manual failover: both gateways serving after {:?}",
        switched.elapsed()
    );
    // Every gateway wrote through the new master: the session's last use is there.
    for g in 0..2 {
        assert_eq!(grant(g).await, 200);
    }
    let on_master = set.master.command("DBSIZE").unwrap();
    assert_ne!(on_master.trim(), ":0", "{on_master}");
}

/// Waits until at least `margin` seconds are left in the current minute (rate-limit windows
/// are calendar minutes), so a count is not split across two windows.
async fn inside_one_minute(margin: u64) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if 60 - now % 60 >= margin {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_count_requests_on_every_gateway() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        "[limits]\nregistry_per_minute_per_user = 20\ntoken_per_minute_per_user = 5\n",
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    user_client(a, BOB.0, BOB.1)
        .push_image("team-a/app", "v1", &[b"layer"])
        .await
        .unwrap();
    let (status, _, v) = basic_token(b, BOB.0, BOB.1, "repository:team-a/app:pull").await;
    assert_eq!(status, 200);
    let token = v["token"].as_str().unwrap().to_string();

    inside_one_minute(30).await;
    // The window may hold the push's requests: count up to the first refusal from here.
    let http = https(&a.ca_pem, false);
    let mut served = 0;
    let refused = loop {
        let g = &r.gateways[served % 2];
        let resp = http
            .get(format!("{}/v2/team-a/app/tags/list", g.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if resp.status() != 200 {
            break resp;
        }
        served += 1;
        assert!(served <= 20, "no limit after {served} requests");
    };
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    // The other gateway refuses too; another identity is not limited.
    let resp = http
        .get(format!("{}/v2/team-a/app/tags/list", b.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let (status, _, v) = basic_token(a, ALICE.0, ALICE.1, "repository:team-a/app:pull").await;
    assert_eq!(status, 200);
    let resp = http
        .get(format!("{}/v2/team-a/app/tags/list", b.base))
        .bearer_auth(v["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The token endpoint: 5 a minute for alice (one used above), spread over both gateways.
    let mut granted = 1;
    let (status, retry) = loop {
        let (status, retry, _) = basic_token(&r.gateways[granted % 2], ALICE.0, ALICE.1, "").await;
        if status != 200 {
            break (status, retry);
        }
        granted += 1;
        assert!(granted <= 5, "no token limit after {granted}");
    };
    assert_eq!((status, granted), (429, 5));
    assert!(retry.is_some());
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let limited: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "rate-limit")
        .collect();
    assert_eq!(limited.len(), 1, "audited once per window: {limited:?}");
    assert_eq!(limited[0]["user.name"], "alice");
    assert_eq!(limited[0]["limit.endpoint"], "token");
    let registry_refusals = events
        .iter()
        .filter(|e| e["event.reason"] == "rate limited (user)")
        .count();
    assert!(registry_refusals >= 2, "{registry_refusals}");
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A one-layer image in skopeo's `dir:` format with a layer unique to `n`; the manifest's
/// digest.
fn dir_image(dir: &std::path::Path, n: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let mut layer = vec![0u8; 64 * 1024];
    for (i, b) in layer.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ n.wrapping_mul(7919)) as u8;
    }
    layer[..8].copy_from_slice(&(n as u64).to_le_bytes());
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"n\":{n}}}").into_bytes();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha256_hex(&layer)), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    std::fs::write(dir.join(sha256_hex(&config)), &config).unwrap();
    std::fs::write(dir.join(sha256_hex(&layer)), &layer).unwrap();
    std::fs::write(dir.join("manifest.json"), &manifest).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    format!("sha256:{}", sha256_hex(&manifest))
}

/// Pulls `repo:v1` through `base` and checks every digest; `Err` says what went wrong.
async fn pull_and_verify(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    repo: &str,
    digest: &str,
) -> Result<(), String> {
    // GETs `path` and checks its body against `digest`.
    let fetch = |path: String, digest: String| async move {
        let r = http
            .get(format!("{base}{path}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != 200 {
            return Err(format!("{path}: {}", r.status()));
        }
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        if format!("sha256:{}", sha256_hex(&body)) != digest {
            return Err(format!("{path}: the content does not match its digest"));
        }
        Ok(body)
    };
    let body = fetch(format!("/v2/{repo}/manifests/v1"), digest.to_string()).await?;
    let m: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let blobs = m["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&m["config"]));
    for b in blobs {
        let d = b["digest"].as_str().unwrap_or_default();
        fetch(format!("/v2/{repo}/blobs/{d}"), d.to_string()).await?;
    }
    Ok(())
}

/// Requests with `method` counted by a storage node's metrics.
async fn storage_requests(node: &StorageServer, method: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", node.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("storage_http_requests_total{")
                && l.contains(&format!("method=\"{method}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A client of the gateway at `base` whose connections come from `source` (any 127/8
/// address is this machine).
fn client_from(source: &str, ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn token_via(http: &reqwest::Client, base: &str, user: &str, password: &str) -> u16 {
    http.get(format!("{base}/token?service={SERVICE}"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_the_client_address_comes_from_the_proxy_protocol() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        &format!("{TRUST_PROXY}[limits]\nsource_failures = 3\nuser_failures = 0\n"),
    );
    let backends: Vec<Backend> = r.gateways.iter().map(|g| Backend::of(g).unwrap()).collect();
    let lb = Haproxy::start(&backends, 200).unwrap();
    let lb_base = format!("https://{}", lb.host);
    let ca = r.gateways[0].ca_pem.clone();
    let (alice_pc, attacker) = (client_from("127.0.0.2", &ca), client_from("127.0.0.3", &ca));

    // Through the load balancer, each gateway sees the client's own address.
    for _ in 0..2 {
        assert_eq!(token_via(&alice_pc, &lb_base, ALICE.0, ALICE.1).await, 200);
    }
    // Failed logins from one address behind the load balancer lock out that address, on
    // both gateways, and no one else behind the same load balancer.
    for i in 0..3 {
        let status = token_via(&attacker, &lb_base, &format!("user{i}"), "guess").await;
        assert_eq!(status, 401);
    }
    for _ in 0..2 {
        assert_eq!(token_via(&attacker, &lb_base, BOB.0, BOB.1).await, 429);
        assert_eq!(token_via(&alice_pc, &lb_base, ALICE.0, ALICE.1).await, 200);
    }

    // A direct client that is not a trusted proxy cannot claim an address: its header is
    // not read, so its TLS handshake fails.
    let gw = &r.gateways[0];
    let addr: std::net::SocketAddr = gw.host.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
    let mut forged = socket.connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    forged
        .write_all(b"PROXY TCP4 203.0.113.66 127.0.0.1 1234 443\r\nnot a TLS hello")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), forged.read(&mut buf))
        .await
        .expect("the gateway closes the connection")
        .unwrap_or(0);
    assert!(
        n == 0 || buf[0] == 0x15,
        "a TLS alert or nothing: {:?}",
        &buf[..n]
    );
    // Directly, that client is itself; so is the trusted proxy's host without a header.
    let direct = client_from("127.0.0.4", &ca);
    assert_eq!(token_via(&direct, &gw.base, ALICE.0, ALICE.1).await, 200);
    assert_eq!(
        token_via(&https(&ca, false), &gw.base, ALICE.0, ALICE.1).await,
        200
    );

    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let logins_from = |ip: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| {
                matches!(e["event.action"].as_str(), Some("login" | "token"))
                    && e["source.ip"] == ip
                    && e["event.outcome"] == outcome
            })
            .count()
    };
    assert!(logins_from("127.0.0.2", "success") >= 4, "{events:?}");
    assert_eq!(logins_from("127.0.0.2", "failure"), 0);
    assert!(logins_from("127.0.0.3", "failure") >= 5, "{events:?}");
    assert!(logins_from("127.0.0.4", "success") >= 1);
    assert!(logins_from("127.0.0.1", "success") >= 1);
    let lockout = events
        .iter()
        .find(|e| e["event.action"] == "login-lockout")
        .expect("a lockout event");
    assert_eq!(lockout["lockout.by"], "source");
    assert_eq!(lockout["source.ip"], "127.0.0.3");
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains("203.0.113.66")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_uploads_move_between_nodes_and_kill_9_loses_nothing() {
    let mut r = Replicas::start_full(2, 2, Redis::start().unwrap(), TRUST_PROXY, &[]);
    let backends: Vec<Backend> = r.gateways.iter().map(|g| Backend::of(g).unwrap()).collect();
    let lb = Haproxy::start(&backends, 200).unwrap();
    let base = format!("https://{}", lb.host);
    let ca = r.gateways[0].ca_pem.clone();
    // A new connection (so a new pick of gateway by HAProxy) for every request.
    let fresh = || {
        let cert = reqwest::Certificate::from_pem(&ca).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(cert)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };

    // A chunked upload whose PATCHes alternate between the two storage nodes.
    let secret = (
        "portcullis-internal-secret",
        portcullis_tests::deployment::SECRET,
    );
    let nodes = [r.storages[0].base.clone(), r.storages[1].base.clone()];
    let plain = reqwest::Client::new();
    let data: Vec<u8> = (0..(3 * 1024 * 1024 + 777))
        .map(|i| (i % 251) as u8)
        .collect();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let resp = plain
        .post(format!("{}/v2/team-a/chunked/blobs/uploads/", nodes[0]))
        .header(secret.0, secret.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let mut loc = resp.headers()["location"].to_str().unwrap().to_string();
    let mut offset = 0;
    for (i, part) in data.chunks(1024 * 1024).enumerate() {
        let resp = plain
            .patch(format!("{}{loc}", nodes[(i + 1) % 2]))
            .header(secret.0, secret.1)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{offset}-{}", offset + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "PATCH {i} on node {}", (i + 1) % 2);
        loc = resp.headers()["location"].to_str().unwrap().to_string();
        offset += part.len();
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = plain
        .put(format!("{}{loc}{sep}digest={digest}", nodes[0]))
        .header(secret.0, secret.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    for n in &nodes {
        let body = plain
            .get(format!("{n}/v2/team-a/chunked/blobs/{digest}"))
            .header(secret.0, secret.1)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(body == data, "the blob from {n}");
    }

    // The same through HAProxy, every request on a new connection: the gateways pass the
    // PATCHes to both nodes in turn.
    let patches = [
        storage_requests(&r.storages[0], "PATCH").await,
        storage_requests(&r.storages[1], "PATCH").await,
    ];
    let mut c = Client::with_http(&base, fresh());
    c.auth = Some(TokenAuth::new(&format!("{base}/token"), SERVICE, Some(BOB)));
    let pushed = c
        .push_blob_chunked("team-a/via-lb", &data, 512 * 1024)
        .await
        .unwrap();
    assert_eq!(pushed.to_string(), digest);
    for (i, before) in patches.iter().enumerate() {
        let after = storage_requests(&r.storages[i], "PATCH").await;
        assert!(
            after >= before + 2,
            "node {i} served {} PATCHes",
            after - before
        );
    }

    // Pushes (skopeo) and pulls (verified) through HAProxy while a storage node and then a
    // gateway are killed with -9 and restarted.
    let ctr = portcullis_tests::tools::Containers::new().unwrap();
    let certs = portcullis_tests::tools::cert_dir(&ctr, &ca).unwrap();
    ctr.login("skopeo", &certs, &lb.host, BOB.0, BOB.1).unwrap();
    let ctr = Arc::new(ctr);
    let acknowledged: Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let push_one = {
        let (ctr, certs, host) = (ctr.clone(), certs.clone(), lb.host.clone());
        move |n: usize| -> Result<(String, String), String> {
            let src = ctr.dir.path().join(format!("img{n}"));
            let digest = dir_image(&src, n);
            let repo = format!("team-a/ha-{n}");
            ctr.run(
                "skopeo",
                &[
                    "copy",
                    "-q",
                    "--preserve-digests",
                    "--retry-times",
                    "0",
                    "--dest-cert-dir",
                    &certs,
                    &format!("dir:{}", src.display()),
                    &format!("docker://{host}/{repo}:v1"),
                ],
            )
            .map_err(|e| e.to_string())?;
            Ok((repo, digest))
        }
    };
    for n in 0..3 {
        let done = push_one(n).unwrap();
        acknowledged.lock().unwrap().push(done);
    }
    let (status, _, v) =
        basic_token(&r.gateways[0], BOB.0, BOB.1, "repository:team-a/*:pull").await;
    assert_eq!(status, 200, "{v}");
    // Pull tokens per repository (the scope names each one), through HAProxy too.
    let token_for = {
        let (base, http) = (base.clone(), fresh());
        move |repo: String| {
            let (base, http) = (base.clone(), http.clone());
            async move {
                let r = http
                    .get(format!(
                        "{base}/token?service={SERVICE}&scope=repository:{repo}:pull"
                    ))
                    .basic_auth(BOB.0, Some(BOB.1))
                    .send()
                    .await
                    .map_err(|e| format!("token: {e}"))?;
                let v: Value = r.json().await.map_err(|e| format!("token: {e}"))?;
                v["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("token: {v}"))
            }
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pulls = {
        let (stop, acknowledged, base) = (stop.clone(), acknowledged.clone(), base.clone());
        let http = fresh();
        let token_for = token_for.clone();
        tokio::spawn(async move {
            let mut tokens = std::collections::HashMap::new();
            let mut log: Vec<(Instant, Result<(), String>)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (repo, digest) = {
                    let a = acknowledged.lock().unwrap();
                    a[i % a.len()].clone()
                };
                if !tokens.contains_key(&repo) {
                    match token_for(repo.clone()).await {
                        Ok(t) => {
                            tokens.insert(repo.clone(), t);
                        }
                        Err(e) => {
                            log.push((Instant::now(), Err(e)));
                            continue;
                        }
                    }
                }
                let res = pull_and_verify(&http, &base, &tokens[&repo], &repo, &digest).await;
                log.push((Instant::now(), res));
                i += 1;
            }
            log
        })
    };
    let pushes = {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            let mut n = 3;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match push_one(n) {
                    Ok(done) => acknowledged.lock().unwrap().push(done),
                    Err(e) => failed.push((Instant::now(), e)),
                }
                n += 1;
            }
            (n - 3, failed)
        })
    };
    let settle = |n: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            let target = acknowledged.lock().unwrap().len() + n;
            eventually(60, "pushes go on", || async {
                acknowledged.lock().unwrap().len() >= target
            })
            .await;
        }
    };
    settle(3).await;
    let storage_killed = Instant::now();
    r.storages[0].kill9();
    settle(2).await;
    r.storages[0].crash_and_restart().unwrap();
    settle(2).await;
    let gateway_killed = Instant::now();
    r.kill_gateway(0);
    settle(2).await;
    r.start_gateway_again(0);
    settle(2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = pulls.await.unwrap();
    let (attempted, push_failures) = pushes.join().unwrap();

    // A failure is allowed only in the health-check interval after a kill (with margin for
    // this shared machine): in-flight requests and the first picks of the dead process.
    let grace = Duration::from_millis(1500);
    let excused = |t: Instant| {
        [storage_killed, gateway_killed]
            .iter()
            .any(|k| t >= *k && t <= *k + grace)
    };
    let late: Vec<_> = log
        .iter()
        .filter(|(t, res)| res.is_err() && !excused(*t))
        .collect();
    assert!(
        late.is_empty(),
        "pulls failed after the health-check interval: {late:?}"
    );
    assert!(log.len() > 20, "only {} pulls", log.len());
    let failed_pulls: Vec<&String> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    // Every acknowledged push is there, digests verified, on every gateway and both nodes.
    let all = acknowledged.lock().unwrap().clone();
    for (repo, digest) in &all {
        let token = token_for(repo.clone()).await.unwrap();
        for via in [&base, &r.gateways[0].base, &r.gateways[1].base] {
            pull_and_verify(&fresh(), via, &token, repo, digest)
                .await
                .unwrap_or_else(|e| panic!("{repo} via {via}: {e}"));
        }
    }
    println!(
        "{} pulls ({} failed inside a kill's interval: {failed_pulls:?}), {attempted} pushes \
         attempted, {} acknowledged and verified, {} failed: {push_failures:?}",
        log.len(),
        failed_pulls.len(),
        all.len() - 3,
        push_failures.len()
    );
}
