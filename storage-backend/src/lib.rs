//! Portcullis storage service: the OCI Distribution Spec v1.1 API over a content-addressable
//! store, trusting only the gateway.
//!
//! - [`layout`]: the closed set of storage keys and their paths (distribution's layout).
//! - [`driver`]: the dumb object layer ([`driver::Driver`]) and its filesystem implementation.
//! - [`registry`]: registry semantics over a driver: blobs, uploads, manifests, tags,
//!   referrers, catalog.
//! - [`http`]: the axum router; [`http::router`] builds it without a socket.
//! - [`config`]: the TOML configuration (`conf/storage-backend.toml`).
//! - [`audit`]: the tamper-evident audit trail both services write; [`signal`]: `SIGHUP`.
//!
//! The binary (`src/main.rs`) wires these together; `tests/tests/storage.rs` drives the real
//! binary over sockets.

pub mod audit;
pub mod config;
pub mod driver;
pub mod gc;
pub mod http;
pub mod layout;
pub mod registry;
pub mod signal;

use std::sync::Arc;

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
    }))
}
