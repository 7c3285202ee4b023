//! The Pingora `ProxyHttp`: a thin sequence of calls into the token service, the bearer
//! check (`authz`), and the upstream selection. Per-request state lives in [`RequestCtx`].

use crate::audit::request::{Operation, RequestInfo};
use crate::metrics::Metrics;
use crate::registry::authz::{self, Verdict};
use crate::token::{self, TokenService};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use service::hop::{
    INTERNAL_SECRET_HEADER, OVERRIDDEN_HEADER, PREVIOUS_DIGEST_HEADER, PROTECTION_HEADER,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The request id, returned to the client and sent to storage.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// HTTP Strict Transport Security on every answer: browsers (the OIDC sign-in pages) never
/// come back over plain HTTP.
const HSTS: (&str, &str) = ("strict-transport-security", "max-age=31536000");
/// Largest token request body read.
const MAX_TOKEN_BODY: usize = 64 * 1024;

pub struct Gateway {
    pub tokens: Arc<TokenService>,
    pub authz: authz::Authz,
    pub upstreams: Arc<LoadBalancer<RoundRobin>>,
    /// The internal secret (wiped from memory when dropped).
    pub secret: zeroize::Zeroizing<String>,
    pub idle_timeout: Duration,
    /// Seconds a client connection may wait for its next request (HTTP/1.1 keep-alive).
    pub client_idle_seconds: u64,
    pub metrics: Arc<Metrics>,
    pub oidc: Option<Arc<crate::auth::oidc::Oidc>>,
}

/// What a request carries from one phase to the next.
pub struct RequestCtx {
    started: Instant,
    /// The request's fields (its id too) for audit events (set at the start of `request_filter`).
    info: Arc<RequestInfo>,
    /// What the audit event of a `/v2/` request needs.
    op: Operation,
    /// The storage node chosen for the request.
    node: Option<String>,
    route: &'static str,
    /// Upstream modifications decided by the bearer check.
    forward: authz::Forward,
    /// A replacement body for the response (e.g. 412 → 403 for immutable tags).
    replace_body: Option<Bytes>,
}

async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(&str, String)],
) -> Result<bool> {
    let mut h = ResponseHeader::build(status, Some(5 + extra.len()))?;
    h.insert_header("content-type", content_type)?;
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header("docker-distribution-api-version", "registry/2.0")?;
    h.insert_header(HSTS.0, HSTS.1)?;
    if let Some(id) = session.req_header().headers.get(REQUEST_ID_HEADER) {
        h.insert_header(REQUEST_ID_HEADER, id.clone())?;
    }
    for (k, v) in extra {
        h.insert_header(k.to_string(), v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(true)
}

/// The body of a token-service request; `None` if it exceeds [`MAX_TOKEN_BODY`].
async fn read_small_body(session: &mut Session) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_TOKEN_BODY {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The parts of a request the token service reads, owned, so the body can be read after.
struct RequestParts {
    method: String,
    query: Option<String>,
    authorization: Option<String>,
    body: Vec<u8>,
    source: Option<String>,
}

impl RequestParts {
    /// Method, query and `Authorization` of the request; no body yet.
    fn of(session: &Session) -> Self {
        let req = session.req_header();
        RequestParts {
            method: req.method.as_str().to_owned(),
            query: req.uri.query().map(str::to_owned),
            authorization: req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: Vec::new(),
            source: client_ip(session),
        }
    }

    fn as_request(&self) -> token::Request<'_> {
        token::Request {
            method: &self.method,
            query: self.query.as_deref(),
            authorization: self.authorization.as_deref(),
            body: &self.body,
            source: self.source.as_deref(),
        }
    }
}

/// The body of a `POST` (empty for other methods); `None` if it exceeds [`MAX_TOKEN_BODY`].
async fn post_body(session: &mut Session) -> Result<Option<Vec<u8>>> {
    if session.req_header().method != http::Method::POST {
        return Ok(Some(Vec::new()));
    }
    read_small_body(session).await
}

async fn body_too_large(session: &mut Session) -> Result<bool> {
    let body = br#"{"error":"invalid_request","error_description":"request body too large"}"#;
    respond(
        session,
        413,
        "application/json",
        Bytes::from_static(body),
        &[],
    )
    .await
}

impl Gateway {
    /// `/auth/oidc/login` and `/auth/oidc/callback`.
    async fn oidc_endpoint(&self, session: &mut Session, path: &str) -> Result<bool> {
        let html = "text/html; charset=utf-8";
        let Some(oidc) = self.oidc.clone() else {
            let body = Bytes::from_static(b"single sign-on is not configured on this registry");
            return respond(session, 404, "text/plain", body, &[]).await;
        };
        let host = host_of(session);
        let req = session.req_header();
        let query = req.uri.query().unwrap_or("").to_string();
        let cookies = req
            .headers
            .get("cookie")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if path == crate::auth::oidc::LOGIN_PATH {
            let device = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "device")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            return match oidc.start(&host, &device).await {
                Ok((location, cookie)) => {
                    let extra = [
                        ("location", location),
                        ("set-cookie", cookie),
                        ("cache-control", "no-store".to_string()),
                    ];
                    respond(session, 302, html, Bytes::new(), &extra).await
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "starting an OIDC login failed");
                    let body = Bytes::from_static(
                        b"the identity provider is unavailable, try again later",
                    );
                    respond(session, 503, "text/plain", body, &[]).await
                }
            };
        }
        if path == crate::auth::oidc::VERIFY_PATH {
            let method = req.method.as_str().to_owned();
            let Some(body) = post_body(session).await? else {
                return body_too_large(session).await;
            };
            let page = oidc
                .verify_page(&host, &method, &query, &body, cookies.as_deref())
                .await;
            return respond(
                session,
                page.status,
                html,
                Bytes::from(page.body),
                &page.headers,
            )
            .await;
        }
        match oidc.finish(&query, cookies.as_deref()).await {
            crate::auth::oidc::Outcome::DeviceApproved(device) => {
                respond_page(session, crate::auth::oidc::device_approved_page(&device)).await
            }
            crate::auth::oidc::Outcome::LoggedIn(signed_in, device) => {
                let id = signed_in.identity;
                let mut s = token::refresh::Session::new(&id, "oidc", &device, token::unix_now());
                s.idp_refresh = signed_in.idp_refresh;
                let refresh = match self.tokens.open_session(&s).await {
                    Ok(t) => t,
                    Err(r) => return send_reply(session, r).await,
                };
                respond_page(
                    session,
                    crate::auth::oidc::success_page(&host, &id, &device, &refresh),
                )
                .await
            }
            crate::auth::oidc::Outcome::Refused(status, msg) => {
                tracing::info!(reason = %msg, "OIDC login refused");
                respond(
                    session,
                    status,
                    "text/plain; charset=utf-8",
                    Bytes::from(msg),
                    &[],
                )
                .await
            }
            crate::auth::oidc::Outcome::Unavailable(e) => {
                tracing::warn!(error = %e, "OIDC login failed: the identity provider is unavailable");
                let body =
                    Bytes::from_static(b"the identity provider is unavailable, try again later");
                respond(session, 503, "text/plain", body, &[]).await
            }
        }
    }

    /// `POST /auth/oidc/device`: RFC 8628 device authorization, backed by the IdP's.
    async fn device_endpoint(&self, session: &mut Session) -> Result<bool> {
        if session.req_header().method != http::Method::POST {
            let r = token::Reply::oauth_error(405, "invalid_request", "use POST");
            return send_reply(session, r).await;
        }
        let Some(body) = read_small_body(session).await? else {
            return body_too_large(session).await;
        };
        let field = |k: &str| {
            form_urlencoded::parse(&body)
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let device = field("device")
            .or_else(|| field("client_id"))
            .unwrap_or_default();
        let reply = match &self.oidc {
            None => token::Reply::oauth_error(
                404,
                "unsupported_grant_type",
                "single sign-on is not configured on this registry",
            ),
            Some(oidc) => match oidc.device_start(&host_of(session), &device).await {
                Ok(v) => token::Reply::json(200, v),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "starting a device flow failed");
                    token::Reply::oauth_error(
                        503,
                        "temporarily_unavailable",
                        "the identity provider is unavailable, try again later",
                    )
                }
            },
        };
        send_reply(session, reply).await
    }

    /// Everything `request_filter` does, inside the request's audit context and span.
    async fn route_request(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let path = session.req_header().uri.path().to_owned();
        if path == token::TOKEN_PATH {
            ctx.route = "token";
            return self.token_endpoint(session).await;
        }
        if path == token::REVOKE_PATH && session.req_header().method == http::Method::POST {
            ctx.route = "revoke";
            let Some(body) = read_small_body(session).await? else {
                return body_too_large(session).await;
            };
            let reply = self.tokens.revoke(&body).await;
            return send_reply(session, reply).await;
        }
        if path
            .strip_prefix(token::SESSIONS_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            ctx.route = "sessions";
            let req = RequestParts::of(session);
            let reply = self.tokens.sessions_api(&req.as_request(), &path).await;
            return send_reply(session, reply).await;
        }
        if path
            .strip_prefix(token::TOKENS_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            ctx.route = "tokens";
            let req = RequestParts::of(session);
            let reply = self.tokens.tokens_api(&req.as_request(), &path).await;
            return send_reply(session, reply).await;
        }
        if path
            .strip_prefix(crate::auth::robots::ROBOTS_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            ctx.route = "robots";
            let mut req = RequestParts::of(session);
            if matches!(req.method.as_str(), "POST" | "PATCH") {
                let Some(body) = read_small_body(session).await? else {
                    return body_too_large(session).await;
                };
                req.body = body;
            }
            let reply = self.tokens.robots_api(&req.as_request(), &path).await;
            return send_reply(session, reply).await;
        }
        if path == crate::auth::oidc::DEVICE_PATH {
            ctx.route = "oidc";
            return self.device_endpoint(session).await;
        }
        if path == crate::auth::oidc::LOGIN_PATH
            || path == crate::auth::oidc::CALLBACK_PATH
            || path == crate::auth::oidc::VERIFY_PATH
        {
            ctx.route = "oidc";
            return self.oidc_endpoint(session, &path).await;
        }
        if path == token::JWKS_PATH {
            ctx.route = "jwks";
            let body = self.tokens.tokens.jwks().to_string();
            return respond(session, 200, "application/json", Bytes::from(body), &[]).await;
        }
        if path != "/v2" && !path.starts_with("/v2/") {
            ctx.route = "unknown";
            let e = oci::OciError::new(oci::ErrorCode::Unsupported, "no such endpoint")
                .with_status(404);
            return respond(session, 404, "application/json", Bytes::from(e.body()), &[]).await;
        }
        if crate::audit::refusing_writes()
            && !matches!(
                session.req_header().method,
                http::Method::GET | http::Method::HEAD
            )
        {
            ctx.route = "refused";
            let e = oci::OciError::new(
                oci::ErrorCode::Unknown,
                "the audit trail cannot be delivered; writes are refused until it recovers",
            )
            .with_status(503);
            return respond(session, 503, "application/json", Bytes::from(e.body()), &[]).await;
        }
        let verdict = self.authz.check(session.req_header(), &mut ctx.op);
        if let Some(l) = self.registry_rate_limited(ctx).await {
            ctx.route = "limited";
            ctx.op.reason = Some(format!("rate limited ({})", l.by.name()));
            let e = oci::OciError::new(
                oci::ErrorCode::TooManyRequests,
                "too many requests, try again later",
            )
            .with_status(429);
            let retry = [("retry-after", l.retry_after.to_string())];
            return respond(
                session,
                429,
                "application/json",
                Bytes::from(e.body()),
                &retry,
            )
            .await;
        }
        match verdict {
            Verdict::Forward { route, forward } => {
                ctx.route = route;
                ctx.forward = forward;
                ctx.op.break_glass = ctx.forward.override_immutable;
                Ok(false)
            }
            Verdict::Respond {
                route,
                status,
                body,
                headers,
            } => {
                ctx.route = route;
                let extra: Vec<(&str, String)> =
                    headers.iter().map(|(k, v)| (*k, v.clone())).collect();
                respond(
                    session,
                    status,
                    "application/json",
                    Bytes::from(body),
                    &extra,
                )
                .await
            }
        }
    }

    /// The `/v2/` rate limits, per source and per identity (none by default). A limit the
    /// state store cannot count lets the request through.
    async fn registry_rate_limited(&self, ctx: &RequestCtx) -> Option<crate::limits::Limited> {
        let limits = &self.tokens.limits;
        let cfg = limits.config();
        if cfg.registry_per_minute_per_source == 0 && cfg.registry_per_minute_per_user == 0 {
            return None;
        }
        let user = ctx.op.user.as_ref().map(|u| u.name.as_str());
        limits
            .over_rate(
                crate::limits::Endpoint::Registry,
                ctx.info.source_ip.as_deref(),
                user,
            )
            .await
    }

    async fn token_endpoint(&self, session: &mut Session) -> Result<bool> {
        let mut req = RequestParts::of(session);
        let Some(body) = post_body(session).await? else {
            return body_too_large(session).await;
        };
        req.body = body;
        let reply = self.tokens.handle(&req.as_request()).await;
        self.metrics
            .token_requests
            .with_label_values(&[&reply.status.to_string()])
            .inc();
        send_reply(session, reply).await
    }
}

/// The client's address.
fn client_ip(session: &Session) -> Option<String> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
}

/// Gives the request its id (the client's `X-Request-Id` if it is a plain token of at most
/// 64 characters, a new one otherwise), set on the request so storage and every answer get
/// it, and its audit fields.
fn start_request(session: &mut Session, ctx: &mut RequestCtx) -> Result<Arc<RequestInfo>> {
    let req = session.req_header();
    let id = req
        .headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let info = Arc::new(RequestInfo {
        request_id: id,
        source_ip: client_ip(session),
        user_agent: req
            .headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(512).collect()),
        method: req.method.as_str().to_owned(),
        path: req.uri.path().chars().take(2048).collect(),
    });
    session
        .req_header_mut()
        .insert_header(REQUEST_ID_HEADER, info.request_id.as_str())?;
    ctx.info = info.clone();
    Ok(info)
}

/// A 200 HTML page that must not be cached (it may hold a token).
async fn respond_page(session: &mut Session, page: String) -> Result<bool> {
    let html = "text/html; charset=utf-8";
    let no_store = [("cache-control", "no-store".to_string())];
    respond(session, 200, html, Bytes::from(page), &no_store).await
}

/// The `Host` the client used (for URLs shown back to it).
fn host_of(session: &Session) -> String {
    let req = session.req_header();
    req.headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost")
        .to_string()
}

/// A token-service answer: JSON, never cached.
async fn send_reply(session: &mut Session, reply: token::Reply) -> Result<bool> {
    let mut extra = vec![("cache-control", "no-store".to_string())];
    if let Some(w) = reply.www_authenticate {
        extra.push(("www-authenticate", w));
    }
    if let Some(s) = reply.retry_after {
        extra.push(("retry-after", s.to_string()));
    }
    respond(
        session,
        reply.status,
        "application/json",
        Bytes::from(reply.body),
        &extra,
    )
    .await
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            info: Arc::default(),
            op: Operation::default(),
            node: None,
            route: "other",
            forward: authz::Forward::default(),
            replace_body: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora waits for the next request on a keep-alive connection as long as the client
        // asks (`Keep-Alive: timeout=`), by default for ever; ours bounds it. A connection the
        // client (or HTTP/1.0) does not keep alive stays so.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.client_idle_seconds));
        }
        let info = start_request(session, ctx)?;
        let span = tracing::info_span!("request", id = %ctx.info.request_id);
        crate::audit::CONTEXT
            .scope(info, self.route_request(session, ctx))
            .instrument(span)
            .await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(backend) = self.upstreams.select(b"", 256) else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no healthy storage node",
            ));
        };
        ctx.node = Some(backend.addr.to_string());
        let mut peer = HttpPeer::new(backend.addr.clone(), false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(self.idle_timeout);
        peer.options.write_timeout = Some(self.idle_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream.remove_header(INTERNAL_SECRET_HEADER);
        upstream.insert_header(INTERNAL_SECRET_HEADER, self.secret.as_str())?;
        // Only the gateway speaks for policy: a client's copy never reaches storage. Nor
        // does the client's token: storage has no use for it. (Cloned, not taken: Pingora
        // runs this filter again when it retries the request on another connection.)
        upstream.remove_header(PROTECTION_HEADER);
        upstream.remove_header("authorization");
        if let Some(p) = &ctx.forward.protection {
            upstream.insert_header(PROTECTION_HEADER, p.as_str())?;
        }
        // A client's own `If-None-Match: *` passes through (it only restricts).
        if ctx.forward.create_tag_only {
            upstream.insert_header("if-none-match", "*")?;
        }
        // Storage gets the request as it was authorized, never the client's URI; a request
        // that reached here without one was not authorized (fail closed).
        let Some(uri) = ctx.forward.uri.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "request forwarded without an authorized URI",
            ));
        };
        upstream.set_uri(uri);
        if let Some(ip) = client_ip(session) {
            let xff = match upstream
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            upstream.insert_header("x-forwarded-for", xff)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.op.previous_digest = resp
            .headers
            .get(PREVIOUS_DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        resp.remove_header(PREVIOUS_DIGEST_HEADER);
        if let Some(tag) = resp.remove_header(OVERRIDDEN_HEADER) {
            let tag = tag.to_str().unwrap_or("?").to_owned();
            tracing::warn!(subject = %ctx.forward.subject, tag = %tag, "override-immutable used to delete");
            ctx.op.break_glass = true;
            ctx.op.reason = Some(format!("override of the immutable tag {tag}"));
        }
        if ctx.forward.protection.is_some() && resp.status.as_u16() == 403 {
            ctx.op.immutable_denied = true;
            ctx.op.reason = Some("refused by tag immutability".into());
        }
        ctx.op.digest = resp
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if ctx.forward.create_tag_only && resp.status.as_u16() == 412 {
            let tag = ctx.forward.tag.clone().unwrap_or_default();
            ctx.op.immutable_denied = true;
            ctx.op.reason = Some(format!("tag {tag} is immutable and already exists"));
            let body = oci::OciError::new(
                oci::ErrorCode::Denied,
                format!("tag {tag} is immutable and already exists; push a new tag instead"),
            )
            .body();
            resp.set_status(403)?;
            resp.insert_header("content-length", body.len().to_string())?;
            resp.insert_header("content-type", "application/json")?;
            ctx.replace_body = Some(Bytes::from(body));
        }
        resp.insert_header(REQUEST_ID_HEADER, ctx.info.request_id.as_str())?;
        resp.insert_header(HSTS.0, HSTS.1)?;
        Ok(())
    }

    /// An HTTP/2 client may end its body with an empty DATA frame. Pingora 0.9 writes that
    /// last empty piece to a chunked HTTP/1.1 upstream as a chunk of size 0 — the terminator —
    /// and then terminates the body again; the five stray bytes reached storage as the start
    /// of the next request on the pooled connection, which then failed with a bare 400. An
    /// empty last piece is dropped here so only the one terminator is written.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) {
            *body = None;
        }
        ctx.op.bytes_in += body.as_ref().map_or(0, |b| b.len() as u64);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(replacement) = &ctx.replace_body {
            *body = end_of_stream.then(|| replacement.clone());
        }
        ctx.op.bytes_out += body.as_ref().map_or(0, |b| b.len() as u64);
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        _ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.metrics
            .upstream_errors
            .with_label_values(&[&peer._address.to_string(), "connect"])
            .inc();
        // Nothing was sent yet: another node can take the request (a dead node is skipped
        // by the next pick, and by every pick once its health check fails).
        e.set_retry(true);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let (ErrorSource::Upstream, Some(node)) = (e.esource(), &ctx.node) {
            self.metrics
                .upstream_errors
                .with_label_values(&[node, "proxy"])
                .inc();
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                _ => 500,
            },
        };
        if code > 0 {
            let msg = match code {
                502 | 503 => "storage is unavailable, try again",
                400 => "bad request",
                _ => "internal error",
            };
            let e = oci::OciError::new(oci::ErrorCode::Unknown, msg).with_status(code);
            let _ = respond(
                session,
                code,
                "application/json",
                Bytes::from(e.body()),
                &[],
            )
            .await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let method = session.req_header().method.as_str().to_owned();
        self.metrics
            .requests
            .with_label_values(&[ctx.route, &method, &status.to_string()])
            .inc();
        let elapsed = ctx.started.elapsed();
        let (bytes_in, bytes_out) = (ctx.op.bytes_in, ctx.op.bytes_out);
        self.metrics
            .request_bytes
            .with_label_values(&[ctx.route])
            .inc_by(bytes_in);
        self.metrics
            .response_bytes
            .with_label_values(&[ctx.route])
            .inc_by(bytes_out);
        if let Some(repo) = ctx.op.endpoint.as_ref().and_then(|e| e.repository()) {
            self.metrics
                .repository_bytes(repo.as_str(), bytes_in, bytes_out);
        }
        self.metrics
            .duration
            .with_label_values(&[ctx.route])
            .observe(elapsed.as_secs_f64());
        ctx.op.finish(&ctx.info, status, elapsed);
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.info.request_id, route = ctx.route, status, error = %e, "request failed");
        } else {
            tracing::debug!(request_id = %ctx.info.request_id, route = ctx.route, status, "request");
        }
    }
}
