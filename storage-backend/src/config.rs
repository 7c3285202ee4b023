//! Configuration: a TOML file (see `conf/storage-backend.toml`), overridden by flags.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The storage service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the API listener.
    pub listen: SocketAddr,
    /// Optional separate listener for `/metrics`, `/healthz`, `/readyz`; when unset they are
    /// served on `listen`.
    pub admin_listen: Option<SocketAddr>,
    pub storage: StorageConfig,
    pub api: ApiConfig,
    pub internal: InternalConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            admin_listen: None,
            storage: StorageConfig::default(),
            api: ApiConfig::default(),
            internal: InternalConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Where content is stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory in distribution's (registry:2) filesystem layout.
    Filesystem { root: PathBuf },
    /// An S3 bucket (or an S3-compatible store), distribution's layout under a prefix.
    S3(crate::driver::object::S3Config),
    /// A container of an Azure Blob Storage account (or Azurite), the same layout.
    Azure(crate::driver::object::AzureConfig),
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig::Filesystem {
            root: PathBuf::from("./data"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Whether manifest, tag and blob `DELETE` are allowed (405 `UNSUPPORTED` otherwise).
    pub delete_enabled: bool,
    /// Largest manifest accepted, in bytes (413 above).
    pub max_manifest_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            delete_enabled: true,
            max_manifest_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The secret the gateway sends on every request over the internal hop.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InternalConfig {
    /// File holding the secret (trailing newline ignored). The environment variable
    /// `PORTCULLIS_INTERNAL_SECRET` is used when this is unset.
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the inputs differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let a = self.0.as_bytes();
        if a.len() != candidate.len() {
            return false;
        }
        a.iter()
            .zip(candidate)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Name of the environment variable holding the internal secret.
pub const SECRET_ENV: &str = "PORTCULLIS_INTERNAL_SECRET";

impl Config {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// The internal secret, from `internal.secret_file` or the environment.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        if let Some(file) = &self.internal.secret_file {
            let s = std::fs::read_to_string(file)
                .with_context(|| format!("reading internal secret file {}", file.display()))?;
            let s = s.trim_end_matches(['\n', '\r']);
            if s.is_empty() {
                bail!("internal secret file {} is empty", file.display());
            }
            return Ok(Some(Secret::new(s)));
        }
        Ok(std::env::var(SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(Secret::new))
    }

    /// Checks what serde cannot: without an internal secret the service only listens on
    /// loopback, since it trusts whoever reaches it.
    pub fn validate(&self, secret: Option<&Secret>) -> anyhow::Result<()> {
        if self.api.max_manifest_bytes == 0 {
            bail!("api.max_manifest_bytes must be positive");
        }
        if secret.is_none() {
            for addr in std::iter::once(self.listen).chain(self.admin_listen) {
                if !addr.ip().is_loopback() {
                    bail!(
                        "refusing to listen on non-loopback address {addr} without an internal secret \
                         (set internal.secret_file or {SECRET_ENV})"
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../conf/storage-backend.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate(None).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("listn = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<Config>("[api]\ndelete = true").is_err());
    }

    #[test]
    fn public_listener_needs_a_secret() {
        let c: Config = toml::from_str("listen = \"0.0.0.0:5000\"").unwrap();
        assert!(c.validate(None).is_err());
        c.validate(Some(&Secret::new("s"))).unwrap();
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter"));
    }
}
