//! The audit trail (issue 8), shared by both services: the gateway records every security
//! decision (logins, tokens, robot administration, registry operations, refusals; its
//! `audit` module adds the request's id, source and user agent), the storage service every
//! deletion by garbage collection and retention. [`record`] takes an ECS-style action,
//! outcome and fields. Each event gets `@timestamp`, `event.sequence`, the process's
//! `service.node.name` and `service.type`, and a SHA-256 chain: `audit.prev` is the previous
//! event's `audit.hash`, and `audit.hash` is the SHA-256 of the line as written without it.
//! `gateway audit verify <file>` and `storage-backend audit verify <file>` ([`verify`]) name
//! the first edited, missing or reordered line.
//!
//! Sinks, any number at once ([`AuditConfig`]): the JSON-lines file (reopened after `SIGHUP`,
//! for logrotate), stdout, and syslog over UDP, TCP or TLS ([`sink`]), each syslog sink with
//! its own bounded on-disk spool so a receiver that is down blocks nothing and loses nothing.
//! The chain is computed and the line handed to every sink under one lock, so every sink
//! sees the events in sequence order. Never pass a password, token or secret.

pub mod sink;
mod spool;

use serde::Deserialize;
use sha2::Digest;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The chain's starting `audit.prev`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Version of the event schema (`docs/audit.md`), in every event as `audit.schema`.
pub const SCHEMA_VERSION: &str = "1.1";

/// `[audit]` in the gateway's and the storage service's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON lines with the hash chain (`gateway audit verify <file>`), created 0600,
    /// continued across restarts, reopened on `SIGHUP`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Also write each event as one JSON line to stdout.
    #[serde(default)]
    pub stdout: bool,
    /// Syslog receivers (RFC 5424; UDP, TCP with octet counting, TLS).
    #[serde(default)]
    pub syslog: Vec<sink::SyslogConfig>,
    /// Where the syslog sinks spool events while their receiver is down (one directory per
    /// sink). Default: `spool/` next to `file`; required with syslog sinks and no file.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Bound of each sink's spool, in bytes.
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
    /// What happens when a spool is full: drop its oldest events, or refuse mutating
    /// registry requests (503) until it drains (`fail-closed`).
    #[serde(default)]
    pub on_spool_full: SpoolFull,
    /// This process's name in events (`service.node.name`). Default: `<hostname>:<port>`.
    #[serde(default)]
    pub instance: Option<String>,
}

impl AuditConfig {
    /// Whether any sink is configured (a file, stdout or syslog).
    pub fn has_sinks(&self) -> bool {
        self.file.is_some() || self.stdout || !self.syslog.is_empty()
    }
}

fn default_spool_max() -> u64 {
    64 << 20
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            stdout: false,
            syslog: Vec::new(),
            spool_dir: None,
            spool_max_bytes: default_spool_max(),
            on_spool_full: SpoolFull::default(),
            instance: None,
        }
    }
}

/// The policy for a full spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpoolFull {
    #[default]
    DropOldest,
    FailClosed,
}

struct Trail {
    path: Option<PathBuf>,
    state: Mutex<Chain>,
    stdout: bool,
    sinks: Vec<sink::Handle>,
    instance: String,
    service: String,
    reopen: AtomicBool,
}

struct Chain {
    file: Option<std::fs::File>,
    sequence: u64,
    prev: String,
}

static TRAIL: OnceLock<Trail> = OnceLock::new();

/// Set by a fail-closed sink whose spool is full; the proxy refuses mutating requests.
static REFUSING_WRITES: AtomicBool = AtomicBool::new(false);

/// The service whose trail this process writes (`gateway`, `storage`): the prefix of the
/// trail's metrics and `service.type` in events. Set by [`register_metrics`].
static SERVICE: OnceLock<String> = OnceLock::new();

/// The service name [`register_metrics`] set (`portcullis` before).
fn service() -> &'static str {
    SERVICE.get().map_or("portcullis", String::as_str)
}

/// The audit trail's metrics (registered with the service's by [`register_metrics`]).
pub struct AuditMetrics {
    pub events: prometheus::IntCounterVec,
    pub spool_bytes: prometheus::IntGaugeVec,
    pub sent: prometheus::IntCounterVec,
    pub dropped: prometheus::IntCounterVec,
}

/// The trail's metrics, created on first use.
pub fn metrics() -> &'static AuditMetrics {
    static M: OnceLock<AuditMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let service = service();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            prometheus::IntCounterVec::new(
                prometheus::Opts::new(format!("{service}_{name}"), help),
                labels,
            )
            .expect("valid metric")
        };
        AuditMetrics {
            events: counter(
                "audit_events_total",
                "Audit events recorded, by action and outcome",
                &["action", "outcome"],
            ),
            spool_bytes: prometheus::IntGaugeVec::new(
                prometheus::Opts::new(
                    format!("{service}_audit_spool_bytes"),
                    "Unsent audit events waiting in a syslog sink's spool, in bytes",
                ),
                &["sink"],
            )
            .expect("valid metric"),
            sent: counter(
                "audit_sent_events_total",
                "Audit events sent to a syslog sink",
                &["sink"],
            ),
            dropped: counter(
                "audit_dropped_events_total",
                "Audit events a syslog sink dropped because its spool was full or unwritable",
                &["sink"],
            ),
        }
    })
}

/// Names the service (`gateway`, `storage`: `<service>_audit_events_total`…) and adds the
/// trail's metrics to `registry`. Call once, before the first event.
pub fn register_metrics(registry: &prometheus::Registry, service: &str) -> prometheus::Result<()> {
    let _ = SERVICE.set(service.to_string());
    let m = metrics();
    registry.register(Box::new(m.events.clone()))?;
    registry.register(Box::new(m.spool_bytes.clone()))?;
    registry.register(Box::new(m.sent.clone()))?;
    registry.register(Box::new(m.dropped.clone()))
}

/// Whether mutating registry requests must be refused (a fail-closed spool is full).
pub fn refusing_writes() -> bool {
    REFUSING_WRITES.load(Ordering::Relaxed)
}

/// The machine's host name (for events and syslog), `-` if unknown.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".into())
}

fn open_append(path: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The sequence and hash the trail in `path` ends with (`0` and [`GENESIS`] if none).
fn chain_end(path: &Path) -> anyhow::Result<(u64, String)> {
    use anyhow::Context;
    let Ok(f) = std::fs::File::open(path) else {
        return Ok((0, GENESIS.to_string()));
    };
    let last = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .last();
    let Some(line) = last else {
        return Ok((0, GENESIS.to_string()));
    };
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("{}: the last line is not an audit event", path.display()))?;
    Ok((
        v["event.sequence"].as_u64().unwrap_or(0),
        v["audit.hash"].as_str().unwrap_or(GENESIS).to_string(),
    ))
}

/// Starts the trail: the file (created 0600 with its directory; an existing trail is
/// continued: its last line gives the sequence and the hash to chain to), stdout, and one
/// delivery thread per syslog sink. `instance` names this process unless the config does;
/// `service` is `gateway` or `storage` (see [`register_metrics`]).
pub fn install(config: &AuditConfig, instance: &str, service: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let _ = SERVICE.set(service.to_string());
    let (mut sequence, mut prev) = (0, GENESIS.to_string());
    let mut file = None;
    if let Some(path) = &config.file {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        (sequence, prev) = chain_end(path)?;
        file = Some(open_append(path)?);
    }
    let spool_dir = match (&config.spool_dir, &config.file) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(f)) => Some(f.with_file_name("spool")),
        (None, None) => None,
    };
    let mut sinks = Vec::new();
    if !config.syslog.is_empty() {
        let Some(spool_dir) = spool_dir else {
            anyhow::bail!("audit.spool_dir is needed for syslog sinks when audit.file is unset");
        };
        let host = hostname();
        for s in &config.syslog {
            sinks.push(sink::start(
                s,
                &spool_dir,
                config.spool_max_bytes,
                config.on_spool_full,
                &host,
            )?);
        }
    }
    let trail = Trail {
        path: config.file.clone(),
        state: Mutex::new(Chain {
            file,
            sequence,
            prev,
        }),
        stdout: config.stdout,
        sinks,
        instance: config
            .instance
            .clone()
            .unwrap_or_else(|| instance.to_string()),
        reopen: AtomicBool::new(false),
        service: service.to_string(),
    };
    TRAIL
        .set(trail)
        .map_err(|_| anyhow::anyhow!("the audit trail is already installed"))
}

/// Asks for the audit file to be reopened before the next event (after `SIGHUP`).
pub fn reopen() {
    if let Some(t) = TRAIL.get() {
        t.reopen.store(true, Ordering::Relaxed);
    }
}

/// Reopens the audit file on every `SIGHUP` (run on a tokio runtime).
pub async fn reopen_on_sighup() {
    crate::signal::on_sighup("the audit file is never reopened", || {
        tracing::info!("SIGHUP: reopening the audit file");
        reopen();
    })
    .await
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn timestamp() -> String {
    let now = std::time::SystemTime::now();
    let secs = crate::time::rfc3339(now);
    let millis = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_millis());
    // 2026-11-27T05:00:00Z → 2026-11-27T05:00:00.123Z
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{millis:03}Z"),
        None => secs,
    }
}

/// `fields` as an event's object (a non-object value goes under `fields`).
pub fn event_fields(fields: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match fields {
        serde_json::Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            m.insert("fields".into(), other);
            m
        }
    }
}

/// Records one audit event: `action` (`login`, `token`, `robot-create`, `manifest-pull`,
/// `gc-delete-blob`…), `outcome` (`success` / `failure`), and more ECS-style fields (an
/// object). Without an installed trail the event goes to the `audit` log target.
pub fn record(action: &str, outcome: &str, fields: serde_json::Value) {
    let mut event = event_fields(fields);
    let ts = timestamp();
    event.insert("@timestamp".into(), ts.clone().into());
    event.insert("event.action".into(), action.into());
    event.insert("event.outcome".into(), outcome.into());
    event.insert("audit.schema".into(), SCHEMA_VERSION.into());
    metrics().events.with_label_values(&[action, outcome]).inc();
    let Some(trail) = TRAIL.get() else {
        tracing::info!(target: "audit", event = %serde_json::Value::Object(event));
        return;
    };
    event.insert("service.node.name".into(), trail.instance.clone().into());
    event.insert("service.type".into(), trail.service.clone().into());
    let Ok(mut chain) = trail.state.lock() else {
        tracing::error!("the audit trail's lock is poisoned; event lost");
        return;
    };
    if trail.reopen.swap(false, Ordering::Relaxed)
        && let Some(path) = &trail.path
    {
        match open_append(path) {
            Ok(f) => chain.file = Some(f),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reopening the audit file failed; still writing the old one")
            }
        }
    }
    chain.sequence += 1;
    event.insert("event.sequence".into(), chain.sequence.into());
    event.insert("audit.prev".into(), chain.prev.clone().into());
    let body = serde_json::Value::Object(event).to_string();
    let hash = sha256_hex(&body);
    // The same object with `audit.hash` last: `…}` → `…,"audit.hash":"…"}`.
    // One allocation: the line with its newline for the file and stdout; sinks frame it
    // without.
    let mut line = format!("{},\"audit.hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
    if let (Some(file), Some(path)) = (chain.file.as_mut(), &trail.path)
        && let Err(e) = file.write_all(line.as_bytes())
    {
        chain.sequence -= 1;
        tracing::error!(file = %path.display(), error = %e, "writing the audit trail failed; event lost");
        return;
    }
    chain.prev = hash;
    if trail.stdout {
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
    line.pop();
    if !trail.sinks.is_empty() {
        let entry = Arc::new(sink::Entry {
            timestamp: ts,
            line,
            action: action.to_string(),
            failure: outcome != "success",
        });
        for s in &trail.sinks {
            s.send(entry.clone());
        }
    }
}

/// `audit verify <file>` of both services: the line to print for an intact trail, or an
/// error naming the first broken line.
pub fn verify_file(file: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    match verify(std::io::BufReader::new(f))? {
        Verdict::Intact {
            events,
            first,
            last,
        } => Ok(format!(
            "{}: intact, {events} events (sequence {first}..{last})",
            file.display()
        )),
        Verdict::Broken { line, why } => anyhow::bail!("{}: line {line}: {why}", file.display()),
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
