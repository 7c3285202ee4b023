//! `--gateway`: the gateway over TLS with bearer tokens against nginx (blob pull) and
//! distribution 2.8.2 (the push/pull/manifest workload), then token issuance.

use crate::cli::Args;
use crate::measure::{BigBlob, fetch, mib_s, peak_rss_mib, push, quantile_ms};
use crate::workload::{measure_all, report, workload};
use anyhow::{Context, ensure};
use futures_util::{StreamExt, TryStreamExt, stream};
use portcullis_tests::client::{Client, describe, https};
use portcullis_tests::deployment::{Deployment, SERVICE, user_client};
use portcullis_tests::server::GatewayServer;
use portcullis_tests::tools::{Distribution, Nginx};
use std::path::Path;
use std::time::{Duration, Instant};

/// The gateway's user for `--gateway` (in registry-admins: may do everything).
pub(crate) const USER: &str = "alice";
pub(crate) const PASSWORD: &str = "regbench-password";

/// `--gateway`: the gateway over TLS with tokens (production shape: `gateway serve` in front
/// of one storage-backend) against Debian's nginx serving the same file over TLS and against
/// distribution 2.8.2 (plain HTTP, no auth); then token issuance.
pub(crate) async fn gateway_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
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
