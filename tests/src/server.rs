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
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--release", "--bins", "--quiet"])
            .current_dir(workspace_root());
        // What `cargo test` sets for the test process (CARGO_MANIFEST_DIR, CARGO_PKG_NAME…)
        // is not set in a shell; build scripts that watch it (ring's) would rebuild
        // everything above them on every test binary's first call.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
                "CARGO_TARGET_TMPDIR",
            ]
            .iter()
            .any(|p| k.starts_with(p))
            {
                cmd.env_remove(k.as_ref());
            }
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --release --bins failed");
    });
    let path = workspace_root().join("target/release").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// `GET <base>/metrics` (an admin listener, plain HTTP): the exposition text.
pub async fn metrics_text(base: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?)
}

/// The value of the series `series` (name and labels, exactly as exposed) in `text`.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A storage node's `storage_blobs` and `storage_blob_bytes` in its metrics `text`, once its
/// first walk of the store has ended (`storage_usage_measured_timestamp_seconds` set).
pub fn storage_usage(text: &str) -> Option<(f64, f64)> {
    if metric_sample(text, "storage_usage_measured_timestamp_seconds")? > 0.0 {
        Some((
            metric_sample(text, "storage_blobs")?,
            metric_sample(text, "storage_blob_bytes")?,
        ))
    } else {
        None
    }
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
    /// Do not pass `--root` (the config's `[storage]` is another medium, e.g. S3).
    pub no_root: bool,
    /// Pass neither `--listen` nor `--root`: they come from `env` (`PORTCULLIS_LISTEN=…`).
    pub bare: bool,
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
        ];
        if opts.bare {
            args.clear();
        } else if !opts.no_root {
            args.push("--root".into());
            args.push(root.display().to_string());
        }
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

    /// `kill -9`, then start again on the same root and port.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.start_again()
    }

    /// A fresh process on the same root and port, once this one has exited (a replacement;
    /// a `bare` node started with `PORTCULLIS_LISTEN=…:0` gets a new port).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        // Reuse the port we had so URLs stay valid.
        if let Some(i) = self.args.iter().position(|a| a == "--listen") {
            self.args[i + 1] = self.base.trim_start_matches("http://").to_string();
        }
        self.spawn()
    }

    /// `kill -9` now.
    /// Sends the process `signal` (`TERM`, `HUP`, …).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// How the process ended, if it did within `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        exited_within(&mut self.child, within)
    }

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

/// A running gateway (`gateway dev` or `gateway serve`), killed on drop.
pub struct GatewayServer {
    child: Option<Child>,
    /// `https://127.0.0.1:<port>`
    pub base: String,
    /// `127.0.0.1:<port>`
    pub host: String,
    /// `http://127.0.0.1:<admin port>`
    pub admin: String,
    /// The CA that signed the server certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// Everything the process printed on stdout before it was ready.
    pub banner: String,
    /// Where the audit events it prints on stdout are kept (test gateways have that sink).
    stdout_audit: PathBuf,
}

impl GatewayServer {
    /// `gateway dev` on free ports with `data` as its data directory.
    pub fn start_dev(data: &Path, admin_password: Option<&str>) -> anyhow::Result<Self> {
        Self::start_dev_with(data, admin_password, &[])
    }

    /// `gateway dev` with more arguments (e.g. `--audit-config <file>`).
    pub fn start_dev_with(
        data: &Path,
        admin_password: Option<&str>,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let mut cmd = Command::new(binary("gateway"));
        // Audit events also on stdout, kept for the leak check, unless the test sets its own.
        let own = args
            .iter()
            .any(|a| *a == "--audit-config" || *a == "--config");
        let stdout_audit = data.join("test-audit-stdout.toml");
        if !own {
            std::fs::create_dir_all(data)?;
            std::fs::write(&stdout_audit, "[audit]\nstdout = true\n")?;
        }
        cmd.args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data)
        .args(args);
        if !own {
            cmd.arg("--audit-config").arg(&stdout_audit);
        }
        match admin_password {
            Some(p) => cmd.env("PORTCULLIS_ADMIN_PASSWORD", p),
            None => cmd.env_remove("PORTCULLIS_ADMIN_PASSWORD"),
        };
        let ca = data.join("tls/ca.crt");
        Self::spawn(cmd, port, move || std::fs::read(&ca).map_err(Into::into))
    }

    /// `gateway serve` with no config file: everything from `env`
    /// (`PORTCULLIS_<TABLE>_<KEY>`); the TLS listener must be `127.0.0.1:<port>`.
    pub fn start_env(port: u16, ca_pem: Vec<u8>, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary("gateway"));
        cmd.arg("serve")
            .env_remove("PORTCULLIS_GATEWAY_CONFIG")
            .envs(env.iter().cloned());
        Self::spawn(cmd, port, move || Ok(ca_pem.clone()))
    }

    /// `gateway serve --config <config> --upgrade`: takes the listening sockets over from the
    /// gateway running with that configuration once it gets `SIGQUIT` (send it when the
    /// configuration's `upgrade_socket` exists: the new process waits about 5 s for them).
    pub fn start_upgrade(
        config: &Path,
        port: u16,
        ca_pem: Vec<u8>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::serve(config, &["--upgrade"], port, ca_pem, env)
    }

    /// `gateway serve --config <config>`; the TLS listener must be `127.0.0.1:<port>`.
    pub fn start_config(
        config: &Path,
        port: u16,
        ca_pem: Vec<u8>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::serve(config, &[], port, ca_pem, env)
    }

    /// `gateway serve --config <config> <args…>`.
    fn serve(
        config: &Path,
        args: &[&str],
        port: u16,
        ca_pem: Vec<u8>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary("gateway"));
        cmd.arg("serve").arg("--config").arg(config).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, port, move || Ok(ca_pem.clone()))
    }

    fn spawn(
        mut cmd: Command,
        port: u16,
        ca: impl Fn() -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning gateway")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut banner = String::new();
        let admin = loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("gateway exited ({status}) before it was ready:\n{banner}");
            }
            banner.push_str(&line);
            if let Some(a) = line.trim().strip_prefix("admin listening on ") {
                break format!("http://{a}");
            }
        };
        // Keep draining stdout so the process never blocks on a full pipe; the audit events
        // on it (test gateways have the stdout sink) are kept for the suite's leak check.
        let kept = crate::leak_check_dir()
            .join("logs")
            .join(format!("gateway-{}.audit.jsonl", child.id()));
        let stdout_audit = kept.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = std::fs::create_dir_all(kept.parent().unwrap_or(Path::new(".")));
            let mut out = std::fs::File::create(&kept).ok();
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line.starts_with("{\"@timestamp\"")
                    && let Some(f) = out.as_mut()
                {
                    let _ = f.write_all(line.as_bytes());
                }
                line.clear();
            }
        });
        let mut g = GatewayServer {
            child: Some(child),
            base: format!("https://127.0.0.1:{port}"),
            host: format!("127.0.0.1:{port}"),
            admin,
            ca_pem: Vec::new(),
            banner,
            stdout_audit,
        };
        wait_healthy(&format!("{}/readyz", g.admin))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&g.host).is_err() {
            if Instant::now() > deadline {
                bail!("the gateway's TLS listener {} never opened", g.host);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        g.ca_pem = ca()?;
        Ok(g)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends the process `signal` (`TERM`, `HUP`, …).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// How the process ended, if it did within `within`.
    pub fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        exited_within(&mut self.child, within)
    }

    /// Sends `SIGHUP` and waits (10 s at most) for the `config-reload` audit event it causes
    /// (printed on stdout, as test gateways do).
    pub async fn reload(&self) -> anyhow::Result<serde_json::Value> {
        let before = self.audit_events("config-reload").len();
        self.signal("HUP")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.audit_events("config-reload").get(before) {
                return Ok(e.clone());
            }
            anyhow::ensure!(Instant::now() < deadline, "no config-reload audited");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The audit events of `action` it printed on stdout so far, oldest first.
    pub fn audit_events(&self, action: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stdout_audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event.action"] == action)
            .collect()
    }
}

/// `kill -<signal> <pid>`.
fn send_signal(pid: Option<u32>, signal: &str) -> anyhow::Result<()> {
    let pid = pid.context("the process is not running")?;
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{signal} {pid} failed");
    Ok(())
}

/// How `child` ended, if it did within `within` (then it is no longer held).
fn exited_within(child: &mut Option<Child>, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.as_mut()?.try_wait() {
            *child = None;
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for GatewayServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
