//! The cache's own requests to storage (over the internal hop, like every forwarded one):
//! is a manifest or blob already here, and storing what came from the upstream — a manifest
//! as a cached copy, a blob as an upload whose digest storage checks before it is visible.

use crate::registry::internal::Internal;
use bytes::Bytes;
use futures_util::Stream;
use oci::Digest;
use reqwest::{Method, StatusCode};
use service::hop::CACHED_COPY_HEADER;
use std::sync::Arc;

/// What storage holds under a manifest reference.
#[derive(Debug, Clone)]
pub struct Held {
    pub digest: Digest,
}

pub struct Storage {
    internal: Arc<Internal>,
}

impl Storage {
    pub fn new(internal: Arc<Internal>) -> Self {
        Storage { internal }
    }

    fn request(&self, method: Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        self.internal.request(method, path)
    }

    /// The manifest `repo:reference` holds, if any.
    pub async fn manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Option<Held>> {
        let head = self
            .internal
            .manifest_head(repo, reference, oci::media_type::MANIFEST_ACCEPT)
            .await?;
        Ok(head.map(|h| Held { digest: h.digest }))
    }

    /// Whether `repo` has the blob.
    pub async fn has_blob(&self, repo: &str, digest: &Digest) -> anyhow::Result<bool> {
        let resp = self
            .request(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))?
            .send()
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => anyhow::bail!("storage answered {s} to a blob HEAD"),
        }
    }

    /// Links the blob `from` holds into `repo` (a cross-repository mount); `false` if `from`
    /// no longer holds it (then the upload session storage opened instead is cancelled).
    pub async fn mount(&self, repo: &str, from: &str, digest: &Digest) -> anyhow::Result<bool> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from)
            .finish();
        let resp = self
            .request(Method::POST, &format!("/v2/{repo}/blobs/uploads/?{query}"))?
            .header("content-length", "0")
            .send()
            .await?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Some(path) = upload_path(&resp) {
                    let _ = self.request(Method::DELETE, path)?.send().await;
                }
                Ok(false)
            }
            s => anyhow::bail!("storage answered {s} to a mount"),
        }
    }

    /// Stores an upstream manifest (checked against its digest already) under `reference`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> anyhow::Result<()> {
        let resp = self
            .request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))?
            .header("content-type", media_type)
            .header(CACHED_COPY_HEADER, "1")
            .body(body)
            .send()
            .await?;
        if resp.status() != StatusCode::CREATED {
            anyhow::bail!(
                "storage refused the cached manifest: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Uploads a blob from `body` (exactly `size` bytes); storage makes it visible only if
    /// its digest is `digest`. A stream that ends in an error stores nothing.
    pub async fn put_blob<S>(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        body: S,
    ) -> anyhow::Result<()>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let start = self
            .request(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))?
            .header("content-length", "0")
            .send()
            .await?;
        if start.status() != StatusCode::ACCEPTED {
            anyhow::bail!("storage refused an upload: {}", start.status());
        }
        let path = upload_path(&start)
            .ok_or_else(|| anyhow::anyhow!("storage started an upload without a Location"))?;
        let sep = if path.contains('?') { '&' } else { '?' };
        let resp = self
            .internal
            .upload(Method::PUT, &format!("{path}{sep}digest={digest}"))?
            .header("content-length", size.to_string())
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        if resp.status() != StatusCode::CREATED {
            anyhow::bail!(
                "storage refused the cached blob: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// The path of the upload session storage answered with (it answers with a path; the session
/// continues on any node).
fn upload_path(resp: &reqwest::Response) -> Option<&str> {
    let location = resp.headers().get("location")?.to_str().ok()?;
    location.find("/v2/").map(|i| &location[i..])
}
