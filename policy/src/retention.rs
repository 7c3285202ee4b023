//! Retention: which manifests of a repository to delete, and why.
//!
//! The most specific rule whose pattern matches the repository applies (ties: the first in
//! the file); with none, everything is kept. A tag is kept if it is immutable, matches a
//! `keep_tags` glob, is among the `keep_last` most recently pushed, was pushed within
//! `keep_days`, or was last used within `keep_pulled_days` (pulled — its manifest, by any tag
//! or by digest — or else pushed: a tag nobody has pulled yet is kept that long after its
//! push); with none of the three no tag is deleted. Untagged manifests are kept unless
//! `untagged = "delete"`, and then still kept within `keep_days` of their push and within
//! `keep_pulled_days` of their last use.
//! [`Policy::retention`] is the dry run: executing it means deleting what it lists.

use crate::config::{RetentionConfig, Untagged};
use crate::pattern::{RepoPattern, TagPattern};
use crate::{Lines, Policy, PolicyError};
use serde::Serialize;
use toml::Spanned;

#[derive(Debug)]
pub(crate) struct Rule {
    line: usize,
    repositories: Vec<RepoPattern>,
    keep_last: Option<usize>,
    keep_days: Option<u64>,
    keep_pulled_days: Option<u64>,
    keep_tags: Vec<TagPattern>,
    untagged: Untagged,
}

/// Longest age a rule may name, in days (a century).
const MAX_DAYS: u64 = 36_500;

/// `d` days in seconds.
fn days(d: u64) -> i64 {
    (d.min(MAX_DAYS) as i64) * 86_400
}

pub(crate) fn compile(
    rules: &[Spanned<RetentionConfig>],
    lines: &Lines<'_>,
) -> Result<Vec<Rule>, PolicyError> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let field = format!("retention[{i}]");
        let c = r.get_ref();
        if c.repositories.is_empty() {
            return Err(lines.err(r, &field, "repositories is empty"));
        }
        if c.keep_last.is_none()
            && c.keep_days.is_none()
            && c.keep_pulled_days.is_none()
            && c.untagged == Untagged::Keep
        {
            return Err(lines.err(
                r,
                &field,
                "keeps everything: set keep_last, keep_days, keep_pulled_days or untagged = \"delete\"",
            ));
        }
        for (name, value) in [
            ("keep_days", c.keep_days),
            ("keep_pulled_days", c.keep_pulled_days),
        ] {
            if value.is_some_and(|d| d > MAX_DAYS) {
                return Err(lines.err(r, &field, format!("{name} is over {MAX_DAYS} days")));
            }
        }
        if c.keep_pulled_days == Some(0) {
            return Err(lines.err(
                r,
                &field,
                "keep_pulled_days = 0 keeps nothing by its pulls: leave it out or give a day or more",
            ));
        }
        out.push(Rule {
            line: lines.line(r.span().start),
            repositories: c
                .repositories
                .iter()
                .map(|p| lines.repo_pattern(p, &format!("{field}.repositories")))
                .collect::<Result<_, _>>()?,
            keep_last: c.keep_last,
            keep_days: c.keep_days,
            keep_pulled_days: c.keep_pulled_days,
            keep_tags: c
                .keep_tags
                .iter()
                .map(|t| lines.tag_glob(t, &format!("{field}.keep_tags")))
                .collect::<Result<_, _>>()?,
            untagged: c.untagged,
        });
    }
    Ok(out)
}

/// One manifest of a repository: a tag pointing to a digest, or an untagged manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ManifestRecord {
    pub tag: Option<String>,
    pub digest: String,
    /// Unix seconds.
    pub pushed_at: i64,
    /// When the manifest was last pulled, as far as storage was told (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_at: Option<i64>,
}

impl ManifestRecord {
    /// The last use: the last pull, or the push if that is later (or nothing was pulled).
    fn used_at(&self) -> i64 {
        self.pulled_at
            .map_or(self.pushed_at, |p| p.max(self.pushed_at))
    }
}

/// A record and why it is kept or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    #[serde(flatten)]
    pub record: ManifestRecord,
    pub reason: String,
}

/// The outcome of retention for one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RetentionPlan {
    /// Line of the rule that applied, if any.
    pub rule_line: Option<usize>,
    pub delete: Vec<Verdict>,
    pub keep: Vec<Verdict>,
}

impl Policy {
    /// Whether the retention rule of `repository` goes by pulls (`keep_pulled_days`): only
    /// then are its manifests' pull times worth reading.
    pub fn retention_counts_pulls(&self, repository: &str) -> bool {
        self.retention_rule(repository)
            .is_some_and(|r| r.keep_pulled_days.is_some())
    }

    /// What retention deletes in `repository` at `now` (unix seconds), and why.
    pub fn retention(
        &self,
        repository: &str,
        records: &[ManifestRecord],
        now: i64,
    ) -> RetentionPlan {
        let mut plan = RetentionPlan::default();
        let Some(rule) = self.retention_rule(repository) else {
            plan.keep = records
                .iter()
                .map(|r| Verdict {
                    record: r.clone(),
                    reason: "no retention rule applies".into(),
                })
                .collect();
            return plan;
        };
        plan.rule_line = Some(rule.line);
        let young = |r: &ManifestRecord| {
            rule.keep_days
                .is_some_and(|d| now.saturating_sub(r.pushed_at) < days(d))
        };
        let used = |r: &ManifestRecord| {
            rule.keep_pulled_days
                .is_some_and(|d| now.saturating_sub(r.used_at()) < days(d))
        };
        let used_reason = |r: &ManifestRecord| match r.pulled_at {
            Some(p) if p >= r.pushed_at => {
                format!("pulled within {} days", rule.keep_pulled_days.unwrap_or(0))
            }
            _ => format!(
                "not pulled, but pushed within {} days",
                rule.keep_pulled_days.unwrap_or(0)
            ),
        };
        let mut tagged: Vec<&ManifestRecord> = records.iter().filter(|r| r.tag.is_some()).collect();
        tagged.sort_by(|a, b| {
            b.pushed_at
                .cmp(&a.pushed_at)
                .then_with(|| a.tag.cmp(&b.tag))
        });
        for (rank, r) in tagged.into_iter().enumerate() {
            let tag = r.tag.as_deref().unwrap_or_default();
            let keep_reason = if let Some(by) = self.immutable(repository, tag) {
                Some(format!(
                    "immutable (rule at line {}, tag pattern {})",
                    by.line, by.pattern
                ))
            } else if let Some(p) = rule.keep_tags.iter().find(|p| p.matches(tag)) {
                Some(format!("matches keep_tags {p}"))
            } else if rule.keep_last.is_some_and(|n| rank < n) {
                Some(format!(
                    "among the {} most recently pushed",
                    rule.keep_last.unwrap_or(0)
                ))
            } else if young(r) {
                Some(format!(
                    "pushed within {} days",
                    rule.keep_days.unwrap_or(0)
                ))
            } else if used(r) {
                Some(used_reason(r))
            } else if rule.keep_last.is_none()
                && rule.keep_days.is_none()
                && rule.keep_pulled_days.is_none()
            {
                Some("the rule sets no count or age limit for tags".into())
            } else {
                None
            };
            let verdict = |reason| Verdict {
                record: r.clone(),
                reason,
            };
            match keep_reason {
                Some(reason) => plan.keep.push(verdict(reason)),
                None => plan.delete.push(verdict(
                    [
                        rule.keep_last
                            .map(|n| format!("not among the {n} most recent")),
                        rule.keep_days.map(|d| format!("older than {d} days")),
                        rule.keep_pulled_days
                            .map(|d| format!("neither pulled nor pushed within {d} days")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" and "),
                )),
            }
        }
        for r in records.iter().filter(|r| r.tag.is_none()) {
            let verdict = |reason: String| Verdict {
                record: r.clone(),
                reason,
            };
            match rule.untagged {
                Untagged::Keep => plan
                    .keep
                    .push(verdict("untagged manifests are kept".into())),
                Untagged::Delete if young(r) => plan.keep.push(verdict(format!(
                    "untagged, but pushed within {} days",
                    rule.keep_days.unwrap_or(0)
                ))),
                Untagged::Delete if used(r) => plan
                    .keep
                    .push(verdict(format!("untagged, but {}", used_reason(r)))),
                Untagged::Delete => plan.delete.push(verdict("untagged".into())),
            }
        }
        plan
    }

    /// The rule that applies to `repository`: the most specific match (ties: the first in the
    /// file).
    fn retention_rule(&self, repository: &str) -> Option<&Rule> {
        self.retention
            .iter()
            .filter(|r| r.repositories.iter().any(|p| p.matches(repository, None)))
            .max_by(|a, b| {
                let spec = |r: &Rule| {
                    r.repositories
                        .iter()
                        .filter(|p| p.matches(repository, None))
                        .map(|p| p.specificity())
                        .max()
                };
                // Ties go to the first rule: max_by keeps the last maximum, so reverse lines.
                spec(a).cmp(&spec(b)).then(b.line.cmp(&a.line))
            })
    }
}
