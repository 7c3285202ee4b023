//! Content digests (`<algorithm>:<hex>`) and streaming verification.
//!
//! Only the algorithms the distribution spec registers are accepted: `sha256` (64 lowercase
//! hex characters) and `sha512` (128). Anything else is rejected, with unknown algorithms told
//! apart from malformed strings so the caller can say which.

use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// A digest algorithm the registry can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written in a digest.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Number of hex characters of an encoded digest of this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not an acceptable digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form <algorithm>:<encoded>")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported (use sha256 or sha512)")]
    UnsupportedAlgorithm(String),
    #[error("digest {digest:?}: {algorithm} needs {expected} lowercase hex characters")]
    BadEncoding {
        digest: String,
        algorithm: Algorithm,
        expected: usize,
    },
}

/// A validated digest such as `sha256:e3b0…b855`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(truncate(s)))?;
        let alg_ok = !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !alg_ok || hex.is_empty() {
            return Err(DigestError::Malformed(truncate(s)));
        }
        let algorithm = Algorithm::from_name(alg)
            .ok_or_else(|| DigestError::UnsupportedAlgorithm(truncate(alg)))?;
        let valid_hex = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid_hex {
            return Err(DigestError::BadEncoding {
                digest: truncate(s),
                algorithm,
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The digest of `data`, computed with `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut v = Verifier::new(algorithm);
        v.update(data);
        v.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded (hex) part.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

fn truncate(s: &str) -> String {
    // Keep error messages bounded whatever a client sends.
    s.chars().take(160).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Hashes content as it streams and tells the digest at the end.
#[derive(Clone)]
pub enum Verifier {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Verifier {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Verifier::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Verifier::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(data),
            Verifier::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything passed to [`Verifier::update`].
    pub fn finish(self) -> Digest {
        let (algorithm, bytes) = match self {
            Verifier::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Verifier::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            algorithm,
            hex: hex::encode(bytes),
        }
    }

    /// Whether the content seen so far has digest `expected`.
    pub fn verify(self, expected: &Digest) -> bool {
        &self.finish() == expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn accepted_digests() {
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        for ok in [EMPTY256, sha512.as_str()] {
            let d = Digest::parse(ok).unwrap();
            assert_eq!(d.to_string(), ok);
        }
    }

    #[test]
    fn rejected_digests() {
        let cases: &[(&str, &str)] = &[
            ("", "malformed"),
            ("sha256", "malformed"),
            ("sha256:", "malformed"),
            (":abc", "malformed"),
            (
                "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "malformed",
            ),
            ("md5:d41d8cd98f00b204e9800998ecf8427e", "unsupported"),
            ("sha384:abcd", "unsupported"),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                "encoding",
            ),
            (
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
                "encoding",
            ),
            (
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
                "encoding",
            ),
            (
                "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "encoding",
            ),
            ("sha256:../../../../etc/passwd", "encoding"),
            (
                "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "encoding",
            ),
        ];
        for (input, kind) in cases {
            let err = Digest::parse(input).unwrap_err();
            let got = match err {
                DigestError::Malformed(_) => "malformed",
                DigestError::UnsupportedAlgorithm(_) => "unsupported",
                DigestError::BadEncoding { .. } => "encoding",
            };
            assert_eq!(got, *kind, "{input:?}");
        }
    }

    #[test]
    fn verifier_matches_known_values() {
        assert_eq!(Digest::of(Algorithm::Sha256, b"").to_string(), EMPTY256);
        let abc512 = Digest::of(Algorithm::Sha512, b"abc");
        assert!(abc512.hex().starts_with("ddaf35a193617aba"));
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(b"a");
        v.update(b"bc");
        assert!(v.verify(&Digest::of(Algorithm::Sha256, b"abc")));
    }
}
