//! A value in force that a reload replaces whole: the htpasswd users, the policy, the limits,
//! the LDAP and OIDC clients, the robots' settings. Readers take the current one (an `Arc`,
//! theirs for as long as they use it: a reload does not change it under them); a reload puts
//! the next one in. A lock poisoned by a panic elsewhere does not stop either: the value is
//! read or replaced all the same.

use std::sync::{Arc, RwLock};

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
