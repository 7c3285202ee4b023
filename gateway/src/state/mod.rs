//! The shared state store: small values, most with a time to live, that every gateway replica
//! must see — sessions (refresh tokens), OIDC flow state, robot accounts, the LDAP login cache,
//! failed-login counters and rate-limit windows. [`MemoryStore`] is the embedded default (one
//! gateway); [`redis::RedisStore`] is shared by several. Both pass the same suite
//! (`tests/tests/ha/state_store.rs`), and the operations that race between replicas are single atomic
//! steps in both: [`StateStore::take`], [`StateStore::replace`], [`StateStore::incr`].

pub mod redis;
pub mod shared_reads;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the store could not answer (the caller decides whether that is fatal).
#[derive(Debug, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct StateError(pub String);

#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// Whether the store answers in this process, without a round trip (the in-memory
    /// store): sharing its reads among requests gains nothing.
    fn is_local(&self) -> bool {
        false
    }

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
    /// Appends `value` to the log under `prefix`, in one atomic step: stored as by
    /// [`StateStore::put`] under `<prefix><n>`, `n` (20 digits) one more than the log's last
    /// (kept under `<prefix>seq`). Entries become visible in the order of their numbers, with
    /// no gap. Returns `n`.
    async fn append(&self, prefix: &str, value: Vec<u8>) -> Result<u64, StateError>;
    /// The values under `keys`, in order (one round trip where the store can).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k).await?);
        }
        Ok(out)
    }
}

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

/// What kind of entry a key is, for the in-memory store's bounds: each kind is bounded on its
/// own, so filling one never pushes out another.
///
/// Anonymous clients make some kinds at will — an OIDC login or device code started
/// ([`Class::Flows`]), a rate window ([`Class::Rates`]), a failed-login counter under any name
/// ([`Class::Failures`]) — so when one of those is full its oldest entries go. The kinds that
/// are security state — sessions, revocations, lockouts, identity bindings ([`Class::Sessions`],
/// [`Class::Revocations`], [`Class::Protected`]) — are never evicted: a full one refuses new
/// entries (the caller fails closed) until some expire. Evicting a failed-login counter gives
/// its name a fresh window; it takes the class's whole room of other failures to do it, and
/// the source's own counter (and lockout) is there meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// OIDC browser logins and device codes in progress (`oidc:`): oldest evicted first.
    Flows,
    /// Rate-limit windows (`rate:`): oldest evicted first.
    Rates,
    /// Failed-login counters (`fail:`): oldest evicted first.
    Failures,
    /// The LDAP login cache (`ldap:login:`), when pull-through caches last checked a tag
    /// with their upstream (`proxy:tag:`) and the repositories' manifest generations
    /// (`manifests:gen:`), asked again or made anew when missing: oldest evicted first.
    Cache,
    /// Where pull-through caches stored the blobs they fetched (`proxy:blob:`), so other
    /// repositories link them instead of fetching them again: many, and of their own class
    /// so that a busy cache does not push out the LDAP login cache. Oldest evicted first.
    Blobs,
    /// Sessions (`session:`): never evicted; refused when full.
    Sessions,
    /// Revocations (`revoked:`): never evicted; refused when full.
    Revocations,
    /// Everything else — lockouts, identity bindings, any kind not named here (fail closed):
    /// never evicted; refused when full.
    Protected,
}

impl Class {
    /// The class of `key`, by its prefix.
    pub fn of(key: &str) -> Class {
        const PREFIXES: [(&str, Class); 9] = [
            ("oidc:", Class::Flows),
            ("proxy:tag:", Class::Cache),
            ("proxy:blob:", Class::Blobs),
            // A generation evicted is made anew: what was kept under it is just not used.
            ("manifests:gen:", Class::Cache),
            ("rate:", Class::Rates),
            ("fail:", Class::Failures),
            ("ldap:login:", Class::Cache),
            ("session:", Class::Sessions),
            ("revoked:", Class::Revocations),
        ];
        PREFIXES
            .iter()
            .find(|(p, _)| key.starts_with(p))
            .map_or(Class::Protected, |(_, c)| *c)
    }

    /// Whether the oldest entries go when the class is full (else new ones are refused).
    fn evicts(self) -> bool {
        matches!(
            self,
            Class::Flows | Class::Rates | Class::Failures | Class::Cache | Class::Blobs
        )
    }

    const ALL: [Class; 8] = [
        Class::Flows,
        Class::Rates,
        Class::Failures,
        Class::Cache,
        Class::Blobs,
        Class::Sessions,
        Class::Revocations,
        Class::Protected,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Entries of one class: values with their expiry and insertion number, and the insertion
/// order (oldest first; numbers of entries replaced or removed since are skipped).
struct Bounded {
    entries: Entries,
    order: std::collections::VecDeque<(String, u64)>,
    next: u64,
    cap: usize,
    class: Class,
    /// When expired entries were last purged (a full protected class purges at most once a
    /// second, so a flood of refused writes does not walk it on every request).
    purged: Option<Instant>,
}

impl Bounded {
    fn new(class: Class, cap: usize) -> Self {
        Bounded {
            entries: HashMap::new(),
            order: std::collections::VecDeque::new(),
            next: 0,
            cap: cap.max(1),
            class,
            purged: None,
        }
    }

    fn live(&self, key: &str, now: Instant) -> Option<&Vec<u8>> {
        self.entries
            .get(key)
            .filter(|e| e.1 > now)
            .map(|(v, _, _)| v)
    }

    /// Stores `value` under `key` until `until`; `false` if the class is full of protected
    /// entries (nothing is evicted for it).
    fn insert(&mut self, key: &str, value: Vec<u8>, until: Instant) -> bool {
        let now = Instant::now();
        if let Some(e) = self.entries.get_mut(key) {
            e.0 = value;
            e.1 = until;
            return true;
        }
        if self.entries.len() >= self.cap && !self.make_room(now) {
            return false;
        }
        let n = self.next;
        self.next += 1;
        self.entries.insert(key.to_string(), (value, until, n));
        self.order.push_back((key.to_string(), n));
        if self.order.len() > 2 * self.entries.len() + 1024 {
            self.compact();
        }
        true
    }

    /// Frees one place: the oldest entry (classes that evict), or expired ones (the others).
    fn make_room(&mut self, now: Instant) -> bool {
        if !self.class.evicts() {
            if self
                .purged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                self.purged = Some(now);
                self.entries.retain(|_, e| e.1 > now);
                self.compact();
            }
            return self.entries.len() < self.cap;
        }
        while let Some((key, n)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|e| e.2 == n) {
                self.entries.remove(&key);
                return true;
            }
        }
        self.entries.len() < self.cap
    }

    /// Drops the order's records of entries no longer there.
    fn compact(&mut self) {
        let entries = &self.entries;
        self.order
            .retain(|(k, n)| entries.get(k).is_some_and(|e| e.2 == *n));
    }
}

type Entries = HashMap<String, (Vec<u8>, Instant, u64)>;

/// In-process store. Entries with a time to live are bounded per [`Class`]. Entries
/// [`StateStore::put`] without one are kept apart, never evicted, and written to the store's
/// file (if any) on every change, so they survive a restart.
pub struct MemoryStore {
    classes: [Mutex<Bounded>; 8],
    durable: Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    file: Option<std::path::PathBuf>,
}

/// How many entries of each class the in-memory store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Each class whose oldest entries go when it is full.
    pub evicted: usize,
    /// Each class that refuses new entries when full.
    pub kept: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            evicted: 100_000,
            kept: 1_000_000,
        }
    }
}

fn full(class: Class) -> StateError {
    StateError(format!(
        "the memory store is full of {class:?} entries; refusing a new one until some expire"
    ))
}

impl MemoryStore {
    pub fn new(caps: Caps) -> Self {
        MemoryStore {
            classes: Class::ALL.map(|c| {
                Mutex::new(Bounded::new(
                    c,
                    if c.evicts() { caps.evicted } else { caps.kept },
                ))
            }),
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

    fn lock(&self, key: &str) -> Result<std::sync::MutexGuard<'_, Bounded>, StateError> {
        self.class(Class::of(key))
    }

    fn class(&self, class: Class) -> Result<std::sync::MutexGuard<'_, Bounded>, StateError> {
        self.classes[class.index()]
            .lock()
            .map_err(|_| StateError("memory store lock poisoned".into()))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Caps::default())
    }
}

#[async_trait::async_trait]
impl StateStore for MemoryStore {
    fn is_local(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(v) = self.durable()?.get(key) {
            return Ok(Some(v.clone()));
        }
        Ok(self.lock(key)?.live(key, Instant::now()).cloned())
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), StateError> {
        let mut class = self.lock(key)?;
        if class.insert(key, value, Instant::now() + ttl) {
            Ok(())
        } else {
            Err(full(class.class))
        }
    }

    async fn append(&self, prefix: &str, value: Vec<u8>) -> Result<u64, StateError> {
        let seq_key = format!("{prefix}seq");
        let mut durable = self.durable()?;
        let n = durable
            .get(&seq_key)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let key = format!("{prefix}{n:020}");
        let old_seq = durable.insert(seq_key.clone(), n.to_string().into_bytes());
        durable.insert(key.clone(), value);
        self.save(&durable).inspect_err(|_| {
            // Not saved: not stored either.
            durable.remove(&key);
            match old_seq {
                Some(v) => durable.insert(seq_key.clone(), v),
                None => durable.remove(&seq_key),
            };
        })?;
        Ok(n)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateError> {
        self.lock(key)?.entries.remove(key);
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
        self.lock(key)?.entries.remove(key);
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
        let mut out = Vec::new();
        for class in Class::ALL {
            out.extend(
                self.class(class)?
                    .entries
                    .iter()
                    .filter(|(k, e)| k.starts_with(prefix) && e.1 > now)
                    .map(|(k, e)| (k.clone(), e.0.clone())),
            );
        }
        out.extend(
            self.durable()?
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok(out)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let taken = self.lock(key)?.entries.remove(key);
        match taken {
            Some((v, until, _)) if until > Instant::now() => Ok(Some(v)),
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
        let mut class = self.lock(key)?;
        let now = Instant::now();
        match class.entries.get_mut(key) {
            Some(entry) if entry.1 > now => {
                entry.0 = value;
                entry.1 = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        let mut class = self.lock(key)?;
        let now = Instant::now();
        if let Some(e) = class.entries.get_mut(key).filter(|e| e.1 > now) {
            let n = std::str::from_utf8(&e.0)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_add(1);
            e.0 = n.to_string().into_bytes();
            return Ok(n);
        }
        if class.insert(key, b"1".to_vec(), now + ttl) {
            Ok(1)
        } else {
            Err(full(class.class))
        }
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.class(Class::Sessions).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> MemoryStore {
        MemoryStore::new(Caps {
            evicted: 2,
            kept: 2,
        })
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn values_expire_and_visitors_make_room_oldest_first() {
        let s = small();
        s.set("oidc:flow:a", b"1".to_vec(), HOUR).await.unwrap();
        assert_eq!(
            s.get("oidc:flow:a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        s.set("oidc:flow:gone", b"x".to_vec(), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(s.get("oidc:flow:gone").await.unwrap(), None);
        s.set("oidc:flow:b", b"2".to_vec(), HOUR).await.unwrap();
        s.set("oidc:flow:c", b"3".to_vec(), HOUR).await.unwrap();
        assert!(s.class(Class::Flows).unwrap().entries.len() <= 2);
        assert_eq!(
            s.get("oidc:flow:a").await.unwrap(),
            None,
            "the oldest went first"
        );
        assert_eq!(
            s.get("oidc:flow:c").await.unwrap().as_deref(),
            Some(&b"3"[..])
        );
        assert_eq!(
            s.scan("oidc:flow:c").await.unwrap(),
            vec![("oidc:flow:c".into(), b"3".to_vec())]
        );
        assert!(s.scan("zz").await.unwrap().is_empty());
        s.delete("oidc:flow:c").await.unwrap();
        assert_eq!(s.get("oidc:flow:c").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_kept_class_refuses_new_entries_and_keeps_the_old() {
        let s = small();
        s.set("session:1", b"s".to_vec(), HOUR).await.unwrap();
        s.set("session:gone", b"r".to_vec(), Duration::ZERO)
            .await
            .unwrap();
        // The expired session makes room; then the class is full of live entries.
        s.set("session:2", b"s".to_vec(), HOUR).await.unwrap();
        assert!(s.set("session:3", b"s".to_vec(), HOUR).await.is_err());
        assert!(s.get("session:1").await.unwrap().is_some());
        // Updating an entry that is there is no new entry.
        s.set("session:1", b"t".to_vec(), HOUR).await.unwrap();
        // Other kinds have their own room: a full session class takes none of it.
        s.set("lock:user:bob", b"l".to_vec(), HOUR).await.unwrap();
        s.set("revoked:jti:1", b"r".to_vec(), HOUR).await.unwrap();
        // Failed-login counters make room for themselves.
        for i in 0..5 {
            s.incr(&format!("fail:user:eve{i}"), HOUR).await.unwrap();
        }
        assert!(s.get("lock:user:bob").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn anonymous_floods_never_evict_security_state() {
        let s = MemoryStore::default();
        s.set("session:abc", b"s".to_vec(), HOUR).await.unwrap();
        s.set("revoked:jti:x", b"r".to_vec(), HOUR).await.unwrap();
        s.set("lock:user:bob", b"l".to_vec(), HOUR).await.unwrap();
        // 300 000 logins started, rate windows counted and failed logins under fresh names, by
        // unauthenticated clients: twice each class's room.
        for i in 0..300_000u32 {
            let key = match i % 3 {
                0 => format!("oidc:flow:{i}"),
                1 => format!("rate:token:source:{i}:1"),
                _ => format!("fail:user:nobody-{i}"),
            };
            s.set(&key, vec![0; 64], HOUR).await.unwrap();
        }
        assert_eq!(
            s.get("session:abc").await.unwrap().as_deref(),
            Some(&b"s"[..])
        );
        assert!(s.get("revoked:jti:x").await.unwrap().is_some());
        assert!(s.get("lock:user:bob").await.unwrap().is_some());
        for class in [Class::Flows, Class::Rates, Class::Failures] {
            assert!(s.class(class).unwrap().entries.len() <= Caps::default().evicted);
        }
        // The newest flows are there (a login in progress survives a flood only by luck;
        // it is started again, never wrongly finished).
        assert!(s.get("oidc:flow:299997").await.unwrap().is_some());
        assert_eq!(Class::of("session:x"), Class::Sessions);
        assert_eq!(Class::of("lock:user:bob"), Class::Protected);
        assert_eq!(Class::of("something-new:x"), Class::Protected);
    }

    #[tokio::test]
    async fn durable_entries_are_never_evicted_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        let s = MemoryStore::with_file(&file).unwrap();
        s.class(Class::Flows).unwrap().cap = 1;
        s.put("robot:a", b"secret-hash".to_vec()).await.unwrap();
        s.put("robot:b", vec![0, 255]).await.unwrap();
        for i in 0..5 {
            s.set(
                &format!("oidc:flow:{i}"),
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
        assert_eq!(again.get("oidc:flow:4").await.unwrap(), None);
    }
}
