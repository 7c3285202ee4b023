//! Tag immutability.
//!
//! A rule names repositories (patterns) and tags (globs and/or regexes), minus excluded tags.
//! An immutable tag may be created, but not moved to another manifest nor deleted, and a
//! manifest an immutable tag points to may not be deleted — except by a subject allowed
//! `override-immutable` on the repository, which the gateway audits as a break-glass use.
//!
//! Scopes cannot tell "create tag" from "overwrite tag"; so the gateway asks
//! [`Policy::check_tag_write`] at manifest PUT time. When it does not know whether the tag
//! exists it passes [`TagState::Unknown`] and gets [`TagChange::CreateOnly`]: it then sends
//! the PUT with `If-None-Match: *` and the storage creates the tag only if it is absent.

use crate::config::ImmutabilityConfig;
use crate::pattern::{RepoPattern, TagPattern};
use crate::{Action, Lines, Policy, PolicyError, Subject};
use toml::Spanned;

#[derive(Debug)]
pub(crate) struct Rule {
    line: usize,
    repositories: Vec<RepoPattern>,
    tags: Vec<TagPattern>,
    exclude: Vec<TagPattern>,
}

pub(crate) fn compile(
    rules: &[Spanned<ImmutabilityConfig>],
    lines: &Lines<'_>,
) -> Result<Vec<Rule>, PolicyError> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let field = format!("immutability[{i}]");
        let c = r.get_ref();
        if c.repositories.is_empty() {
            return Err(lines.err(r, &field, "repositories is empty"));
        }
        if c.tags.is_empty() && c.tag_regexes.is_empty() {
            return Err(lines.err(r, &field, "needs tags or tag_regexes"));
        }
        let repositories = c
            .repositories
            .iter()
            .map(|p| lines.repo_pattern(p, &format!("{field}.repositories")))
            .collect::<Result<_, _>>()?;
        let mut tags: Vec<TagPattern> = c
            .tags
            .iter()
            .map(|t| lines.tag_glob(t, &format!("{field}.tags")))
            .collect::<Result<_, _>>()?;
        for re in &c.tag_regexes {
            tags.push(TagPattern::regex(re.get_ref()).map_err(|e| {
                lines.err(
                    re,
                    format!("{field}.tag_regexes"),
                    format!("{:?}: {e}", re.get_ref()),
                )
            })?);
        }
        let exclude = c
            .exclude_tags
            .iter()
            .map(|t| lines.tag_glob(t, &format!("{field}.exclude_tags")))
            .collect::<Result<_, _>>()?;
        out.push(Rule {
            line: lines.line(r.span().start),
            repositories,
            tags,
            exclude,
        });
    }
    Ok(out)
}

/// The immutability rule that applies to a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImmutableBy {
    /// Line of the rule in the policy file.
    pub line: usize,
    /// The tag pattern that matched.
    pub pattern: String,
}

/// What the caller knows of the tag before a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagState {
    Absent,
    Present,
    Unknown,
}

/// The outcome of an immutability check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagChange {
    /// The tag is not immutable.
    Allowed,
    /// Immutable, allowed only as a creation: send the PUT with `If-None-Match: *`.
    CreateOnly(ImmutableBy),
    /// Immutable, but the subject holds `override-immutable`: allowed, and must be audited.
    Override(ImmutableBy),
    /// Immutable: refused.
    Denied(ImmutableBy),
}

impl TagChange {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, TagChange::Denied(_))
    }
}

impl Policy {
    /// The rule that makes `tag` in `repository` immutable, if any.
    pub fn immutable(&self, repository: &str, tag: &str) -> Option<ImmutableBy> {
        for r in &self.immutability {
            if !r.repositories.iter().any(|p| p.matches(repository, None)) {
                continue;
            }
            if r.exclude.iter().any(|e| e.matches(tag)) {
                continue;
            }
            if let Some(t) = r.tags.iter().find(|t| t.matches(tag)) {
                return Some(ImmutableBy {
                    line: r.line,
                    pattern: t.to_string(),
                });
            }
        }
        None
    }

    /// Whether any immutability rule covers `repository` (so digest deletes need a look at
    /// the tags).
    pub fn has_immutability_for(&self, repository: &str) -> bool {
        self.immutability
            .iter()
            .any(|r| r.repositories.iter().any(|p| p.matches(repository, None)))
    }

    fn may_override(&self, subject: &Subject, repository: &str, now: i64) -> bool {
        self.authorize(subject, Action::OverrideImmutable, repository, now)
            .allowed
    }

    /// A manifest PUT that sets `tag`.
    pub fn check_tag_write(
        &self,
        subject: &Subject,
        repository: &str,
        tag: &str,
        state: TagState,
        now: i64,
    ) -> TagChange {
        let Some(rule) = self.immutable(repository, tag) else {
            return TagChange::Allowed;
        };
        match state {
            TagState::Absent | TagState::Unknown => TagChange::CreateOnly(rule),
            TagState::Present if self.may_override(subject, repository, now) => {
                TagChange::Override(rule)
            }
            TagState::Present => TagChange::Denied(rule),
        }
    }

    /// A DELETE of `tag`.
    pub fn check_tag_delete(
        &self,
        subject: &Subject,
        repository: &str,
        tag: &str,
        now: i64,
    ) -> TagChange {
        self.check_deletes(subject, repository, std::iter::once(tag), now)
    }

    /// A DELETE of a manifest that the tags `tags` point to.
    pub fn check_manifest_delete(
        &self,
        subject: &Subject,
        repository: &str,
        tags: &[&str],
        now: i64,
    ) -> TagChange {
        self.check_deletes(subject, repository, tags.iter().copied(), now)
    }

    fn check_deletes<'a>(
        &self,
        subject: &Subject,
        repository: &str,
        mut tags: impl Iterator<Item = &'a str>,
        now: i64,
    ) -> TagChange {
        let Some(rule) = tags.find_map(|t| self.immutable(repository, t)) else {
            return TagChange::Allowed;
        };
        if self.may_override(subject, repository, now) {
            TagChange::Override(rule)
        } else {
            TagChange::Denied(rule)
        }
    }
}
