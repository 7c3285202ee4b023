//! `storage-backend [--config <file>] [--listen <addr:port>] [--root <dir>]
//! [gc [--dry-run] | audit verify <file>]`; every config key can also come from a
//! `PORTCULLIS_<TABLE>_<KEY>` variable (flags over variables over the file).

use anyhow::Context;
use clap::Parser;
use service::log::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use storage_backend::config::{Config, StorageConfig};
use storage_backend::http::{Listener, router};
use tokio::net::TcpListener;

/// Portcullis storage service (OCI Distribution v1.1).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML); see conf/storage-backend.toml. `PORTCULLIS_<TABLE>_<KEY>` variables
    /// set any key over it, or without one.
    #[arg(long, env = "PORTCULLIS_STORAGE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config (port 0 picks a free port, printed on stdout).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Filesystem storage root, overriding the config.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Validate the configuration, print it (from the file and the environment, secrets
    /// masked) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run garbage collection once on the configured store (with `[gc]`'s settings, while
    /// other nodes keep serving) and print its report as JSON.
    Gc {
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Check an audit file's hash chain; name the first edited, missing or reordered line.
    Verify { file: PathBuf },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storage-backend: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Audit {
        command: AuditCommand::Verify { file },
    }) = &args.command
    {
        println!("{}", service::audit::verify_file(file)?);
        return Ok(());
    }
    let loaded = Config::load(args.config.as_deref())?;
    let mut config = loaded.config.clone();
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(root) = args.root {
        config.storage = StorageConfig::Filesystem { root };
    }
    let secret = config.secret()?;
    config.validate(secret.as_ref())?;
    if args.check_config {
        println!("{}", loaded.describe()?);
        println!("configuration is valid");
        return Ok(());
    }
    init_logging(config.log.format);
    loaded.log_sources();

    let store = match &config.storage {
        StorageConfig::Filesystem { root } => {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating storage root {}", root.display()))?;
            root.display().to_string()
        }
        StorageConfig::S3(s3) => format!("s3://{}/{}", s3.bucket, s3.prefix),
        StorageConfig::Azure(az) => {
            format!("azure://{}/{}/{}", az.account, az.container, az.prefix)
        }
    };

    let state = storage_backend::build_state(&config, secret)?;
    if let Some(Command::Gc { dry_run }) = args.command {
        // A run by hand logs its deletions on the `audit` target (stderr) and in the report;
        // it does not append to the node's trail, which the running node writes.
        let report = state.gc.run(dry_run, &state.metrics).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let api = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let api_addr = api.local_addr()?;
    // Tests and scripts read this line to learn the port when binding port 0.
    println!("listening on {api_addr}");
    tracing::info!(%api_addr, %store, "storage-backend listening");
    service::audit::register_metrics(state.metrics.registry(), "storage")?;
    if config.audit.has_sinks() {
        let instance = format!("{}:{}", service::audit::hostname(), api_addr.port());
        service::audit::install(&config.audit, &instance, "storage")?;
        tokio::spawn(service::audit::reopen_on_sighup());
    }
    if config.gc.enabled {
        tokio::spawn(storage_backend::schedule_gc(state.clone()));
    }
    tokio::spawn(storage_backend::measure_usage(state.clone()));

    let shutdown = shutdown_signal();
    let mut servers = tokio::task::JoinSet::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_kind = if config.admin_listen.is_some() {
        Listener::Api
    } else {
        Listener::Combined
    };
    servers.spawn(serve(api, router(state.clone(), api_kind), stop_rx.clone()));
    if let Some(admin) = config.admin_listen {
        let l = TcpListener::bind(admin)
            .await
            .with_context(|| format!("binding admin {admin}"))?;
        println!("admin listening on {}", l.local_addr()?);
        servers.spawn(serve(l, router(state.clone(), Listener::Admin), stop_rx));
    }
    let terminated = shutdown.await;
    // Health checks fail first, so that gateways stop picking this node — and stop using
    // their pooled connections to it — before those connections close.
    state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if terminated {
        tracing::info!(
            drain_delay_seconds = config.drain_delay_seconds,
            "draining: health checks answer 503"
        );
        tokio::time::sleep(Duration::from_secs(config.drain_delay_seconds)).await;
    }
    tracing::info!(
        drain_seconds = config.drain_seconds,
        "shutting down: finishing in-flight requests"
    );
    let _ = stop_tx.send(true);
    let finished = async {
        while let Some(r) = servers.join_next().await {
            r??;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(config.drain_seconds), finished).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("drain_seconds passed with requests still in flight; exiting");
            Ok(())
        }
    }
}

async fn serve(
    listener: TcpListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    // A small response's body must not wait for the ACK of its head (Nagle + delayed ACK:
    // 40 ms per small blob GET otherwise).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("serving")
}

/// Waits for `SIGTERM` (true: drain, health checks failing first) or `SIGINT` (false: stop
/// taking requests at once).
async fn shutdown_signal() -> bool {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => false,
        _ = term.recv() => true,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
