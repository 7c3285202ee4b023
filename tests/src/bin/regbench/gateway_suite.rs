//! `--gateway`: the gateway over TLS with bearer tokens against nginx (blob pull) and
//! distribution 2.8.2 (the push/pull/manifest workload), then token issuance.

use crate::cli::Args;
use crate::cpu::{cpu_seconds, per_gib};
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
    // A second gateway in front of the same node, reading blobs from its files
    // (`[upstream] local_root`).
    let local_dir = dep.dir.path().join("gateway-local-root");
    std::fs::create_dir_all(&local_dir)?;
    let storage_root = dep.dir.path().join("storage").display().to_string();
    let g2 = portcullis_tests::deployment::start_gateway_with(
        &local_dir,
        &[&dep.storage],
        &[(USER, PASSWORD)],
        gateway::dev::BCRYPT_COST,
        "",
        &[("PORTCULLIS_UPSTREAM_LOCAL_ROOT", &storage_root)],
    )?;
    println!(
        "regbench --gateway: {} MiB blob pull vs nginx, best of {}",
        args.pull_mib, args.rounds
    );
    // The gateway's side of a pull or push is the gateway and its storage node.
    let ours: Vec<u32> = [g.pid(), dep.storage.pid()].into_iter().flatten().collect();
    let ours_local: Vec<u32> = [g2.pid(), dep.storage.pid()]
        .into_iter()
        .flatten()
        .collect();
    let nginx_pid = [nginx.pid()];
    let ca_file = scratch.join("gateway-ca.pem");
    std::fs::write(&ca_file, &g.ca_pem)?;
    let ca_file2 = scratch.join("gateway-local-ca.pem");
    std::fs::write(&ca_file2, &g2.ca_pem)?;
    let scope = ["repository:bench/pull:pull".to_string()];
    let gw2 = user_client(&g2, USER, PASSWORD);
    let (token, token2) = (gw.token(&scope).await?, gw2.token(&scope).await?);
    println!(
        "(CPU: user + system seconds per GiB, the gateway and its storage node vs nginx; \
         \"local\": the gateway reading the node's files, [upstream] local_root)"
    );
    let gw_path = format!("/v2/bench/pull/blobs/{}", blob.digest);
    for http1 in [false, true] {
        let proto = if http1 { "HTTP/1.1" } else { "HTTP/2" };
        let mut gwc = Client::with_http(&g.base, https(&g.ca_pem, http1));
        gwc.auth = gw.auth.clone();
        let mut gwc2 = Client::with_http(&g2.base, https(&g2.ca_pem, http1));
        gwc2.auth = gw2.auth.clone();
        let nc = Client::with_http(&nginx.base, https(&g.ca_pem, http1));
        fetch(&gwc, &gw_path, &blob.digest).await?;
        fetch(&gwc2, &gw_path, &blob.digest).await?;
        fetch(&nc, "/blob", &blob.digest).await?;
        for via in ["reqwest", "curl"] {
            let mut runs = [Pulls::default(), Pulls::default(), Pulls::default()];
            for _ in 0..args.rounds {
                let (cpu, t) = (cpu_seconds(&nginx_pid), Instant::now());
                match via {
                    "curl" => {
                        curl_pull(&format!("{}/blob", nginx.base), &ca_file, None, http1, len)?
                    }
                    _ => _ = fetch(&nc, "/blob", &blob.digest).await?,
                }
                runs[0].add(len, t.elapsed(), cpu_seconds(&nginx_pid) - cpu);
                let gateways = [
                    (g, &ca_file, &token, &gwc, &ours),
                    (&g2, &ca_file2, &token2, &gwc2, &ours_local),
                ];
                for (i, (g, ca, token, c, pids)) in gateways.into_iter().enumerate() {
                    let (cpu, t) = (cpu_seconds(pids), Instant::now());
                    match via {
                        "curl" => {
                            curl_pull(&format!("{}{gw_path}", g.base), ca, Some(token), http1, len)?
                        }
                        _ => _ = fetch(c, &gw_path, &blob.digest).await?,
                    }
                    runs[i + 1].add(len, t.elapsed(), cpu_seconds(pids) - cpu);
                }
            }
            let [nginx_run, gw_run, local_run] = &runs;
            println!(
                "pull {} MiB over TLS, {proto:<8} {via:<7}  nginx {:>6.0} MiB/s {:>5.2} CPU s/GiB   gateway {:>6.0} MiB/s {:>5.2} CPU s/GiB (ratio {:.2}×, CPU {:.2}×)   local {:>6.0} MiB/s {:>5.2} CPU s/GiB (ratio {:.2}×, CPU {:.2}×)",
                args.pull_mib,
                nginx_run.best,
                nginx_run.cpu_per_gib(),
                gw_run.best,
                gw_run.cpu_per_gib(),
                gw_run.best / nginx_run.best,
                gw_run.cpu_per_gib() / nginx_run.cpu_per_gib(),
                local_run.best,
                local_run.cpu_per_gib(),
                local_run.best / nginx_run.best,
                local_run.cpu_per_gib() / nginx_run.cpu_per_gib(),
            );
        }
    }
    // Every pull of the second gateway was answered from the files (not the hop).
    let from_files = portcullis_tests::server::metric_sample(
        &portcullis_tests::server::metrics_text(&g2.admin).await?,
        "gateway_blob_reads_total{from=\"files\"}",
    )
    .unwrap_or(0.0);
    let pulls = 2 * (2 * args.rounds + 1);
    ensure!(
        from_files >= pulls as f64,
        "the local_root gateway answered {from_files} of {pulls} pulls from the files"
    );
    drop(g2);
    drop(nginx);
    push_cpu(&gw, &Client::new(&dist.base), &ours, dist.pid()).await?;

    println!(
        "\nregbench --gateway: {}; peak RSS is the gateway's",
        workload(args)
    );
    // The same gateway with its state on Redis: each manifest read from memory asks Redis for
    // the repository's generation (docs/ha.md), where the in-memory store answers in-process.
    let redis = portcullis_tests::redis::Redis::start()?;
    let redis_dir = dep.dir.path().join("gateway-redis");
    std::fs::create_dir_all(&redis_dir)?;
    let g3 = portcullis_tests::deployment::start_gateway_with(
        &redis_dir,
        &[&dep.storage],
        &[(USER, PASSWORD)],
        gateway::dev::BCRYPT_COST,
        &redis.state_table("bench:"),
        &[],
    )?;
    let targets = vec![
        (
            "distribution-2.8.2".to_string(),
            Client::new(&dist.base),
            Some(dist.pid()),
        ),
        ("gateway-tls-token".to_string(), gw.clone(), g.pid()),
        (
            "gateway-redis-state".to_string(),
            user_client(&g3, USER, PASSWORD),
            g3.pid(),
        ),
    ];
    report(&measure_all(&targets, args).await?);
    if let Some(rss) = peak_rss_mib(dep.storage.pid()) {
        println!("storage-backend behind the gateway: peak RSS {rss:.1} MiB");
    }

    token_issuance(g, args).await
}

/// Pulls of one kind: the best rate, and the CPU time per byte over all of them.
#[derive(Default)]
struct Pulls {
    best: f64,
    bytes: u64,
    cpu: f64,
}

impl Pulls {
    fn add(&mut self, bytes: u64, took: Duration, cpu: f64) {
        self.best = self.best.max(mib_s(bytes, took));
        self.bytes += bytes;
        self.cpu += cpu;
    }

    fn cpu_per_gib(&self) -> f64 {
        per_gib(self.cpu, self.bytes)
    }
}

/// `curl` fetching `url` (HTTP/2 by ALPN, or HTTP/1.1) to nowhere; it must get `len` bytes.
fn curl_pull(
    url: &str,
    ca: &Path,
    token: Option<&str>,
    http1: bool,
    len: u64,
) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{http_version}",
    ])
    .arg("--cacert")
    .arg(ca)
    .arg(if http1 { "--http1.1" } else { "--http2" });
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = cmd.arg(url).output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = text.split_whitespace();
    let size: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = it.next().unwrap_or("");
    ensure!(
        out.status.success() && size == len,
        "curl {url}: {size} of {len} bytes ({text}) {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        (version == "2") != http1,
        "curl spoke HTTP/{version} to {url}"
    );
    Ok(())
}

/// A 1 GiB monolithic push to the gateway and to distribution, with the CPU time each side
/// spent (the gateway and its storage node; distribution).
async fn push_cpu(gw: &Client, dist: &Client, ours: &[u32], dist_pid: u32) -> anyhow::Result<()> {
    let blob = BigBlob::new(1024, 777);
    let len = 1u64 << 30;
    let mut line = String::from("push 1 GiB, monolithic PUT:");
    let mut per = Vec::new();
    for (name, c, pids) in [
        ("distribution (plain HTTP)", dist, vec![dist_pid]),
        ("gateway (TLS)", gw, ours.to_vec()),
    ] {
        let (cpu, t) = (cpu_seconds(&pids), Instant::now());
        push(c, "bench/cpu", blob.body(), len, &blob.digest).await?;
        let (took, cpu) = (t.elapsed(), cpu_seconds(&pids) - cpu);
        per.push(per_gib(cpu, len));
        line.push_str(&format!(
            "  {name} {:.0} MiB/s {:.2} CPU s/GiB",
            mib_s(len, took),
            per_gib(cpu, len)
        ));
    }
    println!("{line}   CPU ratio {:.2}×", per[1] / per[0]);
    Ok(())
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
