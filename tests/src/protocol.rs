//! The protocol suite: every endpoint and error code of the OCI Distribution Spec v1.1,
//! driven only by a base URL (and a [`Client`]), so the same cases run against
//! storage-backend directly and through the gateway.
//!
//! Each case works in its own repositories (`<prefix>/...`), so cases can share a server.

use crate::client::{
    Client, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, describe, error_code,
    expect_error, location, sha256, with_query,
};
use anyhow::{Context, ensure};
use futures_util::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// One case: a name and the function that runs it with a client and a unique repo prefix.
pub type Case = (
    &'static str,
    fn(Client, String) -> BoxFuture<'static, anyhow::Result<()>>,
);

macro_rules! cases {
    ($($f:ident),* $(,)?) => {
        vec![$((stringify!($f), (|c, p| Box::pin($f(c, p))) as fn(Client, String) -> BoxFuture<'static, anyhow::Result<()>>)),*]
    };
}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    cases![
        base_endpoint_answers_with_api_version,
        monolithic_push_then_head_and_get,
        post_then_put_with_the_whole_body,
        chunked_push_keeps_one_location,
        streamed_patch_without_content_range,
        out_of_order_and_overlapping_chunks_are_416_and_store_nothing,
        wrong_digest_is_rejected_and_nothing_is_stored,
        unsupported_digest_algorithm_is_rejected,
        truncated_bodies_store_nothing,
        content_length_and_range_mismatch_is_rejected,
        cancelled_and_unknown_uploads_are_upload_unknown,
        cross_repository_mount,
        blob_ranges,
        manifests_of_every_type_round_trip_exactly,
        manifest_referencing_unknown_content_is_rejected,
        invalid_manifests_are_rejected,
        oversized_manifest_is_413,
        manifest_put_by_wrong_digest_is_rejected,
        if_none_match_creates_a_tag_only_once,
        tags_list_pagination,
        catalog_pagination,
        referrers_and_subject,
        deletes_of_tag_manifest_and_blob,
        invalid_names_and_tags,
        unknown_content_is_404,
        unsupported_methods_are_405,
        accept_header_is_honoured_for_tags,
        concurrent_pushes_of_one_blob_and_one_tag,
    ]
}

/// Runs every case against `client`; returns the names and errors of the failures.
pub async fn run_all(client: &Client, prefix: &str) -> Vec<(String, String)> {
    let mut failures = Vec::new();
    for (name, case) in cases() {
        let repo_prefix = format!("{prefix}/{}", name.replace('_', "-"));
        if let Err(e) = case(client.clone(), repo_prefix).await {
            failures.push((name.to_string(), format!("{e:#}")));
        }
    }
    failures
}

/// Runs every case against `client` (`where_` names the setup in the message) and fails with
/// the list of failures, if any.
pub async fn assert_all_pass(client: &Client, prefix: &str, where_: &str) {
    let failures = run_all(client, prefix).await;
    assert!(
        failures.is_empty(),
        "{} of {} protocol cases failed {where_}:\n{}",
        failures.len(),
        cases().len(),
        failures
            .iter()
            .map(|(n, e)| format!("- {n}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn base_endpoint_answers_with_api_version(c: Client, _p: String) -> anyhow::Result<()> {
    let r = c.get("/v2/").await?;
    ensure!(r.status() == 200, "GET /v2/: {}", r.status());
    ensure!(header(&r, "docker-distribution-api-version").as_deref() == Some("registry/2.0"));
    Ok(())
}

async fn monolithic_push_then_head_and_get(c: Client, p: String) -> anyhow::Result<()> {
    let data = b"monolithic blob content".to_vec();
    let d = sha256(&data);
    let r = c
        .req(Method::POST, &format!("/v2/{p}/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    ensure!(header(&r, "location").is_some_and(|l| l.ends_with(&format!("/v2/{p}/blobs/{d}"))));
    ensure!(header(&r, "docker-content-digest") == Some(d.to_string()));
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    ensure!(header(&r, "content-length") == Some(data.len().to_string()));
    ensure!(header(&r, "docker-content-digest") == Some(d.to_string()));
    let r = c.get(&format!("/v2/{p}/blobs/{d}")).await?;
    ensure!(r.status() == 200);
    ensure!(header(&r, "accept-ranges").as_deref() == Some("bytes"));
    ensure!(r.bytes().await? == data);
    Ok(())
}

async fn post_then_put_with_the_whole_body(c: Client, p: String) -> anyhow::Result<()> {
    let data = vec![7u8; 100_000];
    let d = sha256(&data);
    let loc = c.start_upload(&p).await?;
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    ensure!(c.get(&format!("/v2/{p}/blobs/{d}")).await?.bytes().await? == data);
    Ok(())
}

async fn chunked_push_keeps_one_location(c: Client, p: String) -> anyhow::Result<()> {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = sha256(&data);
    let loc = c.start_upload(&p).await?;
    let mut offset = 0usize;
    for part in data.chunks(70_000) {
        let r = c
            .req(Method::PATCH, &loc)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{}-{}", offset, offset + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .await?;
        ensure!(r.status() == 202, "{}", describe(r).await);
        ensure!(location(&r)? == loc, "Location changed between chunks");
        offset += part.len();
        ensure!(header(&r, "range") == Some(format!("0-{}", offset - 1)));
        ensure!(header(&r, "docker-upload-uuid").is_some());
        let s = c.get(&loc).await?;
        ensure!(s.status() == 204, "status: {}", s.status());
        ensure!(header(&s, "range") == Some(format!("0-{}", offset - 1)));
    }
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    ensure!(header(&r, "docker-content-digest") == Some(d.to_string()));
    ensure!(c.get(&format!("/v2/{p}/blobs/{d}")).await?.bytes().await? == data);
    Ok(())
}

async fn streamed_patch_without_content_range(c: Client, p: String) -> anyhow::Result<()> {
    let parts: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 10_000]).collect();
    let all: Vec<u8> = parts.concat();
    let d = sha256(&all);
    let loc = c.start_upload(&p).await?;
    let stream = futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    let r = c
        .req(Method::PATCH, &loc)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    ensure!(r.status() == 202, "{}", describe(r).await);
    ensure!(header(&r, "range") == Some(format!("0-{}", all.len() - 1)));
    let r = c
        .req(
            Method::PUT,
            &with_query(&location(&r)?, &format!("digest={d}")),
        )
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    Ok(())
}

async fn patch(
    c: &Client,
    loc: &str,
    range: &str,
    body: &[u8],
) -> anyhow::Result<reqwest::Response> {
    Ok(c.req(Method::PATCH, loc)
        .header("content-type", "application/octet-stream")
        .header("content-range", range)
        .body(body.to_vec())
        .send()
        .await?)
}

async fn out_of_order_and_overlapping_chunks_are_416_and_store_nothing(
    c: Client,
    p: String,
) -> anyhow::Result<()> {
    let loc = c.start_upload(&p).await?;
    let r = patch(&c, &loc, "0-9", b"0123456789").await?;
    ensure!(r.status() == 202);
    for (range, body) in [
        ("20-29", b"abcdefghij"),
        ("5-14", b"abcdefghij"),
        ("0-9", b"abcdefghij"),
    ] {
        let r = patch(&c, &loc, range, body).await?;
        ensure!(r.status() == 416, "{range}: {}", r.status());
        ensure!(
            header(&r, "range").as_deref() == Some("0-9"),
            "{range}: Range {:?}",
            header(&r, "range")
        );
        ensure!(location(&r)? == loc);
    }
    let r = patch(&c, &loc, "9-3", b"x").await?;
    ensure!(r.status() == 416, "reversed range: {}", r.status());
    let s = c.get(&loc).await?;
    ensure!(
        header(&s, "range").as_deref() == Some("0-9"),
        "upload moved: {:?}",
        header(&s, "range")
    );
    // The session is still usable.
    let r = patch(&c, &loc, "10-14", b"abcde").await?;
    ensure!(r.status() == 202);
    let d = sha256(b"0123456789abcde");
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    Ok(())
}

async fn wrong_digest_is_rejected_and_nothing_is_stored(
    c: Client,
    p: String,
) -> anyhow::Result<()> {
    let claimed = sha256(b"what the client claims");
    let r = c
        .req(
            Method::POST,
            &format!("/v2/{p}/blobs/uploads/?digest={claimed}"),
        )
        .body(b"something else".to_vec())
        .send()
        .await?;
    expect_error(r, 400, "DIGEST_INVALID").await?;
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{claimed}"))
        .send()
        .await?;
    ensure!(r.status() == 404);
    let loc = c.start_upload(&p).await?;
    ensure!(patch(&c, &loc, "0-4", b"hello").await?.status() == 202);
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={claimed}")))
        .send()
        .await?;
    expect_error(r, 400, "DIGEST_INVALID").await?;
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{claimed}"))
        .send()
        .await?;
    ensure!(r.status() == 404);
    let actual = sha256(b"hello");
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{actual}"))
        .send()
        .await?;
    ensure!(
        r.status() == 404,
        "content was stored under its real digest"
    );
    // A PUT without a digest, and one with a malformed digest.
    let loc = c.start_upload(&p).await?;
    expect_error(
        c.req(Method::PUT, &loc).send().await?,
        400,
        "DIGEST_INVALID",
    )
    .await?;
    let r = c
        .req(Method::PUT, &with_query(&loc, "digest=sha256:abc"))
        .send()
        .await?;
    expect_error(r, 400, "DIGEST_INVALID").await?;
    Ok(())
}

async fn unsupported_digest_algorithm_is_rejected(c: Client, p: String) -> anyhow::Result<()> {
    let r = c
        .req(
            Method::POST,
            &format!("/v2/{p}/blobs/uploads/?digest=md5:d41d8cd98f00b204e9800998ecf8427e"),
        )
        .body(Vec::new())
        .send()
        .await?;
    expect_error(r, 400, "DIGEST_INVALID").await?;
    let r = c
        .get(&format!(
            "/v2/{p}/blobs/sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709"
        ))
        .await?;
    expect_error(r, 400, "DIGEST_INVALID").await?;
    // sha512 is supported end to end.
    let data = b"sha512 content".to_vec();
    let d = oci::Digest::of(oci::Algorithm::Sha512, &data);
    let r = c
        .req(Method::POST, &format!("/v2/{p}/blobs/uploads/?digest={d}"))
        .body(data.clone())
        .send()
        .await?;
    ensure!(r.status() == 201, "sha512: {}", describe(r).await);
    ensure!(c.get(&format!("/v2/{p}/blobs/{d}")).await?.bytes().await? == data);
    Ok(())
}

/// A body that sends `good` bytes, then fails: the connection is cut mid-body.
fn broken_body(good: Vec<u8>) -> reqwest::Body {
    let s = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(good),
        Err(std::io::Error::other("client died")),
    ]);
    reqwest::Body::wrap_stream(s)
}

async fn truncated_bodies_store_nothing(c: Client, p: String) -> anyhow::Result<()> {
    let full = vec![5u8; 200_000];
    let d = sha256(&full);
    // Monolithic POST cut half-way.
    let _ = c
        .req(Method::POST, &format!("/v2/{p}/blobs/uploads/?digest={d}"))
        .header("content-length", full.len().to_string())
        .body(broken_body(full[..100_000].to_vec()))
        .send()
        .await;
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == 404, "truncated monolithic push stored a blob");
    // PATCH cut half-way: the session stays where it was.
    let loc = c.start_upload(&p).await?;
    ensure!(patch(&c, &loc, "0-9", &full[..10]).await?.status() == 202);
    let _ = c
        .req(Method::PATCH, &loc)
        .header("content-range", format!("10-{}", full.len() - 1))
        .header("content-length", (full.len() - 10).to_string())
        .body(broken_body(full[10..50_000].to_vec()))
        .send()
        .await;
    let s = c.get(&loc).await?;
    ensure!(
        header(&s, "range").as_deref() == Some("0-9"),
        "a cut chunk was kept: {:?}",
        header(&s, "range")
    );
    // Chunked transfer cut half-way.
    let _ = c
        .req(Method::PATCH, &loc)
        .body(broken_body(full[10..90_000].to_vec()))
        .send()
        .await;
    let s = c.get(&loc).await?;
    ensure!(
        header(&s, "range").as_deref() == Some("0-9"),
        "a cut chunk was kept: {:?}",
        header(&s, "range")
    );
    // And the session finishes normally afterwards.
    ensure!(
        patch(&c, &loc, &format!("10-{}", full.len() - 1), &full[10..])
            .await?
            .status()
            == 202
    );
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={d}")))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    Ok(())
}

async fn content_length_and_range_mismatch_is_rejected(c: Client, p: String) -> anyhow::Result<()> {
    let loc = c.start_upload(&p).await?;
    // Content-Range says 10 bytes, the body has 5.
    let r = patch(&c, &loc, "0-9", b"12345").await?;
    ensure!(
        r.status() == 400 || r.status() == 416,
        "range/length mismatch: {}",
        r.status()
    );
    let s = c.get(&loc).await?;
    ensure!(
        header(&s, "range").as_deref() == Some("0-0"),
        "mismatched chunk kept: {:?}",
        header(&s, "range")
    );
    let (_, code) = error_code(r).await?;
    ensure!(
        code == "SIZE_INVALID" || code == "RANGE_INVALID",
        "code {code}"
    );
    Ok(())
}

async fn cancelled_and_unknown_uploads_are_upload_unknown(
    c: Client,
    p: String,
) -> anyhow::Result<()> {
    let loc = c.start_upload(&p).await?;
    ensure!(patch(&c, &loc, "0-2", b"abc").await?.status() == 202);
    let r = c.req(Method::DELETE, &loc).send().await?;
    ensure!(r.status() == 204, "cancel: {}", r.status());
    expect_error(c.get(&loc).await?, 404, "BLOB_UPLOAD_UNKNOWN").await?;
    expect_error(
        patch(&c, &loc, "3-5", b"def").await?,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await?;
    expect_error(
        c.req(Method::DELETE, &loc).send().await?,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await?;
    let unknown = format!("/v2/{p}/blobs/uploads/00000000-0000-0000-0000-000000000000");
    expect_error(c.get(&unknown).await?, 404, "BLOB_UPLOAD_UNKNOWN").await?;
    let r = c
        .req(Method::PUT, &format!("{unknown}?digest={}", sha256(b"")))
        .send()
        .await?;
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await?;
    // A session belongs to its repository.
    let loc = c.start_upload(&p).await?;
    let other = loc.replacen(&format!("/v2/{p}/"), &format!("/v2/{p}-other/"), 1);
    expect_error(c.get(&other).await?, 404, "BLOB_UPLOAD_UNKNOWN").await?;
    Ok(())
}

async fn cross_repository_mount(c: Client, p: String) -> anyhow::Result<()> {
    let data = b"shared layer".to_vec();
    let d = c.push_blob(&format!("{p}/src"), data.clone()).await?;
    let r = c
        .req(
            Method::POST,
            &format!("/v2/{p}/dst/blobs/uploads/?mount={d}&from={p}/src"),
        )
        .send()
        .await?;
    ensure!(r.status() == 201, "mount: {}", describe(r).await);
    ensure!(header(&r, "docker-content-digest") == Some(d.to_string()));
    ensure!(
        c.get(&format!("/v2/{p}/dst/blobs/{d}"))
            .await?
            .bytes()
            .await?
            == data
    );
    // Not in the source repository: a usable session instead.
    let missing = sha256(b"not there");
    let r = c
        .req(
            Method::POST,
            &format!("/v2/{p}/dst2/blobs/uploads/?mount={missing}&from={p}/src"),
        )
        .send()
        .await?;
    ensure!(r.status() == 202, "fallback: {}", r.status());
    let loc = location(&r)?;
    ensure!(patch(&c, &loc, "0-8", b"not there").await?.status() == 202);
    let r = c
        .req(Method::PUT, &with_query(&loc, &format!("digest={missing}")))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", describe(r).await);
    Ok(())
}

async fn blob_ranges(c: Client, p: String) -> anyhow::Result<()> {
    let data: Vec<u8> = (0..=99u8).collect();
    let d = c.push_blob(&p, data.clone()).await?;
    let path = format!("/v2/{p}/blobs/{d}");
    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=90-", 90, 99),
        ("bytes=-5", 95, 99),
        ("bytes=50-1000", 50, 99),
    ] {
        let r = c
            .req(Method::GET, &path)
            .header("range", range)
            .send()
            .await?;
        ensure!(r.status() == 206, "{range}: {}", r.status());
        ensure!(
            header(&r, "content-range") == Some(format!("bytes {start}-{end}/100")),
            "{range}"
        );
        ensure!(r.bytes().await?[..] == data[start..=end], "{range} body");
    }
    for range in ["bytes=100-", "bytes=200-300", "bytes=-0"] {
        let r = c
            .req(Method::GET, &path)
            .header("range", range)
            .send()
            .await?;
        ensure!(r.status() == 416, "{range}: {}", r.status());
        ensure!(
            header(&r, "content-range").as_deref() == Some("bytes */100"),
            "{range}"
        );
        let cl: usize = header(&r, "content-length")
            .context("no content-length")?
            .parse()?;
        ensure!(
            r.bytes().await?.len() == cl,
            "{range}: body does not match Content-Length"
        );
    }
    Ok(())
}

async fn manifests_of_every_type_round_trip_exactly(c: Client, p: String) -> anyhow::Result<()> {
    // OCI image manifest, without and then with pretty-printing: bytes must come back as sent.
    let config = b"{\"os\":\"linux\"}".to_vec();
    let cd = c.push_blob(&p, config.clone()).await?;
    let ld = c.push_blob(&p, b"layer".to_vec()).await?;
    let oci_m = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": 5}],
    }))?;
    let docker_m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": ld.to_string(), "size": 5}],
    }))?;
    let oci_d = sha256(&oci_m);
    let docker_d = sha256(&docker_m);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": oci_d.to_string(), "size": oci_m.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))?;
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": docker_d.to_string(), "size": docker_m.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))?;
    for (tag, mt, body) in [
        ("oci", OCI_MANIFEST, &oci_m),
        ("docker", DOCKER_MANIFEST, &docker_m),
        ("index", OCI_INDEX, &index),
        ("list", DOCKER_LIST, &list),
    ] {
        let d = sha256(body);
        let r = c.put_manifest(&p, tag, mt, body).await?;
        ensure!(r.status() == 201, "{tag}: {}", describe(r).await);
        ensure!(
            header(&r, "docker-content-digest") == Some(d.to_string()),
            "{tag}: digest header"
        );
        ensure!(
            header(&r, "location").is_some_and(|l| l.ends_with(&format!("/v2/{p}/manifests/{d}"))),
            "{tag}: location"
        );
        for reference in [tag.to_string(), d.to_string()] {
            let r = c
                .req(Method::GET, &format!("/v2/{p}/manifests/{reference}"))
                .header("accept", mt)
                .send()
                .await?;
            ensure!(r.status() == 200, "{tag} GET {reference}: {}", r.status());
            ensure!(
                header(&r, "content-type").as_deref() == Some(mt),
                "{tag}: content-type"
            );
            ensure!(header(&r, "docker-content-digest") == Some(d.to_string()));
            ensure!(r.bytes().await?[..] == body[..], "{tag}: bytes differ");
            let r = c
                .req(Method::HEAD, &format!("/v2/{p}/manifests/{reference}"))
                .header("accept", mt)
                .send()
                .await?;
            ensure!(r.status() == 200);
            ensure!(
                header(&r, "content-length") == Some(body.len().to_string()),
                "{tag}: HEAD length"
            );
        }
    }
    // Push by digest, no tag.
    let r = c
        .put_manifest(&p, &oci_d.to_string(), OCI_MANIFEST, &oci_m)
        .await?;
    ensure!(r.status() == 201, "by digest: {}", describe(r).await);
    Ok(())
}

async fn manifest_referencing_unknown_content_is_rejected(
    c: Client,
    p: String,
) -> anyhow::Result<()> {
    let cd = c.push_blob(&p, b"{}".to_vec()).await?;
    let missing = sha256(b"never pushed");
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": missing.to_string(), "size": 12}],
    }))?;
    expect_error(
        c.put_manifest(&p, "t", OCI_MANIFEST, &m).await?,
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await?;
    // A blob of another repository is not enough.
    let other = c
        .push_blob(&format!("{p}-other"), b"elsewhere".to_vec())
        .await?;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": other.to_string(), "size": 9},
        "layers": [],
    }))?;
    expect_error(
        c.put_manifest(&p, "t", OCI_MANIFEST, &m).await?,
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await?;
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": missing.to_string(), "size": 12}],
    }))?;
    expect_error(
        c.put_manifest(&p, "t", OCI_INDEX, &idx).await?,
        400,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}/manifests/t")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn invalid_manifests_are_rejected(c: Client, p: String) -> anyhow::Result<()> {
    let good = c.image_manifest(&p, b"{}", &[b"l"], None).await?;
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "invalid json",
            OCI_MANIFEST,
            b"{\"schemaVersion\": 2,".to_vec(),
        ),
        ("not an object", OCI_MANIFEST, b"[1,2]".to_vec()),
        (
            "schema 1",
            "application/vnd.docker.distribution.manifest.v1+json",
            br#"{"schemaVersion":1}"#.to_vec(),
        ),
        ("content type mismatch", DOCKER_MANIFEST, good.clone()),
        ("unknown media type", "application/x-unknown", good.clone()),
        (
            "missing config",
            OCI_MANIFEST,
            serde_json::to_vec(
                &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
            )?,
        ),
        (
            "bad descriptor digest",
            OCI_MANIFEST,
            serde_json::to_vec(
                &json!({"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:nothex", "size": 1}, "layers": []}),
            )?,
        ),
    ];
    for (what, ct, body) in cases {
        let r = c.put_manifest(&p, "bad", ct, &body).await?;
        let (s, code) = error_code(r).await.with_context(|| what.to_string())?;
        ensure!(s == 400 && code == "MANIFEST_INVALID", "{what}: {s} {code}");
    }
    expect_error(
        c.get(&format!("/v2/{p}/manifests/bad")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn oversized_manifest_is_413(c: Client, p: String) -> anyhow::Result<()> {
    let pad = "x".repeat(4 * 1024 * 1024 + 10);
    let big = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "annotations": {"pad": pad}}),
    )?;
    let r = c.put_manifest(&p, "big", OCI_INDEX, &big).await?;
    ensure!(r.status() == 413, "oversized: {}", r.status());
    expect_error(
        c.get(&format!("/v2/{p}/manifests/big")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn manifest_put_by_wrong_digest_is_rejected(c: Client, p: String) -> anyhow::Result<()> {
    let m = c.image_manifest(&p, b"{}", &[], None).await?;
    let wrong = sha256(b"other");
    expect_error(
        c.put_manifest(&p, &wrong.to_string(), OCI_MANIFEST, &m)
            .await?,
        400,
        "DIGEST_INVALID",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}/manifests/{wrong}")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}/manifests/{}", sha256(&m))).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn if_none_match_creates_a_tag_only_once(c: Client, p: String) -> anyhow::Result<()> {
    let m1 = c.image_manifest(&p, b"{\"v\":1}", &[], None).await?;
    let m2 = c.image_manifest(&p, b"{\"v\":2}", &[], None).await?;
    let put = |body: Vec<u8>| {
        c.req(Method::PUT, &format!("/v2/{p}/manifests/release"))
            .header("content-type", OCI_MANIFEST)
            .header("if-none-match", "*")
            .body(body)
            .send()
    };
    ensure!(put(m1.clone()).await?.status() == 201);
    let r = put(m2.clone()).await?;
    ensure!(r.status() == 412, "second create: {}", r.status());
    let r = c.get(&format!("/v2/{p}/manifests/release")).await?;
    ensure!(
        header(&r, "docker-content-digest") == Some(sha256(&m1).to_string()),
        "tag moved"
    );
    // Without the header the tag is mutable.
    ensure!(
        c.put_manifest(&p, "release", OCI_MANIFEST, &m2)
            .await?
            .status()
            == 201
    );
    let r = c.get(&format!("/v2/{p}/manifests/release")).await?;
    ensure!(header(&r, "docker-content-digest") == Some(sha256(&m2).to_string()));
    Ok(())
}

async fn tags_list_pagination(c: Client, p: String) -> anyhow::Result<()> {
    let m = c.image_manifest(&p, b"{}", &[], None).await?;
    for t in ["b", "a", "d", "c", "e"] {
        ensure!(c.put_manifest(&p, t, OCI_MANIFEST, &m).await?.status() == 201);
    }
    let v: Value = c.get(&format!("/v2/{p}/tags/list")).await?.json().await?;
    ensure!(
        v["name"] == p.as_str() && v["tags"] == json!(["a", "b", "c", "d", "e"]),
        "{v}"
    );
    let r = c.get(&format!("/v2/{p}/tags/list?n=2")).await?;
    let link = header(&r, "link").context("no Link on a partial page")?;
    ensure!(
        link.contains(&format!("/v2/{p}/tags/list?n=2&last=b")) && link.contains("rel=\"next\""),
        "{link}"
    );
    let v: Value = r.json().await?;
    ensure!(v["tags"] == json!(["a", "b"]));
    let r = c.get(&format!("/v2/{p}/tags/list?n=2&last=d")).await?;
    ensure!(header(&r, "link").is_none(), "Link on the last page");
    let v: Value = r.json().await?;
    ensure!(v["tags"] == json!(["e"]), "{v}");
    expect_error(
        c.get(&format!("/v2/{p}/tags/list?n=x")).await?,
        400,
        "PAGINATION_NUMBER_INVALID",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}-none/tags/list")).await?,
        404,
        "NAME_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn catalog_pagination(c: Client, p: String) -> anyhow::Result<()> {
    for r in ["x/one", "x/two", "x/three"] {
        c.push_image(&format!("{p}/{r}"), "t", &[]).await?;
    }
    let v: Value = c.get("/v2/_catalog").await?.json().await?;
    let all: Vec<String> = serde_json::from_value(v["repositories"].clone())?;
    let mine: Vec<&String> = all
        .iter()
        .filter(|r| r.starts_with(&format!("{p}/")))
        .collect();
    ensure!(
        mine == [
            &format!("{p}/x/one"),
            &format!("{p}/x/three"),
            &format!("{p}/x/two")
        ],
        "{mine:?}"
    );
    let mut sorted = all.clone();
    sorted.sort();
    ensure!(sorted == all, "catalog is not sorted");
    let r = c.get(&format!("/v2/_catalog?n=1&last={p}/x/one")).await?;
    ensure!(
        header(&r, "link").is_some_and(|l| l.contains("/v2/_catalog?n=1&last=")),
        "no Link"
    );
    let v: Value = r.json().await?;
    ensure!(v["repositories"] == json!([format!("{p}/x/three")]), "{v}");
    expect_error(
        c.get("/v2/_catalog?n=-1").await?,
        400,
        "PAGINATION_NUMBER_INVALID",
    )
    .await?;
    Ok(())
}

async fn referrers_and_subject(c: Client, p: String) -> anyhow::Result<()> {
    let (subject, sd) = c.push_image(&p, "app", &[b"layer"]).await?;
    let empty = c.push_blob(&p, b"{}".to_vec()).await?;
    let mut pushed = Vec::new();
    for (at, note) in [
        ("application/vnd.example.sbom", "sbom"),
        ("application/vnd.example.sig", "sig"),
    ] {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sd.to_string(), "size": subject.len()},
            "annotations": {"note": note},
        }))?;
        let d = sha256(&m);
        let r = c.put_manifest(&p, &d.to_string(), OCI_MANIFEST, &m).await?;
        ensure!(r.status() == 201, "{}", describe(r).await);
        ensure!(
            header(&r, "oci-subject") == Some(sd.to_string()),
            "no OCI-Subject"
        );
        pushed.push((d, at));
    }
    let r = c.get(&format!("/v2/{p}/referrers/{sd}")).await?;
    ensure!(r.status() == 200);
    ensure!(header(&r, "content-type").as_deref() == Some(OCI_INDEX));
    let v: Value = r.json().await?;
    let ms = v["manifests"].as_array().context("manifests")?;
    ensure!(ms.len() == 2, "{v}");
    for (d, at) in &pushed {
        let m = ms
            .iter()
            .find(|m| m["digest"] == d.to_string().as_str())
            .context("referrer missing")?;
        ensure!(
            m["artifactType"] == *at && m["mediaType"] == OCI_MANIFEST,
            "{m}"
        );
        ensure!(m["annotations"]["note"].is_string() && m["size"].as_u64().is_some());
    }
    let r = c
        .get(&format!(
            "/v2/{p}/referrers/{sd}?artifactType=application/vnd.example.sig"
        ))
        .await?;
    ensure!(header(&r, "oci-filters-applied").as_deref() == Some("artifactType"));
    let v: Value = r.json().await?;
    ensure!(v["manifests"].as_array().map(Vec::len) == Some(1), "{v}");
    let none = sha256(b"no such subject");
    let v: Value = c
        .get(&format!("/v2/{p}/referrers/{none}"))
        .await?
        .json()
        .await?;
    ensure!(v["manifests"] == json!([]), "{v}");
    // Deleting a referrer removes it from the list.
    let r = c
        .req(
            Method::DELETE,
            &format!("/v2/{p}/manifests/{}", pushed[0].0),
        )
        .send()
        .await?;
    ensure!(r.status() == 202);
    let v: Value = c
        .get(&format!("/v2/{p}/referrers/{sd}"))
        .await?
        .json()
        .await?;
    ensure!(v["manifests"].as_array().map(Vec::len) == Some(1), "{v}");
    Ok(())
}

async fn deletes_of_tag_manifest_and_blob(c: Client, p: String) -> anyhow::Result<()> {
    let (_, d) = c.push_image(&p, "one", &[b"content"]).await?;
    let m = c
        .get(&format!("/v2/{p}/manifests/one"))
        .await?
        .bytes()
        .await?;
    ensure!(c.put_manifest(&p, "two", OCI_MANIFEST, &m).await?.status() == 201);
    // Tag alone: the manifest stays.
    let r = c
        .req(Method::DELETE, &format!("/v2/{p}/manifests/one"))
        .send()
        .await?;
    ensure!(r.status() == 202, "delete tag: {}", r.status());
    expect_error(
        c.get(&format!("/v2/{p}/manifests/one")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    ensure!(
        c.get(&format!("/v2/{p}/manifests/{d}")).await?.status() == 200,
        "manifest went with the tag"
    );
    ensure!(c.get(&format!("/v2/{p}/manifests/two")).await?.status() == 200);
    // By digest: its tags go too.
    let r = c
        .req(Method::DELETE, &format!("/v2/{p}/manifests/{d}"))
        .send()
        .await?;
    ensure!(r.status() == 202, "delete manifest: {}", r.status());
    expect_error(
        c.get(&format!("/v2/{p}/manifests/{d}")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}/manifests/two")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    let v: Value = c.get(&format!("/v2/{p}/tags/list")).await?.json().await?;
    ensure!(v["tags"] == json!([]), "{v}");
    expect_error(
        c.req(Method::DELETE, &format!("/v2/{p}/manifests/{d}"))
            .send()
            .await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    // Blob.
    let b = sha256(b"content");
    ensure!(
        c.req(Method::DELETE, &format!("/v2/{p}/blobs/{b}"))
            .send()
            .await?
            .status()
            == 202
    );
    expect_error(
        c.get(&format!("/v2/{p}/blobs/{b}")).await?,
        404,
        "BLOB_UNKNOWN",
    )
    .await?;
    expect_error(
        c.req(Method::DELETE, &format!("/v2/{p}/blobs/{b}"))
            .send()
            .await?,
        404,
        "BLOB_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn invalid_names_and_tags(c: Client, p: String) -> anyhow::Result<()> {
    let long = "a".repeat(256);
    // `..` and `%2e%2e` segments are normalised away by URL libraries before they are sent
    // (storage.rs sends them raw); everything else reaches the server and must be refused.
    for name in [
        "UPPER",
        "/leading",
        "a//b",
        long.as_str(),
        "a%2fb",
        "a%2e%2e",
        "-dash",
        "a/_b",
    ] {
        let r = c.get(&format!("/v2/{name}/tags/list")).await?;
        let (s, code) = error_code(r).await.with_context(|| name.to_string())?;
        ensure!(s == 400 && code == "NAME_INVALID", "{name}: {s} {code}");
        let r = c
            .req(Method::POST, &format!("/v2/{name}/blobs/uploads/"))
            .send()
            .await?;
        ensure!(r.status() == 400, "{name} upload: {}", r.status());
    }
    let long_tag = "t".repeat(129);
    for tag in [".hidden", "-dash", long_tag.as_str(), "a%20b"] {
        let r = c.put_manifest(&p, tag, OCI_MANIFEST, b"{}").await?;
        let (s, code) = error_code(r).await.with_context(|| tag.to_string())?;
        ensure!(s == 400 && code == "TAG_INVALID", "{tag}: {s} {code}");
    }
    // A GET or HEAD by a reference that cannot name a manifest is 404 MANIFEST_UNKNOWN, as
    // in distribution and the OCI conformance suite (a PUT with it stays 400, above).
    for reference in [".INVALID_MANIFEST_NAME", "-dash", "sha256:123"] {
        let path = format!("/v2/{p}/manifests/{reference}");
        let r = c.get(&path).await?;
        let (s, code) = error_code(r).await.with_context(|| path.clone())?;
        ensure!(
            s == 404 && code == "MANIFEST_UNKNOWN",
            "GET {path}: {s} {code}"
        );
        let r = c.req(Method::HEAD, &path).send().await?;
        ensure!(r.status() == 404, "HEAD {path}: {}", r.status());
    }
    Ok(())
}

async fn unknown_content_is_404(c: Client, p: String) -> anyhow::Result<()> {
    let d = sha256(b"unknown");
    expect_error(
        c.get(&format!("/v2/{p}/blobs/{d}")).await?,
        404,
        "BLOB_UNKNOWN",
    )
    .await?;
    let r = c
        .req(Method::HEAD, &format!("/v2/{p}/blobs/{d}"))
        .send()
        .await?;
    ensure!(r.status() == 404);
    expect_error(
        c.get(&format!("/v2/{p}/manifests/latest")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    expect_error(
        c.get(&format!("/v2/{p}/manifests/{d}")).await?,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await?;
    Ok(())
}

async fn unsupported_methods_are_405(c: Client, p: String) -> anyhow::Result<()> {
    let d = sha256(b"x");
    for (m, path) in [
        (Method::POST, format!("/v2/{p}/manifests/latest")),
        (Method::PUT, format!("/v2/{p}/blobs/{d}")),
        (Method::DELETE, format!("/v2/{p}/tags/list")),
        (Method::POST, "/v2/_catalog".to_string()),
    ] {
        expect_error(c.req(m.clone(), &path).send().await?, 405, "UNSUPPORTED")
            .await
            .with_context(|| format!("{m} {path}"))?;
    }
    Ok(())
}

async fn accept_header_is_honoured_for_tags(c: Client, p: String) -> anyhow::Result<()> {
    let (_, child) = c.push_image(&p, "child", &[]).await?;
    let child_len = c
        .get(&format!("/v2/{p}/manifests/child"))
        .await?
        .bytes()
        .await?
        .len();
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child.to_string(), "size": child_len}],
    }))?;
    ensure!(c.put_manifest(&p, "multi", OCI_INDEX, &idx).await?.status() == 201);
    let r = c
        .req(Method::GET, &format!("/v2/{p}/manifests/multi"))
        .header("accept", DOCKER_MANIFEST)
        .send()
        .await?;
    expect_error(r, 404, "MANIFEST_UNKNOWN").await?;
    let r = c
        .req(Method::GET, &format!("/v2/{p}/manifests/multi"))
        .header("accept", format!("{DOCKER_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let r = c
        .req(Method::GET, &format!("/v2/{p}/manifests/multi"))
        .header("accept", "*/*")
        .send()
        .await?;
    ensure!(r.status() == 200);
    Ok(())
}

async fn concurrent_pushes_of_one_blob_and_one_tag(c: Client, p: String) -> anyhow::Result<()> {
    let data = vec![42u8; 1 << 20];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, p, data) = (c.clone(), p.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.push_blob(&p, data).await
            } else {
                c.push_blob_chunked(&p, &data, 300_000).await
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let got = c
        .get(&format!("/v2/{p}/blobs/{}", sha256(&data)))
        .await?
        .bytes()
        .await?;
    ensure!(
        got[..] == data[..],
        "blob content wrong after concurrent pushes"
    );
    let mut manifests = Vec::new();
    for i in 0..8 {
        manifests.push(
            c.image_manifest(&p, format!("{{\"n\":{i}}}").as_bytes(), &[], None)
                .await?,
        );
    }
    let mut tasks = Vec::new();
    for m in manifests.clone() {
        let (c, p) = (c.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            c.put_manifest(&p, "race", OCI_MANIFEST, &m)
                .await
                .map(|r| r.status())
        }));
    }
    for t in tasks {
        ensure!(t.await?? == StatusCode::CREATED);
    }
    let r = c.get(&format!("/v2/{p}/manifests/race")).await?;
    let d = header(&r, "docker-content-digest").context("digest")?;
    let body = r.bytes().await?;
    ensure!(
        sha256(&body).to_string() == d,
        "tag points to content that does not match its digest"
    );
    ensure!(
        manifests.iter().any(|m| m[..] == body[..]),
        "tag points to none of the pushed manifests"
    );
    Ok(())
}
