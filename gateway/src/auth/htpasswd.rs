//! Static users from a bcrypt htpasswd file (`htpasswd -B`), the embedded default;
//! [`LiveHtpasswd`] reads the file again on `SIGHUP` (a file that does not parse changes
//! nothing), so users are added and removed without a restart.

use super::{AuthError, Authenticator, Identity};
use anyhow::{Context, bail};
use policy::SubjectKind;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
        Ok(Self::read(path, groups)?.0)
    }

    /// The users of the file at `path`, and the SHA-256 of its text.
    fn read(path: &Path, groups: &BTreeMap<String, Vec<String>>) -> anyhow::Result<(Self, String)> {
        // Password hashes: as private as a secret.
        service::secrets::warn_if_exposed(path);
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let users = Self::parse(&text, groups).with_context(|| format!("in {}", path.display()))?;
        Ok((users, crate::audit::sha256_hex(&text)))
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

/// The users of an htpasswd file, read again on [`LiveHtpasswd::reload`]: the users in force
/// are replaced only by a file that parses whole; a login in progress keeps the users it
/// started with.
pub struct LiveHtpasswd {
    file: PathBuf,
    groups: BTreeMap<String, Vec<String>>,
    fall_through: bool,
    current: crate::in_force::InForce<Htpasswd>,
    /// Users a reload removed (and none put back since).
    removed: RwLock<std::collections::HashSet<String>>,
}

impl LiveHtpasswd {
    /// The users of `file` (`fall_through`: another backend follows in the chain).
    pub fn load(
        file: &Path,
        groups: &BTreeMap<String, Vec<String>>,
        fall_through: bool,
    ) -> anyhow::Result<Self> {
        let mut users = Htpasswd::load(file, groups)?;
        users.fall_through = fall_through;
        Ok(LiveHtpasswd {
            file: file.to_owned(),
            groups: groups.clone(),
            fall_through,
            current: crate::in_force::InForce::new(users),
            removed: RwLock::default(),
        })
    }

    /// Whether `user` may no longer log in with a password here: not in the file, and no
    /// other backend (LDAP) that could know them — or removed from the file by a reload.
    pub fn gone(&self, user: &str) -> bool {
        if self.in_force().users.contains_key(user) {
            return false;
        }
        !self.fall_through || self.removed.read().map_or(true, |r| r.contains(user))
    }

    fn in_force(&self) -> Arc<Htpasswd> {
        self.current.get()
    }

    /// How many users are in force.
    pub fn count(&self) -> usize {
        self.in_force().users.len()
    }

    /// Reads the file again and puts its users in force if it parses; audited either way
    /// (`users-reload`, with the file's SHA-256 and the number of users, never a hash).
    pub fn reload(&self) -> Result<usize, String> {
        let loaded = Htpasswd::read(&self.file, &self.groups).map_err(|e| format!("{e:#}"));
        let file = self.file.display().to_string();
        match loaded {
            Ok((mut users, sha)) => {
                users.fall_through = self.fall_through;
                let n = users.users.len();
                let old = self.in_force();
                if let Ok(mut removed) = self.removed.write() {
                    removed.extend(
                        old.users
                            .keys()
                            .filter(|u| !users.users.contains_key(*u))
                            .cloned(),
                    );
                    removed.retain(|u| !users.users.contains_key(u));
                }
                self.current.put(users);
                tracing::info!(file = %file, users = n, "users reloaded");
                crate::audit::record(
                    "users-reload",
                    "success",
                    serde_json::json!({"users.file": file, "users.sha256": sha, "users.count": n}),
                );
                Ok(n)
            }
            Err(why) => {
                tracing::error!(file = %file, error = %why, "users reload failed; the users in force stay");
                crate::audit::record(
                    "users-reload",
                    "failure",
                    serde_json::json!({"users.file": file, "event.reason": why}),
                );
                Err(why)
            }
        }
    }

    /// Reloads on every `SIGHUP`, forever (on the side runtime).
    pub async fn reload_on_sighup(self: Arc<Self>) {
        service::signal::on_sighup("users are never reloaded", || {
            let _ = self.reload();
        })
        .await
    }
}

#[async_trait::async_trait]
impl Authenticator for LiveHtpasswd {
    fn name(&self) -> &'static str {
        "htpasswd"
    }

    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        self.in_force().authenticate(username, password).await
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[tokio::test]
    async fn a_reload_adds_and_removes_users_and_a_broken_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let line = |u: &str, p: &str| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap());
        std::fs::write(&file, line("old", "old-pw")).unwrap();
        let live = LiveHtpasswd::load(&file, &BTreeMap::new(), false).unwrap();
        assert!(live.authenticate("old", "old-pw").await.is_ok());
        std::fs::write(&file, line("new", "new-pw")).unwrap();
        assert_eq!(live.reload(), Ok(1));
        assert!(live.authenticate("new", "new-pw").await.is_ok());
        assert!(live.authenticate("old", "old-pw").await.is_err(), "removed");
        assert!(live.gone("old") && !live.gone("new"));
        std::fs::write(&file, "new:not-a-bcrypt-hash\n").unwrap();
        assert!(live.reload().is_err());
        assert!(live.authenticate("new", "new-pw").await.is_ok(), "kept");
        std::fs::remove_file(&file).unwrap();
        assert!(
            live.reload().is_err(),
            "a missing file changes nothing either"
        );
        assert_eq!(live.count(), 1);
    }
}
