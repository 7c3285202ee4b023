//! When manifests were last pulled, as the gateways tell it: one marker per manifest of a
//! repository, `_manifests/_pulled/<alg>/<hex>`, holding the unix seconds of the last pull it
//! was told of. Retention's `keep_pulled_days` reads them (`gc::scan`, `gc::options`).
//!
//! Storage does not see every pull (a gateway answers manifest reads from memory), so the
//! gateways tell it (`POST /internal/pulled`), each at most once an hour per manifest: a
//! time is as fresh as an hour (storage's clock when told), which is what a rule counted in
//! days needs. A marker is written only for a manifest the repository holds (looked at
//! before and after the write, so a delete meanwhile takes the marker too), and goes with
//! the manifest (a delete, or GC sweeping it); one a crash left behind is harmless: GC reads
//! only the markers of manifests the repository holds, a manifest pushed again is younger
//! than its old marker, and retention goes by the later of push and pull.
//!
//! Pulls before the store was first told of one are unknown: the first tell writes
//! `_pulls/since` (if absent), and retention counts every manifest as pulled at that time at
//! the latest — so a rule added to a store whose pulls were never told deletes nothing by
//! pulls until `keep_pulled_days` after the first tell, and with no tell at all, nothing.

use super::{Registry, Result};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use oci::{Digest, RepositoryName};
use std::collections::HashSet;

use super::gc::PARALLEL;

/// What a tell came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Pulls whose time was written.
    pub recorded: usize,
    /// Manifests their repository does not hold (nothing written).
    pub skipped: usize,
    /// Pulls the store failed to write (logged).
    pub failed: usize,
}

impl Registry {
    /// Records that each manifest was pulled at `at` (unix seconds); a manifest its repository
    /// does not hold is skipped, and a write that fails fails that pull alone.
    pub async fn record_pulls(
        &self,
        pulls: &[(RepositoryName, Digest)],
        at: u64,
    ) -> Result<Recorded> {
        if !self
            .pulls_since_written
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let since = Key::PullsSince.path();
            self.driver
                .put_if_absent(&since, Bytes::from(at.to_string()))
                .await?;
            self.pulls_since_written
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // By index: a stream of references would not be `Send` for every lifetime.
        let results: Vec<Result<bool>> = stream::iter(0..pulls.len())
            .map(|i| self.record_pull(&pulls[i].0, &pulls[i].1, at))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut out = Recorded::default();
        for r in results {
            match r {
                Ok(true) => out.recorded += 1,
                Ok(false) => out.skipped += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "recording a pull's time failed");
                    out.failed += 1;
                }
            }
        }
        Ok(out)
    }

    async fn record_pull(&self, name: &RepositoryName, digest: &Digest, at: u64) -> Result<bool> {
        let held = || async { self.read_link(Key::RevisionLink(name, digest)).await };
        if held().await?.is_none() {
            return Ok(false);
        }
        let marker = Key::PulledAt(name, digest).path();
        self.driver
            .put(&marker, Bytes::from(at.to_string()))
            .await?;
        // A delete between the look and the write would leave the marker behind: look again.
        if held().await?.is_none() {
            self.forget_pulls(name, digest).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// When the store was first told of a pull (unix seconds), if ever.
    pub(super) async fn pulls_since(&self) -> Result<Option<i64>> {
        Ok(unix_seconds(
            self.driver.get(&Key::PullsSince.path()).await?,
        ))
    }

    /// The last pull told of each of `digests` in `name` (unix seconds), in their order,
    /// read [`PARALLEL`] at a time.
    pub(super) async fn pull_times(
        &self,
        name: &RepositoryName,
        digests: &[Digest],
    ) -> Result<Vec<Option<i64>>> {
        // By index: a stream of references would not be `Send` for every lifetime.
        let texts: Vec<std::io::Result<Option<Bytes>>> = stream::iter(0..digests.len())
            .map(|i| {
                let marker = Key::PulledAt(name, &digests[i]).path();
                async move { self.driver.get(&marker).await }
            })
            .buffered(PARALLEL)
            .collect()
            .await;
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            out.push(unix_seconds(text?));
        }
        Ok(out)
    }

    /// Of `digests` in `name`, those pulled at or after `t` (unix seconds): what a retention
    /// plan made before must not delete after all.
    pub(super) async fn pulled_after(
        &self,
        name: &RepositoryName,
        digests: &[Digest],
        t: i64,
    ) -> Result<HashSet<Digest>> {
        let times = self.pull_times(name, digests).await?;
        Ok(digests
            .iter()
            .zip(times)
            .filter(|(_, at)| at.is_some_and(|at| at >= t))
            .map(|(d, _)| d.clone())
            .collect())
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

/// The unix seconds a marker holds (none if it holds none).
fn unix_seconds(text: Option<Bytes>) -> Option<i64> {
    std::str::from_utf8(&text?).ok()?.trim().parse().ok()
}
