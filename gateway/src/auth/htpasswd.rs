//! Static users from a bcrypt htpasswd file (`htpasswd -B`), the embedded default.

use super::{AuthError, Authenticator, Identity};
use anyhow::{Context, bail};
use policy::SubjectKind;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct Htpasswd {
    users: HashMap<String, String>,
    groups: HashMap<String, Vec<String>>,
    /// A valid hash compared when the user is unknown, so timing does not tell.
    dummy_hash: String,
    /// Another backend follows in a [`super::Chain`]: unknown users are passed on at once
    /// ([`AuthError::UnknownUser`]) instead of being refused after a dummy comparison.
    pub fall_through: bool,
}

impl Htpasswd {
    pub fn load(path: &Path, groups: &BTreeMap<String, Vec<String>>) -> anyhow::Result<Self> {
        // Password hashes: as private as a secret.
        service::secrets::warn_if_exposed(path);
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, groups).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str, groups: &BTreeMap<String, Vec<String>>) -> anyhow::Result<Self> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                bail!("line {}: not user:hash", i + 1);
            };
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                bail!(
                    "line {}: user {user:?} does not have a bcrypt hash (use htpasswd -B)",
                    i + 1
                );
            }
            users.insert(user.to_string(), hash.to_string());
        }
        let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
        for (group, members) in groups {
            for m in members {
                by_user.entry(m.clone()).or_default().push(group.clone());
            }
        }
        let cost = users
            .values()
            .next()
            .and_then(|h| h.get(4..6))
            .and_then(|c| c.parse().ok())
            .unwrap_or(bcrypt::DEFAULT_COST);
        Ok(Htpasswd {
            users,
            groups: by_user,
            dummy_hash: bcrypt::hash("portcullis-dummy", cost).context("hashing")?,
            fall_through: false,
        })
    }
}

#[async_trait::async_trait]
impl Authenticator for Htpasswd {
    fn name(&self) -> &'static str {
        "htpasswd"
    }

    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        let known = self.users.get(username);
        if known.is_none() && self.fall_through {
            return Err(AuthError::UnknownUser);
        }
        let hash = known.unwrap_or(&self.dummy_hash).clone();
        let password = password.to_string();
        // bcrypt is slow on purpose: keep it off the proxy's event loop.
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        if !ok || known.is_none() {
            return Err(AuthError::InvalidCredentials);
        }
        Ok(Identity {
            subject: username.to_string(),
            groups: self.groups.get(username).cloned().unwrap_or_default(),
            kind: SubjectKind::User,
            machine: None,
        })
    }
}
