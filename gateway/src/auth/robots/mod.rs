//! Robot accounts: named machine identities for CI and automation, with their own scope
//! (repository patterns × actions), an expiry, secrets shown once and stored hashed, rotation
//! with an overlap, disable and delete. Kept in the shared [`StateStore`] under
//! `robot:<name>` (durable entries), so every gateway replica sees the same robots.
//!
//! Names are `robot$<project>+<name>` (Harbor's scheme). A robot logs in like a user
//! (`docker login -u 'robot$team-a+ci' -p <secret>`, Basic credentials at `/token`); it never
//! gets a refresh token, so disabling, deleting or expiring it takes effect at its next token
//! request (registry tokens already issued live out their few minutes).
//!
//! Who may create: registry administrators (policy `admin_groups`, or the configured admin
//! token) anything the configuration allows; a robot created with `may_create_robots` only
//! robots of its own project whose scope its own covers ([`Scope::covers`]) and which
//! expire no later than itself. Nobody else.

pub use super::scope::{Scope, ScopeEntry};
mod api;

use crate::auth::{AuthError, Authenticator, Identity, Machine};
use crate::clock::unix_now;
use crate::reply::Reply;
use crate::state::{StateError, StateStore};
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use std::path::PathBuf;
use std::sync::Arc;

/// Robot names start with this.
pub const PREFIX: &str = "robot$";
/// The environment variable with the admin token (when `robots.admin_token_file` is unset).
pub const ADMIN_TOKEN_ENV: &str = "PORTCULLIS_ADMIN_TOKEN";
const KEY_PREFIX: &str = "robot:";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobotsConfig {
    /// Lifetime of a robot created without one.
    #[serde(default = "default_lifetime")]
    pub default_lifetime_days: u64,
    /// The longest lifetime anyone may give.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_days: u64,
    /// Whether administrators may create robots that never expire.
    #[serde(default)]
    pub allow_never_expire: bool,
    /// After a rotation the previous secret keeps working this long (at most).
    #[serde(default = "default_overlap")]
    pub rotation_overlap_seconds: u64,
    /// A bearer token for the admin API (automation, bootstrap); `PORTCULLIS_ADMIN_TOKEN`
    /// when unset; none: only administrators' own credentials.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

fn default_lifetime() -> u64 {
    90
}
fn default_max_lifetime() -> u64 {
    365
}
fn default_overlap() -> u64 {
    3600
}

impl Default for RobotsConfig {
    fn default() -> Self {
        RobotsConfig {
            default_lifetime_days: default_lifetime(),
            max_lifetime_days: default_max_lifetime(),
            allow_never_expire: false,
            rotation_overlap_seconds: default_overlap(),
            admin_token_file: None,
        }
    }
}

/// A secret's hash (never the secret) and how long it stays valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Secret {
    hash: String,
    created_at: i64,
    /// Set when a rotation replaced it.
    valid_until: Option<i64>,
}

/// A robot as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Robot {
    name: String,
    description: String,
    scope: Vec<ScopeEntry>,
    /// `None`: never.
    expires_at: Option<i64>,
    disabled: bool,
    /// Disabled by an administrator: only an administrator enables it again (not the robot
    /// that created it).
    #[serde(default)]
    disabled_by_admin: bool,
    may_create_robots: bool,
    created_by: String,
    created_at: i64,
    secrets: Vec<Secret>,
}

impl Robot {
    fn view(&self, now: i64) -> serde_json::Value {
        json!({
            "name": self.name,
            "description": self.description,
            "scope": self.scope,
            "expires_at": self.expires_at,
            "expired": self.expires_at.is_some_and(|e| now >= e),
            "disabled": self.disabled,
            "may_create_robots": self.may_create_robots,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "secrets": self.secrets.iter().map(|s| json!({
                "created_at": s.created_at,
                "valid_until": s.valid_until,
            })).collect::<Vec<_>>(),
        })
    }

    fn live(&self, now: i64) -> bool {
        !self.disabled && self.expires_at.is_none_or(|e| now < e)
    }
}

/// Who calls the admin API.
pub enum Caller {
    /// The configured admin token.
    Token,
    /// A registry administrator (policy `admin_groups`).
    Admin(String),
    /// Anyone else who logged in.
    Other(Identity),
}

impl Caller {
    fn name(&self) -> &str {
        match self {
            Caller::Token => "admin-token",
            Caller::Admin(n) => n,
            Caller::Other(id) => &id.subject,
        }
    }

    /// A robot that may create robots: its scope and expiry bound what it creates.
    fn delegating_robot(&self) -> Option<(&Scope, Option<i64>)> {
        match self {
            Caller::Other(id) if id.kind == SubjectKind::Robot => {
                let m = id.machine.as_deref().filter(|m| m.may_create_robots)?;
                m.scope.as_ref().map(|s| (s, m.not_after))
            }
            _ => None,
        }
    }
}

pub struct Robots {
    store: Arc<dyn StateStore>,
    peppers: crate::auth::pepper::Peppers,
    /// `[robots]` and the admin token read with it; replaced by a configuration reload.
    in_force: crate::in_force::InForce<RobotSettings>,
}

/// `[robots]` checked, with the admin token it names read ([`Robots::prepare`]).
pub struct RobotSettings {
    cfg: RobotsConfig,
    admin_token: Option<zeroize::Zeroizing<String>>,
}

impl RobotSettings {
    /// Whether these differ from `other` (the table, or the admin token's value).
    pub fn differs_from(&self, other: &RobotSettings) -> bool {
        format!("{:?}", self.cfg) != format!("{:?}", other.cfg)
            || self.admin_token.as_deref() != other.admin_token.as_deref()
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// The project of a robot name (`robot$<project>+<name>`).
fn project_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)?.split_once('+').map(|(p, _)| p)
}

/// Decodes `%XX` in a path segment (clients may send `$` and `+` encoded).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::oauth_error(status, code, message)
}

fn store_error(e: &StateError) -> Reply {
    tracing::warn!(error = %e, "robot store unavailable");
    error(
        503,
        "temporarily_unavailable",
        "robot storage is unavailable, try again later",
    )
}

/// A robot secret's hash: SHA-256 of the pepper, the robot's name and the secret.
fn hash_with(pepper: &[u8], name: &str, secret: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(pepper);
    h.update([0]);
    h.update(name.as_bytes());
    h.update([0]);
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

impl Robots {
    pub fn new(
        store: Arc<dyn StateStore>,
        peppers: crate::auth::pepper::Peppers,
        cfg: RobotsConfig,
    ) -> anyhow::Result<Self> {
        let settings = Self::prepare(cfg)?;
        Ok(Robots {
            store,
            peppers,
            in_force: crate::in_force::InForce::new(settings),
        })
    }

    /// Checks `cfg` and reads the admin token it names (file, else `PORTCULLIS_ADMIN_TOKEN`).
    pub fn prepare(cfg: RobotsConfig) -> anyhow::Result<RobotSettings> {
        let admin_token = match &cfg.admin_token_file {
            Some(f) => Some(service::secrets::read_secret_file(f)?),
            None => std::env::var(ADMIN_TOKEN_ENV).ok(),
        }
        .filter(|t| !t.is_empty())
        .map(zeroize::Zeroizing::new);
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            anyhow::bail!("the admin token is too short (16 characters at least)");
        }
        anyhow::ensure!(
            cfg.default_lifetime_days <= cfg.max_lifetime_days,
            "robots.default_lifetime_days is above robots.max_lifetime_days"
        );
        Ok(RobotSettings { cfg, admin_token })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<RobotSettings> {
        self.in_force.get()
    }

    /// Puts prepared settings in force (`SIGHUP`): lifetimes and overlaps for what is created
    /// or rotated from now on, and the admin token (a rotated file takes effect).
    pub fn put(&self, settings: RobotSettings) {
        self.in_force.put(settings);
    }

    /// Whether `token` is the configured admin token (compared in constant time).
    pub fn is_admin_token(&self, token: &str) -> bool {
        self.settings().admin_token.as_ref().is_some_and(|t| {
            t.len() == token.len() && openssl::memcmp::eq(t.as_bytes(), token.as_bytes())
        })
    }

    /// The stored form of a secret: its hash under the current pepper.
    fn hash(&self, name: &str, secret: &str) -> String {
        hash_with(self.peppers.current(), name, secret)
    }

    /// Which of the robot's live secrets `secret` is, and under which pepper (0: the current).
    fn find_secret(&self, robot: &Robot, secret: &str, now: i64) -> Option<(usize, usize)> {
        self.peppers.all().enumerate().find_map(|(p, pepper)| {
            let hash = hash_with(pepper, &robot.name, secret);
            robot
                .secrets
                .iter()
                .position(|s| {
                    s.valid_until.is_none_or(|u| now < u)
                        && openssl::memcmp::eq(s.hash.as_bytes(), hash.as_bytes())
                })
                .map(|i| (i, p))
        })
    }

    /// Stores a secret that matched under an earlier pepper hashed under the current one. The
    /// record is read again just before: if the secret is no longer there as it was (rotated,
    /// retired, the robot deleted meanwhile), nothing is written, so no change is undone.
    async fn rehash(&self, name: &str, secret: &str, old_hash: &str) {
        let result = async {
            let Some(mut robot) = self.load(name).await? else {
                return Ok(());
            };
            let Some(s) = robot.secrets.iter_mut().find(|s| s.hash == old_hash) else {
                return Ok(());
            };
            s.hash = self.hash(name, secret);
            self.save(&robot).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(robot = %name, error = %e, "could not store the secret under the current pepper; it will be tried again at the next login");
        }
    }

    async fn load(&self, name: &str) -> Result<Option<Robot>, StateError> {
        match self.store.get(&format!("{KEY_PREFIX}{name}")).await? {
            None => Ok(None),
            Some(raw) => match serde_json::from_slice(&raw) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    tracing::error!(robot = %name, error = %e, "unreadable robot record");
                    Ok(None)
                }
            },
        }
    }

    async fn save(&self, r: &Robot) -> Result<(), StateError> {
        let raw = serde_json::to_vec(r).map_err(|e| StateError(e.to_string()))?;
        self.store
            .put(&format!("{KEY_PREFIX}{}", r.name), raw)
            .await
    }
}

#[async_trait::async_trait]
impl Authenticator for Robots {
    fn name(&self) -> &'static str {
        "robot"
    }

    /// Decides every `robot$…` name; passes every other on.
    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        if !username.starts_with(PREFIX) {
            return Err(AuthError::UnknownUser);
        }
        let now = unix_now();
        let robot = self
            .load(username)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let refuse = |why: &str| {
            crate::audit::record(
                "login",
                "failure",
                json!({"user.name": username, "identity.kind": "robot", "event.reason": why}),
            );
            Err(AuthError::InvalidCredentials)
        };
        let Some(robot) = robot else {
            return refuse("no such robot");
        };
        let Some((index, pepper)) = self.find_secret(&robot, password, now) else {
            return refuse("wrong or retired secret");
        };
        if pepper > 0 {
            self.rehash(username, password, &robot.secrets[index].hash)
                .await;
        }
        if robot.disabled {
            return refuse("robot disabled");
        }
        if !robot.live(now) {
            return refuse("robot expired");
        }
        let scope = match Scope::compile(&robot.scope) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(robot = %username, error = %e, "stored robot scope does not compile");
                return refuse("stored scope is invalid");
            }
        };
        Ok(Identity {
            subject: robot.name.clone(),
            groups: Vec::new(),
            kind: SubjectKind::Robot,
            machine: Some(Arc::new(Machine {
                scope: Some(scope),
                authenticator: "robot".into(),
                issuer: None,
                claims: Default::default(),
                not_after: robot.expires_at,
                may_create_robots: robot.may_create_robots,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::Action;

    fn scope(entries: &[(&[&str], &[&str])]) -> Scope {
        let src: Vec<ScopeEntry> = entries
            .iter()
            .map(|(r, a)| ScopeEntry {
                repositories: r.iter().map(|s| s.to_string()).collect(),
                actions: a.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        Scope::compile(&src).unwrap()
    }

    #[test]
    fn scopes_cover_narrower_ones_only() {
        let own = scope(&[
            (&["team-a/**"], &["pull", "push"]),
            (&["base/*"], &["pull"]),
        ]);
        assert!(own.covers(&scope(&[(&["team-a/app"], &["push"])])));
        assert!(own.covers(&scope(&[(&["team-a/x/**", "base/os"], &["pull"])])));
        assert!(!own.covers(&scope(&[(&["team-a/app"], &["delete"])])));
        assert!(!own.covers(&scope(&[(&["base/os"], &["push"])])));
        assert!(!own.covers(&scope(&[(&["**"], &["pull"])])));
        assert!(own.allows(Action::Push, "team-a/x/y"));
        assert!(!own.allows(Action::Push, "team-b/x"));
    }

    #[test]
    fn bad_scopes_are_refused() {
        for (r, a) in [
            (vec!["team-a/**"], vec!["catalog"]),
            (vec!["team-a/**"], vec![]),
            (vec!["Team"], vec!["pull"]),
            (vec!["users/{username}"], vec!["pull"]),
        ] {
            let src = [ScopeEntry {
                repositories: r.iter().map(|s| s.to_string()).collect(),
                actions: a.iter().map(|s| s.to_string()).collect(),
            }];
            assert!(Scope::compile(&src).is_err(), "{r:?} {a:?}");
        }
        assert!(Scope::compile(&[]).is_err());
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(project_of("robot$team-a+ci"), Some("team-a"));
        assert_eq!(project_of("bob"), None);
        assert_eq!(
            percent_decode("robot%24a%2Bb").as_deref(),
            Some("robot$a+b")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert!(valid_part("team-a"));
        assert!(!valid_part("-x"));
        assert!(!valid_part("a+b"));
    }
}

#[cfg(test)]
mod pepper_tests {
    use super::*;

    fn robots(peppers: crate::auth::pepper::Peppers, store: Arc<dyn StateStore>) -> Robots {
        Robots::new(store, peppers, RobotsConfig::default()).unwrap()
    }

    #[tokio::test]
    async fn a_rotated_pepper_keeps_every_robot_and_moves_it_to_the_new_pepper() {
        let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
        let old = robots(
            crate::auth::pepper::Peppers::one(b"old-pepper-0123456789"),
            store.clone(),
        );
        let created = old
            .api(
                "POST",
                "",
                br#"{"project":"team-a","name":"ci","scope":[{"repositories":["team-a/**"],"actions":["pull"]}]}"#,
                &Caller::Token,
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let body: serde_json::Value = serde_json::from_str(&created.body).unwrap();
        let secret = body["secret"].as_str().unwrap().to_string();
        // A new pepper with the old one still listed: the robot logs in, and is hashed again.
        let rotated = robots(
            crate::auth::pepper::Peppers::rotated(&[
                b"new-pepper-0123456789",
                b"old-pepper-0123456789",
            ]),
            store.clone(),
        );
        rotated
            .authenticate("robot$team-a+ci", &secret)
            .await
            .unwrap();
        let new_only = robots(
            crate::auth::pepper::Peppers::one(b"new-pepper-0123456789"),
            store.clone(),
        );
        new_only
            .authenticate("robot$team-a+ci", &secret)
            .await
            .unwrap();
        // Without the pepper it was made with, a secret is nothing.
        let other = robots(
            crate::auth::pepper::Peppers::one(b"another-pepper-0123"),
            store,
        );
        assert!(
            other
                .authenticate("robot$team-a+ci", &secret)
                .await
                .is_err()
        );
    }
}
