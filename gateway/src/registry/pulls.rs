//! Pulls told to storage, for retention's `keep_pulled_days` (storage's `registry::pulls`
//! keeps the times). A manifest `GET` or `HEAD` answered 200 — from memory, by storage or
//! through a pull-through cache; a `HEAD` too, since that is how a node that holds the image
//! checks it is still there — is told to storage with `POST /internal/pulled`, in batches,
//! at most once an hour per repository and manifest by this gateway: storage's time of a pull
//! is as fresh as an hour, what a rule counted in days needs.
//!
//! Telling never holds a pull up and is best effort: a batch storage did not take is sent
//! again (three more times, 1, 4 and 16 s later); a pull that finds the queue full, and a
//! batch still not taken, are forgotten here, so the next pull of the same manifest tells it
//! again. The memory of what was told is two maps, the current hour's and the one before
//! (each at most `MAX_TOLD` entries; a full one starts the next hour early): bounded, and
//! nothing is ever scanned.

use super::internal::Internal;
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a manifest's pull, once told, is not told again.
const TELL_EVERY: Duration = Duration::from_secs(3600);
/// Most (repository, manifest) pairs remembered as told in an hour (twice that in all).
const MAX_TOLD: usize = 100_000;
/// Pulls waiting to be told.
const QUEUE: usize = 10_000;
/// Most pulls in one request to storage (storage takes up to 2 000).
const BATCH: usize = 1_000;

/// How long a batch storage did not take waits before each next try.
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(4),
    Duration::from_secs(16),
];

/// A repository and the digest of a manifest pulled from it.
type Pull = (String, String);

/// What this gateway told, and when.
struct Told {
    /// Since `since`.
    current: HashMap<Pull, Instant>,
    /// The hour before.
    previous: HashMap<Pull, Instant>,
    since: Instant,
}

impl Told {
    /// Whether `pull` was told within `TELL_EVERY` of `now`.
    fn recent(&self, pull: &Pull, now: Instant) -> bool {
        [&self.current, &self.previous].into_iter().any(|m| {
            m.get(pull)
                .is_some_and(|at| now.duration_since(*at) < TELL_EVERY)
        })
    }

    fn forget(&mut self, pull: &Pull) {
        self.current.remove(pull);
        self.previous.remove(pull);
    }
}

pub struct Pulls {
    internal: Arc<Internal>,
    told: Mutex<Told>,
    /// The queue to the task that tells storage, started with the first pull (on the
    /// runtime that serves requests).
    queue: OnceLock<mpsc::Sender<Pull>>,
}

impl Pulls {
    pub fn new(internal: Arc<Internal>) -> Arc<Self> {
        Arc::new(Pulls {
            internal,
            told: Mutex::new(Told {
                current: HashMap::new(),
                previous: HashMap::new(),
                since: Instant::now(),
            }),
            queue: OnceLock::new(),
        })
    }

    /// The manifest `digest` of `repo` was pulled just now.
    pub fn pulled(self: &Arc<Self>, repo: &str, digest: &str) {
        let pull = (repo.to_owned(), digest.to_owned());
        let now = Instant::now();
        {
            let mut told = self.lock();
            if told.recent(&pull, now) {
                return;
            }
            if now.duration_since(told.since) >= TELL_EVERY || told.current.len() >= MAX_TOLD {
                told.previous = std::mem::take(&mut told.current);
                told.since = now;
            }
            told.current.insert(pull.clone(), now);
        }
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(self.clone().tell(rx));
            tx
        });
        if queue.try_send(pull.clone()).is_err() {
            told_metric("dropped", 1);
            self.lock().forget(&pull);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Told> {
        self.told.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells storage what comes through `queue`, a batch at a time.
    async fn tell(self: Arc<Self>, mut queue: mpsc::Receiver<Pull>) {
        let mut batch = Vec::with_capacity(BATCH);
        while queue.recv_many(&mut batch, BATCH).await > 0 {
            let body = serde_json::json!({
                "pulls": batch
                    .iter()
                    .map(|(repository, digest)| {
                        serde_json::json!({ "repository": repository, "digest": digest })
                    })
                    .collect::<Vec<_>>(),
            });
            let send = || async {
                let r = self
                    .internal
                    .request(Method::POST, "/internal/pulled")?
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status() == StatusCode::OK,
                    "storage answered {}",
                    r.status()
                );
                Ok(r.json::<serde_json::Value>().await.unwrap_or_default())
            };
            let mut sent = send().await;
            for wait in RETRY_AFTER {
                if sent.is_ok() {
                    break;
                }
                tokio::time::sleep(wait).await;
                sent = send().await;
            }
            match sent {
                Ok(counts) => {
                    // What storage says of each pull: recorded, skipped (a manifest its
                    // repository no longer holds) or failed (its write; told again in an hour).
                    let count = |k: &str| counts[k].as_u64().map(|n| n as usize);
                    match (count("recorded"), count("skipped"), count("failed")) {
                        (Some(recorded), Some(skipped), Some(failed)) => {
                            told_metric("told", recorded);
                            told_metric("skipped", skipped);
                            told_metric("failed", failed);
                        }
                        _ => told_metric("told", batch.len()),
                    }
                }
                Err(e) => {
                    tracing::warn!(pulls = batch.len(), error = %format!("{e:#}"), "pull times not told to storage; the next pulls tell them");
                    told_metric("failed", batch.len());
                    let mut told = self.lock();
                    for pull in &batch {
                        told.forget(pull);
                    }
                }
            }
            batch.clear();
        }
    }
}

fn told_metric(result: &str, n: usize) {
    crate::metrics::cache()
        .pulls_told
        .with_label_values(&[result])
        .inc_by(n as u64);
}
