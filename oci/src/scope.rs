//! Docker token scopes: `<type>:<name>:<action>[,<action>…]`
//! (distribution `docs/spec/auth/scope.md`).
//!
//! Names may contain `host:port`, so the type is taken up to the first `:` and the actions
//! after the last one; the name is what lies between.

use std::fmt;

/// One requested or granted scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// `repository`, `registry`, … (a resource class such as `repository(plugin)` is kept).
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope {0:?} is not <type>:<name>:<actions>")]
pub struct ScopeError(pub String);

impl Scope {
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        let bad = || ScopeError(s.chars().take(200).collect());
        let (resource_type, rest) = s.split_once(':').ok_or_else(bad)?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(bad)?;
        if resource_type.is_empty() || name.is_empty() {
            return Err(bad());
        }
        let mut acts: Vec<String> = Vec::new();
        for a in actions.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if !acts.iter().any(|x| x == a) {
                acts.push(a.to_owned());
            }
        }
        Ok(Scope {
            resource_type: resource_type.to_owned(),
            name: name.to_owned(),
            actions: acts,
        })
    }

    /// Parses a space-separated list (the `scope` form parameter of `POST /token`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>, ScopeError> {
        s.split_whitespace().map(Scope::parse).collect()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.resource_type,
            self.name,
            self.actions.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_table() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "repository:samalba/my-app:pull,push",
                "repository",
                "samalba/my-app",
                &["pull", "push"],
            ),
            (
                "repository:localhost:5000/foo/bar:pull",
                "repository",
                "localhost:5000/foo/bar",
                &["pull"],
            ),
            ("registry:catalog:*", "registry", "catalog", &["*"]),
            (
                "repository(plugin):a/b:pull",
                "repository(plugin)",
                "a/b",
                &["pull"],
            ),
            ("repository:a:", "repository", "a", &[]),
            (
                "repository:a:pull,,pull, push",
                "repository",
                "a",
                &["pull", "push"],
            ),
        ];
        for (input, t, n, a) in cases {
            let s = Scope::parse(input).unwrap();
            assert_eq!(
                (s.resource_type.as_str(), s.name.as_str()),
                (*t, *n),
                "{input}"
            );
            assert_eq!(
                s.actions,
                a.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
                "{input}"
            );
        }
        for bad in [
            "",
            "repository",
            "repository:a",
            ":a:pull",
            "repository::pull",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Scope::parse_list("repository:a:pull  registry:catalog:*")
                .unwrap()
                .len(),
            2
        );
    }
}
