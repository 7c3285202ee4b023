//! A robot's scope: repository patterns × the actions a robot may hold (pull, push, delete),
//! as written in the robots API ([`ScopeEntry`]) and compiled ([`Scope`]). The token service
//! intersects a robot's grant with it; a delegating robot may only create narrower ones.

use policy::pattern::RepoPattern;
use policy::{Action, ActionSet};
use serde::{Deserialize, Serialize};

/// One line of a robot's scope, as written in the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeEntry {
    pub repositories: Vec<String>,
    pub actions: Vec<String>,
}

/// A robot's scope, compiled.
#[derive(Debug, Clone)]
pub struct Scope {
    entries: Vec<(RepoPattern, ActionSet)>,
    source: Vec<ScopeEntry>,
}

impl PartialEq for Scope {
    fn eq(&self, o: &Self) -> bool {
        self.source == o.source
    }
}
impl Eq for Scope {}

/// The actions a robot may hold.
const ROBOT_ACTIONS: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

impl Scope {
    pub fn compile(source: &[ScopeEntry]) -> Result<Scope, String> {
        if source.is_empty() {
            return Err("scope is empty: give at least one {repositories, actions}".into());
        }
        let mut entries = Vec::new();
        for e in source {
            let mut actions = Vec::new();
            for a in &e.actions {
                match Action::parse(a).filter(|a| ROBOT_ACTIONS.contains(a)) {
                    Some(a) => actions.push(a),
                    None => {
                        return Err(format!(
                            "action {a:?} is not one a robot may hold (pull, push, delete)"
                        ));
                    }
                }
            }
            if actions.is_empty() || e.repositories.is_empty() {
                return Err("every scope entry needs repositories and actions".into());
            }
            for r in &e.repositories {
                if r.contains('{') {
                    return Err(format!("{r:?}: placeholders are for policy bindings"));
                }
                let p = RepoPattern::compile(r).map_err(|err| format!("{r:?}: {err}"))?;
                entries.push((p, ActionSet::of(&actions)));
            }
        }
        Ok(Scope {
            entries,
            source: source.to_vec(),
        })
    }

    pub fn allows(&self, action: Action, repository: &str) -> bool {
        self.entries
            .iter()
            .any(|(p, a)| a.contains(action) && p.matches(repository, None))
    }

    /// Whether everything `narrower` allows, this allows too.
    pub fn covers(&self, narrower: &Scope) -> bool {
        narrower.entries.iter().all(|(np, na)| {
            na.iter().all(|action| {
                self.entries
                    .iter()
                    .any(|(p, a)| a.contains(action) && p.covers(np))
            })
        })
    }

    pub fn source(&self) -> &[ScopeEntry] {
        &self.source
    }
}
