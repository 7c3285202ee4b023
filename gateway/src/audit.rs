//! The audit hook. Security decisions (robot and CI logins, token issuance to machines, robot
//! administration) call [`record`] with an ECS-style action, outcome and fields. Until the
//! audit trail with its sinks and chain hashes lands, events go to the log as one JSON object
//! under the `audit` target. Never pass a password, token or secret.

/// Records one audit event: `action` (`login`, `token`, `robot-create`…), `outcome`
/// (`success` / `failure`), and more ECS-style fields.
pub fn record(action: &str, outcome: &str, mut fields: serde_json::Value) {
    if let Some(o) = fields.as_object_mut() {
        o.insert("event.action".into(), action.into());
        o.insert("event.outcome".into(), outcome.into());
    }
    tracing::info!(target: "audit", event = %fields);
}
