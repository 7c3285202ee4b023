//! Another registry spoken to as a client — a pull-through cache's upstream, a replication
//! rule's target: its own auth (the Docker token flow from its `WWW-Authenticate` challenge,
//! or Basic), a deadline on every answer's head, and its answers sorted into what the caller
//! does with them ([`UpstreamError`]).

use anyhow::Context;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the upstream gave no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream cannot be reached: {0}")]
    Unreachable(String),
    #[error("the upstream did not answer within {0} s")]
    Timeout(u64),
    #[error("the upstream has no such manifest or blob")]
    NotFound,
    #[error("the upstream is rate limiting this registry (429)")]
    RateLimited(Option<u64>),
    #[error("the upstream refused this registry's credentials ({0})")]
    Denied(u16),
    #[error("the upstream answered {0}")]
    Status(u16),
    #[error("the upstream sent a bad answer: {0}")]
    Invalid(String),
    #[error("the cache's spill file failed: {0}")]
    Spill(String),
}

impl UpstreamError {
    /// The metrics' and audit trail's short name.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::NotFound => "not_found",
            UpstreamError::RateLimited(_) => "rate_limited",
            UpstreamError::Denied(_) => "denied",
            UpstreamError::Status(_) => "status",
            UpstreamError::Invalid(_) => "invalid",
            UpstreamError::Spill(_) => "spill",
        }
    }
}

/// How the upstream wants to be authenticated, as its last challenge said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Default)]
struct AuthState {
    challenge: Option<Challenge>,
    /// Bearer tokens by repository, with when they stop being used.
    tokens: HashMap<String, (zeroize::Zeroizing<String>, Instant)>,
}

/// At most this many repositories' tokens are kept (the oldest go first).
const TOKENS_KEPT: usize = 1024;

/// How to reach a registry: what a `[[proxy_cache]]` or `[[replication]]` table says.
pub struct RemoteSettings<'a> {
    /// Its base URL (`https://registry-1.docker.io`).
    pub url: &'a str,
    /// Credentials (Basic, or for its token service); none: anonymous.
    pub username: Option<&'a str>,
    pub password_file: Option<&'a std::path::Path>,
    /// PEM bundle of CAs its certificate may chain to (besides the system's).
    pub ca_file: Option<&'a std::path::Path>,
    /// Hosts of its token service, when not its own host, that may be sent the credentials.
    pub token_realm_hosts: &'a [String],
    /// How long it has to answer a request's head.
    pub timeout_seconds: u64,
    /// The actions asked of its token service for a repository: `pull`, or `pull,push` and
    /// `delete` for a replication target.
    pub actions: &'static str,
    pub user_agent: &'static str,
    /// Follow redirects (to `https` only from `https`, at most 5): a cache's upstream sends
    /// blobs to a CDN; a replication target, which is written to, is never redirected.
    pub follow_redirects: bool,
}

pub struct Upstream {
    base: reqwest::Url,
    uploads: reqwest::Client,
    actions: &'static str,
    http: reqwest::Client,
    credentials: Option<(String, zeroize::Zeroizing<String>)>,
    /// Token services (by host) the credentials may be sent to besides the upstream's own.
    realm_hosts: Vec<String>,
    timeout: Duration,
    auth: Mutex<AuthState>,
}

/// Largest token answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;
/// Redirects followed (registries send blobs to a CDN).
const MAX_REDIRECTS: usize = 5;

impl Upstream {
    pub fn new(cfg: &RemoteSettings<'_>) -> anyhow::Result<Self> {
        let base: reqwest::Url = cfg.url.trim_end_matches('/').parse()?;
        let https = base.scheme() == "https";
        let follow = cfg.follow_redirects;
        let roots = match cfg.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("parsing {}", ca.display()))?
            }
            None => Vec::new(),
        };
        let client = |read_timeout: Option<Duration>| {
            // A redirect never goes from https to plain http, nor on for ever.
            let redirects = reqwest::redirect::Policy::custom(move |attempt| {
                if !follow {
                    attempt.stop()
                } else if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if https && attempt.url().scheme() != "https" {
                    attempt.error("a redirect from https to plain http")
                } else {
                    attempt.follow()
                }
            });
            let mut b = reqwest::Client::builder()
                .redirect(redirects)
                .connect_timeout(Duration::from_secs(cfg.timeout_seconds))
                .user_agent(cfg.user_agent)
                .tcp_keepalive(Duration::from_secs(30))
                .pool_idle_timeout(Duration::from_secs(60));
            if let Some(t) = read_timeout {
                b = b.read_timeout(t);
            }
            for c in &roots {
                b = b.add_root_certificate(c.clone());
            }
            b.build()
        };
        let credentials = match (cfg.username, cfg.password_file) {
            (Some(u), Some(f)) => Some((
                u.to_owned(),
                zeroize::Zeroizing::new(service::secrets::read_secret_file(f)?),
            )),
            _ => None,
        };
        Ok(Upstream {
            base,
            // A body that stops coming for this long fails (a blob streams for as long as it
            // keeps coming).
            http: client(Some(Duration::from_secs(cfg.timeout_seconds.max(30))))?,
            // An upload's request: reqwest's read timeout would run while the body is sent.
            uploads: client(None)?,
            credentials,
            realm_hosts: cfg.token_realm_hosts.to_vec(),
            actions: cfg.actions,
            timeout: Duration::from_secs(cfg.timeout_seconds),
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// `<base>/v2/<repo>/<tail>`.
    pub fn v2_url(&self, repo: &str, tail: &str) -> String {
        format!("{}/v2/{repo}/{tail}", self.url())
    }

    pub fn url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// `method /v2/<repo>/<tail>` with the upstream's auth; a 401 is answered once (a token
    /// fetched, or Basic) and the request sent again. Only 200 and 206 come back as `Ok`.
    pub async fn send(
        &self,
        method: Method,
        repo: &str,
        tail: &str,
        accept: Option<&str>,
    ) -> Result<Response, UpstreamError> {
        let url = self.v2_url(repo, tail);
        let resp = self
            .request(method, repo, &url, |rb| match accept {
                Some(a) => rb.header(ACCEPT, a),
                None => rb,
            })
            .await?;
        classify(resp)
    }

    /// `method url` (a URL of this registry, for `repo`) as `build` makes it, with the
    /// registry's auth; a 401 is answered once (a token fetched, or Basic) and `build` called
    /// again. Any other answer comes back as it is.
    pub async fn request(
        &self,
        method: Method,
        repo: &str,
        url: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, UpstreamError> {
        for attempt in 0..2 {
            let rb = build(self.http.request(method.clone(), url));
            let rb = self.authorize(rb, repo);
            let resp = self.head_in_time(rb).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge)
                    .ok_or(UpstreamError::Denied(401))?;
                self.learn(challenge, repo).await?;
                continue;
            }
            return Ok(resp);
        }
        Err(UpstreamError::Denied(401))
    }

    /// A `Location` the registry sent (an upload's), as a URL: relative ones against its base;
    /// an absolute one only on its own scheme, host and port (the credentials go nowhere else).
    pub fn location(&self, location: &str) -> Result<reqwest::Url, UpstreamError> {
        let url = self
            .base
            .join(location)
            .map_err(|_| UpstreamError::Invalid("an unusable Location".into()))?;
        if url.origin() != self.base.origin() {
            return Err(UpstreamError::Invalid(
                "a Location on another host than the registry's".into(),
            ));
        }
        Ok(url)
    }

    /// An upload's request with a streamed body of `len` bytes, once (no body can be sent
    /// twice: the caller asks something of `repo` first, so the auth is known). The answer
    /// comes when the registry has the whole body: it must come within the head's deadline
    /// plus a second per MiB (the body at 1 MiB/s at least).
    pub async fn upload(
        &self,
        method: Method,
        repo: &str,
        url: &str,
        len: u64,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, UpstreamError> {
        let rb = self.authorize(build(self.uploads.request(method, url)), repo);
        let deadline = self.timeout + Duration::from_secs(len >> 20);
        match tokio::time::timeout(deadline, rb.send()).await {
            Err(_) => Err(UpstreamError::Timeout(deadline.as_secs())),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(without_url(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A body of the registry's, at most `max` bytes, within the head's deadline.
    pub async fn body(&self, resp: Response, max: usize) -> Result<Vec<u8>, UpstreamError> {
        tokio::time::timeout(self.timeout, read_capped(resp, max))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout.as_secs()))?
    }

    async fn head_in_time(&self, rb: reqwest::RequestBuilder) -> Result<Response, UpstreamError> {
        match tokio::time::timeout(self.timeout, rb.send()).await {
            Err(_) => Err(UpstreamError::Timeout(self.timeout.as_secs())),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(without_url(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn authorize(&self, rb: reqwest::RequestBuilder, repo: &str) -> reqwest::RequestBuilder {
        let Ok(auth) = self.auth.lock() else {
            return rb;
        };
        match &auth.challenge {
            Some(Challenge::Basic) => match &self.credentials {
                Some((u, p)) => rb.basic_auth(u, Some(p.as_str())),
                None => rb,
            },
            Some(Challenge::Bearer { .. }) => match auth.tokens.get(repo) {
                Some((t, until)) if *until > Instant::now() => {
                    rb.header(AUTHORIZATION, format!("Bearer {}", t.as_str()))
                }
                _ => rb,
            },
            None => rb,
        }
    }

    /// Takes a challenge in: Basic needs nothing more; Bearer gets a pull token for `repo`
    /// from the realm (with the credentials, if any).
    async fn learn(&self, challenge: Challenge, repo: &str) -> Result<(), UpstreamError> {
        if let Challenge::Bearer { realm, service } = &challenge {
            let realm_url = self.check_realm(realm)?;
            let mut query = vec![("scope", format!("repository:{repo}:{}", self.actions))];
            if let Some(s) = service {
                query.push(("service", s.clone()));
            }
            let mut rb = self.http.get(realm_url).query(&query);
            if let Some((u, p)) = &self.credentials {
                rb = rb.basic_auth(u, Some(p.as_str()));
            }
            let resp = self.head_in_time(rb).await?;
            if !resp.status().is_success() {
                return Err(UpstreamError::Denied(resp.status().as_u16()));
            }
            #[derive(serde::Deserialize)]
            struct TokenAnswer {
                token: Option<String>,
                access_token: Option<String>,
                expires_in: Option<u64>,
            }
            let body = tokio::time::timeout(self.timeout, read_capped(resp, MAX_TOKEN_ANSWER))
                .await
                .map_err(|_| UpstreamError::Timeout(self.timeout.as_secs()))??;
            let answer: TokenAnswer = serde_json::from_slice(&body)
                .map_err(|_| UpstreamError::Invalid("the token answer is not JSON".into()))?;
            let token = answer
                .token
                .or(answer.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| UpstreamError::Invalid("the token answer has no token".into()))?;
            // Used until 10 s before it expires (60 s when the answer does not say: the spec's
            // default).
            let life = answer.expires_in.unwrap_or(60).saturating_sub(10).max(1);
            let until = Instant::now() + Duration::from_secs(life);
            if let Ok(mut auth) = self.auth.lock() {
                if auth.tokens.len() >= TOKENS_KEPT {
                    let now = Instant::now();
                    auth.tokens.retain(|_, (_, u)| *u > now);
                    if auth.tokens.len() >= TOKENS_KEPT {
                        // The ones that expire first go.
                        let mut untils: Vec<Instant> =
                            auth.tokens.values().map(|(_, u)| *u).collect();
                        untils.sort_unstable();
                        let cut = untils[untils.len() / 2];
                        auth.tokens.retain(|_, (_, u)| *u > cut);
                    }
                }
                auth.tokens
                    .insert(repo.to_owned(), (zeroize::Zeroizing::new(token), until));
            }
        }
        if let Ok(mut auth) = self.auth.lock() {
            auth.challenge = Some(challenge);
        }
        Ok(())
    }
}

impl Upstream {
    /// Where a Bearer challenge sends us for a token. Never from https to plain http; with
    /// credentials, only to the upstream's own host or a configured `token_realm_hosts` one
    /// (a hostile upstream must not collect the password, nor point it at an internal host).
    fn check_realm(&self, realm: &str) -> Result<reqwest::Url, UpstreamError> {
        let url: reqwest::Url = realm.parse().map_err(|_| {
            UpstreamError::Invalid("a Bearer challenge without a usable realm".into())
        })?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if !matches!(url.scheme(), "https" | "http") || host.is_empty() {
            return Err(UpstreamError::Invalid(
                "a token realm that is not an http(s) URL".into(),
            ));
        }
        if self.base.scheme() == "https" && url.scheme() != "https" {
            return Err(UpstreamError::Invalid(
                "a plain-http token realm for an https upstream".into(),
            ));
        }
        // Its own host means its own port too (another port may be another service).
        let own = self
            .base
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case(&host))
            && self.base.port_or_known_default() == url.port_or_known_default();
        let listed = self
            .realm_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host));
        if self.credentials.is_some() && !own && !listed {
            tracing::warn!(realm_host = %host, "remote registry: its token service is on another host; add it to token_realm_hosts to send it the credentials");
            return Err(UpstreamError::Denied(401));
        }
        Ok(url)
    }
}

/// A response's body, at most `max` bytes.
pub async fn read_capped(mut resp: Response, max: usize) -> Result<Vec<u8>, UpstreamError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| UpstreamError::Unreachable(without_url(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(UpstreamError::Invalid(format!(
                "an answer over {max} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error's text without its URL (which could carry a query).
pub fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<upstream>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn classify(resp: Response) -> Result<Response, UpstreamError> {
    match resp.status().as_u16() {
        200 | 206 => Ok(resp),
        404 => Err(UpstreamError::NotFound),
        429 => Err(UpstreamError::RateLimited(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        )),
        s @ (401 | 403) => Err(UpstreamError::Denied(s)),
        s => Err(UpstreamError::Status(s)),
    }
}

/// A `WWW-Authenticate` challenge (RFC 7235): its scheme and, for Bearer, `realm` and
/// `service`.
fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, params) = h.split_once(' ').unwrap_or((h, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, t)| (v, t))
        };
        match key.as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            _ => {}
        }
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("bearer realm=https://x/t, service=s"),
            Some(Challenge::Bearer {
                realm: "https://x/t".into(),
                service: Some("s".into())
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"s\""), None, "no realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer realm=\"unterminated"), None);
    }
}
