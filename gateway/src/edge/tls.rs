//! TLS on the client listener: `[tls]` ([`TlsConfig`]), the certificate and key in force
//! ([`ServerCertificate`], read again on `SIGHUP` for new handshakes) and the listener's
//! certificate callback ([`Presenter`]); and, for the embedded default and tests, a private CA
//! and a server certificate it signs.

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
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// A connection must send its first byte (the TLS hello, or a PROXY header) within this
    /// time or it is closed (`edge`).
    #[serde(default = "default_hello_ms")]
    pub hello_timeout_ms: u64,
    /// The TLS handshake and the first request's whole head must arrive within this time
    /// (slow headers) or the connection is closed (`edge::head`).
    #[serde(default = "default_head_s")]
    pub head_timeout_seconds: u64,
    /// A connection between requests (HTTP/1.1 keep-alive, HTTP/2 with no stream open) is
    /// closed after this long; whatever the client asks in `Keep-Alive: timeout=`.
    #[serde(default = "default_client_idle_s")]
    pub idle_timeout_seconds: u64,
}

fn default_hello_ms() -> u64 {
    10_000
}
fn default_head_s() -> u64 {
    30
}
fn default_client_idle_s() -> u64 {
    60
}

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
    std::fs::write(&files.ca_cert, ca.to_pem()?)?;
    write_private(&dir.join("ca.key"), &ca_key.private_key_to_pem_pkcs8()?)?;
    issue_server_certificate(dir)?;
    Ok(files)
}

/// Issues a new server certificate and key for localhost / 127.0.0.1 / ::1 from the CA in
/// `dir` (`ca.crt`, `ca.key`), replacing `server.crt` and `server.key` (renewal; a running
/// gateway takes them on `SIGHUP`).
pub fn issue_server_certificate(dir: &Path) -> anyhow::Result<()> {
    let ca = X509::from_pem(&std::fs::read(dir.join("ca.crt"))?)?;
    let ca_key = PKey::private_key_from_pem(&std::fs::read(dir.join("ca.key"))?)?;
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

    // The full chain, so clients that only know the CA can verify. Key first: a reload
    // between the two writes finds a certificate that does not match and keeps the old pair.
    let mut chain = srv.to_pem()?;
    chain.extend_from_slice(&ca.to_pem()?);
    write_private(
        &dir.join("server.key"),
        &srv_key.private_key_to_pem_pkcs8()?,
    )?;
    std::fs::write(dir.join("server.crt"), chain)?;
    Ok(())
}

/// The server certificate chain and key the TLS listener presents, read from their files at
/// start and again on every `SIGHUP`: each handshake takes the current pair
/// ([`pingora::listeners::TlsAccept`]), so a renewed certificate is served to new
/// connections while open ones go on. A pair that does not load, or whose key does not match
/// the certificate, is refused and the previous one kept.
pub struct ServerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: std::sync::RwLock<std::sync::Arc<Pair>>,
}

struct Pair {
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl ServerCertificate {
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Self> {
        let pair = Self::read(cert_file, key_file)?;
        Ok(ServerCertificate {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: std::sync::RwLock::new(std::sync::Arc::new(pair)),
        })
    }

    fn read(cert_file: &Path, key_file: &Path) -> anyhow::Result<Pair> {
        service::secrets::warn_if_exposed(key_file);
        let pem =
            std::fs::read(cert_file).with_context(|| format!("reading {}", cert_file.display()))?;
        let chain = X509::stack_from_pem(&pem)
            .with_context(|| format!("{}: not PEM certificates", cert_file.display()))?;
        let leaf = chain
            .first()
            .with_context(|| format!("{}: no certificate", cert_file.display()))?;
        let pem =
            std::fs::read(key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let key = PKey::private_key_from_pem(&pem)
            .with_context(|| format!("{}: not a PEM private key", key_file.display()))?;
        anyhow::ensure!(
            leaf.public_key()?.public_eq(&key),
            "{} does not hold the key of {}",
            key_file.display(),
            cert_file.display()
        );
        Ok(Pair { chain, key })
    }

    /// Reads the files again; on failure the current pair stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pair = Self::read(&self.cert_file, &self.key_file)?;
        let mut current = self
            .current
            .write()
            .map_err(|_| anyhow::anyhow!("certificate lock poisoned"))?;
        *current = std::sync::Arc::new(pair);
        Ok(())
    }

    fn current(&self) -> Option<std::sync::Arc<Pair>> {
        self.current.read().ok().map(|p| p.clone())
    }

    /// Reloads on every `SIGHUP` (run on a tokio runtime).
    pub async fn reload_on_sighup(self: std::sync::Arc<Self>) {
        service::signal::on_sighup("the certificate is never reloaded", || {
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.cert_file.display(), "SIGHUP: TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: TLS certificate not reloaded; keeping the previous one")
                }
            }
        })
        .await
    }
}

/// Hands the current pair to each TLS handshake.
pub struct Presenter(pub std::sync::Arc<ServerCertificate>);

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for Presenter {
    async fn certificate_callback(&self, ssl: &mut pingora::protocols::tls::TlsRef) {
        use pingora::tls::ext;
        let Some(pair) = self.0.current() else {
            return;
        };
        let Some((leaf, rest)) = pair.chain.split_first() else {
            return;
        };
        let ok = ext::ssl_use_certificate(ssl, leaf).is_ok()
            && ext::ssl_use_private_key(ssl, &pair.key).is_ok()
            && rest.iter().all(|c| ext::ssl_add_chain_cert(ssl, c).is_ok());
        if !ok {
            tracing::error!("could not present the TLS certificate");
        }
    }
}
