//! What a manifest refers to: its blobs and its child manifests ([`Refs`]), read from its
//! content, and what a run remembers of them ([`RefsCache`]).

use super::compact::{CompactDigest, DigestSet};
use crate::layout::Key;
use crate::registry::{Registry, Result};
use oci::media_type;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// References a manifest makes: its blobs and its child manifests.
#[derive(Debug, Default)]
pub(super) struct Refs {
    pub(super) blobs: Vec<CompactDigest>,
    pub(super) children: Vec<CompactDigest>,
}

/// Manifests whose references a run keeps at once.
const CACHED: usize = 16_384;

/// The references of the manifests read lately, so one shared by many repositories (the
/// same image pushed to each) is read once per stretch of the walk rather than once per
/// repository. Bounded: a cache of every manifest would grow with the store, with ten or so
/// digests per manifest, as large as the mark itself. When full it starts again (the
/// simplest eviction; a miss only costs a read). Manifests that could not be read are
/// remembered for the whole run, so each is reported once, as before the bound.
#[derive(Debug, Default)]
pub(super) struct RefsCache {
    refs: HashMap<CompactDigest, Arc<Refs>>,
    unreadable: DigestSet,
}

impl Registry {
    /// The references of a manifest blob; `None` if it is missing or not a manifest (then
    /// reported in `errors`, once per cache, unless two scans read it at once; a missing one
    /// only with `report_missing`). The cache is shared by the repositories scanned at once,
    /// and locked only to look or to add.
    pub(super) async fn manifest_refs(
        &self,
        digest: &CompactDigest,
        cache: &Mutex<RefsCache>,
        errors: &mut Vec<String>,
        report_missing: bool,
    ) -> Result<Option<Arc<Refs>>> {
        {
            let cache = cache.lock().expect("manifest references");
            if let Some(r) = cache.refs.get(digest) {
                return Ok(Some(r.clone()));
            }
            if cache.unreadable.contains(digest) {
                return Ok(None);
            }
        }
        let refs = match self
            .driver
            .get(&Key::Blob(&digest.to_digest()).path())
            .await?
        {
            None if !report_missing => return Ok(None),
            None => {
                errors.push(format!("manifest {digest}: content missing"));
                None
            }
            Some(body) => match media_type::parse_manifest(None, &body) {
                Ok(p) => Some(Arc::new(Refs {
                    blobs: p
                        .blob_references()
                        .map(|d| CompactDigest::from(&d.digest))
                        .collect(),
                    children: p
                        .manifests
                        .iter()
                        .map(|d| CompactDigest::from(&d.digest))
                        .collect(),
                })),
                Err(e) => {
                    errors.push(format!("manifest {digest}: unreadable ({e})"));
                    None
                }
            },
        };
        let mut cache = cache.lock().expect("manifest references");
        match &refs {
            Some(r) => {
                if cache.refs.len() == CACHED {
                    cache.refs.clear();
                }
                cache.refs.insert(digest.clone(), r.clone());
            }
            None => {
                cache.unreadable.insert(digest.clone());
            }
        }
        Ok(refs)
    }
}
