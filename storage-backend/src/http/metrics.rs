//! Prometheus metrics of the API.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The endpoint a response answered, for metric labels.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLabel(pub &'static str);

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub bytes_sent: IntCounterVec,
    pub bytes_received: IntCounterVec,
    /// Upload sessions started here and not yet finished or cancelled here (sessions move
    /// between nodes: sum over the nodes).
    pub uploads_in_progress: IntGauge,
    /// The store's blobs and their bytes as this node knows them (`registry::Usage`: its last
    /// walk of the store and its own changes since), set on each scrape.
    pub blobs: IntGauge,
    pub blob_bytes: IntGauge,
    /// When that walk began (seconds since the epoch).
    pub usage_measured: Gauge,
    /// Garbage collection runs by outcome (`ok`, `dry_run`, `busy`, `error`).
    pub gc_runs: IntCounterVec,
    pub gc_running: IntGauge,
    pub gc_last_duration: Gauge,
    pub gc_last_marked: IntGauge,
    pub gc_swept_blobs: IntCounter,
    pub gc_swept_links: IntCounter,
    pub gc_swept_manifests: IntCounter,
    pub gc_purged_uploads: IntCounter,
    pub gc_reclaimed_bytes: IntCounter,
    pub gc_rescued: IntCounter,
    pub gc_errors: IntCounter,
}

impl Metrics {
    /// The registry `/metrics` renders, for collectors kept elsewhere (the audit trail's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "storage_http_requests_total",
                "Requests by endpoint, method and status",
            ),
            &["endpoint", "method", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "storage_http_request_duration_seconds",
                "Time to the response head, by endpoint",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ]),
            &["endpoint"],
        )
        .expect("valid metric");
        let bytes_sent = IntCounterVec::new(
            Opts::new(
                "storage_http_response_bytes_total",
                "Response body bytes announced by Content-Length",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let bytes_received = IntCounterVec::new(
            Opts::new(
                "storage_http_request_bytes_total",
                "Request body bytes announced by Content-Length",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        for c in [&requests, &bytes_sent, &bytes_received] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let uploads_in_progress = gauge(
            "storage_uploads_in_progress",
            "Upload sessions started on this node minus those finished or cancelled on it (sum over nodes)",
        );
        let blobs = gauge(
            "storage_blobs",
            "Blobs in the store: this node's last walk of it (at start-up, by each GC run) plus its own changes since",
        );
        let blob_bytes = gauge(
            "storage_blob_bytes",
            "Bytes of the blobs in the store: this node's last walk of it plus its own changes since",
        );
        let usage_measured = Gauge::new(
            "storage_usage_measured_timestamp_seconds",
            "When this node's last walk of the store's blobs began (0: none has ended yet)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(usage_measured.clone()))
            .expect("unique metric");
        let gc_runs = IntCounterVec::new(
            Opts::new(
                "storage_gc_runs_total",
                "Garbage collection runs by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(gc_runs.clone()))
            .expect("unique metric");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gc_last_duration = Gauge::new(
            "storage_gc_last_duration_seconds",
            "Duration of the last GC run",
        )
        .expect("valid metric");
        registry
            .register(Box::new(gc_last_duration.clone()))
            .expect("unique metric");
        let gc_running = gauge(
            "storage_gc_running",
            "1 while a GC run of this node is going on",
        );
        let gc_last_marked = gauge(
            "storage_gc_last_marked_blobs",
            "Blobs the last GC run found live",
        );
        let gc_swept_blobs = counter("storage_gc_swept_blobs_total", "Blobs deleted by GC");
        let gc_swept_links = counter(
            "storage_gc_swept_layer_links_total",
            "Unreferenced repository layer links deleted by GC",
        );
        let gc_swept_manifests = counter(
            "storage_gc_swept_manifests_total",
            "Untagged manifests deleted by GC",
        );
        let gc_purged_uploads = counter(
            "storage_gc_purged_uploads_total",
            "Abandoned upload sessions purged by GC",
        );
        let gc_reclaimed_bytes = counter(
            "storage_gc_reclaimed_bytes_total",
            "Bytes of the blobs deleted by GC",
        );
        let gc_rescued = counter(
            "storage_gc_rescued_total",
            "GC candidates referenced again by a push before their deletion",
        );
        let gc_errors = counter(
            "storage_gc_errors_total",
            "Unreadable or corrupt objects GC reported, and failed runs",
        );
        Metrics {
            registry,
            requests,
            duration,
            bytes_sent,
            bytes_received,
            uploads_in_progress,
            blobs,
            blob_bytes,
            usage_measured,
            gc_runs,
            gc_running,
            gc_last_duration,
            gc_last_marked,
            gc_swept_blobs,
            gc_swept_links,
            gc_swept_manifests,
            gc_purged_uploads,
            gc_reclaimed_bytes,
            gc_rescued,
            gc_errors,
        }
    }

    /// Sets the usage gauges (left as they are before the node's first walk ended).
    pub fn set_usage(&self, usage: Option<crate::registry::UsageTotals>) {
        let Some(u) = usage else { return };
        self.blobs.set(u.blobs as i64);
        self.blob_bytes.set(u.bytes as i64);
        let at = u
            .measured_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.usage_measured.set(at);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
