//! Replication: `[[replication]]` rules that keep another registry (Portcullis, distribution,
//! any OCI registry with token or Basic auth) holding what this one holds.
//!
//! A rule is a consumer of the outbox like a webhook (its cursor is `replication.<name>`,
//! one node of a deployment at a time, in order, retried, then a dead letter). It copies
//! **states, not operations**: an event says which tag or manifest changed, and the rule makes
//! the target hold what the source holds for it *now* ([`Replicator::sync_tag`]): the
//! manifest and everything it references copied (blobs the target has are skipped, every
//! manifest checked against its digest, the target's answers too), the tag deleted when the
//! source has no such tag and the rule propagates deletes. So a retried or late event never
//! puts an older state back, and an event that was lost is made up for by the
//! **reconciliation**: every tag of every repository the rule covers, on both sides, compared
//! and fixed — when the rule starts, every `reconcile_minutes`, and when an administrator asks
//! (`POST /replication/reconcile` on the admin listener). A tag the source's policy makes
//! immutable is never overwritten nor deleted at the target (a conflict, reported).
//!
//! Each rule's status (last success, last error, the last reconciliation's figures) is in
//! the state store (`replication:status:<name>`), so every node's admin listener shows it.

use super::Event;
use super::target::{Target, TargetError};
use crate::registry::data::Data;
use anyhow::bail;
use oci::Digest;
use policy::pattern::{RepoPattern, TagPattern};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One `[[replication]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Names it in metrics, the status and the admin listener (letters, digits, `-`, `_`).
    pub name: String,
    /// The target registry's base URL (`https://dr.corp:5000`).
    pub url: String,
    /// Credentials at the target (Basic, or for its token service); none: anonymous.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an `https` target, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Hosts of the target's token service, when not the target's own host.
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    /// Repository patterns (policy syntax) it copies; none: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Tag globs it copies (`v*`, `release-*`); none: every tag.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Propagate deletes: a tag or manifest deleted here is deleted at the target.
    #[serde(default)]
    pub deletes: bool,
    /// A full reconciliation every this many minutes (0: at start and when asked only).
    #[serde(default = "default_reconcile")]
    pub reconcile_minutes: u64,
    /// How long the target has to answer a request's head.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff")]
    pub max_backoff_seconds: u64,
    /// Blobs bigger than this go in chunks that resume after a failure (MiB).
    #[serde(default = "default_chunk")]
    pub chunk_mebibytes: u64,
}

fn default_reconcile() -> u64 {
    60
}
fn default_timeout() -> u64 {
    30
}
fn default_attempts() -> u32 {
    12
}
fn default_backoff() -> u64 {
    60
}
fn default_chunk() -> u64 {
    64
}

impl ReplicationConfig {
    /// Checks every table (names unique).
    pub fn validate_all(all: &[ReplicationConfig]) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for r in all {
            let n = &r.name;
            super::consumer::check_name("replication", n)?;
            if !names.insert(n.clone()) {
                bail!("replication: name {n:?} is used twice");
            }
            let url = reqwest::Url::parse(&r.url)
                .map_err(|e| anyhow::anyhow!("replication {n}: url: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                bail!("replication {n}: url must be an http or https URL");
            }
            if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
                bail!(
                    "replication {n}: url: no credentials or query in it (username and password_file)"
                );
            }
            if r.username.is_some() != r.password_file.is_some() {
                bail!("replication {n}: username and password_file go together");
            }
            for p in &r.repositories {
                RepoPattern::compile(p)
                    .map_err(|e| anyhow::anyhow!("replication {n}: repositories {p:?}: {e}"))?;
            }
            for t in &r.tags {
                TagPattern::glob(t)
                    .map_err(|e| anyhow::anyhow!("replication {n}: tags {t:?}: {e}"))?;
            }
            if r.timeout_seconds == 0 || r.max_attempts == 0 || r.max_backoff_seconds == 0 {
                bail!(
                    "replication {n}: timeout_seconds, max_attempts and max_backoff_seconds must be positive"
                );
            }
            if r.chunk_mebibytes == 0 || r.chunk_mebibytes > MAX_CHUNK_MIB {
                bail!("replication {n}: chunk_mebibytes must be between 1 and {MAX_CHUNK_MIB}");
            }
        }
        Ok(())
    }
}

impl ReplicationConfig {
    /// How to reach the target: with the rights to push, and to delete when the rule
    /// propagates deletes.
    pub fn remote(&self) -> crate::remote::RemoteSettings<'_> {
        crate::remote::RemoteSettings {
            url: &self.url,
            username: self.username.as_deref(),
            password_file: self.password_file.as_deref(),
            ca_file: self.ca_file.as_deref(),
            token_realm_hosts: &self.token_realm_hosts,
            timeout_seconds: self.timeout_seconds,
            actions: if self.deletes {
                "pull,push,delete"
            } else {
                "pull,push"
            },
            user_agent: concat!("portcullis-replication/", env!("CARGO_PKG_VERSION")),
            follow_redirects: false,
        }
    }
}

/// Most levels of indexes one copy reads (an index of indexes of images is 3).
const MAX_DEPTH: usize = 8;
/// Most manifests one copy reads (an index and its children).
const MAX_MANIFESTS: usize = 10_000;
/// Largest `chunk_mebibytes`.
const MAX_CHUNK_MIB: u64 = 4096;

/// How one tag stood when compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagState {
    /// The target has the same.
    Same,
    /// The source has it, the target not.
    Missing,
    /// The target has it at another manifest.
    Different,
    /// The target has it, the source not.
    Extra,
    /// Left alone though not as here: immutable here and different (or gone here) at the
    /// target, or a tag gone here that a target deleting by digest only cannot delete alone.
    Conflict,
}

/// What to do about one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    Nothing,
    /// Copy the source's manifest under the tag.
    Copy,
    /// Delete the tag at the target.
    Delete,
}

/// How `repo:tag` stands and what to do, from the digests it has here and at the target,
/// whether the source's policy makes it immutable, and whether the rule propagates deletes.
fn decide(
    here: Option<&Digest>,
    there: Option<&Digest>,
    immutable: bool,
    deletes: bool,
) -> (TagState, Fix) {
    match (here, there) {
        (Some(h), Some(t)) if h == t => (TagState::Same, Fix::Nothing),
        (None, None) => (TagState::Same, Fix::Nothing),
        // Never overwritten nor deleted at the target.
        (_, Some(_)) if immutable => (TagState::Conflict, Fix::Nothing),
        (Some(_), Some(_)) => (TagState::Different, Fix::Copy),
        (Some(_), None) => (TagState::Missing, Fix::Copy),
        (None, Some(_)) if deletes => (TagState::Extra, Fix::Delete),
        (None, Some(_)) => (TagState::Extra, Fix::Nothing),
    }
}

/// Whether a scheduled reconciliation is due on this node: `ran_ago` since it last started
/// one (none yet), `any_before` whether the rule has a reconciliation's report at all, every
/// `minutes` (0: never on a schedule).
fn reconciliation_due(ran_ago: Option<Duration>, any_before: bool, minutes: u64) -> bool {
    match ran_ago {
        // A node's first idle moment as the rule's delivering node: the rule's first one,
        // or a schedule that starts now.
        None => !any_before || minutes > 0,
        Some(ago) => minutes > 0 && ago >= Duration::from_secs(minutes * 60),
    }
}

/// What a reconciliation found (and, unless it was a check, fixed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub started: String,
    pub finished: String,
    /// Whether it fixed what it found (a check does not).
    pub fixed: bool,
    pub repositories: u64,
    pub tags: u64,
    pub missing: u64,
    pub different: u64,
    /// At the target only (deleted there when the rule propagates deletes).
    pub extra: u64,
    pub conflicts: u64,
    /// Tags it could not compare or fix.
    pub errors: u64,
    pub last_error: Option<String>,
    /// The request it answered (the status's `requested`), if one.
    pub answered: Option<String>,
}

impl Report {
    /// Tags that are not as the source has them (conflicts and extras a rule does not
    /// delete included).
    pub fn drift(&self) -> u64 {
        self.missing + self.different + self.extra + self.conflicts
    }

    fn count(&mut self, s: TagState) {
        self.tags += 1;
        match s {
            TagState::Same => {}
            TagState::Missing => self.missing += 1,
            TagState::Different => self.different += 1,
            TagState::Extra => self.extra += 1,
            TagState::Conflict => self.conflicts += 1,
        }
    }
}

/// A rule's status, kept in the state store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// When an event was last copied, or a reconciliation last finished without error.
    pub last_success: Option<String>,
    /// The id of the last event copied.
    pub last_event: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Failed copies since the rule started.
    pub errors: u64,
    /// The last reconciliation that ran to its end.
    pub reconciliation: Option<Report>,
    /// An administrator's last request for a reconciliation (its time and a random id), as
    /// kept under its own key (`replication:reconcile:<name>`: the status's writes never
    /// lose it): the next idle moment runs it, and its report has it as `answered`.
    #[serde(default)]
    pub requested: Option<String>,
}

/// One rule, ready to copy.
pub struct Replicator {
    pub cfg: ReplicationConfig,
    repositories: Vec<RepoPattern>,
    tags: Vec<TagPattern>,
    target: Target,
    source: Arc<Data>,
    policy: Arc<crate::live_policy::LivePolicy>,
    store: Arc<dyn crate::state::StateStore>,
    /// When this node last started a scheduled reconciliation (it counts from the status's
    /// last one otherwise).
    last_run: std::sync::Mutex<Option<std::time::Instant>>,
    /// Held by the one check (`GET /replication/drift`) running on this node.
    checking: tokio::sync::Mutex<()>,
}

fn now() -> String {
    service::time::rfc3339(SystemTime::now())
}

/// A step of a copy or comparison; what failed, as the status says it.
type Step<T> = Result<T, String>;

fn target_err(e: TargetError) -> String {
    e.to_string()
}

impl Replicator {
    pub fn new(
        cfg: ReplicationConfig,
        source: Arc<Data>,
        policy: Arc<crate::live_policy::LivePolicy>,
        store: Arc<dyn crate::state::StateStore>,
    ) -> anyhow::Result<Self> {
        let n = &cfg.name;
        let repositories = cfg
            .repositories
            .iter()
            .map(|p| RepoPattern::compile(p).map_err(|e| anyhow::anyhow!("{p:?}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let tags = cfg
            .tags
            .iter()
            .map(|t| TagPattern::glob(t).map_err(|e| anyhow::anyhow!("{t:?}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let remote = crate::remote::Upstream::new(&cfg.remote())
            .map_err(|e| anyhow::anyhow!("replication {n}: {e:#}"))?;
        Ok(Replicator {
            repositories,
            tags,
            target: Target { remote },
            source,
            policy,
            store,
            last_run: std::sync::Mutex::new(None),
            checking: tokio::sync::Mutex::new(()),
            cfg,
        })
    }

    /// Takes on when `old` (the rule before a reload changed it) last started a scheduled
    /// reconciliation on this node.
    pub fn keep_schedule_of(&self, old: &Replicator) {
        let ran = old.last_run.lock().map(|r| *r).unwrap_or(None);
        if let Ok(mut mine) = self.last_run.lock() {
            *mine = ran;
        }
    }

    /// Its name in the outbox (cursor, lease, dead letters) and in the delivery metrics.
    pub fn key(&self) -> String {
        format!("replication.{}", self.cfg.name)
    }

    fn covers_repository(&self, repo: &str) -> bool {
        self.repositories.is_empty() || self.repositories.iter().any(|p| p.matches(repo, None))
    }

    fn covers_tag(&self, tag: &str) -> bool {
        self.tags.is_empty() || self.tags.iter().any(|p| p.matches(tag))
    }

    /// Whether `event` is for this rule.
    pub fn wants(&self, event: &Event) -> bool {
        use super::Kind;
        self.covers_repository(&event.repository)
            && event.tag.as_deref().is_none_or(|t| self.covers_tag(t))
            && (self.cfg.deletes || !matches!(event.kind, Kind::TagDeleted | Kind::ManifestDeleted))
    }

    /// Makes the target hold what the source holds for what `event` changed.
    pub async fn deliver(&self, event: &Event) -> Step<()> {
        let repo = &event.repository;
        let r = match (&event.tag, &event.digest) {
            (Some(tag), _) => self.sync_tag(repo, tag, true).await.map(|_| ()),
            (None, Some(digest)) => match Digest::parse(digest) {
                Ok(d) => self.sync_digest(repo, &d).await,
                Err(_) => Err(format!("an event with a bad digest {digest:?}")),
            },
            (None, None) => Ok(()),
        };
        let m = crate::metrics::events();
        match &r {
            Ok(()) => {
                m.replication_last_success
                    .with_label_values(&[&self.cfg.name])
                    .set(crate::clock::unix_now());
                self.update_status(|s| {
                    s.last_success = Some(now());
                    s.last_event = Some(event.id.clone());
                })
                .await;
            }
            Err(why) => {
                let why = why.clone();
                self.update_status(|s| {
                    s.errors += 1;
                    s.last_error = Some(why);
                    s.last_error_at = Some(now());
                })
                .await;
            }
        }
        r
    }

    fn immutable(&self, repo: &str, tag: &str) -> bool {
        self.policy.current().immutable(repo, tag).is_some()
    }

    /// Compares `repo:tag` on both sides and, with `fix`, makes the target hold what the
    /// source holds; how it stood.
    pub async fn sync_tag(&self, repo: &str, tag: &str, fix: bool) -> Step<TagState> {
        let here = self
            .source
            .manifest_head(repo, tag)
            .await
            .map_err(|e| format!("reading {repo}:{tag} here: {e:#}"))?;
        let there = self
            .target
            .manifest_digest(repo, tag)
            .await
            .map_err(|e| format!("reading {repo}:{tag} at the target: {e}"))?;
        let here = here.map(|h| h.digest);
        let (state, todo) = decide(
            here.as_ref(),
            there.as_ref(),
            self.immutable(repo, tag),
            self.cfg.deletes,
        );
        if fix {
            match (todo, here, there) {
                (Fix::Copy, Some(h), _) => self.copy_manifest(repo, &h, Some(tag)).await?,
                (Fix::Delete, _, Some(t)) if !self.delete_tag(repo, tag, &t).await? => {
                    return Ok(TagState::Conflict);
                }
                _ => {}
            }
        }
        Ok(state)
    }

    /// A manifest pushed or deleted by digest: copied when the source has it, deleted at the
    /// target when not (and the rule propagates deletes).
    async fn sync_digest(&self, repo: &str, digest: &Digest) -> Step<()> {
        let here = self
            .source
            .manifest_head(repo, &digest.to_string())
            .await
            .map_err(|e| format!("reading {repo}@{digest} here: {e:#}"))?;
        match here {
            Some(_) => self.copy_manifest(repo, digest, None).await,
            None if self.cfg.deletes => self
                .target
                .delete(repo, &digest.to_string())
                .await
                .map_err(target_err),
            None => Ok(()),
        }
    }

    /// Deletes `repo:tag` (at `digest` there) at the target; whether it did. A target that
    /// deletes manifests by digest only (distribution) would lose every tag on the manifest:
    /// it is deleted only when no other tag there is on it (else the tag stays: a conflict).
    async fn delete_tag(&self, repo: &str, tag: &str, digest: &Digest) -> Step<bool> {
        match self.target.delete(repo, tag).await {
            Ok(()) => Ok(true),
            Err(TargetError::NoTagDelete) => {
                let tags = self
                    .target
                    .tags(repo)
                    .await
                    .map_err(|e| format!("listing the tags of {repo} at the target: {e}"))?;
                for other in tags.iter().filter(|t| *t != tag) {
                    let there = self
                        .target
                        .manifest_digest(repo, other)
                        .await
                        .map_err(target_err)?;
                    if there.as_ref() == Some(digest) {
                        tracing::info!(rule = %self.cfg.name, repository = %repo, tag = %tag, other = %other, "replication: the target deletes by digest only and another tag is on it; the tag stays");
                        return Ok(false);
                    }
                }
                self.target
                    .delete(repo, &digest.to_string())
                    .await
                    .map_err(target_err)?;
                Ok(true)
            }
            Err(e) => Err(target_err(e)),
        }
    }

    /// The manifest `digest` of `repo` here, checked against its digest.
    async fn read_manifest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Step<(
        crate::registry::data::Manifest,
        oci::media_type::ParsedManifest,
    )> {
        let m = self
            .source
            .manifest(repo, &digest.to_string())
            .await
            .map_err(|e| format!("reading {repo}@{digest} here: {e:#}"))?
            .ok_or_else(|| format!("{repo}@{digest} is gone here"))?;
        if Digest::of(digest.algorithm(), &m.body) != *digest {
            return Err(format!("{repo}@{digest}: storage sent other bytes"));
        }
        let parsed = oci::media_type::parse_manifest(Some(&m.media_type), &m.body)
            .map_err(|e| format!("{repo}@{digest}: {e}"))?;
        Ok((m, parsed))
    }

    /// Copies the manifest `digest` of `repo` and stores it at the target under `tag` (or its
    /// digest): first what it references that the target lacks — an index's children, read
    /// level by level (at most [`MAX_DEPTH`] levels, [`MAX_MANIFESTS`] manifests), then the
    /// blobs of each — from the deepest level up, so every manifest arrives after all it
    /// references.
    async fn copy_manifest(&self, repo: &str, digest: &Digest, tag: Option<&str>) -> Step<()> {
        let mut levels = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = vec![digest.clone()];
        while !next.is_empty() {
            if levels.len() >= MAX_DEPTH {
                return Err(format!(
                    "{repo}@{digest}: indexes nested deeper than {MAX_DEPTH} levels"
                ));
            }
            let mut level = Vec::new();
            let mut children = Vec::new();
            for d in next {
                if !seen.insert(d.clone()) {
                    continue;
                }
                if seen.len() > MAX_MANIFESTS {
                    return Err(format!(
                        "{repo}@{digest}: more than {MAX_MANIFESTS} manifests under it"
                    ));
                }
                let (m, parsed) = self.read_manifest(repo, &d).await?;
                for child in parsed.children() {
                    let there = self
                        .target
                        .manifest_digest(repo, &child.to_string())
                        .await
                        .map_err(target_err)?;
                    if there.is_none() && !seen.contains(&child) {
                        children.push(child);
                    }
                }
                level.push((d, m, parsed));
            }
            levels.push(level);
            next = children;
        }
        for level in levels.into_iter().rev() {
            for (d, m, parsed) in level {
                for blob in parsed.blob_references() {
                    self.copy_blob(repo, &blob.digest).await?;
                }
                let reference = match tag {
                    Some(t) if d == *digest => t.to_owned(),
                    _ => d.to_string(),
                };
                self.target
                    .put_manifest(repo, &reference, &d, &m.media_type, m.body)
                    .await
                    .map_err(target_err)?;
                crate::metrics::events()
                    .replication_copies
                    .with_label_values(&[&self.cfg.name, "manifest"])
                    .inc();
            }
        }
        Ok(())
    }

    /// Copies the blob `digest` of `repo` unless the target has it.
    async fn copy_blob(&self, repo: &str, digest: &Digest) -> Step<()> {
        let m = crate::metrics::events();
        if self
            .target
            .has_blob(repo, digest)
            .await
            .map_err(target_err)?
        {
            m.replication_copies
                .with_label_values(&[&self.cfg.name, "blob-present"])
                .inc();
            return Ok(());
        }
        let size = self
            .source
            .blob_size(repo, digest)
            .await
            .map_err(|e| format!("reading {repo}@{digest} here: {e:#}"))?
            .ok_or_else(|| format!("the blob {digest} of {repo} is gone here"))?;
        let chunk = self.cfg.chunk_mebibytes << 20;
        let source = &self.source;
        self.target
            .put_blob(repo, digest, size, chunk, |from, to| async move {
                if from == to {
                    return Ok(reqwest::Body::from(Vec::new()));
                }
                source
                    .blob(repo, digest, from, to)
                    .await
                    .map_err(|e| format!("reading {repo}@{digest} here: {e:#}"))
            })
            .await
            .map_err(target_err)?;
        m.replication_copies
            .with_label_values(&[&self.cfg.name, "blob"])
            .inc();
        m.replication_bytes
            .with_label_values(&[&self.cfg.name])
            .inc_by(size);
        Ok(())
    }

    /// Every tag of `repo` here.
    async fn source_tags(&self, repo: &str) -> Step<Vec<String>> {
        let mut all: Vec<String> = Vec::new();
        loop {
            let page = self
                .source
                .tags(repo, 1000, all.last().map(String::as_str))
                .await
                .map_err(|e| format!("listing the tags of {repo} here: {e:#}"))?;
            let Some((tags, more)) = page else {
                return Ok(all);
            };
            let got = tags.len();
            all.extend(tags);
            if !more || got == 0 {
                return Ok(all);
            }
        }
    }

    /// Compares every tag of every repository the rule covers, here and at the target, and
    /// with `fix` makes the target hold what is here.
    pub async fn reconcile(&self, fix: bool) -> Report {
        let mut report = Report {
            started: now(),
            fixed: fix,
            ..Default::default()
        };
        let mut last: Option<String> = None;
        loop {
            let (repos, more) = match self.source.catalog(1000, last.as_deref()).await {
                Ok(page) => page,
                Err(e) => {
                    report.errors += 1;
                    report.last_error = Some(format!("listing the repositories here: {e:#}"));
                    break;
                }
            };
            let got = repos.len();
            last = repos.last().cloned();
            for repo in repos.iter().filter(|r| self.covers_repository(r)) {
                report.repositories += 1;
                if let Err(e) = self.reconcile_repository(repo, fix, &mut report).await {
                    report.errors += 1;
                    report.last_error = Some(e);
                }
            }
            if !more || got == 0 {
                break;
            }
        }
        report.finished = now();
        report
    }

    async fn reconcile_repository(&self, repo: &str, fix: bool, report: &mut Report) -> Step<()> {
        let mut tags = self.source_tags(repo).await?;
        tags.extend(
            self.target
                .tags(repo)
                .await
                .map_err(|e| format!("listing the tags of {repo} at the target: {e}"))?,
        );
        tags.sort_unstable();
        tags.dedup();
        for tag in tags.iter().filter(|t| self.covers_tag(t)) {
            match self.sync_tag(repo, tag, fix).await {
                Ok(state) => report.count(state),
                Err(e) => {
                    report.errors += 1;
                    report.last_error = Some(e);
                }
            }
        }
        Ok(())
    }

    /// A comparison of everything the rule covers, changing nothing; `None` while another
    /// one runs on this node (one at a time: each reads every tag on both sides).
    pub async fn check(&self) -> Option<Report> {
        let _one = self.checking.try_lock().ok()?;
        Some(self.reconcile(false).await)
    }

    /// The work of an idle moment (no event waiting): a reconciliation when one was asked
    /// for, or is due.
    pub async fn idle(&self) {
        let status = self.status().await.unwrap_or_default();
        let last = status.reconciliation.as_ref();
        let asked =
            status.requested.is_some() && status.requested != last.and_then(|r| r.answered.clone());
        let requested = status.requested.clone();
        let due = {
            let Ok(mut ran) = self.last_run.lock() else {
                return;
            };
            let due = reconciliation_due(
                ran.map(|at| at.elapsed()),
                last.is_some(),
                self.cfg.reconcile_minutes,
            );
            if due || asked {
                *ran = Some(std::time::Instant::now());
            }
            due
        };
        if !(due || asked) {
            return;
        }
        tracing::info!(rule = %self.cfg.name, asked, "replication: reconciling");
        let mut report = self.reconcile(true).await;
        report.answered = requested.filter(|_| asked);
        tracing::info!(rule = %self.cfg.name, drift = report.drift(), errors = report.errors, "replication: reconciled");
        let m = crate::metrics::events();
        for (kind, n) in [
            ("missing", report.missing),
            ("different", report.different),
            ("extra", report.extra),
            ("conflict", report.conflicts),
        ] {
            m.replication_drift
                .with_label_values(&[&self.cfg.name, kind])
                .set(n as i64);
        }
        if report.errors == 0 {
            m.replication_last_success
                .with_label_values(&[&self.cfg.name])
                .set(crate::clock::unix_now());
        }
        self.update_status(|s| {
            if report.errors == 0 {
                s.last_success = Some(report.finished.clone());
            } else {
                s.last_error = report.last_error.clone();
                s.last_error_at = Some(report.finished.clone());
            }
            s.reconciliation = Some(report);
        })
        .await;
    }

    fn status_key(&self) -> String {
        format!("replication:status:{}", self.cfg.name)
    }

    fn request_key(&self) -> String {
        format!("replication:reconcile:{}", self.cfg.name)
    }

    /// The rule's status as the store has it (with the last request for a reconciliation).
    pub async fn status(&self) -> Result<Status, crate::state::StateError> {
        let mut s: Status = self
            .store
            .get(&self.status_key())
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        s.requested = self
            .store
            .get(&self.request_key())
            .await?
            .and_then(|v| String::from_utf8(v).ok());
        Ok(s)
    }

    async fn update_status(&self, change: impl FnOnce(&mut Status)) {
        let mut s = match self.status().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(rule = %self.cfg.name, error = %e, "replication: the status cannot be read");
                return;
            }
        };
        change(&mut s);
        s.requested = None;
        let Ok(v) = serde_json::to_vec(&s) else {
            return;
        };
        if let Err(e) = self.store.put(&self.status_key(), v).await {
            tracing::warn!(rule = %self.cfg.name, error = %e, "replication: the status cannot be written");
        }
    }

    /// Asks the node delivering for this rule to reconcile at its next idle moment; the
    /// request's id.
    pub async fn request_reconciliation(&self) -> Result<String, crate::state::StateError> {
        let at = format!("{} {}", now(), crate::random::random_token(8));
        self.store
            .put(&self.request_key(), at.clone().into_bytes())
            .await?;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> anyhow::Result<()> {
        let c: ReplicationConfig = toml::from_str(&format!(
            "name = \"dr\"\nurl = \"https://dr.example:5000\"\n{extra}"
        ))?;
        ReplicationConfig::validate_all(&[c])
    }

    #[test]
    fn tables_are_checked() {
        assert!(table("").is_ok());
        assert!(table("repositories = [\"team-a/**\"]\ntags = [\"v*\"]\ndeletes = true").is_ok());
        assert!(table("username = \"r\"").is_err(), "no password_file");
        assert!(table("tags = [\"[\"]").is_err());
        assert!(table("chunk_mebibytes = 0").is_err());
        assert!(table("max_attempts = 0").is_err());
        assert!(table("colour = 1").is_err(), "unknown key");
        let bad_url = |u: &str| {
            let c: ReplicationConfig =
                toml::from_str(&format!("name = \"dr\"\nurl = \"{u}\"")).unwrap();
            ReplicationConfig::validate_all(&[c]).is_err()
        };
        assert!(bad_url("ftp://x/"));
        assert!(bad_url("https://user:pw@x/"), "credentials in the URL");
        assert!(!bad_url("http://127.0.0.1:5000"));
    }

    #[test]
    fn each_tag_is_decided_by_both_digests_immutability_and_deletes() {
        let a = Digest::of(oci::Algorithm::Sha256, b"a");
        let b = Digest::of(oci::Algorithm::Sha256, b"b");
        use Fix::*;
        use TagState::*;
        // (here, there, immutable, deletes) → (state, fix)
        let table = [
            (Some(&a), Some(&a), false, false, Same, Nothing),
            (Some(&a), Some(&a), true, true, Same, Nothing),
            (None, None, false, true, Same, Nothing),
            (Some(&a), None, false, false, Missing, Copy),
            (Some(&a), None, true, false, Missing, Copy),
            (Some(&a), Some(&b), false, false, Different, Copy),
            (Some(&a), Some(&b), true, true, Conflict, Nothing),
            (None, Some(&b), false, true, Extra, Delete),
            (None, Some(&b), false, false, Extra, Nothing),
            (None, Some(&b), true, true, Conflict, Nothing),
        ];
        for (here, there, immutable, deletes, state, fix) in table {
            assert_eq!(
                decide(here, there, immutable, deletes),
                (state, fix),
                "{here:?} {there:?} immutable={immutable} deletes={deletes}"
            );
        }
    }

    #[test]
    fn a_reconciliation_is_due_first_and_then_on_its_schedule() {
        let min = |m: u64| Some(Duration::from_secs(m * 60));
        // (since this node ran one, the rule has a report, reconcile_minutes) → due
        let table = [
            (None, false, 0, true),
            (None, true, 0, false),
            (None, true, 60, true),
            (min(59), true, 60, false),
            (min(60), true, 60, true),
            (min(600), true, 0, false),
        ];
        for (ago, before, minutes, due) in table {
            assert_eq!(
                reconciliation_due(ago, before, minutes),
                due,
                "{ago:?} {before} {minutes}"
            );
        }
    }

    #[test]
    fn drift_counts_every_tag_not_as_here() {
        let mut r = Report::default();
        for s in [
            TagState::Same,
            TagState::Missing,
            TagState::Different,
            TagState::Extra,
            TagState::Conflict,
            TagState::Same,
        ] {
            r.count(s);
        }
        assert_eq!(r.tags, 6);
        assert_eq!(r.drift(), 4);
    }
}
