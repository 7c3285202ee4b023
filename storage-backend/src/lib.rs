//! Portcullis storage service: the OCI Distribution Spec v1.1 API over a content-addressable
//! store, trusting only the gateway.
//!
//! - [`layout`]: the closed set of storage keys and their paths (distribution's layout).
//! - [`driver`]: the dumb object layer ([`driver::Driver`]) and its filesystem implementation.
//! - [`registry`]: registry semantics over a driver: blobs, uploads, manifests, tags,
//!   referrers, catalog.
//! - [`http`]: the axum router; [`http::router`] builds it without a socket.
//! - [`config`]: the TOML configuration (`conf/storage-backend.toml`).
//! - [`gc`]: online garbage collection and retention ([`schedule_gc`] runs it on a timer).
//!
//! The audit trail, `SIGHUP`, secret files, `[log]` and the hop's headers are the `service`
//! crate's (shared with the gateway).
//!
//! The binary (`src/main.rs`) wires these together; `tests/tests/storage.rs` drives the real
//! binary over sockets.

pub mod config;
pub mod driver;
pub mod gc;
pub mod http;
pub mod layout;
pub mod registry;

use std::sync::Arc;

/// Runs GC every `gc.interval_seconds` (inside the window, if one is set), forever. Here, in
/// the wiring, because it needs both the GC service and the HTTP state's metrics.
pub async fn schedule_gc(state: Arc<http::AppState>) {
    let interval = std::time::Duration::from_secs(state.gc.config.interval_seconds.max(1));
    let window = state.gc.config.window_minutes().ok().flatten();
    loop {
        tokio::time::sleep(interval).await;
        if let Some((start, end)) = window
            && !gc::in_window(start, end, gc::minutes_now())
        {
            continue;
        }
        let _ = state.gc.run(false, &state.metrics).await;
    }
}

/// Measures the store's usage once (a walk of every blob, in the background at start-up);
/// the registry keeps it up to date after, and each GC run measures it again.
pub async fn measure_usage(state: Arc<http::AppState>) {
    let t = std::time::Instant::now();
    match state.registry.measure_usage().await {
        Ok(()) => tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            "storage usage measured"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "measuring storage usage failed; the next GC run measures it"
        ),
    }
}

/// Builds the shared state from a loaded configuration.
pub fn build_state(
    config: &config::Config,
    secret: Option<config::Secret>,
) -> anyhow::Result<Arc<http::AppState>> {
    let driver: Arc<dyn driver::Driver> = match &config.storage {
        config::StorageConfig::Filesystem { root } => {
            Arc::new(driver::fs::FsDriver::new(root.clone()))
        }
        config::StorageConfig::S3(s3) => Arc::new(driver::object::ObjectDriver::s3(s3)?),
        config::StorageConfig::Azure(az) => Arc::new(driver::object::ObjectDriver::azure(az)?),
    };
    let registry = Arc::new(registry::Registry::new(
        driver,
        registry::RegistryOptions {
            max_manifest_bytes: config.api.max_manifest_bytes,
        },
    ));
    Ok(Arc::new(http::AppState {
        gc: Arc::new(gc::GcService::new(registry.clone(), config.gc.clone())?),
        registry,
        delete_enabled: config.api.delete_enabled,
        secret,
        metrics: http::metrics::Metrics::new(),
        draining: Default::default(),
    }))
}
