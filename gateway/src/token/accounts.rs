//! The token service's account APIs, beside the token endpoint: RFC 7009 revocation by
//! whoever holds a token, administrators revoking access tokens ([`TOKENS_PATH`]), a user's
//! sessions ([`SESSIONS_PATH`]), and the robot accounts' admin API
//! ([`crate::route::ROBOTS_PATH`]).

use super::jwt;
use super::{
    Reply, Request, TokenService, parse_basic, store_unavailable, unauthorized, valid_jti,
};
use crate::auth::Identity;
use crate::route::{SESSIONS_PATH, TOKENS_PATH};
use policy::SubjectKind;
use serde_json::json;

impl TokenService {
    /// RFC 7009: revokes the refresh or access token in the form; always 200, whether it
    /// existed or not. An access token goes on the shared revocation list until it expires.
    pub async fn revoke(&self, body: &[u8]) -> Reply {
        let Some(token) = form_urlencoded::parse(body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
        else {
            return Reply::oauth_error(400, "invalid_request", "token is required");
        };
        if let (Some(revocations), Ok(claims)) =
            (self.tokens.revocations(), self.tokens.verify(&token))
        {
            // Anyone gets an anonymous token for the asking: revoking one protects nothing,
            // and storing it would let anonymous clients fill the revocation list.
            if claims.subject.kind == jwt::kind_name(SubjectKind::Anonymous) {
                return Reply::json(200, json!({}));
            }
            return match revocations
                .revoke_token(&claims.jti, Some(claims.exp))
                .await
            {
                Ok(()) => {
                    tracing::info!(subject = %claims.sub, jti = %claims.jti, "access token revoked by its holder");
                    crate::audit::record(
                        "token-revoke",
                        "success",
                        json!({"user.name": claims.sub, "identity.kind": claims.subject.kind,
                               "token.jti": claims.jti, "revoked_by": "holder (RFC 7009)"}),
                    );
                    Reply::json(200, json!({}))
                }
                Err(e) => store_unavailable(&e),
            };
        }
        match self.sessions.revoke(&token).await {
            Ok(existed) => {
                if existed {
                    tracing::info!("refresh token revoked by its holder");
                    crate::audit::record(
                        "session-revoke",
                        "success",
                        json!({"revoked_by": "holder (RFC 7009)"}),
                    );
                }
                Reply::json(200, json!({}))
            }
            Err(e) => store_unavailable(&e),
        }
    }

    /// The identity of a request with Basic credentials (the admin APIs on the TLS listener),
    /// or the answer refusing it.
    async fn basic_login(&self, req: &Request<'_>) -> Result<Identity, Reply> {
        let Some((user, password)) = req.authorization.and_then(parse_basic) else {
            return Err(unauthorized());
        };
        self.login(&user, &password, req.source).await
    }

    /// [`TOKENS_PATH`]: administrators revoke access tokens, authenticated with Basic
    /// credentials like the token endpoint.
    pub async fn tokens_api(&self, req: &Request<'_>, path: &str) -> Reply {
        let id = match self.basic_login(req).await {
            Ok(id) => id,
            Err(r) => return r,
        };
        if !self.policy.current().is_admin(&id.to_subject()) {
            crate::audit::record(
                "token-revoke",
                "failure",
                json!({"user.name": id.subject, "event.reason": "not an administrator"}),
            );
            return Reply::oauth_error(
                403,
                "access_denied",
                "only registry administrators revoke access tokens",
            );
        }
        let Some(revocations) = self.tokens.revocations() else {
            return Reply::oauth_error(404, "not_found", "token revocation is not configured");
        };
        let jti = path[TOKENS_PATH.len()..].trim_start_matches('/');
        let query: std::collections::HashMap<String, String> =
            form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let (result, revoked) = match (req.method, jti, query.get("user")) {
            ("DELETE", jti, None) if valid_jti(jti) => (
                revocations.revoke_token(jti, None).await,
                json!({"token.jti": jti}),
            ),
            ("DELETE", "", Some(name)) if !name.is_empty() && name.len() <= 256 => {
                let kind = query.get("kind").map_or("user", String::as_str);
                if !matches!(kind, "user" | "robot" | "ci") {
                    return Reply::oauth_error(
                        400,
                        "invalid_request",
                        "kind must be user, robot or ci",
                    );
                }
                (
                    revocations.revoke_subject(kind, name).await,
                    json!({"revoked.user": name, "revoked.kind": kind}),
                )
            }
            ("DELETE", _, _) => {
                return Reply::oauth_error(
                    400,
                    "invalid_request",
                    "DELETE /auth/tokens/<jti> (letters, digits, - and _) or DELETE /auth/tokens?user=<name>[&kind=user|robot|ci]",
                );
            }
            _ => {
                return Reply::oauth_error(
                    405,
                    "invalid_request",
                    "DELETE /auth/tokens/<jti> or DELETE /auth/tokens?user=<name>",
                );
            }
        };
        match result {
            Ok(()) => {
                let mut event = revoked.clone();
                event["user.name"] = json!(id.subject);
                event["revoked_by"] = json!("admin");
                tracing::info!(by = %id.subject, what = %revoked, "access tokens revoked");
                crate::audit::record("token-revoke", "success", event);
                Reply::json(200, json!({ "revoked": revoked }))
            }
            Err(e) => store_unavailable(&e),
        }
    }

    /// [`SESSIONS_PATH`]: list (`GET`) or revoke (`DELETE …/<id>`) sessions, authenticated
    /// with Basic credentials like the token endpoint.
    pub async fn sessions_api(&self, req: &Request<'_>, path: &str) -> Reply {
        let id = match self.basic_login(req).await {
            Ok(id) => id,
            Err(r) => return r,
        };
        let admin = self.policy.current().is_admin(&id.to_subject());
        let rest = path[SESSIONS_PATH.len()..].trim_start_matches('/');
        match (req.method, rest) {
            ("GET", "") => {
                let asked = form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
                    .find(|(k, _)| k == "user")
                    .map(|(_, v)| v.into_owned());
                let filter = match asked.as_deref() {
                    None => Some(id.subject.as_str()),
                    Some(u) if u == id.subject => Some(u),
                    Some(_) if !admin => {
                        return Reply::oauth_error(
                            403,
                            "access_denied",
                            "only registry administrators see other users' sessions",
                        );
                    }
                    Some("*") => None,
                    Some(u) => Some(u),
                };
                match self.sessions.list(filter).await {
                    Ok(list) => Reply::json(200, json!({ "sessions": list })),
                    Err(e) => store_unavailable(&e),
                }
            }
            ("DELETE", sid) if !sid.is_empty() => {
                let owner = (!admin).then_some(id.subject.as_str());
                match self.sessions.revoke_id(sid, owner).await {
                    Ok(true) => {
                        tracing::info!(by = %id.subject, admin, session = %sid, "session revoked");
                        crate::audit::record(
                            "session-revoke",
                            "success",
                            json!({"user.name": id.subject, "session": sid, "admin": admin}),
                        );
                        Reply::json(200, json!({ "revoked": sid }))
                    }
                    Ok(false) => {
                        crate::audit::record(
                            "session-revoke",
                            "failure",
                            json!({"user.name": id.subject, "admin": admin,
                                   "session": sid.chars().take(64).collect::<String>(),
                                   "event.reason": "no such session among the ones this user may revoke"}),
                        );
                        Reply::oauth_error(
                            404,
                            "not_found",
                            "no such session (among the ones you may revoke)",
                        )
                    }
                    Err(e) => store_unavailable(&e),
                }
            }
            _ => Reply::oauth_error(
                405,
                "invalid_request",
                "GET /auth/sessions or DELETE /auth/sessions/<id>",
            ),
        }
    }

    /// [`crate::route::ROBOTS_PATH`]: the robot accounts' admin API, authenticated with the
    /// admin token (`Bearer`) or Basic credentials (administrators; robots that may create
    /// robots).
    pub async fn robots_api(&self, req: &Request<'_>, path: &str) -> Reply {
        use crate::auth::robots::Caller;
        use crate::route::ROBOTS_PATH;
        let Some(robots) = &self.robots else {
            return Reply::oauth_error(404, "not_found", "robot accounts are not configured");
        };
        let auth = req.authorization.unwrap_or("");
        let caller = match auth.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => {
                if !robots.is_admin_token(t.trim()) {
                    crate::audit::record(
                        "robot-admin",
                        "failure",
                        json!({"event.reason": "wrong admin token"}),
                    );
                    return Reply::oauth_error(401, "invalid_token", "wrong admin token")
                        .with_header("www-authenticate", "Bearer realm=\"portcullis-admin\"");
                }
                Caller::Token
            }
            _ => {
                let Some((user, password)) = parse_basic(auth) else {
                    return unauthorized();
                };
                match self.login(&user, &password, req.source).await {
                    Ok(id) if self.policy.current().is_admin(&id.to_subject()) => {
                        Caller::Admin(id.subject)
                    }
                    Ok(id) => Caller::Other(id),
                    Err(r) => return r,
                }
            }
        };
        self.robots_call(
            robots,
            req.method,
            &path[ROBOTS_PATH.len()..],
            req.body,
            &caller,
        )
        .await
    }

    /// One call of the robots' admin API for `caller` (who the API and the console
    /// established), and what follows a delete: the robot's access tokens revoked.
    pub async fn robots_call(
        &self,
        robots: &crate::auth::robots::Robots,
        method: &str,
        rest: &str,
        body: &[u8],
        caller: &crate::auth::robots::Caller,
    ) -> Reply {
        let reply = robots.api(method, rest, body, caller).await;
        // A deleted robot's access tokens die with it, on every replica.
        if method == "DELETE" && reply.status == 200 {
            let deleted = serde_json::from_str::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|v| v["deleted"].as_str().map(str::to_owned));
            if let (Some(name), Some(revocations)) = (deleted, self.tokens.revocations())
                && let Err(e) = revocations.revoke_subject("robot", &name).await
            {
                tracing::warn!(error = %e, robot = %name, "the deleted robot's access tokens could not be revoked; they expire by themselves");
            }
        }
        reply
    }
}
