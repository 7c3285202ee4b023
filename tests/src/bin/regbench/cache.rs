//! `--cache`: a pull-through cache in production shape (`gateway serve` with a
//! `[[proxy_cache]]` of distribution 2.8.2, one storage node). Warm: a blob the cache holds,
//! pulled through the cache, against the same blob pulled from an ordinary repository of the
//! same gateway (what the cache adds: its storage `HEAD`). Cold: a blob the cache has never
//! seen, pulled through it (fetched from the upstream, streamed to the client and stored at
//! once), against the same blob pulled straight from the upstream (plain HTTP, no TLS).

use crate::cli::Args;
use crate::gateway_suite::{PASSWORD, USER};
use crate::measure::{BigBlob, fetch, mib_s, push};
use anyhow::{Context, ensure};
use portcullis_tests::client::Client;
use portcullis_tests::deployment::{Deployment, SECRET, user_client};
use portcullis_tests::tools::Distribution;
use reqwest::Method;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) async fn cache_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let dist =
        Distribution::start(&scratch.join("distribution")).context("starting docker-registry")?;
    let dep = Deployment::start_in_with(
        scratch,
        &[(USER, PASSWORD)],
        gateway::dev::BCRYPT_COST,
        &format!(
            "[[proxy_cache]]\nprefix = \"hub\"\nurl = \"{}\"\n",
            dist.base
        ),
    )
    .context("starting the gateway with a cache, and its storage node")?;
    let gw = user_client(&dep.gateway, USER, PASSWORD);
    let upstream = Client::new(&dist.base);
    let mut storage = Client::new(&dep.storage.base);
    storage
        .headers
        .push(("portcullis-internal-secret".into(), SECRET.into()));
    let len = (args.pull_mib as u64) << 20;
    println!(
        "regbench --cache: {} MiB blobs, best of {} rounds; gateway over TLS (HTTP/2), upstream distribution 2.8.2 over plain HTTP",
        args.pull_mib, args.rounds
    );

    // Warm: the same blob in an ordinary repository and in the cache.
    let blob = BigBlob::new(args.pull_mib, 2727);
    push(&gw, "bench/warm", blob.body(), len, &blob.digest).await?;
    push(&upstream, "library/warm", blob.body(), len, &blob.digest).await?;
    let cached = format!("/v2/hub/library/warm/blobs/{}", blob.digest);
    let plain = format!("/v2/bench/warm/blobs/{}", blob.digest);
    fetch(&gw, &cached, &blob.digest).await?;
    stored(&storage, "hub/library/warm", &blob).await?;
    fetch(&gw, &plain, &blob.digest).await?;
    let (mut best_plain, mut best_cached) = (0f64, 0f64);
    for _ in 0..args.rounds {
        let t = Instant::now();
        fetch(&gw, &plain, &blob.digest).await?;
        best_plain = best_plain.max(mib_s(len, t.elapsed()));
        let t = Instant::now();
        fetch(&gw, &cached, &blob.digest).await?;
        best_cached = best_cached.max(mib_s(len, t.elapsed()));
    }
    println!(
        "warm pull   ordinary repository {best_plain:>6.0} MiB/s   through the cache {best_cached:>6.0} MiB/s   ratio {:.2}×",
        best_cached / best_plain
    );

    // Cold: a new blob each round, straight from the upstream first (so both reads find it in
    // the page cache), then through the cache, which has never seen it.
    let (mut best_direct, mut best_cold) = (0f64, 0f64);
    for round in 0..args.rounds {
        let blob = BigBlob::new(args.pull_mib, 9000 + round as u64);
        let repo = format!("library/cold{round}");
        push(&upstream, &repo, blob.body(), len, &blob.digest).await?;
        let direct = format!("/v2/{repo}/blobs/{}", blob.digest);
        let t = Instant::now();
        fetch(&upstream, &direct, &blob.digest).await?;
        best_direct = best_direct.max(mib_s(len, t.elapsed()));
        let t = Instant::now();
        fetch(
            &gw,
            &format!("/v2/hub/{repo}/blobs/{}", blob.digest),
            &blob.digest,
        )
        .await?;
        best_cold = best_cold.max(mib_s(len, t.elapsed()));
        stored(&storage, &format!("hub/{repo}"), &blob).await?;
    }
    println!(
        "cold pull   straight from upstream {best_direct:>6.0} MiB/s   through the cache {best_cold:>6.0} MiB/s   ratio {:.2}×",
        best_cold / best_direct
    );
    Ok(())
}

/// Waits until storage has the blob the cache fetched (it hands it over after the last byte).
async fn stored(storage: &Client, repo: &str, blob: &BigBlob) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = storage
            .req(Method::HEAD, &format!("/v2/{repo}/blobs/{}", blob.digest))
            .send()
            .await?;
        if r.status() == 200 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the cache never stored {}",
            blob.digest
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
