//! The outbox: registry events kept in the shared state store, in order, until every consumer
//! has taken them. A consumer is a webhook or a replication rule, named by its key
//! (`delivery::Consumer::key`: a webhook's name, `replication.<rule>`); the parameters and
//! fields called `webhook` here hold that key.
//!
//! - An event is one entry of the log `events:log:`, appended with [`StateStore::append`]:
//!   the store numbers it (`events:log:<n>`, 20 digits) in the same atomic step that stores it
//!   (never evicted; in the in-memory store, kept in its file when it has one), so entries
//!   become visible in the order of their numbers, with no gap. The order is the order the
//!   gateways recorded them in: two changes to one repository made at the same moment through
//!   two gateways are in the order their events reached the store.
//! - Each webhook's cursor, `events:cursor:<webhook>`, is the number of the last event it
//!   took; a webhook without one starts with the oldest event the log still holds.
//! - A dead letter, `events:dead:<webhook>:<n>`, is an event the webhook never took.
//! - Entries every configured webhook has passed are deleted ([`Outbox::forget_through`]).

use super::Event;
use crate::state::{StateError, StateStore};
use std::sync::Arc;

const LOG: &str = "events:log:";
/// Where deleting passed entries got to (the number of the last one deleted).
const FORGOTTEN: &str = "events:forgotten";
/// Entries deleted in one call of [`Outbox::forget_through`], at most.
const FORGET_BATCH: u64 = 1000;

/// An event that a webhook never took, with why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub webhook: String,
    /// The event's number in the log.
    pub seq: u64,
    pub event: Event,
    pub attempts: u32,
    /// The last delivery's error.
    pub error: String,
}

pub struct Outbox {
    store: Arc<dyn StateStore>,
}

fn entry(n: u64) -> String {
    format!("{LOG}{n:020}")
}

fn number(v: Option<Vec<u8>>) -> Option<u64> {
    std::str::from_utf8(&v?).ok()?.parse().ok()
}

impl Outbox {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Outbox { store }
    }

    /// Appends `event` to the log (it is delivered from then on); its number.
    pub async fn record(&self, event: &Event) -> Result<u64, StateError> {
        let value = serde_json::to_vec(event).map_err(|e| StateError(e.to_string()))?;
        self.store.append(LOG, value).await
    }

    /// The number of the log's last event (0: none yet).
    pub async fn head(&self) -> Result<u64, StateError> {
        Ok(number(self.store.get(&format!("{LOG}seq")).await?).unwrap_or(0))
    }

    /// Up to `n` events after number `after`, oldest first, with their numbers. An entry that
    /// does not read as an event comes back as `None` (passed over, not delivered).
    pub async fn after(&self, after: u64, n: u64) -> Result<Vec<(u64, Option<Event>)>, StateError> {
        let keys: Vec<String> = (after + 1..=after + n).map(entry).collect();
        let values = self.store.get_many(&keys).await?;
        Ok((after + 1..)
            .zip(values)
            // The log has no gap after a cursor: the first missing entry is its end.
            .map_while(|(k, v)| Some((k, v.map(|v| serde_json::from_slice(&v).ok())?)))
            .collect())
    }

    /// The lowest cursor of every webhook in the store (none: no webhook took anything yet).
    pub async fn oldest_cursor(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .store
            .scan("events:cursor:")
            .await?
            .into_iter()
            .filter_map(|(_, v)| number(Some(v)))
            .min())
    }

    /// The number of the last entry deleted as passed (0: none).
    pub async fn forgotten(&self) -> Result<u64, StateError> {
        Ok(number(self.store.get(FORGOTTEN).await?).unwrap_or(0))
    }

    fn cursor_key(webhook: &str) -> String {
        format!("events:cursor:{webhook}")
    }

    /// The number of the last event `webhook` took; a webhook without a cursor gets one
    /// before the oldest event the log still holds (a webhook configured later gets what was
    /// not yet deleted as passed by the others).
    pub async fn cursor(&self, webhook: &str) -> Result<u64, StateError> {
        if let Some(n) = number(self.store.get(&Self::cursor_key(webhook)).await?) {
            return Ok(n);
        }
        let start = self.forgotten().await?;
        self.advance(webhook, start).await?;
        Ok(start)
    }

    /// The number of the last event `webhook` took, if it has a cursor yet (a look: nothing
    /// is written).
    pub async fn cursor_if_any(&self, webhook: &str) -> Result<Option<u64>, StateError> {
        Ok(number(self.store.get(&Self::cursor_key(webhook)).await?))
    }

    /// `webhook` took the event numbered `n` (and every one before).
    pub async fn advance(&self, webhook: &str, n: u64) -> Result<(), StateError> {
        self.store
            .put(&Self::cursor_key(webhook), n.to_string().into_bytes())
            .await
    }

    /// Deletes the log's entries up to number `n` (every webhook has passed them), at most
    /// [`FORGET_BATCH`] a call, from where the last call got to.
    pub async fn forget_through(&self, n: u64) -> Result<(), StateError> {
        let from = number(self.store.get(FORGOTTEN).await?).unwrap_or(0);
        let to = n.min(from + FORGET_BATCH);
        for k in from + 1..=to {
            self.store.delete(&entry(k)).await?;
        }
        if to > from {
            self.store
                .put(FORGOTTEN, to.to_string().into_bytes())
                .await?;
        }
        Ok(())
    }

    fn dead_key(webhook: &str, seq: u64) -> String {
        format!("events:dead:{webhook}:{seq:020}")
    }

    pub async fn bury(&self, letter: &DeadLetter) -> Result<(), StateError> {
        let value = serde_json::to_vec(letter).map_err(|e| StateError(e.to_string()))?;
        self.store
            .put(&Self::dead_key(&letter.webhook, letter.seq), value)
            .await
    }

    /// Every dead letter, by webhook and number (an admin listing: a scan of the store).
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        let mut out: Vec<DeadLetter> = self
            .store
            .scan("events:dead:")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        out.sort_by(|a, b| (&a.webhook, a.seq).cmp(&(&b.webhook, b.seq)));
        Ok(out)
    }

    /// The dead letter of `webhook` for event number `seq`, if there is one.
    pub async fn dead_letter(
        &self,
        webhook: &str,
        seq: u64,
    ) -> Result<Option<DeadLetter>, StateError> {
        Ok(self
            .store
            .get(&Self::dead_key(webhook, seq))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Deletes the dead letter of `webhook` for event number `seq`.
    pub async fn unbury(&self, webhook: &str, seq: u64) -> Result<(), StateError> {
        self.store.delete(&Self::dead_key(webhook, seq)).await
    }

    /// One lease round for `webhook`: whether this node won the window `window` (the first to
    /// count it does; the count lives for `ttl`).
    pub async fn lease(
        &self,
        webhook: &str,
        window: u64,
        ttl: std::time::Duration,
    ) -> Result<bool, StateError> {
        Ok(self
            .store
            .incr(&format!("events:lease:{webhook}:{window}"), ttl)
            .await?
            == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            time: "2026-12-07T00:00:00Z".into(),
            kind: super::super::Kind::ManifestPushed,
            actor: super::super::Actor {
                name: "bob".into(),
                kind: "user".into(),
            },
            source: None,
            repository: "team-a/app".into(),
            tag: Some("v1".into()),
            digest: Some("sha256:aa".into()),
            previous_digest: None,
            media_type: None,
            size: None,
            request_id: "r".into(),
            user_agent: None,
            host: None,
        }
    }

    #[tokio::test]
    async fn events_come_back_in_order_after_the_cursor_and_go_once_passed() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let outbox = Outbox::new(store.clone());
        // A webhook configured before anything was recorded starts at 0.
        assert_eq!(outbox.cursor("hook").await.unwrap(), 0);
        for i in 0..5 {
            outbox.record(&event(&format!("e{i}"))).await.unwrap();
        }
        let all = outbox.after(0, 100).await.unwrap();
        let ids: Vec<_> = all.iter().map(|(_, e)| e.clone().unwrap().id).collect();
        assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
        assert_eq!(all[0].0, 1);
        assert_eq!(outbox.after(0, 2).await.unwrap().len(), 2, "at most n");
        outbox.advance("hook", 3).await.unwrap();
        let rest = outbox
            .after(outbox.cursor("hook").await.unwrap(), 100)
            .await
            .unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].1.as_ref().unwrap().id, "e3");
        outbox.forget_through(3).await.unwrap();
        assert!(
            outbox.after(0, 100).await.unwrap().is_empty(),
            "1..=3 deleted"
        );
        assert_eq!(outbox.after(3, 100).await.unwrap().len(), 2);
        // A webhook configured now starts with what the log still holds.
        assert_eq!(outbox.cursor("new").await.unwrap(), 3);
        // Another gateway's outbox on the same store continues the numbering.
        let other = Outbox::new(store);
        assert_eq!(other.record(&event("x")).await.unwrap(), 6);
        assert!(
            outbox
                .lease("hook", 7, std::time::Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            !other
                .lease("hook", 7, std::time::Duration::from_secs(60))
                .await
                .unwrap()
        );
    }
}
