//! A replication rule's target registry, spoken to as a client ([`crate::remote::Upstream`]
//! with push and delete rights): what a tag points at, its tags, and the writes replication
//! makes — blobs (skipped when there; uploaded in chunks that resume where the target says
//! it got to), manifests, and deletes.

use crate::remote::{Upstream, UpstreamError, read_capped};
use bytes::Bytes;
use oci::Digest;
use oci::media_type::MANIFEST_ACCEPT;
use reqwest::{Method, Response, StatusCode};

/// Largest tag page read from the target.
const MAX_TAG_PAGE: usize = 4 << 20;
/// Most tags read of one repository at the target.
const MAX_TAGS: usize = 1_000_000;
/// Times a chunked upload continues after a chunk failed, in one copy.
const RESUMES: u32 = 5;

/// Why a write to the target did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The target refused it for good (an immutable tag, a manifest it does not take).
    #[error("the target refused it: {0}")]
    Refused(String),
    /// The target does not delete tags (distribution): delete the manifest by digest.
    #[error("the target does not delete tags")]
    NoTagDelete,
    #[error("{0}")]
    Source(String),
}

pub struct Target {
    pub remote: Upstream,
}

/// The text of an answer that was not the one wanted (a little of its body, for the status).
async fn refused(what: &str, r: Response) -> String {
    let status = r.status();
    let body = tokio::time::timeout(std::time::Duration::from_secs(5), read_capped(r, 4096))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    format!(
        "{what}: {status} {}",
        text.chars().take(300).collect::<String>()
    )
}

/// The target's answer to a store names `digest` (when it names one).
fn stored_as(r: &Response, what: &str, digest: &Digest) -> Result<(), TargetError> {
    match r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        Some(a) if a != digest.to_string() => Err(TargetError::Refused(format!(
            "the target stored the {what} {digest} as {a}"
        ))),
        _ => Ok(()),
    }
}

impl Target {
    /// The digest `repo:reference` is at on the target, if it has it.
    pub async fn manifest_digest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Digest>, TargetError> {
        let r = self
            .remote
            .request(
                Method::HEAD,
                repo,
                &self.remote.v2_url(repo, &format!("manifests/{reference}")),
                |rb| rb.header("accept", MANIFEST_ACCEPT),
            )
            .await?;
        match r.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(UpstreamError::Status(s.as_u16()).into()),
        }
        match r
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok())
        {
            Some(d) => Ok(Some(d)),
            None => Err(UpstreamError::Invalid("a manifest HEAD without its digest".into()).into()),
        }
    }

    /// Every tag of `repo` on the target (none when it has no such repository); names that
    /// are not tags are left out (they would name other paths).
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, TargetError> {
        let mut all: Vec<String> = Vec::new();
        loop {
            let query = {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("n", "1000");
                if let Some(l) = all.last() {
                    q.append_pair("last", l);
                }
                q.finish()
            };
            let url = self.remote.v2_url(repo, &format!("tags/list?{query}"));
            let r = self
                .remote
                .request(Method::GET, repo, &url, |rb| rb)
                .await?;
            match r.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(all),
                s => return Err(UpstreamError::Status(s.as_u16()).into()),
            }
            let more = r.headers().contains_key("link");
            #[derive(serde::Deserialize)]
            struct Page {
                tags: Option<Vec<String>>,
            }
            let body = self.remote.body(r, MAX_TAG_PAGE).await?;
            let page: Page = serde_json::from_slice(&body)
                .map_err(|_| UpstreamError::Invalid("a tag list that is not JSON".into()))?;
            let mut page: Vec<String> = page
                .tags
                .unwrap_or_default()
                .into_iter()
                .filter(|t| oci::Tag::parse(t).is_ok())
                .collect();
            page.sort_unstable();
            // A page goes on after the last one (a target that ignores `last` ends here).
            let before = all.last().cloned();
            page.retain(|t| before.as_ref().is_none_or(|b| t > b));
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
            if !more {
                return Ok(all);
            }
            if all.len() > MAX_TAGS {
                return Err(
                    UpstreamError::Invalid(format!("more than {MAX_TAGS} tags in {repo}")).into(),
                );
            }
        }
    }

    /// Whether the target has the blob in `repo`.
    pub async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool, TargetError> {
        let r = self
            .remote
            .request(
                Method::HEAD,
                repo,
                &self.remote.v2_url(repo, &format!("blobs/{digest}")),
                |rb| rb,
            )
            .await?;
        match r.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(UpstreamError::Status(s.as_u16()).into()),
        }
    }

    /// Uploads the blob `digest` (`size` bytes) to `repo`; `read(from)` gives its bytes from
    /// offset `from` to the end. Up to `chunk` bytes go in one request: a blob that fits is
    /// one `PUT`; a bigger one goes in `PATCH`es, and after a failed one the upload goes on
    /// from where the target says it got to. The target checks the digest before the blob is
    /// visible; its answer must name the same digest.
    pub async fn put_blob<F, Fut>(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        chunk: u64,
        read: F,
    ) -> Result<(), TargetError>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::Body, String>>,
    {
        let mut location = self.start_upload(repo).await?;
        let mut offset = 0u64;
        let mut resumes = 0;
        while size > chunk && offset < size {
            let end = (offset + chunk).min(size);
            let body = read(offset, end).await.map_err(TargetError::Source)?;
            let sent = self
                .remote
                .upload(Method::PATCH, repo, location.as_str(), end - offset, |rb| {
                    rb.header("content-type", "application/octet-stream")
                        .header("content-length", (end - offset).to_string())
                        .header("content-range", format!("{offset}-{}", end - 1))
                        .body(body)
                })
                .await;
            match sent {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    location = self.next_location(&r)?;
                    offset = end;
                }
                failed => {
                    resumes += 1;
                    if resumes > RESUMES {
                        return Err(match failed {
                            Ok(r) => TargetError::Refused(refused("a chunk", r).await),
                            Err(e) => e.into(),
                        });
                    }
                    tracing::info!(repository = %repo, blob = %digest, offset, "replication: a chunk failed; resuming");
                    (location, offset) = match self.upload_status(repo, &location).await {
                        Ok((l, got)) if got > 1 => (l, got.min(size)),
                        // `0-0` says nothing or one byte; distribution forgets an upload cut
                        // in the middle of a chunk: start again.
                        _ => (self.start_upload(repo).await?, 0),
                    };
                }
            }
        }
        let sep = if location.query().is_some() { '&' } else { '?' };
        let done = format!("{location}{sep}digest={digest}");
        let r = if size > chunk {
            self.remote
                .upload(Method::PUT, repo, &done, 0, |rb| {
                    rb.header("content-length", "0")
                })
                .await?
        } else {
            let body = read(0, size).await.map_err(TargetError::Source)?;
            self.remote
                .upload(Method::PUT, repo, &done, size, |rb| {
                    rb.header("content-type", "application/octet-stream")
                        .header("content-length", size.to_string())
                        .body(body)
                })
                .await?
        };
        if r.status() != StatusCode::CREATED {
            return Err(TargetError::Refused(
                refused("completing an upload", r).await,
            ));
        }
        stored_as(&r, "blob", digest)
    }

    /// Starts an upload in `repo`: where it goes on.
    async fn start_upload(&self, repo: &str) -> Result<reqwest::Url, TargetError> {
        let start = self
            .remote
            .request(
                Method::POST,
                repo,
                &self.remote.v2_url(repo, "blobs/uploads/"),
                |rb| rb.header("content-length", "0"),
            )
            .await?;
        if start.status() != StatusCode::ACCEPTED {
            return Err(TargetError::Refused(
                refused("starting an upload", start).await,
            ));
        }
        self.next_location(&start)
    }

    /// Where an upload goes on: the answer's `Location`, on the target only.
    fn next_location(&self, r: &Response) -> Result<reqwest::Url, TargetError> {
        let l = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| UpstreamError::Invalid("an upload answer without Location".into()))?;
        Ok(self.remote.location(l)?)
    }

    /// Where an upload got to, as the target says (`GET` on it: `Range: 0-<last>`).
    async fn upload_status(
        &self,
        repo: &str,
        location: &reqwest::Url,
    ) -> Result<(reqwest::Url, u64), TargetError> {
        let r = self
            .remote
            .request(Method::GET, repo, location.as_str(), |rb| rb)
            .await?;
        if r.status() != StatusCode::NO_CONTENT {
            return Err(TargetError::Refused(
                refused("asking where an upload got to", r).await,
            ));
        }
        let got = r
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('-'))
            .and_then(|(_, last)| last.trim().parse::<u64>().ok())
            .map_or(0, |last| last.saturating_add(1));
        let next = match r.headers().get("location") {
            Some(_) => self.next_location(&r)?,
            None => location.clone(),
        };
        Ok((next, got))
    }

    /// Stores a manifest under `reference` (a tag, or its digest); the target's answer must
    /// name `digest`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        digest: &Digest,
        media_type: &str,
        body: Bytes,
    ) -> Result<(), TargetError> {
        let r = self
            .remote
            .request(
                Method::PUT,
                repo,
                &self.remote.v2_url(repo, &format!("manifests/{reference}")),
                |rb| rb.header("content-type", media_type).body(body.clone()),
            )
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(TargetError::Refused(
                refused(&format!("the manifest {reference}"), r).await,
            ));
        }
        stored_as(&r, "manifest", digest)
    }

    /// Deletes `repo:reference` (a tag, or a manifest by digest); `Ok` also when it was not
    /// there.
    pub async fn delete(&self, repo: &str, reference: &str) -> Result<(), TargetError> {
        let r = self
            .remote
            .request(
                Method::DELETE,
                repo,
                &self.remote.v2_url(repo, &format!("manifests/{reference}")),
                |rb| rb,
            )
            .await?;
        match r.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            // distribution deletes manifests by digest only.
            StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED
                if Digest::parse(reference).is_err() =>
            {
                Err(TargetError::NoTagDelete)
            }
            _ => Err(TargetError::Refused(
                refused(&format!("deleting {reference}"), r).await,
            )),
        }
    }
}
