//! The Docker token service (distribution `docs/spec/auth/{token,oauth,jwt,scope}.md`):
//! `GET /token` with Basic credentials or none (anonymous), `POST /token` with
//! `grant_type=password|refresh_token`, refresh tokens for `offline_token=true` /
//! `access_type=offline`, and the JWKS at [`JWKS_PATH`].
//!
//! The service is independent of Pingora: [`TokenService::handle`] takes the request's parts
//! and returns a [`Reply`], so it is tested without a socket.

pub mod jwt;
pub mod keys;
pub mod refresh;

use crate::auth::{AuthError, Authenticator, Identity};
use base64::Engine;
use jwt::{Access, Claims, TokenSubject, Tokens};
use oci::scope::Scope;
use policy::{Policy, SubjectKind};
use refresh::RefreshStore;
use serde_json::json;
use std::sync::Arc;

/// Where the token endpoint is.
pub const TOKEN_PATH: &str = "/token";
/// Where the public keys are published.
pub const JWKS_PATH: &str = "/auth/jwks.json";
/// RFC 7009 revocation of a refresh token by whoever holds it (`POST`, form `token=`).
pub const REVOKE_PATH: &str = "/auth/revoke";

/// An HTTP answer of the token service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub www_authenticate: Option<String>,
}

impl Reply {
    fn json(status: u16, v: serde_json::Value) -> Self {
        Reply {
            status,
            body: v.to_string(),
            www_authenticate: None,
        }
    }

    /// An OAuth 2 error (RFC 6749 §5.2).
    fn oauth_error(status: u16, error: &str, description: &str) -> Self {
        Reply::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }
}

/// The parts of a token request the service needs.
pub struct Request<'a> {
    pub method: &'a str,
    pub query: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub body: &'a [u8],
}

pub struct TokenService {
    pub tokens: Arc<Tokens>,
    pub auth: Arc<dyn Authenticator>,
    pub policy: Arc<Policy>,
    pub refresh: RefreshStore,
    pub expires_in_seconds: u64,
}

/// The username that says "the password is a registry refresh token" (Docker's convention
/// for identity tokens, used by credential helpers and `docker login -u '<token>'`).
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// `n` bytes from the OS random generator, base64url without padding: refresh tokens, OIDC
/// `state`, `nonce`, PKCE verifiers and cookies.
pub fn random_token(n: usize) -> String {
    use base64::Engine as _;
    let mut raw = vec![0u8; n];
    openssl::rand::rand_bytes(&mut raw).expect("the OS random generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn rfc3339(secs: i64) -> String {
    storage_backend::registry::rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
    )
}

/// Decodes `Basic base64(user:password)`.
pub fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn anonymous() -> Identity {
    Identity {
        subject: String::new(),
        groups: Vec::new(),
        kind: SubjectKind::Anonymous,
    }
}

impl TokenService {
    pub async fn handle(&self, req: &Request<'_>) -> Reply {
        match req.method {
            "GET" => self.get(req).await,
            "POST" => self.post(req).await,
            _ => Reply::oauth_error(405, "invalid_request", "use GET or POST"),
        }
    }

    /// RFC 7009: revokes the refresh token in the form; always 200, whether it existed or not.
    pub fn revoke(&self, body: &[u8]) -> Reply {
        let token = form_urlencoded::parse(body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        match token {
            Some(t) => {
                if self.refresh.revoke(&t) {
                    tracing::info!("refresh token revoked by its holder");
                }
                Reply::json(200, json!({}))
            }
            None => Reply::oauth_error(400, "invalid_request", "token is required"),
        }
    }

    fn check_service(&self, service: Option<&str>) -> Result<(), Reply> {
        match service {
            Some(s) if s != self.tokens.audience() => Err(Reply::oauth_error(
                400,
                "invalid_request",
                &format!(
                    "unknown service {:?}",
                    s.chars().take(100).collect::<String>()
                ),
            )),
            _ => Ok(()),
        }
    }

    async fn get(&self, req: &Request<'_>) -> Reply {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Err(r) = self.check_service(param("service")) {
            return r;
        }
        let mut scopes = Vec::new();
        for (_, v) in params.iter().filter(|(k, _)| k == "scope") {
            match Scope::parse_list(v) {
                Ok(s) => scopes.extend(s),
                Err(e) => return Reply::oauth_error(400, "invalid_scope", &e.to_string()),
            }
        }
        let identity = match req.authorization {
            None => anonymous(),
            Some(h) => match parse_basic(h) {
                None => {
                    return Reply {
                        www_authenticate: Some("Basic realm=\"portcullis\"".into()),
                        ..Reply::oauth_error(
                            401,
                            "invalid_client",
                            "the Authorization header must be Basic credentials",
                        )
                    };
                }
                Some((user, password)) => match self.login(&user, &password).await {
                    Ok(id) => id,
                    Err(r) => return r,
                },
            },
        };
        let offline = param("offline_token") == Some("true");
        let client_id = param("client_id").unwrap_or("unknown");
        self.issue(
            &identity,
            &scopes,
            offline && identity.kind != SubjectKind::Anonymous,
            client_id,
            false,
        )
    }

    async fn login(&self, user: &str, password: &str) -> Result<Identity, Reply> {
        if user.is_empty() || password.is_empty() {
            return Err(unauthorized());
        }
        // Docker's identity-token convention: the password is a registry refresh token.
        if user == IDENTITY_TOKEN_USER {
            return self
                .refresh
                .redeem(password, unix_now())
                .ok_or_else(unauthorized);
        }
        match self.auth.authenticate(user, password).await {
            Ok(id) => Ok(id),
            Err(AuthError::InvalidCredentials | AuthError::UnknownUser) => Err(unauthorized()),
            Err(AuthError::Unavailable(e)) => {
                tracing::warn!(backend = self.auth.name(), error = %e, "authentication backend unavailable");
                Err(Reply::oauth_error(
                    503,
                    "temporarily_unavailable",
                    "the authentication backend is unavailable, try again later",
                ))
            }
        }
    }

    async fn post(&self, req: &Request<'_>) -> Reply {
        let form: Vec<(String, String)> = form_urlencoded::parse(req.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Err(r) = self.check_service(field("service")) {
            return r;
        }
        let Some(client_id) = field("client_id") else {
            return Reply::oauth_error(400, "invalid_request", "client_id is required");
        };
        let scopes = match Scope::parse_list(field("scope").unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return Reply::oauth_error(400, "invalid_scope", &e.to_string()),
        };
        let offline = field("access_type") == Some("offline");
        match field("grant_type") {
            Some("password") => {
                let (Some(u), Some(p)) = (field("username"), field("password")) else {
                    return Reply::oauth_error(
                        400,
                        "invalid_request",
                        "username and password are required",
                    );
                };
                match self.login(u, p).await {
                    Ok(id) => self.issue(&id, &scopes, offline, client_id, true),
                    Err(r) if r.status == 401 => {
                        Reply::oauth_error(400, "invalid_grant", "invalid username or password")
                    }
                    Err(r) => r,
                }
            }
            Some("refresh_token") => {
                let Some(rt) = field("refresh_token") else {
                    return Reply::oauth_error(400, "invalid_request", "refresh_token is required");
                };
                match self.refresh.redeem(rt, unix_now()) {
                    Some(id) => {
                        let mut r = self.issue(&id, &scopes, false, client_id, true);
                        // The same refresh token stays valid; say so, as clients store it.
                        if r.status == 200
                            && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&r.body)
                        {
                            v["refresh_token"] = json!(rt);
                            r.body = v.to_string();
                        }
                        r
                    }
                    None => Reply::oauth_error(
                        400,
                        "invalid_grant",
                        "the refresh token is invalid, expired or revoked",
                    ),
                }
            }
            Some(other) => Reply::oauth_error(
                400,
                "unsupported_grant_type",
                &format!(
                    "grant_type {:?} is not supported",
                    other.chars().take(60).collect::<String>()
                ),
            ),
            None => Reply::oauth_error(400, "invalid_request", "grant_type is required"),
        }
    }

    fn issue(
        &self,
        id: &Identity,
        scopes: &[Scope],
        offline: bool,
        client_id: &str,
        oauth: bool,
    ) -> Reply {
        let now = unix_now();
        let subject = id.to_subject();
        let granted = self.policy.grant(&subject, scopes, now);
        let claims = Claims {
            iss: self.tokens.issuer().to_string(),
            sub: id.subject.clone(),
            aud: self.tokens.audience().to_string(),
            exp: now + self.expires_in_seconds as i64,
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            access: granted.iter().map(Access::from).collect(),
            subject: TokenSubject {
                kind: jwt::kind_name(id.kind).to_string(),
                groups: id.groups.clone(),
            },
        };
        let token = match self.tokens.sign(&claims) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "signing a token failed");
                return Reply::oauth_error(500, "server_error", "could not issue a token");
            }
        };
        tracing::info!(
            subject = %id.subject,
            requested = %scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            granted = %granted.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
            "token issued"
        );
        let mut body = json!({
            "access_token": token,
            "expires_in": self.expires_in_seconds,
            "issued_at": rfc3339(now),
        });
        if oauth {
            body["scope"] = json!(
                granted
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        } else {
            body["token"] = json!(token);
        }
        if offline {
            body["refresh_token"] = json!(self.refresh.issue(id.clone(), client_id, now));
        }
        Reply::json(200, body)
    }
}

fn unauthorized() -> Reply {
    Reply {
        status: 401,
        body:
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]})
                .to_string(),
        www_authenticate: Some("Basic realm=\"portcullis\"".into()),
    }
}
