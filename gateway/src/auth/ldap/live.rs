//! The LDAP authenticator in force, replaced when a configuration reload changes `[auth.ldap]`
//! (`reload`): the new one is built whole first — the service account's password read again,
//! the CA file loaded — so a table that does not build changes nothing. Logins under way finish
//! with the one they started with; its connections close when the last of them ends.

use super::{LdapAuthenticator, LdapConfig};
use crate::auth::{AuthError, Authenticator, Identity};
use crate::in_force::InForce;
use crate::state::StateStore;
use std::sync::Arc;

pub struct LiveLdap {
    current: InForce<LdapAuthenticator>,
    cache: Arc<dyn StateStore>,
    pepper: zeroize::Zeroizing<Vec<u8>>,
}

impl LiveLdap {
    pub fn new(cfg: LdapConfig, cache: Arc<dyn StateStore>, pepper: &[u8]) -> anyhow::Result<Self> {
        let first = LdapAuthenticator::new(cfg, cache.clone(), pepper)?;
        Ok(LiveLdap {
            current: InForce::new(first),
            cache,
            pepper: zeroize::Zeroizing::new(pepper.to_vec()),
        })
    }

    /// Builds an authenticator for `cfg`; [`LiveLdap::put`] puts it in force.
    pub fn build(&self, cfg: LdapConfig) -> anyhow::Result<LdapAuthenticator> {
        LdapAuthenticator::new(cfg, self.cache.clone(), &self.pepper)
    }

    /// Whether `next` differs from the one in force: its table, or the service account's
    /// password (rotated in its file or variable).
    pub fn differs(&self, next: &LdapAuthenticator) -> bool {
        let now = self.in_force();
        format!("{:?}", now.cfg) != format!("{:?}", next.cfg)
            || now.bind_password != next.bind_password
    }

    pub fn put(&self, next: LdapAuthenticator) {
        self.current.put(next);
    }

    fn in_force(&self) -> Arc<LdapAuthenticator> {
        self.current.get()
    }
}

#[async_trait::async_trait]
impl Authenticator for LiveLdap {
    fn name(&self) -> &'static str {
        "ldap"
    }

    async fn authenticate(&self, username: &str, password: &str) -> Result<Identity, AuthError> {
        self.in_force().authenticate(username, password).await
    }
}
