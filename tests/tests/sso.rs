//! End-to-end tests of OIDC single sign-on: a real OpenID provider (oidc-provider on Node,
//! started here) and the real gateway over TLS. `cargo test --release --test sso` runs
//! exactly these.

use portcullis_tests::client::{Client, TokenAuth, https};
use portcullis_tests::deployment::{self, SERVICE, storage_node};
use portcullis_tests::oidc::{Idp, Login, browser_login};
use portcullis_tests::server::{GatewayServer, StorageServer};
use portcullis_tests::tools::{Containers, cert_dir};
use serde_json::{Value, json};

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

struct Sso {
    gateway: GatewayServer,
    idp: Idp,
    _storage: StorageServer,
    _dir: tempfile::TempDir,
}

/// A gateway with `[oidc]` pointing at a fresh IdP whose users are bob (team-a, plus a group
/// the filter drops), carol (no groups) and alice (registry-admins).
fn start() -> Sso {
    start_with("")
}

/// [`start`] with more lines in the gateway's `[oidc]` table.
fn start_with(extra_oidc: &str) -> Sso {
    let dir = tempfile::tempdir().unwrap();
    let users = json!({
        "bob": {"password": "bob-idp-pw", "groups": ["team-a", "all-staff"]},
        "carol": {"password": "carol-idp-pw", "groups": []},
        "alice": {"password": "alice-idp-pw", "groups": ["registry-admins"]},
    });
    let (storage, gateway, idp) =
        portcullis_tests::oidc::start_sso(dir.path(), extra_oidc, &users).unwrap();
    Sso {
        gateway,
        idp,
        _storage: storage,
        _dir: dir,
    }
}

fn browser(g: &GatewayServer) -> reqwest::Client {
    // Redirects are followed by hand, as the flow needs the cookies of each site.
    https(&g.ca_pem, false)
}

/// Completes a browser login and returns the refresh token shown on the page.
async fn sign_in(s: &Sso, user: &str, pw: &str) -> String {
    sign_in_device(s, user, pw, "laptop").await
}

/// [`sign_in`] naming the device.
async fn sign_in_device(s: &Sso, user: &str, pw: &str, device: &str) -> String {
    portcullis_tests::oidc::sign_in(
        &browser(&s.gateway),
        &s.gateway.base,
        &s.idp,
        user,
        pw,
        device,
    )
    .await
    .unwrap()
}

/// The browser arriving at the gateway's callback, with the gateway's cookies or not.
async fn callback(http: &reqwest::Client, login: &Login, with_cookie: bool) -> reqwest::Response {
    let mut r = http.get(&login.callback);
    if with_cookie {
        r = r.header("cookie", login.gateway_cookies.header());
    }
    r.send().await.unwrap()
}

fn claims(token: &str) -> Value {
    portcullis_tests::client::jwt_claims(token).expect("a JWT")
}

/// `POST /token` with `grant_type=refresh_token`: the status and the body.
async fn refresh_grant(g: &GatewayServer, refresh: &str, scope: &str) -> (u16, Value) {
    token_form(
        g,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", "test"),
            ("service", SERVICE),
            ("scope", scope),
        ],
    )
    .await
}

/// `POST /token` with `form`: the status and the body.
async fn token_form(g: &GatewayServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = browser(g)
        .post(format!("{}/token", g.base))
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// One poll of a device code.
async fn device_poll(g: &GatewayServer, code: &str) -> (u16, Value) {
    token_form(
        g,
        &[
            ("grant_type", DEVICE_GRANT),
            ("device_code", code),
            ("client_id", "test"),
        ],
    )
    .await
}

/// Polls a device code while the answer is `authorization_pending` or `slow_down`.
async fn device_poll_until_settled(g: &GatewayServer, code: &str) -> (u16, Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, v) = device_poll(g, code).await;
        let waiting = v["error"] == "authorization_pending" || v["error"] == "slow_down";
        if !waiting || std::time::Instant::now() > deadline {
            return (status, v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `POST /auth/oidc/device`: the gateway's device authorization answer.
async fn device_start(g: &GatewayServer) -> Value {
    let r = browser(g)
        .post(format!("{}/auth/oidc/device", g.base))
        .form(&[("client_id", "test"), ("device", "build-box")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `/auth/sessions[/<id>]` with Basic `<token>:<refresh>`: status and body.
async fn sessions_call(
    g: &GatewayServer,
    method: reqwest::Method,
    path: &str,
    refresh: &str,
) -> (u16, Value) {
    let r = browser(g)
        .request(method, format!("{}{path}", g.base))
        .basic_auth("<token>", Some(refresh))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_login_gives_a_refresh_token_whose_groups_drive_policy() {
    let s = start();
    let g = &s.gateway;
    let refresh = sign_in(&s, "bob", "bob-idp-pw").await;

    // The OAuth2 refresh grant, as docker uses an identity token.
    let http = browser(g);
    let (status, v) = refresh_grant(g, &refresh, "repository:team-a/app:pull,push").await;
    assert_eq!(status, 200, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(c["sub"], "bob");
    // Groups from the ID token, filtered by `groups_filter`.
    assert_eq!(c["portcullis"]["groups"], json!(["team-a"]));
    assert_eq!(c["access"][0]["actions"], json!(["pull", "push"]));

    // Basic `<token>:<refresh token>` (what `login -u '<token>'` stores) works as well.
    let mut bob = Client::with_ca(&g.base, &g.ca_pem);
    bob.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        SERVICE,
        Some(("<token>", &refresh)),
    ));
    bob.push_image("team-a/app", "sso", &[b"layer"])
        .await
        .unwrap();
    bob.push_is_denied("team-b/app").await.unwrap();

    // carol's token carries no group.
    let carol = sign_in(&s, "carol", "carol-idp-pw").await;
    let (status, v) = refresh_grant(g, &carol, "repository:team-a/app:push").await;
    assert_eq!(status, 200, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(c["portcullis"]["groups"], json!([]));
    assert_eq!(c["access"], json!([]));

    // Revoked: the next refresh fails with invalid_grant.
    let r = http
        .post(format!("{}/auth/revoke", g.base))
        .form(&[("token", carol.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, v) = refresh_grant(g, &carol, "").await;
    assert_eq!(status, 400);
    assert_eq!(v["error"], "invalid_grant");
}

#[test]
fn podman_skopeo_and_docker_log_in_and_push_with_the_refresh_token() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = start();
    let refresh = rt.block_on(sign_in(&s, "bob", "bob-idp-pw"));
    let g = &s.gateway;
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    ctr.login("podman", &certs, &g.host, "<token>", &refresh)?;
    ctr.build_scratch_image("sso-src:1", std::path::Path::new("/bin/busybox"))?;
    ctr.run(
        "podman",
        &[
            "push",
            "--cert-dir",
            &certs,
            "sso-src:1",
            &format!("{}/team-a/sso:v1", g.host),
        ],
    )?;
    let pushed_elsewhere = ctr.run(
        "podman",
        &[
            "push",
            "--cert-dir",
            &certs,
            "sso-src:1",
            &format!("{}/team-b/sso:v1", g.host),
        ],
    );
    anyhow::ensure!(pushed_elsewhere.is_err(), "bob pushed to team-b");
    // skopeo uses the same stored login.
    let inspected = ctr.run(
        "skopeo",
        &[
            "inspect",
            "--cert-dir",
            &certs,
            &format!("docker://{}/team-a/sso:v1", g.host),
        ],
    )?;
    anyhow::ensure!(inspected.contains("\"Digest\""), "{inspected}");

    // docker login -u '<token>' with the same token, then docker push (dockerd).
    let _trust = portcullis_tests::tools::DockerTrust::install(&g.host, &g.ca_pem)?;
    let dk = portcullis_tests::tools::Dockerd::start()?;
    let image = format!("{}/team-a/sso:docker", g.host);
    let id = dk.build_busybox(&image)?;
    let mut login = dk.cmd();
    login
        .args(["login", &g.host, "-u", "<token>", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), refresh.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = dk.run(&["push", &image])?;
    anyhow::ensure!(pushed.contains("digest: sha256:"), "{pushed}");
    dk.run(&["rmi", &image])?;
    dk.run(&["pull", &image])?;
    let pulled = dk.run(&["image", "inspect", "--format", "{{.Id}}", &image])?;
    anyhow::ensure!(pulled.trim() == id, "pulled {pulled}, pushed {id}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_forged_and_unbound_callbacks_are_refused() {
    let s = start();
    let g = &s.gateway;
    let http = browser(g);

    // A completed login's callback cannot be used twice (state and code are single-use).
    let login = browser_login(&http, &g.base, &s.idp, "bob", "bob-idp-pw", "a")
        .await
        .unwrap();
    let first = callback(&http, &login, true).await;
    assert_eq!(first.status(), 200);
    let again = callback(&http, &login, true).await;
    assert_eq!(again.status(), 400);

    // A callback arriving in another browser (no binding cookie) is refused, and the state
    // is spent: not even the right browser can use it afterwards.
    let login = browser_login(&http, &g.base, &s.idp, "bob", "bob-idp-pw", "b")
        .await
        .unwrap();
    let r = callback(&http, &login, false).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("another browser"));
    let r = callback(&http, &login, true).await;
    assert_eq!(r.status(), 400);

    // A made-up state, a wrong cookie, an IdP error, nothing at all.
    let login = browser_login(&http, &g.base, &s.idp, "bob", "bob-idp-pw", "c")
        .await
        .unwrap();
    let forged = login.callback.replace("state=", "state=forged");
    for (url, cookie) in [
        (forged.as_str(), login.gateway_cookies.header()),
        (
            login.callback.as_str(),
            "__Host-portcullis_oidc=wrong".to_string(),
        ),
        (
            &format!("{}/auth/oidc/callback?error=access_denied&state=s", g.base)[..],
            login.gateway_cookies.header(),
        ),
        (
            &format!("{}/auth/oidc/callback", g.base)[..],
            login.gateway_cookies.header(),
        ),
    ] {
        let r = http.get(url).header("cookie", cookie).send().await.unwrap();
        assert_eq!(r.status(), 400, "{url}");
    }

    // The IdP refuses a wrong password; nothing reaches the gateway.
    assert!(
        browser_login(&http, &g.base, &s.idp, "bob", "wrong", "d")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_oidc_configured_the_login_path_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_node(&dir.path().join("storage")).unwrap();
    let g = deployment::start_gateway(dir.path(), &[&storage], &[("u", "p")], 4).unwrap();
    let r = browser(&g)
        .get(format!("{}/auth/oidc/login", g.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn the_credential_helper_stores_the_token_and_podman_pushes_with_it() -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let rt = tokio::runtime::Runtime::new()?;
    let s = start();
    let refresh = rt.block_on(sign_in(&s, "bob", "bob-idp-pw"));
    let g = &s.gateway;
    let ctr = Containers::new()?;
    let creds = ctr.dir.path().join("creds/credentials.json");
    let ca = ctr.dir.path().join("registry-ca.pem");
    std::fs::write(&ca, &g.ca_pem)?;
    let helper = portcullis_tests::server::binary("docker-credential-portcullis");
    let call = |action: &str, input: &str| -> anyhow::Result<(bool, String)> {
        let mut c = std::process::Command::new(&helper)
            .arg(action)
            .env("PORTCULLIS_CREDENTIALS", &creds)
            .env("PORTCULLIS_CA_FILE", &ca)
            .env("PORTCULLIS_NO_DEVICE_FLOW", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        c.stdin.take().unwrap().write_all(input.as_bytes())?;
        let out = c.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        ))
    };
    let stored = json!({"ServerURL": format!("https://{}", g.host), "Username": "<token>", "Secret": refresh});
    assert!(call("store", &stored.to_string())?.0);
    let mode = std::fs::metadata(&creds)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credentials file is readable by others");
    let (ok, got) = call("get", &g.host)?;
    assert!(ok, "{got}");
    let got: Value = serde_json::from_str(&got)?;
    assert_eq!(got["Username"], "<token>");
    assert_eq!(got["Secret"], refresh.as_str());
    let (_, list) = call("list", "")?;
    assert_eq!(
        serde_json::from_str::<Value>(&list)?,
        json!({ g.host.clone(): "<token>" })
    );

    // podman with `credential-helpers = ["portcullis"]` and no login: the helper answers.
    let conf = ctr.dir.path().join("registries.conf");
    std::fs::write(&conf, "credential-helpers = [\"portcullis\"]\n")?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    let path = format!(
        "{}:{}",
        helper.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    ctr.build_scratch_image("helper-src:1", std::path::Path::new("/bin/busybox"))?;
    portcullis_tests::tools::run(
        ctr.cmd("podman")
            .env("CONTAINERS_REGISTRIES_CONF", &conf)
            .env("PORTCULLIS_CREDENTIALS", &creds)
            .env("PATH", &path)
            .args([
                "push",
                "--cert-dir",
                &certs,
                "helper-src:1",
                &format!("{}/team-a/helper:v1", g.host),
            ]),
    )?;

    // Erased: the protocol's "not found", and nothing left in the file.
    assert!(call("erase", &g.host)?.0);
    let (ok, msg) = call("get", &g.host)?;
    assert!(!ok && msg.contains("credentials not found"), "{msg}");
    assert!(!std::fs::read_to_string(&creds)?.contains(&refresh));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_are_listed_and_revoked_by_their_user_and_by_admins() {
    use reqwest::Method;
    let s = start();
    let g = &s.gateway;
    let laptop = sign_in_device(&s, "bob", "bob-idp-pw", "laptop").await;
    let desktop = sign_in_device(&s, "bob", "bob-idp-pw", "desktop").await;
    let admin = sign_in_device(&s, "alice", "alice-idp-pw", "admin-box").await;
    let carol = sign_in(&s, "carol", "carol-idp-pw").await;

    // bob sees his two sessions by device name, and never a token.
    let (status, v) = sessions_call(g, Method::GET, "/auth/sessions", &laptop).await;
    assert_eq!(status, 200, "{v}");
    let mut devices: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, ["desktop", "laptop"]);
    assert!(
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["user"] == "bob")
    );
    assert!(!v.to_string().contains(&laptop) && !v.to_string().contains(&desktop));

    // Only admins see others' sessions or revoke them.
    let (status, _) = sessions_call(g, Method::GET, "/auth/sessions?user=carol", &laptop).await;
    assert_eq!(status, 403);
    let (status, v) = sessions_call(g, Method::GET, "/auth/sessions?user=*", &admin).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sessions"].as_array().unwrap().len(), 4);
    let id_of = |v: &Value, device: &str| {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["device"] == device)
            .map(|x| x["id"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (_, cv) = sessions_call(g, Method::GET, "/auth/sessions?user=carol", &admin).await;
    assert_eq!(cv["sessions"].as_array().unwrap().len(), 1, "{cv}");
    let carols = id_of(&cv, "laptop");
    let (status, _) = sessions_call(
        g,
        Method::DELETE,
        &format!("/auth/sessions/{carols}"),
        &laptop,
    )
    .await;
    assert_eq!(status, 404, "bob revoked carol's session");
    assert_eq!(refresh_grant(g, &carol, "").await.0, 200);

    // bob pushes with his laptop session; an admin revokes it; the next trade and the
    // next push fail, the desktop session goes on.
    let client = |refresh: &str| {
        let mut c = Client::with_ca(&g.base, &g.ca_pem);
        c.auth = Some(TokenAuth::new(
            &format!("{}/token", g.base),
            SERVICE,
            Some(("<token>", refresh)),
        ));
        c
    };
    client(&laptop)
        .push_image("team-a/app", "v1", &[b"one"])
        .await
        .unwrap();
    let (_, bobs) = sessions_call(g, Method::GET, "/auth/sessions?user=bob", &admin).await;
    let laptop_id = id_of(&bobs, "laptop");
    let (status, v) = sessions_call(
        g,
        Method::DELETE,
        &format!("/auth/sessions/{laptop_id}"),
        &admin,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = refresh_grant(g, &laptop, "repository:team-a/app:push").await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(
        client(&laptop)
            .push_image("team-a/app", "v2", &[b"two"])
            .await
            .is_err(),
        "a push with a revoked session succeeded"
    );
    client(&desktop)
        .push_image("team-a/app", "v3", &[b"three"])
        .await
        .unwrap();

    // bob ends his own desktop session by id.
    let desktop_id = id_of(&bobs, "desktop");
    let (status, _) = sessions_call(
        g,
        Method::DELETE,
        &format!("/auth/sessions/{desktop_id}"),
        &desktop,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        refresh_grant(g, &desktop, "").await.1["error"],
        "invalid_grant"
    );

    // Without credentials: 401.
    let r = browser(g)
        .get(format!("{}/auth/sessions", g.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_are_read_again_from_the_idp_and_a_removed_user_loses_the_session() {
    let s = start_with("groups_refresh_seconds = 0");
    let g = &s.gateway;
    let refresh = sign_in(&s, "bob", "bob-idp-pw").await;
    let (status, v) = refresh_grant(g, &refresh, "repository:team-a/app:push").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        claims(v["access_token"].as_str().unwrap())["access"][0]["actions"],
        json!(["push"])
    );

    // Moved from team-a to team-b at the IdP: the next refresh says so.
    s.idp
        .set_users(&json!({"bob": {"password": "bob-idp-pw", "groups": ["team-b"]}}))
        .await
        .unwrap();
    let (status, v) = refresh_grant(g, &refresh, "repository:team-a/app:push").await;
    assert_eq!(status, 200, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(c["portcullis"]["groups"], json!(["team-b"]));
    assert_eq!(
        c["access"],
        json!([]),
        "team-a still granted after the IdP removed it"
    );

    // Removed at the IdP: its refresh fails, and so does the registry session.
    s.idp.set_users(&json!({"bob": null})).await.unwrap();
    let (status, v) = refresh_grant(g, &refresh, "").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_code_gives_one_session_and_bad_device_and_refresh_grants_are_refused() {
    let s = start();
    let g = &s.gateway;
    let start = device_start(g).await;
    for field in [
        "device_code",
        "user_code",
        "verification_uri",
        "expires_in",
        "interval",
    ] {
        assert!(!start[field].is_null(), "no {field} in {start}");
    }
    let code = start["device_code"].as_str().unwrap();
    let (status, v) = device_poll(g, code).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("authorization_pending")),
        "{v}"
    );

    portcullis_tests::oidc::device_login(
        &browser(g),
        &s.idp,
        start["user_code"].as_str().unwrap(),
        "bob",
        "bob-idp-pw",
    )
    .await
    .unwrap();
    let (status, v) = device_poll_until_settled(g, code).await;
    assert_eq!(status, 200, "{v}");
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&refresh);
    assert_eq!(claims(v["access_token"].as_str().unwrap())["sub"], "bob");
    let (status, v) = sessions_call(g, reqwest::Method::GET, "/auth/sessions", &refresh).await;
    assert_eq!(status, 200);
    assert_eq!(v["sessions"][0]["device"], "build-box");
    assert_eq!(v["sessions"][0]["source"], "device");

    // The code is spent; made-up codes and a missing one are refused.
    assert_eq!(device_poll(g, code).await.1["error"], "invalid_grant");
    assert_eq!(device_poll(g, "made-up").await.1["error"], "invalid_grant");
    let (status, v) = token_form(g, &[("grant_type", DEVICE_GRANT), ("client_id", "t")]).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let r = browser(g)
        .get(format!("{}/auth/oidc/device", g.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // The refresh token is for this service only: asked for another, or shown to another
    // registry, it is refused.
    let (status, v) = token_form(
        g,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("client_id", "test"),
            ("service", "other-registry.example"),
        ],
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let dir = tempfile::tempdir().unwrap();
    let other_storage = storage_node(&dir.path().join("storage")).unwrap();
    let other = deployment::start_gateway(dir.path(), &[&other_storage], &[("u", "p")], 4).unwrap();
    let (status, v) = refresh_grant(&other, &refresh, "").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_device_code_is_refused() {
    let s = start_with("flow_ttl_seconds = 2");
    let g = &s.gateway;
    let start = device_start(g).await;
    assert_eq!(start["expires_in"], 2);
    // The user never comes: once the code's time is up, polls hear expired_token.
    let (status, v) = device_poll_until_settled(g, start["device_code"].as_str().unwrap()).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("expired_token")),
        "{v}"
    );
    // Nor can the user finish it late at the IdP and have it count.
    let _ = portcullis_tests::oidc::device_login(
        &browser(g),
        &s.idp,
        start["user_code"].as_str().unwrap(),
        "bob",
        "bob-idp-pw",
    )
    .await;
    let (_, v) = device_poll(g, start["device_code"].as_str().unwrap()).await;
    assert_eq!(v["error"], "expired_token");
}

/// Runs `docker-credential-portcullis get` for `host` with nothing stored: it starts the
/// device flow and prints the code; the test signs in as `user` at the IdP; the helper's
/// answer is returned.
fn helper_device_login(
    s: &Sso,
    env: &[(&str, &std::path::Path)],
    user: &str,
    pw: &str,
) -> anyhow::Result<Value> {
    use std::io::{BufRead, Write};
    let helper = portcullis_tests::server::binary("docker-credential-portcullis");
    let mut cmd = std::process::Command::new(&helper);
    cmd.arg("get")
        .env("PORTCULLIS_REGISTRIES", &s.gateway.host)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(s.gateway.host.as_bytes())?;
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let code = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line)? == 0 {
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "the helper ended without a code: {said} {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        said.push_str(&line);
        if let Some(at) = line.find("enter the code ") {
            break line[at + 15..].trim().to_string();
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(portcullis_tests::oidc::device_login(
        &browser(&s.gateway),
        &s.idp,
        &code,
        user,
        pw,
    ))?;
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    });
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "helper get failed: {text}");
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn the_helper_runs_the_device_flow_then_podman_and_docker_push_without_a_password()
-> anyhow::Result<()> {
    use portcullis_tests::tools::{DockerTrust, Dockerd};
    let s = start();
    let g = &s.gateway;
    let ctr = Containers::new()?;
    let creds = ctr.dir.path().join("creds/credentials.json");
    let ca = ctr.dir.path().join("registry-ca.pem");
    std::fs::write(&ca, &g.ca_pem)?;
    let env = [
        ("PORTCULLIS_CREDENTIALS", creds.as_path()),
        ("PORTCULLIS_CA_FILE", ca.as_path()),
    ];
    let got = helper_device_login(&s, &env, "bob", "bob-idp-pw")?;
    assert_eq!(got["Username"], "<token>");
    let refresh = got["Secret"].as_str().unwrap().to_string();
    assert!(std::fs::read_to_string(&creds)?.contains(&refresh));

    // podman with `credential-helpers = ["portcullis"]`, nothing on the command line.
    let helper = portcullis_tests::server::binary("docker-credential-portcullis");
    let path = format!(
        "{}:{}",
        helper.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let conf = ctr.dir.path().join("registries.conf");
    std::fs::write(&conf, "credential-helpers = [\"portcullis\"]\n")?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    ctr.build_scratch_image("device-src:1", std::path::Path::new("/bin/busybox"))?;
    portcullis_tests::tools::run(
        ctr.cmd("podman")
            .env("CONTAINERS_REGISTRIES_CONF", &conf)
            .env("PORTCULLIS_CREDENTIALS", &creds)
            .env("PORTCULLIS_CA_FILE", &ca)
            .env("PORTCULLIS_NO_DEVICE_FLOW", "1")
            .env("PATH", &path)
            .args([
                "push",
                "--cert-dir",
                &certs,
                "device-src:1",
                &format!("{}/team-a/device:podman", g.host),
            ]),
    )?;

    // docker with `credHelpers`: the CLI asks the helper, dockerd trades the identity token.
    let _trust = DockerTrust::install(&g.host, &g.ca_pem)?;
    let dk = Dockerd::start()?;
    std::fs::create_dir_all(dk.client_config())?;
    std::fs::write(
        dk.client_config().join("config.json"),
        json!({"credHelpers": { g.host.clone(): "portcullis" }}).to_string(),
    )?;
    let image = format!("{}/team-a/device:docker", g.host);
    let id = dk.build_busybox(&image)?;
    let with_helper = |args: &[&str]| -> anyhow::Result<String> {
        dk.run_cmd(
            dk.cmd()
                .env("PATH", &path)
                .env("PORTCULLIS_CREDENTIALS", &creds)
                .env("PORTCULLIS_CA_FILE", &ca)
                .env("PORTCULLIS_NO_DEVICE_FLOW", "1")
                .args(args),
        )
    };
    let pushed = with_helper(&["push", &image])?;
    anyhow::ensure!(pushed.contains("digest: sha256:"), "{pushed}");
    dk.run(&["rmi", &image])?;
    with_helper(&["pull", &image])?;
    let pulled = dk.run(&["image", "inspect", "--format", "{{.Id}}", &image])?;
    anyhow::ensure!(pulled.trim() == id, "pulled {pulled}, pushed {id}");
    // team-b is not bob's: denied through the helper too.
    let other = format!("{}/team-b/device:docker", g.host);
    dk.run(&["tag", &image, &other])?;
    anyhow::ensure!(
        with_helper(&["push", &other]).is_err(),
        "bob pushed to team-b"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_device_flow_at_the_idp_the_gateway_runs_its_own_with_the_browser_login() {
    let dir = tempfile::tempdir().unwrap();
    let users = json!({"bob": {"password": "bob-idp-pw", "groups": ["team-a"]}});
    let (_storage, g, idp) = portcullis_tests::oidc::start_sso_with(
        dir.path(),
        "",
        &users,
        &[("IDP_NO_DEVICE_FLOW", "1")],
    )
    .unwrap();
    let http = browser(&g);
    let start = device_start(&g).await;
    let verify = format!("{}/auth/oidc/device/verify", g.base);
    assert_eq!(start["verification_uri"], verify.as_str(), "{start}");
    let code = start["user_code"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 9, "{code}");
    let device_code = start["device_code"].as_str().unwrap().to_string();
    assert_eq!(
        device_poll(&g, &device_code).await.1["error"],
        "authorization_pending"
    );

    // The page names the device and binds its confirmation to this browser.
    let r = http
        .get(start["verification_uri_complete"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut jar = portcullis_tests::oidc::Jar::default();
    jar.take(&r);
    let page = r.text().await.unwrap();
    assert!(page.contains("build-box"), "{page}");
    let csrf = portcullis_tests::oidc::field_value(&page, "csrf").unwrap();

    // A confirmation from elsewhere (no cookie: another site's form) is refused; so is a
    // code nobody was given.
    let r = http
        .post(&verify)
        .form(&[("user_code", code.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{verify}?user_code=BCDF-GHJK"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Confirmed here: the browser login at the IdP, whose callback approves the device.
    let r = http
        .post(&verify)
        .header("cookie", jar.header())
        .form(&[("user_code", code.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let login = portcullis_tests::oidc::through_idp(
        &http,
        &g.base,
        &idp,
        &r,
        Default::default(),
        "bob",
        "bob-idp-pw",
    )
    .await
    .unwrap();
    let r = callback(&http, &login, true).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("device-approved"));

    let (status, v) = device_poll(&g, &device_code).await;
    assert_eq!(status, 200, "{v}");
    let refresh = v["refresh_token"].as_str().unwrap();
    portcullis_tests::remember_secret(refresh);
    let (status, v) = refresh_grant(&g, refresh, "repository:team-a/app:push").await;
    assert_eq!(status, 200, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(
        (c["sub"].as_str(), c["portcullis"]["groups"].clone()),
        (Some("bob"), json!(["team-a"]))
    );
    let (_, v) = sessions_call(&g, reqwest::Method::GET, "/auth/sessions", refresh).await;
    assert_eq!(v["sessions"][0]["source"], "device");

    // Everything is spent: the device code, and the user code.
    assert_eq!(
        device_poll(&g, &device_code).await.1["error"],
        "invalid_grant"
    );
    let r = http
        .get(start["verification_uri_complete"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// Where `/auth/oidc/login` sends the browser (the IdP's authorization URL).
async fn login_redirect(g: &GatewayServer) -> String {
    let r = browser(g)
        .get(format!("{}/auth/oidc/login", g.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    r.headers()["location"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_oidc_table_is_put_in_force_on_sighup_and_a_broken_one_changes_nothing() {
    let s = start();
    let g = &s.gateway;
    sign_in(&s, "bob", "bob-idp-pw").await;
    assert!(login_redirect(g).await.contains("client_id=portcullis&"));
    let conf = s._dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    // Another client id: the next sign-in goes to the IdP with it.
    let renamed = text.replace("client_id = \"portcullis\"", "client_id = \"renamed\"");
    assert_ne!(renamed, text);
    std::fs::write(&conf, &renamed).unwrap();
    let e = g.reload().await.unwrap();
    assert_eq!(e["event.outcome"], "success", "{e}");
    assert_eq!(e["config.applied"], json!(["oidc"]), "{e}");
    assert!(login_redirect(g).await.contains("client_id=renamed&"));
    // A table that does not build (a symmetric algorithm) changes nothing.
    std::fs::write(
        &conf,
        renamed.replace(
            "client_id = \"renamed\"",
            "client_id = \"renamed\"\nalgorithms = [\"HS256\"]",
        ),
    )
    .unwrap();
    let e = g.reload().await.unwrap();
    assert_eq!(e["event.outcome"], "failure", "{e}");
    assert!(login_redirect(g).await.contains("client_id=renamed&"));
    // The first table again: a whole sign-in works as before.
    std::fs::write(&conf, &text).unwrap();
    assert_eq!(g.reload().await.unwrap()["config.applied"], json!(["oidc"]));
    sign_in(&s, "bob", "bob-idp-pw").await;
}
