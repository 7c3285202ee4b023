//! Blobs on their way from the upstream: one fetch per blob however many clients ask
//! ([`Fetches`]), each streamed to every client that asks while it arrives and to storage at
//! the same time.
//!
//! A fetch writes what arrives to an unnamed spill file (gone when the last reader lets go)
//! and to a storage upload; readers read the spill file at their own pace, so a slow client
//! slows nobody. The last byte reaches a client only after the whole body matched its digest:
//! no client ever gets a complete copy of wrong content, and storage (which checks the digest
//! again) stores nothing for a wrong or truncated body.

use bytes::Bytes;
use oci::{Digest, Verifier};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// How far a fetch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Asking the upstream.
    Starting,
    /// `written` of `size` bytes are in the spill file.
    Running { size: u64, written: u64 },
    /// All `size` bytes, digest checked.
    Done { size: u64 },
    /// It failed: readers fail too.
    Failed(String),
}

/// One blob being fetched.
pub struct Fetch {
    spill: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

/// Bytes a reader reads from the spill file at a time.
const READ_CHUNK: u64 = 256 * 1024;

impl Fetch {
    /// The blob's size, once the upstream said it (an error if the fetch failed first).
    pub async fn size(&self) -> Result<u64, String> {
        let mut progress = self.progress.clone();
        let state = progress
            .wait_for(|p| *p != Progress::Starting)
            .await
            .map_err(|_| "the fetch stopped".to_string())?
            .clone();
        match state {
            Progress::Running { size, .. } | Progress::Done { size } => Ok(size),
            Progress::Failed(why) => Err(why),
            Progress::Starting => Err("the fetch stopped".into()),
        }
    }

    /// A reader of `start..end` (within the size, from [`Fetch::size`]), which gets the
    /// bytes as they arrive.
    pub fn reader(self: &Arc<Self>, start: u64, end: u64) -> Reader {
        Reader {
            fetch: self.clone(),
            progress: self.progress.clone(),
            pos: start,
            end,
        }
    }
}

/// One client's read of a [`Fetch`].
pub struct Reader {
    fetch: Arc<Fetch>,
    progress: watch::Receiver<Progress>,
    pos: u64,
    end: u64,
}

impl Reader {
    /// The next piece, waiting for it to arrive; `None` after the last. Fails if the fetch
    /// fails (then the client must not see its body end normally).
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if self.pos >= self.end {
                return Ok(None);
            }
            let state = self.progress.borrow_and_update().clone();
            // The last byte waits for the digest check.
            let available = match state {
                Progress::Starting => 0,
                Progress::Running { size, written } => written.min(size.saturating_sub(1)),
                Progress::Done { size } => size,
                Progress::Failed(why) => return Err(why),
            };
            if self.pos < available.min(self.end) {
                let len = (available.min(self.end) - self.pos).min(READ_CHUNK);
                let chunk = read_at(self.fetch.spill.clone(), self.pos, len).await?;
                self.pos += len;
                return Ok(Some(chunk));
            }
            if self.progress.changed().await.is_err() {
                // The fetch is over: its last word is in the channel.
                let last = self.progress.borrow().clone();
                match last {
                    Progress::Failed(why) => return Err(why),
                    Progress::Done { .. } => {}
                    Progress::Starting | Progress::Running { .. } => {
                        return Err("the fetch stopped".into());
                    }
                }
            }
        }
    }

    /// Whether the piece just returned was the last.
    pub fn finished(&self) -> bool {
        self.pos >= self.end
    }
}

async fn read_at(file: Arc<std::fs::File>, pos: u64, len: u64) -> Result<Bytes, String> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, pos)?;
        Ok::<_, std::io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("reading the spill file: {e}"))
}

/// Where a fetch's bytes go besides its readers.
pub struct Sink {
    digest: Digest,
    size: u64,
    spill: Arc<std::fs::File>,
    progress: watch::Sender<Progress>,
    verifier: Verifier,
    written: u64,
}

impl Sink {
    /// The upstream answered: the body has `size` bytes.
    pub fn start(&mut self, size: u64) {
        self.size = size;
        self.progress
            .send_replace(Progress::Running { size, written: 0 });
    }

    /// Appends one piece of the body.
    pub async fn write(&mut self, chunk: &Bytes) -> Result<(), String> {
        if self.written + chunk.len() as u64 > self.size {
            return Err(format!(
                "the upstream sent more than the {} bytes it announced",
                self.size
            ));
        }
        let (file, pos, data) = (self.spill.clone(), self.written, chunk.clone());
        tokio::task::spawn_blocking(move || file.write_all_at(&data, pos))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing the spill file: {e}"))?;
        self.verifier.update(chunk);
        self.written += chunk.len() as u64;
        self.progress.send_replace(Progress::Running {
            size: self.size,
            written: self.written,
        });
        Ok(())
    }

    /// The body ended: checks its length and digest.
    pub fn finish(self) -> Result<(), String> {
        let result = if self.written != self.size {
            Err(format!(
                "the upstream body ended after {} of {} bytes",
                self.written, self.size
            ))
        } else if !self.verifier.verify(&self.digest) {
            Err(format!(
                "the upstream's content does not match its digest {}",
                self.digest
            ))
        } else {
            Ok(())
        };
        self.progress.send_replace(match &result {
            Ok(()) => Progress::Done { size: self.size },
            Err(e) => Progress::Failed(e.clone()),
        });
        result
    }

    /// The fetch failed before its end.
    pub fn fail(self, why: String) {
        self.progress.send_replace(Progress::Failed(why));
    }
}

/// A cache's fetches in flight, by repository and digest.
pub struct Fetches {
    spill_dir: PathBuf,
    running: tokio::sync::Mutex<HashMap<(String, Digest), Arc<Fetch>>>,
}

/// What [`Fetches::join`] found.
pub enum Joined {
    /// Someone is fetching it: read along.
    Running(Arc<Fetch>),
    /// Storage has it now.
    Stored,
    /// Nobody fetches it and storage does not have it (when not asked to start).
    Absent,
    /// Nobody was: the caller fetches it now, into the sink (and calls [`Fetches::done`]
    /// when storage has it or the fetch failed).
    Start(Arc<Fetch>, Box<Sink>),
}

impl Fetches {
    pub fn new(spill_dir: PathBuf) -> Self {
        Fetches {
            spill_dir,
            running: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The fetch of `digest` into `repo` if one runs; otherwise whether storage has it now
    /// (`stored`, asked under the lock: a fetch is taken off only after storage has its
    /// blob, so a caller either reads along or finds it stored, and a blob is fetched once);
    /// otherwise, with `start`, a new fetch registered for the caller to run.
    pub async fn join<F, Fut>(
        &self,
        repo: &str,
        digest: &Digest,
        start: bool,
        stored: F,
    ) -> Result<Joined, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<bool, String>>,
    {
        let mut running = self.running.lock().await;
        let key = (repo.to_owned(), digest.clone());
        if let Some(f) = running.get(&key) {
            return Ok(Joined::Running(f.clone()));
        }
        if stored().await? {
            return Ok(Joined::Stored);
        }
        if !start {
            return Ok(Joined::Absent);
        }
        let spill = Arc::new(
            tempfile::tempfile_in(&self.spill_dir)
                .map_err(|e| format!("creating a spill file: {e}"))?,
        );
        let (tx, rx) = watch::channel(Progress::Starting);
        let fetch = Arc::new(Fetch {
            spill: spill.clone(),
            progress: rx,
        });
        running.insert(key, fetch.clone());
        let sink = Sink {
            digest: digest.clone(),
            size: 0,
            spill,
            progress: tx,
            verifier: Verifier::new(digest.algorithm()),
            written: 0,
        };
        Ok(Joined::Start(fetch, Box::new(sink)))
    }

    /// Takes a finished fetch off (after storage has its blob, or gave up on it).
    pub async fn done(&self, repo: &str, digest: &Digest) {
        self.running
            .lock()
            .await
            .remove(&(repo.to_owned(), digest.clone()));
    }

    /// How many fetches run now.
    pub async fn running(&self) -> usize {
        self.running.lock().await.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> Digest {
        Digest::of(oci::Algorithm::Sha256, b)
    }

    async fn absent() -> Result<bool, String> {
        Ok(false)
    }

    async fn start(fetches: &Fetches, d: &Digest) -> (Arc<Fetch>, Sink) {
        match fetches.join("r", d, true, absent).await.unwrap() {
            Joined::Start(f, s) => (f, *s),
            _ => panic!("nobody fetches it yet"),
        }
    }

    async fn collect(f: &Arc<Fetch>, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let mut got = Vec::new();
        let mut r = f.reader(start, end);
        while let Some(b) = r.next().await? {
            got.extend_from_slice(&b);
        }
        assert!(r.finished());
        Ok(got)
    }

    #[tokio::test]
    async fn readers_get_what_arrives_and_the_last_byte_only_once_it_is_verified() {
        let body: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest_of(&body);
        let fetches = Fetches::new(std::env::temp_dir());
        let (fetch, mut sink) = start(&fetches, &d).await;
        assert!(
            matches!(
                fetches.join("r", &d, true, absent).await.unwrap(),
                Joined::Running(_)
            ),
            "a second caller reads along"
        );
        let waiting = fetch.clone();
        let size = tokio::spawn(async move { waiting.size().await });
        sink.start(body.len() as u64);
        assert_eq!(size.await.unwrap().unwrap(), 600_000);
        sink.write(&Bytes::copy_from_slice(&body[..300_000]))
            .await
            .unwrap();
        // A reader of the whole body gets the first part now, and waits.
        let early = fetch.clone();
        let reader = tokio::spawn(async move { collect(&early, 0, 600_000).await });
        let ranged = fetch.clone();
        let range = tokio::spawn(async move { collect(&ranged, 100, 200).await });
        assert_eq!(range.await.unwrap().unwrap(), &body[100..200]);
        sink.write(&Bytes::copy_from_slice(&body[300_000..]))
            .await
            .unwrap();
        // Everything is written but not yet checked: the last byte is held back.
        let held = fetch.clone();
        let tail = tokio::spawn(async move { collect(&held, 599_999, 600_000).await });
        tokio::task::yield_now().await;
        assert!(!tail.is_finished());
        sink.finish().unwrap();
        assert_eq!(tail.await.unwrap().unwrap(), &body[599_999..]);
        assert_eq!(reader.await.unwrap().unwrap(), body);
        fetches.done("r", &d).await;
        assert_eq!(fetches.running().await, 0);
        assert!(matches!(
            fetches.join("r", &d, false, absent).await.unwrap(),
            Joined::Absent
        ));
    }

    #[tokio::test]
    async fn a_wrong_or_short_body_fails_every_reader() {
        let body = b"the real content".to_vec();
        let d = digest_of(&body);
        let fetches = Fetches::new(std::env::temp_dir());
        let (fetch, mut sink) = start(&fetches, &d).await;
        sink.start(body.len() as u64);
        sink.write(&Bytes::from_static(b"the fake content"))
            .await
            .unwrap();
        let r = fetch.clone();
        let reader = tokio::spawn(async move { collect(&r, 0, 16).await });
        assert!(sink.finish().unwrap_err().contains("does not match"));
        assert!(reader.await.unwrap().is_err());

        let (fetch, mut sink) = start(&Fetches::new(std::env::temp_dir()), &d).await;
        sink.start(body.len() as u64);
        sink.write(&Bytes::from_static(b"the real")).await.unwrap();
        assert!(sink.finish().unwrap_err().contains("ended after 8 of 16"));
        assert!(collect(&fetch, 0, 16).await.is_err());
        assert!(
            collect(&fetch, 0, 4).await.is_err(),
            "a failed fetch serves nobody"
        );

        let fetches = Fetches::new(std::env::temp_dir());
        let (_, mut sink) = start(&fetches, &d).await;
        sink.start(4);
        assert!(sink.write(&Bytes::from_static(b"too long")).await.is_err());
    }
}
