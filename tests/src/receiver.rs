//! A webhook receiver for tests: an HTTP/1.1 server (plain, or over TLS with a certificate of
//! a CA made for it) on a loopback port that answers every `POST` with `204` and keeps what it
//! got (headers and body), in arrival order. It can be stopped and started again on the same
//! port (a receiver that is down for a while).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

pub struct Receiver {
    pub port: u16,
    /// Over TLS: the acceptor, and the CA that signed its certificate (PEM file).
    tls: Option<(openssl::ssl::SslAcceptor, std::path::PathBuf)>,
    /// Everything received so far, across stops and starts.
    pub got: Arc<Mutex<Vec<Delivery>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// A receiver on a free port, listening.
    pub async fn start() -> anyhow::Result<Self> {
        let mut r = Receiver {
            port: crate::tools::free_port()?,
            tls: None,
            got: Arc::default(),
            task: None,
        };
        r.listen().await?;
        Ok(r)
    }

    /// A receiver over TLS, its certificate (for 127.0.0.1) signed by a CA made in `dir`.
    pub async fn start_tls(dir: &std::path::Path) -> anyhow::Result<Self> {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
        let files = gateway::edge::tls::ensure_dev_certificates(dir)?;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_certificate_chain_file(&files.cert)?;
        b.set_private_key_file(&files.key, SslFiletype::PEM)?;
        let mut r = Receiver {
            port: crate::tools::free_port()?,
            tls: Some((b.build(), files.ca_cert)),
            got: Arc::default(),
            task: None,
        };
        r.listen().await?;
        Ok(r)
    }

    /// The CA file that signed a TLS receiver's certificate.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(|(_, ca)| ca.as_path())
    }

    /// The URL to configure (`http://127.0.0.1:<port>/hook`).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/hook", self.port)
    }

    /// Starts listening (again) on its port.
    pub async fn listen(&mut self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        let got = self.got.clone();
        let tls = self.tls.as_ref().map(|(a, _)| a.context().to_owned());
        self.task = Some(tokio::spawn(async move {
            // Its connections go with it when it stops (a kept-alive one too).
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (got, tls) = (got.clone(), tls.clone());
                conns.spawn(async move {
                    let _ = match tls {
                        None => serve(conn, got).await,
                        Some(ctx) => {
                            async {
                                let ssl = openssl::ssl::Ssl::new(&ctx)?;
                                let mut s = tokio_openssl::SslStream::new(ssl, conn)?;
                                std::pin::Pin::new(&mut s).accept().await?;
                                serve(s, got).await
                            }
                            .await
                        }
                    };
                });
                while conns.try_join_next().is_some() {}
            }
        }));
        Ok(())
    }

    /// Stops listening and closes its connections: connections are refused until
    /// [`Receiver::listen`].
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().expect("receiver").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One connection: requests until the client closes (each answered `204`).
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: S,
    got: Arc<Mutex<Vec<Delivery>>>,
) -> anyhow::Result<()> {
    let mut conn = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).await?;
        got.lock()
            .expect("receiver")
            .push(Delivery { headers, body });
        conn.get_mut()
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}
