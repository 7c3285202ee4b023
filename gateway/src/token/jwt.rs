//! Registry tokens (distribution `docs/spec/auth/jwt.md`): issue and verify.

use super::keys::SigningKey;
use jsonwebtoken::{Algorithm, Header, Validation};
use oci::scope::Scope;
use policy::SubjectKind;
use serde::{Deserialize, Serialize};

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
}

/// Keys and the checks every token must pass.
pub struct Tokens {
    keys: Vec<SigningKey>,
    issuer: String,
    audience: String,
    leeway_seconds: u64,
}

impl Tokens {
    pub fn new(keys: Vec<SigningKey>, issuer: &str, audience: &str) -> Self {
        Tokens {
            keys,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            leeway_seconds: 30,
        }
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
        Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
    }

    /// Verifies signature (ES256 only, key by `kid`), `exp`/`nbf` with leeway, `iss`, `aud`.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
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
