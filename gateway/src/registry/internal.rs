//! The gateway's own requests to storage nodes, over the internal hop as every forwarded
//! request (a node picked by the load balancer, the internal secret): what the pull-through
//! cache and the web console ask and store. No redirects are followed (the secret goes to
//! storage nodes only).

use oci::Digest;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use reqwest::{Method, StatusCode};
use service::hop::INTERNAL_SECRET_HEADER;
use std::sync::Arc;
use std::time::Duration;

/// What storage's answer to a manifest `HEAD` says.
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: String,
    pub size: usize,
}

/// The `Docker-Content-Digest` storage sends with a manifest.
pub fn digest_header(h: &reqwest::header::HeaderMap) -> anyhow::Result<Digest> {
    h.get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())
        .ok_or_else(|| anyhow::anyhow!("storage sent a manifest without digest"))
}

/// One storage node as [`Internal::node_status`] found it.
pub struct NodeStatus {
    pub addr: String,
    /// Passes the gateway's health check (gets requests).
    pub healthy: bool,
    /// Its own account (`ready`, `usage`, `gc`), or why there is none.
    pub status: Result<serde_json::Value, String>,
}

pub struct Internal {
    nodes: Arc<LoadBalancer<RoundRobin>>,
    secret: zeroize::Zeroizing<String>,
    /// For small requests: an answer within a minute.
    http: reqwest::Client,
    /// For uploads, which last as long as their body comes: reqwest's read timeout would run
    /// from the start of the request, body included.
    uploads: reqwest::Client,
}

impl Internal {
    pub fn new(
        nodes: Arc<LoadBalancer<RoundRobin>>,
        secret: zeroize::Zeroizing<String>,
    ) -> anyhow::Result<Self> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::none())
        };
        Ok(Internal {
            nodes,
            secret,
            http: builder().read_timeout(Duration::from_secs(60)).build()?,
            uploads: builder().build()?,
        })
    }

    /// `method path_and_query` to a healthy storage node.
    pub fn request(&self, method: Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        self.on(&self.http, method, path)
    }

    /// The same, for a request whose body streams for as long as it takes.
    pub fn upload(&self, method: Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        self.on(&self.uploads, method, path)
    }

    /// What storage holds under the manifest `repo:reference` (no body; `accept`: the
    /// manifest types the caller takes), if anything.
    pub async fn manifest_head(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> anyhow::Result<Option<ManifestHead>> {
        let r = self
            .request(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))?
            .header("accept", accept)
            .send()
            .await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => anyhow::bail!("storage answered {s} to a manifest HEAD"),
        }
        let h = r.headers();
        let text = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        Ok(Some(ManifestHead {
            digest: digest_header(h)?,
            media_type: text("content-type").unwrap_or("").to_owned(),
            size: text("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }))
    }

    /// Every storage node the gateway knows: its address, whether it passes the health
    /// check, and what its `GET /internal/status` answered (usage, recent GC runs), asked of
    /// all at once with a 5 s bound.
    pub async fn node_status(&self) -> Vec<NodeStatus> {
        let backends = self.nodes.backends();
        let known = backends.get_backend();
        let asks = known.iter().map(|b| {
            let healthy = backends.ready(b);
            let addr = b.addr.to_string();
            async move {
                let status = async {
                    let r = self
                        .to(&self.http, &addr, Method::GET, "/internal/status")
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status() == StatusCode::OK, "it answered {}", r.status());
                    Ok(r.json::<serde_json::Value>().await?)
                }
                .await
                .map_err(|e: anyhow::Error| format!("{e:#}"));
                NodeStatus {
                    addr,
                    healthy,
                    status,
                }
            }
        });
        futures_util::future::join_all(asks).await
    }

    fn on(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let node = self
            .nodes
            .select(b"", 256)
            .ok_or_else(|| anyhow::anyhow!("no healthy storage node"))?;
        Ok(self.to(client, &node.addr.to_string(), method, path))
    }

    /// `method path` to the storage node at `addr`, with the internal secret.
    fn to(
        &self,
        client: &reqwest::Client,
        addr: &str,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        client
            .request(method, format!("http://{addr}{path}"))
            .header(INTERNAL_SECRET_HEADER, self.secret.as_str())
    }
}
