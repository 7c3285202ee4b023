//! Tag immutability where the data is: a DELETE the gateway sends with the repository's
//! immutability rules ([`policy::immutability::Protection`]) is refused here, against what
//! the tags point to at that moment, if it would break an image an immutable tag names — the
//! manifest itself, a child of an immutable index, or a blob (config, layer) such an image
//! needs. There is no lock (several storage nodes share one store): a delete by digest finds
//! every tag of the manifest before it removes any (an immutable one stops it with nothing
//! changed), and every delete looks again after it is done — an immutable image that came to
//! need the object meanwhile (a tag pushed concurrently) gets its link written back (the
//! content is still there: GC keeps fresh content for its grace window) and the delete is
//! refused, so an acknowledged immutable tag never ends up naming something missing. Such a
//! late refusal may come after the manifest's mutable tags were removed.

use super::{Registry, Result};
use crate::layout::Key;
use futures_util::{StreamExt, stream};
use oci::media_type;
use oci::{Digest, ErrorCode, OciError, RepositoryName, Tag};
use policy::ImmutableBy;
use policy::immutability::CompiledProtection;
use std::collections::HashSet;

/// What a delete removes from a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Manifest,
    Blob,
}

/// How the deleted object belongs to an immutable tag's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Belongs {
    /// The tag points to it.
    Tagged,
    /// It is a child of the index the tag points to.
    IndexChild,
    /// It is a config or layer of the tag's image.
    Content,
    /// The tag was pushed to it while it was being deleted.
    TaggedMeanwhile,
}

/// Why a delete touches an immutable image: the tag, the rule, and how.
#[derive(Debug, Clone)]
pub struct Protected {
    pub tag: Tag,
    pub by: ImmutableBy,
    pub belongs: Belongs,
}

/// What a protected delete did: `Some` when it went ahead over an immutable tag (the subject
/// may override; audited as break-glass).
pub type Overridden = Option<Protected>;

impl Protected {
    /// The 403 `DENIED` a client gets, naming the tag and the rule.
    pub(super) fn refusal(&self, digest: &Digest) -> super::Error {
        let how = match self.belongs {
            Belongs::Tagged => "is tagged with",
            Belongs::IndexChild => "is part of the index tagged with",
            Belongs::Content => "is content of the image tagged with",
            Belongs::TaggedMeanwhile => "was tagged, while being deleted, with",
        };
        super::Error::Protocol(OciError::new(
            ErrorCode::Denied,
            format!(
                "{digest} {how} the immutable tag {} (policy line {}, pattern {}) and cannot be deleted",
                self.tag, self.by.line, self.by.pattern
            ),
        ))
    }
}

/// The refusal for deleting `digest`, which the immutable `tag` points to, if the subject may
/// not override (used while a delete by digest collects its tags).
pub(super) fn refuse_tagged(
    p: Option<&CompiledProtection>,
    tag: &Tag,
    digest: &Digest,
) -> Result<()> {
    match p
        .filter(|p| !p.may_override)
        .and_then(|p| p.immutable(tag.as_str()))
    {
        None => Ok(()),
        Some(by) => Err(Protected {
            tag: tag.clone(),
            by,
            belongs: Belongs::Tagged,
        }
        .refusal(digest)),
    }
}

impl Registry {
    /// The images the repository's immutable tags name: each manifest once, with the first
    /// tag (in name order) that names it and its rule. The tags are listed afresh (not from
    /// the pages' listing cache) and every immutable tag's link is read: this decides.
    async fn immutable_images(
        &self,
        name: &RepositoryName,
        p: &CompiledProtection,
    ) -> Result<Vec<(Digest, Tag, ImmutableBy)>> {
        let names = self.list_afresh(&Key::Tags(name).path()).await?;
        let (tags, rules): (Vec<Tag>, Vec<ImmutableBy>) = names
            .iter()
            .filter_map(|t| Tag::parse(t).ok())
            .filter_map(|t| p.immutable(t.as_str()).map(|by| (t, by)))
            .unzip();
        let mut read = self.tag_targets(name, tags).zip(stream::iter(rules));
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(((tag, target), by)) = read.next().await {
            if let Some(d) = target?
                && seen.insert(d.clone())
            {
                out.push((d, tag, by));
            }
        }
        Ok(out)
    }

    /// The immutable tag whose image `target` belongs to, if any: as the tagged manifest, a
    /// child of a tagged index, or a config or layer of either.
    async fn protecting(
        &self,
        name: &RepositoryName,
        p: &CompiledProtection,
        target: &Digest,
        kind: Target,
    ) -> Result<Option<Protected>> {
        // A manifest: its tags and the tags of the indexes that list it, from the reverse
        // indexes (`reverse`), verified against the repository as it is now.
        if kind == Target::Manifest {
            let immutable = |t: &Tag| p.immutable(t.as_str()).is_some();
            let found = self.tag_of_image(name, target, &immutable).await?;
            return Ok(found.and_then(|(tag, itself)| {
                let by = p.immutable(tag.as_str())?;
                let belongs = if itself {
                    Belongs::Tagged
                } else {
                    Belongs::IndexChild
                };
                Some(Protected { tag, by, belongs })
            }));
        }
        // A blob: the images every immutable tag names, each read.
        for (digest, tag, by) in self.immutable_images(name, p).await? {
            let mut seen = HashSet::new();
            let mut next = vec![digest];
            while let Some(m) = next.pop() {
                if !seen.insert(m.clone()) {
                    continue;
                }
                let Some(body) = self.driver.get(&Key::Blob(&m).path()).await? else {
                    continue;
                };
                let Ok(parsed) = media_type::parse_manifest(None, &body) else {
                    continue;
                };
                if parsed.blob_references().any(|b| &b.digest == target) {
                    return Ok(Some(Protected {
                        tag,
                        by,
                        belongs: Belongs::Content,
                    }));
                }
                next.extend(parsed.manifests.into_iter().map(|c| c.digest));
            }
        }
        Ok(None)
    }

    /// Checks a delete of `target` against the protection: `Err(DENIED)` if it would break an
    /// immutable image and the subject may not override; what it overrides otherwise.
    async fn check_protection(
        &self,
        name: &RepositoryName,
        p: Option<&CompiledProtection>,
        target: &Digest,
        kind: Target,
    ) -> Result<Overridden> {
        let Some(p) = p else { return Ok(None) };
        match self.protecting(name, p, target, kind).await? {
            None => Ok(None),
            Some(hit) if p.may_override => Ok(Some(hit)),
            Some(hit) => Err(hit.refusal(target)),
        }
    }

    /// Looks again after a delete: an immutable image that came to need `target` meanwhile
    /// (a tag pushed to it, or to an image that uses it) gets `link` back, and the delete is
    /// refused. (Content stays in the store until GC, which keeps fresh content for its
    /// grace window.)
    async fn recheck(
        &self,
        name: &RepositoryName,
        p: Option<&CompiledProtection>,
        target: &Digest,
        kind: Target,
        link: Key<'_>,
    ) -> Result<()> {
        let Some(p) = p.filter(|p| !p.may_override) else {
            return Ok(());
        };
        if let Some(mut hit) = self.protecting(name, p, target, kind).await? {
            self.write_link(link, target).await?;
            if hit.belongs == Belongs::Tagged {
                hit.belongs = Belongs::TaggedMeanwhile;
            }
            return Err(hit.refusal(target));
        }
        Ok(())
    }

    /// [`Registry::delete_manifest`] by digest under immutability rules.
    pub async fn delete_manifest_protected(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        p: Option<&CompiledProtection>,
    ) -> Result<Overridden> {
        // Tags and indexes written without markers are marked first (`reverse`); the check,
        // the delete and the re-check then read markers.
        self.verify_markers(name).await?;
        let overridden = self
            .check_protection(name, p, digest, Target::Manifest)
            .await?;
        self.delete_by_digest(name, digest, p).await?;
        self.recheck(
            name,
            p,
            digest,
            Target::Manifest,
            Key::RevisionLink(name, digest),
        )
        .await?;
        Ok(overridden)
    }

    /// [`Registry::delete_blob`] under immutability rules.
    pub async fn delete_blob_protected(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        p: Option<&CompiledProtection>,
    ) -> Result<Overridden> {
        let overridden = self.check_protection(name, p, digest, Target::Blob).await?;
        self.delete_blob(name, digest).await?;
        self.recheck(name, p, digest, Target::Blob, Key::LayerLink(name, digest))
            .await?;
        Ok(overridden)
    }
}
