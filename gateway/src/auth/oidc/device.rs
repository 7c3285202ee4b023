//! RFC 8628 device sign-in for the credential helper: `POST /auth/oidc/device` starts a flow
//! (backed by the IdP's device endpoint, or by the gateway's own browser login when the IdP
//! has none: the user enters a code at [`VERIFY_PATH`]), and the device polls `POST /token`
//! with [`DEVICE_GRANT`] until the user signed in.

use super::pages::{esc, login_redirect, page, unavailable};
use super::{Outcome, Provider, SignedIn, clean_device, cookie, sha256_b64};
use crate::auth::Identity;
use crate::reply::Reply;
use crate::route::VERIFY_PATH;
use anyhow::{Context, bail};
use policy::SubjectKind;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The device-code grant polled at `POST /token`.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

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
pub(super) fn user_code() -> String {
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
pub(super) fn normalize_user_code(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_uppercase())
        .filter(|c| c.is_ascii() && USER_CODE_ALPHABET.contains(&(*c as u8)))
        .take(16)
        .collect()
}

const DEVICE_COOKIE: &str = "__Host-portcullis_device";

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

impl Provider {
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
                        "{DEVICE_COOKIE}={csrf}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
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
                match self.start_login(host, &flow.device, Some(key), false).await {
                    Ok((location, login_cookie)) => login_redirect(location, login_cookie),
                    Err(e) => unavailable(&e),
                }
            }
            _ => page(405, "method not allowed", "<p>Use GET or POST.</p>"),
        }
    }

    /// The callback of a login that approves a device flow: records who signed in, so the
    /// device's next poll gets the session; the user code is spent.
    pub(super) async fn approve(&self, key: &str, signed_in: SignedIn, device: String) -> Outcome {
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
}
