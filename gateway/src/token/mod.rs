//! The Docker token service (distribution `docs/spec/auth/{token,oauth,jwt,scope}.md`):
//! `GET /token` with Basic credentials or none (anonymous), `POST /token` with
//! `grant_type=password|refresh_token`, refresh tokens for `offline_token=true` /
//! `access_type=offline`, and the JWKS at [`crate::route::JWKS_PATH`].
//!
//! The service is independent of Pingora: [`TokenService::handle`] takes the request's parts
//! and returns a [`Reply`], so it is tested without a socket.

mod accounts;
pub mod config;
pub mod jwt;
pub mod keys;
pub mod refresh;
pub mod revoked;

use crate::auth::{AuthError, Authenticator, Identity};
use base64::Engine;
use jwt::{Access, Claims, TokenSubject, Tokens};
use oci::scope::Scope;
use policy::SubjectKind;
use refresh::{Redeemed, Session, Sessions};
use serde_json::json;
use std::sync::Arc;

pub use crate::reply::Reply;
use crate::reply::{Failure, Kind, Protocol};

/// The parts of a token request the service needs.
pub struct Request<'a> {
    pub method: &'a str,
    pub query: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub body: &'a [u8],
    /// The client's address (for lockouts and rate limits).
    pub source: Option<&'a str>,
}

pub struct TokenService {
    pub tokens: Arc<Tokens>,
    pub auth: Arc<dyn Authenticator>,
    pub policy: Arc<crate::live_policy::LivePolicy>,
    pub sessions: Sessions,
    /// The htpasswd users, when there are: a password session of a user no longer there ends.
    pub users: Option<Arc<crate::auth::htpasswd::LiveHtpasswd>>,
    pub expires_in_seconds: u64,
    /// Single sign-on: device grants, and groups read again for sessions it created.
    pub oidc: Option<Arc<crate::auth::oidc::Oidc>>,
    /// One IdP refresh at a time per gateway (an IdP that rotates refresh tokens must not
    /// see the same one twice).
    pub reread_lock: tokio::sync::Mutex<()>,
    /// Robot accounts' admin API (their logins go through `auth`).
    pub robots: Option<Arc<crate::auth::robots::Robots>>,
    /// CI federation: the jwt-bearer grant (passwords that are CI JWTs go through `auth`).
    pub federation: Option<Arc<crate::auth::federation::Federation>>,
    /// Lockouts and the token endpoint's rate limits.
    pub limits: Arc<crate::limits::Limits>,
}

/// The username that says "the password is a registry refresh token" (Docker's convention
/// for identity tokens, used by credential helpers and `docker login -u '<token>'`).
pub const IDENTITY_TOKEN_USER: &str = "<token>";

pub use crate::clock::unix_now;
pub use crate::random::random_token;

fn rfc3339(secs: i64) -> String {
    service::time::rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
    )
}

/// A `jti` as this service makes them (and nothing that could be a glob or a path).
fn valid_jti(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
        machine: None,
    }
}

impl TokenService {
    pub async fn handle(&self, req: &Request<'_>) -> Reply {
        if let Some(r) = self.rate_limited(req).await {
            return r;
        }
        match req.method {
            "GET" => self.get(req).await,
            "POST" => self.post(req).await,
            _ => Reply::oauth_error(405, "invalid_request", "use GET or POST"),
        }
    }

    /// The token endpoint's rate limits, per source and per the user name the request gives.
    async fn rate_limited(&self, req: &Request<'_>) -> Option<Reply> {
        let user = match req.authorization.and_then(parse_basic) {
            Some((u, _)) => Some(u),
            None if req.method == "POST" => form_urlencoded::parse(req.body)
                .find(|(k, _)| k == "username")
                .map(|(_, v)| v.into_owned()),
            None => None,
        };
        let user = user.filter(|u| u != IDENTITY_TOKEN_USER);
        let l = self
            .limits
            .over_rate(crate::limits::Endpoint::Token, req.source, user.as_deref())
            .await?;
        if l.first {
            crate::audit::record(
                "rate-limit",
                "failure",
                json!({"user.name": user.unwrap_or_default(), "limit.by": l.by.name(),
                       "limit.endpoint": "token",
                       "event.reason": "too many token requests in this minute"}),
            );
        }
        Some(Reply::too_many(
            l.retry_after,
            "too many token requests, try again later",
        ))
    }

    /// The identity a refresh token stands for ([`TokenService::redeem_session`]).
    async fn redeem(&self, token: &str) -> Result<Option<Identity>, Reply> {
        Ok(self.redeem_session(token).await?.map(|s| s.identity()))
    }

    /// The session a refresh token stands for, its groups read again from the IdP when the
    /// session came from single sign-on and they are older than `groups_refresh_seconds`.
    /// `Ok(None)`: invalid, expired, revoked, or refused by the IdP.
    pub async fn redeem_session(&self, token: &str) -> Result<Option<Session>, Reply> {
        let now = unix_now();
        let redeem = || async {
            self.sessions
                .redeem(token, now)
                .await
                .map_err(|e| store_unavailable(&e))
        };
        let Some(mut r) = redeem().await? else {
            return Ok(None);
        };
        // A user removed from the htpasswd file (a reload) keeps no session opened with the
        // password.
        if r.session.source == "password"
            && r.session.kind == "user"
            && self
                .users
                .as_ref()
                .is_some_and(|u| u.gone(&r.session.subject))
        {
            tracing::info!(subject = %r.session.subject, "the user is gone from the htpasswd file: session ended");
            self.sessions
                .end(&r)
                .await
                .map_err(|e| store_unavailable(&e))?;
            return Ok(None);
        }
        if let (Some(oidc), Some(_)) = (&self.oidc, &r.session.idp_refresh)
            && now - r.session.groups_checked_at >= oidc.groups_refresh_seconds()
        {
            let _one = self.reread_lock.lock().await;
            // Another request may have read them while this one waited.
            let Some(again) = redeem().await? else {
                return Ok(None);
            };
            r = again;
            if now - r.session.groups_checked_at >= oidc.groups_refresh_seconds() {
                return self.reread(oidc, r, now).await;
            }
        }
        Ok(Some(r.session))
    }

    async fn reread(
        &self,
        oidc: &crate::auth::oidc::Oidc,
        mut r: Redeemed,
        now: i64,
    ) -> Result<Option<Session>, Reply> {
        let idp_refresh = r.session.idp_refresh.clone().unwrap_or_default();
        match oidc.reread(&idp_refresh, &r.session.subject).await {
            crate::auth::oidc::Reread::Fresh(s) => {
                if s.identity.groups != r.session.groups {
                    tracing::info!(subject = %r.session.subject, groups = ?s.identity.groups, "groups changed at the IdP");
                }
                r.session.groups = s.identity.groups;
                r.session.idp_refresh = s.idp_refresh;
                r.session.groups_checked_at = now;
                self.sessions
                    .update(&r, now)
                    .await
                    .map_err(|e| store_unavailable(&e))?;
                Ok(Some(r.session))
            }
            crate::auth::oidc::Reread::Refused(why) if oidc.revoke_on_refresh_failure() => {
                tracing::info!(subject = %r.session.subject, reason = %why, "the IdP refused the session's refresh: session ended");
                self.sessions
                    .end(&r)
                    .await
                    .map_err(|e| store_unavailable(&e))?;
                Ok(None)
            }
            crate::auth::oidc::Reread::Refused(why)
            | crate::auth::oidc::Reread::Unavailable(why) => {
                // Keep the groups last read; try again at the next refresh.
                tracing::warn!(subject = %r.session.subject, reason = %why, "could not read groups again from the IdP");
                Ok(Some(r.session))
            }
        }
    }

    /// Opens a session for `session` and returns its refresh token.
    pub async fn open_session(&self, session: &Session) -> Result<String, Reply> {
        self.sessions
            .issue(session)
            .await
            .map_err(|e| store_unavailable(&e))
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
        let (identity, refresh_token) = match req.authorization {
            None => (anonymous(), None),
            Some(h) => match parse_basic(h) {
                None => {
                    return Reply::oauth_error(
                        401,
                        "invalid_client",
                        "the Authorization header must be Basic credentials",
                    )
                    .with_header("www-authenticate", "Basic realm=\"portcullis\"");
                }
                Some((user, password)) => match self.login(&user, &password, req.source).await {
                    Ok(id) => (id, (user == IDENTITY_TOKEN_USER).then_some(password)),
                    Err(r) => return r,
                },
            },
        };
        let offline = param("offline_token") == Some("true");
        let client_id = param("client_id").unwrap_or("unknown");
        let session = offline_session(&identity, offline, client_id);
        let refresh = Refresh::offline(refresh_token.as_deref(), session.as_ref());
        self.issue(&identity, &scopes, refresh, false).await
    }

    /// A password login (the console's too): the authenticators, lockouts, rate limits and
    /// audit of the token endpoint's; an error is the reply the token endpoint would give.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        source: Option<&str>,
    ) -> Result<Identity, Reply> {
        if user.is_empty() || password.is_empty() {
            return Err(unauthorized());
        }
        // Docker's identity-token convention: the password is a registry refresh token.
        if user == IDENTITY_TOKEN_USER {
            return self.redeem(password).await?.ok_or_else(unauthorized);
        }
        let failed = |reason: &str| {
            crate::metrics::auth()
                .token_decisions
                .with_label_values(&["password", "denied"])
                .inc();
            crate::audit::record(
                "login",
                "failure",
                json!({"user.name": user, "event.reason": reason, "authenticator": self.auth.name()}),
            );
        };
        let gate = match self.limits.login_gate(user, source).await {
            Ok(gate) => gate,
            Err(e) => {
                crate::metrics::auth()
                    .limits_unavailable
                    .with_label_values(&["lockout"])
                    .inc();
                failed("login protection state unavailable");
                return Err(store_unavailable(&e));
            }
        };
        if let Some(locked) = &gate.locked {
            failed(&format!("locked out ({})", locked.by.name()));
            return Err(Reply::too_many(
                locked.retry_after,
                &format!(
                    "too many failed logins, try again in {} s",
                    locked.retry_after
                ),
            ));
        }
        match self.auth.authenticate(user, password).await {
            Ok(id) => {
                if let Err(e) = self.limits.login_succeeded(user, &gate).await {
                    tracing::warn!(error = %e, "could not clear failed logins: the state store is unavailable");
                }
                Ok(id)
            }
            Err(AuthError::InvalidCredentials | AuthError::UnknownUser) => {
                failed("invalid credentials");
                self.count_failure(user, source).await;
                Err(unauthorized())
            }
            Err(AuthError::Refused(why)) => Err(refused(&why)),
            Err(AuthError::Unavailable(e)) => {
                failed("authentication backend unavailable");
                tracing::warn!(backend = self.auth.name(), error = %e, "authentication backend unavailable");
                Err(Reply::oauth_error(
                    503,
                    "temporarily_unavailable",
                    "the authentication backend is unavailable, try again later",
                ))
            }
        }
    }

    /// Counts a failed login; audits the lockout it starts.
    async fn count_failure(&self, user: &str, source: Option<&str>) {
        match self.limits.login_failed(user, source).await {
            Ok(None) => {}
            Ok(Some(l)) => {
                crate::metrics::auth()
                    .lockouts
                    .with_label_values(&[l.by.name()])
                    .inc();
                crate::audit::record(
                    "login-lockout",
                    "success",
                    json!({"user.name": user, "lockout.by": l.by.name(),
                           "lockout.seconds": l.seconds, "lockout.failures": l.failures,
                           "event.reason": format!("{} failed logins", l.failures)}),
                );
            }
            Err(e) => {
                crate::metrics::auth()
                    .limits_unavailable
                    .with_label_values(&["lockout"])
                    .inc();
                tracing::warn!(error = %e, "failed login not counted: the state store is unavailable");
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
                match self.login(u, p, req.source).await {
                    Ok(id) => {
                        let session = offline_session(&id, offline, client_id);
                        let from_session = (u == IDENTITY_TOKEN_USER).then_some(p);
                        let refresh = Refresh::offline(from_session, session.as_ref());
                        self.issue(&id, &scopes, refresh, true).await
                    }
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
                match self.redeem(rt).await {
                    // The same refresh token stays valid; say so, as clients store it.
                    Ok(Some(id)) => self.issue(&id, &scopes, Refresh::Keep(rt), true).await,
                    Ok(None) => Reply::oauth_error(
                        400,
                        "invalid_grant",
                        "the refresh token is invalid, expired or revoked",
                    ),
                    Err(r) => r,
                }
            }
            Some(crate::auth::federation::JWT_BEARER_GRANT) => {
                let Some(assertion) = field("assertion") else {
                    return Reply::oauth_error(400, "invalid_request", "assertion is required");
                };
                let Some(federation) = &self.federation else {
                    return Reply::oauth_error(
                        400,
                        "unsupported_grant_type",
                        "CI federation is not configured on this registry",
                    );
                };
                match federation.verify(assertion).await {
                    Ok(id) => self.issue(&id, &scopes, Refresh::None, true).await,
                    Err(AuthError::Unavailable(e)) => {
                        tracing::warn!(error = %e, "jwt-bearer grant: issuer keys unavailable");
                        Reply::oauth_error(
                            503,
                            "temporarily_unavailable",
                            "the CI issuer's keys cannot be fetched, try again later",
                        )
                    }
                    Err(AuthError::Refused(why)) => Reply::oauth_error(400, "invalid_grant", &why),
                    Err(_) => {
                        Reply::oauth_error(400, "invalid_grant", "the assertion is not valid")
                    }
                }
            }
            Some(crate::auth::oidc::device::DEVICE_GRANT) => {
                let Some(code) = field("device_code") else {
                    return Reply::oauth_error(400, "invalid_request", "device_code is required");
                };
                self.device_grant(code, &scopes).await
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

    /// RFC 8628 §3.4: one poll of a device code.
    async fn device_grant(&self, code: &str, scopes: &[Scope]) -> Reply {
        use crate::auth::oidc::device::DevicePoll;
        let Some(oidc) = &self.oidc else {
            return Reply::oauth_error(
                400,
                "unsupported_grant_type",
                "single sign-on is not configured on this registry",
            );
        };
        match oidc.device_poll(code).await {
            DevicePoll::Done(signed_in, device) => {
                let now = unix_now();
                let mut session = Session::new(&signed_in.identity, "device", &device, now);
                session.idp_refresh = signed_in.idp_refresh;
                tracing::info!(subject = %signed_in.identity.subject, device = %session.device, "device signed in");
                self.issue(&signed_in.identity, scopes, Refresh::Open(&session), true)
                    .await
            }
            DevicePoll::Pending(e) => Reply::oauth_error(
                400,
                &e,
                "the user has not finished signing in yet; poll again after the interval",
            ),
            DevicePoll::Expired => Reply::oauth_error(
                400,
                "expired_token",
                "the device code has expired; start again",
            ),
            DevicePoll::Denied(why) => Reply::oauth_error(400, "access_denied", &why),
            DevicePoll::Unknown => {
                Reply::oauth_error(400, "invalid_grant", "unknown or already used device code")
            }
            DevicePoll::Unavailable(e) => {
                tracing::warn!(error = %e, "device grant: the identity provider is unavailable");
                Reply::oauth_error(
                    503,
                    "temporarily_unavailable",
                    "the identity provider is unavailable, try again later",
                )
            }
        }
    }

    /// An access token for `id` and `scopes`, and the refresh token `refresh` says.
    async fn issue(
        &self,
        id: &Identity,
        scopes: &[Scope],
        refresh: Refresh<'_>,
        oauth: bool,
    ) -> Reply {
        let now = unix_now();
        let subject = id.to_subject();
        let machine = id.machine.as_deref();
        let granted = match machine.and_then(|m| m.scope.as_ref()) {
            Some(own) => self
                .policy
                .current()
                .grant_with(&subject, scopes, now, |a, r| own.allows(a, r)),
            None => self.policy.current().grant(&subject, scopes, now),
        };
        let exp = (now + self.expires_in_seconds as i64)
            .min(machine.and_then(|m| m.not_after).unwrap_or(i64::MAX));
        if exp <= now {
            return Reply::oauth_error(400, "invalid_grant", "the credentials have expired");
        }
        let iat = self.tokens.revocations().map_or(now, |r| {
            r.issue_time(jwt::kind_name(id.kind), &id.subject, now)
        });
        let claims = Claims {
            iss: self.tokens.issuer().to_string(),
            sub: id.subject.clone(),
            aud: self.tokens.audience().to_string(),
            exp,
            nbf: now,
            iat,
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
        let mut event = json!({
            "user.name": id.subject,
            "user.roles": id.groups,
            "identity.kind": jwt::kind_name(id.kind),
            "token.requested": scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "token.granted": granted.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "token.jti": claims.jti,
        });
        let authenticator = match machine {
            Some(m) => m.authenticator.as_str(),
            None => jwt::kind_name(id.kind),
        };
        // Each (resource, action) asked for, and each given.
        let each = |v: &[String]| -> std::collections::BTreeSet<String> {
            v.iter()
                .flat_map(|s| {
                    let (res, actions) = s.rsplit_once(':').unwrap_or((s, ""));
                    actions.split(',').map(move |a| format!("{res}:{a}"))
                })
                .collect()
        };
        let requested: Vec<String> = scopes.iter().map(ToString::to_string).collect();
        let given: Vec<String> = granted.iter().map(ToString::to_string).collect();
        let decision = if each(&given) == each(&requested) {
            "granted"
        } else {
            "partial"
        };
        crate::metrics::auth()
            .token_decisions
            .with_label_values(&[authenticator, decision])
            .inc();
        if let Some(m) = machine {
            event["authenticator"] = json!(m.authenticator);
            event["identity.issuer"] = json!(m.issuer);
            event["ci.claims"] = json!(m.claims);
        }
        crate::audit::record("token", "success", event);
        let mut body = json!({
            "access_token": token,
            "expires_in": exp - now,
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
        match refresh {
            Refresh::None => {}
            Refresh::Keep(t) => body["refresh_token"] = json!(t),
            Refresh::Open(session) => match self.open_session(session).await {
                Ok(t) => body["refresh_token"] = json!(t),
                Err(r) => return r,
            },
        }
        Reply::json(200, body)
    }
}

/// The refresh token of a token answer.
enum Refresh<'a> {
    None,
    /// The one the client traded (it stays valid).
    Keep(&'a str),
    /// A new one, opening this session.
    Open(&'a Session),
}

impl<'a> Refresh<'a> {
    /// The refresh token of an offline request (`session` is set when one was asked for).
    /// Credentials that were themselves a refresh token never open a new session: what is
    /// derived from a session stays that session (same end, revoked with it), so the client
    /// gets the same token back.
    fn offline(refresh_token: Option<&'a str>, session: Option<&'a Session>) -> Self {
        match (session, refresh_token) {
            (None, _) => Refresh::None,
            (Some(_), Some(t)) => Refresh::Keep(t),
            (Some(s), None) => Refresh::Open(s),
        }
    }
}

/// The session an offline token request opens: people only — robots and CI identities log
/// in again every time, so disabling one takes effect.
fn offline_session(identity: &Identity, offline: bool, client_id: &str) -> Option<Session> {
    (offline && identity.kind == SubjectKind::User)
        .then(|| Session::new(identity, "password", client_id, unix_now()))
}

fn store_unavailable(e: &crate::state::StateError) -> Reply {
    tracing::warn!(error = %e, "the state store is unavailable");
    Reply::oauth_error(
        503,
        "temporarily_unavailable",
        "session storage is unavailable, try again later",
    )
}

/// A 401 that says why (a CI token refused: expired, wrong audience…).
fn refused(why: &str) -> Reply {
    Failure::new(401, Kind::Unauthorized, why)
        .with_header("www-authenticate", "Basic realm=\"portcullis\"")
        .reply(Protocol::Registry)
}

fn unauthorized() -> Reply {
    refused("invalid username or password")
}
