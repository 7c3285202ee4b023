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
//! the client retries). So the next `GET` on any gateway sees the change: the generation a
//! request goes by is read by a store `GET` sent after the request arrived. Requests for one
//! repository that arrive while such a `GET` is on its way wait for it and share the next one
//! ([`SharedReads`]: one `GET` at a time per repository, at most two round trips' wait; the
//! in-memory store of a single gateway is read directly, it has no round trip). A
//! generation that
//! cannot be read (the store down) serves nothing from memory; one that is gone (never made,
//! evicted, expired) is made anew only after storage answered a read with a manifest (so
//! reads of repositories that do not exist write nothing to the store), and what was kept
//! before it is never served.
//!
//! What writes no generation, and so is seen at the latest after `ttl_seconds` (the most an
//! entry is served): what storage changes by itself (GC, retention deleting tags); a change
//! whose gateway died between storage's answer and the generation write; a change whose new
//! generation a failing store did not keep (Redis refusing writes, a Sentinel failover that
//! lost it) while other gateways could still read the old one. Memory is bounded
//! (`max_mebibytes`, keys and entries counted, oldest out first); a manifest larger than
//! 1 MiB is never kept.

use crate::state::StateStore;
use crate::state::shared_reads::SharedReads;
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
/// Most entries kept (tags and manifests).
const MAX_KEYS: usize = 200_000;
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
    /// Its place in the order of keeping.
    seq: u64,
}

/// What one kept entry costs besides its body (keys, digest, media type, generation, the
/// maps' and queue's own).
const ENTRY_OVERHEAD: usize = 256;

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    /// (repository, digest): a manifest.
    Manifest(String, String),
    /// (repository, tag): the digest it points at.
    Tag(String, String),
}

#[derive(Default)]
struct Inner {
    manifests: HashMap<(String, String), Entry<Kept>>,
    tags: HashMap<(String, String), Entry<String>>,
    /// Every entry in the order it was kept (the oldest go first), with its `seq` (an entry
    /// kept again since has another: the old place is passed over).
    order: VecDeque<(Key, u64)>,
    next: u64,
    bytes: usize,
}

impl Inner {
    fn cost(key: &Key, body: usize) -> usize {
        let (a, b) = match key {
            Key::Manifest(a, b) | Key::Tag(a, b) => (a, b),
        };
        a.len() + b.len() + body + ENTRY_OVERHEAD
    }

    /// Removes the entry under `key` (only if it is the one kept at `seq`, when given).
    fn remove(&mut self, key: &Key, seq: Option<u64>) {
        let body = match key {
            Key::Manifest(r, d) => {
                let k = (r.clone(), d.clone());
                match self.manifests.get(&k) {
                    Some(e) if seq.is_none_or(|s| s == e.seq) => {
                        self.manifests.remove(&k).map(|e| e.value.body.len())
                    }
                    _ => None,
                }
            }
            Key::Tag(r, t) => {
                let k = (r.clone(), t.clone());
                match self.tags.get(&k) {
                    Some(e) if seq.is_none_or(|s| s == e.seq) => self.tags.remove(&k).map(|_| 0),
                    _ => None,
                }
            }
        };
        if let Some(body) = body {
            self.bytes -= Self::cost(key, body);
        }
    }

    fn seq(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// What a lookup found.
pub enum Lookup {
    Hit(Kept),
    /// Not here: what storage answers may be kept, stamped with this generation (none: the
    /// repository has none yet; one is made once storage answered).
    Miss(Option<Generation>),
    /// The generation could not be read: ask storage, keep nothing.
    Unavailable,
}

pub struct ManifestCache {
    store: Arc<dyn StateStore>,
    /// Generation reads of a repository many requests ask at once share round trips.
    generations: SharedReads,
    inner: Mutex<Inner>,
    max_bytes: usize,
    ttl: Duration,
}

fn generation_key(repo: &str) -> String {
    format!("manifests:gen:{repo}")
}

fn new_generation() -> Generation {
    crate::random::random_token(12).into_bytes()
}

impl ManifestCache {
    pub fn new(store: Arc<dyn StateStore>, cfg: &ManifestCacheConfig) -> Self {
        ManifestCache {
            store,
            generations: SharedReads::default(),
            inner: Mutex::new(Inner::default()),
            max_bytes: cfg.max_mebibytes << 20,
            ttl: Duration::from_secs(cfg.ttl_seconds),
        }
    }

    /// The manifest `repo:reference` (a tag or a digest) if kept under the repository's
    /// current generation.
    pub async fn lookup(&self, repo: &str, reference: &str) -> Lookup {
        let key = generation_key(repo);
        // A local store's read is already what a shared one would be: one after the request
        // arrived.
        let read = match self.store.is_local() {
            true => self.store.get(&key).await,
            false => self.generations.get(&self.store, &key).await,
        };
        let generation = match read {
            Ok(Some(g)) => g,
            Ok(None) => return Lookup::Miss(None),
            Err(_) => return Lookup::Unavailable,
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
            None => Lookup::Miss(Some(generation)),
        }
    }

    /// Keeps storage's answer to `repo:reference`, read under `generation`; read when the
    /// repository had no generation, one is made instead ([`ManifestCache::start`]).
    #[cfg(test)]
    async fn keep(&self, repo: &str, reference: &str, kept: Kept, generation: Option<Generation>) {
        match generation {
            Some(g) => self.remember(repo, reference, kept, g),
            None => self.start(repo).await,
        }
    }

    /// Storage answered a read of `repo`, which has no generation: one is made (the next
    /// read keeps what it reads; this one is not kept). Only a repository storage has a
    /// manifest in gets one: reads of names that do not exist write nothing.
    pub async fn start(&self, repo: &str) {
        let _ = self
            .store
            .set(&generation_key(repo), new_generation(), GENERATION_TTL)
            .await;
    }

    /// Keeps storage's answer to `repo:reference`, read under `generation` (only when the
    /// body is the digest's).
    pub fn remember(&self, repo: &str, reference: &str, kept: Kept, generation: Generation) {
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
            let key = Key::Tag(repo.to_owned(), reference.to_owned());
            inner.remove(&key, None);
            let seq = inner.seq();
            inner.tags.insert(
                (repo.to_owned(), reference.to_owned()),
                Entry {
                    value: kept.digest.clone(),
                    generation: generation.clone(),
                    at,
                    seq,
                },
            );
            inner.bytes += Inner::cost(&key, 0);
            inner.order.push_back((key, seq));
        }
        let key = Key::Manifest(repo.to_owned(), kept.digest.clone());
        inner.remove(&key, None);
        inner.bytes += Inner::cost(&key, kept.body.len());
        let seq = inner.seq();
        inner.manifests.insert(
            (repo.to_owned(), kept.digest.clone()),
            Entry {
                value: kept,
                generation,
                at,
                seq,
            },
        );
        inner.order.push_back((key, seq));
        while inner.bytes > self.max_bytes || inner.order.len() > MAX_KEYS {
            let Some((oldest, seq)) = inner.order.pop_front() else {
                break;
            };
            inner.remove(&oldest, Some(seq));
        }
    }

    /// `repo` changed (a manifest pushed or deleted, a tag moved or deleted): a new
    /// generation for every gateway (what any of them kept before is never served again).
    pub async fn changed(&self, repo: &str) -> Result<(), crate::state::StateError> {
        self.store
            .set(&generation_key(repo), new_generation(), GENERATION_TTL)
            .await
    }
}

/// Whether an `Accept` header admits `media_type`, as storage decides for a tag
/// ([`oci::media_type::accepts`]).
pub fn accepts(h: &http::HeaderMap, media_type: &str) -> bool {
    let values = h.get_all(http::header::ACCEPT);
    oci::media_type::accepts(values.iter().filter_map(|v| v.to_str().ok()), media_type)
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

    /// Reads `repo:reference` as the proxy does: a miss is answered by "storage" with `k`
    /// and kept; whether it was a hit.
    async fn read(c: &ManifestCache, repo: &str, reference: &str, k: &Kept) -> bool {
        match c.lookup(repo, reference).await {
            Lookup::Hit(h) => {
                assert_eq!(h.digest, k.digest);
                true
            }
            Lookup::Miss(g) => {
                c.keep(repo, reference, k.clone(), g).await;
                false
            }
            Lookup::Unavailable => panic!("the store is up"),
        }
    }

    #[tokio::test]
    async fn a_change_on_one_gateway_is_seen_by_the_next_lookup_on_another() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let (a, b) = (cache(store.clone(), 1), cache(store.clone(), 1));
        let k = kept("{}");
        let d = k.digest.clone();
        // The first read makes the repository's generation, the second keeps, the third hits.
        assert!(!read(&b, "team-a/app", "v1", &k).await);
        assert!(!read(&b, "team-a/app", "v1", &k).await);
        assert!(read(&b, "team-a/app", "v1", &k).await);
        assert!(read(&b, "team-a/app", &d, &k).await, "by digest too");
        assert!(
            matches!(b.lookup("team-b/x", &d).await, Lookup::Miss(None)),
            "another repository"
        );
        // The tag moves through gateway a.
        a.changed("team-a/app").await.unwrap();
        assert!(matches!(
            b.lookup("team-a/app", "v1").await,
            Lookup::Miss(Some(_))
        ));
        assert!(matches!(
            b.lookup("team-a/app", &d).await,
            Lookup::Miss(Some(_))
        ));
        // A body that is not its digest's is never kept.
        let mut bad = kept("{\"a\":1}");
        bad.body = Bytes::from_static(b"{}x");
        assert!(!read(&b, "team-a/app", "v2", &bad).await);
        assert!(matches!(
            b.lookup("team-a/app", "v2").await,
            Lookup::Miss(_)
        ));
        // The generation evicted (or expired): made anew, nothing kept before is served.
        store.delete("manifests:gen:team-a/app").await.unwrap();
        assert!(!read(&b, "team-a/app", "v1", &k).await);
        assert!(matches!(
            b.lookup("team-a/app", "v1").await,
            Lookup::Miss(Some(_))
        ));
        // Reads of a repository storage does not have write nothing.
        assert!(matches!(
            b.lookup("team-a/nothing", "v1").await,
            Lookup::Miss(None)
        ));
        assert_eq!(
            store.get("manifests:gen:team-a/nothing").await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn memory_is_bounded_and_an_answer_read_before_a_change_is_not_served_after_it() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let c = cache(store, 1);
        c.changed("r").await.unwrap();
        for i in 0..5 {
            let big = format!("{i}").repeat(400 << 10);
            assert!(!read(&c, "r", &format!("t{i}"), &kept(&big)).await);
        }
        assert!(c.inner.lock().unwrap().bytes <= 1 << 20);
        let newest = kept(&"4".repeat(400 << 10));
        assert!(read(&c, "r", "t4", &newest).await, "the newest stays");
        assert!(
            matches!(c.lookup("r", "t0").await, Lookup::Miss(_)),
            "the oldest went"
        );
        // Read before a change, kept after it: never served.
        let Lookup::Miss(before) = c.lookup("r", "late").await else {
            panic!()
        };
        c.changed("r").await.unwrap();
        c.keep("r", "late", kept("{}"), before).await;
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
