//! The mark phase: a scan of every repository in the store for what is live (and what is
//! dead) in it, and the walk of every blob.

use super::lease::Lease;
use super::options::{GcOptions, RepoRetention, plan_retention};
use super::refs::{Refs, digest_of};
use crate::layout::Key;
use crate::registry::{Registry, Result, TAG_TOMBSTONE};
use oci::{Digest, RepositoryName};
use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

/// One repository as a scan saw it.
#[derive(Debug, Default)]
pub(super) struct RepoScan {
    pub(super) name: String,
    /// Retention's decisions (with a retention policy).
    pub(super) retention: Option<RepoRetention>,
    /// Layer links nothing live refers to, older than the grace window.
    pub(super) dead_links: Vec<Digest>,
    /// Untagged revisions to delete (only with `delete_untagged`).
    pub(super) dead_revisions: Vec<Digest>,
    /// Upload sessions older than `upload_max_age`.
    pub(super) stale_uploads: Vec<String>,
}

#[derive(Debug, Default)]
pub(super) struct Scan {
    pub(super) live_blobs: HashSet<Digest>,
    pub(super) repos: Vec<RepoScan>,
    pub(super) manifests_marked: usize,
    pub(super) errors: Vec<String>,
    pub(super) complete: bool,
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
                    Err(_) if text.starts_with(TAG_TOMBSTONE) => {}
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
}
