//! Repository and tag patterns.
//!
//! Repository patterns are `/`-separated segments. In a segment, `*` matches any run of
//! characters except `/` and `?` one such character; a segment that is exactly `**` matches
//! zero or more whole segments. `{username}` in a segment stands for the subject's name.
//! So `team-a/**` matches `team-a` and `team-a/x/y` but never `team-ab/x`.
//!
//! Tag patterns are globs over the tag (`*`, `?`), or regular expressions.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    /// `*`: any run within a segment.
    Star,
    /// `?`: one character.
    One,
    /// `{username}`
    Username,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`
    Any,
    Glob(Vec<Piece>),
}

/// How specific a pattern is; larger is more specific. Compared as a tuple: literal segments,
/// then literal characters, then fewer `**`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Specificity {
    literal_segments: u16,
    literal_chars: u16,
    fewer_double_stars: i16,
}

/// A compiled repository pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    source: String,
    segments: Vec<Segment>,
    /// Literal text every match starts with (before the first wildcard or placeholder).
    prefix: String,
    specificity: Specificity,
}

/// Why a pattern does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("empty segment (leading, trailing or double '/')")]
    EmptySegment,
    #[error("'**' must be a whole segment")]
    DoubleStarInSegment,
    #[error("character {0:?} is not allowed in a repository pattern")]
    BadChar(char),
    #[error("unknown placeholder {{{0}}} (only {{username}} is known)")]
    UnknownPlaceholder(String),
    #[error("unclosed '{{'")]
    UnclosedBrace,
    #[error("character {0:?} is not allowed in a tag pattern")]
    BadTagChar(char),
    #[error("invalid regular expression: {0}")]
    Regex(String),
}

impl RepoPattern {
    pub fn compile(source: &str) -> Result<Self, PatternError> {
        if source.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut segments = Vec::new();
        let mut spec = Specificity {
            literal_segments: 0,
            literal_chars: 0,
            fewer_double_stars: 0,
        };
        for seg in source.split('/') {
            if seg.is_empty() {
                return Err(PatternError::EmptySegment);
            }
            if seg == "**" {
                spec.fewer_double_stars -= 1;
                segments.push(Segment::Any);
                continue;
            }
            if seg.contains("**") {
                return Err(PatternError::DoubleStarInSegment);
            }
            let mut pieces = Vec::new();
            let mut lit = String::new();
            let mut chars = seg.chars();
            let mut literal_segment = true;
            while let Some(c) = chars.next() {
                match c {
                    '*' | '?' => {
                        if !lit.is_empty() {
                            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                        }
                        pieces.push(if c == '*' { Piece::Star } else { Piece::One });
                        literal_segment = false;
                    }
                    '{' => {
                        let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                        if !seg.contains('}') {
                            return Err(PatternError::UnclosedBrace);
                        }
                        if name != "username" {
                            return Err(PatternError::UnknownPlaceholder(name));
                        }
                        if !lit.is_empty() {
                            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                        }
                        pieces.push(Piece::Username);
                        spec.literal_chars += 1;
                    }
                    c if c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c) => {
                        lit.push(c);
                        spec.literal_chars += 1;
                    }
                    c => return Err(PatternError::BadChar(c)),
                }
            }
            if !lit.is_empty() {
                pieces.push(Piece::Lit(lit));
            }
            if literal_segment {
                spec.literal_segments += 1;
            }
            segments.push(Segment::Glob(pieces));
        }
        let mut prefix = String::new();
        'outer: for (i, seg) in segments.iter().enumerate() {
            let Segment::Glob(pieces) = seg else { break };
            if i > 0 {
                prefix.push('/');
            }
            for p in pieces {
                match p {
                    Piece::Lit(l) => prefix.push_str(l),
                    _ => break 'outer,
                }
            }
        }
        // A trailing `/` in the prefix would wrongly exclude `team-a` for `team-a/**`.
        while prefix.ends_with('/') {
            prefix.pop();
        }
        Ok(RepoPattern {
            source: source.to_owned(),
            segments,
            prefix,
            specificity: spec,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn specificity(&self) -> Specificity {
        self.specificity
    }

    /// Whether `repo` matches, with `{username}` standing for `username` (never matched when
    /// there is none, as for anonymous subjects).
    pub fn matches(&self, repo: &str, username: Option<&str>) -> bool {
        // A byte loop: prefixes are short and most mismatches are early, where a call to
        // memcmp cost more than the comparison (measured in benches/decide.rs).
        let (r, p) = (repo.as_bytes(), self.prefix.as_bytes());
        if r.len() < p.len() || r.iter().zip(p).any(|(a, b)| a != b) {
            return false;
        }
        match_segments(&self.segments, Some(repo), username)
    }
}

impl RepoPattern {
    /// Whether every repository `narrower` matches is matched by `self` (for any user name):
    /// how a delegated grant is kept within its creator's. Sound, not complete: `false` may
    /// mean "cannot tell" for odd wildcard mixes, never "wider" wrongly called "covered".
    pub fn covers(&self, narrower: &RepoPattern) -> bool {
        let wide: Vec<Vec<Tok>> = self.segments.iter().map(tokens).collect();
        let narrow: Vec<Vec<Tok>> = narrower.segments.iter().map(tokens).collect();
        // covered[i][j]: wide[i..] covers narrow[j..]; filled from the ends.
        let (w, n) = (wide.len(), narrow.len());
        let mut covered = vec![vec![false; n + 1]; w + 1];
        covered[w][n] = true;
        for i in (0..w).rev() {
            for j in (0..=n).rev() {
                covered[i][j] = if wide[i] == [Tok::AnySegments] {
                    // `**` matches nothing more, or swallows one more narrow segment.
                    covered[i + 1][j] || (j < n && covered[i][j + 1])
                } else {
                    j < n
                        && narrow[j] != [Tok::AnySegments]
                        && covers_tokens(&wide[i], &narrow[j])
                        && covered[i + 1][j + 1]
                };
            }
        }
        covered[0][0]
    }
}

/// A segment as characters and wildcards (`**` as its own token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Char(char),
    Star,
    One,
    Username,
    AnySegments,
}

fn tokens(seg: &Segment) -> Vec<Tok> {
    match seg {
        Segment::Any => vec![Tok::AnySegments],
        Segment::Glob(pieces) => pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Lit(l) => l.chars().map(Tok::Char).collect(),
                Piece::Star => vec![Tok::Star],
                Piece::One => vec![Tok::One],
                Piece::Username => vec![Tok::Username],
            })
            .collect(),
    }
}

/// Whether the segment glob `wide` matches every text the segment glob `narrow` matches.
fn covers_tokens(wide: &[Tok], narrow: &[Tok]) -> bool {
    let (w, n) = (wide.len(), narrow.len());
    let mut covered = vec![vec![false; n + 1]; w + 1];
    covered[w][n] = true;
    for i in (0..w).rev() {
        for j in (0..=n).rev() {
            let next = j < n && covered[i + 1][j + 1];
            covered[i][j] = match (wide[i], narrow.get(j)) {
                // `*` (never `/`) stands for any run of narrow's tokens, wildcards included.
                (Tok::Star, _) => covered[i + 1][j] || (j < n && covered[i][j + 1]),
                (Tok::One, Some(Tok::Char(_) | Tok::One)) => next,
                (Tok::Char(a), Some(&Tok::Char(b))) => a == b && next,
                (Tok::Username, Some(Tok::Username)) => next,
                _ => false,
            };
        }
    }
    covered[0][0]
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn split(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((first, more)) => (first, Some(more)),
        None => (s, None),
    }
}

/// `rest` is the path still to match (`None` once every segment is consumed).
fn match_segments(pat: &[Segment], rest: Option<&str>, user: Option<&str>) -> bool {
    match pat.split_first() {
        None => rest.is_none(),
        Some((Segment::Any, tail)) => {
            if match_segments(tail, rest, user) {
                return true;
            }
            match rest {
                Some(s) => match_segments(pat, split(s).1, user),
                None => false,
            }
        }
        Some((Segment::Glob(pieces), tail)) => match rest {
            Some(s) => {
                let (first, more) = split(s);
                match_pieces(pieces, first, user) && match_segments(tail, more, user)
            }
            None => false,
        },
    }
}

fn match_pieces(pieces: &[Piece], s: &str, user: Option<&str>) -> bool {
    match pieces.split_first() {
        None => s.is_empty(),
        Some((Piece::Lit(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|t| match_pieces(rest, t, user)),
        Some((Piece::Username, rest)) => match user {
            Some(u) if !u.is_empty() && !u.contains('/') => s
                .strip_prefix(u)
                .is_some_and(|t| match_pieces(rest, t, user)),
            _ => false,
        },
        Some((Piece::One, rest)) => {
            let mut it = s.chars();
            it.next().is_some() && match_pieces(rest, it.as_str(), user)
        }
        Some((Piece::Star, rest)) => s
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(s.len()))
            .any(|i| match_pieces(rest, &s[i..], user)),
    }
}

/// A compiled tag pattern: a glob (`*`, `?`) or a regular expression (anchored).
#[derive(Debug, Clone)]
pub enum TagPattern {
    Glob(String, Vec<GlobPiece>),
    Regex(regex::Regex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobPiece {
    Lit(String),
    Star,
    One,
}

impl TagPattern {
    pub fn glob(source: &str) -> Result<Self, PatternError> {
        if source.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut pieces = Vec::new();
        let mut lit = String::new();
        for c in source.chars() {
            match c {
                '*' | '?' => {
                    if !lit.is_empty() {
                        pieces.push(GlobPiece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(if c == '*' {
                        GlobPiece::Star
                    } else {
                        GlobPiece::One
                    });
                }
                c if c.is_ascii_alphanumeric() || "._-".contains(c) => lit.push(c),
                c => return Err(PatternError::BadTagChar(c)),
            }
        }
        if !lit.is_empty() {
            pieces.push(GlobPiece::Lit(lit));
        }
        Ok(TagPattern::Glob(source.to_owned(), pieces))
    }

    pub fn regex(source: &str) -> Result<Self, PatternError> {
        regex::Regex::new(&format!("^(?:{source})$"))
            .map(TagPattern::Regex)
            .map_err(|e| PatternError::Regex(e.to_string()))
    }

    pub fn matches(&self, tag: &str) -> bool {
        match self {
            TagPattern::Glob(_, pieces) => match_glob(pieces, tag),
            TagPattern::Regex(r) => r.is_match(tag),
        }
    }
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagPattern::Glob(s, _) => f.write_str(s),
            TagPattern::Regex(r) => write!(f, "regex {}", r.as_str()),
        }
    }
}

fn match_glob(pieces: &[GlobPiece], s: &str) -> bool {
    match pieces.split_first() {
        None => s.is_empty(),
        Some((GlobPiece::Lit(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|t| match_glob(rest, t)),
        Some((GlobPiece::One, rest)) => {
            let mut it = s.chars();
            it.next().is_some() && match_glob(rest, it.as_str())
        }
        Some((GlobPiece::Star, rest)) => s
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(s.len()))
            .any(|i| match_glob(rest, &s[i..])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_pattern_table() {
        let cases: &[(&str, &str, Option<&str>, bool)] = &[
            ("team-a/**", "team-a", None, true),
            ("team-a/**", "team-a/app", None, true),
            ("team-a/**", "team-a/x/y/z", None, true),
            ("team-a/**", "team-ab/x", None, false),
            ("team-a/**", "team-ab", None, false),
            ("team-a/*", "team-a/app", None, true),
            ("team-a/*", "team-a/x/y", None, false),
            ("team-a/*", "team-a", None, false),
            ("*/app", "x/app", None, true),
            ("*/app", "x/y/app", None, false),
            ("**/app", "x/y/app", None, true),
            ("**/app", "app", None, true),
            ("**", "anything/at/all", None, true),
            ("lib?", "lib1", None, true),
            ("lib?", "lib", None, false),
            ("svc-*-prod/**", "svc-pay-prod/api", None, true),
            ("svc-*-prod/**", "svc-pay-dev/api", None, false),
            ("users/{username}/**", "users/bob/app", Some("bob"), true),
            ("users/{username}/**", "users/bob/app", Some("alice"), false),
            ("users/{username}/**", "users/bob/app", None, false),
            ("users/{username}/**", "users/bobby/app", Some("bob"), false),
            ("users/{username}", "users/a/b", Some("a/b"), false),
            ("exact/name", "exact/name", None, true),
            ("exact/name", "exact/name/sub", None, false),
        ];
        for (pat, repo, user, want) in cases {
            let p = RepoPattern::compile(pat).unwrap();
            assert_eq!(p.matches(repo, *user), *want, "{pat} vs {repo} as {user:?}");
        }
    }

    #[test]
    fn covering_patterns() {
        let covers = |wide: &str, narrow: &str| {
            RepoPattern::compile(wide)
                .unwrap()
                .covers(&RepoPattern::compile(narrow).unwrap())
        };
        for (wide, narrow) in [
            ("**", "team-a/**"),
            ("team-a/**", "team-a/**"),
            ("team-a/**", "team-a/app"),
            ("team-a/**", "team-a"),
            ("team-a/**", "team-a/*/x/**"),
            ("team-a/*", "team-a/app-*"),
            ("team-a/app-*", "team-a/app-?x*"),
            ("team-?/x", "team-a/x"),
            ("*/**", "team-a/b"),
            ("users/{username}/**", "users/{username}/x"),
        ] {
            assert!(covers(wide, narrow), "{wide} should cover {narrow}");
        }
        for (wide, narrow) in [
            ("team-a/**", "**"),
            ("team-a/**", "team-b/app"),
            ("team-a/**", "team-ab/x"),
            ("team-a/*", "team-a/**"),
            ("team-a/*", "team-a/x/y"),
            ("team-a/app-*", "team-a/*"),
            ("team-?/x", "team-*/x"),
            ("team-a", "team-a/**"),
            ("users/{username}/**", "users/bob/x"),
            ("users/*/**", "users/**"),
        ] {
            assert!(!covers(wide, narrow), "{wide} must not cover {narrow}");
        }
    }

    #[test]
    fn specificity_orders_patterns() {
        let s = |p: &str| RepoPattern::compile(p).unwrap().specificity();
        assert!(s("team-a/prod/**") > s("team-a/**"));
        assert!(s("team-a/*") > s("team-a/**"));
        assert!(s("team-a/app") > s("team-a/*"));
        assert!(s("team-a/**") > s("**"));
        assert!(s("users/{username}/**") > s("users/**"));
    }

    #[test]
    fn rejected_patterns() {
        for (p, e) in [
            ("", PatternError::Empty),
            ("a//b", PatternError::EmptySegment),
            ("/a", PatternError::EmptySegment),
            ("a/**b", PatternError::DoubleStarInSegment),
            ("A/b", PatternError::BadChar('A')),
            ("a/{user}", PatternError::UnknownPlaceholder("user".into())),
            ("a/{username", PatternError::UnclosedBrace),
            ("a b", PatternError::BadChar(' ')),
        ] {
            assert_eq!(RepoPattern::compile(p).unwrap_err(), e, "{p:?}");
        }
        assert!(TagPattern::glob("a/b").is_err());
        assert!(TagPattern::regex("(").is_err());
    }

    #[test]
    fn tag_pattern_table() {
        let g = |p: &str, t: &str| TagPattern::glob(p).unwrap().matches(t);
        assert!(g("v*", "v1.2.3"));
        assert!(!g("v*", "latest"));
        assert!(g("v?.?", "v1.2"));
        assert!(g("*-rc*", "v1-rc2"));
        assert!(!g("release", "release2"));
        let r = |p: &str, t: &str| TagPattern::regex(p).unwrap().matches(t);
        assert!(r(r"v\d+\.\d+\.\d+", "v1.22.3"));
        assert!(!r(r"v\d+\.\d+\.\d+", "v1.22.3-rc1"), "regexes are anchored");
    }
}
