//! Prometheus metrics of the API.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
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
}

impl Metrics {
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
        Metrics {
            registry,
            requests,
            duration,
            bytes_sent,
            bytes_received,
        }
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
