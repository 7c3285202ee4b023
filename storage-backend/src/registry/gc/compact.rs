//! Digests as a run keeps them in memory: binary, not text.
//!
//! The mark holds one entry per live blob of the whole store, and the sweep's candidates one
//! per unreferenced blob. As an [`oci::Digest`] a sha256 digest is a 32-byte struct plus a
//! 64-byte heap string (80 bytes with the allocator's rounding); as [`CompactDigest`] it is
//! 32 bytes in place, and a [`DigestSet`] of a million of them about 70 MB at the hash
//! table's worst load, against some 200 MB. Digests of other algorithms (sha512, rare in
//! practice) keep their text form.

use oci::{Algorithm, Digest};
use std::collections::HashSet;
use std::fmt;

/// A digest in binary form: the 32 bytes of a sha256 digest, or the digest as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum CompactDigest {
    Sha256([u8; 32]),
    Other(Box<Digest>),
}

/// The value of one lowercase hex character.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// The 32 bytes of 64 lowercase hex characters (the only spelling a digest accepts).
fn sha256_bytes(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl CompactDigest {
    /// From the two components of a stored path (`…/<alg>/<hex>/…`), without building the
    /// text form for the common case; `None` if they do not make a valid digest.
    pub(super) fn from_parts(alg: &str, hex: &str) -> Option<Self> {
        if alg == Algorithm::Sha256.as_str() {
            return sha256_bytes(hex).map(CompactDigest::Sha256);
        }
        Digest::parse(&format!("{alg}:{hex}"))
            .ok()
            .map(|d| CompactDigest::Other(Box::new(d)))
    }

    /// From a digest's text (a link's content, trimmed); `None` if it is not one.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (alg, hex) = text.split_once(':')?;
        Self::from_parts(alg, hex)
    }

    /// `<alg>/<hex>`, as digests appear in the layout's paths.
    pub(super) fn path(&self) -> String {
        self.to_string().replacen(':', "/", 1)
    }

    /// The text form, for what leaves the run: paths, reports, the audit trail.
    pub(super) fn to_digest(&self) -> Digest {
        match self {
            CompactDigest::Sha256(_) => {
                Digest::parse(&self.to_string()).expect("32 bytes are a valid sha256 digest")
            }
            CompactDigest::Other(d) => (**d).clone(),
        }
    }
}

impl From<&Digest> for CompactDigest {
    fn from(d: &Digest) -> Self {
        match d.algorithm() {
            Algorithm::Sha256 => CompactDigest::Sha256(
                sha256_bytes(d.hex()).expect("a parsed sha256 digest is 64 hex characters"),
            ),
            _ => CompactDigest::Other(Box::new(d.clone())),
        }
    }
}

impl fmt::Display for CompactDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompactDigest::Sha256(bytes) => {
                f.write_str("sha256:")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            CompactDigest::Other(d) => d.fmt(f),
        }
    }
}

/// A set of digests whose sha256 members take 32 bytes each: the mark of a whole store.
/// (A set of [`CompactDigest`] would take 40, the enum's tag rounded up to the box's
/// alignment.)
#[derive(Debug, Default)]
pub(super) struct DigestSet {
    sha256: HashSet<[u8; 32]>,
    other: HashSet<Box<Digest>>,
}

impl DigestSet {
    /// Adds a digest; whether it was new.
    pub(super) fn insert(&mut self, d: CompactDigest) -> bool {
        match d {
            CompactDigest::Sha256(b) => self.sha256.insert(b),
            CompactDigest::Other(d) => self.other.insert(d),
        }
    }

    pub(super) fn contains(&self, d: &CompactDigest) -> bool {
        match d {
            CompactDigest::Sha256(b) => self.sha256.contains(b),
            CompactDigest::Other(d) => self.other.contains(d),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.sha256.len() + self.other.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sha512() -> Digest {
        Digest::of(Algorithm::Sha512, b"x")
    }

    #[test]
    fn a_digest_survives_the_round_trip_through_its_binary_form() {
        for d in [Digest::parse(SHA256).unwrap(), sha512()] {
            let c = CompactDigest::from(&d);
            assert_eq!(c.to_digest(), d);
            assert_eq!(c.to_string(), d.to_string());
            assert_eq!(CompactDigest::parse(&d.to_string()), Some(c.clone()));
            let (alg, hex) = d
                .to_string()
                .split_once(':')
                .map(|(a, h)| (a.to_string(), h.to_string()))
                .unwrap();
            assert_eq!(CompactDigest::from_parts(&alg, &hex), Some(c));
        }
    }

    #[test]
    fn what_is_not_a_digest_is_refused() {
        let upper = SHA256.to_uppercase().replace("SHA256", "sha256");
        for bad in [
            "sha256:e3b0",
            &upper,
            &format!("sha256:{}", "g".repeat(64)),
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert_eq!(CompactDigest::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_set_holds_each_digest_once_whatever_its_algorithm() {
        let mut s = DigestSet::default();
        let a = CompactDigest::parse(SHA256).unwrap();
        let b = CompactDigest::from(&sha512());
        assert!(s.insert(a.clone()));
        assert!(!s.insert(a.clone()));
        assert!(s.insert(b.clone()));
        assert!(s.contains(&a) && s.contains(&b));
        assert!(!s.contains(&CompactDigest::from(&Digest::of(Algorithm::Sha256, b"y"))));
        assert_eq!(s.len(), 2);
    }
}
