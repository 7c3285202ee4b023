//! Brute-force protection and rate limits, shared by every gateway replica through the state
//! store (Redis when there are several).
//!
//! - **Lockout**: failed password logins are counted per user name (case-folded) and per
//!   source address in a fixed window. Reaching the limit locks that name (or address) out:
//!   the first lockout lasts `lockout_seconds`, each further one within a day twice as long,
//!   up to `max_lockout_seconds`. A locked login is refused before its password is checked
//!   (429 and `Retry-After`), so guessing stops even for a right guess. A good login clears
//!   the name's failure count, not its lockout history. Lockouts are audited
//!   (`login-lockout`), and so is every login refused while locked.
//! - **Rate limits**: requests per minute per source address and per identity, on the token
//!   endpoint and on `/v2/`, counted in one-minute windows (`0` = no limit).
//!
//! When the store does not answer, password logins fail with 503 (a lockout that cannot be
//! checked is not skipped) while rate limits let requests through (already issued access
//! tokens keep working); either way a warning is logged and a metric counts it.

use crate::state::{StateError, StateStore};
use std::sync::Arc;
use std::time::Duration;

/// `[limits]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Failed logins of one user name within the window that lock it out (`0`: never).
    pub user_failures: u64,
    /// Failed logins from one source address (any names) that lock it out (`0`: never).
    pub source_failures: u64,
    pub failure_window_seconds: u64,
    /// The first lockout; each further one within a day lasts twice as long.
    pub lockout_seconds: u64,
    pub max_lockout_seconds: u64,
    /// Token-endpoint requests per minute from one source address (`0`: no limit, the
    /// default: one NAT can hide a whole CI farm; lockouts already stop password guessing).
    pub token_per_minute_per_source: u64,
    /// Token-endpoint requests per minute for one user name (`0`: no limit, the default).
    pub token_per_minute_per_user: u64,
    /// `/v2/` requests per minute from one source address (`0`: no limit, the default).
    pub registry_per_minute_per_source: u64,
    /// `/v2/` requests per minute of one authenticated identity (`0`: no limit, the default).
    pub registry_per_minute_per_user: u64,
    /// Connections open at once from one source address (an IPv6 /64) on the TLS listener
    /// (`0`: no cap); more are closed before their TLS handshake (`edge`). Keep it well under
    /// the process's descriptor limit (`ulimit -n`), and above what one NAT'd office or CI
    /// farm holds open (Docker and containerd use one HTTP/2 connection per registry).
    pub connections_per_source: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            user_failures: 10,
            source_failures: 100,
            failure_window_seconds: 900,
            lockout_seconds: 60,
            max_lockout_seconds: 3600,
            token_per_minute_per_source: 0,
            token_per_minute_per_user: 0,
            registry_per_minute_per_source: 0,
            registry_per_minute_per_user: 0,
            connections_per_source: 512,
        }
    }
}

/// Whom a lockout or a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    User,
    Source,
}

impl By {
    pub fn name(self) -> &'static str {
        match self {
            By::User => "user",
            By::Source => "source",
        }
    }
}

/// A login refused before its password was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub by: By,
    pub retry_after: u64,
}

/// What [`Limits::login_gate`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Refuse the login: locked out.
    pub locked: Option<Locked>,
    /// The name has failed logins in the current window (a good login clears them).
    pub failures: bool,
}

/// A lockout that a failed login just started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    pub by: By,
    pub seconds: u64,
    pub failures: u64,
}

/// A request over a rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub by: By,
    pub retry_after: u64,
    /// The first refusal of its window (audited once, not per request).
    pub first: bool,
}

/// Which rate limits to apply.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Token,
    Registry,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Token => "token",
            Endpoint::Registry => "registry",
        }
    }
}

pub struct Limits {
    /// In force; replaced by a configuration reload ([`Limits::set`]).
    cfg: crate::in_force::InForce<LimitsConfig>,
    store: Arc<dyn StateStore>,
}

/// A store key part for a user name, as directories compare names: compatibility-normalised
/// (NFKC: full-width `ＢＯＢ` is `BOB`), outer spaces trimmed and inner runs of spaces made
/// one (LDAP's insignificant-space handling), case-folded — so `bob`, ` bob `, `BOB` and
/// `ｂｏｂ`, which all bind as one entry, count as one name. Long or odd names are hashed.
fn user_key(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    // RFC 4518 §2.2 maps these to nothing before comparing (soft hyphen, zero-width and
    // joiner characters, variation selectors, the byte-order mark).
    let mapped_to_nothing = |c: &char| {
        matches!(c, '\u{00AD}' | '\u{034F}' | '\u{1806}' | '\u{180B}'..='\u{180E}'
            | '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFFC}')
    };
    let normal: String = name.nfkc().filter(|c| !mapped_to_nothing(c)).collect();
    let folded = normal
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    if folded.len() <= 128 && !folded.contains(['*', '?', '[', ']', '\\']) {
        folded
    } else {
        use sha2::Digest;
        format!("#{}", hex::encode(sha2::Sha256::digest(folded.as_bytes())))
    }
}

/// A store key part for a source address: its /64 for IPv6 (one host's usual share), as the
/// connection cap counts it; an address that does not parse as itself.
fn source_key(source: &str) -> String {
    match source.parse::<std::net::IpAddr>() {
        Ok(ip) => crate::edge::source_of(ip).to_string(),
        Err(_) => source.to_string(),
    }
}

fn now() -> u64 {
    crate::clock::unix_now().max(0) as u64
}

impl Limits {
    pub fn new(cfg: LimitsConfig, store: Arc<dyn StateStore>) -> Self {
        Limits {
            cfg: crate::in_force::InForce::new(cfg),
            store,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> Arc<LimitsConfig> {
        self.cfg.get()
    }

    /// Puts new limits in force (`SIGHUP`); lockouts and windows counted so far stay.
    pub fn set(&self, cfg: LimitsConfig) {
        self.cfg.put(cfg);
    }

    fn subjects<'a>(user: &'a str, source: Option<&'a str>) -> Vec<(By, String)> {
        let mut v = vec![(By::User, user_key(user))];
        if let Some(s) = source {
            v.push((By::Source, source_key(s)));
        }
        v
    }

    /// Whether a login of `user` from `source` must be refused now (locked out); one read of
    /// the store.
    pub async fn login_gate(&self, user: &str, source: Option<&str>) -> Result<Gate, StateError> {
        let now = now();
        let subjects = Self::subjects(user, source);
        let mut keys: Vec<String> = subjects
            .iter()
            .map(|(by, who)| format!("lock:{}:{who}", by.name()))
            .collect();
        keys.push(format!("fail:user:{}", user_key(user)));
        let mut values = self.store.get_many(&keys).await?;
        let failures = values.pop().flatten().is_some();
        for ((by, _), raw) in subjects.into_iter().zip(values) {
            let Some(raw) = raw else {
                continue;
            };
            let until = std::str::from_utf8(&raw)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(now + 1);
            if until > now {
                return Ok(Gate {
                    locked: Some(Locked {
                        by,
                        retry_after: until - now,
                    }),
                    failures,
                });
            }
        }
        Ok(Gate {
            locked: None,
            failures,
        })
    }

    /// Counts a failed login; the lockout it starts, if any.
    pub async fn login_failed(
        &self,
        user: &str,
        source: Option<&str>,
    ) -> Result<Option<Lockout>, StateError> {
        // One snapshot for the whole count (a reload meanwhile applies to the next).
        let cfg = self.config();
        let window = Duration::from_secs(cfg.failure_window_seconds.max(1));
        let mut started = None;
        for (by, who) in Self::subjects(user, source) {
            let limit = match by {
                By::User => cfg.user_failures,
                By::Source => cfg.source_failures,
            };
            if limit == 0 {
                continue;
            }
            let fails = format!("fail:{}:{who}", by.name());
            let n = self.store.incr(&fails, window).await?;
            if n < limit || started.is_some() {
                continue;
            }
            // Each lockout within a day doubles the next one.
            let k = self
                .store
                .incr(
                    &format!("lockouts:{}:{who}", by.name()),
                    Duration::from_secs(86_400),
                )
                .await?;
            let seconds = cfg
                .lockout_seconds
                .max(1)
                .saturating_mul(1u64 << (k - 1).min(20))
                .min(cfg.max_lockout_seconds.max(1));
            self.store
                .set(
                    &format!("lock:{}:{who}", by.name()),
                    (now() + seconds).to_string().into_bytes(),
                    Duration::from_secs(seconds),
                )
                .await?;
            self.store.delete(&fails).await?;
            started = Some(Lockout {
                by,
                seconds,
                failures: n,
            });
        }
        Ok(started)
    }

    /// A good login: the name's failures start again from zero (`gate` from
    /// [`Limits::login_gate`]: nothing to clear, no write).
    pub async fn login_succeeded(&self, user: &str, gate: &Gate) -> Result<(), StateError> {
        if self.config().user_failures == 0 || !gate.failures {
            return Ok(());
        }
        self.store
            .delete(&format!("fail:user:{}", user_key(user)))
            .await
    }

    /// [`Limits::rate`], counted in the metrics. A store that cannot count lets the request
    /// through (a warning and `gateway_limits_unavailable_total{check="rate"}` say so).
    pub async fn over_rate(
        &self,
        endpoint: Endpoint,
        source: Option<&str>,
        user: Option<&str>,
    ) -> Option<Limited> {
        match self.rate(endpoint, source, user).await {
            Ok(Some(l)) => {
                crate::metrics::auth()
                    .rate_limited
                    .with_label_values(&[endpoint.name(), l.by.name()])
                    .inc();
                Some(l)
            }
            Ok(None) => None,
            Err(e) => {
                crate::metrics::auth()
                    .limits_unavailable
                    .with_label_values(&["rate"])
                    .inc();
                tracing::warn!(error = %e, "rate limit not checked: the state store is unavailable");
                None
            }
        }
    }

    /// Counts a request against the endpoint's per-minute limits; the limit it exceeds, if
    /// any. `user` is the identity (or the user name a token request gives).
    pub async fn rate(
        &self,
        endpoint: Endpoint,
        source: Option<&str>,
        user: Option<&str>,
    ) -> Result<Option<Limited>, StateError> {
        let cfg = self.config();
        let (per_source, per_user) = match endpoint {
            Endpoint::Token => (
                cfg.token_per_minute_per_source,
                cfg.token_per_minute_per_user,
            ),
            Endpoint::Registry => (
                cfg.registry_per_minute_per_source,
                cfg.registry_per_minute_per_user,
            ),
        };
        let name = endpoint.name();
        let now = now();
        let minute = now / 60;
        let retry_after = 60 - now % 60;
        let checks = [
            (By::Source, per_source, source.map(source_key)),
            (
                By::User,
                per_user,
                user.filter(|u| !u.is_empty()).map(user_key),
            ),
        ];
        for (by, limit, who) in checks {
            let (Some(who), true) = (who, limit > 0) else {
                continue;
            };
            let key = format!("rate:{name}:{}:{who}:{minute}", by.name());
            let n = self.store.incr(&key, Duration::from_secs(61)).await?;
            if n > limit {
                return Ok(Some(Limited {
                    by,
                    retry_after,
                    first: n == limit + 1,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cfg: LimitsConfig) -> Limits {
        Limits::new(cfg, Arc::new(crate::state::MemoryStore::default()))
    }

    #[test]
    fn names_a_directory_binds_as_one_entry_count_as_one_name() {
        for variant in [
            "bob",
            "bob ",
            " BOB",
            "Bob",
            "\u{ff42}\u{ff4f}\u{ff42}",
            "\u{ff22}\u{ff2f}\u{ff22}\u{3000}",
        ] {
            assert_eq!(user_key(variant), "bob", "{variant:?}");
        }
        assert_eq!(user_key("bob  smith"), user_key(" Bob Smith "));
        assert_eq!(user_key("b\u{00AD}o\u{200B}b\u{FEFF}"), "bob");
        assert_ne!(user_key("bob"), user_key("bobby"));
    }

    #[test]
    fn one_ipv6_64_is_one_source() {
        assert_eq!(
            source_key("2001:db8:1:2::1"),
            source_key("2001:db8:1:2:ffff::9")
        );
        assert_ne!(source_key("2001:db8:1:2::1"), source_key("2001:db8:1:3::1"));
        assert_eq!(source_key("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(source_key("10.0.0.1"), "10.0.0.1");
    }

    #[tokio::test]
    async fn variants_of_a_name_share_its_lockout() {
        let l = limits(LimitsConfig {
            user_failures: 3,
            source_failures: 0,
            ..LimitsConfig::default()
        });
        for name in ["bob", "BOB ", "\u{ff42}\u{ff4f}\u{ff42}"] {
            l.login_failed(name, Some("10.0.0.1")).await.unwrap();
        }
        let gate = l.login_gate(" Bob", None).await.unwrap();
        assert!(gate.locked.is_some(), "{gate:?}");
    }

    #[tokio::test]
    async fn failures_lock_the_name_out_with_growing_lockouts() {
        let l = limits(LimitsConfig {
            user_failures: 3,
            source_failures: 0,
            lockout_seconds: 10,
            max_lockout_seconds: 25,
            ..Default::default()
        });
        for _ in 0..2 {
            assert_eq!(l.login_failed("Bob", Some("10.0.0.1")).await.unwrap(), None);
        }
        let gate = l.login_gate("bob", None).await.unwrap();
        assert_eq!((gate.locked, gate.failures), (None, true));
        let first = l.login_failed("BOB", None).await.unwrap().unwrap();
        assert_eq!((first.by, first.seconds, first.failures), (By::User, 10, 3));
        let gate = l
            .login_gate("bob", Some("10.9.9.9"))
            .await
            .unwrap()
            .locked
            .unwrap();
        assert_eq!(gate.by, By::User);
        assert!((9..=10).contains(&gate.retry_after), "{gate:?}");
        let alice = l.login_gate("alice", None).await.unwrap();
        assert_eq!((alice.locked, alice.failures), (None, false));
        // The count starts again after a lockout; the next lockout is longer, then capped.
        for _ in 0..2 {
            assert_eq!(l.login_failed("bob", None).await.unwrap(), None);
        }
        assert_eq!(
            l.login_failed("bob", None).await.unwrap().unwrap().seconds,
            20
        );
        for _ in 0..2 {
            l.login_failed("bob", None).await.unwrap();
        }
        assert_eq!(
            l.login_failed("bob", None).await.unwrap().unwrap().seconds,
            25
        );
        // A good login clears the failure count.
        l.login_failed("carol", None).await.unwrap();
        l.login_failed("carol", None).await.unwrap();
        let gate = l.login_gate("Carol", None).await.unwrap();
        l.login_succeeded("Carol", &gate).await.unwrap();
        assert_eq!(l.login_failed("carol", None).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_source_is_locked_out_across_names() {
        let l = limits(LimitsConfig {
            user_failures: 0,
            source_failures: 2,
            ..Default::default()
        });
        assert_eq!(l.login_failed("a", Some("::1")).await.unwrap(), None);
        let lock = l.login_failed("b", Some("::1")).await.unwrap().unwrap();
        assert_eq!(lock.by, By::Source);
        assert_eq!(
            l.login_gate("c", Some("::1"))
                .await
                .unwrap()
                .locked
                .map(|g| g.by),
            Some(By::Source)
        );
        // Another /64 is another source; the same /64 is the same one.
        assert_eq!(
            l.login_gate("c", Some("2001:db8::2")).await.unwrap().locked,
            None
        );
        assert!(
            l.login_gate("c", Some("::2"))
                .await
                .unwrap()
                .locked
                .is_some()
        );
    }

    #[tokio::test]
    async fn rate_limits_count_per_source_and_per_user() {
        let l = limits(LimitsConfig {
            registry_per_minute_per_source: 3,
            registry_per_minute_per_user: 2,
            ..Default::default()
        });
        let r = |src, user| l.rate(Endpoint::Registry, src, user);
        assert_eq!(r(Some("1.1.1.1"), Some("u")).await.unwrap(), None);
        assert_eq!(r(Some("2.2.2.2"), Some("U")).await.unwrap(), None);
        let over = r(Some("3.3.3.3"), Some("u")).await.unwrap().unwrap();
        assert_eq!((over.by, over.first), (By::User, true));
        assert!(!r(None, Some("u")).await.unwrap().unwrap().first);
        assert_eq!(r(Some("1.1.1.1"), None).await.unwrap(), None);
        assert_eq!(r(Some("1.1.1.1"), None).await.unwrap(), None);
        assert_eq!(
            r(Some("1.1.1.1"), None).await.unwrap().map(|l| l.by),
            Some(By::Source)
        );
        // The token endpoint's limits are apart.
        assert_eq!(
            l.rate(Endpoint::Token, Some("1.1.1.1"), Some("u"))
                .await
                .unwrap(),
            None
        );
    }
}
