//! Running garbage collection ([`registry::gc`](crate::registry::Registry::gc)) in the
//! service: by hand (`POST /gc`, `storage-backend gc`) or on the `[gc]` schedule, with its
//! metrics and the reports of recent runs (`GET /gc`).

use crate::config::GcConfig;
use crate::http::metrics::Metrics;
use crate::registry::{GcReport, Registry};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Reports kept for `GET /gc`.
const HISTORY: usize = 32;

pub struct GcService {
    registry: Arc<Registry>,
    pub(crate) config: GcConfig,
    /// This node's name in the lease and reports.
    holder: String,
    history: Mutex<VecDeque<GcReport>>,
    retention: Option<Arc<policy::Policy>>,
    /// One run of this node at a time (the lease keeps other nodes out).
    running: tokio::sync::Mutex<()>,
}

impl GcService {
    /// Fails if the retention policy does not load.
    pub fn new(registry: Arc<Registry>, config: GcConfig) -> anyhow::Result<Self> {
        let retention = config.load_retention()?;
        let host = service::audit::hostname();
        Ok(GcService {
            registry,
            config,
            holder: format!("{host}:{}", std::process::id()),
            history: Mutex::new(VecDeque::new()),
            retention,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// One run; its report is kept and its figures counted.
    pub async fn run(&self, dry_run: bool, metrics: &Metrics) -> crate::registry::Result<GcReport> {
        let _one = self.running.lock().await;
        metrics.gc_running.set(1);
        let result = self
            .registry
            .gc(&self
                .config
                .options(dry_run, &self.holder, self.retention.clone()))
            .await;
        metrics.gc_running.set(0);
        match &result {
            Ok(r) => {
                let outcome = match (&r.busy, r.dry_run) {
                    (Some(_), _) => "busy",
                    (None, true) => "dry_run",
                    (None, false) => "ok",
                };
                metrics.gc_runs.with_label_values(&[outcome]).inc();
                metrics.gc_errors.inc_by(r.errors.len() as u64);
                if r.busy.is_none() {
                    metrics.gc_last_duration.set(r.duration_seconds);
                    metrics.gc_last_marked.set(r.blobs_marked as i64);
                }
                if !r.dry_run {
                    metrics.gc_swept_blobs.inc_by(r.blobs_deleted.len() as u64);
                    metrics
                        .gc_swept_links
                        .inc_by(r.layer_links_deleted.len() as u64);
                    metrics
                        .gc_swept_manifests
                        .inc_by(r.manifests_deleted.len() as u64);
                    metrics
                        .gc_purged_uploads
                        .inc_by(r.uploads_purged.len() as u64);
                    metrics.gc_reclaimed_bytes.inc_by(r.bytes_reclaimed);
                    metrics.gc_rescued.inc_by(r.rescued as u64);
                }
                tracing::info!(
                    run = %r.run,
                    dry_run = r.dry_run,
                    busy = ?r.busy,
                    blobs_deleted = r.blobs_deleted.len(),
                    bytes_reclaimed = r.bytes_reclaimed,
                    layer_links_deleted = r.layer_links_deleted.len(),
                    manifests_deleted = r.manifests_deleted.len(),
                    uploads_purged = r.uploads_purged.len(),
                    rescued = r.rescued,
                    errors = r.errors.len(),
                    complete = r.complete,
                    seconds = r.duration_seconds,
                    "garbage collection"
                );
                for e in &r.errors {
                    tracing::warn!(run = %r.run, error = %e, "garbage collection: skipped");
                }
                let mut h = self.history.lock().expect("gc history");
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back(r.clone());
            }
            Err(e) => {
                metrics.gc_runs.with_label_values(&["error"]).inc();
                metrics.gc_errors.inc();
                tracing::error!(error = %e, "garbage collection failed");
            }
        }
        result
    }

    /// Reports of recent runs, oldest first.
    pub fn history(&self) -> Vec<GcReport> {
        self.history
            .lock()
            .expect("gc history")
            .iter()
            .cloned()
            .collect()
    }
}

pub(crate) fn minutes_now() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ((secs % 86_400) / 60) as u32
}

/// Whether `now` (minutes after midnight) is in `[start, end)`, which may wrap midnight.
pub(crate) fn in_window(start: u32, end: u32, now: u32) -> bool {
    if start <= end {
        (start..end).contains(&now)
    } else {
        now >= start || now < end
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn windows_wrap_midnight() {
        use super::in_window;
        assert!(in_window(60, 300, 60));
        assert!(!in_window(60, 300, 300));
        assert!(in_window(22 * 60, 2 * 60, 23 * 60));
        assert!(in_window(22 * 60, 2 * 60, 30));
        assert!(!in_window(22 * 60, 2 * 60, 12 * 60));
    }
}
