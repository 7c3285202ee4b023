//! Content discovery: tags of a repository and the catalog of repositories.

use super::manifests::LINKS_AHEAD;
use super::{Registry, Result};
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

/// Whether the repositories under `dir` (`dir` itself and `dir/…`) may hold a name after
/// `last` in [`catalog_order`]: they are one contiguous run of that order.
fn subtree_after(dir: &str, last: &str) -> bool {
    if catalog_order(dir, last) != Ordering::Less {
        return true;
    }
    // `last` inside the subtree: it starts with `dir` and the next byte orders as `/`.
    last.len() > dir.len()
        && key(last).take(dir.len()).eq(key(dir))
        && key(last).nth(dir.len()) == Some(0)
}

/// A directory of `repositories/` as a catalog page sees it.
struct CatalogDir {
    /// Its name relative to `repositories/` (empty for `repositories/` itself).
    rel: String,
    /// Whether it is a repository: it holds `_layers` (as distribution's catalog decides, so
    /// a repository with only blobs is listed) or `_manifests`.
    is_repo: bool,
    /// Its entries, sorted.
    entries: Listing,
    /// The first entry whose names may come after `last`: the entries before it are skipped.
    start: usize,
}

impl CatalogDir {
    fn path(&self, entry: &str) -> String {
        if self.rel.is_empty() {
            entry.to_owned()
        } else {
            format!("{}/{entry}", self.rel)
        }
    }

    /// Its subdirectories that may hold names after `last`, in [`catalog_order`]: sorted
    /// entries are in that order (no entry holds a `/`), each subtree a contiguous run.
    fn subdirs(&self) -> impl Iterator<Item = String> + '_ {
        self.entries[self.start..]
            .iter()
            .filter(|e| !e.starts_with('_'))
            .map(|e| self.path(e))
    }
}

/// A tag name as a tag (a name that is none is skipped). A function, not a closure: the page's
/// future must be `Send` for every lifetime of the listing it borrows.
fn parse_tag(name: &str) -> Option<Tag> {
    Tag::parse(name).ok()
}

/// The same, with the name's place in its listing.
fn indexed_tag((i, name): (usize, &String)) -> Option<(usize, Tag)> {
    Some((i, parse_tag(name)?))
}

impl Registry {
    /// Lists a directory of `repositories/` for a catalog page after `last`.
    async fn catalog_dir(&self, rel: String, last: Option<&str>) -> Result<CatalogDir> {
        let root = Key::Repositories.path();
        let path = if rel.is_empty() {
            root
        } else {
            format!("{root}/{rel}")
        };
        // A stray file where a directory was expected names no repository (as distribution
        // ignores it), rather than failing the page.
        let entries = match self.driver.list_sorted(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Listing::from([]),
            listed => listed?,
        };
        let has = |name: &str| entries.binary_search_by(|e| e.as_str().cmp(name)).is_ok();
        let is_repo = !rel.is_empty() && (has("_layers") || has("_manifests"));
        let mut dir = CatalogDir {
            rel,
            is_repo,
            entries,
            start: 0,
        };
        if let Some(l) = last {
            dir.start = dir
                .entries
                .partition_point(|e| !subtree_after(&dir.path(e), l));
        }
        Ok(dir)
    }

    /// A page of the repositories, in [`catalog_order`]: a walk that skips every directory
    /// whose names all come before `last` (a binary search in each sorted listing) and stops
    /// after `n` (one more, to know whether there are more), so a page costs the directories
    /// on its way, not the store.
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page> {
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
    /// ([`LISTED_AHEAD`]), in order.
    fn catalog_walk<'a>(
        &'a self,
        dir: CatalogDir,
        last: Option<&'a str>,
        want: Option<usize>,
        items: &'a mut Vec<String>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let full = |items: &Vec<String>| want.is_some_and(|w| items.len() >= w);
            let mut listed = stream::iter(dir.subdirs())
                .map(|rel| self.catalog_dir(rel, last))
                .buffered(LISTED_AHEAD);
            while let Some(sub) = listed.next().await {
                if full(items) {
                    break;
                }
                let sub = sub?;
                let after = last.is_none_or(|l| catalog_order(&sub.rel, l) == Ordering::Greater);
                if sub.is_repo && after && RepositoryName::parse(&sub.rel).is_ok() {
                    items.push(sub.rel.clone());
                }
                if sub.start < sub.entries.len() && !full(items) {
                    self.catalog_walk(sub, last, want, items).await?;
                }
            }
            Ok(())
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
            // The next run starts after this one's last name (the check that it moves on only
            // guards against a driver breaking its contract: it would loop for ever).
            match run.names.last() {
                Some(l) if run.more && after.as_deref().is_none_or(|a| l.as_str() > a) => {
                    after = Some(l.clone());
                }
                _ => break,
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
    fn a_subtree_is_skipped_only_when_all_of_it_comes_before_last() {
        let cases = [
            ("a", "a", true),     // a/… come after a
            ("a", "a/b", true),   // a/c may come after a/b
            ("a", "a-b", false),  // all of a/… comes before a-b
            ("a/b", "a", true),   // after
            ("a-b", "a/b", true), // after
            ("a", "a/b/c", true),
            ("a/b", "a/c", false),
            ("ab", "a/z", true),
            ("a", "a\0b", true), // a NUL orders as `/` does
        ];
        for (dir, last, may) in cases {
            assert_eq!(subtree_after(dir, last), may, "{dir} after {last}");
        }
    }
}
