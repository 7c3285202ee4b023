//! End-to-end tests of the gateway: the real binary over TLS with token auth, in front of
//! the real storage service. `cargo test --release --test gateway` runs exactly these.

use anyhow::ensure;
use gateway::token::jwt::{Access, Claims, TokenSubject, Tokens};
use gateway::token::keys::{SigningKey, generate_pem};
use portcullis_tests::client::{Client, OCI_MANIFEST, TokenAuth, describe, expect_error};
use portcullis_tests::deployment::{self, Deployment, user_client};
use portcullis_tests::protocol;
use portcullis_tests::server::{GatewayServer, StorageServer};
use reqwest::Method;
use serde_json::Value;
use std::path::Path;

const ADMIN_PASSWORD: &str = "test-admin-password";

fn dev() -> (tempfile::TempDir, GatewayServer) {
    let data = tempfile::tempdir().unwrap();
    let g = GatewayServer::start_dev(data.path(), Some(ADMIN_PASSWORD)).unwrap();
    (data, g)
}

fn client(g: &GatewayServer, credentials: Option<(&str, &str)>) -> Client {
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        "portcullis",
        credentials,
    ));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn protocol_suite_passes_through_the_gateway_over_tls_with_tokens() {
    let (_data, g) = dev();
    let c = client(&g, Some(("admin", ADMIN_PASSWORD)));
    protocol::assert_all_pass(&c, "gw", "through the gateway").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_how_to_use_it_and_serves_health_and_metrics() {
    let data = tempfile::tempdir().unwrap();
    let g = GatewayServer::start_dev(data.path(), None).unwrap();
    assert!(g.banner.contains("admin user:   admin / "), "{}", g.banner);
    assert!(
        g.banner
            .contains(&format!("{}", data.path().join("tls/ca.crt").display())),
        "{}",
        g.banner
    );
    let password = g
        .banner
        .split("admin / ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let c = client(&g, Some(("admin", &password)));
    assert_eq!(c.get("/v2/").await.unwrap().status(), 200);
    let plain = reqwest::Client::new();
    assert_eq!(
        plain
            .get(format!("{}/healthz", g.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        plain
            .get(format!("{}/readyz", g.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let m = plain
        .get(format!("{}/metrics", g.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("gateway_http_requests_total"), "{m}");
    // Restarted on the same data: the password is not shown again and still works.
    drop(g);
    let g = GatewayServer::start_dev(data.path(), None).unwrap();
    assert!(!g.banner.contains(&password));
    let c = client(&g, Some(("admin", &password)));
    assert_eq!(c.get("/v2/").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_without_a_token_is_challenged_with_the_scope_it_needs() {
    let (_data, g) = dev();
    let c = Client::with_ca(&g.base, &g.ca_pem);
    let r = c.get("/v2/").await.unwrap();
    assert_eq!(r.status(), 401);
    let w = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        w.starts_with(&format!(
            "Bearer realm=\"https://{}/token\",service=\"portcullis\"",
            g.host
        )),
        "{w}"
    );
    let r = c
        .req(Method::PUT, "/v2/team-a/app/manifests/v1")
        .send()
        .await
        .unwrap();
    let w = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        w.contains("scope=\"repository:team-a/app:pull,push\""),
        "{w}"
    );
    expect_error(r, 401, "UNAUTHORIZED").await.unwrap();
}

async fn token_reply(
    c: &Client,
    g: &GatewayServer,
    query: &str,
    basic: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut r = c.http.get(format!("{}/token?{query}", g.base));
    if let Some((u, p)) = basic {
        r = r.basic_auth(u, Some(p));
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn claims_of(token: &str) -> Value {
    portcullis_tests::client::jwt_claims(token).expect("a JWT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_the_intersection_and_refuses_bad_credentials() {
    let (_data, g) = dev();
    let c = Client::with_ca(&g.base, &g.ca_pem);
    // Anonymous: only what policy gives anonymous (public/** pull).
    let (s, v) = token_reply(&c, &g, "service=portcullis&scope=repository:public/base:pull,push&scope=repository:team-a/app:pull", None).await;
    assert_eq!(s, 200, "{v}");
    let claims = claims_of(v["token"].as_str().unwrap());
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "public/base", "actions": ["pull"]}])
    );
    // Admin, several scopes in one request, a name with host:port, catalog.
    let (s, v) = token_reply(
        &c,
        &g,
        "service=portcullis&scope=repository:a/b:pull,push&scope=registry:catalog:*&scope=repository:localhost:5000/x:pull&offline_token=true&client_id=docker",
        Some(("admin", ADMIN_PASSWORD)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let claims = claims_of(v["token"].as_str().unwrap());
    assert_eq!(
        claims["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );
    assert_eq!(claims["access"][1]["type"], "registry");
    assert_eq!(claims["sub"], "admin");
    assert!(
        v["refresh_token"].is_string(),
        "offline_token=true returns a refresh token"
    );
    for k in ["iss", "aud", "exp", "nbf", "iat", "jti"] {
        assert!(!claims[k].is_null(), "claim {k} missing");
    }
    // Wrong password, malformed header, unknown service, malformed scope.
    let (s, v) = token_reply(&c, &g, "service=portcullis", Some(("admin", "wrong"))).await;
    assert_eq!(s, 401, "{v}");
    assert!(
        !v.to_string().contains("wrong"),
        "the password is echoed: {v}"
    );
    let r = c
        .http
        .get(format!("{}/token", g.base))
        .header("authorization", "Basic !!!")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, v) = token_reply(&c, &g, "service=elsewhere", None).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
    let (s, v) = token_reply(&c, &g, "service=portcullis&scope=repository", None).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_scope")));
    // JWKS publishes the signing key under its kid.
    let jwks: Value = c
        .http
        .get(format!("{}/auth/jwks.json", g.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header: Value = {
        use base64::Engine;
        let h = v_token_header(&c, &g).await;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header["alg"], "ES256");
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == header["kid"])
    );
}

async fn v_token_header(c: &Client, g: &GatewayServer) -> String {
    let (_, v) = token_reply(c, g, "service=portcullis", None).await;
    v["token"]
        .as_str()
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_post_password_and_refresh_token_grants() {
    let (_data, g) = dev();
    let c = Client::with_ca(&g.base, &g.ca_pem);
    let post = |form: Vec<(&'static str, String)>| {
        c.http.post(format!("{}/token", g.base)).form(&form).send()
    };
    let r = post(vec![
        ("grant_type", "password".into()),
        ("username", "admin".into()),
        ("password", ADMIN_PASSWORD.into()),
        ("service", "portcullis".into()),
        ("client_id", "test".into()),
        ("access_type", "offline".into()),
        ("scope", "repository:x/y:pull repository:x/z:push".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["scope"], "repository:x/y:pull repository:x/z:push");
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&refresh);
    let r = post(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", refresh.clone()),
        ("service", "portcullis".into()),
        ("client_id", "test".into()),
        ("scope", "repository:x/y:pull".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["access_token"].is_string());
    for (form, error) in [
        (
            vec![
                ("grant_type", "password".to_string()),
                ("username", "admin".into()),
                ("password", "nope".into()),
                ("client_id", "t".into()),
            ],
            "invalid_grant",
        ),
        (
            vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", "forged".into()),
                ("client_id", "t".into()),
            ],
            "invalid_grant",
        ),
        (
            vec![
                ("grant_type", "client_credentials".to_string()),
                ("client_id", "t".into()),
            ],
            "unsupported_grant_type",
        ),
        (
            vec![
                ("grant_type", "password".to_string()),
                ("username", "admin".into()),
                ("password", ADMIN_PASSWORD.into()),
            ],
            "invalid_request",
        ),
    ] {
        let r = post(form).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], error, "{v}");
    }
}

/// Signs claims with a key: the gateway's own (from its data dir) or a stranger's.
fn forge(key_pem: &[u8], claims: &Claims) -> String {
    let tokens = Tokens::new(vec![SigningKey::from_pem(key_pem).unwrap()], "x", "x");
    tokens.sign(claims).unwrap()
}

fn claims(sub: &str, repo: &str, now: i64) -> Claims {
    Claims {
        iss: "portcullis-dev".into(),
        sub: sub.into(),
        aud: "portcullis".into(),
        exp: now + 300,
        nbf: now,
        iat: now,
        jti: "t".into(),
        access: vec![Access {
            resource_type: "repository".into(),
            name: repo.into(),
            actions: vec!["pull".into(), "push".into()],
        }],
        subject: TokenSubject {
            kind: "user".into(),
            groups: vec![],
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_tokens_are_refused() {
    use base64::Engine;
    let (data, g) = dev();
    let key = std::fs::read(data.path().join("token-key.pem")).unwrap();
    let now = gateway::token::unix_now();
    let c = Client::with_ca(&g.base, &g.ca_pem);
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let good = claims("admin", "a/b", now);
    let valid = forge(&key, &good);
    let get = |token: String, path: &'static str| {
        c.http
            .get(format!("{}{path}", g.base))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        get(valid.clone(), "/v2/a/b/tags/list")
            .await
            .unwrap()
            .status(),
        404,
        "a valid token reaches storage"
    );

    let payload = valid.split('.').nth(1).unwrap().to_string();
    let none = format!(
        "{}.{payload}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"}))
    );
    let hs256 = {
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::sign::Signer;
        let pubkey = openssl::pkey::PKey::private_key_from_pem(&key)
            .unwrap()
            .public_key_to_pem()
            .unwrap();
        let head = b64(&serde_json::json!({"alg": "HS256", "typ": "JWT"}));
        let signing_input = format!("{head}.{payload}");
        let hmac = PKey::hmac(&pubkey).unwrap();
        let mut s = Signer::new(MessageDigest::sha256(), &hmac).unwrap();
        s.update(signing_input.as_bytes()).unwrap();
        format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.sign_to_vec().unwrap())
        )
    };
    let stranger = forge(&generate_pem().unwrap(), &good);
    let expired = forge(
        &key,
        &Claims {
            exp: now - 3600,
            nbf: now - 7200,
            iat: now - 7200,
            ..good.clone()
        },
    );
    let future = forge(
        &key,
        &Claims {
            nbf: now + 3600,
            exp: now + 7200,
            ..good.clone()
        },
    );
    let wrong_aud = forge(
        &key,
        &Claims {
            aud: "other".into(),
            ..good.clone()
        },
    );
    let wrong_iss = forge(
        &key,
        &Claims {
            iss: "other".into(),
            ..good.clone()
        },
    );
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(String::from).collect();
        let mut c2 = good.clone();
        c2.access[0].name = "c/d".into();
        parts[1] = b64(&serde_json::to_value(&c2).unwrap());
        parts.join(".")
    };
    for (what, token) in [
        ("alg=none", none),
        ("HS256 with the public key", hs256),
        ("unknown kid", stranger),
        ("expired", expired),
        ("not yet valid", future),
        ("wrong aud", wrong_aud),
        ("wrong iss", wrong_iss),
        ("tampered payload", tampered),
        ("garbage", "not.a.jwt".into()),
    ] {
        let r = get(token, "/v2/a/b/tags/list").await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );
        expect_error(r, 401, "UNAUTHORIZED").await.unwrap();
    }
    // A token for a/b used on c/d: insufficient scope.
    let r = get(valid.clone(), "/v2/c/d/tags/list").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"insufficient_scope\"")
    );
    expect_error(r, 401, "DENIED").await.unwrap();
    // Malformed Authorization headers.
    for h in ["Bearer", "Basic YWRtaW46eA==", "Bearer a b c", "\u{7f}"] {
        let r = c
            .http
            .get(format!("{}/v2/a/b/tags/list", g.base))
            .header("authorization", h)
            .send()
            .await;
        if let Ok(r) = r {
            assert_eq!(r.status(), 401, "{h:?}");
        }
    }
}

/// A deployment in production shape with cheap password hashes.
fn deployment(users: &[(&str, &str)]) -> Deployment {
    Deployment::start_in(&std::env::temp_dir(), users, 4).unwrap()
}

fn storage_node(root: &Path) -> StorageServer {
    deployment::storage_node(root).unwrap()
}

fn start_gateway(d: &Path, nodes: &[&StorageServer], users: &[(&str, &str)]) -> GatewayServer {
    deployment::start_gateway(d, nodes, users, 4).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_is_enforced_end_to_end() {
    let dep = deployment(&[
        ("bob", "bob-pw"),
        ("alice", "alice-pw"),
        ("carol", "carol-pw"),
    ]);
    let g = &dep.gateway;
    let bob = user_client(g, "bob", "bob-pw");
    let carol = user_client(g, "carol", "carol-pw");
    let alice = user_client(g, "alice", "alice-pw");

    // bob (team-a) pushes to team-a; carol has no push there: denied.
    bob.push_image("team-a/app", "latest", &[b"layer"])
        .await
        .unwrap();
    carol.push_is_denied("team-a/app").await.unwrap();
    // bob reads but cannot push under team-a/prod.
    bob.push_is_denied("team-a/prod/api").await.unwrap();

    // Immutable tags: created once, never re-pushed or deleted; mutable tags move freely.
    let m1 = bob
        .image_manifest("team-a/app", b"{\"v\":1}", &[], None)
        .await
        .unwrap();
    let m2 = bob
        .image_manifest("team-a/app", b"{\"v\":2}", &[], None)
        .await
        .unwrap();
    let r = bob
        .put_manifest("team-a/app", "v1.0.0", OCI_MANIFEST, &m1)
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", describe(r).await);
    let r = bob
        .put_manifest("team-a/app", "v1.0.0", OCI_MANIFEST, &m2)
        .await
        .unwrap();
    expect_error(r, 403, "DENIED").await.unwrap();
    let got = bob
        .get("/v2/team-a/app/manifests/v1.0.0")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == m1[..], "the immutable tag moved");
    let r = bob
        .req(Method::DELETE, "/v2/team-a/app/manifests/v1.0.0")
        .send()
        .await
        .unwrap();
    // bob is a developer: no delete scope at all.
    assert_eq!(r.status(), 401);
    let r = alice
        .req(Method::DELETE, "/v2/team-a/app/manifests/v1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "an admin may override, audited");
    for m in [&m1, &m2, &m1] {
        let r = bob
            .put_manifest("team-a/app", "latest", OCI_MANIFEST, m)
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "mutable tags move");
    }

    // Two concurrent first pushes of one immutable tag: exactly one wins.
    let mut handles = Vec::new();
    for m in [m1.clone(), m2.clone()] {
        let bob = bob.clone();
        handles.push(tokio::spawn(async move {
            bob.put_manifest("team-a/app", "v2.0.0", OCI_MANIFEST, &m)
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap().unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [201, 403], "exactly one first push wins");
}

#[test]
fn tls_below_1_2_is_refused() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let g = GatewayServer::start_dev(data.path(), Some(ADMIN_PASSWORD))?;
    for (flag, ok) in [
        ("-tls1", false),
        ("-tls1_1", false),
        ("-tls1_2", true),
        ("-tls1_3", true),
    ] {
        let out = std::process::Command::new("openssl")
            .args(["s_client", flag, "-connect", &g.host, "-CAfile"])
            .arg(Path::new(&data.path().join("tls/ca.crt")))
            .stdin(std::process::Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let connected = text.contains("Server certificate") && !text.contains("Cipher is (NONE)");
        ensure!(connected == ok, "{flag}: connected={connected}\n{text}");
    }
    Ok(())
}

// --- real clients --------------------------------------------------------------------------

use portcullis_tests::tools::{Containers, DockerTrust, Dockerd, dir_files, docker_login};

fn cert_dir(ctr: &Containers, g: &GatewayServer) -> String {
    portcullis_tests::tools::cert_dir(ctr, &g.ca_pem).unwrap()
}

fn same_dirs(a: &Path, b: &Path) -> anyhow::Result<()> {
    let (fa, fb) = (dir_files(a)?, dir_files(b)?);
    ensure!(fa == fb, "{} and {} differ", a.display(), b.display());
    Ok(())
}

#[test]
fn skopeo_podman_and_buildah_through_the_gateway() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let g = GatewayServer::start_dev(data.path(), Some(ADMIN_PASSWORD))?;
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &g);
    let h = &g.host;
    // Logins store credentials; the clients then fetch tokens themselves.
    ctr.login("skopeo", &certs, h, "admin", ADMIN_PASSWORD)?;
    ctr.login("podman", &certs, h, "admin", ADMIN_PASSWORD)?;
    let wrong = ctr.login("podman", &certs, h, "admin", "wrong");
    ensure!(wrong.is_err(), "a wrong password logged in");

    ctr.build_scratch_image("gw-src:1", Path::new("/bin/busybox"))?;
    let src = ctr.dir.path().join("src");
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "containers-storage:localhost/gw-src:1",
            &format!("dir:{}", src.display()),
        ],
    )?;
    // skopeo: push, pull back byte-identical, copy across repositories (one token request
    // with several scopes, and cross-repository mounts).
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-cert-dir",
            &certs,
            &format!("dir:{}", src.display()),
            &format!("docker://{h}/team-a/app:v1"),
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
            &format!("docker://{h}/team-a/app:v1"),
            &format!("dir:{}", back.display()),
        ],
    )?;
    same_dirs(&src, &back)?;
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--src-cert-dir",
            &certs,
            "--dest-cert-dir",
            &certs,
            &format!("docker://{h}/team-a/app:v1"),
            &format!("docker://{h}/team-b/copy:v1"),
        ],
    )?;
    let tags = ctr.run(
        "skopeo",
        &[
            "list-tags",
            "--cert-dir",
            &certs,
            &format!("docker://{h}/team-b/copy"),
        ],
    )?;
    ensure!(tags.contains("\"v1\""), "{tags}");
    // podman push/pull into a separate storage.
    ctr.run(
        "podman",
        &[
            "push",
            "-q",
            "--cert-dir",
            &certs,
            "localhost/gw-src:1",
            &format!("{h}/team-a/podman:v1"),
        ],
    )?;
    let other = Containers::new()?;
    let certs2 = cert_dir(&other, &g);
    other.login("podman", &certs2, h, "admin", ADMIN_PASSWORD)?;
    other.run(
        "podman",
        &[
            "pull",
            "-q",
            "--cert-dir",
            &certs2,
            &format!("{h}/team-a/podman:v1"),
        ],
    )?;
    let id1 = ctr.run(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            "localhost/gw-src:1",
        ],
    )?;
    let id2 = other.run(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            &format!("{h}/team-a/podman:v1"),
        ],
    )?;
    ensure!(id1.trim() == id2.trim(), "image ids differ: {id1} {id2}");
    // buildah push.
    ctr.run(
        "buildah",
        &[
            "push",
            "-q",
            "--cert-dir",
            &certs,
            "localhost/gw-src:1",
            &format!("docker://{h}/team-a/buildah:v1"),
        ],
    )?;
    let out = ctr.dir.path().join("buildah-back");
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--src-cert-dir",
            &certs,
            &format!("docker://{h}/team-a/buildah:v1"),
            &format!("dir:{}", out.display()),
        ],
    )?;
    // Anonymous pulls of a non-public repository are refused.
    let anon = Containers::new()?;
    let certs3 = cert_dir(&anon, &g);
    let r = anon.run(
        "skopeo",
        &[
            "inspect",
            "--cert-dir",
            &certs3,
            &format!("docker://{h}/team-a/app:v1"),
        ],
    );
    ensure!(r.is_err(), "anonymous inspect of team-a/app succeeded");
    Ok(())
}

#[test]
fn docker_login_stores_an_identity_token() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let g = GatewayServer::start_dev(data.path(), Some(ADMIN_PASSWORD))?;
    let _trust = DockerTrust::install(&g.host, &g.ca_pem)?;
    let config = tempfile::tempdir()?;
    let (ok, text) = docker_login(config.path(), &g.host, "admin", ADMIN_PASSWORD)?;
    ensure!(ok, "{text}");
    let stored = std::fs::read_to_string(config.path().join("config.json"))?;
    let v: Value = serde_json::from_str(&stored)?;
    let entry = &v["auths"][g.host.as_str()];
    ensure!(
        entry["identitytoken"].is_string(),
        "docker stored no identity token: {stored}"
    );
    ensure!(
        !stored.contains(ADMIN_PASSWORD),
        "docker stored the password"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_storage_node_is_skipped_after_the_health_check_interval() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("storage");
    let mut a = storage_node(&root);
    let b = storage_node(&root);
    let g = start_gateway(dir.path(), &[&a, &b], &[("alice", "pw")]);
    let c = user_client(&g, "alice", "pw");
    let blob = vec![9u8; 64 * 1024];
    let digest = c.push_blob("ha/app", blob.clone()).await.unwrap();
    let path = format!("/v2/ha/app/blobs/{digest}");
    c.get(&path).await.unwrap(); // token cached

    let started = std::time::Instant::now();
    let mut killed_at = None;
    let mut late_failures = Vec::new();
    let mut ok = 0;
    while started.elapsed() < std::time::Duration::from_secs(4) {
        if killed_at.is_none() && started.elapsed() > std::time::Duration::from_secs(1) {
            a.kill9();
            killed_at = Some(std::time::Instant::now());
        }
        let sent = std::time::Instant::now();
        let outcome = match c.get(&path).await {
            Ok(r) if r.status() == 200 => r
                .bytes()
                .await
                .map(|b| b.len() == blob.len())
                .unwrap_or(false),
            _ => false,
        };
        if outcome {
            ok += 1;
        } else if killed_at.is_some_and(|k| sent > k + std::time::Duration::from_millis(400)) {
            late_failures.push(sent.duration_since(killed_at.unwrap()));
        }
    }
    assert!(ok > 50, "only {ok} pulls succeeded");
    assert!(
        late_failures.is_empty(),
        "pulls failed after the health-check interval: {late_failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_an_immutable_tag_points_to_cannot_be_deleted_by_digest() {
    let dep = deployment(&[("m", "m-pw"), ("alice", "alice-pw")]);
    let g = &dep.gateway;
    // Every user is a maintainer (pull, push, delete) of users/<name>/**; none may override.
    let m = user_client(g, "m", "m-pw");
    let repo = "users/m/app";
    let release = m
        .image_manifest(repo, b"{\"x\":1}", &[], None)
        .await
        .unwrap();
    let scratch = m
        .image_manifest(repo, b"{\"x\":2}", &[], None)
        .await
        .unwrap();
    let (rd, sd) = (
        portcullis_tests::client::sha256(&release),
        portcullis_tests::client::sha256(&scratch),
    );
    assert_eq!(
        m.put_manifest(repo, "v3.0.0", OCI_MANIFEST, &release)
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        m.put_manifest(repo, "scratch", OCI_MANIFEST, &scratch)
            .await
            .unwrap()
            .status(),
        201
    );
    let r = m
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/{rd}"))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "DENIED").await.unwrap();
    let r = m
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/v3.0.0"))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "DENIED").await.unwrap();
    assert_eq!(
        m.get(&format!("/v2/{repo}/manifests/v3.0.0"))
            .await
            .unwrap()
            .status(),
        200
    );
    // A manifest only mutable tags point to can go.
    let r = m
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/{sd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The admin may override (audited).
    let alice = user_client(g, "alice", "alice-pw");
    let r = alice
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/{rd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_unknown_paths_get_client_errors() {
    let (_data, g) = dev();
    let c = Client::with_ca(&g.base, &g.ca_pem);
    let huge = "x".repeat(256 * 1024);
    // A refused connection is also fine, as long as the gateway lives on.
    if let Ok(r) = c
        .http
        .get(format!("{}/v2/", g.base))
        .header("x-big", huge)
        .send()
        .await
    {
        assert!(
            r.status().is_client_error(),
            "oversized header: {}",
            r.status()
        );
    }
    let r = c.get("/nothing/here").await.unwrap();
    expect_error(r, 404, "UNSUPPORTED").await.unwrap();
    let r = c
        .http
        .delete(format!("{}/token", g.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        c.get("/v2/").await.unwrap().status(),
        401,
        "the gateway still serves"
    );
}

#[test]
fn docker_push_and_pull_through_the_gateway() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let g = GatewayServer::start_dev(data.path(), Some(ADMIN_PASSWORD))?;
    let _trust = DockerTrust::install(&g.host, &g.ca_pem)?;
    let dk = Dockerd::start()?;
    let image = format!("{}/team-a/docker:v1", g.host);
    let id = dk.build_busybox(&image)?;
    let login = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s '{ADMIN_PASSWORD}' | docker login {} -u admin --password-stdin",
            g.host
        ))
        .env(
            "DOCKER_HOST",
            format!("unix://{}/docker.sock", dk.dir.path().display()),
        )
        .env("DOCKER_CONFIG", dk.dir.path().join("client"))
        .output()?;
    ensure!(
        login.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    let pushed = dk.run(&["push", &image])?;
    ensure!(pushed.contains("digest: sha256:"), "{pushed}");
    dk.run(&["rmi", &image])?;
    dk.run(&["pull", &image])?;
    let pulled = dk.run(&["image", "inspect", "--format", "{{.Id}}", &image])?;
    ensure!(
        pulled.trim() == id.trim(),
        "pulled image {pulled} differs from pushed {id}"
    );
    Ok(())
}

/// `[upstream] local_root`: a gateway beside its storage node answers blob reads from the
/// node's files — the same status, headers and bytes as the hop to storage gives (whole,
/// `HEAD`, ranges, over HTTP/2 and HTTP/1.1), only for a repository linked to the blob (a
/// team member asking for another team's blob through their own repository gets 404, as
/// from storage), and what it cannot answer for certain goes to storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_reads_from_the_storage_files_answer_as_storage_does_and_only_where_linked()
-> anyhow::Result<()> {
    use portcullis_tests::server::{metric_sample, metrics_text};
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("storage");
    let storage = deployment::storage_node(&root)?;
    let users = [("bob", "bob-pw"), ("alice", "alice-pw")];
    let (hop_dir, local_dir) = (dir.path().join("hop"), dir.path().join("local"));
    std::fs::create_dir_all(&hop_dir)?;
    std::fs::create_dir_all(&local_dir)?;
    let hop = deployment::start_gateway_with(&hop_dir, &[&storage], &users, 4, "", &[])?;
    let root_text = root.display().to_string();
    let local = deployment::start_gateway_with(
        &local_dir,
        &[&storage],
        &users,
        4,
        "",
        &[("PORTCULLIS_UPSTREAM_LOCAL_ROOT", &root_text)],
    )?;
    // bob's blob (3 MiB and a bit: several reads of the file), and alice's in team-b.
    let blob: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let bob_hop = user_client(&hop, "bob", "bob-pw");
    let digest = bob_hop.push_blob("team-a/app", blob.clone()).await?;
    let theirs = user_client(&hop, "alice", "alice-pw")
        .push_blob("team-b/app", &b"team-b's own layer"[..])
        .await?;
    let bob_local = user_client(&local, "bob", "bob-pw");
    let read = |c: &Client, method: Method, path: String, range: Option<&'static str>| {
        let mut r = c.req(method, &path);
        if let Some(range) = range {
            r = r.header("range", range);
        }
        async move {
            let r = r.send().await?;
            let mut head: Vec<(String, String)> = [
                "content-length",
                "content-type",
                "docker-content-digest",
                "etag",
                "accept-ranges",
                "content-range",
                "cache-control",
            ]
            .iter()
            .filter_map(|h| {
                let v = r.headers().get(*h)?.to_str().ok()?;
                Some((h.to_string(), v.to_owned()))
            })
            .collect();
            head.insert(0, ("status".into(), r.status().as_u16().to_string()));
            let body = r.bytes().await?;
            anyhow::Ok((head, body))
        }
    };
    let files = "gateway_blob_reads_total{from=\"files\"}";
    let answered_locally = async || {
        anyhow::Ok(metric_sample(&metrics_text(&local.admin).await?, files).unwrap_or(0.0))
    };
    let path = format!("/v2/team-a/app/blobs/{digest}");
    let cases: [(Method, Option<&'static str>, bool); 6] = [
        (Method::GET, None, true),
        (Method::HEAD, None, true),
        (Method::GET, Some("bytes=5-1048580"), true),
        (Method::GET, Some("bytes=-100"), true),
        (Method::GET, Some("bytes=1-2,5-6"), true),
        // Past the end: storage's 416.
        (Method::GET, Some("bytes=99999999-"), false),
    ];
    for (method, range, from_files) in cases {
        let before = answered_locally().await?;
        let want = read(&bob_hop, method.clone(), path.clone(), range).await?;
        let got = read(&bob_local, method.clone(), path.clone(), range).await?;
        ensure!(
            got == want,
            "{method} {range:?}: {:?} from the files, {:?} through storage",
            got.0,
            want.0
        );
        let counted = answered_locally().await? - before;
        ensure!(
            counted == if from_files { 1.0 } else { 0.0 },
            "{method} {range:?}: {counted} answered from the files"
        );
    }
    ensure!(read(&bob_local, Method::GET, path.clone(), None).await?.1 == blob);
    // Over HTTP/1.1 too.
    let mut h1 = bob_local.clone();
    h1.http = portcullis_tests::client::https(&local.ca_pem, true);
    ensure!(read(&h1, Method::GET, path.clone(), None).await?.1 == blob);

    // alice's blob asked for through bob's repository: not linked there, 404 as storage says.
    for c in [&bob_hop, &bob_local] {
        let r = c.get(&format!("/v2/team-a/app/blobs/{theirs}")).await?;
        expect_error(r, 404, "BLOB_UNKNOWN").await?;
    }
    // And through alice's repository: bob may not read it, whoever answers.
    let r = bob_local
        .get(&format!("/v2/team-b/app/blobs/{theirs}"))
        .await?;
    ensure!(
        r.status() == 401 || r.status() == 403,
        "bob read team-b's blob: {}",
        r.status()
    );
    Ok(())
}
