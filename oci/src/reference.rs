//! Tags and references (a tag or a digest).

use crate::digest::{Digest, DigestError};
use std::fmt;

/// Longest accepted tag, per the spec's `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("tag {0:?} is invalid: up to 128 of [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadTag(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A valid tag such as `v1.2.3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ReferenceError::BadTag(s.chars().take(160).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `<reference>` of a manifest route: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference containing ':' is a digest, anything else a tag (tags cannot contain ':').
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_references() {
        let long = "t".repeat(MAX_TAG_LEN);
        for (input, is_tag) in [
            ("latest", true),
            ("v1.2.3-rc.1", true),
            ("_x", true),
            ("A", true),
            (long.as_str(), true),
            (
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                false,
            ),
        ] {
            let r = Reference::parse(input).unwrap();
            assert_eq!(matches!(r, Reference::Tag(_)), is_tag, "{input:?}");
            assert_eq!(r.to_string(), input);
        }
    }

    #[test]
    fn rejected_references() {
        let long = "t".repeat(MAX_TAG_LEN + 1);
        for bad in [
            "",
            ".hidden",
            "-dash",
            "a/b",
            "a b",
            "tag!",
            "..",
            long.as_str(),
            "sha256:short",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }
}
