//! What every connection to the TLS listener goes through before its TLS handshake.
//!
//! 1. Its first byte must arrive within `tls.hello_timeout_ms`: a connection that never
//!    speaks (half-open, or opened only to hold a descriptor) is closed then instead of
//!    after Pingora's 60-second handshake timeout. The byte is put back for the handshake.
//! 2. From a trusted load balancer, the PROXY header (`proxy_protocol`).

use crate::proxy_protocol::ProxyProtocol;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

pub struct Edge {
    pub hello_timeout: Duration,
    pub proxy_protocol: Option<Arc<ProxyProtocol>>,
}

#[async_trait::async_trait]
impl PreTlsProcess for Edge {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let mut first = [0u8; 512];
        let n = match tokio::time::timeout(self.hello_timeout, stream.read(&mut first)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(pingora::Error::because(
                    pingora::ErrorType::ReadError,
                    "reading the first bytes",
                    e,
                ));
            }
            Err(_) => {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::ReadTimedout,
                    "no TLS hello in time",
                ));
            }
        };
        if n == 0 {
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectionClosed,
                "closed before a TLS hello",
            ));
        }
        stream.rewind(&first[..n]);
        match &self.proxy_protocol {
            Some(p) => p.process(stream).await,
            None => Ok(()),
        }
    }
}
