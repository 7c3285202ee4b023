//! Which tags point at a manifest, without reading every tag of the repository: a reverse
//! index in the store, `_manifests/_tagged/<alg>/<hex>/<tag>` (an empty marker: the tag
//! pointed there at some time).
//!
//! A tag push writes the marker (if it is not there yet) before it moves the tag, so every
//! tag that points at a manifest has its marker there, whichever node pushed it and whenever
//! it crashed; a marker whose tag moved on, or was deleted, is stale and harmless, because
//! each candidate's current link is read to confirm it. Markers are never removed (a
//! concurrent push could be writing the one a removal would take), like registry:2's own
//! `tags/<tag>/index/` history.
//!
//! A repository has `complete` once one lookup read all its tags and wrote their markers;
//! until then — a registry:2 root served as it is, tags pushed before the index existed, or a
//! repository never looked up yet — a lookup reads every tag once, writes the missing markers,
//! then `complete`. A tag pushed during that walk writes its own marker, so nothing is
//! missed. A writer that knows nothing of the markers (distribution, or an older Portcullis,
//! pushing to the same root afterwards) goes unseen by the index; the immutability check does
//! not rely on it alone (`protect`).
//!
//! Marker directories are listed without the listing cache (`driver::listing`): what the
//! index answers feeds deletes and refusals, never a page.

use super::{Registry, Result};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci::{Digest, RepositoryName, Tag};

/// Markers written at once while a repository is indexed.
const PARALLEL: usize = 16;

/// Which tags a lookup wants confirmed (only those are read).
pub(super) type Wanted<'a> = &'a (dyn Fn(&Tag) -> bool + Sync);

impl Registry {
    /// Records, before `tag` is pointed at `digest`, that it points there (nothing is written
    /// if the marker is there already: a tag pushed again to the same manifest).
    pub(super) async fn mark_tagged(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
        let marker = Key::TaggedMarker(name, digest, tag).path();
        if self.driver.stat(&marker).await?.is_none() {
            self.driver.put(&marker, Bytes::new()).await?;
        }
        Ok(())
    }

    /// The tags pointing at `digest` now, among those `wanted` accepts, in name order; no
    /// more than `limit`. Reads the markers of `digest` and the links of the wanted
    /// candidates — except in a repository not indexed yet, where every tag's link is read
    /// (and the index written) once.
    pub(super) async fn tags_pointing_at(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        wanted: Wanted<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<Tag>> {
        let complete = self
            .driver
            .stat(&Key::TaggedComplete(name).path())
            .await?
            .is_some();
        if !complete {
            return self.index_tags(name, digest, wanted, limit).await;
        }
        let mut markers = self.driver.list(&Key::Tagged(name, digest).path()).await?;
        markers.sort_unstable();
        let candidates: Vec<Tag> = markers
            .iter()
            .filter_map(|t| Tag::parse(t).ok())
            .filter(|t| wanted(t))
            .collect();
        self.confirmed_among(name, candidates, digest, limit).await
    }

    /// Those of `candidates` whose current link names `digest` (at most `limit`), in order.
    async fn confirmed_among(
        &self,
        name: &RepositoryName,
        candidates: Vec<Tag>,
        digest: &Digest,
        limit: Option<usize>,
    ) -> Result<Vec<Tag>> {
        let mut read = self.tag_targets(name, candidates);
        let mut out = Vec::new();
        while let Some((tag, target)) = read.next().await {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            if target?.as_ref() == Some(digest) {
                out.push(tag);
            }
        }
        Ok(out)
    }

    /// Indexes the repository from its tags (each link read once, each missing marker
    /// written, then `complete`) and answers the lookup from what it read.
    async fn index_tags(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        wanted: Wanted<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<Tag>> {
        let mut names = self.driver.list(&Key::Tags(name).path()).await?;
        names.sort_unstable();
        let tags: Vec<Tag> = names.iter().filter_map(|t| Tag::parse(t).ok()).collect();
        let targets: Vec<(Tag, Option<Digest>)> = self
            .tag_targets(name, tags)
            .map(|(tag, target)| async move {
                let target = target?;
                if let Some(d) = &target {
                    self.mark_tagged(name, &tag, d).await?;
                }
                Ok::<_, super::Error>((tag, target))
            })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        self.driver
            .put(&Key::TaggedComplete(name).path(), Bytes::new())
            .await?;
        let found = targets
            .into_iter()
            .filter(|(tag, target)| target.as_ref() == Some(digest) && wanted(tag))
            .map(|(tag, _)| tag);
        Ok(found.take(limit.unwrap_or(usize::MAX)).collect())
    }
}
