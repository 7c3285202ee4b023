//! `[auth.ldap]`: the directory, how users and their groups are found, timeouts and the
//! login cache.

use anyhow::bail;
use serde::Deserialize;
use std::path::PathBuf;

/// Where a user's groups come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSource {
    /// The `memberOf` attribute of the user entry (OpenLDAP memberof overlay, AD).
    MemberOf,
    /// A search under `group_base_dn` with `group_filter`.
    Search,
    /// No groups from the directory.
    None,
}

/// `[auth.ldap]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// Servers tried in order (`ldap://` or `ldaps://`); the last one that answered goes first.
    pub urls: Vec<String>,
    /// Upgrade `ldap://` connections with StartTLS.
    #[serde(default)]
    pub starttls: bool,
    /// CA certificates (PEM) that sign the servers' certificates; the system's when unset.
    pub ca_file: Option<PathBuf>,
    /// The read-only service account used for searches (search-then-bind mode).
    pub bind_dn: Option<String>,
    /// File with the service account's password (else `PORTCULLIS_LDAP_BIND_PASSWORD`).
    pub bind_password_file: Option<PathBuf>,
    /// Direct bind mode: the user's DN, `{username}` replaced by the escaped username.
    pub bind_dn_template: Option<String>,
    /// Where users are searched.
    pub user_base_dn: String,
    /// Extra condition ANDed with `(<username_attribute>=<username>)`.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    #[serde(default = "default_username_attribute")]
    pub username_attribute: String,
    #[serde(default = "default_group_source")]
    pub groups: GroupSource,
    /// Where groups are searched (`groups = "search"`).
    pub group_base_dn: Option<String>,
    /// Groups of a user; `{dn}` is the user's DN, `{username}` the username, both escaped.
    /// For Active Directory with nesting: `(member:1.2.840.113556.1.4.1941:={dn})`.
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    /// Groups containing a group, for nesting; `{dn}` is the inner group's DN.
    #[serde(default = "default_nested_group_filter")]
    pub nested_group_filter: String,
    /// The attribute whose value names a group for policy.
    #[serde(default = "default_group_name_attribute")]
    pub group_name_attribute: String,
    /// Levels of nested groups followed (0: direct groups only).
    #[serde(default)]
    pub nested_depth: u32,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_operation_timeout_ms")]
    pub operation_timeout_ms: u64,
    /// Total time one login may take, all servers and operations included.
    #[serde(default = "default_login_budget_ms")]
    pub login_budget_ms: u64,
    /// Connections kept for user binds.
    #[serde(default = "default_bind_pool")]
    pub bind_pool_size: usize,
    /// How long a successful login (and its groups) is remembered; 0 turns the cache off.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_seconds: u64,
}

fn default_user_filter() -> String {
    "(objectClass=*)".into()
}
fn default_username_attribute() -> String {
    "uid".into()
}
fn default_group_source() -> GroupSource {
    GroupSource::Search
}
fn default_group_filter() -> String {
    "(|(&(objectClass=groupOfNames)(member={dn}))(&(objectClass=groupOfUniqueNames)(uniqueMember={dn}))(&(objectClass=posixGroup)(memberUid={username})))".into()
}
fn default_nested_group_filter() -> String {
    "(|(&(objectClass=groupOfNames)(member={dn}))(&(objectClass=groupOfUniqueNames)(uniqueMember={dn})))".into()
}
fn default_group_name_attribute() -> String {
    "cn".into()
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_operation_timeout_ms() -> u64 {
    3000
}
fn default_login_budget_ms() -> u64 {
    5000
}
fn default_bind_pool() -> usize {
    4
}
fn default_cache_ttl() -> u64 {
    60
}

impl LdapConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.urls.is_empty() {
            bail!("auth.ldap.urls is empty");
        }
        for u in &self.urls {
            if !(u.starts_with("ldap://") || u.starts_with("ldaps://")) {
                bail!("auth.ldap.urls: {u:?} is not an ldap:// or ldaps:// URL");
            }
        }
        match (&self.bind_dn, &self.bind_dn_template) {
            (None, None) => {
                bail!(
                    "auth.ldap needs bind_dn (search then bind) or bind_dn_template (direct bind)"
                )
            }
            (_, Some(t)) if !t.contains("{username}") => {
                bail!("auth.ldap.bind_dn_template must contain {{username}}")
            }
            _ => {}
        }
        if self.groups == GroupSource::Search && self.group_base_dn.is_none() {
            bail!("auth.ldap.groups = \"search\" needs group_base_dn");
        }
        if self.login_budget_ms == 0 || self.operation_timeout_ms == 0 {
            bail!("auth.ldap timeouts must be positive");
        }
        Ok(())
    }
}
