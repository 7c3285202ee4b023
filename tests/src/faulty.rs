//! A TCP relay in front of a real server that can misbehave on cue — the faults a real
//! upstream cannot be made to produce at a chosen moment: a slow link, a connection cut after
//! so many bytes, a `429 Too Many Requests` to everything, nothing at all. It counts the bytes
//! it relayed from the server, so a test can tell how far a transfer was.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the relay does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relays as it is.
    Pass,
    /// Relays the server's bytes at about this many per second (per connection).
    Throttle(u64),
    /// Relays until this many bytes came from the server in all (from when the mode was set),
    /// then cuts every connection.
    CutAfter(u64),
    /// Relays until this many bytes came from the clients in all (from when the mode was
    /// set), then cuts the connection that sent the last of them and goes back to `Pass`:
    /// an upload cut once in the middle.
    CutClientOnceAfter(u64),
    /// Answers every request with 429 and `Retry-After: 1`.
    TooMany,
    /// Refuses connections (closes them at once).
    Down,
}

struct Shared {
    mode: Mutex<(Mode, u64)>,
    /// Bytes relayed from the server since the relay started.
    from_server: AtomicU64,
    /// Bytes relayed from clients since the relay started.
    from_client: AtomicU64,
}

/// The relay; stops when dropped.
pub struct Faulty {
    /// `127.0.0.1:<port>` to connect to instead of the server.
    pub addr: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Faulty {
    /// A relay to `target` (`host:port`) on a free port, in `Mode::Pass`.
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared {
            mode: Mutex::new((Mode::Pass, 0)),
            from_server: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
        });
        let (s, target) = (shared.clone(), target.to_string());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (s, target) = (s.clone(), target.clone());
                tokio::spawn(async move {
                    let _ = relay(client, &target, s).await;
                });
            }
        });
        Ok(Faulty { addr, shared, task })
    }

    /// Changes the mode, for open connections too (`Down` closes them).
    pub fn set(&self, mode: Mode) {
        let mut m = self.shared.mode.lock().expect("mode");
        let since = match mode {
            Mode::CutClientOnceAfter(_) => self.from_client(),
            _ => self.from_server(),
        };
        *m = (mode, since);
    }

    /// Bytes relayed from the server so far.
    pub fn from_server(&self) -> u64 {
        self.shared.from_server.load(Ordering::SeqCst)
    }

    /// Bytes relayed from clients so far.
    pub fn from_client(&self) -> u64 {
        self.shared.from_client.load(Ordering::SeqCst)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn current(s: &Shared) -> (Mode, u64) {
    *s.mode.lock().expect("mode")
}

const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 73\r\n\r\n{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"slow down, try later\"}]}";

/// One client connection. The mode is read again for every piece, so a connection a client
/// keeps in its pool behaves as the relay does now: in `TooMany` each request it sends gets a
/// 429 (the cache only sends GET and HEAD upstream: a read from the client is a request).
async fn relay(mut client: TcpStream, target: &str, s: Arc<Shared>) -> std::io::Result<()> {
    let mut server = match current(&s).0 {
        Mode::Down => return Ok(()),
        Mode::TooMany => None,
        _ => Some(TcpStream::connect(target).await?),
    };
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    // What this connection relayed while throttled, and since when.
    let mut throttled: Option<(std::time::Instant, u64)> = None;
    loop {
        let (mode, since) = current(&s);
        if mode == Mode::Down {
            return Ok(());
        }
        let want = from_server.len();
        tokio::select! {
            n = client.read(&mut from_client) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                match (current(&s).0, server.as_mut()) {
                    (Mode::TooMany, _) | (_, None) => {
                        client.write_all(TOO_MANY).await?;
                        // The server's answer to an earlier request is not wanted any more.
                        server = None;
                    }
                    (Mode::CutClientOnceAfter(limit), Some(server)) => {
                        let sent = s.from_client.load(Ordering::SeqCst) - since;
                        if sent + n as u64 >= limit {
                            let rest = limit.saturating_sub(sent) as usize;
                            server.write_all(&from_client[..rest]).await?;
                            s.from_client.fetch_add(rest as u64, Ordering::SeqCst);
                            *s.mode.lock().expect("mode") = (Mode::Pass, 0);
                            return Ok(());
                        }
                        server.write_all(&from_client[..n]).await?;
                        s.from_client.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    (_, Some(server)) => {
                        server.write_all(&from_client[..n]).await?;
                        s.from_client.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            }
            n = async {
                match server.as_mut() {
                    Some(sv) => sv.read(&mut from_server[..want]).await,
                    None => std::future::pending().await,
                }
            } => {
                let mut n = n? as u64;
                if n == 0 {
                    return Ok(());
                }
                let mut cut = false;
                if let Mode::CutAfter(limit) = mode {
                    let sent = s.from_server.load(Ordering::SeqCst) - since;
                    if sent + n >= limit {
                        n = limit.saturating_sub(sent);
                        cut = true;
                    }
                }
                client.write_all(&from_server[..n as usize]).await?;
                s.from_server.fetch_add(n, Ordering::SeqCst);
                if cut {
                    return Ok(());
                }
                if let Mode::Throttle(rate) = mode {
                    let rate = rate.max(1) as f64;
                    let (start, sent) =
                        throttled.get_or_insert_with(|| (std::time::Instant::now(), 0));
                    // A connection that was idle (kept alive between requests) starts again:
                    // idle time is no credit for a burst.
                    let behind = start.elapsed().as_secs_f64() - *sent as f64 / rate;
                    if behind > 0.05 {
                        *start = std::time::Instant::now();
                        *sent = 0;
                    }
                    *sent += n;
                    let due = std::time::Duration::from_secs_f64(*sent as f64 / rate);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
    }
}
