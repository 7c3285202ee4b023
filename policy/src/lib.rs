//! Portcullis policy: who may pull, push and delete what, which tags are immutable, and what
//! retention keeps — compiled once from `conf/policy.toml`, then answered by pure functions.
//!
//! No I/O, no async, no clock: the caller passes `now`. Every decision carries the rule that
//! made it, for the audit trail and for the `portcullis-policy check` explain command.
//!
//! ```
//! use policy::{Action, Policy, Subject};
//! let p = Policy::compile("policy.toml", r#"
//!     [[bindings]]
//!     repositories = ["team-a/**"]
//!     groups = ["team-a"]
//!     role = "developer"
//! "#).unwrap();
//! let bob = Subject::user("bob", &["team-a"]);
//! assert!(p.authorize(&bob, Action::Push, "team-a/app", 0).allowed);
//! assert!(!p.authorize(&bob, Action::Push, "team-ab/app", 0).allowed);
//! ```
//!
//! # Precedence
//!
//! 1. A member of an `admin_groups` group may do everything.
//! 2. Among the bindings that apply to the subject (by user, robot, CI name, group, or
//!    `authenticated`), are not expired, and whose repository pattern matches, only those with
//!    the **most specific pattern** count ([`pattern::Specificity`]: more literal segments,
//!    then more literal characters, then fewer `**`). So `team-a/prod/**` as `reader` narrows
//!    `team-a/**` as `developer` for everything under `team-a/prod`.
//! 3. At that level, **deny beats allow**: an action in a `deny` binding's role is denied,
//!    else an action in an `allow` binding's role is allowed.
//! 4. The `[[anonymous]]` rules are a floor for everyone, signed in or not: what they allow
//!    is allowed unless step 3 denied it explicitly.
//! 5. Anything else is denied.
//!
//! `catalog` is not tied to a repository: it is allowed by an admin group, or by any
//! applicable binding or anonymous rule whose role includes it, whatever its patterns.
//!
//! Tag immutability ([`immutability`]) and retention ([`retention`]) are described there.

pub mod config;
pub mod immutability;
pub mod model;
pub mod pattern;
pub mod retention;

pub use immutability::{ImmutableBy, TagChange, TagState};
pub use model::{Action, ActionSet, Subject, SubjectKind};
pub use retention::{ManifestRecord, RetentionPlan};

use config::{Effect, PolicyConfig};
use oci::scope::Scope;
use pattern::{PatternError, RepoPattern, Specificity, TagPattern};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use toml::Spanned;

/// A policy that did not compile: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// The rule behind a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    AdminGroup {
        group: String,
    },
    Binding {
        line: usize,
        pattern: Arc<str>,
        role: Arc<str>,
        effect: Effect,
    },
    Anonymous {
        line: usize,
        pattern: Arc<str>,
        role: Arc<str>,
    },
    /// The most specific bindings matched but their roles do not include the action.
    NotInRole {
        line: usize,
        pattern: Arc<str>,
        role: Arc<str>,
    },
    NoMatchingRule,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::AdminGroup { group } => write!(f, "member of admin group {group:?}"),
            Reason::Binding {
                line,
                pattern,
                role,
                effect,
            } => {
                let e = if *effect == Effect::Allow {
                    "allow"
                } else {
                    "deny"
                };
                write!(
                    f,
                    "binding at line {line}: {e} role {role:?} on {pattern:?}"
                )
            }
            Reason::Anonymous {
                line,
                pattern,
                role,
            } => {
                write!(
                    f,
                    "anonymous rule at line {line}: role {role:?} on {pattern:?}"
                )
            }
            Reason::NotInRole {
                line,
                pattern,
                role,
            } => write!(
                f,
                "most specific binding (line {line}, role {role:?} on {pattern:?}) does not include the action"
            ),
            Reason::NoMatchingRule => f.write_str("no rule grants it"),
        }
    }
}

/// An authorization decision and the rule that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

#[derive(Debug)]
struct Binding {
    line: usize,
    pattern: RepoPattern,
    pattern_src: Arc<str>,
    role: Arc<str>,
    actions: ActionSet,
    effect: Effect,
    /// Unix seconds after which the binding no longer applies.
    expires: Option<i64>,
}

#[derive(Debug)]
struct AnonRule {
    line: usize,
    pattern: RepoPattern,
    pattern_src: Arc<str>,
    role: Arc<str>,
    actions: ActionSet,
}

/// FNV-1a: subject and group names are short, and SipHash dominated decision time.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type Index = HashMap<String, Vec<usize>, std::hash::BuildHasherDefault<Fnv>>;

/// (selector kind, subject name, pattern) of a binding entry.
type SelectorKey = (char, String, String);
/// (line, role, effect, actions) of the first binding seen for a [`SelectorKey`].
type FirstBinding = (usize, String, Effect, ActionSet);

/// A compiled policy.
#[derive(Debug, Default)]
pub struct Policy {
    admin_groups: Vec<String>,
    /// One entry per (binding, repository pattern).
    bindings: Vec<Binding>,
    by_user: Index,
    by_group: Index,
    by_robot: Index,
    by_ci: Index,
    authenticated: Vec<usize>,
    anonymous: Vec<AnonRule>,
    immutability: Vec<immutability::Rule>,
    retention: Vec<retention::Rule>,
}

/// Turns byte offsets into line numbers.
pub(crate) struct Lines<'a> {
    file: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(file: &'a str, text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { file, starts }
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }

    pub(crate) fn err<T>(
        &self,
        spanned: &Spanned<T>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        self.err_at(spanned.span().start, field, message)
    }

    pub(crate) fn err_at(
        &self,
        offset: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        PolicyError {
            file: self.file.to_owned(),
            line: self.line(offset),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn repo_pattern(
        &self,
        s: &Spanned<String>,
        field: &str,
    ) -> Result<RepoPattern, PolicyError> {
        RepoPattern::compile(s.get_ref())
            .map_err(|e: PatternError| self.err(s, field, format!("{:?}: {e}", s.get_ref())))
    }

    pub(crate) fn tag_glob(
        &self,
        s: &Spanned<String>,
        field: &str,
    ) -> Result<TagPattern, PolicyError> {
        TagPattern::glob(s.get_ref())
            .map_err(|e| self.err(s, field, format!("{:?}: {e}", s.get_ref())))
    }
}

/// Unix seconds of a TOML date-time (a date alone is midnight UTC; offsets are honoured).
pub fn datetime_to_unix(dt: &toml::value::Datetime) -> Option<i64> {
    let date = dt.date?;
    let (y, m, d) = (
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400;
    if let Some(t) = dt.time {
        secs += i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second);
    }
    if let Some(toml::value::Offset::Custom { minutes }) = dt.offset {
        secs -= i64::from(minutes) * 60;
    }
    Some(secs)
}

impl Policy {
    /// Parses and compiles a policy file; `file` is only used in error messages.
    pub fn compile(file: &str, text: &str) -> Result<Self, PolicyError> {
        let lines = Lines::new(file, text);
        let config: PolicyConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            lines.err_at(offset, "syntax", e.message().trim().to_string())
        })?;
        Self::from_config(&config, &lines)
    }

    fn from_config(config: &PolicyConfig, lines: &Lines<'_>) -> Result<Self, PolicyError> {
        let mut roles: HashMap<String, ActionSet> = model::BUILTIN_ROLES
            .iter()
            .map(|(n, a)| (n.to_string(), ActionSet::of(a)))
            .collect();
        for (name, role) in &config.roles {
            let field = format!("roles.{name}");
            if roles.contains_key(name) {
                return Err(lines.err(
                    role,
                    &field,
                    format!("{name:?} is a built-in role and cannot be redefined"),
                ));
            }
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(lines.err(role, &field, "role names are letters, digits, '-' and '_'"));
            }
            let mut set = ActionSet::EMPTY;
            for a in &role.get_ref().actions {
                let action = Action::parse(a.get_ref()).ok_or_else(|| {
                    lines.err(a, format!("{field}.actions"), format!(
                        "unknown action {:?} (known: pull, push, delete, catalog, override-immutable)",
                        a.get_ref()
                    ))
                })?;
                set = set.union(ActionSet::of(&[action]));
            }
            if set.is_empty() {
                return Err(lines.err(role, &field, "a role needs at least one action"));
            }
            roles.insert(name.clone(), set);
        }
        let role = |r: &Spanned<String>, field: &str| -> Result<ActionSet, PolicyError> {
            roles.get(r.get_ref()).copied().ok_or_else(|| {
                let mut known: Vec<&str> = roles.keys().map(String::as_str).collect();
                known.sort_unstable();
                lines.err(
                    r,
                    field,
                    format!(
                        "unknown role {:?} (known: {})",
                        r.get_ref(),
                        known.join(", ")
                    ),
                )
            })
        };

        let mut p = Policy {
            admin_groups: config
                .admin_groups
                .iter()
                .map(|g| g.get_ref().clone())
                .collect(),
            ..Policy::default()
        };
        for (i, g) in config.admin_groups.iter().enumerate() {
            if g.get_ref().is_empty() {
                return Err(lines.err(g, format!("admin_groups[{i}]"), "empty group name"));
            }
        }
        for (i, a) in config.anonymous.iter().enumerate() {
            let field = format!("anonymous[{i}]");
            let actions = role(&a.get_ref().role, &format!("{field}.role"))?;
            if a.get_ref().repositories.is_empty() {
                return Err(lines.err(a, &field, "repositories is empty"));
            }
            for r in &a.get_ref().repositories {
                let pattern = lines.repo_pattern(r, &format!("{field}.repositories"))?;
                p.anonymous.push(AnonRule {
                    line: lines.line(a.span().start),
                    pattern_src: pattern.as_str().into(),
                    pattern,
                    role: a.get_ref().role.get_ref().as_str().into(),
                    actions,
                });
            }
        }

        // (selector, pattern) → (line, role, effect, actions) of the first binding, to find
        // duplicates and contradictions.
        let mut seen: HashMap<SelectorKey, FirstBinding> = HashMap::new();
        for (i, b) in config.bindings.iter().enumerate() {
            let field = format!("bindings[{i}]");
            let line = lines.line(b.span().start);
            let bc = b.get_ref();
            let actions = role(&bc.role, &format!("{field}.role"))?;
            if bc.repositories.is_empty() {
                return Err(lines.err(b, &field, "repositories is empty"));
            }
            let selectors: Vec<(char, &Spanned<String>)> = bc
                .users
                .iter()
                .map(|s| ('u', s))
                .chain(bc.groups.iter().map(|s| ('g', s)))
                .chain(bc.robots.iter().map(|s| ('r', s)))
                .chain(bc.ci.iter().map(|s| ('c', s)))
                .collect();
            if selectors.is_empty() && !bc.authenticated {
                return Err(lines.err(
                    b,
                    &field,
                    "applies to nobody: set users, groups, robots, ci or authenticated = true",
                ));
            }
            for (_, s) in &selectors {
                if s.get_ref().is_empty() {
                    return Err(lines.err(*s, &field, "empty subject name"));
                }
            }
            let expires = match &bc.expires {
                None => None,
                Some(e) => Some(datetime_to_unix(e.get_ref()).ok_or_else(|| {
                    lines.err(
                        e,
                        format!("{field}.expires"),
                        "needs a date (e.g. 2027-01-31T00:00:00Z)",
                    )
                })?),
            };
            for r in &bc.repositories {
                let pattern = lines.repo_pattern(r, &format!("{field}.repositories"))?;
                let keys: Vec<(char, String)> = if bc.authenticated {
                    vec![('*', String::new())]
                } else {
                    Vec::new()
                }
                .into_iter()
                .chain(selectors.iter().map(|(k, s)| (*k, s.get_ref().clone())))
                .collect();
                for (kind, name) in keys {
                    let key = (kind, name.clone(), pattern.as_str().to_owned());
                    if let Some((other, orole, oeffect, oactions)) = seen.get(&key) {
                        if *oeffect == bc.effect && orole == bc.role.get_ref() {
                            return Err(lines.err(
                                r,
                                &field,
                                format!(
                                    "duplicates the binding at line {other} for {name:?} on {:?}",
                                    pattern.as_str()
                                ),
                            ));
                        }
                        if *oeffect != bc.effect && oactions.intersects(actions) {
                            return Err(lines.err(r, &field, format!(
                                "contradicts the binding at line {other}: one allows and the other denies {} for {name:?} on {:?}",
                                oactions.intersection(actions),
                                pattern.as_str()
                            )));
                        }
                    } else {
                        seen.insert(key, (line, bc.role.get_ref().clone(), bc.effect, actions));
                    }
                }
                let idx = p.bindings.len();
                p.bindings.push(Binding {
                    line,
                    pattern_src: pattern.as_str().into(),
                    pattern,
                    role: bc.role.get_ref().as_str().into(),
                    actions,
                    effect: bc.effect,
                    expires,
                });
                if bc.authenticated {
                    p.authenticated.push(idx);
                }
                for (kind, s) in &selectors {
                    let map = match kind {
                        'u' => &mut p.by_user,
                        'g' => &mut p.by_group,
                        'r' => &mut p.by_robot,
                        _ => &mut p.by_ci,
                    };
                    let list = map.entry(s.get_ref().clone()).or_default();
                    if list.last() != Some(&idx) {
                        list.push(idx);
                    }
                }
            }
        }
        p.immutability = immutability::compile(&config.immutability, lines)?;
        p.retention = retention::compile(&config.retention, lines)?;
        Ok(p)
    }

    /// Number of compiled (binding, pattern) entries.
    pub fn binding_count(&self) -> usize {
        self.bindings.len()
    }

    /// Calls `f` with every binding entry that may apply to the subject (by name, group, or
    /// `authenticated`), without building an iterator chain on the hot path.
    fn for_each_candidate(&self, s: &Subject, f: &mut impl FnMut(usize)) {
        let named = match s.kind {
            SubjectKind::User => self.by_user.get(&s.name),
            SubjectKind::Robot => self.by_robot.get(&s.name),
            SubjectKind::Ci => self.by_ci.get(&s.name),
            SubjectKind::Anonymous => None,
        };
        for &i in named.into_iter().flatten() {
            f(i);
        }
        for g in &s.groups {
            if let Some(list) = self.by_group.get(g) {
                for &i in list {
                    f(i);
                }
            }
        }
        if !s.is_anonymous() {
            for &i in &self.authenticated {
                f(i);
            }
        }
    }

    /// Whether `s` is in an `admin_groups` group (registry administrators: every
    /// repository, and the admin operations of the gateway such as revoking others' sessions).
    pub fn is_admin(&self, s: &Subject) -> bool {
        !s.is_anonymous() && self.admin_group(s).is_some()
    }

    fn admin_group<'a>(&'a self, s: &'a Subject) -> Option<&'a String> {
        s.groups
            .iter()
            .find(|g| self.admin_groups.iter().any(|a| a == *g))
    }

    /// May `subject` do `action` on `repository` at `now` (unix seconds)?
    pub fn authorize(
        &self,
        subject: &Subject,
        action: Action,
        repository: &str,
        now: i64,
    ) -> Decision {
        if let Some(group) = self.admin_group(subject) {
            return Decision {
                allowed: true,
                reason: Reason::AdminGroup {
                    group: group.clone(),
                },
            };
        }
        if action == Action::Catalog {
            return self.authorize_catalog(subject, now);
        }
        let username = (!subject.is_anonymous()).then_some(subject.name.as_str());
        let mut best: Option<Specificity> = None;
        let mut allow: Option<usize> = None;
        let mut deny: Option<usize> = None;
        let mut any_at_best: Option<usize> = None;
        let mut consider = |i: usize| {
            let b = &self.bindings[i];
            let spec = b.pattern.specificity();
            // Less specific than what already matched: cannot decide, skip the match.
            if best.is_some_and(|s| spec < s) {
                return;
            }
            if b.expires.is_some_and(|e| now >= e) || !b.pattern.matches(repository, username) {
                return;
            }
            if best != Some(spec) {
                best = Some(spec);
                allow = None;
                deny = None;
                any_at_best = None;
            }
            any_at_best.get_or_insert(i);
            if b.actions.contains(action) {
                match b.effect {
                    Effect::Allow => {
                        allow.get_or_insert(i);
                    }
                    Effect::Deny => {
                        deny.get_or_insert(i);
                    }
                }
            }
        };
        self.for_each_candidate(subject, &mut consider);
        let binding_reason = |i: usize| {
            let b = &self.bindings[i];
            Reason::Binding {
                line: b.line,
                pattern: b.pattern_src.clone(),
                role: b.role.clone(),
                effect: b.effect,
            }
        };
        if let Some(i) = deny {
            return Decision {
                allowed: false,
                reason: binding_reason(i),
            };
        }
        if let Some(i) = allow {
            return Decision {
                allowed: true,
                reason: binding_reason(i),
            };
        }
        if let Some(a) = self
            .anonymous
            .iter()
            .find(|a| a.actions.contains(action) && a.pattern.matches(repository, None))
        {
            return Decision {
                allowed: true,
                reason: Reason::Anonymous {
                    line: a.line,
                    pattern: a.pattern_src.clone(),
                    role: a.role.clone(),
                },
            };
        }
        let reason = match any_at_best {
            Some(i) => {
                let b = &self.bindings[i];
                Reason::NotInRole {
                    line: b.line,
                    pattern: b.pattern_src.clone(),
                    role: b.role.clone(),
                }
            }
            None => Reason::NoMatchingRule,
        };
        Decision {
            allowed: false,
            reason,
        }
    }

    fn authorize_catalog(&self, subject: &Subject, now: i64) -> Decision {
        let mut found = None;
        self.for_each_candidate(subject, &mut |i| {
            let b = &self.bindings[i];
            if found.is_none()
                && b.effect == Effect::Allow
                && b.actions.contains(Action::Catalog)
                && b.expires.is_none_or(|e| now < e)
            {
                found = Some(i);
            }
        });
        if let Some(i) = found {
            let b = &self.bindings[i];
            return Decision {
                allowed: true,
                reason: Reason::Binding {
                    line: b.line,
                    pattern: b.pattern_src.clone(),
                    role: b.role.clone(),
                    effect: b.effect,
                },
            };
        }
        if let Some(a) = self
            .anonymous
            .iter()
            .find(|a| a.actions.contains(Action::Catalog))
        {
            return Decision {
                allowed: true,
                reason: Reason::Anonymous {
                    line: a.line,
                    pattern: a.pattern_src.clone(),
                    role: a.role.clone(),
                },
            };
        }
        Decision {
            allowed: false,
            reason: Reason::NoMatchingRule,
        }
    }

    /// The scopes a token may carry: each requested scope cut down to the actions policy
    /// allows (the Docker token spec's partial grant). Scopes left with no action, unknown
    /// resource types and invalid names are dropped.
    pub fn grant(&self, subject: &Subject, requested: &[Scope], now: i64) -> Vec<Scope> {
        self.grant_with(subject, requested, now, |_, _| false)
    }

    /// [`Policy::grant`] where `also(action, repository)` allows more: a robot account's
    /// own scope, granted when it was created, on top of what bindings give it.
    pub fn grant_with(
        &self,
        subject: &Subject,
        requested: &[Scope],
        now: i64,
        also: impl Fn(Action, &str) -> bool,
    ) -> Vec<Scope> {
        let mut out: Vec<Scope> = Vec::new();
        for s in requested {
            let actions: Vec<String> = match s.resource_type.as_str() {
                "repository" => {
                    if oci::RepositoryName::parse(&s.name).is_err() {
                        continue;
                    }
                    let mut acts = Vec::new();
                    for a in &s.actions {
                        let wanted: &[Action] = match a.as_str() {
                            "pull" => &[Action::Pull],
                            "push" => &[Action::Push],
                            "delete" => &[Action::Delete],
                            "*" => &[Action::Pull, Action::Push, Action::Delete],
                            _ => &[],
                        };
                        if !wanted.is_empty()
                            && wanted.iter().all(|w| {
                                also(*w, &s.name)
                                    || self.authorize(subject, *w, &s.name, now).allowed
                            })
                        {
                            acts.push(a.clone());
                        }
                    }
                    acts
                }
                "registry" if s.name == "catalog" => s
                    .actions
                    .iter()
                    .filter(|a| {
                        a.as_str() == "*"
                            && self.authorize(subject, Action::Catalog, "", now).allowed
                    })
                    .cloned()
                    .collect(),
                _ => continue,
            };
            if actions.is_empty() {
                continue;
            }
            match out
                .iter_mut()
                .find(|o| o.resource_type == s.resource_type && o.name == s.name)
            {
                Some(o) => {
                    for a in actions {
                        if !o.actions.contains(&a) {
                            o.actions.push(a);
                        }
                    }
                }
                None => out.push(Scope {
                    resource_type: s.resource_type.clone(),
                    name: s.name.clone(),
                    actions,
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
