//! Manifests answered by the gateway itself: a manifest `GET` or `HEAD` the bearer check
//! admitted is answered from memory when this gateway has read the same answer from storage
//! before and the repository has not changed since — no second hop.
//!
//! Read-after-write across gateways: every repository has a **generation** in the shared state
//! store (`manifests:gen:<repo>`, a random value). A gateway stamps what it keeps with the
//! generation it read *before* asking storage, and serves it only while the store still says
//! that generation; every change through any gateway — a manifest pushed, a tag moved or
//! deleted, a manifest deleted, the web console's deletes — writes a new one before the client
//! hears of the change (a change whose new generation cannot be written is answered 503, and
//! the client retries). So the next `GET` on any gateway sees the change. A generation that
//! cannot be read (the store down) or is gone (evicted, expired) serves nothing from memory.
//!
//! What storage changes by itself (GC, retention deleting tags) writes no generation: entries
//! are also kept at most `ttl_seconds`. Memory is bounded (`max_mebibytes` of manifest bodies,
//! oldest out first); a manifest larger than 1 MiB is never kept.

use crate::state::StateStore;
use bytes::Bytes;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `[manifest_cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManifestCacheConfig {
    pub enabled: bool,
    /// Manifest bodies kept, in MiB.
    pub max_mebibytes: usize,
    /// How long an entry is served at most (what storage changes by itself shows after that).
    pub ttl_seconds: u64,
}

impl Default for ManifestCacheConfig {
    fn default() -> Self {
        ManifestCacheConfig {
            enabled: true,
            max_mebibytes: 16,
            ttl_seconds: 30,
        }
    }
}

/// Largest manifest kept.
pub const MAX_ENTRY: usize = 1 << 20;
/// Most tags kept (a tag is a small entry: its digest).
const MAX_TAGS: usize = 100_000;
/// How long a generation lives in the store without a change (then it is made anew, which
/// only makes what was kept unusable).
const GENERATION_TTL: Duration = Duration::from_secs(86_400);

/// A repository's generation as read from the store.
pub type Generation = Vec<u8>;

/// A manifest as the gateway keeps it.
#[derive(Debug, Clone)]
pub struct Kept {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
}

struct Entry<T> {
    value: T,
    generation: Generation,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// By (repository, digest).
    manifests: HashMap<(String, String), Entry<Kept>>,
    /// By (repository, tag): the digest.
    tags: HashMap<(String, String), Entry<String>>,
    /// Manifests in the order they were kept (the oldest go first).
    order: VecDeque<(String, String)>,
    bytes: usize,
}

/// What a lookup found.
pub enum Lookup {
    Hit(Kept),
    /// Not here: what storage answers may be kept, stamped with this generation.
    Miss(Generation),
    /// The generation could not be read: ask storage, keep nothing.
    Unavailable,
}

pub struct ManifestCache {
    store: Arc<dyn StateStore>,
    inner: Mutex<Inner>,
    max_bytes: usize,
    ttl: Duration,
}

fn generation_key(repo: &str) -> String {
    format!("manifests:gen:{repo}")
}

impl ManifestCache {
    pub fn new(store: Arc<dyn StateStore>, cfg: &ManifestCacheConfig) -> Self {
        ManifestCache {
            store,
            inner: Mutex::new(Inner::default()),
            max_bytes: cfg.max_mebibytes << 20,
            ttl: Duration::from_secs(cfg.ttl_seconds),
        }
    }

    /// The repository's generation; one is made when there is none (so an entry is never
    /// stamped with "none", which a generation evicted later would seem to match).
    async fn generation(&self, repo: &str) -> Option<Generation> {
        let key = generation_key(repo);
        match self.store.get(&key).await {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                let g = crate::random::random_token(12).into_bytes();
                self.store.set(&key, g.clone(), GENERATION_TTL).await.ok()?;
                Some(g)
            }
            Err(_) => None,
        }
    }

    /// The manifest `repo:reference` (a tag or a digest) if kept under the repository's
    /// current generation.
    pub async fn lookup(&self, repo: &str, reference: &str) -> Lookup {
        let Some(generation) = self.generation(repo).await else {
            return Lookup::Unavailable;
        };
        let Ok(inner) = self.inner.lock() else {
            return Lookup::Unavailable;
        };
        let fresh = |g: &Generation, at: &Instant| *g == generation && at.elapsed() < self.ttl;
        let digest = if reference.contains(':') {
            Some(reference.to_owned())
        } else {
            inner
                .tags
                .get(&(repo.to_owned(), reference.to_owned()))
                .filter(|e| fresh(&e.generation, &e.at))
                .map(|e| e.value.clone())
        };
        let hit = digest.and_then(|d| {
            inner
                .manifests
                .get(&(repo.to_owned(), d))
                .filter(|e| fresh(&e.generation, &e.at))
                .map(|e| e.value.clone())
        });
        match hit {
            Some(k) => Lookup::Hit(k),
            None => Lookup::Miss(generation),
        }
    }

    /// Keeps storage's answer to `repo:reference`, read under `generation` (only when the
    /// body is the digest's).
    pub fn keep(&self, repo: &str, reference: &str, kept: Kept, generation: Generation) {
        if kept.body.len() > MAX_ENTRY || kept.body.len() > self.max_bytes {
            return;
        }
        match oci::Digest::parse(&kept.digest) {
            Ok(d) if oci::Digest::of(d.algorithm(), &kept.body) == d => {}
            _ => return,
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let at = Instant::now();
        if !reference.contains(':') {
            if inner.tags.len() >= MAX_TAGS {
                inner.tags.clear();
            }
            inner.tags.insert(
                (repo.to_owned(), reference.to_owned()),
                Entry {
                    value: kept.digest.clone(),
                    generation: generation.clone(),
                    at,
                },
            );
        }
        let key = (repo.to_owned(), kept.digest.clone());
        let len = kept.body.len();
        if let Some(old) = inner.manifests.insert(
            key.clone(),
            Entry {
                value: kept,
                generation,
                at,
            },
        ) {
            inner.bytes -= old.value.body.len();
        } else {
            inner.order.push_back(key);
        }
        inner.bytes += len;
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.manifests.remove(&oldest) {
                inner.bytes -= e.value.body.len();
            }
        }
    }

    /// `repo` changed (a manifest pushed or deleted, a tag moved or deleted): a new
    /// generation for every gateway, and nothing of it kept here.
    pub async fn changed(&self, repo: &str) -> Result<(), crate::state::StateError> {
        let g = crate::random::random_token(12).into_bytes();
        self.store
            .set(&generation_key(repo), g, GENERATION_TTL)
            .await?;
        if let Ok(mut inner) = self.inner.lock() {
            inner.tags.retain(|(r, _), _| r != repo);
            let gone: Vec<_> = inner
                .manifests
                .keys()
                .filter(|(r, _)| r == repo)
                .cloned()
                .collect();
            for k in gone {
                if let Some(e) = inner.manifests.remove(&k) {
                    inner.bytes -= e.value.body.len();
                }
            }
            let manifests = std::mem::take(&mut inner.manifests);
            inner.order.retain(|k| manifests.contains_key(k));
            inner.manifests = manifests;
        }
        Ok(())
    }
}

/// Whether an `Accept` header admits `media_type` (as storage decides for a tag: no
/// `Accept`, `*/*` and `application/*` admit all).
pub fn accepts(h: &http::HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in h.get_all(http::header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let essence = oci::media_type::essence(item);
            if essence.is_empty() {
                continue;
            }
            any = true;
            if essence == "*/*" || essence == "application/*" || essence == media_type {
                return true;
            }
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn kept(body: &str) -> Kept {
        Kept {
            digest: oci::Digest::of(oci::Algorithm::Sha256, body.as_bytes()).to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn cache(store: Arc<dyn StateStore>, mib: usize) -> ManifestCache {
        ManifestCache::new(
            store,
            &ManifestCacheConfig {
                enabled: true,
                max_mebibytes: mib,
                ttl_seconds: 30,
            },
        )
    }

    #[tokio::test]
    async fn a_change_on_one_gateway_is_seen_by_the_next_lookup_on_another() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let (a, b) = (cache(store.clone(), 1), cache(store, 1));
        let Lookup::Miss(g) = b.lookup("team-a/app", "v1").await else {
            panic!("nothing kept yet")
        };
        let k = kept("{}");
        let d = k.digest.clone();
        b.keep("team-a/app", "v1", k, g);
        assert!(matches!(b.lookup("team-a/app", "v1").await, Lookup::Hit(k) if k.digest == d));
        assert!(matches!(b.lookup("team-a/app", &d).await, Lookup::Hit(_)));
        assert!(
            matches!(b.lookup("team-b/x", &d).await, Lookup::Miss(_)),
            "another repository"
        );
        // The tag moves through gateway a.
        a.changed("team-a/app").await.unwrap();
        assert!(matches!(
            b.lookup("team-a/app", "v1").await,
            Lookup::Miss(_)
        ));
        assert!(matches!(b.lookup("team-a/app", &d).await, Lookup::Miss(_)));
        // A body that is not its digest's is never kept.
        let Lookup::Miss(g) = b.lookup("team-a/app", "v2").await else {
            panic!()
        };
        let mut bad = kept("{\"a\":1}");
        bad.body = Bytes::from_static(b"{}x");
        b.keep("team-a/app", "v2", bad, g);
        assert!(matches!(
            b.lookup("team-a/app", "v2").await,
            Lookup::Miss(_)
        ));
    }

    #[tokio::test]
    async fn memory_is_bounded_and_an_answer_read_before_a_change_is_not_served_after_it() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let c = cache(store, 1);
        for i in 0..5 {
            let Lookup::Miss(g) = c.lookup("r", &format!("t{i}")).await else {
                panic!()
            };
            let big = format!("{i}").repeat(400 << 10);
            c.keep("r", &format!("t{i}"), kept(&big), g);
        }
        assert!(c.inner.lock().unwrap().bytes <= 1 << 20);
        assert!(
            matches!(c.lookup("r", "t4").await, Lookup::Hit(_)),
            "the newest stays"
        );
        assert!(
            matches!(c.lookup("r", "t0").await, Lookup::Miss(_)),
            "the oldest went"
        );
        // Read before a change, kept after it: never served.
        let Lookup::Miss(before) = c.lookup("r", "late").await else {
            panic!()
        };
        c.changed("r").await.unwrap();
        c.keep("r", "late", kept("{}"), before);
        assert!(matches!(c.lookup("r", "late").await, Lookup::Miss(_)));
    }

    #[test]
    fn accept_is_read_as_storage_reads_it() {
        let mut h = http::HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.insert(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json"
                .parse()
                .unwrap(),
        );
        assert!(!accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append("accept", "application/*".parse().unwrap());
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
    }
}
