//! Webhooks: `[[webhooks]]` endpoints that receive every matching registry event.
//!
//! Delivery: one `POST` per event, in the outbox's order, with the event's id in
//! `Portcullis-Event-Id` (the same on every retry: the receiver's idempotency key) and, with a
//! `secret_file`, `Portcullis-Timestamp` and `Portcullis-Signature: sha256=<hex HMAC-SHA256 of
//! "<timestamp>.<body>">`. A 2xx answer
//! takes the event; anything else (or no answer within `timeout_seconds`) is retried with a
//! doubling back-off up to `max_backoff_seconds`, `max_attempts` times in all; then the event
//! becomes a dead letter (audited, listed and replayed on the admin listener) and the next one
//! goes. Nothing after a failing event is sent before it: order per repository holds.
//!
//! One node of a deployment delivers for each webhook at a time: it holds the webhook's lease
//! for a window of [`WINDOW`] (the first node to count the window's key in the state store),
//! and claims the next window before this one ends, so it goes on without a gap; another node
//! takes over at the next window when it stops. It starts no delivery it could not finish
//! within its window.

use super::Event;
use super::outbox::{DeadLetter, Outbox};
use anyhow::{Context, bail};
use policy::pattern::RepoPattern;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A webhook's lease window.
pub const WINDOW: Duration = Duration::from_secs(30);
/// How often the delivering node looks for new events when it has none.
const POLL: Duration = Duration::from_millis(250);

/// The body's shape.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CloudEvents 1.0, structured mode (`application/cloudevents+json`).
    #[default]
    Cloudevents,
    /// distribution's notification envelope (`{"events": [...]}`).
    Distribution,
}

/// One `[[webhooks]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names it in metrics, audit and the admin listener (letters, digits, `-`, `_`).
    pub name: String,
    pub url: String,
    /// Repository patterns (policy syntax) whose events it gets; none: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// `push`, `tag-move`, `delete`, `tag-delete`; none: every action.
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub format: Format,
    /// A file holding the HMAC key for `Portcullis-Signature`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an `https` URL, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff")]
    pub max_backoff_seconds: u64,
}

fn default_timeout() -> u64 {
    5
}
fn default_attempts() -> u32 {
    12
}
fn default_backoff() -> u64 {
    30
}

const ACTIONS: [&str; 4] = ["push", "tag-move", "delete", "tag-delete"];

impl WebhookConfig {
    /// Checks one table (and that names are unique across `all`).
    pub fn validate_all(all: &[WebhookConfig]) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for w in all {
            let n = &w.name;
            if n.is_empty()
                || n.len() > 64
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!("webhooks: name {n:?}: letters, digits, - and _ only (1–64)");
            }
            if !names.insert(n.clone()) {
                bail!("webhooks: name {n:?} is used twice");
            }
            let url = reqwest::Url::parse(&w.url)
                .map_err(|e| anyhow::anyhow!("webhooks {n}: url: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") {
                bail!("webhooks {n}: url must be http or https");
            }
            for r in &w.repositories {
                RepoPattern::compile(r)
                    .map_err(|e| anyhow::anyhow!("webhooks {n}: repositories {r:?}: {e}"))?;
            }
            if let Some(a) = w.actions.iter().find(|a| !ACTIONS.contains(&a.as_str())) {
                bail!("webhooks {n}: unknown action {a:?} (push, tag-move, delete, tag-delete)");
            }
            if w.timeout_seconds == 0 || w.timeout_seconds >= WINDOW.as_secs() / 3 {
                bail!(
                    "webhooks {n}: timeout_seconds must be between 1 and {}",
                    WINDOW.as_secs() / 3 - 1
                );
            }
            if w.max_attempts == 0 || w.max_backoff_seconds == 0 {
                bail!("webhooks {n}: max_attempts and max_backoff_seconds must be positive");
            }
        }
        Ok(())
    }
}

/// A webhook ready to deliver.
pub struct Webhook {
    pub cfg: WebhookConfig,
    patterns: Vec<RepoPattern>,
    secret: Option<zeroize::Zeroizing<Vec<u8>>>,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(cfg: WebhookConfig) -> anyhow::Result<Self> {
        let n = cfg.name.clone();
        let patterns = cfg
            .repositories
            .iter()
            .map(|r| RepoPattern::compile(r).map_err(|e| anyhow::anyhow!("{r:?}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let secret = match &cfg.secret_file {
            Some(f) => {
                let key = zeroize::Zeroizing::new(
                    service::secrets::read_secret_file(f)
                        .with_context(|| format!("webhooks {n}: secret_file"))?
                        .into_bytes(),
                );
                if key.is_empty() {
                    bail!("webhooks {n}: {} is empty", f.display());
                }
                Some(key)
            }
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_seconds))
            .connect_timeout(Duration::from_secs(cfg.timeout_seconds))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("webhooks {n}: reading {}", ca.display()))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("webhooks {n}: {}", ca.display()))?
            {
                http = http.add_root_certificate(c);
            }
        }
        Ok(Webhook {
            patterns,
            secret,
            http: http.build()?,
            cfg,
        })
    }

    /// Whether `event` is for this webhook.
    pub fn wants(&self, event: &Event) -> bool {
        (self.patterns.is_empty()
            || self
                .patterns
                .iter()
                .any(|p| p.matches(&event.repository, None)))
            && (self.cfg.actions.is_empty()
                || self.cfg.actions.iter().any(|a| a == event.kind.action()))
    }

    /// The request body and its content type.
    fn body(&self, event: &Event) -> (Vec<u8>, &'static str) {
        match self.cfg.format {
            Format::Cloudevents => (
                event.cloudevent().to_string().into_bytes(),
                "application/cloudevents+json",
            ),
            Format::Distribution => (
                serde_json::json!({"events": [event.distribution()]})
                    .to_string()
                    .into_bytes(),
                "application/vnd.docker.distribution.events.v1+json",
            ),
        }
    }

    /// One delivery attempt; why it failed (no URL in it: one may carry credentials).
    pub async fn post(&self, event: &Event, attempt: u32) -> Result<(), String> {
        let (body, content_type) = self.body(event);
        let mut req = self
            .http
            .post(&self.cfg.url)
            .header("content-type", content_type)
            .header("portcullis-event-id", &event.id)
            .header("portcullis-delivery-attempt", attempt.to_string());
        if let Some(key) = &self.secret {
            // The time is signed with the body: a receiver refuses an old delivery replayed.
            let at = unix_secs().to_string();
            let signed = [at.as_bytes(), b".", &body].concat();
            req = req.header("portcullis-timestamp", &at).header(
                "portcullis-signature",
                format!("sha256={}", hmac(key, &signed)?),
            );
        }
        match req.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the endpoint answered {}", r.status())),
            Err(e) => Err(format!("{}", e.without_url())),
        }
    }

    /// The pause before attempt `attempt + 1`: 1 s, doubling, at most `max_backoff_seconds`.
    fn backoff(&self, attempt: u32) -> Duration {
        let s = 1u64 << attempt.saturating_sub(1).min(16);
        Duration::from_secs(s.min(self.cfg.max_backoff_seconds))
    }
}

fn hmac(key: &[u8], body: &[u8]) -> Result<String, String> {
    let key = openssl::pkey::PKey::hmac(key).map_err(|e| e.to_string())?;
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)
        .map_err(|e| e.to_string())?;
    signer.update(body).map_err(|e| e.to_string())?;
    Ok(hex::encode(
        signer.sign_to_vec().map_err(|e| e.to_string())?,
    ))
}

/// The outbox and the webhooks that drain it.
pub struct Events {
    pub outbox: Outbox,
    pub hooks: Vec<Arc<Webhook>>,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a replay did not deliver.
#[derive(Debug)]
pub enum Replay {
    /// No such webhook or dead letter.
    NotFound(&'static str),
    /// The endpoint did not take it (or the store failed): why.
    Failed(String),
}

/// Where a delivery of one event stands (kept across lease windows of this node).
#[derive(Default)]
struct Pending {
    seq: u64,
    attempts: u32,
    last_error: String,
    /// The delivery of `seq` is settled (taken, or a dead letter kept); only writing the
    /// cursor is left: a store that does not write makes no new attempt.
    settled: bool,
}

/// Events asked of the outbox at a time.
const BATCH: u64 = 100;
/// How often, at most, the delivering node deletes what every webhook has passed.
const FORGET_EVERY: Duration = Duration::from_secs(10);

impl Events {
    pub fn new(
        store: Arc<dyn crate::state::StateStore>,
        configs: &[WebhookConfig],
    ) -> anyhow::Result<Self> {
        WebhookConfig::validate_all(configs)?;
        Ok(Events {
            outbox: Outbox::new(store),
            hooks: configs
                .iter()
                .map(|c| Webhook::new(c.clone()).map(Arc::new))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Records `event` for delivery.
    pub async fn record(&self, event: &Event) -> Result<(), crate::state::StateError> {
        let r = self.outbox.record(event).await.map(|_| ());
        crate::metrics::events()
            .recorded
            .with_label_values(&[if r.is_ok() { "ok" } else { "error" }])
            .inc();
        r
    }

    /// Delivers for webhook `i` for ever (on the side runtime): leads when it holds the lease.
    pub async fn run(self: Arc<Self>, i: usize) {
        let hook = self.hooks[i].clone();
        let name = hook.cfg.name.clone();
        let mut pending = Pending::default();
        let mut holding: Option<u64> = None;
        let mut forgot = Instant::now();
        // Its cursor exists from the start (the others' deleting waits for it).
        if let Err(e) = self.outbox.cursor(&name).await {
            tracing::debug!(webhook = %name, error = %e, "webhook: no cursor yet");
        }
        loop {
            let now = unix_secs();
            let window = now / WINDOW.as_secs();
            let leads = match holding {
                Some(w) if w == window => true,
                _ => match self.outbox.lease(&name, window, WINDOW * 2).await {
                    Ok(won) => won,
                    Err(e) => {
                        tracing::warn!(webhook = %name, error = %e, "webhook lease: the state store is unavailable");
                        false
                    }
                },
            };
            if !leads {
                holding = None;
                // Wait for the next window (a little after its start: the holder, if alive,
                // claims it first).
                let next = (window + 1) * WINDOW.as_secs();
                let wait = next.saturating_sub(unix_secs()) * 1000 + 500;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            // Deliver until this window's end, less what one attempt may take.
            let end = (window + 1) * WINDOW.as_secs();
            let margin = hook.cfg.timeout_seconds + 2;
            let stop = Instant::now()
                + Duration::from_secs(end.saturating_sub(unix_secs()).saturating_sub(margin));
            self.deliver_until(&hook, &mut pending, stop, &mut forgot)
                .await;
            // Claim the next window now, so the delivery goes on without a gap.
            holding = match self.outbox.lease(&name, window + 1, WINDOW * 2).await {
                Ok(true) => Some(window + 1),
                _ => None,
            };
            let left = end.saturating_sub(unix_secs());
            tokio::time::sleep(Duration::from_secs(left)).await;
        }
    }

    /// Delivers what the outbox holds for `hook`, in order, until `stop`.
    async fn deliver_until(
        &self,
        hook: &Webhook,
        pending: &mut Pending,
        stop: Instant,
        forgot: &mut Instant,
    ) {
        let name = &hook.cfg.name;
        let m = crate::metrics::events();
        let unavailable = |e: crate::state::StateError| {
            tracing::warn!(webhook = %name, error = %e, "webhook: the state store is unavailable");
        };
        while Instant::now() < stop {
            if forgot.elapsed() >= FORGET_EVERY {
                *forgot = Instant::now();
                self.forget().await;
            }
            let (cursor, head) = match (self.outbox.cursor(name).await, self.outbox.head().await) {
                (Ok(c), Ok(h)) => (c, h),
                (Err(e), _) | (_, Err(e)) => {
                    unavailable(e);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            m.pending
                .with_label_values(&[name])
                .set(head.saturating_sub(cursor) as i64);
            let entries = match self.outbox.after(cursor, BATCH).await {
                Ok(e) => e,
                Err(e) => {
                    unavailable(e);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if entries.is_empty() {
                if head > cursor {
                    self.skip_forgotten(name, cursor).await;
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            for (seq, event) in entries {
                if Instant::now() >= stop {
                    return;
                }
                let taken = match &event {
                    Some(e) if hook.wants(e) => {
                        match self.attempt(hook, pending, seq, e, stop).await {
                            Some(taken) => taken,
                            // The window ends before the next attempt may start.
                            None => return,
                        }
                    }
                    Some(_) => true,
                    None => {
                        tracing::warn!(webhook = %name, seq, "webhook: an outbox entry is not an event; passed over");
                        true
                    }
                };
                let advanced = match taken {
                    true => self.outbox.advance(name, seq).await,
                    false => Err(crate::state::StateError(
                        "a dead letter was not kept".into(),
                    )),
                };
                match advanced {
                    Ok(()) => {
                        if pending.seq == seq {
                            *pending = Pending::default();
                        }
                    }
                    Err(e) => {
                        unavailable(e);
                        // Not a tight loop on a store that reads but does not write.
                        tokio::time::sleep(POLL).await;
                        break;
                    }
                }
            }
        }
    }

    /// Delivers `event` (number `seq`) until it is taken or dead: `Some(true)` when the cursor
    /// may pass it, `Some(false)` when it may not (its dead letter was not kept), `None` when
    /// `stop` comes first.
    async fn attempt(
        &self,
        hook: &Webhook,
        pending: &mut Pending,
        seq: u64,
        event: &Event,
        stop: Instant,
    ) -> Option<bool> {
        let name = &hook.cfg.name;
        let m = crate::metrics::events();
        if pending.seq != seq {
            *pending = Pending {
                seq,
                ..Default::default()
            };
        }
        if pending.settled {
            return Some(true);
        }
        loop {
            if Instant::now() >= stop {
                return None;
            }
            pending.attempts += 1;
            match hook.post(event, pending.attempts).await {
                Ok(()) => {
                    m.deliveries.with_label_values(&[name, "delivered"]).inc();
                    pending.settled = true;
                    return Some(true);
                }
                Err(why) => {
                    m.deliveries.with_label_values(&[name, "failed"]).inc();
                    tracing::info!(webhook = %name, event = %event.id, attempt = pending.attempts, error = %why, "webhook delivery failed");
                    pending.last_error = why;
                }
            }
            if pending.attempts >= hook.cfg.max_attempts {
                let letter = DeadLetter {
                    webhook: name.clone(),
                    seq,
                    event: event.clone(),
                    attempts: pending.attempts,
                    error: pending.last_error.clone(),
                };
                if let Err(e) = self.outbox.bury(&letter).await {
                    // The next round writes the letter again, with no new attempt.
                    pending.attempts -= 1;
                    tracing::warn!(webhook = %name, error = %e, "webhook: a dead letter cannot be written; retrying");
                    return Some(false);
                }
                m.deliveries.with_label_values(&[name, "dead"]).inc();
                crate::audit::record(
                    "webhook-dead-letter",
                    "failure",
                    serde_json::json!({
                        "webhook": name,
                        "event.id": event.id,
                        "repository": event.repository,
                        "event.reason": letter.error,
                        "attempts": letter.attempts,
                    }),
                );
                pending.settled = true;
                return Some(true);
            }
            let pause = hook.backoff(pending.attempts);
            if Instant::now() + pause >= stop {
                return None;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Deletes the log's entries every webhook has passed: every cursor in the store (a
    /// webhook configured on another node only, during a rolling change, counts too).
    async fn forget(&self) {
        let oldest = match self.outbox.oldest_cursor().await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "webhook: delivered events not deleted yet");
                return;
            }
        };
        if let Err(e) = self.outbox.forget_through(oldest).await {
            tracing::debug!(error = %e, "webhook: delivered events not deleted yet");
        }
    }

    /// The log has events after `cursor` but not the next one: they were deleted before this
    /// webhook took them (a cursor left behind, e.g. a webhook removed and configured again).
    /// It goes on after them, and says how many it never got.
    async fn skip_forgotten(&self, name: &str, cursor: u64) {
        let Ok(forgotten) = self.outbox.forgotten().await else {
            return;
        };
        if forgotten <= cursor {
            return;
        }
        tracing::error!(webhook = %name, lost = forgotten - cursor, "webhook: events were deleted before it took them; going on after them");
        crate::metrics::events()
            .deliveries
            .with_label_values(&[name, "lost"])
            .inc_by(forgotten - cursor);
        if let Err(e) = self.outbox.advance(name, forgotten).await {
            tracing::warn!(webhook = %name, error = %e, "webhook: the cursor cannot be written");
        }
    }

    /// Delivers a dead letter again, once, now: when the endpoint takes it, the letter goes;
    /// when not, it stays with the new error (it is deleted only after a delivery, so a crash
    /// in between keeps it).
    pub async fn replay(&self, webhook: &str, seq: u64) -> Result<(), Replay> {
        let hook = self
            .hooks
            .iter()
            .find(|h| h.cfg.name == webhook)
            .ok_or(Replay::NotFound("no such webhook"))?;
        let Some(mut letter) = self
            .outbox
            .dead_letter(webhook, seq)
            .await
            .map_err(|e| Replay::Failed(e.to_string()))?
        else {
            return Err(Replay::NotFound("no such dead letter"));
        };
        letter.attempts += 1;
        let r = hook.post(&letter.event, letter.attempts).await;
        crate::audit::record(
            "webhook-replay",
            if r.is_ok() { "success" } else { "failure" },
            serde_json::json!({
                "webhook": webhook,
                "event.id": letter.event.id,
                "repository": letter.event.repository,
                "event.reason": r.as_ref().err(),
            }),
        );
        match r {
            Ok(()) => {
                // Delivered: a letter that stays (the store failing now) is replayed once more
                // at worst, with the same id.
                if let Err(e) = self.outbox.unbury(webhook, seq).await {
                    tracing::warn!(webhook = %webhook, error = %e, "webhook: a replayed dead letter was not deleted");
                }
                Ok(())
            }
            Err(why) => {
                letter.error = why.clone();
                if let Err(e) = self.outbox.bury(&letter).await {
                    tracing::warn!(webhook = %webhook, error = %e, "webhook: a dead letter's new error was not kept");
                }
                Err(Replay::Failed(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> anyhow::Result<()> {
        let c: Vec<WebhookConfig> =
            toml::from_str::<std::collections::HashMap<String, Vec<WebhookConfig>>>(&format!(
                "[[webhooks]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/x\"\n{extra}"
            ))?
            .remove("webhooks")
            .unwrap_or_default();
        WebhookConfig::validate_all(&c)
    }

    #[test]
    fn tables_are_checked() {
        assert!(table("").is_ok());
        assert!(table("actions = [\"push\", \"tag-delete\"]").is_ok());
        assert!(table("actions = [\"pull\"]").is_err());
        assert!(table("repositories = [\"team-a/**\"]").is_ok());
        assert!(table("timeout_seconds = 0").is_err());
        assert!(
            table("timeout_seconds = 60").is_err(),
            "longer than a lease allows"
        );
        assert!(table("max_attempts = 0").is_err());
        assert!(table("format = \"distribution\"").is_ok());
        assert!(
            table("[[webhooks]]\nname = \"a\"\nurl = \"http://x/\"").is_err(),
            "twice"
        );
        assert!(table("[[webhooks]]\nname = \"b c\"\nurl = \"http://x/\"").is_err());
        assert!(table("[[webhooks]]\nname = \"b\"\nurl = \"ftp://x/\"").is_err());
    }

    #[test]
    fn back_off_doubles_to_its_bound_and_signatures_are_hmac_sha256() {
        let cfg: WebhookConfig =
            toml::from_str("name = \"a\"\nurl = \"http://127.0.0.1:9/\"\nmax_backoff_seconds = 8")
                .unwrap();
        let w = Webhook::new(cfg).unwrap();
        let b: Vec<u64> = (1..=6).map(|a| w.backoff(a).as_secs()).collect();
        assert_eq!(b, [1, 2, 4, 8, 8, 8]);
        // RFC 4231 test case 2.
        assert_eq!(
            hmac(b"Jefe", b"what do ya want for nothing?").unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
