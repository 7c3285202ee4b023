//! What the gateway itself reads from storage (over the internal hop, as it forwards
//! requests): catalog and tag pages, manifests, blobs and referrers; and the deletes the web
//! console makes. The web console calls it after its own policy decision; replication reads
//! what it copies to another registry.

use crate::registry::internal::{Internal, ManifestHead, digest_header};
use bytes::Bytes;
use oci::Digest;
use oci::media_type::MANIFEST_ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::Arc;

/// What a manifest delete came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestDelete {
    Deleted,
    Missing,
    /// An immutable tag points at it.
    Immutable,
}

/// A manifest as storage holds it.
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// `n=<n>&last=<last>`.
fn page_query(n: usize, last: Option<&str>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("n", &n.to_string());
    if let Some(l) = last {
        q.append_pair("last", l);
    }
    q.finish()
}

pub struct Data {
    internal: Arc<Internal>,
    /// Told of the deletes made here, when manifest reads are answered from memory.
    manifests: Option<Arc<super::manifests::ManifestCache>>,
}

impl Data {
    pub fn new(internal: Arc<Internal>) -> Self {
        Data {
            internal,
            manifests: None,
        }
    }

    /// The same, telling `manifests` of every delete made through it.
    pub fn with_manifests(self, manifests: Option<Arc<super::manifests::ManifestCache>>) -> Self {
        Data { manifests, ..self }
    }

    /// A delete in `repo` was made: every gateway's kept manifests of it go.
    async fn changed(&self, repo: &str) -> anyhow::Result<()> {
        if let Some(m) = &self.manifests {
            m.changed(repo).await?;
        }
        Ok(())
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        self.internal.request(method, path_and_query)
    }

    /// Every storage node: health, usage, recent GC runs.
    pub async fn nodes(&self) -> Vec<crate::registry::internal::NodeStatus> {
        self.internal.node_status().await
    }

    /// Up to `n` repository names after `last`, and whether more follow.
    pub async fn catalog(
        &self,
        n: usize,
        last: Option<&str>,
    ) -> anyhow::Result<(Vec<String>, bool)> {
        let q = page_query(n, last);
        Ok(self
            .list(&format!("/v2/_catalog?{q}"), "repositories")
            .await?
            .unwrap_or_default())
    }

    /// Up to `n` tags of `repo` after `last`, and whether more follow; `None` when there
    /// is no such repository.
    pub async fn tags(
        &self,
        repo: &str,
        n: usize,
        last: Option<&str>,
    ) -> anyhow::Result<Option<(Vec<String>, bool)>> {
        let q = page_query(n, last);
        self.list(&format!("/v2/{repo}/tags/list?{q}"), "tags")
            .await
    }

    async fn list(&self, path: &str, field: &str) -> anyhow::Result<Option<(Vec<String>, bool)>> {
        let r = self.request(Method::GET, path)?.send().await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => anyhow::bail!("storage answered {s} to a listing"),
        }
        let more = r.headers().contains_key("link");
        let v: Value = r.json().await?;
        let items = v[field]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some((items, more)))
    }

    /// What storage says of the manifest `repo:reference` (no body), if it has it.
    pub async fn manifest_head(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<Option<ManifestHead>> {
        self.internal
            .manifest_head(repo, reference, MANIFEST_ACCEPT)
            .await
    }

    /// The manifest `repo:reference`, if storage has it.
    pub async fn manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Option<Manifest>> {
        let r = self
            .request(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))?
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => anyhow::bail!("storage answered {s} to a manifest GET"),
        }
        let digest = digest_header(r.headers())?;
        let media_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok(Some(Manifest {
            digest,
            media_type,
            body: r.bytes().await?,
        }))
    }

    /// The bytes `from..to` of the blob `digest` of `repo`, as a body that streams them
    /// (storage's answer must be exactly that range).
    pub async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        from: u64,
        to: u64,
    ) -> anyhow::Result<reqwest::Body> {
        anyhow::ensure!(from < to, "an empty range");
        // The uploads' client: no read timeout over the whole transfer.
        let r = self
            .internal
            .upload(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))?
            .header("range", format!("bytes={from}-{}", to - 1))
            .send()
            .await?;
        // The range, or the whole blob when that is what was asked.
        let whole = r.status() == StatusCode::OK && from == 0;
        anyhow::ensure!(
            r.status() == StatusCode::PARTIAL_CONTENT || whole,
            "storage answered {} to a blob GET",
            r.status()
        );
        anyhow::ensure!(
            r.content_length() == Some(to - from),
            "storage sent another length than asked"
        );
        Ok(reqwest::Body::wrap_stream(r.bytes_stream()))
    }

    /// The size of the blob `digest` of `repo`, if storage has it.
    pub async fn blob_size(&self, repo: &str, digest: &Digest) -> anyhow::Result<Option<u64>> {
        let r = self
            .request(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))?
            .send()
            .await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => anyhow::bail!("storage answered {s} to a blob HEAD"),
        }
        r.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("storage answered a blob HEAD without its length"))
    }

    /// The referrers index of `digest` in `repo` (its `manifests`).
    pub async fn referrers(&self, repo: &str, digest: &Digest) -> anyhow::Result<Vec<Value>> {
        let r = self
            .request(Method::GET, &format!("/v2/{repo}/referrers/{digest}"))?
            .send()
            .await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Vec::new()),
            s => anyhow::bail!("storage answered {s} to a referrers GET"),
        }
        let v: Value = r.json().await?;
        Ok(v["manifests"].as_array().cloned().unwrap_or_default())
    }

    /// Deletes the tag `repo:tag`; whether it was there.
    /// Deletes the manifest `digest` of `repo` under the immutability rules `protection` (as
    /// the gateway sends them with a DELETE by digest): storage refuses it while an immutable
    /// tag points at it. Whether it was there.
    pub async fn delete_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        protection: Option<String>,
    ) -> anyhow::Result<ManifestDelete> {
        let mut req = self.request(Method::DELETE, &format!("/v2/{repo}/manifests/{digest}"))?;
        if let Some(p) = protection {
            req = req.header(service::hop::PROTECTION_HEADER, p);
        }
        let r = req.send().await?;
        Ok(match r.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => {
                self.changed(repo).await?;
                ManifestDelete::Deleted
            }
            StatusCode::NOT_FOUND => ManifestDelete::Missing,
            StatusCode::FORBIDDEN => ManifestDelete::Immutable,
            s => anyhow::bail!("storage answered {s} to a manifest delete"),
        })
    }

    pub async fn delete_tag(&self, repo: &str, tag: &str) -> anyhow::Result<bool> {
        let r = self
            .request(Method::DELETE, &format!("/v2/{repo}/manifests/{tag}"))?
            .send()
            .await?;
        match r.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => {
                self.changed(repo).await?;
                Ok(true)
            }
            StatusCode::NOT_FOUND => Ok(false),
            s => anyhow::bail!("storage answered {s} to a tag delete"),
        }
    }
}
