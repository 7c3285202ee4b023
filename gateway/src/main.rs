//! `gateway dev | serve --config <file> | check-config --config <file> | robot … | audit verify …
//! | hash-password`. `from_config` builds every feature from the config file into the
//! [`gateway::Settings`] that `gateway::run` serves (`gateway dev` builds its own in `dev.rs`).

use clap::{Parser, Subcommand};
use gateway::auth::htpasswd::LiveHtpasswd;
use gateway::registry::authz;
use gateway::token::jwt::Tokens;
use gateway::token::keys::SigningKey;
use gateway::token::refresh::Sessions;
use gateway::{Settings, config, dev, token};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Portcullis gateway: TLS edge, token service, policy enforcement"
)]
struct Cli {
    /// Log format on stderr (default: the config's `[log] format`, else pretty).
    #[arg(long, global = true, env = "PORTCULLIS_LOG_FORMAT", value_parser = ["pretty", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded default: gateway + storage in one process, no external services.
    Dev {
        #[arg(long, default_value = "127.0.0.1:5443")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:5444")]
        admin_listen: SocketAddr,
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// A TOML file merged over the embedded default: `[audit]`, `[[proxy_cache]]`,
        /// `[policy]`, `[limits]`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The same as `--config` (an older name, when the file had only `[audit]`).
        #[arg(long, conflicts_with = "config")]
        audit_config: Option<PathBuf>,
    },
    /// Production: storage nodes, keys, users and policy from a config file and/or
    /// `PORTCULLIS_<TABLE>_<KEY>` variables (which win).
    Serve {
        #[arg(long, env = "PORTCULLIS_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        /// Take the listening sockets over from the running gateway (in-place upgrade: start
        /// this, then send the running one `SIGQUIT`; needs `upgrade_socket`).
        #[arg(long)]
        upgrade: bool,
    },
    /// Load and check the configuration (and everything it names) without starting; print it
    /// as merged from the file and the environment, secrets masked.
    CheckConfig {
        #[arg(long, env = "PORTCULLIS_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage robot accounts through a gateway's admin API.
    Robot(gateway::client::robots_cli::RobotArgs),
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a bcrypt hash of a password read from stdin, for the htpasswd file.
    HashPassword {
        #[arg(long, default_value_t = dev::BCRYPT_COST)]
        cost: u32,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check a trail's hash chain and sequence; names the first edited, missing or
    /// reordered line (exit status 1).
    Verify { file: PathBuf },
}

/// Logs on stderr: `--log-format`, else the config's `[log] format`, else pretty.
fn init_logging(cli: &Cli) {
    let json = match cli.log_format.as_deref() {
        Some(f) => f == "json",
        None => match &cli.command {
            Command::Serve { config, .. } | Command::CheckConfig { config } => {
                config::Config::load(config.as_deref())
                    .is_ok_and(|c| c.config.log.format == service::log::LogFormat::Json)
            }
            _ => false,
        },
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The identity chain, and the htpasswd users (read again on `SIGHUP`) and the LDAP
/// directory (replaced when a reload changes `[auth.ldap]`) in it, if any.
type Identities = (
    Arc<dyn gateway::auth::Authenticator>,
    Option<Arc<LiveHtpasswd>>,
    Option<Arc<gateway::auth::ldap::live::LiveLdap>>,
);

/// Static users first, then LDAP (see [`gateway::auth::Chain`] for the order's rules).
/// `pepper` (`[pepper]`, see [`gateway::auth::pepper`]) is mixed into cached password hashes.
/// CI tokens (JWT passwords) and robots (`robot$…` names) go first: each decides only
/// what is its own. The htpasswd users, when there are, are read again on `SIGHUP`.
fn authenticator(
    c: &config::AuthConfig,
    pepper: &[u8],
    store: Arc<dyn gateway::state::StateStore>,
    machines: Vec<Arc<dyn gateway::auth::Authenticator>>,
) -> anyhow::Result<Identities> {
    let mut chain: Vec<Arc<dyn gateway::auth::Authenticator>> = machines;
    let mut live = None;
    if let Some(f) = &c.htpasswd_file {
        let users = Arc::new(LiveHtpasswd::load(f, &c.groups, c.ldap.is_some())?);
        chain.push(users.clone());
        live = Some(users);
    }
    let mut ldap = None;
    if let Some(l) = &c.ldap {
        let live = Arc::new(gateway::auth::ldap::live::LiveLdap::new(
            l.clone(),
            store,
            pepper,
        )?);
        chain.push(live.clone());
        ldap = Some(live);
    }
    let auth: Arc<dyn gateway::auth::Authenticator> = match chain.len() {
        1 => chain.remove(0),
        _ => Arc::new(gateway::auth::Chain(chain)),
    };
    Ok((auth, live, ldap))
}

/// The settings `c` describes; `path` (the config file, if any) is read again on `SIGHUP`
/// ([`gateway::reload`]).
fn from_config(
    c: config::Config,
    path: Option<PathBuf>,
    take_over: bool,
) -> anyhow::Result<Settings> {
    anyhow::ensure!(
        !take_over || c.upgrade_socket.is_some(),
        "--upgrade needs upgrade_socket in the configuration (the running gateway's)"
    );
    let proxy_caches = Arc::new(gateway::cache::LiveCaches::new(&c.proxy_cache)?);
    let secret = c.secret()?;
    let keys = c
        .token
        .signing_keys
        .iter()
        .map(|p| SigningKey::load(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // One shared state store for sessions, login caches and OIDC flows.
    let store = c.state.open()?;
    gateway::audit::install(
        &c.audit,
        &format!("{}:{}", gateway::audit::hostname(), c.listen.port()),
    )?;
    let peppers = gateway::auth::pepper::Peppers::load(&c.pepper, &secret)?;
    let robots = Arc::new(gateway::auth::robots::Robots::new(
        store.clone(),
        peppers.clone(),
        c.robots.clone(),
    )?);
    let federation = match &c.federation {
        Some(f) => Some(Arc::new(gateway::auth::federation::Federation::new(
            f.clone(),
        )?)),
        None => None,
    };
    let mut machines: Vec<Arc<dyn gateway::auth::Authenticator>> = Vec::new();
    if let Some(f) = &federation {
        machines.push(f.clone());
    }
    machines.push(robots.clone());
    let (auth, users, ldap) = authenticator(&c.auth, peppers.current(), store.clone(), machines)?;
    let mut side_tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
        Vec::new();
    if let Some(u) = &users {
        side_tasks.push(Box::pin(u.clone().reload_on_sighup()));
    }
    let limits = Arc::new(gateway::limits::Limits::new(
        c.limits.clone(),
        store.clone(),
    ));
    let oidc = match &c.oidc {
        Some(o) => Some(Arc::new(gateway::auth::oidc::Oidc::new(
            o.clone(),
            store.clone(),
        )?)),
        None => None,
    };
    let live = Arc::new(gateway::reload::LiveConfig::new(
        path,
        c.clone(),
        limits.clone(),
        ldap,
        Some(robots.clone()),
        oidc.clone(),
        proxy_caches.clone(),
    ));
    side_tasks.push(Box::pin(live.clone().reload_on_sighup()));
    let policy = Arc::new(gateway::live_policy::LivePolicy::from_file(
        c.policy.file.clone(),
    )?);
    let revocations = Arc::new(gateway::token::revoked::Revocations::new(
        store.clone(),
        Duration::from_millis(c.token.revocation_sync_ms.max(100)),
        c.token.expires_in_seconds,
    ));
    let tokens = Arc::new(
        Tokens::new(keys, &c.token.issuer, &c.token.service).with_revocations(revocations),
    );
    let admin = gateway::admin::bind(c.admin_listen, c.upgrade_socket.is_some())?;
    println!("admin listening on {}", admin.local_addr()?);
    Ok(Settings {
        listen: c.listen,
        admin,
        cert_file: c.tls.cert_file.clone(),
        key_file: c.tls.key_file.clone(),
        nodes: c.upstream.nodes.clone(),
        secret,
        health_check_interval: Duration::from_millis(c.upstream.health_check_interval_ms),
        idle_timeout: Duration::from_secs(c.upstream.idle_timeout_seconds),
        authz: authz::Authz {
            tokens: tokens.clone(),
            policy: policy.clone(),
            service: c.token.service.clone(),
            realm: c.token.realm.clone(),
        },
        token: token::TokenService {
            tokens,
            auth,
            policy,
            sessions: Sessions::new(
                store.clone(),
                (c.token.refresh_absolute_hours * 3600) as i64,
                (c.token.refresh_idle_hours * 3600) as i64,
            ),
            users,
            expires_in_seconds: c.token.expires_in_seconds,
            oidc: oidc.clone(),
            reread_lock: Default::default(),
            robots: Some(robots),
            federation,
            limits,
        },
        oidc,
        side_tasks,
        proxy_caches,
        reload: Some(live),
        local_root: c.upstream.local_root.clone(),
        webhooks: c.webhooks.clone(),
        replication: c.replication.clone(),
        manifest_cache: c.manifest_cache.clone(),
        drain: std::time::Duration::from_secs(c.drain_seconds),
        drain_delay: std::time::Duration::from_secs(c.drain_delay_seconds),
        upgrade: c.upgrade_socket.clone().map(|s| (s, take_over)),
        audit_file: c.audit.file.clone(),
        store,
        hello_timeout: std::time::Duration::from_millis(c.tls.hello_timeout_ms.max(1)),
        head_timeout: std::time::Duration::from_secs(c.tls.head_timeout_seconds.max(1)),
        client_idle_timeout: std::time::Duration::from_secs(c.tls.idle_timeout_seconds),
        connections_per_source: c.limits.connections_per_source,
        proxy_protocol: match &c.proxy_protocol {
            Some(p) => Some(Arc::new(gateway::edge::proxy_protocol::ProxyProtocol::new(
                p,
            )?)),
            None => None,
        },
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev {
            listen,
            admin_listen,
            data,
            config,
            audit_config,
        } => {
            let s = dev::settings(dev::DevOptions {
                listen,
                admin_listen,
                data,
                config: config.or(audit_config),
            })?;
            gateway::run(s)?;
            Ok(())
        }
        Command::Serve { config, upgrade } => {
            let loaded = config::Config::load(config.as_deref())?;
            loaded.log_sources();
            gateway::run(from_config(loaded.config, config, upgrade)?)?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let loaded = config::Config::load(config.as_deref())?;
            let shown = loaded.describe()?;
            drop(from_config(loaded.config, config, false)?);
            println!("{shown}");
            println!("configuration is valid");
            Ok(())
        }
        Command::Robot(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(gateway::client::robots_cli::run(args)),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => {
            println!("{}", gateway::audit::verify_file(&file)?);
            Ok(())
        }
        Command::HashPassword { cost } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let pw = line.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!pw.is_empty(), "empty password");
            println!("{}", bcrypt::hash(pw, cost)?);
            Ok(())
        }
    }
}
