//! Several gateways sharing their state in Redis: refresh tokens, robots, lockouts and
//! revocations made on one are honoured by the other, a device flow moves between them,
//! and rate limits count requests on every gateway.

use crate::replicas::{
    Replicas, basic_token, bearer_of, bobs_session, create_robot, tags_with, token_form,
};
use crate::{ALICE, BOB, eventually};
use portcullis_tests::client::https;
use portcullis_tests::deployment::{SERVICE, user_client};
use portcullis_tests::redis::Redis;
use portcullis_tests::server::GatewayServer;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_tokens_robots_and_lockouts_are_shared_by_gateways_on_redis() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        "[limits]\nuser_failures = 5\nlockout_seconds = 120\n",
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);

    // A refresh token from A is redeemed on B; revoked on B, it is dead on A.
    let (refresh, _) = bobs_session(a, None).await;
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "ha-test"),
        ("service", SERVICE),
        ("scope", "repository:team-a/app:pull,push"),
    ];
    let (status, v) = token_form(b, &grant).await;
    assert_eq!(status, 200, "{v}");
    let access = v["access_token"].as_str().unwrap().to_string();
    // An access token from B is good on A (one signing key).
    let resp = https(&a.ca_pem, false)
        .get(format!("{}/v2/team-a/app/tags/list", a.base))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "an unknown repository, but authorized");
    let resp = https(&b.ca_pem, false)
        .post(format!("{}/auth/revoke", b.base))
        .form(&[("token", refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, v) = token_form(a, &grant).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

    // A robot created on A logs in on B and pushes through A.
    let secret = create_robot(a, "ci", &["pull", "push"]).await;
    let (status, _, v) =
        basic_token(b, "robot$team-a+ci", &secret, "repository:team-a/x:push").await;
    assert_eq!(status, 200, "{v}");
    user_client(a, "robot$team-a+ci", &secret)
        .push_image("team-a/x", "v1", &[b"layer"])
        .await
        .unwrap();
    // Listed on B too.
    let resp = https(&b.ca_pem, false)
        .get(format!("{}/admin/robots", b.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    let listed: Value = resp.json().await.unwrap();
    assert!(listed.to_string().contains("robot$team-a+ci"), "{listed}");

    // Five failed logins spread over A and B lock bob out on both, even with his password.
    for i in 0..5 {
        let g = &r.gateways[i % 2];
        let (status, _, v) = basic_token(g, "Bob", "wrong", "").await;
        assert_eq!(status, 401, "attempt {i}: {v}");
    }
    for g in [a, b] {
        let (status, retry, v) = basic_token(g, BOB.0, BOB.1, "").await;
        assert_eq!(status, 429, "{v}");
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS", "{v}");
        let retry = retry.expect("Retry-After");
        assert!((100..=120).contains(&retry), "{retry}");
    }
    // POST password grants are refused the same way; other users are not locked.
    let (status, _) = token_form(
        b,
        &[
            ("grant_type", "password"),
            ("username", BOB.0),
            ("password", BOB.1),
            ("client_id", "ha-test"),
            ("service", SERVICE),
        ],
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(basic_token(a, ALICE.0, ALICE.1, "").await.0, 200);

    // Audited: the lockout once (where the fifth failure landed), each locked refusal.
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let lockouts: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "login-lockout")
        .collect();
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
    let l = lockouts[0];
    assert_eq!(l["user.name"], "Bob");
    assert_eq!(l["lockout.by"], "user");
    assert_eq!(l["lockout.seconds"], 120);
    assert_eq!(l["lockout.failures"], 5);
    assert_eq!(l["source.ip"], "127.0.0.1");
    let locked = events
        .iter()
        .filter(|e| e["event.action"] == "login" && e["event.reason"] == "locked out (user)")
        .count();
    assert_eq!(locked, 3);
    // The state is in Redis under the prefix, with a time to live.
    let ttl = r.redis.command("TTL ha:lock:user:bob").unwrap();
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!((100..=120).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_tokens_revoked_on_one_gateway_are_refused_by_every_gateway() {
    let r = Replicas::start(2, Redis::start().unwrap(), "");
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    let t1 = bearer_of(a, BOB.0, BOB.1).await;
    let t2 = bearer_of(a, BOB.0, BOB.1).await;
    assert_eq!(tags_with(b, &t1).await.0, 404);

    // Its holder revokes t1 on B (RFC 7009): B refuses it at once, A within a sync interval.
    let resp = https(&b.ca_pem, false)
        .post(format!("{}/auth/revoke", b.base))
        .form(&[("token", t1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = tags_with(b, &t1).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    eventually(10, "A refuses the revoked token", || async {
        tags_with(a, &t1).await.0 == 401
    })
    .await;
    assert_eq!(tags_with(a, &t2).await.0, 404, "only that token is revoked");
    assert_eq!(tags_with(b, &t2).await.0, 404);

    // Only administrators revoke other people's tokens.
    let revoke_all = |g: &GatewayServer, who: (&str, &str), query: &str| {
        https(&g.ca_pem, false)
            .delete(format!("{}/auth/tokens?{query}", g.base))
            .basic_auth(who.0, Some(who.1))
            .send()
    };
    let resp = revoke_all(a, BOB, "user=alice").await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = revoke_all(a, ALICE, "user=bob&kind=nobody").await.unwrap();
    assert_eq!(resp.status(), 400);
    // An administrator revokes all of bob's tokens on A; B refuses t2 soon after, and a
    // token bob fetches right away works everywhere.
    let resp = revoke_all(a, ALICE, "user=bob").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tags_with(a, &t2).await.0, 401);
    eventually(10, "B refuses bob's earlier token", || async {
        tags_with(b, &t2).await.0 == 401
    })
    .await;
    let t3 = bearer_of(a, BOB.0, BOB.1).await;
    assert_eq!(tags_with(a, &t3).await.0, 404);
    assert_eq!(tags_with(b, &t3).await.0, 404);
    // One token by its jti (from the audit trail), by an administrator.
    let jti = r
        .audit(0)
        .into_iter()
        .rev()
        .find(|e| e["event.action"] == "token" && e["user.name"] == "bob")
        .and_then(|e| e["token.jti"].as_str().map(str::to_owned))
        .expect("the token event of t3");
    let resp = https(&b.ca_pem, false)
        .delete(format!("{}/auth/tokens/{jti}", b.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    eventually(10, "A refuses the token revoked by jti", || async {
        tags_with(a, &t3).await.0 == 401
    })
    .await;

    // A deleted robot's token stops working on every gateway.
    let secret = create_robot(a, "gone", &["pull"]).await;
    let rt = bearer_of(b, "robot$team-a+gone", &secret).await;
    assert_eq!(tags_with(a, &rt).await.0, 404);
    let resp = https(&a.ca_pem, false)
        .delete(format!("{}/admin/robots/robot$team-a+gone", a.base))
        .basic_auth(ALICE.0, Some(ALICE.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(tags_with(a, &rt).await.0, 401);
    eventually(10, "B refuses the deleted robot's token", || async {
        tags_with(b, &rt).await.0 == 401
    })
    .await;

    // Audited, without the tokens themselves.
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let revokes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "token-revoke")
        .collect();
    let by = |outcome: &str, revoked_by: &str| {
        revokes
            .iter()
            .filter(|e| e["event.outcome"] == outcome && e["revoked_by"] == revoked_by)
            .count()
    };
    assert_eq!(by("success", "holder (RFC 7009)"), 1, "{revokes:?}");
    assert_eq!(by("success", "admin"), 2, "{revokes:?}");
    assert!(
        revokes
            .iter()
            .any(|e| e["event.outcome"] == "failure" && e["user.name"] == "bob"),
        "{revokes:?}"
    );
    let all = serde_json::to_string(&events).unwrap();
    for t in [&t1, &t2, &t3, &rt] {
        assert!(!all.contains(t.as_str()), "a token in the audit trail");
    }
    // Shared through Redis under the prefix, with a time to live.
    let ttl = r.redis.command("TTL ha:revoked:sub:user:bob").unwrap();
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!((300..=360).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_flow_started_on_one_gateway_finishes_on_the_other() {
    let idp_port = portcullis_tests::tools::free_port().unwrap();
    let oidc = format!(
        "[oidc]\nissuer = \"http://127.0.0.1:{idp_port}\"\nclient_id = \"portcullis\"\n\
         scopes = [\"openid\", \"profile\", \"groups\", \"offline_access\"]\n\
         groups_filter = \"^(team-|registry-)\"\n"
    );
    let r = Replicas::start_env(
        2,
        Redis::start().unwrap(),
        &oidc,
        &[(
            "PORTCULLIS_OIDC_CLIENT_SECRET",
            portcullis_tests::oidc::CLIENT_SECRET,
        )],
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    let clients = json!([{
        "client_id": "portcullis",
        "client_secret": portcullis_tests::oidc::CLIENT_SECRET,
        "redirect_uris": [format!("{}/auth/oidc/callback", a.base),
                          format!("{}/auth/oidc/callback", b.base)],
        "grant_types": ["authorization_code", "refresh_token",
                        "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"],
    }]);
    let users = json!({"bob": {"password": "bob-idp-pw", "groups": ["team-a"]}});
    let idp = portcullis_tests::oidc::Idp::start(idp_port, &clients, &users).unwrap();

    let resp = https(&a.ca_pem, false)
        .post(format!("{}/auth/oidc/device", a.base))
        .form(&[("client_id", "ha-test"), ("device", "build-box")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start: Value = resp.json().await.unwrap();
    let code = start["device_code"].as_str().unwrap().to_string();
    let poll = |g: &GatewayServer| {
        let g_base = g.base.clone();
        let ca = g.ca_pem.clone();
        let code = code.clone();
        async move {
            let r = https(&ca, false)
                .post(format!("{g_base}/token"))
                .form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                    ("device_code", code.as_str()),
                    ("client_id", "ha-test"),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Pending on B before the user signs in (B knows the flow A started).
    let (status, v) = poll(b).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("authorization_pending"))
    );
    portcullis_tests::oidc::device_login(
        &https(&a.ca_pem, false),
        &idp,
        start["user_code"].as_str().unwrap(),
        "bob",
        "bob-idp-pw",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, v) = loop {
        let (status, v) = poll(b).await;
        let waiting = v["error"] == "authorization_pending" || v["error"] == "slow_down";
        if !waiting {
            break (status, v);
        }
        assert!(
            Instant::now() < deadline,
            "the device flow never completed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status, 200, "{v}");
    portcullis_tests::remember_secret(v["refresh_token"].as_str().unwrap());
    let claims = portcullis_tests::client::jwt_claims(v["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["sub"], "bob");
    // Spent everywhere: A does not hand out a second session.
    let (status, v) = poll(a).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_grant")),
        "{v}"
    );
}

/// Waits until at least `margin` seconds are left in the current minute (rate-limit windows
/// are calendar minutes), so a count is not split across two windows.
async fn inside_one_minute(margin: u64) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if 60 - now % 60 >= margin {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_count_requests_on_every_gateway() {
    let r = Replicas::start(
        2,
        Redis::start().unwrap(),
        "[limits]\nregistry_per_minute_per_user = 20\ntoken_per_minute_per_user = 5\n",
    );
    let (a, b) = (&r.gateways[0], &r.gateways[1]);
    user_client(a, BOB.0, BOB.1)
        .push_image("team-a/app", "v1", &[b"layer"])
        .await
        .unwrap();
    let (status, _, v) = basic_token(b, BOB.0, BOB.1, "repository:team-a/app:pull").await;
    assert_eq!(status, 200);
    let token = v["token"].as_str().unwrap().to_string();

    inside_one_minute(30).await;
    // The window may hold the push's requests: count up to the first refusal from here.
    let http = https(&a.ca_pem, false);
    let mut served = 0;
    let refused = loop {
        let g = &r.gateways[served % 2];
        let resp = http
            .get(format!("{}/v2/team-a/app/tags/list", g.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if resp.status() != 200 {
            break resp;
        }
        served += 1;
        assert!(served <= 20, "no limit after {served} requests");
    };
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    // The other gateway refuses too; another identity is not limited.
    let resp = http
        .get(format!("{}/v2/team-a/app/tags/list", b.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let (status, _, v) = basic_token(a, ALICE.0, ALICE.1, "repository:team-a/app:pull").await;
    assert_eq!(status, 200);
    let resp = http
        .get(format!("{}/v2/team-a/app/tags/list", b.base))
        .bearer_auth(v["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The token endpoint: 5 a minute for alice (one used above), spread over both gateways.
    let mut granted = 1;
    let (status, retry) = loop {
        let (status, retry, _) = basic_token(&r.gateways[granted % 2], ALICE.0, ALICE.1, "").await;
        if status != 200 {
            break (status, retry);
        }
        granted += 1;
        assert!(granted <= 5, "no token limit after {granted}");
    };
    assert_eq!((status, granted), (429, 5));
    assert!(retry.is_some());
    let events: Vec<Value> = (0..2).flat_map(|i| r.audit(i)).collect();
    let limited: Vec<&Value> = events
        .iter()
        .filter(|e| e["event.action"] == "rate-limit")
        .collect();
    assert_eq!(limited.len(), 1, "audited once per window: {limited:?}");
    assert_eq!(limited[0]["user.name"], "alice");
    assert_eq!(limited[0]["limit.endpoint"], "token");
    let registry_refusals = events
        .iter()
        .filter(|e| e["event.reason"] == "rate limited (user)")
        .count();
    assert!(registry_refusals >= 2, "{registry_refusals}");
}
