//! The Redis state store, shared by several gateway replicas.
//!
//! One Redis master reached through the `redis` crate's connection manager, which reconnects
//! by itself: either at a fixed address (`url`: a standalone Redis, or a managed endpoint that
//! fails over behind one address) or found through Redis Sentinel (`sentinels`). With
//! Sentinel, a command that loses its connection or meets `READONLY` (the old master came back
//! as a replica) asks the sentinels for the master again, switches to a new manager and is
//! sent once more; one task at a time asks, at most every [`RESOLVE_EVERY`], and the others
//! take its answer. Cluster is not supported: every multi-key step (`scan`) would have to be
//! redone per shard.
//!
//! Every key is `prefix + key`. Entries with a time to live use `SET … PX`; durable entries
//! (robot accounts) have none, so Redis must persist its data (AOF or RDB) for them to outlive
//! a Redis restart. The racing steps are single commands: `GETDEL` (take), `SET … XX` (replace)
//! and one Lua script that increments and sets the window's expiry on the first count (incr).
//!
//! Commands run on the caller's runtime through the multiplexed connection; one that gets no
//! answer (or no connection) within `timeout_ms` fails with [`StateError`] instead of holding
//! a request.

use super::{StateError, StateStore};
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The environment variable with Redis's password when `password_file` is unset.
pub const PASSWORD_ENV: &str = "PORTCULLIS_REDIS_PASSWORD";

/// `[state.redis]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Put the password in `password_file` (or the environment),
    /// not here, so that the configuration is not a secret. Either this or `sentinels`.
    #[serde(default)]
    pub url: Option<String>,
    /// Redis Sentinel addresses (`host:port`), asked for the master of `sentinel_master`.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    #[serde(default = "default_master")]
    pub sentinel_master: String,
    /// A file with the sentinels' own password (`requirepass` of the sentinels), if any.
    #[serde(default)]
    pub sentinel_password_file: Option<std::path::PathBuf>,
    /// The database number with `sentinels` (with `url` it is the URL's path).
    #[serde(default)]
    pub db: i64,
    /// The ACL user, if not `default`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password. Unset: `PORTCULLIS_REDIS_PASSWORD`, if set.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Put before every key, so that several registries (or other applications) can share
    /// one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long one command (or one connection attempt) may take before it fails.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_master() -> String {
    "portcullis".into()
}

fn default_prefix() -> String {
    "portcullis:".into()
}

fn default_timeout() -> u64 {
    1000
}

/// Increments `KEYS[1]`; the first count sets the window's expiry (`ARGV[1]` ms).
const INCR_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// [`StateStore::append`]: the log's counter and its new entry, in one step.
const APPEND_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('SET', ARGV[1] .. string.format('%020d', n), ARGV[2])
return n
";

/// How often, at most, the sentinels are asked for the master.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(200);

/// The connection in use, and how many times it was replaced (so that of the tasks that saw
/// it fail, only the first asks the sentinels).
struct Current {
    generation: u64,
    conn: Option<ConnectionManager>,
}

/// Finds the master through the sentinels.
struct Resolver {
    client: redis::sentinel::SentinelClient,
    asked_at: Option<Instant>,
}

pub struct RedisStore {
    current: RwLock<Current>,
    sentinel: Option<Arc<tokio::sync::Mutex<Resolver>>>,
    config: ConnectionManagerConfig,
    timeout: Duration,
    prefix: String,
    incr: redis::Script,
    append: redis::Script,
    /// Whether Redis's eviction policy was looked at (once, at the first good `PING`).
    policy_checked: std::sync::atomic::AtomicBool,
    /// Where connection managers are made and sentinels asked (the manager spawns a task when
    /// made, and the gateway opens the store before any runtime runs); shut down without
    /// waiting on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Whether `e` means the master is gone or is no longer the master: worth asking the
/// sentinels again. Other server errors are the command's own.
fn master_lost(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => true,
        ErrorKind::Server(_) | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => false,
        _ => true,
    }
}

impl RedisStore {
    /// A store that connects on first use (and again whenever the connection drops).
    pub fn open(cfg: &RedisConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let password = match &cfg.password_file {
            Some(f) => Some(service::secrets::read_secret_file(f)?),
            None => std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()),
        };
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("redis-store")
            .enable_all()
            .build()
            .context("starting the Redis store's runtime")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Down is reported at once; the next command tries to connect again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let (conn, sentinel) = match (&cfg.url, cfg.sentinels.is_empty()) {
            (Some(url), true) => {
                let mut info = url
                    .as_str()
                    .into_connection_info()
                    .context("state.redis.url is not a Redis URL")?;
                let mut settings = info.redis_settings().clone();
                if let Some(user) = &cfg.username {
                    settings = settings.set_username(user);
                }
                if let Some(p) = password {
                    settings = settings.set_password(p);
                }
                info = info.set_redis_settings(settings);
                let client = redis::Client::open(info).context("state.redis")?;
                let _in = runtime.enter();
                let conn = ConnectionManager::new_lazy_with_config(client, config.clone())
                    .context("state.redis")?;
                (Some(conn), None)
            }
            (None, false) => {
                let mut addrs = Vec::new();
                for s in &cfg.sentinels {
                    let (host, port) = s
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                        .with_context(|| {
                            format!("state.redis.sentinels: {s:?} is not host:port")
                        })?;
                    addrs.push(redis::ConnectionAddr::Tcp(
                        host.trim_matches(['[', ']']).to_string(),
                        port,
                    ));
                }
                let mut b = redis::sentinel::SentinelClientBuilder::new(
                    addrs,
                    &cfg.sentinel_master,
                    redis::sentinel::SentinelServerType::Master,
                )
                .context("state.redis.sentinels")?
                .set_client_to_redis_db(cfg.db);
                if let Some(user) = &cfg.username {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(p) = password {
                    b = b.set_client_to_redis_password(p);
                }
                if let Some(f) = &cfg.sentinel_password_file {
                    b = b.set_client_to_sentinel_password(service::secrets::read_secret_file(f)?);
                }
                let client = b.build().context("state.redis.sentinels")?;
                let resolver = Resolver {
                    client,
                    asked_at: None,
                };
                (None, Some(Arc::new(tokio::sync::Mutex::new(resolver))))
            }
            _ => anyhow::bail!("[state.redis] needs either url or sentinels, not both"),
        };
        Ok(RedisStore {
            current: RwLock::new(Current {
                generation: 0,
                conn,
            }),
            sentinel,
            config,
            timeout,
            prefix: cfg.prefix.clone(),
            incr: redis::Script::new(INCR_SCRIPT),
            append: redis::Script::new(APPEND_SCRIPT),
            policy_checked: Default::default(),
            runtime: Some(runtime),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn current(&self) -> (u64, Option<ConnectionManager>) {
        match self.current.read() {
            Ok(c) => (c.generation, c.conn.clone()),
            Err(_) => (0, None),
        }
    }

    /// A connection to the master the sentinels name now, unless another task replaced the
    /// one of `seen` generation already (then that one). Bounded by three command timeouts,
    /// waiting included.
    async fn resolve(&self, seen: u64) -> Result<ConnectionManager, StateError> {
        match tokio::time::timeout(self.timeout * 3, self.ask_sentinels(seen)).await {
            Ok(r) => r,
            Err(_) => Err(StateError("redis sentinel: no master found in time".into())),
        }
    }

    async fn ask_sentinels(&self, seen: u64) -> Result<ConnectionManager, StateError> {
        let (Some(sentinel), Some(runtime)) = (&self.sentinel, &self.runtime) else {
            return Err(StateError("redis: no connection".into()));
        };
        let mut resolver = sentinel.clone().lock_owned().await;
        if let (generation, Some(conn)) = self.current()
            && generation != seen
        {
            return Ok(conn);
        }
        if resolver
            .asked_at
            .is_some_and(|t| t.elapsed() < RESOLVE_EVERY)
        {
            return Err(StateError(
                "redis: the master is unreachable (the sentinels were asked a moment ago)".into(),
            ));
        }
        resolver.asked_at = Some(Instant::now());
        // Asked and connected on the store's runtime, where the connections' tasks live on;
        // the lock goes with the task, so a task given up on still keeps others waiting.
        let config = self.config.clone();
        let conn = runtime
            .spawn(async move {
                let master = resolver.client.async_get_client().await?;
                ConnectionManager::new_with_config(master, config).await
            })
            .await
            .map_err(|e| StateError(format!("redis sentinel: {e}")))?
            .map_err(|e| StateError(format!("redis sentinel: {e}")))?;
        if let Ok(mut c) = self.current.write() {
            c.generation += 1;
            c.conn = Some(conn.clone());
        }
        tracing::info!("redis: connected to the master the sentinels name");
        Ok(conn)
    }

    /// Runs `f` with a connection, on the caller's runtime (the manager's connection and
    /// response timeouts bound it). With Sentinel, a lost master is looked up again and `f`
    /// runs once more on the new one.
    async fn exec<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let fail = |e: redis::RedisError| StateError(format!("redis: {e}"));
        let (seen, conn) = self.current();
        let conn = match conn {
            Some(c) => c,
            None => self.resolve(seen).await?,
        };
        match f(conn).await {
            Err(e) if self.sentinel.is_some() && master_lost(&e) => {
                let conn = self.resolve(seen).await.map_err(|r| {
                    StateError(format!("redis: {e}; looking up the master: {}", r.0))
                })?;
                f(conn).await.map_err(fail)
            }
            r => r.map_err(fail),
        }
    }

    async fn cmd<T>(&self, cmd: redis::Cmd) -> Result<T, StateError>
    where
        T: redis::FromRedisValue,
    {
        self.exec(|mut c| {
            let cmd = cmd.clone();
            async move { cmd.query_async::<T>(&mut c).await }
        })
        .await
    }
}

impl RedisStore {
    /// Redis's `maxmemory-policy`, if it may be read (managed services often rename `CONFIG`).
    pub async fn eviction_policy(&self) -> Result<String, StateError> {
        let v: Vec<String> = self
            .cmd(
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory-policy")
                    .clone(),
            )
            .await?;
        v.get(1)
            .cloned()
            .ok_or_else(|| StateError("CONFIG GET maxmemory-policy answered nothing".into()))
    }

    /// Warns when Redis may evict keys to make room: every policy but `noeviction` may take
    /// a session, a revocation or a lockout (they all have a time to live) to store a login
    /// flow an anonymous client started. With `noeviction` a full Redis refuses writes, and
    /// the gateway refuses what needed them.
    async fn check_eviction_policy(&self) {
        match self.eviction_policy().await {
            Ok(p) if p == "noeviction" => {}
            Ok(p) => tracing::warn!(
                policy = %p,
                "Redis may evict keys under memory pressure (maxmemory-policy {p}): sessions, \
                 revocations and lockouts could go to make room for anonymous login flows; \
                 set maxmemory-policy noeviction"
            ),
            Err(e) => {
                tracing::info!(error = %e, "could not read Redis's maxmemory-policy; it must be noeviction")
            }
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn millis(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

/// `prefix` with the glob characters of `SCAN … MATCH` escaped, then `*`.
fn glob(prefix: &str) -> String {
    let mut g = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            g.push('\\');
        }
        g.push(c);
    }
    g.push('*');
    g
}

#[async_trait::async_trait]
impl StateStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.cmd(redis::cmd("GET").arg(self.key(key)).clone()).await
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StateError> {
        let mut c = redis::cmd("SET");
        c.arg(self.key(key)).arg(value).arg("PX").arg(millis(ttl));
        self.cmd::<()>(c).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateError> {
        let mut c = redis::cmd("SET");
        c.arg(self.key(key)).arg(value);
        self.cmd::<()>(c).await
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        self.cmd::<()>(redis::cmd("DEL").arg(self.key(key)).clone())
            .await
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let pattern = glob(&self.key(prefix));
        let strip = self.prefix.len();
        self.exec(|mut c| {
            let pattern = pattern.clone();
            async move {
                let mut out = Vec::new();
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await?;
                    if !keys.is_empty() {
                        let values: Vec<Option<Vec<u8>>> =
                            redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
                        // A key that expired between SCAN and MGET is simply not listed.
                        out.extend(
                            keys.into_iter()
                                .zip(values)
                                .filter_map(|(k, v)| Some((k[strip..].to_string(), v?))),
                        );
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
                // SCAN may return a key twice.
                out.sort_by(|a, b| a.0.cmp(&b.0));
                out.dedup_by(|a, b| a.0 == b.0);
                Ok(out)
            }
        })
        .await
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.cmd(redis::cmd("GETDEL").arg(self.key(key)).clone())
            .await
    }

    async fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<bool, StateError> {
        let mut c = redis::cmd("SET");
        c.arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .arg("XX");
        let done: Option<String> = self.cmd(c).await?;
        Ok(done.is_some())
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        let script = self.incr.clone();
        let key = self.key(key);
        let ms = millis(ttl);
        self.exec(|mut c| {
            let (script, key) = (script.clone(), key.clone());
            async move { script.key(key).arg(ms).invoke_async::<u64>(&mut c).await }
        })
        .await
    }

    async fn append(&self, prefix: &str, value: Vec<u8>) -> Result<u64, StateError> {
        let script = self.append.clone();
        let (seq, log) = (self.key(&format!("{prefix}seq")), self.key(prefix));
        self.exec(|mut c| {
            let (script, seq, log, value) =
                (script.clone(), seq.clone(), log.clone(), value.clone());
            async move {
                script
                    .key(seq)
                    .arg(log)
                    .arg(value)
                    .invoke_async::<u64>(&mut c)
                    .await
            }
        })
        .await
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = redis::cmd("MGET");
        for k in keys {
            c.arg(self.key(k));
        }
        self.cmd(c).await
    }

    async fn ping(&self) -> Result<(), StateError> {
        let pong: String = self.cmd(redis::cmd("PING")).await?;
        if pong == "PONG" {
            if !self
                .policy_checked
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                self.check_eviction_policy().await;
            }
            Ok(())
        } else {
            Err(StateError(format!("redis answered PING with {pong:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(glob("p:robot:"), "p:robot:*");
        assert_eq!(glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\*");
    }

    #[test]
    fn a_password_in_the_configuration_is_not_printed() {
        let cfg: RedisConfig = toml::from_str("url = \"redis://127.0.0.1:1/0\"").unwrap();
        assert_eq!(cfg.prefix, "portcullis:");
        assert!(RedisStore::open(&cfg).is_ok());
        let bad = RedisConfig {
            url: Some("http://user:hunter2@x".into()),
            ..cfg.clone()
        };
        let err = format!("{:#}", RedisStore::open(&bad).err().unwrap());
        assert!(!err.contains("hunter2"), "{err}");
        let both = RedisConfig {
            sentinels: vec!["127.0.0.1:26379".into()],
            ..cfg.clone()
        };
        assert!(RedisStore::open(&both).is_err(), "url and sentinels");
        let sentinel: RedisConfig =
            toml::from_str("sentinels = [\"127.0.0.1:1\", \"[::1]:2\"]").unwrap();
        assert_eq!(sentinel.sentinel_master, "portcullis");
        assert!(RedisStore::open(&sentinel).is_ok());
        let bad: RedisConfig = toml::from_str("sentinels = [\"127.0.0.1\"]").unwrap();
        assert!(RedisStore::open(&bad).is_err(), "no port");
    }
}
