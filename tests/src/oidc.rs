//! A real OpenID provider for tests: `oidc-provider` 9.13.3 on Node
//! (`tests/services/oidc/idp.mjs`, installed by `tests/services/install.sh`) with a plain
//! login form, on a free loopback port; killed on drop. [`browser_login`] drives the
//! authorization-code flow through the gateway the way a browser would.

use anyhow::{Context, bail, ensure};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub struct Idp {
    child: Child,
    /// `http://127.0.0.1:<port>` (or another name of the loopback address): the issuer.
    pub issuer: String,
    /// How it was started, for [`Idp::restart`].
    port: u16,
    env: Vec<(String, String)>,
}

impl Idp {
    /// Starts the IdP on `port` with `clients` (oidc-provider client metadata) and `users`
    /// (`{"bob": {"password": "...", "groups": ["team-a"]}}`).
    pub fn start(
        port: u16,
        clients: &serde_json::Value,
        users: &serde_json::Value,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(port, clients, users, &[])
    }

    /// [`Idp::start`] with more environment for `idp.mjs` (e.g. `IDP_NO_DEVICE_FLOW=1`).
    pub fn start_with_env(
        port: u16,
        clients: &serde_json::Value,
        users: &serde_json::Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("IDP_CLIENTS".into(), clients.to_string()));
        env.push(("IDP_USERS".into(), users.to_string()));
        let (child, issuer) = Self::spawn(port, &env)?;
        Ok(Idp {
            child,
            issuer,
            port,
            env,
        })
    }

    /// Stops the IdP and starts it again on the same port with the same clients and users:
    /// it signs with a newly generated key from then on (a key rotation), and forgets its
    /// sessions and users changed with [`Idp::set_users`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, issuer) = Self::spawn(self.port, &self.env)?;
        self.child = child;
        self.issuer = issuer;
        Ok(())
    }

    /// Starts `idp.mjs` and waits for its ready line. Node has been seen (once in many CI
    /// runs) to hang at start-up before listening, every thread in a futex wait; a start that
    /// is not ready within 20 s is killed and made again, at most twice more, so a test gets
    /// an IdP or a clear error instead of waiting forever.
    fn spawn(port: u16, env: &[(String, String)]) -> anyhow::Result<(Child, String)> {
        let mut last = None;
        for attempt in 0..3 {
            match Self::spawn_once(port, env) {
                Ok(started) => return Ok(started),
                Err(e) => {
                    eprintln!(
                        "the test IdP did not start (attempt {}): {e:#}",
                        attempt + 1
                    );
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the test IdP did not start")))
    }

    fn spawn_once(port: u16, env: &[(String, String)]) -> anyhow::Result<(Child, String)> {
        let dir = crate::server::workspace_root().join("tests/services/oidc");
        ensure!(
            dir.join("node_modules/oidc-provider").exists(),
            "oidc-provider is not installed: run tests/services/install.sh"
        );
        let mut child = Command::new("node")
            .arg("idp.mjs")
            .current_dir(&dir)
            .env("IDP_PORT", port.to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting node idp.mjs")?;
        // Its output is read on a thread (for the whole run: a full pipe would block it), and
        // the ready line comes back over a channel with a deadline.
        let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut ready = Some(tx);
            loop {
                line.clear();
                match out.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if let Some(url) = line.trim().strip_prefix("idp listening on ")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(issuer) => Ok((child, issuer)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => {
                        bail!("the IdP was not listening after 20 s")
                    }
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        bail!("the IdP exited before it listened")
                    }
                }
            }
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cookies of one site, as a browser keeps them (name → value; attributes ignored).
#[derive(Default)]
pub struct Jar(Vec<(String, String)>);

impl Jar {
    pub fn take(&mut self, r: &reqwest::Response) {
        for v in r.headers().get_all("set-cookie") {
            if let Some((kv, _)) = v
                .to_str()
                .ok()
                .map(|s| s.split_once(';').unwrap_or((s, "")))
                && let Some((k, v)) = kv.split_once('=')
            {
                self.0.retain(|(n, _)| n != k.trim());
                self.0.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }

    pub fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn location(r: &reqwest::Response, base: &str) -> anyhow::Result<String> {
    let l = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("no Location in a {} answer", r.status()))?;
    Ok(if l.starts_with('/') {
        format!("{base}{l}")
    } else {
        l.to_string()
    })
}

/// The IdP's login form at `interaction` filled in, then the resumed authorization it
/// redirects to: that last answer (its cookies taken into `site`).
async fn login_form(
    http: &reqwest::Client,
    idp: &Idp,
    interaction: &str,
    site: &mut Jar,
    user: &str,
    password: &str,
) -> anyhow::Result<reqwest::Response> {
    let r = http
        .post(format!("{interaction}/login"))
        .header("cookie", site.header())
        .form(&[("username", user), ("password", password)])
        .send()
        .await?;
    site.take(&r);
    ensure!(
        r.status().is_redirection(),
        "IdP login: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    let resume = location(&r, &idp.issuer)?;
    let r = http
        .get(&resume)
        .header("cookie", site.header())
        .send()
        .await?;
    site.take(&r);
    Ok(r)
}

/// What a browser login through the gateway ended with.
pub struct Login {
    /// The gateway's callback URL the IdP sent the browser to.
    pub callback: String,
    /// The gateway's cookies (the flow binding).
    pub gateway_cookies: Jar,
}

/// Drives `/auth/oidc/login?device=<device>` → IdP → login form → back to the gateway's
/// callback, without calling it. `http` must trust the gateway and not follow redirects.
pub async fn browser_login(
    http: &reqwest::Client,
    gateway: &str,
    idp: &Idp,
    user: &str,
    password: &str,
    device: &str,
) -> anyhow::Result<Login> {
    let mut gw = Jar::default();
    let r = http
        .get(format!("{gateway}/auth/oidc/login"))
        .query(&[("device", device)])
        .send()
        .await?;
    ensure!(r.status() == 302, "login: {}", r.status());
    gw.take(&r);
    through_idp(http, gateway, idp, &r, gw, user, password).await
}

/// The rest of a browser login from the gateway's redirect `r` to the IdP: the IdP's login
/// form, and back to the gateway's callback (not called). `gw`: the gateway's cookies so far.
pub async fn through_idp(
    http: &reqwest::Client,
    gateway: &str,
    idp: &Idp,
    r: &reqwest::Response,
    mut gw: Jar,
    user: &str,
    password: &str,
) -> anyhow::Result<Login> {
    let mut site = Jar::default();
    gw.take(r);
    let url = location(r, gateway)?;
    // IdP: /auth → /interaction/<uid>
    let r = http.get(&url).send().await?;
    site.take(&r);
    ensure!(r.status().is_redirection(), "IdP /auth: {}", r.status());
    let url = location(&r, &idp.issuer)?;
    // Resuming the authorization sends the browser back to the gateway.
    let r = login_form(http, idp, &url, &mut site, user, password).await?;
    ensure!(r.status().is_redirection(), "IdP resume: {}", r.status());
    let callback = location(&r, &idp.issuer)?;
    ensure!(
        callback.starts_with(gateway),
        "the IdP sent the browser to {callback}"
    );
    Ok(Login {
        callback,
        gateway_cookies: gw,
    })
}

impl Idp {
    /// Changes users while the IdP runs (`null` removes one): `{"bob": {"password": …, "groups": […]}}`.
    pub async fn set_users(&self, users: &serde_json::Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/test/users", self.issuer))
            .body(users.to_string())
            .send()
            .await?;
        ensure!(r.status() == 204, "changing IdP users: {}", r.status());
        Ok(())
    }
}

pub use crate::deployment::field_value;

/// The user's side of a device flow at the IdP, as a person at a browser does it: the
/// code-entry page, the confirmation, the login form, and the resumed authorization.
pub async fn device_login(
    http: &reqwest::Client,
    idp: &Idp,
    user_code: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<()> {
    let mut site = Jar::default();
    let device = format!("{}/device", idp.issuer);
    let r = http.get(&device).send().await?;
    site.take(&r);
    ensure!(r.status() == 200, "IdP /device: {}", r.status());
    let token = field_value(&r.text().await?, "xsrf")?;
    let r = http
        .post(&device)
        .header("cookie", site.header())
        .form(&[("xsrf", token.as_str()), ("user_code", user_code)])
        .send()
        .await?;
    site.take(&r);
    let page = r.text().await?;
    let token = field_value(&page, "xsrf").with_context(|| format!("after the code: {page}"))?;
    let r = http
        .post(&device)
        .header("cookie", site.header())
        .form(&[
            ("xsrf", token.as_str()),
            ("user_code", user_code),
            ("confirm", "yes"),
        ])
        .send()
        .await?;
    site.take(&r);
    if !r.status().is_redirection() {
        let status = r.status();
        bail!(
            "IdP confirm: {status} {}",
            r.text().await.unwrap_or_default()
        );
    }
    let interaction = location(&r, &idp.issuer)?;
    let r = login_form(http, idp, &interaction, &mut site, user, password).await?;
    let status = r.status();
    let page = r.text().await.unwrap_or_default();
    ensure!(status == 200, "IdP resume: {status} {page}");
    Ok(())
}

/// The gateway's client secret at the test IdP.
pub const CLIENT_SECRET: &str = "gateway-client-secret";

/// A storage node, a gateway whose `[oidc]` (plus `extra_oidc` lines) points at a fresh IdP
/// with `users`, and that IdP (client `portcullis` allowed the code, refresh and device
/// grants). Groups kept: `^(team-|registry-)`.
pub fn start_sso(
    dir: &std::path::Path,
    extra_oidc: &str,
    users: &serde_json::Value,
) -> anyhow::Result<(
    crate::server::StorageServer,
    crate::server::GatewayServer,
    Idp,
)> {
    start_sso_with(dir, extra_oidc, users, &[])
}

/// [`start_sso`] with more environment for the IdP.
pub fn start_sso_with(
    dir: &std::path::Path,
    extra_oidc: &str,
    users: &serde_json::Value,
    idp_env: &[(&str, &str)],
) -> anyhow::Result<(
    crate::server::StorageServer,
    crate::server::GatewayServer,
    Idp,
)> {
    start_sso_at(dir, extra_oidc, users, idp_env, "127.0.0.1")
}

/// [`start_sso_with`], the IdP's issuer on `idp_host` (a name of the loopback address). A
/// browser keeps cookies by host, not port: an IdP on `localhost` keeps its cookies apart
/// from the gateway's on `127.0.0.1`, as an IdP on a host of its own does.
pub fn start_sso_at(
    dir: &std::path::Path,
    extra_oidc: &str,
    users: &serde_json::Value,
    idp_env: &[(&str, &str)],
    idp_host: &str,
) -> anyhow::Result<(
    crate::server::StorageServer,
    crate::server::GatewayServer,
    Idp,
)> {
    let storage = crate::deployment::storage_node(&dir.join("storage"))?;
    let idp_port = crate::tools::free_port()?;
    let issuer = format!("http://{idp_host}:{idp_port}");
    let table = format!(
        r#"
[oidc]
issuer = "{issuer}"
client_id = "portcullis"
scopes = ["openid", "profile", "groups", "offline_access"]
groups_filter = "^(team-|registry-)"
{extra_oidc}
"#
    );
    let gateway = crate::deployment::start_gateway_with(
        dir,
        &[&storage],
        &[],
        4,
        &table,
        &[("PORTCULLIS_OIDC_CLIENT_SECRET", CLIENT_SECRET)],
    )?;
    let mut grants = vec!["authorization_code", "refresh_token"];
    if !idp_env.iter().any(|(k, _)| *k == "IDP_NO_DEVICE_FLOW") {
        grants.push("urn:ietf:params:oauth:grant-type:device_code");
    }
    let clients = serde_json::json!([{
        "client_id": "portcullis",
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [format!("{}/auth/oidc/callback", gateway.base)],
        "grant_types": grants,
        "response_types": ["code"],
    }]);
    let mut env = idp_env.to_vec();
    env.push(("IDP_ISSUER", &issuer));
    let idp = Idp::start_with_env(idp_port, &clients, users, &env)?;
    Ok((storage, gateway, idp))
}

/// A whole browser sign-in through the gateway: the refresh token shown on the last page.
pub async fn sign_in(
    http: &reqwest::Client,
    gateway: &str,
    idp: &Idp,
    user: &str,
    password: &str,
    device: &str,
) -> anyhow::Result<String> {
    let login = browser_login(http, gateway, idp, user, password, device).await?;
    let r = http
        .get(&login.callback)
        .header("cookie", login.gateway_cookies.header())
        .send()
        .await?;
    ensure!(r.status() == 200, "callback: {}", r.status());
    let page = r.text().await?;
    const PRE: &str = "<pre id=\"refresh-token\">";
    let start = page.find(PRE).context("no token on the page")? + PRE.len();
    let end = start + page[start..].find("</pre>").context("unterminated token")?;
    crate::remember_secret(&page[start..end]);
    Ok(page[start..end].to_string())
}

/// A CI job's OIDC token from the test IdP: client credentials for `resource` (a JWT access
/// token whose `aud` is `resource` and which carries the client's `IDP_CI_CLAIMS`).
pub async fn ci_token(
    issuer: &str,
    client_id: &str,
    secret: &str,
    resource: &str,
) -> anyhow::Result<String> {
    let r = reqwest::Client::new()
        .post(format!("{issuer}/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("resource", resource),
            ("scope", "registry"),
        ])
        .send()
        .await?;
    let status = r.status();
    let body: serde_json::Value = r.json().await?;
    ensure!(
        status == 200,
        "client credentials for {client_id}: {status} {body}"
    );
    body["access_token"]
        .as_str()
        .map(str::to_string)
        .context("no access_token")
}

/// A compact JWS of `header` and `claims` signed RS256 with `key` (for tokens an IdP would
/// never issue: unknown keys, forged signatures).
pub fn sign_rs256(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
) -> anyhow::Result<String> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), key)?;
    signer.update(input.as_bytes())?;
    Ok(format!("{input}.{}", b64(&signer.sign_to_vec()?)))
}

/// The client secret of the test IdP's CI clients.
pub const CI_SECRET: &str = "ci-client-secret";

/// The test IdP's CI clients and their claims (`IDP_CI_CLAIMS`): `ci-team-a` (what
/// [`federation_table`]'s rule wants), `ci-feature` (a branch the rule does not allow),
/// `ci-short` (matching, 1 s lifetime).
pub fn ci_clients() -> (serde_json::Value, serde_json::Value) {
    use serde_json::json;
    let client = |id: &str| {
        json!({
            "client_id": id, "client_secret": CI_SECRET,
            "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
            "token_endpoint_auth_method": "client_secret_post",
        })
    };
    let main =
        json!({"repository": "corp/team-a-app", "ref": "refs/heads/main", "environment": "prod"});
    let claims = json!({
        "ci-team-a": {"claims": main},
        "ci-feature": {"claims": {"repository": "corp/team-a-app", "ref": "refs/heads/feature", "environment": "prod"}},
        "ci-short": {"claims": main, "ttl": 1},
    });
    (
        json!([
            client("ci-team-a"),
            client("ci-feature"),
            client("ci-short")
        ]),
        claims,
    )
}

/// A gateway's `[federation]` trusting `issuer` for audience `urn:registry`, one rule
/// (team A's repositories, main branch, prod environment) naming the subject
/// `github:{repository}` — the shipped policy's `ci = ["github:corp/team-a-app"]`.
pub fn federation_table(issuer: &str) -> String {
    format!(
        r#"
[federation]
token_seconds = 120
clock_skew_seconds = 0
jwks_min_refresh_seconds = 0
[[federation.issuers]]
name = "test-ci"
issuer = "{issuer}"
audiences = ["urn:registry"]
algorithms = ["RS256", "ES256"]
[[federation.issuers.rules]]
claims = {{ repository = "corp/team-a-*", ref = "refs/heads/main", environment = "prod" }}
subject = "github:{{repository}}"
"#
    )
}

/// The test IdP started with [`ci_clients`] on `port`.
pub fn start_ci_idp(port: u16) -> anyhow::Result<Idp> {
    let (clients, claims) = ci_clients();
    Idp::start_with_env(
        port,
        &clients,
        &serde_json::json!({}),
        &[("IDP_CI_CLAIMS", &claims.to_string())],
    )
}
