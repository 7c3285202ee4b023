//! Refresh tokens: opaque, stored only as a SHA-256 hash, revocable, with an absolute and an
//! idle lifetime. In memory for now (the shared state store comes with the Redis issue).

use crate::auth::Identity;
use sha2::Digest;
use std::collections::HashMap;
use std::sync::Mutex;

struct Entry {
    identity: Identity,
    client_id: String,
    created_at: i64,
    last_used: i64,
}

pub struct RefreshStore {
    entries: Mutex<HashMap<String, Entry>>,
    absolute_seconds: i64,
    idle_seconds: i64,
}

fn hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

impl RefreshStore {
    pub fn new(absolute_seconds: i64, idle_seconds: i64) -> Self {
        RefreshStore {
            entries: Mutex::new(HashMap::new()),
            absolute_seconds,
            idle_seconds,
        }
    }

    /// A new refresh token for `identity`; only its hash is kept.
    pub fn issue(&self, identity: Identity, client_id: &str, now: i64) -> String {
        let token = super::random_token(32);
        let mut entries = self.entries.lock().expect("refresh store");
        entries.retain(|_, e| self.alive(e, now));
        entries.insert(
            hash(&token),
            Entry {
                identity,
                client_id: client_id.chars().take(100).collect(),
                created_at: now,
                last_used: now,
            },
        );
        token
    }

    fn alive(&self, e: &Entry, now: i64) -> bool {
        now - e.created_at < self.absolute_seconds && now - e.last_used < self.idle_seconds
    }

    /// The identity a valid refresh token stands for; marks it used.
    pub fn redeem(&self, token: &str, now: i64) -> Option<Identity> {
        let mut entries = self.entries.lock().expect("refresh store");
        let key = hash(token);
        let alive = entries.get(&key).is_some_and(|e| self.alive(e, now));
        if !alive {
            entries.remove(&key);
            return None;
        }
        let e = entries.get_mut(&key)?;
        e.last_used = now;
        Some(e.identity.clone())
    }

    /// Revokes one token; whether it existed.
    pub fn revoke(&self, token: &str) -> bool {
        self.entries
            .lock()
            .expect("refresh store")
            .remove(&hash(token))
            .is_some()
    }

    /// Revokes every token of a subject; how many.
    pub fn revoke_subject(&self, subject: &str) -> usize {
        let mut entries = self.entries.lock().expect("refresh store");
        let before = entries.len();
        entries.retain(|_, e| e.identity.subject != subject);
        before - entries.len()
    }

    /// Client ids of a subject's live tokens (for an admin listing).
    pub fn sessions(&self, subject: &str) -> Vec<String> {
        self.entries
            .lock()
            .expect("refresh store")
            .values()
            .filter(|e| e.identity.subject == subject)
            .map(|e| e.client_id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::SubjectKind;

    fn id() -> Identity {
        Identity {
            subject: "bob".into(),
            groups: vec![],
            kind: SubjectKind::User,
        }
    }

    #[test]
    fn refresh_tokens_expire_idle_and_absolute_and_revoke() {
        let s = RefreshStore::new(100, 10);
        let t = s.issue(id(), "docker", 0);
        assert!(s.redeem(&t, 5).is_some());
        assert!(s.redeem(&t, 14).is_some(), "use renews the idle lifetime");
        assert!(s.redeem(&t, 30).is_none(), "idle for 16 s");
        let t = s.issue(id(), "docker", 0);
        for now in (9..100).step_by(9) {
            assert!(s.redeem(&t, now).is_some());
        }
        assert!(s.redeem(&t, 100).is_none(), "absolute lifetime");
        let t = s.issue(id(), "docker", 0);
        assert!(s.revoke(&t));
        assert!(s.redeem(&t, 1).is_none());
        assert!(s.redeem("not-a-token", 1).is_none());
    }
}
