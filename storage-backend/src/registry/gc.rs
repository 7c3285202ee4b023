//! Online garbage collection: mark and sweep over the store while pushes and pulls go on, on
//! any driver, with several storage nodes on one store.
//!
//! **What is live.** Per repository: every tagged manifest; every other manifest revision
//! unless `delete_untagged` is set and its link is older than `untagged_grace`; the children
//! of a live index and the referrers of a live manifest, transitively. A live manifest keeps
//! its own blob, its config and layers, and the repository's links to them. A layer link
//! younger than `grace` keeps its blob (a push in progress: blobs come before their
//! manifest). A blob whose data is younger than `grace` is never deleted. Upload sessions are
//! not blobs; those started more than `upload_max_age` ago are purged.
//!
//! **Fencing against concurrent pushes.** A run:
//!
//! 1. takes the GC lease (one object in the store, `_gc/lease`, created if absent or taken
//!    over by compare-and-swap when expired, renewed by compare-and-swap): one GC at a time
//!    across every node on the store;
//! 2. marks (scan 1) and computes the candidates: unreferenced old blobs, unreferenced old
//!    layer links, untagged old revisions;
//! 3. sets the lease's phase to `sweep`, then writes a marker `condemned <run>` next to each
//!    candidate (`…/gc`);
//! 4. waits `fence`;
//! 5. marks again (scan 2) and keeps only candidates still unreferenced;
//! 6. deletes each remaining candidate only after winning a compare-and-swap of its marker
//!    from `condemned <run>` to `deleting <run>`: the object, then the marker, then the
//!    directory if it is empty.
//!
//! A push that makes a new reference to existing content (a manifest PUT, an upload of a blob
//! the store already has, a mount) first reads the lease; while a run sweeps, it swaps the
//! markers of everything it references from `condemned <run>` to `rescued <run>` before it
//! writes anything, and fails as if the content were unknown if one says `deleting <run>`
//! (the client uploads it again). Either the push's swap or the GC's wins, never both. A push
//! that read the lease before step 3 commits within `fence` (requests take seconds, the fence
//! is 30 s by default), so scan 2 sees what it wrote. Markers of another run (a GC that died)
//! are inert: only the live run's markers count, and a dead run's lease expires.
//!
//! A link or manifest that cannot be read or parsed is reported and skipped; a scan that could
//! not read a whole repository is incomplete, and an incomplete run deletes no blob.

use super::{Registry, Result};
use crate::layout::{Key, gc_marker};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci::media_type;
use oci::{Digest, RepositoryName};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Markers written and candidates swept at once (each a few store requests; on the
/// filesystem each an `fsync`).
const PARALLEL: usize = 16;

/// How a run is made.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would go; delete nothing.
    pub dry_run: bool,
    /// Blobs and layer links younger than this are kept.
    pub grace: Duration,
    /// Delete manifests no tag (and no live index or subject) refers to.
    pub delete_untagged: bool,
    /// Untagged manifests younger than this are kept.
    pub untagged_grace: Duration,
    /// Upload sessions started longer ago than this are purged.
    pub upload_max_age: Duration,
    /// Wait between condemning and the second scan.
    pub fence: Duration,
    /// How long the lease holds without renewal.
    pub lease: Duration,
    /// Who runs it (in the lease and the report).
    pub holder: String,
    /// Apply the policy's retention rules first: the tags they delete are deleted (a
    /// compare-and-swap to a tombstone, never an immutable tag), and the manifests they
    /// delete, or left without a tag, are swept with the rest.
    pub retention: Option<std::sync::Arc<policy::Policy>>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            grace: Duration::from_secs(3600),
            delete_untagged: false,
            untagged_grace: Duration::from_secs(86_400),
            upload_max_age: Duration::from_secs(86_400),
            fence: Duration::from_secs(30),
            lease: Duration::from_secs(600),
            holder: "storage-backend".into(),
            retention: None,
        }
    }
}

/// A deleted (or, in a dry run, deletable) blob.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct SweptBlob {
    pub digest: String,
    pub size: u64,
}

/// A tag or an untagged manifest retention deletes.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetentionDeletion {
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub reason: String,
}

/// Retention's decisions for one repository, made once per run (scan 1) and held for scan 2.
#[derive(Debug, Clone, Default)]
struct RepoRetention {
    /// Tags to delete: (tag, what it pointed to, why).
    tags: Vec<(String, Digest, String)>,
    /// Untagged manifests to delete: (digest, why).
    untagged: Vec<(Digest, String)>,
    /// Manifests that stop being roots: the untagged ones, and those all of whose tags go.
    manifests: HashSet<Digest>,
}

/// What a run did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub run: String,
    pub holder: String,
    pub dry_run: bool,
    /// Another node's run held the lease: nothing was done.
    pub busy: Option<String>,
    pub started: String,
    pub finished: String,
    /// The same, in milliseconds since the epoch.
    pub started_ms: u64,
    pub finished_ms: u64,
    pub duration_seconds: f64,
    pub repositories: usize,
    pub manifests_marked: usize,
    pub blobs_marked: usize,
    pub blobs_seen: usize,
    pub blobs_deleted: Vec<SweptBlob>,
    pub bytes_reclaimed: u64,
    /// `<repository>@<digest>`.
    pub layer_links_deleted: Vec<String>,
    /// `<repository>@<digest>`.
    pub manifests_deleted: Vec<String>,
    /// `<repository>/<session id>`.
    pub uploads_purged: Vec<String>,
    /// What retention deleted (or, in a dry run, would delete), and why.
    pub retention: Vec<RetentionDeletion>,
    /// Candidates a push referenced again before they were deleted.
    pub rescued: usize,
    /// Unreadable or corrupt objects, and failures that did not stop the run.
    pub errors: Vec<String>,
    /// Every repository was read: blobs could be swept.
    pub complete: bool,
}

/// The lease's content.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Lease {
    run: String,
    holder: String,
    /// `mark` or `sweep`.
    phase: String,
    /// Seconds since the epoch.
    expires: u64,
}

impl Lease {
    fn live(&self) -> bool {
        self.expires > unix(SystemTime::now())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One repository as a scan saw it.
#[derive(Debug, Default)]
struct RepoScan {
    name: String,
    /// Retention's decisions (with a retention policy).
    retention: Option<RepoRetention>,
    /// Layer links nothing live refers to, older than the grace window.
    dead_links: Vec<Digest>,
    /// Untagged revisions to delete (only with `delete_untagged`).
    dead_revisions: Vec<Digest>,
    /// Upload sessions older than `upload_max_age`.
    stale_uploads: Vec<String>,
}

#[derive(Debug, Default)]
struct Scan {
    live_blobs: HashSet<Digest>,
    repos: Vec<RepoScan>,
    manifests_marked: usize,
    errors: Vec<String>,
    complete: bool,
}

/// References a manifest makes: its blobs and its child manifests.
#[derive(Debug, Clone, Default)]
struct Refs {
    blobs: Vec<Digest>,
    children: Vec<Digest>,
}

fn digest_of(alg: &str, hex: &str) -> Option<Digest> {
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

impl Registry {
    /// Every repository in the store: directories under `repositories/` holding registry
    /// data (`_manifests`, `_layers`, `_uploads`, `_referrers`); with `manifests_only`, only
    /// those holding manifests (the catalog).
    pub(crate) async fn repository_names(&self, manifests_only: bool) -> Result<Vec<String>> {
        let root = Key::Repositories.path();
        let mut found = Vec::new();
        // Depth-first; components starting with `_` are registry data, never names.
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let dir = if rel.is_empty() {
                root.clone()
            } else {
                format!("{root}/{rel}")
            };
            let mut is_repo = false;
            for child in self.driver.list(&dir).await? {
                if child.starts_with('_') {
                    is_repo |= child == "_manifests"
                        || (!manifests_only
                            && matches!(child.as_str(), "_layers" | "_uploads" | "_referrers"));
                } else {
                    stack.push(if rel.is_empty() {
                        child
                    } else {
                        format!("{rel}/{child}")
                    });
                }
            }
            if is_repo && RepositoryName::parse(&rel).is_ok() {
                found.push(rel);
            }
        }
        Ok(found)
    }

    /// `(digest, link modification time)` of every `<alg>/<hex>/link` under `prefix`.
    async fn links_under(
        &self,
        prefix: &str,
        errors: &mut Vec<String>,
    ) -> Result<Vec<(Digest, SystemTime)>> {
        let mut out = Vec::new();
        for alg in self.driver.list(prefix).await? {
            for hex in self.driver.list(&format!("{prefix}/{alg}")).await? {
                let link = format!("{prefix}/{alg}/{hex}/link");
                let Some(digest) = digest_of(&alg, &hex) else {
                    errors.push(format!("{link}: not a digest path"));
                    continue;
                };
                match self.driver.get(&link).await? {
                    // A directory without its link: a half-deleted entry, nothing to keep.
                    None => {}
                    Some(text) if String::from_utf8_lossy(&text).trim() != digest.to_string() => {
                        errors.push(format!("{link}: corrupt link (does not name {digest})"));
                    }
                    Some(_) => {
                        let modified = self
                            .driver
                            .stat(&link)
                            .await?
                            .map_or(SystemTime::now(), |m| m.modified);
                        out.push((digest, modified));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The references of a manifest blob (cached across repositories); `None` if it is
    /// missing or not a manifest.
    async fn manifest_refs(
        &self,
        digest: &Digest,
        cache: &mut HashMap<Digest, Option<Refs>>,
        errors: &mut Vec<String>,
    ) -> Result<Option<Refs>> {
        if let Some(r) = cache.get(digest) {
            return Ok(r.clone());
        }
        let refs = match self.driver.get(&Key::Blob(digest).path()).await? {
            None => {
                errors.push(format!("manifest {digest}: content missing"));
                None
            }
            Some(body) => match media_type::parse_manifest(None, &body) {
                Ok(p) => Some(Refs {
                    blobs: p.blob_references().map(|d| d.digest.clone()).collect(),
                    children: p.manifests.iter().map(|d| d.digest.clone()).collect(),
                }),
                Err(e) => {
                    errors.push(format!("manifest {digest}: unreadable ({e})"));
                    None
                }
            },
        };
        cache.insert(digest.clone(), refs.clone());
        Ok(refs)
    }

    /// One repository: what is live in it and what is dead.
    async fn scan_repo(
        &self,
        name: &str,
        t0: SystemTime,
        opts: &GcOptions,
        scan: &mut Scan,
        cache: &mut HashMap<Digest, Option<Refs>>,
        fixed: Option<&RepoRetention>,
    ) -> Result<RepoScan> {
        let repo = format!("{}/{name}", Key::Repositories.path());
        let mut out = RepoScan {
            name: name.to_string(),
            ..Default::default()
        };
        let errors = &mut scan.errors;
        // Roots: tagged manifests, and untagged ones unless they are to go.
        let mut tagged: Vec<(String, Digest, SystemTime)> = Vec::new();
        let tags = format!("{repo}/_manifests/tags");
        for tag in self.driver.list(&tags).await? {
            let link = format!("{tags}/{tag}/current/link");
            if let Some(text) = self.driver.get(&link).await? {
                let text = String::from_utf8_lossy(&text);
                match Digest::parse(text.trim()) {
                    Ok(d) => {
                        let modified = match fixed.is_none() && opts.retention.is_some() {
                            true => self.driver.stat(&link).await?.map_or(t0, |m| m.modified),
                            false => t0,
                        };
                        tagged.push((tag, d, modified));
                    }
                    Err(_) if text.starts_with(super::TAG_TOMBSTONE) => {}
                    Err(_) => errors.push(format!("{link}: corrupt tag link")),
                }
            }
        }
        let revisions = self
            .links_under(&format!("{repo}/_manifests/revisions"), errors)
            .await?;
        out.retention = match (fixed, &opts.retention) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(policy)) => Some(plan_retention(policy, name, &tagged, &revisions, t0)),
            (None, None) => None,
        };
        let dropped = out.retention.as_ref().map(|r| &r.manifests);
        let deleted_tag = |tag: &str, d: &Digest| {
            out.retention
                .as_ref()
                .is_some_and(|r| r.tags.iter().any(|(t, td, _)| t == tag && td == d))
        };
        let mut kept: Vec<Digest> = tagged
            .iter()
            .filter(|(t, d, _)| !deleted_tag(t, d))
            .map(|(_, d, _)| d.clone())
            .collect();
        let untagged_cutoff = t0.checked_sub(opts.untagged_grace).unwrap_or(UNIX_EPOCH);
        // Retention's manifests stop being roots, unless pushed again since the run began.
        let retained = |d: &Digest, modified: &SystemTime| {
            !(dropped.is_some_and(|m| m.contains(d)) && *modified <= t0)
        };
        for (d, modified) in &revisions {
            if (!opts.delete_untagged || *modified > untagged_cutoff) && retained(d, modified) {
                kept.push(d.clone());
            }
        }
        // Closure over index children and referrers.
        let mut live: HashSet<Digest> = HashSet::new();
        let mut referenced: HashSet<Digest> = HashSet::new();
        while let Some(m) = kept.pop() {
            if !live.insert(m.clone()) {
                continue;
            }
            scan.live_blobs.insert(m.clone());
            if let Some(refs) = self.manifest_refs(&m, cache, errors).await? {
                for b in refs.blobs {
                    scan.live_blobs.insert(b.clone());
                    referenced.insert(b);
                }
                kept.extend(refs.children);
            }
            let referrers = format!("{repo}/_referrers/{}/{}", m.algorithm(), m.hex());
            for (r, _) in self.links_under(&referrers, errors).await? {
                kept.push(r);
            }
        }
        scan.manifests_marked += live.len();
        out.dead_revisions = revisions
            .into_iter()
            .filter(|(d, _)| {
                !live.contains(d)
                    && (opts.delete_untagged || dropped.is_some_and(|m| m.contains(d)))
            })
            .map(|(d, _)| d)
            .collect();
        let cutoff = t0.checked_sub(opts.grace).unwrap_or(UNIX_EPOCH);
        for (d, modified) in self.links_under(&format!("{repo}/_layers"), errors).await? {
            if referenced.contains(&d) {
                continue;
            }
            if modified > cutoff {
                // A push in progress: its manifest has not come yet.
                scan.live_blobs.insert(d);
            } else {
                out.dead_links.push(d);
            }
        }
        let uploads = format!("{repo}/_uploads");
        let upload_cutoff = t0.checked_sub(opts.upload_max_age).unwrap_or(UNIX_EPOCH);
        for id in self.driver.list(&uploads).await? {
            if self
                .upload_age(&format!("{uploads}/{id}"))
                .await?
                .is_some_and(|started| started < upload_cutoff)
            {
                out.stale_uploads.push(id);
            }
        }
        Ok(out)
    }

    /// When an upload session (its directory, `session`) began: its `startedat`, else its
    /// data's last write. `None` while it has neither: a session being created (the first
    /// write under it has begun and `startedat` is not in place yet) or being removed, and
    /// never stale then. Purging such a session would race its creation.
    async fn upload_age(&self, session: &str) -> Result<Option<SystemTime>> {
        for object in ["startedat", "data"] {
            if let Some(m) = self.driver.stat(&format!("{session}/{object}")).await? {
                return Ok(Some(m.modified));
            }
        }
        Ok(None)
    }

    /// Marks everything live in the store; retention decides anew unless `plans` (scan 1's
    /// decisions, by repository) are given.
    async fn scan(
        &self,
        t0: SystemTime,
        opts: &GcOptions,
        lease: Option<&mut Lease>,
        plans: Option<&HashMap<String, RepoRetention>>,
    ) -> Result<Scan> {
        let mut scan = Scan {
            complete: true,
            ..Default::default()
        };
        let mut cache = HashMap::new();
        let mut lease = lease;
        let mut renewed = SystemTime::now();
        for name in self.repository_names(false).await? {
            let fixed = plans.map(|p| p.get(&name).cloned().unwrap_or_default());
            match self
                .scan_repo(&name, t0, opts, &mut scan, &mut cache, fixed.as_ref())
                .await
            {
                Ok(r) => scan.repos.push(r),
                Err(e) => {
                    scan.errors.push(format!("repository {name}: {e}"));
                    scan.complete = false;
                }
            }
            if let Some(l) = lease.as_deref_mut()
                && renewed.elapsed().unwrap_or_default() > opts.lease / 3
            {
                self.renew_lease(l, opts, None).await?;
                renewed = SystemTime::now();
            }
        }
        Ok(scan)
    }

    /// Every blob: `(digest, size, modified)`.
    pub(crate) async fn all_blobs(&self) -> Result<Vec<(Digest, u64, SystemTime)>> {
        let root = Key::Blobs.path();
        let mut out = Vec::new();
        for alg in self.driver.list(&root).await? {
            for pre in self.driver.list(&format!("{root}/{alg}")).await? {
                for hex in self.driver.list(&format!("{root}/{alg}/{pre}")).await? {
                    let Some(d) = digest_of(&alg, &hex) else {
                        continue;
                    };
                    if let Some(meta) = self.driver.stat(&Key::Blob(&d).path()).await? {
                        out.push((d, meta.size, meta.modified));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn read_lease(&self) -> Result<Option<(Lease, Bytes)>> {
        let Some(raw) = self.driver.get(&Key::GcLease.path()).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<Lease>(&raw).ok().map(|l| (l, raw)))
    }

    fn lease_bytes(l: &Lease) -> Bytes {
        serde_json::to_vec(l).expect("a lease serialises").into()
    }

    /// Takes the lease for `run`; `Err(holder)` if a live run of another holds it.
    async fn acquire_lease(
        &self,
        run: &str,
        opts: &GcOptions,
    ) -> Result<std::result::Result<Lease, String>> {
        let lease = Lease {
            run: run.into(),
            holder: opts.holder.clone(),
            phase: "mark".into(),
            expires: unix(SystemTime::now() + opts.lease),
        };
        let key = Key::GcLease.path();
        loop {
            if self
                .driver
                .put_if_absent(&key, Self::lease_bytes(&lease))
                .await?
            {
                return Ok(Ok(lease));
            }
            let Some(raw) = self.driver.get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<Lease>(&raw) {
                Ok(held) if held.live() => return Ok(Err(held.holder)),
                // Expired (its run died) or unreadable: take it over.
                _ => {
                    if self
                        .driver
                        .put_if_current(&key, Self::lease_bytes(&lease), Some(raw))
                        .await?
                    {
                        return Ok(Ok(lease));
                    }
                }
            }
        }
    }

    /// Extends the lease (and sets its phase); fails if it was lost.
    async fn renew_lease(
        &self,
        l: &mut Lease,
        opts: &GcOptions,
        phase: Option<&str>,
    ) -> Result<()> {
        let old = Self::lease_bytes(l);
        let mut next = l.clone();
        next.expires = unix(SystemTime::now() + opts.lease);
        if let Some(p) = phase {
            next.phase = p.into();
        }
        if !self
            .driver
            .put_if_current(&Key::GcLease.path(), Self::lease_bytes(&next), Some(old))
            .await?
        {
            return Err(super::Error::Storage(std::io::Error::other(
                "the GC lease was lost (expired and taken over): run stopped",
            )));
        }
        *l = next;
        Ok(())
    }

    async fn release_lease(&self, l: &Lease) {
        let key = Key::GcLease.path();
        if let Ok(Some(raw)) = self.driver.get(&key).await
            && raw == Self::lease_bytes(l)
        {
            let _ = self.driver.delete(&key).await;
        }
    }

    /// The run now sweeping, if any (what a push checks before referencing content).
    async fn sweeping_run(&self) -> Result<Option<String>> {
        Ok(self
            .read_lease()
            .await?
            .map(|(l, _)| l)
            .filter(|l| l.phase == "sweep" && l.live())
            .map(|l| l.run))
    }

    /// Keeps the objects at `paths` from the sweeping run, if there is one: `Ok(false)` if
    /// one of them is already being deleted.
    pub(crate) async fn protect(&self, paths: &[String]) -> Result<bool> {
        match self.sweeping_run().await? {
            Some(run) => self.protect_in(&run, paths).await,
            None => Ok(true),
        }
    }

    /// [`Registry::protect`] for a manifest about to be stored in `name`: its own content
    /// and revision link, its blobs and their links, its children, transitively.
    pub(crate) async fn protect_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        parsed: &media_type::ParsedManifest,
    ) -> Result<bool> {
        let Some(run) = self.sweeping_run().await? else {
            return Ok(true);
        };
        let blobs: Vec<Digest> = parsed.blob_references().map(|d| d.digest.clone()).collect();
        let children: Vec<Digest> = parsed.manifests.iter().map(|d| d.digest.clone()).collect();
        let mut paths = self.referenced_paths(name, &blobs, &children).await?;
        paths.push(Key::Blob(digest).path());
        paths.push(Key::RevisionLink(name, digest).path());
        self.protect_in(&run, &paths).await
    }

    async fn protect_in(&self, run: &str, paths: &[String]) -> Result<bool> {
        for p in paths {
            let marker = gc_marker(p);
            loop {
                let Some(raw) = self.driver.get(&marker).await? else {
                    break;
                };
                let text = String::from_utf8_lossy(&raw).to_string();
                match text.split_once(' ') {
                    Some(("condemned", r)) if r == run => {
                        let rescued = Bytes::from(format!("rescued {run}"));
                        if self
                            .driver
                            .put_if_current(&marker, rescued, Some(raw))
                            .await?
                        {
                            break;
                        }
                    }
                    Some(("deleting", r)) if r == run => return Ok(false),
                    // Rescued already, or a marker of another (dead) run.
                    _ => break,
                }
            }
        }
        Ok(true)
    }

    /// The objects a manifest references (its blobs and their links in `name`, its
    /// children's revision links and, transitively, theirs), for [`Registry::protect`].
    async fn referenced_paths(
        &self,
        name: &RepositoryName,
        blobs: &[Digest],
        children: &[Digest],
    ) -> Result<Vec<String>> {
        let mut paths = Vec::new();
        let mut cache = HashMap::new();
        let mut errors = Vec::new();
        let mut blobs: Vec<Digest> = blobs.to_vec();
        let mut children: Vec<Digest> = children.to_vec();
        let mut seen = HashSet::new();
        while let Some(c) = children.pop() {
            if !seen.insert(c.clone()) {
                continue;
            }
            paths.push(Key::RevisionLink(name, &c).path());
            paths.push(Key::Blob(&c).path());
            if let Some(r) = self.manifest_refs(&c, &mut cache, &mut errors).await? {
                blobs.extend(r.blobs);
                children.extend(r.children);
            }
        }
        for b in &blobs {
            paths.push(Key::LayerLink(name, b).path());
            paths.push(Key::Blob(b).path());
        }
        Ok(paths)
    }

    /// Deletes a candidate (the object, then its marker, then their directory if nothing
    /// else came into it) if it is still dead (`dead`, from scan 2) and this run wins its
    /// marker; `false` if it was rescued, and then its marker goes.
    ///
    /// The order matters: while the marker says `deleting`, a push that references the
    /// object waits; once the marker is gone it may store the object again, into the same
    /// place. So nothing here may delete anything after the marker but an empty directory.
    async fn sweep_one(&self, object: &str, run: &str, dead: bool) -> Result<bool> {
        let marker = gc_marker(object);
        let condemned = Bytes::from(format!("condemned {run}"));
        let deleting = Bytes::from(format!("deleting {run}"));
        if !dead
            || !self
                .driver
                .put_if_current(&marker, deleting, Some(condemned))
                .await?
        {
            let _ = self.driver.delete(&marker).await;
            return Ok(false);
        }
        self.driver.delete(object).await?;
        self.driver.delete(&marker).await?;
        let dir = object.rsplit_once('/').map_or(object, |(d, _)| d);
        self.driver.remove_if_empty(dir).await?;
        Ok(true)
    }

    /// [`Registry::sweep_one`] over many candidates at once: which were deleted.
    async fn sweep_all(&self, run: &str, candidates: Vec<(String, bool)>) -> Result<Vec<bool>> {
        futures_util::stream::iter(candidates)
            .map(|(object, dead)| async move { self.sweep_one(&object, run, dead).await })
            .buffered(PARALLEL)
            .try_collect()
            .await
    }

    /// Runs garbage collection once (see the module docs).
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let t0 = SystemTime::now();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut report = GcReport {
            run: run.clone(),
            holder: opts.holder.clone(),
            dry_run: opts.dry_run,
            started: service::time::rfc3339(t0),
            started_ms: unix_ms(t0),
            ..Default::default()
        };
        let mut lease = if opts.dry_run {
            None
        } else {
            match self.acquire_lease(&run, opts).await? {
                Ok(l) => Some(l),
                Err(holder) => {
                    report.busy = Some(holder);
                    report.finished = service::time::rfc3339(SystemTime::now());
                    report.finished_ms = unix_ms(SystemTime::now());
                    return Ok(report);
                }
            }
        };
        // The run's times are those it held the lease (runs of two nodes never overlap).
        let t0 = SystemTime::now();
        report.started = service::time::rfc3339(t0);
        report.started_ms = unix_ms(t0);
        let result = self
            .gc_held(opts, t0, &run, lease.as_mut(), &mut report)
            .await;
        let finished = SystemTime::now();
        if let Some(l) = &lease {
            self.release_lease(l).await;
        }
        result?;
        report.finished = service::time::rfc3339(finished);
        report.finished_ms = unix_ms(finished);
        report.duration_seconds = t0.elapsed().unwrap_or_default().as_secs_f64();
        report.blobs_deleted.sort();
        report.layer_links_deleted.sort();
        report.manifests_deleted.sort();
        report.uploads_purged.sort();
        report.retention.sort();
        Ok(report)
    }

    async fn gc_held(
        &self,
        opts: &GcOptions,
        t0: SystemTime,
        run: &str,
        mut lease: Option<&mut Lease>,
        report: &mut GcReport,
    ) -> Result<()> {
        let first = self.scan(t0, opts, lease.as_deref_mut(), None).await?;
        report.repositories = first.repos.len();
        report.manifests_marked = first.manifests_marked;
        report.blobs_marked = first.live_blobs.len();
        report.errors = first.errors.clone();
        report.complete = first.complete;
        let blobs = self.all_blobs().await?;
        report.blobs_seen = blobs.len();
        let cutoff = t0.checked_sub(opts.grace).unwrap_or(UNIX_EPOCH);
        let dead_blobs: Vec<(Digest, u64)> = if first.complete {
            blobs
                .into_iter()
                .filter(|(d, _, modified)| !first.live_blobs.contains(d) && *modified < cutoff)
                .map(|(d, size, _)| (d, size))
                .collect()
        } else {
            Vec::new()
        };
        let link_path = |repo: &str, d: &Digest, kind: &str| {
            format!(
                "{}/{repo}/{kind}/{}/{}/link",
                Key::Repositories.path(),
                d.algorithm(),
                d.hex()
            )
        };
        // Retention's tag deletions: swapped to a tombstone (a tag moved meanwhile stays).
        for r in &first.repos {
            let Some(plan) = &r.retention else { continue };
            for (tag, d, reason) in &plan.tags {
                if !opts.dry_run {
                    let link = format!(
                        "{}/{}/_manifests/tags/{tag}/current/link",
                        Key::Repositories.path(),
                        r.name
                    );
                    let tombstone = Bytes::from(format!("{}{d}", super::TAG_TOMBSTONE));
                    if !self
                        .driver
                        .put_if_current(&link, tombstone, Some(Bytes::from(d.to_string())))
                        .await?
                    {
                        continue;
                    }
                    audit_deletion(
                        "retention-delete-tag",
                        run,
                        serde_json::json!({"repository": r.name.to_string(), "tag": tag,
                            "digest": d.to_string(), "event.reason": reason}),
                    );
                }
                report.retention.push(RetentionDeletion {
                    repository: r.name.clone(),
                    tag: Some(tag.clone()),
                    digest: d.to_string(),
                    reason: reason.clone(),
                });
            }
            for (d, reason) in &plan.untagged {
                report.retention.push(RetentionDeletion {
                    repository: r.name.clone(),
                    tag: None,
                    digest: d.to_string(),
                    reason: reason.clone(),
                });
            }
        }
        if opts.dry_run {
            for r in &first.repos {
                for d in &r.dead_revisions {
                    report.manifests_deleted.push(format!("{}@{d}", r.name));
                }
                for d in &r.dead_links {
                    report.layer_links_deleted.push(format!("{}@{d}", r.name));
                }
                for id in &r.stale_uploads {
                    report.uploads_purged.push(format!("{}/{id}", r.name));
                }
            }
            for (d, size) in dead_blobs {
                report.bytes_reclaimed += size;
                report.blobs_deleted.push(SweptBlob {
                    digest: d.to_string(),
                    size,
                });
            }
            return Ok(());
        }
        let lease = lease.expect("a real run holds the lease");
        // Abandoned upload sessions: nothing refers to them.
        for r in &first.repos {
            for id in &r.stale_uploads {
                let dir = format!("{}/{}/_uploads/{id}", Key::Repositories.path(), r.name);
                // One session that will not go (its client is writing to it again) is no
                // reason to stop collecting: the next run takes it.
                match self.driver.delete(&dir).await {
                    Ok(_) => report.uploads_purged.push(format!("{}/{id}", r.name)),
                    Err(e) => tracing::warn!(
                        repository = %r.name, upload = %id, error = %e,
                        "stale upload session not purged; the next run tries again"
                    ),
                }
            }
        }
        // Condemn, under the sweep phase.
        self.renew_lease(lease, opts, Some("sweep")).await?;
        let condemned = Bytes::from(format!("condemned {run}"));
        let mut objects: Vec<String> = Vec::new();
        for r in &first.repos {
            for d in &r.dead_revisions {
                objects.push(link_path(&r.name, d, "_manifests/revisions"));
            }
            for d in &r.dead_links {
                objects.push(link_path(&r.name, d, "_layers"));
            }
        }
        for (d, _) in &dead_blobs {
            objects.push(Key::Blob(d).path());
        }
        let markers: Vec<String> = objects.iter().map(|o| gc_marker(o)).collect();
        futures_util::stream::iter(markers)
            .map(|marker| {
                let condemned = condemned.clone();
                async move { self.driver.put(&marker, condemned).await }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        tokio::time::sleep(opts.fence).await;
        self.renew_lease(lease, opts, None).await?;
        // Scan 2: what is still dead is deleted, if its marker is still ours.
        let plans: HashMap<String, RepoRetention> = first
            .repos
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.retention.clone()?)))
            .collect();
        let second = self
            .scan(
                t0,
                opts,
                Some(&mut *lease),
                opts.retention.as_ref().map(|_| &plans),
            )
            .await?;
        report.errors.extend(second.errors.iter().cloned());
        let still: HashMap<&str, &RepoScan> =
            second.repos.iter().map(|r| (r.name.as_str(), r)).collect();
        let still_dead = |repo: &str, d: &Digest, revision: bool| {
            still.get(repo).is_some_and(|n| {
                if revision {
                    n.dead_revisions.contains(d)
                } else {
                    n.dead_links.contains(d)
                }
            })
        };
        // Manifests first (their referrer links need their content), then links, then blobs.
        let mut revisions = Vec::new();
        let mut links = Vec::new();
        for r in &first.repos {
            for d in &r.dead_revisions {
                revisions.push((r.name.as_str(), d));
            }
            for d in &r.dead_links {
                links.push((r.name.as_str(), d));
            }
        }
        let done = self
            .sweep_all(
                run,
                revisions
                    .iter()
                    .map(|(repo, d)| {
                        let object = link_path(repo, d, "_manifests/revisions");
                        (object, still_dead(repo, d, true))
                    })
                    .collect(),
            )
            .await?;
        for ((repo, d), deleted) in revisions.iter().zip(done) {
            if deleted {
                self.drop_referrer_link(repo, d).await;
                audit_deletion(
                    "gc-delete-manifest",
                    run,
                    serde_json::json!({"repository": repo.to_string(), "digest": d.to_string()}),
                );
                report.manifests_deleted.push(format!("{repo}@{d}"));
            } else {
                report.rescued += 1;
            }
        }
        let done = self
            .sweep_all(
                run,
                links
                    .iter()
                    .map(|(repo, d)| (link_path(repo, d, "_layers"), still_dead(repo, d, false)))
                    .collect(),
            )
            .await?;
        for ((repo, d), deleted) in links.iter().zip(done) {
            if deleted {
                audit_deletion(
                    "gc-delete-layer-link",
                    run,
                    serde_json::json!({"repository": repo.to_string(), "digest": d.to_string()}),
                );
                report.layer_links_deleted.push(format!("{repo}@{d}"));
            } else {
                report.rescued += 1;
            }
        }
        let done = self
            .sweep_all(
                run,
                dead_blobs
                    .iter()
                    .map(|(d, _)| {
                        let dead = second.complete && !second.live_blobs.contains(d);
                        (Key::Blob(d).path(), dead)
                    })
                    .collect(),
            )
            .await?;
        for ((d, size), deleted) in dead_blobs.into_iter().zip(done) {
            if deleted {
                audit_deletion(
                    "gc-delete-blob",
                    run,
                    serde_json::json!({"digest": d.to_string(), "file.size": size}),
                );
                report.bytes_reclaimed += size;
                report.blobs_deleted.push(SweptBlob {
                    digest: d.to_string(),
                    size,
                });
            } else {
                report.rescued += 1;
            }
        }
        Ok(())
    }

    /// A deleted manifest's entry in its subject's referrers, if it had a subject.
    async fn drop_referrer_link(&self, repo: &str, manifest: &Digest) {
        let Ok(name) = RepositoryName::parse(repo) else {
            return;
        };
        let Ok(Some(body)) = self.driver.get(&Key::Blob(manifest).path()).await else {
            return;
        };
        if let Ok(p) = media_type::parse_manifest(None, &body)
            && let Some(s) = p.subject
        {
            let link = Key::ReferrerLink(&name, &s.digest, manifest).path();
            let _ = self.driver.delete(link.trim_end_matches("/link")).await;
        }
    }
}

/// Retention's decisions for one repository: the policy's plan over its tags (pushed at their
/// link's time) and untagged manifests.
fn plan_retention(
    policy: &policy::Policy,
    repo: &str,
    tagged: &[(String, Digest, SystemTime)],
    revisions: &[(Digest, SystemTime)],
    t0: SystemTime,
) -> RepoRetention {
    let tagged_digests: HashSet<&Digest> = tagged.iter().map(|(_, d, _)| d).collect();
    let secs = |t: &SystemTime| unix(*t) as i64;
    let records: Vec<policy::ManifestRecord> = tagged
        .iter()
        .map(|(t, d, at)| policy::ManifestRecord {
            tag: Some(t.clone()),
            digest: d.to_string(),
            pushed_at: secs(at),
        })
        .chain(
            revisions
                .iter()
                .filter(|(d, _)| !tagged_digests.contains(d))
                .map(|(d, at)| policy::ManifestRecord {
                    tag: None,
                    digest: d.to_string(),
                    pushed_at: secs(at),
                }),
        )
        .collect();
    let plan = policy.retention(repo, &records, secs(&t0));
    let mut out = RepoRetention::default();
    for v in plan.delete {
        let Ok(d) = Digest::parse(&v.record.digest) else {
            continue;
        };
        match v.record.tag {
            Some(t) => out.tags.push((t, d, v.reason)),
            None => {
                out.manifests.insert(d.clone());
                out.untagged.push((d, v.reason));
            }
        }
    }
    // A manifest all of whose tags go goes too.
    let still_tagged: HashSet<String> = plan
        .keep
        .iter()
        .filter(|v| v.record.tag.is_some())
        .map(|v| v.record.digest.clone())
        .collect();
    for (_, d, _) in &out.tags {
        if !still_tagged.contains(&d.to_string()) {
            out.manifests.insert(d.clone());
        }
    }
    out
}

/// Records one deletion by a GC run in the audit trail (`service::audit`; docs/audit.md):
/// `event.category: storage`, `gc.run`, and what was deleted.
fn audit_deletion(action: &str, run: &str, fields: serde_json::Value) {
    let mut event = service::audit::event_fields(fields);
    event.insert("event.category".into(), "storage".into());
    event.insert("gc.run".into(), run.into());
    service::audit::record(action, "success", serde_json::Value::Object(event));
}
