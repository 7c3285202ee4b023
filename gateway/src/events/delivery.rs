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
//!
//! The consumers are put in force whole ([`Events::prepare`], [`Events::put`]): a reload
//! (`SIGHUP`) builds the new set, keeping each consumer whose table and files did not change;
//! a delivery loop takes its consumer anew for each attempt (a fixed URL or a rotated secret
//! is used from the next one), a consumer added gets a loop of its own, and the loop of one
//! removed ends (its cursor stays in the store, for a node that still has it).

use super::Event;
use super::outbox::{DeadLetter, Outbox};
use super::replication::{ReplicationConfig, Replicator};
use super::webhooks::{Webhook, WebhookConfig};
use crate::in_force::{InForce, built_from, kept_or_built, lock};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
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

    /// Whether `other` is this very consumer (not one built again).
    fn same(&self, other: &Consumer) -> bool {
        match (self, other) {
            (Consumer::Webhook(a), Consumer::Webhook(b)) => Arc::ptr_eq(a, b),
            (Consumer::Replication(a), Consumer::Replication(b)) => Arc::ptr_eq(a, b),
            _ => false,
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
    consumers: InForce<Consumers>,
    /// Counts [`Events::put`]s (what [`Events::superseded`] waits on).
    generation: tokio::sync::watch::Sender<u64>,
    /// Keys of the consumers with a delivery loop on this node.
    running: Mutex<HashSet<String>>,
    /// What a replication rule is built with.
    store: Arc<dyn crate::state::StateStore>,
    source: Arc<crate::registry::data::Data>,
    policy: Arc<crate::live_policy::LivePolicy>,
}

/// The consumers in force.
#[derive(Default)]
pub struct Consumers {
    pub hooks: Vec<Arc<Webhook>>,
    pub rules: Vec<Arc<Replicator>>,
    /// What each was built from, by its key ([`built_from`]).
    built_from: HashMap<String, [u8; 32]>,
}

impl Consumers {
    /// Every consumer: the webhooks, then the replication rules.
    pub fn all(&self) -> Vec<Consumer> {
        self.hooks
            .iter()
            .cloned()
            .map(Consumer::Webhook)
            .chain(self.rules.iter().cloned().map(Consumer::Replication))
            .collect()
    }

    fn find(&self, key: &str) -> Option<Consumer> {
        self.all().into_iter().find(|c| c.key() == key)
    }
}

/// Why a replay did not deliver.
#[derive(Debug)]
pub enum Replay {
    /// No such consumer or dead letter.
    NotFound(&'static str),
    /// The consumer did not take it (or the store failed): why.
    Failed(String),
}

/// Marks a delivery loop that panics as ended, so that [`Events::start`] may start its
/// consumer again (a loop that ends normally is marked by [`Events::still_wanted`]).
struct Unwinding {
    events: Arc<Events>,
    key: String,
}

impl Drop for Unwinding {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.events.running).remove(&self.key);
            tracing::error!(consumer = %self.key, "events: the delivery loop failed; a reload starts it again");
        }
    }
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
        let events = Events {
            outbox: Outbox::new(store.clone()),
            consumers: InForce::new(Consumers::default()),
            generation: tokio::sync::watch::Sender::new(0),
            running: Mutex::new(HashSet::new()),
            store,
            source,
            policy,
        };
        let consumers = events.prepare(hooks, rules)?;
        events.consumers.put(consumers);
        Ok(events)
    }

    /// The consumers in force now.
    pub fn consumers(&self) -> Arc<Consumers> {
        self.consumers.get()
    }

    /// The consumers `hooks` and `rules` describe, built whole (nothing in force changes):
    /// one whose table and files are as they were is the same one.
    pub fn prepare(
        &self,
        hooks: &[WebhookConfig],
        rules: &[ReplicationConfig],
    ) -> anyhow::Result<Consumers> {
        WebhookConfig::validate_all(hooks)?;
        ReplicationConfig::validate_all(rules)?;
        let now = self.consumers.get();
        let mut next = Consumers::default();
        for c in hooks {
            let from = built_from(c, &[c.secret_file.as_deref(), c.ca_file.as_deref()])?;
            let old = now.hooks.iter().find(|h| h.cfg.name == c.name);
            let was = old.and_then(|h| Some((now.built_from.get(&c.name)?, h)));
            let hook = kept_or_built(was, &from, || Webhook::new(c.clone()))?;
            next.built_from.insert(c.name.clone(), from);
            next.hooks.push(hook);
        }
        for c in rules {
            let from = built_from(c, &[c.password_file.as_deref(), c.ca_file.as_deref()])?;
            let old = now.rules.iter().find(|r| r.cfg.name == c.name);
            let was = old.and_then(|r| Some((now.built_from.get(&r.key())?, r)));
            let rule = kept_or_built(was, &from, || {
                let rule = Replicator::new(
                    c.clone(),
                    self.source.clone(),
                    self.policy.clone(),
                    self.store.clone(),
                )?;
                // A changed rule keeps its schedule: no reconciliation at once.
                if let Some(o) = old {
                    rule.keep_schedule_of(o);
                }
                Ok(rule)
            })?;
            next.built_from.insert(rule.key(), from);
            next.rules.push(rule);
        }
        Ok(next)
    }

    /// What kinds of consumer (`webhooks`, `replication`) differ in `next` from those in force.
    pub fn changed(&self, next: &Consumers) -> Vec<&'static str> {
        let now = self.consumers.get();
        let of = |c: &Consumers, rules: bool| -> Vec<([u8; 32], String)> {
            let mut v: Vec<_> = c
                .built_from
                .iter()
                .filter(|(k, _)| k.starts_with("replication.") == rules)
                .map(|(k, f)| (*f, k.clone()))
                .collect();
            v.sort();
            v
        };
        let mut kinds = Vec::new();
        if of(&now, false) != of(next, false) {
            kinds.push("webhooks");
        }
        if of(&now, true) != of(next, true) {
            kinds.push("replication");
        }
        kinds
    }

    /// Puts `next` in force, and starts the delivery of each consumer that has no loop on
    /// this node (on the Tokio runtime this is called on). A consumer removed or changed stops
    /// what it was doing (a delivery, a back-off, a reconciliation): [`Events::superseded`].
    pub fn put(self: &Arc<Self>, next: Consumers) {
        for key in self.consumers.get().built_from.keys() {
            if !next.built_from.contains_key(key) {
                tracing::warn!(consumer = %key, "events: removed; its cursor (events:cursor:{key}) stays in the state store and holds back deleting delivered events until it is deleted there");
            }
        }
        self.consumers.put(next);
        self.generation.send_modify(|g| *g += 1);
        self.start();
    }

    /// Returns once the consumer `key` names is no longer `consumer` (removed, or changed by
    /// a reload).
    async fn superseded(&self, key: &str, consumer: &Consumer) {
        let mut rx = self.generation.subscribe();
        loop {
            rx.borrow_and_update();
            match self.consumers.get().find(key) {
                Some(now) if now.same(consumer) => {}
                _ => return,
            }
            if rx.changed().await.is_err() {
                // Never (the sender lives as long as `self`): wait for ever, not return.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Starts a delivery loop for each consumer in force that has none on this node.
    pub fn start(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("events: no runtime to deliver on");
            return;
        };
        let mut running = lock(&self.running);
        for c in self.consumers.get().all() {
            let key = c.key();
            if running.insert(key.clone()) {
                runtime.spawn(self.clone().run(key));
            }
        }
    }

    /// The consumer `key` names now; `None`, and its loop marked ended, when it is no longer
    /// in force (one lock with [`Events::start`], so a consumer put back meanwhile gets a loop).
    fn still_wanted(&self, key: &str) -> Option<Consumer> {
        let mut running = lock(&self.running);
        let found = self.consumers.get().find(key);
        if found.is_none() {
            running.remove(key);
            tracing::info!(consumer = %key, "events: no longer configured; its delivery ends here");
        }
        found
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

    /// Delivers for the consumer `key` names (on the side runtime), while this node holds its
    /// lease, for as long as it is in force.
    async fn run(self: Arc<Self>, key: String) {
        let _unwinding = Unwinding {
            events: self.clone(),
            key: key.clone(),
        };
        let mut pending = Pending::default();
        // Its cursor exists from the start (the others' deleting waits for it).
        if self.still_wanted(&key).is_some()
            && let Err(e) = self.outbox.cursor(&key).await
        {
            tracing::debug!(consumer = %key, error = %e, "events: no cursor yet");
        }
        while self.still_wanted(&key).is_some() {
            let window = unix_secs() / WINDOW.as_secs();
            match self.outbox.lease(&key, window, WINDOW * 2).await {
                Ok(true) => {
                    tokio::select! {
                        () = self.lead(&key, &mut pending) => {}
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

    /// Delivers what the outbox holds for the consumer `key` names, in order, while it is in
    /// force.
    async fn lead(&self, key: &str, pending: &mut Pending) {
        let m = crate::metrics::events();
        let unavailable = |e: crate::state::StateError| {
            tracing::warn!(consumer = %key, error = %e, "events: the state store is unavailable");
        };
        let mut forgot = Instant::now();
        loop {
            let Some(consumer) = self.consumers.get().find(key) else {
                return;
            };
            if forgot.elapsed() >= FORGET_EVERY {
                forgot = Instant::now();
                self.forget().await;
            }
            let (cursor, head) = match (self.outbox.cursor(key).await, self.outbox.head().await) {
                (Ok(c), Ok(h)) => (c, h),
                (Err(e), _) | (_, Err(e)) => {
                    unavailable(e);
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            m.pending
                .with_label_values(&[key])
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
                    self.skip_forgotten(key, cursor).await;
                }
                tokio::select! {
                    () = consumer.idle() => {}
                    () = self.superseded(key, &consumer) => {}
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            for (seq, event) in entries {
                let taken = match &event {
                    Some(e) if consumer.wants(e) => {
                        match self.attempt(key, pending, seq, e).await {
                            Some(taken) => taken,
                            // No longer in force: its loop ends.
                            None => return,
                        }
                    }
                    Some(_) => true,
                    None => {
                        tracing::warn!(consumer = %key, seq, "events: an outbox entry is not an event; passed over");
                        true
                    }
                };
                let advanced = match taken {
                    true => self.outbox.advance(key, seq).await,
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
    /// pass it, `false` when it may not (its dead letter was not kept), `None` when the
    /// consumer `key` names is no longer in force. Each attempt is the consumer's as it is
    /// then.
    async fn attempt(
        &self,
        key: &str,
        pending: &mut Pending,
        seq: u64,
        event: &Event,
    ) -> Option<bool> {
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
            let consumer = self.consumers.get().find(key)?;
            // Changed by a reload since the event was read: its filter now.
            if !consumer.wants(event) {
                return Some(true);
            }
            pending.attempts += 1;
            let delivered = tokio::select! {
                r = consumer.deliver(event, pending.attempts) => r,
                () = self.superseded(key, &consumer) => {
                    // Stopped half-way: the consumer as it is now tries again.
                    pending.attempts -= 1;
                    continue;
                }
            };
            match delivered {
                Ok(()) => {
                    m.deliveries.with_label_values(&[key, "delivered"]).inc();
                    pending.settled = true;
                    return Some(true);
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
                    return Some(false);
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
                return Some(true);
            }
            tokio::select! {
                () = tokio::time::sleep(consumer.backoff(pending.attempts)) => {}
                () = self.superseded(key, &consumer) => {}
            }
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
            .consumers
            .get()
            .find(key)
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
