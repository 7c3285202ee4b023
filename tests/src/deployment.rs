//! A deployment in production shape: `gateway serve` from a config file in front of separate
//! `storage-backend` processes sharing an internal secret, htpasswd users with groups, a fresh
//! signing key and the shipped policy. Used by the gateway tests and by `regbench --gateway`.

use crate::client::{Client, TokenAuth};
use crate::server::{GatewayServer, StorageOptions, StorageServer, workspace_root};
use anyhow::Context;
use std::path::Path;

/// The internal secret shared by the gateway and the storage nodes of a deployment.
pub const SECRET: &str = "deployment-internal-secret";

/// The `service` the deployment's token service names.
pub const SERVICE: &str = "registry.test";

/// A storage node on `root` that requires [`SECRET`].
pub fn storage_node(root: &Path) -> anyhow::Result<StorageServer> {
    storage_node_with(root, None)
}

/// The same, started with the config file `config` (`[gc]`…), if any.
pub fn storage_node_with(root: &Path, config: Option<&Path>) -> anyhow::Result<StorageServer> {
    StorageServer::start_with(
        root,
        StorageOptions {
            config: config.map(Path::to_path_buf),
            env: vec![("PORTCULLIS_INTERNAL_SECRET".into(), SECRET.into())],
            ..Default::default()
        },
    )
}

/// `gateway serve` with a config in `d` naming `nodes`, htpasswd `users` hashed with bcrypt
/// `cost` (bob in team-a, alice in registry-admins), the signing key `d/key.pem` (made if
/// missing), the shipped policy copied to `d/policy.toml` (if missing; tests may edit it).
pub fn start_gateway(
    d: &Path,
    nodes: &[&StorageServer],
    users: &[(&str, &str)],
    cost: u32,
) -> anyhow::Result<GatewayServer> {
    start_gateway_with(d, nodes, users, cost, "", &[])
}

/// Moves the keys of a `[tls]` table in `extra` into `config`'s own `[tls]` table (TOML
/// allows a table once): what is left of `extra` is appended as it is.
fn merge_tls_keys(config: &str, extra: &str) -> (String, String) {
    let Some((before, rest)) = extra.split_once("[tls]\n") else {
        return (config.to_string(), extra.to_string());
    };
    let end = rest.find("\n[").map_or(rest.len(), |i| i + 1);
    let (keys, after) = rest.split_at(end);
    (
        config.replacen("[tls]\n", &format!("[tls]\n{keys}"), 1),
        format!("{before}{after}"),
    )
}

/// The files a deployment's gateway reads, made in its directory.
pub struct GatewayFiles {
    pub tls: gateway::edge::tls::TlsFiles,
    pub signing_key: std::path::PathBuf,
    pub htpasswd: std::path::PathBuf,
    pub policy: std::path::PathBuf,
}

/// Makes in `d` what [`start_gateway`] describes: certificates, the signing key (kept if
/// there), the htpasswd file of `users`, the policy (kept if there).
pub fn gateway_files(d: &Path, users: &[(&str, &str)], cost: u32) -> anyhow::Result<GatewayFiles> {
    let tls = gateway::edge::tls::ensure_dev_certificates(&d.join("tls"))?;
    // Replicas of one deployment share the signing key: one placed in `d` is kept.
    if !d.join("key.pem").exists() {
        gateway::edge::tls::write_private(
            &d.join("key.pem"),
            &gateway::token::keys::generate_pem()?,
        )?;
    }
    let mut htpasswd = String::new();
    for (u, p) in users {
        htpasswd.push_str(&format!("{u}:{}\n", bcrypt::hash(p, cost)?));
    }
    // Secrets and password hashes: 0600, as the gateway expects (it warns otherwise).
    gateway::edge::tls::write_private(&d.join("htpasswd"), htpasswd.as_bytes())?;
    let policy = d.join("policy.toml");
    if !policy.exists() {
        std::fs::copy(workspace_root().join("conf/policy.toml"), &policy)?;
    }
    Ok(GatewayFiles {
        tls,
        signing_key: d.join("key.pem"),
        htpasswd: d.join("htpasswd"),
        policy,
    })
}

/// `host:port` of each node, as `[upstream] nodes` lists them.
fn node_hosts(nodes: &[&StorageServer]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| n.base.trim_start_matches("http://").to_string())
        .collect()
}

/// [`start_gateway`] with `extra` appended to the config (more tables, e.g. `[auth.ldap]`)
/// and `env` added to the gateway's environment.
pub fn start_gateway_with(
    d: &Path,
    nodes: &[&StorageServer],
    users: &[(&str, &str)],
    cost: u32,
    extra: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<GatewayServer> {
    let GatewayFiles {
        tls,
        signing_key,
        htpasswd,
        policy,
    } = gateway_files(d, users, cost)?;
    let port = crate::tools::free_port()?;
    // A fixed admin port (not 0), so a restarted gateway answers health checks where a load
    // balancer expects it.
    let admin_port = crate::tools::free_port()?;
    let nodes: Vec<String> = node_hosts(nodes)
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect();
    let config = format!(
        r#"listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
[tls]
cert_file = "{cert}"
key_file = "{key}"
[token]
issuer = "test-issuer"
service = "{SERVICE}"
signing_keys = ["{signing_key}"]
[upstream]
nodes = [{nodes}]
health_check_interval_ms = 200
[auth]
htpasswd_file = "{htpasswd}"
[auth.groups]
team-a = ["bob"]
registry-admins = ["alice"]
[policy]
file = "{policy}"
"#,
        cert = tls.cert.display(),
        key = tls.key.display(),
        signing_key = signing_key.display(),
        htpasswd = htpasswd.display(),
        nodes = nodes.join(", "),
        policy = policy.display(),
    );
    let conf = d.join("gateway.toml");
    // Audit events on stdout too (kept for the suite's leak check) unless the test has its
    // own `[audit]` table.
    let audit = if extra.contains("[audit]") {
        ""
    } else {
        "[audit]\nstdout = true\n"
    };
    let (config, extra) = merge_tls_keys(&config, extra);
    std::fs::write(&conf, config + audit + &extra)?;
    let ca = std::fs::read(&tls.ca_cert).context("reading the generated CA")?;
    let mut env = env.to_vec();
    env.push(("PORTCULLIS_INTERNAL_SECRET", SECRET));
    GatewayServer::start_config(&conf, port, ca, &env)
}

/// A gateway configured by variables alone: its TLS port, its CA (PEM), the variables.
pub type GatewayVariables = (u16, Vec<u8>, Vec<(String, String)>);

/// The environment that configures [`start_gateway`]'s gateway with no config file (every key a
/// `PORTCULLIS_<TABLE>_<KEY>` variable).
pub fn gateway_variables(
    d: &Path,
    nodes: &[&StorageServer],
    users: &[(&str, &str)],
    cost: u32,
) -> anyhow::Result<GatewayVariables> {
    let f = gateway_files(d, users, cost)?;
    let port = crate::tools::free_port()?;
    let quoted = |list: Vec<String>| {
        let items: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", items.join(", "))
    };
    let vars = [
        ("LISTEN", format!("127.0.0.1:{port}")),
        ("ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("TLS_CERT_FILE", f.tls.cert.display().to_string()),
        ("TLS_KEY_FILE", f.tls.key.display().to_string()),
        ("TOKEN_ISSUER", "test-issuer".to_string()),
        ("TOKEN_SERVICE", SERVICE.to_string()),
        (
            "TOKEN_SIGNING_KEYS",
            quoted(vec![f.signing_key.display().to_string()]),
        ),
        ("UPSTREAM_NODES", quoted(node_hosts(nodes))),
        ("UPSTREAM_HEALTH_CHECK_INTERVAL_MS", "200".to_string()),
        ("AUTH_HTPASSWD_FILE", f.htpasswd.display().to_string()),
        (
            "AUTH_GROUPS",
            r#"{ team-a = ["bob"], registry-admins = ["alice"] }"#.to_string(),
        ),
        ("POLICY_FILE", f.policy.display().to_string()),
        ("AUDIT_STDOUT", "true".to_string()),
        ("INTERNAL_SECRET", SECRET.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("PORTCULLIS_{k}"), v))
    .collect();
    let ca = std::fs::read(&f.tls.ca_cert).context("reading the generated CA")?;
    Ok((port, ca, vars))
}

/// Readies `d` for one of several gateways of a deployment: the same certificate (and CA) as
/// the others, as behind one name, and the same signing key (PEM), so a token from one is good
/// on all. [`start_gateway_with`] then keeps both.
pub fn share_identity(
    d: &Path,
    tls: &gateway::edge::tls::TlsFiles,
    signing_key: &[u8],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(d.join("tls"))?;
    for f in [&tls.ca_cert, &tls.cert, &tls.key] {
        std::fs::copy(f, d.join("tls").join(f.file_name().context("a file name")?))?;
    }
    gateway::edge::tls::write_private(&d.join("key.pem"), signing_key)?;
    Ok(())
}

/// One storage node and one gateway in a temporary directory, removed on drop.
pub struct Deployment {
    pub storage: StorageServer,
    pub gateway: GatewayServer,
    // Last, so the processes stop before their files go.
    pub dir: tempfile::TempDir,
}

impl Deployment {
    /// A deployment under `parent` (a fresh temporary directory in it) with htpasswd `users`
    /// hashed at bcrypt `cost`.
    pub fn start_in(parent: &Path, users: &[(&str, &str)], cost: u32) -> anyhow::Result<Self> {
        Self::start_in_with(parent, users, cost, "")
    }

    /// [`Deployment::start_in`] with `extra` appended to the gateway's config.
    pub fn start_in_with(
        parent: &Path,
        users: &[(&str, &str)],
        cost: u32,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(parent)?;
        let storage = storage_node(&dir.path().join("storage"))?;
        let gateway = start_gateway_with(dir.path(), &[&storage], users, cost, extra, &[])?;
        Ok(Deployment {
            storage,
            gateway,
            dir,
        })
    }
}

/// A client of `g` that fetches tokens with `user`'s password.
pub fn user_client(g: &GatewayServer, user: &str, password: &str) -> Client {
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        SERVICE,
        Some((user, password)),
    ));
    c
}

/// [`start_gateway_with`] with bcrypt cost 4 and no environment of its own, its state
/// store (the events' outbox too) kept in `d/state.json` across restarts, and `extra`.
pub fn start_gateway_with_state(
    d: &Path,
    nodes: &[&StorageServer],
    users: &[(&str, &str)],
    extra: &str,
) -> anyhow::Result<GatewayServer> {
    let extra = format!(
        "[state]\nfile = \"{}\"\n{extra}",
        d.join("state.json").display()
    );
    start_gateway_with(d, nodes, users, 4, &extra, &[])
}

/// A client of the storage node `s` itself, with the internal secret (what a gateway sends).
pub fn storage_client(s: &StorageServer) -> Client {
    let mut c = Client::new(&s.base);
    c.headers
        .push(("portcullis-internal-secret".into(), SECRET.into()));
    c
}

/// The value a response's `Set-Cookie` gives `name`.
pub fn set_cookie(r: &reqwest::Response, name: &str) -> anyhow::Result<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let (k, rest) = v.split_once('=')?;
            (k == name).then(|| rest.split(';').next().unwrap_or("").to_owned())
        })
        .with_context(|| format!("no {name} cookie set"))
}

/// Signs `who` into the web console at `base` with its password form: a client (trusting
/// `ca`) and the session cookie's value.
pub async fn console_sign_in(
    base: &str,
    ca: &[u8],
    who: (&str, &str),
) -> anyhow::Result<(reqwest::Client, String)> {
    let http = crate::client::https(ca, false);
    let r = http.get(format!("{base}/ui/login")).send().await?;
    let login = set_cookie(&r, "__Host-portcullis_ui_login")?;
    let csrf = field_value(&r.text().await?, "csrf")?;
    let r = http
        .post(format!("{base}/ui/login"))
        .header("cookie", format!("__Host-portcullis_ui_login={login}"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", who.0),
            ("password", who.1),
        ])
        .send()
        .await?;
    anyhow::ensure!(r.status() == 303, "sign-in of {}: {}", who.0, r.status());
    let session = set_cookie(&r, "__Host-portcullis_ui")?;
    Ok((http, session))
}

/// The value of the form field `name` (`name="…" value="…"`) on an HTML page.
pub fn field_value(page: &str, name: &str) -> anyhow::Result<String> {
    let needle = format!("name=\"{name}\" value=\"");
    let at = page
        .find(&needle)
        .with_context(|| format!("no {name} field on the page"))?
        + needle.len();
    let end = at + page[at..].find('"').context("unterminated value")?;
    Ok(page[at..end].to_string())
}
