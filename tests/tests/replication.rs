//! Replication (`[[replication]]`) end to end: a real gateway and storage node as the source;
//! as targets, distribution 2.8.2 (htpasswd Basic auth, deletes by digest only) and a second
//! Portcullis (Docker token auth, TLS with its own CA). A burst of 200 pushes, tag moves and
//! deletes with a `kill -9` of the source's gateway and of its storage node in the middle;
//! then the reconciliation reports zero drift and every tag pulls byte-identical from both
//! targets. An immutable tag is never overwritten at the target, a rule without `deletes`
//! deletes nothing, a big blob cut in the middle of its upload resumes where the target got
//! to (a relay in front of the target cuts it: a fault the real target cannot be made to
//! produce on cue), and a backup (replication to an empty registry) restores a wiped
//! registry image by image.

use anyhow::{Context, ensure};
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, image_config, list_page, sha256};
use portcullis_tests::deployment;
use portcullis_tests::faulty::{Faulty, Mode};
use portcullis_tests::server::{GatewayServer, StorageServer};
use portcullis_tests::tools::Distribution;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const ALICE: (&str, &str) = ("alice", "replication-alice-pw");
/// The source's account at the targets.
const REPLICATOR: (&str, &str) = ("alice", "replication-target-pw");
const DIST_USER: (&str, &str) = ("replicator", "distribution-replicator-pw");

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A second Portcullis: a storage node and a gateway where `alice` (an administrator) is the
/// source's account.
struct Portcullis {
    _dir: tempfile::TempDir,
    storage: StorageServer,
    gateway: GatewayServer,
}

impl Portcullis {
    fn start(user: (&str, &str), extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let storage = deployment::storage_node(&dir.path().join("storage"))?;
        let gw = dir.path().join("gw");
        std::fs::create_dir_all(&gw)?;
        let gateway = deployment::start_gateway_with_state(&gw, &[&storage], &[user], extra)?;
        Ok(Portcullis {
            storage,
            gateway,
            _dir: dir,
        })
    }

    fn client(&self, user: (&str, &str)) -> Client {
        deployment::user_client(&self.gateway, user.0, user.1)
    }

    /// The `[[replication]]` table of a rule to this registry (its password and CA in `dir`).
    fn rule(&self, dir: &Path, name: &str, more: &str) -> anyhow::Result<String> {
        let pw = dir.join(format!("{name}.password"));
        gateway::edge::tls::write_private(&pw, REPLICATOR.1.as_bytes())?;
        let ca = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&ca, &self.gateway.ca_pem)?;
        Ok(format!(
            "[[replication]]\nname = \"{name}\"\nurl = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n{more}\n",
            self.gateway.base,
            REPLICATOR.0,
            pw.display(),
            ca.display()
        ))
    }
}

/// The `[[replication]]` table of a rule to distribution `d` (Basic auth).
fn distribution_rule(
    dir: &Path,
    d: &Distribution,
    name: &str,
    more: &str,
) -> anyhow::Result<String> {
    let pw = dir.join(format!("{name}.password"));
    gateway::edge::tls::write_private(&pw, DIST_USER.1.as_bytes())?;
    Ok(format!(
        "[[replication]]\nname = \"{name}\"\nurl = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n{more}\n",
        d.base,
        DIST_USER.0,
        pw.display()
    ))
}

fn distribution_client(d: &Distribution) -> Client {
    d.basic_client(DIST_USER)
}

/// The source: a gateway (state in a file) with `rules`, in `dir`.
fn source_gateway(
    dir: &Path,
    storage: &StorageServer,
    rules: &str,
) -> anyhow::Result<GatewayServer> {
    deployment::start_gateway_with_state(dir, &[storage], &[ALICE], rules)
}

/// An image of its own (one layer of `layer_size` bytes made from `label`), its blobs
/// pushed: the manifest's bytes.
async fn image(c: &Client, repo: &str, label: &str, layer_size: usize) -> anyhow::Result<Vec<u8>> {
    let mut layer = label.as_bytes().repeat(layer_size / label.len().max(1) + 1);
    layer.truncate(layer_size.max(label.len()));
    c.image_manifest(repo, &image_config(label), &[&layer], None)
        .await
}

/// Pushes an image of its own under `reference` (a tag, or none: by digest); its digest.
async fn push(
    c: &Client,
    repo: &str,
    reference: Option<&str>,
    label: &str,
    layer_size: usize,
) -> anyhow::Result<String> {
    let body = image(c, repo, label, layer_size).await?;
    let digest = sha256(&body).to_string();
    let r = c
        .put_manifest(repo, reference.unwrap_or(&digest), OCI_MANIFEST, &body)
        .await?;
    ensure!(r.status() == 201, "push {repo}: {}", describe(r).await);
    Ok(digest)
}

/// Pushes an index of two images of its own under `tag`.
async fn push_index(c: &Client, repo: &str, tag: &str, label: &str) -> anyhow::Result<()> {
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let body = image(c, repo, &format!("{label}-{arch}"), 64).await?;
        let d = sha256(&body).to_string();
        let r = c.put_manifest(repo, &d, OCI_MANIFEST, &body).await?;
        ensure!(r.status() == 201, "push {repo}@{d}: {}", describe(r).await);
        children.push(json!({"mediaType": OCI_MANIFEST, "digest": d, "size": body.len(), "platform": {"os": "linux", "architecture": arch}}));
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}),
    )?;
    let r = c.put_manifest(repo, tag, OCI_INDEX, &index).await?;
    ensure!(r.status() == 201, "push index: {}", describe(r).await);
    Ok(())
}

/// Runs `op` until it succeeds (a node coming back), for at most 20 s.
async fn retried<F, Fut, T>(what: &str, mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: retrying after {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context(what.to_owned())),
        }
    }
}

/// Every tag of every repository of the source, with the manifest's bytes.
async fn source_state(s: &StorageServer) -> anyhow::Result<BTreeMap<(String, String), Vec<u8>>> {
    let c = deployment::storage_client(s);
    let (repos, _) = list_page(&c, "/v2/_catalog?n=10000", "repositories").await?;
    let mut out = BTreeMap::new();
    for repo in repos {
        let (tags, _) = list_page(&c, &format!("/v2/{repo}/tags/list?n=10000"), "tags").await?;
        for tag in tags {
            out.insert(
                (repo.clone(), tag.clone()),
                manifest(&c, &repo, &tag).await?,
            );
        }
    }
    Ok(out)
}

async fn manifest(c: &Client, repo: &str, reference: &str) -> anyhow::Result<Vec<u8>> {
    let r = c
        .req(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "{repo}:{reference}: {}",
        describe(r).await
    );
    Ok(r.bytes().await?.to_vec())
}

/// Checks that `target` holds exactly the tags of `source` (for the repositories `source`
/// has), each manifest byte-identical, and every blob and child manifest pulls with its
/// digest.
async fn pulls_identical(
    source: &BTreeMap<(String, String), Vec<u8>>,
    target: &Client,
) -> anyhow::Result<()> {
    let mut repos: Vec<&String> = source.keys().map(|(r, _)| r).collect();
    repos.dedup();
    for repo in repos {
        let want: Vec<&String> = source
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, t)| t)
            .collect();
        let (mut got, _) =
            list_page(target, &format!("/v2/{repo}/tags/list?n=10000"), "tags").await?;
        got.sort();
        ensure!(
            got.iter().collect::<Vec<_>>() == want,
            "{repo}: the target's tags {got:?}, the source's {want:?}"
        );
    }
    for ((repo, tag), body) in source {
        let there = manifest(target, repo, tag).await?;
        ensure!(&there == body, "{repo}:{tag} differs at the target");
        let mut manifests = vec![body.clone()];
        while let Some(m) = manifests.pop() {
            let v: Value = serde_json::from_slice(&m)?;
            for child in v["manifests"].as_array().into_iter().flatten() {
                let d = child["digest"].as_str().context("child digest")?;
                let b = manifest(target, repo, d).await?;
                ensure!(sha256(&b).to_string() == d, "{repo}@{d} corrupted");
                manifests.push(b);
            }
            let blobs = v["config"].as_object().into_iter().chain(
                v["layers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object),
            );
            for b in blobs {
                let d = b["digest"].as_str().context("blob digest")?;
                let r = target.get(&format!("/v2/{repo}/blobs/{d}")).await?;
                ensure!(r.status() == 200, "{repo}@{d}: {}", describe(r).await);
                ensure!(
                    sha256(&r.bytes().await?).to_string() == d,
                    "{repo}@{d} corrupted at the target"
                );
            }
        }
    }
    Ok(())
}

async fn admin_json(url: &str) -> anyhow::Result<Value> {
    let r = reqwest::get(url).await?;
    ensure!(r.status() == 200, "{url}: {}", describe(r).await);
    Ok(r.json().await?)
}

/// Waits until `rule` has taken every event recorded.
async fn caught_up(admin: &str, rule: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let v = admin_json(&format!("{admin}/replication")).await?;
        let r = v["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == rule)
            .cloned()
            .context("no such rule")?;
        if r["lag_events"] == 0 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{rule} never caught up: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asks for a reconciliation of `rule` and waits for it to run; its report.
async fn reconciled(admin: &str, rule: &str, within: Duration) -> anyhow::Result<Value> {
    let r = reqwest::Client::new()
        .post(format!("{admin}/replication/reconcile?rule={rule}"))
        .send()
        .await?;
    ensure!(r.status() == 202, "reconcile: {}", describe(r).await);
    let asked = r.json::<Value>().await?["requested"]
        .as_str()
        .context("requested")?
        .to_owned();
    let deadline = Instant::now() + within;
    loop {
        let v = admin_json(&format!("{admin}/replication")).await?;
        let rep = v["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == rule)
            .map(|r| r["status"]["reconciliation"].clone())
            .unwrap_or(Value::Null);
        if rep["answered"].as_str() == Some(asked.as_str()) {
            return Ok(rep);
        }
        ensure!(Instant::now() < deadline, "{rule} never reconciled: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What a check of `rule` finds now (nothing changed).
async fn drift(admin: &str, rule: &str) -> anyhow::Result<Value> {
    admin_json(&format!("{admin}/replication/drift?rule={rule}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_with_kill_9_ends_with_zero_drift_and_identical_images_at_both_targets()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dist_root = dir.path().join("distribution");
    std::fs::create_dir_all(&dist_root)?;
    let dist = Distribution::start_with(&dist_root, Some(&[DIST_USER]), None)?;
    let mirror = Portcullis::start(REPLICATOR, "")?;
    let mut storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    // Small chunks: the 3 MiB layer below goes in resumable pieces.
    let common = "deletes = true\nreconcile_minutes = 0\nmax_backoff_seconds = 2\nchunk_mebibytes = 1\ntimeout_seconds = 10";
    let rules =
        distribution_rule(&gw, &dist, "dist", common)? + &mirror.rule(&gw, "mirror", common)?;
    let mut g = source_gateway(&gw, &storage, &rules)?;
    let mut c = deployment::user_client(&g, ALICE.0, ALICE.1);

    let repos = ["team-a/app", "team-a/lib", "team-b/tool", "platform/base"];
    // tag → still there, per repository
    let mut live: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_digest: Vec<(&str, String)> = Vec::new();
    for i in 0..200usize {
        if i == 100 {
            // kill -9 of the source's gateway: its events wait in the outbox for the next.
            drop(g);
            g = source_gateway(&gw, &storage, &rules)?;
            c = deployment::user_client(&g, ALICE.0, ALICE.1);
        }
        if i == 150 {
            storage.crash_and_restart()?;
        }
        let repo = repos[i % repos.len()];
        let tags = live.entry(repo).or_default();
        let label = format!("burst-{i}");
        match i % 10 {
            // A tag moved to a new image.
            6 | 7 if !tags.is_empty() => {
                let t = tags[i % tags.len()].clone();
                retried("move", || push(&c, repo, Some(&t), &label, 200)).await?;
            }
            // A tag deleted.
            8 if !tags.is_empty() => {
                let t = tags.remove(i % tags.len());
                retried("tag delete", || c.delete_manifest(repo, &t)).await?;
            }
            // A manifest pushed by digest, and one deleted by digest (with its tags).
            9 => {
                let d = retried("push by digest", || push(&c, repo, None, &label, 100)).await?;
                by_digest.push((repo, d));
                if i % 20 == 19 {
                    let (r, d) = by_digest.remove(0);
                    retried("delete by digest", || c.delete_manifest(r, &d)).await?;
                }
            }
            _ if i == 50 => {
                // A big layer, and an index.
                let t = format!("big-{i}");
                retried("big push", || push(&c, repo, Some(&t), &label, 3 << 20)).await?;
                tags.push(t);
                let t = format!("multi-{i}");
                retried("index push", || push_index(&c, repo, &t, &label)).await?;
                tags.push(t);
            }
            _ => {
                let t = format!("t{i}");
                retried("push", || push(&c, repo, Some(&t), &label, 300)).await?;
                tags.push(t);
            }
        }
    }

    // Events were copied as they came (a lease window or two after the restart).
    for rule in ["dist", "mirror"] {
        caught_up(&g.admin, rule, Duration::from_secs(180)).await?;
    }
    let metrics = reqwest::get(format!("{}/metrics", g.admin))
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains("gateway_replication_copies_total{kind=\"blob\",rule=\"dist\"}")
            && metrics
                .contains("gateway_replication_copies_total{kind=\"manifest\",rule=\"mirror\"}"),
        "no copies counted after the restart"
    );
    // Then a reconciliation finds (and fixes) whatever the kill -9 lost, and a check after it
    // finds nothing.
    for rule in ["dist", "mirror"] {
        let rep = reconciled(&g.admin, rule, Duration::from_secs(180)).await?;
        ensure!(rep["errors"] == 0, "{rule}: {rep}");
        let now = drift(&g.admin, rule).await?;
        ensure!(
            now["drift"] == 0 && now["errors"] == 0 && now["tags"].as_u64() > Some(100),
            "{rule}: {now}"
        );
    }
    let source = source_state(&storage).await?;
    ensure!(source.len() > 100, "{} tags", source.len());
    pulls_identical(&source, &distribution_client(&dist)).await?;
    pulls_identical(&source, &mirror.client(REPLICATOR)).await?;
    // The status says when it last succeeded, and no error is left.
    let v = admin_json(&format!("{}/replication", g.admin)).await?;
    for r in v["rules"].as_array().context("rules")? {
        ensure!(r["status"]["last_success"].is_string(), "{r}");
    }
    drop(mirror.storage);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immutable_tag_is_never_overwritten_and_a_rule_without_deletes_deletes_nothing()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dist_root = dir.path().join("distribution");
    std::fs::create_dir_all(&dist_root)?;
    let dist = Distribution::start_with(&dist_root, Some(&[DIST_USER]), None)?;
    // The target already has v1.0.0 (immutable in the shipped policy) at another image.
    let at_target = push(
        &distribution_client(&dist),
        "team-a/app",
        Some("v1.0.0"),
        "theirs",
        50,
    )
    .await?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let rules = distribution_rule(
        &gw,
        &dist,
        "keep",
        "reconcile_minutes = 0\nmax_backoff_seconds = 1\nmax_attempts = 2",
    )?;
    let g = source_gateway(&gw, &storage, &rules)?;
    let c = deployment::user_client(&g, ALICE.0, ALICE.1);
    push(&c, "team-a/app", Some("v1.0.0"), "ours", 50).await?;
    push(&c, "team-a/app", Some("latest"), "latest", 50).await?;
    push(&c, "team-a/app", Some("old"), "old", 50).await?;
    // Copied first (a rule copies what the source holds when it takes the event).
    caught_up(&g.admin, "keep", Duration::from_secs(90)).await?;
    c.delete_manifest("team-a/app", "old").await?;
    caught_up(&g.admin, "keep", Duration::from_secs(90)).await?;
    let rep = reconciled(&g.admin, "keep", Duration::from_secs(90)).await?;
    ensure!(
        rep["conflicts"] == 1 && rep["extra"] == 1 && rep["errors"] == 0,
        "{rep}"
    );
    let dc = distribution_client(&dist);
    ensure!(
        sha256(&manifest(&dc, "team-a/app", "v1.0.0").await?).to_string() == at_target,
        "the immutable tag was overwritten"
    );
    manifest(&dc, "team-a/app", "old")
        .await
        .context("a rule without deletes deleted a tag")?;
    manifest(&dc, "team-a/app", "latest").await?;
    let now = drift(&g.admin, "keep").await?;
    ensure!(now["drift"] == 2 && now["conflicts"] == 1, "{now}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_restores_a_wiped_registry_image_by_image() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backup = Portcullis::start(REPLICATOR, "")?;
    let storage_root = dir.path().join("storage");
    let storage = deployment::storage_node(&storage_root)?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let rule = backup.rule(
        &gw,
        "backup",
        "reconcile_minutes = 0\nmax_backoff_seconds = 1",
    )?;
    let g = source_gateway(&gw, &storage, &rule)?;
    let c = deployment::user_client(&g, ALICE.0, ALICE.1);
    for i in 0..12 {
        push(
            &c,
            &format!("team-{}/svc", i % 3),
            Some(&format!("r{i}")),
            &format!("img-{i}"),
            1000 + i,
        )
        .await?;
    }
    push_index(&c, "team-0/svc", "multi", "idx").await?;
    // Backup: the rule's reconciliation, then a check that finds nothing missing.
    let rep = reconciled(&g.admin, "backup", Duration::from_secs(120)).await?;
    ensure!(rep["errors"] == 0, "{rep}");
    ensure!(drift(&g.admin, "backup").await?["drift"] == 0);
    let before = source_state(&storage).await?;
    ensure!(before.len() == 13);

    // Wipe: the source's storage and state are gone.
    drop(g);
    drop(storage);
    std::fs::remove_dir_all(&storage_root)?;
    std::fs::remove_file(gw.join("state.json"))?;
    let storage = deployment::storage_node(&storage_root)?;
    let g = source_gateway(&gw, &storage, "")?;
    ensure!(source_state(&storage).await?.is_empty(), "not wiped");

    // Restore: the backup replicates back to the wiped registry.
    let rdir = dir.path().join("restore");
    std::fs::create_dir_all(&rdir)?;
    let pw = rdir.join("password");
    gateway::edge::tls::write_private(&pw, ALICE.1.as_bytes())?;
    let ca = rdir.join("ca.pem");
    std::fs::write(&ca, &g.ca_pem)?;
    let restore_rule = format!(
        "[[replication]]\nname = \"restore\"\nurl = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\nca_file = \"{}\"\nreconcile_minutes = 0\n",
        g.base,
        ALICE.0,
        pw.display(),
        ca.display()
    );
    let bdir = rdir.join("gw");
    std::fs::create_dir_all(&bdir)?;
    let restorer = deployment::start_gateway_with_state(
        &bdir,
        &[&backup.storage],
        &[REPLICATOR],
        &restore_rule,
    )?;
    let rep = reconciled(&restorer.admin, "restore", Duration::from_secs(120)).await?;
    ensure!(rep["errors"] == 0, "{rep}");
    // Verified image by image: every tag as it was, every blob and child by its digest.
    let after = source_state(&storage).await?;
    ensure!(after == before, "the restored registry differs");
    pulls_identical(&before, &deployment::user_client(&g, ALICE.0, ALICE.1)).await?;
    drop(backup.gateway);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_big_blob_cut_in_the_middle_resumes_where_the_target_got_to() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let target = Portcullis::start(REPLICATOR, "")?;
    // The target behind a relay that cuts the upload once, in its third 1 MiB chunk (its
    // token service stays where it is: on the same host, another port).
    let relay = Faulty::start(&target.gateway.host).await?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let rule = target
        .rule(
            &gw,
            "cut",
            "chunk_mebibytes = 1\nreconcile_minutes = 0\nmax_backoff_seconds = 1\ntoken_realm_hosts = [\"127.0.0.1\"]",
        )?
        .replace(&target.gateway.base, &format!("https://{}", relay.addr));
    let g = source_gateway(&gw, &storage, &rule)?;
    caught_up(&g.admin, "cut", Duration::from_secs(60)).await?;
    let size = 5 << 20;
    relay.set(Mode::CutClientOnceAfter(5 << 19));
    let before = relay.from_client();
    let c = deployment::user_client(&g, ALICE.0, ALICE.1);
    push(&c, "team-a/big", Some("v5"), "big-layer", size).await?;
    caught_up(&g.admin, "cut", Duration::from_secs(90)).await?;
    let source = source_state(&storage).await?;
    pulls_identical(&source, &target.client(REPLICATOR)).await?;
    // Resumed: what was sent once is not sent again (starting over would send 2.5 MiB + 5 MiB).
    let sent = relay.from_client() - before;
    ensure!(
        sent < size as u64 + (1 << 20),
        "{sent} bytes sent for a {size}-byte layer"
    );
    ensure!(sent >= size as u64, "the layer was not sent ({sent} bytes)");
    Ok(())
}
