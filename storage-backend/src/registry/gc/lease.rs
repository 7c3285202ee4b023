//! The GC lease (`_gc/lease`: one run at a time across every node on the store) and the
//! push side of the fencing: a push reads the lease and, while a run sweeps, rescues the
//! markers of everything it references.

use super::compact::CompactDigest;
use super::options::{GcOptions, unix};
use super::refs::RefsCache;
use crate::layout::{Key, gc_marker};
use crate::registry::{Error, Registry, Result};
use bytes::Bytes;
use oci::media_type;
use oci::{Digest, RepositoryName};
use std::collections::HashSet;
use std::time::SystemTime;

/// The lease's content.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Lease {
    run: String,
    holder: String,
    /// `mark` or `sweep`.
    phase: String,
    /// Seconds since the epoch.
    expires: u64,
}

impl Lease {
    fn live(&self) -> bool {
        self.expires > unix(SystemTime::now())
    }
}

impl Registry {
    async fn read_lease(&self) -> Result<Option<(Lease, Bytes)>> {
        let Some(raw) = self.driver.get(&Key::GcLease.path()).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<Lease>(&raw).ok().map(|l| (l, raw)))
    }

    fn lease_bytes(l: &Lease) -> Bytes {
        serde_json::to_vec(l).expect("a lease serialises").into()
    }

    /// Takes the lease for `run`; `Err(holder)` if a live run of another holds it.
    pub(super) async fn acquire_lease(
        &self,
        run: &str,
        opts: &GcOptions,
    ) -> Result<std::result::Result<Lease, String>> {
        let lease = Lease {
            run: run.into(),
            holder: opts.holder.clone(),
            phase: "mark".into(),
            expires: unix(SystemTime::now() + opts.lease),
        };
        let key = Key::GcLease.path();
        loop {
            if self
                .driver
                .put_if_absent(&key, Self::lease_bytes(&lease))
                .await?
            {
                return Ok(Ok(lease));
            }
            let Some(raw) = self.driver.get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<Lease>(&raw) {
                Ok(held) if held.live() => return Ok(Err(held.holder)),
                // Expired (its run died) or unreadable: take it over.
                _ => {
                    if self
                        .driver
                        .put_if_current(&key, Self::lease_bytes(&lease), Some(raw))
                        .await?
                    {
                        return Ok(Ok(lease));
                    }
                }
            }
        }
    }

    /// Extends the lease (and sets its phase); fails if it was lost.
    pub(super) async fn renew_lease(
        &self,
        l: &mut Lease,
        opts: &GcOptions,
        phase: Option<&str>,
    ) -> Result<()> {
        let old = Self::lease_bytes(l);
        let mut next = l.clone();
        next.expires = unix(SystemTime::now() + opts.lease);
        if let Some(p) = phase {
            next.phase = p.into();
        }
        if !self
            .driver
            .put_if_current(&Key::GcLease.path(), Self::lease_bytes(&next), Some(old))
            .await?
        {
            return Err(Error::Storage(std::io::Error::other(
                "the GC lease was lost (expired and taken over): run stopped",
            )));
        }
        *l = next;
        Ok(())
    }

    pub(super) async fn release_lease(&self, l: &Lease) {
        let key = Key::GcLease.path();
        if let Ok(Some(raw)) = self.driver.get(&key).await
            && raw == Self::lease_bytes(l)
        {
            let _ = self.driver.delete(&key).await;
        }
    }

    /// The run now sweeping, if any (what a push checks before referencing content).
    async fn sweeping_run(&self) -> Result<Option<String>> {
        Ok(self
            .read_lease()
            .await?
            .map(|(l, _)| l)
            .filter(|l| l.phase == "sweep" && l.live())
            .map(|l| l.run))
    }

    /// Keeps the objects at `paths` from the sweeping run, if there is one: `Ok(false)` if
    /// one of them is already being deleted.
    pub(crate) async fn protect(&self, paths: &[String]) -> Result<bool> {
        match self.sweeping_run().await? {
            Some(run) => self.protect_in(&run, paths).await,
            None => Ok(true),
        }
    }

    /// [`Registry::protect`] for a manifest about to be stored in `name`: its own content
    /// and revision link, its blobs and their links, its children, transitively.
    pub(crate) async fn protect_manifest(
        &self,
        name: &RepositoryName,
        digest: &Digest,
        parsed: &media_type::ParsedManifest,
    ) -> Result<bool> {
        let Some(run) = self.sweeping_run().await? else {
            return Ok(true);
        };
        let blobs: Vec<Digest> = parsed.blob_references().map(|d| d.digest.clone()).collect();
        let children: Vec<Digest> = parsed.manifests.iter().map(|d| d.digest.clone()).collect();
        let mut paths = self.referenced_paths(name, &blobs, &children).await?;
        paths.push(Key::Blob(digest).path());
        paths.push(Key::RevisionLink(name, digest).path());
        self.protect_in(&run, &paths).await
    }

    async fn protect_in(&self, run: &str, paths: &[String]) -> Result<bool> {
        for p in paths {
            let marker = gc_marker(p);
            loop {
                let Some(raw) = self.driver.get(&marker).await? else {
                    break;
                };
                let text = String::from_utf8_lossy(&raw).to_string();
                match text.split_once(' ') {
                    Some(("condemned", r)) if r == run => {
                        let rescued = Bytes::from(format!("rescued {run}"));
                        if self
                            .driver
                            .put_if_current(&marker, rescued, Some(raw))
                            .await?
                        {
                            break;
                        }
                    }
                    Some(("deleting", r)) if r == run => return Ok(false),
                    // Rescued already, or a marker of another (dead) run.
                    _ => break,
                }
            }
        }
        Ok(true)
    }

    /// The objects a manifest references (its blobs and their links in `name`, its
    /// children's revision links and, transitively, theirs), for [`Registry::protect`].
    async fn referenced_paths(
        &self,
        name: &RepositoryName,
        blobs: &[Digest],
        children: &[Digest],
    ) -> Result<Vec<String>> {
        let mut paths = Vec::new();
        let cache = std::sync::Mutex::new(RefsCache::default());
        let mut errors = Vec::new();
        let mut blobs: Vec<Digest> = blobs.to_vec();
        let mut children: Vec<Digest> = children.to_vec();
        let mut seen = HashSet::new();
        while let Some(c) = children.pop() {
            if !seen.insert(c.clone()) {
                continue;
            }
            paths.push(Key::RevisionLink(name, &c).path());
            paths.push(Key::Blob(&c).path());
            let refs = self
                .manifest_refs(&CompactDigest::from(&c), &cache, &mut errors, true)
                .await?;
            if let Some(r) = refs {
                blobs.extend(r.blobs.iter().map(CompactDigest::to_digest));
                children.extend(r.children.iter().map(CompactDigest::to_digest));
            }
        }
        for b in &blobs {
            paths.push(Key::LayerLink(name, b).path());
            paths.push(Key::Blob(b).path());
        }
        Ok(paths)
    }
}
