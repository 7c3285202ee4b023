//! The web console (`/ui/`) in a real headless Chromium over WebDriver: sign in, find an
//! image, read its layers, annotations and referrers, delete a mutable tag, be refused on an
//! immutable one, sign out — against a production-shape deployment and `gateway dev`.
//! Screenshots of each page go to `target/console-screenshots/` (docs/console.md shows them).

use anyhow::{Context, ensure};
use portcullis_tests::browser::Browser;
use portcullis_tests::client::{Client, OCI_MANIFEST, TokenAuth, describe, image_config, sha256};
use portcullis_tests::deployment::{self, SERVICE};
use portcullis_tests::server::{GatewayServer, workspace_root};
use reqwest::Method;
use serde_json::json;
use sha2::Digest as _;
use std::path::PathBuf;

const ALICE: (&str, &str) = ("alice", "console-alice-pw");
const BOB: (&str, &str) = ("bob", "console-bob-pw");
const DAVE: (&str, &str) = ("dave", "console-dave-pw");
/// What a pusher could write into an annotation, hoping a console runs it.
const XSS: &str = "<img src=x onerror=\"window.pwned=true\"><script>window.pwned=true</script>";

fn shots() -> PathBuf {
    workspace_root().join("target/console-screenshots")
}

/// Pushes `repo:tag` with an annotation carrying the XSS payload; the manifest's digest.
async fn push(c: &Client, repo: &str, tag: &str) -> anyhow::Result<oci::Digest> {
    let config = image_config(tag);
    let manifest = c
        .image_manifest(
            repo,
            &config,
            &[format!("layer of {repo}:{tag}").as_bytes()],
            Some(json!({"annotations": {"org.opencontainers.image.description": XSS}})),
        )
        .await?;
    let r = c.put_manifest(repo, tag, OCI_MANIFEST, &manifest).await?;
    ensure!(
        r.status() == 201,
        "push {repo}:{tag}: {}",
        describe(r).await
    );
    Ok(sha256(&manifest))
}

/// Pushes a signature-like artifact that refers to `subject` in `repo`.
async fn push_referrer(
    c: &Client,
    repo: &str,
    subject: &oci::Digest,
    size: usize,
) -> anyhow::Result<()> {
    let blob = c.push_blob(repo, b"a signature".to_vec()).await?;
    let empty = c.push_blob(repo, b"{}".to_vec()).await?;
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": blob.to_string(), "size": 11}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": size}
    });
    let body = serde_json::to_vec(&m)?;
    let d = sha256(&body);
    let r = c
        .put_manifest(repo, &d.to_string(), OCI_MANIFEST, &body)
        .await?;
    ensure!(r.status() == 201, "referrer: {}", describe(r).await);
    Ok(())
}

async fn sign_in(b: &Browser, base: &str, who: (&str, &str)) -> anyhow::Result<()> {
    b.open(&format!("{base}/ui/")).await?;
    b.wait_for_url("/ui/login").await?;
    b.fill("#username", who.0).await?;
    b.fill("#password", who.1).await?;
    b.click("#sign-in").await?;
    b.wait_for_url("/ui/").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_developer_signs_in_reads_an_image_deletes_a_mutable_tag_and_sees_nothing_of_another_team()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    // team-a's maintainers are bob's group; team-b is dave's alone; release tags immutable.
    std::fs::write(
        gw.join("policy.toml"),
        "admin_groups = [\"registry-admins\"]\n\
         [[bindings]]\nrepositories = [\"team-a/**\"]\ngroups = [\"team-a\"]\nrole = \"maintainer\"\n\
         [[bindings]]\nrepositories = [\"team-b/**\"]\nusers = [\"dave\"]\nrole = \"maintainer\"\n\
         [[immutability]]\nrepositories = [\"**\"]\ntags = [\"v*.*.*\"]\n",
    )?;
    let g = deployment::start_gateway(&gw, &[&storage], &[ALICE, BOB, DAVE], 4)?;
    let admin = deployment::user_client(&g, ALICE.0, ALICE.1);
    let release = push(&admin, "team-a/app", "v1.0.0").await?;
    push(&admin, "team-a/app", "dev").await?;
    push(&admin, "team-a/app", "dev2").await?;
    let r = admin
        .req(Method::GET, &format!("/v2/team-a/app/manifests/{release}"))
        .send()
        .await?;
    let size = r.bytes().await?.len();
    push_referrer(&admin, "team-a/app", &release, size).await?;
    push(&admin, "team-b/secret-project", "v9.9.9").await?;

    // The console's own headers, without a browser.
    let http = portcullis_tests::client::https(&g.ca_pem, true);
    let r = http.get(format!("{}/ui/login", g.base)).send().await?;
    let csp = r
        .headers()
        .get("content-security-policy")
        .context("no CSP")?
        .to_str()?
        .to_owned();
    ensure!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    ensure!(r.headers()["x-frame-options"] == "DENY");

    let b = Browser::start().await?;
    b.open(&format!("{}/ui/", g.base)).await?;
    b.screenshot(&shots().join("1-sign-in.png")).await?;
    // A wrong password: refused, still on the sign-in page.
    b.fill("#username", BOB.0).await?;
    b.fill("#password", "wrong").await?;
    b.click("#sign-in").await?;
    b.wait_for_text(".error", "Wrong user name or password")
        .await?;
    sign_in(&b, &g.base, BOB).await?;
    let page = b.source().await?;
    ensure!(page.contains("team-a/app"), "{page}");
    ensure!(!page.contains("team-b"), "team-b shows in bob's list");
    b.screenshot(&shots().join("2-repositories.png")).await?;
    // Searching for it, or opening it by name, shows no trace of it either.
    b.open(&format!("{}/ui/?q=team-b", g.base)).await?;
    ensure!(!b.source().await?.contains("secret-project"));
    b.open(&format!("{}/ui/repo?name=team-b/secret-project", g.base))
        .await?;
    let page = b.source().await?;
    ensure!(
        !page.contains("v9.9.9") && page.contains("Not found"),
        "{page}"
    );
    b.open(&format!(
        "{}/ui/manifest?name=team-b/secret-project&ref=v9.9.9",
        g.base
    ))
    .await?;
    ensure!(!b.source().await?.contains("Layers"));

    // The repository: both tags, the release marked immutable.
    b.open(&format!("{}/ui/repo?name=team-a/app", g.base))
        .await?;
    let tags = b.text("#tags").await?;
    ensure!(
        tags.contains("v1.0.0") && tags.contains("dev") && tags.contains("immutable"),
        "{tags}"
    );
    ensure!(tags.contains("1 layer"), "no contents: {tags}");
    b.screenshot(&shots().join("3-repository.png")).await?;
    // The release: layers, the annotation shown as text (never run), its signature.
    b.open(&format!(
        "{}/ui/manifest?name=team-a/app&ref=v1.0.0",
        g.base
    ))
    .await?;
    ensure!(b.text("#digest").await? == release.to_string());
    ensure!(b.text("#layers").await?.contains("sha256:"));
    ensure!(
        b.text("#annotations").await?.contains(XSS),
        "the annotation is shown as it was written"
    );
    ensure!(
        !b.script_ran("pwned").await?,
        "the annotation ran as script"
    );
    ensure!(b.text("#referrers").await?.contains("cosign"));
    b.screenshot(&shots().join("4-manifest.png")).await?;

    // Delete the mutable tag; the immutable one is refused, with the rule.
    b.open(&format!("{}/ui/repo?name=team-a/app", g.base))
        .await?;
    b.click("button[aria-label=\"Delete tag dev\"]").await?;
    b.wait_for_text(".notice", "Tag dev deleted").await?;
    let r = admin.get("/v2/team-a/app/manifests/dev").await?;
    ensure!(r.status() == 404, "dev was not deleted: {}", r.status());
    b.click("button[aria-label=\"Delete tag v1.0.0\"]").await?;
    let notice = b.wait_for_text(".notice", "immutable").await?;
    ensure!(
        notice.contains("immutable") && notice.contains("line"),
        "{notice}"
    );
    b.screenshot(&shots().join("5-refused.png")).await?;
    let r = admin.get("/v2/team-a/app/manifests/v1.0.0").await?;
    ensure!(r.status() == 200);

    // A form post without the session's CSRF token, or with a wrong one of any length, is
    // refused, and the (mutable) tag stays.
    let cookie = b.cookie("__Host-portcullis_ui").await?;
    for csrf in [None, Some("x"), Some("0123456789abcdef0123456789abcdef")] {
        let mut form = vec![("name", "team-a/app"), ("tag", "dev2")];
        if let Some(c) = csrf {
            form.push(("csrf", c));
        }
        let r = http
            .post(format!("{}/ui/delete-tag", g.base))
            .header("cookie", format!("__Host-portcullis_ui={cookie}"))
            .form(&form)
            .send()
            .await?;
        ensure!(r.status() == 403, "csrf {csrf:?}: {}", r.status());
    }
    ensure!(admin.get("/v2/team-a/app/manifests/dev2").await?.status() == 200);

    // A manifest deleted by digest; the release's is refused (an immutable tag is on it).
    b.open(&format!("{}/ui/manifest?name=team-a/app&ref=dev2", g.base))
        .await?;
    b.click("#delete-manifest button").await?;
    b.wait_for_text(".notice", "deleted").await?;
    ensure!(admin.get("/v2/team-a/app/manifests/dev2").await?.status() == 404);
    b.open(&format!(
        "{}/ui/manifest?name=team-a/app&ref=v1.0.0",
        g.base
    ))
    .await?;
    b.click("#delete-manifest button").await?;
    b.wait_for_text(".notice", "what an immutable tag points at")
        .await?;
    ensure!(admin.get("/v2/team-a/app/manifests/v1.0.0").await?.status() == 200);
    // A robot's secret or a refresh token does not open a console session.
    let r = http
        .post(format!("{}/ui/login", g.base))
        .header("cookie", "__Host-portcullis_ui_login=abc")
        .form(&[
            ("csrf", "abc"),
            ("username", "<token>"),
            ("password", cookie.as_str()),
        ])
        .send()
        .await?;
    ensure!(
        r.status() == 401,
        "a refresh token signed in: {}",
        r.status()
    );

    // A device's docker login (a device token: a session's refresh token) works until the
    // person revokes that session on the account page.
    portcullis_tests::remember_secret(&cookie);
    let device = http
        .get(format!(
            "{}/token?service={SERVICE}&offline_token=true&client_id=bob-laptop",
            g.base
        ))
        .basic_auth(BOB.0, Some(BOB.1))
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?["refresh_token"]
        .as_str()
        .context("no device token")?
        .to_owned();
    portcullis_tests::remember_secret(&device);
    let docker_login = || async {
        Ok::<_, anyhow::Error>(
            http.get(format!(
                "{}/token?service={SERVICE}&scope=repository:team-a/app:pull",
                g.base
            ))
            .basic_auth("<token>", Some(&device))
            .send()
            .await?
            .status(),
        )
    };
    ensure!(docker_login().await? == 200);
    b.open(&format!("{}/ui/account", g.base)).await?;
    let sessions = b.text("#sessions").await?;
    ensure!(
        sessions.contains("bob-laptop") && sessions.contains("this browser"),
        "{sessions}"
    );
    b.screenshot(&shots().join("6-account.png")).await?;
    let id = hex::encode(sha2::Sha256::digest(device.as_bytes()))[..16].to_owned();
    b.click(&format!("button[aria-label=\"Revoke session {id}\"]"))
        .await?;
    b.wait_for_text(".notice", "Session revoked").await?;
    ensure!(!b.text("#sessions").await?.contains("bob-laptop"));
    ensure!(
        docker_login().await? == 401,
        "the revoked device still logs in"
    );

    // Signing out ends the session: the cookie no longer opens a page.
    b.click("header button").await?;
    b.wait_for_url("/ui/login").await?;
    let r = http
        .get(format!("{}/ui/", g.base))
        .header("cookie", format!("__Host-portcullis_ui={cookie}"))
        .send()
        .await?;
    ensure!(r.status() == 303, "a signed-out session still opens pages");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_default_serves_the_console() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let g = GatewayServer::start_dev(data.path(), Some("console-dev-admin"))?;
    let mut c = deployment::user_client(&g, "admin", "console-dev-admin");
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        "portcullis",
        Some(("admin", "console-dev-admin")),
    ));
    push(&c, "team-a/dev-app", "1").await?;
    let b = Browser::start().await?;
    sign_in(&b, &g.base, ("admin", "console-dev-admin")).await?;
    ensure!(b.source().await?.contains("team-a/dev-app"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_administrator_creates_and_rotates_a_robot_whose_secret_skopeo_uses()
-> anyhow::Result<()> {
    use portcullis_tests::tools::{Containers, cert_dir};
    let dir = tempfile::tempdir()?;
    let storage = deployment::storage_node(&dir.path().join("storage"))?;
    let gw = dir.path().join("gw");
    std::fs::create_dir_all(&gw)?;
    let trail = gw.join("audit.jsonl");
    let g = deployment::start_gateway_with(
        &gw,
        &[&storage],
        &[ALICE, BOB],
        4,
        &format!("[audit]\nstdout = true\nfile = \"{}\"\n", trail.display()),
        &[],
    )?;
    let admin = deployment::user_client(&g, ALICE.0, ALICE.1);
    push(&admin, "team-a/app", "v1.0.0").await?;

    // bob (no administrator) has no robots or audit page.
    let b = Browser::start().await?;
    sign_in(&b, &g.base, BOB).await?;
    ensure!(!b.source().await?.contains("/ui/admin/robots"));
    b.open(&format!("{}/ui/admin/robots", g.base)).await?;
    ensure!(b.source().await?.contains("Not found"));
    b.open(&format!("{}/ui/admin/audit", g.base)).await?;
    ensure!(b.source().await?.contains("Not found"));
    for page in ["policy", "storage"] {
        b.open(&format!("{}/ui/admin/{page}", g.base)).await?;
        ensure!(b.source().await?.contains("Not found"), "bob sees {page}");
    }
    b.click("header button").await?;
    b.wait_for_url("/ui/login").await?;

    sign_in(&b, &g.base, ALICE).await?;
    b.open(&format!("{}/ui/admin/robots", g.base)).await?;
    b.fill("#project", "team-a").await?;
    b.fill("#robot-name", "ci").await?;
    b.fill("#repositories", "team-a/**").await?;
    b.click("#push").await?;
    b.click("#create-robot").await?;
    b.wait_for_text("#secret", "Secret of").await?;
    let secret = b.text("#robot-secret").await?;
    ensure!(secret.len() >= 32, "no secret shown: {secret:?}");
    portcullis_tests::remember_secret(&secret);
    b.screenshot(&shots().join("7-robots.png")).await?;
    ensure!(b.text("#robots").await?.contains("robot$team-a+ci"));
    // Shown once: the list page does not show it again.
    b.open(&format!("{}/ui/admin/robots", g.base)).await?;
    ensure!(!b.source().await?.contains(&secret));

    let ctr = Containers::new()?;
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    let copy = |secret: &str, to: &str| {
        let creds = format!("robot$team-a+ci:{secret}");
        ctr.run(
            "skopeo",
            &[
                "copy",
                "-q",
                "--src-cert-dir",
                &certs,
                "--dest-cert-dir",
                &certs,
                "--src-creds",
                &creds,
                "--dest-creds",
                &creds,
                &format!("docker://{}/team-a/app:v1.0.0", g.host),
                &format!("docker://{}/team-a/{to}", g.host),
            ],
        )
    };
    copy(&secret, "by-robot:1")?;
    // Rotated: the new secret works too.
    b.click("button[aria-label=\"Rotate robot$team-a+ci\"]")
        .await?;
    // The list page has no secret: wait for the next page's.
    b.wait_for_text("#secret", "Secret of").await?;
    let rotated = b.text("#robot-secret").await?;
    portcullis_tests::remember_secret(&rotated);
    ensure!(
        rotated != secret && rotated.len() >= 32,
        "no new secret: {}",
        b.source().await?
    );
    copy(&rotated, "by-robot:2")?;
    // Disabled: it pushes no more until enabled again.
    b.open(&format!("{}/ui/admin/robots", g.base)).await?;
    b.click("button[aria-label=\"Disable robot$team-a+ci\"]")
        .await?;
    b.wait_for_text(".notice", "Robot disabled").await?;
    ensure!(
        copy(&rotated, "by-robot:disabled").is_err(),
        "a disabled robot still pushes"
    );
    b.click("button[aria-label=\"Enable robot$team-a+ci\"]")
        .await?;
    b.wait_for_text(".notice", "Robot enabled").await?;
    // The tag list says who pushed what, from the trail.
    b.open(&format!("{}/ui/repo?name=team-a%2Fby-robot", g.base))
        .await?;
    let tags = b.text("main").await?;
    ensure!(
        tags.matches("by robot$team-a+ci").count() == 2,
        "pushed-by not shown: {tags}"
    );
    // The audit trail shows the robot's pushes.
    b.open(&format!("{}/ui/admin/audit", g.base)).await?;
    b.fill("#user", "robot$team-a+ci").await?;
    b.fill("#action", "tag-create").await?;
    b.click("#search").await?;
    // The unfiltered page shows them too: wait for the search's own page.
    b.wait_for_url("&until=").await?;
    let events = b.wait_for_text("#events", "team-a/by-robot").await?;
    ensure!(
        events.contains("by-robot") && !events.contains("alice"),
        "{events}"
    );
    b.screenshot(&shots().join("8-audit.png")).await?;
    // That search is on the trail too.
    b.open(&format!("{}/ui/admin/audit?action=audit-search", g.base))
        .await?;
    b.wait_for_text("#events", "audit-search").await?;

    // The policy in force, and its answer to "may bob push over a release tag".
    b.open(&format!("{}/ui/admin/policy", g.base)).await?;
    ensure!(b.text("#policy-text").await?.contains("admin_groups"));
    b.fill("#user", "bob").await?;
    b.fill("#groups", "team-a").await?;
    b.click("#action option[value=push]").await?;
    b.fill("#target", "team-a/app:v1.0.0").await?;
    b.click("#ask").await?;
    // It exists and is immutable: bob may push to team-a, but not move it.
    let verdict = b.wait_for_text("#verdict", "Denied").await?;
    ensure!(
        verdict.contains("developer")
            && verdict.contains("DENY tag v1.0.0: immutable (rule at line"),
        "{verdict}"
    );
    b.screenshot(&shots().join("9-policy.png")).await?;
    // A release tag that does not exist yet may be created.
    b.open(&format!(
        "{}/ui/admin/policy?user=bob&kind=user&groups=team-a&action=push&target=team-a%2Fapp%3Av9.9.9",
        g.base
    ))
    .await?;
    let verdict = b.wait_for_text("#verdict", "Allowed").await?;
    ensure!(verdict.contains("may be created, never moved"), "{verdict}");
    b.open(&format!(
        "{}/ui/admin/policy?user=carol&kind=user&action=push&target=team-a%2Fsecret",
        g.base
    ))
    .await?;
    b.wait_for_text("#verdict", "Denied").await?;

    // Storage: the node healthy, its usage, and a GC dry run made just now.
    let dry: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/gc?dry_run=true", storage.base))
        .header("portcullis-internal-secret", deployment::SECRET)
        .send()
        .await?
        .json()
        .await?;
    ensure!(dry["dry_run"] == true, "{dry}");
    b.open(&format!("{}/ui/admin/storage", g.base)).await?;
    let shown = b.text("main").await?;
    ensure!(
        shown.contains("healthy") && shown.contains("dry run") && shown.contains("blobs"),
        "{shown}"
    );
    b.screenshot(&shots().join("10-storage.png")).await?;
    b.open(&format!("{}/ui/admin/robots", g.base)).await?;
    // Deleted: it pushes no more.
    b.click("button[aria-label=\"Delete robot$team-a+ci\"]")
        .await?;
    b.wait_for_text(".notice", "Robot deleted").await?;
    ensure!(
        copy(&rotated, "by-robot:3").is_err(),
        "a deleted robot still pushes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_signs_in_with_single_sign_on_and_the_idp_groups_decide() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let users = json!({
        "bob": {"password": "bob-idp-pw", "groups": ["team-a"]},
        "carol": {"password": "carol-idp-pw", "groups": []},
    });
    // The IdP on a host name of its own (a browser keeps cookies by host, not port).
    let (_storage, g, idp) = portcullis_tests::oidc::start_sso_at(
        dir.path(),
        "groups_refresh_seconds = 1",
        &users,
        &[],
        "localhost",
    )?;
    // bob pushes with the refresh token a `docker login` through SSO gives.
    let http = portcullis_tests::client::https(&g.ca_pem, false);
    let refresh =
        portcullis_tests::oidc::sign_in(&http, &g.base, &idp, "bob", "bob-idp-pw", "laptop")
            .await?;
    let mut bob = Client::with_ca(&g.base, &g.ca_pem);
    bob.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        SERVICE,
        Some(("<token>", &refresh)),
    ));
    push(&bob, "team-a/sso-app", "1").await?;

    // Through the IdP's sign-in form, in a browser of the person's own.
    let through_idp = |user: &'static str, pw: &'static str| {
        let base = g.base.clone();
        async move {
            let b = Browser::start().await?;
            b.open(&format!("{base}/ui/login")).await?;
            b.click("#sso").await?;
            // The IdP's own sign-in form.
            const FORM: &str = "form[action*='/interaction/']";
            b.wait_for(FORM).await?;
            b.fill(&format!("{FORM} input[name=username]"), user)
                .await?;
            b.fill(&format!("{FORM} input[name=password]"), pw).await?;
            b.click(&format!("{FORM} button")).await?;
            // Back through the gateway's callback into the console (a same-site step: the
            // `SameSite=Strict` cookie must be sent on it).
            b.wait_for_url("/ui/").await?;
            b.wait_for_text("header", user).await?;
            anyhow::Ok(b)
        }
    };
    let b = through_idp("bob", "bob-idp-pw").await?;
    ensure!(b.text("main").await?.contains("team-a/sso-app"));
    b.open(&format!("{}/ui/account", g.base)).await?;
    let sessions = b.text("main").await?;
    ensure!(
        sessions.contains("console-sso") && sessions.contains("laptop"),
        "{sessions}"
    );
    // Taken out of team-a at the IdP: the session's groups are read again, team-a is gone.
    idp.set_users(&json!({"bob": {"password": "bob-idp-pw", "groups": []}}))
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        b.open(&format!("{}/ui/", g.base)).await?;
        let page = b.source().await?;
        ensure!(page.contains("Sign out"), "signed out instead: {page}");
        if !page.contains("team-a/sso-app") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the IdP's groups were never read again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    b.click("header button").await?;
    b.wait_for_url("/ui/login").await?;

    // carol's IdP account has no group: she signs in and sees nothing of team-a.
    let b = through_idp("carol", "carol-idp-pw").await?;
    ensure!(!b.source().await?.contains("team-a"));
    b.open(&format!("{}/ui/repo?name=team-a%2Fsso-app", g.base))
        .await?;
    ensure!(b.text("main").await?.contains("Not found"));
    Ok(())
}
