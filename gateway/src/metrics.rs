//! Gateway metrics, served on the admin listener.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// One request as the metrics count it.
pub struct Served<'a> {
    /// The `route` label.
    pub route: &'a str,
    pub method: &'a str,
    /// The status written (0: none).
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The repository of a `/v2/` request.
    pub repository: Option<&'a str>,
    pub elapsed: Duration,
}

/// How many repositories get their own `gateway_repository_bytes_total` series; the rest
/// are counted under `repository="_other"`.
pub const REPOSITORY_LABEL_CAP: usize = 100;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub token_requests: IntCounterVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    repository_bytes: IntCounterVec,
    repositories: Mutex<HashSet<String>>,
    pub upstream_errors: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    /// 1 when the shared state store answered at the last scrape.
    pub state_store_up: prometheus::IntGauge,
    /// Client connections open on the TLS listener that count against a source's cap.
    pub connections_open: prometheus::IntGauge,
    /// Connections closed before their TLS handshake, by reason (`per_source_cap`,
    /// `hello_timeout`).
    pub connections_refused: IntCounterVec,
}

/// Metrics of the token service and the authenticators (process-wide: they are counted
/// where no [`Metrics`] is at hand; [`Metrics::new`] registers them).
pub struct AuthMetrics {
    /// Time of one authenticator's answer, by authenticator.
    pub duration: HistogramVec,
    /// Answers by authenticator and outcome.
    pub outcomes: IntCounterVec,
    /// Token decisions by authenticator and outcome (`granted`, `partial`, `denied`).
    pub token_decisions: IntCounterVec,
    /// Requests refused by a rate limit, by endpoint (`token`, `registry`) and `by`.
    pub rate_limited: IntCounterVec,
    /// Lockouts started, by `user` or `source`.
    pub lockouts: IntCounterVec,
    /// Lockout or rate-limit checks the state store could not answer, by check.
    pub limits_unavailable: IntCounterVec,
    /// Entries in this gateway's copy of the revocation list.
    pub revocations: prometheus::IntGauge,
    /// Requests that came with a revoked access token.
    pub revoked_presented: prometheus::IntCounter,
    /// Reloads of the revocation list, by outcome (`ok`, `failed`).
    pub revocation_reloads: IntCounterVec,
}

/// Metrics of the pull-through caches (process-wide, like [`AuthMetrics`]).
pub struct CacheMetrics {
    /// Manifest and blob requests under a cache prefix, by prefix and result (`hit`: from
    /// storage; `miss`: fetched from the upstream; `shared`: a blob fetched for another of the
    /// cache's repositories, linked; `stale`: the cached copy served because the upstream
    /// could not be asked; `error`: neither).
    pub results: IntCounterVec,
    /// Body bytes read from upstreams, by prefix.
    pub upstream_bytes: IntCounterVec,
    /// Time for an upstream's answer head, by prefix and request (`manifest`, `head`, `blob`).
    pub upstream_seconds: HistogramVec,
    /// Upstream failures, by prefix and kind (`unreachable`, `timeout`, `rate_limited`…).
    pub upstream_errors: IntCounterVec,
    /// Tags checked with the upstream after their TTL, by prefix and outcome (`same`,
    /// `changed`, `failed`).
    pub revalidations: IntCounterVec,
    /// Manifest reads outside cache prefixes, by result (`memory`: answered from the
    /// gateway's memory; `storage`: asked of storage; `unavailable`: asked of storage, the
    /// repository's generation unreadable).
    pub manifest_reads: IntCounterVec,
    /// Admitted blob reads (`GET`/`HEAD`) no pull-through cache answered itself, by where
    /// they were answered from (`files`: a co-located store's files; `storage`: a node).
    pub blob_reads: IntCounterVec,
    /// Manifest pulls told to storage for retention (`registry::pulls`), by result (`told`:
    /// recorded; `skipped`: the repository no longer holds the manifest; `failed`: storage
    /// did not take them; `dropped`: the queue was full).
    pub pulls_told: IntCounterVec,
}

/// Metrics of registry events and webhooks (process-wide, like [`AuthMetrics`]).
pub struct EventMetrics {
    /// Events recorded, by outcome (`ok`, `error`).
    pub recorded: IntCounterVec,
    /// Delivery attempts, by webhook and outcome (`delivered`, `failed`, `dead`).
    pub deliveries: IntCounterVec,
    /// Events in the outbox the webhook has not taken yet (as its delivering node saw).
    pub pending: IntGaugeVec,
    /// What replication copied, by rule and kind (`manifest`, `blob`, `blob-present`).
    pub replication_copies: IntCounterVec,
    /// Blob bytes replication uploaded, by rule.
    pub replication_bytes: IntCounterVec,
    /// Tags not as here at the last reconciliation, by rule and kind (`missing`,
    /// `different`, `extra`, `conflict`).
    pub replication_drift: IntGaugeVec,
    /// When a rule last copied an event or reconciled without error (Unix seconds).
    pub replication_last_success: IntGaugeVec,
}

/// The process's [`EventMetrics`].
pub fn events() -> &'static EventMetrics {
    static M: OnceLock<EventMetrics> = OnceLock::new();
    M.get_or_init(|| EventMetrics {
        recorded: counter(
            "gateway_events_recorded_total",
            "Registry events written to the outbox, by outcome (ok, error)",
            &["outcome"],
        ),
        deliveries: counter(
            "gateway_webhook_deliveries_total",
            "Webhook delivery attempts, by webhook and outcome (delivered, failed, dead)",
            &["webhook", "outcome"],
        ),
        pending: IntGaugeVec::new(
            Opts::new(
                "gateway_webhook_pending",
                "Events in the outbox a webhook has not taken yet, as its delivering node last saw",
            ),
            &["webhook"],
        )
        .expect("valid metric"),
        replication_copies: counter(
            "gateway_replication_copies_total",
            "What replication copied to its target, by rule and kind (manifest, blob, blob-present)",
            &["rule", "kind"],
        ),
        replication_bytes: counter(
            "gateway_replication_bytes_total",
            "Blob bytes replication uploaded to its target, by rule",
            &["rule"],
        ),
        replication_drift: IntGaugeVec::new(
            Opts::new(
                "gateway_replication_drift",
                "Tags not as here at a rule's last reconciliation, by rule and kind (missing, different, extra, conflict)",
            ),
            &["rule", "kind"],
        )
        .expect("valid metric"),
        replication_last_success: IntGaugeVec::new(
            Opts::new(
                "gateway_replication_last_success_timestamp_seconds",
                "When a replication rule last copied an event or reconciled without error",
            ),
            &["rule"],
        )
        .expect("valid metric"),
    })
}

/// The process's [`CacheMetrics`].
pub fn cache() -> &'static CacheMetrics {
    static M: OnceLock<CacheMetrics> = OnceLock::new();
    M.get_or_init(|| CacheMetrics {
        results: counter(
            "gateway_cache_requests_total",
            "Manifest and blob requests under a pull-through cache prefix, by prefix and result (hit, miss, shared, stale, error)",
            &["prefix", "result"],
        ),
        upstream_bytes: counter(
            "gateway_cache_upstream_bytes_total",
            "Body bytes read from pull-through cache upstreams, by prefix",
            &["prefix"],
        ),
        upstream_seconds: HistogramVec::new(
            HistogramOpts::new(
                "gateway_cache_upstream_seconds",
                "Time to an upstream's answer head, by prefix and request (manifest, head, blob)",
            )
            .buckets(vec![0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["prefix", "request"],
        )
        .expect("valid metric"),
        upstream_errors: counter(
            "gateway_cache_upstream_errors_total",
            "Pull-through cache upstream failures, by prefix and kind",
            &["prefix", "kind"],
        ),
        revalidations: counter(
            "gateway_cache_revalidations_total",
            "Cached tags checked with the upstream after their TTL, by prefix and outcome (same, changed, failed)",
            &["prefix", "outcome"],
        ),
        manifest_reads: counter(
            "gateway_manifest_reads_total",
            "Manifest reads outside cache prefixes, by result (memory, storage, unavailable)",
            &["result"],
        ),
        blob_reads: counter(
            "gateway_blob_reads_total",
            "Blob reads no pull-through cache answered itself, by where from (files, storage)",
            &["from"],
        ),
        pulls_told: counter(
            "gateway_pulls_told_total",
            "Manifest pulls told to storage for retention, by result (told, skipped, failed, dropped)",
            &["result"],
        ),
    })
}

/// A counter vector with `labels` (the names are this crate's own: valid).
pub fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// The process's [`AuthMetrics`].
pub fn auth() -> &'static AuthMetrics {
    static M: OnceLock<AuthMetrics> = OnceLock::new();
    M.get_or_init(|| AuthMetrics {
        duration: HistogramVec::new(
            HistogramOpts::new(
                "gateway_authenticator_duration_seconds",
                "Time an authenticator (htpasswd, ldap, robot, federation) took to answer",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["authenticator"],
        )
        .expect("valid metric"),
        outcomes: counter(
            "gateway_authenticator_answers_total",
            "Authenticator answers by outcome (success, invalid_credentials, unknown_user, refused, unavailable)",
            &["authenticator", "outcome"],
        ),
        token_decisions: counter(
            "gateway_token_decisions_total",
            "Token decisions by authenticator and outcome (granted, partial, denied)",
            &["authenticator", "outcome"],
        ),
        rate_limited: counter(
            "gateway_rate_limited_total",
            "Requests refused by a rate limit, by endpoint (token, registry) and by (user, source)",
            &["endpoint", "by"],
        ),
        lockouts: counter(
            "gateway_login_lockouts_total",
            "Lockouts started after failed logins, by user name or source address",
            &["by"],
        ),
        limits_unavailable: counter(
            "gateway_limits_unavailable_total",
            "Lockout or rate-limit checks the state store could not answer (lockout, rate)",
            &["check"],
        ),
        revocations: prometheus::IntGauge::new(
            "gateway_token_revocations",
            "Revoked access tokens and subjects in this gateway's copy of the revocation list",
        )
        .expect("valid metric"),
        revocation_reloads: counter(
            "gateway_revocation_reloads_total",
            "Reloads of the revocation list from the state store, by outcome (ok, failed)",
            &["outcome"],
        ),
        revoked_presented: prometheus::IntCounter::new(
            "gateway_revoked_tokens_presented_total",
            "Registry requests refused because their access token was revoked",
        )
        .expect("valid metric"),
    })
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_http_requests_total",
                "Requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_http_request_duration_seconds",
                "Request duration by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                60.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let token_requests = IntCounterVec::new(
            Opts::new(
                "gateway_token_requests_total",
                "Token endpoint answers by status",
            ),
            &["status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique");
        registry
            .register(Box::new(token_requests.clone()))
            .expect("unique");
        crate::audit::register_metrics(&registry).expect("unique");
        let a = auth();
        registry
            .register(Box::new(a.duration.clone()))
            .expect("unique");
        let request_bytes = counter(
            "gateway_http_request_bytes_total",
            "Request body bytes from clients, by route",
            &["route"],
        );
        let response_bytes = counter(
            "gateway_http_response_bytes_total",
            "Response body bytes to clients, by route",
            &["route"],
        );
        let repository_bytes = counter(
            "gateway_repository_bytes_total",
            "Body bytes by repository (the first 100 seen; the rest as _other) and direction (in, out)",
            &["repository", "direction"],
        );
        let upstream_errors = counter(
            "gateway_upstream_errors_total",
            "Failures talking to a storage node, by node and kind (connect, proxy: the request failed; retried: it went to a node again)",
            &["node", "kind"],
        );
        let upstream_healthy = IntGaugeVec::new(
            Opts::new(
                "gateway_upstream_healthy",
                "1 when the storage node passes its health check, 0 when not",
            ),
            &["node"],
        )
        .expect("valid metric");
        let connections_open = prometheus::IntGauge::new(
            "gateway_connections_open",
            "Client connections open on the TLS listener (those from trusted load balancers without a PROXY client address are not counted)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(connections_open.clone()))
            .expect("unique");
        let connections_refused = counter(
            "gateway_connections_refused_total",
            "Connections closed before their TLS handshake, by reason (per_source_cap, hello_timeout)",
            &["reason"],
        );
        let cm = cache();
        registry
            .register(Box::new(cm.upstream_seconds.clone()))
            .expect("unique");
        let em = events();
        for g in [
            &em.pending,
            &em.replication_drift,
            &em.replication_last_success,
        ] {
            registry.register(Box::new(g.clone())).expect("unique");
        }
        for c in [
            &cm.results,
            &cm.upstream_bytes,
            &cm.upstream_errors,
            &cm.revalidations,
            &cm.manifest_reads,
            &cm.blob_reads,
            &cm.pulls_told,
            &em.recorded,
            &em.deliveries,
            &em.replication_copies,
            &em.replication_bytes,
            &connections_refused,
            &a.outcomes,
            &a.token_decisions,
            &a.rate_limited,
            &a.lockouts,
            &a.limits_unavailable,
            &a.revocation_reloads,
            &request_bytes,
            &response_bytes,
            &repository_bytes,
            &upstream_errors,
        ] {
            registry.register(Box::new(c.clone())).expect("unique");
        }
        registry
            .register(Box::new(upstream_healthy.clone()))
            .expect("unique");
        registry
            .register(Box::new(a.revocations.clone()))
            .expect("unique");
        registry
            .register(Box::new(a.revoked_presented.clone()))
            .expect("unique");
        let state_store_up = prometheus::IntGauge::new(
            "gateway_state_store_up",
            "1 when the shared state store (memory or Redis) answered at the last scrape",
        )
        .expect("valid metric");
        registry
            .register(Box::new(state_store_up.clone()))
            .expect("unique");
        Metrics {
            registry,
            requests,
            duration,
            token_requests,
            request_bytes,
            response_bytes,
            repository_bytes,
            repositories: Mutex::new(HashSet::new()),
            upstream_errors,
            upstream_healthy,
            state_store_up,
            connections_open,
            connections_refused,
        }
    }

    /// Counts body bytes of a request to `repository`.
    /// Counts a finished request: requests, bytes each way (per repository too), duration.
    pub fn served(&self, r: &Served<'_>) {
        self.requests
            .with_label_values(&[r.route, r.method, &r.status.to_string()])
            .inc();
        self.request_bytes
            .with_label_values(&[r.route])
            .inc_by(r.bytes_in);
        self.response_bytes
            .with_label_values(&[r.route])
            .inc_by(r.bytes_out);
        if let Some(repo) = r.repository {
            self.repository_bytes(repo, r.bytes_in, r.bytes_out);
        }
        self.duration
            .with_label_values(&[r.route])
            .observe(r.elapsed.as_secs_f64());
    }

    pub fn repository_bytes(&self, repository: &str, bytes_in: u64, bytes_out: u64) {
        let label = match self.repositories.lock() {
            Ok(mut seen) => {
                if seen.contains(repository) {
                    repository
                } else if seen.len() < REPOSITORY_LABEL_CAP {
                    seen.insert(repository.to_string());
                    repository
                } else {
                    "_other"
                }
            }
            Err(_) => "_other",
        };
        if bytes_in > 0 {
            self.repository_bytes
                .with_label_values(&[label, "in"])
                .inc_by(bytes_in);
        }
        if bytes_out > 0 {
            self.repository_bytes
                .with_label_values(&[label, "out"])
                .inc_by(bytes_out);
        }
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
