//! How a run is made ([`GcOptions`]) and retention's part in it: its decisions for one
//! repository ([`RepoRetention`], made by [`plan_retention`]) and what the report says of them
//! ([`RetentionDeletion`]); also [`unix`], the epoch seconds retention and the lease go by.

use oci::Digest;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
pub(super) struct RepoRetention {
    /// Tags to delete: (tag, what it pointed to, why).
    pub(super) tags: Vec<(String, Digest, String)>,
    /// Untagged manifests to delete: (digest, why).
    pub(super) untagged: Vec<(Digest, String)>,
    /// Manifests that stop being roots: the untagged ones, and those all of whose tags go.
    pub(super) manifests: HashSet<Digest>,
}

impl RepoRetention {
    /// Nothing to delete: what a repository without a plan is taken to have.
    pub(super) fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.untagged.is_empty() && self.manifests.is_empty()
    }
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Retention's decisions for one repository: the policy's plan over its tags (pushed at their
/// link's time) and untagged manifests, each last pulled as `pulls` says (unix seconds).
pub(super) fn plan_retention(
    policy: &policy::Policy,
    repo: &str,
    tagged: &[(String, Digest, SystemTime)],
    revisions: &[(Digest, SystemTime)],
    pulls: &HashMap<Digest, i64>,
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
            pulled_at: pulls.get(d).copied(),
        })
        .chain(
            revisions
                .iter()
                .filter(|(d, _)| !tagged_digests.contains(d))
                .map(|(d, at)| policy::ManifestRecord {
                    tag: None,
                    digest: d.to_string(),
                    pushed_at: secs(at),
                    pulled_at: pulls.get(d).copied(),
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
