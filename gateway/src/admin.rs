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
    pub store: Arc<dyn crate::state::StateStore>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(st): State<Arc<AdminState>>) -> impl IntoResponse {
    // Ready when a storage node passes its health check and the state store answers.
    let mut not = Vec::new();
    if st.upstreams.select(b"", 256).is_none() {
        not.push("no healthy storage node".to_string());
    }
    if let Err(e) = st.store.ping().await {
        not.push(e.to_string());
    }
    if not.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, not.join("\n") + "\n")
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
    st.metrics
        .state_store_up
        .set(i64::from(st.store.ping().await.is_ok()));
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
