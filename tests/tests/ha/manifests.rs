//! Manifests answered from a gateway's memory stay read-after-write consistent across
//! gateways sharing Redis: a tag moved through one gateway is served at its new digest by the
//! other on the very next `GET`, and a manifest deleted through one is 404 on the other.

use crate::ALICE;
use crate::replicas::Replicas;
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, image_config, sha256};
use portcullis_tests::deployment::user_client;
use portcullis_tests::redis::Redis;
use portcullis_tests::server::{GatewayServer, metric_sample, metrics_text};

const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// Pushes an image of its own as `repo:tag`: its digest.
async fn push(c: &Client, repo: &str, tag: &str, label: &str) -> String {
    let body = c
        .image_manifest(repo, &image_config(label), &[label.as_bytes()], None)
        .await
        .unwrap();
    let r = c
        .put_manifest(repo, tag, OCI_MANIFEST, &body)
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", describe(r).await);
    sha256(&body).to_string()
}

/// The digest of what `GET repo:reference` answers (checked against the body and its
/// `Docker-Content-Digest`); `None` for a 404.
async fn get(c: &Client, repo: &str, reference: &str) -> Option<String> {
    let r = c
        .req(
            reqwest::Method::GET,
            &format!("/v2/{repo}/manifests/{reference}"),
        )
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    assert_eq!(r.status(), 200);
    let header = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let digest = sha256(&r.bytes().await.unwrap()).to_string();
    assert_eq!(header.as_deref(), Some(digest.as_str()));
    Some(digest)
}

/// Manifest reads a gateway answered from its memory.
async fn from_memory(g: &GatewayServer) -> f64 {
    let text = metrics_text(&g.admin).await.unwrap();
    metric_sample(&text, "gateway_manifest_reads_total{result=\"memory\"}").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_moved_or_a_manifest_deleted_through_one_gateway_is_read_so_on_the_other() {
    let r = Replicas::start(2, Redis::start().unwrap(), "");
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    let (ca, cb) = (
        user_client(a, ALICE.0, ALICE.1),
        user_client(b, ALICE.0, ALICE.1),
    );
    let repo = "team-a/app";
    let first = push(&ca, repo, "v1", "first").await;
    // B reads it from storage, then from its memory.
    for _ in 0..3 {
        assert_eq!(get(&cb, repo, "v1").await.as_deref(), Some(first.as_str()));
        assert_eq!(
            get(&cb, repo, &first).await.as_deref(),
            Some(first.as_str())
        );
    }
    let kept = from_memory(b).await;
    assert!(kept >= 4.0, "B answered {kept} reads from memory");

    // The tag moves through A: B's very next GET has the new manifest.
    let second = push(&ca, repo, "v1", "second").await;
    assert_eq!(get(&cb, repo, "v1").await.as_deref(), Some(second.as_str()));
    assert_eq!(get(&cb, repo, "v1").await.as_deref(), Some(second.as_str()));

    // The manifest is deleted through A: 404 on B, by digest and by its tag.
    assert_eq!(
        get(&cb, repo, &second).await.as_deref(),
        Some(second.as_str())
    );
    ca.delete_manifest(repo, &second).await.unwrap();
    assert_eq!(get(&cb, repo, &second).await, None);
    assert_eq!(get(&cb, repo, "v1").await, None);
    // The first, untouched by digest, is still read.
    assert_eq!(
        get(&cb, repo, &first).await.as_deref(),
        Some(first.as_str())
    );
    // A tag deleted through A: 404 on B.
    push(&ca, repo, "v2", "third").await;
    assert!(get(&cb, repo, "v2").await.is_some());
    assert!(get(&cb, repo, "v2").await.is_some());
    ca.delete_manifest(repo, "v2").await.unwrap();
    assert_eq!(get(&cb, repo, "v2").await, None);
}
