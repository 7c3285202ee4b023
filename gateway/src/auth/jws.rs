//! JWS signature checks with public keys parsed once, for tokens verified at a high rate
//! (CI tokens). OpenSSL keeps an RSA key's Montgomery constants with the key; `ring`, under
//! `jsonwebtoken`, rebuilds them at every verification, which was most of the cost of an
//! RS256 CI token exchange (measured with `regbench --federation`, `docs/benchmarks.md`).

use anyhow::{Context, bail};
use base64::Engine;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Verifier};

/// The algorithms [`PublicKey::verify`] knows.
pub const SUPPORTED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// A public key from a JWKS.
pub struct PublicKey {
    pkey: PKey<Public>,
    kind: Kind,
}

enum Kind {
    Rsa(Rsa<Public>),
    Ec(EcKey<Public>, Nid),
}

/// The DER `DigestInfo` before the hash in an RSASSA-PKCS1-v1_5 signature (RFC 8017 §9.2).
fn digest_info_prefix(alg: Algorithm) -> &'static [u8] {
    match alg {
        Algorithm::RS256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        Algorithm::RS384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        _ => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}

fn b64(s: &str) -> anyhow::Result<Vec<u8>> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('='))?)
}

fn bn(s: &str) -> anyhow::Result<BigNum> {
    Ok(BigNum::from_slice(&b64(s)?)?)
}

impl PublicKey {
    pub fn from_jwk(jwk: &Jwk) -> anyhow::Result<Self> {
        match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => {
                let rsa = Rsa::from_public_components(bn(&p.n)?, bn(&p.e)?)?;
                if rsa.size() < 256 {
                    bail!("RSA keys under 2048 bits are not accepted");
                }
                Ok(PublicKey {
                    pkey: PKey::from_rsa(rsa.clone())?,
                    kind: Kind::Rsa(rsa),
                })
            }
            AlgorithmParameters::EllipticCurve(p) => {
                let nid = match p.curve {
                    EllipticCurve::P256 => Nid::X9_62_PRIME256V1,
                    EllipticCurve::P384 => Nid::SECP384R1,
                    _ => bail!("unsupported curve"),
                };
                let group = EcGroup::from_curve_name(nid)?;
                let key =
                    EcKey::from_public_key_affine_coordinates(&group, &*bn(&p.x)?, &*bn(&p.y)?)
                        .context("EC point")?;
                key.check_key().context("EC point not on the curve")?;
                Ok(PublicKey {
                    pkey: PKey::from_ec_key(key.clone())?,
                    kind: Kind::Ec(key, nid),
                })
            }
            _ => bail!("unsupported key type"),
        }
    }

    /// Whether `signature` (as a JWS carries it) is `alg`'s signature of `input` by this key.
    /// A key of the wrong type for `alg` never verifies.
    pub fn verify(&self, alg: Algorithm, input: &[u8], signature: &[u8]) -> bool {
        self.check(alg, input, signature).unwrap_or(false)
    }

    fn check(&self, alg: Algorithm, input: &[u8], signature: &[u8]) -> anyhow::Result<bool> {
        use Algorithm as A;
        let md = match alg {
            A::RS256 | A::PS256 | A::ES256 => MessageDigest::sha256(),
            A::RS384 | A::PS384 | A::ES384 => MessageDigest::sha384(),
            A::RS512 | A::PS512 => MessageDigest::sha512(),
            _ => return Ok(false),
        };
        match (alg, &self.kind) {
            (A::RS256 | A::RS384 | A::RS512, Kind::Rsa(rsa)) => {
                // Without EVP (whose per-call set-up cost more than the RSA operation): undo
                // the padding with the public key and compare the whole encoded message with
                // the one expected, never parsing it.
                if signature.len() != rsa.size() as usize {
                    return Ok(false);
                }
                let mut em = vec![0; rsa.size() as usize];
                let Ok(n) = rsa.public_decrypt(signature, &mut em, Padding::PKCS1) else {
                    return Ok(false);
                };
                let mut expected = digest_info_prefix(alg).to_vec();
                expected.extend_from_slice(&openssl::hash::hash(md, input)?);
                Ok(em[..n] == expected[..])
            }
            (A::PS256 | A::PS384 | A::PS512, Kind::Rsa(_)) => {
                let mut v = Verifier::new(md, &self.pkey)?;
                v.set_rsa_padding(Padding::PKCS1_PSS)?;
                v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
                v.set_rsa_mgf1_md(md)?;
                Ok(v.verify_oneshot(signature, input)?)
            }
            (A::ES256, Kind::Ec(key, Nid::X9_62_PRIME256V1))
            | (A::ES384, Kind::Ec(key, Nid::SECP384R1)) => {
                // JWS carries r ‖ s, each the curve's size.
                let want = if alg == A::ES256 { 32 } else { 48 };
                if signature.len() != 2 * want {
                    return Ok(false);
                }
                let sig = EcdsaSig::from_private_components(
                    BigNum::from_slice(&signature[..want])?,
                    BigNum::from_slice(&signature[want..])?,
                )?;
                Ok(sig.verify(&openssl::hash::hash(md, input)?, key)?)
            }
            _ => Ok(false),
        }
    }
}

/// A JSON document over HTTP (discovery documents and JWKS of identity providers).
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<T> {
    http.get(url)
        .send()
        .await
        .with_context(|| format!("fetching {url}"))?
        .error_for_status()?
        .json()
        .await
        .with_context(|| format!("reading {url}"))
}

/// The `jwks_uri` of `issuer`'s OpenID discovery document, which must name `issuer` itself;
/// with the whole document.
pub async fn discover<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    issuer: &str,
) -> anyhow::Result<T> {
    #[derive(serde::Deserialize)]
    struct Named {
        issuer: String,
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let doc: serde_json::Value = fetch_json(http, &url).await?;
    let named: Named = serde_json::from_value(doc.clone()).context("the discovery document")?;
    if named.issuer != issuer {
        bail!(
            "the discovery document names issuer {:?}, not {issuer:?}",
            named.issuer
        );
    }
    serde_json::from_value(doc).context("the discovery document")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(v: serde_json::Value) -> Jwk {
        serde_json::from_value(v).unwrap()
    }

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    #[test]
    fn rsa_and_ec_signatures_verify_only_with_their_key_and_algorithm() {
        let input = b"header.payload";
        // RS256 and PS256 with one RSA key.
        let rsa = Rsa::generate(2048).unwrap();
        let key = PKey::from_rsa(rsa.clone()).unwrap();
        let public = PublicKey::from_jwk(&jwk(serde_json::json!({
            "kty": "RSA", "n": enc(&rsa.n().to_vec()), "e": enc(&rsa.e().to_vec()),
        })))
        .unwrap();
        let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &key).unwrap();
        let rs256 = s.sign_oneshot_to_vec(input).unwrap();
        assert!(public.verify(Algorithm::RS256, input, &rs256));
        assert!(!public.verify(Algorithm::RS256, b"header.other", &rs256));
        assert!(!public.verify(Algorithm::PS256, input, &rs256));
        assert!(!public.verify(Algorithm::ES256, input, &rs256));
        assert!(!public.verify(Algorithm::RS256, input, &rs256[1..]));
        for (md, alg) in [
            (MessageDigest::sha384(), Algorithm::RS384),
            (MessageDigest::sha512(), Algorithm::RS512),
        ] {
            let mut s = openssl::sign::Signer::new(md, &key).unwrap();
            let sig = s.sign_oneshot_to_vec(input).unwrap();
            assert!(public.verify(alg, input, &sig));
            assert!(!public.verify(Algorithm::RS256, input, &sig));
        }
        let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &key).unwrap();
        s.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
        s.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
        let ps256 = s.sign_oneshot_to_vec(input).unwrap();
        assert!(public.verify(Algorithm::PS256, input, &ps256));

        // ES256: r ‖ s.
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let ec = EcKey::generate(&group).unwrap();
        let mut ctx = openssl::bn::BigNumContext::new().unwrap();
        let (mut x, mut y) = (BigNum::new().unwrap(), BigNum::new().unwrap());
        ec.public_key()
            .affine_coordinates(&group, &mut x, &mut y, &mut ctx)
            .unwrap();
        let public = PublicKey::from_jwk(&jwk(serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": enc(&x.to_vec_padded(32).unwrap()), "y": enc(&y.to_vec_padded(32).unwrap()),
        })))
        .unwrap();
        let digest = openssl::sha::sha256(input);
        let sig = EcdsaSig::sign(&digest, &ec).unwrap();
        let mut raw = sig.r().to_vec_padded(32).unwrap();
        raw.extend(sig.s().to_vec_padded(32).unwrap());
        assert!(public.verify(Algorithm::ES256, input, &raw));
        assert!(!public.verify(Algorithm::ES384, input, &raw));
        assert!(!public.verify(Algorithm::RS256, input, &raw));
        raw[5] ^= 1;
        assert!(!public.verify(Algorithm::ES256, input, &raw));
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let rsa = Rsa::generate(1024).unwrap();
        let k = jwk(serde_json::json!({
            "kty": "RSA", "n": enc(&rsa.n().to_vec()), "e": enc(&rsa.e().to_vec()),
        }));
        assert!(PublicKey::from_jwk(&k).is_err());
    }
}
