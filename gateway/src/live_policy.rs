//! The policy in force, replaced as a whole when its file is read again (`SIGHUP`).
//!
//! A reload compiles the new file first: a file that does not compile (or cannot be read)
//! leaves the policy in force untouched, and the failure is logged and audited. Every
//! decision after a successful reload uses the new policy — token grants, tag immutability,
//! administrators — while access tokens already issued keep the grants they carry until they
//! expire (`[token] expires_in_seconds`; revoke them to cut that short, docs/ha.md).

use policy::Policy;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub file: PathBuf,
}

pub struct LivePolicy {
    /// The policy in force and the text it was compiled from (the console's read-only view),
    /// replaced together.
    current: crate::in_force::InForce<(Arc<Policy>, Arc<str>)>,
    /// Where it is read from (none: built in, never reloaded).
    file: Option<PathBuf>,
}

impl LivePolicy {
    /// A policy that never changes (the embedded default's built-in one), and its text.
    pub fn fixed(policy: Policy, text: &str) -> Self {
        LivePolicy {
            current: crate::in_force::InForce::new((Arc::new(policy), Arc::from(text))),
            file: None,
        }
    }

    fn in_force(&self) -> (Arc<Policy>, Arc<str>) {
        (*self.current.get()).clone()
    }

    /// The text of the policy in force, and the file it came from (none: built in).
    pub fn text(&self) -> (Arc<str>, Option<&std::path::Path>) {
        (self.in_force().1, self.file.as_deref())
    }

    /// The policy in `file`, which [`LivePolicy::reload`] reads again.
    pub fn from_file(file: PathBuf) -> anyhow::Result<Self> {
        let (policy, _, text) = Self::compile(&file).map_err(anyhow::Error::msg)?;
        Ok(LivePolicy {
            current: crate::in_force::InForce::new((Arc::new(policy), Arc::from(text))),
            file: Some(file),
        })
    }

    /// The policy in `file`, the SHA-256 of its text, and the text.
    fn compile(file: &std::path::Path) -> Result<(Policy, String, String), String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let policy =
            Policy::compile(&file.display().to_string(), &text).map_err(|e| format!("{e:#}"))?;
        let sha = crate::audit::sha256_hex(&text);
        Ok((policy, sha, text))
    }

    /// The policy for one decision (a later reload does not change it under the caller).
    pub fn current(&self) -> Arc<Policy> {
        self.in_force().0
    }

    /// Reads the file again and puts the new policy in force if it compiles; audited either
    /// way (`policy-reload`, with the file's SHA-256).
    pub fn reload(&self) -> Result<(), String> {
        let Some(file) = &self.file else {
            return Err("the built-in policy is not reloaded".into());
        };
        match Self::compile(file) {
            Ok((policy, sha, text)) => {
                self.current.put((Arc::new(policy), Arc::from(text)));
                tracing::info!(file = %file.display(), sha256 = %sha, "policy reloaded");
                crate::audit::record(
                    "policy-reload",
                    "success",
                    serde_json::json!({"policy.file": file.display().to_string(), "policy.sha256": sha}),
                );
                Ok(())
            }
            Err(why) => {
                tracing::error!(file = %file.display(), error = %why, "policy reload failed; the previous policy stays in force");
                crate::audit::record(
                    "policy-reload",
                    "failure",
                    serde_json::json!({"policy.file": file.display().to_string(), "event.reason": why}),
                );
                Err(why)
            }
        }
    }

    /// Reloads on every `SIGHUP`, forever (on the side runtime).
    pub async fn reload_on_sighup(self: Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        service::signal::on_sighup("the policy is never reloaded", || {
            let _ = self.reload();
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_replaces_the_policy_only_when_the_new_file_compiles() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, include_str!("../../conf/policy.toml")).unwrap();
        let live = LivePolicy::from_file(file.clone()).unwrap();
        let before = live.current();
        std::fs::write(&file, "this is [not a policy").unwrap();
        assert!(live.reload().is_err());
        assert!(Arc::ptr_eq(&before, &live.current()), "kept");
        assert!(live.text().0.contains("admin_groups"), "its text kept too");
        let edited = format!("# edited\n{}", include_str!("../../conf/policy.toml"));
        std::fs::write(&file, &edited).unwrap();
        live.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &live.current()), "replaced");
        assert_eq!(&*live.text().0, edited.as_str(), "with its text");
        let shipped = include_str!("../../conf/policy.toml");
        let fixed = LivePolicy::fixed(Policy::compile("x", shipped).unwrap(), shipped);
        assert!(fixed.reload().is_err());
        assert!(fixed.text().1.is_none(), "built in");
    }
}
