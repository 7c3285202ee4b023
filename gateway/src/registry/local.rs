//! Blob reads from a co-located filesystem store (`[upstream] local_root`): when the gateway
//! runs beside its storage nodes on the filesystem they write (one machine, or a shared
//! volume), an admitted blob `GET`/`HEAD` is answered from the files themselves, without the
//! hop to a storage node — what a storage node would answer, read the way it reads them
//! (`storage-backend`'s layout): the repository's link to the blob must name it, then the
//! blob's data file is read.
//!
//! Only what is certain is answered here: a linked blob, whole or a satisfiable range.
//! Anything else (no link, a link to another digest, a malformed or unsatisfiable range, a
//! file that cannot be read) goes to storage as before, which gives the protocol's answer.
//! The policy decided before: this serves only the repository and digest the request names,
//! which the bearer check admitted.

use bytes::{Bytes, BytesMut};
use oci::range::{RangeRequest, resolve_range};
use oci::{Digest, RepositoryName};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use storage_backend::layout::Key;
use tokio::task::JoinHandle;

/// What one read of the data file takes at most (the answer's chunks).
const CHUNK: usize = 512 * 1024;

pub struct LocalBlobs {
    root: PathBuf,
}

/// A blob to answer from its file.
pub struct LocalBlob {
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// `Some((start, end))` (inclusive) for a 206.
    pub range: Option<(u64, u64)>,
    file: Arc<std::fs::File>,
}

/// The body of a [`LocalBlob`]: each chunk read on a blocking thread only for the time of the
/// read (a slow client holds no thread), the next one read while the last is sent.
pub struct Body {
    file: Arc<std::fs::File>,
    /// Where the next read starts, and what is left to read after it.
    at: u64,
    left: u64,
    next: Option<JoinHandle<std::io::Result<Bytes>>>,
}

impl Body {
    /// Starts reading the next chunk, if any is left.
    fn read_ahead(&mut self) {
        if self.left == 0 {
            self.next = None;
            return;
        }
        let (file, at) = (self.file.clone(), self.at);
        let want = self.left.min(CHUNK as u64) as usize;
        self.at += want as u64;
        self.left -= want as u64;
        self.next = Some(tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(want);
            // A file shorter than it was when opened ends the read with an error.
            file.read_exact_at(&mut buf, at)?;
            Ok(buf.freeze())
        }));
    }

    /// The next chunk; `None` once all was read. An error ends the body early (after the head
    /// went out: the transfer must fail, not end as if whole).
    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        let reading = self.next.take()?;
        let chunk = match reading.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if chunk.is_ok() {
            self.read_ahead();
        }
        Some(chunk)
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(reading) = self.next.take() {
            reading.abort();
        }
    }
}

impl LocalBlob {
    /// The bytes the answer carries.
    pub fn answered_len(&self) -> u64 {
        match self.range {
            Some((a, b)) => b - a + 1,
            None => self.size,
        }
    }

    /// The answer's body.
    pub fn body(self) -> Body {
        let mut body = Body {
            at: self.range.map_or(0, |(a, _)| a),
            left: self.answered_len(),
            file: self.file,
            next: None,
        };
        body.read_ahead();
        body
    }
}

impl LocalBlobs {
    pub fn new(root: PathBuf) -> Self {
        LocalBlobs { root }
    }

    /// The blob `digest` of `repo` with the request's `Range`, when it can be answered from
    /// the files; `None`: let storage answer.
    pub async fn open(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        range: Option<&str>,
        head: bool,
    ) -> Option<LocalBlob> {
        let link = self.root.join(Key::LayerLink(repo, digest).path());
        let data = self.root.join(Key::Blob(digest).path());
        let (digest, range) = (digest.clone(), range.map(str::to_owned));
        tokio::task::spawn_blocking(move || {
            // Read as storage reads a link: the digest it names, nothing else.
            let linked = std::fs::read_to_string(&link).ok()?;
            if Digest::parse(linked.trim()).ok()? != digest {
                return None;
            }
            let file = std::fs::File::open(&data).ok()?;
            let meta = file.metadata().ok()?;
            // As storage finds it: a file, or nothing.
            if !meta.is_file() {
                return None;
            }
            let size = meta.len();
            let range = match (head, resolve_range(range.as_deref(), size)) {
                (true, _) | (false, RangeRequest::Full) => None,
                (false, RangeRequest::Partial { start, end }) => Some((start, end)),
                (false, RangeRequest::Unsatisfiable) => return None,
            };
            Some(LocalBlob {
                digest,
                size,
                range,
                file: Arc::new(file),
            })
        })
        .await
        .ok()?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &std::path::Path, key: Key<'_>, bytes: &[u8]) {
        let p = root.join(key.path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    async fn body_of(b: LocalBlob) -> Vec<u8> {
        let mut body = b.body();
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn only_a_blob_linked_to_the_repository_is_answered_whole_or_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..(CHUNK * 2 + 10)).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(oci::Algorithm::Sha256, &content);
        let other = Digest::of(oci::Algorithm::Sha256, b"another blob");
        let (mine, theirs) = (
            RepositoryName::parse("team-a/app").unwrap(),
            RepositoryName::parse("team-b/app").unwrap(),
        );
        write(dir.path(), Key::Blob(&d), &content);
        write(
            dir.path(),
            Key::LayerLink(&mine, &d),
            d.to_string().as_bytes(),
        );
        // A link naming another digest, and none at all: storage answers.
        write(
            dir.path(),
            Key::LayerLink(&theirs, &d),
            other.to_string().as_bytes(),
        );
        let local = LocalBlobs::new(dir.path().to_owned());
        assert!(local.open(&theirs, &d, None, false).await.is_none());
        let nobody = RepositoryName::parse("team-c/app").unwrap();
        assert!(local.open(&nobody, &d, None, false).await.is_none());
        assert!(local.open(&mine, &other, None, false).await.is_none());

        let whole = local.open(&mine, &d, None, false).await.unwrap();
        assert_eq!((whole.size, whole.range), (content.len() as u64, None));
        assert_eq!(body_of(whole).await, content);
        let part = local
            .open(&mine, &d, Some("bytes=5-1048580"), false)
            .await
            .unwrap();
        assert_eq!(part.range, Some((5, 1_048_580)));
        assert_eq!(body_of(part).await, content[5..=1_048_580]);
        let head = local
            .open(&mine, &d, Some("bytes=5-9"), true)
            .await
            .unwrap();
        assert_eq!(
            (head.range, head.answered_len()),
            (None, content.len() as u64)
        );
        // Past the end, or not a range we read: storage answers.
        assert!(
            local
                .open(&mine, &d, Some("bytes=999999999-"), false)
                .await
                .is_none()
        );
        // A file cut short after it was opened: the body fails, it does not end early.
        let cut = local.open(&mine, &d, None, false).await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(Key::Blob(&d).path()))
            .unwrap()
            .set_len(CHUNK as u64 + 1)
            .unwrap();
        let mut body = cut.body();
        assert_eq!(body.next().await.unwrap().unwrap().len(), CHUNK);
        assert!(body.next().await.unwrap().is_err());
    }
}
