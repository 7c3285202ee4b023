//! `[oidc]`: the identity provider, the client, the claims, and the flows' lifetimes.

use serde::Deserialize;
use std::path::PathBuf;

/// Environment variable with the client secret (when no file is named).
pub const CLIENT_SECRET_ENV: &str = "PORTCULLIS_OIDC_CLIENT_SECRET";

/// `[oidc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The IdP's issuer URL (discovery at `<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// File with the client secret (else `PORTCULLIS_OIDC_CLIENT_SECRET`; none: public client).
    pub client_secret_file: Option<PathBuf>,
    /// The callback URL registered at the IdP; `https://<Host>/auth/oidc/callback` when unset.
    pub redirect_url: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Only groups matching this regular expression are kept (all when unset).
    pub groups_filter: Option<String>,
    /// ID token algorithms accepted (asymmetric only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// How long a started login (browser or device) may take to come back.
    #[serde(default = "default_flow_ttl")]
    pub flow_ttl_seconds: u64,
    /// Groups are read again from the IdP (with its refresh token, so `offline_access`
    /// must be among `scopes`) when a session's are older than this at a refresh grant.
    #[serde(default = "default_groups_refresh")]
    pub groups_refresh_seconds: u64,
    /// End the registry session when the IdP refuses its refresh token (the user was
    /// disabled or signed out there); otherwise keep the groups last read.
    #[serde(default = "default_true")]
    pub revoke_on_refresh_failure: bool,
}

fn default_groups_refresh() -> u64 {
    300
}
fn default_true() -> bool {
    true
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups"]
        .map(String::from)
        .to_vec()
}
fn default_username_claim() -> String {
    "preferred_username".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_algorithms() -> Vec<String> {
    ["RS256", "ES256", "PS256", "EdDSA"]
        .map(String::from)
        .to_vec()
}
fn default_flow_ttl() -> u64 {
    600
}
