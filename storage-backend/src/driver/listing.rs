//! Sorted listings of large directories kept in memory, so a catalog or tag page looks into a
//! directory of 100 000 entries for the cost of one `stat` and a binary search rather than a
//! `readdir` and a sort of all of it.
//!
//! A cached listing is used only while one `stat` of the directory says nothing was added or
//! removed since it was read: creating, renaming or removing an entry changes the directory's
//! modification time (and its change time), whichever process or node did it, so several
//! storage nodes on one root see each other's changes on their next page. Timestamps have a
//! granularity (a kernel tick, an NFS server's clock), so a change made in the same tick as
//! the listing could leave the time as it was; a listing is therefore kept only if it was
//! read at least [`SETTLED`] after the directory was last modified — the rule git uses for its
//! index. Clocks of nodes sharing a root must agree within that (NTP does). On NFS, a
//! client's cached attributes hide another client's change for as long as they are cached
//! (`acdirmin`…`acdirmax`), from `readdir` as from this cache: mount a shared root with
//! `actimeo=0` (or `noac`) for one node to see another's changes at once.
//!
//! A kept listing carries a [`Marks`] flag per entry: what a reader learned of that entry which
//! only a change of the directory undoes (a tag page: "this tag's link names a manifest", so
//! the next pages need not read it again). Whatever makes such a fact false without adding or
//! removing an entry (retention swapping a tag's link for a tombstone) touches the directory
//! afterwards ([`touch`]), which drops the listing with its marks.
//!
//! Nothing is written: the cache is rebuilt from the layout on demand, a crash loses nothing,
//! and a registry:2 root served as it is lists the same with or without it.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Names of a directory's entries, sorted bytewise, without hidden (`.`) entries.
pub type Listing = Arc<[String]>;

/// Directories with fewer entries are read each time (a `readdir` of a few entries costs
/// about what a `stat` does).
const CACHED_FROM: usize = 128;
/// Memory all kept listings may take (names, their `String`s and a mark bit each: ~40 bytes a
/// name, so about 1 600 000 names); the least recently used listings go first.
const MAX_BYTES: usize = 64 << 20;
/// How long after a directory's last change a listing read then may be trusted.
const SETTLED: Duration = Duration::from_secs(1);

/// What one `stat` says of a directory's entries: any entry added or removed changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    size: u64,
    nlink: u64,
}

impl Signature {
    /// When an entry was last added to or removed from the directory (or the directory was
    /// [`touch`]ed): its modification time (its change time moves too, but also for a
    /// `chmod`, which changes no entry).
    fn modified(&self) -> SystemTime {
        let (secs, nsecs) = self.mtime;
        let since = Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32);
        SystemTime::UNIX_EPOCH + since
    }

    fn of(m: &Metadata) -> Self {
        Signature {
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            size: m.size(),
            nlink: m.nlink(),
        }
    }
}

/// One flag per entry of a kept listing, all unset when it is read: set by a reader that
/// learned something of the entry that holds until the directory changes.
pub struct Marks(Box<[AtomicU64]>);

impl Marks {
    fn new(entries: usize) -> Self {
        Marks(
            (0..entries.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    pub fn get(&self, entry: usize) -> bool {
        self.0
            .get(entry / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (entry % 64)) != 0)
    }

    pub fn set(&self, entry: usize) {
        if let Some(w) = self.0.get(entry / 64) {
            w.fetch_or(1 << (entry % 64), Ordering::Relaxed);
        }
    }
}

/// A sorted listing, with its marks when it is kept (a small or unsettled directory's listing,
/// read for one use, has none).
pub struct Marked {
    pub names: Listing,
    pub marks: Option<Arc<Marks>>,
}

struct Cached {
    signature: Signature,
    names: Listing,
    marks: Arc<Marks>,
    used: u64,
}

#[derive(Default)]
struct Inner {
    listings: HashMap<PathBuf, Cached>,
    /// Memory the kept listings take ([`weight`]).
    bytes: usize,
    clock: u64,
}

/// The filesystem driver's cache of large directories' sorted listings.
pub struct ListingCache {
    inner: Mutex<Inner>,
    /// Directories with fewer entries are not kept.
    cached_from: usize,
    /// Memory all kept listings may take.
    max_bytes: usize,
}

impl Default for ListingCache {
    fn default() -> Self {
        ListingCache::with_limits(CACHED_FROM, MAX_BYTES)
    }
}

impl ListingCache {
    fn with_limits(cached_from: usize, max_bytes: usize) -> Self {
        ListingCache {
            inner: Mutex::default(),
            cached_from,
            max_bytes,
        }
    }

    /// The sorted listing of `dir` (empty if it does not exist); blocking.
    pub fn list(&self, dir: &Path) -> io::Result<Listing> {
        Ok(self.list_marked(dir)?.names)
    }

    /// The same, with its marks if it is kept.
    pub fn list_marked(&self, dir: &Path) -> io::Result<Marked> {
        let meta = match fs::metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Marked {
                    names: Listing::from([]),
                    marks: None,
                });
            }
            m => m?,
        };
        let signature = Signature::of(&meta);
        if let Some(kept) = self.cached(dir, signature) {
            return Ok(kept);
        }
        let read_at = SystemTime::now();
        let mut names = read_names(dir)?;
        names.sort_unstable();
        let names = Listing::from(names);
        let keepable = || {
            let settled = read_at
                .duration_since(signature.modified())
                .is_ok_and(|d| d >= SETTLED);
            // Entries added or removed while it was read: not the listing of `signature`.
            let unchanged = || fs::metadata(dir).is_ok_and(|m| Signature::of(&m) == signature);
            names.len() >= self.cached_from
                && weight(&names) <= self.max_bytes
                && settled
                && unchanged()
        };
        let marks = keepable().then(|| self.keep(dir, signature, names.clone()));
        Ok(Marked { names, marks })
    }

    fn cached(&self, dir: &Path, signature: Signature) -> Option<Marked> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        let c = inner.listings.get_mut(dir)?;
        if c.signature != signature {
            return None;
        }
        c.used = now;
        Some(Marked {
            names: c.names.clone(),
            marks: Some(c.marks.clone()),
        })
    }

    fn keep(&self, dir: &Path, signature: Signature, names: Listing) -> Arc<Marks> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.listings.remove(dir) {
            inner.bytes -= weight(&old.names);
        }
        let bytes = weight(&names);
        while inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner
                .listings
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(old) = inner.listings.remove(&oldest) {
                inner.bytes -= weight(&old.names);
            }
        }
        inner.bytes += bytes;
        let used = inner.clock;
        let marks = Arc::new(Marks::new(names.len()));
        inner.listings.insert(
            dir.to_owned(),
            Cached {
                signature,
                names,
                marks: marks.clone(),
                used,
            },
        );
        marks
    }
}

/// Names as a listing: sorted, without duplicates.
pub fn sorted(mut names: Vec<String>) -> Listing {
    names.sort_unstable();
    names.dedup();
    names.into()
}

/// The memory a listing's names (and its marks, a bit each) take.
pub(crate) fn weight(names: &[String]) -> usize {
    names
        .iter()
        .map(|n| n.len() + std::mem::size_of::<String>())
        .sum::<usize>()
        + names.len().div_ceil(64) * std::mem::size_of::<AtomicU64>()
}

/// Tells every node's kept listing of `dir` that an entry changed in place (what its marks
/// say may no longer hold): a hidden entry is made and removed, which moves the directory's
/// modification time (with write permission alone, by the file server's clock on NFS) and
/// drops the listing on the next page — here and on any node sharing the root (on NFS, once
/// the attributes are read again: `actimeo=0`). A missing directory has nothing kept. Blocking.
pub fn touch(dir: &Path) -> io::Result<()> {
    let entry = dir.join(format!(".touch-{}", uuid::Uuid::new_v4().simple()));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&entry)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        made => drop(made?),
    }
    fs::remove_file(&entry)
}

/// A directory's entries, unsorted, without hidden ones (`.`: temp files being written);
/// empty if it does not exist.
pub(super) fn read_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e?;
        if let Some(n) = e.file_name().to_str()
            && !n.starts_with('.')
        {
            names.push(n.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(dir: &Path, n: usize) {
        for i in 0..n {
            fs::create_dir(dir.join(format!("e{i:05}"))).unwrap();
        }
    }

    /// Makes the directory's last change look old enough for a listing to be kept.
    fn settle(dir: &Path) {
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::open(dir).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn a_settled_listing_is_reused_until_an_entry_is_added_or_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fill(dir, CACHED_FROM + 10);
        settle(dir);
        let cache = ListingCache::default();
        let first = cache.list(dir).unwrap();
        assert_eq!(first.len(), CACHED_FROM + 10);
        assert!(first.windows(2).all(|w| w[0] < w[1]), "sorted");
        assert!(Arc::ptr_eq(&first, &cache.list(dir).unwrap()), "reused");

        fs::create_dir(dir.join("a-new-one")).unwrap();
        let added = cache.list(dir).unwrap();
        assert_eq!(added.len(), CACHED_FROM + 11);
        assert_eq!(added[0], "a-new-one");

        settle(dir);
        cache.list(dir).unwrap();
        fs::remove_dir(dir.join("e00003")).unwrap();
        let removed = cache.list(dir).unwrap();
        assert!(!removed.iter().any(|n| n == "e00003"));
        assert_eq!(removed.len(), CACHED_FROM + 10);
    }

    #[test]
    fn marks_last_as_long_as_the_listing_and_a_touch_drops_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fill(dir, CACHED_FROM + 1);
        settle(dir);
        let cache = ListingCache::default();
        let marks = cache.list_marked(dir).unwrap().marks.expect("kept");
        assert!(!marks.get(5), "unmarked when read");
        marks.set(5);
        marks.set(CACHED_FROM);
        let again = cache.list_marked(dir).unwrap().marks.expect("kept");
        assert!(again.get(5) && again.get(CACHED_FROM) && !again.get(6));
        assert!(!again.get(CACHED_FROM + 64), "past the end: unset");

        // Something changed in place under the directory: the listing and its marks go.
        touch(dir).unwrap();
        let touched = cache.list_marked(dir).unwrap();
        assert!(touched.marks.is_none(), "just changed: read, not kept");
        settle(dir);
        let fresh = cache.list_marked(dir).unwrap().marks.expect("kept again");
        assert!(!fresh.get(5), "a listing read anew starts unmarked");
    }

    #[test]
    fn a_listing_read_just_after_a_change_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fill(dir, CACHED_FROM + 1);
        let cache = ListingCache::default();
        let first = cache.list(dir).unwrap();
        // The directory changed less than `SETTLED` ago: a change in the same tick would not
        // show, so the next page reads it again.
        assert!(!Arc::ptr_eq(&first, &cache.list(dir).unwrap()));
    }

    #[test]
    fn the_least_recently_used_listing_goes_first_when_names_run_out() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("d{i}"))).collect();
        for d in &dirs {
            fs::create_dir(d).unwrap();
            fill(d, 4);
            settle(d);
        }
        // Room for two listings of four names.
        let room = 2 * weight(&read_names(&dirs[0]).unwrap());
        let cache = ListingCache::with_limits(2, room);
        let kept = |c: &ListingCache, d: &Path| c.inner.lock().unwrap().listings.contains_key(d);
        cache.list(&dirs[0]).unwrap();
        cache.list(&dirs[1]).unwrap();
        cache.list(&dirs[0]).unwrap(); // d1 is now the least recently used
        cache.list(&dirs[2]).unwrap();
        assert!(kept(&cache, &dirs[0]) && kept(&cache, &dirs[2]));
        assert!(!kept(&cache, &dirs[1]));
        assert_eq!(cache.inner.lock().unwrap().bytes, room);
    }

    #[test]
    fn hidden_entries_small_and_missing_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fill(dir, 3);
        fs::write(dir.join(".tmp-x"), b"").unwrap();
        let cache = ListingCache::default();
        assert_eq!(&*cache.list(dir).unwrap(), ["e00000", "e00001", "e00002"]);
        assert!(cache.list(&dir.join("none")).unwrap().is_empty());
        assert!(
            cache.inner.lock().unwrap().listings.is_empty(),
            "small: not kept"
        );
    }
}
