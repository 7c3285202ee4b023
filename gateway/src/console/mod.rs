//! The web console at `/ui/`: what people see of their registry in a browser.
//!
//! - Sign-in with a person's password goes through the token service's own login (the same
//!   authenticators, lockouts, rate limits and failure audit as `docker login`) and opens an
//!   ordinary session (`source: console`, listed and revoked at `/auth/sessions` like any
//!   other); its refresh token is the cookie (`__Host-`, `Secure`, `HttpOnly`,
//!   `SameSite=Strict`), redeemed on every request, so a revoked or expired session signs the
//!   browser out at once. Robots, CI tokens and registry refresh tokens cannot sign in: a
//!   session would outlive what they were given for.
//! - Every page and action is decided by the policy in force for the session's identity,
//!   as the registry decides: a repository the person may not pull is not listed and its
//!   pages answer as if it did not exist; delete buttons only where policy allows a delete,
//!   and a delete of an immutable tag is refused with the rule that holds it.
//! - Every state change is a form post carrying the session's CSRF token (derived from the
//!   session token), answered with a redirect (a reload does not post again); pages carry a
//!   strict `Content-Security-Policy` (no script at all), deny framing, and escape everything
//!   they show ([`pages`]). `proxy::send` adds `Cache-Control: no-store` to every answer.
//!
//! - Single sign-on (`/ui/sso`) is the gateway's OIDC flow marked as a console sign-in: its
//!   callback opens a `console-sso` session whose groups are read again from the IdP.
//! - Administration (registry administrators signed in within 12 h): robots, the audit trail
//!   search, the policy in force with its answer to "may X do Y on Z", the storage nodes.
//!
//! Rooms: [`pages`] (templates), [`trail`] (what it reads of the audit trail file: searches,
//! who pushed a tag); what it reads from storage is [`crate::registry::data`].

pub mod pages;
pub mod trail;

use crate::incoming::{Incoming, cookie};
use crate::registry::data::{self, Data};
use crate::reply::Reply;
use crate::token::TokenService;
use crate::token::refresh::Session;
use pages::{TagRow, Who};
use policy::Action;
use std::collections::HashMap;
use std::sync::Arc;

/// The session cookie (`__Host-`: set by this host only, on `/`, over TLS; a sibling
/// subdomain cannot plant one).
const COOKIE: &str = "__Host-portcullis_ui";
/// The sign-in form's CSRF cookie (before there is a session).
const LOGIN_COOKIE: &str = "__Host-portcullis_ui_login";
/// The device name of console sessions (as `/auth/sessions` and the account page list them).
pub const DEVICE: &str = "web console";
/// Repositories per page, tags per page.
const PAGE: usize = 50;
/// How recent a sign-in must be for the administration pages (seconds).
const ADMIN_FRESH: i64 = 12 * 3600;
/// Catalog names looked at for one page of repositories a person may see, at most.
const SCAN: usize = 5_000;
const STYLE: &str = include_str!("style.css");

/// What a request under `/ui` asks for, parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Style,
    LoginForm,
    SignIn,
    Sso,
    Repositories,
    Repository,
    Manifest,
    DeleteTag,
    DeleteManifest,
    Account,
    RevokeSession,
    Robots,
    CreateRobot,
    RotateRobot,
    DisableRobot,
    DeleteRobot,
    Audit,
    Policy,
    Storage,
    Events,
    ReplayEvent,
    SignOut,
    Unknown,
}

impl Page {
    fn parse(method: &str, path: &str) -> Page {
        match (method, path.trim_end_matches('/')) {
            ("GET", "/ui/static/style.css") => Page::Style,
            ("GET", "/ui/login") => Page::LoginForm,
            ("POST", "/ui/login") => Page::SignIn,
            ("GET", "/ui/sso") => Page::Sso,
            ("GET", "/ui") => Page::Repositories,
            ("GET", "/ui/repo") => Page::Repository,
            ("GET", "/ui/manifest") => Page::Manifest,
            ("POST", "/ui/delete-tag") => Page::DeleteTag,
            ("POST", "/ui/delete-manifest") => Page::DeleteManifest,
            ("GET", "/ui/account") => Page::Account,
            ("POST", "/ui/revoke-session") => Page::RevokeSession,
            ("GET", "/ui/admin/robots") => Page::Robots,
            ("POST", "/ui/admin/robots/create") => Page::CreateRobot,
            ("POST", "/ui/admin/robots/rotate") => Page::RotateRobot,
            ("POST", "/ui/admin/robots/delete") => Page::DeleteRobot,
            ("POST", "/ui/admin/robots/disable") => Page::DisableRobot,
            ("GET", "/ui/admin/audit") => Page::Audit,
            ("GET", "/ui/admin/policy") => Page::Policy,
            ("GET", "/ui/admin/storage") => Page::Storage,
            ("GET", "/ui/admin/events") => Page::Events,
            ("POST", "/ui/admin/events/replay") => Page::ReplayEvent,
            ("POST", "/ui/logout") => Page::SignOut,
            _ => Page::Unknown,
        }
    }
}

pub struct Console {
    tokens: Arc<TokenService>,
    data: Data,
    /// Single sign-on, when configured (the sign-in page offers it).
    oidc: Option<Arc<crate::auth::oidc::Oidc>>,
    /// Seals the repository list's "More" cursors (one may name a repository the person may
    /// not see): derived from the internal secret, so any gateway of a deployment opens
    /// another's.
    cursor_key: zeroize::Zeroizing<[u8; 32]>,
    /// The gateway's audit trail file (administrators search it), if it writes one.
    audit_file: Option<std::path::PathBuf>,
    /// Reads of the trail file at once, at most (each reads up to [`trail::WINDOW`]).
    trail_reads: Arc<tokio::sync::Semaphore>,
    /// Registry events (with `[[webhooks]]`): the console's deletes make them too.
    events: Option<Arc<crate::events::delivery::Events>>,
}

/// A signed-in request.
struct Signed {
    session: Session,
    token: String,
    csrf: String,
    /// A registry administrator (sees the administration pages).
    admin: bool,
}

impl Signed {
    fn subject(&self) -> policy::Subject {
        policy::Subject {
            name: self.session.subject.clone(),
            kind: crate::token::jwt::kind_from_name(&self.session.kind),
            groups: self.session.groups.clone(),
        }
    }

    fn who(&self) -> Who<'_> {
        Who {
            name: &self.session.subject,
            csrf: &self.csrf,
            admin: self.admin,
        }
    }
}

/// The CSRF token of a session: derived from its (secret) token, so nothing more is stored
/// and another session's forms do not fit.
fn csrf_of(token: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(format!("portcullis-ui-csrf:{token}").as_bytes())[..16])
}

/// A session's public id (as `/auth/sessions` lists it).
fn session_id(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))[..crate::token::refresh::ID_LEN].to_owned()
}

/// Equal secrets, compared in constant time (lengths first: `memcmp::eq` wants equal ones).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a.as_bytes(), b.as_bytes())
}

/// A form body or a query string.
fn pairs(s: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(s).into_owned().collect()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A page with the console's headers: no script, no framing, no sniffing.
fn page(status: u16, markup: maud::Markup) -> Reply {
    Reply::html(status, markup.into_string())
        .with_header(
            "content-security-policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        )
        .with_header("x-frame-options", "DENY")
        .with_header("x-content-type-options", "nosniff")
        .with_header("referrer-policy", "same-origin")
}

fn redirect(to: &str) -> Reply {
    Reply::html(303, String::new()).with_header("location", to.to_owned())
}

fn set_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

fn now() -> i64 {
    crate::clock::unix_now()
}

/// What a tag delete came to; the repository page says it (a closed set: nothing the
/// client wrote is shown as the notice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Deleted,
    Immutable,
    Missing,
    Denied,
    Refused,
}

impl Done {
    fn code(self) -> &'static str {
        match self {
            Done::Deleted => "deleted",
            Done::Immutable => "immutable",
            Done::Missing => "missing",
            Done::Denied => "denied",
            Done::Refused => "refused",
        }
    }

    fn parse(s: &str) -> Option<Done> {
        [
            Done::Deleted,
            Done::Immutable,
            Done::Missing,
            Done::Denied,
            Done::Refused,
        ]
        .into_iter()
        .find(|d| d.code() == s)
    }
}

impl Console {
    pub fn new(
        tokens: Arc<TokenService>,
        data: Data,
        oidc: Option<Arc<crate::auth::oidc::Oidc>>,
        secret: &str,
        audit_file: Option<std::path::PathBuf>,
        events: Option<Arc<crate::events::delivery::Events>>,
    ) -> Self {
        use sha2::Digest;
        let key: [u8; 32] =
            sha2::Sha256::digest(format!("portcullis-console-cursor:{secret}").as_bytes()).into();
        Console {
            tokens,
            data,
            oidc,
            cursor_key: zeroize::Zeroizing::new(key),
            audit_file,
            trail_reads: Arc::new(tokio::sync::Semaphore::new(2)),
            events,
        }
    }

    /// Answers a request under `/ui`.
    pub async fn answer(&self, req: &Incoming) -> Reply {
        let which = Page::parse(&req.method, &req.path);
        match which {
            Page::Style => {
                return Reply {
                    status: 200,
                    content_type: "text/css; charset=utf-8",
                    body: STYLE.to_owned(),
                    headers: Vec::new(),
                };
            }
            Page::LoginForm => return self.login_page(None),
            Page::SignIn => return self.sign_in(req).await,
            Page::Sso => return self.start_sso(&req.host).await,
            _ => {}
        }
        let Some(signed) = self.signed(req).await else {
            return match req.method.as_str() {
                "GET" => redirect("/ui/login"),
                _ => page(
                    403,
                    pages::message(None, "Signed out", "Sign in again, then retry."),
                ),
            };
        };
        let form = pairs(&req.body);
        // Every post carries the session's CSRF token.
        if req.method == "POST" && !form.get("csrf").is_some_and(|c| same(c, &signed.csrf)) {
            return page(
                403,
                pages::message(
                    Some(&signed.who()),
                    "Refused",
                    "This form is stale; reload the page.",
                ),
            );
        }
        let query = pairs(req.query.as_deref().unwrap_or("").as_bytes());
        match which {
            Page::Repositories => self.repositories(&query, &signed).await,
            Page::Repository => self.repository(&query, &req.host, &signed).await,
            Page::Manifest => self.manifest(&query, &req.host, &signed).await,
            Page::DeleteTag => self.delete_tag(&form, &signed).await,
            Page::DeleteManifest => self.delete_manifest(&form, &signed).await,
            Page::Account => self.account(&query, &req.host, &signed).await,
            Page::RevokeSession => self.revoke_session(&form, &signed).await,
            Page::Robots
            | Page::CreateRobot
            | Page::RotateRobot
            | Page::DisableRobot
            | Page::DeleteRobot => self.robots(which, &query, &form, &signed).await,
            Page::Audit => self.audit(&query, &signed).await,
            Page::Policy => self.policy(&query, &signed).await,
            Page::Storage => self.storage(&signed).await,
            Page::Events | Page::ReplayEvent => self.events(which, &query, &form, &signed).await,
            Page::SignOut => self.sign_out(&signed).await,
            _ => not_found(&signed),
        }
    }

    fn login_page(&self, error: Option<&str>) -> Reply {
        let csrf = crate::random::random_token(16);
        page(
            if error.is_some() { 401 } else { 200 },
            pages::login(&csrf, error, self.oidc.is_some()),
        )
        .with_header("set-cookie", set_cookie(LOGIN_COOKIE, &csrf, 600))
    }

    async fn sign_in(&self, req: &Incoming) -> Reply {
        const WRONG: &str = "Wrong user name or password.";
        const LATER: &str = "Signing in is not possible right now; try again later.";
        let f = pairs(&req.body);
        let expected = cookie(req.cookies.as_deref(), LOGIN_COOKIE).unwrap_or("");
        let sent = f.get("csrf").map(String::as_str).unwrap_or("");
        if expected.is_empty() || !same(expected, sent) {
            return self.login_page(Some("The sign-in form expired; try again."));
        }
        let user = f.get("username").map(String::as_str).unwrap_or("");
        let password = f.get("password").map(String::as_str).unwrap_or("");
        let refused = |why: &str| {
            crate::audit::record(
                "console-sign-in",
                "failure",
                serde_json::json!({"user.name": user, "event.reason": why}),
            );
        };
        // A person's password only: a robot's secret, a CI token or a registry refresh token
        // would become a session outliving what it was given for.
        if user == crate::token::IDENTITY_TOKEN_USER || user.starts_with("robot$") {
            refused("not a person's password");
            return self.login_page(Some(WRONG));
        }
        if self
            .tokens
            .limits
            .over_rate(
                crate::limits::Endpoint::Token,
                req.source.as_deref(),
                Some(user),
            )
            .await
            .is_some()
        {
            refused("rate limited");
            return self.login_page(Some(LATER));
        }
        let identity = match self
            .tokens
            .login(user, password, req.source.as_deref())
            .await
        {
            Ok(id) if id.kind == policy::SubjectKind::User && id.machine.is_none() => id,
            Ok(_) => {
                refused("not a person's password");
                return self.login_page(Some(WRONG));
            }
            Err(reply) if reply.status == 429 || reply.status == 503 => {
                return self.login_page(Some(LATER));
            }
            Err(_) => return self.login_page(Some(WRONG)),
        };
        let session = Session::new(&identity, "console", DEVICE, now());
        let Ok(token) = self.tokens.open_session(&session).await else {
            refused("the session store is unavailable");
            return self.login_page(Some(LATER));
        };
        crate::audit::record(
            "console-sign-in",
            "success",
            serde_json::json!({
                "user.name": identity.subject,
                "user.roles": identity.groups,
                "session.id": session_id(&token),
            }),
        );
        // The session ends itself (idle or absolute lifetime): the cookie may outlive it.
        let max_age = self.tokens.sessions.absolute_seconds();
        redirect("/ui/")
            .with_header("set-cookie", set_cookie(COOKIE, &token, max_age))
            .with_header("set-cookie", set_cookie(LOGIN_COOKIE, "", 0))
    }

    /// `GET /ui/sso`: off to the IdP; its callback (`/auth/oidc/callback`) comes back to
    /// [`Console::sso_signed_in`].
    async fn start_sso(&self, host: &str) -> Reply {
        let Some(oidc) = &self.oidc else {
            return self.login_page(Some("Single sign-on is not configured on this registry."));
        };
        match oidc.start_console(host).await {
            Ok((location, cookie)) => crate::auth::oidc::login_redirect(location, cookie),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "starting a console SSO sign-in failed");
                self.login_page(Some(
                    "The identity provider is unavailable; try again later.",
                ))
            }
        }
    }

    /// A single sign-on into the console finished at the IdP (the callback checked the
    /// flow's browser binding): a console session, which reads its groups again from the IdP
    /// as a `docker login`'s does.
    pub async fn sso_signed_in(&self, signed_in: crate::auth::oidc::SignedIn) -> Reply {
        let identity = signed_in.identity.clone();
        let session = Session::from_sso(signed_in, "console-sso", DEVICE, now());
        let Ok(token) = self.tokens.open_session(&session).await else {
            crate::audit::record(
                "console-sign-in",
                "failure",
                serde_json::json!({"user.name": identity.subject, "via": "sso",
                                   "event.reason": "the session store is unavailable"}),
            );
            return self.login_page(Some(
                "Signing in is not possible right now; try again later.",
            ));
        };
        crate::audit::record(
            "console-sign-in",
            "success",
            serde_json::json!({
                "user.name": identity.subject,
                "user.roles": identity.groups,
                "session.id": session_id(&token),
                "via": "sso",
            }),
        );
        // This answers a navigation from the IdP's site, where a browser sends no
        // `SameSite=Strict` cookie, nor on a redirect that continues it: a page of ours moves
        // on, a navigation this site starts.
        let max_age = self.tokens.sessions.absolute_seconds();
        page(200, pages::continue_to("/ui/", "Signed in", "Signed in."))
            .with_header("set-cookie", set_cookie(COOKIE, &token, max_age))
    }

    async fn sign_out(&self, signed: &Signed) -> Reply {
        let mut fields = serde_json::json!({
            "user.name": signed.session.subject,
            "session.id": session_id(&signed.token),
        });
        // A session the store could not end is not called ended.
        if let Err(e) = self.tokens.sessions.revoke(&signed.token).await {
            fields["event.reason"] = e.to_string().into();
            crate::audit::record("console-sign-out", "failure", fields);
            return page(
                503,
                pages::message(
                    Some(&signed.who()),
                    "Not signed out",
                    "The session store is unavailable; try again.",
                ),
            );
        }
        crate::audit::record("console-sign-out", "success", fields);
        redirect("/ui/login").with_header("set-cookie", set_cookie(COOKIE, "", 0))
    }

    /// The session of the request's cookie, if it is one that is still open.
    async fn signed(&self, req: &Incoming) -> Option<Signed> {
        let token = cookie(req.cookies.as_deref(), COOKIE)?;
        if token.is_empty() || token.len() > 256 {
            return None;
        }
        // The token service's redeem: a single sign-on's groups are read again from the IdP.
        let session = self.tokens.redeem_session(token).await.ok()??;
        let mut signed = Signed {
            session,
            token: token.to_owned(),
            csrf: csrf_of(token),
            admin: false,
        };
        // A password sign-in's groups are those it was given (a single sign-on's are read
        // again from the IdP): administration wants a recent sign-in, so someone taken out of
        // the admin groups keeps no console powers for the session's lifetime.
        signed.admin = now() - signed.session.created_at <= ADMIN_FRESH
            && self.tokens.policy.current().is_admin(&signed.subject());
        Some(signed)
    }

    fn may(&self, signed: &Signed, action: Action, repo: &str) -> bool {
        self.tokens
            .policy
            .current()
            .authorize(&signed.subject(), action, repo, now())
            .allowed
    }

    /// `name`, encrypted and authenticated (AES-256-GCM), base64url.
    fn seal(&self, name: &str) -> Option<String> {
        use base64::Engine;
        let mut nonce = [0u8; 12];
        openssl::rand::rand_bytes(&mut nonce).ok()?;
        let mut tag = [0u8; 16];
        let ct = openssl::symm::encrypt_aead(
            openssl::symm::Cipher::aes_256_gcm(),
            &self.cursor_key[..],
            Some(&nonce),
            b"portcullis-console-cursor",
            name.as_bytes(),
            &mut tag,
        )
        .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
    }

    /// What [`Console::seal`] sealed; `None` for anything else.
    fn open(&self, sealed: &str) -> Option<String> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .ok()?;
        if raw.len() < 28 || raw.len() > 1024 {
            return None;
        }
        let (nonce, rest) = raw.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let plain = openssl::symm::decrypt_aead(
            openssl::symm::Cipher::aes_256_gcm(),
            &self.cursor_key[..],
            Some(nonce),
            b"portcullis-console-cursor",
            ct,
            tag,
        )
        .ok()?;
        String::from_utf8(plain).ok()
    }

    async fn repositories(&self, q: &HashMap<String, String>, signed: &Signed) -> Reply {
        let prefix = q.get("q").map(String::as_str).unwrap_or("").trim();
        // Names that start with the prefix all sort after it without its last character.
        let floor = prefix
            .char_indices()
            .last()
            .map_or("", |(i, _)| &prefix[..i])
            .to_owned();
        let searchable = prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        let mut last: Option<String> = match q.get("last") {
            // The cursor of a "More" link: sealed, so it names nothing the person may not see.
            Some(c) => match self.open(c) {
                Some(name) => Some(name.max(floor.clone())),
                None => {
                    return page(
                        400,
                        pages::message(
                            Some(&signed.who()),
                            "Stale link",
                            "This link expired; search again.",
                        ),
                    );
                }
            },
            None => (!floor.is_empty()).then_some(floor),
        };
        let mut shown = Vec::new();
        let mut scanned = 0;
        let mut next = None;
        'pages: loop {
            if !searchable {
                break;
            }
            let (names, more) = match self.data.catalog(1000, last.as_deref()).await {
                Ok(p) => p,
                Err(e) => return unavailable(signed, e),
            };
            let count = names.len();
            for (i, n) in names.into_iter().enumerate() {
                scanned += 1;
                last = Some(n.clone());
                if n.starts_with(prefix) {
                    if self.may(signed, Action::Pull, &n) {
                        shown.push(n);
                    }
                } else if n.as_str() > prefix {
                    // Past the prefix (in byte order; storage's order differs only around
                    // `/`, which costs a longer scan, never a name).
                    break 'pages;
                }
                let at_end = !more && i + 1 == count;
                if (shown.len() == PAGE || scanned >= SCAN) && !at_end {
                    next = last.as_deref().and_then(|l| self.seal(l));
                    break 'pages;
                }
            }
            if !more {
                break;
            }
        }
        page(
            200,
            pages::repositories(&signed.who(), prefix, &shown, next.as_deref()),
        )
    }

    async fn repository(&self, q: &HashMap<String, String>, host: &str, signed: &Signed) -> Reply {
        let repo = q.get("name").map(String::as_str).unwrap_or("");
        if oci::RepositoryName::parse(repo).is_err() || !self.may(signed, Action::Pull, repo) {
            return not_found(signed);
        }
        let last = q
            .get("last")
            .map(String::as_str)
            .filter(|l| oci::Tag::parse(l).is_ok());
        let (tags, more) = match self.data.tags(repo, PAGE, last).await {
            Ok(Some(t)) => t,
            // No such repository: as for one the person may not see.
            Ok(None) => return not_found(signed),
            Err(e) => return unavailable(signed, e),
        };
        let policy = self.tokens.policy.current();
        let mut rows = Vec::new();
        // Each tag's manifest (what it is, its platforms or size), eight at a time.
        let mut fetched = Vec::with_capacity(tags.len());
        for some in tags.chunks(8) {
            let got =
                futures_util::future::join_all(some.iter().map(|t| self.data.manifest(repo, t)))
                    .await;
            fetched.extend(got);
        }
        for (t, m) in tags.iter().zip(fetched) {
            let m = match m {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return unavailable(signed, e),
            };
            rows.push(TagRow {
                tag: t.clone(),
                digest: m.digest.to_string(),
                contents: pages::contents(&m.body),
                media_type: m.media_type,
                size: m.body.len(),
                immutable: policy.immutable(repo, t).map(|by| {
                    format!("immutable by the rule at line {} ({})", by.line, by.pattern)
                }),
                pushed: None,
            });
        }
        // Who pushed them, and when, from this gateway's trail (none, or the trail busy with
        // other readers: left blank).
        if let (Some(file), Ok(permit)) = (
            self.audit_file.clone(),
            self.trail_reads.clone().try_acquire_owned(),
        ) {
            let name = repo.to_owned();
            let listed: Vec<(String, String)> = rows
                .iter()
                .map(|r| (r.tag.clone(), r.digest.clone()))
                .collect();
            let found = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                trail::pushed(&file, &name, &listed)
            })
            .await;
            match found {
                Ok(Ok(mut found)) => {
                    for row in &mut rows {
                        row.pushed = found.remove(&row.tag);
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "console: the audit trail cannot be read")
                }
                Err(e) => tracing::debug!(error = %e, "console: the audit trail read failed"),
            }
        }
        let done = q.get("done").and_then(|d| Done::parse(d));
        let tag = q.get("tag").filter(|t| oci::Tag::parse(t).is_ok());
        let digest = q.get("digest").filter(|d| oci::Digest::parse(d).is_ok());
        let notice = done.and_then(|done| {
            let refused =
                "The audit trail cannot be delivered; changes are refused until it recovers.";
            Some(match (done, tag, digest) {
                (Done::Denied, _, _) => format!("You may not delete in {repo}."),
                (Done::Refused, _, _) => refused.to_owned(),
                (Done::Deleted, Some(tag), _) => format!("Tag {tag} deleted."),
                (Done::Missing, Some(tag), _) => format!("There is no tag {tag}."),
                (Done::Immutable, Some(tag), _) => match policy.immutable(repo, tag) {
                    Some(by) => format!(
                        "Tag {tag} is immutable (policy rule at line {}: {}): it cannot be deleted.",
                        by.line, by.pattern
                    ),
                    None => format!("Tag {tag} is immutable: it cannot be deleted."),
                },
                (Done::Deleted, None, Some(d)) => format!("Manifest {d} deleted."),
                (Done::Missing, None, Some(d)) => format!("There is no manifest {d}."),
                (Done::Immutable, None, Some(d)) => format!(
                    "Manifest {d} is what an immutable tag points at: it cannot be deleted."
                ),
                _ => return None,
            })
        });
        let may_delete = self.may(signed, Action::Delete, repo);
        let next = more.then(|| tags.last().cloned()).flatten();
        page(
            200,
            pages::repository(
                &signed.who(),
                host,
                repo,
                &rows,
                next.as_deref(),
                may_delete,
                notice.as_deref(),
            ),
        )
    }

    async fn manifest(&self, q: &HashMap<String, String>, host: &str, signed: &Signed) -> Reply {
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
        let referrers = match self.data.referrers(repo, &m.digest).await {
            Ok(r) => r,
            Err(e) => return unavailable(signed, e),
        };
        page(
            200,
            pages::manifest(
                &signed.who(),
                host,
                repo,
                reference,
                &m,
                &referrers,
                self.may(signed, Action::Delete, repo),
            ),
        )
    }

    /// The person's sessions and devices, and how to log in with docker.
    async fn account(&self, q: &HashMap<String, String>, host: &str, signed: &Signed) -> Reply {
        let mut sessions = match self
            .tokens
            .sessions
            .list(Some(&signed.session.subject))
            .await
        {
            Ok(s) => s,
            Err(e) => return unavailable(signed, anyhow::anyhow!("{e}")),
        };
        // Newest first; this browser's own marked.
        sessions.reverse();
        let current = session_id(&signed.token);
        let notice = match q.get("done").map(String::as_str) {
            Some("revoked") => Some("Session revoked: its device must sign in again."),
            Some("missing") => Some("There is no such session of yours."),
            _ => None,
        };
        page(
            200,
            pages::account(&signed.who(), host, &sessions, &current, notice),
        )
    }

    /// Revokes one of the person's own sessions (any device's, this one's too).
    async fn revoke_session(&self, f: &HashMap<String, String>, signed: &Signed) -> Reply {
        let id = f.get("id").map(String::as_str).unwrap_or("");
        let owner = signed.session.subject.as_str();
        let revoked = match self.tokens.sessions.revoke_id(id, Some(owner)).await {
            Ok(r) => r,
            Err(e) => return unavailable(signed, anyhow::anyhow!("{e}")),
        };
        let mut fields = serde_json::json!({
            "user.name": owner,
            "session": id.chars().take(crate::token::refresh::ID_LEN).collect::<String>(),
            "admin": false,
            "via": "console",
        });
        if !revoked {
            fields["event.reason"] = "no such session of the user's".into();
        }
        crate::audit::record(
            "session-revoke",
            if revoked { "success" } else { "failure" },
            fields,
        );
        if revoked && id == session_id(&signed.token) {
            return redirect("/ui/login").with_header("set-cookie", set_cookie(COOKIE, "", 0));
        }
        redirect(if revoked {
            "/ui/account?done=revoked"
        } else {
            "/ui/account?done=missing"
        })
    }

    /// The audit trail searched by user, repository, action and time, for registry
    /// administrators only (anyone else: as if there were no such page).
    async fn audit(&self, q: &HashMap<String, String>, signed: &Signed) -> Reply {
        if !signed.admin {
            return not_found(signed);
        }
        let field = |k: &str| q.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
        let search = trail::Search {
            user: field("user"),
            repository: field("repository"),
            action: field("action"),
            since: field("since"),
            until: field("until"),
        };
        let found = match &self.audit_file {
            None => Err("This gateway writes no audit trail file ([audit] file).".to_owned()),
            Some(file) => {
                let (file, s) = (file.clone(), search.clone());
                let Ok(permit) = self.trail_reads.clone().acquire_owned().await else {
                    return unavailable(signed, anyhow::anyhow!("the trail readers are closed"));
                };
                match tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    trail::search(&file, &s)
                })
                .await
                {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(format!("The audit trail cannot be read: {e}")),
                    Err(e) => Err(format!("The audit trail cannot be read: {e}")),
                }
            }
        };
        // Reading the trail is itself on the trail (who looked for whom), after the read: a
        // search does not find itself.
        if !search.is_empty() {
            crate::audit::record(
                "audit-search",
                "success",
                serde_json::json!({
                    "user.name": signed.session.subject,
                    "via": "console",
                    "search.user": search.user,
                    "search.repository": search.repository,
                    "search.action": search.action,
                    "search.since": search.since,
                    "search.until": search.until,
                }),
            );
        }
        page(200, pages::audit(&signed.who(), &search, found))
    }

    /// The policy in force, read-only, and its answer to "may X do Y on Z" (administrators
    /// only): the decision the registry would make now, and the rule that makes it.
    async fn policy(&self, q: &HashMap<String, String>, signed: &Signed) -> Reply {
        if !signed.admin {
            return not_found(signed);
        }
        let field = |k: &str| q.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
        let ask = pages::Explain {
            user: field("user"),
            kind: field("kind"),
            groups: field("groups"),
            action: field("action"),
            target: field("target"),
        };
        let answer = if ask.user.is_empty() && ask.target.is_empty() {
            None
        } else {
            Some(self.explain(&ask).await)
        };
        let (text, file) = self.tokens.policy.text();
        let source = file.map_or_else(|| "built in".to_owned(), |f| f.display().to_string());
        page(
            200,
            pages::policy(&signed.who(), &text, &source, &ask, answer.as_ref()),
        )
    }

    /// The policy's decision on one question: allowed, and why (or what is wrong with the
    /// question). A tag is checked against immutability as the registry would check it now
    /// (whether it exists is asked of storage), as `portcullis-policy check` explains.
    async fn explain(&self, ask: &pages::Explain) -> Result<(bool, String), String> {
        use policy::SubjectKind;
        let Some(action) = Action::parse(&ask.action) else {
            return Err("Pick an action.".into());
        };
        let kind = match ask.kind.as_str() {
            "user" => SubjectKind::User,
            "robot" => SubjectKind::Robot,
            "ci" => SubjectKind::Ci,
            "anonymous" => SubjectKind::Anonymous,
            _ => return Err("Pick a kind of identity.".into()),
        };
        let (repo, tag) = match ask.target.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (ask.target.as_str(), None),
        };
        if oci::RepositoryName::parse(repo).is_err() {
            return Err(format!("{repo:?} is not a repository name."));
        }
        if tag.is_some_and(|t| oci::Tag::parse(t).is_err()) {
            return Err("That is not a tag.".into());
        }
        let subject = policy::Subject {
            name: ask.user.clone(),
            kind,
            groups: ask
                .groups
                .split([',', ' '])
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        let policy = self.tokens.policy.current();
        let now = now();
        let d = policy.authorize(&subject, action, repo, now);
        let mut why = d.reason.to_string();
        let mut allowed = d.allowed;
        if let (true, Some(t)) = (d.allowed, tag) {
            let change = match action {
                Action::Push => {
                    let state = match self.data.manifest_head(repo, t).await {
                        Ok(Some(_)) => policy::TagState::Present,
                        Ok(None) => policy::TagState::Absent,
                        Err(_) => policy::TagState::Unknown,
                    };
                    Some(policy.check_tag_write(&subject, repo, t, state, now))
                }
                Action::Delete => Some(policy.check_tag_delete(&subject, repo, t, now)),
                _ => None,
            };
            if let Some(change) = change {
                allowed = change.is_allowed();
                why = format!("{why}; {}", change.describe(t));
            }
        }
        Ok((allowed, why))
    }

    /// Webhooks (administrators only): each one's cursor and what it has not taken yet, and
    /// the dead letters, each replayable (one delivery now, as the admin listener's replay).
    async fn events(
        &self,
        which: Page,
        q: &HashMap<String, String>,
        f: &HashMap<String, String>,
        signed: &Signed,
    ) -> Reply {
        use crate::events::delivery::Replay;
        if !signed.admin {
            return not_found(signed);
        }
        let Some(events) = &self.events else {
            return page(
                200,
                pages::message(
                    Some(&signed.who()),
                    "Events",
                    "No webhooks or replication rules are configured ([[webhooks]], [[replication]] in the gateway's config).",
                ),
            );
        };
        if which == Page::ReplayEvent {
            let webhook = f.get("webhook").map(String::as_str).unwrap_or("");
            let seq = f
                .get("seq")
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            let done = match events.replay(webhook, seq).await {
                Ok(()) => "delivered",
                Err(Replay::NotFound(_)) => "missing",
                Err(Replay::Failed(_)) => "failed",
            };
            return redirect(&format!("/ui/admin/events?done={done}"));
        }
        let outbox = &events.outbox;
        let head = outbox.head().await;
        let mut hooks = Vec::new();
        let consumers = events.consumers();
        for h in &consumers.hooks {
            let cursor = outbox.cursor_if_any(&h.cfg.name).await;
            let what = format!("webhook ({:?})", h.cfg.format).to_lowercase();
            hooks.push((h.cfg.name.clone(), what, cursor.ok().flatten()));
        }
        for r in &consumers.rules {
            let cursor = outbox.cursor_if_any(&r.key()).await;
            hooks.push((
                r.key(),
                format!("replication to {}", r.cfg.url),
                cursor.ok().flatten(),
            ));
        }
        let letters = match (head, outbox.dead_letters().await) {
            (Ok(head), Ok(letters)) => Ok((head, letters)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        let Ok((head, letters)) = letters else {
            return unavailable(signed, anyhow::anyhow!("the state store is unavailable"));
        };
        let notice = match q.get("done").map(String::as_str) {
            Some("delivered") => Some("Delivered: the dead letter is gone."),
            Some("failed") => Some("Not delivered: the dead letter stays, with the new error."),
            Some("missing") => Some("There is no such dead letter (replayed already?)."),
            _ => None,
        };
        page(
            200,
            pages::events(&signed.who(), head, &hooks, &letters, notice),
        )
    }

    /// The storage nodes (administrators only): health as the gateway sees it, usage, and
    /// each node's recent GC runs.
    async fn storage(&self, signed: &Signed) -> Reply {
        if !signed.admin {
            return not_found(signed);
        }
        let nodes = self.data.nodes().await;
        page(200, pages::storage(&signed.who(), &nodes))
    }

    /// Robot accounts, for registry administrators only (anyone else: as if there were no
    /// such page). Every action is the robots' admin API's own, called as this administrator.
    async fn robots(
        &self,
        which: Page,
        q: &HashMap<String, String>,
        f: &HashMap<String, String>,
        signed: &Signed,
    ) -> Reply {
        use crate::auth::robots::Caller;
        let Some(robots) = &self.tokens.robots else {
            return not_found(signed);
        };
        if !signed.admin {
            return not_found(signed);
        }
        let caller = Caller::Admin(signed.session.subject.clone());
        let call = |method: &'static str, rest: String, body: Vec<u8>| {
            let caller = &caller;
            async move {
                self.tokens
                    .robots_call(robots, method, &rest, &body, caller)
                    .await
            }
        };
        let name = f.get("robot").map(String::as_str).unwrap_or("");
        let (status, secret, notice) = match which {
            Page::CreateRobot => {
                let actions: Vec<&str> = ["pull", "push", "delete"]
                    .into_iter()
                    .filter(|a| f.contains_key(*a))
                    .collect();
                let repositories: Vec<&str> = f
                    .get("repositories")
                    .map(String::as_str)
                    .unwrap_or("")
                    .split([',', ' ', '\n'])
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .collect();
                let days: u64 = f
                    .get("expires_days")
                    .and_then(|d| d.trim().parse().ok())
                    .unwrap_or(90);
                let body = serde_json::json!({
                    "project": f.get("project").map(String::as_str).unwrap_or("").trim(),
                    "name": f.get("name").map(String::as_str).unwrap_or("").trim(),
                    "description": f.get("description").map(String::as_str).unwrap_or(""),
                    "scope": [{"repositories": repositories, "actions": actions}],
                    "expires_in_seconds": days.clamp(1, 3650) * 86_400,
                });
                let r = call("POST", String::new(), body.to_string().into_bytes()).await;
                robot_outcome(&r, "created")
            }
            Page::RotateRobot => {
                let r = call("POST", format!("{}/rotate", enc(name)), Vec::new()).await;
                robot_outcome(&r, "rotated")
            }
            Page::DeleteRobot => {
                let r = call("DELETE", enc(name), Vec::new()).await;
                robot_outcome(&r, "deleted")
            }
            Page::DisableRobot => {
                let disable = f.get("disabled").is_some_and(|d| d == "true");
                let body = serde_json::json!({ "disabled": disable }).to_string();
                let r = call("PATCH", enc(name), body.into_bytes()).await;
                robot_outcome(&r, if disable { "disabled" } else { "enabled" })
            }
            _ => (
                200,
                None,
                q.get("done").and_then(|d| match d.as_str() {
                    "deleted" => Some("Robot deleted; its tokens are revoked.".to_owned()),
                    "disabled" => {
                        Some("Robot disabled: it gets no tokens until enabled.".to_owned())
                    }
                    "enabled" => Some("Robot enabled.".to_owned()),
                    _ => None,
                }),
            ),
        };
        // Nothing to show once: back to the list (a reload does not post again).
        if status == 200 {
            match which {
                Page::DeleteRobot => return redirect("/ui/admin/robots?done=deleted"),
                Page::DisableRobot if f.get("disabled").is_some_and(|d| d == "true") => {
                    return redirect("/ui/admin/robots?done=disabled");
                }
                Page::DisableRobot => return redirect("/ui/admin/robots?done=enabled"),
                _ => {}
            }
        }
        let list = call("GET", String::new(), Vec::new()).await;
        if list.status != 200 {
            let (_, _, why) = robot_outcome(&list, "listed");
            return page(
                list.status,
                pages::message(
                    Some(&signed.who()),
                    "Unavailable",
                    why.as_deref()
                        .unwrap_or("The robot accounts cannot be listed; try again."),
                ),
            );
        }
        let listed: serde_json::Value = serde_json::from_str(&list.body).unwrap_or_default();
        let rows = listed["robots"].as_array().cloned().unwrap_or_default();
        page(
            status,
            pages::robots(&signed.who(), &rows, secret.as_ref(), notice.as_deref()),
        )
    }

    /// Deletes a manifest by digest where policy allows, then back to the repository page.
    /// Storage refuses it while an immutable tag points at it (the rules sent as the registry
    /// sends them, without `override-immutable`: the console never breaks the glass).
    async fn delete_manifest(&self, f: &HashMap<String, String>, signed: &Signed) -> Reply {
        use data::ManifestDelete;
        let repo = f.get("name").map(String::as_str).unwrap_or("");
        let Ok(digest) = oci::Digest::parse(f.get("digest").map(String::as_str).unwrap_or(""))
        else {
            return not_found(signed);
        };
        if oci::RepositoryName::parse(repo).is_err() || !self.may(signed, Action::Pull, repo) {
            return not_found(signed);
        }
        let mut fields = delete_fields(signed, repo);
        fields["digest"] = digest.to_string().into();
        let done = if !self.may(signed, Action::Delete, repo) {
            Done::Denied
        } else if crate::audit::refusing_writes() {
            Done::Refused
        } else {
            let protection = self
                .tokens
                .policy
                .current()
                .protection(&signed.subject(), repo, now())
                .map(|mut p| {
                    p.may_override = false;
                    serde_json::to_string(&p)
                });
            let protection = match protection.transpose() {
                Ok(p) => p,
                // Never sent unprotected.
                Err(e) => return unavailable(signed, e.into()),
            };
            match self.data.delete_manifest(repo, &digest, protection).await {
                Ok(ManifestDelete::Deleted) => {
                    let d = digest.to_string();
                    self.announce(
                        signed,
                        crate::events::Kind::ManifestDeleted,
                        repo,
                        None,
                        Some(&d),
                    )
                    .await;
                    Done::Deleted
                }
                Ok(ManifestDelete::Missing) => Done::Missing,
                Ok(ManifestDelete::Immutable) => Done::Immutable,
                Err(e) => return unavailable(signed, e),
            }
        };
        audit_delete("manifest-delete", done, fields, || {
            match done {
                Done::Denied => "policy does not allow delete",
                Done::Immutable => "an immutable tag points at it",
                Done::Missing => "no such manifest",
                _ => "the audit trail cannot be delivered",
            }
            .to_owned()
        });
        redirect(&format!(
            "/ui/repo?name={}&done={}&digest={}",
            enc(repo),
            done.code(),
            enc(&digest.to_string())
        ))
    }

    /// Records the event of a delete made here (when there are webhooks). The change is
    /// made: an event that cannot be recorded is said in the log and the audit trail.
    async fn announce(
        &self,
        signed: &Signed,
        kind: crate::events::Kind,
        repo: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) {
        let Some(events) = &self.events else {
            return;
        };
        let actor = crate::events::Actor {
            name: signed.session.subject.clone(),
            kind: signed.session.kind.clone(),
        };
        let event = crate::events::Event::made_here(kind, actor, repo, tag, digest);
        if let Err(e) = events.record(&event).await {
            tracing::error!(error = %e, repository = %repo, "console: a registry event cannot be recorded");
            crate::audit::record(
                "event-record",
                "failure",
                serde_json::json!({"repository": repo, "via": "console", "event.reason": e.to_string()}),
            );
        }
    }

    /// Deletes a tag where policy allows, then back to the repository page (a redirect: a
    /// reload does not post again), which says what came of it.
    async fn delete_tag(&self, f: &HashMap<String, String>, signed: &Signed) -> Reply {
        let repo = f.get("name").map(String::as_str).unwrap_or("");
        let tag = f.get("tag").map(String::as_str).unwrap_or("");
        if oci::RepositoryName::parse(repo).is_err()
            || oci::Tag::parse(tag).is_err()
            || !self.may(signed, Action::Pull, repo)
        {
            return not_found(signed);
        }
        let mut fields = delete_fields(signed, repo);
        fields["tag"] = tag.into();
        let done = if !self.may(signed, Action::Delete, repo) {
            Done::Denied
        } else if self.tokens.policy.current().immutable(repo, tag).is_some() {
            Done::Immutable
        } else if crate::audit::refusing_writes() {
            Done::Refused
        } else {
            match self.data.delete_tag(repo, tag).await {
                Ok(true) => {
                    self.announce(
                        signed,
                        crate::events::Kind::TagDeleted,
                        repo,
                        Some(tag),
                        None,
                    )
                    .await;
                    Done::Deleted
                }
                Ok(false) => Done::Missing,
                Err(e) => return unavailable(signed, e),
            }
        };
        audit_delete("tag-delete", done, fields, || match done {
            Done::Denied => "policy does not allow delete".to_owned(),
            Done::Immutable => format!("tag {tag} is immutable"),
            Done::Missing => "no such tag".to_owned(),
            _ => "the audit trail cannot be delivered".to_owned(),
        });
        redirect(&format!(
            "/ui/repo?name={}&done={}&tag={}",
            enc(repo),
            done.code(),
            enc(tag)
        ))
    }
}

/// The audit fields of a delete made in the console: who, in which repository (the caller
/// adds what was deleted).
fn delete_fields(signed: &Signed, repo: &str) -> serde_json::Value {
    serde_json::json!({
        "event.category": "registry",
        "user.name": signed.session.subject,
        "user.roles": signed.session.groups,
        "identity.kind": signed.session.kind,
        "repository": repo,
        "via": "console",
    })
}

/// Audits what a delete in the console came to as `action` (`why_not`: the reason of one
/// not made); nothing when the trail refuses writes (nothing was done, and it cannot say so).
fn audit_delete(
    action: &'static str,
    done: Done,
    mut fields: serde_json::Value,
    why_not: impl FnOnce() -> String,
) {
    if done == Done::Refused {
        return;
    }
    let outcome = if done == Done::Deleted {
        "success"
    } else {
        fields["event.reason"] = why_not().into();
        "failure"
    };
    crate::audit::record(action, outcome, fields);
}

/// What a robots' admin API answer comes to on the page: its status, the robot and secret
/// to show once (create, rotate), or the API's own words when it refused.
fn robot_outcome(r: &Reply, what: &str) -> (u16, Option<(String, String)>, Option<String>) {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    if r.status >= 400 {
        let why = v["error_description"]
            .as_str()
            .unwrap_or("the request was refused")
            .to_owned();
        return (r.status, None, Some(why));
    }
    let shown = v["secret"]
        .as_str()
        .zip(v["name"].as_str())
        .map(|(s, n)| (n.to_owned(), s.to_owned()));
    (200, shown, Some(format!("Robot {what}.")))
}

fn not_found(signed: &Signed) -> Reply {
    page(
        404,
        pages::message(
            Some(&signed.who()),
            "Not found",
            "There is no such repository or manifest, or you may not see it.",
        ),
    )
}

fn unavailable(signed: &Signed, e: anyhow::Error) -> Reply {
    tracing::warn!(error = %e, "console: storage failed");
    page(
        503,
        pages::message(
            Some(&signed.who()),
            "Unavailable",
            "Storage is unavailable; try again.",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_console_path_has_one_page() {
        let cases = [
            ("GET", "/ui", Page::Repositories),
            ("GET", "/ui/", Page::Repositories),
            ("GET", "/ui/login", Page::LoginForm),
            ("POST", "/ui/login", Page::SignIn),
            ("GET", "/ui/sso", Page::Sso),
            ("POST", "/ui/logout", Page::SignOut),
            ("GET", "/ui/logout", Page::Unknown),
            ("GET", "/ui/delete-tag", Page::Unknown),
            ("POST", "/ui/delete-tag", Page::DeleteTag),
            ("POST", "/ui/delete-manifest", Page::DeleteManifest),
            ("GET", "/ui/static/style.css", Page::Style),
            ("GET", "/ui/repo", Page::Repository),
            ("GET", "/ui/manifest", Page::Manifest),
            ("GET", "/ui/other", Page::Unknown),
            ("GET", "/ui/account", Page::Account),
            ("POST", "/ui/revoke-session", Page::RevokeSession),
            ("GET", "/ui/revoke-session", Page::Unknown),
            ("GET", "/ui/admin/robots", Page::Robots),
            ("POST", "/ui/admin/robots/create", Page::CreateRobot),
            ("POST", "/ui/admin/robots/disable", Page::DisableRobot),
            ("GET", "/ui/admin/robots/create", Page::Unknown),
            ("GET", "/ui/admin/audit", Page::Audit),
            ("GET", "/ui/admin/policy", Page::Policy),
            ("GET", "/ui/admin/storage", Page::Storage),
            ("GET", "/ui/admin/events", Page::Events),
            ("POST", "/ui/admin/events/replay", Page::ReplayEvent),
            ("POST", "/ui/admin/policy", Page::Unknown),
        ];
        for (m, p, want) in cases {
            assert_eq!(Page::parse(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn cookies_secrets_and_outcomes() {
        assert_eq!(cookie(Some("a=1; b=2"), "b"), Some("2"));
        assert_eq!(cookie(Some("b=1; b=2"), "b"), None, "a planted second one");
        assert_eq!(cookie(None, "b"), None);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(
            !same("abc", "ab"),
            "different lengths are unequal, not a panic"
        );
        for d in [
            Done::Deleted,
            Done::Immutable,
            Done::Missing,
            Done::Denied,
            Done::Refused,
        ] {
            assert_eq!(Done::parse(d.code()), Some(d));
        }
        assert_eq!(Done::parse("<b>"), None);
        assert_ne!(csrf_of("a"), csrf_of("b"));
    }
}
