//! The PROXY protocol (HAProxy's, versions 1 and 2) on the TLS listener.
//!
//! A load balancer in TCP mode (TLS passes through to the gateway) connects from its own
//! address, so every client would look like the load balancer: one source address for the
//! lockouts, the rate limits and the audit trail. With `[proxy_protocol] trusted_proxies`,
//! a connection from one of those addresses may start with a PROXY header naming the client,
//! and that address is the connection's peer from then on. A header from anyone else is not
//! read (it then fails the TLS handshake), so nobody outside the load balancers can claim an
//! address. A trusted peer that sends no header is taken as a direct client (health checks,
//! an administrator on the load balancer's host).
//!
//! The header is read before the TLS handshake, within `header_timeout_ms`; bytes read past
//! it (the client's TLS hello, when both came in one segment) are put back on the stream.

use pingora::listeners::PreTlsProcess;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::l4::stream::Stream as L4Stream;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// `[proxy_protocol]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Addresses or CIDR blocks of the load balancers (`10.0.0.5`, `10.0.0.0/24`, `fd00::/8`).
    pub trusted_proxies: Vec<String>,
    /// How long a trusted peer has to send its header.
    #[serde(default = "default_timeout")]
    pub header_timeout_ms: u64,
}

fn default_timeout() -> u64 {
    5000
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { net, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on an IPv6 socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let prefix =
            |a: u128, b: u128, len: u32, width: u32| len == 0 || (a ^ b) >> (width - len) == 0;
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => prefix(
                u32::from(n).into(),
                u32::from(i).into(),
                self.bits.into(),
                32,
            ),
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                prefix(u128::from(n), u128::from(i), self.bits.into(), 128)
            }
            _ => false,
        }
    }
}

/// What a connection started with.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// No PROXY header: a direct client.
    None,
    /// A header naming the client.
    Client(SocketAddr),
    /// A header that names nobody (`LOCAL` health checks, `UNKNOWN`, non-TCP families).
    Local,
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line (the spec's 107 bytes) and the most v2 address data we accept.
const V1_MAX: usize = 107;
const V2_MAX: usize = 16 + 536;

/// Parses what `buf` holds so far: `Ok(Some((header, length)))` when complete,
/// `Ok(None)` when more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, String> {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if starts(V2_SIGNATURE) {
        if buf.len() < 16 {
            return Ok(None);
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX {
            return Err("PROXY v2 header too long".into());
        }
        if buf.len() < len {
            return Ok(None);
        }
        if buf[12] >> 4 != 2 {
            return Err("PROXY v2 header with an unknown version".into());
        }
        let body = &buf[16..len];
        let header = match (buf[12] & 0x0f, buf[13]) {
            (0, _) => Header::Local,
            (1, 0x11) if body.len() >= 12 => {
                let ip: [u8; 4] = body[0..4].try_into().map_err(|_| "short")?;
                let port = u16::from_be_bytes([body[8], body[9]]);
                Header::Client(SocketAddr::from((ip, port)))
            }
            (1, 0x21) if body.len() >= 36 => {
                let ip: [u8; 16] = body[0..16].try_into().map_err(|_| "short")?;
                let port = u16::from_be_bytes([body[32], body[33]]);
                Header::Client(SocketAddr::from((ip, port)))
            }
            (1, 0x11 | 0x21) => return Err("PROXY v2 header with short addresses".into()),
            (1, _) => Header::Local,
            _ => return Err("PROXY v2 header with an unknown command".into()),
        };
        return Ok(Some((header, len)));
    }
    if starts(V1_PREFIX) {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() >= V1_MAX {
                Err("PROXY v1 header too long".into())
            } else {
                Ok(None)
            };
        };
        if end + 2 > V1_MAX {
            return Err("PROXY v1 header too long".into());
        }
        let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
            .map_err(|_| "PROXY v1 header is not text")?;
        let parts: Vec<&str> = line.split(' ').collect();
        let header = match parts.as_slice() {
            ["UNKNOWN", ..] => Header::Local,
            [family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
                let ip: IpAddr = src.parse().map_err(|_| "PROXY v1: bad source address")?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return Err("PROXY v1: the address does not match its family".into());
                }
                let port: u16 = sport.parse().map_err(|_| "PROXY v1: bad source port")?;
                Header::Client(SocketAddr::new(ip, port))
            }
            _ => return Err("PROXY v1 header malformed".into()),
        };
        return Ok(Some((header, end + 2)));
    }
    Ok(Some((Header::None, 0)))
}

/// The pre-TLS step of the TLS listener.
pub struct ProxyProtocol {
    trusted: Vec<Cidr>,
    timeout: Duration,
}

impl ProxyProtocol {
    pub fn new(cfg: &ProxyProtocolConfig) -> anyhow::Result<Self> {
        let trusted = cfg
            .trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<Cidr>()
                    .map_err(|e| anyhow::anyhow!("proxy_protocol: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ProxyProtocol {
            trusted,
            timeout: Duration::from_millis(cfg.header_timeout_ms.max(1)),
        })
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Reads the header (if any) and puts back what follows it.
    async fn read_header(stream: &mut L4Stream) -> Result<Header, String> {
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        loop {
            match parse(&buf)? {
                Some((header, used)) => {
                    stream.rewind(&buf[used..]);
                    return Ok(header);
                }
                None if buf.len() > V2_MAX => return Err("PROXY header too long".into()),
                None => {}
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the PROXY header: {e}"))?;
            if n == 0 {
                if buf.is_empty() {
                    // Closed without a byte (a port probe): nothing to say here.
                    return Ok(Header::None);
                }
                return Err("the connection closed before its PROXY header ended".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[async_trait::async_trait]
impl PreTlsProcess for ProxyProtocol {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        use std::os::fd::AsRawFd;
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()));
        let Some(peer) = peer.filter(|p| self.trusts(p.ip())) else {
            return Ok(());
        };
        let header = match tokio::time::timeout(self.timeout, Self::read_header(stream)).await {
            Ok(Ok(h)) => h,
            Ok(Err(why)) => {
                tracing::warn!(load_balancer = %peer, %why, "connection dropped: bad PROXY header");
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InvalidHTTPHeader,
                    why,
                ));
            }
            Err(_) => {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::ReadTimedout,
                    "no PROXY header in time",
                ));
            }
        };
        if let Header::Client(client) = header {
            let digest = pingora::protocols::SocketDigest::from_raw_fd(stream.as_raw_fd());
            let _ = digest
                .peer_addr
                .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(
                    client,
                )));
            stream.set_socket_digest(digest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_match_what_they_cover() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn headers_of_both_versions_are_read_and_the_rest_left() {
        let tls = [0x16u8, 3, 1, 0, 5];
        let mut v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n".to_vec();
        let n = v1.len();
        v1.extend_from_slice(&tls);
        assert_eq!(
            parse(&v1).unwrap(),
            Some((Header::Client("192.0.2.7:51000".parse().unwrap()), n))
        );
        assert_eq!(parse(&v1[..10]).unwrap(), None, "incomplete");
        let v1_6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(v1_6).unwrap().unwrap().0,
            Header::Client("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Header::Local, 15))
        );
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let mut h = v2(1, 0x11, &body);
        let n = h.len();
        h.extend_from_slice(&tls);
        assert_eq!(
            parse(&h).unwrap(),
            Some((Header::Client("198.51.100.9:40000".parse().unwrap()), n))
        );
        assert_eq!(parse(&h[..14]).unwrap(), None);
        assert_eq!(parse(&h[..n - 1]).unwrap(), None);
        assert_eq!(parse(&v2(0, 0, &[])).unwrap(), Some((Header::Local, 16)));
        // TLS straight away: no header, nothing consumed.
        assert_eq!(parse(&tls).unwrap(), Some((Header::None, 0)));
        assert_eq!(parse(b"").unwrap(), None);
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            &b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(parse(&long).is_err());
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "short addresses");
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(parse(&huge).is_err());
        let mut v3 = v2(1, 0x11, &[0; 12]);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err(), "version 3");
    }
}
