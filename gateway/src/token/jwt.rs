//! Registry tokens (distribution `docs/spec/auth/jwt.md`): issue and verify.

use super::keys::SigningKey;
use super::revoked::Revocations;
use jsonwebtoken::{Algorithm, Header, Validation};
use oci::scope::Scope;
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One `access` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl From<&Scope> for Access {
    fn from(s: &Scope) -> Self {
        Access {
            resource_type: s.resource_type.clone(),
            name: s.name.clone(),
            actions: s.actions.clone(),
        }
    }
}

/// Who the token was issued to, so the gateway can ask policy again (immutability
/// overrides) without authenticating again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSubject {
    pub kind: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub access: Vec<Access>,
    #[serde(rename = "portcullis")]
    pub subject: TokenSubject,
}

pub fn kind_name(k: SubjectKind) -> &'static str {
    match k {
        SubjectKind::User => "user",
        SubjectKind::Robot => "robot",
        SubjectKind::Ci => "ci",
        SubjectKind::Anonymous => "anonymous",
    }
}

pub fn kind_from_name(s: &str) -> SubjectKind {
    match s {
        "user" => SubjectKind::User,
        "robot" => SubjectKind::Robot,
        "ci" => SubjectKind::Ci,
        _ => SubjectKind::Anonymous,
    }
}

impl Claims {
    /// Whether the token allows `action` on `resource_type:name`.
    pub fn allows(&self, resource_type: &str, name: &str, action: &str) -> bool {
        self.access.iter().any(|a| {
            a.resource_type == resource_type
                && a.name == name
                && a.actions.iter().any(|x| x == action || x == "*")
        })
    }

    pub fn subject(&self) -> policy::Subject {
        policy::Subject {
            name: self.sub.clone(),
            kind: kind_from_name(&self.subject.kind),
            groups: self.subject.groups.clone(),
        }
    }
}

/// Why a token is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signed with an unknown key")]
    UnknownKey,
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("the token has been revoked")]
    Revoked,
}

/// Keys and the checks every token must pass.
pub struct Tokens {
    keys: Vec<SigningKey>,
    issuer: String,
    audience: String,
    leeway_seconds: u64,
    verified: Verified,
    revocations: Option<Arc<Revocations>>,
}

/// How many verified tokens [`Verified`] remembers.
const VERIFIED_MAX: usize = 8192;

/// Tokens that passed the signature, `alg`, `kid`, `iss` and `aud` checks, by the SHA-256 of
/// the whole token, so a client's stream of requests with one token costs a hash and a lookup
/// instead of an ECDSA verification each (a fifth of the gateway's CPU on manifest GETs).
/// The time checks (`exp`, `nbf`) run again on every use. Only the exact bytes that were
/// verified hit, so nothing unverified can enter; a new [`Tokens`] (new keys) starts empty.
#[derive(Default)]
struct Verified(std::sync::Mutex<std::collections::HashMap<[u8; 32], Claims>>);

impl Verified {
    fn key(token: &str) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Claims> {
        self.0.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: [u8; 32], claims: &Claims, now: i64) {
        let Ok(mut map) = self.0.lock() else { return };
        if map.len() >= VERIFIED_MAX {
            map.retain(|_, c| c.exp > now);
            if map.len() >= VERIFIED_MAX {
                map.clear();
            }
        }
        map.insert(key, claims.clone());
    }
}

impl Tokens {
    pub fn new(keys: Vec<SigningKey>, issuer: &str, audience: &str) -> Self {
        Tokens {
            keys,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            leeway_seconds: 30,
            verified: Verified::default(),
            revocations: None,
        }
    }

    /// Tokens on the shared revocation list are refused.
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    pub fn revocations(&self) -> Option<&Arc<Revocations>> {
        self.revocations.as_ref()
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Signs with the first key.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let key = self
            .keys
            .first()
            .ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        header.typ = Some("JWT".into());
        let b64 = |b: &[u8]| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        let message = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header)?),
            b64(&serde_json::to_vec(claims)?)
        );
        let signature = key.sign_es256(message.as_bytes())?;
        Ok(format!("{message}.{}", b64(&signature)))
    }

    /// Verifies signature (ES256 only, key by `kid`), `exp`/`nbf` with leeway, `iss`, `aud`,
    /// and that the token is not on the revocation list.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let claims = self.verify_unrevoked(token)?;
        if self.revocations.as_ref().is_some_and(|r| {
            r.is_revoked(&super::revoked::Issued {
                jti: &claims.jti,
                kind: &claims.subject.kind,
                subject: &claims.sub,
                iat: claims.iat,
            })
        }) {
            crate::metrics::auth().revoked_presented.inc();
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    fn verify_unrevoked(&self, token: &str) -> Result<Claims, TokenError> {
        let now = super::unix_now();
        let key = Verified::key(token);
        if let Some(claims) = self.verified.get(&key) {
            let leeway = self.leeway_seconds as i64;
            if claims.exp < now - leeway {
                return Err(TokenError::Invalid("ExpiredSignature".into()));
            }
            if claims.nbf > now + leeway {
                return Err(TokenError::Invalid("ImmatureSignature".into()));
            }
            return Ok(claims);
        }
        let claims = self.verify_signed(token)?;
        self.verified.insert(key, &claims, now);
        Ok(claims)
    }

    fn verify_signed(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = self.leeway_seconds;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::keys::generate_pem;

    fn tokens() -> Tokens {
        let key = SigningKey::from_pem(&generate_pem().unwrap()).unwrap();
        Tokens::new(vec![key], "iss", "aud")
    }

    fn claims(exp_in: i64) -> Claims {
        let now = crate::clock::unix_now();
        Claims {
            iss: "iss".into(),
            sub: "bob".into(),
            aud: "aud".into(),
            exp: now + exp_in,
            nbf: now,
            iat: now,
            jti: "j".into(),
            access: vec![],
            subject: TokenSubject {
                kind: "user".into(),
                groups: vec!["team-a".into()],
            },
        }
    }

    #[test]
    fn a_verified_token_is_remembered_and_its_lifetime_still_checked() {
        let t = tokens();
        let c = claims(300);
        let jwt = t.sign(&c).unwrap();
        assert_eq!(t.verify(&jwt).unwrap(), c);
        assert_eq!(t.verified.0.lock().unwrap().len(), 1);
        assert_eq!(t.verify(&jwt).unwrap(), c);
        // The remembered claims expire like the token: past exp + leeway it is refused.
        let mut expired = c.clone();
        expired.exp -= 400;
        t.verified
            .insert(Verified::key(&jwt), &expired, crate::clock::unix_now());
        let e = t.verify(&jwt).unwrap_err().to_string();
        assert!(e.contains("Expired"), "{e}");
    }

    #[test]
    fn a_changed_token_is_verified_again_not_served_from_memory() {
        let t = tokens();
        let jwt = t.sign(&claims(300)).unwrap();
        t.verify(&jwt).unwrap();
        // Flip one character of the signature.
        let mut bytes = jwt.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(bytes).unwrap();
        assert!(t.verify(&forged).is_err());
        // A token from another key with the same claims is refused too.
        let other = tokens().sign(&claims(300)).unwrap();
        assert!(matches!(t.verify(&other), Err(TokenError::UnknownKey)));
    }
}
