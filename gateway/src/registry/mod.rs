//! The `/v2/` path: whether a request goes to storage ([`Registry::admit`]: the audit
//! trail's health, the bearer check of [`authz`], the rate limits), how it and its answer
//! are rewritten on the way ([`forward`]), and the storage nodes it goes to ([`upstream`]);
//! [`internal`] is the gateway's own requests to them, [`data`] what it reads with them;
//! [`manifests`] answers manifest reads from memory while the repository has not changed;
//! [`local`] answers blob reads from a co-located filesystem store; [`pulls`] tells storage
//! which manifests were pulled (for retention).

pub mod authz;
pub mod data;
pub mod forward;
pub mod internal;
pub mod local;
pub mod manifests;
pub mod pulls;
pub mod upstream;

use crate::audit::request::Operation;
use crate::limits::{Endpoint, Limits};
use crate::reply::{Failure, Kind};
use authz::{Authz, Verdict};
use pingora::http::RequestHeader;
use std::sync::Arc;

pub struct Registry {
    pub authz: Authz,
    /// The `/v2/` rate limits (none by default), shared with the token service.
    pub limits: Arc<Limits>,
}

impl Registry {
    /// What to do with a `/v2/` request from `source`; what its audit event needs goes into
    /// `op`.
    pub async fn admit(
        &self,
        req: &RequestHeader,
        op: &mut Operation,
        source: Option<&str>,
    ) -> Verdict {
        if crate::audit::refusing_writes()
            && !matches!(req.method, http::Method::GET | http::Method::HEAD)
        {
            let why = "the audit trail cannot be delivered; writes are refused until it recovers";
            return Verdict::Respond {
                route: "refused",
                failure: Failure::new(503, Kind::Unavailable, why),
            };
        }
        let verdict = self.authz.check(req, op);
        if let Some(l) = self.rate_limited(op, source).await {
            op.reason = Some(format!("rate limited ({})", l.by.name()));
            return Verdict::Respond {
                route: "limited",
                failure: Failure::new(429, Kind::TooMany, "too many requests, try again later")
                    .with_header("retry-after", l.retry_after.to_string()),
            };
        }
        verdict
    }

    /// The `/v2/` rate limits, per source and per identity. A limit the state store cannot
    /// count lets the request through.
    async fn rate_limited(
        &self,
        op: &Operation,
        source: Option<&str>,
    ) -> Option<crate::limits::Limited> {
        let cfg = self.limits.config();
        if cfg.registry_per_minute_per_source == 0 && cfg.registry_per_minute_per_user == 0 {
            return None;
        }
        let user = op.user.as_ref().map(|u| u.name.as_str());
        self.limits
            .over_rate(Endpoint::Registry, source, user)
            .await
    }
}
