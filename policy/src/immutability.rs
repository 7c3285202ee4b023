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

    /// What it means for `tag`, in words (`portcullis-policy check`, the console's policy
    /// page).
    pub fn describe(&self, tag: &str) -> String {
        match self {
            TagChange::Allowed => format!("tag {tag}: mutable"),
            TagChange::CreateOnly(by) => format!(
                "tag {tag}: immutable (rule at line {}, pattern {}): may be created, never moved",
                by.line, by.pattern
            ),
            TagChange::Override(by) => format!(
                "tag {tag}: immutable (rule at line {}, pattern {}): allowed by override-immutable, audited",
                by.line, by.pattern
            ),
            TagChange::Denied(by) => format!(
                "DENY tag {tag}: immutable (rule at line {}, pattern {})",
                by.line, by.pattern
            ),
        }
    }
}

/// Whether a rule's tag patterns (minus its exclusions) take `tag`: the one matching rule,
/// for [`Policy::immutable`] and [`CompiledProtection::immutable`] alike.
fn rule_matches(
    line: usize,
    tags: &[TagPattern],
    exclude: &[TagPattern],
    tag: &str,
) -> Option<ImmutableBy> {
    if exclude.iter().any(|e| e.matches(tag)) {
        return None;
    }
    tags.iter().find(|t| t.matches(tag)).map(|t| ImmutableBy {
        line,
        pattern: t.to_string(),
    })
}

impl Policy {
    /// The rule that makes `tag` in `repository` immutable, if any.
    pub fn immutable(&self, repository: &str, tag: &str) -> Option<ImmutableBy> {
        for r in &self.immutability {
            if !r.repositories.iter().any(|p| p.matches(repository, None)) {
                continue;
            }
            if let Some(by) = rule_matches(r.line, &r.tags, &r.exclude, tag) {
                return Some(by);
            }
        }
        None
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
        let Some(rule) = self.immutable(repository, tag) else {
            return TagChange::Allowed;
        };
        if self.may_override(subject, repository, now) {
            TagChange::Override(rule)
        } else {
            TagChange::Denied(rule)
        }
    }
}

/// The immutability rules of one repository as a value that travels with a DELETE from the
/// gateway to storage (JSON in a header), so that storage — which knows what the tags point
/// to, now — refuses a delete that would break an immutable image: the manifest an immutable
/// tag points to, a child of such an index, a layer or config such an image needs. One step
/// where the data is, instead of a look-up by the gateway and a delete later.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    pub rules: Vec<ProtectionRule>,
    /// The subject holds `override-immutable` here: storage deletes anyway and says which
    /// immutable tag it overrode (the gateway audits it as a break-glass use).
    pub may_override: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionRule {
    /// Line of the rule in the policy file.
    pub line: usize,
    pub tags: Vec<WirePattern>,
    pub exclude: Vec<WirePattern>,
}

/// A tag pattern as its source: a glob, or an (anchored) regular expression.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WirePattern {
    Glob(String),
    Regex(String),
}

impl From<&TagPattern> for WirePattern {
    fn from(p: &TagPattern) -> Self {
        match p {
            TagPattern::Glob(s, _) => WirePattern::Glob(s.clone()),
            // Its source, as the policy wrote it (compiling adds the anchors again).
            TagPattern::Regex(r) => {
                let anchored = r.as_str();
                let source = anchored
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(anchored);
                WirePattern::Regex(source.to_owned())
            }
        }
    }
}

impl WirePattern {
    fn compile(&self) -> Result<TagPattern, crate::pattern::PatternError> {
        match self {
            WirePattern::Glob(s) => TagPattern::glob(s),
            WirePattern::Regex(s) => TagPattern::regex(s),
        }
    }
}

/// A [`Protection`] ready to answer "is this tag immutable?".
#[derive(Debug)]
pub struct CompiledProtection {
    rules: Vec<(usize, Vec<TagPattern>, Vec<TagPattern>)>,
    pub may_override: bool,
}

impl Protection {
    pub fn compile(&self) -> Result<CompiledProtection, crate::pattern::PatternError> {
        let all = |v: &[WirePattern]| {
            v.iter()
                .map(WirePattern::compile)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CompiledProtection {
            rules: self
                .rules
                .iter()
                .map(|r| Ok((r.line, all(&r.tags)?, all(&r.exclude)?)))
                .collect::<Result<_, crate::pattern::PatternError>>()?,
            may_override: self.may_override,
        })
    }
}

impl CompiledProtection {
    /// The rule that makes `tag` immutable, if any (as [`Policy::immutable`]).
    pub fn immutable(&self, tag: &str) -> Option<ImmutableBy> {
        self.rules
            .iter()
            .find_map(|(line, tags, exclude)| rule_matches(*line, tags, exclude, tag))
    }
}

impl Policy {
    /// The immutability rules covering `repository`, for storage to enforce on a DELETE by
    /// digest or of a blob; `None` when no rule covers it.
    pub fn protection(&self, subject: &Subject, repository: &str, now: i64) -> Option<Protection> {
        let rules: Vec<ProtectionRule> = self
            .immutability
            .iter()
            .filter(|r| r.repositories.iter().any(|p| p.matches(repository, None)))
            .map(|r| ProtectionRule {
                line: r.line,
                tags: r.tags.iter().map(WirePattern::from).collect(),
                exclude: r.exclude.iter().map(WirePattern::from).collect(),
            })
            .collect();
        (!rules.is_empty()).then(|| Protection {
            rules,
            may_override: self.may_override(subject, repository, now),
        })
    }
}
