//! Helpers: gateways sharing one Redis, one signing key and one certificate in front of
//! storage nodes on one root ([`Replicas`]), and the token and registry requests the tests
//! make of them.

use crate::{ALICE, BOB};
use portcullis_tests::client::https;
use portcullis_tests::deployment::{SERVICE, share_identity, start_gateway_with, storage_node};
use portcullis_tests::redis::Redis;
use portcullis_tests::server::{GatewayServer, StorageServer};
use serde_json::{Value, json};

/// `n` gateways with the `state` table, listing `m` storage nodes that share
/// `<dir>/storage`, with one signing key and one certificate (as behind one name), each with
/// its own audit file `<dir>/gw<i>/audit.jsonl`.
pub(crate) fn start_gateways(
    dir: &std::path::Path,
    n: usize,
    m: usize,
    state: &str,
    extra: &str,
    env: &[(&'static str, &'static str)],
) -> (Vec<GatewayServer>, Vec<StorageServer>) {
    let storages: Vec<StorageServer> = (0..m)
        .map(|_| storage_node(&dir.join("storage")).unwrap())
        .collect();
    let nodes: Vec<&StorageServer> = storages.iter().collect();
    let key = gateway::token::keys::generate_pem().unwrap();
    let tls = gateway::edge::tls::ensure_dev_certificates(&dir.join("tls")).unwrap();
    let gateways = (0..n)
        .map(|i| {
            let d = dir.join(format!("gw{i}"));
            share_identity(&d, &tls, &key).unwrap();
            let table = format!(
                "{state}[audit]\nfile = \"{}/audit.jsonl\"\nstdout = true\n{extra}",
                d.display()
            );
            start_gateway_with(&d, &nodes, &[BOB, ALICE], 4, &table, env).unwrap()
        })
        .collect();
    (gateways, storages)
}

/// Gateways sharing one Redis (and one signing key, one certificate) in front of storage
/// nodes on one data root, each gateway with its own audit file.
pub(crate) struct Replicas {
    pub(crate) gateways: Vec<GatewayServer>,
    pub(crate) storages: Vec<StorageServer>,
    pub(crate) redis: Redis,
    env: Vec<(&'static str, &'static str)>,
    dir: tempfile::TempDir,
}

impl Replicas {
    pub(crate) fn start(n: usize, redis: Redis, extra: &str) -> Self {
        Self::start_full(n, 1, redis, extra, &[])
    }

    pub(crate) fn start_env(
        n: usize,
        redis: Redis,
        extra: &str,
        env: &[(&'static str, &'static str)],
    ) -> Self {
        Self::start_full(n, 1, redis, extra, env)
    }

    /// `n` gateways listing `m` storage nodes that share `<dir>/storage`.
    pub(crate) fn start_full(
        n: usize,
        m: usize,
        redis: Redis,
        extra: &str,
        env: &[(&'static str, &'static str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (gateways, storages) =
            start_gateways(dir.path(), n, m, &redis.state_table("ha:"), extra, env);
        Replicas {
            gateways,
            storages,
            redis,
            env: env.to_vec(),
            dir,
        }
    }

    /// `kill -9` of gateway `i` (its process only; [`Replicas::start_gateway_again`] brings
    /// it back on the same ports).
    pub(crate) fn kill_gateway(&self, i: usize) {
        let pid = self.gateways[i].pid().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub(crate) fn start_gateway_again(&mut self, i: usize) {
        let g = &self.gateways[i];
        let port: u16 = g.host.rsplit(':').next().unwrap().parse().unwrap();
        let mut env = self.env.clone();
        env.push((
            "PORTCULLIS_INTERNAL_SECRET",
            portcullis_tests::deployment::SECRET,
        ));
        let conf = self.dir.path().join(format!("gw{i}/gateway.toml"));
        self.gateways[i] =
            GatewayServer::start_config(&conf, port, g.ca_pem.clone(), &env).unwrap();
    }

    pub(crate) fn audit(&self, i: usize) -> Vec<Value> {
        let f = self.dir.path().join(format!("gw{i}/audit.jsonl"));
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub(crate) async fn token_form(g: &GatewayServer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = https(&g.ca_pem, false)
        .post(format!("{}/token", g.base))
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `GET /token` with Basic credentials: status, `Retry-After`, body.
pub(crate) async fn basic_token(
    g: &GatewayServer,
    user: &str,
    password: &str,
    scope: &str,
) -> (u16, Option<u64>, Value) {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/token?service={SERVICE}&scope={scope}", g.base))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (
        r.status().as_u16(),
        retry,
        r.json().await.unwrap_or(Value::Null),
    )
}

/// Bob's password grant with `access_type=offline` on `g`: the refresh token (remembered
/// for the leak check) and the whole answer.
pub(crate) async fn bobs_session(g: &GatewayServer, scope: Option<&str>) -> (String, Value) {
    let mut form = vec![
        ("grant_type", "password"),
        ("username", BOB.0),
        ("password", BOB.1),
        ("client_id", "ha-test"),
        ("access_type", "offline"),
        ("service", SERVICE),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let (status, v) = token_form(g, &form).await;
    assert_eq!(status, 200, "{v}");
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&refresh);
    (refresh, v)
}

/// Alice (an administrator) creates `robot$team-a+<name>` on `g` with `actions` on
/// `team-a/**` for an hour; its secret.
pub(crate) async fn create_robot(g: &GatewayServer, name: &str, actions: &[&str]) -> String {
    let resp = https(&g.ca_pem, false)
        .post(format!("{}/admin/robots", g.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .json(&json!({
            "project": "team-a", "name": name,
            "scope": [{"repositories": ["team-a/**"], "actions": actions}],
            "expires_in_seconds": 3600,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let robot: Value = resp.json().await.unwrap();
    let secret = robot["secret"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&secret);
    secret
}

/// `GET /v2/team-a/app/tags/list` with `token`: 404 (authorized, no such repository) or
/// 401 (refused), and the error message.
pub(crate) async fn tags_with(g: &GatewayServer, token: &str) -> (u16, String) {
    let r = https(&g.ca_pem, false)
        .get(format!("{}/v2/team-a/app/tags/list", g.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

pub(crate) async fn bearer_of(g: &GatewayServer, user: &str, password: &str) -> String {
    let (status, _, v) = basic_token(g, user, password, "repository:team-a/app:pull").await;
    assert_eq!(status, 200, "{v}");
    let t = v["token"].as_str().unwrap().to_string();
    portcullis_tests::remember_secret(&t);
    t
}
