//! `--scale-s3`: tag pages on S3 (moto) as a repository grows. For each of
//! `--scale-s3-tags`, a repository of that many tags is written as a registry:2 layout and put
//! into a bucket as objects, then served by storage-backend and by distribution 2.8.2 (its S3
//! driver), on the same bucket; the first and a middle page of 100 tags, each the median of
//! `--scale-gets` sequential GETs. Printed: the figures, each one's growth from the smallest
//! size, and storage-backend's ratio to distribution.

use crate::cli::Args;
use crate::scale::{median, tag_name};
use anyhow::{Context, ensure};
use portcullis_tests::client::Client;
use portcullis_tests::layout::Layout;
use portcullis_tests::moto::Moto;
use portcullis_tests::tools::Distribution;
use reqwest::Method;
use std::path::Path;
use std::time::{Duration, Instant};

const BUCKET: &str = "scale";
const PREFIX: &str = "pfx";

pub(crate) async fn scale_s3(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    let mut sizes = args.scale_s3_tags.clone();
    sizes.sort_unstable();
    ensure!(!sizes.is_empty(), "--scale-s3-tags is empty");
    println!(
        "regbench --scale-s3: one repository of {sizes:?} tags on S3 (moto), median of {} sequential GETs",
        args.scale_gets
    );
    // rows[size] = [ours first, ours middle, distribution first, distribution middle]
    let mut rows = Vec::new();
    for &size in &sizes {
        let root = scratch.join(format!("scale-s3-{size}"));
        let layout = Layout::new(&root)?;
        let tags: Vec<String> = (0..size).map(tag_name).collect();
        layout.image("big/tags", &tags)?;
        let moto = Moto::start()?;
        moto.create_bucket(BUCKET)?;
        let t = Instant::now();
        let objects = moto
            .put_tree(BUCKET, PREFIX, &root)
            .await
            .context("filling the bucket")?;
        println!(
            "{size}: {objects} objects put in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        std::fs::remove_dir_all(&root)?;
        let paths = [
            "/v2/big/tags/tags/list?n=100".to_string(),
            format!("/v2/big/tags/tags/list?n=100&last={}", tag_name(size / 2)),
        ];
        let mut row = [Duration::ZERO; 4];
        {
            let conf = scratch.join(format!("scale-s3-node-{size}"));
            let node = moto.storage_node(&conf, BUCKET, PREFIX)?;
            let c = Client::new(&node.base);
            for (k, p) in paths.iter().enumerate() {
                row[k] = median(args.scale_gets, 200, || c.req(Method::GET, p)).await?;
            }
        }
        {
            let dist = Distribution::start_on_s3(&moto.endpoint, BUCKET, PREFIX)?;
            let c = Client::new(&dist.base);
            for (k, p) in paths.iter().enumerate() {
                row[2 + k] = median(args.scale_gets, 200, || c.req(Method::GET, p)).await?;
            }
        }
        rows.push(row);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\n| measurement | size | storage-backend | distribution 2.8.2 | distribution's time / ours |"
    );
    println!("|---|---|---|---|---|");
    for (k, what) in ["tags first page (n=100)", "tags middle page"]
        .iter()
        .enumerate()
    {
        for (size, row) in sizes.iter().zip(&rows) {
            println!(
                "| {what} | {size} | {:.1} ms | {:.1} ms | {:.1}× |",
                ms(row[k]),
                ms(row[2 + k]),
                row[2 + k].as_secs_f64() / row[k].as_secs_f64().max(1e-9)
            );
        }
        let (first, last) = (&rows[0], &rows[rows.len() - 1]);
        println!(
            "| {what}: growth {} → {} | | {:.2}× | {:.2}× | |",
            sizes[0],
            sizes[sizes.len() - 1],
            last[k].as_secs_f64() / first[k].as_secs_f64().max(1e-9),
            last[2 + k].as_secs_f64() / first[2 + k].as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}
