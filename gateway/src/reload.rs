//! `SIGHUP` reads the config file again — with the environment's variables over it as at start
//! (a process's environment does not change: a key set by a variable keeps its value) — and
//! checks it whole first: a configuration that does not load changes nothing. What a running
//! gateway can take is put in force: `[limits]` (lockouts and rate limits; the connections per
//! source are counted by the listener and need a restart). A change anywhere else (listeners,
//! keys, storage nodes, identity providers, caches, webhooks, …) is named as needing a restart
//! and not applied. Each reload is audited (`config-reload`: what was applied and what needs a
//! restart, or why it failed). The files the configuration names are read again by their
//! owners on the same signal: the TLS certificate, the policy, the htpasswd users.

use crate::config::Config;
use crate::limits::Limits;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct LiveConfig {
    /// The config file (none: the environment alone).
    path: Option<PathBuf>,
    /// What is in force: the start's configuration with each reload's limits.
    in_force: Mutex<Config>,
    limits: Arc<Limits>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// Tables put in force.
    pub applied: Vec<&'static str>,
    /// Tables and keys that changed but need a restart.
    pub restart_needed: Vec<&'static str>,
}

impl LiveConfig {
    pub fn new(path: Option<PathBuf>, config: Config, limits: Arc<Limits>) -> Self {
        LiveConfig {
            path,
            in_force: Mutex::new(config),
            limits,
        }
    }

    /// Loads the configuration again and puts in force what can be; audited either way.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let source = match &self.path {
            Some(p) => p.display().to_string(),
            None => "the environment".to_string(),
        };
        let loaded = Config::load(self.path.as_deref()).map_err(|e| format!("{e:#}"));
        let result = loaded.map(|l| self.apply(l.config));
        match &result {
            Ok(r) => {
                if r.restart_needed.is_empty() {
                    tracing::info!(config = %source, applied = ?r.applied, "configuration reloaded");
                } else {
                    tracing::warn!(config = %source, applied = ?r.applied, restart_needed = ?r.restart_needed, "configuration reloaded; some changes need a restart");
                }
                crate::audit::record(
                    "config-reload",
                    "success",
                    serde_json::json!({
                        "config.source": source,
                        "config.applied": r.applied,
                        "config.restart_needed": r.restart_needed,
                    }),
                );
            }
            Err(why) => {
                tracing::error!(config = %source, error = %why, "configuration reload failed; nothing changed");
                crate::audit::record(
                    "config-reload",
                    "failure",
                    serde_json::json!({"config.source": source, "event.reason": why}),
                );
            }
        }
        result
    }

    fn apply(&self, new: Config) -> Reloaded {
        let mut old = match self.in_force.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut restart_needed = changed(&old, &new);
        let mut applied = Vec::new();
        if old.limits.connections_per_source != new.limits.connections_per_source {
            restart_needed.push("limits.connections_per_source");
        }
        let mut limits = new.limits;
        limits.connections_per_source = old.limits.connections_per_source;
        if format!("{limits:?}") != format!("{:?}", old.limits) {
            self.limits.set(limits.clone());
            old.limits = limits;
            applied.push("limits");
        }
        Reloaded {
            applied,
            restart_needed,
        }
    }

    /// Reloads on every `SIGHUP`, forever (on the side runtime).
    pub async fn reload_on_sighup(self: Arc<Self>) {
        service::signal::on_sighup("the configuration is never reloaded", || {
            let _ = self.reload();
        })
        .await
    }
}

/// The parts of the configuration, other than `[limits]`, that differ.
fn changed(a: &Config, b: &Config) -> Vec<&'static str> {
    // Every field named: a new one does not compile until it is decided here.
    let Config {
        listen,
        admin_listen,
        drain_seconds,
        drain_delay_seconds,
        upgrade_socket,
        tls,
        token,
        upstream,
        auth,
        policy,
        oidc,
        robots,
        federation,
        state,
        audit,
        limits: _,
        log,
        pepper,
        proxy_protocol,
        proxy_cache,
        webhooks,
        replication,
        manifest_cache,
    } = a;
    let mut out = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {
            $(
                if format!("{:?}", $field) != format!("{:?}", b.$field) {
                    out.push(stringify!($field));
                }
            )*
        };
    }
    compare!(
        listen,
        admin_listen,
        drain_seconds,
        drain_delay_seconds,
        upgrade_socket,
        tls,
        token,
        upstream,
        auth,
        policy,
        oidc,
        robots,
        federation,
        state,
        audit,
        log,
        pepper,
        proxy_protocol,
        proxy_cache,
        webhooks,
        replication,
        manifest_cache
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_applied_and_other_changes_named() {
        let text = include_str!("../../conf/gateway.toml");
        let start: Config = toml::from_str(text).unwrap();
        let limits = Arc::new(Limits::new(
            start.limits.clone(),
            Arc::new(crate::state::MemoryStore::default()),
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        let live = LiveConfig::new(Some(file.clone()), start, limits.clone());
        let edited = text
            .replace("user_failures = 10", "user_failures = 3")
            .replace("expires_in_seconds = 300", "expires_in_seconds = 600");
        assert_ne!(edited, text);
        std::fs::write(&file, &edited).unwrap();
        assert_eq!(
            live.reload(),
            Ok(Reloaded {
                applied: vec!["limits"],
                restart_needed: vec!["token"],
            })
        );
        assert_eq!(limits.config().user_failures, 3);
        // Nothing new: nothing applied (what needs a restart is still named).
        assert_eq!(live.reload().unwrap().applied, Vec::<&str>::new());
        // A broken file changes nothing.
        std::fs::write(
            &file,
            edited.replace("user_failures = 3", "user_failurez = 1"),
        )
        .unwrap();
        assert!(live.reload().unwrap_err().contains("user_failurez"));
        assert_eq!(limits.config().user_failures, 3);
    }
}
