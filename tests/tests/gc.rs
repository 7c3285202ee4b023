//! Online garbage collection (`storage_backend::registry::gc`) against real storage nodes, on
//! the filesystem and on S3 (a real `moto_server`): what it reclaims and keeps, dry run against
//! the real run, GC in a loop while images are pushed, pulled and deleted, `kill -9` in the
//! middle of a sweep, one run at a time across scheduled nodes, corrupt links; the storage
//! usage gauges kept up to date by pushes and GC runs.
//! `cargo test --release --test gc` runs exactly these.

use futures_util::StreamExt;
use portcullis_tests::client::{Client, OCI_MANIFEST, sha256};
use portcullis_tests::moto::Moto;
use portcullis_tests::server::{StorageOptions, StorageServer};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const BUCKET: &str = "gc-test";

/// Storage nodes on one store — a filesystem root or a moto bucket — with `[gc]` settings.
struct Store {
    nodes: Vec<StorageServer>,
    moto: Option<Moto>,
    dir: tempfile::TempDir,
    what: &'static str,
}

impl Store {
    fn filesystem(n: usize, gc: &str) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("storage.toml");
        std::fs::write(&conf, gc).unwrap();
        let nodes = (0..n)
            .map(|_| {
                StorageServer::start_with(
                    &dir.path().join("root"),
                    StorageOptions {
                        config: Some(conf.clone()),
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .collect();
        Store {
            nodes,
            moto: None,
            dir,
            what: "filesystem",
        }
    }

    fn s3(n: usize, gc: &str) -> Store {
        let moto = Moto::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..n)
            .map(|_| {
                moto.storage_node_config(dir.path(), BUCKET, "registry", gc, &[])
                    .unwrap()
            })
            .collect();
        Store {
            nodes,
            moto: Some(moto),
            dir,
            what: "S3",
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn client(&self, node: usize) -> Client {
        Client::new(&self.nodes[node].base)
    }

    /// `POST /gc` on a node: its report.
    async fn gc(&self, node: usize, dry_run: bool) -> Value {
        let url = format!(
            "{}/gc{}",
            self.nodes[node].base,
            if dry_run { "?dry_run=true" } else { "" }
        );
        let r = reqwest::Client::new().post(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}: POST /gc", self.what);
        r.json().await.unwrap()
    }

    /// On the filesystem: the offline checker finds nothing wrong (`when` names the moment).
    fn assert_consistent(&self, when: &str) {
        if self.moto.is_none() {
            let report = portcullis_tests::fsck::check(&self.root());
            assert!(
                report.errors.is_empty(),
                "{} {when}: {:?}",
                self.what,
                report.errors
            );
        }
    }

    /// Whether the store has an object (a key under the storage root).
    fn has(&self, key: &str) -> bool {
        match &self.moto {
            Some(m) => !m
                .keys(BUCKET, &format!("registry/{key}"))
                .unwrap()
                .is_empty(),
            None => self.root().join(key).exists(),
        }
    }

    /// Whether the store holds a blob's content.
    fn holds(&self, digest: &str) -> bool {
        let hex = digest.trim_start_matches("sha256:");
        self.has(&format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Whether one of these blobs carries a GC marker (a sweep has begun).
    fn any_marked(&self, digests: &[String]) -> bool {
        let marker = |d: &String| {
            let hex = d.trim_start_matches("sha256:");
            format!("docker/registry/v2/blobs/sha256/{}/{hex}/gc", &hex[..2])
        };
        match &self.moto {
            // One listing instead of a request per blob.
            Some(m) => {
                let keys = m
                    .keys(BUCKET, "registry/docker/registry/v2/blobs/")
                    .unwrap();
                digests
                    .iter()
                    .any(|d| keys.contains(&format!("registry/{}", marker(d))))
            }
            None => digests.iter().any(|d| self.root().join(marker(d)).exists()),
        }
    }
}

/// The strings of a report's list, as a set.
fn set(report: &Value, field: &str) -> BTreeSet<String> {
    report[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other["digest"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Pulls `repo:tag`, checks it is `manifest` and that every blob it names comes back with
/// its digest.
async fn pulls(c: &Client, repo: &str, tag: &str, manifest: &[u8]) -> anyhow::Result<()> {
    let r = c
        .req(reqwest::Method::GET, &format!("/v2/{repo}/manifests/{tag}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "{repo}:{tag}: manifest {}", r.status());
    anyhow::ensure!(
        r.bytes().await? == manifest,
        "{repo}:{tag}: another manifest"
    );
    let m: Value = serde_json::from_slice(manifest)?;
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    for d in blobs {
        let r = c.get(&format!("/v2/{repo}/blobs/{d}")).await?;
        anyhow::ensure!(r.status() == 200, "{repo}:{tag}: blob {d} {}", r.status());
        anyhow::ensure!(
            sha256(&r.bytes().await?).to_string() == d,
            "{repo}:{tag}: blob {d} came back different"
        );
    }
    Ok(())
}

fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let m: Value = serde_json::from_slice(manifest).unwrap();
    let mut out = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

const RECLAIM: &str = "[gc]\ngrace_seconds = 0\nfence_seconds = 0.2\ndelete_untagged = true\n\
                       untagged_grace_seconds = 0\nupload_max_age_seconds = 0\n";

async fn reclaims_the_unreferenced_and_keeps_the_rest(store: Store) {
    let w = store.what;
    let c = store.client(0);
    let repo = "team-a/app";
    let shared: &[u8] = b"a base layer both images share";
    let (a, a_digest) = c
        .push_image(repo, "a", &[shared, b"only in a"])
        .await
        .unwrap();
    let (b, b_digest) = c
        .push_image(repo, "b", &[shared, b"only in b"])
        .await
        .unwrap();
    // A referrer of b (untagged, kept because its subject is), and an untagged image.
    let sig = c
        .image_manifest(
            repo,
            b"{\"signature\":true}",
            &[b"a signature"],
            Some(json!({"artifactType": "application/vnd.example.sig",
                        "subject": {"mediaType": OCI_MANIFEST, "digest": b_digest.to_string(), "size": b.len()}})),
        )
        .await
        .unwrap();
    let sig_digest = sha256(&sig).to_string();
    let r = c
        .put_manifest(repo, &sig_digest, OCI_MANIFEST, &sig)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let untagged = c
        .image_manifest(repo, b"{\"untagged\":true}", &[b"only untagged"], None)
        .await
        .unwrap();
    let untagged_digest = sha256(&untagged).to_string();
    let r = c
        .put_manifest(repo, &untagged_digest, OCI_MANIFEST, &untagged)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // An abandoned upload.
    let loc = c.start_upload(repo).await.unwrap();
    let r = c
        .req(reqwest::Method::PATCH, &loc)
        .header("content-type", "application/octet-stream")
        .body(&b"never finished"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // A session being created on the filesystem: its directory and the temporary file of its
    // first write, no `startedat` yet. Not stale, however old the age limit makes sessions.
    let creating = store.moto.is_none().then(|| {
        let dir = store
            .root()
            .join(format!("docker/registry/v2/repositories/{repo}/_uploads"))
            .join("0b1c4a5e-0000-4000-8000-000000000001");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".startedat.tmp-0"), b"").unwrap();
        dir
    });
    // Delete a.
    let r = c
        .req(
            reqwest::Method::DELETE,
            &format!("/v2/{repo}/manifests/{a_digest}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let mut gone: BTreeSet<String> = [a_digest.to_string(), untagged_digest.clone()].into();
    for m in [&a, &untagged] {
        for d in blobs_of(m) {
            if !blobs_of(&b).contains(&d) {
                gone.insert(d);
            }
        }
    }
    let dry = store.gc(0, true).await;
    assert_eq!(set(&dry, "blobs_deleted"), gone, "{w}: dry run {dry:#}");
    assert_eq!(
        set(&dry, "manifests_deleted"),
        [format!("{repo}@{untagged_digest}")].into(),
        "{w}"
    );
    assert_eq!(set(&dry, "uploads_purged").len(), 1, "{w}");
    for d in &gone {
        assert!(store.holds(d), "{w}: the dry run deleted {d}");
    }
    let real = store.gc(1 % store.nodes.len(), false).await;
    assert!(real["complete"].as_bool().unwrap(), "{w}: {real:#}");
    for field in [
        "blobs_deleted",
        "layer_links_deleted",
        "manifests_deleted",
        "uploads_purged",
    ] {
        assert_eq!(
            set(&real, field),
            set(&dry, field),
            "{w}: {field}: dry run ≠ run"
        );
    }
    assert_eq!(real["bytes_reclaimed"], dry["bytes_reclaimed"], "{w}");
    for d in &gone {
        assert!(!store.holds(d), "{w}: {d} was not reclaimed");
        // Its directory too, once emptied.
        let hex = d.trim_start_matches("sha256:");
        let dir = format!("docker/registry/v2/blobs/sha256/{}/{hex}", &hex[..2]);
        assert!(!store.has(&dir), "{w}: {dir} was left behind");
    }
    if let Some(dir) = &creating {
        assert!(dir.exists(), "{w}: a session being created was purged");
    }
    for d in blobs_of(&b)
        .iter()
        .chain([&b_digest.to_string(), &sig_digest])
    {
        assert!(store.holds(d), "{w}: {d} is live and was deleted");
    }
    for node in 0..store.nodes.len() {
        let c = store.client(node);
        pulls(&c, repo, "b", &b).await.unwrap();
        let refs: Value = c
            .get(&format!("/v2/{repo}/referrers/{b_digest}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(refs["manifests"][0]["digest"], sig_digest.as_str(), "{w}");
        let r = c.get(&format!("/v2/{repo}/manifests/a")).await.unwrap();
        assert_eq!(r.status(), 404, "{w}");
    }
    let again = store.gc(0, false).await;
    assert!(set(&again, "blobs_deleted").is_empty(), "{w}: {again:#}");
    store.assert_consistent("at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_filesystem_gc_reclaims_deleted_images_keeps_shared_blobs_and_matches_its_dry_run() {
    reclaims_the_unreferenced_and_keeps_the_rest(Store::filesystem(2, RECLAIM)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_gc_reclaims_deleted_images_keeps_shared_blobs_and_matches_its_dry_run() {
    reclaims_the_unreferenced_and_keeps_the_rest(Store::s3(2, RECLAIM)).await;
}

/// An image of the loop test: pushed (retried as a client would if GC took a blob it
/// relied on), then maybe deleted.
struct Pushed {
    repo: String,
    tag: String,
    manifest: Vec<u8>,
    deleted: bool,
}

async fn push_retrying(c: &Client, repo: &str, tag: &str, layers: &[&[u8]]) -> Vec<u8> {
    let mut last = String::new();
    for _ in 0..20 {
        match c.push_image(repo, tag, layers).await {
            Ok((m, _)) => return m,
            Err(e) => last = e.to_string(),
        }
    }
    panic!("{repo}:{tag} could not be pushed: {last}");
}

/// A `dir:` image for skopeo: a config and one layer of `size` bytes made from `seed`.
fn dir_image(root: &std::path::Path, seed: usize, size: usize) -> PathBuf {
    let img = root.join(format!("img-{seed}"));
    std::fs::create_dir_all(&img).unwrap();
    let layer: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7919) % 251) as u8)
        .collect();
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}");
    let (ld, cd) = (
        sha256(&layer).to_string(),
        sha256(config.as_bytes()).to_string(),
    );
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    std::fs::write(img.join(hex(&ld)), &layer).unwrap();
    std::fs::write(img.join(hex(&cd)), &config).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(img.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    img
}

/// skopeo pushes `n` images to the first node and pulls each back from the last, comparing
/// the files (a push that fails is retried, as a user would); the images pushed.
fn skopeo_round_trips(store: &Store, n: usize) -> Vec<Pushed> {
    use portcullis_tests::tools::{Containers, dir_files};
    let ctr = Containers::new().unwrap();
    let host = |node: &StorageServer| node.base.trim_start_matches("http://").to_string();
    let (first, last) = (host(&store.nodes[0]), host(store.nodes.last().unwrap()));
    let mut out = Vec::new();
    for i in 0..n {
        let img = dir_image(ctr.dir.path(), i, 256 << 10);
        let tag = format!("s{i}");
        let push = [
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("dir:{}", img.display()),
            &format!("docker://{first}/loop/skopeo:{tag}"),
        ];
        let mut tries = 0;
        while let Err(e) = ctr.run("skopeo", &push) {
            tries += 1;
            assert!(tries < 5, "{}: skopeo push: {e}", store.what);
        }
        let back = ctr.dir.path().join(format!("back-{i}"));
        ctr.run(
            "skopeo",
            &[
                "copy",
                "-q",
                "--src-tls-verify=false",
                &format!("docker://{last}/loop/skopeo:{tag}"),
                &format!("dir:{}", back.display()),
            ],
        )
        .unwrap_or_else(|e| panic!("{}: skopeo pull: {e}", store.what));
        let (sent, got) = (dir_files(&img).unwrap(), dir_files(&back).unwrap());
        for (name, bytes) in &sent {
            if name != "version" {
                assert_eq!(
                    got.get(name),
                    Some(bytes),
                    "{}: skopeo {tag}: {name}",
                    store.what
                );
            }
        }
        out.push(Pushed {
            repo: "loop/skopeo".into(),
            tag,
            manifest: sent["manifest.json"].clone(),
            deleted: false,
        });
    }
    out
}

async fn gc_in_a_loop_loses_nothing(
    store: Store,
    images: usize,
    skopeo_images: usize,
    grace: std::time::Duration,
) {
    let w = store.what;
    let store = Arc::new(store);
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reports = Vec::new();
            let mut node = 0;
            while !stop.load(Ordering::Relaxed) {
                reports.push(store.gc(node, false).await);
                node = (node + 1) % store.nodes.len();
            }
            reports
        })
    };
    let base = vec![7u8; 32 << 10];
    // Real clients too, while GC runs: skopeo pushes and pulls back a few images.
    let skopeo = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || skopeo_round_trips(&store, skopeo_images))
    };
    let mut pushed: Vec<Pushed> = futures_util::stream::iter(0..images)
        .map(|i| {
            let (store, base) = (store.clone(), base.clone());
            async move {
                let c = store.client(i % store.nodes.len());
                let repo = format!("loop/r{}", i % 5);
                let tag = format!("v{i}");
                let unique = format!("layer of image {i} ").repeat(100 + i * 37);
                let manifest = push_retrying(&c, &repo, &tag, &[&base, unique.as_bytes()]).await;
                // Pull it back at once from the other node, while GC runs.
                let other = store.client((i + 1) % store.nodes.len());
                pulls(&other, &repo, &tag, &manifest)
                    .await
                    .unwrap_or_else(|e| panic!("{w}: right after its push: {e}"));
                let deleted = i % 5 == 4;
                if deleted {
                    let d = sha256(&manifest);
                    let r = c
                        .req(
                            reqwest::Method::DELETE,
                            &format!("/v2/{repo}/manifests/{d}"),
                        )
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                }
                Pushed {
                    repo,
                    tag,
                    manifest,
                    deleted,
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    pushed.extend(skopeo.await.unwrap());
    stop.store(true, Ordering::Relaxed);
    let reports = looping.await.unwrap();
    assert!(reports.len() >= 2, "{w}: GC ran {} times", reports.len());
    let during: usize = reports
        .iter()
        .map(|r| r["blobs_deleted"].as_array().map_or(0, Vec::len))
        .sum();
    let rescued: u64 = reports
        .iter()
        .map(|r| r["rescued"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "{w}: {} GC runs during the pushes: {during} blobs deleted, {rescued} candidates rescued",
        reports.len()
    );
    // Once everything is older than the grace window, one more run takes the deleted
    // images' own blobs.
    tokio::time::sleep(grace + std::time::Duration::from_millis(500)).await;
    let last = store.gc(0, false).await;
    for p in &pushed {
        for node in 0..store.nodes.len() {
            let c = store.client(node);
            if !p.deleted {
                pulls(&c, &p.repo, &p.tag, &p.manifest)
                    .await
                    .unwrap_or_else(|e| panic!("{w}: an acknowledged image was lost: {e}"));
            }
        }
        let unique = blobs_of(&p.manifest).pop().unwrap();
        assert_eq!(
            store.holds(&unique),
            !p.deleted,
            "{w}: {}:{} (deleted: {}) and its own layer {unique}",
            p.repo,
            p.tag,
            p.deleted
        );
    }
    assert!(last["complete"].as_bool().unwrap(), "{w}: {last:#}");
    let swept: usize = reports
        .iter()
        .chain([&last])
        .map(|r| r["blobs_deleted"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(swept >= images / 5, "{w}: only {swept} blobs reclaimed");
    store.assert_consistent("at the end");
}

const LOOP: &str = "[gc]\ngrace_seconds = 2\nfence_seconds = 0.3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_filesystem_gc_in_a_loop_while_55_images_are_pushed_pulled_and_deleted_loses_nothing()
 {
    gc_in_a_loop_loses_nothing(Store::filesystem(2, LOOP), 50, 5, Duration::from_secs(2)).await;
}

/// No grace at all: a pushed blob is garbage until its manifest comes, so GC condemns blobs
/// that pushes are about to reference, and only the fencing (markers, the second scan, the
/// compare-and-swap) keeps acknowledged images whole. Pushes that lose a blob are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_grace_window_the_fencing_alone_keeps_every_acknowledged_image() {
    let gc = "[gc]\ngrace_seconds = 0\nfence_seconds = 0.05\n";
    gc_in_a_loop_loses_nothing(Store::filesystem(2, gc), 30, 0, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_gc_in_a_loop_while_55_images_are_pushed_pulled_and_deleted_loses_nothing() {
    gc_in_a_loop_loses_nothing(Store::s3(2, LOOP), 50, 5, Duration::from_secs(2)).await;
}

const KILLED: &str = "[gc]\ngrace_seconds = 0\nfence_seconds = 2\nlease_seconds = 2\n";

async fn killed_mid_sweep_then_rerun(mut store: Store, junk: usize) {
    let w = store.what;
    let c = store.client(0);
    let (kept, _) = c
        .push_image("team-a/kept", "v1", &[b"kept layer"])
        .await
        .unwrap();
    // Unreferenced blobs: garbage.
    let mut garbage = Vec::new();
    for i in 0..junk {
        garbage.push(
            c.push_blob("team-a/junk", format!("junk {i}").into_bytes())
                .await
                .unwrap()
                .to_string(),
        );
    }
    let base = store.nodes[0].base.clone();
    let run = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/gc"))
            .send()
            .await
    });
    // Kill as soon as the sweep has begun: the first condemned marker is in the store.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !store.any_marked(&garbage) {
        assert!(
            std::time::Instant::now() < deadline,
            "{w}: the sweep never began"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    store.nodes[0].crash_and_restart().unwrap();
    assert!(run.await.unwrap().is_err(), "{w}: the killed run answered");
    store.assert_consistent("after the kill");
    pulls(&store.client(0), "team-a/kept", "v1", &kept)
        .await
        .unwrap();
    // The dead run's lease expires; a new run then takes everything.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let rerun = loop {
        let r = store.gc(0, false).await;
        if r["busy"].is_null() {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{w}: the dead run's lease never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(rerun["complete"].as_bool().unwrap(), "{rerun:#}");
    for d in &garbage {
        assert!(!store.holds(d), "{w}: {d} survived the rerun");
    }
    pulls(&store.client(0), "team-a/kept", "v1", &kept)
        .await
        .unwrap();
    store.assert_consistent("after the rerun");
    assert!(
        !store.has("docker/registry/v2/_gc/lease"),
        "{w}: the lease outlived the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_filesystem_kill_9_mid_sweep_then_a_rerun_leaves_the_store_consistent() {
    killed_mid_sweep_then_rerun(Store::filesystem(1, KILLED), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_kill_9_mid_sweep_then_a_rerun_leaves_the_store_consistent() {
    killed_mid_sweep_then_rerun(Store::s3(1, KILLED), 100).await;
}

const SCHEDULED: &str = "[gc]\nenabled = true\ninterval_seconds = 1\ngrace_seconds = 0\n\
                         fence_seconds = 0.8\nlease_seconds = 10\n";

async fn scheduled_nodes_take_turns(store: Store) {
    let w = store.what;
    store
        .client(0)
        .push_blob("team-a/junk", b"something to collect".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let mut runs = Vec::new();
    let mut busy = 0;
    for (i, node) in store.nodes.iter().enumerate() {
        let history: Vec<Value> = reqwest::get(format!("{}/gc", node.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for r in history {
            if r["busy"].is_null() {
                runs.push((
                    i,
                    r["started_ms"].as_u64().unwrap(),
                    r["finished_ms"].as_u64().unwrap(),
                ));
            } else {
                busy += 1;
            }
        }
    }
    assert!(runs.len() >= 2, "{w}: {runs:?}");
    assert!(busy >= 1, "{w}: the nodes never met: {runs:?}");
    for a in &runs {
        for b in &runs {
            if a.0 != b.0 {
                assert!(
                    a.2 <= b.1 || b.2 <= a.1,
                    "{w}: runs of both nodes overlapped: {a:?} {b:?}"
                );
            }
        }
    }
    let metrics = reqwest::get(format!("{}/metrics", store.nodes[0].base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("storage_gc_runs_total{outcome=\"ok\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_filesystem_two_scheduled_nodes_never_collect_at_the_same_time() {
    scheduled_nodes_take_turns(Store::filesystem(2, SCHEDULED)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_two_scheduled_nodes_never_collect_at_the_same_time() {
    scheduled_nodes_take_turns(Store::s3(2, SCHEDULED)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_link_is_reported_and_the_run_goes_on() {
    let store = Store::filesystem(1, RECLAIM);
    let c = store.client(0);
    let (kept, _) = c.push_image("team-a/app", "v1", &[b"kept"]).await.unwrap();
    let junk = c
        .push_blob("team-a/junk", b"junk".to_vec())
        .await
        .unwrap()
        .to_string();
    let other = c
        .push_blob("team-a/other", b"other".to_vec())
        .await
        .unwrap();
    let repos = store.root().join("docker/registry/v2/repositories");
    let link = repos.join(format!("team-a/other/_layers/sha256/{}/link", other.hex()));
    std::fs::write(&link, "not a digest").unwrap();
    let tag = repos.join("team-a/other/_manifests/tags/broken/current");
    std::fs::create_dir_all(&tag).unwrap();
    std::fs::write(tag.join("link"), "garbage").unwrap();
    let report = store.gc(0, false).await;
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("corrupt link") && errors.contains("corrupt tag link"),
        "{report:#}"
    );
    assert!(set(&report, "blobs_deleted").contains(&junk), "{report:#}");
    pulls(&c, "team-a/app", "v1", &kept).await.unwrap();
}

const RETENTION_POLICY: &str = r#"
[[immutability]]
repositories = ["**"]
tags = ["v*.*.*"]

[[retention]]
repositories = ["team-a/**"]
keep_last = 2
keep_tags = ["stable"]
untagged = "delete"

[[retention]]
repositories = ["team-b/**"]
keep_days = 7
"#;

/// Tags of a repository, sorted.
async fn tags_of(c: &Client, repo: &str) -> Vec<String> {
    let v: Value = c
        .get(&format!("/v2/{repo}/tags/list"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut tags: Vec<String> = v["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

/// keep-N, keep-recent and pattern rules on real pushes; immutable tags kept; the dry run
/// reports exactly what the run then deletes. `tick` separates pushes (retention ranks by
/// push time in seconds); `age` makes a tag old (the filesystem only).
async fn retention_applies_the_policy(store: Store, tick: Duration, age: Option<&dyn Fn(&str)>) {
    let w = store.what;
    let c = store.client(0);
    let mut pushed = std::collections::HashMap::new();
    for tag in ["v1.0.0", "stable", "t1", "t2", "t3", "t4"] {
        let (m, _) = c
            .push_image("team-a/app", tag, &[format!("layer of {tag}").as_bytes()])
            .await
            .unwrap();
        pushed.insert(tag, m);
        tokio::time::sleep(tick).await;
    }
    let untagged = c
        .image_manifest(
            "team-a/app",
            b"{\"untagged\":1}",
            &[b"untagged layer"],
            None,
        )
        .await
        .unwrap();
    let ud = sha256(&untagged).to_string();
    assert_eq!(
        c.put_manifest("team-a/app", &ud, OCI_MANIFEST, &untagged)
            .await
            .unwrap()
            .status(),
        201
    );
    for tag in ["old", "new"] {
        let (m, _) = c
            .push_image("team-b/app", tag, &[format!("b {tag}").as_bytes()])
            .await
            .unwrap();
        pushed.insert(tag, m);
    }
    let (other, _) = c
        .push_image("team-c/app", "x", &[b"no rule"])
        .await
        .unwrap();
    if let Some(age) = age {
        age("team-b/app/_manifests/tags/old/current/link");
    }

    let dry = store.gc(0, true).await;
    let mut expected: BTreeSet<String> = ["t1", "t2"]
        .iter()
        .map(|t| format!("team-a/app:{t}"))
        .collect();
    expected.insert(format!("team-a/app@{ud}"));
    if age.is_some() {
        expected.insert("team-b/app:old".into());
    }
    let planned: BTreeSet<String> = dry["retention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| match d["tag"].as_str() {
            Some(t) => format!("{}:{t}", d["repository"].as_str().unwrap()),
            None => format!(
                "{}@{}",
                d["repository"].as_str().unwrap(),
                d["digest"].as_str().unwrap()
            ),
        })
        .collect();
    assert_eq!(planned, expected, "{w}: {dry:#}");
    assert_eq!(
        tags_of(&c, "team-a/app").await.len(),
        6,
        "{w}: the dry run deleted tags"
    );
    let real = store.gc(0, false).await;
    for field in [
        "retention",
        "manifests_deleted",
        "blobs_deleted",
        "layer_links_deleted",
    ] {
        assert_eq!(real[field], dry[field], "{w}: {field}: dry run ≠ run");
    }
    assert_eq!(
        tags_of(&c, "team-a/app").await,
        ["stable", "t3", "t4", "v1.0.0"],
        "{w}"
    );
    let b_tags = tags_of(&c, "team-b/app").await;
    assert_eq!(
        b_tags,
        if age.is_some() {
            vec!["new"]
        } else {
            vec!["new", "old"]
        },
        "{w}"
    );
    for tag in ["stable", "t3", "t4", "v1.0.0"] {
        pulls(&c, "team-a/app", tag, &pushed[tag]).await.unwrap();
    }
    pulls(&c, "team-c/app", "x", &other).await.unwrap();
    for tag in ["t1", "t2"] {
        let r = c
            .get(&format!("/v2/team-a/app/manifests/{tag}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{w}: {tag}");
        let d = sha256(&pushed[tag]).to_string();
        assert!(!store.holds(&d), "{w}: {tag}'s manifest was not swept");
        assert!(
            !store.holds(&blobs_of(&pushed[tag])[1]),
            "{w}: {tag}'s layer"
        );
    }
    assert!(!store.holds(&ud), "{w}: the untagged manifest");
    // A deleted tag can be pushed again.
    let (again, _) = c
        .push_image("team-a/app", "t1", &[b"t1 again"])
        .await
        .unwrap();
    pulls(&c, "team-a/app", "t1", &again).await.unwrap();
    store.assert_consistent("at the end");
}

fn retention_config(dir: &std::path::Path) -> String {
    let policy = dir.join("retention-policy.toml");
    std::fs::write(&policy, RETENTION_POLICY).unwrap();
    format!(
        "[gc]\ngrace_seconds = 0\nfence_seconds = 0.2\nretention_policy = \"{}\"\n",
        policy.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_filesystem_retention_keeps_n_recent_and_matching_tags_and_never_an_immutable_one() {
    let policy_dir = tempfile::tempdir().unwrap();
    let store = Store::filesystem(1, &retention_config(policy_dir.path()));
    let repos = store.root().join("docker/registry/v2/repositories");
    let age = move |rel: &str| {
        let ok = std::process::Command::new("touch")
            .args(["-m", "-d", "10 days ago"])
            .arg(repos.join(rel))
            .status()
            .unwrap()
            .success();
        assert!(ok, "touch {rel}");
    };
    retention_applies_the_policy(store, Duration::from_millis(1100), Some(&age)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_retention_keeps_n_recent_and_matching_tags_and_never_an_immutable_one() {
    let policy_dir = tempfile::tempdir().unwrap();
    let store = Store::s3(1, &retention_config(policy_dir.path()));
    retention_applies_the_policy(store, Duration::from_millis(1100), None).await;
}

/// `storage_blobs` and `storage_blob_bytes` of a node, once its first walk of the store has
/// ended (`storage_usage_measured_timestamp_seconds` set; the walk at start-up).
async fn usage(node: &StorageServer) -> (f64, f64) {
    use portcullis_tests::server::{metrics_text, storage_usage};
    for _ in 0..200 {
        let text = metrics_text(&node.base).await.unwrap();
        if let Some(usage) = storage_usage(&text) {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node never measured the store's usage");
}

/// The bytes of the blobs an image manifest stores: its config's, its layers' and its own.
fn image_bytes(manifest: &[u8]) -> f64 {
    let m: Value = serde_json::from_slice(manifest).unwrap();
    let sizes = std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap());
    (sizes.map(|d| d["size"].as_u64().unwrap()).sum::<u64>() + manifest.len() as u64) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_usage_follows_pushes_at_once_without_a_walk_and_gc_runs_measure_it_afresh() {
    let store = Store::filesystem(1, RECLAIM);
    let node = &store.nodes[0];
    let c = store.client(0);
    assert_eq!(usage(node).await, (0.0, 0.0));
    let (m, _) = c
        .push_image("team-a/app", "v1", &[b"layer one", b"layer two"])
        .await
        .unwrap();
    let pushed = (4.0, image_bytes(&m));
    assert_eq!(usage(node).await, pushed, "after the push");
    // The same layer again, in another repository: stored once, counted once.
    c.push_blob("team-b/app", b"layer one".to_vec())
        .await
        .unwrap();
    assert_eq!(usage(node).await, pushed, "after a blob the store had");
    // A blob put in the store behind the node's back (as another node would): no scrape
    // walks the store to find it...
    let stray = b"a blob from elsewhere";
    let d = sha256(stray);
    let dir = store.root().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{}",
        &d.hex()[..2],
        d.hex()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data"), stray).unwrap();
    assert_eq!(usage(node).await, pushed, "a scrape walked the store");
    // ...a GC run's walk does (a dry run's too), and its sweep takes away what it deletes.
    let with_stray = (pushed.0 + 1.0, pushed.1 + stray.len() as f64);
    let dry = store.gc(0, true).await;
    assert_eq!(set(&dry, "blobs_deleted"), [d.to_string()].into());
    assert_eq!(usage(node).await, with_stray, "after the dry run");
    let real = store.gc(0, false).await;
    assert_eq!(set(&real, "blobs_deleted"), [d.to_string()].into());
    assert_eq!(usage(node).await, pushed, "after the run");
}
