//! What a manifest refers to: its blobs and its child manifests ([`Refs`]), read from its content.

use crate::layout::Key;
use crate::registry::{Registry, Result};
use oci::Digest;
use oci::media_type;
use std::collections::HashMap;

/// References a manifest makes: its blobs and its child manifests.
#[derive(Debug, Clone, Default)]
pub(super) struct Refs {
    pub(super) blobs: Vec<Digest>,
    pub(super) children: Vec<Digest>,
}

pub(super) fn digest_of(alg: &str, hex: &str) -> Option<Digest> {
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

impl Registry {
    /// The references of a manifest blob (cached across repositories); `None` if it is
    /// missing or not a manifest.
    pub(super) async fn manifest_refs(
        &self,
        digest: &Digest,
        cache: &mut HashMap<Digest, Option<Refs>>,
        errors: &mut Vec<String>,
    ) -> Result<Option<Refs>> {
        if let Some(r) = cache.get(digest) {
            return Ok(r.clone());
        }
        let refs = match self.driver.get(&Key::Blob(digest).path()).await? {
            None => {
                errors.push(format!("manifest {digest}: content missing"));
                None
            }
            Some(body) => match media_type::parse_manifest(None, &body) {
                Ok(p) => Some(Refs {
                    blobs: p.blob_references().map(|d| d.digest.clone()).collect(),
                    children: p.manifests.iter().map(|d| d.digest.clone()).collect(),
                }),
                Err(e) => {
                    errors.push(format!("manifest {digest}: unreadable ({e})"));
                    None
                }
            },
        };
        cache.insert(digest.clone(), refs.clone());
        Ok(refs)
    }
}
