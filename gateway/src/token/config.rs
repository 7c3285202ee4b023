//! `[token]`: the token service's issuer, audience, keys and lifetimes.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// `iss` of issued tokens, and the only issuer accepted.
    pub issuer: String,
    /// `service` clients name in token requests; the `aud` of issued tokens.
    pub service: String,
    /// The token endpoint URL sent in `WWW-Authenticate`. Unset: `https://<Host>/token`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Lifetime of access tokens.
    #[serde(default = "default_expires")]
    pub expires_in_seconds: u64,
    /// PEM files of EC P-256 private keys (PKCS#8). The first signs; all verify, so keys
    /// rotate by adding the new key first and removing the old one after `expires_in_seconds`.
    pub signing_keys: Vec<PathBuf>,
    /// Absolute lifetime of refresh tokens.
    #[serde(default = "default_refresh_absolute")]
    pub refresh_absolute_hours: u64,
    /// A refresh token unused for this long expires.
    #[serde(default = "default_refresh_idle")]
    pub refresh_idle_hours: u64,
    /// How often each gateway reloads the shared list of revoked access tokens: a token
    /// revoked on another replica is refused here within this time.
    #[serde(default = "default_revocation_sync")]
    pub revocation_sync_ms: u64,
}

fn default_expires() -> u64 {
    300
}
fn default_refresh_absolute() -> u64 {
    24 * 30
}
fn default_revocation_sync() -> u64 {
    1000
}
fn default_refresh_idle() -> u64 {
    24 * 7
}
