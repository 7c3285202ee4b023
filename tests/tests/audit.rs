//! End-to-end tests of the audit trail against the real gateway (`gateway dev`, whose trail is
//! `<data>/audit/audit.jsonl`) and `gateway audit verify`. `cargo test --release --test audit`
//! runs exactly these.

use anyhow::{Context, ensure};
use portcullis_tests::client::https;
use portcullis_tests::server::{GatewayServer, binary, metric_sample, metrics_text};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const PASSWORD: &str = "audit-admin-password";

fn events(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(file)?;
    // The gateway may be half-way through writing the last line: only complete lines count.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// Polls `get` until it returns at least `n` items (events and messages are written as
/// requests finish and as sinks deliver).
fn poll<T>(what: &str, n: usize, get: impl Fn() -> Vec<T>) -> anyhow::Result<Vec<T>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = get();
        if items.len() >= n {
            return Ok(items);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: {} of {n} arrived",
            items.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the trail until it has `n` events.
fn wait_for(file: &Path, n: usize) -> anyhow::Result<Vec<Value>> {
    poll("events", n, || events(file).unwrap_or_default())
}

/// `gateway audit verify <file>`: (success, its output).
fn verify(file: &Path) -> anyhow::Result<(bool, String)> {
    verify_with("gateway", file)
}

/// `<service binary> audit verify <file>`: (success, its output).
fn verify_with(service: &str, file: &Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(binary(service))
        .args(["audit", "verify"])
        .arg(file)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// Traffic that makes events: a token, a failed login, a robot created and used.
async fn traffic(g: &GatewayServer) -> anyhow::Result<String> {
    let http = https(&g.ca_pem, false);
    let token = |user: &str, pw: &str| {
        http.get(format!(
            "{}/token?service=portcullis&scope=repository:team-a/app:pull,push",
            g.base
        ))
        .basic_auth(user, Some(pw))
        .send()
    };
    ensure!(
        token("admin", PASSWORD).await?.status() == 200,
        "admin token"
    );
    ensure!(
        token("admin", "wrong-password").await?.status() == 401,
        "wrong password"
    );
    let r = http
        .post(format!("{}/admin/robots", g.base))
        .basic_auth("admin", Some(PASSWORD))
        .json(
            &json!({"project": "team-a", "name": "ci", "expires_in_seconds": 600,
                      "scope": [{"repositories": ["team-a/**"], "actions": ["pull", "push"]}]}),
        )
        .send()
        .await?;
    ensure!(r.status() == 201, "robot create: {}", r.status());
    let secret = r.json::<Value>().await?["secret"]
        .as_str()
        .context("no secret")?
        .to_string();
    portcullis_tests::remember_secret(&secret);
    ensure!(
        token("robot$team-a+ci", &secret).await?.status() == 200,
        "robot token"
    );
    Ok(secret)
}

#[tokio::test]
async fn the_trail_records_decisions_chains_them_and_verify_finds_tampering() -> anyhow::Result<()>
{
    let data = tempfile::tempdir()?;
    let file = data.path().join("audit/audit.jsonl");
    let mut g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    let secret = traffic(&g).await?;
    let all = wait_for(&file, 4)?;
    let find = |action: &str, outcome: &str, user: &str| {
        all.iter()
            .find(|e| {
                e["event.action"] == action
                    && e["event.outcome"] == outcome
                    && e["user.name"] == user
            })
            .cloned()
    };
    let issued = find("token", "success", "admin").context("admin's token event")?;
    ensure!(
        issued["token.granted"] == json!(["repository:team-a/app:pull,push"]),
        "{issued}"
    );
    ensure!(
        issued["identity.kind"] == "user" && issued["user.roles"] == json!(["registry-admins"]),
        "{issued}"
    );
    let failed = find("login", "failure", "admin").context("the failed login")?;
    ensure!(failed["event.reason"] == "invalid credentials", "{failed}");
    let created = find("robot-create", "success", "admin").context("robot-create")?;
    ensure!(created["robot"] == "robot$team-a+ci", "{created}");
    let robot = find("token", "success", "robot$team-a+ci").context("robot token")?;
    ensure!(robot["authenticator"] == "robot", "{robot}");
    for (i, e) in all.iter().enumerate() {
        ensure!(e["event.sequence"] == json!(i + 1), "sequence of {e}");
        ensure!(
            e["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{e}"
        );
    }
    let text = std::fs::read_to_string(&file)?;
    ensure!(
        !text.contains(PASSWORD) && !text.contains("wrong-password"),
        "a password in the trail"
    );
    ensure!(!text.contains(&secret), "the robot secret in the trail");
    ensure!(!text.contains("eyJ"), "a JWT in the trail");
    let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions());
    ensure!(
        mode & 0o077 == 0,
        "the trail is readable by others: {mode:o}"
    );

    // Intact, and still after a restart (the chain continues from the last line).
    let (ok, out) = verify(&file)?;
    ensure!(ok && out.contains("intact"), "{out}");
    drop(g);
    g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    traffic_after_restart(&g).await?;
    let all = wait_for(&file, all.len() + 1)?;
    let (ok, out) = verify(&file)?;
    ensure!(ok, "after a restart: {out}");
    ensure!(
        all.last().context("events")?["event.sequence"] == json!(all.len()),
        "sequence restarted"
    );

    // Tampering, each named by its line.
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let tampered = data.path().join("tampered.jsonl");
    let check = |lines: &[String], line: usize, word: &str| -> anyhow::Result<()> {
        std::fs::write(&tampered, lines.join("\n") + "\n")?;
        let (ok, out) = verify(&tampered)?;
        ensure!(
            !ok && out.contains(&format!("line {line}:")) && out.contains(word),
            "{out}"
        );
        Ok(())
    };
    let mut deleted = lines.clone();
    deleted.remove(1);
    check(&deleted, 2, "missing")?;
    let mut edited = lines.clone();
    edited[2] = edited[2].replacen("team-a", "team-b", 1);
    ensure!(edited[2] != lines[2], "nothing to edit in {}", lines[2]);
    check(&edited, 3, "edited")?;
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    check(&swapped, 2, "reordered")?;
    drop(g);
    Ok(())
}

async fn traffic_after_restart(g: &GatewayServer) -> anyhow::Result<()> {
    let http = https(&g.ca_pem, false);
    let r = http
        .get(format!("{}/token?service=portcullis", g.base))
        .basic_auth("admin", Some("wrong-again"))
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    Ok(())
}

/// A bearer token for `scope` from the dev gateway's admin.
async fn admin_token(g: &GatewayServer, scope: &str) -> anyhow::Result<String> {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/token?service=portcullis&scope={scope}", g.base))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    ensure!(r.status() == 200, "token: {}", r.status());
    Ok(r.json::<Value>().await?["token"]
        .as_str()
        .context("no token")?
        .to_string())
}

// Two workers: the requests go on while the test waits for rsyslogd to stop or start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_udp_tcp_tls_and_relp_while_the_receiver_restarts() -> anyhow::Result<()> {
    use portcullis_tests::syslog::{Rsyslog, parse};
    let mut rs = Rsyslog::start()?;
    let data = tempfile::tempdir()?;
    let conf = data.path().join("audit.toml");
    std::fs::write(
        &conf,
        format!(
            r#"[audit]
[[audit.syslog]]
address = "127.0.0.1:{udp}"
transport = "udp"
[[audit.syslog]]
address = "127.0.0.1:{tcp}"
transport = "tcp"
[[audit.syslog]]
address = "127.0.0.1:{tls}"
transport = "tls"
server_name = "localhost"
ca_file = "{ca}"
[[audit.syslog]]
address = "127.0.0.1:{relp}"
transport = "relp"
"#,
            udp = rs.udp,
            tcp = rs.tcp,
            tls = rs.tls,
            relp = rs.relp,
            ca = rs.ca_file.display()
        ),
    )?;
    let g = GatewayServer::start_dev_with(
        data.path(),
        Some(PASSWORD),
        &["--audit-config".as_ref(), conf.as_os_str()],
    )?;
    let file = data.path().join("audit/audit.jsonl");

    // A few events of both outcomes reach all three transports, formatted and in order.
    let token = admin_token(&g, "repository:team-a/app:pull").await?;
    let http = https(&g.ca_pem, false);
    let r = http
        .get(format!("{}/token?service=portcullis", g.base))
        .basic_auth("admin", Some("wrong-password"))
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    let trail = wait_for(&file, 2)?;
    for t in ["udp", "tcp", "tls", "relp"] {
        let lines = poll(t, trail.len(), || rs.received(t))?;
        for (line, event) in lines.iter().zip(&trail) {
            let m = parse(line).with_context(|| format!("{t}: {line}"))?;
            ensure!(&m.event == event, "{t}: {} is not {event}", m.event);
            ensure!(m.app == "portcullis-gateway", "{t}: app {}", m.app);
            ensure!(m.msgid == event["event.action"], "{t}: msgid {}", m.msgid);
            ensure!(m.timestamp == event["@timestamp"], "{t}: {}", m.timestamp);
            // Facility 13 (log audit): notice for a success, warning for a failure.
            let pri = if event["event.outcome"] == "success" {
                109
            } else {
                108
            };
            ensure!(m.pri == pri, "{t}: PRI {} for {event}", m.pri);
        }
    }

    // 1,000 requests, each audited once; rsyslogd is stopped a third of the way in and
    // started again at two thirds.
    let url = format!("{}/v2/team-a/app/tags/list", g.base);
    let before = trail.len();
    let mut sent = 0;
    for round in 0..10 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            batch.spawn(async move { http.get(url).bearer_auth(token).send().await });
        }
        // While this round's requests are in flight.
        if round == 3 {
            rs.stop()?;
        }
        if round == 7 {
            rs.run()?;
        }
        while let Some(r) = batch.join_next().await {
            let status = r??.status();
            ensure!(status == 404, "tags list of an empty repository: {status}");
            sent += 1;
        }
    }
    ensure!(sent == 1000, "{sent} requests");
    let trail = wait_for(&file, before + 1000)?;
    ensure!(trail.len() == before + 1000, "{} events", trail.len());
    let received = |t: &str| -> anyhow::Result<Vec<Value>> {
        rs.received(t)
            .iter()
            .map(|l| parse(l).map(|m| m.event))
            .collect()
    };
    // RELP (acknowledged): every event exactly once, in order.
    poll("relp", trail.len(), || rs.received("relp"))?;
    let got = received("relp")?;
    ensure!(
        got.len() == trail.len(),
        "relp: {} events received, {} recorded (duplicates?)",
        got.len(),
        trail.len()
    );
    for (i, (a, b)) in got.iter().zip(&trail).enumerate() {
        ensure!(
            a == b,
            "relp: event {i} is sequence {}, expected {}",
            a["event.sequence"],
            b["event.sequence"]
        );
    }
    // TCP and TLS (no acknowledgement): what the receiver took while stopping may be lost,
    // but what arrives is in order, never twice, and everything after the restart arrives.
    for t in ["tcp", "tls"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = received(t)?;
            let seqs: Vec<u64> = got
                .iter()
                .filter_map(|e| e["event.sequence"].as_u64())
                .collect();
            ensure!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{t}: out of order or repeated"
            );
            if seqs.last()
                == trail
                    .last()
                    .and_then(|e| e["event.sequence"].as_u64())
                    .as_ref()
            {
                let lost = trail.len() - got.len();
                eprintln!("{t}: {lost} of 1000 events lost while rsyslogd stopped");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{t}: the last event never arrived"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let burst = &trail[before..];
    ensure!(
        burst
            .iter()
            .all(|e| e["event.action"] == "tags-list" && e["event.outcome"] == "failure"),
        "burst events: {}",
        burst[0]
    );
    let metrics = metrics_text(&g.admin).await?;
    ensure!(
        metrics.contains("gateway_audit_spool_bytes{sink=\"tcp-127.0.0.1:"),
        "{metrics}"
    );
    Ok(())
}

/// The next `n` registry events (`event.category: registry`) after the first `*seen`
/// lines; they are written as requests finish, so this waits for them. A request that
/// should make none is checked by the next one's event coming first.
fn registry_events(file: &Path, seen: &mut usize, n: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = events(file)?;
        let new: Vec<Value> = all[*seen..]
            .iter()
            .filter(|e| e["event.category"] == "registry")
            .cloned()
            .collect();
        if new.len() >= n {
            *seen = all.len();
            ensure!(
                new.len() == n,
                "{} events, {n} expected: {new:?}",
                new.len()
            );
            return Ok(new);
        }
        ensure!(
            Instant::now() < deadline,
            "{} events, {n} expected: {new:?}",
            new.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks `fields` of `event` (`null` expects the field to be absent).
fn expect(event: &Value, fields: Value) -> anyhow::Result<()> {
    for (k, v) in fields.as_object().context("fields")? {
        let got = event.get(k).unwrap_or(&Value::Null);
        ensure!(got == v, "{k} is {got}, expected {v}, in {event}");
    }
    Ok(())
}

/// The single event the last step made.
fn one(file: &Path, seen: &mut usize) -> anyhow::Result<Value> {
    Ok(registry_events(file, seen, 1)?.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_registry_operation_and_refusal_is_an_exact_event() -> anyhow::Result<()> {
    use portcullis_tests::client::{OCI_MANIFEST, sha256};
    use portcullis_tests::deployment::{self, user_client};
    use reqwest::Method;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let storage = deployment::storage_node(&d.join("storage"))?;
    let file = d.join("audit/audit.jsonl");
    let g = deployment::start_gateway_with(
        d,
        &[&storage],
        &[
            ("bob", "bob-pw"),
            ("alice", "alice-pw"),
            ("carol", "carol-pw"),
        ],
        4,
        &format!(
            "[audit]\nfile = \"{}\"\ninstance = \"gw-test-1\"\n",
            file.display()
        ),
        &[],
    )?;
    let ua = "audit-test/1.0";
    let with_ua = |mut c: portcullis_tests::client::Client| {
        c.headers.push(("user-agent".into(), ua.into()));
        c
    };
    let bob = with_ua(user_client(&g, "bob", "bob-pw"));
    let alice = with_ua(user_client(&g, "alice", "alice-pw"));
    let carol = with_ua(user_client(&g, "carol", "carol-pw"));
    let mut seen = 0;
    let bob_is = json!({"user.name": "bob", "user.roles": ["team-a"], "identity.kind": "user",
        "source.ip": "127.0.0.1", "user_agent.original": ua, "service.node.name": "gw-test-1",
        "repository": "team-a/app", "event.category": "registry"});

    // A push: the config and layer blobs (monolithic POSTs), then the tag, created.
    let (m1, d1) = bob
        .push_image("team-a/app", "latest", &[b"layer-one"])
        .await?;
    let e = registry_events(&file, &mut seen, 3)?;
    for b in &e[..2] {
        expect(b, bob_is.clone())?;
        expect(
            b,
            json!({"event.action": "blob-push", "event.outcome": "success",
            "http.request.method": "POST", "http.response.status_code": 201}),
        )?;
    }
    expect(
        &e[1],
        json!({"digest": sha256(b"layer-one").to_string(),
        "http.request.body.bytes": 9}),
    )?;
    expect(&e[2], bob_is.clone())?;
    expect(
        &e[2],
        json!({"event.action": "tag-create", "event.outcome": "success",
        "tag": "latest", "digest": d1.to_string(), "http.request.method": "PUT",
        "url.path": "/v2/team-a/app/manifests/latest", "http.response.status_code": 201,
        "http.request.body.bytes": m1.len(), "event.reason": null, "previous_digest": null}),
    )?;
    let id = e[2]["http.request.id"].as_str().context("request id")?;
    ensure!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    ensure!(
        e[2]["event.duration"].as_u64().is_some_and(|n| n > 0),
        "duration"
    );

    // Pulls, with the client's request id kept and returned.
    let r = bob
        .req(Method::GET, "/v2/team-a/app/manifests/latest")
        .header("x-request-id", "pull-1")
        .send()
        .await?;
    ensure!(r.headers()["x-request-id"] == "pull-1", "{:?}", r.headers());
    let body = r.bytes().await?;
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "manifest-pull",
        "event.outcome": "success", "tag": "latest", "digest": d1.to_string(),
        "http.request.id": "pull-1", "http.response.body.bytes": body.len(),
        "user.name": "bob"}),
    )?;
    let layer = sha256(b"layer-one");
    let r = bob.get(&format!("/v2/team-a/app/blobs/{layer}")).await?;
    ensure!(r.headers().contains_key("x-request-id"), "no request id");
    ensure!(r.bytes().await?.len() == 9, "layer");
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "blob-pull",
        "digest": layer.to_string(), "http.response.body.bytes": 9,
        "http.response.status_code": 200}),
    )?;
    // HEAD probes are not audited (the next event is the tags list's).
    let r = bob
        .req(Method::HEAD, &format!("/v2/team-a/app/blobs/{layer}"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(
        bob.get("/v2/team-a/app/tags/list").await?.status() == 200,
        "tags"
    );
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "tags-list",
        "event.outcome": "success"}),
    )?;

    // A mutable tag moved: overwrite, with the digest it had.
    let m2 = bob
        .image_manifest("team-a/app", b"{\"v\":2}", &[], None)
        .await?;
    let d2 = sha256(&m2);
    registry_events(&file, &mut seen, 1)?; // the config blob
    let r = bob
        .put_manifest("team-a/app", "latest", OCI_MANIFEST, &m2)
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    ensure!(
        !r.headers().contains_key("portcullis-previous-digest"),
        "internal header leaked"
    );
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "tag-overwrite",
        "event.outcome": "success", "digest": d2.to_string(),
        "previous_digest": d1.to_string()}),
    )?;
    // The same manifest again: the tag does not move.
    bob.put_manifest("team-a/app", "latest", OCI_MANIFEST, &m2)
        .await?;
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "manifest-push",
        "previous_digest": d2.to_string()}),
    )?;

    // An immutable tag (v1.0.0, conf/policy.toml): created, then a re-push refused.
    let r = bob
        .put_manifest("team-a/app", "v1.0.0", OCI_MANIFEST, &m1)
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "tag-create", "tag": "v1.0.0"}),
    )?;
    let r = bob
        .put_manifest("team-a/app", "v1.0.0", OCI_MANIFEST, &m2)
        .await?;
    ensure!(r.status() == 403, "{}", r.status());
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "tag-overwrite",
        "event.outcome": "failure", "http.response.status_code": 403,
        "event.reason": "tag v1.0.0 is immutable and already exists", "tag": "v1.0.0"}),
    )?;

    // Break-glass: an admin deletes the immutable tag; two events.
    let r = alice
        .req(Method::DELETE, "/v2/team-a/app/manifests/v1.0.0")
        .send()
        .await?;
    ensure!(r.status() == 202, "{}", r.status());
    let e = registry_events(&file, &mut seen, 2)?;
    for (ev, action) in e.iter().zip(["break-glass", "tag-delete"]) {
        expect(
            ev,
            json!({"event.action": action, "event.outcome": "success",
            "user.name": "alice", "user.roles": ["registry-admins"], "break_glass": true,
            "tag": "v1.0.0", "http.request.method": "DELETE"}),
        )?;
    }

    // A mount from a repository bob can read.
    let r = bob
        .req(
            Method::POST,
            &format!("/v2/team-a/other/blobs/uploads/?mount={layer}&from=team-a/app"),
        )
        .send()
        .await?;
    ensure!(r.status() == 201, "mount: {}", r.status());
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "blob-mount",
        "event.outcome": "success", "repository": "team-a/other",
        "digest": layer.to_string(), "mount_from": "team-a/app"}),
    )?;

    // Refusals: a token without push, a bad token; no event for the bare challenge.
    carol.push_is_denied("team-a/app").await?;
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "blob-push",
        "event.outcome": "failure", "user.name": "carol", "user.roles": [],
        "http.response.status_code": 401,
        "event.reason": "insufficient_scope: the token does not grant repository:team-a/app:push"}),
    )?;
    let http = https(&g.ca_pem, false);
    let url = format!("{}/v2/team-a/app/manifests/latest", g.base);
    let r = http.get(&url).bearer_auth("not.a.token").send().await?;
    ensure!(r.status() == 401, "{}", r.status());
    let e = one(&file, &mut seen)?;
    expect(
        &e,
        json!({"event.action": "manifest-pull", "event.outcome": "failure",
        "identity.kind": "none", "user.name": null, "http.response.status_code": 401}),
    )?;
    ensure!(
        e["event.reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("invalid_token")),
        "{e}"
    );
    ensure!(http.get(&url).send().await?.status() == 401, "challenge");
    // An unknown manifest: a failed pull, storage's status (and no event for the challenge
    // before it).
    ensure!(
        bob.get("/v2/team-a/app/manifests/nope").await?.status() == 404,
        "404"
    );
    expect(
        &one(&file, &mut seen)?,
        json!({"event.action": "manifest-pull",
        "event.outcome": "failure", "http.response.status_code": 404,
        "event.reason": "not found", "tag": "nope"}),
    )?;

    // The whole trail, token events included, is intact.
    let (ok, out) = verify(&file)?;
    ensure!(ok, "{out}");
    Ok(())
}

/// `promtool check metrics` on a `/metrics` text: its complaints, if any.
fn promtool(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool (apt-get install prometheus)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_both_services_pass_promtool_and_count_what_happened() -> anyhow::Result<()> {
    use portcullis_tests::client::sha256;
    use portcullis_tests::deployment::{self, user_client};
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let g = deployment::start_gateway(dir.path(), &[&storage], &[("bob", "bob-pw")], 4)?;
    let http = https(&g.ca_pem, false);
    let bob = user_client(&g, "bob", "bob-pw");
    let layer = vec![7u8; 5000];
    bob.push_image("team-a/app", "v1", &[&layer]).await?;
    let r = bob
        .get(&format!("/v2/team-a/app/blobs/{}", sha256(&layer)))
        .await?;
    ensure!(r.bytes().await?.len() == 5000, "pull");
    let r = http
        .get(format!("{}/token?service={}", g.base, deployment::SERVICE))
        .basic_auth("bob", Some("wrong"))
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    let r = http
        .get(format!(
            "{}/token?service={}&scope=repository:team-a/app:pull",
            g.base,
            deployment::SERVICE
        ))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());

    let gw = metrics_text(&g.admin).await?;
    promtool(&gw).context("gateway")?;
    let st = metrics_text(&storage.base).await?;
    promtool(&st).context("storage")?;

    let node = storage.base.trim_start_matches("http://");
    let want = [
        (format!("gateway_upstream_healthy{{node=\"{node}\"}}"), 1.0),
        (
            "gateway_authenticator_answers_total{authenticator=\"htpasswd\",outcome=\"invalid_credentials\"}".into(),
            1.0,
        ),
        (
            "gateway_token_decisions_total{authenticator=\"password\",outcome=\"denied\"}".into(),
            1.0,
        ),
        (
            "gateway_repository_bytes_total{direction=\"out\",repository=\"team-a/app\"}".into(),
            5000.0,
        ),
        (
            "gateway_audit_events_total{action=\"blob-pull\",outcome=\"success\"}".into(),
            1.0,
        ),
        ("storage_blobs".into(), 3.0),
    ];
    for (series, value) in &want {
        let text = if series.starts_with("storage") {
            &st
        } else {
            &gw
        };
        ensure!(
            metric_sample(text, series) == Some(*value),
            "{series} is {:?}, expected {value}",
            metric_sample(text, series)
        );
    }
    // Pushed bytes: the layer, the config and the manifest went in.
    let pushed = metric_sample(
        &gw,
        "gateway_repository_bytes_total{direction=\"in\",repository=\"team-a/app\"}",
    )
    .context("bytes in")?;
    ensure!(pushed > 5000.0, "{pushed}");
    // The test client asks for pull,push,delete: bob (a developer) gets less.
    for (outcome, n) in [("partial", 1.0), ("granted", 1.0)] {
        let series = format!(
            "gateway_token_decisions_total{{authenticator=\"user\",outcome=\"{outcome}\"}}"
        );
        ensure!(metric_sample(&gw, &series) == Some(n), "{series}: {gw}");
    }
    ensure!(
        gw.contains("gateway_authenticator_duration_seconds_bucket{authenticator=\"htpasswd\""),
        "authenticator latency"
    );
    Ok(())
}

#[tokio::test]
async fn sighup_reopens_the_trail_for_logrotate_and_the_chain_goes_on() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let file = data.path().join("audit/audit.jsonl");
    let g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    let http = https(&g.ca_pem, false);
    let fail = || {
        http.get(format!("{}/token?service=portcullis", g.base))
            .basic_auth("admin", Some("wrong-password"))
            .send()
    };
    ensure!(fail().await?.status() == 401, "login");
    let before = wait_for(&file, 1)?;
    // logrotate's default: move the file away, then signal.
    let rotated = data.path().join("audit/audit.jsonl.1");
    std::fs::rename(&file, &rotated)?;
    let pid = g.pid().context("pid")?;
    portcullis_tests::tools::run(
        std::process::Command::new("kill").args(["-HUP", &pid.to_string()]),
    )?;
    // The signal is handled on the side runtime; the next event after it opens the new file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        ensure!(Instant::now() < deadline, "no new file after SIGHUP");
        ensure!(fail().await?.status() == 401, "login");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = wait_for(&file, 1)?;
    let old = events(&rotated)?;
    ensure!(
        old.len() >= before.len(),
        "events lost from the rotated file"
    );
    let last = old.last().context("rotated file empty")?;
    ensure!(
        after[0]["event.sequence"] == json!(last["event.sequence"].as_u64().unwrap_or(0) + 1)
            && after[0]["audit.prev"] == last["audit.hash"],
        "the new file does not continue the chain: {} after {}",
        after[0],
        last
    );
    for f in [&rotated, &file] {
        let (ok, out) = verify(f)?;
        ensure!(ok, "{out}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions());
    ensure!(
        mode & 0o077 == 0,
        "the new trail is readable by others: {mode:o}"
    );
    Ok(())
}

#[tokio::test]
async fn session_revocations_are_audited() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let file = data.path().join("audit/audit.jsonl");
    let g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    let http = https(&g.ca_pem, false);
    let r = http
        .get(format!(
            "{}/token?service=portcullis&offline_token=true&client_id=laptop",
            g.base
        ))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let refresh = r.json::<Value>().await?["refresh_token"]
        .as_str()
        .context("no refresh token")?
        .to_string();
    portcullis_tests::remember_secret(&refresh);
    let list: Value = http
        .get(format!("{}/auth/sessions", g.base))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await?
        .json()
        .await?;
    let sid = list["sessions"][0]["id"]
        .as_str()
        .context("session id")?
        .to_string();
    for (id, status) in [(sid.as_str(), 200), ("0123456789abcdef", 404)] {
        let r = http
            .delete(format!("{}/auth/sessions/{id}", g.base))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await?;
        ensure!(r.status() == status, "{id}: {}", r.status());
    }
    let all = wait_for(&file, 3)?;
    let revokes: Vec<&Value> = all
        .iter()
        .filter(|e| e["event.action"] == "session-revoke")
        .collect();
    ensure!(revokes.len() == 2, "{revokes:?}");
    ensure!(
        revokes[0]["event.outcome"] == "success"
            && revokes[0]["session"] == sid.as_str()
            && revokes[0]["user.name"] == "admin"
            && revokes[0]["admin"] == true
            && revokes[0]["http.request.method"] == "DELETE",
        "{}",
        revokes[0]
    );
    ensure!(
        revokes[1]["event.outcome"] == "failure"
            && revokes[1]["event.reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("no such session")),
        "{}",
        revokes[1]
    );
    let text = std::fs::read_to_string(&file)?;
    ensure!(!text.contains(&refresh), "the refresh token in the trail");
    Ok(())
}

/// The actions of the token's first access entry.
fn granted_actions(token: &str) -> Vec<String> {
    portcullis_tests::client::jwt_claims(token)
        .and_then(|c| {
            c["access"][0]["actions"].as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_policy_reload_on_sighup_takes_effect_and_a_broken_file_changes_nothing()
-> anyhow::Result<()> {
    use portcullis_tests::deployment::{start_gateway_with, storage_node};
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let storage = storage_node(&d.join("storage"))?;
    let trail = d.join("audit.jsonl");
    let g = start_gateway_with(
        d,
        &[&storage],
        &[("bob", "bob-password")],
        4,
        &format!("[audit]\nfile = \"{}\"\n", trail.display()),
        &[],
    )?;
    let http = https(&g.ca_pem, false);
    let bobs_actions = || async {
        let r = http
            .get(format!(
                "{}/token?service={}&scope=repository:team-a/app:pull,push",
                g.base,
                portcullis_tests::deployment::SERVICE
            ))
            .basic_auth("bob", Some("bob-password"))
            .send()
            .await?;
        ensure!(r.status() == 200, "{}", r.status());
        let token = r.json::<Value>().await?["token"]
            .as_str()
            .context("no token")?
            .to_string();
        portcullis_tests::remember_secret(&token);
        let mut a = granted_actions(&token);
        a.sort();
        Ok::<_, anyhow::Error>(a)
    };
    ensure!(bobs_actions().await? == ["pull", "push"]);
    let hup = || {
        portcullis_tests::tools::run(
            std::process::Command::new("kill").args(["-HUP", &g.pid().unwrap_or(0).to_string()]),
        )
    };
    let reloads = || -> Vec<Value> {
        events(&trail)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["event.action"] == "policy-reload")
            .collect()
    };

    // team-a becomes read-only: after SIGHUP bob's new tokens carry pull only.
    let file = d.join("policy.toml");
    let shipped = std::fs::read_to_string(&file)?;
    let read_only = shipped.replacen(
        "groups = [\"team-a\"]\nrole = \"developer\"",
        "groups = [\"team-a\"]\nrole = \"reader\"",
        1,
    );
    ensure!(read_only != shipped, "the shipped policy changed shape");
    std::fs::write(&file, &read_only)?;
    hup()?;
    let seen = poll("the reload event", 1, reloads)?;
    ensure!(bobs_actions().await? == ["pull"]);
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(read_only.as_bytes()));
    expect(
        &seen[0],
        json!({"event.outcome": "success", "policy.file": file.display().to_string(),
               "policy.sha256": sha}),
    )?;

    // A file that does not compile: audited as a failure, the policy in force stays.
    std::fs::write(
        &file,
        "[[bindings]]\nrepositories = [\"team-a/**\"]\nrole = \"no-such-role\"\n",
    )?;
    hup()?;
    let seen = poll("the failed reload event", 2, reloads)?;
    ensure!(seen[1]["event.outcome"] == "failure", "{}", seen[1]);
    ensure!(
        seen[1]["event.reason"]
            .as_str()
            .is_some_and(|r| r.contains("no-such-role")),
        "{}",
        seen[1]
    );
    ensure!(bobs_actions().await? == ["pull"]);
    let (ok, out) = verify(&trail)?;
    ensure!(ok, "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_fail_closed_spool_refuses_writes_until_the_receiver_is_back() -> anyhow::Result<()>
{
    use portcullis_tests::syslog::{Rsyslog, parse};
    let mut rs = Rsyslog::start()?;
    rs.stop()?;
    let data = tempfile::tempdir()?;
    let conf = data.path().join("audit.toml");
    std::fs::write(
        &conf,
        format!(
            "[audit]\nspool_max_bytes = 8192\non_spool_full = \"fail-closed\"\n\
             [[audit.syslog]]\naddress = \"127.0.0.1:{}\"\ntransport = \"tcp\"\n",
            rs.tcp
        ),
    )?;
    let g = GatewayServer::start_dev_with(
        data.path(),
        Some(PASSWORD),
        &["--audit-config".as_ref(), conf.as_os_str()],
    )?;
    let token = admin_token(&g, "repository:team-a/app:pull,push").await?;
    let http = https(&g.ca_pem, false);
    let start_upload = || {
        http.post(format!("{}/v2/team-a/app/blobs/uploads/", g.base))
            .bearer_auth(&token)
            .send()
    };
    // A read: 404 (no tags yet) or 200 (uploads started make the repository known).
    let read = || async {
        let s = http
            .get(format!("{}/v2/team-a/app/tags/list", g.base))
            .bearer_auth(&token)
            .send()
            .await?
            .status();
        Ok::<_, anyhow::Error>(s == 200 || s == 404)
    };
    ensure!(start_upload().await?.status() == 202, "a write before");

    // The receiver is down: events spool until 8 KiB, then writes are refused; reads go on.
    let mut refused = None;
    for _ in 0..200 {
        ensure!(read().await?, "a read while the spool fills");
        let r = start_upload().await?;
        if r.status() == 503 {
            refused = Some(r.json::<Value>().await?);
            break;
        }
        ensure!(r.status() == 202, "{}", r.status());
    }
    let body = refused.context("writes were never refused")?;
    ensure!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("audit")),
        "{body}"
    );
    ensure!(read().await?, "reads while writes are refused");
    let metrics = metrics_text(&g.admin).await?;
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_audit_dropped_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(dropped >= 1.0, "no drop counted");

    // The receiver is back: the spool drains in order and writes are accepted again.
    rs.run()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = start_upload().await?.status();
        if status == 202 {
            break;
        }
        ensure!(status == 503, "{status}");
        ensure!(Instant::now() < deadline, "writes still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = poll("spooled events", 10, || rs.received("tcp"))?;
    let sequences: Vec<u64> = received
        .iter()
        .map(|l| Ok(parse(l)?.event["event.sequence"].as_u64().unwrap_or(0)))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "out of order: {sequences:?}"
    );
    let (ok, out) = verify(&data.path().join("audit/audit.jsonl"))?;
    ensure!(ok, "{out}");
    Ok(())
}

/// The storage service's trail: one exact event per tag retention deleted and per manifest,
/// layer link and blob garbage collection deleted — the same as the run's report — chained
/// (`storage-backend audit verify`, which also finds an edit), counted in
/// `storage_audit_events_total`; a dry run records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_and_retention_deletions_are_exact_events_in_the_storage_trail() -> anyhow::Result<()> {
    use portcullis_tests::client::{Client, sha256};
    use portcullis_tests::server::{StorageOptions, StorageServer};
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let file = d.join("storage-audit/audit.jsonl");
    let policy = d.join("retention.toml");
    std::fs::write(
        &policy,
        "[[retention]]\nrepositories = [\"team-a/**\"]\nkeep_last = 1\n",
    )?;
    let conf = d.join("storage.toml");
    std::fs::write(
        &conf,
        format!(
            "[gc]\ngrace_seconds = 0\nfence_seconds = 0.1\nretention_policy = \"{}\"\n\n\
             [audit]\nfile = \"{}\"\ninstance = \"storage-test-1\"\n",
            policy.display(),
            file.display()
        ),
    )?;
    let node = StorageServer::start_with(
        &d.join("root"),
        StorageOptions {
            config: Some(conf),
            ..Default::default()
        },
    )?;
    let c = Client::new(&node.base);
    let config_json = portcullis_tests::client::image_config;
    let config_of = |tag: &str| sha256(&config_json(tag)).to_string();
    // keep_last = 1: the older of team-a/app's two tags goes, and with it its image.
    let (_, old) = c.push_image("team-a/app", "old", &[b"old layer"]).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.push_image("team-a/app", "new", &[b"new layer"]).await?;
    // An image whose manifest is deleted by hand: its blobs and layer links go at GC.
    let (_, gone) = c.push_image("team-b/app", "x", &[b"gone layer!"]).await?;
    let r = c
        .req(
            reqwest::Method::DELETE,
            &format!("/v2/team-b/app/manifests/{gone}"),
        )
        .send()
        .await?;
    ensure!(r.status() == 202, "delete: {}", r.status());

    let http = reqwest::Client::new();
    let dry: Value = http
        .post(format!("{}/gc?dry_run=true", node.base))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        dry["blobs_deleted"]
            .as_array()
            .is_some_and(|b| b.len() == 6),
        "{dry}"
    );
    ensure!(
        events(&file).unwrap_or_default().is_empty(),
        "a dry run recorded events"
    );
    let report: Value = http
        .post(format!("{}/gc", node.base))
        .send()
        .await?
        .json()
        .await?;
    let run = report["run"].as_str().context("run")?;

    // What was deleted, as the events must say it, in the order of the run.
    let storage = json!({"event.outcome": "success", "event.category": "storage",
        "gc.run": run, "service.node.name": "storage-test-1", "service.type": "storage",
        "audit.schema": "1.1", "user.name": null});
    let mut expected = vec![json!({"event.action": "retention-delete-tag",
        "repository": "team-a/app", "tag": "old", "digest": old.to_string(),
        "event.reason": report["retention"][0]["reason"].clone()})];
    ensure!(
        report["retention"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{report}"
    );
    expected.push(
        json!({"event.action": "gc-delete-manifest", "repository": "team-a/app",
        "digest": old.to_string()}),
    );
    let links: BTreeSet<(&str, String)> = [
        ("team-a/app", config_of("old")),
        ("team-a/app", sha256(b"old layer").to_string()),
        ("team-b/app", config_of("x")),
        ("team-b/app", sha256(b"gone layer!").to_string()),
    ]
    .into();
    for (repo, digest) in &links {
        expected.push(
            json!({"event.action": "gc-delete-layer-link", "repository": repo,
            "digest": digest}),
        );
    }
    let mut blobs: BTreeSet<(String, u64)> = [
        (config_of("old"), config_json("old").len() as u64),
        (sha256(b"old layer").to_string(), 9),
        (config_of("x"), config_json("x").len() as u64),
        (sha256(b"gone layer!").to_string(), 11),
    ]
    .into();
    for m in report["manifests_deleted"]
        .as_array()
        .context("manifests_deleted")?
    {
        ensure!(m == &json!(format!("team-a/app@{old}")), "{report}");
    }
    // The two manifests' own blobs (sizes from the report, checked against the content below).
    let sizes: std::collections::HashMap<String, u64> = report["blobs_deleted"]
        .as_array()
        .context("blobs_deleted")?
        .iter()
        .map(|b| {
            (
                b["digest"].as_str().unwrap_or("").to_string(),
                b["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    for m in [&old, &gone] {
        let size = *sizes
            .get(&m.to_string())
            .context("a manifest's blob not reclaimed")?;
        blobs.insert((m.to_string(), size));
    }
    for (digest, size) in &blobs {
        expected.push(json!({"event.action": "gc-delete-blob", "digest": digest,
            "file.size": size}));
    }

    let got = wait_for(&file, expected.len())?;
    ensure!(got.len() == expected.len(), "{} events: {got:?}", got.len());
    // Links and blobs may be swept in any order within their kind: match each kind as a set.
    for kind in [
        "retention-delete-tag",
        "gc-delete-manifest",
        "gc-delete-layer-link",
        "gc-delete-blob",
    ] {
        let mut want: Vec<&Value> = expected
            .iter()
            .filter(|e| e["event.action"] == kind)
            .collect();
        let have: Vec<&Value> = got.iter().filter(|e| e["event.action"] == kind).collect();
        ensure!(have.len() == want.len(), "{kind}: {have:?}");
        for e in have {
            expect(e, storage.clone())?;
            let i = want
                .iter()
                .position(|w| expect(e, (*w).clone()).is_ok())
                .with_context(|| format!("unexpected {e}"))?;
            want.remove(i);
        }
    }
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|e| e["event.action"].as_str())
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort_by_key(|k| {
        [
            "retention-delete-tag",
            "gc-delete-manifest",
            "gc-delete-layer-link",
            "gc-delete-blob",
        ]
        .iter()
        .position(|x| x == k)
    });
    ensure!(kinds == sorted, "events out of the run's order: {kinds:?}");
    ensure!(
        report["bytes_reclaimed"].as_u64() == Some(blobs.iter().map(|(_, s)| s).sum()),
        "{report}"
    );

    let (ok, out) = verify_with("storage-backend", &file)?;
    ensure!(ok && out.contains("intact, 12 events"), "{out}");
    let metrics = metrics_text(&node.base).await?;
    ensure!(
        metric_sample(
            &metrics,
            "storage_audit_events_total{action=\"gc-delete-blob\",outcome=\"success\"}"
        ) == Some(6.0),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&file)?;
    std::fs::write(&file, text.replacen("team-b/app", "team-c/app", 1))?;
    let (ok, out) = verify_with("storage-backend", &file)?;
    ensure!(!ok && out.contains("edited"), "{out}");
    Ok(())
}
