//! Configuration: a TOML file (see `conf/storage-backend.toml`) and/or `PORTCULLIS_<TABLE>_<KEY>`
//! variables over it ([`SCHEMA`], [`service::env_config`]), overridden by flags.

use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use service::log::LogConfig;
/// The internal secret (a `service` type: never printed, wiped on drop).
pub use service::secrets::Secret;
use service::secrets::read_secret_file;

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
    pub gc: GcConfig,
    /// The audit trail of deletions by GC and retention (docs/audit.md); without a file,
    /// stdout or syslog sink they are logged on the `audit` target.
    pub audit: service::audit::AuditConfig,
    /// On `SIGTERM`, how long `/healthz` answers 503 `draining` (gateways' health checks take
    /// the node out) while the node still serves, before its listeners and idle connections
    /// close: longer than the gateways' `health_check_interval_ms`.
    pub drain_delay_seconds: u64,
    /// Then, how long requests in flight are finished; then the process exits.
    pub drain_seconds: u64,
}

/// `[gc]`: online garbage collection (`registry::gc`), scheduled here or run by hand
/// (`storage-backend gc`, `POST /gc` on the admin listener).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Run on a schedule.
    pub enabled: bool,
    /// Seconds between scheduled runs.
    pub interval_seconds: u64,
    /// Only start scheduled runs inside this UTC window, `"HH:MM-HH:MM"` (may wrap midnight).
    pub window: Option<String>,
    /// Blobs and layer links younger than this are kept (pushes in progress).
    pub grace_seconds: u64,
    /// Delete manifests nothing tagged refers to.
    pub delete_untagged: bool,
    pub untagged_grace_seconds: u64,
    /// Upload sessions older than this are purged.
    pub upload_max_age_seconds: u64,
    /// Wait between condemning and re-checking (longer than any request takes).
    pub fence_seconds: f64,
    /// How long the one-run-at-a-time lease holds without renewal.
    pub lease_seconds: u64,
    /// A policy file (`conf/policy.toml`) whose `[[retention]]` rules every run applies
    /// first; unset: no retention.
    pub retention_policy: Option<PathBuf>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: false,
            interval_seconds: 86_400,
            window: None,
            grace_seconds: 3600,
            delete_untagged: false,
            untagged_grace_seconds: 86_400,
            upload_max_age_seconds: 86_400,
            fence_seconds: 30.0,
            lease_seconds: 600,
            retention_policy: None,
        }
    }
}

impl GcConfig {
    /// The retention policy, compiled (errors name file:line).
    pub fn load_retention(&self) -> anyhow::Result<Option<std::sync::Arc<policy::Policy>>> {
        let Some(file) = &self.retention_policy else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading gc.retention_policy {}", file.display()))?;
        let p = policy::Policy::compile(&file.display().to_string(), &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Some(std::sync::Arc::new(p)))
    }

    pub fn options(
        &self,
        dry_run: bool,
        holder: &str,
        retention: Option<std::sync::Arc<policy::Policy>>,
    ) -> crate::registry::GcOptions {
        use std::time::Duration;
        crate::registry::GcOptions {
            dry_run,
            grace: Duration::from_secs(self.grace_seconds),
            delete_untagged: self.delete_untagged,
            untagged_grace: Duration::from_secs(self.untagged_grace_seconds),
            upload_max_age: Duration::from_secs(self.upload_max_age_seconds),
            fence: Duration::from_secs_f64(self.fence_seconds.max(0.0)),
            lease: Duration::from_secs(self.lease_seconds.max(1)),
            holder: holder.to_string(),
            retention,
        }
    }

    /// The window as minutes after midnight UTC, `(start, end)`.
    pub fn window_minutes(&self) -> anyhow::Result<Option<(u32, u32)>> {
        let Some(w) = &self.window else {
            return Ok(None);
        };
        let parse = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        match w
            .split_once('-')
            .and_then(|(a, b)| Some((parse(a)?, parse(b)?)))
        {
            Some(pair) => Ok(Some(pair)),
            None => bail!("gc.window {w:?} is not \"HH:MM-HH:MM\""),
        }
    }
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
            gc: GcConfig::default(),
            audit: service::audit::AuditConfig::default(),
            drain_delay_seconds: 2,
            drain_seconds: 600,
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

/// Name of the environment variable holding the internal secret.
pub const SECRET_ENV: &str = "PORTCULLIS_INTERNAL_SECRET";

/// Where `PORTCULLIS_<…>` variables go: the top-level keys and the tables of [`Config`]
/// (`PORTCULLIS_STORAGE_TYPE=s3`, `PORTCULLIS_STORAGE_BUCKET=…`, `PORTCULLIS_GC_ENABLED=true`).
pub const SCHEMA: service::env_config::Schema = service::env_config::Schema {
    keys: &[
        "listen",
        "admin_listen",
        "drain_delay_seconds",
        "drain_seconds",
    ],
    tables: &["storage", "api", "internal", "log", "gc", "audit"],
};

impl Config {
    /// Reads the config file (if any) with the environment's keys over it.
    pub fn load(path: Option<&Path>) -> anyhow::Result<service::env_config::Loaded<Self>> {
        service::env_config::load(path, &SCHEMA)
    }

    /// The internal secret, from `internal.secret_file` or the environment.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        if let Some(file) = &self.internal.secret_file {
            let s = read_secret_file(file).context("the internal secret file")?;
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
        self.gc.window_minutes()?;
        if self.gc.enabled && self.gc.interval_seconds == 0 {
            bail!("gc.interval_seconds must be positive");
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
    fn the_shipped_example_set_from_the_environment_alone_is_the_same_config() {
        let text = include_str!("../../conf/storage-backend.toml");
        let table: toml::Table = toml::from_str(text).unwrap();
        let vars = service::env_config::as_variables(&SCHEMA, &table);
        assert!(vars.len() > 10, "{vars:?}");
        let from_env: service::env_config::Loaded<Config> =
            service::env_config::load_from(None, &SCHEMA, vars).unwrap();
        let from_file: Config = toml::from_str(text).unwrap();
        assert_eq!(format!("{:?}", from_env.config), format!("{from_file:?}"));
    }

    #[test]
    fn every_key_can_come_from_the_environment() {
        let vars = [
            ("PORTCULLIS_LISTEN", "0.0.0.0:5000"),
            ("PORTCULLIS_STORAGE_TYPE", "s3"),
            ("PORTCULLIS_STORAGE_BUCKET", "registry"),
            ("PORTCULLIS_STORAGE_PATH_STYLE", "true"),
            ("PORTCULLIS_GC_ENABLED", "true"),
            ("PORTCULLIS_GC_WINDOW", "02:00-05:00"),
            ("PORTCULLIS_API_MAX_MANIFEST_BYTES", "1024"),
            ("PORTCULLIS_AUDIT_STDOUT", "true"),
            ("PORTCULLIS_DRAIN_SECONDS", "30"),
            ("PORTCULLIS_STORAGE_CONFIG", "/etc/portcullis/storage.toml"),
            ("PORTCULLIS_INTERNAL_SECRET", "s"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let l: service::env_config::Loaded<Config> =
            service::env_config::load_from(None, &SCHEMA, vars).unwrap();
        assert_eq!(l.from_env.len(), 9);
        let c = l.config;
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        match &c.storage {
            StorageConfig::S3(s3) => assert!(s3.bucket == "registry" && s3.path_style),
            other => panic!("{other:?}"),
        }
        assert!(c.gc.enabled && c.audit.stdout);
        assert_eq!(c.gc.window_minutes().unwrap(), Some((120, 300)));
        assert_eq!((c.api.max_manifest_bytes, c.drain_seconds), (1024, 30));
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
}
