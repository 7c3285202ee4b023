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
//! store of 1,000 repositories and its effect on concurrent pulls.

use anyhow::{Context, ensure};
use bytes::Bytes;
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Algorithm, Digest, Verifier};
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, https, location, with_query};
use portcullis_tests::deployment::{Deployment, SERVICE, user_client};
use portcullis_tests::server::{GatewayServer, StorageServer};
use portcullis_tests::tools::{Distribution, Nginx};
use reqwest::Method;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Registry push/pull/manifest benchmark")]
struct Args {
    /// A registry to measure, `name=http://host:port` (repeatable). Default: start
    /// storage-backend and distribution 2.8.2 and compare them.
    #[arg(long)]
    target: Vec<String>,
    /// Number of small blobs.
    #[arg(long, default_value_t = 64)]
    blobs: usize,
    /// Size of each small blob, MiB.
    #[arg(long, default_value_t = 1)]
    blob_mib: usize,
    /// Concurrency for small blobs.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Size of the big blob, MiB.
    #[arg(long, default_value_t = 1024)]
    big_mib: usize,
    /// Manifest GETs.
    #[arg(long, default_value_t = 20000)]
    manifest_gets: usize,
    /// Concurrency for manifest GETs.
    #[arg(long, default_value_t = 32)]
    manifest_concurrency: usize,
    /// Rounds of each measurement; the best is kept.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measure the gateway over TLS with tokens (`gateway serve` + storage-backend) against
    /// nginx (blob pull) and distribution 2.8.2, then token issuance.
    #[arg(long)]
    gateway: bool,
    /// `--gateway`: size of the blob pulled from the gateway and from nginx, MiB.
    #[arg(long, default_value_t = 256)]
    pull_mib: usize,
    /// `--gateway`: token requests per kind.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// `--gateway`: concurrency of token requests.
    #[arg(long, default_value_t = 8)]
    token_concurrency: usize,
    /// Measure LDAP logins at the token endpoint (a real slapd): cached and uncached token
    /// issuance next to slapd's own bind rate, and a login with 50 groups.
    #[arg(long)]
    ldap: bool,
    /// `--ldap`: cached token requests.
    #[arg(long, default_value_t = 20000)]
    ldap_cached: usize,
    /// `--ldap`: uncached logins and raw binds.
    #[arg(long, default_value_t = 2000)]
    ldap_uncached: usize,
    /// Measure `POST /token` with `grant_type=refresh_token` for a session made by single
    /// sign-on (a real OpenID provider), against the gateway's JWKS GET as reference.
    #[arg(long)]
    sso: bool,
    /// `--sso`: refresh grants (and reference requests) per measurement.
    #[arg(long, default_value_t = 20000)]
    sso_grants: usize,
    /// Measure CI federation: a CI job's OIDC token (from a real OpenID provider) traded at
    /// `POST /token` (jwt-bearer) and as a Basic password, with the issuer's keys cached,
    /// against the gateway's JWKS GET as reference.
    #[arg(long)]
    federation: bool,
    /// Measure the audit trail's cost: manifest GETs through a gateway with audit on (file
    /// and syslog over TCP to a real rsyslogd) against one with audit off, same storage node.
    #[arg(long)]
    audit: bool,
    /// Measure the load-balanced deployment: HAProxy in front of two gateways (state in a
    /// real Redis) and two storage nodes on one root, against one gateway and one storage
    /// node; then token issuance with the Redis store against the in-memory one.
    #[arg(long)]
    ha: bool,
    /// Measure object storage: storage-backend on S3 (a real `moto_server`) against
    /// storage-backend on the filesystem, and a plain S3 client against moto (moto's own
    /// cost); `--blobs` small blobs and `--s3-big-blobs` × `--s3-big-mib` big ones.
    #[arg(long)]
    s3: bool,
    #[arg(long, default_value_t = 4)]
    s3_big_blobs: usize,
    #[arg(long, default_value_t = 256)]
    s3_big_mib: usize,
    /// Measure garbage collection: a store of `--gc-repos` repositories with an image of
    /// `--gc-layers` layers each (a fifth of them deleted), GC's duration, and pull
    /// throughput with and without a GC running.
    #[arg(long)]
    gc: bool,
    #[arg(long, default_value_t = 1000)]
    gc_repos: usize,
    #[arg(long, default_value_t = 8)]
    gc_layers: usize,
    /// Pulls (manifest by tag + one layer) per measurement.
    #[arg(long, default_value_t = 20000)]
    gc_pulls: usize,
}

#[derive(Debug, Default, Clone)]
struct Figures {
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

/// A reproducible pseudo-random buffer.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The big blob: one random MiB repeated, streamed without holding it.
struct BigBlob {
    unit: Bytes,
    mib: usize,
    digest: Digest,
}

impl BigBlob {
    fn new(mib: usize, seed: u64) -> Self {
        let unit = Bytes::from(noise(1 << 20, seed));
        let mut v = Verifier::new(Algorithm::Sha256);
        for _ in 0..mib {
            v.update(&unit);
        }
        BigBlob {
            unit,
            mib,
            digest: v.finish(),
        }
    }

    fn body(&self) -> reqwest::Body {
        let unit = self.unit.clone();
        reqwest::Body::wrap_stream(stream::iter(
            (0..self.mib).map(move |_| Ok::<_, std::io::Error>(unit.clone())),
        ))
    }
}

/// Push as docker does: POST, one streamed PATCH, PUT ?digest.
async fn push(
    c: &Client,
    repo: &str,
    body: reqwest::Body,
    len: u64,
    digest: &Digest,
) -> anyhow::Result<()> {
    let loc = c.start_upload(repo).await?;
    let r = c
        .req(Method::PATCH, &loc)
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string())
        .body(body)
        .send()
        .await?;
    ensure!(r.status() == 202, "PATCH: {}", describe(r).await);
    let loc = location(&r)?;
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={digest}")))
        .send()
        .await?;
    ensure!(r.status() == 201, "PUT: {}", describe(r).await);
    Ok(())
}

/// GET a blob, hashing it as it arrives; fails unless it matches.
async fn pull(c: &Client, repo: &str, digest: &Digest) -> anyhow::Result<u64> {
    fetch(c, &format!("/v2/{repo}/blobs/{digest}"), digest).await
}

/// GET `path`, hashing the body as it arrives; fails unless it matches `digest`.
async fn fetch(c: &Client, path: &str, digest: &Digest) -> anyhow::Result<u64> {
    let r = c.get(path).await?;
    ensure!(r.status() == 200, "GET {path}: {}", r.status());
    let mut v = Verifier::new(digest.algorithm());
    let mut n = 0u64;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        v.update(&chunk);
    }
    ensure!(
        &v.finish() == digest,
        "pulled content does not match {digest}"
    );
    Ok(n)
}

/// Milliseconds at quantile `q` of sorted latencies.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

async fn measure(
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

fn reset_peak_rss(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn best(runs: &[Figures]) -> Figures {
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
fn workload(args: &Args) -> String {
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
async fn measure_all(
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
fn report(results: &[(String, Figures)]) {
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

/// The gateway's user for `--gateway` (in registry-admins: may do everything).
const USER: &str = "alice";
const PASSWORD: &str = "regbench-password";

/// `--gateway`: the gateway over TLS with tokens (production shape: `gateway serve` in front
/// of one storage-backend) against Debian's nginx serving the same file over TLS and against
/// distribution 2.8.2 (plain HTTP, no auth); then token issuance.
async fn gateway_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let dist =
        Distribution::start(&scratch.join("distribution")).context("starting docker-registry")?;
    let dep = Deployment::start_in(scratch, &[(USER, PASSWORD)], gateway::dev::BCRYPT_COST)
        .context("starting the gateway and its storage node")?;
    let g = &dep.gateway;
    let gw = user_client(g, USER, PASSWORD);

    // One blob pulled from the gateway and from nginx: same bytes, same client, warm.
    let blob = BigBlob::new(args.pull_mib, 4242);
    let len = (args.pull_mib as u64) << 20;
    push(&gw, "bench/pull", blob.body(), len, &blob.digest).await?;
    let www = scratch.join("www");
    std::fs::create_dir_all(&www)?;
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(www.join("blob"))?);
        for _ in 0..args.pull_mib {
            f.write_all(&blob.unit)?;
        }
        f.flush()?;
    }
    let tls = gateway::edge::tls::ensure_dev_certificates(&dep.dir.path().join("tls"))?;
    let nginx = Nginx::start(&scratch.join("nginx"), &www, &tls.cert, &tls.key)?;
    println!(
        "regbench --gateway: {} MiB blob pull vs nginx, best of {}",
        args.pull_mib, args.rounds
    );
    for http1 in [false, true] {
        let proto = if http1 { "HTTP/1.1" } else { "HTTP/2" };
        let mut gwc = Client::with_http(&g.base, https(&g.ca_pem, http1));
        gwc.auth = gw.auth.clone();
        let nc = Client::with_http(&nginx.base, https(&g.ca_pem, http1));
        let gw_path = format!("/v2/bench/pull/blobs/{}", blob.digest);
        fetch(&gwc, &gw_path, &blob.digest).await?;
        fetch(&nc, "/blob", &blob.digest).await?;
        let (mut best_gw, mut best_nginx) = (0f64, 0f64);
        for _ in 0..args.rounds {
            let t = Instant::now();
            fetch(&nc, "/blob", &blob.digest).await?;
            best_nginx = best_nginx.max(mib_s(len, t.elapsed()));
            let t = Instant::now();
            fetch(&gwc, &gw_path, &blob.digest).await?;
            best_gw = best_gw.max(mib_s(len, t.elapsed()));
        }
        println!(
            "pull {} MiB over TLS, {proto:<8}  nginx {best_nginx:>6.0} MiB/s   gateway {best_gw:>6.0} MiB/s   ratio {:.2}×",
            args.pull_mib,
            best_gw / best_nginx
        );
    }
    drop(nginx);

    println!(
        "\nregbench --gateway: {}; peak RSS is the gateway's",
        workload(args)
    );
    let targets = vec![
        (
            "distribution-2.8.2".to_string(),
            Client::new(&dist.base),
            Some(dist.pid()),
        ),
        ("gateway-tls-token".to_string(), gw.clone(), g.pid()),
    ];
    report(&measure_all(&targets, args).await?);
    if let Some(rss) = peak_rss_mib(dep.storage.pid()) {
        println!("storage-backend behind the gateway: peak RSS {rss:.1} MiB");
    }

    token_issuance(g, args).await
}

/// Tokens per second at `GET /token` with Basic credentials (bcrypt at the shipped cost)
/// and at `POST /token` with a refresh token, with latency quantiles.
async fn token_issuance(g: &GatewayServer, args: &Args) -> anyhow::Result<()> {
    let http = https(&g.ca_pem, false);
    let scope = "repository%3Abench%2Ftok%3Apull%2Cpush";
    let basic_url = format!("{}/token?service={SERVICE}&scope={scope}", g.base);
    let r = http
        .post(format!("{}/token", g.base))
        .form(&[
            ("grant_type", "password"),
            ("username", USER),
            ("password", PASSWORD),
            ("access_type", "offline"),
            ("client_id", "regbench"),
            ("service", SERVICE),
        ])
        .send()
        .await?;
    ensure!(r.status() == 200, "password grant: {}", describe(r).await);
    let v: serde_json::Value = r.json().await?;
    let refresh = v["refresh_token"]
        .as_str()
        .context("no refresh token")?
        .to_string();
    println!(
        "\ntoken issuance, {} requests at concurrency {}:",
        args.tokens, args.token_concurrency
    );
    for kind in ["GET /token, Basic (bcrypt)", "POST /token, refresh_token"] {
        let t = Instant::now();
        let mut lat: Vec<Duration> = stream::iter(0..args.tokens)
            .map(|_| async {
                let sent = Instant::now();
                let r = if kind.starts_with("GET") {
                    http.get(&basic_url)
                        .basic_auth(USER, Some(PASSWORD))
                        .send()
                        .await?
                } else {
                    http.post(format!("{}/token", g.base))
                        .form(&[
                            ("grant_type", "refresh_token"),
                            ("refresh_token", refresh.as_str()),
                            ("client_id", "regbench"),
                            ("service", SERVICE),
                            ("scope", "repository:bench/tok:pull,push"),
                        ])
                        .send()
                        .await?
                };
                ensure!(r.status() == 200, "{kind}: {}", describe(r).await);
                let v: serde_json::Value = r.json().await?;
                ensure!(
                    v["access_token"].is_string() || v["token"].is_string(),
                    "{kind}: no token"
                );
                Ok(sent.elapsed())
            })
            .buffer_unordered(args.token_concurrency)
            .try_collect()
            .await?;
        let rate = args.tokens as f64 / t.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "  {kind:<28} {rate:>8.0} tokens/s   p50 {:.2} ms   p99 {:.2} ms",
            quantile_ms(&lat, 0.5),
            quantile_ms(&lat, 0.99)
        );
    }
    Ok(())
}

/// `n` calls of `f` at `concurrency`: calls per second and sorted latencies.
async fn rate<F, Fut>(n: usize, concurrency: usize, f: F) -> anyhow::Result<(f64, Vec<Duration>)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let t = Instant::now();
    let mut lat: Vec<Duration> = stream::iter(0..n)
        .map(|_| {
            let call = f();
            async move {
                let sent = Instant::now();
                call.await?;
                Ok::<_, anyhow::Error>(sent.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let per_s = n as f64 / t.elapsed().as_secs_f64();
    lat.sort();
    Ok((per_s, lat))
}

fn print_rate(what: &str, per_s: f64, lat: &[Duration]) {
    println!(
        "  {what:<52} {per_s:>8.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
        quantile_ms(lat, 0.5),
        quantile_ms(lat, 0.99)
    );
}

/// `--ldap`: a real slapd (seeded like the tests, plus a user in 50 groups) behind the
/// gateway in production shape.
async fn ldap_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::ldap::{self, READER_DN, READER_PW, SUFFIX, Slapd};
    let slapd = Slapd::start().context("starting slapd")?;
    let mut ldif = ldap::user_ldif("many");
    for i in 0..50 {
        ldif.push_str(&format!(
            "dn: cn=bench-{i:02},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: bench-{i:02}\nmember: uid=many,ou=people,{SUFFIX}\n\n"
        ));
    }
    slapd.modify("ldapadd", &ldif)?;
    let table = |ttl: u64| {
        format!(
            "\n[auth.ldap]\nurls = [\"{url}\"]\nbind_dn = \"{READER_DN}\"\nuser_base_dn = \"ou=people,{SUFFIX}\"\n\
             user_filter = \"(objectClass=inetOrgPerson)\"\ngroup_base_dn = \"ou=groups,{SUFFIX}\"\ncache_ttl_seconds = {ttl}\n",
            url = slapd.url
        )
    };
    let env = [("PORTCULLIS_LDAP_BIND_PASSWORD", READER_PW)];
    let start = |name: &str, ttl: u64| -> anyhow::Result<(StorageServer, GatewayServer)> {
        let d = scratch.join(name);
        std::fs::create_dir_all(&d)?;
        let storage = portcullis_tests::deployment::storage_node(&d.join("storage"))?;
        let g = portcullis_tests::deployment::start_gateway_with(
            &d,
            &[&storage],
            &[],
            4,
            &table(ttl),
            &env,
        )?;
        Ok((storage, g))
    };
    let (_s1, cached) = start("cached", 300)?;
    let (_s2, uncached) = start("uncached", 0)?;
    let conc = args.token_concurrency;
    println!(
        "regbench --ldap: slapd {} ({} groups for `many`), token requests at concurrency {conc}",
        slapd.url, 50
    );
    let get_token = |g: &GatewayServer, user: &'static str| {
        let http = https(&g.ca_pem, false);
        let url = format!(
            "{}/token?service={SERVICE}&scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush",
            g.base
        );
        move || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .get(&url)
                    .basic_auth(user, Some(ldap::password(user)))
                    .send()
                    .await?;
                ensure!(r.status() == 200, "token: {}", describe(r).await);
                let v: serde_json::Value = r.json().await?;
                ensure!(v["token"].is_string(), "no token");
                Ok(())
            }
        }
    };

    // slapd's own rate: simple binds of the same user on reused connections (ldap3).
    let binds = {
        let url = slapd.url.clone();
        let dn = format!("uid=bob,ou=people,{SUFFIX}");
        let pw = ldap::password("bob");
        let mut conns = Vec::new();
        for _ in 0..conc {
            let (conn, ldap) = ldap3::LdapConnAsync::new(&url).await?;
            tokio::spawn(async move {
                let _ = conn.drive().await;
            });
            conns.push(ldap);
        }
        let pool = std::sync::Arc::new(std::sync::Mutex::new(conns));
        move || {
            let (pool, dn, pw) = (pool.clone(), dn.clone(), pw.clone());
            async move {
                let mut l = pool.lock().expect("pool").pop().context("no connection")?;
                let r = l.simple_bind(&dn, &pw).await?;
                pool.lock().expect("pool").push(l);
                ensure!(r.rc == 0, "bind: {}", r.rc);
                Ok(())
            }
        }
    };
    let (b, bl) = rate(args.ldap_uncached, conc, binds).await?;
    print_rate("slapd simple bind (reference)", b, &bl);
    let (u, ul) = rate(args.ldap_uncached, conc, get_token(&uncached, "bob")).await?;
    print_rate("token, LDAP uncached (search, bind, 2 groups)", u, &ul);
    println!("  ratio uncached tokens / slapd binds: {:.2}×", u / b);
    let (m, ml) = rate(200, 1, get_token(&uncached, "many")).await?;
    print_rate("token, LDAP uncached, 50 groups, one at a time", m, &ml);
    let f = get_token(&cached, "bob");
    f().await?; // fills the cache
    let (c, cl) = rate(args.ldap_cached, conc, f).await?;
    print_rate("token, LDAP cached", c, &cl);
    Ok(())
}

/// `--sso`: a real IdP (oidc-provider) and a gateway in production shape; a browser sign-in
/// for bob; then `POST /token` with his refresh token, against `GET /auth/jwks.json` (the same
/// TLS and HTTP path, no work) as the reference. A second gateway reads groups from the IdP at
/// every refresh (`groups_refresh_seconds = 0`), to show what that costs.
async fn sso_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::oidc;
    let users = serde_json::json!({"bob": {"password": "bob-idp-pw", "groups": ["team-a"]}});
    let conc = args.token_concurrency;
    println!(
        "regbench --sso: {} requests per measurement at concurrency {conc}",
        args.sso_grants
    );
    for (name, extra, n) in [
        ("groups cached (shipped 300 s)", "", args.sso_grants),
        (
            "groups read at the IdP every time",
            "groups_refresh_seconds = 0",
            (args.sso_grants / 20).max(50),
        ),
    ] {
        let dir = scratch.join(name.split(' ').next().unwrap_or("sso"));
        std::fs::create_dir_all(&dir)?;
        let (_storage, g, idp) = oidc::start_sso(&dir, extra, &users)?;
        let http = https(&g.ca_pem, false);
        let refresh = oidc::sign_in(&http, &g.base, &idp, "bob", "bob-idp-pw", "bench").await?;
        let jwks = jwks_get(&http, &g.base);
        let grant = {
            let (http, url) = (http.clone(), format!("{}/token", g.base));
            let refresh = refresh.clone();
            move || {
                let (http, url, refresh) = (http.clone(), url.clone(), refresh.clone());
                async move {
                    let r = http
                        .post(&url)
                        .form(&[
                            ("grant_type", "refresh_token"),
                            ("refresh_token", refresh.as_str()),
                            ("client_id", "regbench"),
                            ("service", SERVICE),
                            ("scope", "repository:team-a/app:pull,push"),
                        ])
                        .send()
                        .await?;
                    ensure!(r.status() == 200, "refresh grant: {}", describe(r).await);
                    let v: serde_json::Value = r.json().await?;
                    ensure!(v["access_token"].is_string(), "no access token");
                    Ok(())
                }
            }
        };
        println!("{name}:");
        let (j, jl) = rate(n, conc, jwks).await?;
        print_rate("GET /auth/jwks.json (reference)", j, &jl);
        let (r, rl) = rate(n, conc, grant).await?;
        print_rate("POST /token, refresh_token (SSO session)", r, &rl);
        println!("  ratio refresh grants / reference: {:.2}×", r / j);
    }
    Ok(())
}

/// A GET of the gateway's JWKS: the same TLS and HTTP path as a token request, no work.
fn jwks_get(
    http: &reqwest::Client,
    base: &str,
) -> impl Fn() -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + use<> {
    let (http, url) = (http.clone(), format!("{base}/auth/jwks.json"));
    move || {
        let (http, url) = (http.clone(), url.clone());
        Box::pin(async move {
            let r = http.get(&url).send().await?;
            ensure!(r.status() == 200, "jwks: {}", describe(r).await);
            r.bytes().await?;
            Ok(())
        })
    }
}

/// `--federation`: a real IdP issues a CI token (RS256 JWT access token); a gateway in
/// production shape trusts it. After one exchange (keys fetched), `POST /token` with the
/// jwt-bearer grant and `GET /token` with the JWT as Basic password, against the JWKS GET.
async fn federation_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::oidc;
    let n = args.sso_grants;
    let conc = args.token_concurrency;
    println!("regbench --federation: {n} requests per measurement at concurrency {conc}");
    let storage = portcullis_tests::deployment::storage_node(&scratch.join("storage"))?;
    let port = portcullis_tests::tools::free_port()?;
    let g = portcullis_tests::deployment::start_gateway_with(
        scratch,
        &[&storage],
        &[],
        4,
        &oidc::federation_table(&format!("http://127.0.0.1:{port}")),
        &[],
    )?;
    let idp = oidc::start_ci_idp(port)?;
    let ci = oidc::ci_token(&idp.issuer, "ci-team-a", oidc::CI_SECRET, "urn:registry").await?;
    let http = https(&g.ca_pem, false);
    let grant = {
        let (http, url, ci) = (http.clone(), format!("{}/token", g.base), ci.clone());
        move || {
            let (http, url, ci) = (http.clone(), url.clone(), ci.clone());
            async move {
                let r = http
                    .post(&url)
                    .form(&[
                        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                        ("assertion", ci.as_str()),
                        ("client_id", "regbench"),
                        ("service", SERVICE),
                        ("scope", "repository:team-a/app:pull,push"),
                    ])
                    .send()
                    .await?;
                ensure!(r.status() == 200, "jwt-bearer grant: {}", describe(r).await);
                let v: serde_json::Value = r.json().await?;
                ensure!(v["access_token"].is_string(), "no access token");
                Ok(())
            }
        }
    };
    let password = {
        let url = format!(
            "{}/token?service={SERVICE}&scope=repository:team-a/app:pull,push",
            g.base
        );
        let (http, ci) = (http.clone(), ci.clone());
        move || {
            let (http, url, ci) = (http.clone(), url.clone(), ci.clone());
            async move {
                let r = http.get(&url).basic_auth("ci", Some(&ci)).send().await?;
                ensure!(r.status() == 200, "JWT password: {}", describe(r).await);
                r.bytes().await?;
                Ok(())
            }
        }
    };
    grant()
        .await
        .context("the first exchange (fetches the keys)")?;
    // Rounds interleave the three, so noise from other work on the machine hits them alike;
    // each keeps its best round.
    let reference = jwks_get(&http, &g.base);
    let mut best = [(0.0, Vec::new()), (0.0, Vec::new()), (0.0, Vec::new())];
    for _ in 0..args.rounds.max(1) {
        let round = [
            rate(n, conc, &reference).await?,
            rate(n, conc, &grant).await?,
            rate(n, conc, &password).await?,
        ];
        for (b, r) in best.iter_mut().zip(round) {
            if r.0 > b.0 {
                *b = r;
            }
        }
    }
    let [(j, jl), (r, rl), (p, pl)] = best;
    println!("best of {} rounds:", args.rounds.max(1));
    print_rate("GET /auth/jwks.json (reference)", j, &jl);
    print_rate("POST /token, jwt-bearer (CI token, keys cached)", r, &rl);
    print_rate("GET /token, CI token as Basic password", p, &pl);
    println!("  ratio jwt-bearer / reference: {:.2}×", r / j);
    println!("  ratio JWT password / reference: {:.2}×", p / j);
    Ok(())
}

/// `--audit`: one storage node, two gateways in production shape: audit off (no `[audit]`
/// table) and audit on (the hash-chained file and syslog over TCP to a real rsyslogd).
/// Manifest GETs with a bearer token through each, rounds interleaved, best round kept.
async fn audit_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let n = args.manifest_gets;
    let conc = args.manifest_concurrency;
    println!("regbench --audit: {n} manifest GETs per measurement at concurrency {conc}");
    let rs = portcullis_tests::syslog::Rsyslog::start()?;
    let storage = portcullis_tests::deployment::storage_node(&scratch.join("storage"))?;
    let (off_dir, on_dir, file_dir) = (
        scratch.join("off"),
        scratch.join("on"),
        scratch.join("file"),
    );
    for d in [&off_dir, &on_dir, &file_dir] {
        std::fs::create_dir_all(d)?;
    }
    let users = [(USER, PASSWORD)];
    let off = portcullis_tests::deployment::start_gateway(&off_dir, &[&storage], &users, 4)?;
    let audit = format!(
        "[audit]\nfile = \"{}/audit.jsonl\"\n[[audit.syslog]]\naddress = \"127.0.0.1:{}\"\ntransport = \"tcp\"\n",
        on_dir.display(),
        rs.tcp
    );
    let on = portcullis_tests::deployment::start_gateway_with(
        &on_dir,
        &[&storage],
        &users,
        4,
        &audit,
        &[],
    )?;
    let file_only = portcullis_tests::deployment::start_gateway_with(
        &file_dir,
        &[&storage],
        &users,
        4,
        &format!("[audit]\nfile = \"{}/audit.jsonl\"\n", file_dir.display()),
        &[],
    )?;
    let client = portcullis_tests::deployment::user_client(&off, USER, PASSWORD);
    client.push_image("bench/audit", "v1", &[b"layer"]).await?;
    let get = |g: &GatewayServer| {
        let http = https(&g.ca_pem, false);
        let base = g.base.clone();
        async move {
            let r = http
                .get(format!(
                    "{base}/token?service={SERVICE}&scope=repository:bench/audit:pull"
                ))
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await?;
            let token = r.json::<serde_json::Value>().await?["token"]
                .as_str()
                .context("no token")?
                .to_string();
            let url = format!("{base}/v2/bench/audit/manifests/v1");
            Ok::<_, anyhow::Error>(move || {
                let (http, url, token) = (http.clone(), url.clone(), token.clone());
                async move {
                    let r = http
                        .get(&url)
                        .bearer_auth(&token)
                        .header("accept", portcullis_tests::client::OCI_MANIFEST)
                        .send()
                        .await?;
                    ensure!(r.status() == 200, "manifest GET: {}", r.status());
                    r.bytes().await?;
                    Ok(())
                }
            })
        }
    };
    let (get_off, get_on, get_file) = (get(&off).await?, get(&on).await?, get(&file_only).await?);
    let mut best = [(0.0, Vec::new()), (0.0, Vec::new()), (0.0, Vec::new())];
    for round in 0..args.rounds.max(1) {
        // Each round starts with another of the three, so none always goes first.
        for k in 0..3 {
            let i = (round + k) % 3;
            let r = match i {
                0 => rate(n, conc, &get_off).await?,
                1 => rate(n, conc, &get_on).await?,
                _ => rate(n, conc, &get_file).await?,
            };
            if r.0 > best[i].0 {
                best[i] = r;
            }
        }
    }
    let [(a, al), (b, bl), (f, fl)] = best;
    println!("best of {} rounds:", args.rounds.max(1));
    print_rate("manifest GET, audit off (reference)", a, &al);
    print_rate("manifest GET, audit on (file + syslog TCP)", b, &bl);
    print_rate("manifest GET, audit file only", f, &fl);
    println!(
        "  ratio audit on / off: {:.3}× (cost {:.1}%)",
        b / a,
        (1.0 - b / a) * 100.0
    );
    println!(
        "  ratio file only / off: {:.3}× (cost {:.1}%)",
        f / a,
        (1.0 - f / a) * 100.0
    );
    let received = rs.received("tcp").len();
    let recorded = std::fs::read_to_string(on_dir.join("audit.jsonl"))?
        .lines()
        .count();
    println!("  events recorded {recorded}, received by rsyslogd over TCP {received}");
    Ok(())
}

/// A pull token for `repo` from `base`.
async fn pull_token(http: &reqwest::Client, base: &str, repo: &str) -> anyhow::Result<String> {
    let r = http
        .get(format!(
            "{base}/token?service={SERVICE}&scope=repository:{repo}:pull"
        ))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await?;
    ensure!(r.status() == 200, "token: {}", describe(r).await);
    Ok(r.json::<serde_json::Value>().await?["token"]
        .as_str()
        .context("no token")?
        .to_string())
}

/// `GET base+path` with a bearer token, `n` times at `conc`, over HTTP/1.1 connections (one
/// per concurrent request, so a TCP load balancer spreads them); bodies checked against
/// `digest`.
async fn pull_rate(
    ca: &[u8],
    base: &str,
    path: &str,
    token: &str,
    digest: &Digest,
    n: usize,
    conc: usize,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let http = https(ca, true);
    let url = format!("{base}{path}");
    rate(n, conc, || {
        let (http, url, token, digest) =
            (http.clone(), url.clone(), token.to_string(), digest.clone());
        async move {
            let r = http
                .get(&url)
                .bearer_auth(&token)
                .header("accept", portcullis_tests::client::OCI_MANIFEST)
                .send()
                .await?;
            ensure!(r.status() == 200, "GET {url}: {}", r.status());
            let body = r.bytes().await?;
            ensure!(
                portcullis_tests::client::sha256(&body) == digest,
                "wrong body"
            );
            Ok(())
        }
    })
    .await
}

/// `--ha`: one gateway + one storage node (in-memory state) against HAProxy in front of two
/// gateways (Redis) and two storage nodes on one root: manifest GETs and small-blob pulls,
/// rounds interleaved, best kept. Then token issuance (password and refresh grants) of a
/// gateway on Redis against one on the in-memory store.
async fn ha_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::deployment::{start_gateway, start_gateway_with, storage_node};
    let n = args.manifest_gets;
    let conc = args.manifest_concurrency;
    let users = [(USER, PASSWORD)];
    let redis = portcullis_tests::redis::Redis::start()?;
    // One of each.
    let single_dir = scratch.join("single");
    std::fs::create_dir_all(&single_dir)?;
    let s0 = storage_node(&single_dir.join("storage"))?;
    let single = start_gateway(&single_dir, &[&s0], &users, 4)?;
    // Two of each: one root, one certificate, one signing key, Redis.
    let root = scratch.join("shared-storage");
    let nodes = [storage_node(&root)?, storage_node(&root)?];
    let tls = gateway::edge::tls::ensure_dev_certificates(&scratch.join("tls"))?;
    let key = gateway::token::keys::generate_pem()?;
    let mut gws = Vec::new();
    for i in 0..2 {
        let d = scratch.join(format!("gw{i}"));
        portcullis_tests::deployment::share_identity(&d, &tls, &key)?;
        gws.push(start_gateway_with(
            &d,
            &[&nodes[0], &nodes[1]],
            &users,
            4,
            &format!(
                "{}{}",
                redis.state_table("bench:"),
                portcullis_tests::haproxy::TRUST_PROXY
            ),
            &[],
        )?);
    }
    let backends = gws
        .iter()
        .map(portcullis_tests::haproxy::Backend::of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lb = portcullis_tests::haproxy::Haproxy::start(&backends, 1000)?;
    let lb_base = format!("https://{}", lb.host);
    let ca = gws[0].ca_pem.clone();

    println!(
        "regbench --ha: {n} requests per measurement at concurrency {conc} (HTTP/1.1, one \
         connection per concurrent request), best of {} rounds",
        args.rounds.max(1)
    );
    let small = vec![7u8; 4096];
    let mut setups = Vec::new();
    for (name, base, ca) in [
        (
            "one gateway + one storage node",
            single.base.clone(),
            single.ca_pem.clone(),
        ),
        (
            "HAProxy, 2 gateways (Redis) + 2 storage nodes",
            lb_base.clone(),
            ca.clone(),
        ),
    ] {
        let mut c = Client::with_ca(&base, &ca);
        c.auth = Some(portcullis_tests::client::TokenAuth::new(
            &format!("{base}/token"),
            SERVICE,
            Some((USER, PASSWORD)),
        ));
        let (manifest, mdigest) = c.push_image("bench/ha", "v1", &[b"layer"]).await?;
        drop(manifest);
        let bdigest = c.push_blob("bench/ha", small.clone()).await?;
        let token = pull_token(&https(&ca, true), &base, "bench/ha").await?;
        setups.push((name, base, ca, token, mdigest, bdigest));
    }
    let mut best = vec![[(0.0, Vec::new()), (0.0, Vec::new())]; 2];
    for round in 0..args.rounds.max(1) {
        for k in 0..2 {
            let i = (round + k) % 2;
            let (_, base, ca, token, mdigest, bdigest) = &setups[i];
            let m = pull_rate(
                ca,
                base,
                "/v2/bench/ha/manifests/v1",
                token,
                mdigest,
                n,
                conc,
            )
            .await?;
            let b = pull_rate(
                ca,
                base,
                &format!("/v2/bench/ha/blobs/{bdigest}"),
                token,
                bdigest,
                n,
                conc,
            )
            .await?;
            if m.0 > best[i][0].0 {
                best[i][0] = m;
            }
            if b.0 > best[i][1].0 {
                best[i][1] = b;
            }
        }
    }
    for (i, (name, ..)) in setups.iter().enumerate() {
        println!("{name}:");
        print_rate("manifest GET", best[i][0].0, &best[i][0].1);
        print_rate("4 KiB blob GET", best[i][1].0, &best[i][1].1);
    }
    println!(
        "  ratio two of each / one of each: manifest GET {:.2}×, small blob GET {:.2}×",
        best[1][0].0 / best[0][0].0,
        best[1][1].0 / best[0][1].0
    );

    // Token issuance: a gateway on the in-memory store against one on Redis (the same
    // storage node, one at a time).
    let tn = args.tokens;
    let tc = args.token_concurrency;
    println!("\ntoken issuance, {tn} requests per measurement at concurrency {tc}:");
    let on_redis = &gws[0];
    let mut results = Vec::new();
    for (name, g) in [("in-memory store", &single), ("Redis store", on_redis)] {
        let http = https(&g.ca_pem, false);
        let base = g.base.clone();
        let password = rate(tn, tc, || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                pull_token(&http, &base, "bench/ha").await?;
                Ok(())
            }
        })
        .await?;
        let r = http
            .post(format!("{base}/token"))
            .form(&[
                ("grant_type", "password"),
                ("username", USER),
                ("password", PASSWORD),
                ("client_id", "regbench"),
                ("access_type", "offline"),
                ("service", SERVICE),
            ])
            .send()
            .await?;
        let refresh = r.json::<serde_json::Value>().await?["refresh_token"]
            .as_str()
            .context("no refresh token")?
            .to_string();
        let grant = rate(tn, tc, || {
            let (http, base, refresh) = (http.clone(), base.clone(), refresh.clone());
            async move {
                let r = http
                    .post(format!("{base}/token"))
                    .form(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh.as_str()),
                        ("client_id", "regbench"),
                        ("service", SERVICE),
                        ("scope", "repository:bench/ha:pull"),
                    ])
                    .send()
                    .await?;
                ensure!(r.status() == 200, "refresh grant: {}", r.status());
                Ok(())
            }
        })
        .await?;
        println!("{name}:");
        print_rate(
            "GET /token (password, bcrypt cost 4)",
            password.0,
            &password.1,
        );
        print_rate("POST /token (refresh_token grant)", grant.0, &grant.1);
        results.push((password.0, grant.0));
    }
    println!(
        "  ratio Redis / in-memory: password {:.2}×, refresh grant {:.2}×",
        results[1].0 / results[0].0,
        results[1].1 / results[0].1
    );
    Ok(())
}

/// `--gc`: fills a filesystem store, then measures GC runs and pulls with and without GC.
async fn gc_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
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
            .buffer_unordered(16)
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
    println!("\n| pulls (manifest + 4 KiB layer, concurrency 16) | per second |");
    println!("|---|---|");
    println!("| without GC | {alone:.0} |");
    println!("| with GC running back to back | {during:.0} |");
    println!("| ratio | {:.2}× |", during / alone);
    Ok(())
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One phase of the object-storage benchmark: throughput, and the CPU the storage node and
/// moto spent on it.
#[derive(Default, Clone, Copy)]
struct Phase {
    mib_s: f64,
    node_cpu_s: f64,
    moto_cpu_s: f64,
}

impl Phase {
    fn better(self, other: Phase) -> Phase {
        if other.mib_s > self.mib_s {
            other
        } else {
            self
        }
    }
}

/// Runs `work` (moving `bytes`) and measures it.
async fn phase<F: std::future::Future<Output = anyhow::Result<()>>>(
    bytes: u64,
    node: Option<u32>,
    moto: Option<u32>,
    work: F,
) -> anyhow::Result<Phase> {
    let (n0, m0) = (cpu_seconds(node), cpu_seconds(moto));
    let t = Instant::now();
    work.await?;
    let elapsed = t.elapsed();
    Ok(Phase {
        mib_s: mib_s(bytes, elapsed),
        node_cpu_s: cpu_seconds(node) - n0,
        moto_cpu_s: cpu_seconds(moto) - m0,
    })
}

/// Blobs of one size class: pushed then pulled through a registry, or put then got straight
/// on moto with a plain S3 client.
struct S3Workload {
    small: Vec<(Bytes, Digest)>,
    big: Vec<BigBlob>,
    big_len: u64,
}

impl S3Workload {
    fn new(args: &Args, round: usize) -> Self {
        S3Workload {
            small: (0..args.blobs)
                .map(|i| {
                    let b = Bytes::from(noise(args.blob_mib << 20, (round * 1000 + i) as u64 + 1));
                    let d = Digest::of(Algorithm::Sha256, &b);
                    (b, d)
                })
                .collect(),
            big: (0..args.s3_big_blobs)
                .map(|i| BigBlob::new(args.s3_big_mib, (round * 100 + i) as u64 + 500))
                .collect(),
            big_len: (args.s3_big_mib as u64) << 20,
        }
    }

    fn small_bytes(&self) -> u64 {
        self.small.iter().map(|(b, _)| b.len() as u64).sum()
    }

    fn big_bytes(&self) -> u64 {
        self.big_len * self.big.len() as u64
    }

    /// Push and pull through a registry: [small push, small pull, big push, big pull], and
    /// the node's peak RSS over the big pushes and pulls.
    async fn registry(
        &self,
        c: &Client,
        repo: &str,
        node: Option<u32>,
        moto: Option<u32>,
        concurrency: usize,
    ) -> anyhow::Result<([Phase; 4], Option<f64>)> {
        let small_push = phase(self.small_bytes(), node, moto, async {
            stream::iter(self.small.iter())
                .map(|(b, d)| push(c, repo, reqwest::Body::from(b.clone()), b.len() as u64, d))
                .buffer_unordered(concurrency)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
        })
        .await?;
        let small_pull = phase(self.small_bytes(), node, moto, async {
            stream::iter(self.small.iter())
                .map(|(_, d)| pull(c, repo, d))
                .buffer_unordered(concurrency)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
        })
        .await?;
        reset_peak_rss(node);
        // The big blobs all at once, as a client pushes an image's layers.
        let big_push = phase(self.big_bytes(), node, moto, async {
            futures_util::future::try_join_all(
                self.big
                    .iter()
                    .map(|b| push(c, repo, b.body(), self.big_len, &b.digest)),
            )
            .await
            .map(drop)
        })
        .await?;
        let big_pull = phase(self.big_bytes(), node, moto, async {
            futures_util::future::try_join_all(self.big.iter().map(|b| pull(c, repo, &b.digest)))
                .await
                .map(drop)
        })
        .await?;
        Ok((
            [small_push, small_pull, big_push, big_pull],
            peak_rss_mib(node),
        ))
    }

    /// The same bytes put and got straight on moto with a plain S3 client (multipart with
    /// 8 MiB parts for the big ones, as storage-backend writes them).
    async fn direct(
        &self,
        store: &object_store::aws::AmazonS3,
        prefix: &str,
        moto: Option<u32>,
        concurrency: usize,
    ) -> anyhow::Result<[Phase; 4]> {
        use object_store::{ObjectStoreExt, WriteMultipart, path::Path as Key};
        let key = |d: &Digest| Key::from(format!("{prefix}/{}", d.hex()));
        let get = |d: &Digest| {
            let k = key(d);
            let d = d.clone();
            async move {
                let mut v = Verifier::new(d.algorithm());
                let mut s = store.get(&k).await?.into_stream();
                while let Some(chunk) = s.next().await {
                    v.update(&chunk?);
                }
                ensure!(v.finish() == d, "moto returned other content");
                Ok(())
            }
        };
        let small_put = phase(self.small_bytes(), None, moto, async {
            stream::iter(self.small.iter())
                .map(|(b, d)| async move {
                    store.put(&key(d), b.clone().into()).await?;
                    Ok::<_, anyhow::Error>(())
                })
                .buffer_unordered(concurrency)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
        })
        .await?;
        let small_get = phase(self.small_bytes(), None, moto, async {
            stream::iter(self.small.iter())
                .map(|(_, d)| get(d))
                .buffer_unordered(concurrency)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
        })
        .await?;
        let big_put = phase(self.big_bytes(), None, moto, async {
            futures_util::future::try_join_all(self.big.iter().map(|b| async {
                let up = store.put_multipart(&key(&b.digest)).await?;
                let mut w = WriteMultipart::new_with_chunk_size(up, 8 << 20);
                for _ in 0..b.mib {
                    w.wait_for_capacity(2).await?;
                    w.put(b.unit.clone());
                }
                w.finish().await?;
                Ok::<_, anyhow::Error>(())
            }))
            .await
            .map(drop)
        })
        .await?;
        let big_get = phase(self.big_bytes(), None, moto, async {
            futures_util::future::try_join_all(self.big.iter().map(|b| get(&b.digest)))
                .await
                .map(drop)
        })
        .await?;
        Ok([small_put, small_get, big_put, big_get])
    }
}

/// `--s3`: storage-backend on moto against storage-backend on the filesystem, and moto
/// alone with a plain S3 client.
async fn s3_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::moto::Moto;
    let moto = Moto::start()?;
    let fs_node = StorageServer::start(&scratch.join("fs"))?;
    let s3_node = moto.storage_node(&scratch.join("s3"), "bench", "registry")?;
    let direct = moto.object_store("direct")?;
    println!(
        "regbench --s3: {} × {} MiB and {} × {} MiB blobs; small at concurrency {}, big all at once; best of {} rounds",
        args.blobs,
        args.blob_mib,
        args.s3_big_blobs,
        args.s3_big_mib,
        args.concurrency,
        args.rounds
    );
    let mut fs_best = [Phase::default(); 4];
    let mut s3_best = [Phase::default(); 4];
    let mut direct_best = [Phase::default(); 4];
    let mut s3_rss: Option<f64> = None;
    let mut fs_rss: Option<f64> = None;
    let keep = |best: &mut [Phase; 4], got: [Phase; 4]| {
        for (b, g) in best.iter_mut().zip(got) {
            *b = b.better(g);
        }
    };
    for round in 0..args.rounds {
        let w = S3Workload::new(args, round);
        let repo = format!("bench/s3/r{round}");
        let (fs, rss) = w
            .registry(
                &Client::new(&fs_node.base),
                &repo,
                fs_node.pid(),
                None,
                args.concurrency,
            )
            .await?;
        keep(&mut fs_best, fs);
        fs_rss = fs_rss.into_iter().chain(rss).reduce(f64::max);
        let (s3, rss) = w
            .registry(
                &Client::new(&s3_node.base),
                &repo,
                s3_node.pid(),
                moto.pid(),
                args.concurrency,
            )
            .await?;
        keep(&mut s3_best, s3);
        s3_rss = s3_rss.into_iter().chain(rss).reduce(f64::max);
        keep(
            &mut direct_best,
            w.direct(&direct, &format!("r{round}"), moto.pid(), args.concurrency)
                .await?,
        );
    }
    let cell = |p: &Phase| format!("{:.0} MiB/s", p.mib_s);
    let cpu = |p: &Phase| format!("{:.1} s / {:.1} s", p.node_cpu_s, p.moto_cpu_s);
    let row = |name: &str, ph: &[Phase; 4], rss: Option<f64>| {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            cell(&ph[0]),
            cell(&ph[1]),
            cell(&ph[2]),
            cell(&ph[3]),
            rss.map(|r| format!("{r:.1} MiB"))
                .unwrap_or_else(|| "–".into())
        )
    };
    let (small, big) = (
        format!("{} × {} MiB", args.blobs, args.blob_mib),
        format!("{} × {} MiB", args.s3_big_blobs, args.s3_big_mib),
    );
    println!("\n| | push {small} | pull {small} | push {big} | pull {big} | peak RSS |");
    println!("|---|---|---|---|---|---|");
    row("storage-backend, filesystem", &fs_best, fs_rss);
    row("storage-backend, S3 (moto)", &s3_best, s3_rss);
    row("plain S3 client → moto", &direct_best, None);
    println!(
        "| S3 / filesystem | {:.2}× | {:.2}× | {:.2}× | {:.2}× | |",
        s3_best[0].mib_s / fs_best[0].mib_s,
        s3_best[1].mib_s / fs_best[1].mib_s,
        s3_best[2].mib_s / fs_best[2].mib_s,
        s3_best[3].mib_s / fs_best[3].mib_s
    );
    println!(
        "| S3 / plain client | {:.2}× | {:.2}× | {:.2}× | {:.2}× | |",
        s3_best[0].mib_s / direct_best[0].mib_s,
        s3_best[1].mib_s / direct_best[1].mib_s,
        s3_best[2].mib_s / direct_best[2].mib_s,
        s3_best[3].mib_s / direct_best[3].mib_s
    );
    println!("\nCPU seconds in the best round, storage node / moto:");
    println!("| | push {small} | pull {small} | push {big} | pull {big} |");
    println!("|---|---|---|---|---|");
    for (name, ph) in [("S3 (moto)", &s3_best), ("plain client", &direct_best)] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            cpu(&ph[0]),
            cpu(&ph[1]),
            cpu(&ph[2]),
            cpu(&ph[3])
        );
    }
    if let Some(rss) = s3_rss {
        println!(
            "\nstorage node on S3, peak RSS over the big pushes and pulls: {rss:.1} MiB (target ≤ 128 MiB)"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = tempfile::Builder::new()
        .prefix("regbench-")
        .tempdir_in(portcullis_tests::server::workspace_root().join("target"))?;
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
