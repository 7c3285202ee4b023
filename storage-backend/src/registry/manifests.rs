//! Manifests: validated, stored as blobs, linked as revisions, tagged by links.
//!
//! Write order (each step atomic): content blob → index children's markers (`reverse`) →
//! revision link → referrer link → tag index link → tag marker (`reverse`) → tag current
//! link. A crash between steps leaves at worst an untagged manifest, which
//! is a consistent state (and garbage for GC).

use super::{Error, Registry, Result};
use crate::layout::Key;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use oci::media_type::{self, ParsedManifest};
use oci::{Digest, ErrorCode, OciError, Reference, RepositoryName, Tag};

/// Tag links read ahead by [`Registry::tag_targets`] and tag pages.
pub(super) const LINKS_AHEAD: usize = 16;

/// Rounds of compare-and-swap a tag push tries before answering 503 (each round one of the
/// racing pushes wins, so this many pushes to one tag at the same moment all get through).
const TAG_SWAP_ATTEMPTS: usize = 256;

/// A manifest PUT.
pub struct ManifestPut<'a> {
    pub name: &'a RepositoryName,
    pub reference: &'a Reference,
    pub content_type: Option<&'a str>,
    pub body: Bytes,
    /// `If-None-Match: *`: create the tag only if it does not exist (412 otherwise).
    pub create_tag_only: bool,
    /// A pull-through cache's copy of an upstream manifest: what it refers to need not be
    /// here yet (the gateway fetches each piece when a client asks for it).
    pub cached_copy: bool,
}

/// A manifest as stored.
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

fn manifest_unknown(reference: &dyn std::fmt::Display) -> Error {
    Error::oci(
        ErrorCode::ManifestUnknown,
        format!("manifest {reference} is not in this repository"),
    )
}

impl Registry {
    /// Validates and stores a manifest; returns its digest, parsed form, and (for a tag that
    /// existed) the digest the tag pointed to before.
    pub async fn put_manifest(
        &self,
        put: ManifestPut<'_>,
    ) -> Result<(Digest, ParsedManifest, Option<Digest>)> {
        let ManifestPut {
            name,
            reference,
            content_type,
            body,
            create_tag_only,
            cached_copy,
        } = put;
        let parsed = media_type::parse_manifest(content_type, &body)
            .map_err(|e| Error::oci(ErrorCode::ManifestInvalid, e.to_string()))?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = Digest::of(d.algorithm(), &body);
                if &actual != d {
                    return Err(Error::Protocol(
                        OciError::new(
                            ErrorCode::DigestInvalid,
                            format!("manifest content has digest {actual}, not {d}"),
                        )
                        .with_detail(serde_json::json!({ "digest": d.to_string() })),
                    ));
                }
                actual
            }
            Reference::Tag(_) => Digest::of(oci::Algorithm::Sha256, &body),
        };
        // Before checking that what it refers to exists: a sweeping GC must not delete it
        // between the check and the write (see `gc`).
        if !self.protect_manifest(name, &digest, &parsed).await? {
            return Err(Error::oci(
                ErrorCode::ManifestBlobUnknown,
                "content this manifest refers to is being garbage-collected: push it again",
            ));
        }
        for blob in parsed.blob_references().filter(|_| !cached_copy) {
            if self.blob_meta(name, &blob.digest).await.is_err() {
                return Err(manifest_blob_unknown(&blob.digest, "blob"));
            }
        }
        for child in parsed.manifests.iter().filter(|_| !cached_copy) {
            if self
                .read_link(Key::RevisionLink(name, &child.digest))
                .await?
                .is_none()
            {
                return Err(manifest_blob_unknown(&child.digest, "manifest"));
            }
        }
        if let (Reference::Tag(tag), true) = (reference, create_tag_only)
            && self.tag_target(name, tag).await?.is_some()
        {
            return Err(tag_exists(tag));
        }

        if !self.blob_exists(&digest).await? {
            self.put_blob(&digest, body.clone()).await?;
        }
        // The children as the body says too: a manifest is read back without its
        // Content-Type, so one sent as an image but shaped as an index is an index then.
        let mut children = parsed.children();
        if let Ok(inferred) = media_type::parse_manifest(None, &body) {
            children.extend(inferred.children());
        }
        self.mark_parent(name, &digest, &children).await?;
        self.write_link(Key::RevisionLink(name, &digest), &digest)
            .await?;
        if let Some(subject) = &parsed.subject {
            self.write_link(Key::ReferrerLink(name, &subject.digest, &digest), &digest)
                .await?;
        }
        let previous = match reference {
            Reference::Tag(tag) => {
                self.write_link(Key::TagIndexLink(name, tag, &digest), &digest)
                    .await?;
                self.mark_tagged(name, tag, &digest).await?;
                self.point_tag(name, tag, &digest, create_tag_only).await?
            }
            Reference::Digest(_) => None,
        };
        Ok((digest, parsed, previous))
    }

    /// Points a tag at `digest`; returns what it pointed to before. An overwrite is a
    /// compare-and-swap on the tag's current link, so of concurrent pushes to one tag each
    /// reports the manifest it really replaced (no update is lost or reported twice), and a
    /// create-only push fails if the tag appeared meanwhile.
    async fn point_tag(
        &self,
        name: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
        create_only: bool,
    ) -> Result<Option<Digest>> {
        let current = Key::TagCurrentLink(name, tag).path();
        for _ in 0..TAG_SWAP_ATTEMPTS {
            let before = self.driver.get(&current).await?;
            // A tombstone (a tag retention deleted) is no tag, but the swap replaces it.
            let pointed = before
                .as_ref()
                .and_then(|b| Digest::parse(String::from_utf8_lossy(b).trim()).ok());
            if create_only && pointed.is_some() {
                return Err(tag_exists(tag));
            }
            if self
                .driver
                .put_if_current(&current, digest.to_string().into(), before)
                .await?
            {
                return Ok(pointed);
            }
        }
        Err(Error::Storage(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            format!("tag {tag} is being pushed too often at once, try again"),
        )))
    }

    /// What a tag points to, if the tag exists.
    pub async fn tag_target(&self, name: &RepositoryName, tag: &Tag) -> Result<Option<Digest>> {
        self.read_link(Key::TagCurrentLink(name, tag)).await
    }

    /// What each of `tags` points to, in order, the next [`LINKS_AHEAD`] read while one is
    /// looked at (for the lookups that read many: the tags' reverse index, immutability
    /// checks; tag pages read theirs the same way, skipping the tags a kept listing marks).
    pub(super) fn tag_targets<'a>(
        &'a self,
        name: &'a RepositoryName,
        tags: impl IntoIterator<Item = Tag, IntoIter: Send + 'a>,
    ) -> impl Stream<Item = (Tag, Result<Option<Digest>>)> + Send + 'a {
        stream::iter(tags)
            .map(move |tag| async move {
                let target = self.tag_target(name, &tag).await;
                (tag, target)
            })
            .buffered(LINKS_AHEAD)
    }

    /// Resolves a reference to the digest of a manifest in the repository.
    pub async fn resolve(&self, name: &RepositoryName, reference: &Reference) -> Result<Digest> {
        let digest = match reference {
            Reference::Tag(tag) => self
                .tag_target(name, tag)
                .await?
                .ok_or_else(|| manifest_unknown(tag))?,
            Reference::Digest(d) => d.clone(),
        };
        if self
            .read_link(Key::RevisionLink(name, &digest))
            .await?
            .is_none()
        {
            return Err(manifest_unknown(reference));
        }
        Ok(digest)
    }

    /// The exact bytes pushed for a manifest.
    pub async fn get_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let digest = self.resolve(name, reference).await?;
        let body = self
            .driver
            .get(&Key::Blob(&digest).path())
            .await?
            .ok_or_else(|| manifest_unknown(reference))?;
        Ok(StoredManifest {
            media_type: media_type::detect_media_type(&body),
            digest,
            body,
        })
    }

    /// Deletes by digest (the manifest and every tag pointing to it) or by tag (the tag
    /// alone; the manifest stays). With `protection`, a tag found pointing to the manifest
    /// that a rule makes immutable stops the delete (DENIED) unless the subject may override.
    pub async fn delete_manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
        protection: Option<&policy::immutability::CompiledProtection>,
    ) -> Result<()> {
        match reference {
            Reference::Tag(tag) => {
                if self.tag_target(name, tag).await?.is_none() {
                    return Err(manifest_unknown(tag));
                }
                self.remove_tag(name, tag).await?;
            }
            Reference::Digest(digest) => {
                self.verify_tags(name).await?;
                self.delete_by_digest(name, digest, protection).await?;
            }
        }
        Ok(())
    }

    /// Deletes a tag's directory. A delete that fails half-way may have taken the link and
    /// left the directory, which a kept listing's marks would still list: the tags' directory
    /// is touched then ([`crate::driver::Driver::touch`]).
    async fn remove_tag(&self, name: &RepositoryName, tag: &Tag) -> Result<()> {
        let removed = self.driver.delete(&Key::Tag(name, tag).path()).await;
        if removed.is_err()
            && let Err(e) = self.driver.touch(&Key::Tags(name).path()).await
        {
            tracing::warn!(repository = %name, %tag, error = %e, "a tag delete failed half-way and its listing could not be marked changed");
        }
        removed?;
        Ok(())
    }

    /// Deletes a manifest and every tag pointing to it, found from the tags' markers (the
    /// caller verified them: [`Registry::verify_tags`]).
    pub(super) async fn delete_by_digest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        protection: Option<&policy::immutability::CompiledProtection>,
    ) -> Result<()> {
        let reference = Reference::Digest(digest.clone());
        let stored = self.get_manifest(name, &reference).await?;
        // Tags first: a crash half-way leaves a manifest with fewer tags, never a tag pointing
        // to a deleted manifest. All are found before any goes, so an immutable one refuses
        // the delete with nothing changed.
        let tagged = self.tags_marked(name, digest, &|_| true, None).await?;
        for tag in &tagged {
            super::protect::refuse_tagged(protection, tag, digest)?;
        }
        for tag in tagged {
            self.remove_tag(name, &tag).await?;
        }
        if let Ok(parsed) = media_type::parse_manifest(None, &stored.body)
            && let Some(subject) = parsed.subject
        {
            let link = Key::ReferrerLink(name, &subject.digest, digest).path();
            self.driver.delete(link.trim_end_matches("/link")).await?;
        }
        let link = Key::RevisionLink(name, digest).path();
        self.driver.delete(link.trim_end_matches("/link")).await?;
        self.forget_pulls(name, digest).await;
        Ok(())
    }
}

fn manifest_blob_unknown(digest: &Digest, what: &str) -> Error {
    Error::Protocol(
        OciError::new(
            ErrorCode::ManifestBlobUnknown,
            format!("manifest references {what} {digest}, which is not in this repository"),
        )
        .with_detail(serde_json::json!({ "digest": digest.to_string() })),
    )
}

fn tag_exists(tag: &Tag) -> Error {
    Error::oci(
        ErrorCode::TagExists,
        format!("tag {tag} already exists and the request asked to create it only if absent"),
    )
}
