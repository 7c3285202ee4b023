//! A value in force that a reload replaces whole: the htpasswd users, the policy, the limits,
//! the LDAP and OIDC clients, the robots' settings, the pull-through caches, the webhooks and
//! replication rules. Readers take the current one (an `Arc`,
//! theirs for as long as they use it: a reload does not change it under them); a reload puts
//! the next one in. A lock poisoned by a panic elsewhere does not stop either: the value is
//! read or replaced all the same. [`built_from`] and [`kept_or_built`] let a reload keep the
//! parts of a set (caches, webhooks) that did not change.

use sha2::Digest as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// What a value was built from: a digest of its table (`Debug`) and of what the files it
/// read hold (a rotated password, a new CA bundle). A reload keeps the value whose table and
/// files are as they were — with whatever it holds in flight — and builds the others anew.
pub fn built_from(
    table: &impl std::fmt::Debug,
    files: &[Option<&Path>],
) -> anyhow::Result<[u8; 32]> {
    let mut h = sha2::Sha256::new();
    let text = format!("{table:?}");
    h.update((text.len() as u64).to_be_bytes());
    h.update(text.as_bytes());
    for f in files {
        match f {
            Some(path) => {
                // Passwords and keys among them: wiped when done.
                let bytes = zeroize::Zeroizing::new(
                    std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
                );
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&*bytes);
            }
            None => h.update(u64::MAX.to_be_bytes()),
        }
    }
    Ok(h.finalize().into())
}

/// `old` (what was in force, with what it was [`built_from`]) when it was built from `from`
/// too, else what `build` makes.
pub fn kept_or_built<T>(
    old: Option<(&[u8; 32], &Arc<T>)>,
    from: &[u8; 32],
    build: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<Arc<T>> {
    match old {
        Some((was, value)) if was == from => Ok(value.clone()),
        _ => Ok(Arc::new(build()?)),
    }
}

/// `m` locked, whether or not a panic elsewhere poisoned it: what it guards (a timer, a
/// delivery's state, the configuration in force) is whole between statements, so the next
/// user goes on with it rather than failing too.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct InForce<T>(RwLock<Arc<T>>);

impl<T> InForce<T> {
    pub fn new(value: T) -> Self {
        InForce(RwLock::new(Arc::new(value)))
    }

    /// The value in force now.
    pub fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `value` in force for every later [`InForce::get`].
    pub fn put(&self, value: T) {
        let next = Arc::new(value);
        match self.0.write() {
            Ok(mut v) => *v = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }
}
