//! A real S3-compatible server for tests: `moto_server` (PyPI `moto[s3]`, installed in
//! `tests/services/moto/venv` by `tests/services/install.sh`) on a free loopback port, in
//! memory; stopped on drop. [`Moto::stop`] and [`Moto::start_again`] take it away and bring
//! it back on the same port (empty: moto keeps nothing). It runs through
//! `tests/services/moto/serve.py`: moto's server with its writes applied one at a time, so
//! conditional PUTs are atomic as on S3 (moto alone lets two racing ones both win).

use crate::server::{StorageOptions, StorageServer, workspace_root};
use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
}

/// Any credentials do; the AWS tools' variables carry them to storage-backend.
pub const CREDENTIALS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "portcullis-test"),
    ("AWS_SECRET_ACCESS_KEY", "portcullis-test-secret"),
];

impl Moto {
    pub fn start() -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let mut m = Moto {
            child: None,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        m.start_again()?;
        Ok(m)
    }

    /// Starts the server (again) on its port and waits until it answers.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        // moto_server with writes applied one at a time (serve.py says why).
        let bin = workspace_root().join("tests/services/moto/venv/bin/python3");
        let child = Command::new(&bin)
            .arg(workspace_root().join("tests/services/moto/serve.py"))
            .args(["-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "spawning {} (tests/services/install.sh installs it)",
                    bin.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .request("GET", "/moto-api/", b"")
            .is_ok_and(|(s, _)| s == 200)
        {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("moto_server exited ({status}) before answering");
            }
            if Instant::now() > deadline {
                bail!("moto_server on port {} never answered", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kills the server (its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One unsigned HTTP/1.0 request: (status, body). moto takes unsigned requests.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| {
                format!(
                    "no HTTP status in {:?}",
                    text.chars().take(80).collect::<String>()
                )
            })?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Ok((status, body))
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), b"")?;
        // One the tests made before is fine; any other refusal (a bad name) is not.
        if status != 200 && !body.contains("BucketAlreadyOwnedByYou") {
            bail!("creating bucket {bucket}: {status} {body}");
        }
        Ok(())
    }

    /// The keys in `bucket` under `prefix` (one page of up to 1,000: tests stay small).
    pub fn keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let (status, body) = self.request(
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
            b"",
        )?;
        if status != 200 {
            bail!("listing {bucket}: {status} {body}");
        }
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next().map(str::to_owned))
            .collect())
    }

    /// Multipart uploads started and neither completed nor aborted in `bucket`.
    pub fn open_multipart_uploads(&self, bucket: &str) -> anyhow::Result<usize> {
        let (status, body) = self.request("GET", &format!("/{bucket}?uploads"), b"")?;
        if status != 200 {
            bail!("listing uploads of {bucket}: {status} {body}");
        }
        Ok(body.matches("<Upload>").count())
    }

    /// `[storage]` of a storage-backend keeping its data in `bucket` under `prefix`.
    pub fn storage_table(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "[storage]\ntype = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\n\
             endpoint = \"{}\"\nallow_http = true\n",
            self.endpoint
        )
    }

    /// The storage service's S3 driver on `bucket` (made if missing) under `prefix`, in this
    /// process, its credentials given in the config (the secret in a file in `dir`).
    pub fn driver(
        &self,
        dir: &std::path::Path,
        bucket: &str,
        prefix: &str,
    ) -> anyhow::Result<storage_backend::driver::object::ObjectDriver> {
        self.create_bucket(bucket)?;
        let secret = dir.join("s3-secret");
        std::fs::write(&secret, format!("{}\n", CREDENTIALS[1].1))?;
        let config: storage_backend::driver::object::S3Config = toml::from_str(&format!(
            "bucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"{}\"\n\
             allow_http = true\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint,
            CREDENTIALS[0].1,
            secret.display()
        ))?;
        storage_backend::driver::object::ObjectDriver::s3(&config)
    }

    /// A plain `object_store` client of `bucket` (made if missing): S3 without our code, to
    /// measure the server's own cost.
    pub fn object_store(&self, bucket: &str) -> anyhow::Result<object_store::aws::AmazonS3> {
        self.create_bucket(bucket)?;
        Ok(object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(CREDENTIALS[0].1)
            .with_secret_access_key(CREDENTIALS[1].1)
            .build()?)
    }

    /// Puts every file under `root` into `bucket` (made if missing) at `<prefix>/<its path
    /// under root>`, 32 at a time (a registry:2 root becomes the same layout on S3); how many.
    pub async fn put_tree(
        &self,
        bucket: &str,
        prefix: &str,
        root: &std::path::Path,
    ) -> anyhow::Result<usize> {
        use futures_util::{StreamExt, TryStreamExt};
        use object_store::ObjectStoreExt;
        let store = self.object_store(bucket)?;
        let files = crate::fsck::files(root);
        let n = files.len();
        futures_util::stream::iter(files)
            .map(|file| {
                let store = &store;
                async move {
                    let data = std::fs::read(&file)?;
                    let rel = file.strip_prefix(root)?;
                    let key =
                        object_store::path::Path::parse(format!("{prefix}/{}", rel.display()))?;
                    store.put(&key, data.into()).await?;
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(n)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A storage-backend on `bucket` (made if missing), its config in `dir`.
    pub fn storage_node(
        &self,
        dir: &std::path::Path,
        bucket: &str,
        prefix: &str,
    ) -> anyhow::Result<StorageServer> {
        self.storage_node_with(dir, bucket, prefix, &[])
    }

    /// [`Moto::storage_node`] with more environment (e.g. the deployment's internal secret).
    pub fn storage_node_with(
        &self,
        dir: &std::path::Path,
        bucket: &str,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<StorageServer> {
        self.storage_node_config(dir, bucket, prefix, "", env)
    }

    /// [`Moto::storage_node_with`] with more configuration (e.g. a `[gc]` table).
    pub fn storage_node_config(
        &self,
        dir: &std::path::Path,
        bucket: &str,
        prefix: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<StorageServer> {
        self.create_bucket(bucket)?;
        std::fs::create_dir_all(dir)?;
        let conf = dir.join(format!("storage-{}.toml", crate::tools::free_port()?));
        std::fs::write(
            &conf,
            format!("{}{extra}", self.storage_table(bucket, prefix)),
        )?;
        StorageServer::start_with(
            dir,
            StorageOptions {
                config: Some(conf),
                env: CREDENTIALS
                    .iter()
                    .chain(env)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                no_root: true,
                ..Default::default()
            },
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
