//! The admin listener: `/metrics`, `/healthz`, `/readyz`, the events' dead letters and the
//! replication rules' status (plain HTTP, keep it internal).

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
    /// Registry events, when there are webhooks or replication rules.
    pub events: Option<Arc<crate::events::delivery::Events>>,
    /// Not ready while draining.
    pub drain: Arc<crate::drain::Drain>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/events/dead-letters", get(dead_letters))
        .route("/events/replay", axum::routing::post(replay))
        .route("/replication", get(replication))
        .route("/replication/reconcile", axum::routing::post(reconcile))
        .route("/replication/drift", get(drift))
        .with_state(state)
}

/// `GET /events/dead-letters`: the events a consumer (a webhook, or `replication.<rule>`)
/// never took, by consumer and number (JSON).
async fn dead_letters(State(st): State<Arc<AdminState>>) -> axum::response::Response {
    let Some(events) = &st.events else {
        return (
            StatusCode::NOT_FOUND,
            "no webhooks or replication rules are configured\n",
        )
            .into_response();
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
        return (
            StatusCode::NOT_FOUND,
            "no webhooks or replication rules are configured\n",
        )
            .into_response();
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
        Err(crate::events::delivery::Replay::NotFound(what)) => {
            (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
        }
        Err(crate::events::delivery::Replay::Failed(why)) => {
            (StatusCode::BAD_GATEWAY, format!("{why}\n")).into_response()
        }
    }
}

fn json(v: serde_json::Value) -> axum::response::Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// `GET /replication`: every rule — its target, its status (last success, last error, the
/// last reconciliation's figures) and its lag (events recorded it has not taken yet).
async fn replication(State(st): State<Arc<AdminState>>) -> axum::response::Response {
    let Some(events) = &st.events else {
        return json(serde_json::json!({ "rules": [] }));
    };
    let head = match events.outbox.head().await {
        Ok(h) => h,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let mut rules = Vec::new();
    for r in &events.consumers().rules {
        let (status, cursor) = match (
            r.status().await,
            events.outbox.cursor_if_any(&r.key()).await,
        ) {
            (Ok(s), Ok(c)) => (s, c),
            (Err(e), _) | (_, Err(e)) => {
                return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
            }
        };
        rules.push(serde_json::json!({
            "name": r.cfg.name,
            "target": r.cfg.url,
            "deletes": r.cfg.deletes,
            "lag_events": cursor.map(|c| head.saturating_sub(c)),
            "status": status,
        }));
    }
    json(serde_json::json!({ "rules": rules }))
}

fn rule_query(uri: &axum::http::Uri) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "rule")
        .map(|(_, v)| v.into_owned())
}

/// `POST /replication/reconcile?rule=<name>`: the rule's delivering node reconciles at its
/// next idle moment (`202`, with the request's id: the status's `reconciliation.answered`
/// is that id once it ran).
async fn reconcile(
    State(st): State<Arc<AdminState>>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let Some(rule) = find_rule(&st, &uri) else {
        return (StatusCode::NOT_FOUND, "no such replication rule\n").into_response();
    };
    match rule.request_reconciliation().await {
        Ok(at) => {
            crate::audit::record(
                "replication-reconcile",
                "success",
                serde_json::json!({ "rule": rule.cfg.name }),
            );
            (
                StatusCode::ACCEPTED,
                json(serde_json::json!({ "requested": at })),
            )
                .into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// `GET /replication/drift?rule=<name>`: compares every tag the rule covers here and at the
/// target, now, changing nothing; the report (`drift` is the number of tags not as here).
/// One at a time per rule on a gateway (`409` meanwhile): it reads every tag on both sides.
async fn drift(
    State(st): State<Arc<AdminState>>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let Some(rule) = find_rule(&st, &uri) else {
        return (StatusCode::NOT_FOUND, "no such replication rule\n").into_response();
    };
    let Some(report) = rule.check().await else {
        return (
            StatusCode::CONFLICT,
            "a check of this rule is running on this gateway; ask again when it ends\n",
        )
            .into_response();
    };
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    v["drift"] = report.drift().into();
    json(v)
}

fn find_rule(
    st: &AdminState,
    uri: &axum::http::Uri,
) -> Option<Arc<crate::events::replication::Replicator>> {
    let name = rule_query(uri)?;
    st.events
        .as_ref()?
        .consumers()
        .rules
        .iter()
        .find(|r| r.cfg.name == name)
        .cloned()
}

async fn readyz(State(st): State<Arc<AdminState>>) -> impl IntoResponse {
    // Ready when a storage node passes its health check and the state store answers.
    let mut not = Vec::new();
    // (An upgrade's old process stays ready: the port is served, by the new process.)
    if st.drain.draining() && !st.drain.upgrading() {
        not.push("draining: finishing what is in flight".to_string());
    }
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

/// Binds the admin listener. `shared` (in-place upgrades): with `SO_REUSEPORT`, so that the
/// new process binds it while the old one still holds it (the kernel lets only processes of
/// the same user share it).
pub fn bind(addr: std::net::SocketAddr, shared: bool) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context;
    if !shared {
        return std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the admin listener {addr}"));
    }
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("binding the admin listener {addr}"))?;
    nix::sys::socket::listen(&fd, Backlog::new(128)?)?;
    Ok(std::net::TcpListener::from(fd))
}

pub async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state)).await?;
    Ok(())
}
