//! Authentication: who is this? One trait, several backends (static users, LDAP; OIDC,
//! robots and CI federation behind the same trait later), asked in a documented order by
//! [`Chain`].

pub mod htpasswd;
pub mod ldap;

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
    /// This backend does not know the user: the next one in the [`Chain`] may.
    #[error("unknown user")]
    UnknownUser,
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
        for backend in &self.0 {
            match backend.authenticate(username, password).await {
                Err(AuthError::UnknownUser) => continue,
                other => return other,
            }
        }
        Err(AuthError::InvalidCredentials)
    }
}
