//! `--gc`: garbage collection of a filesystem store of many repositories, and pull
//! throughput with and without GC running.

use crate::cli::Args;
use crate::measure::{fetch, noise};
use anyhow::ensure;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Algorithm, Digest};
use portcullis_tests::client::{Client, OCI_MANIFEST};
use portcullis_tests::server::StorageServer;
use reqwest::Method;
use std::path::Path;
use std::time::Instant;

/// Pulls in flight at once while GC runs (here and in `--scale-gc-live`).
pub(crate) const PULLS_AT_ONCE: usize = 16;

/// `--gc`: fills a filesystem store, then measures GC runs and pulls with and without GC.
pub(crate) async fn gc_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::server::StorageOptions;
    let conf = scratch.join("gc.toml");
    std::fs::write(&conf, "[gc]\ngrace_seconds = 0\nfence_seconds = 1\n")?;
    let node = StorageServer::start_with(
        &scratch.join("root"),
        StorageOptions {
            config: Some(conf),
            ..Default::default()
        },
    )?;
    let c = Client::new(&node.base);
    let t = Instant::now();
    // One image per repository: a config and `gc_layers` layers of 4 KiB, all unique.
    let images: Vec<(String, Vec<u8>)> = stream::iter(0..args.gc_repos)
        .map(|r| {
            let c = &c;
            async move {
                let repo = format!("gc/team-{}/app-{r}", r % 50);
                let layers: Vec<Vec<u8>> = (0..args.gc_layers)
                    .map(|l| noise(4096, (r * 1000 + l) as u64 + 99))
                    .collect();
                let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
                let (m, _) = c.push_image(&repo, "v1", &refs).await?;
                Ok::<_, anyhow::Error>((repo, m))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let blobs = args.gc_repos * (args.gc_layers + 2);
    println!(
        "regbench --gc: {} repositories, {blobs} blobs (config, {} layers and the manifest each), stored in {:.1} s",
        args.gc_repos,
        args.gc_layers,
        t.elapsed().as_secs_f64()
    );
    // A fifth deleted: their blobs are garbage.
    let mut kept = Vec::new();
    for (i, (repo, m)) in images.into_iter().enumerate() {
        if i % 5 == 4 {
            let d = Digest::of(Algorithm::Sha256, &m);
            let r = c
                .req(Method::DELETE, &format!("/v2/{repo}/manifests/{d}"))
                .send()
                .await?;
            ensure!(r.status() == 202, "delete: {}", r.status());
        } else {
            kept.push((repo, m));
        }
    }
    let http = reqwest::Client::new();
    let base = node.base.clone();
    let gc = move |dry_run: bool| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let t = Instant::now();
            let q = if dry_run { "?dry_run=true" } else { "" };
            let r: serde_json::Value = http
                .post(format!("{base}/gc{q}"))
                .send()
                .await?
                .json()
                .await?;
            Ok::<_, anyhow::Error>((t.elapsed(), r))
        }
    };
    let kept = &kept;
    let pull = |i: usize| {
        let (repo, m) = &kept[i % kept.len()];
        let c = &c;
        async move {
            let r = c
                .req(Method::GET, &format!("/v2/{repo}/manifests/v1"))
                .header("accept", OCI_MANIFEST)
                .send()
                .await?;
            ensure!(r.status() == 200, "manifest GET: {}", r.status());
            ensure!(r.bytes().await? == *m, "another manifest");
            let v: serde_json::Value = serde_json::from_slice(m)?;
            let d = Digest::parse(v["layers"][0]["digest"].as_str().unwrap_or(""))?;
            fetch(c, &format!("/v2/{repo}/blobs/{d}"), &d).await?;
            Ok(())
        }
    };
    let pulls = |n: usize| async move {
        let t = Instant::now();
        stream::iter(0..n)
            .map(pull)
            .buffer_unordered(PULLS_AT_ONCE)
            .try_collect::<Vec<_>>()
            .await?;
        Ok::<_, anyhow::Error>(n as f64 / t.elapsed().as_secs_f64())
    };
    let (dry_took, dry) = gc(true).await?;
    println!(
        "dry run: {:.2} s; would delete {} blobs ({} bytes), {} layer links",
        dry_took.as_secs_f64(),
        dry["blobs_deleted"].as_array().map_or(0, Vec::len),
        dry["bytes_reclaimed"],
        dry["layer_links_deleted"].as_array().map_or(0, Vec::len)
    );
    let alone = pulls(args.gc_pulls).await?;
    // Pulls while GC runs back to back (each run: two marks around a 1 s fence, then the
    // sweep): the first run reclaims, the others find nothing and only mark.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        let gc = gc.clone();
        tokio::spawn(async move {
            let mut runs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                runs.push(gc(false).await?);
            }
            Ok::<_, anyhow::Error>(runs)
        })
    };
    let during = pulls(args.gc_pulls).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = looping.await??;
    let (first_took, first) = &runs[0];
    println!(
        "first run (under pull load): {:.2} s (marks and sweep {:.2} s without the 1 s fence); deleted {} blobs ({} bytes), {} layer links; {} errors",
        first_took.as_secs_f64(),
        first_took.as_secs_f64() - 1.0,
        first["blobs_deleted"].as_array().map_or(0, Vec::len),
        first["bytes_reclaimed"],
        first["layer_links_deleted"].as_array().map_or(0, Vec::len),
        first["errors"].as_array().map_or(0, Vec::len)
    );
    println!("GC runs during the second pull measurement: {}", runs.len());
    println!("\n| pulls (manifest + 4 KiB layer, concurrency {PULLS_AT_ONCE}) | per second |");
    println!("|---|---|");
    println!("| without GC | {alone:.0} |");
    println!("| with GC running back to back | {during:.0} |");
    println!("| ratio | {:.2}× |", during / alone);
    Ok(())
}
