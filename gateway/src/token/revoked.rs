//! Revoked access tokens, shared by every replica through the state store.
//!
//! An access token is a signed JWT that any gateway accepts on its own, so revoking one means
//! telling every gateway. Two kinds of entry live under `revoked:` in the store, each with a
//! time to live that ends when no token it covers can still be valid:
//!
//! - `revoked:jti:<jti>` — one token (RFC 7009 revocation by its holder, an administrator's
//!   `DELETE /auth/tokens/<jti>`);
//! - `revoked:sub:<kind>:<name>` — every token of a subject issued at or before the stored
//!   time (a deleted robot account).
//!
//! Checking a token is on the hot path of every `/v2/` request, so it never waits for the
//! store: each gateway keeps a local copy that [`Revocations::run`] reloads every
//! `revocation_sync_ms` (one `SCAN` of a few keys), and a revocation made on a gateway applies
//! there at once. Another replica honours it within one sync interval. When the store is down
//! the copy keeps what it had (already-issued tokens keep working, revocations made before
//! the outage stay in force) and a warning says that the list is stale.

use crate::state::{StateError, StateStore};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

const PREFIX: &str = "revoked:";
const JTI: &str = "revoked:jti:";
const SUBJECT: &str = "revoked:sub:";

#[derive(Default)]
struct List {
    /// jti → expiry of the token (unix seconds).
    tokens: HashMap<String, i64>,
    /// `<kind>:<name>` → tokens issued at or before this time are revoked.
    subjects: HashMap<String, i64>,
}

/// What a revocation is checked against: a token's `jti`, who it was issued to (kind and
/// name) and when (`iat`). (The registry JWT's claims carry them; this module does not need
/// the JWT type, which holds the revocation list.)
#[derive(Debug, Clone, Copy)]
pub struct Issued<'a> {
    pub jti: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub iat: i64,
}

pub struct Revocations {
    store: Arc<dyn StateStore>,
    list: RwLock<List>,
    sync_every: Duration,
    /// How long a token may live, for entries whose token's expiry is unknown.
    max_token_seconds: u64,
}

fn subject_key(kind: &str, name: &str) -> String {
    format!("{kind}:{name}")
}

impl Revocations {
    pub fn new(store: Arc<dyn StateStore>, sync_every: Duration, max_token_seconds: u64) -> Self {
        Revocations {
            store,
            list: RwLock::new(List::default()),
            sync_every,
            max_token_seconds,
        }
    }

    /// Whether a token (its claims already verified) is revoked.
    pub fn is_revoked(&self, token: &Issued<'_>) -> bool {
        let Ok(list) = self.list.read() else {
            return false;
        };
        if list.tokens.is_empty() && list.subjects.is_empty() {
            return false;
        }
        list.tokens.contains_key(token.jti)
            || list
                .subjects
                .get(&subject_key(token.kind, token.subject))
                .is_some_and(|&cut| token.iat <= cut)
    }

    /// The `iat` for a token issued to the subject now: after the subject's revocation time,
    /// so that a client that fetches a new token in the second its old ones were revoked
    /// (one second is the claim's resolution) gets one that works.
    pub fn issue_time(&self, kind: &str, name: &str, now: i64) -> i64 {
        let Ok(list) = self.list.read() else {
            return now;
        };
        match list.subjects.get(&subject_key(kind, name)) {
            Some(&cut) if cut >= now => cut + 1,
            _ => now,
        }
    }

    /// Revokes one token until `exp` (its expiry; `None`: the longest a token may live).
    pub async fn revoke_token(&self, jti: &str, exp: Option<i64>) -> Result<(), StateError> {
        let now = super::unix_now();
        let exp = exp.unwrap_or(now + self.max_token_seconds as i64);
        // The verifier's leeway lets a token live a little past `exp`.
        let ttl = Duration::from_secs((exp - now).max(0) as u64 + 60);
        self.store
            .set(&format!("{JTI}{jti}"), exp.to_string().into_bytes(), ttl)
            .await?;
        if let Ok(mut list) = self.list.write() {
            list.tokens.insert(jti.to_string(), exp);
        }
        Ok(())
    }

    /// Revokes every token of the subject issued up to now.
    pub async fn revoke_subject(&self, kind: &str, name: &str) -> Result<(), StateError> {
        let now = super::unix_now();
        let ttl = Duration::from_secs(self.max_token_seconds + 60);
        let key = subject_key(kind, name);
        self.store
            .set(
                &format!("{SUBJECT}{key}"),
                now.to_string().into_bytes(),
                ttl,
            )
            .await?;
        if let Ok(mut list) = self.list.write() {
            list.subjects.insert(key, now);
        }
        Ok(())
    }

    /// Reloads the local copy from the store.
    pub async fn sync(&self) -> Result<usize, StateError> {
        let mut fresh = List::default();
        for (key, value) in self.store.scan(PREFIX).await? {
            let Some(at) = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
            else {
                continue;
            };
            if let Some(jti) = key.strip_prefix(JTI) {
                fresh.tokens.insert(jti.to_string(), at);
            } else if let Some(subject) = key.strip_prefix(SUBJECT) {
                fresh.subjects.insert(subject.to_string(), at);
            }
        }
        let n = fresh.tokens.len() + fresh.subjects.len();
        if let Ok(mut list) = self.list.write() {
            *list = fresh;
        }
        crate::metrics::auth().revocations.set(n as i64);
        Ok(n)
    }

    /// Keeps the local copy in step with the store, forever (on the side runtime).
    pub async fn run(self: Arc<Self>) {
        let mut stale = false;
        let mut tick = tokio::time::interval(self.sync_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = self.sync().await;
            crate::metrics::auth()
                .revocation_reloads
                .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
                .inc();
            match result {
                Ok(_) if stale => {
                    stale = false;
                    tracing::info!("the revocation list is in step with the state store again");
                }
                Ok(_) => {}
                Err(e) if !stale => {
                    stale = true;
                    tracing::warn!(error = %e, "cannot reload the revocation list; keeping the last one");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn claims<'a>(jti: &'a str, kind: &'a str, subject: &'a str, iat: i64) -> Issued<'a> {
        Issued {
            jti,
            kind,
            subject,
            iat,
        }
    }

    #[tokio::test]
    async fn a_revocation_made_on_one_replica_reaches_another_at_its_next_sync() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let a = Revocations::new(store.clone(), Duration::from_secs(1), 300);
        let b = Revocations::new(store, Duration::from_secs(1), 300);
        let now = crate::clock::unix_now();
        let t1 = claims("one", "user", "alice", now);
        let t2 = claims("two", "user", "alice", now);
        a.revoke_token("one", Some(t1.iat + 300)).await.unwrap();
        assert!(a.is_revoked(&t1), "at once where it was revoked");
        assert!(!a.is_revoked(&t2), "only that token");
        assert!(!b.is_revoked(&t1), "the other replica has not synced yet");
        assert_eq!(b.sync().await.unwrap(), 1);
        assert!(b.is_revoked(&t1));
        assert!(!b.is_revoked(&t2));

        let old = claims("three", "robot", "ci-bot", now - 10);
        let user_of_same_name = claims("four", "user", "ci-bot", now - 10);
        b.revoke_subject("robot", "ci-bot").await.unwrap();
        a.sync().await.unwrap();
        assert!(a.is_revoked(&old));
        assert!(
            !a.is_revoked(&user_of_same_name),
            "kind is part of the subject"
        );
        let later = claims("five", "robot", "ci-bot", now + 5);
        assert!(!a.is_revoked(&later), "a token issued afterwards is valid");
        let iat = a.issue_time("robot", "ci-bot", now);
        assert!(
            !a.is_revoked(&claims("six", "robot", "ci-bot", iat)),
            "one issued right now too"
        );
        assert_eq!(a.issue_time("user", "alice", now), now);
    }
}
