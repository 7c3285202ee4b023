//! Content discovery: tags of a repository and the catalog of repositories.

use super::{Registry, Result};
use crate::layout::Key;
use oci::{ErrorCode, RepositoryName, Tag};

/// One page of a lexically sorted list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    /// Whether items after the last one returned exist.
    pub more: bool,
}

/// The items after `last`, at most `n` of them.
pub fn paginate(mut all: Vec<String>, n: Option<usize>, last: Option<&str>) -> Page {
    all.sort();
    all.dedup();
    let start = last.map_or(0, |l| all.partition_point(|x| x.as_str() <= l));
    let rest = &all[start..];
    let take = n.unwrap_or(rest.len()).min(rest.len());
    Page {
        items: rest[..take].to_vec(),
        more: take < rest.len(),
    }
}

impl Registry {
    /// Every tag of a repository (tags whose current link names a manifest), unsorted.
    pub async fn tags(&self, name: &RepositoryName) -> Result<Vec<Tag>> {
        let mut out = Vec::new();
        for t in self.driver.list(&Key::Tags(name).path()).await? {
            let Ok(tag) = Tag::parse(&t) else { continue };
            if self.tag_target(name, &tag).await?.is_some() {
                out.push(tag);
            }
        }
        Ok(out)
    }

    /// A page of the repository's tags; `NAME_UNKNOWN` if the repository does not exist.
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
        let tags = self
            .tags(name)
            .await?
            .into_iter()
            .map(|t| t.as_str().to_owned())
            .collect();
        Ok(paginate(tags, n, last))
    }

    /// A page of the repositories that hold manifests.
    pub async fn catalog(&self, n: Option<usize>, last: Option<&str>) -> Result<Page> {
        let found = self.repository_names(true).await?;
        Ok(paginate(found, n, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_table() {
        let all = || ["c", "a", "b", "d"].map(String::from).to_vec();
        type Case<'a> = (Option<usize>, Option<&'a str>, &'a [&'a str], bool);
        let cases: &[Case<'_>] = &[
            (None, None, &["a", "b", "c", "d"], false),
            (Some(2), None, &["a", "b"], true),
            (Some(2), Some("b"), &["c", "d"], false),
            (Some(4), None, &["a", "b", "c", "d"], false),
            (Some(0), None, &[], true),
            (None, Some("bb"), &["c", "d"], false),
            (None, Some("z"), &[], false),
        ];
        for (n, last, items, more) in cases {
            let p = paginate(all(), *n, *last);
            assert_eq!(
                p.items,
                items.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{n:?} {last:?}"
            );
            assert_eq!(p.more, *more, "{n:?} {last:?}");
        }
    }
}
