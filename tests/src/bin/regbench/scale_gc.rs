//! GC dry runs at scale: storage-backend's (`storage-backend gc --dry-run`) and distribution
//! 2.8.2's (`registry garbage-collect --dry-run`) on the same registry:2 root, each a process
//! of its own run under `/usr/bin/time -v`, which tells its peak RSS; `--scale` runs them at
//! each of its sizes. `--scale-gc-blobs` writes a root of that many distinct blobs in
//! `--scale-gc-repos` repositories for them ([`gc_at_scale`]). Each is run `--rounds` times,
//! the two in turn (so that a neighbour's load falls on both): the fastest wall time is kept,
//! and the highest peak RSS.

use crate::cli::Args;
use crate::scale::repo_name;
use anyhow::{Context, bail, ensure};
use portcullis_tests::layout::Layout;
use portcullis_tests::server::binary;
use portcullis_tests::tools::{Distribution, distribution_binary};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GNU time (Debian's `time` package, tests/services/install.sh).
const TIME: &str = "/usr/bin/time";

/// Threads writing the layout: file creation is system calls, a few overlap on 2 cores.
const WRITERS: usize = 4;

/// The goal of issue 26 for 1 000 000 blobs in 100 000 repositories on a 2-core VM.
const TARGET_SECONDS: f64 = 120.0;
const TARGET_RSS_MIB: f64 = 256.0;

/// One dry run, as measured from outside.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DryRun {
    /// From the start of the process to its exit.
    pub(crate) wall: Duration,
    /// The process's peak resident set size.
    pub(crate) peak_rss_mib: f64,
    /// Blobs the run found live, and those it would delete.
    pub(crate) marked: u64,
    pub(crate) deletable: u64,
}

/// Runs `cmd` (a program under `time -v -o <report>`), handing each line of its stdout to
/// `line`: its wall time and peak RSS. Its stderr goes to `<report>.stderr`, shown if it
/// fails.
fn timed(mut cmd: Command, report: &Path, mut line: impl FnMut(&str)) -> anyhow::Result<DryRun> {
    let stderr = report.with_extension("stderr");
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = child.stdout.take().context("stdout")?;
    for l in BufReader::new(out).lines() {
        line(&l?);
    }
    let status = child.wait()?;
    let wall = t.elapsed();
    if !status.success() {
        let err = std::fs::read_to_string(&stderr).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        bail!(
            "{cmd:?}: {status}\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let time = std::fs::read_to_string(report)?;
    let kib: f64 = time
        .lines()
        .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
        .context("no peak RSS in time's report")?
        .trim()
        .parse()?;
    Ok(DryRun {
        wall,
        peak_rss_mib: kib / 1024.0,
        ..Default::default()
    })
}

/// `storage-backend gc --dry-run` on `root`, with no grace window (what was just written is
/// old enough to go).
pub(crate) fn ours(root: &Path, scratch: &Path) -> anyhow::Result<DryRun> {
    let conf = scratch.join("gc-dry-run.toml");
    std::fs::write(&conf, "[gc]\ngrace_seconds = 0\n")?;
    let report = scratch.join("gc-dry-run.ours.time");
    let mut cmd = Command::new(TIME);
    cmd.arg("-v")
        .arg("-o")
        .arg(&report)
        .arg(binary("storage-backend"))
        .arg("--config")
        .arg(&conf)
        .arg("--root")
        .arg(root)
        .args(["gc", "--dry-run"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    let mut json = String::new();
    let mut run = timed(cmd, &report, |l| {
        json.push_str(l);
        json.push('\n');
    })?;
    let r: serde_json::Value = serde_json::from_str(&json).context("the GC report")?;
    ensure!(r["complete"] == true, "incomplete dry run: {}", r["errors"]);
    run.marked = r["blobs_marked"].as_u64().unwrap_or(0);
    run.deletable = r["blobs_deleted"].as_array().map_or(0, |a| a.len() as u64);
    Ok(run)
}

/// `registry garbage-collect --dry-run` on `root`. It prints a line per manifest and blob
/// marked (read here as they come, not kept), then `N blobs marked, M blobs and K
/// manifests eligible for deletion`.
pub(crate) fn distribution(root: &Path, scratch: &Path) -> anyhow::Result<DryRun> {
    let config = Distribution::write_config(scratch, root, "127.0.0.1:0")?;
    let report = scratch.join("gc-dry-run.distribution.time");
    let (report_s, config_s) = (report.display().to_string(), config.display().to_string());
    let bin = distribution_binary().display().to_string();
    let cmd = Distribution::command(
        Path::new(TIME),
        &[
            "-v",
            "-o",
            &report_s,
            &bin,
            "garbage-collect",
            "--dry-run",
            &config_s,
        ],
    );
    let mut summary = None;
    let mut run = timed(cmd, &report, |l| {
        if l.contains("eligible for deletion") && l.contains("blobs marked") {
            summary = Some(l.to_string());
        }
    })?;
    let summary = summary.context("distribution printed no summary")?;
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(numbers.len() == 3, "unexpected summary {summary:?}");
    run.marked = numbers[0];
    run.deletable = numbers[1];
    Ok(run)
}

/// Writes `repos` repositories (named as `--scale`'s) of `blobs / repos` blobs each, every
/// blob distinct: an image of its own (config, layers, manifest) tagged `v1` in nine
/// repositories of ten; in the tenth its blobs and layer links only, garbage for both
/// collectors. How long it took.
fn fill(root: &Path, blobs: usize, repos: usize) -> anyhow::Result<Duration> {
    let per = blobs / repos.max(1);
    ensure!(
        per >= 3,
        "--scale-gc-blobs / --scale-gc-repos must be at least 3 (manifest, config, a layer)"
    );
    let t = Instant::now();
    let layout = Layout::new(root)?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= repos {
                            return Ok(());
                        }
                        let tag = (!garbage(i)).then_some("v1");
                        layout.own_image(&repo_name(i), per - 2, tag)?;
                    }
                })
            })
            .collect();
        writers
            .into_iter()
            .try_for_each(|w| w.join().expect("a layout writer panicked"))
    })?;
    Ok(t.elapsed())
}

/// Whether the `i`th repository [`fill`] writes is garbage (its blobs only, no manifest):
/// every tenth.
pub(crate) fn garbage(i: usize) -> bool {
    i % 10 == 9
}

fn line(who: &str, r: &DryRun) -> String {
    format!(
        "| {who} | {:.1} s | {:.0} MiB | {} | {} |",
        r.wall.as_secs_f64(),
        r.peak_rss_mib,
        r.marked,
        r.deletable
    )
}

/// Both dry runs on `root`, `rounds` times in turn: the fastest of each, with the highest
/// peak RSS any of its runs had.
pub(crate) fn both(root: &Path, scratch: &Path, rounds: usize) -> anyhow::Result<[DryRun; 2]> {
    let mut best: [Option<DryRun>; 2] = [None, None];
    for _ in 0..rounds.max(1) {
        let runs = [ours(root, scratch)?, distribution(root, scratch)?];
        for (b, r) in best.iter_mut().zip(runs) {
            *b = Some(match *b {
                None => r,
                Some(b) => DryRun {
                    peak_rss_mib: b.peak_rss_mib.max(r.peak_rss_mib),
                    ..if r.wall < b.wall { r } else { b }
                },
            });
        }
    }
    Ok(best.map(|b| b.expect("at least one round")))
}

/// `--scale-gc-blobs`: the root written, both dry runs on it, the table, the ratios and the
/// target; with `--scale-gc-live`, then a real run under pull load
/// ([`crate::scale_gc_live`]).
pub(crate) async fn gc_at_scale(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let (blobs, repos) = (args.scale_gc_blobs, args.scale_gc_repos);
    let root = match &args.scale_gc_root {
        Some(r) => r.clone(),
        None => scratch.join(format!("scale-gc-{blobs}")),
    };
    let written = if root.join("docker/registry/v2").exists() {
        "layout already there".to_string()
    } else {
        let took = tokio::task::block_in_place(|| fill(&root, blobs, repos))
            .context("writing the layout")?;
        format!("layout written in {:.1} s", took.as_secs_f64())
    };
    println!(
        "regbench --scale-gc-blobs: {blobs} distinct blobs in {repos} repositories ({} each; one repository in ten holds only its blobs, garbage), {written}",
        blobs / repos
    );
    let [ours, dist] = tokio::task::block_in_place(|| both(&root, scratch, args.rounds))?;
    println!(
        "\n| GC dry run (fastest of {}) | wall | peak RSS | blobs marked | blobs to delete |",
        args.rounds
    );
    println!("|---|---|---|---|---|");
    println!("{}", line("storage-backend", &ours));
    println!("{}", line("distribution 2.8.2", &dist));
    println!(
        "\nstorage-backend against distribution: {:.2}× the time, {:.2}× the peak RSS",
        ours.wall.as_secs_f64() / dist.wall.as_secs_f64().max(1e-9),
        ours.peak_rss_mib / dist.peak_rss_mib.max(1e-9)
    );
    let met = ours.wall.as_secs_f64() <= TARGET_SECONDS && ours.peak_rss_mib <= TARGET_RSS_MIB;
    println!(
        "target (≤ {TARGET_SECONDS:.0} s and ≤ {TARGET_RSS_MIB:.0} MiB): {}",
        if met { "met" } else { "MISSED" }
    );
    ensure!(
        ours.deletable == dist.deletable,
        "storage-backend would delete {} blobs, distribution {}",
        ours.deletable,
        dist.deletable
    );
    if args.scale_gc_live {
        crate::scale_gc_live::live_run(args, &root, scratch, ours.marked, ours.deletable).await?;
    }
    if args.scale_gc_root.is_none() {
        std::fs::remove_dir_all(&root)?;
    }
    Ok(())
}
