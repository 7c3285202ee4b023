//! Secrets: read from files (with a warning when others may read them), held so they never
//! print and are wiped from memory when dropped, compared in constant time.

use anyhow::Context;
use std::fmt;
use std::path::Path;

/// A secret kept in a file (mounted from a secrets store): its content without the trailing
/// newline an editor or `echo` leaves. A file others may read gets a warning
/// ([`warn_if_exposed`]); the content is never logged.
pub fn read_secret_file(f: &Path) -> anyhow::Result<String> {
    warn_if_exposed(f);
    Ok(std::fs::read_to_string(f)
        .with_context(|| format!("reading {}", f.display()))?
        .trim_end_matches(['\n', '\r'])
        .to_string())
}

/// Logs a warning when a file holding a secret or a private key can be read or written by
/// its group or by others (mode bits `0o077`): it should be `0600` (or `0400`), owned by the
/// service's user. Returns whether it warned.
pub fn warn_if_exposed(f: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(f) else {
        return false;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return false;
    }
    tracing::warn!(
        file = %f.display(),
        mode = %format!("{mode:04o}"),
        "a secret file is readable by other users; make it 0600 (chmod 600)"
    );
    true
}

/// A secret that never prints, and whose memory is wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(zeroize::Zeroizing::new(s.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the inputs differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let a = self.0.as_bytes();
        if a.len() != candidate.len() {
            return false;
        }
        a.iter()
            .zip(candidate)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_others_can_read_are_flagged_and_read_without_their_newline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cret\n").unwrap();
        for (mode, exposed) in [
            (0o600, false),
            (0o400, false),
            (0o640, true),
            (0o644, true),
            (0o602, true),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(warn_if_exposed(&f), exposed, "{mode:o}");
        }
        assert_eq!(read_secret_file(&f).unwrap(), "s3cret");
        assert!(!warn_if_exposed(&dir.path().join("missing")));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter"));
    }
}
