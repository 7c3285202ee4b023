//! The bearer check of every `/v2/` request: parsed once ([`oci::request`]), token verified,
//! the request's scopes checked against the token's `access`, and the request storage gets
//! written out again from what was authorized. Tag immutability: asked of policy at a
//! manifest PUT and a tag DELETE; a DELETE by digest or of a blob carries the repository's
//! rules to storage, which enforces them against its tags. Pure over the request head, so it
//! is tested without a socket.

use crate::audit::request::{Operation, User};
use crate::reply::{Failure, Kind};
use crate::token::jwt::{Claims, Tokens};
use oci::request::Request;
use oci::{Endpoint, OciError, Reference};
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
    /// Answer it here (an OCI error).
    Respond {
        route: &'static str,
        failure: Failure,
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
    /// The URI storage gets: the authorized request written out again
    /// ([`oci::request::Request::uri`]), never the client's own — so storage parses exactly
    /// what was decided (a mount the token may not read from is already dropped from it).
    pub uri: Option<http::Uri>,
    pub subject: String,
    /// A DELETE by digest (manifest or blob) in a repository with immutability rules: the
    /// rules, as JSON, for storage to enforce where the data is
    /// ([`policy::immutability::Protection`]).
    pub protection: Option<String>,
}

pub struct Authz {
    pub tokens: Arc<Tokens>,
    pub policy: Arc<crate::live_policy::LivePolicy>,
    pub service: String,
    /// Token endpoint URL for challenges; derived from the request's host when unset.
    pub realm: Option<String>,
}

/// The scope a request needs, as (type, name, action, challenge scope string). A mount's
/// challenge asks for `pull` on `from` too (as distribution does), so a client that takes
/// its scopes from the challenge gets a token that can mount.
fn needed(request: &Request) -> Option<(&'static str, String, &'static str, String)> {
    use oci::route::Action;
    let ep = &request.endpoint;
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
    let mut scope = format!("repository:{name}:{challenge}");
    if let Some(from) = request.params.mount.as_ref().and_then(|m| m.from.as_ref())
        && from.as_str() != name
    {
        scope.push_str(&format!(" repository:{from}:pull"));
    }
    Some(("repository", name, act, scope))
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
        format!("https://{host}{}", crate::route::TOKEN_PATH)
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
        kind: Kind,
        msg: &str,
    ) -> Verdict {
        Verdict::Respond {
            route,
            failure: Failure::new(401, kind, msg)
                .with_header("www-authenticate", self.challenge(req, scope, error)),
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
        let route = oci::request::parse(req.method.as_str(), req.uri.path(), req.uri.query());
        let label = route.as_ref().map_or("invalid", |r| r.endpoint.label());
        let scope = route.as_ref().ok().and_then(needed);
        let claims = match self.bearer(req) {
            None => {
                return self.unauthorized(
                    req,
                    label,
                    scope.as_ref().map(|s| s.3.as_str()),
                    None,
                    Kind::Unauthorized,
                    "authentication required",
                );
            }
            Some(Err(e)) => {
                op.endpoint = route.as_ref().ok().map(|r| r.endpoint.clone());
                op.reason = Some(format!("invalid_token: {e}"));
                return self.unauthorized(
                    req,
                    label,
                    scope.as_ref().map(|s| s.3.as_str()),
                    Some("invalid_token"),
                    Kind::Unauthorized,
                    &e,
                );
            }
            Some(Ok(c)) => c,
        };
        op.endpoint = route.as_ref().ok().map(|r| r.endpoint.clone());
        op.query = req.uri.query().map(str::to_owned);
        op.user = Some(User {
            name: claims.sub.clone(),
            kind: claims.subject.kind.clone(),
            groups: claims.subject.groups.clone(),
        });
        let mut request = match route {
            Ok(r) => r,
            Err(e) => {
                let e: OciError = e.into();
                return Verdict::Respond {
                    route: label,
                    failure: Failure::invalid(e),
                };
            }
        };
        let mut forward = Forward {
            subject: claims.sub.clone(),
            ..Forward::default()
        };
        let Some((rtype, name, action, challenge)) = scope else {
            // GET /v2/
            return self.forward(request, forward, label);
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
                Kind::Denied,
                "requested access to the resource is denied",
            );
        }
        let now = crate::clock::unix_now();
        let subject = claims.subject();
        let endpoint = request.endpoint.clone();
        match &endpoint {
            Endpoint::StartUpload { .. } => {
                // A mount from a repository the token may not read is a plain upload start
                // (as distribution does): the client uploads the blob instead.
                if let Some(m) = &request.params.mount
                    && !m
                        .from
                        .as_ref()
                        .is_some_and(|from| claims.allows("repository", from.as_str(), "pull"))
                {
                    request.params.mount = None;
                }
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
                reference: Reference::Digest(_),
            }
            | Endpoint::DeleteBlob { name, .. } => {
                if let Some(p) = self
                    .policy
                    .current()
                    .protection(&subject, name.as_str(), now)
                {
                    match serde_json::to_string(&p) {
                        Ok(json) => forward.protection = Some(json),
                        Err(e) => {
                            // Unreachable in practice; never forward unprotected.
                            tracing::error!(error = %e, "writing immutability rules failed");
                            return Verdict::Respond {
                                route: label,
                                failure: Failure::new(500, Kind::Internal, "internal error"),
                            };
                        }
                    }
                }
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
                            failure: Failure::new(
                                403,
                                Kind::Denied,
                                format!(
                                    "tag {tag} is immutable (policy line {}, pattern {}) and cannot be deleted",
                                    by.line, by.pattern
                                ),
                            ),
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
        self.forward(request, forward, label)
    }

    /// Forwards `request` as it was authorized: its URI written out again. A URI that cannot
    /// be written (a huge `last=`) is refused, never replaced by the client's.
    fn forward(&self, request: Request, mut forward: Forward, route: &'static str) -> Verdict {
        match request.uri().parse::<http::Uri>() {
            Ok(uri) => {
                forward.uri = Some(uri);
                Verdict::Forward { route, forward }
            }
            Err(_) => Verdict::Respond {
                route,
                failure: Failure::new(414, Kind::Unsupported, "the request URI is too long"),
            },
        }
    }
}

/// Whether what storage does with a forwarded request is within what `claims` grant: the
/// request's own repository for the endpoint's action, and `pull` on a mount's source. `uri`
/// is the URI the gateway forwarded, parsed here as storage parses it. The property the
/// proptest and the `authz` fuzz target hold the gateway to.
pub fn forwarded_within_grant(
    claims: &Claims,
    method: &str,
    uri: &http::Uri,
) -> Result<(), String> {
    let request = oci::request::parse(method, uri.path(), uri.query())
        .map_err(|e| format!("storage cannot parse the forwarded {method} {uri}: {e}"))?;
    // The scope storage's operation needs, by the same mapping the check uses.
    if let Some((rtype, name, action, _)) = needed(&request)
        && !claims.allows(rtype, &name, action)
    {
        return Err(format!(
            "{method} {uri}: storage would do {rtype}:{name}:{action} ungranted"
        ));
    }
    if let Some(from) = request.params.mount.as_ref().and_then(|m| m.from.as_ref())
        && !claims.allows("repository", from.as_str(), "pull")
    {
        return Err(format!(
            "{method} {uri}: storage would mount from {from} without pull"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::jwt::{Access, TokenSubject};
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn authz_and_bob() -> (Authz, Claims, String) {
        let key =
            crate::token::keys::SigningKey::from_pem(&crate::token::keys::generate_pem().unwrap())
                .unwrap();
        let tokens = Arc::new(Tokens::new(vec![key], "iss", "svc"));
        let policy =
            policy::Policy::compile("p.toml", include_str!("../../../conf/policy.toml")).unwrap();
        let now = crate::clock::unix_now();
        let claims = Claims {
            iss: "iss".into(),
            sub: "bob".into(),
            aud: "svc".into(),
            exp: now + 3600,
            nbf: now,
            iat: now,
            jti: "j".into(),
            access: vec![Access {
                resource_type: "repository".into(),
                name: "team-a/app".into(),
                actions: vec!["pull".into(), "push".into(), "delete".into()],
            }],
            subject: TokenSubject {
                kind: "user".into(),
                groups: vec!["team-a".into()],
            },
        };
        let jwt = tokens.sign(&claims).unwrap();
        let authz = Authz {
            tokens,
            policy: Arc::new(crate::live_policy::LivePolicy::fixed(policy, "")),
            service: "svc".into(),
            realm: Some("https://registry/token".into()),
        };
        (authz, claims, jwt)
    }

    fn head(method: &str, uri: &str, jwt: Option<&str>) -> Option<RequestHeader> {
        let mut h = RequestHeader::build(method, uri.as_bytes(), None).ok()?;
        if let Some(t) = jwt {
            h.insert_header("authorization", format!("Bearer {t}"))
                .ok()?;
        }
        Some(h)
    }

    /// bob's `POST /v2/team-a/app/blobs/uploads/?<query>`, decided.
    fn upload_start(authz: &Authz, jwt: &str, query: &str) -> Verdict {
        let uri = format!("/v2/team-a/app/blobs/uploads/?{query}");
        authz.check(
            &head("POST", &uri, Some(jwt)).unwrap(),
            &mut Operation::default(),
        )
    }

    fn forwarded(v: &Verdict) -> Option<&http::Uri> {
        match v {
            Verdict::Forward { forward, .. } => Some(
                forward
                    .uri
                    .as_ref()
                    .expect("a forwarded request carries its URI"),
            ),
            Verdict::Respond { .. } => None,
        }
    }

    #[test]
    fn a_mount_from_a_repository_the_token_cannot_read_is_a_plain_upload_whatever_the_query() {
        let (authz, claims, jwt) = authz_and_bob();
        let pad = "/".repeat(22_000);
        for q in [
            format!("mount={D}&from=team-b/secret"),
            format!("mount={D}&from=team-b/secret&pad={pad}"),
            format!("%6Dount={D}&fr%6Fm=team-b%2Fsecret"),
            format!("mount={D}&from=team-b/secret&digest={D}"),
        ] {
            let v = upload_start(&authz, &jwt, &q);
            let uri = forwarded(&v).unwrap_or_else(|| panic!("{q}: refused"));
            assert!(!uri.to_string().contains("mount"), "{uri}");
            forwarded_within_grant(&claims, "POST", uri).unwrap();
        }
        // The property itself catches what the bypass forwarded.
        let bypass: http::Uri =
            format!("/v2/team-a/app/blobs/uploads/?mount={D}&from=team-b%2Fsecret")
                .parse()
                .unwrap();
        assert!(forwarded_within_grant(&claims, "POST", &bypass).is_err());
        // Repeated: refused, not guessed.
        let q = format!("mount={D}&from=team-a/app&from=team-b/secret");
        assert!(forwarded(&upload_start(&authz, &jwt, &q)).is_none());
        // Readable: the mount goes through as it is.
        let v = upload_start(&authz, &jwt, &format!("mount={D}&from=team-a/app&pad=x"));
        assert_eq!(
            forwarded(&v).unwrap().to_string(),
            format!(
                "/v2/team-a/app/blobs/uploads/?mount={}&from=team-a%2Fapp",
                D.replace(':', "%3A")
            )
        );
    }

    #[test]
    fn a_mount_challenge_asks_for_pull_on_the_source_too() {
        let (authz, _, _) = authz_and_bob();
        let req = head(
            "POST",
            &format!("/v2/team-a/app/blobs/uploads/?mount={D}&from=team-b/x"),
            None,
        )
        .unwrap();
        let Verdict::Respond { failure, .. } = authz.check(&req, &mut Operation::default()) else {
            panic!("an anonymous push was forwarded");
        };
        assert_eq!(failure.status, 401);
        let (_, challenge) = failure
            .headers
            .iter()
            .find(|(k, _)| *k == "www-authenticate")
            .unwrap();
        assert!(
            challenge
                .contains("scope=\"repository:team-a/app:pull,push repository:team-b/x:pull\""),
            "{challenge}"
        );
    }

    #[test]
    fn deletes_by_digest_carry_the_repositorys_immutability_rules_to_storage() {
        let (authz, _, jwt) = authz_and_bob();
        for path in [
            format!("/v2/team-a/app/manifests/{D}"),
            format!("/v2/team-a/app/blobs/{D}"),
        ] {
            let req = head("DELETE", &path, Some(&jwt)).unwrap();
            let Verdict::Forward { forward, .. } = authz.check(&req, &mut Operation::default())
            else {
                panic!("{path} refused");
            };
            let p: policy::immutability::Protection =
                serde_json::from_str(forward.protection.as_deref().expect("rules sent")).unwrap();
            assert!(!p.may_override);
            let p = p.compile().unwrap();
            assert!(p.immutable("v1.2.3").is_some() && p.immutable("latest").is_none());
        }
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => Just("team-a/app".to_string()),
            1 => Just("team-b/secret".to_string()),
            1 => Just("team-a/app/../../team-b/secret".to_string()),
            1 => Just("team-b%2Fsecret".to_string()),
            1 => Just("team-a/app/blobs/uploads/x/team-b/secret".to_string()),
            1 => Just("TEAM-B/secret".to_string()),
            1 => Just("team-a//app".to_string()),
            1 => "[a-z/%.-]{0,12}",
        ]
    }

    /// A method and the end of a path: mostly the endpoints of the API, sometimes anything.
    fn endpoint() -> impl Strategy<Value = (&'static str, String)> {
        let valid = prop_oneof![
            6 => Just(("POST", "/blobs/uploads/".to_string())),
            2 => Just(("POST", "/blobs/uploads".to_string())),
            1 => Just(("GET", "/manifests/v1".to_string())),
            1 => Just(("HEAD", format!("/manifests/{D}"))),
            1 => Just(("PUT", "/manifests/v1".to_string())),
            1 => Just(("DELETE", format!("/manifests/{D}"))),
            1 => Just(("DELETE", "/manifests/v1".to_string())),
            1 => Just(("GET", format!("/blobs/{D}"))),
            1 => Just(("DELETE", format!("/blobs/{D}"))),
            1 => Just(("GET", "/tags/list".to_string())),
            1 => Just(("GET", format!("/referrers/{D}"))),
            1 => Just(("GET", "/blobs/uploads/abc-1".to_string())),
            1 => Just(("PATCH", "/blobs/uploads/abc-1".to_string())),
            1 => Just(("PUT", "/blobs/uploads/abc-1".to_string())),
            1 => Just(("DELETE", "/blobs/uploads/abc-1".to_string())),
        ];
        let method = prop_oneof![
            Just("GET"),
            Just("HEAD"),
            Just("PUT"),
            Just("POST"),
            Just("PATCH"),
            Just("DELETE"),
            Just("OPTIONS"),
        ];
        let suffix = prop_oneof![
            Just("/blobs/uploads/".to_string()),
            Just(format!("/manifests/{D}")),
            Just("/tags/list".to_string()),
            Just(String::new()),
            "[a-z/%.?=&-]{0,16}",
        ];
        prop_oneof![8 => valid, 2 => (method, suffix)]
    }

    fn pair() -> impl Strategy<Value = String> {
        let from = prop_oneof![
            Just("team-b/secret"),
            Just("team-b%2Fsecret"),
            Just("team-a/app"),
            Just("team-a%2Fapp"),
            Just("TEAM-B/x"),
            Just("team-b/secret/../x"),
            Just(""),
        ];
        let key = prop_oneof![
            Just("mount"),
            Just("from"),
            Just("digest"),
            Just("n"),
            Just("last"),
            Just("artifactType"),
            Just("pad"),
            Just("fr%6Fm"),
            Just("%6Dount"),
            Just("from%00"),
            Just("FROM"),
            Just("from "),
        ];
        let value = prop_oneof![
            Just(D.to_string()),
            Just(D.replace(':', "%3A")),
            Just("team-b/secret".to_string()),
            Just("team-b%2Fsecret".to_string()),
            (1usize..3000).prop_map(|n| "/".repeat(n)),
            "[ -~]{0,16}",
        ];
        let readable = prop_oneof![Just("team-a/app"), Just("team-a%2Fapp")];
        prop_oneof![
            4 => Just(format!("mount={D}")),
            4 => from.prop_map(|f| format!("from={f}")),
            4 => readable.prop_map(|f| format!("mount={D}&from={f}")),
            1 => Just(format!("%6Dount={}", D.replace(':', "%3A"))),
            1 => Just("fr%6Fm=team-b%2Fsecret".to_string()),
            2 => Just(format!("digest={D}")),
            1 => Just("n=2&last=v1".to_string()),
            1 => Just("artifactType=application%2Fx".to_string()),
            3 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        ]
    }

    fn request() -> impl Strategy<Value = (String, String)> {
        let sep = prop_oneof![8 => Just("&"), 1 => Just(";"), 1 => Just("&&")];
        (
            prop_oneof![
                1 => Just(("GET", "/v2/_catalog".to_string())),
                9 => (name(), endpoint()).prop_map(|(n, (m, s))| (m, format!("/v2/{n}{s}"))),
            ],
            proptest::collection::vec(pair(), 0..5),
            sep,
        )
            .prop_map(|((m, path), pairs, sep)| {
                let uri = if pairs.is_empty() {
                    path
                } else {
                    format!("{path}?{}", pairs.join(sep))
                };
                (m.to_string(), uri)
            })
    }

    /// Whatever bob (a token for team-a/app: pull, push, delete) sends, storage is asked only
    /// for what his token grants: the forwarded URI, parsed as storage parses it, is an
    /// operation on team-a/app, and a mount from anywhere else is gone. The run must forward
    /// plenty — mounts among them — or it would prove nothing.
    #[test]
    fn storage_only_ever_does_what_the_token_grants() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let (sent, mounts) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // A fixed seed: the same 4 096 requests every run (the fuzz target explores further).
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: 4096,
                ..Config::default()
            },
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        runner
            .run(&request(), |(method, uri)| {
                let (authz, claims, jwt) = AUTHZ.with(|a| a.clone());
                let Some(req) = head(&method, &uri, Some(&jwt)) else {
                    return Ok(());
                };
                if let Some(fwd) = forwarded(&authz.check(&req, &mut Operation::default())) {
                    sent.fetch_add(1, Relaxed);
                    if fwd.query().is_some_and(|q| q.contains("mount=")) {
                        mounts.fetch_add(1, Relaxed);
                    }
                    let within = forwarded_within_grant(&claims, &method, fwd);
                    prop_assert!(within.is_ok(), "{}", within.unwrap_err());
                }
                Ok(())
            })
            .unwrap();
        let (sent, mounts) = (sent.into_inner(), mounts.into_inner());
        assert!(
            sent >= 1000 && mounts >= 30,
            "forwarded {sent}, mounts {mounts}"
        );
    }

    thread_local! {
        static AUTHZ: (Arc<Authz>, Claims, String) = {
            let (a, c, j) = authz_and_bob();
            (Arc::new(a), c, j)
        };
    }
}
