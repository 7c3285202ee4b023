//! Microsoft's Azure Storage emulator for tests: Azurite's Blob service (npm `azurite`,
//! installed in `tests/services/azurite` by `tests/services/install.sh`) on a free loopback
//! port, in memory; stopped on drop. Requests are signed with the emulator's well-known
//! account key (public, in Microsoft's documentation), as against a real account.

use crate::server::{StorageOptions, StorageServer, workspace_root};
use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The emulator's account and its well-known key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    child: Child,
    pub port: u16,
    /// The blob service URL of the account: `http://127.0.0.1:<port>/devstoreaccount1`.
    pub endpoint: String,
}

impl Azurite {
    pub fn start() -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let script = workspace_root().join("tests/services/azurite/node_modules/.bin/azurite-blob");
        let child = Command::new("node")
            .arg(&script)
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(port.to_string())
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "spawning {} (tests/services/install.sh installs it)",
                    script.display()
                )
            })?;
        let mut a = Azurite {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        // Any HTTP answer (an unsigned request gets 403) means it is up.
        while a.request("GET", "?comp=list", &[]).is_err() {
            if let Ok(Some(status)) = a.child.try_wait() {
                bail!("azurite exited ({status}) before answering");
            }
            if Instant::now() > deadline {
                bail!("azurite on port {port} never answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(a)
    }

    /// One request to the account's blob service (`path_and_query` after the account),
    /// signed with the account key when `signed` headers are given: status and body.
    fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, String)],
    ) -> anyhow::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!(
            "{method} /{ACCOUNT}{path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
             Content-Length: 0\r\nConnection: close\r\n",
            self.port
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status from azurite")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_string()))
    }

    /// Creates a container (Shared Key authorization, as the Azure tools sign).
    pub fn create_container(&self, name: &str) -> anyhow::Result<()> {
        let date = String::from_utf8(
            Command::new("date")
                .args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"])
                .output()?
                .stdout,
        )?
        .trim()
        .to_string();
        let version = "2021-08-06";
        // VERB, then eleven standard headers (all empty here), then the x-ms- headers and
        // the resource: path-style, so the account appears twice.
        let to_sign = format!(
            "PUT\n{}x-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container",
            "\n".repeat(11)
        );
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = openssl::pkey::PKey::hmac(&b64.decode(ACCOUNT_KEY)?)?;
        let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)?;
        signer.update(to_sign.as_bytes())?;
        let signature = b64.encode(signer.sign_to_vec()?);
        let (status, body) = self.request(
            "PUT",
            &format!("/{name}?restype=container"),
            &[
                ("x-ms-date".into(), date),
                ("x-ms-version".into(), version.into()),
                (
                    "Authorization".into(),
                    format!("SharedKey {ACCOUNT}:{signature}"),
                ),
            ],
        )?;
        if status != 201 && !body.contains("ContainerAlreadyExists") {
            bail!("creating container {name}: {status} {body}");
        }
        Ok(())
    }

    /// `[storage]` of a storage-backend keeping its data in `container` under `prefix`, the
    /// key in `key_file`.
    pub fn storage_table(
        &self,
        container: &str,
        prefix: &str,
        key_file: &std::path::Path,
    ) -> String {
        format!(
            "[storage]\ntype = \"azure\"\naccount = \"{ACCOUNT}\"\ncontainer = \"{container}\"\n\
             prefix = \"{prefix}\"\nendpoint = \"{}\"\nallow_http = true\naccess_key_file = \"{}\"\n",
            self.endpoint,
            key_file.display()
        )
    }

    fn key_file(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let f = dir.join("azure-key");
        std::fs::write(&f, format!("{ACCOUNT_KEY}\n"))?;
        Ok(f)
    }

    /// The storage service's driver on `container` (made if missing), in this process.
    pub fn driver(
        &self,
        dir: &std::path::Path,
        container: &str,
        prefix: &str,
    ) -> anyhow::Result<storage_backend::driver::object::ObjectDriver> {
        self.create_container(container)?;
        let table = self.storage_table(container, prefix, &Self::key_file(dir)?);
        let config: storage_backend::driver::object::AzureConfig =
            toml::from_str(table.trim_start_matches("[storage]\ntype = \"azure\"\n"))?;
        storage_backend::driver::object::ObjectDriver::azure(&config)
    }

    /// A storage-backend on `container` (made if missing), its config in `dir`.
    pub fn storage_node(
        &self,
        dir: &std::path::Path,
        container: &str,
        prefix: &str,
    ) -> anyhow::Result<StorageServer> {
        self.create_container(container)?;
        let conf = dir.join(format!("storage-{}.toml", crate::tools::free_port()?));
        std::fs::write(
            &conf,
            self.storage_table(container, prefix, &Self::key_file(dir)?),
        )?;
        StorageServer::start_with(
            dir,
            StorageOptions {
                config: Some(conf),
                no_root: true,
                ..Default::default()
            },
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
