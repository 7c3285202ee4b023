//! Pulls told to storage, for retention's `keep_pulled_days` (storage's `registry::pulls`
//! keeps the times). A manifest `GET` or `HEAD` answered 200 — from memory, by storage or
//! through a pull-through cache; a `HEAD` too, since that is how a node that holds the image
//! checks it is still there — is told to storage with `POST /internal/pulled`, in batches,
//! at most once an hour per repository and manifest by this gateway: storage's time of a pull
//! is as fresh as an hour, what a rule counted in days needs.
//!
//! Telling never holds a pull up and is best effort: a pull that finds the queue full, and a
//! batch storage did not take, are forgotten here, so the next pull of the same manifest
//! tells it again. The memory of what was told is bounded (`MAX_TOLD` entries; when full,
//! what is older than an hour goes, and everything if that is not enough: at worst a few
//! manifests are told twice in the hour).

use super::internal::Internal;
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a manifest's pull, once told, is not told again.
const TELL_EVERY: Duration = Duration::from_secs(3600);
/// Most (repository, manifest) pairs remembered as told.
const MAX_TOLD: usize = 100_000;
/// Pulls waiting to be told.
const QUEUE: usize = 10_000;
/// Most pulls in one request to storage (storage takes up to 10 000).
const BATCH: usize = 1_000;

/// A repository and the digest of a manifest pulled from it.
type Pull = (String, String);

pub struct Pulls {
    internal: Arc<Internal>,
    told: Mutex<HashMap<Pull, Instant>>,
    /// The queue to the task that tells storage, started with the first pull (on the
    /// runtime that serves requests).
    queue: OnceLock<mpsc::Sender<Pull>>,
}

impl Pulls {
    pub fn new(internal: Arc<Internal>) -> Arc<Self> {
        Arc::new(Pulls {
            internal,
            told: Mutex::new(HashMap::new()),
            queue: OnceLock::new(),
        })
    }

    /// The manifest `digest` of `repo` was pulled just now.
    pub fn pulled(self: &Arc<Self>, repo: &str, digest: &str) {
        let pull = (repo.to_owned(), digest.to_owned());
        let now = Instant::now();
        {
            let mut told = self.lock();
            if told
                .get(&pull)
                .is_some_and(|at| now.duration_since(*at) < TELL_EVERY)
            {
                return;
            }
            if told.len() >= MAX_TOLD {
                told.retain(|_, at| now.duration_since(*at) < TELL_EVERY);
                if told.len() >= MAX_TOLD {
                    told.clear();
                }
            }
            told.insert(pull.clone(), now);
        }
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(self.clone().tell(rx));
            tx
        });
        if queue.try_send(pull.clone()).is_err() {
            told_metric("dropped", 1);
            self.lock().remove(&pull);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Pull, Instant>> {
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
            let sent = async {
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
                Ok(())
            }
            .await;
            match sent {
                Ok(()) => told_metric("told", batch.len()),
                Err(e) => {
                    tracing::warn!(pulls = batch.len(), error = %format!("{e:#}"), "pull times not told to storage; the next pulls tell them");
                    told_metric("failed", batch.len());
                    let mut told = self.lock();
                    for pull in &batch {
                        told.remove(pull);
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
