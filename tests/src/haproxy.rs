//! A real HAProxy (Debian's) in front of several gateways, as a company's load balancer: TCP
//! mode (TLS passes through to the gateways), a PROXY v2 header naming the client on every
//! connection, round robin per connection, each gateway health-checked on its admin
//! listener's `/readyz`; on a free loopback port, stopped on drop. The gateways behind it
//! trust its headers with [`TRUST_PROXY`] in their configuration.

use anyhow::{Context, bail};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway configuration table that trusts this load balancer's PROXY headers (it
/// connects from 127.0.0.1).
pub const TRUST_PROXY: &str = "[proxy_protocol]\ntrusted_proxies = [\"127.0.0.1\"]\n";

pub struct Haproxy {
    child: Child,
    /// `127.0.0.1:<port>`: the registry's address for clients.
    pub host: String,
    _dir: tempfile::TempDir,
}

/// One gateway behind the load balancer.
pub struct Backend {
    /// `127.0.0.1:<port>` of its TLS listener.
    pub tls: String,
    /// Its admin listener's port (`/readyz`).
    pub admin_port: u16,
}

impl Backend {
    /// A running gateway as a backend.
    pub fn of(g: &crate::server::GatewayServer) -> anyhow::Result<Self> {
        Ok(Backend {
            tls: g.host.clone(),
            admin_port: g
                .admin
                .rsplit(':')
                .next()
                .context("no admin port")?
                .parse()?,
        })
    }
}

impl Haproxy {
    /// Starts HAProxy over `backends`, checking each every `check_ms`; a failed connection is
    /// retried on another gateway.
    pub fn start(backends: &[Backend], check_ms: u64) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = crate::tools::free_port()?;
        let mut cfg = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  \
             retries 3\n  option redispatch\n\
             frontend registry\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\
             backend gateways\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             http-check expect status 200\n  \
             default-server inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 1 rise 1\n"
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server gw{i} {} send-proxy-v2 check port {}\n",
                b.tls, b.admin_port
            ));
        }
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, cfg)?;
        crate::tools::run(
            Command::new("haproxy")
                .arg("-c")
                .arg("-q")
                .arg("-f")
                .arg(&file),
        )
        .context("haproxy -c (tests/services/install.sh installs haproxy)")?;
        let mut child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning haproxy")?;
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&host).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("haproxy exited ({status})");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("haproxy never listened on {host}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Haproxy {
            child,
            host,
            _dir: dir,
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
