//! The audit trail (first part of issue 8): security decisions (logins, tokens issued to
//! robots and CI, robot administration, refusals) call [`record`] with an ECS-style action,
//! outcome and fields. With a trail installed ([`install`]; `[audit] file`, and
//! `<data>/audit/audit.jsonl` in `gateway dev`) each event is one JSON line carrying
//! `event.sequence` and a SHA-256 chain: `audit.prev` is the previous event's `audit.hash`, and
//! `audit.hash` is the SHA-256 of the line as written without it. `gateway audit verify
//! <file>` ([`verify`]) names the first edited, missing or reordered line. Without a trail,
//! events go to the log under the `audit` target. Never pass a password, token or secret.

use sha2::Digest;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The chain's starting `audit.prev`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Trail {
    path: PathBuf,
    state: Mutex<Chain>,
}

struct Chain {
    file: std::fs::File,
    sequence: u64,
    prev: String,
}

static TRAIL: OnceLock<Trail> = OnceLock::new();

/// Appends events to `path` from now on (created 0600 with its directory; an existing trail is
/// continued: its last line gives the sequence and the hash to chain to).
pub fn install(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (mut sequence, mut prev) = (0, GENESIS.to_string());
    if let Ok(f) = std::fs::File::open(path) {
        let last = std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .last();
        if let Some(line) = last {
            let v: serde_json::Value = serde_json::from_str(&line).with_context(|| {
                format!("{}: the last line is not an audit event", path.display())
            })?;
            sequence = v["event.sequence"].as_u64().unwrap_or(0);
            prev = v["audit.hash"].as_str().unwrap_or(GENESIS).to_string();
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let trail = Trail {
        path: path.to_path_buf(),
        state: Mutex::new(Chain {
            file,
            sequence,
            prev,
        }),
    };
    TRAIL
        .set(trail)
        .map_err(|_| anyhow::anyhow!("the audit trail is already installed"))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn timestamp() -> String {
    let now = std::time::SystemTime::now();
    let secs = storage_backend::registry::rfc3339(now);
    let millis = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    // 2026-11-27T05:00:00Z → 2026-11-27T05:00:00.123Z
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{millis:03}Z"),
        None => secs,
    }
}

/// Records one audit event: `action` (`login`, `token`, `robot-create`…), `outcome`
/// (`success` / `failure`), and more ECS-style fields (an object).
pub fn record(action: &str, outcome: &str, fields: serde_json::Value) {
    let mut event = match fields {
        serde_json::Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            m.insert("fields".into(), other);
            m
        }
    };
    event.insert("@timestamp".into(), timestamp().into());
    event.insert("event.action".into(), action.into());
    event.insert("event.outcome".into(), outcome.into());
    let Some(trail) = TRAIL.get() else {
        tracing::info!(target: "audit", event = %serde_json::Value::Object(event));
        return;
    };
    let Ok(mut chain) = trail.state.lock() else {
        tracing::error!("the audit trail's lock is poisoned; event lost");
        return;
    };
    chain.sequence += 1;
    event.insert("event.sequence".into(), chain.sequence.into());
    event.insert("audit.prev".into(), chain.prev.clone().into());
    let body = serde_json::Value::Object(event.clone()).to_string();
    let hash = sha256_hex(&body);
    event.insert("audit.hash".into(), hash.clone().into());
    let line = serde_json::Value::Object(event).to_string() + "\n";
    match chain.file.write_all(line.as_bytes()) {
        Ok(()) => chain.prev = hash,
        Err(e) => {
            chain.sequence -= 1;
            tracing::error!(file = %trail.path.display(), error = %e, "writing the audit trail failed; event lost");
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line chains to the one before: how many, first and last sequence.
    Intact { events: u64, first: u64, last: u64 },
    /// The first line that breaks the chain (1-based) and why.
    Broken { line: usize, why: String },
}

/// Checks a trail: every line's hash, its link to the line before, and its sequence number.
/// The first line may start anywhere (a rotated file continues a chain).
pub fn verify(reader: impl BufRead) -> std::io::Result<Verdict> {
    let mut prev: Option<(u64, String)> = None;
    let (mut events, mut first) = (0u64, 0u64);
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        let n = i + 1;
        let broken = |why: String| Ok(Verdict::Broken { line: n, why });
        let Ok(serde_json::Value::Object(mut event)) = serde_json::from_str(&line) else {
            return broken("not a JSON object: edited or truncated".into());
        };
        let Some(serde_json::Value::String(stored)) = event.remove("audit.hash") else {
            return broken("no audit.hash".into());
        };
        let body = serde_json::Value::Object(event.clone()).to_string();
        if sha256_hex(&body) != stored {
            return broken("its content does not match its hash: the line was edited".into());
        }
        let (Some(seq), Some(link)) = (
            event.get("event.sequence").and_then(|v| v.as_u64()),
            event.get("audit.prev").and_then(|v| v.as_str()),
        ) else {
            return broken("no event.sequence or audit.prev".into());
        };
        if let Some((p_seq, p_hash)) = &prev {
            if seq != p_seq + 1 {
                let what = if seq > p_seq + 1 {
                    "events are missing or lines were reordered"
                } else {
                    "lines were reordered or repeated"
                };
                return broken(format!("sequence {seq} follows {p_seq}: {what}"));
            }
            if link != p_hash {
                return broken("it does not chain to the line before (audit.prev)".into());
            }
        } else {
            first = seq;
        }
        events += 1;
        prev = Some((seq, stored));
    }
    Ok(Verdict::Intact {
        events,
        first,
        last: prev.map_or(0, |(s, _)| s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines chained as [`record`] writes them.
    fn trail(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut e = serde_json::Map::new();
                e.insert("event.action".into(), "login".into());
                e.insert("user.name".into(), format!("user{seq}").into());
                e.insert("event.sequence".into(), seq.into());
                e.insert("audit.prev".into(), prev.clone().into());
                let hash = sha256_hex(&serde_json::Value::Object(e.clone()).to_string());
                e.insert("audit.hash".into(), hash.clone().into());
                prev = hash;
                serde_json::Value::Object(e).to_string()
            })
            .collect()
    }

    fn check(lines: &[String]) -> Verdict {
        verify(std::io::Cursor::new(lines.join("\n"))).unwrap()
    }

    #[test]
    fn intact_deleted_edited_and_swapped() {
        let t = trail(5);
        assert_eq!(
            check(&t),
            Verdict::Intact {
                events: 5,
                first: 1,
                last: 5
            }
        );
        assert_eq!(
            check(&t[2..]),
            Verdict::Intact {
                events: 3,
                first: 3,
                last: 5
            }
        );
        let mut deleted = t.clone();
        deleted.remove(2);
        assert!(matches!(check(&deleted), Verdict::Broken { line: 3, .. }));
        let mut edited = t.clone();
        edited[3] = edited[3].replace("user4", "admin");
        assert!(
            matches!(check(&edited), Verdict::Broken { line: 4, ref why } if why.contains("edited"))
        );
        let mut swapped = t.clone();
        swapped.swap(1, 2);
        assert!(matches!(check(&swapped), Verdict::Broken { line: 2, .. }));
        let mut garbage = t.clone();
        garbage[0] = "{".into();
        assert!(matches!(check(&garbage), Verdict::Broken { line: 1, .. }));
    }
}
