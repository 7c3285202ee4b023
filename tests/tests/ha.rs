//! Load-balanced deployment: the shared state store (memory and a real `redis-server`),
//! several gateways sharing Redis, lockouts and rate limits across replicas, and Redis going
//! away and coming back. `cargo test --release --test ha` runs exactly these.

use gateway::state::{MemoryStore, StateStore};
use portcullis_tests::client::{Client, TokenAuth, https};
use portcullis_tests::deployment::{SERVICE, start_gateway_with, storage_node};
use portcullis_tests::redis::Redis;
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

fn redis_store(redis: &Redis, prefix: &str) -> Arc<dyn StateStore> {
    let cfg = gateway::state::redis::RedisConfig {
        url: redis.url.clone(),
        username: None,
        password_file: None,
        prefix: prefix.into(),
        timeout_ms: 1000,
    };
    Arc::new(gateway::state::redis::RedisStore::open(&cfg).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_store_suite_passes_on_memory_and_on_redis() {
    state_store_suite(Arc::new(MemoryStore::default()), "memory").await;
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

/// Gateways sharing one Redis (and one signing key, one storage node), each with its own
/// audit file.
struct Replicas {
    gateways: Vec<GatewayServer>,
    redis: Redis,
    _storage: StorageServer,
    dir: tempfile::TempDir,
}

impl Replicas {
    fn start(n: usize, redis: Redis, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage_node(&dir.path().join("storage")).unwrap();
        let key = gateway::token::keys::generate_pem().unwrap();
        let gateways = (0..n)
            .map(|i| {
                let d = dir.path().join(format!("gw{i}"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("key.pem"), &key).unwrap();
                let table = format!(
                    "{}[audit]\nfile = \"{}/audit.jsonl\"\nstdout = true\n{extra}",
                    redis.state_table("ha:"),
                    d.display()
                );
                start_gateway_with(&d, &[&storage], &[BOB, ALICE], 4, &table, &[]).unwrap()
            })
            .collect();
        Replicas {
            gateways,
            redis,
            _storage: storage,
            dir,
        }
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

fn client(g: &GatewayServer, user: &str, password: &str) -> Client {
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        SERVICE,
        Some((user, password)),
    ));
    c
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
    let (status, v) = token_form(
        a,
        &[
            ("grant_type", "password"),
            ("username", BOB.0),
            ("password", BOB.1),
            ("client_id", "ha-test"),
            ("access_type", "offline"),
            ("service", SERVICE),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&refresh);
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
    let resp = https(&a.ca_pem, false)
        .post(format!("{}/admin/robots", a.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .json(&json!({
            "project": "team-a", "name": "ci",
            "scope": [{"repositories": ["team-a/**"], "actions": ["pull", "push"]}],
            "expires_in_seconds": 3600,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let robot: Value = resp.json().await.unwrap();
    let secret = robot["secret"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&secret);
    let (status, _, v) =
        basic_token(b, "robot$team-a+ci", &secret, "repository:team-a/x:push").await;
    assert_eq!(status, 200, "{v}");
    client(a, "robot$team-a+ci", &secret)
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
