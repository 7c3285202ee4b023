//! A real `redis-server` (Debian's) for tests: on a free loopback port, no persistence, in
//! its own temporary directory; stopped on drop. [`Redis::stop`] and [`Redis::start_again`]
//! take it away and bring it back on the same port (the degradation tests). [`SentinelSet`]:
//! a master, a replica and a Sentinel (the failover tests).

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    /// Append-only file synced on every write: a restart keeps the data.
    persistent: bool,
    /// Started as a replica of this port (the first start only: after that Sentinel decides).
    replica_of: Option<u16>,
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

    /// A persistent server that starts as a replica of `master`.
    pub fn start_replica_of(master: &Redis) -> anyhow::Result<Self> {
        Self::start_full(true, Some(master.port))
    }

    fn start_with(persistent: bool) -> anyhow::Result<Self> {
        Self::start_full(persistent, None)
    }

    fn start_full(persistent: bool, replica_of: Option<u16>) -> anyhow::Result<Self> {
        let port = crate::tools::free_port()?;
        let mut r = Redis {
            child: None,
            persistent,
            replica_of,
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
            // A replica's full sync starts at once (Redis 7 waits 5 s for more replicas).
            .args(["--repl-diskless-sync-delay", "0"])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .args(
                self.replica_of
                    .take()
                    .map(|p| vec!["--replicaof".to_string(), "127.0.0.1".into(), p.to_string()])
                    .unwrap_or_default(),
            )
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
        command(self.port, line)
    }

    /// Its role now (`master`, `slave`), from `ROLE`.
    pub fn role(&self) -> anyhow::Result<String> {
        let reply = self.command("ROLE")?;
        reply
            .lines()
            .nth(2)
            .map(str::to_owned)
            .with_context(|| format!("ROLE answered {reply:?}"))
    }

    /// The `[state]` table of a gateway that keeps its state here.
    pub fn state_table(&self, prefix: &str) -> String {
        format!(
            "[state]\ntype = \"redis\"\n[state.redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
            self.url
        )
    }
}

/// One inline command to the server on `port`; the first reply bytes.
fn command(port: u16, line: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{line}\r\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A master, one replica and one Sentinel watching them (`redis-server --sentinel`, quorum 1,
/// a master down after 1 s), as the name [`SENTINEL_MASTER`]. Stopped on drop.
pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    sentinel: Option<Child>,
    pub sentinel_port: u16,
    _dir: tempfile::TempDir,
}

/// The name the sentinel monitors the master under.
pub const SENTINEL_MASTER: &str = "portcullis";

/// Polls `check` every 50 ms for up to `secs`.
fn wait_for(secs: u64, what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        if Instant::now() > deadline {
            bail!("never happened: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl SentinelSet {
    /// Starts the three and waits until the replica is in sync and the sentinel knows it.
    pub fn start() -> anyhow::Result<Self> {
        let master = Redis::start_persistent()?;
        let replica = Redis::start_replica_of(&master)?;
        wait_for(15, "the replica in sync", || {
            replica
                .command("INFO replication")
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })?;
        let dir = tempfile::tempdir()?;
        let sentinel_port = crate::tools::free_port()?;
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                dir.path().display(),
                master.port
            ),
        )?;
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning redis-server --sentinel")?;
        let set = SentinelSet {
            master,
            replica,
            sentinel: Some(child),
            sentinel_port,
            _dir: dir,
        };
        let replica_port = format!("{}", set.replica.port);
        wait_for(30, "the sentinel knows the replica", || {
            set.sentinel(&format!("SENTINEL REPLICAS {SENTINEL_MASTER}"))
                .is_ok_and(|r| r.contains(&replica_port))
        })?;
        Ok(set)
    }

    /// One command to the sentinel.
    pub fn sentinel(&self, line: &str) -> anyhow::Result<String> {
        command(self.sentinel_port, line)
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let r = self
            .sentinel(&format!(
                "SENTINEL GET-MASTER-ADDR-BY-NAME {SENTINEL_MASTER}"
            ))
            .ok()?;
        r.lines().nth(4)?.trim().parse().ok()
    }

    /// The `[state]` table of a gateway that finds the master through this sentinel.
    pub fn state_table(&self, prefix: &str) -> String {
        format!(
            "[state]\ntype = \"redis\"\n[state.redis]\nsentinels = [\"127.0.0.1:{}\"]\n\
             sentinel_master = \"{SENTINEL_MASTER}\"\nprefix = \"{prefix}\"\n",
            self.sentinel_port
        )
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
