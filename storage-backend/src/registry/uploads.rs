//! Upload sessions: `POST` starts one, `PATCH` appends chunks, `PUT ?digest=` verifies and
//! commits, `DELETE` cancels. The session is two objects in the store (`data`, `startedat`),
//! so a restarted process, or another process on the same root, continues it; nothing of it
//! lives only in memory.
//!
//! Commit order: the content is verified against the digest first, then moved under the
//! digest in one atomic step, then linked into the repository. A crash before the move leaves
//! the session; after it, a verified blob. Nothing unverified is ever visible under a digest.

use super::{Error, Registry, Result};
use crate::driver::{AppendError, AppendOptions, ByteStream};
use crate::layout::Key;
use futures_util::StreamExt;
use oci::{Algorithm, Digest, ErrorCode, OciError, RepositoryName, Verifier};
use std::time::SystemTime;

/// Where an upload session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadState {
    /// Bytes received so far.
    pub size: u64,
}

/// Sessions whose running hash is kept in memory at most.
const MAX_CACHED_HASHERS: usize = 4096;

fn upload_unknown(id: &str) -> Error {
    Error::oci(
        ErrorCode::BlobUploadUnknown,
        format!("upload {id} is unknown (cancelled, finished or never started)"),
    )
}

impl Registry {
    /// Starts an upload session and returns its id.
    pub async fn start_upload(&self, name: &RepositoryName) -> Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        self.driver
            .put(
                &Key::UploadStartedAt(name, &id).path(),
                service::time::rfc3339(SystemTime::now()).into(),
            )
            .await?;
        self.driver
            .put(&Key::UploadData(name, &id).path(), bytes::Bytes::new())
            .await?;
        Ok(id)
    }

    pub async fn upload_state(&self, name: &RepositoryName, id: &str) -> Result<UploadState> {
        let size = self
            .driver
            .upload_size(&Key::UploadData(name, id).path())
            .await?
            .ok_or_else(|| upload_unknown(id))?;
        Ok(UploadState { size })
    }

    /// Appends a chunk. With `range` (from `Content-Range`, inclusive) the chunk must start at
    /// the session's size and have exactly that length; without, it goes at the end and
    /// `expected_len` (from `Content-Length`) is checked when given. On any failure nothing
    /// of the chunk is kept.
    pub async fn append_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        body: ByteStream,
        range: Option<(u64, u64)>,
        expected_len: Option<u64>,
    ) -> Result<UploadState> {
        let (offset, expected_len) = match range {
            Some((start, end)) => {
                let len = end - start + 1;
                if expected_len.is_some_and(|cl| cl != len) {
                    return Err(Error::oci(
                        ErrorCode::SizeInvalid,
                        format!(
                            "Content-Range covers {len} bytes but Content-Length is {}",
                            expected_len.unwrap_or(0)
                        ),
                    ));
                }
                (start, Some(len))
            }
            None => (self.upload_state(name, id).await?.size, expected_len),
        };
        let hasher = self.take_hasher(id, offset);
        let appended = self
            .driver
            .append(
                &Key::UploadData(name, id).path(),
                body,
                AppendOptions {
                    offset,
                    expected_len,
                    hasher,
                },
            )
            .await;
        match appended {
            Ok(a) => {
                let size = offset + a.written;
                if let Some(h) = a.hasher {
                    let mut cache = self.hashers.lock().expect("hasher cache");
                    // Only a cache: abandoned sessions must not grow it without bound.
                    if cache.len() >= MAX_CACHED_HASHERS {
                        cache.clear();
                    }
                    cache.insert(id.to_owned(), (size, h));
                }
                Ok(UploadState { size })
            }
            Err(AppendError::NotFound) => Err(upload_unknown(id)),
            Err(AppendError::Offset { current, expected }) => {
                Err(Error::UploadOffset { current, expected })
            }
            Err(AppendError::Length { expected, received }) => Err(Error::oci(
                ErrorCode::SizeInvalid,
                format!(
                    "chunk has {received} bytes, {expected} were announced; nothing was stored"
                ),
            )),
            Err(AppendError::Body(e)) => Err(Error::oci(
                ErrorCode::BlobUploadInvalid,
                format!("request body ended early ({e}); nothing of this chunk was stored"),
            )),
            Err(AppendError::Io(e)) => Err(e.into()),
        }
    }

    /// The cached hasher if it is exactly at `offset`; a fresh one at offset 0; else none
    /// (the content will be hashed from the store at commit).
    fn take_hasher(&self, id: &str, offset: u64) -> Option<Verifier> {
        let cached = self.hashers.lock().expect("hasher cache").remove(id);
        match cached {
            Some((at, h)) if at == offset => Some(h),
            _ if offset == 0 => Some(Verifier::new(Algorithm::Sha256)),
            _ => None,
        }
    }

    /// Verifies the session's content against `digest` and commits it as a blob of the
    /// repository. On a mismatch the session is discarded and nothing is stored.
    pub async fn finish_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
    ) -> Result<()> {
        let state = self.upload_state(name, id).await?;
        let cached = self.hashers.lock().expect("hasher cache").remove(id);
        let actual = match cached {
            Some((at, h)) if at == state.size && digest.algorithm() == Algorithm::Sha256 => {
                h.finish()
            }
            _ => {
                self.hash_upload(name, id, state.size, digest.algorithm())
                    .await?
            }
        };
        if &actual != digest {
            self.driver.delete(&Key::Upload(name, id).path()).await?;
            return Err(Error::Protocol(
                OciError::new(
                    ErrorCode::DigestInvalid,
                    format!("content has digest {actual}, not {digest}; the upload was discarded"),
                )
                .with_detail(serde_json::json!({ "digest": digest.to_string() })),
            ));
        }
        // Keep the content and the link from a sweeping GC before looking at them; if it is
        // deleting them right now, let it finish and store this upload's copy instead.
        let referenced = [
            Key::Blob(digest).path(),
            Key::LayerLink(name, digest).path(),
        ];
        let mut tries = 0;
        while !self.protect(&referenced).await? {
            tries += 1;
            if tries > 200 {
                return Err(Error::Storage(std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    "garbage collection is deleting this blob; try again",
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if self.blob_exists(digest).await? {
            // Stored once across repositories: the existing copy has the same content.
            self.driver
                .delete(&Key::UploadData(name, id).path())
                .await?;
        } else {
            match self
                .driver
                .promote(&Key::UploadData(name, id).path(), &Key::Blob(digest).path())
                .await
            {
                Ok(()) => self.usage.added(state.size),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(upload_unknown(id));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_link(Key::LayerLink(name, digest), digest)
            .await?;
        self.driver.delete(&Key::Upload(name, id).path()).await?;
        Ok(())
    }

    async fn hash_upload(
        &self,
        name: &RepositoryName,
        id: &str,
        size: u64,
        alg: Algorithm,
    ) -> Result<Digest> {
        let mut stream = self
            .driver
            .upload_reader(&Key::UploadData(name, id).path(), 0, size)
            .await?
            .ok_or_else(|| upload_unknown(id))?;
        let mut v = Verifier::new(alg);
        while let Some(chunk) = stream.next().await {
            v.update(&chunk?);
        }
        Ok(v.finish())
    }

    /// Cancels a session; `BLOB_UPLOAD_UNKNOWN` if there is none.
    pub async fn cancel_upload(&self, name: &RepositoryName, id: &str) -> Result<()> {
        self.hashers.lock().expect("hasher cache").remove(id);
        if !self.driver.delete(&Key::Upload(name, id).path()).await? {
            return Err(upload_unknown(id));
        }
        Ok(())
    }
}
