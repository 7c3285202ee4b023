//! `SIGHUP` reads the config file again — with the environment's variables over it as at start
//! (a process's environment does not change: a key set by a variable keeps its value) — and
//! checks it whole first: a configuration that does not load changes nothing. What a running
//! gateway can take is put in force: `[limits]` (lockouts and rate limits; the connections per
//! source are counted by the listener and need a restart) and `[auth.ldap]` (a new directory
//! client, built whole before it replaces the old one: the service account's password is read
//! again; adding or removing the table needs a restart) and `[robots]` (lifetimes and
//! overlaps from now on; the admin token read again, so a rotated token file takes effect) and
//! `[oidc]` (a new client, its secret read again; adding or removing the table needs a
//! restart) and `[[proxy_cache]]` (caches added, removed or changed, the password and CA files
//! read again; a cache whose table and files did not change goes on as it was, its fetches in
//! flight shared; another set of `mirror_listen` listeners needs a restart, and then none of
//! the tables' changes is applied) and `[[webhooks]]` and `[[replication]]` (consumers added,
//! removed or changed, their secret, password and CA files read again; adding the first or
//! removing the last needs a restart). A change anywhere else (listeners,
//! keys, storage nodes, identity providers, …) is named as needing a restart and not applied. Each reload is audited (`config-reload`: what was applied and what needs a
//! restart, or why it failed). The files the configuration names are read again by their
//! owners on the same signal: the TLS certificate, the policy, the htpasswd users.

use crate::auth::ldap::live::LiveLdap;
use crate::auth::oidc::Oidc;
use crate::auth::robots::Robots;
use crate::cache::LiveCaches;
use crate::config::Config;
use crate::events::delivery::Events;
use crate::limits::Limits;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

pub struct LiveConfig {
    /// The config file (none: the environment alone).
    path: Option<PathBuf>,
    /// What is in force: the start's configuration with each reload's applied tables.
    in_force: Mutex<Config>,
    limits: Arc<Limits>,
    /// The directory, when `[auth.ldap]` was there at start.
    ldap: Option<Arc<LiveLdap>>,
    robots: Option<Arc<Robots>>,
    /// The single sign-on client, when `[oidc]` was there at start.
    oidc: Option<Arc<Oidc>>,
    caches: Arc<LiveCaches>,
    /// The webhooks and replication rules, when there were some at start (set once the
    /// gateway built them: [`LiveConfig::set_events`]).
    events: OnceLock<Arc<Events>>,
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
    pub fn new(
        path: Option<PathBuf>,
        config: Config,
        limits: Arc<Limits>,
        ldap: Option<Arc<LiveLdap>>,
        robots: Option<Arc<Robots>>,
        oidc: Option<Arc<Oidc>>,
        caches: Arc<LiveCaches>,
    ) -> Self {
        LiveConfig {
            path,
            in_force: Mutex::new(config),
            limits,
            ldap,
            robots,
            oidc,
            caches,
            events: OnceLock::new(),
        }
    }

    /// The events' consumers (built after this) that a reload changes.
    pub fn set_events(&self, events: Arc<Events>) {
        let _ = self.events.set(events);
    }

    /// Loads the configuration again and puts in force what can be; audited either way.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let source = match &self.path {
            Some(p) => p.display().to_string(),
            None => "the environment".to_string(),
        };
        let loaded = Config::load(self.path.as_deref()).map_err(|e| format!("{e:#}"));
        let result = loaded.and_then(|l| self.apply(l.config));
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

    /// Builds what changed, then puts all of it in force (or, when something does not
    /// build, nothing).
    fn apply(&self, new: Config) -> Result<Reloaded, String> {
        let mut old = crate::in_force::lock(&self.in_force);
        let mut restart_needed = changed(&old, &new);
        let mut applied = Vec::new();
        // Built on every reload (the service account's password may have been rotated in its
        // file); put in force when the table or the password changed.
        let ldap = match (&self.ldap, &new.auth.ldap) {
            (Some(live), Some(cfg)) => {
                let built = live
                    .build(cfg.clone())
                    .map_err(|e| format!("[auth.ldap]: {e:#}"))?;
                live.differs(&built).then(|| (live, built, cfg.clone()))
            }
            _ => {
                if differ(&old.auth.ldap, &new.auth.ldap) {
                    restart_needed.push("auth.ldap");
                }
                None
            }
        };
        let robots = match &self.robots {
            Some(r) => {
                let prepared =
                    Robots::prepare(new.robots.clone()).map_err(|e| format!("[robots]: {e:#}"))?;
                let differs = prepared.differs_from(&r.settings());
                differs.then_some((r, prepared))
            }
            None => {
                if differ(&old.robots, &new.robots) {
                    restart_needed.push("robots");
                }
                None
            }
        };
        let oidc = match (&self.oidc, &new.oidc) {
            (Some(live), Some(cfg)) => {
                let built = live
                    .build(cfg.clone())
                    .map_err(|e| format!("[oidc]: {e:#}"))?;
                live.differs(&built).then(|| (live, built, cfg.clone()))
            }
            _ => {
                if differ(&old.oidc, &new.oidc) {
                    restart_needed.push("oidc");
                }
                None
            }
        };
        // Built (and so checked) even when it cannot be applied.
        let table = self
            .caches
            .prepare(&new.proxy_cache)
            .map_err(|e| format!("[[proxy_cache]]: {e:#}"))?;
        let caches = match self.caches.listeners_differ(&new.proxy_cache) {
            true => {
                tracing::warn!(
                    "[[proxy_cache]]: other mirror listeners; no change of the caches is applied before a restart"
                );
                restart_needed.push("proxy_cache.mirror_listen");
                None
            }
            false => self.caches.differs(&table).then_some(table),
        };
        let consumers = match self.events.get() {
            // Events are recorded only while there are consumers: the first one added, or the
            // last removed, needs a restart.
            Some(ev) if !new.webhooks.is_empty() || !new.replication.is_empty() => {
                let next = ev
                    .prepare(&new.webhooks, &new.replication)
                    .map_err(|e| format!("[[webhooks]]/[[replication]]: {e:#}"))?;
                let kinds = ev.changed(&next);
                (!kinds.is_empty()).then_some((ev, next, kinds))
            }
            _ => {
                for (kind, differs) in [
                    ("webhooks", differ(&old.webhooks, &new.webhooks)),
                    ("replication", differ(&old.replication, &new.replication)),
                ] {
                    if differs {
                        restart_needed.push(kind);
                    }
                }
                None
            }
        };
        // Everything built: now put in force.
        if let Some((ev, next, kinds)) = consumers {
            ev.put(next);
            old.webhooks = new.webhooks.clone();
            old.replication = new.replication.clone();
            applied.extend(kinds);
        }
        if let Some(table) = caches {
            self.caches.put(table);
            old.proxy_cache = new.proxy_cache.clone();
            applied.push("proxy_cache");
        }
        if let Some((live, built, cfg)) = oidc {
            live.put(built);
            old.oidc = Some(cfg);
            applied.push("oidc");
        }
        if let Some((r, prepared)) = robots {
            r.put(prepared);
            old.robots = new.robots.clone();
            applied.push("robots");
        }
        if let Some((live, built, cfg)) = ldap {
            live.put(built);
            old.auth.ldap = Some(cfg);
            applied.push("auth.ldap");
        }
        if old.limits.connections_per_source != new.limits.connections_per_source {
            restart_needed.push("limits.connections_per_source");
        }
        let mut limits = new.limits;
        limits.connections_per_source = old.limits.connections_per_source;
        if differ(&limits, &old.limits) {
            self.limits.set(limits.clone());
            old.limits = limits;
            applied.push("limits");
        }
        Ok(Reloaded {
            applied,
            restart_needed,
        })
    }

    /// Reloads on every `SIGHUP`, forever (on the side runtime).
    pub async fn reload_on_sighup(self: Arc<Self>) {
        service::signal::on_sighup("the configuration is never reloaded", || {
            let _ = self.reload();
        })
        .await
    }
}

/// Whether two tables (or keys) differ, as their `Debug` shows them.
fn differ(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// The parts of the configuration, other than those a reload may apply, that differ.
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
        auth:
            crate::config::AuthConfig {
                htpasswd_file,
                groups,
                ldap: _,
            },
        policy,
        oidc: _,
        robots: _,
        federation,
        state,
        audit,
        limits: _,
        log,
        pepper,
        proxy_protocol,
        proxy_cache: _,
        webhooks: _,
        replication: _,
        manifest_cache,
    } = a;
    let mut out = Vec::new();
    if differ(&htpasswd_file, &b.auth.htpasswd_file) {
        out.push("auth.htpasswd_file");
    }
    if differ(&groups, &b.auth.groups) {
        out.push("auth.groups");
    }
    macro_rules! compare {
        ($($field:ident),*) => {
            $(
                if differ(&$field, &b.$field) {
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
        policy,
        federation,
        state,
        audit,
        log,
        pepper,
        proxy_protocol,
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
        let caches = Arc::new(LiveCaches::new(&start.proxy_cache).unwrap());
        let live = LiveConfig::new(
            Some(file.clone()),
            start,
            limits.clone(),
            None,
            None,
            None,
            caches,
        );
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
