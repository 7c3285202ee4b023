//! Registry events on a deployment: two gateways sharing Redis deliver each webhook's events
//! through one of them at a time — none sent by both — and when that one dies the other takes
//! over, losing nothing.

use crate::ALICE;
use crate::replicas::Replicas;
use portcullis_tests::client::{Client, OCI_MANIFEST, describe, image_config};
use portcullis_tests::receiver::Receiver;
use portcullis_tests::redis::Redis;
use portcullis_tests::server::GatewayServer;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn client_of(g: &GatewayServer) -> Client {
    portcullis_tests::deployment::user_client(g, ALICE.0, ALICE.1)
}

async fn push(c: &Client, tag: &str) {
    let body = c
        .image_manifest("team-a/app", &image_config(tag), &[tag.as_bytes()], None)
        .await
        .unwrap();
    let r = c
        .put_manifest("team-a/app", tag, OCI_MANIFEST, &body)
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push {tag}: {}", describe(r).await);
}

/// The tags of the events received, in order of first arrival, and how many deliveries
/// repeated an id — once `n` distinct ones arrived (`secs` at most).
async fn received(rx: &Receiver, n: usize, secs: u64) -> (Vec<String>, usize) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut tags = Vec::new();
        for d in rx.deliveries() {
            let id = d
                .headers
                .get("portcullis-event-id")
                .cloned()
                .unwrap_or_default();
            let count = seen.entry(id).or_default();
            *count += 1;
            if *count == 1 {
                tags.push(d.json()["data"]["tag"].as_str().unwrap_or("").to_owned());
            }
        }
        if tags.len() >= n {
            let repeats = seen.values().map(|c| c - 1).sum();
            return (tags, repeats);
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} events arrived: {tags:?}",
            tags.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_deliver_each_event_once_and_the_survivor_takes_over() {
    let rx = Receiver::start().await.unwrap();
    let hooks = format!("[[webhooks]]\nname = \"all\"\nurl = \"{}\"\n", rx.url());
    let mut r = Replicas::start(2, Redis::start().unwrap(), &hooks);
    let clients: Vec<Client> = r.gateways.iter().map(client_of).collect();
    for i in 0..6 {
        push(&clients[i % 2], &format!("t{i}")).await;
    }
    let (tags, repeats) = received(&rx, 6, 60).await;
    assert_eq!(tags, ["t0", "t1", "t2", "t3", "t4", "t5"], "in order");
    assert_eq!(repeats, 0, "an event sent by both gateways");

    // One gateway dies (kill -9); the other records and, at the next window, delivers.
    r.gateways.remove(0);
    for i in 6..10 {
        push(&clients[1], &format!("t{i}")).await;
    }
    let (tags, repeats) = received(&rx, 10, 90).await;
    let want: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    assert_eq!(tags, want, "in order, none lost");
    assert_eq!(repeats, 0, "an event sent twice");
}
