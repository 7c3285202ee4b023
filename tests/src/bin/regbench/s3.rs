//! `--s3`: storage-backend on S3 (a real `moto_server`) against storage-backend on the
//! filesystem, and a plain S3 client against moto for moto's own cost, with the CPU each
//! process spent.

use crate::cli::Args;
use crate::measure::{BigBlob, mib_s, noise, peak_rss_mib, pull, push, reset_peak_rss};
use anyhow::ensure;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci::{Algorithm, Digest, Verifier};
use portcullis_tests::client::Client;
use portcullis_tests::server::StorageServer;
use std::path::Path;
use std::time::Instant;

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
pub(crate) async fn s3_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
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
