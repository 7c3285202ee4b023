//! Tag immutability where the data is: a DELETE the gateway sends with the repository's
//! immutability rules ([`policy::immutability::Protection`]) is refused here, against what
//! the tags point to at that moment, if it would break an image an immutable tag names — the
//! manifest itself, a child of an immutable index, or a blob (config, layer) such an image
//! needs. A tag pushed while the delete runs is looked at again after it: if it is immutable
//! and points to the deleted manifest, the manifest's revision link is written back (its
//! content is still there: GC keeps fresh content for its grace window) and the delete is
//! refused, so an acknowledged immutable tag never ends up naming nothing.

use super::{Registry, Result};
use crate::layout::Key;
use oci::media_type;
use oci::{Digest, ErrorCode, OciError, RepositoryName, Tag};
use policy::ImmutableBy;
use policy::immutability::CompiledProtection;
use std::collections::HashSet;

/// Why a delete touches an immutable image: the tag and the rule.
#[derive(Debug, Clone)]
pub struct Protected {
    pub tag: Tag,
    pub by: ImmutableBy,
    /// How the deleted object belongs to the tag's image.
    pub how: &'static str,
}

/// What a protected delete did: `Some` when it went ahead over an immutable tag (the subject
/// may override; audited as break-glass).
pub type Overridden = Option<Protected>;

impl Protected {
    fn refusal(&self, what: &str) -> super::Error {
        super::Error::Protocol(OciError::new(
            ErrorCode::Denied,
            format!(
                "{what} {} immutable tag {} (policy line {}, pattern {}) and cannot be deleted",
                self.how, self.tag, self.by.line, self.by.pattern
            ),
        ))
    }
}

impl Registry {
    /// The repository's immutable tags and what they point to.
    async fn immutable_tags(
        &self,
        name: &RepositoryName,
        p: &CompiledProtection,
    ) -> Result<Vec<(Tag, Digest, ImmutableBy)>> {
        let mut out = Vec::new();
        for t in self.driver.list(&Key::Tags(name).path()).await? {
            let Ok(tag) = Tag::parse(&t) else { continue };
            let Some(by) = p.immutable(tag.as_str()) else {
                continue;
            };
            if let Some(d) = self.tag_target(name, &tag).await? {
                out.push((tag, d, by));
            }
        }
        Ok(out)
    }

    /// The immutable tag whose image `target` belongs to, if any: as the tagged manifest, a
    /// child of a tagged index, or (`blob`) a config or layer of either.
    async fn protecting(
        &self,
        name: &RepositoryName,
        p: &CompiledProtection,
        target: &Digest,
        blob: bool,
    ) -> Result<Option<Protected>> {
        for (tag, digest, by) in self.immutable_tags(name, p).await? {
            if !blob && &digest == target {
                return Ok(Some(Protected {
                    tag,
                    by,
                    how: "is tagged with the",
                }));
            }
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
                let hit = if blob {
                    parsed.blob_references().any(|b| &b.digest == target)
                } else {
                    parsed.manifests.iter().any(|c| &c.digest == target)
                };
                if hit {
                    let how = if blob {
                        "is content of the image named by the"
                    } else {
                        "is part of the index named by the"
                    };
                    return Ok(Some(Protected { tag, by, how }));
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
        blob: bool,
    ) -> Result<Overridden> {
        let Some(p) = p else { return Ok(None) };
        match self.protecting(name, p, target, blob).await? {
            None => Ok(None),
            Some(hit) if p.may_override => Ok(Some(hit)),
            Some(hit) => Err(hit.refusal(if blob { "blob" } else { "manifest" })),
        }
    }

    /// [`Registry::delete_manifest`] by digest under immutability rules.
    pub async fn delete_manifest_protected(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        p: Option<&CompiledProtection>,
    ) -> Result<Overridden> {
        let overridden = self.check_protection(name, p, digest, false).await?;
        self.delete_manifest(name, &oci::Reference::Digest(digest.clone()), p)
            .await?;
        // An immutable tag pushed to this manifest while it was being deleted keeps it.
        if let (Some(p), None) = (p, &overridden)
            && let Some(hit) = self
                .immutable_tags(name, p)
                .await?
                .into_iter()
                .find(|(_, d, _)| d == digest)
        {
            self.write_link(Key::RevisionLink(name, digest), digest)
                .await?;
            let (tag, _, by) = hit;
            return Err(Protected {
                tag,
                by,
                how: "was tagged meanwhile with the",
            }
            .refusal("manifest"));
        }
        Ok(overridden)
    }

    /// [`Registry::delete_blob`] under immutability rules.
    pub async fn delete_blob_protected(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        p: Option<&CompiledProtection>,
    ) -> Result<Overridden> {
        let overridden = self.check_protection(name, p, digest, true).await?;
        self.delete_blob(name, digest).await?;
        Ok(overridden)
    }
}
