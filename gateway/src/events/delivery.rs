//! Taking the outbox's events to their consumers — each `[[webhooks]]` endpoint and each
//! `[[replication]]` rule — in order, at least once, one node of a deployment at a time.
//!
//! A consumer's node holds its lease for a window of [`WINDOW`] (the first node to count the
//! window's key in the state store wins it) and, while it works, claims each next window a
//! little before the current one ends, so it goes on without a gap however long one delivery
//! takes (a big blob replicated); when a claim fails or has no answer within 3 s it stops at
//! once, before its window ends and so before another node can start at the next one (with
//! clocks within 2 s of each other). A failing event is retried with a doubling back-off,
//! `max_attempts` times, then becomes a dead letter (audited, listed and replayed on the admin
//! listener) and the next one goes: nothing after an event is delivered before it.

use super::Event;
use super::outbox::{DeadLetter, Outbox};
use super::replication::{ReplicationConfig, Replicator};
use super::webhooks::{Webhook, WebhookConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A consumer's lease window.
pub const WINDOW: Duration = Duration::from_secs(30);
/// How long before its window ends the leading node claims the next one.
const CLAIM_AHEAD: Duration = Duration::from_secs(5);
/// How long a claim may take: a node whose claim has no answer by then stops, 2 s before its
/// window ends.
const CLAIM_WITHIN: Duration = Duration::from_secs(3);
/// How often the delivering node looks for new events when it has none.
const POLL: Duration = Duration::from_millis(250);
/// Events asked of the outbox at a time.
const BATCH: u64 = 100;
/// How often, at most, the delivering node deletes what every consumer has passed.
const FORGET_EVERY: Duration = Duration::from_secs(10);

/// What takes the outbox's events.
#[derive(Clone)]
pub enum Consumer {
    Webhook(Arc<Webhook>),
    Replication(Arc<Replicator>),
}

impl Consumer {
    /// Its name in the outbox (cursor, lease, dead letters), in the delivery metrics' and
    /// audit events' `webhook` field: a webhook's name, `replication.<rule>` for a rule (a
    /// webhook's name has no dot: [`super::consumer::check_name`]).
    pub fn key(&self) -> String {
        match self {
            Consumer::Webhook(w) => w.cfg.name.clone(),
            Consumer::Replication(r) => r.key(),
        }
    }

    fn wants(&self, e: &Event) -> bool {
        match self {
            Consumer::Webhook(w) => w.wants(e),
            Consumer::Replication(r) => r.wants(e),
        }
    }

    async fn deliver(&self, e: &Event, attempt: u32) -> Result<(), String> {
        match self {
            Consumer::Webhook(w) => w.post(e, attempt).await,
            Consumer::Replication(r) => r.deliver(e).await,
        }
    }

    fn max_attempts(&self) -> u32 {
        match self {
            Consumer::Webhook(w) => w.cfg.max_attempts,
            Consumer::Replication(r) => r.cfg.max_attempts,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        match self {
            Consumer::Webhook(w) => super::consumer::backoff(attempt, w.cfg.max_backoff_seconds),
            Consumer::Replication(r) => {
                super::consumer::backoff(attempt, r.cfg.max_backoff_seconds)
            }
        }
    }

    /// The work of a moment with no event waiting.
    async fn idle(&self) {
        if let Consumer::Replication(r) = self {
            r.idle().await;
        }
    }
}

/// The outbox and its consumers.
pub struct Events {
    pub outbox: Outbox,
    pub hooks: Vec<Arc<Webhook>>,
    pub rules: Vec<Arc<Replicator>>,
}

/// Why a replay did not deliver.
#[derive(Debug)]
pub enum Replay {
    /// No such consumer or dead letter.
    NotFound(&'static str),
    /// The consumer did not take it (or the store failed): why.
    Failed(String),
}

/// Where a delivery of one event stands (kept across leases of this node).
#[derive(Default)]
struct Pending {
    seq: u64,
    attempts: u32,
    last_error: String,
    /// The delivery of `seq` is settled (taken, or a dead letter kept); only writing the
    /// cursor is left: a store that does not write makes no new attempt.
    settled: bool,
}

fn unix_secs() -> u64 {
    crate::clock::unix_now().max(0) as u64
}

/// Sleeps until the Unix time `at` (seconds) plus `extra`.
async fn sleep_until_unix(at: u64, extra: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let wait = Duration::from_secs(at).saturating_sub(now) + extra;
    tokio::time::sleep(wait).await;
}

impl Events {
    pub fn new(
        store: Arc<dyn crate::state::StateStore>,
        hooks: &[WebhookConfig],
        rules: &[ReplicationConfig],
        source: Arc<crate::registry::data::Data>,
        policy: Arc<crate::live_policy::LivePolicy>,
    ) -> anyhow::Result<Self> {
        WebhookConfig::validate_all(hooks)?;
        ReplicationConfig::validate_all(rules)?;
        Ok(Events {
            outbox: Outbox::new(store.clone()),
            hooks: hooks
                .iter()
                .map(|c| Webhook::new(c.clone()).map(Arc::new))
                .collect::<anyhow::Result<_>>()?,
            rules: rules
                .iter()
                .map(|c| {
                    Replicator::new(c.clone(), source.clone(), policy.clone(), store.clone())
                        .map(Arc::new)
                })
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// Every consumer: the webhooks, then the replication rules.
    pub fn consumers(&self) -> Vec<Consumer> {
        self.hooks
            .iter()
            .cloned()
            .map(Consumer::Webhook)
            .chain(self.rules.iter().cloned().map(Consumer::Replication))
            .collect()
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

    /// Delivers for `consumer` for ever (on the side runtime), while this node holds its
    /// lease.
    pub async fn run(self: Arc<Self>, consumer: Consumer) {
        let key = consumer.key();
        let mut pending = Pending::default();
        // Its cursor exists from the start (the others' deleting waits for it).
        if let Err(e) = self.outbox.cursor(&key).await {
            tracing::debug!(consumer = %key, error = %e, "events: no cursor yet");
        }
        loop {
            let window = unix_secs() / WINDOW.as_secs();
            match self.outbox.lease(&key, window, WINDOW * 2).await {
                Ok(true) => {
                    tokio::select! {
                        () = self.lead(&consumer, &mut pending) => {}
                        () = self.keep_lease(&key, window) => {
                            tracing::info!(consumer = %key, "events: the lease was not renewed; another node goes on");
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(consumer = %key, error = %e, "events lease: the state store is unavailable");
                }
            }
            // The next window, a little after its start: its holder, if alive, claimed it
            // before.
            sleep_until_unix(
                (unix_secs() / WINDOW.as_secs() + 1) * WINDOW.as_secs(),
                Duration::from_millis(500),
            )
            .await;
        }
    }

    /// Claims each next window shortly before the current one (`held`) ends; returns when a
    /// claim fails or does not answer within [`CLAIM_WITHIN`] (the delivery is then stopped
    /// before the window ends, and another node starts only after it).
    async fn keep_lease(&self, key: &str, mut held: u64) {
        loop {
            let end = (held + 1) * WINDOW.as_secs();
            sleep_until_unix(end - CLAIM_AHEAD.as_secs(), Duration::ZERO).await;
            let claim = self.outbox.lease(key, held + 1, WINDOW * 2);
            match tokio::time::timeout(CLAIM_WITHIN, claim).await {
                Ok(Ok(true)) => held += 1,
                _ => return,
            }
        }
    }

    /// Delivers what the outbox holds for `consumer`, in order, for ever.
    async fn lead(&self, consumer: &Consumer, pending: &mut Pending) {
        let key = consumer.key();
        let m = crate::metrics::events();
        let unavailable = |e: crate::state::StateError| {
            tracing::warn!(consumer = %key, error = %e, "events: the state store is unavailable");
        };
        let mut forgot = Instant::now();
        loop {
            if forgot.elapsed() >= FORGET_EVERY {
                forgot = Instant::now();
                self.forget().await;
            }
            let (cursor, head) = match (self.outbox.cursor(&key).await, self.outbox.head().await) {
                (Ok(c), Ok(h)) => (c, h),
                (Err(e), _) | (_, Err(e)) => {
                    unavailable(e);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            m.pending
                .with_label_values(&[&key])
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
                    self.skip_forgotten(&key, cursor).await;
                }
                consumer.idle().await;
                tokio::time::sleep(POLL).await;
                continue;
            }
            for (seq, event) in entries {
                let taken = match &event {
                    Some(e) if consumer.wants(e) => {
                        self.attempt(consumer, &key, pending, seq, e).await
                    }
                    Some(_) => true,
                    None => {
                        tracing::warn!(consumer = %key, seq, "events: an outbox entry is not an event; passed over");
                        true
                    }
                };
                let advanced = match taken {
                    true => self.outbox.advance(&key, seq).await,
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

    /// Delivers `event` (number `seq`) until it is taken or dead: `true` when the cursor may
    /// pass it, `false` when it may not (its dead letter was not kept).
    async fn attempt(
        &self,
        consumer: &Consumer,
        key: &str,
        pending: &mut Pending,
        seq: u64,
        event: &Event,
    ) -> bool {
        let m = crate::metrics::events();
        if pending.seq != seq {
            *pending = Pending {
                seq,
                ..Default::default()
            };
        }
        if pending.settled {
            return true;
        }
        loop {
            pending.attempts += 1;
            match consumer.deliver(event, pending.attempts).await {
                Ok(()) => {
                    m.deliveries.with_label_values(&[key, "delivered"]).inc();
                    pending.settled = true;
                    return true;
                }
                Err(why) => {
                    m.deliveries.with_label_values(&[key, "failed"]).inc();
                    tracing::info!(consumer = %key, event = %event.id, attempt = pending.attempts, error = %why, "event delivery failed");
                    pending.last_error = why;
                }
            }
            if pending.attempts >= consumer.max_attempts() {
                let letter = DeadLetter {
                    webhook: key.to_owned(),
                    seq,
                    event: event.clone(),
                    attempts: pending.attempts,
                    error: pending.last_error.clone(),
                };
                if let Err(e) = self.outbox.bury(&letter).await {
                    // The next round writes the letter again, with no new attempt.
                    pending.attempts -= 1;
                    tracing::warn!(consumer = %key, error = %e, "events: a dead letter cannot be written; retrying");
                    return false;
                }
                m.deliveries.with_label_values(&[key, "dead"]).inc();
                crate::audit::record(
                    "webhook-dead-letter",
                    "failure",
                    serde_json::json!({
                        "webhook": key,
                        "event.id": event.id,
                        "repository": event.repository,
                        "event.reason": letter.error,
                        "attempts": letter.attempts,
                    }),
                );
                pending.settled = true;
                return true;
            }
            tokio::time::sleep(consumer.backoff(pending.attempts)).await;
        }
    }

    /// Deletes the log's entries every consumer has passed: every cursor in the store (one
    /// configured on another node only, during a rolling change, counts too).
    async fn forget(&self) {
        let oldest = match self.outbox.oldest_cursor().await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "events: delivered events not deleted yet");
                return;
            }
        };
        if let Err(e) = self.outbox.forget_through(oldest).await {
            tracing::debug!(error = %e, "events: delivered events not deleted yet");
        }
    }

    /// The log has events after `cursor` but not the next one: they were deleted before this
    /// consumer took them (a cursor left behind, e.g. a webhook removed and configured
    /// again). It goes on after them, and says how many it never got.
    async fn skip_forgotten(&self, key: &str, cursor: u64) {
        let Ok(forgotten) = self.outbox.forgotten().await else {
            return;
        };
        if forgotten <= cursor {
            return;
        }
        tracing::error!(consumer = %key, lost = forgotten - cursor, "events: events were deleted before it took them; going on after them");
        crate::metrics::events()
            .deliveries
            .with_label_values(&[key, "lost"])
            .inc_by(forgotten - cursor);
        if let Err(e) = self.outbox.advance(key, forgotten).await {
            tracing::warn!(consumer = %key, error = %e, "events: the cursor cannot be written");
        }
    }

    /// Delivers a dead letter of the consumer named `key` again, once, now: when it is
    /// taken, the letter goes; when not, it stays with the new error (it is deleted only
    /// after a delivery, so a crash in between keeps it).
    pub async fn replay(&self, key: &str, seq: u64) -> Result<(), Replay> {
        let consumer = self
            .consumers()
            .into_iter()
            .find(|c| c.key() == key)
            .ok_or(Replay::NotFound("no such webhook or replication rule"))?;
        let Some(mut letter) = self
            .outbox
            .dead_letter(key, seq)
            .await
            .map_err(|e| Replay::Failed(e.to_string()))?
        else {
            return Err(Replay::NotFound("no such dead letter"));
        };
        letter.attempts += 1;
        let r = consumer.deliver(&letter.event, letter.attempts).await;
        crate::audit::record(
            "webhook-replay",
            if r.is_ok() { "success" } else { "failure" },
            serde_json::json!({
                "webhook": key,
                "event.id": letter.event.id,
                "repository": letter.event.repository,
                "event.reason": r.as_ref().err(),
            }),
        );
        match r {
            Ok(()) => {
                // Delivered: a letter that stays (the store failing now) is replayed once more
                // at worst, with the same id.
                if let Err(e) = self.outbox.unbury(key, seq).await {
                    tracing::warn!(consumer = %key, error = %e, "events: a replayed dead letter was not deleted");
                }
                Ok(())
            }
            Err(why) => {
                letter.error = why.clone();
                if let Err(e) = self.outbox.bury(&letter).await {
                    tracing::warn!(consumer = %key, error = %e, "events: a dead letter's new error was not kept");
                }
                Err(Replay::Failed(why))
            }
        }
    }
}
