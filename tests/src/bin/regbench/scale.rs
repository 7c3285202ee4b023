//! `--scale`: listings as the registry grows. For each of `--scale-sizes`, a registry:2 root
//! is written directly (`portcullis_tests::layout`: that many repositories, `team-NN/app-NNNNNN`
//! over 100 teams, and one repository with that many tags); once all are written, they are
//! served by storage-backend, then by distribution 2.8.2, on the very same directories; each
//! measurement is the median of `--scale-gets` sequential GETs, made to each size in turn
//! (one GET at every size, then the next), so that the machine's state falls on all sizes
//! alike. Printed: the figures, each registry's growth from the
//! smallest size, and storage-backend's ratio to distribution; storage-backend's check of a
//! DELETE by digest against immutability in a repository of 10 000 tags (distribution has
//! no such check); and a GC dry run of each on the root, a process of its own
//! ([`scale_gc`](crate::scale_gc)), with its peak RSS. `--scale-gc-blobs` measures the dry
//! runs on a root of that many distinct blobs instead (or as well, with `--scale`).

use crate::cli::Args;
use crate::scale_gc::{self, DryRun};
use anyhow::{Context, ensure};
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, image_config, sha256};
use portcullis_tests::layout::Layout;
use portcullis_tests::server::StorageServer;
use portcullis_tests::tools::Distribution;
use reqwest::{Method, RequestBuilder};
use std::path::Path;
use std::time::{Duration, Instant};

/// What is measured, in the order printed: the GETs of [`paths`], then the GC dry run.
const MEASURES: [&str; 6] = [
    "catalog first page (n=100)",
    "catalog middle page (n=100&last=…)",
    "tags first page (n=100)",
    "tags middle page (n=100&last=…)",
    "manifest GET by tag",
    "GC dry run (process; fastest of --rounds)",
];

/// Where the GC dry run is in [`MEASURES`].
const GC: usize = 5;

pub(crate) fn repo_name(i: usize) -> String {
    format!("team-{:02}/app-{i:06}", i % 100)
}

pub(crate) fn tag_name(j: usize) -> String {
    format!("t{j:06}")
}

/// The requests of each measure at `size`.
fn paths(size: usize) -> [String; 5] {
    // The middle name in the catalog's order: names sort by team, then by number.
    let mut names: Vec<String> = (0..size).map(repo_name).collect();
    names.sort();
    let middle = &names[size / 2];
    [
        "/v2/_catalog?n=100".into(),
        format!("/v2/_catalog?n=100&last={middle}"),
        "/v2/big/tags/tags/list?n=100".into(),
        format!("/v2/big/tags/tags/list?n=100&last={}", tag_name(size / 2)),
        "/v2/team-00/app-000000/manifests/t000000".into(),
    ]
}

/// Median of `gets` sequential requests made by `request`, each answered `status` (body
/// read).
pub(crate) async fn median(
    gets: usize,
    status: u16,
    request: impl Fn() -> RequestBuilder,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(gets);
    for _ in 0..gets.max(1) {
        let t = Instant::now();
        let r = request().send().await?;
        let what = format!("{} {}", r.url().path(), r.url().query().unwrap_or(""));
        ensure!(r.status() == status, "{what}: {}", describe(r).await);
        r.bytes().await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// For each size (a registry serving it in `clients`, its requests in `paths`), the median
/// of `gets` GETs of each request, answered 200. The sizes are asked in turn — one GET at
/// every size, then the next — so that what the machine does meanwhile falls on every size
/// alike. distribution answers an OCI manifest only to a client that accepts one.
async fn pages_in_turn(
    clients: &[Client],
    paths: &[[String; 5]],
    gets: usize,
) -> anyhow::Result<Vec<[Duration; 5]>> {
    let mut medians = vec![[Duration::ZERO; 5]; clients.len()];
    for k in 0..5 {
        let mut times = vec![Vec::with_capacity(gets); clients.len()];
        for _ in 0..gets.max(1) {
            for ((c, p), times) in clients.iter().zip(paths).zip(&mut times) {
                let t = Instant::now();
                let r = c
                    .req(Method::GET, &p[k])
                    .header("accept", OCI_MANIFEST)
                    .send()
                    .await?;
                ensure!(r.status() == 200, "{}: {}", p[k], describe(r).await);
                r.bytes().await?;
                times.push(t.elapsed());
            }
        }
        for (m, mut t) in medians.iter_mut().zip(times) {
            t.sort();
            m[k] = t[t.len() / 2];
        }
    }
    Ok(medians)
}

/// Writes the root for `size`: how long it took, and the digest of the manifest every
/// repository has.
pub(crate) fn fill(root: &Path, size: usize) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let layout = Layout::new(root)?;
    for i in 0..size {
        let tag = [tag_name(0)];
        layout.image(&repo_name(i), &tag)?;
    }
    let tags: Vec<String> = (0..size).map(tag_name).collect();
    layout.image("big/tags", &tags)?;
    let tags: Vec<String> = (0..DELETE_TAGS).map(tag_name).collect();
    layout.image("delete/check", &tags)?;
    Ok((t.elapsed(), layout.manifest().to_string()))
}

/// Tags of the repository where a DELETE by digest is checked against immutability.
const DELETE_TAGS: usize = 10_000;

/// Median of `gets` DELETEs by digest of the manifest every tag of `delete/check` points at,
/// with immutability rules (as the gateway sends them) that protect the tags matching `glob`:
/// storage finds the tags pointing at the digest through its reverse index of tags, reads the
/// links of the protected ones until one confirms, and refuses (403), so nothing changes.
async fn delete_check(
    c: &Client,
    digest: &str,
    glob: &str,
    gets: usize,
) -> anyhow::Result<Duration> {
    let protection = format!(
        r#"{{"rules":[{{"line":1,"tags":[{{"glob":"{glob}"}}],"exclude":[]}}],"may_override":false}}"#
    );
    let path = format!("/v2/delete/check/manifests/{digest}");
    median(gets, 403, || {
        c.req(Method::DELETE, &path)
            .header(service::hop::PROTECTION_HEADER, &protection)
    })
    .await
}

/// Median of `gets` DELETEs by digest that no immutable tag stops, in `delete/check` where
/// every tag is immutable: a second manifest, pushed by digest before each DELETE. Storage
/// checks the repository's tags and revisions against its reverse indexes, then finds no tag
/// and no index on the manifest, before and after it deletes.
async fn allowed_delete(c: &Client, gets: usize) -> anyhow::Result<Duration> {
    let repo = "delete/check";
    let body = c
        .image_manifest(repo, &image_config("other"), &[b"other layer"], None)
        .await?;
    let digest = sha256(&body).to_string();
    let protection =
        r#"{"rules":[{"line":1,"tags":[{"glob":"t*"}],"exclude":[]}],"may_override":false}"#;
    let mut times = Vec::with_capacity(gets);
    for _ in 0..gets.max(1) {
        let r = c.put_manifest(repo, &digest, OCI_MANIFEST, &body).await?;
        ensure!(r.status() == 201, "put {digest}: {}", describe(r).await);
        let t = Instant::now();
        let r = c
            .req(Method::DELETE, &format!("/v2/{repo}/manifests/{digest}"))
            .header(service::hop::PROTECTION_HEADER, protection)
            .send()
            .await?;
        ensure!(r.status() == 202, "delete {digest}: {}", describe(r).await);
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// How long after a directory changed storage-backend keeps its listing, and a little more.
const LISTING_SETTLES: Duration = Duration::from_millis(1100);

/// Median of `gets` first tag pages of `big/tags`, each right after a push of a new tag
/// there (the same manifest): the directory changed under a second ago, so storage reads it
/// whole, as on a repository CI pushes to all the time.
async fn page_after_push(c: &Client, gets: usize) -> anyhow::Result<Duration> {
    let body = c
        .req(Method::GET, "/v2/big/tags/manifests/t000000")
        .header("accept", OCI_MANIFEST)
        .send()
        .await?
        .bytes()
        .await?;
    let mut times = Vec::with_capacity(gets);
    for i in 0..gets.max(1) {
        let r = c
            .put_manifest("big/tags", &format!("pushed-{i}"), OCI_MANIFEST, &body)
            .await?;
        ensure!(r.status() == 201, "push: {}", describe(r).await);
        let t = Instant::now();
        let r = c.get("/v2/big/tags/tags/list?n=100").await?;
        ensure!(r.status() == 200, "tags: {}", describe(r).await);
        r.bytes().await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `--scale` and `--scale-gc-blobs`, either or both.
pub(crate) async fn scale_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    if args.scale {
        listings(args, scratch).await?;
    }
    if args.scale_gc_blobs > 0 {
        if args.scale {
            println!();
        }
        scale_gc::gc_at_scale(args, scratch).await?;
    }
    Ok(())
}

async fn listings(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let mut sizes = args.scale_sizes.clone();
    sizes.sort_unstable();
    ensure!(!sizes.is_empty(), "--scale-sizes is empty");
    println!(
        "regbench --scale: sizes {sizes:?} (repositories, and tags in one repository), median of {} sequential GETs",
        args.scale_gets
    );
    // Every size's root is written before anything is measured, so that every size is
    // measured on the machine as the writing left it (a 100 000-repository layout leaves the
    // kernel reclaiming memory for minutes), and the GETs go to each size in turn.
    let mut roots = Vec::new();
    for &size in &sizes {
        let root = scratch.join(format!("scale-{size}"));
        let (took, digest) = fill(&root, size).context("writing the layout")?;
        println!("{size}: layout written in {:.1} s", took.as_secs_f64());
        roots.push((root, digest));
    }
    // storage-backend keeps a large directory's listing only once it has not changed for a
    // second (`driver::listing`); a registry is not read the instant it was written.
    tokio::time::sleep(LISTING_SETTLES).await;
    let paths: Vec<[String; 5]> = sizes.iter().map(|&s| paths(s)).collect();
    // results[size][registry][measure]
    let mut results: Vec<[[Duration; 6]; 2]> = vec![[[Duration::ZERO; 6]; 2]; sizes.len()];
    // Both registries serve the same roots; one at a time.
    {
        let ours = roots
            .iter()
            .map(|(root, _)| StorageServer::start(root))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let clients: Vec<Client> = ours.iter().map(|s| Client::new(&s.base)).collect();
        let pages = pages_in_turn(&clients, &paths, args.scale_gets).await?;
        for (row, got) in results.iter_mut().zip(pages) {
            row[0][..got.len()].copy_from_slice(&got);
        }
        for ((&size, c), (_, digest)) in sizes.iter().zip(&clients).zip(&roots) {
            // The root was written without storage's reverse index of tags: the first
            // lookup reads every tag once and marks it.
            let first = delete_check(c, digest, "t*", 1).await?;
            let pushed = page_after_push(c, args.scale_gets).await?;
            println!(
                "{size}: tags first page right after a tag push to that repository (its directory read whole): {:.2} ms",
                ms(pushed)
            );
            let one = delete_check(c, digest, &tag_name(DELETE_TAGS - 1), args.scale_gets).await?;
            let all = delete_check(c, digest, "t*", args.scale_gets).await?;
            let allowed = allowed_delete(c, args.scale_gets).await?;
            println!(
                "{size}: DELETE by digest in a repository of {DELETE_TAGS} tags, storage-backend: refused in {:.2} ms with one tag immutable, {:.2} ms with every tag immutable (the first, which indexes the tags: {:.0} ms); a DELETE no immutable tag stops, every tag immutable: {:.2} ms",
                ms(one),
                ms(all),
                ms(first),
                ms(allowed)
            );
        }
    }
    {
        let theirs = roots
            .iter()
            .map(|(root, _)| Distribution::start(root))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let clients: Vec<Client> = theirs.iter().map(|d| Client::new(&d.base)).collect();
        let pages = pages_in_turn(&clients, &paths, args.scale_gets).await?;
        for (row, got) in results.iter_mut().zip(pages) {
            row[1][..got.len()].copy_from_slice(&got);
        }
    }
    // dry_runs[size][registry]
    let mut dry_runs: Vec<[DryRun; 2]> = Vec::new();
    for ((root, _), row) in roots.iter().zip(&mut results) {
        let gc = scale_gc::both(root, scratch, args.rounds)?;
        row[0][GC] = gc[0].wall;
        row[1][GC] = gc[1].wall;
        dry_runs.push(gc);
        std::fs::remove_dir_all(root)?;
    }
    println!();
    print!("{:<38}", "measure");
    for size in &sizes {
        print!(
            " {:>14} {:>14}",
            format!("ours@{size}"),
            format!("dist@{size}")
        );
    }
    println!(" {:>12} {:>12}", "ours growth", "dist growth");
    for (k, name) in MEASURES.iter().enumerate() {
        print!("{name:<38}");
        for row in &results {
            print!(" {:>11.2} ms {:>11.2} ms", ms(row[0][k]), ms(row[1][k]));
        }
        let (first, last) = (&results[0], &results[results.len() - 1]);
        let growth = |r: usize| last[r][k].as_secs_f64() / first[r][k].as_secs_f64().max(1e-9);
        println!(" {:>11.2}× {:>11.2}×", growth(0), growth(1));
    }
    println!();
    for (i, size) in sizes.iter().enumerate() {
        let ratios: Vec<String> = MEASURES
            .iter()
            .enumerate()
            .map(|(k, _)| {
                format!(
                    "{:.2}×",
                    results[i][1][k].as_secs_f64() / results[i][0][k].as_secs_f64().max(1e-9)
                )
            })
            .collect();
        println!(
            "at {size}: storage-backend faster than distribution by {}",
            ratios.join(" / ")
        );
    }
    println!();
    for (size, [ours, dist]) in sizes.iter().zip(&dry_runs) {
        println!(
            "at {size}: GC dry run peak RSS {:.0} MiB (storage-backend), {:.0} MiB (distribution); blobs marked {} / {}, to delete {} / {}",
            ours.peak_rss_mib,
            dist.peak_rss_mib,
            ours.marked,
            dist.marked,
            ours.deletable,
            dist.deletable
        );
    }
    Ok(())
}
