//! Starting the project's binaries for tests: port 0, readiness by the printed address and a
//! health probe, killed on drop (also when the test fails).

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of a workspace binary, built (release) once per test process so it is never stale.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--bins", "--quiet"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build --release --bins failed");
    });
    let path = workspace_root().join("target/release").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate is in the workspace")
        .to_path_buf()
}

/// A running storage-backend.
pub struct StorageServer {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    pub root: PathBuf,
    pub args: Vec<String>,
    env: Vec<(String, String)>,
}

/// How to start a storage-backend.
#[derive(Default, Clone)]
pub struct StorageOptions {
    /// A config file to pass with `--config`.
    pub config: Option<PathBuf>,
    /// Environment variables to add.
    pub env: Vec<(String, String)>,
    /// Listen address (default `127.0.0.1:0`).
    pub listen: Option<String>,
}

impl StorageServer {
    /// Starts a storage-backend serving `root` on a free loopback port.
    pub fn start(root: &Path) -> anyhow::Result<Self> {
        Self::start_with(root, StorageOptions::default())
    }

    pub fn start_with(root: &Path, opts: StorageOptions) -> anyhow::Result<Self> {
        let mut args = vec![
            "--listen".to_string(),
            opts.listen.unwrap_or_else(|| "127.0.0.1:0".into()),
            "--root".to_string(),
            root.display().to_string(),
        ];
        if let Some(c) = &opts.config {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        let mut s = StorageServer {
            child: None,
            base: String::new(),
            root: root.to_path_buf(),
            args,
            env: opts.env,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(binary("storage-backend"));
        cmd.args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning storage-backend")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("storage-backend did not start ({status}): {line:?}");
        };
        self.base = format!("http://{addr}");
        self.child = Some(child);
        wait_healthy(&format!("{}/healthz", self.base))?;
        Ok(())
    }

    /// `kill -9`, then start again on the same root (a new port).
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        // Reuse the port we had so URLs stay valid.
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = self.base.trim_start_matches("http://").to_string();
        }
        self.spawn()
    }

    /// `kill -9` now.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for StorageServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls a health URL until it answers 200 (10 s at most).
pub fn wait_healthy(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let path = format!(
        "/{}",
        url.trim_start_matches("http://")
            .split_once('/')
            .map_or("", |x| x.1)
    );
    loop {
        if let Ok(resp) = raw_get(&addr, &path)
            && resp.starts_with("HTTP/1.1 200")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn raw_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
