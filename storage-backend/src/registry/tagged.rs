//! Which tags point at a manifest, without reading every tag of the repository: a reverse
//! index in the store, `_manifests/_tagged/<alg>/<hex>/<tag>` (an empty marker: the tag
//! pointed there at some time).
//!
//! A tag push writes the marker before it moves the tag, so every tag that points at a
//! manifest has its marker there, whichever node pushed it and whenever it crashed; a marker
//! whose tag moved on, or was deleted, is stale and harmless, because each candidate's current
//! link is read to confirm it. Markers are never removed (a concurrent push could be writing
//! the one a removal would take), like registry:2's own `tags/<tag>/index/` history.
//!
//! A repository whose tags were written by something else — a registry:2 root served as it
//! is, or tags pushed before the index existed — has no `complete` marker: the first lookup
//! reads every tag once, writes the markers, then `complete`. A tag pushed during that walk
//! writes its own marker, so nothing is missed. A writer that knows nothing of the markers
//! (distribution, or an older Portcullis, writing to the same root after that) would go
//! unseen: every storage node on a root must run a version that writes them.

use super::{Registry, Result};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Digest, RepositoryName, Tag};

/// Tag links read (or markers written) at once.
const PARALLEL: usize = 16;

/// Which tags a lookup wants confirmed (only those are read).
pub(super) type Wanted<'a> = &'a (dyn Fn(&Tag) -> bool + Sync);

impl Registry {
    /// Records, before `tag` is pointed at `digest`, that it points there.
    pub(super) async fn mark_tagged(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
        self.driver
            .put(&Key::TaggedMarker(name, digest, tag).path(), Bytes::new())
            .await?;
        Ok(())
    }

    /// The tags pointing at `digest` now, among those `wanted` accepts, in name order; no
    /// more than `limit` of them. Reads the markers of `digest` and the links of the wanted
    /// candidates, not every tag.
    pub(super) async fn tagged(
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
        let found = if complete {
            let candidates = self
                .driver
                .list_sorted(&Key::Tagged(name, digest).path())
                .await?;
            let candidates = candidates
                .iter()
                .filter_map(|t| Tag::parse(t).ok())
                .filter(|t| wanted(t))
                .collect::<Vec<_>>();
            self.pointing(name, candidates, digest, limit).await?
        } else {
            self.index_tags(name, digest, wanted).await?
        };
        Ok(match limit {
            Some(l) => found.into_iter().take(l).collect(),
            None => found,
        })
    }

    /// Those of `candidates` whose current link names `digest` (at most `limit`), in order.
    async fn pointing(
        &self,
        name: &RepositoryName,
        candidates: Vec<Tag>,
        digest: &Digest,
        limit: Option<usize>,
    ) -> Result<Vec<Tag>> {
        let mut read = stream::iter(candidates)
            .map(|tag| async move {
                let target = self.tag_target(name, &tag).await;
                (tag, target)
            })
            .buffered(PARALLEL);
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

    /// Builds the repository's index from its tags (each link read once, each marker written,
    /// then `complete`) and answers the lookup from what it read.
    async fn index_tags(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        wanted: Wanted<'_>,
    ) -> Result<Vec<Tag>> {
        let names = self.driver.list_sorted(&Key::Tags(name).path()).await?;
        let tags: Vec<Tag> = names.iter().filter_map(|t| Tag::parse(t).ok()).collect();
        let found: Vec<Option<Tag>> = stream::iter(tags)
            .map(|tag| async move {
                let Some(target) = self.tag_target(name, &tag).await? else {
                    return Ok(None);
                };
                self.mark_tagged(name, &tag, &target).await?;
                Ok::<_, super::Error>((&target == digest && wanted(&tag)).then_some(tag))
            })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        self.driver
            .put(&Key::TaggedComplete(name).path(), Bytes::new())
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}
