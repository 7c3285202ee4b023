//! The filesystem driver: objects are files under a root directory.
//!
//! Atomic writes are temp file + `fsync` + `rename` (+ `fsync` of the directory);
//! create-if-absent is a hard link of the synced temp file, which fails if the name exists.
//! Compare-and-swap ([`Driver::put_if_current`]) locks the current file with `flock`, checks
//! that it is still the one at the path (a replaced file is a new inode), compares, then
//! renames the new content over it; every replacement of such an object goes through it.
//! Appends to an upload take an exclusive `flock` on the file, so two storage processes on
//! one root cannot interleave chunks, and hash + write on a blocking thread fed by a small
//! bounded channel, so memory stays flat whatever the blob size.

use super::listing::{self, Listing, ListingCache, Marked, read_names};
use super::{AppendError, AppendOptions, Appended, ByteStream, Driver, ObjectMeta, Run};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::task::spawn_blocking;

/// Chunks in flight between the request body and the writer thread.
const WRITE_QUEUE: usize = 16;
/// Size of a direct-I/O block write.
const DIRECT_BLOCK: usize = 1 << 20;
/// Alignment direct I/O needs of buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
/// Read size when streaming a blob out.
const READ_CHUNK: usize = 1 << 20;
/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;

fn tokio_stream_from(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> ByteStream {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

pub struct FsDriver {
    root: PathBuf,
    listings: Arc<ListingCache>,
}

impl FsDriver {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsDriver {
            root: root.into(),
            listings: Arc::default(),
        }
    }

    fn full(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }
}

fn not_found_as_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    spawn_blocking(f).await.map_err(io::Error::other)?
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` to a synced temp file next to `target` and returns its path.
fn write_temp(target: &Path, data: &[u8]) -> io::Result<PathBuf> {
    let dir = target
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut f = in_dir(dir, || File::create(&tmp))?;
    let res = f.write_all(data).and_then(|()| f.sync_data());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Creates `dir` and runs `make`, which creates an entry in it; again when `dir` went in
/// between (garbage collection removes a directory it has just emptied, while a push may be
/// about to write there). Once the entry exists the directory is not empty and stays.
fn in_dir<T>(dir: &Path, mut make: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        fs::create_dir_all(dir)?;
        match make() {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 8 && !dir.exists() => {
                tries += 1;
            }
            made => return made,
        }
    }
}

/// Removes a directory and everything in it, also what a concurrent writer puts there while
/// it goes (`remove_dir_all` alone then fails with "directory not empty"): the caller asked
/// for nothing to be left under it, and a write that raced the removal is ordered before it.
fn remove_tree(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && tries < 8 => tries += 1,
            done => return done,
        }
    }
}

/// Writes an upload's bytes from an offset on. Aligned 1 MiB blocks go through `O_DIRECT`
/// where the filesystem allows it: the data has to reach the disk before the chunk is
/// acknowledged anyway, and page-cache writes of fresh pages are slow and erratic here
/// (measured in docs/benchmarks.md). The unaligned head and the tail go through the page
/// cache. If direct I/O is refused, everything goes through the page cache.
struct ChunkWriter {
    buffered: File,
    direct: Option<File>,
    /// `DIRECT_BLOCK + DIRECT_ALIGN` bytes; the block starts at `start`, which is aligned.
    buf: Vec<u8>,
    start: usize,
    /// Bytes waiting in the block.
    len: usize,
    /// File offset of the block's first byte (or of the next byte when the block is empty).
    pos: u64,
}

impl ChunkWriter {
    fn new(buffered: File, path: &Path, offset: u64) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let buf = if direct.is_some() {
            vec![0u8; DIRECT_BLOCK + DIRECT_ALIGN]
        } else {
            Vec::new()
        };
        let misalign = buf.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        ChunkWriter {
            buffered,
            direct,
            buf,
            start,
            len: 0,
            pos: offset,
        }
    }

    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        while !data.is_empty() {
            let unaligned = self.len == 0 && !self.pos.is_multiple_of(DIRECT_ALIGN as u64);
            if self.direct.is_none() || unaligned {
                let n = if self.direct.is_none() {
                    data.len()
                } else {
                    data.len()
                        .min(DIRECT_ALIGN - (self.pos % DIRECT_ALIGN as u64) as usize)
                };
                self.buffered.write_all_at(&data[..n], self.pos)?;
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(DIRECT_BLOCK - self.len);
            let at = self.start + self.len;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == DIRECT_BLOCK {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let block = &self.buf[self.start..self.start + self.len];
        let direct_ok = match (&self.direct, self.len == DIRECT_BLOCK) {
            (Some(d), true) => match d.write_all_at(block, self.pos) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    false
                }
                Err(e) => return Err(e),
            },
            _ => false,
        };
        if !direct_ok {
            self.buffered.write_all_at(block, self.pos)?;
        }
        self.pos += self.len as u64;
        self.len = 0;
        Ok(())
    }

    /// Writes what is pending; gives the file back with the outcome of that write.
    fn finish(mut self) -> (File, io::Result<()>) {
        let r = if self.len > 0 {
            self.flush_block()
        } else {
            Ok(())
        };
        (self.buffered, r)
    }
}

enum Msg {
    Data(Bytes),
    /// Everything arrived: keep it.
    Commit,
}

impl Driver for FsDriver {
    // `get` and `stat` run on the calling task, not on the blocking pool: what they read is
    // small (links of ~80 bytes, manifests of at most a few MiB), almost always in the page
    // cache, and read in microseconds, while a hand-off to a pool thread and back costs more
    // than the read. A manifest GET by tag is three such reads; doing them inline took
    // storage-backend from ~8 000 to ~14 000 manifest GETs/s (docs/benchmarks.md). Blob bodies
    // (`reader`) and every write stay on the blocking pool.
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            not_found_as_none(std::fs::read(self.full(path))).map(|o| o.map(Bytes::from))
        })
    }

    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<ObjectMeta>>> {
        Box::pin(async move {
            let meta = not_found_as_none(std::fs::metadata(self.full(path)))?;
            Ok(meta.filter(|m| m.is_file()).map(|m| ObjectMeta {
                size: m.len(),
                modified: m.modified().unwrap_or(std::time::UNIX_EPOCH),
            }))
        })
    }

    fn reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        let path = self.full(path);
        Box::pin(async move {
            let Some(file) = blocking(move || not_found_as_none(File::open(path))).await? else {
                return Ok(None);
            };
            // A reader thread keeps a few chunks ahead of the socket.
            let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(READ_AHEAD);
            spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut pos = start;
                let end = start + len;
                while pos < end {
                    let n = READ_CHUNK.min((end - pos) as usize);
                    let mut buf = vec![0u8; n];
                    let r = file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf));
                    let failed = r.is_err();
                    if tx.blocking_send(r).is_err() || failed {
                        return; // client gone, or error sent
                    }
                    pos += n as u64;
                }
            });
            Ok(Some(tokio_stream_from(rx)))
        })
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        let target = self.full(path);
        Box::pin(blocking(move || {
            let tmp = write_temp(&target, &data)?;
            if let Err(e) = fs::rename(&tmp, &target) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            sync_dir(target.parent().expect("write_temp checked the parent"))
        }))
    }

    fn put_if_absent<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<bool>> {
        let target = self.full(path);
        Box::pin(blocking(move || {
            let tmp = write_temp(&target, &data)?;
            let linked = fs::hard_link(&tmp, &target);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    sync_dir(target.parent().expect("write_temp checked the parent"))?;
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }))
    }

    fn put_if_current<'a>(
        &'a self,
        path: &'a str,
        data: Bytes,
        expected: Option<Bytes>,
    ) -> BoxFuture<'a, io::Result<bool>> {
        let Some(expected) = expected else {
            return self.put_if_absent(path, data);
        };
        let target = self.full(path);
        Box::pin(blocking(move || {
            use std::io::Read;
            use std::os::unix::fs::MetadataExt;
            loop {
                let Some(mut file) = not_found_as_none(File::open(&target))? else {
                    return Ok(false);
                };
                // Serialises swappers across threads and processes; released on drop.
                file.lock()?;
                let held = file.metadata()?;
                match not_found_as_none(fs::metadata(&target))? {
                    None => return Ok(false),
                    // Replaced between our open and our lock: lock the new one.
                    Some(now) if (now.dev(), now.ino()) != (held.dev(), held.ino()) => continue,
                    Some(_) => {}
                }
                let mut current = Vec::new();
                file.read_to_end(&mut current)?;
                if current != expected {
                    return Ok(false);
                }
                let tmp = write_temp(&target, &data)?;
                if let Err(e) = fs::rename(&tmp, &target) {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                sync_dir(target.parent().expect("write_temp checked the parent"))?;
                return Ok(true);
            }
        }))
    }

    fn append<'a>(
        &'a self,
        path: &'a str,
        mut body: ByteStream,
        opts: AppendOptions,
    ) -> BoxFuture<'a, Result<Appended, AppendError>> {
        let full = self.full(path);
        let direct_path = full.clone();
        Box::pin(async move {
            let offset = opts.offset;
            let file = spawn_blocking(move || -> Result<File, AppendError> {
                let mut f = match OpenOptions::new().write(true).open(&full) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(AppendError::NotFound);
                    }
                    Err(e) => return Err(e.into()),
                };
                // Serialises writers across threads and processes; released on drop.
                f.lock()?;
                let current = f.metadata()?.len();
                if current != offset {
                    return Err(AppendError::Offset {
                        current,
                        expected: offset,
                    });
                }
                f.seek(SeekFrom::Start(offset))?;
                Ok(f)
            })
            .await
            .map_err(io::Error::other)??;

            let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(WRITE_QUEUE);
            let mut hasher = opts.hasher;
            let writer = spawn_blocking(move || -> io::Result<u64> {
                let mut out = ChunkWriter::new(file, &direct_path, offset);
                let mut committed = false;
                let mut result = Ok(());
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Msg::Data(chunk) => {
                            if let Err(e) = out.write(&chunk) {
                                result = Err(e);
                                break;
                            }
                        }
                        Msg::Commit => {
                            committed = true;
                            break;
                        }
                    }
                }
                let written = out.pos + out.len as u64 - offset;
                let (file, flushed) = out.finish();
                if committed && result.is_ok() && flushed.is_ok() {
                    file.sync_data()?;
                    return Ok(written);
                }
                // Aborted (body error, wrong length, dropped request) or failed: cut back.
                file.set_len(offset)?;
                file.sync_data()?;
                result.and(flushed)?;
                Err(io::Error::new(io::ErrorKind::Interrupted, "append aborted"))
            });

            let mut received = 0u64;
            let mut failure = None;
            while let Some(item) = body.next().await {
                match item {
                    Ok(chunk) => {
                        received += chunk.len() as u64;
                        if opts.expected_len.is_some_and(|n| received > n) {
                            break;
                        }
                        // Hashing here and writing on the writer thread overlap.
                        if let Some(h) = hasher.as_mut() {
                            h.update(&chunk);
                        }
                        if tx.send(Msg::Data(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        failure = Some(AppendError::Body(e));
                        break;
                    }
                }
            }
            if failure.is_none() {
                match opts.expected_len {
                    Some(n) if n != received => {
                        failure = Some(AppendError::Length {
                            expected: n,
                            received,
                        })
                    }
                    _ => {
                        let _ = tx.send(Msg::Commit).await;
                    }
                }
            }
            drop(tx);
            let outcome = writer.await.map_err(io::Error::other)?;
            if let Some(f) = failure {
                return Err(f);
            }
            let written = outcome?;
            Ok(Appended { written, hasher })
        })
    }

    fn promote<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>> {
        let (from, to) = (self.full(from), self.full(to));
        Box::pin(blocking(move || {
            let dir = to
                .parent()
                .ok_or_else(|| io::Error::other("path has no parent"))?;
            in_dir(dir, || fs::rename(&from, &to))?;
            sync_dir(dir)
        }))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>> {
        let dir = self.full(prefix);
        Box::pin(blocking(move || read_names(&dir)))
    }

    fn list_sorted<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Listing>> {
        let dir = self.full(prefix);
        let listings = self.listings.clone();
        Box::pin(blocking(move || listings.list(&dir)))
    }

    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> BoxFuture<'a, io::Result<Run>> {
        let dir = self.full(prefix);
        let listings = self.listings.clone();
        Box::pin(async move {
            let Marked { names, marks } = blocking(move || listings.list_marked(&dir)).await?;
            Ok(Run::whole(names, marks, after))
        })
    }

    fn touch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<()>> {
        let dir = self.full(prefix);
        Box::pin(blocking(move || listing::touch(&dir)))
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<bool>> {
        let p = self.full(path);
        Box::pin(blocking(move || {
            let Some(meta) = not_found_as_none(fs::symlink_metadata(&p))? else {
                return Ok(false);
            };
            let r = if meta.is_dir() {
                remove_tree(&p)
            } else {
                fs::remove_file(&p)
            };
            not_found_as_none(r).map(|o| o.is_some())
        }))
    }

    fn remove_if_empty<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<()>> {
        let dir = self.full(prefix);
        Box::pin(blocking(move || match fs::remove_dir(&dir) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            other => other,
        }))
    }
}

/// Reads a whole stream into memory; for tests.
pub async fn collect(stream: ByteStream) -> io::Result<Vec<u8>> {
    stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(offset: u64, expected_len: Option<u64>) -> AppendOptions {
        AppendOptions {
            offset,
            expected_len,
            hasher: Some(oci::Verifier::new(oci::Algorithm::Sha256)),
        }
    }

    #[tokio::test]
    async fn removing_an_emptied_directory_never_takes_what_came_into_it() {
        let root = tempfile::tempdir().unwrap();
        let d = FsDriver::new(root.path());
        d.put("a/b/data", Bytes::from_static(b"x")).await.unwrap();
        d.remove_if_empty("a/b").await.unwrap();
        assert_eq!(d.get("a/b/data").await.unwrap().as_deref(), Some(&b"x"[..]));
        assert!(d.delete("a/b/data").await.unwrap());
        d.remove_if_empty("a/b").await.unwrap();
        assert!(!root.path().join("a/b").exists());
        d.remove_if_empty("a/b").await.unwrap();
        d.put("a/b/link", Bytes::from_static(b"y")).await.unwrap();
        assert_eq!(d.get("a/b/link").await.unwrap().as_deref(), Some(&b"y"[..]));
    }

    #[test]
    fn a_directory_removed_before_its_entry_is_made_is_made_again() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("x/y");
        let mut calls = 0;
        in_dir(&dir, || {
            calls += 1;
            if calls == 1 {
                // What a collector pruning the directory at this moment does.
                fs::remove_dir(&dir)?;
            }
            File::create(dir.join("data"))
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert!(dir.join("data").exists());
    }

    #[tokio::test]
    async fn large_appends_at_aligned_and_unaligned_offsets_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let d = FsDriver::new(dir.path());
        d.put("u", Bytes::new()).await.unwrap();
        let data: Vec<u8> = (0..(5usize << 20) + 777)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let cuts = [0, 100, (3 << 20) + 123, (4 << 20) + 5000, data.len()];
        for w in cuts.windows(2) {
            let part = Bytes::copy_from_slice(&data[w[0]..w[1]]);
            // Odd-sized pieces, as a network delivers them.
            let pieces: Vec<io::Result<Bytes>> = part
                .chunks(300_001)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let a = d
                .append(
                    "u",
                    futures_util::stream::iter(pieces).boxed(),
                    opts(w[0] as u64, Some((w[1] - w[0]) as u64)),
                )
                .await
                .unwrap();
            assert_eq!(a.written, (w[1] - w[0]) as u64);
        }
        let all = collect(d.reader("u", 0, data.len() as u64).await.unwrap().unwrap())
            .await
            .unwrap();
        assert!(all == data, "content differs");
        let mid = collect(d.reader("u", 1_000_003, 2_500_000).await.unwrap().unwrap())
            .await
            .unwrap();
        assert!(mid[..] == data[1_000_003..3_500_003]);
    }
}
