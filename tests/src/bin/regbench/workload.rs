//! The push/pull/manifest workload measured against each registry (small blobs, one big
//! blob cold and warm, manifest GETs by tag), the best of several rounds, and its report with
//! the ratios to the first registry.

use crate::cli::Args;
use crate::measure::{
    BigBlob, mib_s, noise, peak_rss_mib, pull, push, quantile_ms, reset_peak_rss,
};
use anyhow::{Context, ensure};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Algorithm, Digest};
use portcullis_tests::client::{Client, OCI_MANIFEST, describe};
use reqwest::Method;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub(crate) struct Figures {
    small_push_mib_s: f64,
    small_pull_mib_s: f64,
    big_push_mib_s: f64,
    big_pull_mib_s: f64,
    big_pull_warm_mib_s: f64,
    manifest_get_per_s: f64,
    manifest_p50_ms: f64,
    manifest_p99_ms: f64,
    peak_rss_mib: Option<f64>,
}

pub(crate) async fn measure(
    name: &str,
    c: &Client,
    args: &Args,
    pid: Option<u32>,
    round: usize,
) -> anyhow::Result<Figures> {
    let repo = format!("bench/{name}/r{round}");
    let mut f = Figures::default();
    // Small blobs.
    let blobs: Vec<(Bytes, Digest)> = (0..args.blobs)
        .map(|i| {
            let b = Bytes::from(noise(args.blob_mib << 20, (round * 1000 + i) as u64 + 1));
            let d = Digest::of(Algorithm::Sha256, &b);
            (b, d)
        })
        .collect();
    let total: u64 = blobs.iter().map(|(b, _)| b.len() as u64).sum();
    let t = Instant::now();
    stream::iter(blobs.iter())
        .map(|(b, d)| push(c, &repo, reqwest::Body::from(b.clone()), b.len() as u64, d))
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    f.small_push_mib_s = mib_s(total, t.elapsed());
    let t = Instant::now();
    let got: Vec<u64> = stream::iter(blobs.iter())
        .map(|(_, d)| pull(c, &repo, d))
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    ensure!(got.iter().sum::<u64>() == total);
    f.small_pull_mib_s = mib_s(total, t.elapsed());

    // One big blob.
    let big = BigBlob::new(args.big_mib, round as u64 + 7);
    let big_len = (args.big_mib as u64) << 20;
    // Start every big push from a clean page cache, whatever the previous target left dirty.
    let _ = std::process::Command::new("sync").status();
    reset_peak_rss(pid);
    let t = Instant::now();
    push(c, &repo, big.body(), big_len, &big.digest).await?;
    f.big_push_mib_s = mib_s(big_len, t.elapsed());
    // Cold: from the disk, as a registry with more content than memory serves most pulls
    // (dropping the page cache needs root; without it this pull may be warm).
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let t = Instant::now();
    ensure!(pull(c, &repo, &big.digest).await? == big_len);
    f.big_pull_mib_s = mib_s(big_len, t.elapsed());
    // Warm: the same blob again, from the page cache.
    let t = Instant::now();
    ensure!(pull(c, &repo, &big.digest).await? == big_len);
    f.big_pull_warm_mib_s = mib_s(big_len, t.elapsed());
    f.peak_rss_mib = peak_rss_mib(pid);

    // Manifest GETs by tag.
    let (config, _) = &blobs[0];
    let (layer, _) = &blobs[1];
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0].1.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blobs[1].1.to_string(), "size": layer.len()}],
    }))?;
    let md = Digest::of(Algorithm::Sha256, &manifest);
    let r = c
        .put_manifest(&repo, "latest", OCI_MANIFEST, &manifest)
        .await?;
    ensure!(r.status() == 201, "manifest PUT: {}", describe(r).await);
    let path = format!("/v2/{repo}/manifests/latest");
    let t = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(0..args.manifest_gets)
        .map(|_| async {
            let sent = Instant::now();
            let r = c
                .req(Method::GET, &path)
                .header("accept", OCI_MANIFEST)
                .send()
                .await?;
            ensure!(r.status() == 200, "manifest GET: {}", r.status());
            let body = r.bytes().await?;
            ensure!(
                Digest::of(Algorithm::Sha256, &body) == md,
                "manifest digest mismatch"
            );
            Ok(sent.elapsed())
        })
        .buffer_unordered(args.manifest_concurrency)
        .try_collect()
        .await?;
    f.manifest_get_per_s = args.manifest_gets as f64 / t.elapsed().as_secs_f64();
    latencies.sort();
    f.manifest_p50_ms = quantile_ms(&latencies, 0.5);
    f.manifest_p99_ms = quantile_ms(&latencies, 0.99);
    Ok(f)
}

pub(crate) fn best(runs: &[Figures]) -> Figures {
    let max = |f: fn(&Figures) -> f64| runs.iter().map(f).fold(0.0, f64::max);
    Figures {
        small_push_mib_s: max(|f| f.small_push_mib_s),
        small_pull_mib_s: max(|f| f.small_pull_mib_s),
        big_push_mib_s: max(|f| f.big_push_mib_s),
        big_pull_mib_s: max(|f| f.big_pull_mib_s),
        big_pull_warm_mib_s: max(|f| f.big_pull_warm_mib_s),
        manifest_get_per_s: max(|f| f.manifest_get_per_s),
        // Latencies of the round with the best throughput.
        manifest_p50_ms: runs
            .iter()
            .max_by(|a, b| a.manifest_get_per_s.total_cmp(&b.manifest_get_per_s))
            .map_or(0.0, |f| f.manifest_p50_ms),
        manifest_p99_ms: runs
            .iter()
            .max_by(|a, b| a.manifest_get_per_s.total_cmp(&b.manifest_get_per_s))
            .map_or(0.0, |f| f.manifest_p99_ms),
        peak_rss_mib: runs.iter().filter_map(|f| f.peak_rss_mib).reduce(f64::max),
    }
}

/// The push/pull/manifest workload in words.
pub(crate) fn workload(args: &Args) -> String {
    format!(
        "{} × {} MiB at concurrency {}, 1 × {} MiB, {} manifest GETs at concurrency {}, best of {}",
        args.blobs,
        args.blob_mib,
        args.concurrency,
        args.big_mib,
        args.manifest_gets,
        args.manifest_concurrency,
        args.rounds
    )
}

/// Measures each target in turn, best of `args.rounds`.
pub(crate) async fn measure_all(
    targets: &[(String, Client, Option<u32>)],
    args: &Args,
) -> anyhow::Result<Vec<(String, Figures)>> {
    let mut results = Vec::new();
    for (name, c, pid) in targets {
        let mut runs = Vec::new();
        for round in 0..args.rounds {
            runs.push(
                measure(name, c, args, *pid, round)
                    .await
                    .with_context(|| format!("measuring {name}"))?,
            );
        }
        results.push((name.clone(), best(&runs)));
    }
    Ok(results)
}

/// Prints the figures, then each target's ratio to the first.
pub(crate) fn report(results: &[(String, Figures)]) {
    let reference = &results[0];
    println!(
        "\n{:<20} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>16} {:>12}",
        "registry",
        "push 1MiB×N",
        "pull 1MiB×N",
        "push big",
        "pull big cold",
        "pull big warm",
        "manifest GET",
        "GET p50/p99",
        "peak RSS"
    );
    for (name, f) in results {
        println!(
            "{:<20} {:>9.0} MiB/s {:>9.0} MiB/s {:>9.0} MiB/s {:>9.0} MiB/s {:>9.0} MiB/s {:>12.0}/s {:>8.2}/{:.2} ms {:>12}",
            name,
            f.small_push_mib_s,
            f.small_pull_mib_s,
            f.big_push_mib_s,
            f.big_pull_mib_s,
            f.big_pull_warm_mib_s,
            f.manifest_get_per_s,
            f.manifest_p50_ms,
            f.manifest_p99_ms,
            f.peak_rss_mib.map_or("-".into(), |m| format!("{m:.1} MiB"))
        );
    }
    let r = &reference.1;
    for (name, f) in results.iter().skip(1) {
        println!(
            "{:<20} {:>13.2}× {:>13.2}× {:>13.2}× {:>13.2}× {:>13.2}× {:>13.2}×   (ratio to {})",
            name,
            f.small_push_mib_s / r.small_push_mib_s,
            f.small_pull_mib_s / r.small_pull_mib_s,
            f.big_push_mib_s / r.big_push_mib_s,
            f.big_pull_mib_s / r.big_pull_mib_s,
            f.big_pull_warm_mib_s / r.big_pull_warm_mib_s,
            f.manifest_get_per_s / r.manifest_get_per_s,
            reference.0
        );
    }
}
