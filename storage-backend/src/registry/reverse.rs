//! Which tags and which indexes point at a manifest, without reading every tag and manifest of
//! the repository: two reverse indexes in the store, as empty markers.
//!
//! - `_manifests/_tagged/<alg>/<hex>/<tag>`: the tag pointed at the manifest at some time. A
//!   tag push writes it (if absent) before it moves the tag.
//! - `_manifests/_parents/<alg>/<hex>/<alg>-<parent hex>`: an index in the repository lists
//!   the manifest. An index push writes it (if absent) for each child before it links the
//!   index into the repository.
//!
//! So every tag and every index that points at a manifest has its marker, whichever node
//! pushed it and whenever it crashed. A marker whose tag moved on, or whose index left the
//! repository, is stale and harmless: each candidate is confirmed (the tag's current link
//! read, the index's revision link read). Markers are never removed (a concurrent push could
//! be writing the one a removal would take), like registry:2's own `tags/<tag>/index/`
//! history.
//!
//! Tags and manifests written by something that writes no markers — a registry:2 root served
//! as it is, a repository pushed before these indexes existed, distribution or an older
//! Portcullis writing to the same root — are found by each node's **verification**: before it
//! answers from the markers, a node lists the repository's tags and revisions afresh and
//! reads (and marks) every one it has not checked since it started; the first lookup in a
//! repository on a node checks all of them (again after the node's memory of checked names,
//! 64 MiB, was full and cleared), later ones only what is new. What verification cannot see is
//! a tag *moved* — or deleted and created again under its name — by such a writer after this
//! node checked it: immutable tags are never moved or deleted (only a subject allowed to
//! override immutability may), so the immutability check holds; a delete by digest could
//! leave such a moved mutable tag pointing at nothing.
//!
//! Directories are listed without the pages' listing cache (`driver::listing`): what these
//! indexes answer decides deletes and refusals.

use super::{Registry, Result};
use crate::driver::listing::{Listing, sorted, weight};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::media_type;
use oci::{Algorithm, Digest, RepositoryName, Tag};
use std::collections::HashMap;
use std::sync::Mutex;

/// Links read and markers written at once while a repository is verified.
const PARALLEL: usize = 16;
/// Memory the names of checked tags and revisions may take, for all repositories; past it
/// everything is forgotten (and checked again when next needed).
const VERIFIED_BYTES: usize = 64 << 20;

/// Which tags a lookup wants confirmed (only those are read).
pub(super) type Wanted<'a> = &'a (dyn Fn(&Tag) -> bool + Sync);

/// What a node verified has its markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Checked {
    Tags,
    Revisions,
}

/// The names (tags, or revisions as `<alg>:<hex>`) this node has checked have their markers,
/// per repository, as last listed (sorted).
#[derive(Default)]
pub(super) struct Verified {
    inner: Mutex<VerifiedNames>,
}

#[derive(Default)]
struct VerifiedNames {
    by_repository: HashMap<(Checked, String), Listing>,
    /// Memory the names take ([`weight`]).
    bytes: usize,
}

impl Verified {
    fn get(&self, what: Checked, name: &RepositoryName) -> Option<Listing> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.by_repository.get(&(what, name.to_string())).cloned()
    }

    fn set(&self, what: Checked, name: &RepositoryName, names: Listing) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let added = weight(&names);
        if inner.bytes + added > VERIFIED_BYTES {
            inner.by_repository.clear();
            inner.bytes = 0;
        }
        if let Some(old) = inner.by_repository.insert((what, name.to_string()), names) {
            inner.bytes -= weight(&old);
        }
        inner.bytes += added;
    }
}

/// `names` sorted, the ones not in `known` (sorted too).
fn unchecked<'a>(names: &'a [String], known: Option<&[String]>) -> Vec<&'a str> {
    names
        .iter()
        .filter(|n| known.is_none_or(|k| k.binary_search(n).is_err()))
        .map(String::as_str)
        .collect()
}

impl Registry {
    /// The children of `prefix`, sorted, listed from the store now — never from the pages'
    /// listing cache ([`crate::driver::listing`]): what is read through this decides.
    pub(super) async fn list_afresh(&self, prefix: &str) -> Result<Listing> {
        Ok(sorted(self.driver.list(prefix).await?))
    }

    /// Writes a marker unless it is there (a tag pushed again to the same manifest).
    async fn mark(&self, marker: &str) -> Result<()> {
        if self.driver.stat(marker).await?.is_none() {
            self.driver.put(marker, Bytes::new()).await?;
        }
        Ok(())
    }

    /// Records, before `tag` is pointed at `digest`, that it points there.
    pub(super) async fn mark_tagged(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<()> {
        self.mark(&Key::TaggedMarker(name, digest, tag).path())
            .await
    }

    /// Records, before the index `parent` is linked into the repository, that it lists each
    /// of `children`.
    pub(super) async fn mark_parent(
        &self,
        name: &RepositoryName,
        parent: &Digest,
        children: &[Digest],
    ) -> Result<()> {
        for child in children {
            self.mark(&Key::ParentMarker(name, child, parent).path())
                .await?;
        }
        Ok(())
    }

    /// Makes sure every tag listed now has its marker: the tags this node has not checked
    /// (all of them, the first time) have their links read and their markers written. A tag
    /// with no link yet (a push in progress) is not counted as checked.
    pub(super) async fn verify_tags(&self, name: &RepositoryName) -> Result<()> {
        let names = self.list_afresh(&Key::Tags(name).path()).await?;
        let known = self.verified.get(Checked::Tags, name);
        let new: Vec<Tag> = unchecked(&names, known.as_deref())
            .into_iter()
            .filter_map(|t| Tag::parse(t).ok())
            .collect();
        let unlinked: Vec<Option<Tag>> = self
            .tag_targets(name, new)
            .map(|(tag, target)| async move {
                match target? {
                    Some(d) => self.mark_tagged(name, &tag, &d).await.map(|()| None),
                    // Being pushed (or deleted) right now: checked again next time.
                    None => Ok(Some(tag)),
                }
            })
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        let unlinked: Vec<&str> = unlinked.iter().flatten().map(Tag::as_str).collect();
        let checked: Vec<String> = names
            .iter()
            .filter(|n| !unlinked.contains(&n.as_str()))
            .cloned()
            .collect();
        self.verified.set(Checked::Tags, name, checked.into());
        Ok(())
    }

    /// Makes sure every index linked now has its children's markers: the revisions this node
    /// has not checked (all of them, the first time) are read, and each index's marked.
    async fn verify_parents(&self, name: &RepositoryName) -> Result<()> {
        let mut names = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = Key::Revisions(name, alg).path();
            for hex in self.driver.list(&dir).await? {
                names.push(format!("{alg}:{hex}"));
            }
        }
        let names = sorted(names);
        let known = self.verified.get(Checked::Revisions, name);
        let new: Vec<Digest> = unchecked(&names, known.as_deref())
            .into_iter()
            .filter_map(|d| Digest::parse(d).ok())
            .collect();
        stream::iter(new)
            .map(|index| async move {
                let Some(body) = self.driver.get(&Key::Blob(&index).path()).await? else {
                    return Ok(());
                };
                if let Ok(parsed) = media_type::parse_manifest(None, &body) {
                    self.mark_parent(name, &index, &parsed.children()).await?;
                }
                Ok::<_, super::Error>(())
            })
            .buffered(PARALLEL)
            .try_collect::<()>()
            .await?;
        self.verified.set(Checked::Revisions, name, names);
        Ok(())
    }

    /// Makes sure every tag and index of the repository listed now has its markers
    /// ([`Registry::verify_tags`], [`Registry::verify_parents`]).
    pub(super) async fn verify_markers(&self, name: &RepositoryName) -> Result<()> {
        self.verify_tags(name).await?;
        self.verify_parents(name).await
    }

    /// The tags pointing at `digest` now, among those `wanted` accepts, in name order; no
    /// more than `limit`. Reads the markers of `digest` and the links of the wanted
    /// candidates: the caller verified the markers ([`Registry::verify_tags`]).
    pub(super) async fn tags_marked(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        wanted: Wanted<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<Tag>> {
        let markers = self.list_afresh(&Key::Tagged(name, digest).path()).await?;
        let candidates: Vec<Tag> = markers
            .iter()
            .filter_map(|t| Tag::parse(t).ok())
            .filter(|t| wanted(t))
            .collect();
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

    /// The indexes that list `child`, from its markers — also one no longer linked in the
    /// repository (its tags are looked up all the same: a middle index that lost its link
    /// still carries the protection of the index above it).
    async fn parents_marked(&self, name: &RepositoryName, child: &Digest) -> Result<Vec<Digest>> {
        let markers = self.list_afresh(&Key::Parents(name, child).path()).await?;
        Ok(markers
            .iter()
            .filter_map(|m| {
                let (alg, hex) = m.split_once('-')?;
                Digest::parse(&format!("{alg}:{hex}")).ok()
            })
            .collect())
    }

    /// The first tag `wanted` accepts (in name order) that points at `target` or at an index
    /// that lists it, directly or through nested indexes; `true` with it when the tag points
    /// at `target` itself. From the markers: the caller verified them
    /// ([`Registry::verify_markers`]) — or, looking again after a delete for what was pushed
    /// meanwhile, relies on pushes writing theirs.
    pub(super) async fn tag_of_image(
        &self,
        name: &RepositoryName,
        target: &Digest,
        wanted: Wanted<'_>,
    ) -> Result<Option<(Tag, bool)>> {
        let mut seen = std::collections::HashSet::from([target.clone()]);
        let mut next = vec![target.clone()];
        while let Some(m) = next.pop() {
            if let Some(tag) = self.tags_marked(name, &m, wanted, Some(1)).await?.pop() {
                return Ok(Some((tag, &m == target)));
            }
            for parent in self.parents_marked(name, &m).await? {
                if seen.insert(parent.clone()) {
                    next.push(parent);
                }
            }
        }
        Ok(None)
    }
}
