//! Authentication: who is this? One trait, several backends (CI federation, robot accounts,
//! static users, LDAP), asked in a documented order by [`Chain`]. OIDC single sign-on makes
//! identities too, through its own flows (`crate::auth::oidc`).

pub mod config;
pub mod federation;
pub mod htpasswd;
pub mod jws;
pub mod ldap;
pub mod oidc;
pub mod pepper;
pub mod robots;
pub mod scope;

use policy::{Subject, SubjectKind};

/// An authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub groups: Vec<String>,
    pub kind: SubjectKind,
    /// Robot accounts and CI identities: what else the token service needs.
    pub machine: Option<std::sync::Arc<Machine>>,
}

/// What a robot account or a federated CI identity brings beyond a name and groups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    /// A robot's own grants, given when it was created (on top of policy bindings).
    pub scope: Option<crate::auth::scope::Scope>,
    /// Who vouched: `robot`, or `federation:<issuer name>`.
    pub authenticator: String,
    /// The CI token's issuer URL.
    pub issuer: Option<String>,
    /// The CI token's claims that a rule matched, and its `sub` (for the audit trail).
    pub claims: std::collections::BTreeMap<String, String>,
    /// Registry tokens for it expire no later than this (unix seconds).
    pub not_after: Option<i64>,
    /// A robot that may create robots within its own scope.
    pub may_create_robots: bool,
}

impl Identity {
    pub fn to_subject(&self) -> Subject {
        Subject {
            name: self.subject.clone(),
            kind: self.kind,
            groups: self.groups.clone(),
        }
    }
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong user name or password (never says which).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// This backend does not know the user: the next one in the [`Chain`] may.
    #[error("unknown user")]
    UnknownUser,
    /// Refused for a reason the client may be told (a CI token from an untrusted issuer, an
    /// expired one…): never about a password.
    #[error("refused: {0}")]
    Refused(String),
    /// The backend could not be asked (directory down, …): the client should retry later.
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

/// Checks a user name and password.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError>;
}

/// Backends asked in order. A backend that knows the user decides: its
/// [`AuthError::InvalidCredentials`] or [`AuthError::Unavailable`] is the answer (so a local
/// break-glass account never depends on the directory, and a directory user cannot take over
/// a local name). Only [`AuthError::UnknownUser`] passes the question on; from the last
/// backend it becomes `InvalidCredentials`.
pub struct Chain(pub Vec<std::sync::Arc<dyn Authenticator>>);

#[async_trait::async_trait]
impl Authenticator for Chain {
    fn name(&self) -> &'static str {
        "chain"
    }

    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        let m = crate::metrics::auth();
        for backend in &self.0 {
            let started = std::time::Instant::now();
            let answer = backend.authenticate(username, password).await;
            let name = backend.name();
            m.duration
                .with_label_values(&[name])
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &answer {
                Ok(_) => "success",
                Err(AuthError::InvalidCredentials) => "invalid_credentials",
                Err(AuthError::UnknownUser) => "unknown_user",
                Err(AuthError::Refused(_)) => "refused",
                Err(AuthError::Unavailable(_)) => "unavailable",
            };
            m.outcomes.with_label_values(&[name, outcome]).inc();
            match answer {
                Err(AuthError::UnknownUser) => continue,
                other => return other,
            }
        }
        Err(AuthError::InvalidCredentials)
    }
}
