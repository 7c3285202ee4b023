//! Shared measurement helpers: reproducible blob contents, push and pull as clients do
//! (verifying every digest), throughput and latency quantiles, requests per second at a given
//! concurrency, and a process's peak RSS from `/proc`.

use anyhow::ensure;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Algorithm, Digest, Verifier};
use portcullis_tests::client::{Client, describe, location, with_query};
use reqwest::Method;
use std::time::{Duration, Instant};

/// A reproducible pseudo-random buffer.
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
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
pub(crate) struct BigBlob {
    pub(crate) unit: Bytes,
    pub(crate) mib: usize,
    pub(crate) digest: Digest,
}

impl BigBlob {
    pub(crate) fn new(mib: usize, seed: u64) -> Self {
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

    pub(crate) fn body(&self) -> reqwest::Body {
        let unit = self.unit.clone();
        reqwest::Body::wrap_stream(stream::iter(
            (0..self.mib).map(move |_| Ok::<_, std::io::Error>(unit.clone())),
        ))
    }
}

/// Push as docker does: POST, one streamed PATCH, PUT ?digest.
pub(crate) async fn push(
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
pub(crate) async fn pull(c: &Client, repo: &str, digest: &Digest) -> anyhow::Result<u64> {
    fetch(c, &format!("/v2/{repo}/blobs/{digest}"), digest).await
}

/// GET `path`, hashing the body as it arrives; fails unless it matches `digest`.
pub(crate) async fn fetch(c: &Client, path: &str, digest: &Digest) -> anyhow::Result<u64> {
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
pub(crate) fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

pub(crate) fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

pub(crate) fn reset_peak_rss(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

pub(crate) fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `n` calls of `f` at `concurrency`: calls per second and sorted latencies.
pub(crate) async fn rate<F, Fut>(
    n: usize,
    concurrency: usize,
    f: F,
) -> anyhow::Result<(f64, Vec<Duration>)>
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

pub(crate) fn print_rate(what: &str, per_s: f64, lat: &[Duration]) {
    println!(
        "  {what:<52} {per_s:>8.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
        quantile_ms(lat, 0.5),
        quantile_ms(lat, 0.99)
    );
}
