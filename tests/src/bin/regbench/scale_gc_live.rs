//! `--scale-gc-live`: after `--scale-gc-blobs`' dry runs, a real GC run on the same root by a
//! storage node serving pulls all along — the run a registry of a million blobs makes at
//! night while CI still pulls. Measured: the run's time, the node's peak RSS during it, the
//! pulls' rate without and during it; checked: no pull fails, the run deletes exactly what
//! the dry run found, and afterwards every live image's blobs are on disk, the garbage
//! repositories' are not, and the store holds as many blobs as were live (counted by a walk
//! of `blobs/`, and by the node's own usage gauge). The root's garbage is gone after it.

use crate::cli::Args;
use crate::measure::{fetch, peak_rss_mib, reset_peak_rss};
use crate::scale::repo_name;
use crate::scale_gc::garbage;
use anyhow::{Context, ensure};
use futures_util::StreamExt;
use oci::{Digest, RepositoryName, Tag};
use portcullis_tests::client::{Client, OCI_MANIFEST};
use portcullis_tests::server::{StorageOptions, StorageServer, metrics_text, storage_usage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use storage_backend::layout::Key;

use crate::gc::PULLS_AT_ONCE as CONCURRENCY;
/// How long the pulls are measured without GC.
const ALONE: Duration = Duration::from_secs(20);

/// Pulls made and failed while `stop` is unset.
#[derive(Default)]
struct Pulls {
    done: AtomicUsize,
    failed: std::sync::Mutex<Vec<String>>,
}

/// One pull of a live repository (not [`garbage`]: an image tagged `v1`): its manifest by
/// tag, checked against the digest the node names, and its first layer, digest-checked.
async fn pull(c: &Client, repo: &str) -> anyhow::Result<()> {
    let r = c
        .req(reqwest::Method::GET, &format!("/v2/{repo}/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    ensure!(r.status() == 200, "GET {repo}:v1: {}", r.status());
    let named = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(Digest::parse)
        .context("no Docker-Content-Digest")??;
    let body = r.bytes().await?;
    ensure!(
        Digest::of(named.algorithm(), &body) == named,
        "{repo}:v1 is not {named}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let layer = Digest::parse(v["layers"][0]["digest"].as_str().unwrap_or(""))?;
    fetch(c, &format!("/v2/{repo}/blobs/{layer}"), &layer).await?;
    Ok(())
}

/// Pulls at [`CONCURRENCY`] over the live repositories (a different one each time) until
/// `stop` is set.
async fn pulling(c: &Client, repos: usize, stop: &AtomicBool, pulls: &Pulls) {
    let next = AtomicUsize::new(0);
    futures_util::stream::iter(0..CONCURRENCY)
        .for_each_concurrent(CONCURRENCY, |_| async {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                // A stride through the repositories that skips the garbage ones.
                let mut i = n.wrapping_mul(7_919) % repos;
                if garbage(i) {
                    i -= 1;
                }
                let repo = repo_name(i);
                match pull(c, &repo).await {
                    Ok(()) => {
                        pulls.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => pulls
                        .failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{repo}: {e:#}")),
                }
            }
        })
        .await;
}

/// The node's `storage_blobs` gauge, once its walk of the store has ended.
async fn blobs_gauge(base: &str) -> anyhow::Result<Option<f64>> {
    Ok(storage_usage(&metrics_text(base).await?).map(|(blobs, _)| blobs))
}

/// `--scale-gc-live` on `root` (written by [`crate::scale_gc::gc_at_scale`]), whose dry run
/// found `deletable` blobs to delete and `marked` live.
pub(crate) async fn live_run(
    args: &Args,
    root: &Path,
    scratch: &Path,
    marked: u64,
    deletable: u64,
) -> anyhow::Result<()> {
    let repos = args.scale_gc_repos;
    let conf = scratch.join("gc-live.toml");
    std::fs::write(&conf, "[gc]\ngrace_seconds = 0\nfence_seconds = 1\n")?;
    let node = StorageServer::start_with(
        root,
        StorageOptions {
            config: Some(conf),
            ..Default::default()
        },
    )?;
    let http = reqwest::Client::new();
    // The node walks `blobs/` once at start-up (its usage gauge): measured after it.
    let t = Instant::now();
    let before = loop {
        if let Some(n) = blobs_gauge(&node.base).await? {
            break n;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(600),
            "the node's walk of the store never ended"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "\nregbench --scale-gc-live: a storage node on the root (its start-up walk of {before} blobs took {:.1} s), pulls at concurrency {CONCURRENCY} (manifest by tag + its first layer, digest-checked)",
        t.elapsed().as_secs_f64()
    );
    let c = Client::new(&node.base);

    let alone = Pulls::default();
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    tokio::join!(pulling(&c, repos, &stop, &alone), async {
        tokio::time::sleep(ALONE).await;
        stop.store(true, Ordering::Relaxed);
    });
    let alone_rate = alone.done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();

    reset_peak_rss(node.pid());
    let during = Pulls::default();
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let run = async {
        let report = http
            .post(format!("{}/gc", node.base))
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .context("POST /gc")?
            .error_for_status()?
            .json::<serde_json::Value>()
            .await;
        stop.store(true, Ordering::Relaxed);
        report.context("the GC report")
    };
    let (report, ()) = tokio::join!(run, pulling(&c, repos, &stop, &during));
    let report = report?;
    let wall = t.elapsed();
    let peak = peak_rss_mib(node.pid());
    let during_rate = during.done.load(Ordering::Relaxed) as f64 / wall.as_secs_f64();
    let count = |k: &str| report[k].as_array().map_or(0, Vec::len) as u64;
    let deleted = count("blobs_deleted");
    println!("\n| real GC run, {marked} live blobs, {deletable} garbage | |");
    println!("|---|---|");
    println!(
        "| wall (two marks around a 1 s fence, then the sweep) | {:.1} s |",
        wall.as_secs_f64()
    );
    println!(
        "| node's peak RSS during the run (serving the pulls too) | {} |",
        peak.map_or("n/a".into(), |p| format!("{p:.0} MiB"))
    );
    println!(
        "| blobs deleted / layer links deleted / bytes reclaimed | {deleted} / {} / {} |",
        count("layer_links_deleted"),
        report["bytes_reclaimed"]
    );
    println!(
        "| pulls without GC | {alone_rate:.0}/s ({} pulls) |",
        alone.done.load(Ordering::Relaxed)
    );
    println!(
        "| pulls during the run | {during_rate:.0}/s ({} pulls, {:.2}×) |",
        during.done.load(Ordering::Relaxed),
        during_rate / alone_rate.max(1e-9)
    );
    let failed: Vec<String> = [alone, during]
        .into_iter()
        .flat_map(|p| p.failed.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    println!("| failed pulls | {} |", failed.len());
    ensure!(
        failed.is_empty(),
        "pulls failed: {:?}",
        &failed[..failed.len().min(10)]
    );
    ensure!(
        report["complete"] == true,
        "incomplete run: {}",
        report["errors"]
    );
    ensure!(
        count("errors") == 0,
        "the run reported errors: {}",
        report["errors"]
    );
    ensure!(
        deleted == deletable,
        "the run deleted {deleted} blobs, the dry run found {deletable}"
    );

    // What is left: every live image whole, no garbage, the node's count right.
    let t = Instant::now();
    let on_disk = tokio::task::spawn_blocking({
        let root = root.to_owned();
        move || check_store(&root, repos)
    })
    .await??;
    ensure!(
        on_disk == marked,
        "{on_disk} blobs on disk after the run, {marked} were live"
    );
    let gauge = blobs_gauge(&node.base)
        .await?
        .context("the node's storage_blobs gauge is gone")?;
    ensure!(
        gauge as u64 == marked,
        "the node's storage_blobs says {gauge}, {marked} on disk"
    );
    println!(
        "checked in {:.1} s: every live image's blobs on disk, no garbage repository's layer link left, {on_disk} blobs in the store (the node's gauge agrees)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every live repository's manifest (its tag's target) and the blobs it names are on disk,
/// every garbage repository has lost its layer links; the number of blobs in the store. Paths
/// are the storage service's own ([`Key`]).
fn check_store(root: &Path, repos: usize) -> anyhow::Result<u64> {
    let on_disk = |key: Key| root.join(key.path());
    let v1 = Tag::parse("v1")?;
    for i in 0..repos {
        let name = RepositoryName::parse(&repo_name(i))?;
        if garbage(i) {
            let links = on_disk(Key::Repository(&name)).join("_layers/sha256");
            let left = std::fs::read_dir(&links).map_or(0, |d| d.count());
            ensure!(left == 0, "{}: {left} layer links left", links.display());
            continue;
        }
        let link = std::fs::read_to_string(on_disk(Key::TagCurrentLink(&name, &v1)))
            .with_context(|| format!("{name}: the tag's link"))?;
        let m = Digest::parse(link.trim())?;
        let body =
            std::fs::read(on_disk(Key::Blob(&m))).with_context(|| format!("manifest {m}"))?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let blobs = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&v["config"]));
        for b in blobs {
            let d = Digest::parse(b["digest"].as_str().unwrap_or(""))?;
            ensure!(on_disk(Key::Blob(&d)).is_file(), "{name}: blob {d} is gone");
        }
    }
    let mut n = 0u64;
    for alg in std::fs::read_dir(on_disk(Key::Blobs))? {
        for prefix in std::fs::read_dir(alg?.path())? {
            for blob in std::fs::read_dir(prefix?.path())? {
                if blob?.path().join("data").is_file() {
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}
