//! End-to-end tests of OIDC single sign-on: a real OpenID provider (oidc-provider on Node,
//! started here) and the real gateway over TLS. `cargo test --release --test sso` runs
//! exactly these.

use portcullis_tests::client::{Client, TokenAuth, https};
use portcullis_tests::deployment::{self, SERVICE, storage_node};
use portcullis_tests::oidc::{Idp, Login, browser_login};
use portcullis_tests::server::{GatewayServer, StorageServer};
use portcullis_tests::tools::{Containers, cert_dir, free_port};
use serde_json::{Value, json};

const CLIENT_SECRET: &str = "gateway-client-secret";

struct Sso {
    gateway: GatewayServer,
    idp: Idp,
    _storage: StorageServer,
    _dir: tempfile::TempDir,
}

/// A gateway with `[oidc]` pointing at a fresh IdP whose users are bob (team-a, plus a group
/// the filter drops) and carol (no groups).
fn start() -> Sso {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_node(&dir.path().join("storage")).unwrap();
    let idp_port = free_port().unwrap();
    let issuer = format!("http://127.0.0.1:{idp_port}");
    let table = format!(
        r#"
[oidc]
issuer = "{issuer}"
client_id = "portcullis"
scopes = ["openid", "profile", "groups"]
groups_filter = "^team-"
"#
    );
    let gateway = deployment::start_gateway_with(
        dir.path(),
        &[&storage],
        &[],
        4,
        &table,
        &[("PORTCULLIS_OIDC_CLIENT_SECRET", CLIENT_SECRET)],
    )
    .unwrap();
    let clients = json!([{
        "client_id": "portcullis",
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [format!("{}/auth/oidc/callback", gateway.base)],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }]);
    let users = json!({
        "bob": {"password": "bob-idp-pw", "groups": ["team-a", "all-staff"]},
        "carol": {"password": "carol-idp-pw", "groups": []},
    });
    let idp = Idp::start(idp_port, &clients, &users).unwrap();
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
    let http = browser(&s.gateway);
    let login = browser_login(&http, &s.gateway.base, &s.idp, user, pw, "laptop")
        .await
        .unwrap();
    let r = callback(&http, &login, true).await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    let start = page
        .find("<pre id=\"refresh-token\">")
        .expect("token on the page")
        + 24;
    let end = start + page[start..].find("</pre>").unwrap();
    page[start..end].to_string()
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
    let r = browser(g)
        .post(format!("{}/token", g.base))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("client_id", "test"),
            ("service", SERVICE),
            ("scope", scope),
        ])
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
fn podman_logs_in_and_pushes_with_the_refresh_token() -> anyhow::Result<()> {
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
        (login.callback.as_str(), "portcullis_oidc=wrong".to_string()),
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
    let helper = portcullis_tests::server::binary("docker-credential-portcullis");
    let call = |action: &str, input: &str| -> anyhow::Result<(bool, String)> {
        let mut c = std::process::Command::new(&helper)
            .arg(action)
            .env("PORTCULLIS_CREDENTIALS", &creds)
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
