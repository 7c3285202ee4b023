//! A real `redis-server` (Debian's) for tests: on a free loopback port, no persistence, in
//! its own temporary directory; stopped on drop. [`Redis::stop`] and [`Redis::start_again`]
//! take it away and bring it back on the same port (the degradation tests).

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    /// Append-only file synced on every write: a restart keeps the data.
    persistent: bool,
    pub port: u16,
    /// `redis://127.0.0.1:<port>/0`
    pub url: String,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A server that forgets everything when it stops.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// A server that keeps its data across [`Redis::stop`] and [`Redis::start_again`]
    /// (append-only file, fsync on every write), as production runs it.
    pub fn start_persistent() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let mut r = Redis {
            child: None,
            persistent,
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir: tempfile::tempdir()?,
        };
        r.start_again()?;
        Ok(r)
    }

    /// Starts the server (again) on its port and waits until it answers `PING`.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("redis-server is already running");
        }
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning redis-server (tests/services/install.sh installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.answers() {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("redis-server exited ({status}) before answering");
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} never answered PING", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the server (`kill -9`; unless persistent, its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it answers `PING` now.
    pub fn answers(&self) -> bool {
        self.command("PING").is_ok_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one inline command and returns the first reply bytes (tests inspect keys).
    pub fn command(&self, line: &str) -> anyhow::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{line}\r\n").as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// The `[state]` table of a gateway that keeps its state here.
    pub fn state_table(&self, prefix: &str) -> String {
        format!(
            "[state]\ntype = \"redis\"\n[state.redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
            self.url
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
