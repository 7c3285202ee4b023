//! The Redis state store, shared by several gateway replicas.
//!
//! One standalone Redis (or a managed endpoint that fails over behind one address) reached
//! through the `redis` crate's connection manager, which reconnects by itself. Sentinel and
//! Cluster are not supported: the crate's Sentinel client has no reconnecting manager, and
//! Cluster would need every multi-key step (`scan`) to be redone per shard.
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
use std::time::Duration;

/// The environment variable with Redis's password when `password_file` is unset.
pub const PASSWORD_ENV: &str = "PORTCULLIS_REDIS_PASSWORD";

/// `[state.redis]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Put the password in `password_file` (or the environment),
    /// not here, so that the configuration is not a secret.
    pub url: String,
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

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    incr: redis::Script,
    /// Where the connection manager was made (it spawns a task when made, and the gateway
    /// opens the store before any runtime runs); shut down without waiting on drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl RedisStore {
    /// A store that connects on first use (and again whenever the connection drops).
    pub fn open(cfg: &RedisConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .context("state.redis.url is not a Redis URL")?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &cfg.username {
            settings = settings.set_username(user);
        }
        let password = match &cfg.password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            None => std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()),
        };
        if let Some(p) = password {
            settings = settings.set_password(p);
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).context("state.redis")?;
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
        let conn = {
            let _in = runtime.enter();
            ConnectionManager::new_lazy_with_config(client, config).context("state.redis")?
        };
        Ok(RedisStore {
            conn,
            prefix: cfg.prefix.clone(),
            incr: redis::Script::new(INCR_SCRIPT),
            runtime: Some(runtime),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `f` with a connection, on the caller's runtime (the manager's connection and
    /// response timeouts bound it).
    async fn exec<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        f(self.conn.clone())
            .await
            .map_err(|e| StateError(format!("redis: {e}")))
    }

    async fn cmd<T>(&self, cmd: redis::Cmd) -> Result<T, StateError>
    where
        T: redis::FromRedisValue,
    {
        self.exec(move |mut c| async move { cmd.query_async::<T>(&mut c).await })
            .await
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
        self.exec(move |mut c| async move {
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
        self.exec(
            move |mut c| async move { script.key(key).arg(ms).invoke_async::<u64>(&mut c).await },
        )
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
            url: "http://user:hunter2@x".into(),
            ..cfg
        };
        let err = format!("{:#}", RedisStore::open(&bad).err().unwrap());
        assert!(!err.contains("hunter2"), "{err}");
    }
}
