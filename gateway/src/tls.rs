//! A private CA and a server certificate for the embedded default.

use anyhow::Context;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509NameBuilder};
use std::path::{Path, PathBuf};

fn key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn serial() -> anyhow::Result<openssl::asn1::Asn1Integer> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

/// Files of the generated TLS material.
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// Creates (once) a CA and a server certificate for localhost / 127.0.0.1 / ::1 in `dir`.
pub fn ensure_dev_certificates(dir: &Path) -> anyhow::Result<TlsFiles> {
    let files = TlsFiles {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    if files.ca_cert.exists() && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = key()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "Portcullis development CA")?;
    let ca_name = name.build();
    let mut ca = X509::builder()?;
    ca.set_version(2)?;
    let sn = serial()?;
    ca.set_serial_number(&sn)?;
    ca.set_subject_name(&ca_name)?;
    ca.set_issuer_name(&ca_name)?;
    ca.set_pubkey(&ca_key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(3650)?);
    ca.set_not_before(&from)?;
    ca.set_not_after(&until)?;
    ca.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    ca.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&ca.x509v3_context(None, None))?;
    ca.append_extension(ski)?;
    ca.sign(&ca_key, MessageDigest::sha256())?;
    let ca = ca.build();

    let srv_key = key()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "localhost")?;
    let srv_name = name.build();
    let mut srv = X509::builder()?;
    srv.set_version(2)?;
    let sn = serial()?;
    srv.set_serial_number(&sn)?;
    srv.set_subject_name(&srv_name)?;
    srv.set_issuer_name(ca.subject_name())?;
    srv.set_pubkey(&srv_key)?;
    let (from, until) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(825)?);
    srv.set_not_before(&from)?;
    srv.set_not_after(&until)?;
    srv.append_extension(BasicConstraints::new().build()?)?;
    srv.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_agreement()
            .build()?,
    )?;
    srv.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .ip("::1")
        .build(&srv.x509v3_context(Some(&ca), None))?;
    srv.append_extension(san)?;
    srv.sign(&ca_key, MessageDigest::sha256())?;
    let srv = srv.build();

    std::fs::write(&files.ca_cert, ca.to_pem()?)?;
    write_private(&dir.join("ca.key"), &ca_key.private_key_to_pem_pkcs8()?)?;
    // The full chain, so clients that only know the CA can verify.
    let mut chain = srv.to_pem()?;
    chain.extend_from_slice(&ca.to_pem()?);
    std::fs::write(&files.cert, chain)?;
    write_private(&files.key, &srv_key.private_key_to_pem_pkcs8()?)?;
    Ok(files)
}
