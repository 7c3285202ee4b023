//! `regbench`: push and pull blobs and GET manifests against registries, verifying every
//! digest, and print figures with the ratio against a reference measured in the same run.
//!
//! With no `--target`, it starts `storage-backend` (target/release) and Debian's
//! `docker-registry` (distribution 2.8.2) on fresh roots side by side and compares them,
//! also reporting storage-backend's peak RSS. With `--target name=url` (repeatable) it
//! measures the given registries; the first is the reference for ratios.
//!
//! ```sh
//! cargo run --release -p portcullis-tests --bin regbench
//! cargo run --release -p portcullis-tests --bin regbench -- --target mine=http://127.0.0.1:5000
//! cargo run --release -p portcullis-tests --bin regbench -- --gateway
//! ```
//!
//! With `--gateway` it measures the gateway over TLS with bearer tokens in production shape
//! (`gateway serve` in front of one storage-backend): a blob pull against nginx serving the
//! same file over TLS, the push/pull/manifest workload against distribution 2.8.2, the
//! gateway's peak RSS, and token issuance.
//!
//! With `--ldap` it measures LDAP logins at the token endpoint; with `--sso`, the refresh
//! grant of a session made by single sign-on, next to the gateway's cheapest TLS request; with
//! `--federation`, CI token exchange (jwt-bearer grant and JWT password) with warm keys; with
//! `--audit`, manifest GETs with the audit trail on and off; with `--ha`, two gateways and
//! two storage nodes behind HAProxy against one of each, and token issuance on Redis against
//! the in-memory store; with `--s3`, storage-backend on S3 (moto) against the filesystem,
//! with moto's own cost measured by a plain S3 client; with `--gc`, garbage collection of a
//! store of 1,000 repositories and its effect on concurrent pulls; with `--scale`, catalog
//! and tag pages and a GC dry run on registry:2 roots of growing size against distribution
//! on the same root; with `--scale-gc-blobs`, a GC dry run of a root of a million blobs (and
//! with `--scale-gc-live`, then a real run under pull load); with `--scale-s3`, tag pages on
//! S3 against distribution's on the same bucket; with
//! `--cache`, a pull-through cache's warm and cold pulls; with `--console`, the web console's
//! pages at 100 000 repositories.
//!
//! One module per mode: [`cli`] (the arguments), [`measure`] (shared measurement helpers),
//! [`workload`](mod@workload) (the push/pull/manifest comparison), [`gateway_suite`](mod@gateway_suite), [`ldap`],
//! [`sso`], [`federation`], [`audit`], [`ha`], [`s3`], [`gc`], [`scale`], [`scale_gc`],
//! [`scale_gc_live`], [`scale_s3`], [`cache`] and [`console`](mod@console).

mod audit;
mod cache;
mod cli;
mod console;
mod cpu;
mod federation;
mod gateway_suite;
mod gc;
mod ha;
mod ldap;
mod measure;
mod s3;
mod scale;
mod scale_gc;
mod scale_gc_live;
mod scale_s3;
mod sso;
mod workload;

use anyhow::Context;
use audit::audit_suite;
use clap::Parser;
use cli::Args;
use federation::federation_suite;
use gateway_suite::gateway_suite;
use gc::gc_suite;
use ha::ha_suite;
use ldap::ldap_suite;
use portcullis_tests::client::Client;
use portcullis_tests::server::StorageServer;
use portcullis_tests::tools::Distribution;
use s3::s3_suite;
use scale::scale_suite;
use sso::sso_suite;
use workload::{measure_all, report, workload};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch_in = match &args.scratch {
        Some(dir) => dir.clone(),
        None => portcullis_tests::server::workspace_root().join("target"),
    };
    let scratch = tempfile::Builder::new()
        .prefix("regbench-")
        .tempdir_in(&scratch_in)?;
    if args.gateway {
        return gateway_suite(&args, scratch.path()).await;
    }
    if args.ldap {
        return ldap_suite(&args, scratch.path()).await;
    }
    if args.sso {
        return sso_suite(&args, scratch.path()).await;
    }
    if args.federation {
        return federation_suite(&args, scratch.path()).await;
    }
    if args.audit {
        return audit_suite(&args, scratch.path()).await;
    }
    if args.ha {
        return ha_suite(&args, scratch.path()).await;
    }
    if args.s3 {
        return s3_suite(&args, scratch.path()).await;
    }
    if args.gc {
        return gc_suite(&args, scratch.path()).await;
    }
    if args.console {
        return console::console_suite(&args, scratch.path()).await;
    }
    if args.cache {
        return cache::cache_suite(&args, scratch.path()).await;
    }
    if args.scale_s3 {
        return scale_s3::scale_s3(&args, scratch.path()).await;
    }
    if args.scale || args.scale_gc_blobs > 0 {
        return scale_suite(&args, scratch.path()).await;
    }
    // Keep the servers alive for the whole run.
    let mut _keep_storage = None;
    let mut _keep_dist = None;
    let mut targets: Vec<(String, Client, Option<u32>)> = Vec::new();
    if args.target.is_empty() {
        let dist = Distribution::start(&scratch.path().join("distribution"))
            .context("starting docker-registry")?;
        targets.push((
            "distribution-2.8.2".into(),
            Client::new(&dist.base),
            Some(dist.pid()),
        ));
        let ours = StorageServer::start(&scratch.path().join("storage-backend"))?;
        targets.push((
            "storage-backend".into(),
            Client::new(&ours.base),
            ours.pid(),
        ));
        _keep_dist = Some(dist);
        _keep_storage = Some(ours);
    } else {
        for t in &args.target {
            let (name, url) = t.split_once('=').context("--target is name=url")?;
            targets.push((name.into(), Client::new(url), None));
        }
    }
    println!("regbench: {}", workload(&args));
    report(&measure_all(&targets, &args).await?);
    Ok(())
}
