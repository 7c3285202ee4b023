//! Repository names, per the distribution-spec grammar:
//! `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
//! at most [`MAX_NAME_LEN`] characters.

use std::fmt;

/// Longest accepted repository name. Clients limit `host[:port]/name` to 255 characters;
/// we accept names up to that length and reject anything longer.
pub const MAX_NAME_LEN: usize = 255;

/// Why a repository name is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error(
        "repository name component {0:?} is invalid: lowercase letters and digits, separated by '.', '_', '__' or '-'"
    )]
    BadComponent(String),
}

/// A valid repository name such as `team/app`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(String);

impl RepositoryName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(NameError::BadComponent(
                    component.chars().take(80).collect(),
                ));
            }
        }
        Ok(RepositoryName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && alnum(b[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < b.len() {
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_names() {
        let long = "a".repeat(MAX_NAME_LEN);
        for ok in [
            "a",
            "library/busybox",
            "team-a/app_1/sub.svc",
            "a__b",
            "a---b",
            "0/1/2",
            "x.y.z/w",
            long.as_str(),
        ] {
            assert!(RepositoryName::parse(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn rejected_names() {
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "..",
            "a/../b",
            "a/./b",
            "/a",
            "a/",
            "a//b",
            "Upper",
            "a___b",
            "a.-b",
            "-a",
            "a-",
            "a_",
            ".a",
            "a b",
            "a%2fb",
            "a\\b",
            "ä",
            too_long.as_str(),
        ] {
            assert!(RepositoryName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
