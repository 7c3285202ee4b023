//! Content discovery: tags of a repository and the catalog of repositories.

use super::manifests::LINKS_AHEAD;
use super::{Registry, Result};
use crate::driver::Run;
use crate::driver::listing::Listing;
use crate::layout::Key;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};
use oci::{ErrorCode, RepositoryName, Tag};
use std::cmp::Ordering;

/// Directories listed ahead of the one a catalog page looks at.
const LISTED_AHEAD: usize = 16;

/// One page of a lexically sorted list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    /// Whether items after the last one returned exist.
    pub more: bool,
}

/// The catalog's order: a depth-first walk with each directory's entries sorted, a name before
/// the names nested under it, so `/` sorts before every other character (`a`, `a/b`, `a-b`,
/// `a.b`). distribution walks the same way but lists a repository where its `_layers` entry
/// sorts among its directory's entries, so a nested name starting with a digit comes before
/// its parent there (`a/0`, `a`, `a/b`) — and its pages skip the parent; ours keep one order.
pub(super) fn catalog_order(a: &str, b: &str) -> Ordering {
    key(a).cmp(key(b))
}

/// A name's bytes as the catalog orders them (`/` as the smallest byte).
fn key(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().map(|c| if c == b'/' { 0 } else { c })
}

/// The entry of the directory `dir` (relative to `repositories/`, empty for itself) that
/// `last` lies under — `c` for a `last` of `dir/c` or `dir/c/…` — if it lies under `dir`.
/// Entries sort bytewise, which is [`catalog_order`] between whole subtrees (no entry holds a
/// `/`): the subtrees of entries before `c` hold only names before `last`, those after it only
/// names after it, and `c`'s both.
fn entry_of_last<'a>(dir: &str, last: &'a str) -> Option<&'a str> {
    let under = if dir.is_empty() {
        last
    } else {
        last.strip_prefix(dir)?.strip_prefix('/')?
    };
    let entry = under.split('/').next()?;
    (!entry.is_empty()).then_some(entry)
}

/// A directory of `repositories/` as a catalog page sees it.
struct CatalogDir {
    /// Its name relative to `repositories/` (empty for `repositories/` itself).
    rel: String,
    /// Whether it is a repository: it holds `_layers` (as distribution's catalog decides, so
    /// a repository with only blobs is listed) or `_manifests`.
    is_repo: bool,
    /// The entry `last` lies under ([`entry_of_last`]): walked first, the run after it.
    first: Option<String>,
    /// Its entries after `first` (or all of them), as far as listed.
    run: Run,
}

/// The name (relative to `repositories/`) of `entry` of the directory `rel`.
fn child(rel: &str, entry: &str) -> String {
    if rel.is_empty() {
        entry.to_owned()
    } else {
        format!("{rel}/{entry}")
    }
}

/// The store's path of the directory `rel` of `repositories/`.
fn dir_path(rel: &str) -> String {
    let root = Key::Repositories.path();
    if rel.is_empty() {
        root
    } else {
        format!("{root}/{rel}")
    }
}

impl CatalogDir {
    /// Whether anything under it may come after `last`.
    fn has_subdirs(&self) -> bool {
        self.first.is_some() || self.run.from < self.run.names.len() || self.run.more
    }
}

/// A listed name as a tag, with its place in its listing (a name that is none is skipped). A
/// function, not a closure: the page's future must be `Send` for every lifetime of the
/// listing it borrows.
fn indexed_tag((i, name): (usize, &String)) -> Option<(usize, Tag)> {
    Some((i, Tag::parse(name).ok()?))
}

impl Registry {
    /// Lists a directory of `repositories/` for a catalog page after `last`: from the entry
    /// `last` lies under, if it does (on S3 a listing from that key on, `start-after`).
    async fn catalog_dir(&self, rel: String, last: Option<&str>) -> Result<CatalogDir> {
        let path = dir_path(&rel);
        let first = last.and_then(|l| entry_of_last(&rel, l)).map(str::to_owned);
        // A stray file where a directory was expected names no repository (as distribution
        // ignores it), rather than failing the page.
        let run = match self.driver.list_after(&path, first.as_deref()).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                Run::whole(Listing::from([]), None, None)
            }
            listed => listed?,
        };
        // Only a directory after `last` is reported (one `last` lies under comes before it):
        // its `_layers` and `_manifests` are in a run from the start, unless the run stopped
        // before them (a store's listing request of entries that sort before `_`).
        let is_repo = !rel.is_empty() && first.is_none() && {
            let has =
                |names: &[String], n: &str| names.binary_search_by(|e| e.as_str().cmp(n)).is_ok();
            let covers =
                |r: &Run| !r.more || r.names.last().is_some_and(|l| l.as_str() >= "_manifests");
            if covers(&run) {
                has(&run.names, "_layers") || has(&run.names, "_manifests")
            } else {
                let from_underscore = self.driver.list_after(&path, Some("_")).await?;
                has(&from_underscore.names, "_layers") || has(&from_underscore.names, "_manifests")
            }
        };
        Ok(CatalogDir {
            rel,
            is_repo,
            first,
            run,
        })
    }

    /// A page of the repositories, in [`catalog_order`]: a walk that skips every directory
    /// whose names all come before `last` (listing each from the entry `last` lies under)
    /// and stops after `n` (one more, to know whether there are more), so a page costs the
    /// directories on its way, not the store.
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page> {
        // A NUL orders as `/` does ([`catalog_order`]): read as one, it names the same place.
        let last = last.map(|l| l.replace('\0', "/"));
        let last = last.as_deref();
        let want = n.map(|n| n.saturating_add(1));
        let mut items = Vec::new();
        let top = self.catalog_dir(String::new(), last).await?;
        self.catalog_walk(top, last, want, &mut items).await?;
        let more = want.is_some_and(|w| items.len() == w);
        if more {
            items.pop();
        }
        Ok(Page { items, more })
    }

    /// Walks the subdirectories of `dir` and below, adding repositories after `last` to
    /// `items` until it holds `want`. The next few siblings are listed while one is looked at
    /// ([`LISTED_AHEAD`]), in order; a directory listed in runs (S3) is listed on as the walk
    /// reaches the end of a run.
    fn catalog_walk<'a>(
        &'a self,
        dir: CatalogDir,
        last: Option<&'a str>,
        want: Option<usize>,
        items: &'a mut Vec<String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let full = |items: &Vec<String>| want.is_some_and(|w| items.len() >= w);
            let CatalogDir {
                rel,
                first,
                mut run,
                ..
            } = dir;
            // `first` comes from the client's `last`, not from a listing: walked only when it
            // names a repository (`..`, `.`, `_layers`, a bad or too long name name no
            // directory whose repositories could be listed — nor one outside `repositories/`).
            let mut first = first
                .map(|f| child(&rel, &f))
                .filter(|f| RepositoryName::parse(f).is_ok());
            loop {
                let subdirs: Vec<String> = first
                    .take()
                    .into_iter()
                    .chain(
                        run.names[run.from..]
                            .iter()
                            .filter(|e| !e.starts_with('_'))
                            .map(|e| child(&rel, e)),
                    )
                    .collect();
                let mut listed = stream::iter(subdirs)
                    .map(|rel| self.catalog_dir(rel, last))
                    .buffered(LISTED_AHEAD);
                while let Some(sub) = listed.next().await {
                    if full(items) {
                        break;
                    }
                    let sub = sub?;
                    let after =
                        last.is_none_or(|l| catalog_order(&sub.rel, l) == Ordering::Greater);
                    if sub.is_repo && after && RepositoryName::parse(&sub.rel).is_ok() {
                        items.push(sub.rel.clone());
                    }
                    if sub.has_subdirs() && !full(items) {
                        self.catalog_walk(sub, last, want, items).await?;
                    }
                }
                if full(items) {
                    return Ok(());
                }
                let Some(next) = run.next_after() else {
                    return Ok(());
                };
                run = self.driver.list_after(&dir_path(&rel), Some(next)).await?;
            }
        })
    }

    /// A page of the repository's tags (those whose current link names a manifest);
    /// `NAME_UNKNOWN` if the repository does not exist. The tags' names are listed and
    /// sorted (kept while unchanged, [`crate::driver::listing`]); only the links of the page's
    /// tags (and the one after) are read, and of a kept listing only those no page found
    /// naming a manifest before (its [`Marks`](crate::driver::listing::Marks)).
    pub async fn list_tags(
        &self,
        name: &RepositoryName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<Page> {
        if self
            .driver
            .list(&Key::Repository(name).path())
            .await?
            .is_empty()
        {
            return Err(super::Error::oci(
                ErrorCode::NameUnknown,
                format!("repository {name} is not known to the registry"),
            ));
        }
        let want = n.map(|n| n.saturating_add(1));
        let full = |items: &Vec<String>| want.is_some_and(|w| items.len() >= w);
        let mut items = Vec::new();
        let tags_dir = Key::Tags(name).path();
        let mut after = last.map(str::to_owned);
        loop {
            let run = self.driver.list_after(&tags_dir, after.as_deref()).await?;
            let run = &run;
            let tags = run
                .names
                .iter()
                .enumerate()
                .skip(run.from)
                .filter_map(indexed_tag);
            let mut read = stream::iter(tags)
                .map(|(i, tag)| async move {
                    if run.is_marked(i) {
                        return (i, tag, Ok(true));
                    }
                    let target = self.tag_target(name, &tag).await;
                    (i, tag, target.map(|t| t.is_some()))
                })
                .buffered(LINKS_AHEAD);
            while let Some((i, tag, names_a_manifest)) = read.next().await {
                if full(&items) {
                    break;
                }
                if names_a_manifest? {
                    run.mark(i);
                    items.push(tag.as_str().to_owned());
                }
            }
            if full(&items) {
                break;
            }
            match run.next_after() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        let more = want.is_some_and(|w| items.len() == w);
        if more {
            items.pop();
        }
        Ok(Page { items, more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_sorts_as_distribution_walks() {
        let mut names = vec!["a.b", "a/b/c", "a-b", "b", "a", "a/b", "a/c", "a0", "a/b-c"];
        names.sort_by(|a, b| catalog_order(a, b));
        assert_eq!(
            names,
            ["a", "a/b", "a/b/c", "a/b-c", "a/c", "a-b", "a.b", "a0", "b"]
        );
    }

    #[test]
    fn the_entry_last_lies_under() {
        let cases = [
            ("", "a", Some("a")),
            ("", "a/b/c", Some("a")),
            ("a", "a/b", Some("b")),
            ("a", "a/b/c", Some("b")),
            ("a", "a", None),      // the directory itself: all of it comes after
            ("a", "a-b", None),    // not under it
            ("a", "a/", None),     // nothing named after the slash
            ("a/b", "a/bc", None), // a sibling sharing a prefix
            ("", "", None),
        ];
        for (dir, last, entry) in cases {
            assert_eq!(entry_of_last(dir, last), entry, "{dir} / {last}");
        }
    }
}
