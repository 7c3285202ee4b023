//! Blobs as seen from a repository: a blob is in a repository when the repository links it.

use super::{Error, Registry, Result};
use crate::driver::{ByteStream, ObjectMeta};
use crate::layout::Key;
use bytes::Bytes;
use oci::{Digest, ErrorCode, RepositoryName};

impl Registry {
    /// Size of a blob linked in `name`; `BLOB_UNKNOWN` otherwise.
    pub async fn blob_meta(&self, name: &RepositoryName, digest: &Digest) -> Result<ObjectMeta> {
        let linked = self.read_link(Key::LayerLink(name, digest)).await?;
        if linked.as_ref() != Some(digest) {
            return Err(blob_unknown(digest));
        }
        self.driver
            .stat(&Key::Blob(digest).path())
            .await?
            .ok_or_else(|| blob_unknown(digest))
    }

    /// Streams `len` bytes of a blob from `start` (checked with [`Registry::blob_meta`]).
    pub async fn blob_reader(&self, digest: &Digest, start: u64, len: u64) -> Result<ByteStream> {
        self.driver
            .reader(&Key::Blob(digest).path(), start, len)
            .await?
            .ok_or_else(|| blob_unknown(digest))
    }

    /// Removes the blob from the repository (the content goes with garbage collection).
    pub async fn delete_blob(&self, name: &RepositoryName, digest: &Digest) -> Result<()> {
        let key = Key::LayerLink(name, digest).path();
        let dir = key.trim_end_matches("/link");
        if !self.driver.delete(dir).await? {
            return Err(blob_unknown(digest));
        }
        Ok(())
    }

    /// Links a blob that `from` has into `name`. `Ok(false)` if `from` does not have it.
    pub async fn mount_blob(
        &self,
        name: &RepositoryName,
        from: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool> {
        let referenced = [
            Key::Blob(digest).path(),
            Key::LayerLink(name, digest).path(),
        ];
        if !self.protect(&referenced).await? {
            // Being garbage-collected: the client uploads it instead.
            return Ok(false);
        }
        match self.blob_meta(from, digest).await {
            Ok(_) => {
                self.write_link(Key::LayerLink(name, digest), digest)
                    .await?;
                Ok(true)
            }
            Err(Error::Protocol(e)) if e.code == ErrorCode::BlobUnknown => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stores content the store does not hold yet (a manifest's, written whole; the caller
    /// checked that it is absent and that `body` has digest `digest`), and counts it in the
    /// store's usage.
    pub(crate) async fn put_blob(&self, digest: &Digest, body: Bytes) -> Result<()> {
        let size = body.len() as u64;
        self.driver.put(&Key::Blob(digest).path(), body).await?;
        self.usage.added(size);
        Ok(())
    }

    /// Whether the blob content exists at all (any repository).
    pub(crate) async fn blob_exists(&self, digest: &Digest) -> Result<bool> {
        Ok(self.driver.stat(&Key::Blob(digest).path()).await?.is_some())
    }
}

pub(crate) fn blob_unknown(digest: &Digest) -> Error {
    Error::Protocol(
        oci::OciError::new(
            ErrorCode::BlobUnknown,
            format!("blob {digest} is not in this repository"),
        )
        .with_detail(serde_json::json!({ "digest": digest.to_string() })),
    )
}
