//! Gateway configuration (`conf/gateway.toml`): each feature owns its table's type (next to
//! its code); [`Config`] assembles them and checks what spans several. Secrets come from
//! files or the environment, never from this file. Every key can also be set in the
//! environment, over the file or without one: `PORTCULLIS_<TABLE>_<KEY>` ([`SCHEMA`],
//! [`service::env_config`]).

use anyhow::{Context, bail};
use serde::Deserialize;

pub use crate::auth::config::AuthConfig;
pub use crate::edge::tls::TlsConfig;
pub use crate::live_policy::PolicyConfig;
pub use crate::registry::upstream::UpstreamConfig;
pub use crate::token::config::TokenConfig;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client listener (TLS; HTTP/2 by ALPN and HTTP/1.1).
    pub listen: SocketAddr,
    /// Admin listener (plain HTTP): `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// On `SIGTERM`, how long the gateway goes on serving what is in flight (it exits as soon
    /// as nothing is): long enough for a multi-GiB layer at LAN speed.
    #[serde(default = "default_drain")]
    pub drain_seconds: u64,
    /// On `SIGTERM`, how long `/readyz` says not ready before the listeners close (load
    /// balancers stop sending first).
    #[serde(default = "default_drain_delay")]
    pub drain_delay_seconds: u64,
    /// In-place upgrades (`docs/operations.md`): a new binary started with
    /// `gateway serve --upgrade` takes the listening sockets over through this Unix socket
    /// when the running one gets `SIGQUIT`. Unset: `SIGQUIT` drains, as `SIGTERM` does.
    #[serde(default)]
    pub upgrade_socket: Option<std::path::PathBuf>,
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
    /// Pull-through caches of upstream registries (`[[proxy_cache]]`).
    #[serde(default)]
    pub proxy_cache: Vec<crate::cache::ProxyCacheConfig>,
    /// Endpoints that receive registry events (`[[webhooks]]`).
    #[serde(default)]
    pub webhooks: Vec<crate::events::webhooks::WebhookConfig>,
    /// Rules that copy what this registry holds to another one (`[[replication]]`).
    #[serde(default)]
    pub replication: Vec<crate::events::replication::ReplicationConfig>,
    /// Manifest reads answered from the gateway's memory (`[manifest_cache]`, on by default).
    #[serde(default)]
    pub manifest_cache: crate::registry::manifests::ManifestCacheConfig,
}

/// `upgrade_socket` must be an absolute path (short enough for a Unix socket) in a directory
/// of this process's user that no one else may write to: whoever can create the socket there
/// first would be handed the listening sockets.
fn check_upgrade_socket(s: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let shown = s.display();
    if !s.is_absolute() || s.as_os_str().len() >= 100 {
        bail!("upgrade_socket {shown} must be an absolute path of fewer than 100 bytes");
    }
    let dir = s
        .parent()
        .with_context(|| format!("upgrade_socket {shown} has no directory"))?;
    let m = std::fs::metadata(dir)
        .with_context(|| format!("upgrade_socket's directory {}", dir.display()))?;
    if !m.is_dir() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 {
        bail!(
            "upgrade_socket's directory {} must be a directory of the gateway's user that \
             no one else can write to (e.g. mode 0700)",
            dir.display()
        );
    }
    Ok(())
}

/// The default `drain_seconds`.
pub fn default_drain() -> u64 {
    600
}

/// The default `drain_delay_seconds`.
pub fn default_drain_delay() -> u64 {
    5
}

/// Name of the environment variable with the internal secret.
pub const SECRET_ENV: &str = "PORTCULLIS_INTERNAL_SECRET";

/// Where `PORTCULLIS_<…>` variables go: the top-level keys and the tables of [`Config`].
pub const SCHEMA: service::env_config::Schema = service::env_config::Schema {
    keys: &[
        "listen",
        "admin_listen",
        "drain_seconds",
        "drain_delay_seconds",
        "upgrade_socket",
        "proxy_cache",
        "webhooks",
        "replication",
    ],
    tables: &[
        "tls",
        "token",
        "upstream",
        "auth",
        "auth.ldap",
        "policy",
        "oidc",
        "robots",
        "federation",
        "state",
        "state.redis",
        "audit",
        "limits",
        "log",
        "pepper",
        "proxy_protocol",
        "manifest_cache",
    ],
};

impl Config {
    /// The file (if any) with the environment's keys over it, checked.
    pub fn load(path: Option<&Path>) -> anyhow::Result<service::env_config::Loaded<Self>> {
        let loaded: service::env_config::Loaded<Self> = service::env_config::load(path, &SCHEMA)?;
        if path.is_none() && loaded.from_env.is_empty() {
            bail!(
                "no configuration: give --config <file> (or PORTCULLIS_GATEWAY_CONFIG), or set \
                 PORTCULLIS_<TABLE>_<KEY> variables (docs/operations.md)"
            );
        }
        loaded.config.validate()?;
        Ok(loaded)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(s) = &self.upgrade_socket {
            check_upgrade_socket(s)?;
        }
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
        crate::cache::config::validate_all(
            &self.proxy_cache,
            &[self.listen.port(), self.admin_listen.port()],
        )?;
        crate::events::webhooks::WebhookConfig::validate_all(&self.webhooks)?;
        crate::events::replication::ReplicationConfig::validate_all(&self.replication)?;
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
    fn the_shipped_example_set_from_the_environment_alone_is_the_same_config() {
        let text = include_str!("../../conf/gateway.toml");
        let table: toml::Table = toml::from_str(text).unwrap();
        let vars = service::env_config::as_variables(&SCHEMA, &table);
        assert!(vars.len() > 40, "{vars:?}");
        let from_env: service::env_config::Loaded<Config> =
            service::env_config::load_from(None, &SCHEMA, vars).unwrap();
        let from_file: Config = toml::from_str(text).unwrap();
        assert_eq!(format!("{:?}", from_env.config), format!("{from_file:?}"));
        // Over a file, a variable wins; plain text needs no quotes.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gateway.toml");
        std::fs::write(&f, text).unwrap();
        let over: service::env_config::Loaded<Config> = service::env_config::load_from(
            Some(&f),
            &SCHEMA,
            [
                (
                    "PORTCULLIS_LISTEN".to_string(),
                    "127.0.0.1:9443".to_string(),
                ),
                ("PORTCULLIS_TOKEN_EXPIRES_IN_SECONDS".into(), "60".into()),
                ("PORTCULLIS_AUTH_LDAP_STARTTLS".into(), "false".into()),
            ],
        )
        .unwrap();
        assert_eq!(over.config.listen.to_string(), "127.0.0.1:9443");
        assert_eq!(over.config.token.expires_in_seconds, 60);
        assert_eq!(over.from_env.len(), 3);
        // A misspelt key is refused as it is in the file.
        let e = service::env_config::load_from::<Config>(
            Some(&f),
            &SCHEMA,
            [(
                "PORTCULLIS_TOKEN_EXPIRES_IN_SECS".to_string(),
                "60".to_string(),
            )],
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("expires_in_secs"), "{e:#}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = include_str!("../../conf/gateway.toml")
            .replace("expires_in_seconds", "expires_in_secs");
        assert!(toml::from_str::<Config>(&text).is_err());
    }
}
