//! Pull-through caches (`[[proxy_cache]]`): `<registry>/<prefix>/<name>` is the upstream
//! registry's `<name>`, fetched on first pull, verified, kept in storage as ordinary content,
//! and served from there.
//!
//! A request reaches here after the bearer check admitted it (pulling through is a `pull` on
//! the prefixed repository); [`ProxyCaches::answer`] decides:
//!
//! - Pushes into a prefix are refused.
//! - A manifest by digest or a blob that storage has is forwarded as any other request.
//! - A tag is forwarded while it is fresh (checked with the upstream less than
//!   `tag_ttl_seconds` ago, in the shared state store, and storage still has what it was);
//!   after that one upstream `HEAD` revalidates it, and a changed tag is fetched and stored
//!   first. When the upstream gives no usable answer the cached copy is served (stale), and
//!   the upstream is not asked again about that tag for a little while.
//! - A cold manifest is fetched, checked against its digest and stored as a cached copy (its
//!   blobs and an index's children are fetched when asked for: only the platform pulled).
//! - A cold blob is fetched once however many clients ask ([`fetch`]): every client reads it
//!   as it arrives while it is uploaded to storage, which makes it visible only once the
//!   digest matched.
//! - A cold blob the cache fetched before for another of its repositories (a base layer many
//!   images share; where, in the shared state store) is linked into this one instead — once
//!   the upstream answered a `HEAD` saying this repository's image has it, so nobody reads
//!   through a repository what its upstream image does not hold.
//!
//! The tables are put in force whole ([`LiveCaches`]): a reload (`SIGHUP`) builds the new set
//! first, keeping each cache whose table and files did not change (its blobs in flight go on
//! being shared), and swaps it in. A cache that changed takes on its prefix's blobs in flight
//! and locks (unless its `spill_dir` or `max_fetches` changed); its tags' freshness is kept
//! per upstream URL. What a request gets ([`ProxyCaches::answer`]:
//! refused, fetched or forwarded) is decided on one table; the steps before it (the mirror's
//! rewrite, [`ProxyCaches::covers`]) each see the table of their moment, as if the reload had
//! come before or after the request.
//!
//! Rooms: [`config`] (the table), [`crate::remote`] (the upstream registry as a client, its auth),
//! [`storage`] (the cache's own requests to storage), [`fetch`] (blobs in flight),
//! [`mirror`] (names without the prefix).

pub mod config;
pub mod fetch;
pub mod mirror;
pub mod storage;

use crate::in_force::InForce;
use crate::remote::{Upstream, UpstreamError, read_capped};
use crate::reply::{Failure, Kind};
use crate::state::StateStore;
use bytes::Bytes;
use fetch::{Fetches, Joined, Reader, Sink};
use oci::media_type::MANIFEST_ACCEPT;
use oci::route::Endpoint;
use oci::{Digest, ErrorCode, Reference};
use policy::pattern::RepoPattern;
use reqwest::Method;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::Storage;

pub use config::ProxyCacheConfig;

/// Largest manifest taken from an upstream (storage's own limit is the same).
const MAX_MANIFEST: usize = 4 << 20;
/// Locks that serialise cold fetches of one tag or manifest (by hash of its name).
const LOCKS: usize = 64;
/// A cold blob goes to readers and to storage in pieces of this size.
const BATCH: usize = 256 * 1024;
/// After a failed revalidation the cached tag is served without asking the upstream for at
/// most this long (or the upstream's `Retry-After`, if shorter).
const STALE_FOR: Duration = Duration::from_secs(30);

/// One `[[proxy_cache]]`.
pub struct Cache {
    /// What it was built from ([`crate::in_force::built_from`]).
    built_from: [u8; 32],
    prefix: String,
    upstream: Upstream,
    tag_ttl: Duration,
    repositories: Vec<RepoPattern>,
    /// Blobs in flight: kept by a reload that changes the table (not its `spill_dir` or
    /// `max_fetches`), so a fetch is still shared and the limit still holds across it.
    fetches: Arc<Fetches>,
    max_blob_bytes: u64,
    /// Kept by a reload too.
    locks: Arc<Locks>,
}

/// Locks that serialise cold fetches of one tag or manifest.
struct Locks {
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Keys the lock hash (so names cannot be picked to share a lock).
    seed: std::collections::hash_map::RandomState,
}

/// The caches in force, and where mirror requests arrive.
pub struct CacheTable {
    caches: Vec<Arc<Cache>>,
    mirrors: mirror::Mirrors,
}

/// The `[[proxy_cache]]` tables in force, replaced whole by a reload.
pub struct LiveCaches {
    table: InForce<CacheTable>,
    /// The mirror listeners opened at start (another set needs a restart).
    listeners: Vec<SocketAddr>,
}

/// Every cache of the gateway, as they serve requests.
pub struct ProxyCaches {
    live: Arc<LiveCaches>,
    storage: Arc<Storage>,
    state: Arc<dyn StateStore>,
}

/// What a request under a cache prefix gets.
pub enum Answer {
    /// Storage has it: forward the request as authorized.
    Forward,
    /// Refused, or the upstream gave nothing for content the cache does not hold.
    Fail(Failure),
    /// A blob that is being fetched: its head, then its body as it arrives.
    Stream(Streamed),
    /// `HEAD` of a blob storage does not have.
    Head { digest: Digest, size: u64 },
}

/// A blob answered from its fetch.
pub struct Streamed {
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// `Some((start, end))` (inclusive) for a 206.
    pub range: Option<(u64, u64)>,
    pub reader: Reader,
}

/// What the upstream says a tag is, against what storage holds.
enum TagNow {
    /// What storage holds.
    Same(Digest),
    /// Another manifest, fetched and checked.
    New {
        body: Bytes,
        media_type: String,
        digest: Digest,
    },
}

/// How the answer came about, for the audit event and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Error,
    /// A blob the cache fetched for another of its repositories, linked into this one once
    /// the upstream confirmed it has the blob under this name: no second fetch.
    Shared,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Error => "error",
            Outcome::Shared => "shared",
        }
    }
}

fn fail_storage(e: impl std::fmt::Display) -> Failure {
    tracing::warn!(error = %e, "pull-through cache: storage failed");
    Failure::new(503, Kind::Unavailable, "storage is unavailable, try again")
}

/// The freshness record of a cached tag: the digest it was at the upstream `url`, and until
/// when that upstream is not asked about it (another upstream, after a reload, is asked).
fn tag_key(url: &str, repo: &str, tag: &str) -> String {
    format!("proxy:tag:{repo}:{tag} {url}")
}

/// Where the cache `prefix` stored the blob `digest` it fetched from the upstream `url` (one
/// of its repositories), so that another repository whose upstream image has it links it
/// instead of fetching it again.
fn blob_key(prefix: &str, url: &str, digest: &Digest) -> String {
    format!("proxy:blob:{prefix} {digest} {url}")
}

/// How long a fetched blob's repository is remembered (each fetch or link renews it).
const BLOB_RECORD_TTL: Duration = Duration::from_secs(7 * 86_400);

impl Cache {
    fn lock(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::BuildHasher;
        let l = &self.locks;
        &l.locks[(l.seed.hash_one(key) as usize) % LOCKS]
    }

    fn observe(&self, request: &str, started: Instant) {
        crate::metrics::cache()
            .upstream_seconds
            .with_label_values(&[&self.prefix, request])
            .observe(started.elapsed().as_secs_f64());
    }

    fn upstream_failed(&self, e: &UpstreamError) {
        crate::metrics::cache()
            .upstream_errors
            .with_label_values(&[&self.prefix, e.label()])
            .inc();
    }

    /// What a client is told when the upstream gave nothing and we hold nothing (the
    /// upstream's address and error text are logged, not sent).
    fn failure(&self, e: &UpstreamError, unknown: ErrorCode) -> Failure {
        let prefix = &self.prefix;
        match e {
            UpstreamError::NotFound => Failure::new(
                404,
                Kind::Invalid(unknown),
                format!("not in the {prefix} cache, and its upstream has no such content"),
            ),
            UpstreamError::RateLimited(after) => Failure::new(
                429,
                Kind::TooMany,
                format!("the upstream of the {prefix} cache is rate limiting it; try again later"),
            )
            .with_header("retry-after", after.unwrap_or(60).to_string()),
            _ => Failure::new(
                502,
                Kind::Unavailable,
                format!(
                    "not in the {prefix} cache, and its upstream failed ({})",
                    e.label()
                ),
            ),
        }
    }

    /// The upstream's manifest `reference` of `name`: its body (at most [`MAX_MANIFEST`]),
    /// media type and digest, checked against `expected` (or the upstream's
    /// `Docker-Content-Digest`).
    async fn fetch_manifest(
        &self,
        name: &str,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<(Bytes, String, Digest), UpstreamError> {
        let started = Instant::now();
        let resp = self
            .upstream
            .send(
                Method::GET,
                name,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
            )
            .await;
        self.observe("manifest", started);
        let resp = resp?;
        let said = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let body = tokio::time::timeout(Duration::from_secs(60), read_capped(resp, MAX_MANIFEST))
            .await
            .map_err(|_| UpstreamError::Timeout(60))??;
        crate::metrics::cache()
            .upstream_bytes
            .with_label_values(&[&self.prefix])
            .inc_by(body.len() as u64);
        let want = expected.or(said.as_ref());
        let digest = match want {
            Some(d) => {
                let actual = Digest::of(d.algorithm(), &body);
                if &actual != d {
                    return Err(UpstreamError::Invalid(format!(
                        "the manifest's content has digest {actual}, not {d}"
                    )));
                }
                actual
            }
            None => Digest::of(oci::Algorithm::Sha256, &body),
        };
        let media_type = match media_type {
            Some(m) if m.starts_with("application/") && m != "application/json" => m,
            // Untyped: the body says what it is.
            _ => oci::media_type::parse_manifest(None, &body)
                .map(|p| p.kind.media_type().to_owned())
                .map_err(|_| UpstreamError::Invalid("a manifest of no known type".into()))?,
        };
        Ok((Bytes::from(body), media_type, digest))
    }
}

impl Cache {
    /// The cache `c` describes, `built_from` that; `old` is the one of its prefix in force,
    /// whose fetches in flight and locks it takes on.
    fn build(
        c: &ProxyCacheConfig,
        built_from: [u8; 32],
        old: Option<&Cache>,
    ) -> anyhow::Result<Cache> {
        c.validate()?;
        let spill_dir = c.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
        let fetches = match old {
            Some(o) if o.fetches.settings() == (spill_dir.as_path(), c.max_fetches) => {
                o.fetches.clone()
            }
            _ => Arc::new(Fetches::new(spill_dir, c.max_fetches)),
        };
        let locks = match old {
            Some(o) => o.locks.clone(),
            None => Arc::new(Locks {
                locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
                seed: Default::default(),
            }),
        };
        Ok(Cache {
            built_from,
            prefix: c.prefix.clone(),
            upstream: Upstream::new(&c.remote())?,
            tag_ttl: Duration::from_secs(c.tag_ttl_seconds),
            repositories: c
                .repositories
                .iter()
                .map(|r| RepoPattern::compile(r))
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            fetches,
            max_blob_bytes: c.max_blob_bytes,
            locks,
        })
    }
}

impl LiveCaches {
    /// The caches `configs` describe (checked with [`config::validate_all`] before).
    pub fn new(configs: &[ProxyCacheConfig]) -> anyhow::Result<Self> {
        let live = LiveCaches {
            table: InForce::new(CacheTable {
                caches: Vec::new(),
                mirrors: mirror::Mirrors::default(),
            }),
            listeners: mirror_listeners(configs),
        };
        let table = live.prepare(configs)?;
        live.table.put(table);
        Ok(live)
    }

    /// The mirror listeners to open (those of the start).
    pub fn listeners(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// Whether `configs` name other mirror listeners than those open (a restart opens them).
    pub fn listeners_differ(&self, configs: &[ProxyCacheConfig]) -> bool {
        mirror_listeners(configs) != self.listeners
    }

    /// The caches `configs` describe, built whole (nothing in force changes): a cache whose
    /// table and files are as they were is the same one, with its fetches in flight.
    pub fn prepare(&self, configs: &[ProxyCacheConfig]) -> anyhow::Result<CacheTable> {
        let now = self.table.get();
        let mut caches = Vec::new();
        let mut mirrors = mirror::Mirrors::default();
        for c in configs {
            c.check_files()?;
            let from = crate::in_force::built_from(
                c,
                &[c.password_file.as_deref(), c.ca_file.as_deref()],
            )?;
            let old = now.caches.iter().find(|k| k.prefix == c.prefix);
            let cache =
                crate::in_force::kept_or_built(old.map(|k| (&k.built_from, k)), &from, || {
                    Cache::build(c, from, old.map(|k| &**k))
                })?;
            caches.push(cache);
            if let Some(l) = c.mirror_listen {
                mirrors.add_port(l.port(), &c.prefix);
            }
            for h in &c.mirror_hosts {
                mirrors.add_host(h, &c.prefix);
            }
        }
        Ok(CacheTable { caches, mirrors })
    }

    /// Whether `table` is other than the caches in force (in any order; a table's
    /// `mirror_hosts` are part of what it was built from).
    pub fn differs(&self, table: &CacheTable) -> bool {
        let sorted = |t: &CacheTable| {
            let mut v: Vec<[u8; 32]> = t.caches.iter().map(|c| c.built_from).collect();
            v.sort();
            v
        };
        sorted(&self.table.get()) != sorted(table)
    }

    /// Puts `table` in force for the requests that start from now on.
    pub fn put(&self, table: CacheTable) {
        self.table.put(table);
    }
}

/// The mirror listeners `configs` name, sorted.
fn mirror_listeners(configs: &[ProxyCacheConfig]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = configs.iter().filter_map(|c| c.mirror_listen).collect();
    v.sort();
    v
}

impl ProxyCaches {
    pub fn new(
        live: Arc<LiveCaches>,
        internal: Arc<crate::registry::internal::Internal>,
        state: Arc<dyn StateStore>,
    ) -> Self {
        ProxyCaches {
            live,
            storage: Arc::new(Storage::new(internal)),
            state,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.live.table.get().caches.is_empty()
    }

    /// The prefix of the mirror requests arriving on local `port` or for `host` are for.
    pub fn mirror_prefix(&self, port: Option<u16>, host: Option<&str>) -> Option<String> {
        let table = self.live.table.get();
        table.mirrors.prefix(port, host).map(str::to_owned)
    }

    /// The cache `repo` is under, and the upstream's name for it.
    fn cache_for<'a>(table: &CacheTable, repo: &'a str) -> Option<(Arc<Cache>, &'a str)> {
        let (first, rest) = repo.split_once('/')?;
        let cache = table.caches.iter().find(|c| c.prefix == first)?;
        Some((cache.clone(), rest))
    }

    /// Whether `repo` is a cache's (its prefix itself included).
    pub fn covers(&self, repo: &str) -> bool {
        Self::covered(&self.live.table.get(), repo)
    }

    fn covered(table: &CacheTable, repo: &str) -> bool {
        let first = repo.split('/').next().unwrap_or(repo);
        table.caches.iter().any(|c| c.prefix == first)
    }

    /// What an admitted `/v2/` request under a cache prefix gets; `None` when it is not
    /// one (forward it as usual). `range` is the client's `Range` header.
    pub async fn answer(
        &self,
        endpoint: &Endpoint,
        range: Option<&str>,
    ) -> Option<(Answer, Outcome)> {
        let repo = endpoint.repository()?.as_str();
        // One table for the whole request.
        let table = self.live.table.get();
        if !Self::covered(&table, repo) {
            return None;
        }
        let refused = |why: &str| {
            Some((
                Answer::Fail(Failure::new(403, Kind::Denied, why.to_owned())),
                Outcome::Error,
            ))
        };
        match endpoint {
            Endpoint::GetManifest { .. }
            | Endpoint::GetBlob { .. }
            | Endpoint::ListTags { .. }
            | Endpoint::Referrers { .. }
            | Endpoint::DeleteManifest { .. }
            | Endpoint::DeleteBlob { .. } => {}
            _ => {
                return refused(&format!(
                    "{repo} is in a pull-through cache: pushes are refused"
                ));
            }
        }
        let Some((cache, name)) = Self::cache_for(&table, repo) else {
            // The prefix itself: nothing upstream; storage answers (404).
            return Some((Answer::Forward, Outcome::Hit));
        };
        if !cache.repositories.is_empty()
            && !cache.repositories.iter().any(|p| p.matches(name, None))
        {
            return refused(&format!(
                "{name} may not be pulled through the {} cache",
                cache.prefix
            ));
        }
        let (answer, outcome) = match endpoint {
            Endpoint::GetManifest { reference, .. } => {
                self.manifest(&cache, repo, name, reference).await
            }
            Endpoint::GetBlob { digest, head, .. } => {
                self.blob(&cache, repo, name, digest, *head, range).await
            }
            // Listings, referrers and deletes (eviction): what storage holds, not counted.
            _ => return Some((Answer::Forward, Outcome::Hit)),
        };
        crate::metrics::cache()
            .results
            .with_label_values(&[&cache.prefix, outcome.label()])
            .inc();
        Some((answer, outcome))
    }

    /// The digest the tag was when last checked with the upstream, if within its TTL (or a
    /// failed check's short grace). A store that cannot answer: none, ask again.
    async fn fresh(&self, key: &str) -> Option<Digest> {
        let v = self.state.get(key).await.ok()??;
        Digest::parse(std::str::from_utf8(&v).ok()?).ok()
    }

    async fn mark_fresh(&self, key: &str, digest: &Digest, ttl: Duration) {
        if let Err(e) = self
            .state
            .set(key, digest.to_string().into_bytes(), ttl)
            .await
        {
            tracing::warn!(error = %e, "pull-through cache: cannot record a tag's check");
        }
    }

    async fn manifest(
        &self,
        cache: &Cache,
        repo: &str,
        name: &str,
        reference: &Reference,
    ) -> (Answer, Outcome) {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(cache, repo, name, d).await,
            Reference::Tag(t) => self.manifest_by_tag(cache, repo, name, t.as_str()).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        cache: &Cache,
        repo: &str,
        name: &str,
        digest: &Digest,
    ) -> (Answer, Outcome) {
        let held = || async {
            self.storage
                .manifest(repo, &digest.to_string())
                .await
                .map(|h| h.is_some())
        };
        match held().await {
            Ok(true) => return (Answer::Forward, Outcome::Hit),
            Ok(false) => {}
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        }
        let _one = cache.lock(&format!("{repo}@{digest}")).lock().await;
        match held().await {
            Ok(true) => return (Answer::Forward, Outcome::Hit),
            Ok(false) => {}
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        }
        let (body, media_type, _) = match cache
            .fetch_manifest(name, &digest.to_string(), Some(digest))
            .await
        {
            Ok(m) => m,
            Err(e) => {
                cache.upstream_failed(&e);
                tracing::warn!(cache = %cache.prefix, repository = %repo, %digest, error = %e, "pull-through cache: upstream failed");
                return (
                    Answer::Fail(cache.failure(&e, ErrorCode::ManifestUnknown)),
                    Outcome::Error,
                );
            }
        };
        match self
            .storage
            .put_manifest(repo, &digest.to_string(), &media_type, body)
            .await
        {
            Ok(()) => (Answer::Forward, Outcome::Miss),
            Err(e) => (Answer::Fail(fail_storage(e)), Outcome::Error),
        }
    }

    async fn manifest_by_tag(
        &self,
        cache: &Cache,
        repo: &str,
        name: &str,
        tag: &str,
    ) -> (Answer, Outcome) {
        let key = tag_key(cache.upstream.url(), repo, tag);
        // Fresh, and storage still has what it was (a delete or retention since makes it
        // ask the upstream again).
        let fresh_and_held = || async {
            let digest = self.fresh(&key).await?;
            let held = self.storage.manifest(repo, tag).await.ok()??;
            (held.digest == digest).then_some(())
        };
        if fresh_and_held().await.is_some() {
            return (Answer::Forward, Outcome::Hit);
        }
        let _one = cache.lock(&key).lock().await;
        if fresh_and_held().await.is_some() {
            return (Answer::Forward, Outcome::Hit);
        }
        let held = match self.storage.manifest(repo, tag).await {
            Ok(h) => h.map(|h| h.digest),
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        };
        let revalidated = |outcome: &str| {
            if held.is_some() {
                crate::metrics::cache()
                    .revalidations
                    .with_label_values(&[&cache.prefix, outcome])
                    .inc();
            }
        };
        match self.ask_upstream(cache, name, tag, held.as_ref()).await {
            Ok(TagNow::Same(d)) => {
                revalidated("same");
                self.mark_fresh(&key, &d, cache.tag_ttl).await;
                (Answer::Forward, Outcome::Hit)
            }
            Ok(TagNow::New {
                body,
                media_type,
                digest,
            }) => {
                revalidated("changed");
                if let Err(e) = self
                    .storage
                    .put_manifest(repo, tag, &media_type, body)
                    .await
                {
                    return (Answer::Fail(fail_storage(e)), Outcome::Error);
                }
                self.mark_fresh(&key, &digest, cache.tag_ttl).await;
                (Answer::Forward, Outcome::Miss)
            }
            Err(e) => {
                cache.upstream_failed(&e);
                revalidated("failed");
                tracing::warn!(cache = %cache.prefix, repository = %repo, tag, error = %e, stale = held.is_some(), "pull-through cache: upstream failed");
                let Some(d) = held else {
                    return (
                        Answer::Fail(cache.failure(&e, ErrorCode::ManifestUnknown)),
                        Outcome::Error,
                    );
                };
                // Served stale; the next requests do not each wait for the upstream again.
                let grace = match e {
                    UpstreamError::RateLimited(Some(after)) => Duration::from_secs(after),
                    _ => STALE_FOR,
                };
                self.mark_fresh(&key, &d, grace.min(STALE_FOR).min(cache.tag_ttl))
                    .await;
                (Answer::Forward, Outcome::Stale)
            }
        }
    }

    /// What the upstream says `tag` is now: the digest storage `held` (then nothing is
    /// fetched), or a new manifest, fetched by the digest its `HEAD` named and checked against
    /// it.
    async fn ask_upstream(
        &self,
        cache: &Cache,
        name: &str,
        tag: &str,
        held: Option<&Digest>,
    ) -> Result<TagNow, UpstreamError> {
        let started = Instant::now();
        let head = cache
            .upstream
            .send(
                Method::HEAD,
                name,
                &format!("manifests/{tag}"),
                Some(MANIFEST_ACCEPT),
            )
            .await;
        cache.observe("head", started);
        let said = head?
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        if let (Some(h), Some(d)) = (held, &said)
            && h == d
        {
            return Ok(TagNow::Same(d.clone()));
        }
        // New or moved (or the HEAD named no digest): by digest when known.
        let reference = said.as_ref().map_or(tag.to_owned(), |d| d.to_string());
        let (body, media_type, digest) = cache
            .fetch_manifest(name, &reference, said.as_ref())
            .await?;
        if held == Some(&digest) {
            return Ok(TagNow::Same(digest));
        }
        Ok(TagNow::New {
            body,
            media_type,
            digest,
        })
    }

    async fn blob(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        name: &str,
        digest: &Digest,
        head: bool,
        range: Option<&str>,
    ) -> (Answer, Outcome) {
        // Whether storage has the blob in `repo` — or has it in another repository of the
        // cache and linked it here (then the answer is `Shared`).
        let linked = std::sync::atomic::AtomicBool::new(false);
        let stored = || async {
            if self
                .storage
                .has_blob(repo, digest)
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(true);
            }
            let shared = self.link_shared(cache, repo, name, digest).await;
            linked.store(shared, std::sync::atomic::Ordering::Relaxed);
            Ok(shared)
        };
        let joined = match cache.fetches.join(repo, digest, !head, stored).await {
            Ok(j) => j,
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        };
        let fetch = match joined {
            Joined::Stored if linked.into_inner() => return (Answer::Forward, Outcome::Shared),
            Joined::Stored => return (Answer::Forward, Outcome::Hit),
            Joined::Running(f) => f,
            Joined::Absent => return self.head_upstream(cache, name, digest).await,
            Joined::Busy => {
                return (
                    Answer::Fail(
                        Failure::new(
                            503,
                            Kind::Unavailable,
                            format!(
                                "the {} cache is fetching as many blobs as it may; try again",
                                cache.prefix
                            ),
                        )
                        .with_header("retry-after", "5"),
                    ),
                    Outcome::Error,
                );
            }
            Joined::Start(f, sink) => {
                self.start_fetch(cache, repo, name, digest, &f, *sink);
                f
            }
        };
        let size = match fetch.size().await {
            Ok(s) => s,
            Err(e) => {
                return (
                    Answer::Fail(cache.failure(&e, ErrorCode::BlobUnknown)),
                    Outcome::Error,
                );
            }
        };
        if head {
            return (
                Answer::Head {
                    digest: digest.clone(),
                    size,
                },
                Outcome::Miss,
            );
        }
        let (start, end, partial) = match oci::range::resolve_range(range, size) {
            oci::range::RangeRequest::Full => (0, size, false),
            oci::range::RangeRequest::Partial { start, end } => (start, end + 1, true),
            oci::range::RangeRequest::Unsatisfiable => {
                return (
                    Answer::Fail(
                        Failure::new(
                            416,
                            Kind::Invalid(ErrorCode::RangeInvalid),
                            format!("range not satisfiable: the blob has {size} bytes"),
                        )
                        .with_header("content-range", format!("bytes */{size}")),
                    ),
                    Outcome::Miss,
                );
            }
        };
        (
            Answer::Stream(Streamed {
                digest: digest.clone(),
                size,
                range: partial.then_some((start, end - 1)),
                reader: fetch.reader(start, end),
            }),
            Outcome::Miss,
        )
    }

    /// Links into `repo` a blob the cache fetched from the same upstream for another of its
    /// repositories, if the upstream says `name` has it (so nobody reads through `repo` what
    /// its upstream image does not hold: this trusts the upstream's `HEAD` of a blob to answer
    /// for that repository, as registries do). Whether it is linked now; any failure (no
    /// record, the upstream unsure, storage no longer holding it) is "no", and the blob is
    /// fetched.
    async fn link_shared(&self, cache: &Cache, repo: &str, name: &str, digest: &Digest) -> bool {
        let key = blob_key(&cache.prefix, cache.upstream.url(), digest);
        let from = match self.state.get(&key).await {
            Ok(Some(v)) => match String::from_utf8(v) {
                Ok(from)
                    if from != repo
                        && from.starts_with(&format!("{}/", cache.prefix))
                        && oci::RepositoryName::parse(&from).is_ok() =>
                {
                    from
                }
                _ => return false,
            },
            _ => return false,
        };
        let named = match &upstream_blob_head(cache, name, digest).await {
            Ok(r) => r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .is_none_or(|d| d == digest.to_string()),
            Err(_) => false,
        };
        if !named {
            // The fetch that follows asks again and answers the client.
            return false;
        }
        match self.storage.mount(repo, &from, digest).await {
            Ok(true) => {
                // Renewed with the repository that holds it from a fetch, not this link.
                remember_blob(self.state.as_ref(), cache, &from, digest).await;
                true
            }
            Ok(false) => {
                // Gone from there (deleted, collected): the next fetch records anew.
                let _ = self.state.delete(&key).await;
                false
            }
            Err(e) => {
                tracing::warn!(cache = %cache.prefix, %digest, error = %e, "pull-through cache: linking a shared blob failed");
                false
            }
        }
    }

    /// `HEAD` of a blob nobody fetches and no other repository of the cache could lend
    /// ([`ProxyCaches::link_shared`]): the upstream's answer, nothing fetched.
    async fn head_upstream(&self, cache: &Cache, name: &str, digest: &Digest) -> (Answer, Outcome) {
        let head = upstream_blob_head(cache, name, digest).await;
        let size = head.and_then(|r| {
            r.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| UpstreamError::Invalid("a blob HEAD without length".into()))
        });
        match size {
            Ok(size) => (
                Answer::Head {
                    digest: digest.clone(),
                    size,
                },
                Outcome::Miss,
            ),
            Err(e) => {
                cache.upstream_failed(&e);
                (
                    Answer::Fail(cache.failure(&e, ErrorCode::BlobUnknown)),
                    Outcome::Error,
                )
            }
        }
    }

    /// Runs a blob's fetch on its own: it goes on when the client that started it leaves
    /// (others may be reading, and the cache wants it).
    fn start_fetch(
        &self,
        cache: &Arc<Cache>,
        repo: &str,
        name: &str,
        digest: &Digest,
        fetch: &Arc<fetch::Fetch>,
        sink: Sink,
    ) {
        let (cache, storage, fetch) = (cache.clone(), self.storage.clone(), fetch.clone());
        let (repo, name, digest) = (repo.to_owned(), name.to_owned(), digest.clone());
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = fetch_blob(&cache, &storage, &repo, &name, &digest, sink).await;
            match &result {
                Ok(()) => remember_blob(state.as_ref(), &cache, &repo, &digest).await,
                Err(e) => {
                    tracing::warn!(cache = %cache.prefix, repository = %repo, %digest, error = %e, "pull-through cache: blob not cached");
                }
            }
            cache.fetches.done(&repo, &digest, &fetch, result.is_ok());
        });
    }
}

/// The upstream's answer to a `HEAD` of the blob `digest` in its repository `name` (`Ok` only
/// for a 200), timed.
async fn upstream_blob_head(
    cache: &Cache,
    name: &str,
    digest: &Digest,
) -> Result<reqwest::Response, UpstreamError> {
    let started = Instant::now();
    let head = cache
        .upstream
        .send(Method::HEAD, name, &format!("blobs/{digest}"), None)
        .await;
    cache.observe("head", started);
    head
}

/// Records that `repo` holds the blob the cache fetched from its upstream.
async fn remember_blob(state: &dyn StateStore, cache: &Cache, repo: &str, digest: &Digest) {
    let key = blob_key(&cache.prefix, cache.upstream.url(), digest);
    let value = repo.as_bytes().to_vec();
    if let Err(e) = state.set(&key, value, BLOB_RECORD_TTL).await {
        tracing::warn!(error = %e, "pull-through cache: cannot record a fetched blob");
    }
}

/// Why a blob was not cached.
#[derive(Debug, thiserror::Error)]
enum NotCached {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("storing it failed: {0:#}")]
    Storage(anyhow::Error),
}

/// One blob from the upstream into the spill file (for readers) and into storage. Every
/// failure of the upstream's goes to the readers (the sink) and to storage (the upload's
/// body ends in an error, so nothing is stored).
async fn fetch_blob(
    cache: &Cache,
    storage: &Storage,
    repo: &str,
    name: &str,
    digest: &Digest,
    mut sink: Sink,
) -> Result<(), NotCached> {
    let started = Instant::now();
    let resp = cache
        .upstream
        .send(Method::GET, name, &format!("blobs/{digest}"), None)
        .await;
    cache.observe("blob", started);
    let size = resp.as_ref().ok().and_then(|r| r.content_length());
    let checked = match (resp, size) {
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err(UpstreamError::Invalid(
            "a blob without Content-Length".into(),
        )),
        (Ok(_), Some(n)) if cache.max_blob_bytes > 0 && n > cache.max_blob_bytes => Err(
            UpstreamError::Invalid(format!("a blob of {n} bytes, over max_blob_bytes")),
        ),
        (Ok(r), Some(n)) => Ok((r, n)),
    };
    let (mut resp, size) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            cache.upstream_failed(&e);
            sink.fail(e.clone());
            return Err(e.into());
        }
    };
    sink.start(size);
    // To storage at the same time, through a small queue: storage's pace bounds the fetch's
    // (the spill file lets clients go at theirs).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let upload = storage.put_blob(repo, digest, size, Queue(rx));
    let pump = async {
        let metrics = crate::metrics::cache();
        let mut to_storage = Some(tx);
        // The upstream's pieces are small (16 KiB and less): they go on in batches, so readers
        // and the upload wake up once per batch, not per piece.
        let mut batch = bytes::BytesMut::new();
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(chunk)) => {
                    batch.extend_from_slice(&chunk);
                    let left = size.saturating_sub(sink.written());
                    if batch.len() < BATCH && (batch.len() as u64) < left {
                        continue;
                    }
                    batch.split().freeze()
                }
                Ok(None) if !batch.is_empty() => batch.split().freeze(),
                Ok(None) => break,
                Err(e) => {
                    let e = UpstreamError::Unreachable(crate::remote::without_url(&e));
                    sink.fail(e.clone());
                    return Err(abandon(cache, to_storage, e));
                }
            };
            metrics
                .upstream_bytes
                .with_label_values(&[&cache.prefix])
                .inc_by(chunk.len() as u64);
            if let Err(e) = sink.write(&chunk).await {
                sink.fail(e.clone());
                return Err(abandon(cache, to_storage, e));
            }
            if let Some(tx) = &to_storage
                && tx.send(Ok(chunk)).await.is_err()
            {
                // Storage gave up; the readers still get their bytes.
                to_storage = None;
            }
        }
        // Checked before the upload's body ends: a wrong blob ends it in an error.
        match sink.finish() {
            Ok(()) => Ok(()),
            Err(e) => Err(abandon(cache, to_storage, e)),
        }
    };
    let (pumped, uploaded) = tokio::join!(pump, upload);
    pumped?;
    uploaded.map_err(NotCached::Storage)
}

/// A fetch that failed: counted, and the storage upload's body ended in an error (so storage
/// keeps nothing of it).
fn abandon(
    cache: &Cache,
    to_storage: Option<tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>>,
    e: UpstreamError,
) -> UpstreamError {
    cache.upstream_failed(&e);
    if let Some(tx) = to_storage {
        // The queue may be full of good bytes; the error waits its turn (or storage is gone).
        tokio::spawn(async move {
            let _ = tx
                .send(Err(std::io::Error::other("the upstream fetch failed")))
                .await;
        });
    }
    e
}

/// The receiving end of the queue to storage, as the body stream of its upload.
struct Queue(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_util::Stream for Queue {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
