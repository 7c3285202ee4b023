//! The attacker's table (issue 24): each test is a row — a request sequence by bob, who may
//! push to team-a and to users/bob only, against team-b's content and the registry's
//! security state, or by a client with no credentials at all — and the refusal it must meet.
//! The real gateway over TLS in front of the real storage service.
//! `cargo test --release --test authz` runs exactly these.
//!
//! | row | attack | expected |
//! |---|---|---|
//! | 1 | cross-repository mount from team-b, with a URI the gateway cannot rewrite (22 000 `/`), encoded keys, repeated `from`, `;` separators | never 201; team-b's blob never readable from team-a |
//! | 2 | a refresh token traded for "another" refresh token, then the original revoked | the same token back; revoking it ends every copy |
//! | 3 | 110 000 anonymous failed logins under fresh names (state an anonymous client makes) | bob's lockout stays |
//! | 4 | DELETE of an immutable image's manifest, of a child of an immutable index, of its layer and config, with a forged rules header | 403 DENIED; the image still pulls |
//! | 5 | failed logins as `BOB `, `Bob`, full-width `ｂｏｂ` | they lock `bob` out |
//! | 7 | the credential helper asked for a server nobody named; concurrent helpers | no sign-in started; no entry lost |
//! | 8 | a robot re-enabling a robot an administrator disabled | 403 |
//! | 9 | storage's health, readiness and metrics with a write method and no secret | 401 |
//! | 10 | an unauthenticated mount | challenged for pull on the source too |
//!
//! Rows 3 and 6 also have store- and IdP-level tests where the real thing cannot be driven
//! from here: `gateway::state` (200 000 anonymous entries), `tests/tests/ha/state_store.rs`
//! (the same on Redis), `gateway::auth::oidc` (a name bound to its first (issuer, sub); `azp`).

use portcullis_tests::client::{Client, OCI_INDEX, OCI_MANIFEST, expect_error, https, sha256};
use portcullis_tests::deployment::{Deployment, SERVICE, user_client};
use portcullis_tests::server::GatewayServer;
use reqwest::Method;
use serde_json::{Value, json};

const BOB: (&str, &str) = ("bob", "bob-pw");
const ALICE: (&str, &str) = ("alice", "alice-pw");
const ADMIN_TOKEN: &str = "authz-admin-token-0123456789";

fn deployment(extra: &str) -> Deployment {
    Deployment::start_in_with(&std::env::temp_dir(), &[BOB, ALICE], 4, extra).unwrap()
}

/// `GET /token` with Basic credentials and a query; status and JSON.
async fn token(g: &GatewayServer, user: &str, password: &str, query: &str) -> (u16, Value) {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/token?service={SERVICE}&{query}", g.base))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Alice (an administrator) pushes a secret layer to team-b/secret; its digest.
async fn team_b_secret(g: &GatewayServer) -> oci::Digest {
    let alice = user_client(g, ALICE.0, ALICE.1);
    alice
        .push_image("team-b/secret", "latest", &[b"team-b's secret layer"])
        .await
        .unwrap();
    sha256(b"team-b's secret layer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_1_no_mount_reads_another_teams_blob_whatever_the_query() {
    let dep = deployment("");
    let g = &dep.gateway;
    let secret = team_b_secret(g).await;
    let bob = user_client(g, BOB.0, BOB.1);
    let d = secret.to_string();
    let pad = "/".repeat(22_000);
    let queries = [
        format!("mount={d}&from=team-b/secret"),
        format!("mount={d}&from=team-b/secret&pad={pad}"),
        format!("mount={d}&from=team-b%2Fsecret&pad={pad}"),
        format!("%6Dount={d}&fr%6Fm=team-b%2Fsecret"),
        format!("mount={d}&from=team-a/app&from=team-b/secret"),
        format!("from=team-a/app&mount={d}&from=team-b/secret&pad={pad}"),
        format!("mount={d};from=team-b/secret"),
        format!("mount={}&from=team-b/secret", d.replace(':', "%3A")),
    ];
    for q in &queries {
        let r = bob
            .req(Method::POST, &format!("/v2/team-a/app/blobs/uploads/?{q}"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_ne!(status, 201, "mount with {:.80}… was done", q);
        assert!(
            status == 202 || (400..500).contains(&status),
            "{:.80}: {status}",
            q
        );
        let r = bob
            .req(Method::GET, &format!("/v2/team-a/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            404,
            "team-b's blob readable from team-a after {:.80}",
            q
        );
    }
    // And directly, of course not.
    let r = bob
        .req(Method::GET, &format!("/v2/team-b/secret/blobs/{d}"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "DENIED").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_2_a_refresh_token_never_opens_a_session_of_its_own() {
    let dep = deployment("");
    let g = &dep.gateway;
    let (s, first) = token(g, BOB.0, BOB.1, "client_id=docker&offline_token=true").await;
    assert_eq!(s, 200);
    let r1 = first["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&r1);
    // Docker's identity-token login with the refresh token, asking for another.
    let (s, again) = token(g, "<token>", &r1, "client_id=docker&offline_token=true").await;
    assert_eq!(s, 200);
    let r2 = again["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    portcullis_tests::remember_secret(&r2);
    assert!(
        r2 == r1,
        "a new refresh token was opened from a refresh token"
    );
    let (s, form) = {
        let r = https(&g.ca_pem, false)
            .post(format!("{}/token", g.base))
            .form(&[
                ("grant_type", "password"),
                ("username", "<token>"),
                ("password", r1.as_str()),
                ("client_id", "docker"),
                ("access_type", "offline"),
                ("service", SERVICE),
            ])
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s, 200);
    let r3 = form["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    portcullis_tests::remember_secret(&r3);
    assert!(r3 == r1, "the password grant opened a new refresh token");
    // One session, revoked once: nothing derived from it works any more.
    let r = https(&g.ca_pem, false)
        .post(format!("{}/auth/revoke", g.base))
        .form(&[("token", r1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = token(g, "<token>", &r1, "client_id=docker").await;
    assert_eq!(s, 401, "the revoked session still logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_3_and_5_lockouts_hold_against_name_variants_and_anonymous_floods() {
    // 110 000 failed logins make 110 000 audit events: to a file, not the test's output.
    let audit = tempfile::tempdir().unwrap();
    let dep = deployment(&format!(
        "[limits]\nuser_failures = 3\nsource_failures = 0\nlockout_seconds = 600\n\
         [audit]\nfile = \"{}/audit.jsonl\"\n",
        audit.path().display()
    ));
    let g = &dep.gateway;
    // Row 5: three failures under spellings a directory binds as one entry.
    for variant in ["BOB ", "Bob", "\u{ff42}\u{ff4f}\u{ff42}"] {
        let (s, _) = token(g, variant, "wrong-pw", "").await;
        assert_eq!(s, 401, "{variant:?}");
    }
    let (s, _) = token(g, BOB.0, BOB.1, "").await;
    assert_eq!(
        s, 429,
        "bob is not locked out by failures under variants of his name"
    );
    // Row 3: an anonymous client makes state at will — a failed-login counter under each
    // fresh name — more entries than the whole in-memory store used to hold (100 000, when
    // it cleared everything, lockouts too); bob's lockout stays.
    let http = https(&g.ca_pem, false);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let http = http.clone();
        let base = g.base.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..6_875 {
                let r = http
                    .get(format!("{base}/token?service={SERVICE}"))
                    .basic_auth(format!("nobody-{w}-{i}"), Some("wrong-pw"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 401);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (s, _) = token(g, BOB.0, BOB.1, "").await;
    assert_eq!(s, 429, "bob's lockout went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_4_nothing_an_immutable_tag_needs_can_be_deleted() {
    let dep = deployment("");
    let g = &dep.gateway;
    let bob = user_client(g, BOB.0, BOB.1);
    // users/bob/**: bob is a maintainer (pull, push, delete), with no override.
    let repo = "users/bob/app";
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"a layer of the release".as_slice();
    let child = bob
        .image_manifest(repo, config, &[layer], None)
        .await
        .unwrap();
    let child_digest = sha256(&child);
    assert_eq!(
        bob.put_manifest(repo, &child_digest.to_string(), OCI_MANIFEST, &child)
            .await
            .unwrap()
            .status(),
        201
    );
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest.to_string(),
                       "size": child.len(), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .unwrap();
    let index_digest = sha256(&index);
    // v1.2.3 is immutable in the shipped policy.
    assert_eq!(
        bob.put_manifest(repo, "v1.2.3", OCI_INDEX, &index)
            .await
            .unwrap()
            .status(),
        201
    );
    let refused = [
        format!("/v2/{repo}/manifests/{index_digest}"),
        format!("/v2/{repo}/manifests/{child_digest}"),
        format!("/v2/{repo}/blobs/{}", sha256(layer)),
        format!("/v2/{repo}/blobs/{}", sha256(config)),
    ];
    for path in &refused {
        let r = bob.req(Method::DELETE, path).send().await.unwrap();
        expect_error(r, 403, "DENIED").await.unwrap();
        // A client's own copy of the rules header is dropped, never obeyed.
        let r = bob
            .req(Method::DELETE, path)
            .header(
                "portcullis-protection",
                r#"{"rules":[],"may_override":true}"#,
            )
            .send()
            .await
            .unwrap();
        expect_error(r, 403, "DENIED").await.unwrap();
    }
    // The image still pulls whole.
    for path in [
        format!("/v2/{repo}/manifests/v1.2.3"),
        format!("/v2/{repo}/manifests/{child_digest}"),
        format!("/v2/{repo}/blobs/{}", sha256(layer)),
        format!("/v2/{repo}/blobs/{}", sha256(config)),
    ] {
        assert_eq!(bob.get(&path).await.unwrap().status(), 200, "{path}");
    }
    // What no immutable tag needs can go.
    let (_, scratch) = bob
        .push_image(repo, "scratch", &[b"scratch layer"])
        .await
        .unwrap();
    let r = bob
        .req(
            Method::DELETE,
            &format!("/v2/{repo}/blobs/{}", sha256(b"scratch layer")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = bob
        .req(Method::DELETE, &format!("/v2/{repo}/manifests/{scratch}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn helper(creds: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(portcullis_tests::server::binary(
        "docker-credential-portcullis",
    ));
    c.env("PORTCULLIS_CREDENTIALS", creds)
        .env_remove("PORTCULLIS_REGISTRIES")
        .env_remove("PORTCULLIS_NO_DEVICE_FLOW")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn helper_run(creds: &std::path::Path, action: &str, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = helper(creds).arg(action).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn row_7_the_credential_helper_signs_in_only_where_told_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.json");
    // A server an image named, not one the user named: no device flow, no request.
    let started = std::time::Instant::now();
    let out = helper_run(&creds, "get", "evil.example");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "credentials not found in native keychain"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not signing in to evil.example"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // 16 helpers storing at once (docker runs one per image): every entry is kept.
    let children: Vec<_> = (0..16)
        .map(|i| {
            std::thread::spawn({
                let creds = creds.clone();
                move || {
                    let entry = json!({"ServerURL": format!("registry-{i}.corp"),
                                       "Username": "<token>", "Secret": format!("not-a-secret-{i}")});
                    helper_run(&creds, "store", &entry.to_string())
                }
            })
        })
        .collect();
    for c in children {
        assert!(c.join().unwrap().status.success());
    }
    let list: Value = serde_json::from_slice(&helper_run(&creds, "list", "").stdout).unwrap();
    assert_eq!(list.as_object().unwrap().len(), 16, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_8_a_robot_cannot_undo_an_administrators_disable() {
    let dir = tempfile::tempdir().unwrap();
    let storage = portcullis_tests::deployment::storage_node(&dir.path().join("storage")).unwrap();
    let g = portcullis_tests::deployment::start_gateway_with(
        dir.path(),
        &[&storage],
        &[BOB, ALICE],
        4,
        "",
        &[("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)],
    )
    .unwrap();
    let http = https(&g.ca_pem, false);
    let api =
        |method: Method, path: &str| http.request(method, format!("{}/admin/robots{path}", g.base));
    let r = api(Method::POST, "")
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"project": "team-a", "name": "ci", "may_create_robots": true,
                      "scope": [{"repositories": ["team-a/**"], "actions": ["pull", "push"]}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ci: Value = r.json().await.unwrap();
    let ci_secret = ci["secret"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&ci_secret);
    let r = api(Method::POST, "")
        .basic_auth("robot$team-a+ci", Some(&ci_secret))
        .json(&json!({"project": "team-a", "name": "child",
                      "scope": [{"repositories": ["team-a/app"], "actions": ["pull"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let child: Value = r.json().await.unwrap();
    portcullis_tests::remember_secret(child["secret"].as_str().unwrap());
    let r = api(Method::PATCH, "/robot$team-a+child")
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = api(Method::PATCH, "/robot$team-a+child")
        .basic_auth("robot$team-a+ci", Some(&ci_secret))
        .json(&json!({"disabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "the robot enabled what an administrator disabled"
    );
    let r = api(Method::GET, "/robot$team-a+child")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let shown: Value = r.json().await.unwrap();
    assert_eq!(shown["disabled"], true);
    // What the robot disabled itself, it may enable again.
    let r = api(Method::PATCH, "/robot$team-a+child")
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"disabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for disabled in [true, false] {
        let r = api(Method::PATCH, "/robot$team-a+child")
            .basic_auth("robot$team-a+ci", Some(&ci_secret))
            .json(&json!({"disabled": disabled}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "disabled = {disabled}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_9_and_10_storage_answers_only_reads_openly_and_mounts_are_challenged_whole() {
    let dep = deployment("");
    let storage = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = storage
            .get(format!("{}{path}", dep.storage.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let r = storage
                .request(method.clone(), format!("{}{path}", dep.storage.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{method} {path} without the secret");
        }
    }
    // Row 10: no credentials, a mount: the challenge asks for pull on the source as well.
    let anonymous = Client::with_ca(&dep.gateway.base, &dep.gateway.ca_pem);
    let d = sha256(b"x");
    let r = anonymous
        .req(
            Method::POST,
            &format!("/v2/team-a/app/blobs/uploads/?mount={d}&from=team-b/secret"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge
            .contains("scope=\"repository:team-a/app:pull,push repository:team-b/secret:pull\""),
        "{challenge}"
    );
}
