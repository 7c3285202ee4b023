//! Portcullis gateway: the Pingora TLS edge. Its rooms, from the request's way in:
//!
//! - [`edge`]: what a connection meets before HTTP (connection caps, first-byte deadline,
//!   PROXY protocol, the TLS certificate).
//! - [`proxy`]: the thin `ProxyHttp` phases; [`route`] parses every path once, [`reply`] is
//!   every answer of the gateway's own (errors in the path's protocol).
//! - [`endpoints`]: everything answered here — the token service ([`token`]), the account
//!   APIs, the sign-in flows, the web console ([`console`]); [`incoming`] is the request they
//!   read.
//! - [`registry`]: the `/v2/` path — the bearer check and immutability, the request storage
//!   gets, the storage nodes, the gateway's own reads of storage; [`cache`]: pull-through
//!   caches of upstream registries under a prefix of `/v2/`; [`remote`]: another registry
//!   spoken to as a client (a cache's upstream, a replication target), with its auth.
//! - [`auth`]: every identity source (htpasswd, LDAP, OIDC, robots, CI federation) behind the
//!   [`auth::Authenticator`] chain.
//! - [`state`]: the shared state store (in memory, or Redis for several gateways);
//!   [`limits`]: lockouts and rate limits; [`live_policy`]: the policy in force.
//! - [`events`]: registry events, their durable outbox, and what consumes it: the
//!   `[[webhooks]]` that receive them and the `[[replication]]` rules that copy changes to
//!   another registry.
//! - [`audit`]: the request context and registry events of the audit trail (the trail itself
//!   is `service::audit`, shared with storage); [`metrics`]; [`admin`]: the admin listener;
//!   [`drain`]: stopping on `SIGTERM` without failing a client.
//! - [`client`]: the client side (credential helper, `gateway robot`).
//! - [`config`]: the configuration (the file and `PORTCULLIS_<TABLE>_<KEY>` variables over
//!   it), assembling the tables each feature owns; [`reload`]: what
//!   `SIGHUP` puts in force of an edited configuration, [`in_force`]: a value a reload
//!   replaces whole; [`clock`] and
//!   [`random`]: the clock and random tokens.
//! - [`dev`]: the embedded default (`gateway dev`), with storage in the same process — the
//!   only user of the `storage_backend` crate.
//!
//! [`run`] wires a [`Settings`] into a Pingora server with a TLS listener (h2 by ALPN and
//! HTTP/1.1), a load balancer over the storage nodes with active `/healthz` checks, and an
//! admin listener (`/metrics`, `/healthz`, `/readyz`).

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod console;
pub mod dev;
pub mod drain;
pub mod edge;
pub mod endpoints;
pub mod events;
pub mod in_force;
pub mod incoming;
pub mod limits;
pub mod live_policy;
pub mod metrics;
pub mod proxy;
pub mod random;
pub mod registry;
pub mod reload;
pub mod remote;
pub mod reply;
pub mod route;
pub mod state;
pub mod token;

use anyhow::Context;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything [`run`] needs, loaded and checked.
pub struct Settings {
    pub listen: SocketAddr,
    pub admin: std::net::TcpListener,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub nodes: Vec<String>,
    /// The internal secret (wiped from memory when dropped).
    pub secret: zeroize::Zeroizing<String>,
    pub health_check_interval: Duration,
    pub idle_timeout: Duration,
    pub token: token::TokenService,
    pub authz: registry::authz::Authz,
    /// OIDC browser login, when configured.
    pub oidc: Option<Arc<auth::oidc::Oidc>>,
    /// The shared state store (its health is part of readiness).
    pub store: Arc<dyn state::StateStore>,
    /// Client addresses from trusted load balancers' PROXY headers.
    pub proxy_protocol: Option<Arc<edge::proxy_protocol::ProxyProtocol>>,
    /// How long a new connection has to send its first byte.
    pub hello_timeout: Duration,
    /// The TLS handshake and the first request's head must arrive within this
    /// (`edge::head`).
    pub head_timeout: Duration,
    /// How long a connection may wait between requests (whole seconds, at least one: HTTP/1
    /// keep-alive counts in seconds, and zero would mean for ever there).
    pub client_idle_timeout: Duration,
    /// Open connections allowed from one source (`0`: no cap).
    pub connections_per_source: usize,
    /// The storage nodes' filesystem root when it is this machine's too
    /// (`[upstream] local_root`): blob reads are answered from its files.
    pub local_root: Option<PathBuf>,
    /// Pull-through caches (`[[proxy_cache]]`), as a reload finds them.
    pub proxy_caches: Arc<cache::LiveCaches>,
    /// The audit trail's file, which the console searches (`[audit] file`).
    pub audit_file: Option<PathBuf>,
    /// Endpoints that receive registry events (`[[webhooks]]`).
    pub webhooks: Vec<events::webhooks::WebhookConfig>,
    /// Rules that copy what this registry holds to another one (`[[replication]]`).
    pub replication: Vec<events::replication::ReplicationConfig>,
    /// Manifest reads answered from memory (`[manifest_cache]`).
    pub manifest_cache: registry::manifests::ManifestCacheConfig,
    /// How long a draining gateway goes on serving what is in flight (`drain_seconds`).
    pub drain: Duration,
    /// How long it says not ready before its listeners close (`drain_delay_seconds`).
    pub drain_delay: Duration,
    /// In-place upgrades: the Unix socket the listening sockets go through
    /// (`upgrade_socket`), and whether this process takes them over from a running one
    /// (`gateway serve --upgrade`).
    pub upgrade: Option<(PathBuf, bool)>,
    /// Work to run on the side runtime before serving (the embedded storage service).
    pub side_tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// What `SIGHUP` reloads (`gateway serve`), told of the events' consumers once built.
    pub reload: Option<Arc<reload::LiveConfig>>,
}

fn storage_health_check() -> Box<pingora::lb::health_check::HttpHealthCheck> {
    let mut hc = pingora::lb::health_check::HttpHealthCheck::new("storage", false);
    if let Ok(req) = pingora::http::RequestHeader::build("GET", b"/healthz", None) {
        let mut req = req;
        let _ = req.insert_header("host", "storage");
        hc.req = req;
    }
    hc.consecutive_failure = 1;
    hc.consecutive_success = 1;
    hc.peer_template.options.connection_timeout = Some(Duration::from_millis(500));
    hc.peer_template.options.read_timeout = Some(Duration::from_secs(1));
    Box::new(hc)
}

/// Runs the gateway until the process is stopped.
pub fn run(settings: Settings) -> anyhow::Result<std::convert::Infallible> {
    let Settings {
        listen,
        admin,
        cert_file,
        key_file,
        nodes,
        secret,
        health_check_interval,
        idle_timeout,
        token,
        authz,
        side_tasks,
        oidc,
        store,
        proxy_protocol,
        hello_timeout,
        head_timeout,
        client_idle_timeout,
        connections_per_source,
        proxy_caches,
        audit_file,
        webhooks,
        replication,
        manifest_cache,
        drain,
        drain_delay,
        upgrade,
        reload,
        local_root,
    } = settings;
    let client_idle_timeout = Duration::from_secs(client_idle_timeout.as_secs().max(1));
    edge::raise_descriptor_limit(connections_per_source);
    let metrics = Arc::new(metrics::Metrics::new());
    let revocations = authz.tokens.revocations().cloned();
    let live_policy = authz.policy.clone();

    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        // Draining: listeners closed at once, what is in flight served for up to this long
        // (the process ends as soon as nothing is: `drain::Drain::exit_when_idle`).
        grace_period_seconds: Some(drain.as_secs()),
        // (the delay is spent in the signal watch, before the grace period)
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: match &upgrade {
            Some((socket, _)) => socket.display().to_string(),
            None => ServerConf::default().upgrade_sock,
        },
        ..ServerConf::default()
    };
    let take_over = upgrade.as_ref().is_some_and(|(_, t)| *t);
    let opt = pingora::server::configuration::Opt {
        upgrade: take_over,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);

    let discovery = registry::upstream::Dns::new(&nodes)?;
    let mut upstreams =
        LoadBalancer::<RoundRobin>::from_backends(pingora::lb::Backends::new(Box::new(discovery)));
    // The first discovery answers from what was resolved just now, without waiting.
    futures_util::FutureExt::now_or_never(upstreams.update())
        .context("resolving the upstream nodes")?
        .map_err(|e| anyhow::anyhow!("upstream nodes {nodes:?}: {e}"))?;
    upstreams.set_health_check(storage_health_check());
    upstreams.health_check_frequency = Some(health_check_interval);
    upstreams.update_frequency = Some(registry::upstream::RESOLVE_EVERY);
    let health =
        pingora::services::background::background_service("storage health check", upstreams);
    let upstreams: Arc<LoadBalancer<RoundRobin>> = health.task();

    // The gateway's own requests to storage (the cache's, the console's).
    let internal = Arc::new(registry::internal::Internal::new(
        upstreams.clone(),
        secret.clone(),
    )?);
    let caches = Arc::new(cache::ProxyCaches::new(
        proxy_caches.clone(),
        internal.clone(),
        store.clone(),
    ));
    let tokens = Arc::new(token);
    // Manifest reads answered from memory while their repository has not changed.
    let manifests = manifest_cache.enabled.then(|| {
        Arc::new(registry::manifests::ManifestCache::new(
            store.clone(),
            &manifest_cache,
        ))
    });
    // Registry events, recorded and delivered when there are webhooks or replication rules
    // to take them.
    let events = if webhooks.is_empty() && replication.is_empty() {
        None
    } else {
        Some(Arc::new(events::delivery::Events::new(
            store.clone(),
            &webhooks,
            &replication,
            Arc::new(registry::data::Data::new(internal.clone())),
            live_policy.clone(),
        )?))
    };
    if let (Some(live), Some(ev)) = (&reload, &events) {
        live.set_events(ev.clone());
    }
    let draining = Arc::new(drain::Drain::new(
        drain_delay,
        upgrade.as_ref().map(|(s, _)| s.clone()),
    ));
    let heads = edge::head::HeadDeadlines::new(head_timeout, metrics.connections_refused.clone());
    let gateway = proxy::Gateway {
        pulls: registry::pulls::Pulls::new(internal.clone()),
        drain: draining.clone(),
        heads: heads.clone(),
        manifests: manifests.clone(),
        local: match local_root {
            Some(root) => {
                anyhow::ensure!(
                    root.is_dir(),
                    "upstream.local_root {} is not a directory",
                    root.display()
                );
                Some(registry::local::LocalBlobs::new(root))
            }
            None => None,
        },
        caches,
        events: events.clone(),
        registry: registry::Registry {
            authz,
            limits: tokens.limits.clone(),
        },
        endpoints: endpoints::Endpoints {
            console: Arc::new(console::Console::new(
                tokens.clone(),
                registry::data::Data::new(internal).with_manifests(manifests.clone()),
                oidc.clone(),
                &secret,
                audit_file,
                events.clone(),
            )),
            tokens,
            oidc,
            metrics: metrics.clone(),
        },
        upstreams: upstreams.clone(),
        secret,
        idle_timeout,
        client_idle_seconds: client_idle_timeout.as_secs(),
        metrics: metrics.clone(),
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, gateway);
    if let Some(app) = service.app_logic_mut() {
        app.h2_options = Some(h2_options());
        // Without it an HTTP/2 connection with no stream open is kept for ever.
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(client_idle_timeout);
        app.server_options = Some(options);
    }
    let certificate = Arc::new(
        edge::tls::ServerCertificate::load(&cert_file, &key_file).map_err(|e| {
            anyhow::anyhow!(
                "loading TLS certificate {} / key {}: {e:#}",
                cert_file.display(),
                key_file.display()
            )
        })?,
    );
    let tls_settings = || -> anyhow::Result<pingora::listeners::tls::TlsSettings> {
        let mut tls = pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(
            edge::tls::Presenter(certificate.clone()),
        ))
        .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
        tls.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))?;
        tls.enable_h2();
        Ok(tls)
    };
    let listener = |addr: String| -> anyhow::Result<pingora::listeners::ListenerConfig> {
        Ok(pingora::listeners::ListenerConfig::tcp(addr)
            .tls(tls_settings()?)
            .l4_buffer(l4_buffer()))
    };
    service.add_listener(listener(listen.to_string())?);
    // A pull-through cache's mirror listener: the same service, told apart by its port.
    for mirror in proxy_caches.listeners() {
        service.add_listener(listener(mirror.to_string())?);
    }
    service
        .endpoints()
        .set_pre_tls_callback(Arc::new(edge::Edge {
            hello_timeout,
            heads,
            proxy_protocol,
            slots: edge::ConnectionSlots::new(
                connections_per_source,
                metrics.connections_open.clone(),
            ),
            refused: metrics.connections_refused.clone(),
        }));
    server.add_service(service);
    server.add_service(health);

    // The side runtime: admin listener and, in dev mode, the embedded storage service.
    admin.set_nonblocking(true)?;
    let admin_state = Arc::new(admin::AdminState {
        metrics,
        upstreams,
        store,
        events: events.clone(),
        drain: draining.clone(),
    });
    let idle = draining.clone();
    std::thread::Builder::new()
        .name("portcullis-side".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("gateway: cannot start the side runtime: {e}");
                    std::process::exit(2);
                }
            };
            rt.block_on(async move {
                for t in side_tasks {
                    tokio::spawn(t);
                }
                tokio::spawn(audit::reopen_on_sighup());
                tokio::spawn(idle.exit_when_idle(Duration::from_millis(500)));
                tokio::spawn(certificate.reload_on_sighup());
                tokio::spawn(live_policy.reload_on_sighup());
                if let Some(r) = revocations {
                    tokio::spawn(r.run());
                }
                if let Some(ev) = &events {
                    ev.start();
                }
                if let Err(e) = admin::serve(admin, admin_state).await {
                    eprintln!("gateway: admin listener failed: {e:#}");
                    std::process::exit(2);
                }
            });
        })?;
    if take_over {
        tracing::info!(
            "taking the listening sockets over from the running gateway (send it SIGQUIT)"
        );
    }
    // With --upgrade: waits (about 5 s) for the running gateway to hand its sockets over —
    // last, once everything that could fail to start has started.
    server.bootstrap();
    server.run(pingora::server::RunArgs {
        shutdown_signal: draining.watch(),
    });
    std::process::exit(draining.timed_out())
}

/// HTTP/2 settings for clients. h2's default receive window (64 KiB per stream and per
/// connection) makes a pushing client wait for a `WINDOW_UPDATE` every 64 KiB; docker and
/// podman push over HTTP/2, so uploads get a 1 MiB stream and 4 MiB connection window.
/// That is also what one connection may make the gateway hold before storage takes it.
/// The client connection's socket buffers, beneath TLS. Pingora's default write buffer is one
/// TCP segment (1 460 bytes), so each TLS record went to the socket in a `write` of its own —
/// two per HTTP/2 DATA frame, as `h2` hands the TLS stream a frame's head with its first KiB,
/// then the rest. A 64 KiB buffer gathers a blob's records into fewer, larger writes; what
/// is written goes out when the protocol layer flushes, as before.
fn l4_buffer() -> pingora::listeners::L4BufferSettings {
    pingora::listeners::L4BufferSettings::new(
        pingora::listeners::DEFAULT_L4_READ_BUFFER_SIZE,
        64 << 10,
    )
}

fn h2_options() -> pingora::protocols::http::v2::server::H2Options {
    let mut o = pingora::protocols::http::v2::server::default_h2_options();
    o.initial_window_size(1 << 20);
    o.initial_connection_window_size(4 << 20);
    // Bigger DATA frames from clients: fewer, larger chunks to forward upstream.
    o.max_frame_size(256 << 10);
    // What a stream may queue for the client before its writer waits (h2's default, 400 KiB,
    // is less than one of the 512 KiB chunks blobs are read in).
    o.max_send_buffer_size(2 << 20);
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_variables_the_gateway_reads_itself_are_not_taken_for_keys() {
        use service::env_config::{NOT_KEYS, PREFIX};
        for name in [
            crate::config::SECRET_ENV,
            crate::dev::ADMIN_PASSWORD_ENV,
            crate::auth::oidc::config::CLIENT_SECRET_ENV,
            crate::auth::ldap::BIND_PASSWORD_ENV,
            crate::auth::robots::ADMIN_TOKEN_ENV,
            crate::auth::pepper::PEPPER_ENV,
            crate::state::redis::PASSWORD_ENV,
            crate::client::credential_helper::REGISTRIES_ENV,
        ] {
            let rest = name.strip_prefix(PREFIX).unwrap();
            assert!(NOT_KEYS.contains(&rest), "{name} is missing from NOT_KEYS");
        }
    }
}
