//! `[[proxy_cache]]`: one upstream registry served under a local prefix (and, optionally,
//! without it on a mirror listener or host name of its own).

use anyhow::{Context, bail};
use policy::pattern::RepoPattern;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyCacheConfig {
    /// The local namespace: `hub` serves `<registry>/hub/library/alpine` from the upstream's
    /// `library/alpine`. One path segment.
    pub prefix: String,
    /// The upstream registry's base URL (`https://registry-1.docker.io`).
    pub url: String,
    /// Credentials for the upstream (Basic, or for its token service); none: anonymous.
    #[serde(default)]
    pub username: Option<String>,
    /// File with the upstream password (required with `username`).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM bundle of CAs the upstream's certificate may chain to (besides the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long a cached tag is served without asking the upstream.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl_seconds: u64,
    /// Upstream repositories that may be pulled through (policy patterns: `library/*`,
    /// `bitnami/**`); empty: all.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// How long the upstream has to answer a request's head (a revalidation that takes
    /// longer serves the cached copy); a body then streams as long as data keeps coming.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// A TLS listener of its own where names arrive without the prefix: docker's
    /// `registry-mirrors`, containerd's `hosts.toml` (same certificate as `listen`).
    #[serde(default)]
    pub mirror_listen: Option<SocketAddr>,
    /// Host names (as clients send them in `Host`, without the port) whose requests arrive
    /// without the prefix, on the main listener.
    #[serde(default)]
    pub mirror_hosts: Vec<String>,
    /// Hosts of the upstream's token service, when not the upstream's own host, that may be
    /// sent the credentials (Docker Hub: `auth.docker.io`).
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    /// Blobs fetched at once from this upstream; a cold pull beyond it gets 503 (try again).
    #[serde(default = "default_max_fetches")]
    pub max_fetches: usize,
    /// Largest blob fetched (by the upstream's `Content-Length`); 0: no limit.
    #[serde(default)]
    pub max_blob_bytes: u64,
    /// Where blobs in flight are spilled (unnamed files, gone when the fetch ends); default
    /// `$TMPDIR`. Needs room for `max_fetches` blobs.
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
}

fn default_max_fetches() -> usize {
    64
}

fn default_tag_ttl() -> u64 {
    300
}
fn default_timeout() -> u64 {
    10
}

impl ProxyCacheConfig {
    /// How to reach the upstream.
    pub fn remote(&self) -> crate::remote::RemoteSettings<'_> {
        crate::remote::RemoteSettings {
            url: &self.url,
            username: self.username.as_deref(),
            password_file: self.password_file.as_deref(),
            ca_file: self.ca_file.as_deref(),
            token_realm_hosts: &self.token_realm_hosts,
            timeout_seconds: self.timeout_seconds,
            actions: "pull",
            user_agent: concat!("portcullis-cache/", env!("CARGO_PKG_VERSION")),
            follow_redirects: true,
        }
    }

    /// Checks one table; `prefix` must be a single lowercase repository-name segment.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.prefix;
        if p.is_empty()
            || p.contains('/')
            || oci::RepositoryName::parse(p).is_err()
            || p.starts_with('_')
        {
            bail!("proxy_cache.prefix {p:?} must be one repository name segment (e.g. \"hub\")");
        }
        let url: reqwest::Url = self
            .url
            .parse()
            .with_context(|| format!("proxy_cache {p}: url {:?}", self.url))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            bail!("proxy_cache {p}: url {:?} is not an http(s) URL", self.url);
        }
        if !url.username().is_empty() || url.password().is_some() {
            bail!("proxy_cache {p}: credentials go in username and password_file, not in url");
        }
        if url.query().is_some() || url.fragment().is_some() {
            bail!(
                "proxy_cache {p}: url {:?} has a query or fragment",
                self.url
            );
        }
        // Longer would overflow the state store's clock arithmetic, and means "never ask".
        if self.tag_ttl_seconds > 366 * 86_400 {
            bail!("proxy_cache {p}: tag_ttl_seconds is at most a year");
        }
        if self.max_fetches == 0 {
            bail!("proxy_cache {p}: max_fetches must be positive");
        }
        if self.mirror_listen.is_some_and(|m| m.port() == 0) {
            bail!("proxy_cache {p}: mirror_listen needs a port (not 0)");
        }
        if self.username.is_some() != self.password_file.is_some() {
            bail!("proxy_cache {p}: username and password_file go together");
        }
        if self.timeout_seconds == 0 {
            bail!("proxy_cache {p}: timeout_seconds must be positive");
        }
        for r in &self.repositories {
            RepoPattern::compile(r)
                .map_err(|e| anyhow::anyhow!("proxy_cache {p}: repositories {r:?}: {e}"))?;
        }
        Ok(())
    }

    /// Reads what the table names (password and CA files), as starting would.
    pub fn check_files(&self) -> anyhow::Result<()> {
        let p = &self.prefix;
        if let Some(f) = &self.password_file
            && service::secrets::read_secret_file(f)
                .with_context(|| format!("proxy_cache {p}: password_file"))?
                .is_empty()
        {
            bail!("proxy_cache {p}: {} is empty", f.display());
        }
        if let Some(f) = &self.ca_file {
            let pem = std::fs::read(f)
                .with_context(|| format!("proxy_cache {p}: reading {}", f.display()))?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("proxy_cache {p}: parsing {}", f.display()))?;
        }
        Ok(())
    }
}

/// Checks every table and what spans them: prefixes and mirrors used once, mirror ports not
/// those of the gateway's `own_ports` (a mirror is told apart by its port).
pub fn validate_all(caches: &[ProxyCacheConfig], own_ports: &[u16]) -> anyhow::Result<()> {
    let mut prefixes = std::collections::HashSet::new();
    let mut listeners = std::collections::HashSet::new();
    let mut hosts = std::collections::HashSet::new();
    for c in caches {
        c.validate()?;
        if !prefixes.insert(c.prefix.as_str()) {
            bail!("proxy_cache prefix {:?} is configured twice", c.prefix);
        }
        if let Some(l) = c.mirror_listen
            && (!listeners.insert(l.port()) || own_ports.contains(&l.port()))
        {
            bail!(
                "proxy_cache {}: mirror_listen {l}: its port is used by another listener",
                c.prefix
            );
        }
        for h in &c.mirror_hosts {
            if !hosts.insert(h.to_ascii_lowercase()) {
                bail!("proxy_cache mirror host {h:?} is configured twice");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> anyhow::Result<ProxyCacheConfig> {
        let c: ProxyCacheConfig = toml::from_str(&format!(
            "prefix = \"hub\"\nurl = \"https://registry-1.docker.io\"\n{extra}"
        ))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn tables_are_checked() {
        let c = table("").unwrap();
        assert_eq!(c.tag_ttl_seconds, 300);
        assert!(table("repositories = [\"library/*\"]").is_ok());
        assert!(table("repositories = [\"Library/*\"]").is_err());
        assert!(
            table("username = \"u\"").is_err(),
            "a user needs a password"
        );
        assert!(table("timeout_seconds = 0").is_err());
        assert!(table("tag_ttl = 1").is_err(), "unknown keys are refused");
        for bad in ["", "a/b", "_x", "Hub"] {
            let c = ProxyCacheConfig {
                prefix: bad.into(),
                ..table("").unwrap()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
        let c = ProxyCacheConfig {
            url: "ftp://x".into(),
            ..table("").unwrap()
        };
        assert!(c.validate().is_err());
        let twice = [table("").unwrap(), table("").unwrap()];
        assert!(validate_all(&twice, &[]).is_err());
        let c = ProxyCacheConfig {
            url: "https://user:pw@registry.example".into(),
            ..table("").unwrap()
        };
        assert!(c.validate().is_err(), "credentials in the url");
        assert!(table("tag_ttl_seconds = 99999999999").is_err());
        assert!(table("mirror_listen = \"127.0.0.1:0\"").is_err());
        let m = table("mirror_listen = \"127.0.0.1:5001\"").unwrap();
        assert!(validate_all(std::slice::from_ref(&m), &[5001]).is_err());
        assert!(validate_all(std::slice::from_ref(&m), &[5000]).is_ok());
        let other = ProxyCacheConfig {
            prefix: "ghcr".into(),
            mirror_listen: Some("10.0.0.2:5001".parse().unwrap()),
            ..m.clone()
        };
        assert!(
            validate_all(&[m, other], &[]).is_err(),
            "two mirrors on one port"
        );
    }
}
