//! A real `rsyslogd` (Debian's `rsyslog`, `rsyslog-openssl`, `rsyslog-relp`) receiving RFC
//! 5424 over UDP, TCP, TLS and RELP on free ports, writing every message it gets, as received, to one file per
//! transport.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Rsyslog {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub udp: u16,
    pub tcp: u16,
    pub tls: u16,
    pub relp: u16,
    /// The CA that signed the TLS listener's certificate (for `localhost`).
    pub ca_file: PathBuf,
}

impl Rsyslog {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tls = gateway::edge::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
        std::fs::create_dir_all(dir.path().join("work"))?;
        let mut r = Rsyslog {
            child: None,
            udp: crate::tools::free_port()?,
            tcp: crate::tools::free_port()?,
            tls: crate::tools::free_port()?,
            relp: crate::tools::free_port()?,
            ca_file: tls.ca_cert.clone(),
            dir,
        };
        let d = r.dir.path();
        let out = |t: &str| d.join(format!("{t}.log")).display().to_string();
        let conf = format!(
            r#"global(workDirectory="{work}"
       DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
module(load="imtcp" MaxSessions="100")
module(load="imrelp")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="udp") {{ action(type="omfile" file="{udp_out}" template="raw") }}
ruleset(name="tcp") {{ action(type="omfile" file="{tcp_out}" template="raw") }}
ruleset(name="tls") {{ action(type="omfile" file="{tls_out}" template="raw") }}
ruleset(name="relp") {{ action(type="omfile" file="{relp_out}" template="raw") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="udp")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="tcp")
input(type="imtcp" address="127.0.0.1" port="{tls}" ruleset="tls"
      streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imrelp" address="127.0.0.1" port="{relp}" ruleset="relp")
"#,
            work = d.join("work").display(),
            ca = tls.ca_cert.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            udp_out = out("udp"),
            tcp_out = out("tcp"),
            tls_out = out("tls"),
            relp_out = out("relp"),
            udp = r.udp,
            tcp = r.tcp,
            tls = r.tls,
            relp = r.relp,
        );
        std::fs::write(d.join("rsyslog.conf"), conf)?;
        r.run()?;
        Ok(r)
    }

    /// Starts rsyslogd (again, same ports and files) and waits until its TCP, TLS and RELP
    /// listeners accept connections.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting rsyslogd (apt-get install rsyslog rsyslog-openssl rsyslog-relp)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        for port in [self.tcp, self.tls, self.relp] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(c) = self.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!("rsyslogd exited ({status}) before listening");
                }
                if Instant::now() > deadline {
                    bail!("rsyslogd did not listen on {port} within 15 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops rsyslogd the way a service manager does (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            crate::tools::run(Command::new("kill").args(["-TERM", &c.id().to_string()]))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("rsyslogd did not stop within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// What rsyslogd wrote for a transport (`udp`, `tcp`, `tls`, `relp`): one message per line.
    pub fn received(&self, transport: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(transport))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn path(&self, transport: &str) -> PathBuf {
        self.dir.path().join(format!("{transport}.log"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An RFC 5424 message as received: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG`.
#[derive(Debug)]
pub struct Message {
    pub pri: u8,
    pub timestamp: String,
    pub app: String,
    pub msgid: String,
    /// MSG, parsed as JSON.
    pub event: serde_json::Value,
}

pub fn parse(line: &str) -> anyhow::Result<Message> {
    let rest = line.strip_prefix('<').context("no PRI")?;
    let (pri, rest) = rest.split_once('>').context("no PRI end")?;
    let mut parts = rest.splitn(7, ' ');
    let mut next = || parts.next().context("too few fields");
    let version = next()?;
    anyhow::ensure!(version == "1", "version {version}");
    let timestamp = next()?.to_string();
    let _host = next()?;
    let app = next()?.to_string();
    let _pid = next()?;
    let msgid = next()?.to_string();
    let rest = next()?;
    let msg = rest
        .strip_prefix("- ")
        .context("structured data is not `-`")?;
    Ok(Message {
        pri: pri.parse()?,
        timestamp,
        app,
        msgid,
        event: serde_json::from_str(msg).with_context(|| format!("MSG is not JSON: {msg}"))?,
    })
}
