//! How many blobs the store holds and their bytes, for the metrics (`storage_blobs`,
//! `storage_blob_bytes`), without a walk of `blobs/` per scrape.
//!
//! The figures are the last complete walk this node made — one in the background at
//! start-up, and the one every GC run and dry run makes anyway — plus the changes this node
//! made since that walk began: a blob stored (an upload promoted, a manifest's content
//! written: `+1`, `+size`) or swept by its GC (`-1`, `-size`). A walk is the only way to
//! learn of blobs other processes on the same store added or removed, so on several nodes
//! each node's figures lag the others' pushes and sweeps until its next walk (its next GC run
//! or restart); `storage_usage_measured_timestamp_seconds` says how old each node's walk is.
//! The figures are not exact either way: a blob stored while a walk runs may be both seen by
//! the walk and counted as a change since, and two uploads of the same new blob finishing
//! at the same moment both count it; the next walk corrects both.

use std::sync::Mutex;
use std::time::SystemTime;

/// Blobs and bytes, as counted or as changed (then possibly negative).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    blobs: i64,
    bytes: i64,
}

/// The last complete walk.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// What it counted.
    counts: Counts,
    /// [`State::changes`] when it began: the changes since are those after it.
    changes_then: Counts,
    /// When it began, and the order it began in among this node's walks.
    at: SystemTime,
    seq: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Every change this node made since it started.
    changes: Counts,
    measured: Option<Measured>,
    /// Walks begun so far.
    walks: u64,
}

/// A walk in progress: where the changes stood when it began. Hand it back with what it
/// counted ([`Usage::walked`]).
#[derive(Debug)]
pub struct Walk {
    changes_then: Counts,
    at: SystemTime,
    seq: u64,
}

/// The store's usage as this node knows it (see the module docs).
#[derive(Debug, Default)]
pub struct Usage {
    state: Mutex<State>,
}

/// The figures the metrics show: blobs, bytes, and when the walk they start from began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageTotals {
    pub blobs: u64,
    pub bytes: u64,
    pub measured_at: SystemTime,
}

impl Usage {
    fn change(&self, blobs: i64, bytes: i64) {
        let mut s = self.state.lock().expect("usage");
        s.changes.blobs += blobs;
        s.changes.bytes += bytes;
    }

    /// This node stored a blob of `size` bytes the store did not hold.
    pub fn added(&self, size: u64) {
        self.change(1, size as i64);
    }

    /// This node's GC deleted a blob of `size` bytes.
    pub fn removed(&self, size: u64) {
        self.change(-1, -(size as i64));
    }

    /// A walk of every blob begins.
    pub fn walk_begins(&self) -> Walk {
        let mut s = self.state.lock().expect("usage");
        s.walks += 1;
        Walk {
            changes_then: s.changes,
            at: SystemTime::now(),
            seq: s.walks,
        }
    }

    /// A walk that began as `walk` says counted `blobs` blobs of `bytes` bytes in all. A
    /// walk that began before the one the figures come from changes nothing (two may
    /// overlap: the one at start-up and a GC run).
    pub fn walked(&self, walk: Walk, blobs: u64, bytes: u64) {
        let mut s = self.state.lock().expect("usage");
        if s.measured.is_some_and(|m| m.seq > walk.seq) {
            return;
        }
        s.measured = Some(Measured {
            counts: Counts {
                blobs: blobs as i64,
                bytes: bytes as i64,
            },
            changes_then: walk.changes_then,
            at: walk.at,
            seq: walk.seq,
        });
    }

    /// The last walk's figures with this node's changes since; `None` before the first walk
    /// ended (this node's changes alone say nothing of the store).
    pub fn totals(&self) -> Option<UsageTotals> {
        let s = self.state.lock().expect("usage");
        let m = s.measured?;
        let now = |counted: i64, changes: i64, then: i64| (counted + changes - then).max(0) as u64;
        Some(UsageTotals {
            blobs: now(m.counts.blobs, s.changes.blobs, m.changes_then.blobs),
            bytes: now(m.counts.bytes, s.changes.bytes, m.changes_then.bytes),
            measured_at: m.at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(u: &Usage) -> Option<(u64, u64)> {
        u.totals().map(|t| (t.blobs, t.bytes))
    }

    #[test]
    fn nothing_is_shown_before_the_first_walk_ends() {
        let u = Usage::default();
        u.added(10);
        let w = u.walk_begins();
        assert_eq!(figures(&u), None);
        u.walked(w, 5, 500);
        assert_eq!(figures(&u), Some((5, 500)));
    }

    #[test]
    fn changes_after_a_walk_began_are_added_to_what_it_counted() {
        let u = Usage::default();
        u.added(7); // before the walk: in what it counts
        let w = u.walk_begins();
        u.added(100);
        u.removed(30);
        u.walked(w, 4, 1000);
        u.added(1);
        assert_eq!(figures(&u), Some((5, 1071)));
    }

    #[test]
    fn a_walk_that_began_earlier_never_replaces_a_later_one() {
        let u = Usage::default();
        let startup = u.walk_begins();
        u.added(50);
        let gc = u.walk_begins();
        u.walked(gc, 10, 1000);
        u.walked(startup, 9, 950);
        assert_eq!(figures(&u), Some((10, 1000)));
        let next = u.walk_begins();
        u.walked(next, 3, 300);
        assert_eq!(figures(&u), Some((3, 300)));
    }

    #[test]
    fn figures_never_go_below_zero() {
        let u = Usage::default();
        let w = u.walk_begins();
        u.walked(w, 1, 10);
        u.removed(10);
        u.removed(10);
        assert_eq!(figures(&u), Some((0, 0)));
    }
}
