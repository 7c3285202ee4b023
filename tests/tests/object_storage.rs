//! The storage service on an S3-compatible store (a real `moto_server`): the driver contract
//! on the filesystem, the in-memory store and S3; the base-URL protocol suite on S3 directly
//! and through the gateway; uploads continued by another node on the same bucket with chunks
//! of every size; a failed digest check that leaves nothing behind; racing pushes of
//! immutable and mutable tags; the store going away; skopeo with a 64 MiB layer; catalog and
//! tag pages on S3 the same as on the filesystem for one layout.
//! `cargo test --release --test object_storage` runs exactly these.

use portcullis_tests::azurite::Azurite;
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

/// 16 different manifests of `repo` pushed at once to `tag`, over `nodes` in turn (with
/// `If-None-Match: *` when `create_only`): each push's status, manifest and the digest its
/// response says the tag named before.
async fn racing_pushes(
    http: &reqwest::Client,
    nodes: &[&StorageServer],
    repo: &str,
    tag: &str,
    create_only: bool,
) -> Vec<(u16, String, Option<String>)> {
    let config = put_blob(http, nodes[0], repo, b"{}").await;
    let mut pushes = tokio::task::JoinSet::new();
    for i in 0..16 {
        let content = format!("{tag} layer {i}");
        let layer = put_blob(http, nodes[i % nodes.len()], repo, content.as_bytes()).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                        "size": content.len()}],
        })
        .to_string();
        let mut req = http
            .put(format!(
                "{}/v2/{repo}/manifests/{tag}",
                nodes[i % nodes.len()].base
            ))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone());
        if create_only {
            req = req.header("if-none-match", "*");
        }
        pushes.spawn(async move {
            let resp = req.send().await.unwrap();
            let previous = resp
                .headers()
                .get(service::hop::PREVIOUS_DIGEST_HEADER)
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), manifest, previous)
        });
    }
    pushes.join_all().await
}

async fn tag_content(
    http: &reqwest::Client,
    node: &StorageServer,
    repo: &str,
    tag: &str,
) -> String {
    http.get(format!("{}/v2/{repo}/manifests/{tag}", node.base))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
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
    let mut winners = Vec::new();
    for (status, manifest, _) in
        racing_pushes(&http, &[&nodes[0], &nodes[1]], "team-a/app", "v1.0.0", true).await
    {
        match status {
            201 => winners.push(manifest),
            412 => {}
            other => panic!("a push answered {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one creator");
    for n in &nodes {
        assert_eq!(
            tag_content(&http, n, "team-a/app", "v1.0.0").await,
            winners[0],
            "the tag names the winner's manifest on {}",
            n.base
        );
    }
}

/// Racing overwrites of a mutable tag on `nodes`: every push lands, and each reports as the
/// tag's previous manifest a different one — the pushes form one chain from the first
/// manifest to the last, none lost or replaced twice.
async fn overwrites_form_one_chain(nodes: &[&StorageServer], where_: &str) {
    let http = reqwest::Client::new();
    let first = racing_pushes(&http, &nodes[..1], "team-a/web", "seed", true).await;
    let seed = first.iter().find(|p| p.0 == 201).unwrap().1.clone();
    let seed_digest = sha256(seed.as_bytes()).to_string();
    let put = http
        .put(format!("{}/v2/team-a/web/manifests/latest", nodes[0].base))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(seed)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{where_}");
    let pushes = racing_pushes(&http, nodes, "team-a/web", "latest", false).await;
    let mut replaced = Vec::new();
    let mut pushed = vec![seed_digest];
    for (status, manifest, previous) in pushes {
        assert_eq!(status, 201, "{where_}: every overwrite lands");
        replaced.push(previous.expect("an overwrite names what it replaced"));
        pushed.push(sha256(manifest.as_bytes()).to_string());
    }
    let last = tag_content(&http, nodes[0], "team-a/web", "latest").await;
    replaced.push(sha256(last.as_bytes()).to_string());
    replaced.sort();
    pushed.sort();
    assert_eq!(replaced, pushed, "{where_}: one chain of overwrites");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_overwrites_of_a_mutable_tag_form_one_chain_on_s3_and_the_filesystem() {
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s3 = [
        moto.storage_node(dir.path(), "mutable", "").unwrap(),
        moto.storage_node(dir.path(), "mutable", "").unwrap(),
    ];
    overwrites_form_one_chain(&[&s3[0], &s3[1]], "on S3").await;
    let root = dir.path().join("fs");
    let fs = [
        StorageServer::start(&root).unwrap(),
        StorageServer::start(&root).unwrap(),
    ];
    overwrites_form_one_chain(&[&fs[0], &fs[1]], "on the filesystem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_driver_contract_holds_on_the_filesystem_in_memory_on_s3_and_on_azure() {
    use portcullis_tests::driver_contract::check;
    use std::sync::Arc;
    use storage_backend::driver::{fs::FsDriver, object::ObjectDriver};
    let dir = tempfile::tempdir().unwrap();
    check(
        "filesystem",
        Arc::new(FsDriver::new(dir.path())),
        "contract",
    )
    .await;
    let memory = Arc::new(object_store::memory::InMemory::new());
    check(
        "in-memory",
        Arc::new(ObjectDriver::with_store(memory, "p")),
        "contract",
    )
    .await;
    let moto = Moto::start().unwrap();
    let s3 = moto.driver(dir.path(), "contract", "p").unwrap();
    check("s3", Arc::new(s3), "contract").await;
    assert!(
        moto.keys("contract", "").unwrap().is_empty(),
        "the contract run left objects in the bucket"
    );
    let azurite = Azurite::start().unwrap();
    let azure = azurite.driver(dir.path(), "contract", "p").unwrap();
    check("azure", Arc::new(azure), "contract").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_azure_blob_storage_the_protocol_suite_passes_and_tag_overwrites_form_one_chain() {
    let azurite = Azurite::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        azurite.storage_node(dir.path(), "registry", "p").unwrap(),
        azurite.storage_node(dir.path(), "registry", "p").unwrap(),
    ];
    protocol::assert_all_pass(&Client::new(&nodes[0].base), "suite", "on Azure").await;
    overwrites_form_one_chain(&[&nodes[0], &nodes[1]], "on Azure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protocol_suite_passes_through_the_gateway_on_s3() {
    use portcullis_tests::client::TokenAuth;
    use portcullis_tests::deployment::{SECRET, start_gateway};
    let moto = Moto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = [("PORTCULLIS_INTERNAL_SECRET", SECRET)];
    let nodes = [
        moto.storage_node_with(dir.path(), "gateway-suite", "registry", &secret)
            .unwrap(),
        moto.storage_node_with(dir.path(), "gateway-suite", "registry", &secret)
            .unwrap(),
    ];
    let g = start_gateway(
        &dir.path().join("gw"),
        &[&nodes[0], &nodes[1]],
        &[("alice", "alice-password")],
        4,
    )
    .unwrap();
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        portcullis_tests::deployment::SERVICE,
        Some(("alice", "alice-password")),
    ));
    protocol::assert_all_pass(&c, "gw", "through the gateway on S3").await;
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

/// One registry:2 root served twice: from its directory, and as objects copied into a
/// bucket under a node's prefix.
struct BothWays {
    on_s3: Client,
    on_fs: Client,
    moto: Moto,
    _servers: (tempfile::TempDir, StorageServer, StorageServer),
}

impl BothWays {
    async fn serve(root: &std::path::Path) -> Self {
        let moto = Moto::start().unwrap();
        moto.put_tree("layout", "pfx", root).await.unwrap();
        let conf = tempfile::tempdir().unwrap();
        let s3 = moto.storage_node(conf.path(), "layout", "pfx").unwrap();
        let fs = StorageServer::start(root).unwrap();
        BothWays {
            on_s3: Client::new(&s3.base),
            on_fs: Client::new(&fs.base),
            moto,
            _servers: (conf, s3, fs),
        }
    }

    /// The page of `list` (`/v2/_catalog` or a tag list) after `last`, `n` at most, from
    /// S3 and from the filesystem: the same.
    async fn same_page(&self, list: &str, field: &str, n: usize, last: Option<&str>) {
        let path = match last {
            None => format!("{list}?n={n}"),
            Some(l) => format!("{list}?n={n}&last={l}"),
        };
        let s3_page = page_of(&self.on_s3, &path, field).await;
        let fs_page = page_of(&self.on_fs, &path, field).await;
        assert_eq!(s3_page, fs_page, "{path}");
    }
}

/// The items and next link of one listing page.
async fn page_of(c: &Client, path: &str, field: &str) -> (Vec<String>, bool) {
    portcullis_tests::client::list_page(c, path, field)
        .await
        .unwrap()
}

#[tokio::test]
async fn catalog_and_tag_pages_on_s3_are_those_of_the_same_layout_on_the_filesystem() {
    let root = tempfile::tempdir().unwrap();
    let layout = portcullis_tests::layout::Layout::new(root.path()).unwrap();
    let v1 = ["v1".to_string()];
    let mut names: Vec<String> = [
        "a", "a/b", "a/b/c", "a/b-c", "a-b", "a.b", "a0", "b/a", "b/a/b", "team/app", "z",
    ]
    .map(String::from)
    .to_vec();
    names.extend((0..20).map(|i| format!("wide/r{i:02}")));
    for name in &names {
        layout.image(name, &v1).unwrap();
    }
    layout.blobs_only("blobs/only").unwrap();
    let tags: Vec<String> = ["1.0", "1.0-rc", "10", "2", "latest", "v1", "v1.0", "v1_0"]
        .map(String::from)
        .to_vec();
    layout.image("tags/many", &tags).unwrap();

    let both = BothWays::serve(root.path()).await;
    let on_s3 = &both.on_s3;

    let mut lasts: Vec<Option<String>> = vec![None];
    lasts.extend(names.iter().map(|n| Some(n.clone())));
    lasts.extend(["0", "a/", "a.", "b", "wide/r1", "~"].map(|s| Some(s.to_string())));
    for n in [1, 2, 5, 100] {
        for last in &lasts {
            both.same_page("/v2/_catalog", "repositories", n, last.as_deref())
                .await;
        }
        for last in [None, Some("1.0"), Some("2"), Some("v1.0"), Some("~")] {
            both.same_page("/v2/tags/many/tags/list", "tags", n, last)
                .await;
        }
    }
    let (all, _) = page_of(on_s3, "/v2/_catalog?n=1000", "repositories").await;
    assert_eq!(all.len(), names.len() + 2, "{all:?}");
    assert!(all.contains(&"blobs/only".to_string()), "{all:?}");
}

/// On S3 a tag page lists from `last` on (one request of 1 000 keys), not the whole
/// repository; where a listing request ends between `b-1/` and `b/` (keys sort `-` and `.`
/// before `/`), the names it has not reached but which sort before the ones it has (`b`) are
/// still found. Every page is the filesystem's.
#[tokio::test]
async fn tag_pages_on_s3_list_from_last_and_keep_name_order_across_listing_requests() {
    let root = tempfile::tempdir().unwrap();
    let layout = portcullis_tests::layout::Layout::new(root.path()).unwrap();
    // 999 tags, then names whose keys sort out of their names' order, at the end of the
    // first listing request and in the second.
    let mut tags: Vec<String> = (0..999).map(|i| format!("a{i:04}")).collect();
    tags.extend(
        [
            "b", "b-1", "b.1", "b.1-x", "b.1.2", "b0", "c.d-e.f", "c.d", "c",
        ]
        .map(String::from),
    );
    layout.image("tags/many", &tags).unwrap();
    let both = BothWays::serve(root.path()).await;
    let on_s3 = &both.on_s3;

    let (all, more) = page_of(on_s3, "/v2/tags/many/tags/list", "tags").await;
    let mut sorted = tags.clone();
    sorted.sort();
    assert_eq!(all, sorted, "every tag, in name order");
    assert!(!more);
    for (n, last) in [
        (3, Some("a0997")),
        (2, Some("b")),
        (2, Some("b-1")),
        (3, Some("b.1")),
        (1, Some("b0")),
        (2, Some("c")),
        (1000, None),
        (1000, Some("a0001")),
        (5, Some("a0995")),
    ] {
        both.same_page("/v2/tags/many/tags/list", "tags", n, last)
            .await;
    }
}

/// On S3 a catalog page lists each directory on its way from the entry `last` lies under
/// (`start-after`), 1 000 keys a request, and lists on where a request stopped: across such a
/// stop, in a directory of more than 1 000 repositories, pages are the filesystem's.
#[tokio::test]
async fn catalog_pages_on_s3_list_directories_from_last_across_listing_requests() {
    let root = tempfile::tempdir().unwrap();
    let layout = portcullis_tests::layout::Layout::new(root.path()).unwrap();
    let v1 = ["v1".to_string()];
    // 999 repositories, then `wide/s-1`: the first request of `wide/` stops at `s-1/`, before
    // `s.1/` and `s/` (keys sort `-` and `.` before `/`), which sort around it by name.
    let mut names: Vec<String> = (0..999).map(|i| format!("wide/r{i:04}")).collect();
    names.extend(["wide/s-1", "wide/s.1", "wide/s", "wide/s/x", "a", "z"].map(String::from));
    for name in &names {
        layout.image(name, &v1).unwrap();
    }
    let both = BothWays::serve(root.path()).await;
    let on_s3 = &both.on_s3;

    let (all, more) = page_of(on_s3, "/v2/_catalog", "repositories").await;
    assert!(!more);
    let mut expected = names.clone();
    expected.sort_by_key(|n| n.replace('/', "\0"));
    assert_eq!(all, expected, "every repository, in the catalog's order");
    for (n, last) in [
        (1000, None),
        (3, Some("wide/r0997")),
        (3, Some("wide/r0998")),
        (2, Some("wide/s")),
        (2, Some("wide/s/x")),
        (2, Some("wide/s-1")),
        (5, Some("wide/r0500/deeper")),
        (2, Some("wide/s/_layers")),
        (3, Some("..")),
        (3, Some("wide/../a")),
        (3, Some("wide/r0500~x")),
        (3, Some("wide/~")),
        (1000, Some("a")),
    ] {
        both.same_page("/v2/_catalog", "repositories", n, last)
            .await;
    }

    // Repositories created and deleted in the bucket while a client pages.
    use futures_util::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let page = |last: &'static str| async move {
        let path = format!("/v2/_catalog?n=2&last={last}");
        page_of(on_s3, &path, "repositories").await.0
    };
    assert_eq!(page("wide/r0997").await, ["wide/r0998", "wide/s"]);
    on_s3
        .push_image("wide/r0997a", "v1", &[b"a new repository"])
        .await
        .unwrap();
    let store = both.moto.object_store("layout").unwrap();
    let gone = object_store::path::Path::from("pfx/docker/registry/v2/repositories/wide/r0998");
    let keys: Vec<_> = store
        .list(Some(&gone))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        store.delete(&k).await.unwrap();
    }
    assert_eq!(page("wide/r0997").await, ["wide/r0997a", "wide/s"]);
    assert_eq!(page("wide/r0997a").await, ["wide/s", "wide/s/x"]);
}
