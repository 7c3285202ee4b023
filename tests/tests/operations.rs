//! Operations: a gateway asked to drain (`SIGTERM`) says it is not ready, refuses new
//! connections, finishes the 1 GiB push in flight, and exits by itself once nothing is left;
//! `SIGHUP` puts a new htpasswd file's users and the config file's `[limits]` in force (a broken
//! file changes nothing), audited, while uploads go on; a storage node asked to stop fails its
//! health check at once and finishes the upload in flight; a gateway
//! and a storage node configured by `PORTCULLIS_<TABLE>_<KEY>` variables alone (no file) serve
//! the protocol suite.

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures_util::StreamExt;
use portcullis_tests::client::{Client, TokenAuth, describe, with_query};
use portcullis_tests::deployment;
use portcullis_tests::protocol;
use portcullis_tests::server::{GatewayServer, StorageOptions, StorageServer};
use reqwest::Method;
use sha2::Digest as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ALICE: (&str, &str) = ("alice", "operations-alice-pw");

/// Waits, up to `within`, for `addr` to refuse new connections.
async fn refuses_connections(addr: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(addr).is_ok() {
        ensure!(
            Instant::now() < deadline,
            "{addr} still takes new connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A push of a blob of `pieces` copies of `piece`, one sent every `pause`, into a new upload
/// session of `repo` (`PUT ?digest=` with the whole body): the request, now in flight, and
/// the blob's digest.
async fn slow_upload(
    c: &Client,
    repo: &str,
    piece: Bytes,
    pieces: u64,
    pause: Duration,
) -> anyhow::Result<(
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    String,
)> {
    let len = pieces * piece.len() as u64;
    let mut h = sha2::Sha256::new();
    for _ in 0..pieces {
        h.update(&piece);
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let body = futures_util::stream::iter(0..pieces).then(move |_| {
        let p = piece.clone();
        async move {
            tokio::time::sleep(pause).await;
            Ok::<_, std::io::Error>(p)
        }
    });
    let location = c.start_upload(repo).await?;
    let put = c
        .req(
            Method::PUT,
            &with_query(&location, &format!("digest={digest}")),
        )
        .header("content-type", "application/octet-stream")
        .header("content-length", len.to_string())
        .body(reqwest::Body::wrap_stream(body));
    Ok((tokio::spawn(async move { put.send().await }), digest))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_push_in_flight_when_its_gateway_is_asked_to_drain_completes() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let mut g = deployment::start_gateway_with(&gw, &[&storage], &[ALICE], 4, "", &[])?;
    let c = deployment::user_client(&g, ALICE.0, ALICE.1);

    // 1 GiB in 64 pieces of 16 MiB, sent slower than the wire (about 10 s: in flight when
    // the listeners close, drain_delay_seconds after the signal).
    let piece = Bytes::from(
        (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    );
    let repo = "team-a/big";
    let len = 64 * piece.len() as u64;
    let (push, digest) = slow_upload(&c, repo, piece, 64, Duration::from_millis(150)).await?;
    let started = Instant::now();

    // A second in, the gateway is asked to drain.
    tokio::time::sleep(Duration::from_secs(1)).await;
    g.signal("TERM")?;
    // Not ready (a load balancer stops sending) and no new connection is taken.
    let admin = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = admin.get(format!("{}/readyz", g.admin)).send().await?;
        if r.status() == 503 {
            ensure!(r.text().await?.contains("draining"));
            break;
        }
        ensure!(Instant::now() < deadline, "still ready while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refuses_connections(&g.host, Duration::from_secs(20)).await?;

    // The push in flight completes, whole.
    let r = push.await??;
    ensure!(
        r.status() == 201,
        "the push in flight: {}",
        describe(r).await
    );
    ensure!(
        started.elapsed() > Duration::from_secs(7),
        "the push did not span the listeners' close"
    );
    let stored = deployment::storage_client(&storage)
        .req(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
        .send()
        .await?;
    ensure!(stored.status() == 200, "not stored: {}", stored.status());
    let stored_len = stored
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    ensure!(
        stored_len == Some(len),
        "stored {stored_len:?} bytes of {len}"
    );
    // And the gateway ends by itself, long before drain_seconds.
    let status = tokio::task::block_in_place(|| g.exited_within(Duration::from_secs(15)))
        .context("the drained gateway did not exit")?;
    ensure!(status.success(), "the gateway exited with {status}");
    Ok(())
}

/// `GET /token` with Basic credentials: its status.
async fn login(
    g: &portcullis_tests::server::GatewayServer,
    user: (&str, &str),
) -> anyhow::Result<u16> {
    let r = portcullis_tests::client::https(&g.ca_pem, false)
        .get(format!("{}/token", g.base))
        .query(&[
            ("service", deployment::SERVICE),
            ("scope", "repository:team-a/app:pull"),
        ])
        .basic_auth(user.0, Some(user.1))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// The `users-reload` audit events in `file`, oldest first: their outcomes.
fn reloads(file: &std::path::Path) -> Vec<String> {
    audit_events(file, "users-reload")
        .iter()
        .map(|e| e["event.outcome"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The audit events of `action` in `file`, oldest first.
fn audit_events(file: &std::path::Path, action: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event.action"] == action)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_users_and_the_limits_and_a_broken_file_changes_nothing()
-> anyhow::Result<()> {
    const CAROL: (&str, &str) = ("carol", "carol-operations-pw");
    const DAVE: (&str, &str) = ("dave", "dave-operations-pw");
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let trail = gw.join("audit.jsonl");
    let g = deployment::start_gateway_with(
        &gw,
        &[&storage],
        &[ALICE, CAROL],
        4,
        &format!("[audit]\nfile = \"{}\"\nstdout = true\n", trail.display()),
        &[],
    )?;
    ensure!(login(&g, CAROL).await? == 200 && login(&g, DAVE).await? == 401);
    // carol's docker login keeps an identity token (a session opened with the password).
    let http = portcullis_tests::client::https(&g.ca_pem, false);
    let offline: serde_json::Value = http
        .get(format!("{}/token", g.base))
        .query(&[
            ("service", deployment::SERVICE),
            ("offline_token", "true"),
            ("client_id", "operations-test"),
        ])
        .basic_auth(CAROL.0, Some(CAROL.1))
        .send()
        .await?
        .json()
        .await?;
    let refresh = offline["refresh_token"]
        .as_str()
        .context("no refresh token")?
        .to_owned();
    portcullis_tests::remember_secret(&refresh);
    let redeem = || {
        http.post(format!("{}/token", g.base))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", "operations-test"),
                ("service", deployment::SERVICE),
            ])
            .send()
    };
    ensure!(redeem().await?.status() == 200);
    // A transfer open across the reloads: an upload session started now, finished after.
    let c = deployment::user_client(&g, ALICE.0, ALICE.1);
    let location = c.start_upload("team-a/app").await?;

    // carol goes, dave comes.
    let line = |u: (&str, &str)| format!("{}:{}\n", u.0, bcrypt::hash(u.1, 4).unwrap());
    let htpasswd = gw.join("htpasswd");
    gateway::edge::tls::write_private(&htpasswd, (line(ALICE) + &line(DAVE)).as_bytes())?;
    g.signal("HUP")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&trail).is_empty() {
        ensure!(Instant::now() < deadline, "no users-reload audited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(reloads(&trail) == ["success"], "{:?}", reloads(&trail));
    ensure!(login(&g, DAVE).await? == 200, "the new user cannot log in");
    ensure!(
        login(&g, CAROL).await? == 401,
        "the removed user still logs in"
    );
    let r = redeem().await?;
    ensure!(
        r.status() == 400,
        "the removed user's identity token still works: {}",
        r.status()
    );

    // A broken file changes nothing, and says so in the trail.
    gateway::edge::tls::write_private(&htpasswd, b"dave:not-a-bcrypt-hash\n")?;
    g.signal("HUP")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&trail).len() < 2 {
        ensure!(
            Instant::now() < deadline,
            "the failed reload was not audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        reloads(&trail) == ["success", "failure"],
        "{:?}",
        reloads(&trail)
    );
    ensure!(login(&g, DAVE).await? == 200 && login(&g, ALICE).await? == 200);
    ensure!(
        !std::fs::read_to_string(&trail)?.contains("$2"),
        "a hash in the audit trail"
    );

    // The upload opened before the reloads completes.
    let blob = b"a blob uploaded across two reloads".to_vec();
    let digest = portcullis_tests::client::sha256(&blob);
    let r = c
        .req(
            Method::PUT,
            &with_query(&location, &format!("digest={digest}")),
        )
        .header("content-type", "application/octet-stream")
        .body(blob)
        .send()
        .await?;
    ensure!(r.status() == 201, "the open upload: {}", describe(r).await);

    // The configuration read again: new limits are put in force, a change that needs a
    // restart is named (not applied), a broken file changes nothing.
    let conf = gw.join("gateway.toml");
    let text = std::fs::read_to_string(&conf)?;
    let edited = text.replace(
        "health_check_interval_ms = 200",
        "health_check_interval_ms = 300",
    ) + "[limits]\ntoken_per_minute_per_user = 2\n";
    std::fs::write(&conf, &edited)?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "success"
            && e["config.applied"] == serde_json::json!(["limits"])
            && e["config.restart_needed"] == serde_json::json!(["upstream"]),
        "{e}"
    );
    // Two per calendar minute: five attempts span at most two minutes, so one is refused.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(login(&g, ALICE).await?);
    }
    ensure!(statuses.contains(&429), "the new limit: {statuses:?}");
    std::fs::write(&conf, edited.clone() + "[limitz]\n")?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "failure"
            && e["event.reason"]
                .as_str()
                .is_some_and(|r| r.contains("limitz")),
        "{e}"
    );
    // Right after a refusal, three attempts get at most two through (a new minute's two).
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(login(&g, ALICE).await?);
    }
    ensure!(
        statuses.contains(&429),
        "the limit in force went: {statuses:?}"
    );

    // [robots] with an admin token file, then the file rotated: each reload puts the token
    // in force, the old one stops working.
    let token_file = gw.join("admin-token");
    let admin = |token: &'static str| {
        let http = http.clone();
        let url = format!("{}/admin/robots", g.base);
        async move {
            anyhow::Ok(
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    const FIRST: &str = "first-admin-token-0123456789";
    const SECOND: &str = "second-admin-token-0123456789";
    portcullis_tests::remember_secret(FIRST);
    portcullis_tests::remember_secret(SECOND);
    gateway::edge::tls::write_private(&token_file, FIRST.as_bytes())?;
    std::fs::write(
        &conf,
        format!(
            "{edited}[robots]\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    )?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "success" && e["config.applied"] == serde_json::json!(["robots"]),
        "{e}"
    );
    ensure!(
        admin(FIRST).await? == 200,
        "the admin token from the reload"
    );
    gateway::edge::tls::write_private(&token_file, SECOND.as_bytes())?;
    let e = g.reload().await?;
    ensure!(e["config.applied"] == serde_json::json!(["robots"]), "{e}");
    ensure!(
        admin(SECOND).await? == 200 && admin(FIRST).await? == 401,
        "the rotated admin token"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storage_node_asked_to_stop_finishes_the_upload_in_flight_and_takes_no_new_one()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut storage = deployment::storage_node(&dir.path().join("storage"))?;
    let c = deployment::storage_client(&storage);
    // 32 MiB in 32 pieces, about 3 s.
    let (push, _) = slow_upload(
        &c,
        "team-a/app",
        Bytes::from(vec![7u8; 1 << 20]),
        32,
        Duration::from_millis(90),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    storage.signal("TERM")?;
    // Health checks fail at once (gateways stop sending), the listener closes after
    // drain_delay_seconds (2).
    let health = format!("{}/healthz", storage.base);
    let deadline = Instant::now() + Duration::from_secs(1);
    while reqwest::get(&health).await?.status() != 503 {
        ensure!(Instant::now() < deadline, "/healthz does not say draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = storage.base.trim_start_matches("http://").to_owned();
    refuses_connections(&addr, Duration::from_secs(6)).await?;
    let r = push.await??;
    ensure!(
        r.status() == 201,
        "the upload in flight: {}",
        describe(r).await
    );
    let status = tokio::task::block_in_place(|| storage.exited_within(Duration::from_secs(15)))
        .context("the storage node did not exit")?;
    ensure!(status.success(), "it exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_and_a_storage_node_configured_by_the_environment_alone_serve_the_protocol_suite()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("storage");
    let storage_env: Vec<(String, String)> = [
        ("PORTCULLIS_LISTEN", "127.0.0.1:0".to_string()),
        ("PORTCULLIS_STORAGE_TYPE", "filesystem".to_string()),
        ("PORTCULLIS_STORAGE_ROOT", root.display().to_string()),
        ("PORTCULLIS_API_MAX_MANIFEST_BYTES", "4194304".to_string()),
        ("PORTCULLIS_INTERNAL_SECRET", deployment::SECRET.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    let storage = StorageServer::start_with(
        &root,
        StorageOptions {
            env: storage_env,
            bare: true,
            ..Default::default()
        },
    )?;
    // Nothing was written elsewhere: the node serves the root the variables named.
    ensure!(
        root.exists(),
        "the storage root from the environment was not used"
    );

    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let (port, ca, vars) = deployment::gateway_variables(&gw, &[&storage], &[ALICE], 4)?;
    // `check-config` shows the merged result, secrets masked.
    let out = std::process::Command::new(portcullis_tests::server::binary("gateway"))
        .arg("check-config")
        .env_remove("PORTCULLIS_GATEWAY_CONFIG")
        .envs(vars.iter().cloned())
        .output()?;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && shown.contains("configuration is valid"),
        "check-config: {shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        shown.contains(&format!("listen = \"127.0.0.1:{port}\""))
            && shown.contains("registry-admins = [\"alice\"]"),
        "check-config does not show the variables' keys:\n{shown}"
    );
    ensure!(
        !shown.contains(deployment::SECRET),
        "check-config printed the internal secret:\n{shown}"
    );
    let g = GatewayServer::start_env(port, ca, &vars)?;
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        deployment::SERVICE,
        Some(ALICE),
    ));
    protocol::assert_all_pass(&c, "env", "configured by the environment alone").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_place_upgrade_hands_the_port_to_a_new_binary_and_no_client_notices()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let socket = gw.join("upgrade.sock");
    let socket_var = socket.display().to_string();
    let env = [("PORTCULLIS_UPGRADE_SOCKET", socket_var.as_str())];
    let mut old = deployment::start_gateway_with(&gw, &[&storage], &[ALICE], 4, "", &env)?;
    let repo = "team-a/upgraded";
    let layer: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (_, digest) = deployment::user_client(&old, ALICE.0, ALICE.1)
        .push_image(repo, "v1", &[&layer])
        .await?;

    // Clients for the whole test: on kept-alive connections over HTTP/2 and over HTTP/1.1,
    // and on a new connection for every request; each pull checked against its digest.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for (http1, fresh) in [(false, false), (true, false), (true, true)] {
        let (stop, digest) = (stop.clone(), digest.to_string());
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&old.ca_pem)?);
        if http1 {
            b = b.http1_only();
        }
        if fresh {
            b = b.pool_max_idle_per_host(0);
        }
        let http = b.build()?;
        let mut c = Client::with_http(&old.base, http);
        c.auth = Some(TokenAuth::new(
            &format!("{}/token", old.base),
            deployment::SERVICE,
            Some(ALICE),
        ));
        clients.spawn(async move {
            let (mut done, mut failures) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    let r = c.get(&format!("/v2/{repo}/manifests/v1")).await?;
                    ensure!(r.status() == 200, "manifest: {}", r.status());
                    let body = r.bytes().await?;
                    ensure!(
                        portcullis_tests::client::sha256(&body).to_string() == digest,
                        "the manifest does not match its digest"
                    );
                    anyhow::Ok(())
                }
                .await;
                match r {
                    Ok(()) => done += 1,
                    Err(e) => failures.push(format!(
                        "{} {}: {e:#}",
                        if http1 { "HTTP/1.1" } else { "HTTP/2" },
                        if fresh {
                            "new connection"
                        } else {
                            "kept-alive"
                        }
                    )),
                }
            }
            (done, failures)
        });
    }
    // SIGQUIT with no new process waiting hands the sockets to no one: the gateway goes on
    // serving, and says so in the trail.
    old.signal("QUIT")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.audit_events("gateway-upgrade").is_empty() {
        ensure!(
            Instant::now() < deadline,
            "no gateway-upgrade failure audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(old.audit_events("gateway-upgrade")[0]["event.outcome"] == "failure");
    ensure!(
        old.exited_within(Duration::from_millis(10)).is_none(),
        "it stopped"
    );

    // An upload in flight across the upgrade: 64 MiB over about 6 s.
    let c = deployment::user_client(&old, ALICE.0, ALICE.1);
    let (upload, blob) = slow_upload(
        &c,
        repo,
        Bytes::from(vec![5u8; 1 << 20]),
        64,
        Duration::from_millis(90),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The new binary waits for the sockets; the old one gets SIGQUIT once it does.
    let port: u16 = old.host.rsplit(':').next().context("no port")?.parse()?;
    let (conf, ca) = (gw.join("gateway.toml"), old.ca_pem.clone());
    let new_env: Vec<(String, String)> = vec![
        ("PORTCULLIS_UPGRADE_SOCKET".into(), socket_var.clone()),
        (
            "PORTCULLIS_INTERNAL_SECRET".into(),
            deployment::SECRET.into(),
        ),
    ];
    let new = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = new_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        GatewayServer::start_upgrade(&conf, port, ca, &env)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "the new gateway never waited for the sockets"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(!upload.is_finished(), "the upload ended before the upgrade");
    old.signal("QUIT")?;
    let new = new.await??;
    let status = tokio::task::block_in_place(|| old.exited_within(Duration::from_secs(30)))
        .context("the old gateway did not exit")?;
    ensure!(status.success(), "the old gateway exited with {status}");
    let r = upload.await??;
    ensure!(
        r.status() == 201,
        "the upload across the upgrade: {}",
        describe(r).await
    );

    // The port is the new process's now: clients go on, and nothing failed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = 0;
    while let Some(r) = clients.join_next().await {
        let (n, failures) = r?;
        // Pingora closes a connection the old process accepted in its last instant whose
        // request had not arrived yet (docs/operations.md): a client opening a connection per
        // request may meet that once, at the switch, as a connection closed before any answer.
        // Nothing else may fail, and clients on kept connections meet nothing.
        let at_the_switch = |f: &String| {
            f.starts_with("HTTP/1.1 new connection")
                && (f.contains("connection closed before message completed")
                    || f.contains("Connection reset by peer"))
        };
        ensure!(
            failures.len() <= 1 && failures.iter().all(at_the_switch),
            "{} pulls failed: {failures:?}",
            failures.len()
        );
        if !failures.is_empty() {
            println!("at the switch: {failures:?}");
        }
        done += n;
    }
    ensure!(done > 20, "only {done} pulls");
    ensure!(
        reqwest::get(format!("{}/readyz", new.admin))
            .await?
            .status()
            == 200
    );
    let c = deployment::user_client(&new, ALICE.0, ALICE.1);
    ensure!(c.get(&format!("/v2/{repo}/blobs/{blob}")).await?.status() == 200);
    Ok(())
}
