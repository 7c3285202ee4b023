//! A small registry client for tests: raw requests plus push helpers.

use anyhow::{Context, ensure};
use bytes::Bytes;
use oci::{Algorithm, Digest};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};

pub const OCI_MANIFEST: &str = oci::media_type::OCI_MANIFEST;
pub const OCI_INDEX: &str = oci::media_type::OCI_INDEX;
pub const DOCKER_MANIFEST: &str = oci::media_type::DOCKER_MANIFEST;
pub const DOCKER_LIST: &str = oci::media_type::DOCKER_MANIFEST_LIST;

/// A client of one registry base URL.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    /// Headers added to every request (e.g. the internal secret).
    pub headers: Vec<(String, String)>,
    /// Bearer tokens fetched from the token endpoint for each request's scope.
    pub auth: Option<TokenAuth>,
}

/// Credentials and a token cache, for registries behind the token service.
#[derive(Clone)]
pub struct TokenAuth {
    pub token_url: String,
    pub service: String,
    /// `None`: anonymous.
    pub credentials: Option<(String, String)>,
    cache: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl TokenAuth {
    pub fn new(token_url: &str, service: &str, credentials: Option<(&str, &str)>) -> Self {
        TokenAuth {
            token_url: token_url.to_string(),
            service: service.to_string(),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            cache: Default::default(),
        }
    }
}

/// The scopes a test client asks for a request: everything on the route's repository (and
/// pull on a mount's source), so one token per repository serves the whole suite.
pub fn scopes_for(method: &str, path_and_query: &str) -> Vec<String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut out = Vec::new();
    match oci::parse_route(method, path) {
        Ok(oci::Endpoint::Catalog) => out.push("registry:catalog:*".to_string()),
        Ok(ep) => {
            if let Some(name) = ep.repository() {
                out.push(format!("repository:{name}:pull,push,delete"));
            }
        }
        Err(_) => {}
    }
    for (k, v) in form_urlencoded_pairs(query) {
        if k == "from" {
            out.push(format!("repository:{v}:pull"));
        }
    }
    out
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%2f", "/")))
        .collect()
}

/// The image config [`Client::push_image`] pushes for `tag`.
pub fn image_config(tag: &str) -> Vec<u8> {
    format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}").into_bytes()
}

/// An HTTPS client trusting the CA in `ca_pem`; `http1_only` turns HTTP/2 off.
pub fn https(ca_pem: &[u8], http1_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("CA certificate");
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .add_root_certificate(ca);
    if http1_only {
        b = b.http1_only();
    }
    b.build().expect("http client")
}

/// The claims of a JWT, decoded without checking anything (tests look at what was issued).
pub fn jwt_claims(token: &str) -> Option<Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn sha256(data: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, data)
}

impl Client {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client");
        Self::with_http(base, http)
    }

    /// A client of an HTTPS registry whose certificate is signed by the CA in `ca_pem`
    /// (HTTP/2 when the server offers it by ALPN).
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> Self {
        Self::with_http(base, https(ca_pem, false))
    }

    /// A client of `base` over a given `reqwest` client.
    pub fn with_http(base: &str, http: reqwest::Client) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http,
            headers: Vec::new(),
            auth: None,
        }
    }

    /// Fetches (and caches) a token for `scopes` with `GET /token`.
    pub async fn token(&self, scopes: &[String]) -> anyhow::Result<String> {
        let auth = self.auth.as_ref().context("no token auth configured")?;
        let key = scopes.join(" ");
        if let Some(t) = auth.cache.lock().expect("token cache").get(&key) {
            return Ok(t.clone());
        }
        let mut url = format!("{}?service={}", auth.token_url, auth.service);
        for s in scopes {
            url.push_str(&format!(
                "&scope={}",
                s.replace(':', "%3A")
                    .replace(',', "%2C")
                    .replace('/', "%2F")
            ));
        }
        let mut r = self.http.get(&url);
        if let Some((u, p)) = &auth.credentials {
            r = r.basic_auth(u, Some(p));
        }
        let resp = r.send().await?;
        ensure!(
            resp.status() == StatusCode::OK,
            "token request: {}",
            describe(resp).await
        );
        let v: Value = resp.json().await?;
        let t = v["token"]
            .as_str()
            .context("no token in the response")?
            .to_string();
        auth.cache
            .lock()
            .expect("token cache")
            .insert(key, t.clone());
        Ok(t)
    }

    /// A request to `path` (absolute path like `/v2/...`, or a `Location` value).
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let path_and_query = url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        let bearer = self.auth.as_ref().map(|auth| {
            let scopes = scopes_for(method.as_str(), &path_and_query);
            if let Some(t) = auth
                .cache
                .lock()
                .expect("token cache")
                .get(&scopes.join(" "))
            {
                return Ok(t.clone());
            }
            // The suite builds requests synchronously; fetch the token on this thread.
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.token(&scopes))
            })
        });
        let mut r = self.http.request(method, url);
        for (k, v) in &self.headers {
            r = r.header(k, v);
        }
        if let Some(Ok(t)) = bearer {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Starting an upload to `repo` is refused as the token does not allow push
    /// (401 `DENIED`, `insufficient_scope`).
    pub async fn push_is_denied(&self, repo: &str) -> anyhow::Result<()> {
        let r = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .await?;
        expect_error(r, 401, "DENIED").await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Response> {
        Ok(self.req(Method::GET, path).send().await?)
    }

    /// Monolithic push (`POST ?digest=`); returns the digest. A registry that answers the
    /// POST with a session instead (202, as distribution does) gets the body in a `PUT`.
    pub async fn push_blob(&self, repo: &str, data: impl Into<Bytes>) -> anyhow::Result<Digest> {
        let data = data.into();
        let d = sha256(&data);
        let mut r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            )
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await?;
        if r.status() == StatusCode::ACCEPTED {
            let at = with_query(&location(&r)?, &format!("digest={d}"));
            r = self
                .req(Method::PUT, &at)
                .header("content-type", "application/octet-stream")
                .body(data)
                .send()
                .await?;
        }
        ensure!(
            r.status() == StatusCode::CREATED,
            "push blob: {}",
            describe(r).await
        );
        Ok(d)
    }

    /// Starts a session; returns its `Location`.
    pub async fn start_upload(&self, repo: &str) -> anyhow::Result<String> {
        let r = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .send()
            .await?;
        ensure!(
            r.status() == StatusCode::ACCEPTED,
            "start upload: {}",
            describe(r).await
        );
        location(&r)
    }

    /// Chunked push: POST, PATCH with `Content-Range` per chunk, PUT `?digest=`.
    pub async fn push_blob_chunked(
        &self,
        repo: &str,
        data: &[u8],
        chunk: usize,
    ) -> anyhow::Result<Digest> {
        let d = sha256(data);
        let mut loc = self.start_upload(repo).await?;
        let mut offset = 0;
        for part in data.chunks(chunk.max(1)) {
            let r = self
                .req(Method::PATCH, &loc)
                .header("content-type", "application/octet-stream")
                .header(
                    "content-range",
                    format!("{}-{}", offset, offset + part.len() - 1),
                )
                .body(part.to_vec())
                .send()
                .await?;
            ensure!(
                r.status() == StatusCode::ACCEPTED,
                "patch: {}",
                describe(r).await
            );
            loc = location(&r)?;
            offset += part.len();
        }
        let r = self
            .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
            .send()
            .await?;
        ensure!(
            r.status() == StatusCode::CREATED,
            "finish: {}",
            describe(r).await
        );
        Ok(d)
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        Ok(self
            .req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await?)
    }

    /// Deletes the manifest `repo:reference` (a tag, or a digest); it must be answered 202.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<()> {
        let r = self
            .req(Method::DELETE, &format!("/v2/{repo}/manifests/{reference}"))
            .send()
            .await?;
        ensure!(
            r.status() == StatusCode::ACCEPTED,
            "delete {repo}:{reference}: {}",
            describe(r).await
        );
        Ok(())
    }

    /// Pushes a config and layers, then an OCI manifest tagged `tag`; returns (manifest, digest).
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[&[u8]],
    ) -> anyhow::Result<(Vec<u8>, Digest)> {
        let config = image_config(tag);
        let manifest = self.image_manifest(repo, &config, layers, None).await?;
        let r = self
            .put_manifest(repo, tag, OCI_MANIFEST, &manifest)
            .await?;
        ensure!(
            r.status() == StatusCode::CREATED,
            "put manifest: {}",
            describe(r).await
        );
        Ok((manifest.clone(), sha256(&manifest)))
    }

    /// Pushes config and layers and returns an OCI manifest's bytes (not pushed).
    pub async fn image_manifest(
        &self,
        repo: &str,
        config: &[u8],
        layers: &[&[u8]],
        extra: Option<Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let cd = self.push_blob(repo, config.to_vec()).await?;
        let mut descs = Vec::new();
        for l in layers {
            let ld = self.push_blob(repo, l.to_vec()).await?;
            descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": l.len()}));
        }
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
            "layers": descs,
        });
        if let Some(Value::Object(extra)) = extra {
            for (k, v) in extra {
                m[k] = v;
            }
        }
        Ok(serde_json::to_vec(&m)?)
    }
}

/// The `Location` header of a response.
pub fn location(r: &Response) -> anyhow::Result<String> {
    Ok(r.headers()
        .get("location")
        .context("no Location header")?
        .to_str()?
        .to_string())
}

pub fn with_query(url: &str, q: &str) -> String {
    if url.contains('?') {
        format!("{url}&{q}")
    } else {
        format!("{url}?{q}")
    }
}

/// Status and body of a response, for assertion messages.
pub async fn describe(r: Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    format!("{status} {}", body.chars().take(400).collect::<String>())
}

/// The OCI error code of an error response body.
pub async fn error_code(r: Response) -> anyhow::Result<(StatusCode, String)> {
    let status = r.status();
    let text = r.text().await?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("error body is not JSON: {text:?}"))?;
    let code = v["errors"][0]["code"]
        .as_str()
        .with_context(|| format!("no error code in {text}"))?;
    ensure!(
        v["errors"][0]["message"].is_string(),
        "no message in {text}"
    );
    Ok((status, code.to_string()))
}

/// One page of a listing (`/v2/_catalog` or `…/tags/list`): its items (the `field` array)
/// and whether it links a next page.
pub async fn list_page(c: &Client, path: &str, field: &str) -> anyhow::Result<(Vec<String>, bool)> {
    let r = c.get(path).await?;
    ensure!(r.status() == 200, "{path}: {}", describe(r).await);
    let more = r.headers().contains_key("link");
    let v: Value = r.json().await?;
    let items = v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok((items, more))
}

/// Asserts a response is the expected OCI error.
pub async fn expect_error(r: Response, status: u16, code: &str) -> anyhow::Result<()> {
    let (s, c) = error_code(r).await?;
    ensure!(
        s.as_u16() == status && c == code,
        "expected {status} {code}, got {s} {c}"
    );
    Ok(())
}
