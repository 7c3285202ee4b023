//! Registry semantics, written once over the dumb [`Driver`]: repositories hold links to
//! content-addressed blobs; manifests are blobs with revision links; tags are links to
//! manifests; upload sessions live in the store so any process on the same root can go on
//! with them.

mod blobs;
mod catalog;
mod gc;
mod manifests;
mod protect;
mod pulls;
mod referrers;
mod reverse;
mod uploads;
mod usage;

pub use catalog::Page;
pub use gc::{GcOptions, GcReport, SweptBlob};
pub use manifests::{ManifestPut, StoredManifest};
pub use protect::{Overridden, Protected};
pub use pulls::Recorded;
pub use uploads::UploadState;
pub use usage::{Usage, UsageTotals};

use crate::driver::Driver;
use crate::layout::Key;
use oci::{Digest, ErrorCode, OciError, Verifier};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

/// What a tag's current link holds once retention deleted the tag (followed by the digest it
/// pointed to): the tag is absent. Deleting the tag this way is a compare-and-swap, so a push
/// that moved the tag meanwhile keeps its tag, and a new push of the tag swaps it back.
pub const TAG_TOMBSTONE: &str = "deleted ";

/// A registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's mistake or a protocol outcome: answered with the OCI error.
    #[error(transparent)]
    Protocol(#[from] OciError),
    /// A chunk did not start where the upload is: 416 with the upload's current range.
    #[error("chunk starts at {expected}, the upload is at {current}")]
    UploadOffset { current: u64, expected: u64 },
    /// The store failed: logged, answered 500 without details.
    #[error("storage: {0}")]
    Storage(#[from] io::Error),
}

impl Error {
    pub(crate) fn oci(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Protocol(OciError::new(code, message))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Tunables of registry behaviour.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            max_manifest_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The registry over one store.
pub struct Registry {
    driver: Arc<dyn Driver>,
    options: RegistryOptions,
    /// Running hash of upload sessions this process has written, by id: `(offset, hasher)`.
    /// Only a cache: when it is missing or behind (another process wrote a chunk), the
    /// content is hashed again from the store when the upload finishes.
    hashers: Mutex<HashMap<String, (u64, Verifier)>>,
    /// What this node checked has its reverse-index markers ([`reverse`]).
    verified: reverse::Verified,
    /// The store's blobs and bytes as this node knows them (for the metrics).
    usage: Usage,
    /// The store has its `_pulls/since` ([`pulls`]): no need to write it again.
    pulls_since_written: std::sync::atomic::AtomicBool,
}

impl Registry {
    pub fn new(driver: Arc<dyn Driver>, options: RegistryOptions) -> Self {
        Registry {
            driver,
            options,
            hashers: Mutex::new(HashMap::new()),
            verified: reverse::Verified::default(),
            usage: Usage::default(),
            pulls_since_written: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Reads a link file: a digest written as text.
    async fn read_link(&self, key: Key<'_>) -> Result<Option<Digest>> {
        let Some(bytes) = self.driver.get(&key.path()).await? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        if text.starts_with(TAG_TOMBSTONE) {
            return Ok(None);
        }
        match Digest::parse(text.trim()) {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                tracing::warn!(path = %key.path(), error = %e, "ignoring corrupt link");
                Ok(None)
            }
        }
    }

    async fn write_link(&self, key: Key<'_>, digest: &Digest) -> Result<()> {
        self.driver
            .put(&key.path(), digest.to_string().into())
            .await?;
        Ok(())
    }

    /// How many blobs the store holds and their bytes as this node knows them: its last
    /// walk of `blobs/` and its own changes since (`usage`); `None` before its first walk.
    pub fn usage(&self) -> Option<UsageTotals> {
        self.usage.totals()
    }

    /// Walks `blobs/` (one `stat` per blob) to measure the store's usage afresh: at start-up
    /// (GC runs measure it on their way).
    pub async fn measure_usage(&self) -> Result<()> {
        let walk = self.usage.walk_begins();
        let (blobs, bytes) = self.blob_totals().await?;
        self.usage.walked(walk, blobs, bytes);
        Ok(())
    }

    /// Whether the store answers at all (for readiness).
    pub async fn check(&self) -> Result<()> {
        // A store that does not answer (an object store retrying, a hung mount) is not ready.
        match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.driver.list(&Key::Repositories.path()),
        )
        .await
        {
            Ok(r) => {
                r?;
                Ok(())
            }
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the store did not answer within 5 s",
            )
            .into()),
        }
    }
}
