//! The web console at `/ui/`: what people see of their registry in a browser.
//!
//! - Sign-in with a password goes through the token service's own login (the same
//!   authenticators, lockouts and audit as `docker login`) and opens an ordinary session
//!   (`source: console`, listed and revoked at `/auth/sessions` like any other); its refresh
//!   token is the cookie (`Secure`, `HttpOnly`, `SameSite=Strict`, path `/ui`), redeemed on
//!   every request, so a revoked or expired session signs the browser out at once.
//! - Every page and action is decided by the policy in force for the session's identity,
//!   as the registry decides: a repository the person may not pull is not listed and its
//!   pages answer as if it did not exist; delete buttons only where policy allows a delete,
//!   and a delete of an immutable tag is refused with the rule that holds it.
//! - Every state change is a form post carrying the session's CSRF token (derived from the
//!   session token); pages carry a strict `Content-Security-Policy` (no script at all), deny
//!   framing, and escape everything they show ([`pages`]).
//!
//! Rooms: [`pages`] (templates), [`data`] (what it reads from storage).

pub mod data;
pub mod pages;

use crate::incoming::Incoming;
use crate::reply::{HTML, Reply};
use crate::token::TokenService;
use crate::token::refresh::Session;
use data::Data;
use pages::{TagRow, Who};
use policy::Action;
use std::sync::Arc;

/// The session cookie.
const COOKIE: &str = "portcullis_ui";
/// The sign-in form's CSRF cookie (before there is a session).
const LOGIN_COOKIE: &str = "portcullis_ui_login";
/// Repositories per page, tags per page.
const PAGE: usize = 50;
/// Catalog names looked at for one page of repositories a person may see, at most.
const SCAN: usize = 5_000;
const STYLE: &str = include_str!("style.css");

pub struct Console {
    pub tokens: Arc<TokenService>,
    pub data: Data,
    /// Whether single sign-on is configured (the sign-in page links it).
    pub sso: bool,
}

/// A signed-in request.
struct Signed {
    session: Session,
    token: String,
}

impl Signed {
    fn subject(&self) -> policy::Subject {
        policy::Subject {
            name: self.session.subject.clone(),
            kind: crate::token::jwt::kind_from_name(&self.session.kind),
            groups: self.session.groups.clone(),
        }
    }

    fn csrf(&self) -> String {
        csrf_of(&self.token)
    }

    fn who(&self, csrf: &str) -> (String, String) {
        (self.session.subject.clone(), csrf.to_owned())
    }
}

/// The CSRF token of a session: derived from its (secret) token, so nothing more is stored
/// and another session's forms do not fit.
fn csrf_of(token: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(format!("portcullis-ui-csrf:{token}").as_bytes())[..16])
}

fn cookie<'a>(cookies: Option<&'a str>, name: &str) -> Option<&'a str> {
    cookies?.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn form(body: &[u8]) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn query(q: Option<&str>) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// A page with the console's headers: no script, no framing, no sniffing.
fn page(status: u16, markup: maud::Markup) -> Reply {
    Reply {
        status,
        content_type: HTML,
        body: markup.into_string(),
        headers: Vec::new(),
    }
    .with_header(
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    )
    .with_header("x-frame-options", "DENY")
    .with_header("x-content-type-options", "nosniff")
    .with_header("referrer-policy", "same-origin")
}

fn redirect(to: &str) -> Reply {
    Reply {
        status: 303,
        content_type: HTML,
        body: String::new(),
        headers: Vec::new(),
    }
    .with_header("location", to.to_owned())
}

fn now() -> i64 {
    crate::clock::unix_now()
}

impl Console {
    /// Answers a request under `/ui`.
    pub async fn answer(&self, req: &Incoming) -> Reply {
        let path = req.path.trim_end_matches('/');
        match (req.method.as_str(), path) {
            ("GET", "/ui/static/style.css") => Reply {
                status: 200,
                content_type: "text/css; charset=utf-8",
                body: STYLE.to_owned(),
                headers: Vec::new(),
            },
            ("GET", "/ui/login") => self.login_page(None),
            ("POST", "/ui/login") => self.sign_in(req).await,
            (method, _) => {
                let Some(signed) = self.signed(req).await else {
                    return match method {
                        "GET" => redirect("/ui/login"),
                        _ => page(
                            403,
                            pages::message(None, "Signed out", "Sign in again, then retry."),
                        ),
                    };
                };
                // Every post carries the session's CSRF token.
                if method == "POST" {
                    let f = form(&req.body);
                    let ok = f.get("csrf").is_some_and(|c| {
                        openssl::memcmp::eq(c.as_bytes(), signed.csrf().as_bytes())
                    });
                    if !ok {
                        return page(
                            403,
                            pages::message(None, "Refused", "This form is stale; reload the page."),
                        );
                    }
                }
                match (method, path) {
                    ("GET", "/ui") => self.repositories(req, &signed).await,
                    ("GET", "/ui/repo") => self.repository(req, &signed, None).await,
                    ("GET", "/ui/manifest") => self.manifest(req, &signed).await,
                    ("POST", "/ui/delete-tag") => self.delete_tag(req, &signed).await,
                    ("POST", "/ui/logout") => self.sign_out(&signed).await,
                    _ => not_found(&signed),
                }
            }
        }
    }

    fn login_page(&self, error: Option<&str>) -> Reply {
        let csrf = crate::random::random_token(16);
        page(
            if error.is_some() { 401 } else { 200 },
            pages::login(&csrf, error, self.sso),
        )
        .with_header(
            "set-cookie",
            format!(
                "{LOGIN_COOKIE}={csrf}; Path=/ui; Secure; HttpOnly; SameSite=Strict; Max-Age=600"
            ),
        )
    }

    async fn sign_in(&self, req: &Incoming) -> Reply {
        let f = form(&req.body);
        let expected = cookie(req.cookies.as_deref(), LOGIN_COOKIE);
        let sent = f.get("csrf").map(String::as_str);
        if expected.is_none()
            || sent.is_none()
            || !openssl::memcmp::eq(
                expected.unwrap_or_default().as_bytes(),
                sent.unwrap_or_default().as_bytes(),
            )
            || expected.is_some_and(str::is_empty)
        {
            return self.login_page(Some("The sign-in form expired; try again."));
        }
        let (user, password) = (
            f.get("username").map(String::as_str).unwrap_or(""),
            f.get("password").map(String::as_str).unwrap_or(""),
        );
        let identity = match self
            .tokens
            .login(user, password, req.source.as_deref())
            .await
        {
            Ok(id) => id,
            Err(reply) if reply.status == 429 || reply.status == 503 => {
                return self.login_page(Some(
                    "Signing in is not possible right now; try again later.",
                ));
            }
            Err(_) => return self.login_page(Some("Wrong user name or password.")),
        };
        let session = Session::new(&identity, "console", "web console", now());
        let token = match self.tokens.open_session(&session).await {
            Ok(t) => t,
            Err(_) => {
                return self.login_page(Some(
                    "Signing in is not possible right now; try again later.",
                ));
            }
        };
        let max_age = self.tokens.sessions.idle_seconds();
        redirect("/ui/")
            .with_header(
                "set-cookie",
                format!("{COOKIE}={token}; Path=/ui; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"),
            )
            .with_header(
                "set-cookie",
                format!("{LOGIN_COOKIE}=; Path=/ui; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
            )
    }

    async fn sign_out(&self, signed: &Signed) -> Reply {
        let _ = self.tokens.sessions.revoke(&signed.token).await;
        crate::audit::record(
            "console-sign-out",
            "success",
            serde_json::json!({"user.name": signed.session.subject}),
        );
        redirect("/ui/login").with_header(
            "set-cookie",
            format!("{COOKIE}=; Path=/ui; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
        )
    }

    /// The session of the request's cookie, if it is one that is still open.
    async fn signed(&self, req: &Incoming) -> Option<Signed> {
        let token = cookie(req.cookies.as_deref(), COOKIE)?;
        if token.is_empty() || token.len() > 256 {
            return None;
        }
        let redeemed = self.tokens.sessions.redeem(token, now()).await.ok()??;
        let _ = self.tokens.sessions.update(&redeemed, now()).await;
        Some(Signed {
            session: redeemed.session,
            token: token.to_owned(),
        })
    }

    fn may(&self, signed: &Signed, action: Action, repo: &str) -> bool {
        self.tokens
            .policy
            .current()
            .authorize(&signed.subject(), action, repo, now())
            .allowed
    }

    async fn repositories(&self, req: &Incoming, signed: &Signed) -> Reply {
        let q = query(req.query.as_deref());
        let prefix = q.get("q").map(String::as_str).unwrap_or("").trim();
        // Names that start with the prefix all sort after it without its last character.
        let mut last: Option<String> = match q.get("last") {
            Some(l) => Some(l.clone()),
            None if !prefix.is_empty() => {
                let mut p = prefix.to_owned();
                p.pop();
                (!p.is_empty()).then_some(p)
            }
            None => None,
        };
        let mut shown = Vec::new();
        let mut scanned = 0;
        let mut next = None;
        'pages: loop {
            let (names, more) = match self.data.catalog(1000, last.as_deref()).await {
                Ok(p) => p,
                Err(e) => return unavailable(signed, e),
            };
            for n in names {
                scanned += 1;
                last = Some(n.clone());
                if !n.starts_with(prefix) {
                    if n.as_str() > prefix {
                        break 'pages;
                    }
                    continue;
                }
                if self.may(signed, Action::Pull, &n) {
                    shown.push(n);
                    if shown.len() == PAGE {
                        next = last.clone();
                        break 'pages;
                    }
                }
                if scanned >= SCAN {
                    next = last.clone();
                    break 'pages;
                }
            }
            if !more {
                break;
            }
        }
        let csrf = signed.csrf();
        let (name, csrf) = signed.who(&csrf);
        let who = Who {
            name: &name,
            csrf: &csrf,
        };
        page(
            200,
            pages::repositories(&who, prefix, &shown, next.as_deref()),
        )
    }

    async fn repository(&self, req: &Incoming, signed: &Signed, notice: Option<&str>) -> Reply {
        let q = query(req.query.as_deref());
        let repo = q.get("name").map(String::as_str).unwrap_or("");
        if oci::RepositoryName::parse(repo).is_err() || !self.may(signed, Action::Pull, repo) {
            return not_found(signed);
        }
        let last = q.get("last").map(String::as_str);
        let (tags, more) = match self.data.tags(repo, PAGE, last).await {
            Ok(t) => t,
            Err(e) => return unavailable(signed, e),
        };
        let policy = self.tokens.policy.current();
        let mut rows = Vec::new();
        for t in &tags {
            let m = match self.data.manifest(repo, t).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return unavailable(signed, e),
            };
            rows.push(TagRow {
                tag: t.clone(),
                digest: m.digest.to_string(),
                media_type: m.media_type.clone(),
                size: m.body.len(),
                immutable: policy.immutable(repo, t).map(|by| {
                    format!("immutable by the rule at line {} ({})", by.line, by.pattern)
                }),
            });
        }
        let may_delete = self.may(signed, Action::Delete, repo);
        let csrf = signed.csrf();
        let (name, csrf) = signed.who(&csrf);
        let who = Who {
            name: &name,
            csrf: &csrf,
        };
        let next = more.then(|| tags.last().cloned()).flatten();
        page(
            200,
            pages::repository(
                &who,
                &req.host,
                repo,
                &rows,
                next.as_deref(),
                may_delete,
                notice,
            ),
        )
    }

    async fn manifest(&self, req: &Incoming, signed: &Signed) -> Reply {
        let q = query(req.query.as_deref());
        let repo = q.get("name").map(String::as_str).unwrap_or("");
        let reference = q.get("ref").map(String::as_str).unwrap_or("");
        if oci::RepositoryName::parse(repo).is_err()
            || oci::Reference::parse(reference).is_err()
            || !self.may(signed, Action::Pull, repo)
        {
            return not_found(signed);
        }
        let m = match self.data.manifest(repo, reference).await {
            Ok(Some(m)) => m,
            Ok(None) => return not_found(signed),
            Err(e) => return unavailable(signed, e),
        };
        let referrers = self
            .data
            .referrers(repo, &m.digest)
            .await
            .unwrap_or_default();
        let csrf = signed.csrf();
        let (name, csrf) = signed.who(&csrf);
        let who = Who {
            name: &name,
            csrf: &csrf,
        };
        page(
            200,
            pages::manifest(&who, &req.host, repo, reference, &m, &referrers),
        )
    }

    async fn delete_tag(&self, req: &Incoming, signed: &Signed) -> Reply {
        let f = form(&req.body);
        let repo = f.get("name").map(String::as_str).unwrap_or("");
        let tag = f.get("tag").map(String::as_str).unwrap_or("");
        if oci::RepositoryName::parse(repo).is_err()
            || oci::Tag::parse(tag).is_err()
            || !self.may(signed, Action::Pull, repo)
        {
            return not_found(signed);
        }
        let fields = serde_json::json!({
            "user.name": signed.session.subject,
            "repository": repo,
            "tag": tag,
            "via": "console",
        });
        let back = Incoming {
            method: "GET".into(),
            path: "/ui/repo".into(),
            query: Some(format!(
                "name={}",
                form_urlencoded::byte_serialize(repo.as_bytes()).collect::<String>()
            )),
            host: req.host.clone(),
            ..Default::default()
        };
        if !self.may(signed, Action::Delete, repo) {
            let mut e = fields.clone();
            e["event.reason"] = "policy does not allow delete".into();
            crate::audit::record("tag-delete", "failure", e);
            let r = self
                .repository(
                    &back,
                    signed,
                    Some(&format!("You may not delete tags in {repo}.")),
                )
                .await;
            return Reply { status: 403, ..r };
        }
        if let Some(by) = self.tokens.policy.current().immutable(repo, tag) {
            let why = format!(
                "Tag {tag} is immutable (policy rule at line {}: {}): it cannot be deleted.",
                by.line, by.pattern
            );
            let mut e = fields.clone();
            e["event.reason"] = format!("tag {tag} is immutable").into();
            crate::audit::record("tag-delete", "failure", e);
            let r = self.repository(&back, signed, Some(&why)).await;
            return Reply { status: 403, ..r };
        }
        if crate::audit::refusing_writes() {
            let r = self
                .repository(
                    &back,
                    signed,
                    Some("The audit trail cannot be delivered; changes are refused until it recovers."),
                )
                .await;
            return Reply { status: 503, ..r };
        }
        match self.data.delete_tag(repo, tag).await {
            Ok(_) => {
                crate::audit::record("tag-delete", "success", fields);
                self.repository(&back, signed, Some(&format!("Tag {tag} deleted.")))
                    .await
            }
            Err(e) => unavailable(signed, e),
        }
    }
}

fn who_of(signed: &Signed) -> (String, String) {
    (signed.session.subject.clone(), signed.csrf())
}

fn not_found(signed: &Signed) -> Reply {
    let (name, csrf) = who_of(signed);
    page(
        404,
        pages::message(
            Some(&Who {
                name: &name,
                csrf: &csrf,
            }),
            "Not found",
            "There is no such repository or manifest, or you may not see it.",
        ),
    )
}

fn unavailable(signed: &Signed, e: anyhow::Error) -> Reply {
    tracing::warn!(error = %e, "console: storage failed");
    let (name, csrf) = who_of(signed);
    page(
        503,
        pages::message(
            Some(&Who {
                name: &name,
                csrf: &csrf,
            }),
            "Unavailable",
            "Storage is unavailable; try again.",
        ),
    )
}
