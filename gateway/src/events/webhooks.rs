//! Webhooks: `[[webhooks]]` endpoints that receive every matching registry event.
//!
//! Delivery: one `POST` per event, in the outbox's order, with the event's id in
//! `Portcullis-Event-Id` (the same on every retry: the receiver's idempotency key) and, with a
//! `secret_file`, `Portcullis-Timestamp` and `Portcullis-Signature: sha256=<hex HMAC-SHA256 of
//! "<timestamp>.<body>">`. A 2xx answer
//! takes the event; anything else (or no answer within `timeout_seconds`) is retried with a
//! doubling back-off up to `max_backoff_seconds`, `max_attempts` times in all; then the event
//! becomes a dead letter (audited, listed and replayed on the admin listener) and the next one
//! goes. Nothing after a failing event is sent before it: order per repository holds. The
//! delivery loop, one node of a deployment at a time, is [`super::delivery`]'s.

use super::Event;
use anyhow::{Context, bail};
use policy::pattern::RepoPattern;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Longest `timeout_seconds`.
const MAX_TIMEOUT: u64 = 9;

/// The body's shape.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CloudEvents 1.0, structured mode (`application/cloudevents+json`).
    #[default]
    Cloudevents,
    /// distribution's notification envelope (`{"events": [...]}`).
    Distribution,
}

/// One `[[webhooks]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names it in metrics, audit and the admin listener (letters, digits, `-`, `_`).
    pub name: String,
    pub url: String,
    /// Repository patterns (policy syntax) whose events it gets; none: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// `push`, `tag-move`, `delete`, `tag-delete`; none: every action.
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub format: Format,
    /// A file holding the HMAC key for `Portcullis-Signature`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an `https` URL, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff")]
    pub max_backoff_seconds: u64,
}

fn default_timeout() -> u64 {
    5
}
fn default_attempts() -> u32 {
    12
}
fn default_backoff() -> u64 {
    30
}

const ACTIONS: [&str; 4] = ["push", "tag-move", "delete", "tag-delete"];

impl WebhookConfig {
    /// Checks one table (and that names are unique across `all`).
    pub fn validate_all(all: &[WebhookConfig]) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for w in all {
            let n = &w.name;
            super::consumer::check_name("webhooks", n)?;
            if !names.insert(n.clone()) {
                bail!("webhooks: name {n:?} is used twice");
            }
            let url = reqwest::Url::parse(&w.url)
                .map_err(|e| anyhow::anyhow!("webhooks {n}: url: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") {
                bail!("webhooks {n}: url must be http or https");
            }
            for r in &w.repositories {
                RepoPattern::compile(r)
                    .map_err(|e| anyhow::anyhow!("webhooks {n}: repositories {r:?}: {e}"))?;
            }
            if let Some(a) = w.actions.iter().find(|a| !ACTIONS.contains(&a.as_str())) {
                bail!("webhooks {n}: unknown action {a:?} (push, tag-move, delete, tag-delete)");
            }
            if w.timeout_seconds == 0 || w.timeout_seconds > MAX_TIMEOUT {
                bail!("webhooks {n}: timeout_seconds must be between 1 and {MAX_TIMEOUT}");
            }
            if w.max_attempts == 0 || w.max_backoff_seconds == 0 {
                bail!("webhooks {n}: max_attempts and max_backoff_seconds must be positive");
            }
        }
        Ok(())
    }
}

/// A webhook ready to deliver.
pub struct Webhook {
    pub cfg: WebhookConfig,
    patterns: Vec<RepoPattern>,
    secret: Option<zeroize::Zeroizing<Vec<u8>>>,
    http: reqwest::Client,
}

impl Webhook {
    pub fn new(cfg: WebhookConfig) -> anyhow::Result<Self> {
        let n = cfg.name.clone();
        let patterns = cfg
            .repositories
            .iter()
            .map(|r| RepoPattern::compile(r).map_err(|e| anyhow::anyhow!("{r:?}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let secret = match &cfg.secret_file {
            Some(f) => {
                let key = zeroize::Zeroizing::new(
                    service::secrets::read_secret_file(f)
                        .with_context(|| format!("webhooks {n}: secret_file"))?
                        .into_bytes(),
                );
                if key.is_empty() {
                    bail!("webhooks {n}: {} is empty", f.display());
                }
                Some(key)
            }
            None => None,
        };
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_seconds))
            .connect_timeout(Duration::from_secs(cfg.timeout_seconds))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("webhooks {n}: reading {}", ca.display()))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("webhooks {n}: {}", ca.display()))?
            {
                http = http.add_root_certificate(c);
            }
        }
        Ok(Webhook {
            patterns,
            secret,
            http: http.build()?,
            cfg,
        })
    }

    /// Whether `event` is for this webhook.
    pub fn wants(&self, event: &Event) -> bool {
        (self.patterns.is_empty()
            || self
                .patterns
                .iter()
                .any(|p| p.matches(&event.repository, None)))
            && (self.cfg.actions.is_empty()
                || self.cfg.actions.iter().any(|a| a == event.kind.action()))
    }

    /// The request body and its content type.
    fn body(&self, event: &Event) -> (Vec<u8>, &'static str) {
        match self.cfg.format {
            Format::Cloudevents => (
                event.cloudevent().to_string().into_bytes(),
                "application/cloudevents+json",
            ),
            Format::Distribution => (
                serde_json::json!({"events": [event.distribution()]})
                    .to_string()
                    .into_bytes(),
                "application/vnd.docker.distribution.events.v1+json",
            ),
        }
    }

    /// One delivery attempt; why it failed (no URL in it: one may carry credentials).
    pub async fn post(&self, event: &Event, attempt: u32) -> Result<(), String> {
        let (body, content_type) = self.body(event);
        let mut req = self
            .http
            .post(&self.cfg.url)
            .header("content-type", content_type)
            .header("portcullis-event-id", &event.id)
            .header("portcullis-delivery-attempt", attempt.to_string());
        if let Some(key) = &self.secret {
            // The time is signed with the body: a receiver refuses an old delivery replayed.
            let at = crate::clock::unix_now().to_string();
            let signed = [at.as_bytes(), b".", &body].concat();
            req = req.header("portcullis-timestamp", &at).header(
                "portcullis-signature",
                format!("sha256={}", hmac(key, &signed)?),
            );
        }
        match req.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the endpoint answered {}", r.status())),
            Err(e) => Err(format!("{}", e.without_url())),
        }
    }
}

fn hmac(key: &[u8], body: &[u8]) -> Result<String, String> {
    let key = openssl::pkey::PKey::hmac(key).map_err(|e| e.to_string())?;
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)
        .map_err(|e| e.to_string())?;
    signer.update(body).map_err(|e| e.to_string())?;
    Ok(hex::encode(
        signer.sign_to_vec().map_err(|e| e.to_string())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> anyhow::Result<()> {
        let c: Vec<WebhookConfig> =
            toml::from_str::<std::collections::HashMap<String, Vec<WebhookConfig>>>(&format!(
                "[[webhooks]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/x\"\n{extra}"
            ))?
            .remove("webhooks")
            .unwrap_or_default();
        WebhookConfig::validate_all(&c)
    }

    #[test]
    fn tables_are_checked() {
        assert!(table("").is_ok());
        assert!(table("actions = [\"push\", \"tag-delete\"]").is_ok());
        assert!(table("actions = [\"pull\"]").is_err());
        assert!(table("repositories = [\"team-a/**\"]").is_ok());
        assert!(table("timeout_seconds = 0").is_err());
        assert!(
            table("timeout_seconds = 60").is_err(),
            "longer than a lease allows"
        );
        assert!(table("max_attempts = 0").is_err());
        assert!(table("format = \"distribution\"").is_ok());
        assert!(
            table("[[webhooks]]\nname = \"a\"\nurl = \"http://x/\"").is_err(),
            "twice"
        );
        assert!(table("[[webhooks]]\nname = \"b c\"\nurl = \"http://x/\"").is_err());
        assert!(table("[[webhooks]]\nname = \"b\"\nurl = \"ftp://x/\"").is_err());
    }

    #[test]
    fn back_off_doubles_to_its_bound_and_signatures_are_hmac_sha256() {
        let cfg: WebhookConfig =
            toml::from_str("name = \"a\"\nurl = \"http://127.0.0.1:9/\"\nmax_backoff_seconds = 8")
                .unwrap();
        let w = Webhook::new(cfg).unwrap();
        let b: Vec<u64> = (1..=6)
            .map(|a| super::super::consumer::backoff(a, w.cfg.max_backoff_seconds).as_secs())
            .collect();
        assert_eq!(b, [1, 2, 4, 8, 8, 8]);
        // RFC 4231 test case 2.
        assert_eq!(
            hmac(b"Jefe", b"what do ya want for nothing?").unwrap(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
