//! The referrers of a manifest: manifests pushed with `subject` = that manifest.

use super::{Registry, Result};
use crate::layout::Key;
use oci::media_type::{self, Descriptor};
use oci::{Digest, RepositoryName};

impl Registry {
    /// Descriptors of the manifests whose subject is `subject`, sorted by digest, optionally
    /// only those of one artifact type. An unknown subject has no referrers (not an error).
    pub async fn referrers(
        &self,
        name: &RepositoryName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let prefix = Key::Referrers(name, subject).path();
        let mut out = Vec::new();
        for alg in self.driver.list(&prefix).await? {
            for hex in self.driver.list(&format!("{prefix}/{alg}")).await? {
                let Ok(digest) = Digest::parse(&format!("{alg}:{hex}")) else {
                    continue;
                };
                // Still a revision of the repository, and its content still there.
                if self
                    .read_link(Key::RevisionLink(name, &digest))
                    .await?
                    .is_none()
                {
                    continue;
                }
                let Some(body) = self.driver.get(&Key::Blob(&digest).path()).await? else {
                    continue;
                };
                let Ok(parsed) = media_type::parse_manifest(None, &body) else {
                    continue;
                };
                let at = parsed.effective_artifact_type();
                if artifact_type.is_some_and(|want| at.as_deref() != Some(want)) {
                    continue;
                }
                out.push(Descriptor {
                    media_type: media_type::detect_media_type(&body),
                    size: body.len() as u64,
                    digest,
                    artifact_type: at,
                    annotations: parsed.annotations,
                    platform: None,
                });
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}
