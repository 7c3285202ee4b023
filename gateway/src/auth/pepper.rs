//! The pepper: a secret of its own mixed into the stored hashes of robot secrets and of the
//! LDAP login cache, so that a leaked state store does not let anyone test guesses offline.
//!
//! It is not the internal secret (which authenticates the gateway to storage and is rotated
//! on its own schedule): rotating that must not silently invalidate every robot. The pepper
//! rotates too: the new one goes in `file`, the old ones in `previous_files`; a robot that
//! logs in with a secret hashed under an old pepper is hashed again under the new one, so
//! once every robot has logged in the old pepper can go.

use anyhow::{Context, bail};
use service::secrets::read_secret_file;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// The environment variable with the pepper when `[pepper] file` is unset.
pub const PEPPER_ENV: &str = "PORTCULLIS_PEPPER";

/// `[pepper]`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PepperConfig {
    /// The current pepper (at least 16 bytes); `PORTCULLIS_PEPPER` when unset.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Earlier peppers, newest first, still accepted for robot secrets while they migrate.
    #[serde(default)]
    pub previous_files: Vec<PathBuf>,
}

/// The current pepper first, then the earlier ones (wiped from memory when dropped).
#[derive(Clone)]
pub struct Peppers(Vec<Zeroizing<Vec<u8>>>);

fn check(p: Zeroizing<Vec<u8>>, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if p.len() < 16 {
        bail!("{what}: a pepper needs 16 bytes at least");
    }
    Ok(p)
}

impl Peppers {
    /// The peppers `cfg` names. With none configured, the internal secret stands in (as
    /// before there was a pepper of its own) and a warning says so.
    pub fn load(cfg: &PepperConfig, internal_secret: &str) -> anyhow::Result<Self> {
        let read = |f: &PathBuf| -> anyhow::Result<Zeroizing<Vec<u8>>> {
            let s = Zeroizing::new(read_secret_file(f)?);
            check(
                Zeroizing::new(s.as_bytes().to_vec()),
                &f.display().to_string(),
            )
        };
        let current = match (
            &cfg.file,
            std::env::var(PEPPER_ENV).ok().filter(|s| !s.is_empty()),
        ) {
            (Some(f), _) => read(f)?,
            (None, Some(p)) => check(Zeroizing::new(p.into_bytes()), PEPPER_ENV)?,
            (None, None) => {
                tracing::warn!(
                    "no [pepper] file (nor {PEPPER_ENV}): robot secrets and the LDAP login cache are \
                     peppered with the internal secret, so rotating that secret invalidates every robot"
                );
                Zeroizing::new(internal_secret.as_bytes().to_vec())
            }
        };
        let mut all = vec![current];
        for f in &cfg.previous_files {
            all.push(read(f).with_context(|| "[pepper] previous_files")?);
        }
        Ok(Peppers(all))
    }

    /// One pepper (tests, the embedded default's own file).
    pub fn one(pepper: &[u8]) -> Self {
        Peppers(vec![Zeroizing::new(pepper.to_vec())])
    }

    /// Several, the current one first (tests of a rotation).
    pub fn rotated(peppers: &[&[u8]]) -> Self {
        Peppers(peppers.iter().map(|p| Zeroizing::new(p.to_vec())).collect())
    }

    /// The pepper new hashes are made with.
    pub fn current(&self) -> &[u8] {
        &self.0[0]
    }

    /// Every pepper still accepted, the current one first.
    pub fn all(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(|p| p.as_slice())
    }
}

/// The embedded default's pepper: `file`, made (32 random bytes, mode 0600) the first time.
pub fn dev_pepper(file: &std::path::Path) -> anyhow::Result<Peppers> {
    if !file.exists() {
        let p = Zeroizing::new(crate::random::random_token(32));
        crate::edge::tls::write_private(file, p.as_bytes())?;
    }
    let p =
        Zeroizing::new(std::fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    Ok(Peppers(vec![check(p, &file.display().to_string())?]))
}
