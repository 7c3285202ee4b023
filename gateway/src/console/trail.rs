//! The audit trail as the console searches it: the newest events of the gateway's trail
//! file that match a user, a repository, an action and a time range. It reads the file's
//! last [`WINDOW`] bytes (the trail can be large; older events are for the SIEM that ingests
//! it), newest first.

use serde_json::Value;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes of the trail's end that a search reads.
pub const WINDOW: u64 = 32 << 20;
/// Events a search shows at most.
pub const SHOWN: usize = 200;

/// What a search asks for (empty fields match everything).
#[derive(Debug, Default, Clone)]
pub struct Search {
    pub user: String,
    pub repository: String,
    pub action: String,
    /// RFC 3339 (or a prefix of it, e.g. `2026-12-06`): events at or after.
    pub since: String,
    /// The same: events at or before (a prefix matches the whole of it).
    pub until: String,
}

impl Search {
    fn matches(&self, e: &Value) -> bool {
        let field = |k: &str| e[k].as_str().unwrap_or("");
        let at = field("@timestamp");
        (self.user.is_empty() || field("user.name") == self.user)
            && (self.repository.is_empty()
                || field("repository") == self.repository
                || field("repository").starts_with(&format!("{}/", self.repository)))
            && (self.action.is_empty() || field("event.action") == self.action)
            && (self.since.is_empty() || at >= self.since.as_str())
            && (self.until.is_empty()
                || at <= self.until.as_str()
                || at.starts_with(self.until.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
            && self.repository.is_empty()
            && self.action.is_empty()
            && self.since.is_empty()
            && self.until.is_empty()
    }
}

/// The newest events of the trail at `file` that match, at most [`SHOWN`], newest first;
/// and whether the search stopped at the window's start (older events were not looked at).
pub fn search(file: &Path, s: &Search) -> std::io::Result<(Vec<Value>, bool)> {
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(WINDOW);
    f.seek(SeekFrom::Start(start))?;
    let mut raw = Vec::new();
    f.take(WINDOW).read_to_end(&mut raw)?;
    // A window that starts mid-line (even mid-character): its first line is partial.
    let body = if start > 0 {
        raw.iter()
            .position(|&b| b == b'\n')
            .map_or(&raw[..0], |i| &raw[i + 1..])
    } else {
        &raw[..]
    };
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let mut out = Vec::new();
    for line in lines.iter().rev() {
        let Ok(e) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if s.matches(&e) {
            out.push(e);
            if out.len() == SHOWN {
                return Ok((out, false));
            }
        }
    }
    Ok((out, start > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_match_by_user_repository_action_and_time_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("audit.jsonl");
        let lines = [
            r#"{"@timestamp":"2026-12-06T10:00:00.000Z","event.action":"manifest-push","user.name":"bob","repository":"team-a/app"}"#,
            r#"{"@timestamp":"2026-12-06T11:00:00.000Z","event.action":"manifest-pull","user.name":"bob","repository":"team-a/app"}"#,
            r#"{"@timestamp":"2026-12-07T09:00:00.000Z","event.action":"manifest-push","user.name":"carol","repository":"team-b/x"}"#,
            "not json \u{e9}",
        ];
        std::fs::write(&f, lines.join("\n")).unwrap();
        let found = |s: Search| {
            search(&f, &s)
                .unwrap()
                .0
                .iter()
                .map(|e| e["@timestamp"].as_str().unwrap()[11..13].to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(found(Search::default()), ["09", "11", "10"]);
        let bob = Search {
            user: "bob".into(),
            ..Default::default()
        };
        assert_eq!(found(bob.clone()), ["11", "10"]);
        assert_eq!(
            found(Search {
                action: "manifest-push".into(),
                ..bob.clone()
            }),
            ["10"]
        );
        assert_eq!(
            found(Search {
                repository: "team-a".into(),
                until: "2026-12-06".into(),
                ..Default::default()
            }),
            ["11", "10"]
        );
        assert_eq!(
            found(Search {
                since: "2026-12-07".into(),
                ..Default::default()
            }),
            ["09"]
        );
    }
}
