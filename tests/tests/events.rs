//! Registry events and webhooks end to end: a real gateway in front of a real storage node,
//! a webhook receiver started here. Every push, tag move and delete of a scripted session
//! reaches the receiver with its actor, exactly once per event id, in order per repository —
//! across a `kill -9` of the gateway and of the storage node in the middle of the session,
//! and across the receiver being down for a minute; an endpoint that never answers gets
//! dead letters, which the admin listener lists and replays; an `https` endpoint is trusted
//! through the webhook's `ca_file`, and refused without it.

use anyhow::{Context, ensure};
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, image_config, sha256};
use portcullis_tests::deployment;
use portcullis_tests::receiver::{Delivery, Receiver};
use portcullis_tests::server::{GatewayServer, metric_sample, metrics_text};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const ALICE: (&str, &str) = ("alice", "events-alice-pw");
const HOOK_KEY: &str = "webhook-signing-key";

fn client_of(g: &GatewayServer) -> Client {
    deployment::user_client(g, ALICE.0, ALICE.1)
}

/// Pushes an image of its own under `reference` (a tag or its digest): its digest.
async fn push(
    c: &Client,
    repo: &str,
    reference: Option<&str>,
    label: &str,
) -> anyhow::Result<String> {
    let body = c
        .image_manifest(repo, &image_config(label), &[label.as_bytes()], None)
        .await?;
    let digest = sha256(&body).to_string();
    let r = c
        .put_manifest(repo, reference.unwrap_or(&digest), OCI_MANIFEST, &body)
        .await?;
    ensure!(r.status() == 201, "push {repo}: {}", describe(r).await);
    Ok(digest)
}

/// A gateway in `dir` whose state (the outbox too) is kept in a file, with `webhooks`.
fn gateway(
    dir: &Path,
    storage: &portcullis_tests::server::StorageServer,
    webhooks: &str,
) -> anyhow::Result<GatewayServer> {
    deployment::start_gateway_with_state(dir, &[storage], &[ALICE], webhooks)
}

/// The deliveries, one per event id (the first of each), waiting up to `within` for `n`.
async fn distinct(r: &Receiver, n: usize, within: Duration) -> anyhow::Result<Vec<Delivery>> {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<Delivery> = r
            .deliveries()
            .into_iter()
            .filter(|d| {
                seen.insert(
                    d.headers
                        .get("portcullis-event-id")
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .collect();
        if firsts.len() >= n {
            return Ok(firsts);
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {n} events arrived: {:?}",
            firsts.len(),
            firsts.iter().map(Delivery::json).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The signature a delivery should carry: HMAC-SHA256 of `<timestamp>.<body>`.
fn signature(d: &Delivery) -> String {
    let at = d
        .headers
        .get("portcullis-timestamp")
        .cloned()
        .unwrap_or_default();
    format!(
        "sha256={}",
        hmac_hex(&[at.as_bytes(), b".", &d.body].concat())
    )
}

fn hmac_hex(body: &[u8]) -> String {
    hmac_with(HOOK_KEY, body)
}

fn hmac_with(key: &str, body: &[u8]) -> String {
    let key = openssl::pkey::PKey::hmac(key.as_bytes()).unwrap();
    let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
    s.update(body).unwrap();
    hex::encode(s.sign_to_vec().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_change_reaches_the_webhook_once_per_id_in_order_across_kill_9() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    std::fs::write(gw.join("hook.key"), HOOK_KEY)?;
    // The receiver is down while the gateway and the storage node are killed: what they
    // recorded waits in the outbox and comes after.
    let mut ce = Receiver::start().await?;
    ce.stop().await;
    let dist = Receiver::start().await?;
    let hooks = format!(
        "[[webhooks]]\nname = \"all\"\nurl = \"{}\"\nsecret_file = \"{}\"\nmax_backoff_seconds = 2\n\
         [[webhooks]]\nname = \"team-a-pushes\"\nurl = \"{}\"\nformat = \"distribution\"\n\
         repositories = [\"team-a/**\"]\nactions = [\"push\", \"tag-move\"]\n",
        ce.url(),
        gw.join("hook.key").display(),
        dist.url(),
    );
    let g = gateway(&gw, &storage, &hooks)?;
    let c = client_of(&g);
    // (kind, repository, tag) as the session makes them.
    let mut expected: Vec<(&str, &str, Option<&str>)> = Vec::new();
    push(&c, "team-a/app", Some("v1"), "a").await?;
    expected.push(("push", "team-a/app", Some("v1")));
    push(&c, "team-a/app", Some("v1"), "b").await?;
    expected.push(("tag-move", "team-a/app", Some("v1")));
    let by_digest = push(&c, "team-a/app", None, "c").await?;
    expected.push(("push", "team-a/app", None));
    c.delete_manifest("team-a/app", "v1").await?;
    expected.push(("tag-delete", "team-a/app", Some("v1")));

    // kill -9 of the gateway: what it recorded is delivered by the next one.
    drop(g);
    let g = gateway(&gw, &storage, &hooks)?;
    let c = client_of(&g);
    push(&c, "team-b/tool", Some("1"), "d").await?;
    expected.push(("push", "team-b/tool", Some("1")));
    // kill -9 of the storage node; the gateway sees it back within its health check.
    storage.crash_and_restart()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = push(&c, "team-a/app", Some("v2"), "e").await {
        ensure!(
            Instant::now() < deadline,
            "no push after the storage node came back: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expected.push(("push", "team-a/app", Some("v2")));
    c.delete_manifest("team-a/app", &by_digest).await?;
    expected.push(("delete", "team-a/app", None));

    ce.listen().await?;
    // A lease window (30 s) may pass before the restarted gateway delivers.
    let got = distinct(&ce, expected.len(), Duration::from_secs(90)).await?;
    ensure!(
        got.len() == expected.len(),
        "more events than changes: {}",
        got.len()
    );
    let mut per_repo: HashMap<String, Vec<(String, Option<String>)>> = HashMap::new();
    for d in &got {
        let e = d.json();
        ensure!(e["specversion"] == "1.0", "{e}");
        ensure!(e["data"]["actor"]["name"] == "alice", "no actor: {e}");
        ensure!(e["id"].as_str() == d.headers.get("portcullis-event-id").map(String::as_str));
        let sig = d.headers.get("portcullis-signature").context("unsigned")?;
        ensure!(*sig == signature(d), "bad signature");
        per_repo
            .entry(e["data"]["repository"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push((
                e["type"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches("io.portcullis.registry.")
                    .to_owned(),
                e["data"]["tag"].as_str().map(str::to_owned),
            ));
    }
    for repo in ["team-a/app", "team-b/tool"] {
        let want: Vec<(String, Option<String>)> = expected
            .iter()
            .filter(|(_, r, _)| *r == repo)
            .map(|(k, _, t)| (k.to_string(), t.map(str::to_owned)))
            .collect();
        ensure!(
            per_repo.get(repo) == Some(&want),
            "{repo}: got {:?}, want {want:?}",
            per_repo.get(repo)
        );
    }
    // Each id's deliveries (retries included) carry the same event.
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    for d in ce.deliveries() {
        let id = d
            .headers
            .get("portcullis-event-id")
            .cloned()
            .unwrap_or_default();
        let first = bodies.entry(id).or_insert_with(|| d.body.clone());
        ensure!(*first == d.body, "one id, two events");
    }

    // The filtered webhook: team-a's pushes and moves only, in distribution's envelope.
    let want = expected
        .iter()
        .filter(|(k, r, _)| r.starts_with("team-a/") && matches!(*k, "push" | "tag-move"))
        .count();
    let got = distinct(&dist, want, Duration::from_secs(60)).await?;
    ensure!(got.len() == want);
    for d in &got {
        let e = &d.json()["events"][0];
        ensure!(
            e["action"] == "push" && e["actor"]["name"] == "alice",
            "{e}"
        );
        ensure!(e["target"]["repository"] == "team-a/app", "{e}");
        ensure!(
            d.headers.get("content-type").map(String::as_str)
                == Some("application/vnd.docker.distribution.events.v1+json")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_down_for_a_minute_misses_nothing_and_dead_letters_are_replayed()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let mut down = Receiver::start().await?;
    down.stop().await;
    let mut never = Receiver::start().await?;
    never.stop().await;
    let hooks = format!(
        "[[webhooks]]\nname = \"later\"\nurl = \"{}\"\n\
         [[webhooks]]\nname = \"never\"\nurl = \"{}\"\nmax_attempts = 2\nmax_backoff_seconds = 1\n",
        down.url(),
        never.url(),
    );
    let g = gateway(&gw, &storage, &hooks)?;
    let c = client_of(&g);
    for i in 0..3 {
        push(&c, "team-a/app", Some(&format!("t{i}")), &format!("x{i}")).await?;
    }
    // Down for a minute, then back.
    tokio::time::sleep(Duration::from_secs(60)).await;
    down.listen().await?;
    let got = distinct(&down, 3, Duration::from_secs(60)).await?;
    let tags: Vec<String> = got
        .iter()
        .map(|d| d.json()["data"]["tag"].as_str().unwrap_or("").to_owned())
        .collect();
    ensure!(tags == ["t0", "t1", "t2"], "{tags:?}");

    // The endpoint that never answered: three dead letters, listed, then replayed.
    let http = reqwest::Client::new();
    let letters: serde_json::Value = http
        .get(format!("{}/events/dead-letters", g.admin))
        .send()
        .await?
        .json()
        .await?;
    let letters = letters["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        letters.len() == 3 && letters.iter().all(|l| l["webhook"] == "never"),
        "{letters:?}"
    );
    never.listen().await?;
    // An administrator sees them in the console and replays the first there.
    let (ui, session) = deployment::console_sign_in(&g.base, &g.ca_pem, ALICE).await?;
    let cookie = format!("__Host-portcullis_ui={session}");
    let page = ui
        .get(format!("{}/ui/admin/events", g.base))
        .header("cookie", &cookie)
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.matches("aria-label=\"Replay never ").count() == 3,
        "{page}"
    );
    let csrf = portcullis_tests::oidc::field_value(&page, "csrf")?;
    let first = letters[0]["seq"].as_u64().context("no seq")?.to_string();
    let r = ui
        .post(format!("{}/ui/admin/events/replay", g.base))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("webhook", "never"),
            ("seq", first.as_str()),
        ])
        .send()
        .await?;
    ensure!(
        r.headers().get("location").and_then(|l| l.to_str().ok())
            == Some("/ui/admin/events?done=delivered"),
        "console replay: {}",
        r.status()
    );
    // The rest on the admin listener.
    for l in &letters[1..] {
        let seq = l["seq"].as_u64().context("no seq")?.to_string();
        let r = http
            .post(format!("{}/events/replay", g.admin))
            .query(&[("webhook", "never"), ("seq", seq.as_str())])
            .send()
            .await?;
        ensure!(r.status() == 200, "replay: {}", r.status());
    }
    ensure!(distinct(&never, 3, Duration::from_secs(5)).await?.len() == 3);
    let left: serde_json::Value = http
        .get(format!("{}/events/dead-letters", g.admin))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        left["dead_letters"].as_array().is_some_and(Vec::is_empty),
        "{left}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_endpoint_is_trusted_through_its_ca_file_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let rx = Receiver::start_tls(&dir.path().join("hook-tls")).await?;
    let ca = rx
        .ca_file()
        .context("a TLS receiver")?
        .display()
        .to_string();
    let hooks = format!(
        "[[webhooks]]\nname = \"trusted\"\nurl = \"{url}\"\nca_file = \"{ca}\"\n\
         [[webhooks]]\nname = \"untrusted\"\nurl = \"{url}\"\nmax_attempts = 1\n",
        url = rx.url(),
    );
    let g = gateway(&gw, &storage, &hooks)?;
    push(&client_of(&g), "team-a/app", Some("v1"), "tls").await?;
    // Without the CA the certificate is refused: a dead letter, nothing received.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = http
            .get(format!("{}/events/dead-letters", g.admin))
            .send()
            .await?
            .json()
            .await?;
        let letters = v["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.iter().any(|l| l["webhook"] == "untrusted") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no dead letter for the untrusted webhook: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = distinct(&rx, 1, Duration::from_secs(30)).await?;
    ensure!(got[0].json()["data"]["tag"] == "v1");
    ensure!(
        rx.deliveries().len() == 1,
        "{} deliveries: the untrusted webhook got through",
        rx.deliveries().len()
    );
    Ok(())
}

/// The tags of the deliveries `r` got so far.
fn tags(r: &Receiver) -> Vec<String> {
    r.deliveries()
        .iter()
        .map(|d| d.json()["data"]["tag"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Waits up to 30 s for `r` to get an event of `tag`; that delivery.
async fn delivered(r: &Receiver, tag: &str) -> anyhow::Result<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(d) = r
            .deliveries()
            .into_iter()
            .find(|d| d.json()["data"]["tag"] == tag)
        {
            return Ok(d);
        }
        ensure!(
            Instant::now() < deadline,
            "no event of {tag}: {:?}",
            tags(r)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `SIGHUP` puts `[[webhooks]]` changes in force without losing an event: a URL fixed while
/// its event is being retried (the next attempt goes to the new one), a webhook added (it gets
/// what follows), a rotated signing key (read again from its file), a webhook removed; a
/// table that does not load changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_fixes_a_webhook_url_adds_and_removes_webhooks_and_rotates_a_key()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let key_file = gw.join("hook-key");
    gateway::edge::tls::write_private(&key_file, HOOK_KEY.as_bytes())?;
    let mut wrong = Receiver::start().await?;
    wrong.stop().await;
    let (right, second) = (Receiver::start().await?, Receiver::start().await?);
    let hook = |url: &str| {
        format!(
            "[[webhooks]]\nname = \"hook\"\nurl = \"{url}\"\nsecret_file = \"{}\"\n\
             max_backoff_seconds = 1\nmax_attempts = 1000\n",
            key_file.display()
        )
    };
    let g = gateway(&gw, &storage, &hook(&wrong.url()))?;
    let c = client_of(&g);
    let conf = gw.join("gateway.toml");
    let at_start = std::fs::read_to_string(&conf)?;
    let with = |hooks: String| -> anyhow::Result<()> {
        std::fs::write(&conf, at_start.replace(&hook(&wrong.url()), &hooks))?;
        Ok(())
    };
    push(&c, "team-a/app", Some("v1"), "v1").await?;
    // Its delivery fails, and is retried.
    let failed = "gateway_webhook_deliveries_total{outcome=\"failed\",webhook=\"hook\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sample(&metrics_text(&g.admin).await?, failed).unwrap_or(0.0) < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "no failed delivery to the wrong URL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The URL fixed: the event being retried goes to the new one.
    with(hook(&right.url()))?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "success" && e["config.applied"] == serde_json::json!(["webhooks"]),
        "{e}"
    );
    let d = delivered(&right, "v1").await?;
    ensure!(d.headers.get("portcullis-signature") == Some(&signature(&d)));

    // A second webhook: it gets what follows.
    let both = format!(
        "{}[[webhooks]]\nname = \"second\"\nurl = \"{}\"\n",
        hook(&right.url()),
        second.url()
    );
    with(both.clone())?;
    ensure!(g.reload().await?["config.applied"] == serde_json::json!(["webhooks"]));
    push(&c, "team-a/app", Some("v2"), "v2").await?;
    delivered(&second, "v2").await?;
    delivered(&right, "v2").await?;

    // The signing key rotated in its file: the next event is signed with the new one.
    let rotated = "a-rotated-webhook-signing-key";
    gateway::edge::tls::write_private(&key_file, rotated.as_bytes())?;
    ensure!(g.reload().await?["config.applied"] == serde_json::json!(["webhooks"]));
    push(&c, "team-a/app", Some("v3"), "v3").await?;
    let d = delivered(&right, "v3").await?;
    let at = d
        .headers
        .get("portcullis-timestamp")
        .cloned()
        .unwrap_or_default();
    let with_rotated = format!(
        "sha256={}",
        hmac_with(rotated, &[at.as_bytes(), b".", &d.body].concat())
    );
    ensure!(
        d.headers.get("portcullis-signature") == Some(&with_rotated),
        "v3 not signed with the rotated key"
    );

    // A table that does not load (a key file that is not there): nothing changes.
    with(both.replace("hook-key", "no-such-key"))?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "failure"
            && e["event.reason"]
                .as_str()
                .is_some_and(|r| r.contains("webhooks")),
        "{e}"
    );
    push(&c, "team-a/app", Some("v4"), "v4").await?;
    delivered(&second, "v4").await?;
    delivered(&right, "v4").await?;

    // The second removed: the first goes on, the second gets nothing more.
    with(hook(&right.url()))?;
    ensure!(g.reload().await?["config.applied"] == serde_json::json!(["webhooks"]));
    push(&c, "team-a/app", Some("v5"), "v5").await?;
    delivered(&right, "v5").await?;
    // Had the second still been delivering, v5 would have reached it within a poll (¼ s) of
    // reaching the first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !tags(&second).contains(&"v5".to_owned()),
        "a removed webhook got v5"
    );

    // The last webhook removed: a restart (events are recorded while there is a consumer).
    with(String::new())?;
    let e = g.reload().await?;
    ensure!(
        e["config.applied"] == serde_json::json!([])
            && e["config.restart_needed"] == serde_json::json!(["webhooks"]),
        "{e}"
    );
    push(&c, "team-a/app", Some("v6"), "v6").await?;
    delivered(&right, "v6").await?;
    // Every event reached the first, in order.
    let mut seen = tags(&right);
    seen.dedup();
    ensure!(seen == ["v1", "v2", "v3", "v4", "v5", "v6"], "{seen:?}");
    Ok(())
}
