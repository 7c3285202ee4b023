//! The gateway's side of the audit trail (issue 8). The trail itself — the hash chain, the
//! file, stdout and syslog sinks, `audit verify` — is shared with the storage service
//! (`service::audit`); here every security decision calls [`record`] with an
//! ECS-style action, outcome and fields (logins, tokens, robot administration, registry
//! operations ([`request`]), refusals), and the event gets the request's id, source and user
//! agent from the [`CONTEXT`] the proxy sets. Never pass a password, token or secret.

pub mod request;

pub use service::audit::{
    AuditConfig, GENESIS, SCHEMA_VERSION, SpoolFull, Verdict, hostname, refusing_writes, reopen,
    reopen_on_sighup, sha256_hex, sink, verify, verify_file,
};
use std::sync::Arc;

tokio::task_local! {
    /// The request an event belongs to, set by the proxy around the work of one request.
    pub static CONTEXT: Arc<request::RequestInfo>;
}

/// Starts the gateway's trail (`service::audit::install`).
pub fn install(config: &AuditConfig, instance: &str) -> anyhow::Result<()> {
    service::audit::install(config, instance, "gateway")
}

/// Adds the trail's metrics (`gateway_audit_…`) to `registry`.
pub fn register_metrics(registry: &prometheus::Registry) -> prometheus::Result<()> {
    service::audit::register_metrics(registry, "gateway")
}

/// Records one audit event: `action` (`login`, `token`, `robot-create`, `manifest-pull`…),
/// `outcome` (`success` / `failure`), and more ECS-style fields (an object). Fields of the
/// request being served ([`CONTEXT`]) are added unless `fields` has them.
pub fn record(action: &str, outcome: &str, fields: serde_json::Value) {
    let mut event = service::audit::event_fields(fields);
    let _ = CONTEXT.try_with(|c| c.add_to(&mut event));
    service::audit::record(action, outcome, serde_json::Value::Object(event));
}
