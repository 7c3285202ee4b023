//! OIDC single sign-on in the browser (authorization code + PKCE S256, `state`, `nonce`):
//! `GET /auth/oidc/login` sends the browser to the IdP; `GET /auth/oidc/callback` verifies the
//! ID token and shows a registry refresh token for the device, to use as a Docker identity
//! token (`docker login -u '<token>' -p <refresh token>`, or a credential helper).
//!
//! The flow's state (PKCE verifier, nonce, a hash of the browser-binding cookie) lives in the
//! shared state store under the SHA-256 of `state`, is single-use and expires, so a flow
//! started on one gateway replica finishes on another. Configured by `[oidc]`; see `docs/sso.md`.
//!
//! - [`config`] reads `[oidc]`.
//! - [`device`] is RFC 8628 device sign-in (the credential helper), backed by the IdP's device
//!   endpoint or by this browser login.
//! - [`pages`] are the HTML pages the browser sees.

pub mod config;
pub mod device;
mod live;
pub mod pages;
#[cfg(test)]
mod tests;

use crate::auth::Identity;
use crate::route::CALLBACK_PATH;
use crate::state::StateStore;
use anyhow::{Context, bail};
use base64::Engine as _;
pub use config::{CLIENT_SECRET_ENV, OidcConfig};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
pub use live::Oidc;
pub use pages::{device_approved_page, login_redirect, success_page};
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Binds a sign-in to the browser that started it (`__Host-`: set by this host only, on `/`,
/// over TLS; a sibling subdomain cannot plant one).
const COOKIE: &str = "__Host-portcullis_oidc";

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
    /// A sign-in into the web console (the callback opens a console session).
    #[serde(default)]
    console: bool,
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
    /// A sign-in into the web console.
    Console(SignedIn),
    /// A client mistake or a refused login: status and message for the page.
    Refused(u16, String),
    /// The IdP could not be reached.
    Unavailable(String),
}

pub struct Provider {
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

/// A device name as kept: no control characters, at most 64 characters.
fn clean_device(device: &str) -> String {
    device
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect()
}

pub use crate::incoming::cookie;

impl Provider {
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
        Ok(Provider {
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
        self.start_login(host, device, None, false).await
    }

    /// [`Provider::start`] for a sign-in into the web console: the callback opens a console
    /// session instead of showing a refresh token.
    pub async fn start_console(&self, host: &str) -> anyhow::Result<(String, String)> {
        self.start_login(host, crate::console::DEVICE, None, true)
            .await
    }

    /// [`Provider::start`], approving the device flow under `device_key` when it succeeds, or, with
    /// `console`, a sign-in into the web console ([`Outcome::Console`]).
    async fn start_login(
        &self,
        host: &str,
        device: &str,
        device_key: Option<String>,
        console: bool,
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
            console,
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
            "{COOKIE}={binding}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.cfg.flow_ttl_seconds
        );
        Ok((format!("{}{sep}{query}", d.authorization_endpoint), cookie))
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
            Ok(Ok(signed_in)) if flow.console => Outcome::Console(signed_in),
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
