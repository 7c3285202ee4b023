//! The dumb object layer: backends only move bytes; registry rules live in [`crate::registry`].
//!
//! Paths are the relative, `/`-separated strings made by [`crate::layout::Key::path`]; a
//! driver never interprets them beyond mapping them onto its medium.
//!
//! Contract, for every implementation:
//! - Writes are atomic: a reader sees the old object or the new one, never a partial one,
//!   whatever moment the process dies at ([`Driver::put`], [`Driver::put_if_absent`],
//!   [`Driver::promote`]).
//! - [`Driver::append`] writes an upload object in place; if it fails the object is cut back
//!   to the offset it started at, so a failed chunk leaves nothing behind.
//! - [`Driver::put_if_absent`] and [`Driver::put_if_current`] are race-free across
//!   processes sharing the store: exactly one of several racers wins.
//! - "Not found" is `Ok(None)` / `Ok(false)`, never an error.
//! - [`Driver::list_after`] returns every child after `after` up to the last it returns, in
//!   bytewise order; with `more` unset, none comes after.

pub mod fs;
pub mod listing;
pub mod object;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use oci::Verifier;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// A stream of bytes read from or written to a driver.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// A run of a prefix's children in name order ([`Driver::list_after`]).
pub struct Run {
    /// Sorted bytewise.
    pub names: listing::Listing,
    /// Where in `names` those after the `after` asked for begin.
    pub from: usize,
    /// The marks of a kept listing ([`listing::Marks`]), indexed as `names`.
    pub marks: Option<Arc<listing::Marks>>,
    /// Names after the last of `names` may exist: ask again with that one as `after`.
    pub more: bool,
}

impl Run {
    /// A whole sorted listing (and its marks, if kept), from the first name after `after`.
    pub fn whole(
        names: listing::Listing,
        marks: Option<Arc<listing::Marks>>,
        after: Option<&str>,
    ) -> Self {
        let from = after.map_or(0, |a| names.partition_point(|n| n.as_str() <= a));
        Run {
            names,
            from,
            marks,
            more: false,
        }
    }

    /// Whether the `i`th name is marked ([`listing::Marks`]).
    pub fn is_marked(&self, i: usize) -> bool {
        self.marks.as_ref().is_some_and(|m| m.get(i))
    }

    /// Where the next run starts (its `after`): this one's last name, when the store has
    /// more and this run holds a name after its own `after` — else there is no next run (one
    /// that did not move on would be asked for again for ever).
    pub fn next_after(&self) -> Option<&str> {
        if self.more && self.from < self.names.len() {
            self.names.last().map(String::as_str)
        } else {
            None
        }
    }

    /// Marks the `i`th name, if the listing is kept.
    pub fn mark(&self, i: usize) {
        if let Some(m) = &self.marks {
            m.set(i);
        }
    }
}

/// What [`Driver::stat`] knows of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub modified: SystemTime,
}

/// Why [`Driver::append`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("upload object does not exist")]
    NotFound,
    /// The object's size is not the offset the caller expected (someone else wrote first).
    #[error("upload is at offset {current}, not {expected}")]
    Offset { current: u64, expected: u64 },
    /// Reading the body failed (client went away, truncated body); nothing was kept.
    #[error("reading the request body failed: {0}")]
    Body(io::Error),
    /// The body was not the announced length; nothing was kept.
    #[error("body has {received} bytes, {expected} were announced")]
    Length { expected: u64, received: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What [`Driver::append`] did.
pub struct Appended {
    /// Bytes written by this call.
    pub written: u64,
    /// The hasher passed in, having seen every byte written.
    pub hasher: Option<Verifier>,
}

/// Options for [`Driver::append`].
pub struct AppendOptions {
    /// The size the object must have before the write.
    pub offset: u64,
    /// The exact number of bytes the body must have; otherwise nothing is kept.
    pub expected_len: Option<u64>,
    /// Fed every byte written, in order.
    pub hasher: Option<Verifier>,
}

pub trait Driver: Send + Sync + 'static {
    /// Reads a small object whole (links, manifests, metadata).
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>>;

    /// Size and modification time of an object.
    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<ObjectMeta>>>;

    /// Streams `len` bytes from `start`. The caller checked the range against [`Driver::stat`].
    fn reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>>;

    /// Creates or replaces an object atomically.
    fn put<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>>;

    /// Creates an object only if none exists; `Ok(false)` (and nothing written) if one does.
    /// Exactly one of several concurrent callers wins.
    fn put_if_absent<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<bool>>;

    /// Replaces an object only if its content is still `expected` (`None`: only if there is
    /// none); `Ok(false)` and nothing written otherwise. Of several callers that read the
    /// same `expected` and race, exactly one wins (compare-and-swap).
    fn put_if_current<'a>(
        &'a self,
        path: &'a str,
        data: Bytes,
        expected: Option<Bytes>,
    ) -> BoxFuture<'a, io::Result<bool>>;

    /// The size of an upload object (what [`Driver::append`] has added to it); `None` if
    /// there is none. A driver whose medium cannot append keeps upload objects its own way.
    fn upload_size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<u64>>> {
        Box::pin(async move { Ok(self.stat(path).await?.map(|m| m.size)) })
    }

    /// Streams `len` bytes from `start` of an upload object.
    fn upload_reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        self.reader(path, start, len)
    }

    /// Appends `body` to an existing upload object whose size must be `opts.offset`.
    /// Concurrent appends to one object (from this or another process) are serialised.
    /// On any error the object keeps its previous size.
    fn append<'a>(
        &'a self,
        path: &'a str,
        body: ByteStream,
        opts: AppendOptions,
    ) -> BoxFuture<'a, Result<Appended, AppendError>>;

    /// Moves a finished upload object to its final path atomically, replacing any object
    /// there (the caller only promotes content whose digest names the destination).
    fn promote<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>>;

    /// Names of the direct children of a prefix, unsorted; empty if there is none.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>>;

    /// The same, sorted bytewise and without duplicates (what pages are cut from). The
    /// filesystem driver keeps large directories' listings ([`listing::ListingCache`]).
    fn list_sorted<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<listing::Listing>> {
        Box::pin(async move { Ok(listing::sorted(self.list(prefix).await?)) })
    }

    /// The children of `prefix` that sort after `after` (bytewise), in order ([`Run`]): the
    /// whole rest here and on the filesystem (with a kept listing's marks), one listing
    /// request's worth on S3.
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> BoxFuture<'a, io::Result<Run>> {
        Box::pin(async move { Ok(Run::whole(self.list_sorted(prefix).await?, None, after)) })
    }

    /// Drops kept listings of `prefix` (and their marks) on every node: an entry under it
    /// changed in place in a way a mark could have recorded ([`listing::touch`]). A driver
    /// whose [`Driver::list_after`] returns marks must implement it; stores that keep no
    /// listings have nothing to do.
    fn touch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<()>> {
        let _ = prefix;
        Box::pin(async { Ok(()) })
    }

    /// Deletes an object or everything under a prefix; `Ok(false)` if there was nothing.
    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<bool>>;

    /// Removes a prefix that holds nothing any more (a filesystem's directory); never an
    /// object: if anything is under it (written since the caller emptied it), it stays.
    /// Stores without directories have nothing to remove.
    fn remove_if_empty<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<()>> {
        let _ = prefix;
        Box::pin(async { Ok(()) })
    }
}
