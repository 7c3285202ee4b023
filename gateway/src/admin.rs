//! The admin listener: `/metrics`, `/healthz`, `/readyz` (plain HTTP, keep it internal).

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use std::sync::Arc;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub upstreams: Arc<LoadBalancer<RoundRobin>>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(st): State<Arc<AdminState>>) -> impl IntoResponse {
    // Ready when a storage node passes its health check.
    if st.upstreams.select(b"", 256).is_some() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy storage node\n")
    }
}

async fn metrics(State(st): State<Arc<AdminState>>) -> impl IntoResponse {
    let backends = st.upstreams.backends();
    for b in backends.get_backend().iter() {
        st.metrics
            .upstream_healthy
            .with_label_values(&[&b.addr.to_string()])
            .set(i64::from(backends.ready(b)));
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}

pub async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state)).await?;
    Ok(())
}
