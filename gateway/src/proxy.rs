//! The Pingora `ProxyHttp`: thin phases over the gateway's parts. `request_filter` gives the
//! request its id and audit context, parses its [`Route`] once, and either answers it here
//! ([`Endpoints`], a [`Reply`] written by `send`) or admits it to storage
//! ([`Registry::admit`]); the upstream phases rewrite it as admitted
//! ([`crate::registry::forward`]) and pick a storage node. Per-request state lives in
//! [`RequestCtx`].

use crate::audit::request::{Operation, RequestInfo};
use crate::cache::Answer;
use crate::cache::mirror::{mirror_challenge, mirror_scopes};
use crate::endpoints::{Endpoints, Incoming};
use crate::metrics::{Metrics, Served};
use crate::registry::authz::{Forward, Verdict};
use crate::registry::{Registry, forward};
use crate::reply::{Failure, Kind, Protocol, Reply};
use crate::route::Route;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The request id, returned to the client and sent to storage.
const REQUEST_ID_HEADER: &str = "x-request-id";
/// HTTP Strict Transport Security on every answer: browsers (the OIDC sign-in pages) never
/// come back over plain HTTP.
const HSTS: (&str, &str) = ("strict-transport-security", "max-age=31536000");
/// Largest request body the gateway reads itself (token requests, forms, the robots API).
pub const MAX_BODY: usize = 64 * 1024;

pub struct Gateway {
    /// Manifest reads answered from memory (`[manifest_cache]`), and told of every change.
    pub manifests: Option<Arc<crate::registry::manifests::ManifestCache>>,
    /// Pull-through caches: `/v2/` requests under their prefixes.
    pub caches: Arc<crate::cache::ProxyCaches>,
    /// Registry events (with `[[webhooks]]`): each change recorded before it is answered.
    pub events: Option<Arc<crate::events::delivery::Events>>,
    /// Manifest pulls told to storage (retention's `keep_pulled_days`).
    pub pulls: Arc<crate::registry::pulls::Pulls>,
    /// Blob reads answered from a co-located store's files (`[upstream] local_root`).
    pub local: Option<crate::registry::local::LocalBlobs>,
    /// Everything answered here.
    pub endpoints: Endpoints,
    /// Everything sent on to storage.
    pub registry: Registry,
    pub upstreams: Arc<LoadBalancer<RoundRobin>>,
    /// The internal secret (wiped from memory when dropped).
    pub secret: zeroize::Zeroizing<String>,
    pub idle_timeout: Duration,
    /// Seconds a client connection may wait for its next request (HTTP/1.1 keep-alive).
    pub client_idle_seconds: u64,
    pub metrics: Arc<Metrics>,
    /// Requests in flight, and whether the gateway drains.
    pub drain: Arc<crate::drain::Drain>,
    /// Connections waiting for their first request head (`edge::head`).
    pub heads: Arc<crate::edge::head::HeadDeadlines>,
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
    /// Storage nodes that failed this request (a retry goes to another one).
    failed_nodes: Vec<String>,
    /// The metrics' `route` label.
    route: &'static str,
    /// Upstream modifications decided by the bearer check.
    forward: Forward,
    /// A replacement body for the response (e.g. 412 → 403 for immutable tags).
    replace_body: Option<Bytes>,
    /// A manifest read storage answers, to keep in memory.
    keeping: Option<Keeping>,
    /// A repository read without a generation: one is made if storage has the manifest.
    generation_for: Option<String>,
    /// Counts the request in flight while it lives (a draining gateway waits for it).
    _in_flight: crate::drain::InFlight,
}

/// Storage's answer to a manifest `GET`, being read to keep it.
struct Keeping {
    repo: String,
    reference: String,
    /// The repository's generation, read before storage was asked.
    generation: crate::registry::manifests::Generation,
    /// From the answer's head (none yet: not an answer to keep).
    head: Option<(String, String)>,
    body: Vec<u8>,
}

/// Writes a reply of the gateway's own: the one place every such answer goes through. It
/// gets the request's id, HSTS, and `Cache-Control: no-store` (tokens, sign-in pages and
/// errors are never to be cached).
async fn send(session: &mut Session, reply: Reply) -> Result<bool> {
    let mut h = ResponseHeader::build(reply.status, Some(6 + reply.headers.len()))?;
    h.insert_header("content-type", reply.content_type)?;
    h.insert_header("content-length", reply.body.len().to_string())?;
    h.insert_header("docker-distribution-api-version", "registry/2.0")?;
    h.insert_header(HSTS.0, HSTS.1)?;
    h.insert_header("cache-control", "no-store")?;
    if let Some(id) = session.req_header().headers.get(REQUEST_ID_HEADER) {
        h.insert_header(REQUEST_ID_HEADER, id.clone())?;
    }
    for (k, v) in &reply.headers {
        // Appended (a reply may set several cookies): the headers above are `send`'s alone.
        debug_assert!(
            ![
                "content-type",
                "content-length",
                "cache-control",
                HSTS.0,
                REQUEST_ID_HEADER
            ]
            .contains(k),
            "a reply sets {k} itself"
        );
        h.append_header(*k, v.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    let body = Bytes::from(reply.body);
    session
        .write_response_header(Box::new(h), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(true)
}

impl Gateway {
    /// Records the event of a change storage made (a manifest pushed, a tag moved or
    /// deleted) before the client hears of it. If it cannot be recorded, the client is
    /// answered 503 instead, and retries: the change is then recorded with the retry (an event
    /// lost with a change the client believes done would be a change no webhook hears of).
    async fn record_event(
        &self,
        events: &crate::events::delivery::Events,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let req = session.req_header();
        let header = |k: &str| req.headers.get(k).and_then(|v| v.to_str().ok());
        let Some(event) = crate::events::Event::of(
            &ctx.op,
            &ctx.info,
            resp.status.as_u16(),
            header("content-type"),
            header("content-length").and_then(|v| v.parse().ok()),
            header("host").or_else(|| req.uri.authority().map(|a| a.as_str())),
        ) else {
            return Ok(());
        };
        // Nothing of the session is held across the write.
        let Err(e) = events.record(&event).await else {
            return Ok(());
        };
        tracing::error!(request_id = %ctx.info.request_id, error = %e, "a registry event cannot be recorded; the change is answered 503");
        crate::audit::record(
            "event-record",
            "failure",
            serde_json::json!({"repository": event.repository, "event.reason": e.to_string()}),
        );
        answered_503(resp, ctx)
    }
}

/// Storage made a change the gateway cannot account for: the client gets 503 (and retries)
/// instead of storage's 201 or 202. Those have no body, and the proxy writes none after an
/// empty head: the 503 has none either (a body would never be sent).
fn answered_503(resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
    resp.set_status(503)?;
    for h in [
        "docker-content-digest",
        "location",
        "oci-subject",
        "content-type",
        "transfer-encoding",
    ] {
        resp.remove_header(h);
    }
    resp.insert_header("content-length", "0")?;
    resp.insert_header("retry-after", "1")?;
    ctx.replace_body = None;
    Ok(())
}

/// The request's cookies as one `Cookie` value: an HTTP/2 browser sends each in a field of
/// its own (RFC 9113 §8.2.3), to be joined with `; `.
fn cookies(headers: &http::HeaderMap) -> Option<String> {
    let all: Vec<&str> = headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!all.is_empty()).then(|| all.join("; "))
}

/// The request as an endpoint reads it, its body too when the route takes one; `None` when
/// the body is over [`MAX_BODY`].
async fn incoming(session: &mut Session, route: Route) -> Result<Option<Incoming>> {
    let req = session.req_header();
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut incoming = Incoming {
        method: req.method.as_str().to_owned(),
        path: req.uri.path().to_owned(),
        query: req.uri.query().map(str::to_owned),
        authorization: header("authorization"),
        cookies: cookies(&req.headers),
        host: header("host")
            .or_else(|| req.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into()),
        source: client_ip(session),
        body: Vec::new(),
    };
    if route.reads_body(&incoming.method) {
        while let Some(chunk) = session.read_request_body().await? {
            if incoming.body.len() + chunk.len() > MAX_BODY {
                return Ok(None);
            }
            incoming.body.extend_from_slice(&chunk);
        }
    }
    Ok(Some(incoming))
}

impl Gateway {
    /// Everything `request_filter` does, inside the request's audit context and span:
    /// answered here (`Ok(true)`) or sent on to storage (`Ok(false)`).
    async fn route_request(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let mirror = match self.caches.is_empty() {
            true => None,
            false => self.to_mirror(session)?,
        };
        let req = session.req_header();
        let route = Route::parse(req.method.as_str(), req.uri.path());
        ctx.route = route.label();
        if route != Route::Registry {
            let reply = match incoming(session, route).await? {
                Some(mut req) => {
                    // A token asked for on a mirror is for the names its requests become.
                    if let (Some(prefix), Route::Token) = (&mirror, route) {
                        req.query = req.query.map(|q| mirror_scopes(prefix, &q));
                        if !req.body.is_empty() {
                            let body = String::from_utf8_lossy(&req.body).into_owned();
                            req.body = mirror_scopes(prefix, &body).into_bytes();
                        }
                    }
                    self.endpoints.answer(route, &req).await
                }
                None => Failure::body_too_large().reply(route.protocol()),
            };
            return send(session, reply).await;
        }
        let source = ctx.info.source_ip.clone();
        let verdict = self
            .registry
            .admit(session.req_header(), &mut ctx.op, source.as_deref())
            .await;
        match verdict {
            Verdict::Forward { route, forward } => {
                ctx.route = route;
                ctx.op.break_glass = forward.override_immutable;
                ctx.forward = forward;
                if self.answer_from_memory(session, ctx).await? {
                    return Ok(true);
                }
                if !self.caches.is_empty() && self.through_cache(session, ctx).await? {
                    return Ok(true);
                }
                self.answer_from_files(session, ctx).await
            }
            Verdict::Respond { route, mut failure } => {
                ctx.route = route;
                // On a mirror, the client is sent to the mirror's token service, for the
                // names it asked for.
                if let Some(prefix) = &mirror {
                    let host = session
                        .req_header()
                        .headers
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("localhost")
                        .to_owned();
                    for (k, v) in failure.headers.iter_mut() {
                        if *k == "www-authenticate" {
                            *v = mirror_challenge(prefix, &host, v);
                        }
                    }
                }
                send(session, failure.reply(Protocol::Registry)).await
            }
        }
    }
}

impl Gateway {
    /// An admitted manifest read answered from memory (`Ok(true)`) when this gateway keeps
    /// it under the repository's current generation; otherwise what storage answers is to be
    /// kept (`ctx.keeping`).
    async fn answer_from_memory(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        use crate::registry::manifests::{Lookup, accepts};
        let Some(m) = &self.manifests else {
            return Ok(false);
        };
        let Some(oci::Endpoint::GetManifest {
            name,
            reference,
            head,
        }) = &ctx.op.endpoint
        else {
            return Ok(false);
        };
        if self.caches.covers(name.as_str()) {
            return Ok(false);
        }
        let (repo, reference, head) = (name.to_string(), reference.to_string(), *head);
        let reads = &crate::metrics::cache().manifest_reads;
        match m.lookup(&repo, &reference).await {
            // A tag's manifest of a type the client does not take: storage says so.
            Lookup::Hit(k)
                if reference.contains(':')
                    || accepts(&session.req_header().headers, &k.media_type) =>
            {
                reads.with_label_values(&["memory"]).inc();
                let mut h = ResponseHeader::build(200, Some(8))?;
                h.insert_header("content-type", k.media_type.as_str())?;
                h.insert_header("content-length", k.body.len().to_string())?;
                h.insert_header("docker-content-digest", k.digest.as_str())?;
                h.insert_header("etag", format!("\"{}\"", k.digest))?;
                h.insert_header("docker-distribution-api-version", "registry/2.0")?;
                h.insert_header(REQUEST_ID_HEADER, ctx.info.request_id.as_str())?;
                h.insert_header(HSTS.0, HSTS.1)?;
                ctx.op.digest = Some(k.digest.clone());
                session.write_response_header(Box::new(h), head).await?;
                if !head {
                    ctx.op.bytes_out += k.body.len() as u64;
                    session.write_response_body(Some(k.body), true).await?;
                }
                Ok(true)
            }
            Lookup::Hit(_) => Ok(false),
            Lookup::Miss(generation) => {
                reads.with_label_values(&["storage"]).inc();
                match generation {
                    Some(generation) if !head => {
                        ctx.keeping = Some(Keeping {
                            repo,
                            reference,
                            generation,
                            head: None,
                            body: Vec::new(),
                        });
                    }
                    Some(_) => {}
                    None => ctx.generation_for = Some(repo),
                }
                Ok(false)
            }
            Lookup::Unavailable => {
                reads.with_label_values(&["unavailable"]).inc();
                Ok(false)
            }
        }
    }

    /// A manifest pushed (201) or deleted (202): a new generation of its repository for every
    /// gateway, before the client hears of it. If it cannot be written the client is answered
    /// 503 and retries (another gateway would go on serving what was there before).
    async fn note_change(
        &self,
        manifests: &crate::registry::manifests::ManifestCache,
        status: u16,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A delete answered 404 may follow one whose generation was not written: cheap to
        // write again.
        let repo = match (&ctx.op.endpoint, status) {
            (Some(oci::Endpoint::PutManifest { name, .. }), 201)
            | (Some(oci::Endpoint::DeleteManifest { name, .. }), 202 | 404) => name.to_string(),
            _ => return Ok(()),
        };
        let Err(e) = manifests.changed(&repo).await else {
            return Ok(());
        };
        tracing::error!(request_id = %ctx.info.request_id, error = %e, "a repository's manifest generation cannot be written; the change is answered 503");
        answered_503(resp, ctx)
    }

    /// A request on a pull-through cache's mirror listener or host name names upstream
    /// repositories without the cache's prefix: the prefix is put in front, before anything
    /// reads the path (so the bearer check, the token's scope and the audit see the local
    /// name). The mirror's prefix when the request came through one.
    fn to_mirror(&self, session: &mut Session) -> Result<Option<String>> {
        let req = session.req_header();
        let port = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.port());
        let host = req
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        let Some(prefix) = self.caches.mirror_prefix(port, host) else {
            return Ok(None);
        };
        let Some(rest) = req.uri.path().strip_prefix("/v2/") else {
            return Ok(Some(prefix));
        };
        if rest.is_empty() || rest.starts_with('_') {
            return Ok(Some(prefix));
        }
        let mut uri = format!("/v2/{prefix}/{rest}");
        if let Some(q) = req.uri.query() {
            uri.push('?');
            uri.push_str(q);
        }
        let uri = uri
            .parse::<http::Uri>()
            .map_err(|e| Error::explain(ErrorType::InvalidHTTPHeader, e.to_string()))?;
        session.req_header_mut().set_uri(uri);
        Ok(Some(prefix))
    }

    /// An admitted blob read answered from a co-located store's files (`Ok(true)`), or left
    /// to storage (`Ok(false)`: no `local_root`, not a blob read, or nothing certain to
    /// answer: [`crate::registry::local`]).
    async fn answer_from_files(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(oci::Endpoint::GetBlob { name, digest, head }) = &ctx.op.endpoint else {
            return Ok(false);
        };
        let reads = &crate::metrics::cache().blob_reads;
        let Some(local) = &self.local else {
            reads.with_label_values(&["storage"]).inc();
            return Ok(false);
        };
        let range = range_header(session);
        let head = *head;
        let Some(blob) = local.open(name, digest, range.as_deref(), head).await else {
            reads.with_label_values(&["storage"]).inc();
            return Ok(false);
        };
        reads.with_label_values(&["files"]).inc();
        let len = blob.answered_len();
        let status = if blob.range.is_some() { 206 } else { 200 };
        let mut h = blob_head(session, status, len, &blob.digest)?;
        h.insert_header("etag", format!("\"{}\"", blob.digest))?;
        h.insert_header("cache-control", "max-age=31536000")?;
        if let Some((a, b)) = blob.range {
            h.insert_header("content-range", format!("bytes {a}-{b}/{}", blob.size))?;
        }
        let empty = head || len == 0;
        session.write_response_header(Box::new(h), empty).await?;
        if empty {
            return Ok(true);
        }
        let mut body = blob.body();
        let mut left = len;
        while left > 0 {
            let chunk = match body.next().await {
                Some(Ok(chunk)) => chunk,
                failed => {
                    // The head went out: the body must not end as if it were whole.
                    let why = match failed {
                        Some(Err(e)) => format!("reading the blob's file: {e}"),
                        _ => "the blob's file ended early".to_owned(),
                    };
                    ctx.op.aborted = true;
                    ctx.op.reason = Some(why.clone());
                    return Err(Error::explain(ErrorType::HTTPStatus(500), why));
                }
            };
            let n = chunk.len() as u64;
            left -= n;
            if let Err(e) = session.write_response_body(Some(chunk), left == 0).await {
                ctx.op.aborted = true;
                return Err(e);
            }
            ctx.op.bytes_out += n;
        }
        Ok(true)
    }

    /// A request the bearer check admitted, under a cache prefix: answered here from the
    /// upstream (`Ok(true)`), or forwarded to storage (`Ok(false)`).
    async fn through_cache(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(endpoint) = ctx.op.endpoint.clone() else {
            return Ok(false);
        };
        let range = range_header(session);
        let Some((answer, outcome)) = self.caches.answer(&endpoint, range.as_deref()).await else {
            return Ok(false);
        };
        ctx.op.cache = Some(outcome.label());
        match answer {
            Answer::Forward => Ok(false),
            Answer::Fail(failure) => {
                ctx.op.reason = Some(failure.message.clone());
                send(session, failure.reply(Protocol::Registry)).await
            }
            Answer::Head { digest, size } => {
                let h = blob_head(session, 200, size, &digest)?;
                session.write_response_header(Box::new(h), true).await?;
                Ok(true)
            }
            Answer::Stream(mut s) => {
                let (status, len) = match s.range {
                    Some((a, b)) => (206, b - a + 1),
                    None => (200, s.size),
                };
                let mut h = blob_head(session, status, len, &s.digest)?;
                if let Some((a, b)) = s.range {
                    h.insert_header("content-range", format!("bytes {a}-{b}/{}", s.size))?;
                }
                session.write_response_header(Box::new(h), len == 0).await?;
                loop {
                    let chunk = match s.reader.next().await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => break,
                        Err(e) => {
                            // The head went out: the body must not end as if it were whole
                            // (`fail_to_proxy` writes nothing more).
                            ctx.op.aborted = true;
                            ctx.op.cache = Some(crate::cache::Outcome::Error.label());
                            ctx.op.reason = Some(format!("pull-through cache: {e}"));
                            return Err(Error::explain(
                                ErrorType::HTTPStatus(502),
                                format!("pull-through cache: {e}"),
                            ));
                        }
                    };
                    ctx.op.bytes_out += chunk.len() as u64;
                    session
                        .write_response_body(Some(chunk), s.reader.finished())
                        .await?;
                }
                Ok(true)
            }
        }
    }
}

/// The request's `Range` header, if it is text.
fn range_header(session: &Session) -> Option<String> {
    session
        .req_header()
        .headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The head of a blob answered by a pull-through cache or from a store's files.
fn blob_head(
    session: &Session,
    status: u16,
    len: u64,
    digest: &oci::Digest,
) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(8))?;
    h.insert_header("content-type", "application/octet-stream")?;
    h.insert_header("content-length", len.to_string())?;
    h.insert_header("docker-content-digest", digest.to_string())?;
    h.insert_header("accept-ranges", "bytes")?;
    h.insert_header("docker-distribution-api-version", "registry/2.0")?;
    h.insert_header(HSTS.0, HSTS.1)?;
    if let Some(id) = session.req_header().headers.get(REQUEST_ID_HEADER) {
        h.insert_header(REQUEST_ID_HEADER, id.clone())?;
    }
    Ok(h)
}

/// The status a request that could not be proxied ends with (0: the client went away, no
/// answer).
fn status_of(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(c) => *c,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            _ => 500,
        },
    }
}

/// What the client is told when its request could not be proxied (`None`: nobody to tell).
fn proxy_failure(code: u16) -> Option<Failure> {
    let (kind, msg) = match code {
        0 => return None,
        502 | 503 => (Kind::Unavailable, "storage is unavailable, try again"),
        400 => (Kind::Invalid(oci::ErrorCode::Unknown), "bad request"),
        _ => (Kind::Internal, "internal error"),
    };
    Some(Failure::new(code, kind, msg))
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

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            info: Arc::default(),
            op: Operation::default(),
            node: None,
            failed_nodes: Vec::new(),
            route: "other",
            forward: Forward::default(),
            replace_body: None,
            keeping: None,
            generation_for: None,
            _in_flight: self.drain.request(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(d) = session.digest().and_then(|d| d.socket_digest.as_ref()) {
            self.heads.arrived(d);
        }
        // Pingora waits for the next request on a keep-alive connection as long as the client
        // asks (`Keep-Alive: timeout=`), by default for ever; ours bounds it. A connection the
        // client (or HTTP/1.0) does not keep alive stays so.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.client_idle_seconds));
        }
        // A draining gateway closes each HTTP/1.1 connection after its answer
        // (`Connection: close`): the client's next request opens a new one, which the load
        // balancer sends to a gateway that is ready. (HTTP/2 connections get a GOAWAY when the
        // listeners close.)
        if self.drain.draining() {
            session.set_keepalive(None);
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
        let Some(backend) = self.pick_node(&ctx.failed_nodes) else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "every storage node failed the request",
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
        forward::request(&ctx.forward, upstream, &self.secret, client_ip(session))
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.replace_body = forward::response(&ctx.forward, resp, &mut ctx.op)?;
        // Both from storage's own answer: either failing makes it a 503, and neither is
        // skipped because the other did.
        let status = resp.status.as_u16();
        if let Some(events) = &self.events {
            self.record_event(events, session, resp, ctx).await?;
        }
        if let Some(m) = &self.manifests {
            self.note_change(m, status, resp, ctx).await?;
            if let Some(repo) = ctx.generation_for.take()
                && status == 200
            {
                m.start(&repo).await;
            }
        }
        if let Some(k) = &mut ctx.keeping {
            let header = |n: &str| resp.headers.get(n).and_then(|v| v.to_str().ok());
            let len = header("content-length").and_then(|v| v.parse::<usize>().ok());
            match (
                resp.status.as_u16(),
                len,
                header("docker-content-digest"),
                header("content-type"),
            ) {
                (200, Some(len), Some(d), Some(t))
                    if len <= crate::registry::manifests::MAX_ENTRY =>
                {
                    k.head = Some((d.to_owned(), t.to_owned()));
                    k.body.reserve_exact(len);
                }
                _ => ctx.keeping = None,
            }
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
        if let Some(k) = &mut ctx.keeping {
            if let Some(b) = body {
                k.body.extend_from_slice(b);
            }
            if end_of_stream
                && let (Some(m), Some(k)) = (&self.manifests, ctx.keeping.take())
                && let Some((digest, media_type)) = k.head
            {
                m.remember(
                    &k.repo,
                    &k.reference,
                    crate::registry::manifests::Kept {
                        digest,
                        media_type,
                        body: Bytes::from(k.body),
                    },
                    k.generation,
                );
            }
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let node = peer._address.to_string();
        self.metrics
            .upstream_errors
            .with_label_values(&[&node, "connect"])
            .inc();
        ctx.failed_nodes.push(node);
        // Nothing was sent yet: another node can take the request (this one is not picked
        // again for it — `failed_nodes` — nor for any once its health check fails).
        e.set_retry(true);
        e
    }

    /// A node that fails a request while it is being proxied (one going away, a pooled
    /// connection it closed): see [`may_retry`]. A node that failed on a fresh connection is
    /// not picked again for the request; one that failed on a pooled connection may be, on a
    /// fresh one (a stale connection to a healthy node, the only node of `gateway dev`).
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let retry = may_retry(
            &session.req_header().method,
            session.response_written().is_some(),
            session.as_ref().retry_buffer_truncated(),
            e.esource(),
            e.etype(),
        );
        e.set_retry(retry);
        if retry {
            let node = peer._address.to_string();
            self.metrics
                .upstream_errors
                .with_label_values(&[&node, "retried"])
                .inc();
            if !client_reused {
                ctx.failed_nodes.push(node);
            }
        }
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
        let code = status_of(e);
        // Once a head was written, anything more would be read as the rest of its body.
        if session.response_written().is_none()
            && let Some(failure) = proxy_failure(code)
        {
            let _ = send(session, failure.reply(Protocol::Registry)).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        let repository = ctx.op.endpoint.as_ref().and_then(|e| e.repository());
        self.metrics.served(&Served {
            route: ctx.route,
            method: session.req_header().method.as_str(),
            status,
            bytes_in: ctx.op.bytes_in,
            bytes_out: ctx.op.bytes_out,
            repository: repository.map(|r| r.as_str()),
            elapsed,
        });
        ctx.op.finish(&ctx.info, status, elapsed);
        // A pull: a manifest read answered 200 whose answer went out whole.
        if let (Some(oci::Endpoint::GetManifest { name, .. }), 200, false, None, Some(digest)) =
            (&ctx.op.endpoint, status, ctx.op.aborted, e, &ctx.op.digest)
        {
            self.pulls.pulled(name.as_str(), digest);
        }
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.info.request_id, route = ctx.route, status, error = %e, "request failed");
        } else {
            tracing::debug!(request_id = %ctx.info.request_id, route = ctx.route, status, "request");
        }
    }
}

/// Whether a request that failed while proxied (after its connection to a node was made)
/// goes to a node again: only a `GET` or `HEAD` (storage does nothing twice for them) whose
/// answer has not started, whose body (if any) Pingora still holds whole, failed by the node
/// — not by a timeout, which a retry would only repeat. Anything else may have been carried
/// out: a `PUT`, `DELETE`, `POST` or `PATCH` is never sent twice (a second `DELETE` would
/// answer 404 for a delete that happened, and lose its event).
fn may_retry(
    method: &http::Method,
    answer_started: bool,
    body_truncated: bool,
    source: &ErrorSource,
    kind: &ErrorType,
) -> bool {
    (*method == http::Method::GET || *method == http::Method::HEAD)
        && !answer_started
        && !body_truncated
        && *source == ErrorSource::Upstream
        && !matches!(kind, ErrorType::ReadTimedout | ErrorType::WriteTimedout)
}

impl Gateway {
    /// A storage node for the request: a healthy one that has not failed it; else one the
    /// health check has not passed (yet — a node back from a restart is up before the next
    /// check says so) that has not failed it; none when every node has.
    fn pick_node(&self, failed: &[String]) -> Option<pingora::lb::Backend> {
        let untried = |b: &pingora::lb::Backend| !failed.contains(&b.addr.to_string());
        let first = self.upstreams.select(b"", 256);
        if failed.is_empty() && first.is_some() {
            return first;
        }
        // Round robin: as many picks as there are nodes reach every healthy one (other
        // requests' picks in between may repeat one; twice as many is plenty).
        let all = self.upstreams.backends().get_backend();
        let spread = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        first
            .into_iter()
            .chain((0..2 * all.len()).filter_map(|_| self.upstreams.select(b"", 256)))
            .find(untried)
            .or_else(|| {
                // Spread over the untried ones, not all on the first.
                let left: Vec<_> = all.iter().filter(|b| untried(b)).collect();
                (!left.is_empty()).then(|| left[spread % left.len()].clone())
            })
    }
}

#[cfg(test)]
mod tests {
    use pingora::{ErrorSource, ErrorType};

    #[test]
    fn only_reads_whose_answer_has_not_started_are_retried() {
        use http::Method;
        let up = ErrorSource::Upstream;
        let closed = ErrorType::ConnectionClosed;
        assert!(super::may_retry(&Method::GET, false, false, &up, &closed));
        assert!(super::may_retry(
            &Method::HEAD,
            false,
            false,
            &up,
            &ErrorType::ReadError
        ));
        for m in [Method::PUT, Method::DELETE, Method::POST, Method::PATCH] {
            assert!(!super::may_retry(&m, false, false, &up, &closed), "{m}");
        }
        assert!(
            !super::may_retry(&Method::GET, true, false, &up, &closed),
            "answer started"
        );
        assert!(
            !super::may_retry(&Method::GET, false, true, &up, &closed),
            "body lost"
        );
        assert!(!super::may_retry(
            &Method::GET,
            false,
            false,
            &ErrorSource::Downstream,
            &closed
        ));
        assert!(!super::may_retry(
            &Method::GET,
            false,
            false,
            &up,
            &ErrorType::ReadTimedout
        ));
    }

    #[test]
    fn cookies_sent_in_several_fields_are_all_read() {
        let mut h = http::HeaderMap::new();
        assert_eq!(super::cookies(&h), None);
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2; c=3".parse().unwrap());
        assert_eq!(super::cookies(&h).as_deref(), Some("a=1; b=2; c=3"));
    }
}
