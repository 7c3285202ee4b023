//! Sessions: the registry refresh tokens (Docker identity tokens) people and devices hold.
//!
//! A token is opaque and random; the shared state store keeps only its SHA-256 under
//! `session:<hex>`, so every gateway replica redeems it and a leaked store does not leak
//! tokens. A session has a public id (the first 16 hex digits of that hash), a device name,
//! an idle and an absolute lifetime (the store's TTL follows the earlier of the two), and,
//! when it came from single sign-on, the IdP's refresh token so groups can be read again.

use crate::auth::Identity;
use crate::state::{StateError, StateStore};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::sync::Arc;
use std::time::Duration;

const PREFIX: &str = "session:";
/// Length of a session's public id (hex digits of the token's hash).
pub const ID_LEN: usize = 16;

/// One session as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub subject: String,
    pub groups: Vec<String>,
    pub kind: String,
    /// How it was created: `password`, `oidc` (browser) or `device` (device flow).
    pub source: String,
    /// The name the user gave the device, or the OAuth `client_id`.
    pub device: String,
    pub created_at: i64,
    pub last_used: i64,
    /// The IdP's refresh token, for sessions that re-read groups from the IdP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_refresh: Option<String>,
    /// When the groups were last read from the IdP.
    #[serde(default)]
    pub groups_checked_at: i64,
}

impl Session {
    pub fn new(identity: &Identity, source: &str, device: &str, now: i64) -> Self {
        Session {
            subject: identity.subject.clone(),
            groups: identity.groups.clone(),
            kind: crate::token::jwt::kind_name(identity.kind).to_string(),
            source: source.to_string(),
            device: device
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect(),
            created_at: now,
            last_used: now,
            idp_refresh: None,
            groups_checked_at: now,
        }
    }

    /// A session of a single sign-on: it keeps the IdP's refresh token, to read the groups
    /// again.
    pub fn from_sso(
        signed_in: crate::auth::oidc::SignedIn,
        source: &str,
        device: &str,
        now: i64,
    ) -> Self {
        let mut s = Session::new(&signed_in.identity, source, device, now);
        s.idp_refresh = signed_in.idp_refresh;
        s
    }

    pub fn identity(&self) -> Identity {
        Identity {
            subject: self.subject.clone(),
            groups: self.groups.clone(),
            kind: crate::token::jwt::kind_from_name(&self.kind),
            machine: None,
        }
    }
}

/// What a listing shows of a session (never the token or the IdP's token).
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub device: String,
    pub source: String,
    pub groups: Vec<String>,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
}

/// A redeemed session and the key it lives under (to update it).
pub struct Redeemed {
    pub key: String,
    pub session: Session,
}

pub struct Sessions {
    store: Arc<dyn StateStore>,
    absolute_seconds: i64,
    idle_seconds: i64,
}

fn key_of(token: &str) -> String {
    format!(
        "{PREFIX}{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

impl Sessions {
    /// How long a session lasts at most, used or not.
    pub fn absolute_seconds(&self) -> i64 {
        self.absolute_seconds
    }

    pub fn new(store: Arc<dyn StateStore>, absolute_seconds: i64, idle_seconds: i64) -> Self {
        Sessions {
            store,
            absolute_seconds: absolute_seconds.max(1),
            idle_seconds: idle_seconds.max(1),
        }
    }

    fn expires_at(&self, s: &Session) -> i64 {
        (s.created_at + self.absolute_seconds).min(s.last_used + self.idle_seconds)
    }

    /// The stored form of `s` and how long the store keeps it.
    fn entry(&self, s: &Session, now: i64) -> Result<(Vec<u8>, Duration), StateError> {
        let ttl = (self.expires_at(s) - now).max(1) as u64;
        let value = serde_json::to_vec(s).map_err(|e| StateError(e.to_string()))?;
        Ok((value, Duration::from_secs(ttl)))
    }

    /// Writes a used session back, only if it still exists: a session revoked (on any
    /// replica) while it was being redeemed stays revoked.
    async fn write_back(&self, key: &str, s: &Session, now: i64) -> Result<(), StateError> {
        let (value, ttl) = self.entry(s, now)?;
        self.store.replace(key, value, ttl).await.map(|_| ())
    }

    /// A new refresh token for `session`; only its hash is kept.
    pub async fn issue(&self, session: &Session) -> Result<String, StateError> {
        let token = super::random_token(32);
        let (value, ttl) = self.entry(session, session.created_at)?;
        self.store.set(&key_of(&token), value, ttl).await?;
        Ok(token)
    }

    /// The session a valid refresh token stands for; marks it used (written back at most
    /// once a minute, or a tenth of the idle lifetime, to spare the store).
    pub async fn redeem(&self, token: &str, now: i64) -> Result<Option<Redeemed>, StateError> {
        let key = key_of(token);
        let Some(raw) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let Ok(mut session) = serde_json::from_slice::<Session>(&raw) else {
            self.store.delete(&key).await?;
            return Ok(None);
        };
        if now >= self.expires_at(&session) {
            self.store.delete(&key).await?;
            return Ok(None);
        }
        if now - session.last_used >= (self.idle_seconds / 10).clamp(1, 60) {
            session.last_used = now;
            self.write_back(&key, &session, now).await?;
        }
        Ok(Some(Redeemed { key, session }))
    }

    /// Writes back a redeemed session that changed (groups read again, a rotated IdP token).
    pub async fn update(&self, r: &Redeemed, now: i64) -> Result<(), StateError> {
        self.write_back(&r.key, &r.session, now).await
    }

    /// Ends the session under a redeemed key.
    pub async fn end(&self, r: &Redeemed) -> Result<(), StateError> {
        self.store.delete(&r.key).await
    }

    /// Revokes one token; whether it existed.
    pub async fn revoke(&self, token: &str) -> Result<bool, StateError> {
        Ok(self.store.take(&key_of(token)).await?.is_some())
    }

    /// Sessions, all or one user's, oldest first.
    pub async fn list(&self, user: Option<&str>) -> Result<Vec<SessionInfo>, StateError> {
        let mut out: Vec<SessionInfo> = self
            .store
            .scan(PREFIX)
            .await?
            .into_iter()
            .filter_map(|(k, v)| {
                let s: Session = serde_json::from_slice(&v).ok()?;
                (user.is_none_or(|u| u == s.subject)).then(|| SessionInfo {
                    id: k[PREFIX.len()..].chars().take(ID_LEN).collect(),
                    user: s.subject.clone(),
                    device: s.device.clone(),
                    source: s.source.clone(),
                    groups: s.groups.clone(),
                    created_at: s.created_at,
                    last_used_at: s.last_used,
                    expires_at: self.expires_at(&s),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Revokes the session with public id `id` — only if it belongs to `owner`, when given.
    /// Whether one was revoked.
    pub async fn revoke_id(&self, id: &str, owner: Option<&str>) -> Result<bool, StateError> {
        if id.len() != ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let mut revoked = false;
        for (k, v) in self
            .store
            .scan(&format!("{PREFIX}{}", id.to_ascii_lowercase()))
            .await?
        {
            let mine = serde_json::from_slice::<Session>(&v)
                .is_ok_and(|s| owner.is_none_or(|o| o == s.subject));
            if mine {
                self.store.delete(&k).await?;
                revoked = true;
            }
        }
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::SubjectKind;

    fn id(name: &str) -> Identity {
        Identity {
            subject: name.into(),
            groups: vec!["g".into()],
            kind: SubjectKind::User,
            machine: None,
        }
    }

    fn sessions(absolute: i64, idle: i64) -> Sessions {
        Sessions::new(
            Arc::new(crate::state::MemoryStore::default()),
            absolute,
            idle,
        )
    }

    #[tokio::test]
    async fn refresh_tokens_expire_idle_and_absolute_and_revoke() {
        let s = sessions(100, 10);
        let t = s
            .issue(&Session::new(&id("bob"), "password", "docker", 0))
            .await
            .unwrap();
        assert!(s.redeem(&t, 5).await.unwrap().is_some());
        assert!(
            s.redeem(&t, 14).await.unwrap().is_some(),
            "use renews the idle lifetime"
        );
        assert!(s.redeem(&t, 30).await.unwrap().is_none(), "idle for 16 s");
        let t = s
            .issue(&Session::new(&id("bob"), "password", "docker", 0))
            .await
            .unwrap();
        for now in (9..100).step_by(9) {
            assert!(s.redeem(&t, now).await.unwrap().is_some(), "{now}");
        }
        assert!(
            s.redeem(&t, 100).await.unwrap().is_none(),
            "absolute lifetime"
        );
        let t = s
            .issue(&Session::new(&id("bob"), "password", "docker", 0))
            .await
            .unwrap();
        assert!(s.revoke(&t).await.unwrap());
        assert!(s.redeem(&t, 1).await.unwrap().is_none());
        assert!(s.redeem("not-a-token", 1).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sessions_are_listed_by_user_and_revoked_by_id_only_by_their_owner() {
        let s = sessions(1000, 1000);
        let bob = s
            .issue(&Session::new(&id("bob"), "oidc", "laptop", 1))
            .await
            .unwrap();
        let carol = s
            .issue(&Session::new(&id("carol"), "device", "ci\u{7}box", 2))
            .await
            .unwrap();
        let all = s.list(None).await.unwrap();
        assert_eq!(all.len(), 2);
        let mine = s.list(Some("bob")).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].device, "laptop");
        assert_eq!(mine[0].id.len(), ID_LEN);
        let listed = serde_json::to_string(&all).unwrap();
        assert!(
            !listed.contains(&bob) && !listed.contains(&carol),
            "{listed}"
        );
        assert!(listed.contains("cibox"), "control characters are dropped");

        let carols = &s.list(Some("carol")).await.unwrap()[0].id;
        assert!(!s.revoke_id(carols, Some("bob")).await.unwrap());
        assert!(s.redeem(&carol, 3).await.unwrap().is_some());
        assert!(!s.revoke_id("nothex!", None).await.unwrap());
        assert!(s.revoke_id(carols, None).await.unwrap());
        assert!(s.redeem(&carol, 3).await.unwrap().is_none());
        assert!(s.redeem(&bob, 3).await.unwrap().is_some());
    }
}
