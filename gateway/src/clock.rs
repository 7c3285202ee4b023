//! The time the gateway decides with: seconds since the Unix epoch (token lifetimes, sessions,
//! lockouts). A leaf: it imports nothing of the gateway's.

/// Now, in whole seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
