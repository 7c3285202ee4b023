//! Gateway configuration (`conf/gateway.toml`). Secrets come from files or the environment,
//! never from this file.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client listener (TLS; HTTP/2 by ALPN and HTTP/1.1).
    pub listen: SocketAddr,
    /// Admin listener (plain HTTP): `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    pub tls: TlsConfig,
    pub token: TokenConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    /// OIDC single sign-on in the browser (`/auth/oidc/login`).
    pub oidc: Option<crate::auth::oidc::OidcConfig>,
    /// Robot accounts (always on; this table changes their limits).
    #[serde(default)]
    pub robots: crate::auth::robots::RobotsConfig,
    /// CI workload-identity federation: trusted CI token issuers.
    pub federation: Option<crate::auth::federation::FederationConfig>,
    #[serde(default)]
    pub state: crate::state::StateConfig,
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// Lockouts after failed logins and rate limits (`[limits]`).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// `[log] format = "pretty" | "json"` (stderr; `--log-format` overrides it).
    #[serde(default)]
    pub log: service::log::LogConfig,
    /// The pepper of stored robot secrets and the LDAP login cache (`[pepper]`).
    #[serde(default)]
    pub pepper: crate::auth::pepper::PepperConfig,
    /// The PROXY protocol from trusted load balancers on the TLS listener
    /// (`[proxy_protocol]`).
    #[serde(default)]
    pub proxy_protocol: Option<crate::edge::proxy_protocol::ProxyProtocolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// A connection must send its first byte (the TLS hello, or a PROXY header) within this
    /// time or it is closed (`edge`).
    #[serde(default = "default_hello_ms")]
    pub hello_timeout_ms: u64,
    /// A connection between requests (HTTP/1.1 keep-alive, HTTP/2 with no stream open) is
    /// closed after this long; whatever the client asks in `Keep-Alive: timeout=`.
    #[serde(default = "default_client_idle_s")]
    pub idle_timeout_seconds: u64,
}

fn default_hello_ms() -> u64 {
    10_000
}
fn default_client_idle_s() -> u64 {
    60
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Storage nodes, `host:port`.
    pub nodes: Vec<String>,
    /// Active health check (`GET /healthz`) interval.
    #[serde(default = "default_health_ms")]
    pub health_check_interval_ms: u64,
    /// Idle timeout of upstream reads and writes (not a total timeout: big blobs stream on).
    #[serde(default = "default_idle_s")]
    pub idle_timeout_seconds: u64,
    /// File with the internal secret; `PORTCULLIS_INTERNAL_SECRET` when unset.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

fn default_health_ms() -> u64 {
    1000
}
fn default_idle_s() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// bcrypt htpasswd file of static users (asked first when LDAP is configured too).
    pub htpasswd_file: Option<PathBuf>,
    /// Groups of static users: group name → user names.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// LDAP / Active Directory users (asked after the static users).
    pub ldap: Option<crate::auth::ldap::LdapConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub file: PathBuf,
}

/// Name of the environment variable with the internal secret.
pub const SECRET_ENV: &str = "PORTCULLIS_INTERNAL_SECRET";

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.upstream.nodes.is_empty() {
            bail!("upstream.nodes is empty");
        }
        if self.token.signing_keys.is_empty() {
            bail!("token.signing_keys is empty");
        }
        if self.token.expires_in_seconds == 0 {
            bail!("token.expires_in_seconds must be positive");
        }
        if self.auth.htpasswd_file.is_none() && self.auth.ldap.is_none() {
            bail!("[auth] needs htpasswd_file, [auth.ldap], or both");
        }
        if let Some(l) = &self.auth.ldap {
            l.validate()?;
        }
        Ok(())
    }

    /// The internal secret from `upstream.secret_file` or the environment (wiped from memory
    /// when dropped).
    pub fn secret(&self) -> anyhow::Result<zeroize::Zeroizing<String>> {
        if let Some(f) = &self.upstream.secret_file {
            let s = zeroize::Zeroizing::new(service::secrets::read_secret_file(f)?);
            if s.is_empty() {
                bail!("{} is empty", f.display());
            }
            return Ok(s);
        }
        std::env::var(SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(zeroize::Zeroizing::new)
            .with_context(|| {
                format!("no internal secret: set upstream.secret_file or {SECRET_ENV}")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_and_validates() {
        let c: Config = toml::from_str(include_str!("../../conf/gateway.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.upstream.nodes.len(), 2);
        assert_eq!(c.auth.groups["team-a"], ["bob"]);
        let ldap = c.auth.ldap.as_ref().expect("the example configures LDAP");
        assert_eq!(ldap.urls.len(), 2);
        assert_eq!(ldap.cache_ttl_seconds, 60);
        let oidc = c.oidc.as_ref().expect("the example configures OIDC");
        assert_eq!(oidc.client_id, "portcullis");
        assert_eq!(c.robots.rotation_overlap_seconds, 3600);
        assert!(c.state.file.is_some());
        assert!(c.audit.file.is_some());
        let f = c
            .federation
            .clone()
            .expect("the example configures federation");
        assert_eq!(f.issuers.len(), 2);
        assert_eq!(
            f.issuers[0].issuer,
            "https://token.actions.githubusercontent.com"
        );
        crate::auth::federation::Federation::new(f).expect("the example federation compiles");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = include_str!("../../conf/gateway.toml")
            .replace("expires_in_seconds", "expires_in_secs");
        assert!(toml::from_str::<Config>(&text).is_err());
    }
}
