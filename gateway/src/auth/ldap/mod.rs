//! LDAP and Active Directory users: search-then-bind with a read-only service account (or a
//! direct bind-DN template), groups from `memberOf` or a group search, optionally nested, and
//! a short-lived login cache in the shared state store. Configured by `[auth.ldap]`; see
//! `docs/ldap.md`.
//!
//! Safety rules kept here:
//! - the username is escaped per RFC 4515 in filters and RFC 4514 in DNs, and refused when it
//!   holds control characters, so it can never change a filter or a DN;
//! - an empty password is refused before any bind (an empty simple bind is an anonymous bind,
//!   which servers accept);
//! - a search that finds more than one entry authenticates nobody;
//! - every directory call has a timeout and the whole login a total budget; a directory that
//!   cannot be reached is [`AuthError::Unavailable`] (the token endpoint answers 503), never
//!   "wrong password".

pub mod config;
pub mod live;

use super::{AuthError, Authenticator, Identity};
use crate::state::StateStore;
use anyhow::{Context, bail};
pub use config::{GroupSource, LdapConfig};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, SearchOptions};
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Environment variable with the service account's password (when no file is named).
pub const BIND_PASSWORD_ENV: &str = "PORTCULLIS_LDAP_BIND_PASSWORD";

/// LDAP result code for a wrong DN or password.
const INVALID_CREDENTIALS: u32 = 49;
const NO_SUCH_OBJECT: u32 = 32;
const INVALID_DN_SYNTAX: u32 = 34;

/// Longest username looked up (longer ones cannot be valid and are refused early).
const MAX_USERNAME: usize = 256;

/// Most groups collected for one user, nested ones included.
const MAX_GROUPS: usize = 2000;

/// What a successful login leaves in the cache: a salted, peppered hash of the password,
/// never the password.
#[derive(Serialize, Deserialize)]
struct CachedLogin {
    salt: String,
    hash: String,
    subject: String,
    groups: Vec<String>,
}

pub struct LdapAuthenticator {
    cfg: LdapConfig,
    bind_password: Option<String>,
    tls: Option<native_tls::TlsConnector>,
    /// Index in `cfg.urls` of the server that answered last.
    preferred: AtomicUsize,
    /// The bound service connection (one multiplexed connection serves every search).
    service: tokio::sync::Mutex<Option<Ldap>>,
    /// Idle connections for user binds.
    bind_pool: std::sync::Mutex<Vec<Ldap>>,
    cache: Arc<dyn StateStore>,
    /// Mixed into cached password hashes: a cache dump alone cannot be brute-forced offline.
    /// Wiped from memory when dropped.
    pepper: zeroize::Zeroizing<Vec<u8>>,
    /// Of the table this client was built from: part of the login cache's keys, so a reload
    /// that changes the table (a narrower filter, other groups, another directory) does not
    /// find logins cached under the old one.
    generation: String,
}

/// An LDAP error as an [`AuthError`]: wrong credentials stay that, everything else means the
/// directory could not answer.
fn unavailable(what: &str, e: impl std::fmt::Display) -> AuthError {
    AuthError::Unavailable(format!("{what}: {e}"))
}

/// The first value of `attr` (case-insensitive name) in `e`.
fn first_attr<'a>(e: &'a SearchEntry, attr: &str) -> Option<&'a String> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first())
}

fn all_attr(e: &SearchEntry, attr: &str) -> Vec<String> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The value of the first RDN of `dn` when its attribute is `attr` (e.g. `cn=team-a,ou=…`).
fn rdn_value(dn: &str, attr: &str) -> Option<String> {
    let mut rdn = String::new();
    let mut escaped = false;
    for c in dn.chars() {
        if escaped {
            rdn.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' || c == '+' {
            break;
        } else {
            rdn.push(c);
        }
    }
    let (k, v) = rdn.split_once('=')?;
    (k.trim().eq_ignore_ascii_case(attr) && !v.trim().is_empty()).then(|| v.trim().to_string())
}

impl LdapAuthenticator {
    pub fn new(cfg: LdapConfig, cache: Arc<dyn StateStore>, pepper: &[u8]) -> anyhow::Result<Self> {
        cfg.validate()?;
        let bind_password = if cfg.bind_dn.is_some() {
            let p = match &cfg.bind_password_file {
                Some(f) => service::secrets::read_secret_file(f)?,
                None => std::env::var(BIND_PASSWORD_ENV).with_context(|| {
                    format!(
                        "auth.ldap.bind_dn is set: give bind_password_file or {BIND_PASSWORD_ENV}"
                    )
                })?,
            };
            if p.is_empty() {
                bail!("the LDAP service account's password is empty");
            }
            Some(p)
        } else {
            None
        };
        let tls = match &cfg.ca_file {
            Some(f) => {
                let pem = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let mut b = native_tls::TlsConnector::builder();
                let mut n = 0;
                for block in pem_blocks(&pem) {
                    b.add_root_certificate(
                        native_tls::Certificate::from_pem(&block)
                            .with_context(|| format!("a certificate in {}", f.display()))?,
                    );
                    n += 1;
                }
                if n == 0 {
                    bail!("{} holds no PEM certificate", f.display());
                }
                b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
                Some(b.build().context("building the LDAP TLS connector")?)
            }
            None => None,
        };
        let generation = hex::encode(&sha256(&[format!("{cfg:?}").as_bytes()])[..8]);
        Ok(LdapAuthenticator {
            generation,
            cfg,
            bind_password,
            tls,
            preferred: AtomicUsize::new(0),
            service: tokio::sync::Mutex::new(None),
            bind_pool: std::sync::Mutex::new(Vec::new()),
            cache,
            pepper: zeroize::Zeroizing::new(pepper.to_vec()),
        })
    }

    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.operation_timeout_ms)
    }

    /// A connection to the first server that answers, starting with the last good one.
    async fn connect(&self) -> Result<Ldap, AuthError> {
        let n = self.cfg.urls.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.cfg.urls[idx];
            let mut s = LdapConnSettings::new()
                .set_conn_timeout(Duration::from_millis(self.cfg.connect_timeout_ms))
                .set_starttls(self.cfg.starttls && url.starts_with("ldap://"));
            if let Some(c) = &self.tls {
                s = s.set_connector(c.clone());
            }
            match LdapConnAsync::with_settings(s, url).await {
                Ok((conn, ldap)) => {
                    tokio::spawn(async move {
                        if let Err(e) = conn.drive().await {
                            tracing::debug!(error = %e, "LDAP connection ended");
                        }
                    });
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(ldap);
                }
                Err(e) => {
                    tracing::warn!(url = %url, error = %e, "LDAP server did not answer");
                    errors.push(format!("{url}: {e}"));
                }
            }
        }
        Err(AuthError::Unavailable(format!(
            "no directory server answered ({})",
            errors.join("; ")
        )))
    }

    /// The bound service connection, connecting (and binding) when there is none.
    async fn service(&self) -> Result<Ldap, AuthError> {
        let mut slot = self.service.lock().await;
        if let Some(l) = slot.as_ref() {
            return Ok(l.clone());
        }
        let (Some(dn), Some(pw)) = (&self.cfg.bind_dn, &self.bind_password) else {
            return Err(AuthError::Unavailable(
                "no LDAP service account configured".into(),
            ));
        };
        let mut ldap = self.connect().await?;
        let r = ldap
            .with_timeout(self.op_timeout())
            .simple_bind(dn, pw)
            .await
            .map_err(|e| unavailable("binding the LDAP service account", e))?;
        if r.rc != 0 {
            // Misconfiguration, not the user's fault: say so without the password.
            return Err(AuthError::Unavailable(format!(
                "the LDAP service account {dn} was refused (result code {}: {})",
                r.rc, r.text
            )));
        }
        *slot = Some(ldap.clone());
        Ok(ldap)
    }

    /// Forgets the service connection after an error, so the next login reconnects.
    async fn drop_service(&self) {
        *self.service.lock().await = None;
    }

    /// One search on `ldap` with the operation timeout and the group cap. The outer error is
    /// the connection's; the inner one a result code that means the directory failed: all
    /// but success, 32 noSuchObject (an empty answer) and 4 sizeLimitExceeded (what came is
    /// kept).
    async fn search_on(
        &self,
        ldap: &mut Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Result<Vec<SearchEntry>, AuthError>, LdapError> {
        let res = ldap
            .with_timeout(self.op_timeout())
            .with_search_options(SearchOptions::new().sizelimit(MAX_GROUPS as i32))
            .search(base, scope, filter, attrs.to_vec())
            .await?;
        let (entries, result) = (res.0, res.1);
        if result.rc != 0 && result.rc != 32 && result.rc != 4 {
            return Ok(Err(AuthError::Unavailable(format!(
                "LDAP search under {base} failed (result code {}: {})",
                result.rc, result.text
            ))));
        }
        Ok(Ok(entries
            .into_iter()
            .map(SearchEntry::construct)
            .collect()))
    }

    /// A search on the service connection (reconnecting once if it had died).
    async fn search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<SearchEntry>, AuthError> {
        for attempt in 0..2 {
            let mut ldap = self.service().await?;
            match self.search_on(&mut ldap, base, scope, filter, attrs).await {
                Ok(answer) => return answer,
                Err(e) => {
                    self.drop_service().await;
                    if attempt == 1
                        || !matches!(
                            e,
                            LdapError::Io { .. }
                                | LdapError::EndOfStream
                                | LdapError::OpSend { .. }
                        )
                    {
                        return Err(unavailable("LDAP search", e));
                    }
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Binds as `dn` with `password` on a pooled connection: the connection, bound as the
    /// user, or `None` for wrong credentials.
    async fn user_bind(&self, dn: &str, password: &str) -> Result<Option<Ldap>, AuthError> {
        let pooled = self.bind_pool.lock().ok().and_then(|mut p| p.pop());
        let mut ldap = match pooled {
            Some(l) => l,
            None => self.connect().await?,
        };
        let r = match ldap
            .with_timeout(self.op_timeout())
            .simple_bind(dn, password)
            .await
        {
            Ok(r) => r,
            Err(_) => {
                // The pooled connection may have died: one fresh try.
                ldap = self.connect().await?;
                ldap.with_timeout(self.op_timeout())
                    .simple_bind(dn, password)
                    .await
                    .map_err(|e| unavailable("LDAP bind", e))?
            }
        };
        match r.rc {
            0 => Ok(Some(ldap)),
            // Wrong password, or (direct bind) a DN that does not exist or cannot be one.
            INVALID_CREDENTIALS | NO_SUCH_OBJECT | INVALID_DN_SYNTAX => {
                self.release(ldap);
                Ok(None)
            }
            rc => Err(AuthError::Unavailable(format!(
                "LDAP bind failed (result code {rc}: {})",
                r.text
            ))),
        }
    }

    /// Returns a connection to the bind pool (or drops it when the pool is full).
    fn release(&self, ldap: Ldap) {
        if let Ok(mut p) = self.bind_pool.lock()
            && p.len() < self.cfg.bind_pool_size
        {
            p.push(ldap);
        }
    }

    /// The user's DN and entry (search-then-bind), or `None` if there is not exactly one.
    async fn find_user(&self, username: &str) -> Result<Option<SearchEntry>, AuthError> {
        let filter = format!(
            "(&{}({}={}))",
            self.cfg.user_filter,
            self.cfg.username_attribute,
            ldap3::ldap_escape(username)
        );
        let attrs = [self.cfg.username_attribute.as_str(), "memberOf"];
        let mut found = self
            .search(&self.cfg.user_base_dn, Scope::Subtree, &filter, &attrs)
            .await?;
        match found.len() {
            1 => Ok(found.pop()),
            0 => Ok(None),
            n => {
                tracing::warn!(
                    count = n,
                    "an LDAP user search matched several entries; refusing the login"
                );
                Ok(None)
            }
        }
    }

    /// Group names of the user `dn`, nested up to `nested_depth` levels.
    async fn groups(
        &self,
        dn: &str,
        username: &str,
        member_of: Vec<String>,
        bound: &mut Ldap,
    ) -> Result<Vec<String>, AuthError> {
        let name_attr = self.cfg.group_name_attribute.clone();
        let mut names = BTreeSet::new();
        let mut seen = BTreeSet::new();
        // (group DN, its name when known)
        let mut level: Vec<(String, Option<String>)> = match self.cfg.groups {
            GroupSource::None => return Ok(Vec::new()),
            GroupSource::MemberOf => member_of.into_iter().map(|g| (g, None)).collect(),
            GroupSource::Search => {
                let filter = self
                    .cfg
                    .group_filter
                    .replace("{dn}", &ldap3::ldap_escape(dn))
                    .replace("{username}", &ldap3::ldap_escape(username));
                self.group_search(&filter, &name_attr, bound).await?
            }
        };
        for depth in 0..=self.cfg.nested_depth {
            let mut next = Vec::new();
            for (gdn, name) in level {
                if !seen.insert(gdn.to_ascii_lowercase()) || seen.len() > MAX_GROUPS {
                    continue;
                }
                let name = match name.or_else(|| rdn_value(&gdn, &name_attr)) {
                    Some(n) => Some(n),
                    None => self.group_name(&gdn, &name_attr, bound).await?,
                };
                if let Some(n) = name {
                    names.insert(n);
                }
                if depth < self.cfg.nested_depth {
                    next.extend(self.parents(&gdn, &name_attr, bound).await?);
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(names.into_iter().collect())
    }

    /// Runs a search on the service connection, or on the user's own bound connection in
    /// direct-bind mode (no service account).
    async fn search_as(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[&str],
        bound: &mut Ldap,
    ) -> Result<Vec<SearchEntry>, AuthError> {
        if self.cfg.bind_dn.is_some() {
            return self.search(base, scope, filter, attrs).await;
        }
        self.search_on(bound, base, scope, filter, attrs)
            .await
            .map_err(|e| unavailable("LDAP search", e))?
    }

    async fn group_search(
        &self,
        filter: &str,
        name_attr: &str,
        bound: &mut Ldap,
    ) -> Result<Vec<(String, Option<String>)>, AuthError> {
        let base = self.cfg.group_base_dn.clone().unwrap_or_default();
        Ok(self
            .search_as(&base, Scope::Subtree, filter, &[name_attr], bound)
            .await?
            .into_iter()
            .map(|e| {
                let n = first_attr(&e, name_attr).cloned();
                (e.dn, n)
            })
            .collect())
    }

    /// The groups a group is a member of.
    async fn parents(
        &self,
        group_dn: &str,
        name_attr: &str,
        bound: &mut Ldap,
    ) -> Result<Vec<(String, Option<String>)>, AuthError> {
        match self.cfg.groups {
            GroupSource::Search => {
                let filter = self
                    .cfg
                    .nested_group_filter
                    .replace("{dn}", &ldap3::ldap_escape(group_dn));
                self.group_search(&filter, name_attr, bound).await
            }
            GroupSource::MemberOf => {
                let e = self
                    .search_as(
                        group_dn,
                        Scope::Base,
                        "(objectClass=*)",
                        &["memberOf"],
                        bound,
                    )
                    .await?;
                Ok(e.first()
                    .map(|e| all_attr(e, "memberOf"))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|g| (g, None))
                    .collect())
            }
            GroupSource::None => Ok(Vec::new()),
        }
    }

    /// A group's name read from its entry (when its DN does not carry it).
    async fn group_name(
        &self,
        group_dn: &str,
        name_attr: &str,
        bound: &mut Ldap,
    ) -> Result<Option<String>, AuthError> {
        let e = self
            .search_as(
                group_dn,
                Scope::Base,
                "(objectClass=*)",
                &[name_attr],
                bound,
            )
            .await?;
        Ok(e.first().and_then(|e| first_attr(e, name_attr).cloned()))
    }

    fn cache_key(&self, username: &str) -> String {
        format!(
            "ldap:login:{}:{}",
            self.generation,
            hex::encode(sha256(&[username.as_bytes()]))
        )
    }

    fn password_hash(&self, salt: &[u8], password: &str) -> [u8; 32] {
        sha256(&[
            &(self.pepper.len() as u64).to_be_bytes(),
            &self.pepper,
            salt,
            password.as_bytes(),
        ])
    }

    async fn cached(&self, username: &str, password: &str) -> Option<Identity> {
        if self.cfg.cache_ttl_seconds == 0 {
            return None;
        }
        let raw = self.cache.get(&self.cache_key(username)).await.ok()??;
        let c: CachedLogin = serde_json::from_slice(&raw).ok()?;
        let salt = hex::decode(&c.salt).ok()?;
        let want = hex::decode(&c.hash).ok()?;
        let got = self.password_hash(&salt, password);
        (want.len() == got.len() && openssl::memcmp::eq(&want, &got)).then_some(Identity {
            subject: c.subject,
            groups: c.groups,
            kind: SubjectKind::User,
            machine: None,
        })
    }

    async fn remember(&self, username: &str, password: &str, id: &Identity) {
        if self.cfg.cache_ttl_seconds == 0 {
            return;
        }
        let mut salt = [0u8; 16];
        if openssl::rand::rand_bytes(&mut salt).is_err() {
            return;
        }
        let entry = CachedLogin {
            salt: hex::encode(salt),
            hash: hex::encode(self.password_hash(&salt, password)),
            subject: id.subject.clone(),
            groups: id.groups.clone(),
        };
        let Ok(value) = serde_json::to_vec(&entry) else {
            return;
        };
        let ttl = Duration::from_secs(self.cfg.cache_ttl_seconds);
        if let Err(e) = self.cache.set(&self.cache_key(username), value, ttl).await {
            tracing::warn!(error = %e, "could not cache an LDAP login");
        }
    }

    async fn login(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        let (dn, entry) = match &self.cfg.bind_dn_template {
            Some(t) if self.cfg.bind_dn.is_none() => {
                (t.replace("{username}", &ldap3::dn_escape(username)), None)
            }
            _ => match self.find_user(username).await? {
                Some(e) => (e.dn.clone(), Some(e)),
                None => return Err(AuthError::InvalidCredentials),
            },
        };
        let Some(mut bound) = self.user_bind(&dn, password).await? else {
            return Err(AuthError::InvalidCredentials);
        };
        let result = async {
            // Direct bind: read the entry now, as the user.
            let entry = match entry {
                Some(e) => e,
                None => {
                    let attrs = [self.cfg.username_attribute.as_str(), "memberOf"];
                    let res = bound
                        .with_timeout(self.op_timeout())
                        .search(&dn, Scope::Base, "(objectClass=*)", attrs.to_vec())
                        .await
                        .map_err(|e| unavailable("reading the LDAP user entry", e))?;
                    res.0
                        .into_iter()
                        .next()
                        .map(SearchEntry::construct)
                        .ok_or(AuthError::InvalidCredentials)?
                }
            };
            // The directory's spelling of the name, not the one typed.
            let subject = first_attr(&entry, &self.cfg.username_attribute)
                .cloned()
                .unwrap_or_else(|| username.to_string());
            let member_of = all_attr(&entry, "memberOf");
            let groups = self.groups(&dn, &subject, member_of, &mut bound).await?;
            Ok(Identity {
                subject,
                groups,
                kind: SubjectKind::User,
                machine: None,
            })
        }
        .await;
        self.release(bound);
        result
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The PEM blocks of a file holding one or more certificates.
fn pem_blocks(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(cur.clone().into_bytes());
        }
    }
    out
}

#[async_trait::async_trait]
impl Authenticator for LdapAuthenticator {
    fn name(&self) -> &'static str {
        "ldap"
    }

    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        if username.is_empty()
            || username.len() > MAX_USERNAME
            || username.chars().any(char::is_control)
            || password.is_empty()
        {
            return Err(AuthError::InvalidCredentials);
        }
        if let Some(id) = self.cached(username, password).await {
            return Ok(id);
        }
        let budget = Duration::from_millis(self.cfg.login_budget_ms);
        let id = tokio::time::timeout(budget, self.login(username, password))
            .await
            .map_err(|_| {
                AuthError::Unavailable(format!(
                    "the directory did not finish the login within {} ms",
                    self.cfg.login_budget_ms
                ))
            })??;
        self.remember(username, password, &id).await;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_come_from_the_first_rdn() {
        assert_eq!(
            rdn_value("cn=team-a,ou=groups,dc=example,dc=org", "cn").as_deref(),
            Some("team-a")
        );
        assert_eq!(
            rdn_value("CN=a\\,b,ou=groups", "cn").as_deref(),
            Some("a,b")
        );
        assert_eq!(rdn_value("ou=groups,dc=x", "cn"), None);
    }

    #[test]
    fn several_certificates_in_one_file_are_all_read() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_blocks(format!("{one}junk\n{one}").as_bytes()).len(), 2);
    }

    #[test]
    fn config_needs_a_way_to_bind() {
        let c: LdapConfig = toml::from_str(
            r#"urls = ["ldap://127.0.0.1:389"]
user_base_dn = "ou=people,dc=example,dc=org"
group_base_dn = "ou=groups,dc=example,dc=org""#,
        )
        .unwrap();
        assert!(c.validate().is_err());
        let mut t = c.clone();
        t.bind_dn_template = Some("uid=x,ou=people".into());
        assert!(t.validate().is_err(), "a template without {{username}}");
        t.bind_dn_template = Some("uid={username},ou=people".into());
        t.validate().unwrap();
        let mut bad = t.clone();
        bad.urls = vec!["http://x".into()];
        assert!(bad.validate().is_err());
    }
}
