//! End-to-end tests of LDAP login: a real `slapd` (started here) behind the real gateway over
//! TLS. `cargo test --release --test ldap` runs exactly these.

use portcullis_tests::client::{Client, describe};
use portcullis_tests::deployment::{self, SERVICE, storage_node, user_client};
use portcullis_tests::ldap::{self, READER_DN, READER_PW, Slapd};
use portcullis_tests::server::{GatewayServer, StorageServer};
use portcullis_tests::tools::{Containers, DockerTrust, cert_dir, docker_login, free_port};
use reqwest::Method;
use serde_json::Value;

/// A local (htpasswd) user next to the directory.
const LOCAL: (&str, &str) = ("localadmin", "local-pw");

struct Setup {
    gateway: GatewayServer,
    _storage: StorageServer,
    _dir: tempfile::TempDir,
}

/// `[auth.ldap]` for `slapd` at `url` (the inside of the `urls` array): search-then-bind with
/// the reader account, `extra` lines added.
fn ldap_table(slapd: &Slapd, url: &str, extra: &str) -> String {
    format!(
        r#"
[auth.ldap]
urls = ["{url}"]
ca_file = "{ca}"
bind_dn = "{READER_DN}"
user_base_dn = "ou=people,{suffix}"
user_filter = "(objectClass=inetOrgPerson)"
group_base_dn = "ou=groups,{suffix}"
connect_timeout_ms = 1000
operation_timeout_ms = 2000
login_budget_ms = 4000
{extra}
"#,
        ca = slapd.ca_file.display(),
        suffix = ldap::SUFFIX,
    )
}

fn start(ldap_table: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_node(&dir.path().join("storage")).unwrap();
    let gateway = deployment::start_gateway_with(
        dir.path(),
        &[&storage],
        &[LOCAL],
        4,
        ldap_table,
        &[("PORTCULLIS_LDAP_BIND_PASSWORD", READER_PW)],
    )
    .unwrap();
    Setup {
        gateway,
        _storage: storage,
        _dir: dir,
    }
}

/// `GET /token` for `scope` with Basic credentials: the status and the decoded claims.
async fn token(g: &GatewayServer, user: &str, pw: &str, scope: &str) -> (u16, Value) {
    let c = Client::with_ca(&g.base, &g.ca_pem);
    let r = c
        .http
        .get(format!("{}/token", g.base))
        .query(&[("service", SERVICE), ("scope", scope)])
        .basic_auth(user, Some(pw))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let claims = body["token"]
        .as_str()
        .and_then(portcullis_tests::client::jwt_claims)
        .unwrap_or(body);
    (status, claims)
}

fn groups(claims: &Value) -> Vec<String> {
    claims["portcullis"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str().map(str::to_string))
        .collect()
}

fn actions(claims: &Value) -> Vec<String> {
    claims["access"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["actions"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_users_log_in_and_their_groups_drive_policy() {
    let slapd = Slapd::start().unwrap();
    let s = start(&ldap_table(&slapd, &slapd.url, ""));
    let g = &s.gateway;
    let bob = user_client(g, "bob", &ldap::password("bob"));
    let alice = user_client(g, "alice", &ldap::password("alice"));
    let carol = user_client(g, "carol", &ldap::password("carol"));

    // bob is in team-a (groupOfNames) and posix-team (posixGroup memberUid).
    let (st, claims) = token(
        g,
        "bob",
        &ldap::password("bob"),
        "repository:team-a/app:pull,push",
    )
    .await;
    assert_eq!(st, 200, "{claims}");
    assert_eq!(claims["sub"], "bob");
    assert_eq!(groups(&claims), ["posix-team", "team-a"]);
    bob.push_image("team-a/app", "latest", &[b"layer"])
        .await
        .unwrap();
    bob.push_is_denied("team-b/app").await.unwrap();

    // alice (registry-admins) may delete.
    let m = alice
        .image_manifest("team-a/app", b"{\"by\":\"alice\"}", &[], None)
        .await
        .unwrap();
    let r = alice
        .put_manifest(
            "team-a/app",
            "scratch",
            portcullis_tests::client::OCI_MANIFEST,
            &m,
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", describe(r).await);
    let r = alice
        .req(Method::DELETE, "/v2/team-a/app/manifests/scratch")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", describe(r).await);

    // carol has no group: only what policy gives her by name and every authenticated user.
    let (st, claims) = token(
        g,
        "carol",
        &ldap::password("carol"),
        "repository:team-a/app:pull,push",
    )
    .await;
    assert_eq!(st, 200);
    assert!(groups(&claims).is_empty(), "{claims}");
    // The shipped policy names carol as a reader of team-a/app; nothing else there.
    assert_eq!(actions(&claims), ["pull"], "{claims}");
    let (_, claims) = token(
        g,
        "carol",
        &ldap::password("carol"),
        "repository:team-b/app:pull,push",
    )
    .await;
    assert!(actions(&claims).is_empty(), "{claims}");
    carol
        .push_image("users/carol/app", "latest", &[b"mine"])
        .await
        .unwrap();

    // The local user still works (static users first), and does not need the directory.
    let (st, _) = token(g, LOCAL.0, LOCAL.1, "repository:users/localadmin/x:pull").await;
    assert_eq!(st, 200);

    // Wrong, empty and someone else's passwords.
    for (u, p) in [
        ("bob", "wrong"),
        ("bob", ""),
        ("bob", ldap::password("alice").as_str()),
        ("nobody", "whatever"),
    ] {
        let (st, body) = token(g, u, p, "repository:team-a/app:pull").await;
        assert_eq!(st, 401, "{u}/{p}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filter_and_dn_injection_never_authenticates_anyone_else() {
    let slapd = Slapd::start().unwrap();
    let alice_pw = ldap::password("alice");
    for table in [
        ldap_table(&slapd, &slapd.url, ""),
        // Direct bind mode: the username lands in a DN.
        format!(
            r#"
[auth.ldap]
urls = ["{url}"]
bind_dn_template = "uid={{username}},ou=people,{suffix}"
user_base_dn = "ou=people,{suffix}"
groups = "member_of"
"#,
            url = slapd.url,
            suffix = ldap::SUFFIX
        ),
    ] {
        let s = start(&table);
        let g = &s.gateway;
        // The real login works in both modes.
        let (st, claims) = token(g, "alice", &alice_pw, "repository:a/b:pull").await;
        assert_eq!(st, 200, "{claims}");
        assert_eq!(claims["sub"], "alice");
        for evil in [
            "*",
            "alice*",
            "alice)(uid=*",
            "*)(|(uid=*",
            "alice)(|(objectClass=*",
            "alice\0",
            "alice\\",
            "uid=alice,ou=people,dc=example,dc=org",
            "alice,ou=people,dc=example,dc=org",
            "alice+cn=alice",
        ] {
            let (st, body) = token(g, evil, &alice_pw, "repository:a/b:pull").await;
            assert_eq!(st, 401, "{evil:?} authenticated: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_changes_take_effect_after_the_cache_ttl() {
    let slapd = Slapd::start().unwrap();
    let s = start(&ldap_table(&slapd, &slapd.url, "cache_ttl_seconds = 2"));
    let g = &s.gateway;
    let pw = ldap::password("bob");
    let scope = "repository:elsewhere/app:pull,push,delete";
    let (st, claims) = token(g, "bob", &pw, scope).await;
    assert_eq!(st, 200);
    assert!(actions(&claims).is_empty(), "{claims}");
    slapd.add_to_group("bob", "registry-admins").unwrap();
    // Cached: the old groups until the TTL runs out.
    let (_, claims) = token(g, "bob", &pw, scope).await;
    assert!(!groups(&claims).contains(&"registry-admins".to_string()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (st, claims) = token(g, "bob", &pw, scope).await;
        assert_eq!(st, 200);
        if groups(&claims).contains(&"registry-admins".to_string()) {
            assert_eq!(actions(&claims).len(), 3, "{claims}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new group never showed up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_of_and_group_search_with_nested_groups() {
    let slapd = Slapd::start().unwrap();
    // dave is in ops; ops is a member of registry-admins.
    let cases = [
        ("groups = \"member_of\"", vec!["ops"]),
        (
            "groups = \"member_of\"\nnested_depth = 2",
            vec!["ops", "registry-admins"],
        ),
        ("groups = \"search\"", vec!["ops"]),
        (
            "groups = \"search\"\nnested_depth = 2",
            vec!["ops", "registry-admins"],
        ),
    ];
    for (extra, want) in cases {
        let s = start(&ldap_table(
            &slapd,
            &slapd.url,
            &format!("cache_ttl_seconds = 0\n{extra}"),
        ));
        let (st, claims) = token(
            &s.gateway,
            "dave",
            &ldap::password("dave"),
            "repository:x/y:delete",
        )
        .await;
        assert_eq!(st, 200, "{extra}: {claims}");
        assert_eq!(groups(&claims), want, "{extra}");
        let nested_admin = want.contains(&"registry-admins");
        assert_eq!(
            actions(&claims) == ["delete"],
            nested_admin,
            "{extra}: {claims}"
        );
    }
    // memberOf mode reads bob's memberOf (filled by the overlay): team-a, not the posixGroup.
    let s = start(&ldap_table(&slapd, &slapd.url, "groups = \"member_of\""));
    let (_, claims) = token(
        &s.gateway,
        "bob",
        &ldap::password("bob"),
        "repository:x/y:pull",
    )
    .await;
    assert_eq!(groups(&claims), ["team-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ldaps_and_starttls_with_the_ca_and_a_wrong_ca_fails_clearly() {
    let slapd = Slapd::start().unwrap();
    let pw = ldap::password("bob");
    let ldaps = start(&ldap_table(
        &slapd,
        &slapd.ldaps_url,
        "cache_ttl_seconds = 0",
    ));
    let (st, body) = token(&ldaps.gateway, "bob", &pw, "repository:a/b:pull").await;
    assert_eq!(st, 200, "ldaps: {body}");
    let starttls = start(&ldap_table(
        &slapd,
        &slapd.url,
        "cache_ttl_seconds = 0\nstarttls = true",
    ));
    let (st, body) = token(&starttls.gateway, "bob", &pw, "repository:a/b:pull").await;
    assert_eq!(st, 200, "StartTLS: {body}");

    // Another CA: the directory cannot be trusted, so it is unavailable (503), not a 401.
    let other = tempfile::tempdir().unwrap();
    let wrong = gateway::edge::tls::ensure_dev_certificates(other.path()).unwrap();
    let table = ldap_table(&slapd, &slapd.ldaps_url, "cache_ttl_seconds = 0").replace(
        &slapd.ca_file.display().to_string(),
        &wrong.ca_cert.display().to_string(),
    );
    let bad = start(&table);
    let (st, body) = token(&bad.gateway, "bob", &pw, "repository:a/b:pull").await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_directory_gives_503_and_recovers_without_a_restart_and_urls_fail_over() {
    let mut slapd = Slapd::start().unwrap();
    // The first server is never there: every login fails over to the second.
    let dead = format!("ldap://127.0.0.1:{}", free_port().unwrap());
    let urls = format!("{dead}\", \"{}", slapd.url);
    let s = start(&ldap_table(&slapd, &urls, "cache_ttl_seconds = 0"));
    let g = &s.gateway;
    let bob = user_client(g, "bob", &ldap::password("bob"));
    bob.push_image("team-a/app", "v-before", &[b"x"])
        .await
        .unwrap();

    slapd.stop();
    let started = std::time::Instant::now();
    let (st, body) = token(
        g,
        "bob",
        &ldap::password("bob"),
        "repository:team-a/app:pull",
    )
    .await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the login budget was not kept: {:?}",
        started.elapsed()
    );
    // Tokens already issued keep working.
    let r = bob.get("/v2/team-a/app/tags/list").await.unwrap();
    assert_eq!(r.status(), 200);

    slapd.run().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (st, body) = token(
            g,
            "bob",
            &ldap::password("bob"),
            "repository:team-a/app:pull",
        )
        .await;
        if st == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "logins did not recover: {st} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[test]
fn podman_skopeo_and_docker_log_in_as_a_directory_user() -> anyhow::Result<()> {
    let slapd = Slapd::start()?;
    let s = start(&ldap_table(&slapd, &slapd.url, ""));
    let g = &s.gateway;
    let pw = ldap::password("bob");
    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    for tool in ["podman", "skopeo"] {
        ctr.login(tool, &certs, &g.host, "bob", &pw)?;
        let wrong = ctr.login(tool, &certs, &g.host, "bob", "wrong");
        anyhow::ensure!(wrong.is_err(), "{tool} logged in with a wrong password");
    }
    let _trust = DockerTrust::install(&g.host, &g.ca_pem)?;
    let config = tempfile::tempdir()?;
    let (ok, text) = docker_login(config.path(), &g.host, "bob", &pw)?;
    anyhow::ensure!(ok, "docker login: {text}");
    let (ok, _) = docker_login(config.path(), &g.host, "bob", "wrong")?;
    anyhow::ensure!(!ok, "docker logged in with a wrong password");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_ldap_table_is_put_in_force_on_sighup_and_a_broken_one_changes_nothing() {
    let slapd = Slapd::start().unwrap();
    let table = ldap_table(&slapd, &slapd.url, "cache_ttl_seconds = 300");
    let s = start(&table);
    let g = &s.gateway;
    let pw = ldap::password("bob");
    let scope = "repository:team-a/app:pull";
    assert_eq!(token(g, "bob", &pw, scope).await.0, 200);
    let conf = s._dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    // Waits until bob's login answers `want`.
    let until = |want: u16, what: &'static str| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if token(g, "bob", &ldap::password("bob"), scope).await.0 == want {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    // A filter that finds no one: bob is refused once the gateway reads it again.
    let narrowed = text.replace(
        "user_filter = \"(objectClass=inetOrgPerson)\"",
        "user_filter = \"(&(objectClass=inetOrgPerson)(uid=nobody-at-all))\"",
    );
    assert_ne!(narrowed, text);
    std::fs::write(&conf, &narrowed).unwrap();
    g.signal("HUP").unwrap();
    until(401, "the narrowed filter was never put in force").await;
    // A table that does not build (its CA file is gone) changes nothing.
    let broken = narrowed.replace(
        &slapd.ca_file.display().to_string(),
        "/nonexistent/ldap-ca.pem",
    );
    std::fs::write(&conf, &broken).unwrap();
    let failed = g.reload().await.unwrap();
    assert_eq!(failed["event.outcome"], "failure", "{failed}");
    // Still the narrowed filter (a directory client without its CA would answer 503).
    assert_eq!(
        token(g, "bob", &pw, scope).await.0,
        401,
        "the broken table changed something"
    );
    // The first table again: bob logs in; the local user never depended on the directory.
    std::fs::write(&conf, &text).unwrap();
    g.signal("HUP").unwrap();
    until(200, "the first table was never put back").await;
    assert_eq!(token(g, LOCAL.0, LOCAL.1, scope).await.0, 200);
}
