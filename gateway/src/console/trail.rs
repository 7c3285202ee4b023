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
    let (raw, partial) = tail(file)?;
    let mut out = Vec::new();
    for line in raw.split(|&b| b == b'\n').rev() {
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
    Ok((out, partial))
}

/// Who pushed each `(tag, digest)` of `repo`, and when (`@timestamp`), as far as the
/// trail's window tells: the newest successful `tag-create`, `tag-overwrite` or
/// `manifest-push` naming the tag, if it put that digest there (a tag moved through another
/// gateway, whose trail this is not, is left out rather than credited to whoever moved it
/// before).
pub fn pushed(
    file: &Path,
    repo: &str,
    tags: &[(String, String)],
) -> std::io::Result<std::collections::HashMap<String, (String, String)>> {
    let mut found = std::collections::HashMap::new();
    let mut settled = std::collections::HashSet::new();
    if tags.is_empty() {
        return Ok(found);
    }
    let (raw, _) = tail(file)?;
    // Only lines that name the repository are parsed (names need no JSON escaping).
    let needle = format!("\"repository\":\"{repo}\"");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    for line in raw.split(|&b| b == b'\n').rev() {
        if finder.find(line).is_none() {
            continue;
        }
        let Ok(e) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let field = |k: &str| e[k].as_str().unwrap_or("");
        let pushed = matches!(
            field("event.action"),
            "tag-create" | "tag-overwrite" | "manifest-push"
        ) && field("event.outcome") == "success"
            && field("repository") == repo;
        let tag = field("tag");
        let Some((_, digest)) = tags.iter().find(|(t, _)| t == tag) else {
            continue;
        };
        if pushed && settled.insert(tag.to_owned()) {
            if field("digest") == digest {
                found.insert(
                    tag.to_owned(),
                    (
                        field("@timestamp").to_owned(),
                        field("user.name").to_owned(),
                    ),
                );
            }
            if settled.len() == tags.len() {
                break;
            }
        }
    }
    Ok(found)
}

/// The trail's last [`WINDOW`] bytes, whole lines only; and whether that is not all of it.
fn tail(file: &Path) -> std::io::Result<(Vec<u8>, bool)> {
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(WINDOW);
    f.seek(SeekFrom::Start(start))?;
    let mut raw = Vec::new();
    f.take(WINDOW).read_to_end(&mut raw)?;
    // A window that starts mid-line (even mid-character): its first line is partial.
    if start > 0 {
        let first = raw
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| i + 1);
        raw.drain(..first);
    }
    Ok((raw, start > 0))
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

    #[test]
    fn the_last_push_of_each_tag_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let lines = [
            r#"{"@timestamp":"2026-12-06T10:00:00.000Z","event.action":"tag-create","event.outcome":"success","user.name":"bob","repository":"team-a/app","tag":"v1","digest":"sha256:10"}"#,
            r#"{"@timestamp":"2026-12-06T11:00:00.000Z","event.action":"tag-overwrite","event.outcome":"success","user.name":"carol","repository":"team-a/app","tag":"v1","digest":"sha256:11"}"#,
            r#"{"@timestamp":"2026-12-06T12:00:00.000Z","event.action":"tag-overwrite","event.outcome":"failure","user.name":"eve","repository":"team-a/app","tag":"v1","digest":"sha256:ee"}"#,
            r#"{"@timestamp":"2026-12-06T13:00:00.000Z","event.action":"tag-create","event.outcome":"success","user.name":"mallory","repository":"team-a/app","tag":"v4","digest":"sha256:40"}"#,
            r#"{"@timestamp":"2026-12-06T14:00:00.000Z","event.action":"manifest-push","event.outcome":"success","user.name":"bob","repository":"team-a/app","tag":"v2","digest":"sha256:22"}"#,
            r#"{"@timestamp":"2026-12-06T14:30:00.000Z","event.action":"tag-create","event.outcome":"success","user.name":"dave","repository":"team-a/app2","tag":"v2","digest":"sha256:22"}"#,
            r#"{"@timestamp":"2026-12-06T15:00:00.000Z","event.action":"manifest-pull","event.outcome":"success","user.name":"zed","repository":"team-a/app","tag":"v2","digest":"sha256:22"}"#,
        ];
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let tags = [
            ("v1".to_owned(), "sha256:11".to_owned()),
            ("v2".to_owned(), "sha256:22".to_owned()),
            ("v3".to_owned(), "sha256:33".to_owned()),
            ("v4".to_owned(), "sha256:44".to_owned()),
        ];
        let found = pushed(&file, "team-a/app", &tags).unwrap();
        assert_eq!(
            found["v1"],
            ("2026-12-06T11:00:00.000Z".into(), "carol".into()),
            "the newest successful push; a refused one is not one"
        );
        assert_eq!(
            found["v2"].1, "bob",
            "pulls and other repositories do not count"
        );
        assert!(!found.contains_key("v3"));
        assert!(
            !found.contains_key("v4"),
            "its last push here put another digest: moved elsewhere since"
        );
    }
}
