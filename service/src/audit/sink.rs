//! Syslog sinks (RFC 5424 over UDP, RFC 6587 octet-counted TCP, RFC 5425 TLS, and RELP),
//! each with a thread of its own and a bounded on-disk spool.
//!
//! [`super::record`] hands each event to every sink's channel and returns: a slow or dead
//! receiver never holds up a request. The sink thread sends events as they come while its
//! receiver is up and its spool empty. When a send fails (or the connection is found closed
//! before a send), that event and every later one go to the spool file
//! (`<spool_dir>/<sink>/spool`, one formatted message per line) until the receiver is back;
//! then the spool is sent from its cursor (`cursor`, the byte offset of the first unsent
//! line, saved after every send) in order, and new events keep going behind it until it is
//! empty. A spool left by a stopped process is sent when it starts again.
//!
//! Only RELP delivers with acknowledgements: an event is spooled unless the receiver said
//! `200 OK` for it, so a receiver that stops or crashes loses nothing (at worst an event
//! whose answer was lost is sent again). Plain TCP and TLS syslog have no acknowledgement:
//! before every send the connection is checked for a close from the receiver (end of
//! stream, a TLS `close_notify`), which catches a receiver that is down, but what the
//! kernel accepted before a receiver stopped reading is lost with it — the `audit` test
//! measured up to 76 of 1,000 events lost when rsyslogd is stopped mid-burst. Use RELP
//! where nothing may be lost. UDP is fire-and-forget: a datagram to a stopped receiver is
//! lost (the refusal shows on the next send, which is spooled).
//!
//! The spool's bound is `spool_max_bytes` of unsent messages. When an event would pass it,
//! `drop-oldest` drops the oldest unsent messages (counted in
//! `<service>_audit_dropped_events_total`, logged), and `fail-closed` keeps the spool,
//! drops the new event (counted) and sets [`super::refusing_writes`] until the spool drains
//! below the bound.

use super::SpoolFull;
use super::spool::Spool;
use anyhow::Context;
use serde::Deserialize;
use std::io::{BufRead, Read, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// One `[[audit.syslog]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `host:port` of the receiver.
    pub address: String,
    pub transport: Transport,
    /// CA certificate(s) that sign the receiver's certificate (TLS; default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name the receiver's certificate must have (TLS; default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// RFC 5424 APP-NAME. Default: `portcullis-<service>` (`portcullis-gateway`,
    /// `portcullis-storage`).
    #[serde(default)]
    pub app_name: Option<String>,
    /// The sink's name in metrics and its spool directory. Default: `<transport>-<address>`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// RELP (rsyslog's Reliable Event Logging Protocol): every message acknowledged.
    Relp,
}

impl SyslogConfig {
    pub fn app_name(&self) -> String {
        self.app_name
            .clone()
            .unwrap_or_else(|| format!("portcullis-{}", super::service()))
    }

    pub fn sink_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let t = match self.transport {
                Transport::Udp => "udp",
                Transport::Tcp => "tcp",
                Transport::Tls => "tls",
                Transport::Relp => "relp",
            };
            format!("{t}-{}", self.address)
        })
    }
}

/// An event as handed to the sinks.
pub struct Entry {
    /// The JSON line, without its newline.
    pub line: String,
    /// Its `@timestamp`.
    pub timestamp: String,
    pub action: String,
    pub failure: bool,
}

/// The producer end of one sink.
pub struct Handle {
    tx: Sender<Arc<Entry>>,
}

impl Handle {
    pub fn send(&self, e: Arc<Entry>) {
        // The thread only ends when the process does.
        let _ = self.tx.send(e);
    }
}

/// Facility `log audit` (13), RFC 5424 §6.2.1.
const FACILITY: u8 = 13;

/// The RFC 5424 message of an event (no framing): severity notice for successes, warning
/// for failures; MSGID is the action; MSG the JSON line.
fn format(e: &Entry, host: &str, app: &str, pid: u32) -> String {
    let severity = if e.failure { 4 } else { 5 };
    let ts = &e.timestamp;
    let msgid: String = e
        .action
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    format!(
        "<{}>1 {ts} {host} {app} {pid} {msgid} - {}",
        FACILITY * 8 + severity,
        e.line
    )
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<openssl::ssl::SslStream<TcpStream>>),
    Relp(Relp),
}

/// A RELP session: one command at a time, each answered before the next is sent.
struct Relp {
    stream: std::io::BufReader<TcpStream>,
    txnr: u64,
}

/// How long a RELP receiver may take to answer.
const RELP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Relp {
    /// One `syslog` command, answered `200` by the receiver.
    fn syslog(&mut self, msg: &str) -> std::io::Result<()> {
        let answer = self.command("syslog", msg)?;
        if answer.starts_with("200") {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the RELP receiver refused a message: {answer}"
            )))
        }
    }

    fn open(address: &str) -> anyhow::Result<Relp> {
        let stream = tcp(address)?;
        stream.set_read_timeout(Some(RELP_ANSWER_TIMEOUT))?;
        let mut r = Relp {
            stream: std::io::BufReader::new(stream),
            txnr: 0,
        };
        let answer = r.command(
            "open",
            "relp_version=0\nrelp_software=portcullis\ncommands=syslog",
        )?;
        anyhow::ensure!(
            answer.starts_with("200"),
            "the RELP receiver refused the session: {answer}"
        );
        Ok(r)
    }

    /// Sends a command and waits for its answer (the answer's data).
    fn command(&mut self, command: &str, data: &str) -> std::io::Result<String> {
        self.txnr = if self.txnr >= 999_999_999 {
            1
        } else {
            self.txnr + 1
        };
        let frame = if data.is_empty() {
            format!("{} {command} 0\n", self.txnr)
        } else {
            format!("{} {command} {} {data}\n", self.txnr, data.len())
        };
        self.stream.get_mut().write_all(frame.as_bytes())?;
        let (txnr, cmd, answer) = read_relp_frame(&mut self.stream)?;
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        if cmd == "serverclose" {
            return Err(bad("the RELP receiver closed the session".into()));
        }
        if cmd != "rsp" || txnr != self.txnr {
            return Err(bad(format!(
                "RELP answer {txnr} {cmd} to command {}",
                self.txnr
            )));
        }
        Ok(answer)
    }
}

/// Reads one RELP frame: `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
fn read_relp_frame(r: &mut impl BufRead) -> std::io::Result<(u64, String, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut token = |what: &str| -> std::io::Result<String> {
        let mut t = Vec::new();
        r.take(32).read_until(b' ', &mut t)?;
        if t.last() != Some(&b' ') {
            // DATALEN 0 is followed by the trailer instead of a space.
            if what == "length" && t.last() == Some(&b'\n') {
                t.pop();
                return Ok(String::from_utf8_lossy(&t).into_owned() + "\n");
            }
            return Err(bad("malformed RELP frame"));
        }
        t.pop();
        Ok(String::from_utf8_lossy(&t).into_owned())
    };
    let txnr = token("txnr")?.parse().map_err(|_| bad("bad RELP txnr"))?;
    let command = token("command")?;
    let len = token("length")?;
    if let Some(len) = len.strip_suffix('\n') {
        return match len {
            "0" => Ok((txnr, command, String::new())),
            _ => Err(bad("malformed RELP frame")),
        };
    }
    let len: usize = len.parse().map_err(|_| bad("bad RELP length"))?;
    if len > 64 << 10 {
        return Err(bad("RELP answer too long"));
    }
    let mut data = vec![0u8; len + 1];
    r.read_exact(&mut data)?;
    if data.pop() != Some(b'\n') {
        return Err(bad("RELP frame without its trailer"));
    }
    Ok((txnr, command, String::from_utf8_lossy(&data).into_owned()))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

fn tcp(address: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for a in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{address}: no address"))))
}

impl Conn {
    fn open(cfg: &SyslogConfig, tls: Option<&openssl::ssl::SslConnector>) -> anyhow::Result<Conn> {
        Ok(match cfg.transport {
            Transport::Udp => {
                let addr = cfg
                    .address
                    .to_socket_addrs()?
                    .next()
                    .context("no address")?;
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(bind)?;
                s.connect(addr)?;
                Conn::Udp(s)
            }
            Transport::Tcp => Conn::Tcp(tcp(&cfg.address)?),
            Transport::Tls => {
                let connector = tls.context("no TLS connector")?;
                let name = match &cfg.server_name {
                    Some(n) => n.clone(),
                    None => cfg
                        .address
                        .rsplit_once(':')
                        .map_or(cfg.address.as_str(), |(h, _)| h)
                        .trim_matches(['[', ']'])
                        .to_string(),
                };
                let stream = tcp(&cfg.address)?;
                let s = connector
                    .connect(&name, stream)
                    .map_err(|e| anyhow::anyhow!("TLS handshake with {}: {e}", cfg.address))?;
                Conn::Tls(Box::new(s))
            }
            Transport::Relp => Conn::Relp(Relp::open(&cfg.address)?),
        })
    }

    /// Whether the receiver has closed (or reset) the connection: a non-blocking look that
    /// finds end of stream or an error. A syslog receiver sends no data; over TLS what it
    /// sends (TLS 1.3 session tickets) is read and dropped, and a `close_notify` is a close.
    fn closed(&mut self) -> bool {
        if self.set_nonblocking(true).is_err() {
            return true;
        }
        let mut b = [0u8; 512];
        let closed = match self {
            Conn::Udp(_) => false,
            Conn::Tcp(s) => loop {
                match s.read(&mut b) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
                }
            },
            Conn::Tls(s) => loop {
                match s.ssl_read(&mut b) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) => break e.code() != openssl::ssl::ErrorCode::WANT_READ,
                }
            },
            // Between commands a RELP receiver only ever sends `serverclose`.
            Conn::Relp(r) => {
                !r.stream.buffer().is_empty()
                    || !matches!(r.stream.get_ref().peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        };
        closed || self.set_nonblocking(false).is_err()
    }

    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Conn::Udp(_) => Ok(()),
            Conn::Tcp(s) => s.set_nonblocking(on),
            Conn::Tls(s) => s.get_ref().set_nonblocking(on),
            Conn::Relp(r) => r.stream.get_ref().set_nonblocking(on),
        }
    }

    /// Sends messages in order: how many were sent, and the error that stopped the rest.
    /// TCP and TLS frames go out in one write.
    fn send_all(&mut self, msgs: &[String]) -> (usize, Option<std::io::Error>) {
        let framed = |msgs: &[String]| {
            let mut buf = Vec::with_capacity(msgs.iter().map(|m| m.len() + 8).sum());
            for m in msgs {
                buf.extend_from_slice(format!("{} ", m.len()).as_bytes());
                buf.extend_from_slice(m.as_bytes());
            }
            buf
        };
        let all = |r: std::io::Result<()>| match r {
            Ok(()) => (msgs.len(), None),
            Err(e) => (0, Some(e)),
        };
        match self {
            Conn::Tcp(s) => all(s.write_all(&framed(msgs))),
            Conn::Tls(s) => all(s.write_all(&framed(msgs))),
            Conn::Udp(s) => one_by_one(msgs, |m| s.send(m.as_bytes()).map(|_| ())),
            Conn::Relp(r) => one_by_one(msgs, |m| r.syslog(m)),
        }
    }

    /// Whether [`closed`](Self::closed) is worth asking (RELP finds out from its answers,
    /// UDP cannot).
    fn needs_close_check(&self) -> bool {
        matches!(self, Conn::Tcp(_) | Conn::Tls(_))
    }
}

/// Sends `msgs` one at a time with `send`: how many were sent, and the error that stopped the
/// rest.
fn one_by_one(
    msgs: &[String],
    mut send: impl FnMut(&str) -> std::io::Result<()>,
) -> (usize, Option<std::io::Error>) {
    for (i, m) in msgs.iter().enumerate() {
        if let Err(e) = send(m) {
            return (i, Some(e));
        }
    }
    (msgs.len(), None)
}

struct Worker {
    cfg: SyslogConfig,
    name: String,
    tls: Option<openssl::ssl::SslConnector>,
    conn: Option<Conn>,
    spool: Spool,
    policy: SpoolFull,
    host: String,
    /// RFC 5424 APP-NAME.
    app_name: String,
    pid: u32,
    retry_at: Instant,
    backoff: Duration,
    full: bool,
    /// When the connection was last checked for a close by the receiver.
    checked_at: Instant,
}

/// How often, at most, a TCP or TLS connection is checked for a close before a send.
const CLOSE_CHECK_EVERY: Duration = Duration::from_millis(20);
/// Most events sent in one write.
const BATCH: usize = 256;
/// How long the sink waits for more events after sending a batch that was not full.
const LINGER: Duration = Duration::from_millis(5);

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Starts one sink's thread.
pub fn start(
    cfg: &SyslogConfig,
    spool_dir: &Path,
    max_bytes: u64,
    policy: SpoolFull,
    host: &str,
) -> anyhow::Result<Handle> {
    let name = cfg.sink_name();
    let dir_name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let spool = Spool::open(&spool_dir.join(dir_name), max_bytes)?;
    let tls = match cfg.transport {
        Transport::Tls => {
            let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?;
            b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))?;
            if let Some(ca) = &cfg.ca_file {
                b.set_ca_file(ca)
                    .with_context(|| format!("loading {}", ca.display()))?;
            }
            Some(b.build())
        }
        _ => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let w = Worker {
        cfg: cfg.clone(),
        name: name.clone(),
        tls,
        conn: None,
        spool,
        policy,
        host: host.to_string(),
        app_name: cfg.app_name(),
        pid: std::process::id(),
        retry_at: Instant::now(),
        backoff: MIN_BACKOFF,
        full: false,
        checked_at: Instant::now(),
    };
    super::metrics()
        .spool_bytes
        .with_label_values(&[&name])
        .set(w.spool.pending() as i64);
    std::thread::Builder::new()
        .name(format!("audit-{name}"))
        .spawn(move || w.run(rx))?;
    Ok(Handle { tx })
}

impl Worker {
    fn run(mut self, rx: Receiver<Arc<Entry>>) {
        loop {
            if !self.spool.is_empty() {
                self.drain();
            }
            let next = if self.spool.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                let wait = self.retry_at.saturating_duration_since(Instant::now());
                rx.recv_timeout(wait.max(Duration::from_millis(10)))
            };
            match next {
                Ok(e) => {
                    // This event and what else is waiting, in one batch.
                    let mut batch = vec![format(&e, &self.host, &self.app_name, self.pid)];
                    while batch.len() < BATCH
                        && let Ok(e) = rx.try_recv()
                    {
                        batch.push(format(&e, &self.host, &self.app_name, self.pid));
                    }
                    let full = batch.len() == BATCH;
                    self.deliver(batch);
                    // Let events gather: one wake-up and one write per few milliseconds
                    // instead of one per event (a delay the receiver cannot notice).
                    if !full {
                        std::thread::sleep(LINGER);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// A connection, opening one if it is time to try.
    fn connection(&mut self) -> Option<&mut Conn> {
        let check = self.conn.as_ref().is_some_and(Conn::needs_close_check)
            && self.checked_at.elapsed() >= CLOSE_CHECK_EVERY;
        if check {
            self.checked_at = Instant::now();
        }
        if check && self.conn.as_mut().is_some_and(Conn::closed) {
            tracing::warn!(sink = %self.name, "the syslog receiver closed the connection; spooling audit events");
            self.conn = None;
            self.retry_at = Instant::now() + self.backoff;
        }
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return None;
            }
            match Conn::open(&self.cfg, self.tls.as_ref()) {
                Ok(c) => {
                    if !self.spool.is_empty() {
                        tracing::info!(sink = %self.name, pending_bytes = self.spool.pending(), "the syslog receiver is back; sending spooled audit events");
                    }
                    self.conn = Some(c);
                    self.backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    tracing::debug!(sink = %self.name, error = %format!("{e:#}"), "cannot reach the syslog receiver");
                    self.retry_at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Sends messages in order; how many went (the rest must be spooled).
    fn send(&mut self, msgs: &[String]) -> usize {
        let Some(conn) = self.connection() else {
            return 0;
        };
        let (sent, err) = conn.send_all(msgs);
        super::metrics()
            .sent
            .with_label_values(&[&self.name])
            .inc_by(sent as u64);
        if let Some(e) = err {
            tracing::warn!(sink = %self.name, error = %e, "sending to the syslog receiver failed; spooling audit events");
            self.conn = None;
            self.retry_at = Instant::now() + self.backoff;
        }
        sent
    }

    /// Sends new events, or spools them (behind anything already spooled).
    fn deliver(&mut self, batch: Vec<String>) {
        let sent = if self.spool.is_empty() {
            self.send(&batch)
        } else {
            0
        };
        for msg in &batch[sent..] {
            self.spool_event(msg);
        }
    }

    fn spool_event(&mut self, msg: &str) {
        let m = super::metrics();
        let size = msg.len() as u64 + 1;
        if self.spool.pending() + size > self.spool.max {
            match self.policy {
                SpoolFull::DropOldest => match self.spool.make_room(size) {
                    Ok(n) => {
                        m.dropped.with_label_values(&[&self.name]).inc_by(n);
                        tracing::error!(sink = %self.name, dropped = n, "the audit spool is full; dropped the oldest events");
                    }
                    Err(e) => {
                        tracing::error!(sink = %self.name, error = %e, "the audit spool is unusable")
                    }
                },
                SpoolFull::FailClosed => {
                    m.dropped.with_label_values(&[&self.name]).inc();
                    if !self.full {
                        tracing::error!(sink = %self.name, "the audit spool is full; refusing registry writes until it drains (fail-closed)");
                    }
                    self.full = true;
                    super::REFUSING_WRITES.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
        if let Err(e) = self.spool.push(msg) {
            m.dropped.with_label_values(&[&self.name]).inc();
            tracing::error!(sink = %self.name, error = %e, "writing the audit spool failed; event lost");
        }
        m.spool_bytes
            .with_label_values(&[&self.name])
            .set(self.spool.pending() as i64);
    }

    /// Sends spooled events in order while the receiver takes them.
    fn drain(&mut self) {
        loop {
            let lines = match self.spool.peek_lines(256) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(sink = %self.name, error = %e, "reading the audit spool failed");
                    return;
                }
            };
            if lines.is_empty() {
                // Only a torn line (from a crash) is left: it was never whole.
                self.spool.cursor = self.spool.len;
            }
            for (line, end) in lines {
                if self.send(std::slice::from_ref(&line)) == 0 {
                    return;
                }
                self.spool.cursor = end;
                if let Err(e) = self.spool.save_cursor() {
                    tracing::error!(sink = %self.name, error = %e, "saving the audit spool cursor failed");
                }
            }
            let _ = self.spool.compact();
            let pending = self.spool.pending();
            super::metrics()
                .spool_bytes
                .with_label_values(&[&self.name])
                .set(pending as i64);
            if self.full && pending < self.spool.max / 2 {
                self.full = false;
                super::REFUSING_WRITES.store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(sink = %self.name, "the audit spool drained; registry writes accepted again");
            }
            if self.spool.is_empty() {
                let _ = self.spool.save_cursor();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_message() {
        let e = Entry {
            line: r#"{"@timestamp":"2026-11-27T05:00:00.123Z","event.action":"login"}"#.into(),
            timestamp: "2026-11-27T05:00:00.123Z".into(),
            action: "login".into(),
            failure: true,
        };
        assert_eq!(
            format(&e, "host1", "portcullis-gateway", 42),
            format!(
                "<108>1 2026-11-27T05:00:00.123Z host1 portcullis-gateway 42 login - {}",
                e.line
            )
        );
    }

    #[test]
    fn spool_keeps_order_drops_oldest_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 30).unwrap();
        for m in ["one", "two", "three"] {
            s.push(m).unwrap();
        }
        let lines = s.peek_lines(10).unwrap();
        assert_eq!(
            lines.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
            ["one", "two", "three"]
        );
        s.cursor = lines[0].1;
        s.save_cursor().unwrap();
        let mut s = Spool::open(dir.path(), 30).unwrap();
        assert_eq!(s.peek_lines(1).unwrap()[0].0, "two");
        // 10 unsent bytes ("two\nthree\n"); 22 more need the oldest one gone.
        assert_eq!(s.make_room(22).unwrap(), 1);
        assert_eq!(s.peek_lines(5).unwrap()[0].0, "three");
    }
}
