//! Redis going away and coming back: logins fail clearly while issued tokens keep working;
//! with Sentinel, the gateways follow the master through failovers.

use crate::replicas::{
    Replicas, basic_token, bearer_of, bobs_session, start_gateways, tags_with, token_form,
};
use crate::{BOB, eventually};
use portcullis_tests::client::https;
use portcullis_tests::deployment::{SERVICE, user_client};
use portcullis_tests::redis::{Redis, SentinelSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_fails_logins_clearly_while_issued_tokens_keep_working() {
    let mut r = Replicas::start(2, Redis::start_persistent().unwrap(), "");
    let (a, b) = (r.gateways[0].base.clone(), r.gateways[1].base.clone());
    let ca = r.gateways[0].ca_pem.clone();
    user_client(&r.gateways[1], BOB.0, BOB.1)
        .push_image("team-a/app", "v1", &[b"layer one"])
        .await
        .unwrap();
    let (refresh, v) = bobs_session(&r.gateways[0], Some("repository:team-a/app:pull")).await;
    let access = v["access_token"].as_str().unwrap().to_string();
    // A token revoked before the outage.
    let doomed = bearer_of(&r.gateways[0], BOB.0, BOB.1).await;
    let revoke = |base: String, token: String| {
        let http = https(&ca, false);
        async move {
            http.post(format!("{base}/auth/revoke"))
                .form(&[("token", token.as_str())])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(revoke(b.clone(), doomed.clone()).await, 200);
    for g in &r.gateways {
        eventually(10, "the revoked token refused", || async {
            tags_with(g, &doomed).await.0 == 401
        })
        .await;
    }

    // Pulls with the access token, alternating gateways, all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, ca, access) = (stop.clone(), ca.clone(), access.clone());
        let bases = [a.clone(), b.clone()];
        tokio::spawn(async move {
            let http = https(&ca, false);
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = http
                    .get(format!("{}/v2/team-a/app/manifests/v1", bases[i % 2]))
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
                    .bearer_auth(&access)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (ok, failed)
        })
    };

    r.redis.stop();
    let http = https(&ca, false);
    for g in &r.gateways {
        let admin = g.admin.clone();
        eventually(10, "readiness reports Redis down", || {
            let admin = admin.clone();
            async move {
                let resp = reqwest::get(format!("{admin}/readyz")).await.unwrap();
                resp.status() == 503 && resp.text().await.unwrap().contains("redis")
            }
        })
        .await;
        let metrics = reqwest::get(format!("{}/metrics", g.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("gateway_state_store_up 0"), "{metrics}");
    }
    // Logins that need Redis: a clear 503, soon.
    let t = Instant::now();
    let (status, _, v) = basic_token(&r.gateways[0], BOB.0, BOB.1, "").await;
    assert_eq!(status, 503, "{v}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "ha-test"),
        ("service", SERVICE),
        ("scope", "repository:team-a/app:pull"),
    ];
    let (status, v) = token_form(&r.gateways[1], &grant).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (503, Some("temporarily_unavailable"))
    );
    let resp = http
        .get(format!("{b}/token?service={SERVICE}"))
        .basic_auth("<token>", Some(&refresh))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // Revocations: the ones made before stay in force (several failed reloads later); a new
    // one cannot be shared, so it is refused clearly.
    for g in &r.gateways {
        let failed_reloads = || async {
            let m = reqwest::get(format!("{}/metrics", g.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.lines()
                .find_map(|l| {
                    l.strip_prefix("gateway_revocation_reloads_total{outcome=\"failed\"} ")
                })
                .map_or(0, |v| v.trim().parse::<u64>().unwrap())
        };
        eventually(10, "two failed reloads of the revocation list", || async {
            failed_reloads().await >= 2
        })
        .await;
        assert_eq!(tags_with(g, &doomed).await.0, 401);
    }
    assert_eq!(revoke(a.clone(), access.clone()).await, 503);

    // Back: the gateways reconnect by themselves; the session survived (Redis persists).
    r.redis.start_again().unwrap();
    for g in &r.gateways {
        let admin = g.admin.clone();
        eventually(15, "readiness after Redis is back", || {
            let admin = admin.clone();
            async move {
                reqwest::get(format!("{admin}/readyz"))
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
        assert_eq!(basic_token(g, BOB.0, BOB.1, "").await.0, 200);
        let (status, v) = token_form(g, &grant).await;
        assert_eq!(status, 200, "{v}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "pulls failed while Redis was away: {failed:?}"
    );
    assert!(ok > 10, "{ok} pulls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_sentinel_the_gateways_follow_the_master_through_failovers() {
    let mut set = SentinelSet::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateways, _storages) = start_gateways(dir.path(), 2, 1, &set.state_table("ha:"), "", &[]);
    let (refresh, _) = bobs_session(&gateways[0], None).await;
    // On the replica before the master goes (replication is asynchronous).
    let acked = set.master.command("WAIT 1 5000").unwrap();
    assert_eq!(acked.trim(), ":1", "{acked}");

    // Refresh-token grants (a read and a write in Redis each) on both gateways, all along.
    let grant = |g: usize| {
        let g = &gateways[g];
        let refresh = refresh.clone();
        async move {
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", "ha-test"),
                ("service", SERVICE),
            ];
            token_form(g, &form).await.0
        }
    };
    for g in 0..2 {
        assert_eq!(grant(g).await, 200);
    }

    // kill -9 of the master: the sentinel promotes the replica; both gateways move to it by
    // themselves, and the session written before is there.
    let first = set.master.port;
    set.master.stop();
    let killed = Instant::now();
    eventually(30, "the sentinel promotes the replica", || async {
        set.master_port() == Some(set.replica.port)
    })
    .await;
    let promoted = killed.elapsed();
    for g in 0..2 {
        eventually(15, "grants work again after the failover", || async {
            grant(g).await == 200
        })
        .await;
    }
    let recovered = killed.elapsed();
    eprintln!("failover: promoted after {promoted:?}, both gateways serving after {recovered:?}");

    // The old master comes back and is made a replica; then a manual failover makes it the
    // master again while the gateways hold connections to the other (READONLY or dropped).
    set.master.start_again().unwrap();
    // Sentinel asks a replica for INFO every 10 s, and turns an instance that reports itself
    // master into a replica only 8 s after it saw the role and after the instance was last
    // down: two INFO periods and a sync, about 20-25 s on a busy machine.
    eventually(60, "the old master rejoins as a replica", || async {
        set.master.role().is_ok_and(|r| r == "slave")
            && set
                .master
                .command("INFO replication")
                .is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    for g in 0..2 {
        assert_eq!(
            grant(g).await,
            200,
            "writes go to the master, not the replica"
        );
    }
    // The sentinel sees the replica by its own INFO, every 10 s: until it has seen it in sync
    // it answers -NOGOODSLAVE (no replica to promote), and the request is made again.
    eventually(30, "the sentinel accepts a manual failover", || async {
        set.sentinel(&format!(
            "SENTINEL FAILOVER {}",
            portcullis_tests::redis::SENTINEL_MASTER
        ))
        .is_ok_and(|r| r.starts_with("+OK"))
    })
    .await;
    eventually(30, "the manual failover", || async {
        set.master_port() == Some(first) && set.master.role().is_ok_and(|r| r == "master")
    })
    .await;
    let switched = Instant::now();
    for g in 0..2 {
        eventually(15, "grants work on the new master", || async {
            grant(g).await == 200
        })
        .await;
    }
    eprintln!(
        "manual failover: both gateways serving after {:?}",
        switched.elapsed()
    );
    // Every gateway wrote through the new master: the session's last use is there.
    for g in 0..2 {
        assert_eq!(grant(g).await, 200);
    }
    let on_master = set.master.command("DBSIZE").unwrap();
    assert_ne!(on_master.trim(), ":0", "{on_master}");
}
