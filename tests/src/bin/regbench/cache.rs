//! `--cache`: a pull-through cache in production shape (`gateway serve` with a
//! `[[proxy_cache]]` of distribution 2.8.2, one storage node). Warm: a blob the cache holds,
//! pulled through the cache, against the same blob pulled from an ordinary repository of the
//! same gateway (what the cache adds: its storage `HEAD`). Cold: a blob the cache has never
//! seen, pulled through it (fetched from the upstream, streamed to the client and stored at
//! once), against the same blob pulled straight from the upstream (plain HTTP, no TLS). The
//! client's token is fetched before the clock starts (a login is not the cache's cost); the
//! CPU seconds per GiB of the processes serving each pull are printed beside the throughput.

use crate::cli::Args;
use crate::cpu::{cpu_seconds, per_gib};
use crate::gateway_suite::{PASSWORD, USER};
use crate::measure::{BigBlob, fetch, mib_s, push};
use anyhow::{Context, ensure};
use portcullis_tests::client::{Client, scopes_for};
use portcullis_tests::deployment::{Deployment, storage_client, user_client};
use portcullis_tests::faulty::{Faulty, Mode};
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
    let storage = storage_client(&dep.storage);
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
        "{:<26} ordinary repository    {best_plain:>6.0} MiB/s   through the cache {best_cached:>6.0} MiB/s   ratio {:.2}×",
        "warm pull",
        best_cached / best_plain
    );

    // Cold, on loopback (CPU-bound: the cache hashes, spills, uploads and encrypts what the
    // upstream only reads from disk), then with the upstream behind paced links.
    let serving = Serving::of(&dist, &dep);
    cold(
        args,
        &dist,
        &gw,
        &storage,
        None,
        &serving,
        "cold pull, loopback",
    )
    .await?;
    let link = Faulty::start(&dist.addr).await?;
    let linked = Deployment::start_in_with(
        scratch,
        &[(USER, PASSWORD)],
        gateway::dev::BCRYPT_COST,
        &format!(
            "[[proxy_cache]]\nprefix = \"hub\"\nurl = \"http://{}\"\n",
            link.addr
        ),
    )?;
    let gw2 = user_client(&linked.gateway, USER, PASSWORD);
    let storage2 = storage_client(&linked.storage);
    let serving = Serving::of(&dist, &linked);
    for (i, &mib) in args.cache_link_mib.iter().enumerate() {
        link.set(Mode::Throttle(mib << 20));
        let what = format!("cold pull, {mib} MiB/s link");
        let via = Via {
            addr: &link.addr,
            seeds: 100 * (i as u64 + 1),
        };
        cold(args, &dist, &gw2, &storage2, Some(via), &serving, &what).await?;
    }
    Ok(())
}

/// The processes that serve a pull: the upstream alone (straight from it), or the upstream
/// with the cache's gateway and storage node (through the cache).
struct Serving {
    upstream: u32,
    cache: Vec<u32>,
}

impl Serving {
    /// `dist` as the upstream of the cache `dep` (its gateway and storage node).
    fn of(dist: &Distribution, dep: &Deployment) -> Self {
        Serving {
            upstream: dist.pid(),
            cache: [dep.gateway.pid(), dep.storage.pid()]
                .into_iter()
                .flatten()
                .collect(),
        }
    }
}

/// A paced link to the upstream, and where its rounds' blob seeds start (each link speed
/// pulls blobs the cache has never seen).
#[derive(Clone, Copy)]
struct Via<'a> {
    addr: &'a str,
    seeds: u64,
}

/// A new blob each round, straight from the upstream (through `via`, the paced link, when
/// given) first, then through the cache, which has never seen it.
async fn cold(
    args: &Args,
    dist: &Distribution,
    gw: &Client,
    storage: &Client,
    via: Option<Via<'_>>,
    serving: &Serving,
    what: &str,
) -> anyhow::Result<()> {
    let len = (args.pull_mib as u64) << 20;
    let upstream = Client::new(&dist.base);
    let direct_client = match via {
        Some(v) => Client::new(&format!("http://{}", v.addr)),
        None => upstream.clone(),
    };
    let upstream_pid = [serving.upstream];
    let through_cache: Vec<u32> = serving.cache.iter().copied().chain(upstream_pid).collect();
    // The best round's throughput, and the CPU seconds per GiB of that round.
    let (mut direct, mut cached) = ((0f64, 0f64), (0f64, 0f64));
    for round in 0..args.rounds {
        let seed = 9000 + round as u64 + via.map_or(0, |v| v.seeds);
        let blob = BigBlob::new(args.pull_mib, seed);
        let repo = format!("library/cold{seed}");
        push(&upstream, &repo, blob.body(), len, &blob.digest).await?;
        let path = format!("/v2/{repo}/blobs/{}", blob.digest);
        let (cpu, t) = (cpu_seconds(&upstream_pid), Instant::now());
        fetch(&direct_client, &path, &blob.digest).await?;
        let (took, cpu) = (t.elapsed(), cpu_seconds(&upstream_pid) - cpu);
        if mib_s(len, took) > direct.0 {
            direct = (mib_s(len, took), per_gib(cpu, len));
        }
        let path = format!("/v2/hub/{repo}/blobs/{}", blob.digest);
        // The client keeps the token for its scope: the pull below does not log in.
        gw.token(&scopes_for("GET", &path)).await?;
        let (cpu, t) = (cpu_seconds(&through_cache), Instant::now());
        fetch(gw, &path, &blob.digest).await?;
        let took = t.elapsed();
        // Storage's end of the upload (its digest check) is the cache's CPU too.
        stored(storage, &format!("hub/{repo}"), &blob).await?;
        let cpu = cpu_seconds(&through_cache) - cpu;
        if mib_s(len, took) > cached.0 {
            cached = (mib_s(len, took), per_gib(cpu, len));
        }
    }
    println!(
        "{what:<26} straight from upstream {:>6.0} MiB/s ({:.2} CPU s/GiB)   through the cache {:>6.0} MiB/s ({:.2} CPU s/GiB)   ratio {:.2}×",
        direct.0,
        direct.1,
        cached.0,
        cached.1,
        cached.0 / direct.0
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
