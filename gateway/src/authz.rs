//! The bearer check of every `/v2/` request: token verified, route mapped to the scope it
//! needs, checked against the token's `access`; tag immutability asked of policy at manifest
//! PUT and DELETE. Pure over the request head, so it is tested without a socket.

use crate::audit::request::{Operation, User};
use crate::token::jwt::{Claims, Tokens};
use oci::{Endpoint, ErrorCode, OciError, Reference};
use pingora::http::RequestHeader;
use policy::{TagChange, TagState};
use std::sync::Arc;

/// What the proxy does with a request.
pub enum Verdict {
    /// Send it upstream, with these changes.
    Forward {
        route: &'static str,
        forward: Forward,
    },
    /// Answer it here.
    Respond {
        route: &'static str,
        status: u16,
        body: String,
        headers: Vec<(&'static str, String)>,
    },
}

/// Changes to the upstream request.
#[derive(Debug, Default)]
pub struct Forward {
    /// Send the manifest PUT with `If-None-Match: *` (the tag is immutable).
    pub create_tag_only: bool,
    pub tag: Option<String>,
    /// A break-glass use of `override-immutable` (to be audited).
    pub override_immutable: bool,
    /// Replace the request URI (e.g. a mount the token may not read from is dropped).
    pub rewrite_uri: Option<http::Uri>,
    pub subject: String,
    /// A manifest DELETE by digest in a repository with immutability rules: the proxy must
    /// find the tags pointing to the digest and ask [`Authz::check_digest_delete`].
    pub digest_delete: Option<(String, String)>,
    /// The token's subject, for later policy questions.
    pub policy_subject: Option<policy::Subject>,
}

pub struct Authz {
    pub tokens: Arc<Tokens>,
    pub policy: Arc<crate::live_policy::LivePolicy>,
    pub service: String,
    /// Token endpoint URL for challenges; derived from the request's host when unset.
    pub realm: Option<String>,
}

/// The scope an endpoint needs, as (type, name, action, challenge scope string).
fn needed(ep: &Endpoint) -> Option<(&'static str, String, &'static str, String)> {
    use oci::route::Action;
    let (act, challenge) = match ep.action()? {
        Action::Catalog => {
            return Some((
                "registry",
                "catalog".into(),
                "*",
                "registry:catalog:*".into(),
            ));
        }
        Action::Pull => ("pull", "pull"),
        Action::Push => ("push", "pull,push"),
        Action::Delete => ("delete", "delete"),
    };
    let name = ep.repository()?.to_string();
    Some((
        "repository",
        name.clone(),
        act,
        format!("repository:{name}:{challenge}"),
    ))
}

fn error_body(code: ErrorCode, message: &str) -> String {
    OciError::new(code, message).body()
}

impl Authz {
    fn realm(&self, req: &RequestHeader) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let host = req
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "localhost".into());
        // Only characters that cannot break out of the quoted header value.
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(*c))
            .collect();
        format!("https://{host}{}", crate::token::TOKEN_PATH)
    }

    fn challenge(&self, req: &RequestHeader, scope: Option<&str>, error: Option<&str>) -> String {
        let mut c = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(req),
            self.service
        );
        if let Some(s) = scope {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
        }
        c
    }

    fn unauthorized(
        &self,
        req: &RequestHeader,
        route: &'static str,
        scope: Option<&str>,
        error: Option<&str>,
        code: ErrorCode,
        msg: &str,
    ) -> Verdict {
        Verdict::Respond {
            route,
            status: 401,
            body: error_body(code, msg),
            headers: vec![("www-authenticate", self.challenge(req, scope, error))],
        }
    }

    fn bearer(&self, req: &RequestHeader) -> Option<Result<Claims, String>> {
        let h = req.headers.get("authorization")?;
        let Some(token) = h.to_str().ok().and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        }) else {
            return Some(Err("the Authorization header must be a Bearer token".into()));
        };
        Some(self.tokens.verify(&token).map_err(|e| e.to_string()))
    }

    /// Checks a `/v2/` request; what the audit event needs goes into `op` (nothing for a
    /// request without credentials, which only gets the challenge).
    pub fn check(&self, req: &RequestHeader, op: &mut Operation) -> Verdict {
        let route = oci::parse_route(req.method.as_str(), req.uri.path());
        let label = route.as_ref().map_or("invalid", Endpoint::label);
        let scope = route.as_ref().ok().and_then(needed);
        let claims = match self.bearer(req) {
            None => {
                return self.unauthorized(
                    req,
                    label,
                    scope.as_ref().map(|s| s.3.as_str()),
                    None,
                    ErrorCode::Unauthorized,
                    "authentication required",
                );
            }
            Some(Err(e)) => {
                op.endpoint = route.as_ref().ok().cloned();
                op.reason = Some(format!("invalid_token: {e}"));
                return self.unauthorized(
                    req,
                    label,
                    scope.as_ref().map(|s| s.3.as_str()),
                    Some("invalid_token"),
                    ErrorCode::Unauthorized,
                    &e,
                );
            }
            Some(Ok(c)) => c,
        };
        op.endpoint = route.as_ref().ok().cloned();
        op.query = req.uri.query().map(str::to_owned);
        op.user = Some(User {
            name: claims.sub.clone(),
            kind: claims.subject.kind.clone(),
            groups: claims.subject.groups.clone(),
        });
        let endpoint = match route {
            Ok(ep) => ep,
            Err(e) => {
                let e: OciError = e.into();
                return Verdict::Respond {
                    route: label,
                    status: e.status,
                    body: e.body(),
                    headers: Vec::new(),
                };
            }
        };
        let mut forward = Forward {
            subject: claims.sub.clone(),
            ..Forward::default()
        };
        let Some((rtype, name, action, challenge)) = scope else {
            return Verdict::Forward {
                route: label,
                forward,
            }; // GET /v2/
        };
        if !claims.allows(rtype, &name, action) {
            op.reason = Some(format!(
                "insufficient_scope: the token does not grant {rtype}:{name}:{action}"
            ));
            return self.unauthorized(
                req,
                label,
                Some(&challenge),
                Some("insufficient_scope"),
                ErrorCode::Denied,
                "requested access to the resource is denied",
            );
        }
        let now = crate::token::unix_now();
        let subject = claims.subject();
        match &endpoint {
            Endpoint::StartUpload { .. } => {
                forward.rewrite_uri = self.unreadable_mount(req, &claims);
            }
            Endpoint::PutManifest {
                name,
                reference: Reference::Tag(tag),
            } => {
                match self.policy.current().check_tag_write(
                    &subject,
                    name.as_str(),
                    tag.as_str(),
                    TagState::Unknown,
                    now,
                ) {
                    TagChange::Allowed => {}
                    TagChange::CreateOnly(_) | TagChange::Denied(_) => {
                        forward.create_tag_only = true;
                        forward.tag = Some(tag.to_string());
                    }
                    TagChange::Override(by) => {
                        // Unknown state gives CreateOnly; kept for completeness.
                        tracing::warn!(subject = %claims.sub, repository = %name, tag = %tag, rule_line = by.line, "override-immutable used");
                        forward.override_immutable = true;
                    }
                }
            }
            Endpoint::DeleteManifest {
                name,
                reference: Reference::Digest(d),
            } if self.policy.current().has_immutability_for(name.as_str()) => {
                forward.digest_delete = Some((name.to_string(), d.to_string()));
                forward.policy_subject = Some(subject.clone());
            }
            Endpoint::DeleteManifest {
                name,
                reference: Reference::Tag(tag),
            } => {
                match self.policy.current().check_tag_delete(
                    &subject,
                    name.as_str(),
                    tag.as_str(),
                    now,
                ) {
                    TagChange::Denied(by) => {
                        op.immutable_denied = true;
                        op.reason =
                            Some(format!("tag {tag} is immutable (policy line {})", by.line));
                        return Verdict::Respond {
                            route: label,
                            status: 403,
                            body: error_body(
                                ErrorCode::Denied,
                                &format!(
                                    "tag {tag} is immutable (policy line {}, pattern {}) and cannot be deleted",
                                    by.line, by.pattern
                                ),
                            ),
                            headers: Vec::new(),
                        };
                    }
                    TagChange::Override(by) => {
                        tracing::warn!(subject = %claims.sub, repository = %name, tag = %tag, rule_line = by.line, "override-immutable used to delete a tag");
                        forward.override_immutable = true;
                    }
                    TagChange::Allowed | TagChange::CreateOnly(_) => {}
                }
            }
            _ => {}
        }
        Verdict::Forward {
            route: label,
            forward,
        }
    }

    /// A DELETE of the manifest that `tags` point to: `Err((status, body))` if refused.
    pub fn check_digest_delete(
        &self,
        subject: &policy::Subject,
        repository: &str,
        tags: &[String],
    ) -> Result<bool, (u16, String)> {
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        match self.policy.current().check_manifest_delete(
            subject,
            repository,
            &refs,
            crate::token::unix_now(),
        ) {
            TagChange::Denied(by) => Err((
                403,
                error_body(
                    ErrorCode::Denied,
                    &format!(
                        "the manifest is tagged with an immutable tag (policy line {}, pattern {}) and cannot be deleted",
                        by.line, by.pattern
                    ),
                ),
            )),
            TagChange::Override(by) => {
                tracing::warn!(subject = %subject.name, repository, rule_line = by.line, "override-immutable used to delete a manifest");
                Ok(true)
            }
            TagChange::Allowed | TagChange::CreateOnly(_) => Ok(false),
        }
    }

    /// For `POST …/blobs/uploads/?mount=&from=`: if the token cannot pull from `from`, the
    /// mount is dropped and the request becomes a plain upload start (as distribution does).
    fn unreadable_mount(&self, req: &RequestHeader, claims: &Claims) -> Option<http::Uri> {
        let query = req.uri.query()?;
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let from = pairs
            .iter()
            .find(|(k, _)| k == "from")
            .map(|(_, v)| v.clone())?;
        if claims.allows("repository", &from, "pull") {
            return None;
        }
        let kept: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter().filter(|(k, _)| k != "mount" && k != "from"))
            .finish();
        let pq = if kept.is_empty() {
            req.uri.path().to_owned()
        } else {
            format!("{}?{kept}", req.uri.path())
        };
        pq.parse().ok()
    }
}
