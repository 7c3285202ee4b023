//! What every consumer of the outbox (a `[[webhooks]]` endpoint, a `[[replication]]` rule)
//! shares in its table: the rule for its name, and the back-off between attempts.

use std::time::Duration;

/// The pause before attempt `attempt + 1` of a delivery: 1 s, doubling, at most `max`
/// seconds.
pub fn backoff(attempt: u32, max: u64) -> Duration {
    let s = 1u64 << attempt.saturating_sub(1).min(16);
    Duration::from_secs(s.min(max))
}

/// Checks a consumer's name (`table`: `webhooks` or `replication`, for the message): letters,
/// digits, `-` and `_`, 1–64 of them — never a dot, so a webhook's name is never a rule's
/// key (`replication.<name>`).
pub fn check_name(table: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        anyhow::bail!("{table}: name {name:?}: letters, digits, - and _ only (1–64)");
    }
    Ok(())
}
