//! `gateway dev`: a working registry on one machine with nothing else running — gateway and
//! storage in one process, data under `./data`, a generated CA and server certificate, an
//! `admin` user with a generated password, the shipped policy.

use crate::auth::htpasswd::LiveHtpasswd;
use crate::edge::tls;
use crate::registry::authz;
use crate::token::jwt::Tokens;
use crate::token::keys::{SigningKey, generate_pem};
use crate::token::refresh::Sessions;
use crate::{Settings, token};
use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The policy the embedded default uses: the shipped `conf/policy.toml`.
pub const SHIPPED_POLICY: &str = include_str!("../../conf/policy.toml");
/// Environment variable that sets (or resets) the admin password.
pub const ADMIN_PASSWORD_ENV: &str = "PORTCULLIS_ADMIN_PASSWORD";
/// bcrypt cost of generated password hashes.
pub const BCRYPT_COST: u32 = 10;

pub struct DevOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data: PathBuf,
    /// A TOML file merged over the embedded default ([`DevFile`]); `--audit-config` is the
    /// same with only `[audit]`.
    pub config: Option<PathBuf>,
}

/// What a `gateway dev --config` file may set over the embedded default: the tables of
/// `conf/gateway.toml` that need no other service. Anything else is refused by name.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DevFile {
    /// More audit sinks (syslog, stdout); the trail's file stays `<data>/audit/audit.jsonl`
    /// unless it names another.
    #[serde(default)]
    pub audit: Option<crate::audit::AuditConfig>,
    /// Pull-through caches (`[[proxy_cache]]`).
    #[serde(default)]
    pub proxy_cache: Vec<crate::cache::ProxyCacheConfig>,
    /// A policy file instead of the shipped one (reloaded on SIGHUP).
    #[serde(default)]
    pub policy: Option<crate::config::PolicyConfig>,
    /// Lockouts and rate limits.
    #[serde(default)]
    pub limits: Option<crate::limits::LimitsConfig>,
    /// Endpoints that receive registry events (`[[webhooks]]`).
    #[serde(default)]
    pub webhooks: Vec<crate::events::webhooks::WebhookConfig>,
    /// Rules that copy what this registry holds to another one (`[[replication]]`).
    #[serde(default)]
    pub replication: Vec<crate::events::replication::ReplicationConfig>,
    /// Manifest reads answered from the gateway's memory (`[manifest_cache]`, on by default).
    #[serde(default)]
    pub manifest_cache: crate::registry::manifests::ManifestCacheConfig,
}

impl DevFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let f: DevFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for c in &f.proxy_cache {
            c.check_files()?;
        }
        Ok(f)
    }
}

fn random_token(bytes: usize) -> anyhow::Result<String> {
    use base64::Engine;
    let mut raw = vec![0u8; bytes];
    openssl::rand::rand_bytes(&mut raw)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

/// The admin password: from the environment, else generated once (printed) and kept as a
/// bcrypt hash in `<data>/htpasswd`.
fn ensure_admin(path: &Path) -> anyhow::Result<Option<String>> {
    let from_env = std::env::var(ADMIN_PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty());
    if path.exists() && from_env.is_none() {
        return Ok(None);
    }
    let (password, show) = match from_env {
        Some(p) => (p, false),
        None => (random_token(18)?, true),
    };
    let hash = bcrypt::hash(&password, BCRYPT_COST)?;
    tls::write_private(path, format!("admin:{hash}\n").as_bytes())?;
    Ok(show.then_some(password))
}

/// Builds the settings of the embedded default and prints how to use it.
pub fn settings(opts: DevOptions) -> anyhow::Result<Settings> {
    let data = &opts.data;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let tls_files = tls::ensure_dev_certificates(&data.join("tls"))?;

    let key_path = data.join("token-key.pem");
    if !key_path.exists() {
        tls::write_private(&key_path, &generate_pem()?)?;
    }
    let keys = vec![SigningKey::load(&key_path)?];

    let htpasswd_path = data.join("htpasswd");
    let generated = ensure_admin(&htpasswd_path)?;
    let mut groups = BTreeMap::new();
    groups.insert("registry-admins".to_string(), vec!["admin".to_string()]);
    let users = Arc::new(LiveHtpasswd::load(&htpasswd_path, &groups, false)?);

    let file = match &opts.config {
        Some(f) => DevFile::load(f)?,
        None => DevFile::default(),
    };
    crate::cache::config::validate_all(
        &file.proxy_cache,
        &[opts.listen.port(), opts.admin_listen.port()],
    )?;
    let policy = Arc::new(match &file.policy {
        Some(p) => crate::live_policy::LivePolicy::from_file(p.file.clone())?,
        None => crate::live_policy::LivePolicy::fixed(
            policy::Policy::compile("conf/policy.toml (built in)", SHIPPED_POLICY)?,
            SHIPPED_POLICY,
        ),
    });
    let service = "portcullis".to_string();

    // The storage service, in this process, on a loopback port, behind a fresh secret.
    let secret = random_token(32)?;
    let storage_root = data.join("storage");
    std::fs::create_dir_all(&storage_root)?;
    let storage_listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding the embedded storage")?;
    storage_listener.set_nonblocking(true)?;
    let storage_addr = storage_listener.local_addr()?;
    let storage_config = storage_backend::config::Config {
        storage: storage_backend::config::StorageConfig::Filesystem {
            root: storage_root.clone(),
        },
        ..Default::default()
    };
    let state = storage_backend::build_state(
        &storage_config,
        Some(storage_backend::config::Secret::new(secret.clone())),
    )?;
    let app = storage_backend::http::router(state, storage_backend::http::Listener::Combined);
    let storage_task = Box::pin(async move {
        match tokio::net::TcpListener::from_std(storage_listener) {
            Ok(l) => {
                use axum::serve::ListenerExt;
                // As storage-backend does: no Nagle delay on small responses.
                let l = l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                if let Err(e) = axum::serve(l, app).await {
                    eprintln!("gateway: embedded storage failed: {e}");
                    std::process::exit(2);
                }
            }
            Err(e) => {
                eprintln!("gateway: embedded storage failed: {e}");
                std::process::exit(2);
            }
        }
    });

    let audit_file = data.join("audit/audit.jsonl");
    let mut audit = file.audit.clone().unwrap_or_default();
    let audit_file = audit.file.get_or_insert(audit_file).clone();
    crate::audit::install(
        &audit,
        &format!("{}:{}", crate::audit::hostname(), opts.listen.port()),
    )?;
    // Robot accounts outlive restarts: the store's durable entries live in the data directory.
    let store: Arc<dyn crate::state::StateStore> = Arc::new(crate::state::MemoryStore::with_file(
        &data.join("gateway-state.json"),
    )?);
    let robots = Arc::new(crate::auth::robots::Robots::new(
        store.clone(),
        crate::auth::pepper::dev_pepper(&data.join("pepper"))?,
        crate::auth::robots::RobotsConfig::default(),
    )?);
    let revocations = Arc::new(crate::token::revoked::Revocations::new(
        store.clone(),
        Duration::from_secs(1),
        300,
    ));
    let tokens =
        Arc::new(Tokens::new(keys, "portcullis-dev", &service).with_revocations(revocations));

    let admin = std::net::TcpListener::bind(opts.admin_listen)
        .with_context(|| format!("binding the admin listener {}", opts.admin_listen))?;
    let admin_addr = admin.local_addr()?;

    println!("Portcullis registry (embedded default)");
    println!("  registry:     https://{}", opts.listen);
    println!("  admin:        http://{admin_addr} (/metrics /healthz /readyz)");
    println!("  data:         {}", data.display());
    println!("  audit trail:  {}", audit_file.display());
    println!("  CA:           {}", tls_files.ca_cert.display());
    println!(
        "                trust it: podman/skopeo --cert-dir <dir with ca.crt>; docker: copy it to /etc/docker/certs.d/{}/ca.crt",
        opts.listen
    );
    match &generated {
        Some(p) => println!(
            "  admin user:   admin / {p}   (shown once; set {ADMIN_PASSWORD_ENV} to choose another)"
        ),
        None => {
            println!("  admin user:   admin (password as set before, or from {ADMIN_PASSWORD_ENV})")
        }
    }
    for c in &file.proxy_cache {
        println!(
            "  cache:        {}/{}/<name> pulls through {}",
            opts.listen, c.prefix, c.url
        );
        if let Some(m) = c.mirror_listen {
            println!(
                "                mirror (names without {}/): https://{m}",
                c.prefix
            );
        }
    }
    println!("admin listening on {admin_addr}");

    Ok(Settings {
        listen: opts.listen,
        admin,
        cert_file: tls_files.cert,
        key_file: tls_files.key,
        nodes: vec![storage_addr.to_string()],
        secret: secret.into(),
        health_check_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(60),
        authz: authz::Authz {
            tokens: tokens.clone(),
            policy: policy.clone(),
            service,
            realm: None,
        },
        token: token::TokenService {
            tokens,
            auth: Arc::new(crate::auth::Chain(vec![robots.clone(), users.clone()])),
            policy,
            sessions: Sessions::new(store.clone(), 30 * 86_400, 7 * 86_400),
            oidc: None,
            reread_lock: Default::default(),
            users: Some(users.clone()),
            expires_in_seconds: 300,
            robots: Some(robots),
            limits: Arc::new(crate::limits::Limits::new(
                file.limits.clone().unwrap_or_default(),
                store.clone(),
            )),
            federation: None,
        },
        oidc: None,
        side_tasks: {
            let mut tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
                vec![storage_task];
            tasks.push(Box::pin(users.reload_on_sighup()));
            tasks
        },
        store,
        proxy_protocol: None,
        hello_timeout: std::time::Duration::from_secs(10),
        head_timeout: std::time::Duration::from_secs(30),
        client_idle_timeout: Duration::from_secs(60),
        connections_per_source: file
            .limits
            .clone()
            .unwrap_or_default()
            .connections_per_source,
        proxy_caches: Arc::new(crate::cache::LiveCaches::new(&file.proxy_cache)?),
        webhooks: file.webhooks,
        replication: file.replication,
        manifest_cache: file.manifest_cache,
        drain: Duration::from_secs(crate::config::default_drain()),
        drain_delay: Duration::from_secs(crate::config::default_drain_delay()),
        upgrade: None,
        audit_file: Some(audit_file.clone()),
        reload: None,
        // The embedded storage's files, read directly.
        local_root: Some(storage_root),
    })
}
