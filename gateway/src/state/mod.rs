//! The shared state store: small values, most with a time to live, that every gateway replica
//! must see — sessions (refresh tokens), OIDC flow state, robot accounts, the LDAP login cache,
//! failed-login counters and rate-limit windows. [`MemoryStore`] is the embedded default (one
//! gateway); [`redis::RedisStore`] is shared by several. Both pass the same suite
//! (`tests/tests/ha.rs`), and the operations that race between replicas are single atomic
//! steps in both: [`StateStore::take`], [`StateStore::replace`], [`StateStore::incr`].

pub mod redis;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the store could not answer (the caller decides whether that is fatal).
#[derive(Debug, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct StateError(pub String);

#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Stores `value` under `key` for `ttl`.
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StateError>;
    /// Stores `value` under `key` with no expiry, never evicted (robot accounts): state that
    /// is not a cache. The in-memory store keeps these in its file, when it has one.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateError>;
    async fn delete(&self, key: &str) -> Result<(), StateError>;
    /// Every live entry whose key starts with `prefix` (for admin listings, not hot paths).
    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError>;
    /// Removes and returns the value under `key` in one step: of several callers racing for
    /// a single-use value (a login's state, an approved device code) exactly one gets it.
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Replaces the value under `key` only if it is still there, with a new `ttl`; whether it
    /// was. A write-back never brings back an entry that was revoked or expired meanwhile.
    async fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<bool, StateError>;
    /// Adds one to the counter under `key` and returns the new count. A missing counter starts
    /// at 1 and lives for `ttl` from then (counting does not extend it): a fixed window.
    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StateError>;
    /// Whether the store answers now (readiness).
    async fn ping(&self) -> Result<(), StateError>;
    /// The values under `keys`, in order (one round trip where the store can).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k).await?);
        }
        Ok(out)
    }
}

type Entries = HashMap<String, (Vec<u8>, Instant)>;

/// How the shared state is kept: `[state] type = "memory" | "redis"`.
#[derive(Debug, Clone, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `memory` (the default; one gateway) or `redis` (shared by several gateways).
    #[serde(default, rename = "type")]
    pub kind: StoreKind,
    /// The in-memory store's file for what must outlive a restart (robot accounts). Unset:
    /// robots are lost when the gateway stops (a warning says so).
    #[serde(default)]
    pub file: Option<std::path::PathBuf>,
    /// The Redis store's settings (`[state.redis]`), required with `type = "redis"`.
    #[serde(default)]
    pub redis: Option<redis::RedisConfig>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

impl StateConfig {
    /// Opens the configured store. A Redis store connects lazily: the gateway starts while
    /// Redis is down, reports not ready, and connects when Redis is back.
    pub fn open(&self) -> anyhow::Result<std::sync::Arc<dyn StateStore>> {
        Ok(match self.kind {
            StoreKind::Redis => {
                let cfg = self
                    .redis
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("state.type = \"redis\" needs [state.redis]"))?;
                if self.file.is_some() {
                    anyhow::bail!("state.file is for the memory store; Redis keeps its own data");
                }
                std::sync::Arc::new(redis::RedisStore::open(cfg)?)
            }
            StoreKind::Memory => match &self.file {
                Some(f) => std::sync::Arc::new(MemoryStore::with_file(f)?),
                None => {
                    tracing::warn!(
                        "state.file is unset: robot accounts are lost when the gateway stops"
                    );
                    std::sync::Arc::new(MemoryStore::default())
                }
            },
        })
    }
}

/// In-process store. Entries with a time to live are bounded: when full, expired ones go
/// first, then all of them (a cache that forgets is slower, never wrong; sessions and flows
/// start again). Entries [`StateStore::put`] without one are kept apart, never evicted, and
/// written to the store's file (if any) on every change, so they survive a restart.
pub struct MemoryStore {
    map: Mutex<Entries>,
    max_entries: usize,
    durable: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    file: Option<std::path::PathBuf>,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        MemoryStore {
            map: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            durable: Mutex::new(Default::default()),
            file: None,
        }
    }

    /// A store whose durable entries live in `file` (JSON, mode 0600; read now if present).
    pub fn with_file(file: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        use base64::Engine;
        let mut store = Self::default();
        match std::fs::read(file) {
            Ok(raw) => {
                let saved: std::collections::BTreeMap<String, String> =
                    serde_json::from_slice(&raw)
                        .with_context(|| format!("reading {}", file.display()))?;
                let mut durable = store.durable.lock().expect("not shared yet");
                for (k, v) in saved {
                    let v = base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .with_context(|| format!("{}: entry {k:?}", file.display()))?;
                    durable.insert(k, v);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        }
        store.file = Some(file.to_path_buf());
        Ok(store)
    }

    /// Writes the durable entries to the file: a temporary file, synced, renamed over it.
    fn save(
        &self,
        durable: &std::collections::BTreeMap<String, Vec<u8>>,
    ) -> Result<(), StateError> {
        use base64::Engine;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(file) = &self.file else {
            return Ok(());
        };
        let text: std::collections::BTreeMap<&str, String> = durable
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        let tmp = file.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec(&text).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, file)
        };
        write().map_err(|e| StateError(format!("writing {}: {e}", file.display())))
    }

    fn durable(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Vec<u8>>>, StateError>
    {
        self.durable
            .lock()
            .map_err(|_| StateError("memory store lock poisoned".into()))
    }

    /// Inserts under the lock, making room first when full.
    fn insert(&self, map: &mut Entries, key: &str, value: Vec<u8>, ttl: Duration) {
        let now = Instant::now();
        if map.len() >= self.max_entries && !map.contains_key(key) {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.max_entries {
                map.clear();
            }
        }
        map.insert(key.to_string(), (value, now + ttl));
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Entries>, StateError> {
        self.map
            .lock()
            .map_err(|_| StateError("memory store lock poisoned".into()))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[async_trait::async_trait]
impl StateStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(v) = self.durable()?.get(key) {
            return Ok(Some(v.clone()));
        }
        let mut map = self.lock()?;
        match map.get(key) {
            Some((v, until)) if *until > Instant::now() => Ok(Some(v.clone())),
            Some(_) => {
                map.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StateError> {
        let mut map = self.lock()?;
        self.insert(&mut map, key, value, ttl);
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateError> {
        self.lock()?.remove(key);
        let mut durable = self.durable()?;
        let old = durable.insert(key.to_string(), value);
        self.save(&durable).inspect_err(|_| {
            // Not saved: not stored either.
            match old {
                Some(v) => durable.insert(key.to_string(), v),
                None => durable.remove(key),
            };
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        self.lock()?.remove(key);
        let mut durable = self.durable()?;
        if let Some(old) = durable.remove(key) {
            self.save(&durable).inspect_err(|_| {
                durable.insert(key.to_string(), old);
            })?;
        }
        Ok(())
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let now = Instant::now();
        let mut out: Vec<(String, Vec<u8>)> = self
            .lock()?
            .iter()
            .filter(|(k, (_, until))| k.starts_with(prefix) && *until > now)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        out.extend(
            self.durable()?
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok(out)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let taken = self.lock()?.remove(key);
        match taken {
            Some((v, until)) if until > Instant::now() => Ok(Some(v)),
            Some(_) => Ok(None),
            None => {
                let mut durable = self.durable()?;
                let Some(v) = durable.remove(key) else {
                    return Ok(None);
                };
                match self.save(&durable) {
                    Ok(()) => Ok(Some(v)),
                    Err(e) => {
                        durable.insert(key.to_string(), v);
                        Err(e)
                    }
                }
            }
        }
    }

    async fn replace(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<bool, StateError> {
        let mut map = self.lock()?;
        let now = Instant::now();
        match map.get_mut(key) {
            Some(entry) if entry.1 > now => {
                *entry = (value, now + ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        let mut map = self.lock()?;
        let now = Instant::now();
        if let Some((v, _)) = map.get_mut(key).filter(|(_, until)| *until > now) {
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_add(1);
            *v = n.to_string().into_bytes();
            return Ok(n);
        }
        self.insert(&mut map, key, b"1".to_vec(), ttl);
        Ok(1)
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.lock().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_expire_and_the_store_stays_bounded() {
        let s = MemoryStore::new(2);
        s.set("a", b"1".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
        s.set("gone", b"x".to_vec(), Duration::ZERO).await.unwrap();
        assert_eq!(s.get("gone").await.unwrap(), None);
        s.set("b", b"2".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        s.set("c", b"3".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(s.map.lock().unwrap().len() <= 2);
        assert_eq!(s.get("c").await.unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(
            s.scan("c").await.unwrap(),
            vec![("c".into(), b"3".to_vec())]
        );
        assert!(s.scan("zz").await.unwrap().is_empty());
        s.delete("c").await.unwrap();
        assert_eq!(s.get("c").await.unwrap(), None);
    }

    #[tokio::test]
    async fn durable_entries_are_never_evicted_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        let mut s = MemoryStore::with_file(&file).unwrap();
        s.max_entries = 1;
        s.put("robot:a", b"secret-hash".to_vec()).await.unwrap();
        s.put("robot:b", vec![0, 255]).await.unwrap();
        for i in 0..5 {
            s.set(
                &format!("cache:{i}"),
                b"x".to_vec(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        }
        assert_eq!(s.scan("robot:").await.unwrap().len(), 2);
        s.delete("robot:a").await.unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let again = MemoryStore::with_file(&file).unwrap();
        assert_eq!(again.get("robot:a").await.unwrap(), None);
        assert_eq!(again.get("robot:b").await.unwrap(), Some(vec![0, 255]));
        assert_eq!(again.get("cache:4").await.unwrap(), None);
    }
}
