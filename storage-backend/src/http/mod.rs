//! The HTTP API: `/v2/*` (every endpoint of the distribution spec), `/internal/status` (the
//! gateway's: usage and recent GC runs, for the console), `/internal/pulled` (the gateways
//! telling which manifests were pulled: `registry::pulls`) and `/healthz` (the gateways' health
//! check); on the admin listener (or the one combined listener) `/healthz`, `/readyz`,
//! `/metrics` and `/gc`. [`router`] builds it without a socket, so handler tests need no listener.

mod error;
mod handlers;
pub mod metrics;

pub use error::ApiError;

use crate::config::Secret;
use crate::registry::Registry;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::{EndpointLabel, Metrics};
use oci::{ErrorCode, OciError};
use std::sync::Arc;
use std::time::Instant;

use service::hop::{
    CACHED_COPY_HEADER, INTERNAL_SECRET_HEADER, OVERRIDDEN_HEADER, PREVIOUS_DIGEST_HEADER,
    PROTECTION_HEADER,
};

/// Everything the handlers share.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub gc: Arc<crate::gc::GcService>,
    pub delete_enabled: bool,
    pub secret: Option<Secret>,
    pub metrics: Metrics,
    /// Set on `SIGTERM`: `/healthz` and `/readyz` answer 503 so that gateways stop sending
    /// here while what is in flight finishes.
    pub draining: std::sync::atomic::AtomicBool,
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `/v2/*` and the admin routes.
    Combined,
    /// `/v2/*` and `/internal/*` only.
    Api,
    /// `/metrics`, `/healthz`, `/readyz` only.
    Admin,
}

pub fn router(state: Arc<AppState>, listener: Listener) -> Router {
    let mut r = Router::new().route("/healthz", get(healthz));
    if listener != Listener::Api {
        r = r
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/gc", get(gc_history).post(gc_run));
    }
    if listener != Listener::Admin {
        r = r
            .route("/internal/status", get(status))
            .route("/internal/pulled", post(pulled))
            .fallback(handlers::dispatch);
    }
    r.layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Alive and taking requests: 503 once draining.
async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    "ok\n".into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    match st.registry.check().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable\n").into_response()
        }
    }
}

fn json_response<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::from(std::io::Error::other(e)).into_response(),
    }
}

/// `POST /gc[?dry_run=true]`: one run now; its report as JSON (`busy` set if another node's
/// run held the lease).
async fn gc_run(State(st): State<Arc<AppState>>, uri: axum::http::Uri) -> Response {
    let dry_run = uri
        .query()
        .unwrap_or("")
        .split('&')
        .any(|p| matches!(p, "dry_run" | "dry_run=true" | "dry_run=1"));
    match st.gc.run(dry_run, &st.metrics).await {
        Ok(report) => json_response(&report),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /internal/status` (the gateway's, with the internal secret: the web console's storage
/// page): whether the store answers, its usage as last known, and this node's recent GC runs
/// (newest first, counts only: a run's lists of what it deleted stay in `GET /gc`).
async fn status(State(st): State<Arc<AppState>>) -> Response {
    let ready = st.registry.check().await;
    let usage = st.registry.usage().map(|u| {
        serde_json::json!({
            "blobs": u.blobs,
            "bytes": u.bytes,
            "measured_at": u.measured_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    });
    let gc: Vec<serde_json::Value> = st
        .gc
        .history()
        .iter()
        .rev()
        .take(10)
        .map(|r| {
            serde_json::json!({
                "run": r.run,
                "dry_run": r.dry_run,
                "busy": r.busy,
                "finished": r.finished,
                "duration_seconds": r.duration_seconds,
                "blobs_seen": r.blobs_seen,
                "blobs_deleted": r.blobs_deleted.len(),
                "bytes_reclaimed": r.bytes_reclaimed,
                "manifests_deleted": r.manifests_deleted.len(),
                "errors": r.errors.len(),
                "complete": r.complete,
            })
        })
        .collect();
    json_response(&serde_json::json!({
        "ready": ready.is_ok(),
        "usage": usage,
        "gc": gc,
    }))
}

/// Most pulls one `POST /internal/pulled` may tell (within axum's 2 MiB body limit even
/// with the longest names; a gateway sends at most 1 000).
const MAX_PULLS: usize = 2_000;

#[derive(serde::Deserialize)]
struct Pulled {
    pulls: Vec<PulledManifest>,
}

#[derive(serde::Deserialize)]
struct PulledManifest {
    repository: String,
    digest: String,
}

/// `POST /internal/pulled` (the gateways', with the internal secret): `{"pulls":
/// [{"repository", "digest"}, …]}`, manifests pulled just now; each the repository holds gets
/// its marker (`registry::pulls`). Answers `{"recorded", "skipped", "failed"}` (counts: a
/// write that failed fails that pull alone).
async fn pulled(State(st): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let bad =
        |code: ErrorCode, why: String| ApiError::from(OciError::new(code, why)).into_response();
    let told: Pulled = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => return bad(ErrorCode::Unsupported, format!("not a list of pulls: {e}")),
    };
    if told.pulls.len() > MAX_PULLS {
        return bad(
            ErrorCode::Unsupported,
            format!("at most {MAX_PULLS} pulls at once"),
        );
    }
    let mut pulls = Vec::with_capacity(told.pulls.len());
    for p in told.pulls {
        let Ok(name) = oci::RepositoryName::parse(&p.repository) else {
            return bad(
                ErrorCode::NameInvalid,
                format!("invalid repository name {:?}", p.repository),
            );
        };
        let Ok(digest) = oci::Digest::parse(&p.digest) else {
            return bad(
                ErrorCode::DigestInvalid,
                format!("invalid digest {:?}", p.digest),
            );
        };
        pulls.push((name, digest));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match st.registry.record_pulls(&pulls, now).await {
        Ok(r) => json_response(&serde_json::json!({
            "recorded": r.recorded,
            "skipped": r.skipped,
            "failed": r.failed,
        })),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /gc`: the reports of this node's recent runs, oldest first.
async fn gc_history(State(st): State<Arc<AppState>>) -> Response {
    json_response(&st.gc.history())
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    // Kept up to date as blobs come and go: a scrape costs no walk of the store.
    st.metrics.set_usage(st.registry.usage());
    let mut resp = st.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Checks the internal secret, records metrics, adds the API version header.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    if let Some(secret) = &st.secret {
        let given = req
            .headers()
            .get(INTERNAL_SECRET_HEADER)
            .map(|v| v.as_bytes());
        // Health and metrics are read-only and hold nothing secret: Prometheus and load
        // balancers ask without the secret.
        let open = matches!(req.method().as_str(), "GET" | "HEAD")
            && matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
        if !open && !given.is_some_and(|g| secret.matches(g)) {
            return error::oci_response(&OciError::new(
                ErrorCode::Unauthorized,
                "this service only answers the gateway",
            ));
        }
    }
    let received = content_length(req.headers());
    let mut resp = next.run(req).await;
    let label = resp
        .extensions()
        .get::<EndpointLabel>()
        .map_or("other", |l| l.0);
    let m = &st.metrics;
    m.requests
        .with_label_values(&[label, &method, resp.status().as_str()])
        .inc();
    m.duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    m.bytes_received
        .with_label_values(&[label])
        .inc_by(received);
    m.bytes_sent
        .with_label_values(&[label])
        .inc_by(content_length(resp.headers()));
    match (label, resp.status().as_u16()) {
        ("upload_start", 202) => m.uploads_in_progress.inc(),
        ("upload_finish", 201) | ("upload_cancel", 204) => m.uploads_in_progress.dec(),
        _ => {}
    }
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

pub(crate) fn content_length(h: &axum::http::HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
