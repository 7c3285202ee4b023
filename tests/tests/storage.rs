//! End-to-end tests of storage-backend: the real binary on free ports, real sockets, real
//! clients (skopeo, podman, buildah) and the real peer (distribution 2.8.2).
//!
//! `cargo test --release --test storage` runs exactly these.

use anyhow::{Context, ensure};
use portcullis_tests::client::{
    Client, OCI_MANIFEST, describe, expect_error, list_page, sha256, with_query,
};
use portcullis_tests::server::{StorageOptions, StorageServer, binary};
use portcullis_tests::tools::{Containers, Distribution, dir_files};
use portcullis_tests::{fsck, protocol};
use reqwest::Method;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

fn assert_consistent(root: &Path) {
    let report = fsck::check(root);
    assert!(
        report.errors.is_empty(),
        "store is inconsistent: {:#?}",
        report.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protocol_suite_passes_against_storage_backend() {
    let root = tempfile::tempdir().unwrap();
    let server = StorageServer::start(root.path()).unwrap();
    protocol::assert_all_pass(&Client::new(&server.base), "suite", "on the filesystem").await;
    assert_consistent(root.path());
}

#[tokio::test]
async fn deletes_can_be_disabled() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("conf.toml");
    std::fs::write(&conf, "[api]\ndelete_enabled = false\n").unwrap();
    let server = StorageServer::start_with(
        &root.path().join("data"),
        StorageOptions {
            config: Some(conf),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Client::new(&server.base);
    let (_, d) = c.push_image("r", "t", &[b"l"]).await.unwrap();
    for path in [
        "/v2/r/manifests/t".to_string(),
        format!("/v2/r/manifests/{d}"),
        format!("/v2/r/blobs/{}", sha256(b"l")),
    ] {
        let r = c.req(Method::DELETE, &path).send().await.unwrap();
        expect_error(r, 405, "UNSUPPORTED").await.unwrap();
    }
    assert_eq!(c.get("/v2/r/manifests/t").await.unwrap().status(), 200);
}

#[tokio::test]
async fn internal_secret_is_required_when_configured() {
    let root = tempfile::tempdir().unwrap();
    let server = StorageServer::start_with(
        root.path(),
        StorageOptions {
            env: vec![("PORTCULLIS_INTERNAL_SECRET".into(), "s3cret-value".into())],
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = Client::new(&server.base);
    expect_error(c.get("/v2/").await.unwrap(), 401, "UNAUTHORIZED")
        .await
        .unwrap();
    c.headers = vec![("portcullis-internal-secret".into(), "wrong".into())];
    expect_error(c.get("/v2/").await.unwrap(), 401, "UNAUTHORIZED")
        .await
        .unwrap();
    // Health and metrics are open (Prometheus and load balancers ask without the secret),
    // and never show it.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = c.get(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(!r.text().await.unwrap().contains("s3cret"), "{path}");
    }
    expect_error(
        c.get("/v2/nope/tags/list").await.unwrap(),
        401,
        "UNAUTHORIZED",
    )
    .await
    .unwrap();
    c.headers = vec![("portcullis-internal-secret".into(), "s3cret-value".into())];
    assert_eq!(c.get("/v2/").await.unwrap().status(), 200);
    let body = c
        .get("/v2/nope/tags/list")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("s3cret"), "secret leaked: {body}");
}

#[test]
fn refuses_a_public_listener_without_a_secret() {
    let root = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary("storage-backend"))
        .args(["--listen", "0.0.0.0:0", "--root"])
        .arg(root.path())
        .env_remove("PORTCULLIS_INTERNAL_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("non-loopback") && err.contains("secret"),
        "{err}"
    );
}

#[test]
fn literal_dot_dot_in_a_path_is_name_invalid() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let server = StorageServer::start(root.path()).unwrap();
    let addr = server.base.trim_start_matches("http://").to_string();
    for path in [
        "/v2/../tags/list",
        "/v2/a/../b/tags/list",
        "/v2/a/../../etc/manifests/passwd",
        "/v2/%2e%2e/tags/list",
        "/v2/a/%2e%2e/%2e%2e/manifests/latest",
        "/v2/a/%2E%2E/tags/list",
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 400") && out.contains("NAME_INVALID"),
            "{path}: {out}"
        );
    }
}

#[test]
fn check_config_validates_the_shipped_example() {
    let conf = portcullis_tests::server::workspace_root().join("conf/storage-backend.toml");
    let out = std::process::Command::new(binary("storage-backend"))
        .arg("--config")
        .arg(&conf)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "[api]\nmax_manifest_bytez = 1\n").unwrap();
    let out = std::process::Command::new(binary("storage-backend"))
        .arg("--config")
        .arg(bad.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_manifest_bytez"));
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let root = tempfile::tempdir().unwrap();
    let server = StorageServer::start(root.path()).unwrap();
    let c = Client::new(&server.base);
    assert_eq!(c.get("/healthz").await.unwrap().status(), 200);
    assert_eq!(c.get("/readyz").await.unwrap().status(), 200);
    c.push_image("m", "t", &[b"x"]).await.unwrap();
    let text = c.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        text.contains(
            "storage_http_requests_total{endpoint=\"manifest_put\",method=\"PUT\",status=\"201\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("storage_http_request_duration_seconds_bucket"));
}

/// Deterministic content: byte `i` of the stream, for any offset.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect()
}

#[tokio::test]
async fn uploads_survive_restart_and_continue_on_another_process() {
    let root = tempfile::tempdir().unwrap();
    let mut a = StorageServer::start(root.path()).unwrap();
    let ca = Client::new(&a.base);
    let loc = ca.start_upload("up").await.unwrap();
    let data = pattern(0, 3_000_000);
    let patch = |c: &Client, from: usize, to: usize| {
        c.req(Method::PATCH, &loc)
            .header("content-range", format!("{}-{}", from, to - 1))
            .body(data[from..to].to_vec())
            .send()
    };
    assert_eq!(patch(&ca, 0, 1_000_000).await.unwrap().status(), 202);
    // A second process on the same root continues the session.
    let b = StorageServer::start(root.path()).unwrap();
    let cb = Client::new(&b.base);
    assert_eq!(
        patch(&cb, 1_000_000, 2_000_000).await.unwrap().status(),
        202
    );
    // The first process is killed and restarted; it continues too.
    a.crash_and_restart().unwrap();
    let ca = Client::new(&a.base);
    let r = ca.get(&loc).await.unwrap();
    assert_eq!(r.headers()["range"], "0-1999999");
    assert_eq!(
        patch(&ca, 2_000_000, 3_000_000).await.unwrap().status(),
        202
    );
    let d = sha256(&data);
    let r = cb
        .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", describe(r).await);
    let got = ca
        .get(&format!("/v2/up/blobs/{d}"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == data[..]);
    assert_consistent(root.path());
}

/// Streams `total` bytes of [`pattern`] from `offset`, counting what has been produced.
fn pattern_body(offset: u64, total: u64, sent: Arc<AtomicU64>) -> reqwest::Body {
    const CHUNK: u64 = 1 << 20;
    let stream = futures_util::stream::unfold(0u64, move |done| {
        let sent = sent.clone();
        async move {
            if done >= total {
                return None;
            }
            let n = CHUNK.min(total - done);
            let chunk = pattern(offset + done, n as usize);
            sent.fetch_add(n, Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(chunk), done + n))
        }
    });
    reqwest::Body::wrap_stream(stream)
}

/// Sends `body` and `kill -9`s the server once `kill_after` bytes have been produced.
async fn send_and_kill(
    req: reqwest::RequestBuilder,
    sent: Arc<AtomicU64>,
    kill_after: u64,
    pid: u32,
) {
    let killer = tokio::spawn(async move {
        while sent.load(Ordering::SeqCst) < kill_after {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    });
    let result = req.send().await;
    killer.await.unwrap();
    assert!(
        result.is_err() || !result.unwrap().status().is_success(),
        "the request finished before the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_512_mib_upload_leaves_a_consistent_store() {
    const TOTAL: u64 = 512 << 20;
    let root = tempfile::tempdir().unwrap();
    let mut server = StorageServer::start(root.path()).unwrap();
    let c = Client::new(&server.base);
    // The digest of the full content, computed without holding it.
    let mut v = oci::Verifier::new(oci::Algorithm::Sha256);
    for off in (0..TOTAL).step_by(1 << 20) {
        v.update(&pattern(off, 1 << 20));
    }
    let digest = v.finish();

    // Monolithic push killed at ~200 MiB: nothing under the digest after restart.
    let sent = Arc::new(AtomicU64::new(0));
    let req = c
        .req(
            Method::POST,
            &format!("/v2/big/blobs/uploads/?digest={digest}"),
        )
        .header("content-length", TOTAL.to_string())
        .body(pattern_body(0, TOTAL, sent.clone()));
    send_and_kill(req, sent, 200 << 20, server.pid().unwrap()).await;
    server.crash_and_restart().unwrap();
    assert_consistent(root.path());
    let r = c
        .req(Method::HEAD, &format!("/v2/big/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "a partial blob is visible under its digest"
    );

    // Chunked session killed in its second chunk: resumable from what the store reports.
    let loc = c.start_upload("big").await.unwrap();
    let first = 100u64 << 20;
    let r = c
        .req(Method::PATCH, &loc)
        .header("content-range", format!("0-{}", first - 1))
        .body(pattern_body(0, first, Arc::new(AtomicU64::new(0))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let sent = Arc::new(AtomicU64::new(0));
    let req = c
        .req(Method::PATCH, &loc)
        .header("content-range", format!("{first}-{}", TOTAL - 1))
        .header("content-length", (TOTAL - first).to_string())
        .body(pattern_body(first, TOTAL - first, sent.clone()));
    send_and_kill(req, sent, 150 << 20, server.pid().unwrap()).await;
    server.crash_and_restart().unwrap();
    assert_consistent(root.path());
    let r = c.get(&loc).await.unwrap();
    match r.status().as_u16() {
        204 => {
            let range = r.headers()["range"].to_str().unwrap().to_string();
            let end: u64 = range.trim_start_matches("0-").parse().unwrap();
            let at = end + 1;
            assert!(at >= first && at <= TOTAL, "resume point {at}");
            let r = c
                .req(Method::PATCH, &loc)
                .header("content-range", format!("{at}-{}", TOTAL - 1))
                .body(pattern_body(at, TOTAL - at, Arc::new(AtomicU64::new(0))))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}", describe(r).await);
            let r = c
                .req(Method::PUT, &with_query(&loc, &format!("digest={digest}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", describe(r).await);
            let r = c
                .req(Method::HEAD, &format!("/v2/big/blobs/{digest}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["content-length"], TOTAL.to_string().as_str());
        }
        404 => expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await.unwrap(),
        s => panic!("upload status after crash: {s}"),
    }
    assert_consistent(root.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_manifest_writes_leaves_a_consistent_store() {
    let root = tempfile::tempdir().unwrap();
    let mut server = StorageServer::start(root.path()).unwrap();
    let c = Client::new(&server.base);
    let mut manifests = Vec::new();
    for i in 0..40 {
        let m = c
            .image_manifest(
                "crash",
                format!("{{\"n\":{i}}}").as_bytes(),
                &[&pattern(i, 1000)],
                None,
            )
            .await
            .unwrap();
        manifests.push(m);
    }
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let count = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (c, manifests, acked, count) =
            (c.clone(), manifests.clone(), acked.clone(), count.clone());
        writers.push(tokio::spawn(async move {
            for round in 0.. {
                let m = &manifests[(round * 7 + w) % manifests.len()];
                let tag = format!("w{w}-{}", round % 10);
                match c.put_manifest("crash", &tag, OCI_MANIFEST, m).await {
                    Ok(r) if r.status() == 201 => {
                        acked.lock().unwrap().push((tag, sha256(m).to_string()));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    while count.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    server.kill9();
    for w in writers {
        w.await.unwrap();
    }
    assert_consistent(root.path());
    server.crash_and_restart().unwrap();
    // Every tag resolves to a manifest whose bytes match its digest.
    let tags: serde_json::Value = c
        .get("/v2/crash/tags/list")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tags = tags["tags"].as_array().unwrap();
    assert!(!tags.is_empty());
    for t in tags {
        let r = c
            .get(&format!("/v2/crash/manifests/{}", t.as_str().unwrap()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let d = r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(sha256(&r.bytes().await.unwrap()).to_string(), d);
    }
    // Every acknowledged write of a tag is there, or a later write of the same tag is.
    let acked = acked.lock().unwrap();
    for (tag, _) in acked.iter() {
        assert!(
            tags.iter().any(|t| t == tag.as_str()),
            "acknowledged tag {tag} lost"
        );
    }
}

fn busybox() -> &'static Path {
    Path::new("/bin/busybox")
}

/// A `dir:` copy of a fresh scratch image, the reference for byte-identical checks.
fn source_image(ctr: &Containers, name: &str) -> anyhow::Result<std::path::PathBuf> {
    ctr.build_scratch_image(name, busybox())?;
    let dir = ctr
        .dir
        .path()
        .join(format!("src-{}", name.replace([':', '/'], "-")));
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            &format!("containers-storage:localhost/{name}"),
            &format!("dir:{}", dir.display()),
        ],
    )?;
    Ok(dir)
}

fn skopeo_push(ctr: &Containers, src: &Path, dest: &str) -> anyhow::Result<()> {
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("dir:{}", src.display()),
            &format!("docker://{dest}"),
        ],
    )?;
    Ok(())
}

fn skopeo_pull(ctr: &Containers, src: &str, dest: &Path) -> anyhow::Result<()> {
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--src-tls-verify=false",
            &format!("docker://{src}"),
            &format!("dir:{}", dest.display()),
        ],
    )?;
    Ok(())
}

fn same_files(a: &Path, b: &Path) -> anyhow::Result<()> {
    let (fa, fb) = (dir_files(a)?, dir_files(b)?);
    ensure!(
        fa.keys().eq(fb.keys()),
        "different files: {:?} vs {:?}",
        fa.keys(),
        fb.keys()
    );
    for (k, v) in &fa {
        ensure!(fb[k] == *v, "{k} differs");
    }
    Ok(())
}

fn manifest_digest(dir: &Path) -> anyhow::Result<String> {
    Ok(sha256(&std::fs::read(dir.join("manifest.json"))?).to_string())
}

#[test]
fn skopeo_copy_round_trip_is_byte_identical_by_tag_and_digest() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = StorageServer::start(root.path())?;
    let host = server.base.trim_start_matches("http://").to_string();
    let ctr = Containers::new()?;
    let src = source_image(&ctr, "skopeo-src:1")?;
    skopeo_push(&ctr, &src, &format!("{host}/team/app:v1"))?;
    let by_tag = ctr.dir.path().join("by-tag");
    skopeo_pull(&ctr, &format!("{host}/team/app:v1"), &by_tag)?;
    same_files(&src, &by_tag).context("pull by tag")?;
    let by_digest = ctr.dir.path().join("by-digest");
    skopeo_pull(
        &ctr,
        &format!("{host}/team/app@{}", manifest_digest(&src)?),
        &by_digest,
    )?;
    same_files(&src, &by_digest).context("pull by digest")?;
    let tags = ctr.run(
        "skopeo",
        &[
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{host}/team/app"),
        ],
    )?;
    ensure!(tags.contains("\"v1\""), "{tags}");
    ctr.run(
        "skopeo",
        &[
            "delete",
            "--tls-verify=false",
            &format!("docker://{host}/team/app@{}", manifest_digest(&src)?),
        ],
    )?;
    ensure!(
        skopeo_pull(
            &ctr,
            &format!("{host}/team/app:v1"),
            &ctr.dir.path().join("gone")
        )
        .is_err()
    );
    assert_consistent(root.path());
    Ok(())
}

#[test]
fn podman_push_and_pull() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server = StorageServer::start(root.path())?;
    let host = server.base.trim_start_matches("http://").to_string();
    let ctr = Containers::new()?;
    ctr.build_scratch_image("podman-src:1", busybox())?;
    let id = ctr.run(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/podman-src:1",
        ],
    )?;
    let dest = format!("{host}/team/podman:v1");
    ctr.run(
        "podman",
        &[
            "push",
            "-q",
            "--tls-verify=false",
            "localhost/podman-src:1",
            &dest,
        ],
    )?;
    // Pull into a separate, empty storage.
    let other = Containers::new()?;
    other.run("podman", &["pull", "-q", "--tls-verify=false", &dest])?;
    let pulled = other.run(
        "podman",
        &["image", "inspect", "--format", "{{.Id}}", &dest],
    )?;
    ensure!(pulled.trim() == id.trim(), "image id {pulled} != {id}");
    let out = ctr.dir.path().join("pulled");
    skopeo_pull(&ctr, &dest, &out)?;
    let digest = manifest_digest(&out)?;
    let by_digest = format!("{host}/team/podman@{digest}");
    let third = Containers::new()?;
    third.run("podman", &["pull", "-q", "--tls-verify=false", &by_digest])?;
    assert_consistent(root.path());
    Ok(())
}

#[test]
fn distribution_and_storage_backend_read_each_others_roots() -> anyhow::Result<()> {
    let ctr = Containers::new()?;
    let src = source_image(&ctr, "compat-src:1")?;

    // Pushed into distribution 2.8.2, pulled from storage-backend on the same root.
    let root_a = tempfile::tempdir()?;
    {
        let dist = Distribution::start(root_a.path())?;
        skopeo_push(&ctr, &src, &format!("{}/compat/app:v1", dist.addr))?;
    }
    assert_consistent(root_a.path());
    {
        let server = StorageServer::start(root_a.path())?;
        let host = server.base.trim_start_matches("http://").to_string();
        let out = ctr.dir.path().join("from-ours");
        skopeo_pull(&ctr, &format!("{host}/compat/app:v1"), &out)?;
        same_files(&src, &out).context("distribution → storage-backend")?;
        let tags = ctr.run(
            "skopeo",
            &[
                "list-tags",
                "--tls-verify=false",
                &format!("docker://{host}/compat/app"),
            ],
        )?;
        ensure!(tags.contains("\"v1\""), "{tags}");
        // And we can add to it.
        skopeo_push(&ctr, &src, &format!("{host}/compat/app:v2"))?;
    }

    // Pushed into storage-backend, pulled from distribution on the same root.
    let root_b = tempfile::tempdir()?;
    {
        let server = StorageServer::start(root_b.path())?;
        skopeo_push(
            &ctr,
            &src,
            &format!("{}/ours/app:v1", server.base.trim_start_matches("http://")),
        )?;
    }
    {
        let dist = Distribution::start(root_b.path())?;
        let out = ctr.dir.path().join("from-distribution");
        skopeo_pull(&ctr, &format!("{}/ours/app:v1", dist.addr), &out)?;
        same_files(&src, &out).context("storage-backend → distribution")?;
        let digest = manifest_digest(&src)?;
        let out = ctr.dir.path().join("from-distribution-by-digest");
        skopeo_pull(&ctr, &format!("{}/ours/app@{digest}", dist.addr), &out)?;
        same_files(&src, &out)?;
        // distribution's catalog sees the repository.
        let cat = ctr.run("curl", &["-sf", &format!("{}/v2/_catalog", dist.base)])?;
        ensure!(cat.contains("ours/app"), "{cat}");
    }
    // The root that both wrote to is served by distribution too.
    let dist = Distribution::start(root_a.path())?;
    let out = ctr.dir.path().join("v2-from-distribution");
    skopeo_pull(&ctr, &format!("{}/compat/app:v2", dist.addr), &out)?;
    same_files(&src, &out)?;
    Ok(())
}

/// `path?n=<n>&last=<last>` (the names and tags used here need no escaping in a query).
fn page_path(path: &str, n: usize, last: Option<&str>) -> String {
    match last {
        None => format!("{path}?n={n}"),
        Some(l) => format!("{path}?n={n}&last={l}"),
    }
}

/// The catalog page after `last` (none: the first), `n` at most, from storage-backend and
/// from distribution on the same root: the same items; and a next link from us exactly when
/// distribution has more (distribution also links a next page after a page that happens to
/// be full when nothing follows, which we check it answers empty).
async fn same_catalog_page(
    ours: &Client,
    theirs: &Client,
    n: usize,
    last: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let path = page_path("/v2/_catalog", n, last);
    let (our_items, our_more) = list_page(ours, &path, "repositories").await?;
    let (their_items, their_more) = list_page(theirs, &path, "repositories").await?;
    ensure!(
        our_items == their_items,
        "{path}: ours {our_items:?}, distribution {their_items:?}"
    );
    let really_more = if their_more && !their_items.is_empty() {
        let next = page_path("/v2/_catalog", n, their_items.last().map(String::as_str));
        !list_page(theirs, &next, "repositories").await?.0.is_empty()
    } else {
        their_more
    };
    ensure!(
        our_more == really_more,
        "{path}: our next link {our_more}, distribution has more: {really_more}"
    );
    Ok(our_items)
}

#[tokio::test]
async fn catalog_and_tag_pages_match_distribution_on_one_layout() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let layout = portcullis_tests::layout::Layout::new(root.path())?;
    let v1 = ["v1".to_string()];
    // Names that sort differently across nesting levels: `a/b` < `a-b` < `a.b` as a walk
    // meets them, not as plain strings.
    let names = [
        "a",
        "a/b",
        "a/b/c",
        "a/b-c",
        "a-b",
        "a.b",
        "a0",
        "b/a",
        "b/a/b",
        "team/app",
        "team/app/sub",
        "team-x/y",
        "z",
    ];
    for name in names {
        layout.image(name, &v1)?;
    }
    // A level wider than the walk lists ahead (16).
    let wide: Vec<String> = (0..20).map(|i| format!("wide/r{i:02}")).collect();
    for name in &wide {
        layout.image(name, &v1)?;
    }
    // Only blobs, no manifest: distribution lists it; so do we.
    layout.blobs_only("blobs/only")?;
    // A stray file among the repositories names none (distribution ignores it too).
    std::fs::write(
        root.path().join("docker/registry/v2/repositories/zfile"),
        b"x",
    )?;
    let tags: Vec<String> = [
        "1.0", "1.0-rc", "10", "2", "A", "a", "latest", "v1", "v1-0", "v1.0", "v1_0", "_x",
    ]
    .map(String::from)
    .to_vec();
    layout.image("tags/many", &tags)?;

    let server = StorageServer::start(root.path())?;
    let dist = Distribution::start(root.path())?;
    let (ours, theirs) = (Client::new(&server.base), Client::new(&dist.base));

    // Every page, for several page sizes, following the last item as a client does.
    let mut all = Vec::new();
    for n in [1, 2, 3, 5, 100] {
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = same_catalog_page(&ours, &theirs, n, last.as_deref()).await?;
            let Some(l) = page.last().cloned() else { break };
            seen.extend(page);
            last = Some(l);
        }
        if n == 100 {
            all = seen.clone();
        }
        ensure!(
            seen.len() == names.len() + wide.len() + 2,
            "n={n}: {seen:?}"
        );
    }
    ensure!(all.contains(&"blobs/only".to_string()), "{all:?}");
    // `last` on every name, between names, before and after all of them.
    let mut lasts: Vec<String> = all.clone();
    lasts.extend(["0", "a/", "a/b/", "a.", "a/a", "b", "team/", "zz", "~"].map(String::from));
    // Not names: nothing outside `repositories/` is walked, no error.
    lasts.extend(
        [
            "..",
            "../..",
            "../../../../..",
            ".",
            "./a",
            "a/..",
            "a/./b",
            "a//b",
            "/",
            "A/b",
            "a/_layers",
        ]
        .map(String::from),
    );
    lasts.push("x".repeat(300));
    lasts.push("a/".repeat(300));
    for last in &lasts {
        same_catalog_page(&ours, &theirs, 3, Some(last)).await?;
    }
    // Repositories deleted, created and re-created while a client pages.
    let mut last = same_catalog_page(&ours, &theirs, 2, None).await?.pop();
    layout.remove("a.b")?;
    layout.image("a/a", &v1)?;
    last = same_catalog_page(&ours, &theirs, 2, last.as_deref())
        .await?
        .pop()
        .or(last);
    layout.image("a.b", &v1)?;
    layout.remove("team/app/sub")?;
    while let Some(l) = last {
        last = same_catalog_page(&ours, &theirs, 2, Some(&l)).await?.pop();
    }

    // A nested name starting with a digit: distribution lists it before its parent (where
    // `_layers` sorts among the parent's entries) and then skips the parent when paging; ours
    // keeps a name before the names under it, on every page.
    let other = tempfile::tempdir()?;
    let digits = portcullis_tests::layout::Layout::new(other.path())?;
    for name in ["a", "a/0", "a/1x/c", "a/b", "b"] {
        digits.image(name, &v1)?;
    }
    let ours_digits = StorageServer::start(other.path())?;
    let c = Client::new(&ours_digits.base);
    let (all_digits, _) = list_page(&c, "/v2/_catalog?n=100", "repositories").await?;
    ensure!(
        all_digits == ["a", "a/0", "a/1x/c", "a/b", "b"],
        "{all_digits:?}"
    );
    let mut paged = Vec::new();
    let mut path = page_path("/v2/_catalog", 1, None);
    loop {
        let (page, more) = list_page(&c, &path, "repositories").await?;
        paged.extend(page.iter().cloned());
        if !more {
            break;
        }
        path = page_path("/v2/_catalog", 1, page.last().map(String::as_str));
    }
    ensure!(paged == all_digits, "paged one at a time: {paged:?}");

    // Tags: the whole list as distribution has it, sorted; every page of ours is a run of it.
    let (mut theirs_all, _) = list_page(&theirs, "/v2/tags/many/tags/list", "tags").await?;
    theirs_all.sort();
    let (ours_all, _) = list_page(&ours, "/v2/tags/many/tags/list", "tags").await?;
    ensure!(
        ours_all == theirs_all,
        "ours {ours_all:?}, distribution {theirs_all:?}"
    );
    for n in 1..=4 {
        let mut seen = Vec::new();
        let mut path = format!("/v2/tags/many/tags/list?n={n}");
        loop {
            let (page, more) = list_page(&ours, &path, "tags").await?;
            ensure!(page.len() <= n, "{path}: {page:?}");
            seen.extend(page.iter().cloned());
            if !more {
                break;
            }
            path = page_path(
                "/v2/tags/many/tags/list",
                n,
                page.last().map(String::as_str),
            );
        }
        ensure!(seen == theirs_all, "n={n}: {seen:?}");
    }
    for (last, want) in [("1.0", "1.0-rc"), ("1", "1.0"), ("v1.0", "v1_0"), ("~", "")] {
        let path = page_path("/v2/tags/many/tags/list", 1, Some(last));
        let (page, _) = list_page(&ours, &path, "tags").await?;
        ensure!(
            page.first().map_or("", String::as_str) == want,
            "{path}: {page:?}"
        );
    }
    Ok(())
}

/// A DELETE by digest with the gateway's immutability rules for tags matching `glob`.
async fn delete_protected(
    c: &Client,
    repo: &str,
    digest: &str,
    glob: &str,
) -> anyhow::Result<reqwest::StatusCode> {
    let protection = format!(
        r#"{{"rules":[{{"line":1,"tags":[{{"glob":"{glob}"}}],"exclude":[]}}],"may_override":false}}"#
    );
    let r = c
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/{digest}"))
        .header(service::hop::PROTECTION_HEADER, protection)
        .send()
        .await?;
    Ok(r.status())
}

/// Storage finds the tags of a manifest through its reverse index of tags: built from the
/// tags of a registry:2 root written without it, kept by pushes, never fooled by a marker
/// whose tag moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_by_digest_finds_every_tag_of_its_manifest_whoever_wrote_it() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    let layout = portcullis_tests::layout::Layout::new(root.path())?;
    let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    layout.image("app", &tags(&["a", "b", "c"]))?;
    layout.image("other", &tags(&["x", "y"]))?;
    let m = layout.manifest().to_string();
    let server = StorageServer::start(root.path())?;
    let c = Client::new(&server.base);

    // A tag written by the layout, not by a push, protects its manifest; so does one the
    // layout writes after storage checked the repository's tags.
    ensure!(delete_protected(&c, "other", &m, "y").await? == 403);
    let marker = root.path().join(format!(
        "docker/registry/v2/repositories/other/_manifests/_tagged/sha256/{}/x",
        layout.manifest().hex()
    ));
    ensure!(marker.exists(), "the first lookup marks every tag");
    layout.tag("other", "late")?;
    ensure!(delete_protected(&c, "other", &m, "late").await? == 403);
    ensure!(delete_protected(&c, "other", &m, "z*").await? == 202);
    for t in ["x", "y"] {
        let r = c.get(&format!("/v2/other/manifests/{t}")).await?;
        ensure!(r.status() == 404, "other:{t} outlived its manifest");
    }

    // A pushed manifest takes `c`, then `a` moves to it too: `a`'s marker on the layout's
    // manifest is stale.
    let (_, pushed) = c.push_image("app", "c", &[b"pushed layer"]).await?;
    ensure!(delete_protected(&c, "app", &pushed.to_string(), "c").await? == 403);
    let body = c
        .get(&format!("/v2/app/manifests/{pushed}"))
        .await?
        .bytes()
        .await?;
    let r = c.put_manifest("app", "a", OCI_MANIFEST, &body).await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    ensure!(delete_protected(&c, "app", &pushed.to_string(), "a").await? == 403);
    // `a` no longer points at the layout's manifest: a rule on `a` does not protect it, and
    // the delete takes `b` (the only tag left on it) with it.
    ensure!(delete_protected(&c, "app", &m, "a").await? == 202);
    let (mut left, _) = list_page(&c, "/v2/app/tags/list", "tags").await?;
    left.sort();
    ensure!(left == ["a", "c"], "tags left: {left:?}");
    assert_consistent(root.path());

    // A child of an immutable index is protected; also when the index's markers are gone (as
    // if distribution had written it) and a freshly started node checks the repository.
    let (child, child_digest) = c.push_image("multi", "child", &[b"child layer"]).await?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": portcullis_tests::client::OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest.to_string(),
                       "size": child.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))?;
    let r = c
        .put_manifest("multi", "rel", portcullis_tests::client::OCI_INDEX, &index)
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    let child_digest = child_digest.to_string();
    ensure!(delete_protected(&c, "multi", &child_digest, "rel").await? == 403);
    drop(server);
    std::fs::remove_dir_all(
        root.path()
            .join("docker/registry/v2/repositories/multi/_manifests/_parents"),
    )?;
    let server = StorageServer::start(root.path())?;
    let c = Client::new(&server.base);
    ensure!(delete_protected(&c, "multi", &child_digest, "rel").await? == 403);
    ensure!(delete_protected(&c, "multi", &child_digest, "child").await? == 403);
    ensure!(delete_protected(&c, "multi", &child_digest, "other").await? == 202);
    Ok(())
}

/// Makes a directory's last change look an hour old, so storage may keep its listing.
fn settle(dir: &Path) -> anyhow::Result<()> {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::open(dir)?.set_modified(old)?;
    Ok(())
}

/// Large directories' listings are kept in memory by each storage node: their pages are
/// distribution's, and what another node on the same root adds or removes shows on the next
/// page all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_listing_pages_as_distribution_and_shows_what_another_node_changed()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let layout = portcullis_tests::layout::Layout::new(root.path())?;
    let v1 = ["v1".to_string()];
    // `big` is a repository itself, so `_layers` and `_manifests` sort among its 200
    // children's names.
    layout.image("big", &v1)?;
    for i in 0..200 {
        layout.image(&format!("big/r{i:03}"), &v1)?;
    }
    layout.image("zz", &v1)?;
    let tags: Vec<String> = (0..300).map(|j| format!("t{j:03}")).collect();
    layout.image("tags/many", &tags)?;
    let v2 = root.path().join("docker/registry/v2/repositories");
    settle(&v2.join("big"))?;
    settle(&v2.join("tags/many/_manifests/tags"))?;
    let a = StorageServer::start(root.path())?;
    let b = StorageServer::start(root.path())?;
    let dist = Distribution::start(root.path())?;
    let (ca, cb, theirs) = (
        Client::new(&a.base),
        Client::new(&b.base),
        Client::new(&dist.base),
    );
    // Every page, twice (the second from the kept listing), and a `last` among the `_`
    // entries.
    for _ in 0..2 {
        let mut last = None;
        while let Some(l) = same_catalog_page(&ca, &theirs, 7, last.as_deref())
            .await?
            .pop()
        {
            last = Some(l);
        }
        same_catalog_page(&ca, &theirs, 3, Some("big/_x")).await?;
    }
    let catalog = |last: &str| format!("/v2/_catalog?n=3&last={last}");
    let tag_page = |last: &str| format!("/v2/tags/many/tags/list?n=3&last={last}");
    for _ in 0..2 {
        let (page, more) = list_page(&ca, &catalog("big/r100"), "repositories").await?;
        ensure!(
            page == ["big/r101", "big/r102", "big/r103"] && more,
            "{page:?}"
        );
        let (page, _) = list_page(&ca, &tag_page("t100"), "tags").await?;
        ensure!(page == ["t101", "t102", "t103"], "{page:?}");
    }

    // Node B pushes a repository and a tag, deletes a tag; a repository goes (as a delete of
    // the directory by any node would take it).
    cb.push_image("big/r100a", "v1", &[b"new repository"])
        .await?;
    cb.push_image("tags/many", "t100a", &[b"new tag"]).await?;
    let r = cb
        .req(Method::DELETE, "/v2/tags/many/manifests/t101")
        .send()
        .await?;
    ensure!(r.status() == 202, "{}", describe(r).await);
    layout.remove("big/r102")?;

    let (page, _) = list_page(&ca, &catalog("big/r100"), "repositories").await?;
    ensure!(page == ["big/r100a", "big/r101", "big/r103"], "{page:?}");
    let (page, _) = list_page(&ca, &tag_page("t100"), "tags").await?;
    ensure!(page == ["t100a", "t102", "t103"], "{page:?}");
    Ok(())
}

/// A kept tag listing remembers which tags' links it found naming a manifest, so later pages
/// skip reading them; retention's tombstone changes a link in place, and the next page must
/// not list that tag — nor miss one pushed over a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kept_tag_listing_drops_the_tags_retention_deleted_and_lists_them_pushed_again()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let layout = portcullis_tests::layout::Layout::new(root.path())?;
    let tags: Vec<String> = (0..300).map(|j| format!("t{j:03}")).collect();
    layout.image("tags/many", &tags)?;
    let v2 = root.path().join("docker/registry/v2/repositories");
    let dir = v2.join("tags/many/_manifests/tags");
    // Two tags older than the policy keeps.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400);
    for t in ["t150", "t151"] {
        std::fs::File::options()
            .write(true)
            .open(dir.join(t).join("current/link"))?
            .set_modified(old)?;
    }
    settle(&dir)?;
    let policy = root.path().join("retention.toml");
    std::fs::write(
        &policy,
        "[[retention]]\nrepositories = [\"tags/**\"]\nkeep_days = 7\n",
    )?;
    let conf = root.path().join("storage.toml");
    std::fs::write(
        &conf,
        format!(
            "[gc]\ngrace_seconds = 0\nfence_seconds = 0.2\nretention_policy = \"{}\"\n",
            policy.display()
        ),
    )?;
    let node = StorageServer::start_with(
        root.path(),
        StorageOptions {
            config: Some(conf),
            ..Default::default()
        },
    )?;
    let c = Client::new(&node.base);
    let page = |last: &'static str| {
        let c = &c;
        async move {
            let path = format!("/v2/tags/many/tags/list?n=3&last={last}");
            Ok::<_, anyhow::Error>(list_page(c, &path, "tags").await?.0)
        }
    };
    // Twice: the second page comes from the kept listing, the tags marked by the first.
    for _ in 0..2 {
        ensure!(page("t149").await? == ["t150", "t151", "t152"]);
    }

    let report: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/gc", node.base))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        report["retention"].as_array().map(Vec::len) == Some(2),
        "{report:#}"
    );
    let got = page("t149").await?;
    ensure!(got == ["t152", "t153", "t154"], "after retention: {got:?}");
    // Kept again (settled), and a tombstoned tag pushed again: listed.
    settle(&dir)?;
    ensure!(page("t149").await? == ["t152", "t153", "t154"]);
    c.push_image("tags/many", "t150", &[b"t150 again"]).await?;
    for _ in 0..2 {
        let got = page("t149").await?;
        ensure!(got == ["t150", "t152", "t153"], "pushed again: {got:?}");
    }
    Ok(())
}
