//! The mark phase: a scan of every repository in the store for what is live (and what is
//! dead) in it, and the walk of every blob.
//!
//! Repositories are scanned [`PARALLEL`] at a time: on an object store every read is a
//! request, and on the filesystem the directory listings go to the blocking pool while
//! the reads go on. The modification time of a link costs a `stat` (a request on an object
//! store), so it is read only where it decides something: for layer links nothing live
//! refers to (the grace window), and for revisions with `delete_untagged` or retention.
//! Retention also reads the repository's pull markers (`registry::pulls`) where its rule
//! counts pulls.

use super::PARALLEL;
use super::compact::{CompactDigest, DigestSet};
use super::lease::Lease;
use super::options::{GcOptions, RepoRetention, plan_retention};
use super::refs::RefsCache;
use crate::driver::ObjectMeta;
use crate::layout::Key;
use crate::registry::{Registry, Result, TAG_TOMBSTONE};
use futures_util::StreamExt;
use oci::{Digest, RepositoryName};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One repository as a scan saw it.
#[derive(Debug, Default)]
pub(super) struct RepoScan {
    pub(super) name: String,
    /// Retention's decisions (with a retention policy).
    pub(super) retention: Option<RepoRetention>,
    /// Layer links nothing live refers to, older than the grace window (sorted).
    pub(super) dead_links: Vec<CompactDigest>,
    /// Untagged revisions to delete (only with `delete_untagged`; sorted).
    pub(super) dead_revisions: Vec<CompactDigest>,
    /// Upload sessions older than `upload_max_age`.
    pub(super) stale_uploads: Vec<String>,
}

impl RepoScan {
    /// Whether the run has anything to do in the repository (retention decided something,
    /// or something is dead or stale).
    fn has_work(&self) -> bool {
        self.retention.as_ref().is_some_and(|r| !r.is_empty())
            || !self.dead_links.is_empty()
            || !self.dead_revisions.is_empty()
            || !self.stale_uploads.is_empty()
    }

    /// Whether the scan found the layer link (or, with `revision`, the revision) of `d` dead.
    pub(super) fn is_dead(&self, d: &CompactDigest, revision: bool) -> bool {
        let dead = match revision {
            true => &self.dead_revisions,
            false => &self.dead_links,
        };
        dead.binary_search(d).is_ok()
    }
}

/// What the scan of one repository found, for [`Registry::scan`] to merge into the [`Scan`].
struct RepoMarks {
    repo: RepoScan,
    /// Manifests and blobs it found live (possibly more than once).
    live: Vec<CompactDigest>,
    manifests_marked: usize,
    errors: Vec<String>,
}

#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Every blob something live refers to, or that a push in progress may be about to.
    pub(super) live_blobs: DigestSet,
    /// Repositories read whole.
    pub(super) repositories: usize,
    /// Those of them the run has work in; the others are not kept (at 100 000
    /// repositories a scan of each would be a good part of a run's memory, for nothing).
    pub(super) repos: Vec<RepoScan>,
    pub(super) manifests_marked: usize,
    pub(super) errors: Vec<String>,
    pub(super) complete: bool,
}

impl Scan {
    /// Adds what one repository's scan found.
    fn merge(&mut self, marks: RepoMarks) {
        self.repositories += 1;
        for d in marks.live {
            self.live_blobs.insert(d);
        }
        self.manifests_marked += marks.manifests_marked;
        self.errors.extend(marks.errors);
        if marks.repo.has_work() {
            self.repos.push(marks.repo);
        }
    }
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

    /// The digest of every `<alg>/<hex>/link` under `prefix` that names it (the others are
    /// reported in `errors`).
    async fn links_under(
        &self,
        prefix: &str,
        errors: &mut Vec<String>,
    ) -> Result<Vec<CompactDigest>> {
        let mut out = Vec::new();
        for alg in self.driver.list(prefix).await? {
            for hex in self.driver.list(&format!("{prefix}/{alg}")).await? {
                let link = format!("{prefix}/{alg}/{hex}/link");
                let Some(digest) = CompactDigest::from_parts(&alg, &hex) else {
                    errors.push(format!("{link}: not a digest path"));
                    continue;
                };
                let names = |text: &[u8]| {
                    std::str::from_utf8(text)
                        .ok()
                        .and_then(|t| CompactDigest::parse(t.trim()))
                        .is_some_and(|d| d == digest)
                };
                match self.driver.get(&link).await? {
                    // A directory without its link: a half-deleted entry, nothing to keep.
                    None => {}
                    Some(text) if !names(&text) => {
                        errors.push(format!("{link}: corrupt link (does not name {digest})"));
                    }
                    Some(_) => out.push(digest),
                }
            }
        }
        Ok(out)
    }

    /// When the link of `d` under `prefix` was last written; now if it went meanwhile (as
    /// young as can be: nothing is deleted for it).
    async fn link_modified(&self, prefix: &str, d: &CompactDigest) -> Result<SystemTime> {
        let link = format!("{prefix}/{}/link", d.path());
        Ok(self
            .driver
            .stat(&link)
            .await?
            .map_or(SystemTime::now(), |m| m.modified))
    }

    /// [`Registry::links_under`] with each link's modification time.
    async fn links_with_times(
        &self,
        prefix: &str,
        errors: &mut Vec<String>,
    ) -> Result<Vec<(CompactDigest, SystemTime)>> {
        let mut out = Vec::new();
        for d in self.links_under(prefix, errors).await? {
            let modified = self.link_modified(prefix, &d).await?;
            out.push((d, modified));
        }
        Ok(out)
    }

    /// One repository: what is live in it and what is dead.
    async fn scan_repo(
        &self,
        name: &str,
        t0: SystemTime,
        opts: &GcOptions,
        cache: &Mutex<RefsCache>,
        fixed: Option<&RepoRetention>,
        pulls_since: i64,
    ) -> Result<RepoMarks> {
        let repo = format!("{}/{name}", Key::Repositories.path());
        let mut out = RepoScan {
            name: name.to_string(),
            ..Default::default()
        };
        let mut errors = Vec::new();
        let errors = &mut errors;
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
                    Err(_) if text.starts_with(TAG_TOMBSTONE) => {}
                    Err(_) => errors.push(format!("{link}: corrupt tag link")),
                }
            }
        }
        // A revision's time decides only with `delete_untagged` or retention; without, `t0`
        // stands for it.
        let revisions_dir = format!("{repo}/_manifests/revisions");
        let revisions = match opts.delete_untagged || opts.retention.is_some() {
            true => self.links_with_times(&revisions_dir, errors).await?,
            false => {
                let found = self.links_under(&revisions_dir, errors).await?;
                found.into_iter().map(|d| (d, t0)).collect()
            }
        };
        out.retention = match (fixed, &opts.retention) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(policy)) => {
                // Before the store was first told of a pull nothing is known of pulls: every
                // manifest counts as pulled then (`registry::pulls`).
                let pulls = match policy.retention_counts_pulls(name) {
                    true => {
                        let digests: Vec<Digest> =
                            revisions.iter().map(|(d, _)| d.to_digest()).collect();
                        let told = match RepositoryName::parse(name) {
                            Ok(n) => self.pull_times(&n, &digests).await?,
                            Err(_) => vec![None; digests.len()],
                        };
                        digests
                            .into_iter()
                            .zip(told)
                            .map(|(d, t)| (d, t.map_or(pulls_since, |t| t.max(pulls_since))))
                            .collect()
                    }
                    false => HashMap::new(),
                };
                let revisions: Vec<(Digest, SystemTime)> = revisions
                    .iter()
                    .map(|(d, at)| (d.to_digest(), *at))
                    .collect();
                Some(plan_retention(
                    policy, name, &tagged, &revisions, &pulls, t0,
                ))
            }
            (None, None) => None,
        };
        let dropped: Option<HashSet<CompactDigest>> = out
            .retention
            .as_ref()
            .map(|r| r.manifests.iter().map(CompactDigest::from).collect());
        let dropped = dropped.as_ref();
        let deleted_tag = |tag: &str, d: &Digest| {
            out.retention
                .as_ref()
                .is_some_and(|r| r.tags.iter().any(|(t, td, _)| t == tag && td == d))
        };
        let mut kept: Vec<CompactDigest> = tagged
            .iter()
            .filter(|(t, d, _)| !deleted_tag(t, d))
            .map(|(_, d, _)| CompactDigest::from(d))
            .collect();
        let untagged_cutoff = t0.checked_sub(opts.untagged_grace).unwrap_or(UNIX_EPOCH);
        // Retention's manifests stop being roots, unless pushed again since the run began.
        let retained = |d: &CompactDigest, modified: &SystemTime| {
            !(dropped.is_some_and(|m| m.contains(d)) && *modified <= t0)
        };
        for (d, modified) in &revisions {
            if (!opts.delete_untagged || *modified > untagged_cutoff) && retained(d, modified) {
                kept.push(d.clone());
            }
        }
        // Closure over index children and referrers. A child that is not here is no error: a
        // pull-through cache keeps an index before (or without) the platforms nobody pulled.
        let mut live: HashSet<CompactDigest> = HashSet::new();
        let mut referenced: HashSet<CompactDigest> = HashSet::new();
        let mut children: Vec<CompactDigest> = Vec::new();
        loop {
            let (m, child) = match kept.pop() {
                Some(m) => (m, false),
                None => match children.pop() {
                    Some(c) => (c, true),
                    None => break,
                },
            };
            if !live.insert(m.clone()) {
                continue;
            }
            if let Some(refs) = self.manifest_refs(&m, cache, errors, !child).await? {
                referenced.extend(refs.blobs.iter().cloned());
                children.extend(refs.children.iter().cloned());
            }
            let referrers = format!("{repo}/_referrers/{}", m.path());
            kept.extend(self.links_under(&referrers, errors).await?);
        }
        let manifests_marked = live.len();
        out.dead_revisions = revisions
            .into_iter()
            .filter(|(d, _)| {
                !live.contains(d)
                    && (opts.delete_untagged || dropped.is_some_and(|m| m.contains(d)))
            })
            .map(|(d, _)| d)
            .collect();
        out.dead_revisions.sort_unstable();
        let cutoff = t0.checked_sub(opts.grace).unwrap_or(UNIX_EPOCH);
        let mut young = Vec::new();
        let layers = format!("{repo}/_layers");
        for d in self.links_under(&layers, errors).await? {
            if referenced.contains(&d) {
                continue;
            }
            if self.link_modified(&layers, &d).await? > cutoff {
                // A push in progress: its manifest has not come yet.
                young.push(d);
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
        out.dead_links.sort_unstable();
        let mut live: Vec<CompactDigest> = live.into_iter().chain(referenced).collect();
        live.extend(young);
        Ok(RepoMarks {
            repo: out,
            live,
            manifests_marked,
            errors: std::mem::take(errors),
        })
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
    pub(super) async fn scan(
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
        let cache = Mutex::new(RefsCache::default());
        let mut lease = lease;
        let mut renewed = SystemTime::now();
        // Read once a run, where retention decides (scan 1): unknown, it is the run's start.
        let pulls_since = match (plans, &opts.retention) {
            (None, Some(_)) => self.pulls_since().await?,
            _ => None,
        }
        .unwrap_or(super::options::unix(t0) as i64);
        let names = self.repository_names(false).await?;
        let mut scans = futures_util::stream::iter(names)
            .map(|name| {
                let fixed = plans.map(|p| p.get(&name).cloned().unwrap_or_default());
                let cache = &cache;
                async move {
                    let r = self
                        .scan_repo(&name, t0, opts, cache, fixed.as_ref(), pulls_since)
                        .await;
                    (name, r)
                }
            })
            .buffer_unordered(PARALLEL);
        while let Some((name, r)) = scans.next().await {
            match r {
                Ok(marks) => scan.merge(marks),
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

    /// Visits every blob: its digest, size and modification time. Nothing is kept per blob
    /// here: what the caller keeps is its business (GC keeps the dead ones). The `stat`s of
    /// one `<alg>/<hex[0..2]>` directory go [`PARALLEL`] at a time: on an object store each is
    /// a request.
    pub(super) async fn each_blob(
        &self,
        mut visit: impl FnMut(CompactDigest, ObjectMeta),
    ) -> Result<()> {
        let root = Key::Blobs.path();
        for alg in self.driver.list(&root).await? {
            for pre in self.driver.list(&format!("{root}/{alg}")).await? {
                let hexes = self.driver.list(&format!("{root}/{alg}/{pre}")).await?;
                let blobs = hexes.into_iter().filter_map(|hex| {
                    let d = CompactDigest::from_parts(&alg, &hex)?;
                    // Where the blob belongs, whichever directory it was listed in.
                    Some((d, format!("{root}/{alg}/{}/{hex}/data", &hex[..2])))
                });
                let mut stats = futures_util::stream::iter(blobs)
                    .map(|(d, data)| async move { self.driver.stat(&data).await.map(|m| (d, m)) })
                    .buffered(PARALLEL);
                while let Some(stat) = stats.next().await {
                    if let (d, Some(meta)) = stat? {
                        visit(d, meta);
                    }
                }
            }
        }
        Ok(())
    }

    /// How many blobs the store holds and their bytes: a walk of every blob.
    pub(crate) async fn blob_totals(&self) -> Result<(u64, u64)> {
        let (mut blobs, mut bytes) = (0, 0);
        self.each_blob(|_, meta| {
            blobs += 1;
            bytes += meta.size;
        })
        .await?;
        Ok((blobs, bytes))
    }
}
