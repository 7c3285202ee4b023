//! The gateway's own endpoints — every [`Route`] but `/v2/`: the token service and its
//! account APIs, the robots' admin API, the single sign-on flows and the JWKS. Pure over an
//! [`Incoming`] request (read by the proxy, body included), answering a [`Reply`]; nothing
//! here knows Pingora.

use crate::auth::oidc::{self, Oidc, Outcome};
use crate::metrics::Metrics;
use crate::reply::{Failure, Kind, Protocol, Reply};
use crate::route::Route;
use crate::token::{self, TokenService};
use std::sync::Arc;

pub use crate::incoming::Incoming;

impl Incoming {
    fn token_request(&self) -> token::Request<'_> {
        token::Request {
            method: &self.method,
            query: self.query.as_deref(),
            authorization: self.authorization.as_deref(),
            body: &self.body,
            source: self.source.as_deref(),
        }
    }

    fn query(&self) -> &str {
        self.query.as_deref().unwrap_or("")
    }
}

const IDP_UNAVAILABLE: &str = "the identity provider is unavailable, try again later";
const SSO_NOT_CONFIGURED: &str = "single sign-on is not configured on this registry";

pub struct Endpoints {
    pub tokens: Arc<TokenService>,
    /// The web console (`/ui/`).
    pub console: Arc<crate::console::Console>,
    /// OIDC sign-in, when configured.
    pub oidc: Option<Arc<Oidc>>,
    pub metrics: Arc<Metrics>,
}

impl Endpoints {
    pub async fn answer(&self, route: Route, req: &Incoming) -> Reply {
        let tokens = &self.tokens;
        match route {
            Route::Token => {
                let reply = tokens.handle(&req.token_request()).await;
                self.metrics
                    .token_requests
                    .with_label_values(&[&reply.status.to_string()])
                    .inc();
                reply
            }
            Route::Revoke => tokens.revoke(&req.body).await,
            Route::Sessions => tokens.sessions_api(&req.token_request(), &req.path).await,
            Route::Tokens => tokens.tokens_api(&req.token_request(), &req.path).await,
            Route::Robots => tokens.robots_api(&req.token_request(), &req.path).await,
            Route::Jwks => Reply::json(200, tokens.tokens.jwks()),
            Route::Device => self.device(req).await,
            Route::Login | Route::Callback | Route::Verify => match &self.oidc {
                None => {
                    Failure::new(404, Kind::NotConfigured, SSO_NOT_CONFIGURED).reply(Protocol::Page)
                }
                Some(oidc) => self.sign_in(oidc, route, req).await,
            },
            Route::Console => self.console.answer(req).await,
            Route::Registry | Route::Unknown => {
                Failure::new(404, Kind::Unsupported, "no such endpoint").reply(route.protocol())
            }
        }
    }

    /// `POST /auth/oidc/device`: RFC 8628 device authorization, backed by the IdP's.
    async fn device(&self, req: &Incoming) -> Reply {
        let oauth = |f: Failure| f.reply(Protocol::OAuth);
        if req.method != "POST" {
            return oauth(Failure::new(405, Kind::Unsupported, "use POST"));
        }
        let Some(oidc) = &self.oidc else {
            return oauth(Failure::new(404, Kind::NotConfigured, SSO_NOT_CONFIGURED));
        };
        let field = |k: &str| {
            form_urlencoded::parse(&req.body)
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let device = field("device")
            .or_else(|| field("client_id"))
            .unwrap_or_default();
        match oidc.device_start(&req.host, &device).await {
            Ok(v) => Reply::json(200, v),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "starting a device flow failed");
                oauth(Failure::new(503, Kind::Unavailable, IDP_UNAVAILABLE))
            }
        }
    }

    /// The browser's side of single sign-on: `/auth/oidc/login`, `/auth/oidc/callback` and
    /// `/auth/oidc/device/verify`.
    async fn sign_in(&self, oidc: &Oidc, route: Route, req: &Incoming) -> Reply {
        let page = |f: Failure| f.reply(Protocol::Page);
        let cookies = req.cookies.as_deref();
        match route {
            Route::Login => {
                let device = form_urlencoded::parse(req.query().as_bytes())
                    .find(|(k, _)| k == "device")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                match oidc.start(&req.host, &device).await {
                    Ok((location, cookie)) => oidc::login_redirect(location, cookie),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "starting an OIDC login failed");
                        page(Failure::new(503, Kind::Unavailable, IDP_UNAVAILABLE))
                    }
                }
            }
            Route::Verify => {
                oidc.verify_page(&req.host, &req.method, req.query(), &req.body, cookies)
                    .await
            }
            _ => match oidc.finish(req.query(), cookies).await {
                Outcome::DeviceApproved(device) => {
                    Reply::html(200, oidc::device_approved_page(&device))
                }
                Outcome::LoggedIn(signed_in, device) => {
                    let id = signed_in.identity.clone();
                    let s = token::refresh::Session::from_sso(
                        signed_in,
                        "oidc",
                        &device,
                        token::unix_now(),
                    );
                    match self.tokens.open_session(&s).await {
                        Ok(refresh) => {
                            Reply::html(200, oidc::success_page(&req.host, &id, &device, &refresh))
                        }
                        Err(r) => r,
                    }
                }
                Outcome::Console(signed_in) => self.console.sso_signed_in(signed_in).await,
                Outcome::Refused(status, msg) => {
                    tracing::info!(reason = %msg, "OIDC login refused");
                    page(Failure::new(status, Kind::Denied, msg))
                }
                Outcome::Unavailable(e) => {
                    tracing::warn!(error = %e, "OIDC login failed: the identity provider is unavailable");
                    page(Failure::new(503, Kind::Unavailable, IDP_UNAVAILABLE))
                }
            },
        }
    }
}
