//! The shared state store: small values with a time to live that every gateway replica must
//! see (login caches now; refresh tokens, sessions, robots and counters as they move here).
//! [`MemoryStore`] is the embedded default; a Redis store comes behind the same trait.

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
    async fn delete(&self, key: &str) -> Result<(), StateError>;
    /// Every live entry whose key starts with `prefix` (for admin listings, not hot paths).
    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError>;
}

type Entries = HashMap<String, (Vec<u8>, Instant)>;

/// In-process store, bounded: when full, expired entries go first, then everything (a cache
/// that forgets is slower, never wrong).
pub struct MemoryStore {
    map: Mutex<Entries>,
    max_entries: usize,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        MemoryStore {
            map: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
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
        let now = Instant::now();
        if map.len() >= self.max_entries && !map.contains_key(key) {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.max_entries {
                map.clear();
            }
        }
        map.insert(key.to_string(), (value, now + ttl));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        self.lock()?.remove(key);
        Ok(())
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let now = Instant::now();
        Ok(self
            .lock()?
            .iter()
            .filter(|(k, (_, until))| k.starts_with(prefix) && *until > now)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect())
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
}
