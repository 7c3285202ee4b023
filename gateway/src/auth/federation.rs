//! CI workload-identity federation: a CI job's OIDC JWT (GitHub Actions, GitLab CI, any
//! OpenID provider) traded for a short-lived registry token, with no stored secret.
//!
//! Trusted issuers are configured with their issuer URL, accepted audiences, allowed
//! algorithms (asymmetric only; `none` never) and claim rules. The issuer's keys come from its
//! JWKS (found by discovery unless `jwks_uri` is given), cached, fetched again when a token
//! names an unknown `kid` (at most once per `jwks_min_refresh_seconds`) or when older than
//! `jwks_max_age_seconds`. The first rule whose claims all match (exact, or globs with `*` and
//! `?`) names the subject (`{claim}` placeholders) and its groups; no rule, no token.
//!
//! A job presents its JWT as the password of `docker login` (any username) or at
//! `POST /token` with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`.

use crate::auth::jws::PublicKey;
use crate::auth::{AuthError, Authenticator, Identity, Machine};
use anyhow::{Context, bail};
use base64::Engine;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::JwkSet;
use policy::SubjectKind;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// RFC 7523's grant type: a JWT as the authorization grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// Registry tokens for CI identities live at most this long (and never past the CI
    /// token's own `exp`).
    #[serde(default = "default_token_seconds")]
    pub token_seconds: u64,
    /// Clock difference tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    /// A token with an unknown `kid` fetches the JWKS again at most this often.
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh_seconds: u64,
    /// Keys are fetched again when older than this (a withdrawn key stops working).
    #[serde(default = "default_max_age")]
    pub jwks_max_age_seconds: u64,
    pub issuers: Vec<IssuerConfig>,
}

fn default_token_seconds() -> u64 {
    300
}
fn default_skew() -> u64 {
    30
}
fn default_min_refresh() -> u64 {
    10
}
fn default_max_age() -> u64 {
    3600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A short name for logs, audit events and subject templates (`{issuer}`).
    pub name: String,
    /// The `iss` of its tokens, exactly.
    pub issuer: String,
    /// Accepted `aud` values (one must be in the token).
    pub audiences: Vec<String>,
    /// The JWKS URL; from `<issuer>/.well-known/openid-configuration` when unset.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// CA certificates (PEM) for the issuer's HTTPS; the system's when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub rules: Vec<RuleConfig>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Claim name → exact value, or a glob (`*` any run, `?` one character). Every one must
    /// match; non-string claims compare as their JSON text.
    pub claims: BTreeMap<String, String>,
    /// The subject's name; `{claim}` is replaced by the claim's value, `{issuer}` by the
    /// issuer's name.
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

struct Rule {
    claims: Vec<(String, regex::Regex)>,
    subject: String,
    groups: Vec<String>,
}

/// `*` any run, `?` one character, everything else literal; anchored.
fn glob_regex(glob: &str) -> anyhow::Result<regex::Regex> {
    let mut re = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str("(?s:.*)"),
            '?' => re.push_str("(?s:.)"),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Ok(regex::Regex::new(&re)?)
}

/// A claim as text: strings as they are, anything else as JSON.
fn claim_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The parsed keys of an issuer, by `kid`.
struct KeySet {
    by_kid: HashMap<String, Arc<PublicKey>>,
    /// The key of a set with exactly one, for tokens without a `kid`.
    only: Option<Arc<PublicKey>>,
    fetched: Instant,
}

struct Issuer {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    rules: Vec<Rule>,
    http: reqwest::Client,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

pub struct Federation {
    cfg: FederationConfig,
    issuers: HashMap<String, Issuer>,
}

impl Federation {
    pub fn new(cfg: FederationConfig) -> anyhow::Result<Self> {
        let mut issuers = HashMap::new();
        for i in &cfg.issuers {
            let ctx = || format!("federation issuer {:?}", i.name);
            if i.audiences.is_empty() {
                bail!("{}: audiences is empty", ctx());
            }
            if i.rules.is_empty() {
                bail!("{}: no rules (no token could ever match)", ctx());
            }
            let mut algorithms = Vec::new();
            for a in &i.algorithms {
                let alg: Algorithm = a
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{}: unknown algorithm {a:?}", ctx()))?;
                if !crate::auth::jws::SUPPORTED.contains(&alg) {
                    bail!(
                        "{}: {a} is not accepted (RS256/384/512, PS256/384/512, ES256/384; never symmetric)",
                        ctx()
                    );
                }
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                bail!("{}: algorithms is empty", ctx());
            }
            let mut rules = Vec::new();
            for r in &i.rules {
                if r.claims.is_empty() {
                    bail!("{}: a rule with no claims would match every token", ctx());
                }
                let mut claims = Vec::new();
                for (k, v) in &r.claims {
                    claims.push((k.clone(), glob_regex(v).with_context(ctx)?));
                }
                rules.push(Rule {
                    claims,
                    subject: r.subject.clone(),
                    groups: r.groups.clone(),
                });
            }
            let mut http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none());
            if let Some(ca) = &i.ca_file {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("{}: reading {}", ctx(), ca.display()))?;
                for c in reqwest::Certificate::from_pem_bundle(&pem).with_context(ctx)? {
                    http = http.add_root_certificate(c);
                }
            }
            let issuer = Issuer {
                cfg: i.clone(),
                algorithms,
                rules,
                http: http.build().with_context(ctx)?,
                keys: RwLock::new(None),
                fetching: tokio::sync::Mutex::new(None),
            };
            if issuers.insert(i.issuer.clone(), issuer).is_some() {
                bail!("{}: issuer {:?} is configured twice", ctx(), i.issuer);
            }
        }
        Ok(Federation { cfg, issuers })
    }

    /// Verifies a CI token and maps it to an identity. `Err(AuthError::Refused)` says why
    /// (safe to show: it is about the presented token); `Unavailable` when the issuer's keys
    /// cannot be fetched.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let out = self.check(token).await;
        if let Err(e @ (AuthError::Refused(_) | AuthError::Unavailable(_))) = &out {
            let iss = parts(token).map(|(_, c)| claim_text(&c["iss"]));
            crate::audit::record(
                "login",
                "failure",
                json!({"identity.kind": "ci", "authenticator": "federation",
                       "identity.issuer": iss, "event.reason": e.to_string()}),
            );
        }
        out
    }

    async fn check(&self, token: &str) -> Result<Identity, AuthError> {
        let refused = |why: String| AuthError::Refused(why);
        let mut split = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (split.next(), split.next(), split.next(), split.next())
        else {
            return Err(refused("the token is not a JWT".into()));
        };
        let (header, claims) =
            parts(token).ok_or_else(|| refused("the token is not a JWT".into()))?;
        let alg = header["alg"].as_str().unwrap_or("");
        if alg.eq_ignore_ascii_case("none") || alg.is_empty() {
            return Err(refused(
                "unsigned tokens (alg none) are not accepted".into(),
            ));
        }
        let iss = claims["iss"].as_str().unwrap_or("");
        let Some(issuer) = self.issuers.get(iss) else {
            return Err(refused(format!(
                "tokens of issuer {:?} are not trusted",
                iss.chars().take(200).collect::<String>()
            )));
        };
        let Some(alg) = alg
            .parse::<Algorithm>()
            .ok()
            .filter(|a| issuer.algorithms.contains(a))
        else {
            return Err(refused(format!(
                "algorithm {:?} is not accepted for issuer {}",
                alg.chars().take(20).collect::<String>(),
                issuer.cfg.name
            )));
        };
        let kid = header["kid"].as_str();
        let key = self.key(issuer, kid).await?.ok_or_else(|| {
            refused(format!(
                "the token is signed with a key issuer {} does not publish (kid {:?})",
                issuer.cfg.name,
                kid.unwrap_or("").chars().take(100).collect::<String>()
            ))
        })?;
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| refused("the token's signature is not base64url".into()))?;
        let signed = &token[..h64.len() + 1 + p64.len()];
        if !key.verify(alg, signed.as_bytes(), &signature) {
            return Err(refused("the token's signature does not verify".into()));
        }
        // Signed by the issuer: now its claims count.
        let now = crate::clock::unix_now();
        let skew = self.cfg.clock_skew_seconds as i64;
        let Some(exp) = claims["exp"].as_i64() else {
            return Err(refused("the token has no exp claim".into()));
        };
        if now > exp + skew {
            return Err(refused("the token has expired".into()));
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| nbf > now + skew) {
            return Err(refused("the token is not valid yet (nbf)".into()));
        }
        if claims["iat"].as_i64().is_some_and(|iat| iat > now + skew) {
            return Err(refused("the token is issued in the future".into()));
        }
        let accepted = |a: &serde_json::Value| {
            a.as_str()
                .is_some_and(|a| issuer.cfg.audiences.iter().any(|x| x == a))
        };
        let aud_ok = match &claims["aud"] {
            serde_json::Value::Array(list) => list.iter().any(accepted),
            one => accepted(one),
        };
        if !aud_ok {
            return Err(refused(format!(
                "the token's audience is not accepted (expected {})",
                issuer.cfg.audiences.join(" or ")
            )));
        }
        self.map(
            issuer,
            &claims,
            exp.min(now + self.cfg.token_seconds as i64),
        )
    }

    fn map(
        &self,
        issuer: &Issuer,
        claims: &serde_json::Value,
        not_after: i64,
    ) -> Result<Identity, AuthError> {
        let text = |k: &str| claims.get(k).map(claim_text);
        let rule = issuer.rules.iter().find(|r| {
            r.claims
                .iter()
                .all(|(k, re)| text(k).is_some_and(|v| re.is_match(&v)))
        });
        let Some(rule) = rule else {
            // Say what was looked at, so a pipeline's owner can see why.
            let mut looked: Vec<&str> = issuer
                .rules
                .iter()
                .flat_map(|r| r.claims.iter().map(|(k, _)| k.as_str()))
                .collect();
            looked.sort_unstable();
            looked.dedup();
            let seen: Vec<String> = looked
                .iter()
                .map(|k| {
                    format!(
                        "{k}={}",
                        text(k).map_or("(absent)".to_string(), |v| v
                            .chars()
                            .take(100)
                            .collect::<String>())
                    )
                })
                .collect();
            return Err(AuthError::Refused(format!(
                "no rule of issuer {} matches the token ({})",
                issuer.cfg.name,
                seen.join(", ")
            )));
        };
        let mut subject = String::new();
        let mut rest = rule.subject.as_str();
        while let Some(open) = rest.find('{') {
            subject.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let name = &rest[open + 1..open + close];
            let value = if name == "issuer" {
                Some(issuer.cfg.name.clone())
            } else {
                text(name)
            };
            let Some(value) = value else {
                return Err(AuthError::Refused(format!(
                    "the token has no {name} claim, which names the subject"
                )));
            };
            subject.push_str(&value);
            rest = &rest[open + close + 1..];
        }
        subject.push_str(rest);
        if subject.is_empty() || subject.chars().any(char::is_control) || subject.len() > 256 {
            return Err(AuthError::Refused(
                "the subject named by the rule is invalid".into(),
            ));
        }
        let mut matched: BTreeMap<String, String> = rule
            .claims
            .iter()
            .filter_map(|(k, _)| Some((k.clone(), text(k)?)))
            .collect();
        if let Some(sub) = text("sub") {
            matched.insert("sub".into(), sub);
        }
        Ok(Identity {
            subject,
            groups: rule.groups.clone(),
            kind: SubjectKind::Ci,
            machine: Some(Arc::new(Machine {
                scope: None,
                authenticator: format!("federation:{}", issuer.cfg.name),
                issuer: Some(issuer.cfg.issuer.clone()),
                claims: matched,
                not_after: Some(not_after),
                may_create_robots: false,
            })),
        })
    }

    /// The key for `kid`: from the cache, or fetched again when unknown (rate-limited) or
    /// stale. `Ok(None)`: the issuer does not publish it.
    async fn key(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
    ) -> Result<Option<Arc<PublicKey>>, AuthError> {
        let find = |set: &KeySet| match kid {
            Some(k) => set.by_kid.get(k).cloned(),
            None => set.only.clone(),
        };
        let max_age = Duration::from_secs(self.cfg.jwks_max_age_seconds);
        let cached = issuer.keys.read().ok().and_then(|k| k.clone());
        if let Some(set) = &cached
            && set.fetched.elapsed() < max_age
            && let Some(k) = find(set)
        {
            return Ok(Some(k));
        }
        let mut last = issuer.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let cached = issuer.keys.read().ok().and_then(|k| k.clone());
        if let Some(set) = &cached
            && set.fetched.elapsed() < max_age
            && let Some(k) = find(set)
        {
            return Ok(Some(k));
        }
        let stale = cached
            .as_ref()
            .is_none_or(|s| s.fetched.elapsed() >= max_age);
        let may_fetch = stale
            || last.is_none_or(|t| {
                t.elapsed() >= Duration::from_secs(self.cfg.jwks_min_refresh_seconds)
            });
        if !may_fetch {
            return Ok(None);
        }
        *last = Some(Instant::now());
        match fetch_keys(issuer).await {
            Ok(set) => {
                let set = Arc::new(set);
                let found = find(&set);
                if let Ok(mut slot) = issuer.keys.write() {
                    *slot = Some(set);
                }
                Ok(found)
            }
            Err(e) => {
                tracing::warn!(issuer = %issuer.cfg.name, error = %format!("{e:#}"), "fetching the CI issuer's keys failed");
                // Keys fetched before still serve (an IdP blip must not stop every pipeline).
                match cached.as_deref().and_then(find) {
                    Some(k) => Ok(Some(k)),
                    None => Err(AuthError::Unavailable(format!(
                        "the keys of issuer {} cannot be fetched",
                        issuer.cfg.name
                    ))),
                }
            }
        }
    }
}

/// The header and payload of a compact JWS, unverified.
fn parts(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut it = token.split('.');
    let (h, p, _s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let decode = |s: &str| -> Option<serde_json::Value> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .filter(serde_json::Value::is_object)
    };
    Some((decode(h)?, decode(p)?))
}

/// Whether a password is a JWT (three base64url parts, a JSON header naming an `alg`): only
/// such passwords are this authenticator's to decide.
fn looks_like_jwt(s: &str) -> bool {
    s.len() < 16 * 1024
        && s.split('.').count() == 3
        && parts(s).is_some_and(|(h, _)| h.get("alg").is_some())
}

async fn fetch_keys(issuer: &Issuer) -> anyhow::Result<KeySet> {
    let jwks_uri = match &issuer.cfg.jwks_uri {
        Some(u) => u.clone(),
        None => {
            #[derive(Deserialize)]
            struct Discovery {
                jwks_uri: String,
            }
            let d: Discovery = crate::auth::jws::discover(&issuer.http, &issuer.cfg.issuer).await?;
            d.jwks_uri
        }
    };
    let set: JwkSet = crate::auth::jws::fetch_json(&issuer.http, &jwks_uri).await?;
    let mut by_kid = HashMap::new();
    let mut all = Vec::new();
    for jwk in &set.keys {
        let key = match PublicKey::from_jwk(jwk) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(issuer = %issuer.cfg.name, error = %e, "a JWKS key is skipped");
                continue;
            }
        };
        let key = Arc::new(key);
        if let Some(kid) = &jwk.common.key_id {
            by_kid.insert(kid.clone(), key.clone());
        }
        all.push(key);
    }
    tracing::info!(issuer = %issuer.cfg.name, keys = all.len(), "fetched the CI issuer's keys");
    Ok(KeySet {
        by_kid,
        only: (all.len() == 1).then(|| all.remove(0)),
        fetched: Instant::now(),
    })
}

#[async_trait::async_trait]
impl Authenticator for Federation {
    fn name(&self) -> &'static str {
        "federation"
    }

    /// Decides passwords that are JWTs (the user name is ignored); passes others on.
    async fn authenticate(&self, _username: &str, password: &str) -> Result<Identity, AuthError> {
        if !looks_like_jwt(password) {
            return Err(AuthError::UnknownUser);
        }
        self.verify(password).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_values() {
        let re = glob_regex("corp/team-a-*").unwrap();
        assert!(re.is_match("corp/team-a-app"));
        assert!(re.is_match("corp/team-a-"));
        assert!(!re.is_match("xcorp/team-a-app"));
        assert!(!re.is_match("corp/team-b"));
        let exact = glob_regex("refs/heads/main").unwrap();
        assert!(exact.is_match("refs/heads/main"));
        assert!(!exact.is_match("refs/heads/main2"));
        assert!(glob_regex("v?.(x)").unwrap().is_match("v1.(x)"));
    }

    #[test]
    fn only_jwts_are_decided() {
        assert!(!looks_like_jwt("hunter2"));
        assert!(!looks_like_jwt("a.b.c"));
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"iss":"x"}"#);
        assert!(looks_like_jwt(&format!("{h}.{p}.")));
    }
}
