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
    /// Registry events, when there are webhooks: their dead letters.
    pub events: Option<Arc<crate::events::webhooks::Events>>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/events/dead-letters", get(dead_letters))
        .route("/events/replay", axum::routing::post(replay))
        .with_state(state)
}

/// `GET /events/dead-letters`: the events a webhook never took, oldest first (JSON).
async fn dead_letters(State(st): State<Arc<AdminState>>) -> axum::response::Response {
    let Some(events) = &st.events else {
        return (StatusCode::NOT_FOUND, "no webhooks are configured\n").into_response();
    };
    match events.outbox.dead_letters().await {
        Ok(d) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "dead_letters": d }).to_string(),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// `POST /events/replay?webhook=<name>&seq=<event number>`: delivers a dead letter again, now,
/// once; `200` when the endpoint took it (the letter goes), `502` with why when not (it stays).
async fn replay(
    State(st): State<Arc<AdminState>>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let Some(events) = &st.events else {
        return (StatusCode::NOT_FOUND, "no webhooks are configured\n").into_response();
    };
    let q: std::collections::HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (Some(webhook), Some(seq)) = (
        q.get("webhook"),
        q.get("seq").and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "webhook and seq (a number) are required\n",
        )
            .into_response();
    };
    match events.replay(webhook, seq).await {
        Ok(()) => (StatusCode::OK, "delivered\n").into_response(),
        Err(crate::events::webhooks::Replay::NotFound(what)) => {
            (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
        }
        Err(crate::events::webhooks::Replay::Failed(why)) => {
            (StatusCode::BAD_GATEWAY, format!("{why}\n")).into_response()
        }
    }
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
