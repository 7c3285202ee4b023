//! Authentication: who is this? One trait, several backends (static users now; LDAP, OIDC,
//! robots and CI federation behind the same trait later).

pub mod htpasswd;

use policy::{Subject, SubjectKind};

/// An authenticated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub groups: Vec<String>,
    pub kind: SubjectKind,
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
