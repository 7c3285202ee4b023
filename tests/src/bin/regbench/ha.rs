//! `--ha`: HAProxy in front of two gateways (state in a real Redis) and two storage nodes,
//! against one gateway and one storage node; then token issuance on Redis against the
//! in-memory store.

use crate::cli::Args;
use crate::gateway_suite::{PASSWORD, USER};
use crate::measure::{print_rate, rate};
use anyhow::{Context, ensure};
use oci::Digest;
use portcullis_tests::client::{Client, describe, https};
use portcullis_tests::deployment::SERVICE;
use std::path::Path;
use std::time::Duration;

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
pub(crate) async fn ha_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
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
