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
//!   `tag_ttl_seconds` ago, in the shared state store); after that one upstream `HEAD`
//!   revalidates it, and a changed tag is fetched and stored first. When the upstream cannot
//!   be asked (unreachable, slow, 429, 5xx) the cached copy is served (stale).
//! - A cold manifest is fetched, checked against its digest and stored as a cached copy (its
//!   blobs and an index's children are fetched when asked for: only the platform pulled).
//! - A cold blob is fetched once however many clients ask ([`fetch`]): every client reads it
//!   as it arrives while it is uploaded to storage, which makes it visible only once the
//!   digest matched.
//!
//! Rooms: [`config`] (the table), [`upstream`] (the upstream registry as a client, its auth),
//! [`storage`] (the cache's own requests to storage), [`fetch`] (blobs in flight).

pub mod config;
pub mod fetch;
pub mod storage;
pub mod upstream;

use crate::reply::{Failure, Kind};
use crate::state::StateStore;
use bytes::Bytes;
use fetch::{Fetches, Joined, Reader, Sink};
use oci::route::Endpoint;
use oci::{Digest, ErrorCode, Reference};
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use policy::pattern::RepoPattern;
use reqwest::Method;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::Storage;
use upstream::{MANIFEST_ACCEPT, Upstream, UpstreamError};

pub use config::ProxyCacheConfig;

/// Largest manifest taken from an upstream (storage's own limit is the same).
const MAX_MANIFEST: usize = 4 << 20;
/// Locks that serialise cold fetches of one tag or manifest (by hash of its name).
const LOCKS: usize = 64;

/// One `[[proxy_cache]]`.
pub struct Cache {
    prefix: String,
    upstream: Upstream,
    tag_ttl: Duration,
    repositories: Vec<RepoPattern>,
    fetches: Fetches,
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// Every cache of the gateway, and where mirror requests arrive.
pub struct ProxyCaches {
    caches: Vec<Arc<Cache>>,
    by_port: HashMap<u16, usize>,
    by_host: HashMap<String, usize>,
    storage: Arc<Storage>,
    state: Arc<dyn StateStore>,
}

/// What a request under a cache prefix gets.
pub enum Answer {
    /// Storage has it: forward the request as authorized.
    Forward,
    /// This error.
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

/// How the answer came about, for the audit event and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Error,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Error => "error",
        }
    }
}

fn fail_storage(e: impl std::fmt::Display) -> Failure {
    tracing::warn!(error = %e, "pull-through cache: storage failed");
    Failure::new(503, Kind::Unavailable, "storage is unavailable, try again")
}

impl Cache {
    fn lock(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.locks[(h.finish() as usize) % LOCKS]
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

    /// What a client is told when the upstream gave nothing and we hold nothing.
    fn failure(&self, e: &UpstreamError, unknown: ErrorCode) -> Failure {
        let url = self.upstream.url();
        match e {
            UpstreamError::NotFound => Failure::new(
                404,
                Kind::Invalid(unknown),
                format!("not in this cache, and the upstream {url} has no such content"),
            ),
            UpstreamError::RateLimited(after) => Failure::new(
                429,
                Kind::TooMany,
                format!("the upstream {url} is rate limiting this cache; try again later"),
            )
            .with_header("retry-after", after.unwrap_or(60).to_string()),
            _ => Failure::new(
                502,
                Kind::Unavailable,
                format!("not in this cache, and the upstream {url} failed: {e}"),
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
        let mut resp = resp?;
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
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_MANIFEST {
                return Err(UpstreamError::Invalid("a manifest over 4 MiB".into()));
            }
            body.extend_from_slice(&chunk);
        }
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

impl ProxyCaches {
    pub fn new(
        configs: &[ProxyCacheConfig],
        nodes: Arc<LoadBalancer<RoundRobin>>,
        secret: zeroize::Zeroizing<String>,
        state: Arc<dyn StateStore>,
        spill_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        config::validate_all(configs)?;
        let mut caches = Vec::new();
        let mut by_port = HashMap::new();
        let mut by_host = HashMap::new();
        for (i, c) in configs.iter().enumerate() {
            caches.push(Arc::new(Cache {
                prefix: c.prefix.clone(),
                upstream: Upstream::new(c)?,
                tag_ttl: Duration::from_secs(c.tag_ttl_seconds),
                repositories: c
                    .repositories
                    .iter()
                    .map(|r| RepoPattern::compile(r))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                fetches: Fetches::new(spill_dir.clone()),
                locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            }));
            if let Some(l) = c.mirror_listen {
                by_port.insert(l.port(), i);
            }
            for h in &c.mirror_hosts {
                by_host.insert(h.to_ascii_lowercase(), i);
            }
        }
        Ok(ProxyCaches {
            caches,
            by_port,
            by_host,
            storage: Arc::new(Storage::new(nodes, secret)?),
            state,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    /// The prefix requests arriving on local `port` or for `host` get (a mirror's).
    pub fn mirror_prefix(&self, port: Option<u16>, host: Option<&str>) -> Option<&str> {
        let by_port = port.and_then(|p| self.by_port.get(&p));
        let by_host = || {
            let host = host?;
            // `Host: name:port` or `[v6]:port`.
            let name = match host.rsplit_once(':') {
                Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
                _ => host,
            };
            self.by_host.get(&name.to_ascii_lowercase())
        };
        by_port
            .or_else(by_host)
            .map(|&i| self.caches[i].prefix.as_str())
    }

    /// The cache `repo` is under, and the upstream's name for it.
    fn of<'a>(&self, repo: &'a str) -> Option<(&Arc<Cache>, &'a str)> {
        let (first, rest) = repo.split_once('/')?;
        let cache = self.caches.iter().find(|c| c.prefix == first)?;
        Some((cache, rest))
    }

    /// Whether `repo` is a cache's (its prefix itself included).
    fn covers(&self, repo: &str) -> bool {
        let first = repo.split('/').next().unwrap_or(repo);
        self.caches.iter().any(|c| c.prefix == first)
    }

    /// What an admitted `/v2/` request under a cache prefix gets; `None` when it is not
    /// one (forward it as usual). `range` is the client's `Range` header.
    pub async fn answer(
        &self,
        endpoint: &Endpoint,
        range: Option<&str>,
    ) -> Option<(Answer, Outcome)> {
        let repo = endpoint.repository()?.as_str();
        if !self.covers(repo) {
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
        let Some((cache, name)) = self.of(repo) else {
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
                self.manifest(cache, repo, name, reference).await
            }
            Endpoint::GetBlob { digest, head, .. } => {
                self.blob(cache, repo, name, digest, *head, range).await
            }
            // Listings, referrers and deletes (eviction): what storage holds.
            _ => (Answer::Forward, Outcome::Hit),
        };
        crate::metrics::cache()
            .results
            .with_label_values(&[&cache.prefix, outcome.label()])
            .inc();
        Some((answer, outcome))
    }

    fn tag_key(repo: &str, tag: &str) -> String {
        format!("proxy:tag:{repo}:{tag}")
    }

    /// Whether the tag was checked with the upstream within its TTL (a store that cannot
    /// answer: no, ask again).
    async fn fresh(&self, key: &str) -> bool {
        matches!(self.state.get(key).await, Ok(Some(_)))
    }

    async fn mark_fresh(&self, cache: &Cache, key: &str, digest: &Digest) {
        if let Err(e) = self
            .state
            .set(key, digest.to_string().into_bytes(), cache.tag_ttl)
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
        let key = Self::tag_key(repo, tag);
        if self.fresh(&key).await {
            return (Answer::Forward, Outcome::Hit);
        }
        let _one = cache.lock(&key).lock().await;
        if self.fresh(&key).await {
            return (Answer::Forward, Outcome::Hit);
        }
        let held = match self.storage.manifest(repo, tag).await {
            Ok(h) => h,
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        };
        let metrics = crate::metrics::cache();
        let revalidated = |outcome: &str| {
            if held.is_some() {
                metrics
                    .revalidations
                    .with_label_values(&[&cache.prefix, outcome])
                    .inc();
            }
        };
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
        let stale = |e: UpstreamError| {
            cache.upstream_failed(&e);
            revalidated("failed");
            if held.is_some() {
                tracing::warn!(cache = %cache.prefix, repository = %repo, tag, error = %e, "pull-through cache: upstream failed; serving the cached tag");
                (Answer::Forward, Outcome::Stale)
            } else {
                tracing::warn!(cache = %cache.prefix, repository = %repo, tag, error = %e, "pull-through cache: upstream failed");
                (
                    Answer::Fail(cache.failure(&e, ErrorCode::ManifestUnknown)),
                    Outcome::Error,
                )
            }
        };
        let upstream_digest = match head {
            Ok(resp) => resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok()),
            Err(e) => return stale(e),
        };
        if let (Some(h), Some(d)) = (&held, &upstream_digest)
            && &h.digest == d
        {
            revalidated("same");
            self.mark_fresh(cache, &key, d).await;
            return (Answer::Forward, Outcome::Hit);
        }
        // New or moved (or the upstream's HEAD named no digest): fetch it, by digest when
        // known so the body is checked against what the HEAD said.
        let reference = upstream_digest
            .as_ref()
            .map_or(tag.to_owned(), |d| d.to_string());
        let (body, media_type, digest) = match cache
            .fetch_manifest(name, &reference, upstream_digest.as_ref())
            .await
        {
            Ok(m) => m,
            Err(e) => return stale(e),
        };
        if held.as_ref().is_some_and(|h| h.digest == digest) {
            revalidated("same");
            self.mark_fresh(cache, &key, &digest).await;
            return (Answer::Forward, Outcome::Hit);
        }
        revalidated("changed");
        if let Err(e) = self
            .storage
            .put_manifest(repo, tag, &media_type, body)
            .await
        {
            return (Answer::Fail(fail_storage(e)), Outcome::Error);
        }
        self.mark_fresh(cache, &key, &digest).await;
        (Answer::Forward, Outcome::Miss)
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
        let stored = || async {
            self.storage
                .has_blob(repo, digest)
                .await
                .map_err(|e| e.to_string())
        };
        // The warm path asks storage without the fetches' lock.
        match stored().await {
            Ok(true) => return (Answer::Forward, Outcome::Hit),
            Ok(false) => {}
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        }
        let joined = match cache.fetches.join(repo, digest, !head, stored).await {
            Ok(j) => j,
            Err(e) => return (Answer::Fail(fail_storage(e)), Outcome::Error),
        };
        let fetch = match joined {
            Joined::Stored => return (Answer::Forward, Outcome::Hit),
            Joined::Running(f) => f,
            Joined::Absent => return self.head_upstream(cache, name, digest).await,
            Joined::Start(f, sink) => {
                self.start_fetch(cache, repo, name, digest, *sink);
                f
            }
        };
        let size = match fetch.size().await {
            Ok(s) => s,
            Err(e) => {
                return (
                    Answer::Fail(Failure::new(
                        502,
                        Kind::Unavailable,
                        format!("the upstream {} failed: {e}", cache.upstream.url()),
                    )),
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

    /// `HEAD` of a blob nobody fetches: the upstream's answer, nothing fetched.
    async fn head_upstream(&self, cache: &Cache, name: &str, digest: &Digest) -> (Answer, Outcome) {
        let started = Instant::now();
        let head = cache
            .upstream
            .send(Method::HEAD, name, &format!("blobs/{digest}"), None)
            .await;
        cache.observe("head", started);
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
    fn start_fetch(&self, cache: &Arc<Cache>, repo: &str, name: &str, digest: &Digest, sink: Sink) {
        let (cache, storage) = (cache.clone(), self.storage.clone());
        let (repo, name, digest) = (repo.to_owned(), name.to_owned(), digest.clone());
        tokio::spawn(async move {
            let result = fetch_blob(&cache, &storage, &repo, &name, &digest, sink).await;
            if let Err(e) = &result {
                tracing::warn!(cache = %cache.prefix, repository = %repo, %digest, error = %e, "pull-through cache: blob not cached");
            }
            cache.fetches.done(&repo, &digest).await;
        });
    }
}

/// A token request's form (`GET /token?…` or a `POST` body) as it arrived on a mirror: each
/// `repository:<name>:<actions>` scope names `<prefix>/<name>`, the repository the mirror's
/// requests are rewritten to (docker asks for scopes of the names it pulls, not those of the
/// challenge). Other parameters and scopes stay as they are.
pub fn mirror_scopes(prefix: &str, form: &str) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(form.as_bytes()) {
        if k != "scope" {
            out.append_pair(&k, &v);
            continue;
        }
        let scopes: Vec<String> = v
            .split(' ')
            .map(|scope| match scope.strip_prefix("repository:") {
                Some(rest) if !rest.is_empty() => format!("repository:{prefix}/{rest}"),
                _ => scope.to_owned(),
            })
            .collect();
        out.append_pair("scope", &scopes.join(" "));
    }
    out.finish()
}

/// One blob from the upstream into the spill file (for readers) and into storage.
async fn fetch_blob(
    cache: &Cache,
    storage: &Storage,
    repo: &str,
    name: &str,
    digest: &Digest,
    mut sink: Sink,
) -> Result<(), String> {
    let started = Instant::now();
    let resp = cache
        .upstream
        .send(Method::GET, name, &format!("blobs/{digest}"), None)
        .await;
    cache.observe("blob", started);
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            cache.upstream_failed(&e);
            let why = e.to_string();
            sink.fail(why.clone());
            return Err(why);
        }
    };
    let Some(size) = resp.content_length() else {
        let why = "the upstream sent a blob without Content-Length".to_string();
        sink.fail(why.clone());
        return Err(why);
    };
    sink.start(size);
    // To storage at the same time, through a small queue: storage's pace bounds the fetch's
    // (the spill file lets clients go at theirs).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let upload = storage.put_blob(repo, digest, size, Queue(rx));
    let pump = async {
        let metrics = crate::metrics::cache();
        let mut to_storage = Some(tx);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    metrics
                        .upstream_bytes
                        .with_label_values(&[&cache.prefix])
                        .inc_by(chunk.len() as u64);
                    sink.write(&chunk).await?;
                    if let Some(tx) = &to_storage
                        && tx.send(Ok(chunk)).await.is_err()
                    {
                        // Storage gave up; the readers still get their bytes.
                        to_storage = None;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let why = format!("the upstream body failed: {e}");
                    if let Some(tx) = &to_storage {
                        let _ = tx.send(Err(std::io::Error::other(why.clone()))).await;
                    }
                    sink.fail(why.clone());
                    return Err(why);
                }
            }
        }
        if let Err(why) = sink.finish() {
            if let Some(tx) = &to_storage {
                let _ = tx.send(Err(std::io::Error::other(why.clone()))).await;
            }
            return Err(why);
        }
        Ok(())
    };
    let (pumped, uploaded) = tokio::join!(pump, upload);
    pumped?;
    uploaded.map_err(|e| format!("storing the blob: {e:#}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_token_requests_ask_for_the_prefixed_repositories() {
        assert_eq!(
            mirror_scopes(
                "hub",
                "service=portcullis&scope=repository%3Alibrary%2Falpine%3Apull&scope=registry%3Acatalog%3A*"
            ),
            "service=portcullis&scope=repository%3Ahub%2Flibrary%2Falpine%3Apull&scope=registry%3Acatalog%3A*"
        );
        assert_eq!(
            mirror_scopes("hub", "scope=repository:a:pull+repository:b:pull"),
            "scope=repository%3Ahub%2Fa%3Apull+repository%3Ahub%2Fb%3Apull"
        );
        assert_eq!(
            mirror_scopes("hub", "grant_type=password"),
            "grant_type=password"
        );
    }
}
