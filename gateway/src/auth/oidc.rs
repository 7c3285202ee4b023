//! OIDC single sign-on in the browser (authorization code + PKCE S256, `state`, `nonce`):
//! `GET /auth/oidc/login` sends the browser to the IdP; `GET /auth/oidc/callback` verifies the
//! ID token and shows a registry refresh token for the device, to use as a Docker identity
//! token (`docker login -u '<token>' -p <refresh token>`, or a credential helper).
//!
//! The flow's state (PKCE verifier, nonce, a hash of the browser-binding cookie) lives in the
//! shared state store under the SHA-256 of `state`, is single-use and expires, so a flow
//! started on one gateway replica finishes on another. Configured by `[oidc]`; see `docs/sso.md`.

use crate::auth::Identity;
use crate::reply::Reply;
use crate::route::{CALLBACK_PATH, VERIFY_PATH};
use crate::state::StateStore;
use anyhow::{Context, bail};
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The device-code grant polled at `POST /token`.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Environment variable with the client secret (when no file is named).
pub const CLIENT_SECRET_ENV: &str = "PORTCULLIS_OIDC_CLIENT_SECRET";
const COOKIE: &str = "portcullis_oidc";

/// `[oidc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The IdP's issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// File with the client secret (else `PORTCULLIS_OIDC_CLIENT_SECRET`; none: public client).
    pub client_secret_file: Option<PathBuf>,
    /// The callback URL registered at the IdP; `https://<Host>/auth/oidc/callback` when unset.
    pub redirect_url: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Only groups matching this regular expression are kept (all when unset).
    pub groups_filter: Option<String>,
    /// ID token algorithms accepted (asymmetric only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// How long a started login (browser or device) may take to come back.
    #[serde(default = "default_flow_ttl")]
    pub flow_ttl_seconds: u64,
    /// Groups are read again from the IdP (with its refresh token, so `offline_access`
    /// must be among `scopes`) when a session's are older than this at a refresh grant.
    #[serde(default = "default_groups_refresh")]
    pub groups_refresh_seconds: u64,
    /// End the registry session when the IdP refuses its refresh token (the user was
    /// disabled or signed out there); otherwise keep the groups last read.
    #[serde(default = "default_true")]
    pub revoke_on_refresh_failure: bool,
}

fn default_groups_refresh() -> u64 {
    300
}
fn default_true() -> bool {
    true
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups"]
        .map(String::from)
        .to_vec()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_algorithms() -> Vec<String> {
    ["RS256", "ES256", "PS256", "EdDSA"]
        .map(String::from)
        .to_vec()
}
fn default_flow_ttl() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

/// One login in progress.
#[derive(Serialize, Deserialize)]
struct Flow {
    verifier: String,
    nonce: String,
    /// SHA-256 of the browser-binding cookie.
    binding: String,
    redirect_uri: String,
    device: String,
    /// Set when this login approves a device flow of the gateway's own (key of its record).
    #[serde(default)]
    device_key: Option<String>,
}

/// A device flow in progress, under the SHA-256 of our device code. Backed by the IdP's
/// (`idp_device_code`), or by the gateway's own browser login when the IdP has no device
/// endpoint: then the user enters `user_code` at [`VERIFY_PATH`] and the login's callback
/// fills in `approved`.
#[derive(Serialize, Deserialize)]
struct DeviceFlow {
    #[serde(default)]
    idp_device_code: Option<String>,
    device: String,
    expires_at: i64,
    #[serde(default)]
    approved: Option<Approved>,
    /// The gateway's own flow: the key of its user code, spent when the flow is approved.
    #[serde(default)]
    user_code_key: Option<String>,
}

/// Where a user code of the gateway's own device flow points to its flow.
fn user_code_key(code: &str) -> String {
    format!("oidc:user-code:{}", normalize_user_code(code))
}

/// Who approved a device flow of the gateway's own.
#[derive(Serialize, Deserialize)]
struct Approved {
    subject: String,
    groups: Vec<String>,
    idp_refresh: Option<String>,
}

/// RFC 8628 §6.1: letters without vowels (no words), no look-alikes.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// A user code `XXXX-XXXX` (20⁸ ≈ 2.6·10¹⁰ of them).
fn user_code() -> String {
    let mut out = String::new();
    while out.len() < 9 {
        let mut b = [0u8; 16];
        openssl::rand::rand_bytes(&mut b).expect("the OS random generator works");
        // Rejection sampling: 240 = 12 × 20, so every letter is equally likely.
        for x in b.into_iter().filter(|x| *x < 240) {
            if out.len() == 4 {
                out.push('-');
            }
            if out.len() < 9 {
                out.push(USER_CODE_ALPHABET[(x % 20) as usize] as char);
            }
        }
    }
    out
}

/// What a user typed, as stored: letters of the alphabet only, upper case.
fn normalize_user_code(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_uppercase())
        .filter(|c| c.is_ascii() && USER_CODE_ALPHABET.contains(&(*c as u8)))
        .take(16)
        .collect()
}

/// An HTML page for the browser, never cached.
fn page(status: u16, title: &str, body: &str) -> Reply {
    Reply::html(
        status,
        format!(
            "<!doctype html><meta charset=\"utf-8\"><title>Portcullis: {}</title>\n{body}\n",
            esc(title)
        ),
    )
    .with_header("cache-control", "no-store")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const DEVICE_COOKIE: &str = "portcullis_device";

/// What polling a device code produced (RFC 8628 §3.5).
pub enum DevicePoll {
    /// `authorization_pending` or `slow_down`: ask again later.
    Pending(String),
    Expired,
    Denied(String),
    /// Never issued, or already used.
    Unknown,
    Done(SignedIn, String),
    Unavailable(String),
}

/// A verified sign-in at the IdP.
pub struct SignedIn {
    pub identity: Identity,
    /// The IdP's refresh token (when `offline_access` was granted).
    pub idp_refresh: Option<String>,
}

/// What reading a session's groups again produced.
pub enum Reread {
    Fresh(SignedIn),
    /// The IdP refused the refresh token (user disabled, signed out, token revoked).
    Refused(String),
    Unavailable(String),
}

/// What the callback produced.
pub enum Outcome {
    /// A device flow was approved (the device's name): the device gets the session.
    DeviceApproved(String),
    /// The user, and the device name they asked for.
    LoggedIn(SignedIn, String),
    /// A client mistake or a refused login: status and message for the page.
    Refused(u16, String),
    /// The IdP could not be reached.
    Unavailable(String),
}

pub struct Oidc {
    cfg: OidcConfig,
    secret: Option<String>,
    algorithms: Vec<Algorithm>,
    groups_filter: Option<regex::Regex>,
    http: reqwest::Client,
    state: Arc<dyn StateStore>,
    discovery: tokio::sync::Mutex<Option<(Discovery, JwkSet)>>,
}

fn sha256_b64(s: &str) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(s.as_bytes()))
}

fn unavailable(e: &anyhow::Error) -> Reply {
    tracing::warn!(error = %format!("{e:#}"), "device sign-in: the identity provider or the state store is unavailable");
    page(
        503,
        "unavailable",
        "<p>The identity provider is unavailable, try again later.</p>",
    )
}

/// A device name as kept: no control characters, at most 64 characters.
fn clean_device(device: &str) -> String {
    device
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Oidc {
    pub fn new(cfg: OidcConfig, state: Arc<dyn StateStore>) -> anyhow::Result<Self> {
        let secret = match &cfg.client_secret_file {
            Some(f) => Some(service::secrets::read_secret_file(f)?),
            None => std::env::var(CLIENT_SECRET_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        };
        let mut algorithms = Vec::new();
        for a in &cfg.algorithms {
            let alg: Algorithm = a
                .parse()
                .map_err(|_| anyhow::anyhow!("oidc.algorithms: unknown algorithm {a:?}"))?;
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                bail!(
                    "oidc.algorithms: {a} is symmetric; only asymmetric ID token signatures are accepted"
                );
            }
            algorithms.push(alg);
        }
        if algorithms.is_empty() {
            bail!("oidc.algorithms is empty");
        }
        if !cfg.scopes.iter().any(|s| s == "openid") {
            bail!("oidc.scopes must include openid");
        }
        let groups_filter = cfg
            .groups_filter
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .context("oidc.groups_filter")?;
        Ok(Oidc {
            cfg,
            secret,
            algorithms,
            groups_filter,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .context("building the OIDC client")?,
            state,
            discovery: tokio::sync::Mutex::new(None),
        })
    }

    /// Discovery and JWKS, fetched on first use; `refresh` fetches the JWKS again (an
    /// unknown `kid` means the IdP rotated its keys).
    async fn provider(&self, refresh: bool) -> anyhow::Result<(Discovery, JwkSet)> {
        let mut slot = self.discovery.lock().await;
        if let (Some(d), false) = (slot.as_ref(), refresh) {
            return Ok(d.clone());
        }
        let d: Discovery = crate::auth::jws::discover(&self.http, &self.cfg.issuer).await?;
        let jwks: JwkSet = crate::auth::jws::fetch_json(&self.http, &d.jwks_uri).await?;
        *slot = Some((d.clone(), jwks.clone()));
        Ok((d, jwks))
    }

    fn redirect_uri(&self, host: &str) -> String {
        self.cfg
            .redirect_url
            .clone()
            .unwrap_or_else(|| format!("https://{host}{CALLBACK_PATH}"))
    }

    /// Starts a login: the IdP URL to send the browser to and the `Set-Cookie` value binding
    /// the flow to this browser.
    pub async fn start(&self, host: &str, device: &str) -> anyhow::Result<(String, String)> {
        self.start_login(host, device, None).await
    }

    /// [`Oidc::start`], approving the device flow under `device_key` when it succeeds.
    async fn start_login(
        &self,
        host: &str,
        device: &str,
        device_key: Option<String>,
    ) -> anyhow::Result<(String, String)> {
        let (d, _) = self.provider(false).await?;
        let (state, nonce, verifier, binding) = (
            crate::random::random_token(32),
            crate::random::random_token(32),
            crate::random::random_token(48),
            crate::random::random_token(32),
        );
        let redirect_uri = self.redirect_uri(host);
        let flow = Flow {
            verifier: verifier.clone(),
            nonce: nonce.clone(),
            binding: sha256_b64(&binding),
            redirect_uri: redirect_uri.clone(),
            device: clean_device(device),
            device_key,
        };
        let ttl = Duration::from_secs(self.cfg.flow_ttl_seconds);
        self.state
            .set(
                &format!("oidc:flow:{}", sha256_b64(&state)),
                serde_json::to_vec(&flow)?,
                ttl,
            )
            .await?;
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &self.cfg.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &sha256_b64(&verifier))
            .append_pair("code_challenge_method", "S256");
        // OpenID Connect Core §11: offline access is asked for with a consent prompt.
        if self.cfg.scopes.iter().any(|s| s == "offline_access") {
            query.append_pair("prompt", "consent");
        }
        let query = query.finish();
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let cookie = format!(
            "{COOKIE}={binding}; Path=/auth/oidc; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.cfg.flow_ttl_seconds
        );
        Ok((format!("{}{sep}{query}", d.authorization_endpoint), cookie))
    }

    /// Starts a device flow at the IdP's device authorization endpoint; the answer for the
    /// client (RFC 8628 §3.2) carries our own device code, so the IdP's never leaves the
    /// gateway. `Ok(None)`: the IdP has no device endpoint.
    pub async fn device_start(
        &self,
        host: &str,
        device: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let (d, _) = self.provider(false).await?;
        let Some(endpoint) = d.device_authorization_endpoint else {
            return self.device_start_here(host, device).await;
        };
        let scope = self.cfg.scopes.join(" ");
        let (status, body) = self
            .client_post(&endpoint, &[("scope", scope.as_str())])
            .await
            .context("calling the IdP's device authorization endpoint")?;
        let (Some(idp_code), Some(user_code), Some(uri), true) = (
            body["device_code"].as_str(),
            body["user_code"].as_str(),
            body["verification_uri"].as_str(),
            status.is_success(),
        ) else {
            bail!(
                "the IdP's device authorization endpoint answered {status}: {}",
                body["error"].as_str().unwrap_or("no device code")
            );
        };
        let expires_in = body["expires_in"]
            .as_u64()
            .unwrap_or(600)
            .min(self.cfg.flow_ttl_seconds)
            .max(1);
        let ours = crate::random::random_token(32);
        let flow = DeviceFlow {
            idp_device_code: Some(idp_code.to_string()),
            device: clean_device(device),
            expires_at: crate::clock::unix_now() + expires_in as i64,
            approved: None,
            user_code_key: None,
        };
        self.save_device_flow(&sha256_b64(&ours), &flow).await?;
        let mut answer = serde_json::json!({
            "device_code": ours,
            "user_code": user_code,
            "verification_uri": uri,
            "expires_in": expires_in,
            "interval": body["interval"].as_u64().unwrap_or(5),
        });
        if let Some(complete) = body["verification_uri_complete"].as_str() {
            answer["verification_uri_complete"] = complete.into();
        }
        Ok(answer)
    }

    /// Kept an hour past expiry, so a late poll hears `expired_token`, not "unknown".
    async fn save_device_flow(&self, key: &str, flow: &DeviceFlow) -> anyhow::Result<()> {
        let ttl = (flow.expires_at - crate::clock::unix_now()).max(0) as u64 + 3600;
        self.state
            .set(
                &format!("oidc:device:{key}"),
                serde_json::to_vec(flow)?,
                Duration::from_secs(ttl),
            )
            .await?;
        Ok(())
    }

    /// A device flow of the gateway's own, for an IdP without one: the user enters the code
    /// at [`VERIFY_PATH`] on this registry and signs in there with the browser login.
    async fn device_start_here(
        &self,
        host: &str,
        device: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let ours = crate::random::random_token(32);
        let code = user_code();
        let expires_in = self.cfg.flow_ttl_seconds.max(1);
        let key = sha256_b64(&ours);
        let flow = DeviceFlow {
            idp_device_code: None,
            device: clean_device(device),
            expires_at: crate::clock::unix_now() + expires_in as i64,
            approved: None,
            user_code_key: Some(user_code_key(&code)),
        };
        self.save_device_flow(&key, &flow).await?;
        self.state
            .set(
                &user_code_key(&code),
                key.into_bytes(),
                Duration::from_secs(expires_in),
            )
            .await?;
        let uri = format!("https://{host}{VERIFY_PATH}");
        Ok(serde_json::json!({
            "device_code": ours,
            "user_code": code,
            "verification_uri": uri,
            "verification_uri_complete": format!("{uri}?user_code={code}"),
            "expires_in": expires_in,
            "interval": 5,
        }))
    }

    /// The device flow a user code names, if it is current: its key and record.
    async fn by_user_code(&self, code: &str) -> anyhow::Result<Option<(String, DeviceFlow)>> {
        let code = normalize_user_code(code);
        if code.len() != 8 {
            return Ok(None);
        }
        let Some(key) = self.state.get(&user_code_key(&code)).await? else {
            return Ok(None);
        };
        let key = String::from_utf8(key).unwrap_or_default();
        let Some(raw) = self.state.get(&format!("oidc:device:{key}")).await? else {
            return Ok(None);
        };
        let flow: DeviceFlow = serde_json::from_slice(&raw)?;
        if flow.approved.is_some() || crate::clock::unix_now() >= flow.expires_at {
            return Ok(None);
        }
        Ok(Some((key, flow)))
    }

    /// [`VERIFY_PATH`]: `GET` asks for the code; `GET ?user_code=` shows which device is
    /// asking and a confirmation form bound to this browser by a `SameSite=Strict` cookie
    /// (RFC 8628 §5.4: the user confirms, and no other site can confirm for them); `POST`
    /// starts the browser login that approves it.
    pub async fn verify_page(
        &self,
        host: &str,
        method: &str,
        query: &str,
        body: &[u8],
        cookies: Option<&str>,
    ) -> Reply {
        let field = |src: &[u8], k: &str| {
            form_urlencoded::parse(src)
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let unknown = || {
            page(
                400,
                "unknown code",
                "<p>That code is unknown, used or expired. Start again on the device.</p>",
            )
        };
        match method {
            "GET" => {
                let Some(code) = field(query.as_bytes(), "user_code") else {
                    return page(
                        200,
                        "sign in a device",
                        &format!(
                            "<h1>Sign in a device</h1><form method=\"get\" action=\"{VERIFY_PATH}\">\
                             <label>Code shown on the device <input name=\"user_code\" autofocus></label>\
                             <button>Next</button></form>"
                        ),
                    );
                };
                let flow = match self.by_user_code(&code).await {
                    Ok(Some((_, flow))) => flow,
                    Ok(None) => return unknown(),
                    Err(e) => return unavailable(&e),
                };
                let csrf = crate::random::random_token(24);
                let mut page = page(
                    200,
                    "sign in a device",
                    &format!(
                        "<h1>Sign in {device} to {host}?</h1>\
                         <p>Only continue if you started this on a device of yours and it shows the code <b>{code}</b>.</p>\
                         <form method=\"post\" action=\"{VERIFY_PATH}\">\
                         <input type=\"hidden\" name=\"user_code\" value=\"{code}\">\
                         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                         <button>Sign in</button></form>",
                        device = esc(if flow.device.is_empty() {
                            "a device"
                        } else {
                            &flow.device
                        }),
                        host = esc(host),
                        code = esc(&code),
                    ),
                );
                page.headers.push((
                    "set-cookie",
                    format!(
                        "{DEVICE_COOKIE}={csrf}; Path={VERIFY_PATH}; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                        self.cfg.flow_ttl_seconds
                    ),
                ));
                page
            }
            "POST" => {
                let (Some(code), Some(csrf)) = (field(body, "user_code"), field(body, "csrf"))
                else {
                    return page(
                        400,
                        "bad request",
                        "<p>user_code and csrf are required.</p>",
                    );
                };
                let bound = cookie(cookies, DEVICE_COOKIE).is_some_and(|c| {
                    c.len() == csrf.len() && openssl::memcmp::eq(c.as_bytes(), csrf.as_bytes())
                });
                if !bound {
                    return page(
                        400,
                        "not confirmed here",
                        "<p>This confirmation did not come from the page this browser was shown. Open the address the device shows and try again.</p>",
                    );
                }
                let (key, flow) = match self.by_user_code(&code).await {
                    Ok(Some(found)) => found,
                    Ok(None) => return unknown(),
                    Err(e) => return unavailable(&e),
                };
                match self.start_login(host, &flow.device, Some(key)).await {
                    Ok((location, login_cookie)) => Reply {
                        status: 302,
                        content_type: crate::reply::HTML,
                        body: String::new(),
                        headers: vec![
                            ("location", location),
                            ("set-cookie", login_cookie),
                            ("cache-control", "no-store".into()),
                        ],
                    },
                    Err(e) => unavailable(&e),
                }
            }
            _ => page(405, "method not allowed", "<p>Use GET or POST.</p>"),
        }
    }

    /// The callback of a login that approves a device flow: records who signed in, so the
    /// device's next poll gets the session; the user code is spent.
    async fn approve(&self, key: &str, signed_in: SignedIn, device: String) -> Outcome {
        let raw = match self.state.get(&format!("oidc:device:{key}")).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return Outcome::Refused(400, "the device sign-in has expired".into()),
            Err(e) => return Outcome::Unavailable(e.to_string()),
        };
        let Ok(mut flow) = serde_json::from_slice::<DeviceFlow>(&raw) else {
            return Outcome::Refused(400, "unknown device sign-in".into());
        };
        if flow.approved.is_some() || crate::clock::unix_now() >= flow.expires_at {
            return Outcome::Refused(400, "the device sign-in has expired or is done".into());
        }
        flow.approved = Some(Approved {
            subject: signed_in.identity.subject,
            groups: signed_in.identity.groups,
            idp_refresh: signed_in.idp_refresh,
        });
        if let Err(e) = self.save_device_flow(key, &flow).await {
            return Outcome::Unavailable(format!("{e:#}"));
        }
        // Spend the user code (its flow is approved either way).
        if let Some(k) = &flow.user_code_key {
            let _ = self.state.delete(k).await;
        }
        Outcome::DeviceApproved(device)
    }

    /// One poll of a device code: asks the IdP whether the user has finished.
    pub async fn device_poll(&self, device_code: &str) -> DevicePoll {
        let key = format!("oidc:device:{}", sha256_b64(device_code));
        let flow = match self.state.get(&key).await {
            Ok(Some(raw)) => match serde_json::from_slice::<DeviceFlow>(&raw) {
                Ok(f) => f,
                Err(_) => return DevicePoll::Unknown,
            },
            Ok(None) => return DevicePoll::Unknown,
            Err(e) => return DevicePoll::Unavailable(e.to_string()),
        };
        if crate::clock::unix_now() >= flow.expires_at {
            return DevicePoll::Expired;
        }
        let Some(idp_code) = flow.idp_device_code.as_deref() else {
            // The gateway's own flow: approved by a browser login, or not yet.
            let Some(a) = flow.approved else {
                return DevicePoll::Pending("authorization_pending".into());
            };
            // Single use: of two polls racing (on any replicas), one gets the session.
            match self.state.take(&key).await {
                Ok(Some(_)) => {}
                Ok(None) => return DevicePoll::Unknown,
                Err(e) => return DevicePoll::Unavailable(e.to_string()),
            }
            let identity = Identity {
                subject: a.subject,
                groups: a.groups,
                kind: SubjectKind::User,
                machine: None,
            };
            let signed_in = SignedIn {
                identity,
                idp_refresh: a.idp_refresh,
            };
            return DevicePoll::Done(signed_in, flow.device);
        };
        let form = [("grant_type", DEVICE_GRANT), ("device_code", idp_code)];
        match self.token_call(&form).await {
            Ok(Ok(body)) => {
                // Single use, whatever the ID token says; a racing poll that took it first
                // has the session.
                match self.state.take(&key).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return DevicePoll::Unknown,
                    Err(e) => return DevicePoll::Unavailable(e.to_string()),
                }
                match self.signed_in(&body, None).await {
                    Ok(Ok(s)) => DevicePoll::Done(s, flow.device),
                    Ok(Err(msg)) => DevicePoll::Denied(msg),
                    Err(e) => DevicePoll::Unavailable(format!("{e:#}")),
                }
            }
            Ok(Err((e, _))) if e == "authorization_pending" || e == "slow_down" => {
                DevicePoll::Pending(e)
            }
            Ok(Err((e, _))) if e == "expired_token" => DevicePoll::Expired,
            Ok(Err((e, d))) => DevicePoll::Denied(format!("{e} {d}")),
            Err(e) => DevicePoll::Unavailable(format!("{e:#}")),
        }
    }

    /// Finishes a login from the callback's query and `Cookie` header.
    pub async fn finish(&self, query: &str, cookies: Option<&str>) -> Outcome {
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(e) = param("error") {
            return Outcome::Refused(
                400,
                format!(
                    "the identity provider refused the login: {e} {}",
                    param("error_description").unwrap_or("")
                ),
            );
        }
        let (Some(code), Some(state)) = (param("code"), param("state")) else {
            return Outcome::Refused(400, "code and state are required".into());
        };
        // Single use: taken out of the store before anything else.
        let key = format!("oidc:flow:{}", sha256_b64(state));
        let flow = match self.state.take(&key).await {
            Ok(Some(raw)) => match serde_json::from_slice::<Flow>(&raw) {
                Ok(f) => f,
                Err(_) => return Outcome::Refused(400, "unknown or expired login".into()),
            },
            Ok(None) => {
                return Outcome::Refused(400, "unknown, used or expired login state".into());
            }
            Err(e) => return Outcome::Unavailable(e.to_string()),
        };
        let bound = cookie(cookies, COOKIE)
            .map(sha256_b64)
            .is_some_and(|h| openssl::memcmp::eq(h.as_bytes(), flow.binding.as_bytes()));
        if !bound {
            return Outcome::Refused(
                400,
                "this login was started in another browser (the login cookie is missing)".into(),
            );
        }
        match self.exchange(code, &flow).await {
            Ok(Ok(signed_in)) if flow.device_key.is_some() => {
                self.approve(
                    flow.device_key.as_deref().unwrap_or(""),
                    signed_in,
                    flow.device,
                )
                .await
            }
            Ok(Ok(signed_in)) => Outcome::LoggedIn(signed_in, flow.device),
            Ok(Err(msg)) => Outcome::Refused(400, msg),
            Err(e) => Outcome::Unavailable(format!("{e:#}")),
        }
    }

    /// A form POST to the IdP authenticated as this client (`client_secret_basic`, or
    /// `client_id` in the form for a public client): status and JSON body (`null` if none).
    async fn client_post(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> reqwest::Result<(reqwest::StatusCode, serde_json::Value)> {
        let mut form = form.to_vec();
        let mut req = self.http.post(url);
        match &self.secret {
            Some(s) => req = req.basic_auth(&self.cfg.client_id, Some(s)),
            None => form.push(("client_id", self.cfg.client_id.as_str())),
        }
        let r = req.form(&form).send().await?;
        let status = r.status();
        Ok((status, r.json().await.unwrap_or_default()))
    }

    /// A call to the IdP's token endpoint with this client's credentials. Outer error: the
    /// IdP could not be reached or failed; inner: its OAuth error code and description.
    async fn token_call(
        &self,
        form: &[(&str, &str)],
    ) -> anyhow::Result<Result<serde_json::Value, (String, String)>> {
        let (d, _) = self.provider(false).await?;
        let (status, body) = self
            .client_post(&d.token_endpoint, form)
            .await
            .context("calling the IdP's token endpoint")?;
        if status.is_server_error() {
            bail!("the IdP's token endpoint answered {status}");
        }
        if !status.is_success() {
            return Ok(Err((
                body["error"].as_str().unwrap_or("error").to_string(),
                body["error_description"].as_str().unwrap_or("").to_string(),
            )));
        }
        Ok(Ok(body))
    }

    /// The verified ID token of a token-endpoint answer, with the IdP's refresh token.
    async fn signed_in(
        &self,
        body: &serde_json::Value,
        nonce: Option<&str>,
    ) -> anyhow::Result<Result<SignedIn, String>> {
        let Some(id_token) = body["id_token"].as_str() else {
            return Ok(Err("the identity provider returned no ID token".into()));
        };
        Ok(self
            .verify_id_token(id_token, nonce)
            .await?
            .map(|identity| SignedIn {
                identity,
                idp_refresh: body["refresh_token"].as_str().map(str::to_string),
            }))
    }

    /// Trades the code for tokens and verifies the ID token. Outer error: the IdP could not
    /// be reached; inner: the login is refused.
    async fn exchange(&self, code: &str, flow: &Flow) -> anyhow::Result<Result<SignedIn, String>> {
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", flow.redirect_uri.as_str()),
            ("code_verifier", flow.verifier.as_str()),
        ];
        match self.token_call(&form).await? {
            Ok(body) => self.signed_in(&body, Some(&flow.nonce)).await,
            Err((e, d)) => Ok(Err(format!(
                "the identity provider refused the code: {e} {d}"
            ))),
        }
    }

    /// How often a session's groups are read again, if this IdP gave a refresh token.
    pub fn groups_refresh_seconds(&self) -> i64 {
        self.cfg.groups_refresh_seconds as i64
    }

    pub fn revoke_on_refresh_failure(&self) -> bool {
        self.cfg.revoke_on_refresh_failure
    }

    /// Reads the user's groups again with the IdP's refresh token (and gets the rotated
    /// token, if the IdP rotates). `subject` must stay the same user.
    pub async fn reread(&self, idp_refresh: &str, subject: &str) -> Reread {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", idp_refresh),
        ];
        let body = match self.token_call(&form).await {
            Ok(Ok(body)) => body,
            Ok(Err((e, d))) => return Reread::Refused(format!("{e} {d}")),
            Err(e) => return Reread::Unavailable(format!("{e:#}")),
        };
        match self.signed_in(&body, None).await {
            Ok(Ok(s)) if s.identity.subject == subject => Reread::Fresh(SignedIn {
                idp_refresh: s.idp_refresh.or_else(|| Some(idp_refresh.to_string())),
                ..s
            }),
            Ok(Ok(_)) => Reread::Refused("the IdP answered for another user".into()),
            Ok(Err(msg)) => Reread::Refused(msg),
            Err(e) => Reread::Unavailable(format!("{e:#}")),
        }
    }

    /// Signature (allowed asymmetric algorithms, key by `kid` from the IdP's JWKS), `iss`,
    /// `aud`, `exp`/`iat`/`nbf` with 30 s leeway, `nonce`; then the username and groups.
    /// `nonce` is `None` for ID tokens from a refresh or a device grant, which have none
    /// of ours to carry.
    pub async fn verify_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
    ) -> anyhow::Result<Result<Identity, String>> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(Err("the ID token is malformed".into()));
        };
        if !self.algorithms.contains(&header.alg) {
            return Ok(Err(format!(
                "the ID token's algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let (_, mut jwks) = self.provider(false).await?;
        let find = |set: &JwkSet| match &header.kid {
            Some(k) => set.find(k).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let jwk = match find(&jwks) {
            Some(k) => k,
            None => {
                jwks = self.provider(true).await?.1;
                match find(&jwks) {
                    Some(k) => k,
                    None => return Ok(Err("the ID token is signed with an unknown key".into())),
                }
            }
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            return Ok(Err("the IdP's key cannot be used".into()));
        };
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.validate_nbf = true;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.client_id]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let claims = match jsonwebtoken::decode::<serde_json::Value>(token, &key, &v) {
            Ok(d) => d.claims,
            Err(e) => return Ok(Err(format!("the ID token is not valid: {e}"))),
        };
        let iat = claims["iat"].as_i64().unwrap_or(0);
        if iat > crate::clock::unix_now() + 30 {
            return Ok(Err("the ID token is issued in the future".into()));
        }
        if let Some(nonce) = nonce
            && claims["nonce"].as_str() != Some(nonce)
        {
            return Ok(Err("the ID token's nonce does not match this login".into()));
        }
        // OpenID Connect Core §2: a token issued to another party is not ours to accept.
        if let Some(azp) = claims.get("azp")
            && azp.as_str() != Some(self.cfg.client_id.as_str())
        {
            return Ok(Err("the ID token was issued to another client (azp)".into()));
        }
        let identity = match self.identity(&claims) {
            Ok(i) => i,
            Err(e) => return Ok(Err(e)),
        };
        let Some(sub) = claims["sub"].as_str().filter(|s| !s.is_empty()) else {
            return Ok(Err("the ID token has no sub claim".into()));
        };
        Ok(self
            .bind_name(&identity.subject, sub)
            .await?
            .map(|()| identity))
    }

    /// Binds a user name to the IdP account (issuer, `sub`) first seen with it: the name
    /// claim (`preferred_username` by default) is not stable (OpenID Connect Core §5.7) — an
    /// IdP that lets people rename themselves, or gives a freed name to someone new, would
    /// hand one person another's grants. A different account under a bound name is refused
    /// and audited. The binding is durable state (never evicted, never expires).
    async fn bind_name(&self, name: &str, sub: &str) -> anyhow::Result<Result<(), String>> {
        use sha2::Digest;
        let key = format!(
            "identity-binding:oidc:{}",
            hex::encode(sha2::Sha256::digest(name.as_bytes()))
        );
        let account = serde_json::json!({ "iss": self.cfg.issuer, "sub": sub }).to_string();
        match self.state.get(&key).await? {
            None => {
                self.state.put(&key, account.into_bytes()).await?;
                Ok(Ok(()))
            }
            Some(bound) if bound == account.as_bytes() => Ok(Ok(())),
            Some(_) => {
                crate::audit::record(
                    "login",
                    "failure",
                    serde_json::json!({"user.name": name, "authenticator": "oidc",
                        "event.reason": "the name is bound to another account of the identity provider"}),
                );
                Ok(Err(format!(
                    "the name {name} belongs to another account of the identity provider; ask an administrator"
                )))
            }
        }
    }

    fn identity(&self, claims: &serde_json::Value) -> Result<Identity, String> {
        let Some(subject) = claims[&self.cfg.username_claim]
            .as_str()
            .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
        else {
            return Err(format!(
                "the ID token has no {} claim",
                self.cfg.username_claim
            ));
        };
        let groups = claims[&self.cfg.groups_claim]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str())
            .filter(|g| self.groups_filter.as_ref().is_none_or(|r| r.is_match(g)))
            .map(str::to_string)
            .collect();
        Ok(Identity {
            subject: subject.to_string(),
            groups,
            kind: SubjectKind::User,
            machine: None,
        })
    }
}

/// The page shown when a login approved a device flow.
pub fn device_approved_page(device: &str) -> String {
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>Portcullis: device signed in</title>\n\
         <h1 id=\"device-approved\">{} is signed in</h1><p>You can close this page and return to it.</p>\n",
        esc(if device.is_empty() {
            "The device"
        } else {
            device
        })
    )
}

/// The page shown after a login: how to use the refresh token from the CLI.
pub fn success_page(host: &str, id: &Identity, device: &str, refresh: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>Portcullis: signed in</title>
<h1>Signed in as {user}</h1>
<p>Groups: {groups}</p>
<p>A registry token for <b>{device}</b> (shown once; revoke it at <code>/auth/revoke</code>):</p>
<pre id="refresh-token">{refresh}</pre>
<p>Log in from the command line with it:</p>
<pre>docker login {host} -u '&lt;token&gt;' -p {refresh}
podman login {host} -u '&lt;token&gt;' -p {refresh}</pre>
"#,
        user = esc(&id.subject),
        groups = esc(&id.groups.join(", ")),
        device = esc(if device.is_empty() {
            "this device"
        } else {
            device
        }),
        host = esc(host),
        refresh = esc(refresh),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_eight_letters_without_vowels() {
        for _ in 0..100 {
            let c = user_code();
            assert_eq!(c.len(), 9, "{c}");
            assert_eq!(&c[4..5], "-");
            assert_eq!(normalize_user_code(&c).len(), 8);
        }
        assert_eq!(normalize_user_code(" bcdf-ghjk\n"), "BCDFGHJK");
        assert_eq!(normalize_user_code("AEIOU"), "");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = Some("a=1; portcullis_oidc=xyz; b=2");
        assert_eq!(cookie(h, COOKIE), Some("xyz"));
        assert_eq!(cookie(Some("portcullis_oidcx=1"), COOKIE), None);
        assert_eq!(cookie(None, COOKIE), None);
    }

    #[test]
    fn symmetric_and_unknown_algorithms_are_refused() {
        let base = r#"issuer = "http://127.0.0.1:1"
client_id = "c""#;
        let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
        for algs in [r#"["HS256"]"#, r#"["none"]"#, "[]"] {
            let cfg: OidcConfig = toml::from_str(&format!("{base}\nalgorithms = {algs}")).unwrap();
            assert!(Oidc::new(cfg, store.clone()).is_err(), "{algs}");
        }
        let cfg: OidcConfig = toml::from_str(base).unwrap();
        Oidc::new(cfg, store).unwrap();
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let id = Identity {
            subject: "<b>".into(),
            groups: vec!["a&b".into()],
            kind: SubjectKind::User,
            machine: None,
        };
        let p = success_page("h", &id, "<script>", "tok");
        assert!(!p.contains("<script>"), "{p}");
        assert!(p.contains("Signed in as &lt;b&gt;"), "{p}");
        assert!(p.contains("a&amp;b"), "{p}");
    }

    /// An issuer the tests control: discovery and JWKS for one EC key, on a loopback port.
    /// (The real IdP of `tests/tests/sso.rs` never signs an expired or misdirected ID token;
    /// this stand-in does, so the refusals can be shown.)
    async fn fake_issuer() -> (String, crate::token::keys::SigningKey) {
        let key =
            crate::token::keys::SigningKey::from_pem(&crate::token::keys::generate_pem().unwrap())
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/auth"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
        })
        .to_string();
        let jwks = serde_json::json!({ "keys": [key.jwk.clone()] }).to_string();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || std::future::ready(discovery.clone())),
            )
            .route(
                "/jwks",
                axum::routing::get(move || std::future::ready(jwks.clone())),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (issuer, key)
    }

    #[tokio::test]
    async fn id_tokens_are_checked_and_a_name_stays_with_its_first_account() {
        let (issuer, key) = fake_issuer().await;
        let cfg: OidcConfig = toml::from_str(&format!(
            "issuer = \"{issuer}\"\nclient_id = \"portcullis\"\ngroups_filter = \"^team-\""
        ))
        .unwrap();
        let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
        let oidc = Oidc::new(cfg, store).unwrap();
        let now = crate::clock::unix_now();
        let good = serde_json::json!({
            "iss": issuer, "aud": "portcullis", "sub": "u1", "exp": now + 300, "iat": now,
            "nonce": "n1", "preferred_username": "bob", "groups": ["team-a", "staff"],
        });
        let sign = |claims: &serde_json::Value, kid: &str| {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some(kid.to_string());
            jsonwebtoken::encode(&h, claims, &key.encoding).unwrap()
        };
        let id = oidc
            .verify_id_token(&sign(&good, &key.kid), Some("n1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id.subject, "bob");
        assert_eq!(id.groups, ["team-a"]);

        let with = |k: &str, v: serde_json::Value| {
            let mut c = good.clone();
            c[k] = v;
            c
        };
        let mut no_user = good.clone();
        no_user
            .as_object_mut()
            .unwrap()
            .remove("preferred_username");
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let unsigned = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "kid": key.kid})),
            b64(&good)
        );
        // HS256 keyed with the IdP's public key: the classic algorithm confusion.
        let confused = {
            let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
            h.kid = Some(key.kid.clone());
            let public = key.jwk.to_string();
            jsonwebtoken::encode(
                &h,
                &good,
                &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
            )
            .unwrap()
        };
        let other_key =
            crate::token::keys::SigningKey::from_pem(&crate::token::keys::generate_pem().unwrap())
                .unwrap();
        let foreign = {
            let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
            h.kid = Some(other_key.kid.clone());
            jsonwebtoken::encode(&h, &good, &other_key.encoding).unwrap()
        };
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "expired",
                sign(&with("exp", (now - 120).into()), &key.kid),
                "n1",
            ),
            (
                "issued in the future",
                sign(&with("iat", (now + 600).into()), &key.kid),
                "n1",
            ),
            (
                "not yet valid",
                sign(&with("nbf", (now + 600).into()), &key.kid),
                "n1",
            ),
            (
                "wrong audience",
                sign(&with("aud", "someone-else".into()), &key.kid),
                "n1",
            ),
            (
                "another issuer",
                sign(&with("iss", "https://evil.example".into()), &key.kid),
                "n1",
            ),
            ("nonce mismatch", sign(&good, &key.kid), "n2"),
            (
                "no nonce",
                sign(&with("nonce", serde_json::Value::Null), &key.kid),
                "n1",
            ),
            ("no username", sign(&no_user, &key.kid), "n1"),
            ("no sub", sign(&with("sub", "".into()), &key.kid), "n1"),
            (
                "issued to another client",
                sign(&with("azp", "another-client".into()), &key.kid),
                "n1",
            ),
            (
                "the name of another account (a rename, or a freed name given again)",
                sign(&with("sub", "u2".into()), &key.kid),
                "n1",
            ),
            ("alg none", unsigned, "n1"),
            ("HS256 with the public key", confused, "n1"),
            ("unknown key", foreign, "n1"),
            ("garbage", "a.b.c".into(), "n1"),
        ];
        for (what, token, nonce) in cases {
            let r = oidc.verify_id_token(&token, Some(nonce)).await.unwrap();
            assert!(r.is_err(), "{what}: accepted");
        }
    }
}
