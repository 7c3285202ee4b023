//! Blobs on their way from the upstream: one fetch per blob however many clients ask
//! ([`Fetches`]), each streamed to every client that asks while it arrives and to storage at
//! the same time.
//!
//! A fetch writes what arrives to an unnamed spill file (gone when the last reader lets go)
//! and to a storage upload; readers read the spill file at their own pace, so a slow client
//! slows nobody. The last byte of whatever a reader asked for (the blob, or a range of it)
//! reaches it only after the whole blob matched its digest: no client ever gets a complete
//! answer of wrong content, and storage (which checks the digest again) stores nothing for a
//! wrong or truncated body.

use crate::remote::UpstreamError;
use bytes::Bytes;
use oci::{Digest, Verifier};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How far a fetch is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Asking the upstream.
    Starting,
    /// `written` of `size` bytes are in the spill file.
    Running { size: u64, written: u64 },
    /// All `size` bytes, digest checked.
    Done { size: u64 },
    /// It failed: readers fail too, with the upstream's answer.
    Failed(Arc<UpstreamError>),
}

/// One blob being fetched.
pub struct Fetch {
    spill: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

/// Bytes a reader reads from the spill file at a time.
const READ_CHUNK: u64 = 256 * 1024;
/// How long a fetch that ended with the blob in storage is remembered: a client that found it
/// missing in storage just before is sent there instead of fetching it again.
const REMEMBER_STORED: Duration = Duration::from_secs(30);

fn stopped() -> Arc<UpstreamError> {
    Arc::new(UpstreamError::Invalid("the fetch stopped".into()))
}

impl Fetch {
    /// The blob's size, once the upstream said it (the upstream's answer if it failed first).
    pub async fn size(&self) -> Result<u64, Arc<UpstreamError>> {
        let mut progress = self.progress.clone();
        let state = progress
            .wait_for(|p| !matches!(p, Progress::Starting))
            .await
            .map_err(|_| stopped())?
            .clone();
        match state {
            Progress::Running { size, .. } | Progress::Done { size } => Ok(size),
            Progress::Failed(why) => Err(why),
            Progress::Starting => Err(stopped()),
        }
    }

    fn failed(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Failed(_))
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
    /// The next piece, waiting for it to arrive; `None` after the last, which comes only once
    /// the blob's digest matched. Fails if the fetch fails (then the client must not see its
    /// body end normally).
    pub async fn next(&mut self) -> Result<Option<Bytes>, Arc<UpstreamError>> {
        loop {
            let state = self.progress.borrow_and_update().clone();
            let available = match state {
                Progress::Failed(why) => return Err(why),
                Progress::Done { .. } if self.pos >= self.end => return Ok(None),
                Progress::Done { .. } => self.end,
                // This reader's last byte waits for the digest check.
                Progress::Running { written, .. } => written.min(self.end.saturating_sub(1)),
                Progress::Starting => 0,
            };
            if self.pos < available {
                let len = (available - self.pos).min(READ_CHUNK);
                let chunk = read_at(self.fetch.spill.clone(), self.pos, len).await?;
                self.pos += len;
                return Ok(Some(chunk));
            }
            if self.progress.changed().await.is_err()
                && !matches!(*self.progress.borrow(), Progress::Done { .. })
            {
                // The fetch is over without saying so (its task ended).
                let last = self.progress.borrow().clone();
                return Err(match last {
                    Progress::Failed(why) => why,
                    _ => stopped(),
                });
            }
        }
    }

    /// Whether the piece just returned was the last.
    pub fn finished(&self) -> bool {
        self.pos >= self.end
    }
}

/// Reads what was just written (in the page cache: a copy, not a disk wait, so on the task
/// itself — handing each piece to a blocking thread cost more than the copy).
async fn read_at(
    file: Arc<std::fs::File>,
    pos: u64,
    len: u64,
) -> Result<Bytes, Arc<UpstreamError>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, pos)
        .map_err(|e| Arc::new(UpstreamError::Spill(e.to_string())))?;
    Ok(Bytes::from(buf))
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

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends one piece of the body.
    pub async fn write(&mut self, chunk: &Bytes) -> Result<(), UpstreamError> {
        if self.written + chunk.len() as u64 > self.size {
            return Err(UpstreamError::Invalid(format!(
                "the blob is longer than the {} bytes announced",
                self.size
            )));
        }
        // Into the page cache, on the task itself (as `read_at`).
        self.spill
            .write_all_at(chunk, self.written)
            .map_err(|e| UpstreamError::Spill(e.to_string()))?;
        self.verifier.update(chunk);
        self.written += chunk.len() as u64;
        self.progress.send_replace(Progress::Running {
            size: self.size,
            written: self.written,
        });
        Ok(())
    }

    /// The body ended: checks its length and digest; readers get their last bytes, or fail.
    pub fn finish(self) -> Result<(), UpstreamError> {
        if self.written != self.size {
            let e = UpstreamError::Invalid(format!(
                "the blob ended after {} of {} bytes",
                self.written, self.size
            ));
            self.fail(e.clone());
            return Err(e);
        }
        let Sink {
            digest,
            size,
            progress,
            verifier,
            ..
        } = self;
        if !verifier.verify(&digest) {
            let e = UpstreamError::Invalid(format!("the blob does not match its digest {digest}"));
            progress.send_replace(Progress::Failed(Arc::new(e.clone())));
            return Err(e);
        }
        progress.send_replace(Progress::Done { size });
        Ok(())
    }

    /// The fetch failed before its end.
    pub fn fail(&self, why: UpstreamError) {
        self.progress.send_replace(Progress::Failed(Arc::new(why)));
    }
}

enum Entry {
    Running(Arc<Fetch>),
    /// Ended with the blob in storage, at this time.
    Stored(Instant),
}

/// A cache's fetches in flight, by repository and digest.
pub struct Fetches {
    spill_dir: PathBuf,
    /// At most this many fetches at once.
    limit: usize,
    running: std::sync::Mutex<HashMap<(String, Digest), Entry>>,
}

/// What [`Fetches::join`] found.
pub enum Joined {
    /// Someone is fetching it: read along.
    Running(Arc<Fetch>),
    /// Storage has it now.
    Stored,
    /// Nobody fetches it and storage does not have it (when not asked to start).
    Absent,
    /// As many fetches as allowed run already.
    Busy,
    /// Nobody was: the caller fetches it now, into the sink (and calls [`Fetches::done`]
    /// when storage has it or the fetch failed).
    Start(Arc<Fetch>, Box<Sink>),
}

impl Fetches {
    pub fn new(spill_dir: PathBuf, limit: usize) -> Self {
        Fetches {
            spill_dir,
            limit,
            running: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Where blobs in flight are spilled, and how many may be at once.
    pub fn settings(&self) -> (&std::path::Path, usize) {
        (&self.spill_dir, self.limit)
    }

    /// What the map says of a key: a fetch to read along, or a recent one that stored it.
    fn look(&self, key: &(String, Digest)) -> Option<Joined> {
        let running = self.running.lock().ok()?;
        match running.get(key)? {
            Entry::Running(f) if !f.failed() => Some(Joined::Running(f.clone())),
            Entry::Stored(at) if at.elapsed() < REMEMBER_STORED => Some(Joined::Stored),
            _ => None,
        }
    }

    /// The fetch of `digest` into `repo` if one runs; otherwise whether storage has it
    /// (`stored`, which may take a few round trips — the cache may link the blob from another
    /// repository first — asked without holding the map: a fetch that stored its blob is remembered
    /// for a while, so a caller that found storage without it just before reads along or goes
    /// to storage, and a blob is fetched once); otherwise, with `start`, a new fetch
    /// registered for the caller to run.
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
        let key = (repo.to_owned(), digest.clone());
        if let Some(j) = self.look(&key) {
            return Ok(j);
        }
        if stored().await? {
            return Ok(Joined::Stored);
        }
        let mut running = self
            .running
            .lock()
            .map_err(|_| "the fetches' lock is poisoned".to_string())?;
        match running.get(&key) {
            Some(Entry::Running(f)) if !f.failed() => return Ok(Joined::Running(f.clone())),
            Some(Entry::Stored(at)) if at.elapsed() < REMEMBER_STORED => {
                return Ok(Joined::Stored);
            }
            _ => {}
        }
        if !start {
            return Ok(Joined::Absent);
        }
        running.retain(|_, e| match e {
            Entry::Running(f) => !f.failed(),
            Entry::Stored(at) => at.elapsed() < REMEMBER_STORED,
        });
        let in_flight = running
            .values()
            .filter(|e| matches!(e, Entry::Running(_)))
            .count();
        if in_flight >= self.limit {
            return Ok(Joined::Busy);
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
        running.insert(key, Entry::Running(fetch.clone()));
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

    /// Takes a finished fetch off: remembered as stored if storage has its blob now.
    pub fn done(&self, repo: &str, digest: &Digest, fetch: &Arc<Fetch>, stored: bool) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        let key = (repo.to_owned(), digest.clone());
        // Only this fetch's entry: a failed one may have been replaced by a newer fetch.
        if matches!(running.get(&key), Some(Entry::Running(f)) if Arc::ptr_eq(f, fetch)) {
            if stored {
                running.insert(key, Entry::Stored(Instant::now()));
            } else {
                running.remove(&key);
            }
        }
    }

    /// How many fetches run now.
    pub fn running(&self) -> usize {
        self.running.lock().map_or(0, |r| {
            r.values()
                .filter(|e| matches!(e, Entry::Running(_)))
                .count()
        })
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
        while let Some(b) = r.next().await.map_err(|e| e.to_string())? {
            got.extend_from_slice(&b);
        }
        assert!(r.finished());
        Ok(got)
    }

    #[tokio::test]
    async fn readers_get_what_arrives_and_their_last_byte_only_once_it_is_verified() {
        let body: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let d = digest_of(&body);
        let fetches = Fetches::new(std::env::temp_dir(), 8);
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
        // A range that has arrived still waits for the check with its last byte.
        let ranged = fetch.clone();
        let range = tokio::spawn(async move { collect(&ranged, 100, 200).await });
        tokio::task::yield_now().await;
        assert!(!range.is_finished());
        sink.write(&Bytes::copy_from_slice(&body[300_000..]))
            .await
            .unwrap();
        let held = fetch.clone();
        let tail = tokio::spawn(async move { collect(&held, 599_999, 600_000).await });
        tokio::task::yield_now().await;
        assert!(!tail.is_finished());
        sink.finish().unwrap();
        assert_eq!(range.await.unwrap().unwrap(), &body[100..200]);
        assert_eq!(tail.await.unwrap().unwrap(), &body[599_999..]);
        assert_eq!(reader.await.unwrap().unwrap(), body);
        fetches.done("r", &d, &fetch, true);
        assert_eq!(fetches.running(), 0);
        assert!(
            matches!(
                fetches.join("r", &d, true, absent).await.unwrap(),
                Joined::Stored
            ),
            "a fetch that stored its blob sends callers to storage"
        );
        assert!(matches!(
            fetches.join("r2", &d, false, absent).await.unwrap(),
            Joined::Absent
        ));
    }

    #[tokio::test]
    async fn a_wrong_short_or_empty_body_fails_every_reader_and_a_new_caller_starts_again() {
        let body = b"the real content".to_vec();
        let d = digest_of(&body);
        let fetches = Fetches::new(std::env::temp_dir(), 8);
        let (fetch, mut sink) = start(&fetches, &d).await;
        sink.start(body.len() as u64);
        sink.write(&Bytes::from_static(b"the fake content"))
            .await
            .unwrap();
        let r = fetch.clone();
        let reader = tokio::spawn(async move { collect(&r, 0, 16).await });
        let r = fetch.clone();
        let range = tokio::spawn(async move { collect(&r, 0, 4).await });
        assert!(
            sink.finish()
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        assert!(reader.await.unwrap().is_err());
        assert!(range.await.unwrap().is_err(), "not even a range of it");
        // Not yet taken off, but failed: a new caller starts a new fetch.
        let (again, _) = start(&fetches, &d).await;
        fetches.done("r", &d, &fetch, false);
        assert_eq!(
            fetches.running(),
            1,
            "the old fetch's end leaves the new one"
        );
        drop(again);

        let fetches = Fetches::new(std::env::temp_dir(), 8);
        let (fetch, mut sink) = start(&fetches, &d).await;
        sink.start(body.len() as u64);
        sink.write(&Bytes::from_static(b"the real")).await.unwrap();
        assert!(
            sink.finish()
                .unwrap_err()
                .to_string()
                .contains("ended after 8 of 16")
        );
        assert!(collect(&fetch, 0, 16).await.is_err());

        // An empty blob that is not the empty blob: the empty answer waits for the check.
        let fetches = Fetches::new(std::env::temp_dir(), 8);
        let (fetch, mut sink) = start(&fetches, &d).await;
        sink.start(0);
        let r = fetch.clone();
        let empty = tokio::spawn(async move { collect(&r, 0, 0).await });
        tokio::task::yield_now().await;
        assert!(!empty.is_finished());
        assert!(sink.finish().is_err());
        assert!(empty.await.unwrap().is_err());

        let fetches = Fetches::new(std::env::temp_dir(), 1);
        let (_f, mut sink) = start(&fetches, &d).await;
        sink.start(4);
        assert!(sink.write(&Bytes::from_static(b"too long")).await.is_err());
        assert!(
            matches!(
                fetches.join("other", &d, true, absent).await.unwrap(),
                Joined::Busy
            ),
            "one fetch at a time"
        );
    }
}
