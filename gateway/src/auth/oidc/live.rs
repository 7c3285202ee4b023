//! The OIDC client in force, replaced when a configuration reload changes `[oidc]` or its
//! client secret (`reload`): the new [`Provider`] is built whole first (the secret read again,
//! algorithms and filters checked), and discovers the IdP again on first use. Sign-ins under
//! way keep their state in the shared store and finish with the client in force then.

use super::device::DevicePoll;
use super::{OidcConfig, Outcome, Provider, Reread};
use crate::auth::Identity;
use crate::in_force::InForce;
use crate::reply::Reply;
use crate::state::StateStore;
use std::sync::Arc;

pub struct Oidc {
    current: InForce<Provider>,
    state: Arc<dyn StateStore>,
}

impl Oidc {
    pub fn new(cfg: OidcConfig, state: Arc<dyn StateStore>) -> anyhow::Result<Self> {
        let first = Provider::new(cfg, state.clone())?;
        Ok(Oidc {
            current: InForce::new(first),
            state,
        })
    }

    /// Builds a client for `cfg`; [`Oidc::put`] puts it in force.
    pub fn build(&self, cfg: OidcConfig) -> anyhow::Result<Provider> {
        Provider::new(cfg, self.state.clone())
    }

    /// Whether `next` differs from the client in force: its table, or its client secret.
    pub fn differs(&self, next: &Provider) -> bool {
        let now = self.in_force();
        format!("{:?}", now.cfg) != format!("{:?}", next.cfg) || now.secret != next.secret
    }

    pub fn put(&self, next: Provider) {
        self.current.put(next);
    }

    fn in_force(&self) -> Arc<Provider> {
        self.current.get()
    }

    /// [`Provider::start`].
    pub async fn start(&self, host: &str, device: &str) -> anyhow::Result<(String, String)> {
        self.in_force().start(host, device).await
    }

    /// [`Provider::start_console`].
    pub async fn start_console(&self, host: &str) -> anyhow::Result<(String, String)> {
        self.in_force().start_console(host).await
    }

    /// [`Provider::finish`].
    pub async fn finish(&self, query: &str, cookies: Option<&str>) -> Outcome {
        self.in_force().finish(query, cookies).await
    }

    /// [`Provider::groups_refresh_seconds`].
    pub fn groups_refresh_seconds(&self) -> i64 {
        self.in_force().groups_refresh_seconds()
    }

    /// [`Provider::revoke_on_refresh_failure`].
    pub fn revoke_on_refresh_failure(&self) -> bool {
        self.in_force().revoke_on_refresh_failure()
    }

    /// [`Provider::reread`].
    pub async fn reread(&self, idp_refresh: &str, subject: &str) -> Reread {
        self.in_force().reread(idp_refresh, subject).await
    }

    /// [`Provider::verify_id_token`].
    pub async fn verify_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
    ) -> anyhow::Result<Result<Identity, String>> {
        self.in_force().verify_id_token(token, nonce).await
    }

    /// [`Provider::device_start`].
    pub async fn device_start(
        &self,
        host: &str,
        device: &str,
    ) -> anyhow::Result<serde_json::Value> {
        self.in_force().device_start(host, device).await
    }

    /// [`Provider::verify_page`].
    pub async fn verify_page(
        &self,
        host: &str,
        method: &str,
        query: &str,
        body: &[u8],
        cookies: Option<&str>,
    ) -> Reply {
        self.in_force()
            .verify_page(host, method, query, body, cookies)
            .await
    }

    /// [`Provider::device_poll`].
    pub async fn device_poll(&self, device_code: &str) -> DevicePoll {
        self.in_force().device_poll(device_code).await
    }
}
