//! The policy file, as written (TOML; see `conf/policy.toml`). [`crate::Policy::compile`]
//! turns it into rules; every string keeps its position so errors can name the line.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Members of these groups may do everything everywhere.
    #[serde(default)]
    pub admin_groups: Vec<Spanned<String>>,
    /// Custom roles by name.
    #[serde(default)]
    pub roles: BTreeMap<String, Spanned<RoleConfig>>,
    /// What everyone, signed in or not, may do.
    #[serde(default)]
    pub anonymous: Vec<Spanned<AnonymousConfig>>,
    #[serde(default)]
    pub bindings: Vec<Spanned<BindingConfig>>,
    #[serde(default)]
    pub immutability: Vec<Spanned<ImmutabilityConfig>>,
    #[serde(default)]
    pub retention: Vec<Spanned<RetentionConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub actions: Vec<Spanned<String>>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymousConfig {
    pub repositories: Vec<Spanned<String>>,
    pub role: Spanned<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    pub repositories: Vec<Spanned<String>>,
    #[serde(default)]
    pub users: Vec<Spanned<String>>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub robots: Vec<Spanned<String>>,
    #[serde(default)]
    pub ci: Vec<Spanned<String>>,
    /// Every signed-in subject (users, robots, CI).
    #[serde(default)]
    pub authenticated: bool,
    pub role: Spanned<String>,
    #[serde(default)]
    pub effect: Effect,
    /// The binding stops applying at this time.
    #[serde(default)]
    pub expires: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmutabilityConfig {
    pub repositories: Vec<Spanned<String>>,
    /// Tag globs (`*`, `?`).
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    /// Tag regular expressions (anchored).
    #[serde(default)]
    pub tag_regexes: Vec<Spanned<String>>,
    /// Tag globs that are never immutable under this rule.
    #[serde(default)]
    pub exclude_tags: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Untagged {
    #[default]
    Keep,
    Delete,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub repositories: Vec<Spanned<String>>,
    /// Keep the N most recently pushed tags.
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// Keep what was pushed within this many days (also the grace of untagged manifests).
    #[serde(default)]
    pub keep_days: Option<u64>,
    /// Keep what was pulled (or, never pulled since, pushed) within this many days.
    #[serde(default)]
    pub keep_pulled_days: Option<u64>,
    /// Tags matching these globs are always kept.
    #[serde(default)]
    pub keep_tags: Vec<Spanned<String>>,
    /// What to do with manifests no tag points to.
    #[serde(default)]
    pub untagged: Untagged,
}
