//! End-to-end test support: start the real binaries on free ports, talk to them over real
//! sockets, check the store on disk.
//!
//! - [`server`]: start and stop `storage-backend` (and later the gateway) processes.
//! - [`client`]: a small registry client over `reqwest` for pushing and pulling in tests.
//! - [`protocol`]: the protocol suite, driven only by a base URL, so it runs against
//!   storage-backend directly and through the gateway.
//! - [`deployment`]: a gateway in production shape in front of a storage node.
//! - [`haproxy`]: a real HAProxy in front of several gateways.
//! - [`ldap`]: a real slapd with a seeded directory.
//! - [`oidc`]: a real OpenID provider and a headless browser login.
//! - [`faulty`]: a TCP relay in front of a real server that misbehaves on cue (slow, cut, 429).
//! - [`fsck`]: an offline consistency check of a storage root.
//! - [`layout`]: a registry root written directly in distribution's layout (no pushes).
//! - [`redis`]: a real redis-server, stopped and started again at will.
//! - [`syslog`]: a real rsyslogd receiving RFC 5424 over UDP, TCP and TLS.
//! - [`tools`]: running real clients (skopeo, podman, buildah) and distribution.
//! - [`browser`]: a real headless Chromium over WebDriver (the web console's tests).
//! - [`receiver`]: a webhook receiver that keeps what it got and can be down for a while.

pub mod azurite;
pub mod browser;
pub mod client;
pub mod deployment;
pub mod driver_contract;
pub mod faulty;
pub mod fsck;
pub mod haproxy;
pub mod layout;
pub mod ldap;
pub mod moto;
pub mod oidc;
pub mod protocol;
pub mod receiver;
pub mod redis;
pub mod server;
pub mod syslog;
pub mod tools;

/// Where the suite keeps what the leak check reads (`tests/secrets-check.sh`, run by
/// `tests/run.sh` after every test): `ledger.txt`, the random secrets tests were given (robot
/// secrets, refresh tokens), and `logs/`, the audit events of every gateway the tests start.
pub fn leak_check_dir() -> std::path::PathBuf {
    server::workspace_root().join("target/leak-check")
}

/// Notes a secret a test was given, so the leak check can look for it in every log and audit
/// event the suite produced.
pub fn remember_secret(secret: &str) {
    use std::io::Write;
    let dir = leak_check_dir();
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ledger.txt"))
    {
        let _ = writeln!(f, "{secret}");
    }
}
