//! When manifests were last pulled, as the gateways tell it: one marker per manifest of a
//! repository, `_manifests/_pulled/<alg>/<hex>`, holding the unix seconds of the last pull it
//! was told of. Retention's `keep_pulled_days` reads them (`gc::options::plan_retention`).
//!
//! Storage does not see every pull (a gateway answers manifest reads from memory), so the
//! gateways tell it (`POST /internal/pulled`), each at most once an hour per manifest: a
//! marker is as fresh as an hour, which is what a rule counted in days needs. A marker is
//! written only for a manifest the repository holds, and goes with the manifest (a delete, or
//! GC sweeping it); one left by a crash in between is harmless: the manifest pushed again is
//! younger than it, and retention goes by the later of push and pull.

use super::{Registry, Result};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Digest, RepositoryName};

/// Markers written at once.
const PARALLEL: usize = 16;

impl Registry {
    /// Records that each manifest was pulled at `at` (unix seconds); a manifest its repository
    /// does not hold is skipped. How many were recorded.
    pub async fn record_pulls(&self, pulls: &[(RepositoryName, Digest)], at: u64) -> Result<usize> {
        // By index: a stream of references would not be `Send` for every lifetime.
        let written: Vec<bool> = stream::iter(0..pulls.len())
            .map(|i| self.record_pull(&pulls[i].0, &pulls[i].1, at))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(written.into_iter().filter(|w| *w).count())
    }

    async fn record_pull(&self, name: &RepositoryName, digest: &Digest, at: u64) -> Result<bool> {
        if self
            .read_link(Key::RevisionLink(name, digest))
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let marker = Key::PulledAt(name, digest).path();
        self.driver
            .put(&marker, Bytes::from(at.to_string()))
            .await?;
        Ok(true)
    }

    /// The marker of a manifest going out of `name` goes with it (best effort: see the module).
    pub(super) async fn forget_pulls(&self, name: &RepositoryName, digest: &Digest) {
        if let Err(e) = self
            .driver
            .delete(&Key::PulledAt(name, digest).path())
            .await
        {
            tracing::debug!(repository = %name, %digest, error = %e, "pull marker left behind");
        }
    }
}
