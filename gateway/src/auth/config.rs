//! `[auth]`: the password sources (static users and their groups, LDAP).

use serde::Deserialize;
use std::path::PathBuf;

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
