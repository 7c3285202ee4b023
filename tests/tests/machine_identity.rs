//! End-to-end tests of machine identities against the real gateway over TLS: robot accounts
//! (admin API, the `gateway robot` CLI, skopeo and podman) and CI workload-identity
//! federation with a real OpenID provider (oidc-provider on Node) issuing the CI tokens.
//! `cargo test --release --test machine_identity` runs exactly these.

use anyhow::{Context, ensure};
use portcullis_tests::client::{Client, TokenAuth, https, jwt_claims};
use portcullis_tests::deployment::{self, SERVICE, storage_node};
use portcullis_tests::oidc::{
    CI_SECRET, Idp, ci_token, federation_table, sign_rs256, start_ci_idp,
};
use portcullis_tests::server::{GatewayServer, StorageServer, binary};
use portcullis_tests::tools::{Containers, cert_dir, free_port, run};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

/// In `registry-admins` (policy `admin_groups`).
const ADMIN: (&str, &str) = ("alice", "alice-pw");
/// In `team-a`; no administrator.
const USER: (&str, &str) = ("bob", "bob-pw");
const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

struct Registry {
    gateway: GatewayServer,
    http: reqwest::Client,
    _storage: StorageServer,
    dir: tempfile::TempDir,
}

/// A storage node and a gateway with `extra` config (`{dir}`: its directory), users alice (admin) and bob, and the
/// admin token set.
fn start(extra: &str) -> anyhow::Result<Registry> {
    let dir = tempfile::tempdir()?;
    let storage = storage_node(&dir.path().join("storage"))?;
    let extra = extra.replace("{dir}", &dir.path().display().to_string());
    let gateway = deployment::start_gateway_with(
        dir.path(),
        &[&storage],
        &[ADMIN, USER],
        4,
        &extra,
        &[("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)],
    )?;
    let http = https(&gateway.ca_pem, false);
    Ok(Registry {
        gateway,
        http,
        _storage: storage,
        dir,
    })
}

enum Auth<'a> {
    None,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
}

impl Registry {
    /// A call of the robots' admin API: status and JSON body.
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = self
            .http
            .request(method, format!("{}/admin/robots{path}", self.gateway.base));
        r = match auth {
            Auth::None => r,
            Auth::Basic(u, p) => r.basic_auth(u, Some(p)),
            Auth::Bearer(t) => r.bearer_auth(t),
        };
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn create(&self, auth: Auth<'_>, body: Value) -> anyhow::Result<(u16, Value)> {
        self.api(reqwest::Method::POST, "", auth, Some(body)).await
    }

    /// `GET /token` with Basic credentials for `scopes`: status and body.
    async fn token(
        &self,
        user: &str,
        password: &str,
        scopes: &[&str],
    ) -> anyhow::Result<(u16, Value)> {
        let mut url = format!("{}/token?service={SERVICE}", self.gateway.base);
        for s in scopes {
            url.push_str(&format!("&scope={s}"));
        }
        let resp = self
            .http
            .get(url)
            .basic_auth(user, Some(password))
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    }

    /// `POST /token` with the jwt-bearer grant.
    async fn jwt_bearer(&self, assertion: &str, scope: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}/token", self.gateway.base))
            .form(&[
                ("grant_type", JWT_BEARER),
                ("assertion", assertion),
                ("service", SERVICE),
                ("client_id", "ci-test"),
                ("scope", scope),
            ])
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    }

    /// The actions granted on `repo` by a successful token answer (`token` or `access_token`).
    fn granted(body: &Value, repo: &str) -> Vec<String> {
        let t = body["access_token"].as_str().unwrap_or_default();
        let claims = jwt_claims(t).unwrap_or_default();
        claims["access"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["name"] == repo)
            .flat_map(|a| a["actions"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect()
    }

    /// Whether `robot` / `secret` gets a token (what `docker login` asks first).
    async fn logs_in(&self, robot: &str, secret: &str) -> anyhow::Result<bool> {
        let (status, body) = self
            .token(robot, secret, &["repository:team-a/app:pull"])
            .await?;
        ensure!(
            status == 200 || status == 401,
            "unexpected answer {status}: {body}"
        );
        Ok(status == 200)
    }

    /// `gateway robot --url … <args>` with the admin token; its stdout as JSON.
    fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        let ca = self.dir.path().join("tls/ca.crt");
        let out = run(std::process::Command::new(binary("gateway"))
            .args(["robot", "--url", &self.gateway.base, "--ca-file"])
            .arg(&ca)
            .args(args)
            .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN))?;
        serde_json::from_str(&out).with_context(|| format!("CLI output: {out}"))
    }
}

impl Registry {
    /// `robot$team-a+ci` (push and pull on `team-a/**`, an hour) made with the CLI.
    fn cli_create_team_a_ci(&self) -> anyhow::Result<Value> {
        self.cli(&[
            "create",
            "--project",
            "team-a",
            "--name",
            "ci",
            "--scope",
            "team-a/**=pull,push",
            "--expires-in-seconds",
            "3600",
        ])
    }
}

fn secret(v: &Value) -> anyhow::Result<String> {
    let s = v["secret"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no secret in {v}"))?;
    portcullis_tests::remember_secret(&s);
    Ok(s)
}

/// Polls `cond` every 100 ms until it holds or `limit` passes (for lifetimes measured in
/// seconds: expiry, rotation overlap).
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn team_a_ci(extra: Value) -> Value {
    let mut v = json!({
        "project": "team-a",
        "name": "ci",
        "description": "team A's pipeline",
        "scope": [{"repositories": ["team-a/**"], "actions": ["pull", "push"]}],
        "expires_in_seconds": 3600,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

#[tokio::test]
async fn robots_are_created_only_by_admins_and_within_their_creators_scope() -> anyhow::Result<()> {
    let r = start("[robots]\nrotation_overlap_seconds = 60\n")?;
    // Who may create.
    let (s, _) = r.create(Auth::None, team_a_ci(json!({}))).await?;
    ensure!(s == 401, "anonymous create: {s}");
    let (s, _) = r
        .create(Auth::Bearer("wrong-token-0123456789"), team_a_ci(json!({})))
        .await?;
    ensure!(s == 401, "wrong admin token: {s}");
    let (s, b) = r
        .create(Auth::Basic(USER.0, USER.1), team_a_ci(json!({})))
        .await?;
    ensure!(
        s == 403 && b["error"] == "access_denied",
        "non-admin create: {s} {b}"
    );
    let (s, b) = r
        .api(reqwest::Method::GET, "", Auth::Basic(USER.0, USER.1), None)
        .await?;
    ensure!(s == 403, "non-admin list: {s} {b}");

    // An administrator (policy admin_groups) creates a delegating robot; the secret is shown
    // once and never again.
    let (s, ci) = r
        .create(
            Auth::Basic(ADMIN.0, ADMIN.1),
            team_a_ci(json!({"may_create_robots": true})),
        )
        .await?;
    ensure!(s == 201, "admin create: {s} {ci}");
    ensure!(
        ci["name"] == "robot$team-a+ci" && ci["created_by"] == "alice",
        "{ci}"
    );
    let ci_secret = secret(&ci)?;
    let (s, shown) = r
        .api(
            reqwest::Method::GET,
            "/robot$team-a+ci",
            Auth::Bearer(ADMIN_TOKEN),
            None,
        )
        .await?;
    ensure!(s == 200 && shown.get("secret").is_none(), "{s} {shown}");
    ensure!(
        !shown.to_string().contains(&ci_secret),
        "the secret is shown again"
    );
    let (s, _) = r
        .create(Auth::Bearer(ADMIN_TOKEN), team_a_ci(json!({})))
        .await?;
    ensure!(s == 409, "duplicate: {s}");

    // Its token: what its scope allows, nothing else; never a refresh token.
    let (s, t) = r
        .token(
            "robot$team-a+ci",
            &ci_secret,
            &[
                "repository:team-a/app:pull,push",
                "repository:team-b/app:pull,push",
                "repository:team-a/app:delete",
            ],
        )
        .await?;
    ensure!(s == 200, "robot token: {s} {t}");
    ensure!(
        Registry::granted(&t, "team-a/app") == ["pull", "push"],
        "{t}"
    );
    ensure!(Registry::granted(&t, "team-b/app").is_empty(), "{t}");
    let url = format!(
        "{}/token?service={SERVICE}&offline_token=true&scope=repository:team-a/app:pull",
        r.gateway.base
    );
    let off: Value = r
        .http
        .get(url)
        .basic_auth("robot$team-a+ci", Some(&ci_secret))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        off.get("refresh_token").is_none(),
        "a robot got a refresh token: {off}"
    );
    ensure!(
        !r.logs_in("robot$team-a+ci", "wrong").await?,
        "wrong secret"
    );
    ensure!(
        !r.logs_in("robot$team-a+nobody", &ci_secret).await?,
        "unknown robot"
    );

    // The delegating robot creates within its scope, its project and its lifetime only.
    let ci_auth = || Auth::Basic("robot$team-a+ci", &ci_secret);
    let narrow = json!({
        "project": "team-a", "name": "narrow",
        "scope": [{"repositories": ["team-a/app"], "actions": ["pull"]}],
        "expires_in_seconds": 600,
    });
    let (s, b) = r.create(ci_auth(), narrow.clone()).await?;
    ensure!(
        s == 201 && b["created_by"] == "robot$team-a+ci",
        "narrow: {s} {b}"
    );
    let narrow_secret = secret(&b)?;
    for (what, body) in [
        (
            "wider repositories",
            json!({"project": "team-a", "name": "w1", "scope": [{"repositories": ["**"], "actions": ["pull"]}], "expires_in_seconds": 60}),
        ),
        (
            "more actions",
            json!({"project": "team-a", "name": "w2", "scope": [{"repositories": ["team-a/app"], "actions": ["delete"]}], "expires_in_seconds": 60}),
        ),
        (
            "another project",
            json!({"project": "team-b", "name": "w3", "scope": [{"repositories": ["team-a/app"], "actions": ["pull"]}], "expires_in_seconds": 60}),
        ),
        (
            "a longer life",
            json!({"project": "team-a", "name": "w4", "scope": [{"repositories": ["team-a/app"], "actions": ["pull"]}], "expires_in_seconds": 7200}),
        ),
    ] {
        let (s, b) = r.create(ci_auth(), body).await?;
        ensure!(s == 403, "{what}: {s} {b}");
    }
    let narrow_auth = || Auth::Basic("robot$team-a+narrow", &narrow_secret);
    let (s, b) = r.create(narrow_auth(), narrow.clone()).await?;
    ensure!(
        s == 403,
        "a robot without may_create_robots created one: {s} {b}"
    );
    // It sees and manages the robots it made, not the others.
    let (s, list) = r.api(reqwest::Method::GET, "", ci_auth(), None).await?;
    let names: Vec<&str> = list["robots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str())
        .collect();
    ensure!(s == 200 && names == ["robot$team-a+narrow"], "{s} {list}");
    let (s, _) = r
        .api(reqwest::Method::DELETE, "/robot$team-a+ci", ci_auth(), None)
        .await?;
    ensure!(s == 404, "a robot deleted its creator's kind: {s}");

    // Bad requests get 400s and change nothing.
    for body in [
        json!({"project": "team-a", "name": "x", "scope": [{"repositories": ["team-a/**"], "actions": ["catalog"]}]}),
        json!({"project": "Team A", "name": "x", "scope": [{"repositories": ["team-a/**"], "actions": ["pull"]}]}),
        json!({"project": "team-a", "name": "x", "scope": []}),
        json!({"project": "team-a", "name": "x", "scope": [{"repositories": ["team-a/**"], "actions": ["pull"]}], "never_expires": true}),
        json!({"project": "team-a", "name": "x", "scope": [{"repositories": ["team-a/**"], "actions": ["pull"]}], "expires_in_seconds": 999_999_999}),
        json!({"project": "team-a"}),
    ] {
        let (s, b) = r.create(Auth::Bearer(ADMIN_TOKEN), body.clone()).await?;
        ensure!(s == 400, "{body}: {s} {b}");
    }
    let (s, list) = r
        .api(reqwest::Method::GET, "", Auth::Bearer(ADMIN_TOKEN), None)
        .await?;
    ensure!(
        s == 200 && list["robots"].as_array().map(Vec::len) == Some(2),
        "{list}"
    );
    Ok(())
}

#[tokio::test]
async fn robots_expire_rotate_disable_and_delete() -> anyhow::Result<()> {
    let r = start("")?;
    let admin = || Auth::Bearer(ADMIN_TOKEN);
    // Expiry.
    let (s, short) = r
        .create(
            admin(),
            team_a_ci(json!({"name": "short", "expires_in_seconds": 2})),
        )
        .await?;
    ensure!(s == 201, "{s} {short}");
    let short_secret = secret(&short)?;
    ensure!(
        r.logs_in("robot$team-a+short", &short_secret).await?,
        "before expiry"
    );
    let (s, t) = r
        .token(
            "robot$team-a+short",
            &short_secret,
            &["repository:team-a/app:pull"],
        )
        .await?;
    ensure!(
        s == 200 && t["expires_in"].as_i64().is_some_and(|e| e <= 2),
        "a token outlives its robot: {t}"
    );
    let expired = eventually(Duration::from_secs(10), || async {
        Ok(!r.logs_in("robot$team-a+short", &short_secret).await?)
    })
    .await?;
    ensure!(expired, "the expired robot still logs in");

    // Rotation with an overlap: both secrets work, then only the new one.
    let ci = r.cli_create_team_a_ci()?;
    let old = secret(&ci)?;
    let rotated = r.cli(&["rotate", "robot$team-a+ci", "--overlap-seconds", "2"])?;
    let new = secret(&rotated)?;
    ensure!(new != old, "rotation kept the secret");
    ensure!(
        r.logs_in("robot$team-a+ci", &old).await?,
        "old secret within the overlap"
    );
    ensure!(r.logs_in("robot$team-a+ci", &new).await?, "new secret");
    let retired = eventually(Duration::from_secs(10), || async {
        Ok(!r.logs_in("robot$team-a+ci", &old).await?)
    })
    .await?;
    ensure!(retired, "the old secret outlived the overlap");
    ensure!(
        r.logs_in("robot$team-a+ci", &new).await?,
        "new secret after the overlap"
    );

    // Disable, enable, delete.
    r.cli(&["disable", "robot$team-a+ci"])?;
    ensure!(
        !r.logs_in("robot$team-a+ci", &new).await?,
        "disabled robot logs in"
    );
    r.cli(&["enable", "robot$team-a+ci"])?;
    ensure!(r.logs_in("robot$team-a+ci", &new).await?, "enabled robot");
    let list = r.cli(&["list"])?;
    ensure!(list["robots"].as_array().map(Vec::len) == Some(2), "{list}");
    r.cli(&["delete", "robot$team-a+ci"])?;
    ensure!(
        !r.logs_in("robot$team-a+ci", &new).await?,
        "deleted robot logs in"
    );
    let (s, _) = r
        .api(reqwest::Method::GET, "/robot%24team-a%2Bci", admin(), None)
        .await?;
    ensure!(s == 404, "deleted robot still shown: {s}");
    Ok(())
}

/// A local image for pushes: busybox in a scratch image (`localhost/mi-src:1`).
fn source_image(ctr: &Containers) -> anyhow::Result<()> {
    ctr.build_scratch_image("mi-src:1", Path::new("/bin/busybox"))
}

/// `skopeo copy` of the source image to `<host>/<dest>` with `creds` (`user:password`).
fn skopeo_push(
    ctr: &Containers,
    certs: &str,
    host: &str,
    creds: &str,
    dest: &str,
) -> anyhow::Result<String> {
    ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--dest-cert-dir",
            certs,
            "--dest-creds",
            creds,
            "containers-storage:localhost/mi-src:1",
            &format!("docker://{host}/{dest}"),
        ],
    )
}

#[test]
fn a_robot_pushes_with_skopeo_and_podman_within_its_scope_only() -> anyhow::Result<()> {
    let r = start("[state]\nfile = \"{dir}/state.json\"\n")?;
    let ci = r.cli_create_team_a_ci()?;
    let creds = format!("robot$team-a+ci:{}", secret(&ci)?);
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &r.gateway.ca_pem)?;
    let h = &r.gateway.host;
    source_image(&ctr)?;
    skopeo_push(&ctr, &certs, h, &creds, "team-a/app:v1")?;
    let denied = skopeo_push(&ctr, &certs, h, &creds, "team-b/app:v1");
    ensure!(denied.is_err(), "a robot pushed outside its scope");
    // podman logs in as the robot (what `docker login -u 'robot$…'` does) and pushes.
    let (user, pass) = creds.split_once(':').context("creds")?;
    ctr.login("podman", &certs, h, user, pass)?;
    let podman_push = |dest: &str| {
        ctr.run(
            "podman",
            &[
                "push",
                "-q",
                "--cert-dir",
                &certs,
                "localhost/mi-src:1",
                &format!("{h}/{dest}"),
            ],
        )
    };
    podman_push("team-a/podman:v1")?;
    ensure!(
        podman_push("team-b/podman:v1").is_err(),
        "podman pushed outside the scope"
    );
    let tags = ctr.run(
        "skopeo",
        &[
            "list-tags",
            "--cert-dir",
            &certs,
            "--creds",
            &creds,
            &format!("docker://{h}/team-a/podman"),
        ],
    )?;
    ensure!(tags.contains("\"v1\""), "{tags}");
    // The robot is a durable entry in the state file (it survives a restart).
    let state: Value = serde_json::from_slice(&std::fs::read(r.dir.path().join("state.json"))?)?;
    let stored = state["robot:robot$team-a+ci"]
        .as_str()
        .context("the robot is not in the state file")?;
    let stored = String::from_utf8(base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        stored,
    )?)?;
    ensure!(stored.contains("\"hash\""), "{stored}");
    ensure!(!stored.contains(pass), "the secret is stored");
    Ok(())
}

// ---------------------------------------------------------------- CI federation

struct Federated {
    registry: Registry,
    idp: Idp,
}

fn start_federated() -> anyhow::Result<Federated> {
    let port = free_port()?;
    let registry = start(&federation_table(&format!("http://127.0.0.1:{port}")))?;
    let idp = start_ci_idp(port)?;
    Ok(Federated { registry, idp })
}

async fn refusal(r: &Registry, assertion: &str) -> anyhow::Result<String> {
    let (s, b) = r
        .jwt_bearer(assertion, "repository:team-a/app:pull,push")
        .await?;
    ensure!(
        s == 400 && b["error"] == "invalid_grant",
        "not refused: {s} {b}"
    );
    Ok(b["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

fn b64_json(part: &str) -> Value {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn ci_tokens_are_traded_for_short_lived_registry_tokens() -> anyhow::Result<()> {
    let mut f = start_federated()?;
    let r = &f.registry;
    let good = ci_token(&f.idp.issuer, "ci-team-a", CI_SECRET, "urn:registry").await?;

    // The jwt-bearer grant: the CI identity, the policy's grants, short-lived, no refresh.
    let (s, b) = r
        .jwt_bearer(
            &good,
            "repository:team-a/app:pull,push repository:team-b/app:push",
        )
        .await?;
    ensure!(s == 200, "jwt-bearer: {s} {b}");
    let claims = jwt_claims(b["access_token"].as_str().unwrap_or_default()).unwrap_or_default();
    ensure!(claims["sub"] == "github:corp/team-a-app", "{claims}");
    ensure!(claims["portcullis"]["kind"] == "ci", "{claims}");
    ensure!(
        Registry::granted(&b, "team-a/app") == ["pull", "push"],
        "{b}"
    );
    ensure!(Registry::granted(&b, "team-b/app").is_empty(), "{b}");
    ensure!(b["expires_in"].as_i64().is_some_and(|e| e <= 120), "{b}");
    ensure!(b.get("refresh_token").is_none(), "{b}");
    let ci_exp = b64_json(good.split('.').nth(1).unwrap_or_default())["exp"].as_i64();
    ensure!(claims["exp"].as_i64() <= ci_exp, "outlives the CI token");

    // As a password (`docker login -u ci --password-stdin`): the token pushes.
    let mut client = Client::with_ca(&r.gateway.base, &r.gateway.ca_pem);
    client.auth = Some(TokenAuth::new(
        &format!("{}/token", r.gateway.base),
        SERVICE,
        Some(("ci", &good)),
    ));
    client
        .push_image("team-a/app", "ci-1", &[b"built by CI"])
        .await?;
    client.push_is_denied("team-b/app").await?;

    // Refusals, each saying why.
    let feature = ci_token(&f.idp.issuer, "ci-feature", CI_SECRET, "urn:registry").await?;
    let why = refusal(r, &feature).await?;
    ensure!(
        why.contains("no rule") && why.contains("ref=refs/heads/feature"),
        "{why}"
    );
    let other_aud = ci_token(&f.idp.issuer, "ci-team-a", CI_SECRET, "urn:other").await?;
    let why = refusal(r, &other_aud).await?;
    ensure!(why.contains("audience"), "{why}");
    let short = ci_token(&f.idp.issuer, "ci-short", CI_SECRET, "urn:registry").await?;
    let exp = b64_json(short.split('.').nth(1).unwrap_or_default())["exp"]
        .as_i64()
        .context("exp")?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let why = refusal(r, &short).await?;
    ensure!(why.contains("expired"), "{why}");
    // The same refusal through docker login's path: a 401 with the reason.
    let (s, b) = r
        .token("ci", &short, &["repository:team-a/app:pull"])
        .await?;
    ensure!(s == 401 && b.to_string().contains("expired"), "{s} {b}");

    // Another (real) issuer nobody trusts.
    let stranger = start_ci_idp(free_port()?)?;
    let foreign = ci_token(&stranger.issuer, "ci-team-a", CI_SECRET, "urn:registry").await?;
    let why = refusal(r, &foreign).await?;
    ensure!(why.contains("not trusted"), "{why}");

    // Forged tokens: the good token's claims, signed by a key the IdP never published, or
    // under the IdP's own kid, or not signed at all.
    let parts: Vec<&str> = good.split('.').collect();
    let (header, payload) = (b64_json(parts[0]), b64_json(parts[1]));
    let rogue = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?;
    let unknown = sign_rs256(
        &json!({"alg": "RS256", "kid": "rogue-key"}),
        &payload,
        &rogue,
    )?;
    let why = refusal(r, &unknown).await?;
    ensure!(why.contains("does not publish"), "{why}");
    let stolen_kid = sign_rs256(&header, &payload, &rogue)?;
    let why = refusal(r, &stolen_kid).await?;
    ensure!(why.contains("signature"), "{why}");
    let none = format!(
        "{}.{}.",
        base64_url(&json!({"alg": "none", "typ": "JWT"}).to_string()),
        parts[1]
    );
    let why = refusal(r, &none).await?;
    ensure!(why.contains("alg none"), "{why}");
    let hs = format!(
        "{}.{}.{}",
        base64_url(&json!({"alg": "HS256", "kid": header["kid"]}).to_string()),
        parts[1],
        parts[2]
    );
    let why = refusal(r, &hs).await?;
    ensure!(why.contains("algorithm"), "{why}");
    let (s, b) = r
        .token("ci", &none, &["repository:team-a/app:pull"])
        .await?;
    ensure!(s == 401, "alg none as a password: {s} {b}");

    // The IdP rotates its signing key (a restart generates a new one): tokens signed with
    // the new key work at once, without restarting the gateway; the withdrawn key's do not.
    f.idp.restart()?;
    let rotated = ci_token(&f.idp.issuer, "ci-team-a", CI_SECRET, "urn:registry").await?;
    ensure!(
        b64_json(rotated.split('.').next().unwrap_or_default())["kid"] != header["kid"],
        "the IdP did not rotate its key"
    );
    let (s, b) = r.jwt_bearer(&rotated, "repository:team-a/app:push").await?;
    ensure!(s == 200, "after the rotation: {s} {b}");
    let why = refusal(r, &good).await?;
    ensure!(why.contains("does not publish"), "{why}");
    Ok(())
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes())
}

#[test]
fn a_ci_token_pushes_with_skopeo_and_podman() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let f = start_federated()?;
    let token = rt.block_on(ci_token(
        &f.idp.issuer,
        "ci-team-a",
        CI_SECRET,
        "urn:registry",
    ))?;
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &f.registry.gateway.ca_pem)?;
    let h = &f.registry.gateway.host;
    source_image(&ctr)?;
    // `podman login -u <anything> -p <CI JWT>`, as a pipeline's `docker login
    // --password-stdin` does.
    ctr.login("podman", &certs, h, "ci", &token)?;
    ctr.run(
        "podman",
        &[
            "push",
            "-q",
            "--cert-dir",
            &certs,
            "localhost/mi-src:1",
            &format!("{h}/team-a/from-ci:v1"),
        ],
    )?;
    let creds = format!("ci:{token}");
    skopeo_push(&ctr, &certs, h, &creds, "team-a/from-ci:v2")?;
    let denied = skopeo_push(&ctr, &certs, h, &creds, "team-b/from-ci:v1");
    ensure!(denied.is_err(), "a CI identity pushed outside its grants");
    let tags = ctr.run(
        "skopeo",
        &[
            "list-tags",
            "--cert-dir",
            &certs,
            "--creds",
            &creds,
            &format!("docker://{h}/team-a/from-ci"),
        ],
    )?;
    ensure!(tags.contains("\"v1\"") && tags.contains("\"v2\""), "{tags}");
    Ok(())
}
