//! `SIGHUP`: what both services do again on it (reopen the audit file; in the gateway also
//! read the TLS certificate, the policy, the htpasswd users and the config file again).

/// Runs `then` on every `SIGHUP`, for ever (on a tokio runtime). If the signal cannot be
/// listened for, says so once — `never` tells what then never happens — and returns.
pub async fn on_sighup(never: &str, mut then: impl FnMut() + Send) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; {never}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        then();
    }
}
