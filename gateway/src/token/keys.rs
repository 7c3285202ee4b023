//! Token signing keys: EC P-256 (ES256), `kid` = RFC 7638 JWK thumbprint, JWKS.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use serde_json::json;
use sha2::Digest;
use std::path::Path;

/// One key: signs (if first) and verifies.
pub struct SigningKey {
    pub kid: String,
    /// The key pair, parsed once, for [`SigningKey::sign_es256`].
    signer: ring::signature::EcdsaKeyPair,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// The public JWK, as published.
    pub jwk: serde_json::Value,
}

impl SigningKey {
    /// From a PEM EC P-256 private key (PKCS#8 or SEC1).
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<Self> {
        let pkey = PKey::private_key_from_pem(pem).context("not a PEM private key")?;
        let ec = pkey.ec_key().context("not an EC key (ES256 needs P-256)")?;
        if ec.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            bail!("EC key is not on P-256");
        }
        let mut ctx = BigNumContext::new()?;
        let (mut x, mut y) = (BigNum::new()?, BigNum::new()?);
        ec.public_key()
            .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)?;
        let x = URL_SAFE_NO_PAD.encode(x.to_vec_padded(32)?);
        let y = URL_SAFE_NO_PAD.encode(y.to_vec_padded(32)?);
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()));
        let pkcs8 = pkey.private_key_to_pem_pkcs8()?;
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkey.private_key_to_pkcs8()?,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("loading the signing key: {e}"))?;
        Ok(SigningKey {
            signer,
            encoding: EncodingKey::from_ec_pem(&pkcs8).context("loading the signing key")?,
            decoding: DecodingKey::from_ec_components(&x, &y)
                .context("loading the verifying key")?,
            jwk: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"}),
            kid,
        })
    }

    /// The JWS ES256 signature of `message` (r ‖ s, 64 bytes, RFC 7518 §3.4).
    pub fn sign_es256(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let sig = self
            .signer
            .sign(&ring::rand::SystemRandom::new(), message)
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(sig.as_ref().to_vec())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        service::secrets::warn_if_exposed(path);
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_pem(&pem).with_context(|| format!("in {}", path.display()))
    }
}

/// A new P-256 private key as PKCS#8 PEM.
pub fn generate_pem() -> anyhow::Result<Vec<u8>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    Ok(key.private_key_to_pem_pkcs8()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_is_the_rfc7638_thumbprint_of_the_public_key() {
        let k = SigningKey::from_pem(&generate_pem().unwrap()).unwrap();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            k.jwk["x"].as_str().unwrap(),
            k.jwk["y"].as_str().unwrap()
        );
        assert_eq!(
            k.kid,
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()))
        );
        assert_eq!(k.jwk["kid"], k.kid.as_str());
        assert_eq!(k.kid.len(), 43);
    }

    #[test]
    fn rejects_non_p256_keys() {
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        assert!(SigningKey::from_pem(&rsa.private_key_to_pem_pkcs8().unwrap()).is_err());
        let p384 = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
        let k = PKey::from_ec_key(EcKey::generate(&p384).unwrap()).unwrap();
        assert!(SigningKey::from_pem(&k.private_key_to_pem_pkcs8().unwrap()).is_err());
    }
}
