//! Behind HAProxy: the client's address comes from the PROXY protocol; uploads move between
//! storage nodes while a storage node and a gateway are killed with -9, losing nothing
//! acknowledged; and every gateway and storage node replaced in turn (drain, exit, start)
//! fails no operation of 16 clients.

use crate::replicas::{Replicas, basic_token};
use crate::{ALICE, BOB, eventually};
use portcullis_tests::client::{Client, TokenAuth, https};
use portcullis_tests::deployment::SERVICE;
use portcullis_tests::haproxy::{Backend, Haproxy, TRUST_PROXY};
use portcullis_tests::redis::Redis;
use portcullis_tests::server::StorageServer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A one-layer image in skopeo's `dir:` format with a layer unique to `n`; the manifest's
/// digest.
fn dir_image(dir: &std::path::Path, n: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let mut layer = vec![0u8; 64 * 1024];
    for (i, b) in layer.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ n.wrapping_mul(7919)) as u8;
    }
    layer[..8].copy_from_slice(&(n as u64).to_le_bytes());
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"n\":{n}}}").into_bytes();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha256_hex(&layer)), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    std::fs::write(dir.join(sha256_hex(&config)), &config).unwrap();
    std::fs::write(dir.join(sha256_hex(&layer)), &layer).unwrap();
    std::fs::write(dir.join("manifest.json"), &manifest).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    format!("sha256:{}", sha256_hex(&manifest))
}

/// `skopeo copy` of the image in `src` (`dir:` format, digests kept) to `reference`
/// (`host/repo:tag`), with no retries of its own: an `Err` is a failed client operation.
fn skopeo_push(
    ctr: &portcullis_tests::tools::Containers,
    certs: &str,
    src: &std::path::Path,
    reference: &str,
) -> Result<(), String> {
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--preserve-digests",
            "--retry-times",
            "0",
            "--dest-cert-dir",
            certs,
            &format!("dir:{}", src.display()),
            &format!("docker://{reference}"),
        ],
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Pulls `repo:v1` through `base` with `token` and checks every digest ([`verify_image`]);
/// `Err` says what went wrong.
async fn pull_and_verify(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    repo: &str,
    digest: &str,
) -> Result<(), String> {
    let mut c = Client::with_http(base, http.clone());
    c.headers = vec![("authorization".into(), format!("Bearer {token}"))];
    verify_image(&c, repo, "v1", digest).await
}

/// Requests with `method` counted by a storage node's metrics.
async fn storage_requests(node: &StorageServer, method: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", node.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("storage_http_requests_total{")
                && l.contains(&format!("method=\"{method}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A client of the gateway at `base` whose connections come from `source` (any 127/8
/// address is this machine).
fn client_from(source: &str, ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn token_via(http: &reqwest::Client, base: &str, user: &str, password: &str) -> u16 {
    http.get(format!("{base}/token?service={SERVICE}"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_the_client_address_comes_from_the_proxy_protocol() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        &format!("{TRUST_PROXY}[limits]\nsource_failures = 3\nuser_failures = 0\n"),
    );
    let backends: Vec<Backend> = r.gateways.iter().map(|g| Backend::of(g).unwrap()).collect();
    let lb = Haproxy::start(&backends, 200).unwrap();
    let lb_base = format!("https://{}", lb.host);
    let ca = r.gateways[0].ca_pem.clone();
    let (alice_pc, attacker) = (client_from("127.0.0.2", &ca), client_from("127.0.0.3", &ca));

    // Through the load balancer, each gateway sees the client's own address.
    for _ in 0..2 {
        assert_eq!(token_via(&alice_pc, &lb_base, ALICE.0, ALICE.1).await, 200);
    }
    // Failed logins from one address behind the load balancer lock out that address, on
    // both gateways, and no one else behind the same load balancer.
    for i in 0..3 {
        let status = token_via(&attacker, &lb_base, &format!("user{i}"), "guess").await;
        assert_eq!(status, 401);
    }
    for _ in 0..2 {
        assert_eq!(token_via(&attacker, &lb_base, BOB.0, BOB.1).await, 429);
        assert_eq!(token_via(&alice_pc, &lb_base, ALICE.0, ALICE.1).await, 200);
    }

    // A direct client that is not a trusted proxy cannot claim an address: its header is
    // not read, so its TLS handshake fails.
    let gw = &r.gateways[0];
    let addr: std::net::SocketAddr = gw.host.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
    let mut forged = socket.connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    forged
        .write_all(b"PROXY TCP4 203.0.113.66 127.0.0.1 1234 443\r\nnot a TLS hello")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), forged.read(&mut buf))
        .await
        .expect("the gateway closes the connection")
        .unwrap_or(0);
    assert!(
        n == 0 || buf[0] == 0x15,
        "a TLS alert or nothing: {:?}",
        &buf[..n]
    );
    // Directly, that client is itself; so is the trusted proxy's host without a header.
    let direct = client_from("127.0.0.4", &ca);
    assert_eq!(token_via(&direct, &gw.base, ALICE.0, ALICE.1).await, 200);
    assert_eq!(
        token_via(&https(&ca, false), &gw.base, ALICE.0, ALICE.1).await,
        200
    );

    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let logins_from = |ip: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| {
                matches!(e["event.action"].as_str(), Some("login" | "token"))
                    && e["source.ip"] == ip
                    && e["event.outcome"] == outcome
            })
            .count()
    };
    assert!(logins_from("127.0.0.2", "success") >= 4, "{events:?}");
    assert_eq!(logins_from("127.0.0.2", "failure"), 0);
    assert!(logins_from("127.0.0.3", "failure") >= 5, "{events:?}");
    assert!(logins_from("127.0.0.4", "success") >= 1);
    assert!(logins_from("127.0.0.1", "success") >= 1);
    let lockout = events
        .iter()
        .find(|e| e["event.action"] == "login-lockout")
        .expect("a lockout event");
    assert_eq!(lockout["lockout.by"], "source");
    assert_eq!(lockout["source.ip"], "127.0.0.3");
    assert!(
        !serde_json::to_string(&events)
            .unwrap()
            .contains("203.0.113.66")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_uploads_move_between_nodes_and_kill_9_loses_nothing() {
    let mut r = Replicas::start_full(2, 2, Redis::start().unwrap(), TRUST_PROXY, &[]);
    let backends: Vec<Backend> = r.gateways.iter().map(|g| Backend::of(g).unwrap()).collect();
    let lb = Haproxy::start(&backends, 200).unwrap();
    let base = format!("https://{}", lb.host);
    let ca = r.gateways[0].ca_pem.clone();
    // A new connection (so a new pick of gateway by HAProxy) for every request.
    let fresh = || {
        let cert = reqwest::Certificate::from_pem(&ca).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(cert)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };

    // A chunked upload whose PATCHes alternate between the two storage nodes.
    let secret = (
        "portcullis-internal-secret",
        portcullis_tests::deployment::SECRET,
    );
    let nodes = [r.storages[0].base.clone(), r.storages[1].base.clone()];
    let plain = reqwest::Client::new();
    let data: Vec<u8> = (0..(3 * 1024 * 1024 + 777))
        .map(|i| (i % 251) as u8)
        .collect();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let resp = plain
        .post(format!("{}/v2/team-a/chunked/blobs/uploads/", nodes[0]))
        .header(secret.0, secret.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let mut loc = resp.headers()["location"].to_str().unwrap().to_string();
    let mut offset = 0;
    for (i, part) in data.chunks(1024 * 1024).enumerate() {
        let resp = plain
            .patch(format!("{}{loc}", nodes[(i + 1) % 2]))
            .header(secret.0, secret.1)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{offset}-{}", offset + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "PATCH {i} on node {}", (i + 1) % 2);
        loc = resp.headers()["location"].to_str().unwrap().to_string();
        offset += part.len();
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = plain
        .put(format!("{}{loc}{sep}digest={digest}", nodes[0]))
        .header(secret.0, secret.1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    for n in &nodes {
        let body = plain
            .get(format!("{n}/v2/team-a/chunked/blobs/{digest}"))
            .header(secret.0, secret.1)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(body == data, "the blob from {n}");
    }

    // The same through HAProxy, every request on a new connection: the gateways pass the
    // PATCHes to both nodes in turn.
    let patches = [
        storage_requests(&r.storages[0], "PATCH").await,
        storage_requests(&r.storages[1], "PATCH").await,
    ];
    let mut c = Client::with_http(&base, fresh());
    c.auth = Some(TokenAuth::new(&format!("{base}/token"), SERVICE, Some(BOB)));
    let pushed = c
        .push_blob_chunked("team-a/via-lb", &data, 512 * 1024)
        .await
        .unwrap();
    assert_eq!(pushed.to_string(), digest);
    for (i, before) in patches.iter().enumerate() {
        let after = storage_requests(&r.storages[i], "PATCH").await;
        assert!(
            after >= before + 2,
            "node {i} served {} PATCHes",
            after - before
        );
    }

    // Pushes (skopeo) and pulls (verified) through HAProxy while a storage node and then a
    // gateway are killed with -9 and restarted.
    let ctr = portcullis_tests::tools::Containers::new().unwrap();
    let certs = portcullis_tests::tools::cert_dir(&ctr, &ca).unwrap();
    ctr.login("skopeo", &certs, &lb.host, BOB.0, BOB.1).unwrap();
    let ctr = Arc::new(ctr);
    let acknowledged: Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let push_one = {
        let (ctr, certs, host) = (ctr.clone(), certs.clone(), lb.host.clone());
        move |n: usize| -> Result<(String, String), String> {
            let src = ctr.dir.path().join(format!("img{n}"));
            let digest = dir_image(&src, n);
            let repo = format!("team-a/ha-{n}");
            skopeo_push(&ctr, &certs, &src, &format!("{host}/{repo}:v1"))?;
            Ok((repo, digest))
        }
    };
    for n in 0..3 {
        let done = push_one(n).unwrap();
        acknowledged.lock().unwrap().push(done);
    }
    let (status, _, v) =
        basic_token(&r.gateways[0], BOB.0, BOB.1, "repository:team-a/*:pull").await;
    assert_eq!(status, 200, "{v}");
    // Pull tokens per repository (the scope names each one), through HAProxy too.
    let token_for = {
        let (base, http) = (base.clone(), fresh());
        move |repo: String| {
            let (base, http) = (base.clone(), http.clone());
            async move {
                let r = http
                    .get(format!(
                        "{base}/token?service={SERVICE}&scope=repository:{repo}:pull"
                    ))
                    .basic_auth(BOB.0, Some(BOB.1))
                    .send()
                    .await
                    .map_err(|e| format!("token: {e}"))?;
                let v: Value = r.json().await.map_err(|e| format!("token: {e}"))?;
                v["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("token: {v}"))
            }
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pulls = {
        let (stop, acknowledged, base) = (stop.clone(), acknowledged.clone(), base.clone());
        let http = fresh();
        let token_for = token_for.clone();
        tokio::spawn(async move {
            let mut tokens = std::collections::HashMap::new();
            let mut log: Vec<(Instant, Result<(), String>)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (repo, digest) = {
                    let a = acknowledged.lock().unwrap();
                    a[i % a.len()].clone()
                };
                if !tokens.contains_key(&repo) {
                    match token_for(repo.clone()).await {
                        Ok(t) => {
                            tokens.insert(repo.clone(), t);
                        }
                        Err(e) => {
                            log.push((Instant::now(), Err(e)));
                            continue;
                        }
                    }
                }
                let res = pull_and_verify(&http, &base, &tokens[&repo], &repo, &digest).await;
                log.push((Instant::now(), res));
                i += 1;
            }
            log
        })
    };
    let pushes = {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            let mut n = 3;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match push_one(n) {
                    Ok(done) => acknowledged.lock().unwrap().push(done),
                    Err(e) => failed.push((Instant::now(), e)),
                }
                n += 1;
            }
            (n - 3, failed)
        })
    };
    let settle = |n: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            let target = acknowledged.lock().unwrap().len() + n;
            eventually(60, "pushes go on", || async {
                acknowledged.lock().unwrap().len() >= target
            })
            .await;
        }
    };
    settle(3).await;
    let storage_killed = Instant::now();
    r.storages[0].kill9();
    settle(2).await;
    r.storages[0].crash_and_restart().unwrap();
    settle(2).await;
    let gateway_killed = Instant::now();
    r.kill_gateway(0);
    settle(2).await;
    r.start_gateway_again(0);
    settle(2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = pulls.await.unwrap();
    let (attempted, push_failures) = pushes.join().unwrap();

    // A failure is allowed only in the health-check interval after a kill (with margin for
    // this shared machine): in-flight requests and the first picks of the dead process.
    let grace = Duration::from_millis(1500);
    let excused = |t: Instant| {
        [storage_killed, gateway_killed]
            .iter()
            .any(|k| t >= *k && t <= *k + grace)
    };
    let late: Vec<_> = log
        .iter()
        .filter(|(t, res)| res.is_err() && !excused(*t))
        .collect();
    assert!(
        late.is_empty(),
        "pulls failed after the health-check interval: {late:?}"
    );
    assert!(log.len() > 20, "only {} pulls", log.len());
    let failed_pulls: Vec<&String> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    // Every acknowledged push is there, digests verified, on every gateway and both nodes.
    let all = acknowledged.lock().unwrap().clone();
    for (repo, digest) in &all {
        let token = token_for(repo.clone()).await.unwrap();
        for via in [&base, &r.gateways[0].base, &r.gateways[1].base] {
            pull_and_verify(&fresh(), via, &token, repo, digest)
                .await
                .unwrap_or_else(|e| panic!("{repo} via {via}: {e}"));
        }
    }
    println!(
        "{} pulls ({} failed inside a kill's interval: {failed_pulls:?}), {attempted} pushes \
         attempted, {} acknowledged and verified, {} failed: {push_failures:?}",
        log.len(),
        failed_pulls.len(),
        all.len() - 3,
        push_failures.len()
    );
}

/// Pulls `repo:reference` with `c` and checks the manifest and every blob against their
/// digests.
async fn verify_image(c: &Client, repo: &str, reference: &str, digest: &str) -> Result<(), String> {
    let fetch = |path: String, digest: String| async move {
        let r = c
            .req(reqwest::Method::GET, &path)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        if r.status() != 200 {
            return Err(format!("{path}: {}", r.status()));
        }
        let body = r.bytes().await.map_err(|e| format!("{path}: {e}"))?;
        if format!("sha256:{}", sha256_hex(&body)) != digest {
            return Err(format!("{path}: the content does not match its digest"));
        }
        Ok(body)
    };
    let body = fetch(
        format!("/v2/{repo}/manifests/{reference}"),
        digest.to_string(),
    )
    .await?;
    let m: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let blobs = m["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&m["config"]));
    for b in blobs {
        let d = b["digest"].as_str().unwrap_or_default();
        fetch(format!("/v2/{repo}/blobs/{d}"), d.to_string()).await?;
    }
    Ok(())
}

/// What the clients of the rolling replacement did: images acknowledged (repository, tag,
/// manifest digest), operations done, failures with what was being replaced then.
#[derive(Default)]
struct Rolling {
    acknowledged: Vec<(String, String, String)>,
    done: usize,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_replacement_of_every_gateway_and_storage_node_fails_no_client_operation() {
    // Each gateway says not ready for 2 s before its listeners close (HAProxy checks every
    // 200 ms); the gateways check the storage nodes every 200 ms.
    let mut r = Replicas::start_full(
        2,
        2,
        Redis::start().unwrap(),
        TRUST_PROXY,
        &[("PORTCULLIS_DRAIN_DELAY_SECONDS", "2")],
    );
    let backends: Vec<Backend> = r.gateways.iter().map(|g| Backend::of(g).unwrap()).collect();
    let lb = Haproxy::start(&backends, 200).unwrap();
    let base = format!("https://{}", lb.host);
    let ca = r.gateways[0].ca_pem.clone();
    let state: Arc<std::sync::Mutex<Rolling>> = Default::default();
    let now_doing: Arc<std::sync::Mutex<String>> = Arc::new(std::sync::Mutex::new("start".into()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let record = {
        let (state, now_doing) = (state.clone(), now_doing.clone());
        move |what: String, res: Result<Option<(String, String, String)>, String>| {
            let mut s = state.lock().unwrap();
            s.done += 1;
            match res {
                Ok(Some(image)) => s.acknowledged.push(image),
                Ok(None) => {}
                Err(e) => {
                    let during = now_doing.lock().unwrap().clone();
                    s.failures.push(format!("{what} (during {during}): {e}"))
                }
            }
        }
    };

    // 4 skopeo clients pushing images, each a process of its own (new connections).
    let ctr = Arc::new(portcullis_tests::tools::Containers::new().unwrap());
    let certs = portcullis_tests::tools::cert_dir(&ctr, &ca).unwrap();
    ctr.login("skopeo", &certs, &lb.host, BOB.0, BOB.1).unwrap();
    let mut threads = Vec::new();
    for w in 0..4usize {
        let (ctr, certs, host, record, stop) = (
            ctr.clone(),
            certs.clone(),
            lb.host.clone(),
            record.clone(),
            stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = 1000 * (w + 1) + k;
                let src = ctr.dir.path().join(format!("roll{n}"));
                let digest = dir_image(&src, n);
                let repo = format!("team-a/roll-skopeo-{w}");
                let tag = format!("v{k}");
                let res = skopeo_push(&ctr, &certs, &src, &format!("{host}/{repo}:{tag}"))
                    .map(|_| Some((repo.clone(), tag.clone(), digest)));
                record(format!("skopeo push {repo}:{tag}"), res);
                let _ = std::fs::remove_dir_all(&src);
                k += 1;
            }
        }));
    }

    // 12 blob-level clients on kept-alive connections, half over HTTP/1.1 and half over
    // HTTP/2: 6 push images (monolithic and chunked layers) and read each back, 6 pull what
    // was acknowledged; every digest checked.
    let client = |http1: bool| {
        let mut c = Client::with_http(&base, portcullis_tests::client::https(&ca, http1));
        c.auth = Some(TokenAuth::new(&format!("{base}/token"), SERVICE, Some(BOB)));
        c
    };
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..6usize {
        let (c, record, stop) = (client(w % 2 == 0), record.clone(), stop.clone());
        tasks.spawn(async move {
            let repo = format!("team-a/roll-blobs-{w}");
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tag = format!("v{k}");
                let mut layer = vec![0u8; 300 * 1024 + k];
                for (i, b) in layer.iter_mut().enumerate() {
                    *b = (i.wrapping_mul(131) ^ (w * 7 + k * 13)) as u8;
                }
                layer[..16].copy_from_slice(
                    &[(w as u64).to_le_bytes(), (k as u64).to_le_bytes()].concat(),
                );
                let res = async {
                    let manifest = if k.is_multiple_of(2) {
                        c.push_image(&repo, &tag, &[&layer]).await?.1.to_string()
                    } else {
                        c.push_blob_chunked(&repo, &layer, 128 * 1024).await?;
                        c.push_image(&repo, &tag, &[&layer]).await?.1.to_string()
                    };
                    verify_image(&c, &repo, &tag, &manifest)
                        .await
                        .map_err(|e| anyhow::anyhow!(e))?;
                    anyhow::Ok(Some((repo.clone(), tag.clone(), manifest)))
                }
                .await
                .map_err(|e| format!("{e:#}"));
                record(format!("push {repo}:{tag}"), res);
                k += 1;
            }
        });
    }
    for w in 0..6usize {
        let (c, record, stop, state) = (
            client(w % 2 == 0),
            record.clone(),
            stop.clone(),
            state.clone(),
        );
        tasks.spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let image = {
                    let s = state.lock().unwrap();
                    (!s.acknowledged.is_empty())
                        .then(|| s.acknowledged[i % s.acknowledged.len()].clone())
                };
                match image {
                    Some((repo, tag, digest)) => {
                        let res = verify_image(&c, &repo, &tag, &digest).await.map(|_| None);
                        record(format!("pull {repo}:{tag}"), res);
                    }
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                i += 7;
            }
        });
    }

    // Lets the clients get `n` more operations done.
    let settle = |n: usize| {
        let state = state.clone();
        async move {
            let target = state.lock().unwrap().done + n;
            eventually(120, "client operations go on", || async {
                state.lock().unwrap().done >= target
            })
            .await;
        }
    };
    settle(40).await;
    for i in 0..2 {
        *now_doing.lock().unwrap() = format!("the replacement of gateway {i}");
        r.gateways[i].signal("TERM").unwrap();
        let status = r.gateways[i]
            .exited_within(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("gateway {i} did not finish draining"));
        assert!(status.success(), "gateway {i} drained with {status}");
        r.start_gateway_again(i);
        settle(40).await;
    }
    for i in 0..2 {
        *now_doing.lock().unwrap() = format!("the replacement of storage node {i}");
        r.storages[i].signal("TERM").unwrap();
        let status = r.storages[i]
            .exited_within(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("storage node {i} did not finish draining"));
        assert!(status.success(), "storage node {i} drained with {status}");
        r.storages[i].start_again().unwrap();
        // As an operator does: the next node goes only once every gateway takes this one.
        let node = r.storages[i].base.trim_start_matches("http://").to_string();
        for g in &r.gateways {
            let series = format!("gateway_upstream_healthy{{node=\"{node}\"}}");
            eventually(
                30,
                "the gateways see the new storage node healthy",
                || async {
                    portcullis_tests::server::metrics_text(&g.admin)
                        .await
                        .is_ok_and(|t| {
                            portcullis_tests::server::metric_sample(&t, &series) == Some(1.0)
                        })
                },
            )
            .await;
        }
        settle(40).await;
    }
    *now_doing.lock().unwrap() = "the end".into();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    for t in threads {
        t.join().unwrap();
    }
    let s = std::mem::take(&mut *state.lock().unwrap());
    assert!(
        s.failures.is_empty(),
        "{} of {} client operations failed:\n{}",
        s.failures.len(),
        s.done,
        s.failures.join("\n")
    );
    assert!(stopped());
    // Every image acknowledged pulls identical at the end, through the load balancer.
    let c = client(false);
    for (repo, tag, digest) in &s.acknowledged {
        verify_image(&c, repo, tag, digest)
            .await
            .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
    }
    println!(
        "rolling replacement: {} client operations, none failed; {} images verified",
        s.done,
        s.acknowledged.len()
    );
}
