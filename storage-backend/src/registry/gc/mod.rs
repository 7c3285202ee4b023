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
//!
//! **Memory** grows with the number of blobs only, as little as it can: the mark is a set of
//! 32-byte binary digests (`compact`), the walk of `blobs/` keeps only the unreferenced ones,
//! a scan keeps only the repositories it found something to delete in, and the manifests'
//! references are cached in a bounded window (`refs`).

mod compact;
mod lease;
mod options;
mod refs;
mod scan;
#[cfg(test)]
mod tests;

pub use options::GcOptions;
pub(super) use options::RetentionDeletion;

use super::{Registry, Result};
use crate::layout::{Key, gc_marker};
use bytes::Bytes;
use compact::{CompactDigest, DigestSet};
use futures_util::{StreamExt, TryStreamExt};
use lease::Lease;
use oci::media_type;
use oci::{Digest, RepositoryName};
use options::RepoRetention;
use scan::RepoScan;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Markers written, candidates swept, upload sessions purged and referrer links dropped at
/// once, whatever the driver (each a few store requests; on the filesystem each an `fsync`).
/// The object-store driver's own fan-out under one call (the bulk delete of an upload
/// session's parts) is bounded by `object_store`.
pub(super) const PARALLEL: usize = 16;

/// A deleted (or, in a dry run, deletable) blob.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct SweptBlob {
    pub digest: String,
    pub size: u64,
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

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Registry {
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
        let mut first = self.scan(t0, opts, lease.as_deref_mut(), None).await?;
        report.repositories = first.repositories;
        report.manifests_marked = first.manifests_marked;
        report.blobs_marked = first.live_blobs.len();
        report.errors = first.errors.clone();
        report.complete = first.complete;
        let cutoff = t0.checked_sub(opts.grace).unwrap_or(UNIX_EPOCH);
        // The mark is done with once the candidates are known: scan 2 makes its own.
        let live = std::mem::take(&mut first.live_blobs);
        let (seen, dead_blobs) = self.dead_blobs(live, first.complete, cutoff).await?;
        report.blobs_seen = seen;
        let link_path = |repo: &str, d: &CompactDigest, kind: &str| {
            format!(
                "{}/{repo}/{kind}/{}/link",
                Key::Repositories.path(),
                d.path()
            )
        };
        let tags_dir = |repo: &str| format!("{}/{repo}/_manifests/tags", Key::Repositories.path());
        self.rescue_pulled(opts, t0, &mut first.repos).await?;
        // Retention's tag deletions: swapped to a tombstone (a tag moved meanwhile stays).
        for r in &first.repos {
            let Some(plan) = &r.retention else { continue };
            for (tag, d, reason) in &plan.tags {
                if !opts.dry_run {
                    let link = format!("{}/{tag}/current/link", tags_dir(&r.name));
                    let tombstone = Bytes::from(format!("{}{d}", super::TAG_TOMBSTONE));
                    let swapped = self
                        .driver
                        .put_if_current(&link, tombstone, Some(Bytes::from(d.to_string())))
                        .await;
                    // A tombstone leaves the tags' directory as it was: pages that kept its
                    // listing, and marked the tag as naming a manifest, must read it again.
                    // Touched after each swap, and after one that failed half-way.
                    if !matches!(swapped, Ok(false))
                        && let Err(e) = self.driver.touch(&tags_dir(&r.name)).await
                    {
                        report
                            .errors
                            .push(format!("{}: telling tag pages of a tombstone: {e}", r.name));
                    }
                    if !swapped? {
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
        report.uploads_purged = self.purge_uploads(&first.repos).await;
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
            objects.push(Key::Blob(&d.to_digest()).path());
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
        let still_dead = |repo: &str, d: &CompactDigest, revision: bool| {
            still.get(repo).is_some_and(|n| n.is_dead(d, revision))
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
        let mut unreferring = Vec::new();
        for ((repo, d), deleted) in revisions.iter().zip(done) {
            if deleted {
                unreferring.push((repo.to_string(), d.to_digest()));
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
        futures_util::stream::iter(unreferring)
            .for_each_concurrent(PARALLEL, |(repo, d)| async move {
                self.drop_referrer_link(&repo, &d).await;
                if let Ok(name) = RepositoryName::parse(&repo) {
                    self.forget_pulls(&name, &d).await;
                }
            })
            .await;
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
                        (Key::Blob(&d.to_digest()).path(), dead)
                    })
                    .collect(),
            )
            .await?;
        for ((d, size), deleted) in dead_blobs.into_iter().zip(done) {
            if deleted {
                self.usage.removed(size);
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

    /// Deletes the upload sessions the scan found stale, [`PARALLEL`] at a time; those
    /// deleted, as `<repository>/<session id>`.
    async fn purge_uploads(&self, repos: &[RepoScan]) -> Vec<String> {
        let mut sessions: Vec<(String, String)> = Vec::new();
        for r in repos {
            for id in &r.stale_uploads {
                sessions.push((r.name.clone(), id.clone()));
            }
        }
        futures_util::stream::iter(sessions)
            .map(|(repo, id)| async move {
                let dir = format!("{}/{repo}/_uploads/{id}", Key::Repositories.path());
                // One session that will not go (its client is writing to it again) is no
                // reason to stop collecting: the next run takes it.
                match self.driver.delete(&dir).await {
                    Ok(_) => Some(format!("{repo}/{id}")),
                    Err(e) => {
                        tracing::warn!(
                            repository = %repo, upload = %id, error = %e,
                            "stale upload session not purged; the next run tries again"
                        );
                        None
                    }
                }
            })
            .buffer_unordered(PARALLEL)
            .filter_map(|purged| async move { purged })
            .collect()
            .await
    }

    /// Walks every blob: how many there are, and those neither in `live` nor younger than
    /// `cutoff`, with their sizes (none if the mark is not `complete`). The walk is also the
    /// store's usage, measured afresh.
    async fn dead_blobs(
        &self,
        live: DigestSet,
        complete: bool,
        cutoff: SystemTime,
    ) -> Result<(usize, Vec<(CompactDigest, u64)>)> {
        let (mut seen, mut bytes) = (0, 0);
        let mut dead = Vec::new();
        let walk = self.usage.walk_begins();
        self.each_blob(|d, meta| {
            seen += 1;
            bytes += meta.size;
            if complete && !live.contains(&d) && meta.modified < cutoff {
                dead.push((d, meta.size));
            }
        })
        .await?;
        self.usage.walked(walk, seen as u64, bytes);
        Ok((seen, dead))
    }

    /// A deleted manifest's entry in its subject's referrers, if it had a subject.
    /// Takes out of retention's plans what was pulled since the run began (the scan of the
    /// whole store may take long): a manifest pulled is kept, with its tags.
    async fn rescue_pulled(
        &self,
        opts: &GcOptions,
        t0: SystemTime,
        repos: &mut [RepoScan],
    ) -> Result<()> {
        let Some(policy) = &opts.retention else {
            return Ok(());
        };
        for r in repos {
            let Some(plan) = &mut r.retention else {
                continue;
            };
            if plan.is_empty() || !policy.retention_counts_pulls(&r.name) {
                continue;
            }
            let Ok(name) = RepositoryName::parse(&r.name) else {
                continue;
            };
            let mut planned: Vec<Digest> = plan.tags.iter().map(|(_, d, _)| d.clone()).collect();
            planned.extend(plan.untagged.iter().map(|(d, _)| d.clone()));
            planned.sort();
            planned.dedup();
            let rescued = self
                .pulled_after(&name, &planned, options::unix(t0) as i64)
                .await?;
            if rescued.is_empty() {
                continue;
            }
            plan.tags.retain(|(_, d, _)| !rescued.contains(d));
            plan.untagged.retain(|(d, _)| !rescued.contains(d));
            plan.manifests.retain(|d| !rescued.contains(d));
            r.dead_revisions
                .retain(|d| !rescued.contains(&d.to_digest()));
        }
        Ok(())
    }

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

/// Records one deletion by a GC run in the audit trail (`service::audit`; docs/audit.md):
/// `event.category: storage`, `gc.run`, and what was deleted.
fn audit_deletion(action: &str, run: &str, fields: serde_json::Value) {
    let mut event = service::audit::event_fields(fields);
    event.insert("event.category".into(), "storage".into());
    event.insert("gc.run".into(), run.into());
    service::audit::record(action, "success", serde_json::Value::Object(event));
}
