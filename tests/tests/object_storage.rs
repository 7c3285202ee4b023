//! The storage service on an S3-compatible store (a real `moto_server`): the base-URL protocol
//! suite, uploads continued by another node on the same bucket with chunks of every size, and
//! a failed digest check that leaves nothing behind. `cargo test --release --test
//! object_storage` runs exactly these.

use portcullis_tests::client::{Client, sha256};
use portcullis_tests::moto::Moto;
use portcullis_tests::protocol;
use portcullis_tests::server::StorageServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protocol_suite_passes_against_storage_backend_on_s3() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = moto.storage_node(dir.path(), "suite", "registry").unwrap();
    protocol::assert_all_pass(&Client::new(&node.base), "suite", "on S3").await;
    // Distribution's layout under the prefix.
    let keys = moto.keys("suite", "registry/docker/registry/v2/").unwrap();
    assert!(
        keys.iter().any(|k| k.contains("/blobs/sha256/")),
        "{keys:?}"
    );
    assert!(
        moto.keys("suite", "docker/").unwrap().is_empty(),
        "a key outside the prefix"
    );
}

/// `POST` on `node`: the upload's location.
async fn start_upload(http: &reqwest::Client, node: &StorageServer, repo: &str) -> String {
    let resp = http
        .post(format!("{}/v2/{repo}/blobs/uploads/", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    resp.headers()["location"].to_str().unwrap().to_string()
}

/// `PATCH` of `body` at `offset` of the upload at `loc` on the node at `base`.
async fn patch(
    http: &reqwest::Client,
    base: &str,
    loc: &str,
    offset: usize,
    body: &[u8],
) -> reqwest::Response {
    http.patch(format!("{base}{loc}"))
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("{offset}-{}", offset + body.len().max(1) - 1),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// `PUT ?digest=` that ends the upload at `loc` on the node at `base`.
async fn finish(http: &reqwest::Client, base: &str, loc: &str, digest: &str) -> reqwest::Response {
    let sep = if loc.contains('?') { '&' } else { '?' };
    http.put(format!("{base}{loc}{sep}digest={digest}"))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_bucket_continue_each_others_uploads() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        moto.storage_node(dir.path(), "shared", "").unwrap(),
        moto.storage_node(dir.path(), "shared", "").unwrap(),
    ];
    let http = reqwest::Client::new();
    // Chunks smaller and larger than a part (8 MiB, multipart), and one byte.
    let sizes = [1usize, 3 << 20, (9 << 20) + 17, 1, 5 << 20];
    let data: Vec<u8> = (0..sizes.iter().sum::<usize>())
        .map(|i| (i % 251) as u8)
        .collect();
    let digest = sha256(&data);
    let mut loc = start_upload(&http, &nodes[0], "team-a/app").await;
    let mut offset = 0;
    for (i, len) in sizes.iter().enumerate() {
        let node = &nodes[(i + 1) % 2];
        let part = &data[offset..offset + len];
        let resp = patch(&http, &node.base, &loc, offset, part).await;
        assert_eq!(resp.status(), 202, "PATCH {i}");
        assert_eq!(
            resp.headers()["range"].to_str().unwrap(),
            format!("0-{}", offset + len - 1)
        );
        loc = resp.headers()["location"].to_str().unwrap().to_string();
        offset += len;
    }
    // A chunk at a stale offset is refused on either node, and changes nothing.
    let resp = patch(&http, &nodes[0].base, &loc, 0, &[0u8]).await;
    assert_eq!(resp.status(), 416);
    let resp = finish(&http, &nodes[0].base, &loc, &digest.to_string()).await;
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    for n in &nodes {
        let body = http
            .get(format!("{}/v2/team-a/app/blobs/{digest}", n.base))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(body == data, "the blob from {}", n.base);
        // A range read streams from the middle of the object.
        let resp = http
            .get(format!("{}/v2/team-a/app/blobs/{digest}", n.base))
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        assert!(resp.bytes().await.unwrap() == data[1000..2000]);
    }
    // The session's objects are gone; no multipart upload was left open.
    let keys = moto
        .keys(
            "shared",
            "docker/registry/v2/repositories/team-a/app/_uploads/",
        )
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(moto.open_multipart_uploads("shared").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_digest_check_leaves_nothing_under_the_digest() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = moto.storage_node(dir.path(), "checked", "").unwrap();
    let http = reqwest::Client::new();
    let data = vec![7u8; (10 << 20) + 3];
    let wrong = sha256(b"something else");
    let loc = start_upload(&http, &node, "team-a/app").await;
    let resp = patch(&http, &node.base, &loc, 0, &data).await;
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let resp = finish(&http, &node.base, &loc, &wrong.to_string()).await;
    assert_eq!(resp.status(), 400);
    let body = resp.text().await.unwrap();
    assert!(body.contains("DIGEST_INVALID"), "{body}");
    let hex = wrong.to_string();
    let hex = hex.trim_start_matches("sha256:");
    let keys = moto.keys("checked", "").unwrap();
    assert!(!keys.iter().any(|k| k.contains(hex)), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("/_uploads/")), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.contains("/blobs/")),
        "no blob at all: {keys:?}"
    );
    assert_eq!(moto.open_multipart_uploads("checked").unwrap(), 0);
    let resp = http
        .head(format!("{}/v2/team-a/app/blobs/{wrong}", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// A monolithic blob upload (`POST ?digest=`) on `node`.
async fn put_blob(http: &reqwest::Client, node: &StorageServer, repo: &str, data: &[u8]) -> String {
    let digest = sha256(data).to_string();
    let resp = http
        .post(format!(
            "{}/v2/{repo}/blobs/uploads/?digest={digest}",
            node.base
        ))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_16_concurrent_first_pushes_of_an_immutable_tag_exactly_one_wins() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        moto.storage_node(dir.path(), "tags", "").unwrap(),
        moto.storage_node(dir.path(), "tags", "").unwrap(),
    ];
    let http = reqwest::Client::new();
    let config = put_blob(&http, &nodes[0], "team-a/app", b"{}").await;
    let mut pushes = tokio::task::JoinSet::new();
    for i in 0..16 {
        let layer = put_blob(
            &http,
            &nodes[i % 2],
            "team-a/app",
            format!("layer {i}").as_bytes(),
        )
        .await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                        "size": format!("layer {i}").len()}],
        })
        .to_string();
        let (http, base) = (http.clone(), nodes[i % 2].base.clone());
        pushes.spawn(async move {
            let resp = http
                .put(format!("{base}/v2/team-a/app/manifests/v1.0.0"))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .header("if-none-match", "*")
                .body(manifest.clone())
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), manifest)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = pushes.join_next().await {
        let (status, manifest) = r.unwrap();
        match status {
            201 => winners.push(manifest),
            412 => {}
            other => panic!("a push answered {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one creator");
    for n in &nodes {
        let got = http
            .get(format!("{}/v2/team-a/app/manifests/v1.0.0", n.base))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            got, winners[0],
            "the tag names the winner's manifest on {}",
            n.base
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_going_away_gives_503s_and_not_ready_and_a_retried_upload_succeeds() {
    let mut moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = moto.storage_node(dir.path(), "faults", "").unwrap();
    // A new connection per request: a refused chunk's body is not read, so the service
    // closes that connection.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let data: Vec<u8> = (0..(2 << 20)).map(|i| (i % 253) as u8).collect();
    let loc = start_upload(&http, &node, "team-a/app").await;
    let chunk = |loc: String, from: usize, to: usize| {
        let (http, base, body) = (http.clone(), node.base.clone(), data[from..to].to_vec());
        async move { patch(&http, &base, &loc, from, &body).await }
    };
    let resp = chunk(loc, 0, 1 << 20).await;
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();

    // The store stops mid-upload: the next chunk is a clear 503, readiness says so.
    moto.stop();
    let resp = chunk(loc.clone(), 1 << 20, 2 << 20).await;
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    assert!(body.contains("unavailable"), "{body}");
    let ready = http
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let resp = http
        .get(format!("{}/v2/team-a/app/tags/list", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);

    // Back (moto keeps nothing: an empty bucket): ready again; the old session is unknown,
    // not half there; the client's retry of the whole upload succeeds.
    moto.start_again().unwrap();
    moto.create_bucket("faults").unwrap();
    let ready = http
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let resp = chunk(loc, 1 << 20, 2 << 20).await;
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("BLOB_UPLOAD_UNKNOWN"));
    let digest = sha256(&data);
    let loc = start_upload(&http, &node, "team-a/app").await;
    let resp = chunk(loc, 0, 2 << 20).await;
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let resp = finish(&http, &node.base, &loc, &digest.to_string()).await;
    assert_eq!(resp.status(), 201);
    let got = http
        .get(format!("{}/v2/team-a/app/blobs/{digest}", node.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got == data);
}

/// `n` pseudo-random bytes (xorshift; incompressible enough for a layer).
fn noise(n: usize, mut x: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

#[test]
fn skopeo_pushes_and_pulls_a_64_mib_layer_through_the_gateway_onto_two_s3_nodes()
-> anyhow::Result<()> {
    use portcullis_tests::deployment::{SECRET, start_gateway};
    use portcullis_tests::tools::{Containers, cert_dir, dir_files};
    let moto = Moto::start()?;
    let dir = tempfile::tempdir()?;
    let secret = [("PORTCULLIS_INTERNAL_SECRET", SECRET)];
    let nodes = [
        moto.storage_node_with(dir.path(), "images", "registry", &secret)?,
        moto.storage_node_with(dir.path(), "images", "registry", &secret)?,
    ];
    let g = start_gateway(
        &dir.path().join("gw"),
        &[&nodes[0], &nodes[1]],
        &[("bob", "bob-password")],
        4,
    )?;
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    ctr.login("skopeo", &certs, &g.host, "bob", "bob-password")?;

    // An image in skopeo's dir: layout, with one 64 MiB layer.
    let img = ctr.dir.path().join("img");
    std::fs::create_dir_all(&img)?;
    let layer = noise(64 << 20, 0x9e37_79b9_7f4a_7c15);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let (ld, cd) = (sha256(&layer).to_string(), sha256(config).to_string());
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    std::fs::write(img.join(hex(&ld)), &layer)?;
    std::fs::write(img.join(hex(&cd)), config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    });
    std::fs::write(img.join("manifest.json"), manifest.to_string())?;
    std::fs::write(img.join("version"), "Directory Transport Version: 1.1\n")?;

    let reference = format!("docker://{}/team-a/big:v1", g.host);
    let dir_ref = |p: &std::path::Path| format!("dir:{}", p.display());
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-cert-dir",
            &certs,
            &dir_ref(&img),
            &reference,
        ],
    )?;
    let back = ctr.dir.path().join("back");
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--src-cert-dir",
            &certs,
            &reference,
            &dir_ref(&back),
        ],
    )?;
    let (sent, got) = (dir_files(&img)?, dir_files(&back)?);
    anyhow::ensure!(
        got.get(&hex(&ld)) == Some(&layer),
        "the layer came back different"
    );
    anyhow::ensure!(
        got.get("manifest.json") == sent.get("manifest.json"),
        "the manifest differs"
    );
    // Stored once, under the prefix, in distribution's layout; no upload left open.
    let key = format!(
        "registry/docker/registry/v2/blobs/sha256/{}/{}/data",
        &hex(&ld)[..2],
        hex(&ld)
    );
    let keys = moto.keys("images", &key)?;
    anyhow::ensure!(keys == [key.clone()], "{keys:?}");
    anyhow::ensure!(
        moto.open_multipart_uploads("images")? == 0,
        "an open multipart upload"
    );
    Ok(())
}
