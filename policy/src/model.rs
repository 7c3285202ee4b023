//! Subjects, actions and roles.

use std::fmt;

/// What a subject may do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
    /// `registry:catalog:*` (listing repositories; not tied to a repository).
    Catalog,
    /// Break-glass: overwrite or delete immutable tags. The gateway audits every use.
    OverrideImmutable,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Pull,
        Action::Push,
        Action::Delete,
        Action::Catalog,
        Action::OverrideImmutable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Catalog => "catalog",
            Action::OverrideImmutable => "override-immutable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ActionSet(u8);

impl ActionSet {
    pub const EMPTY: ActionSet = ActionSet(0);

    pub fn of(actions: &[Action]) -> Self {
        ActionSet(actions.iter().fold(0, |acc, a| acc | a.bit()))
    }

    pub fn contains(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    pub fn union(self, o: ActionSet) -> Self {
        ActionSet(self.0 | o.0)
    }

    pub fn intersection(self, o: ActionSet) -> Self {
        ActionSet(self.0 & o.0)
    }

    pub fn intersects(self, o: ActionSet) -> bool {
        self.0 & o.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }
}

impl fmt::Display for ActionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Action::as_str).collect();
        write!(f, "[{}]", names.join(", "))
    }
}

/// The built-in roles: name, actions.
pub const BUILTIN_ROLES: [(&str, &[Action]); 4] = [
    ("reader", &[Action::Pull]),
    ("developer", &[Action::Pull, Action::Push]),
    ("maintainer", &[Action::Pull, Action::Push, Action::Delete]),
    (
        "admin",
        &[
            Action::Pull,
            Action::Push,
            Action::Delete,
            Action::Catalog,
            Action::OverrideImmutable,
        ],
    ),
];

/// What kind of identity a subject is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    User,
    Robot,
    /// A CI workload identity (federated OIDC token mapped to a name).
    Ci,
    Anonymous,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub name: String,
    pub kind: SubjectKind,
    pub groups: Vec<String>,
}

impl Subject {
    pub fn user(name: &str, groups: &[&str]) -> Self {
        Subject {
            name: name.to_owned(),
            kind: SubjectKind::User,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub fn robot(name: &str) -> Self {
        Subject {
            name: name.to_owned(),
            kind: SubjectKind::Robot,
            groups: Vec::new(),
        }
    }

    pub fn ci(name: &str, groups: &[&str]) -> Self {
        Subject {
            name: name.to_owned(),
            kind: SubjectKind::Ci,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub fn anonymous() -> Self {
        Subject {
            name: String::new(),
            kind: SubjectKind::Anonymous,
            groups: Vec::new(),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.kind == SubjectKind::Anonymous
    }
}
