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
    let failures = protocol::run_all(&Client::new(&node.base), "suite").await;
    assert!(
        failures.is_empty(),
        "{} of {} protocol cases failed:\n{}",
        failures.len(),
        protocol::cases().len(),
        failures
            .iter()
            .map(|(n, e)| format!("- {n}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
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
        let resp = http
            .patch(format!("{}{loc}", node.base))
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{offset}-{}", offset + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "PATCH {i}");
        assert_eq!(
            resp.headers()["range"].to_str().unwrap(),
            format!("0-{}", offset + len - 1)
        );
        loc = resp.headers()["location"].to_str().unwrap().to_string();
        offset += len;
    }
    // A chunk at a stale offset is refused on either node, and changes nothing.
    let resp = http
        .patch(format!("{}{loc}", nodes[0].base))
        .header("content-type", "application/octet-stream")
        .header("content-range", "0-0")
        .body(vec![0u8])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{}{loc}{sep}digest={digest}", nodes[0].base))
        .send()
        .await
        .unwrap();
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
    let resp = http
        .patch(format!("{}{loc}", node.base))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = http
        .put(format!("{}{loc}{sep}digest={wrong}", node.base))
        .send()
        .await
        .unwrap();
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
