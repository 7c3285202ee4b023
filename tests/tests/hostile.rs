//! Hostile clients at the gateway's TLS edge (issue 12), each against a running gateway in
//! front of a storage node while a legitimate client keeps pulling an image — every pull must
//! succeed while the attack runs: silent and half-open connections, very many connections,
//! slowloris headers and bodies, a head trickled past its total deadline, oversized headers and
//! URLs, request smuggling, path tricks,
//! HTTP/2 rapid reset and stream floods. `cargo test --release --test hostile` runs exactly
//! these. The attacks and what answers them: docs/security.md.

use anyhow::{Context, ensure};
use openssl::ssl::{SslConnector, SslMethod, SslStream, SslVerifyMode};
use portcullis_tests::client::{Client, sha256};
use portcullis_tests::deployment::{Deployment, user_client};
use portcullis_tests::server::{metric_sample, metrics_text};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const LAYER: &[u8] = b"the layer every legitimate pull fetches";

/// A deployment with an image in team-a/app (bob's) and one in team-b/app (alice's; bob may
/// not read it).
struct Edge {
    d: Deployment,
    _parent: tempfile::TempDir,
}

impl Edge {
    async fn start() -> anyhow::Result<Edge> {
        Self::start_with("").await
    }

    /// With `extra` appended to the gateway's config.
    async fn start_with(extra: &str) -> anyhow::Result<Edge> {
        let parent = tempfile::tempdir()?;
        let d = Deployment::start_in_with(
            parent.path(),
            &[("bob", "bob-pw"), ("alice", "alice-pw")],
            4,
            extra,
        )?;
        let e = Edge { d, _parent: parent };
        e.bob().push_image("team-a/app", "v1", &[LAYER]).await?;
        user_client(&e.d.gateway, "alice", "alice-pw")
            .push_image("team-b/app", "secret", &[b"team-b's layer"])
            .await?;
        Ok(e)
    }

    fn bob(&self) -> Client {
        user_client(&self.d.gateway, "bob", "bob-pw")
    }

    /// `host:port` of the TLS listener.
    fn host(&self) -> &str {
        &self.d.gateway.host
    }

    /// Open descriptors of the gateway process.
    fn open_fds(&self) -> anyhow::Result<usize> {
        let pid = self.d.gateway.pid().context("gateway pid")?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// A TLS connection speaking HTTP/1.1 (ALPN), trusting the deployment's CA.
    fn tls(&self) -> anyhow::Result<SslStream<TcpStream>> {
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        let ca = openssl::x509::X509::from_pem(&self.d.gateway.ca_pem)?;
        b.cert_store_mut().add_cert(ca)?;
        b.set_verify(SslVerifyMode::PEER);
        b.set_alpn_protos(b"\x08http/1.1")?;
        let tcp = TcpStream::connect(self.host())?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(b.build().connect("localhost", tcp)?)
    }

    /// Sends `raw` on a fresh HTTP/1.1 connection and reads until the gateway closes it or
    /// goes quiet for 2 s: everything it answered.
    fn raw(&self, raw: &[u8]) -> anyhow::Result<String> {
        let mut s = self.tls()?;
        s.get_ref().set_read_timeout(Some(Duration::from_secs(2)))?;
        // A refused request may be answered and the connection closed before all was sent.
        let _ = s.write_all(raw);
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Starts the legitimate client: pulls the image again and again, each time on a fresh
    /// client (new connections, a new token), until [`Pulls::finish`].
    fn pulls(&self) -> Pulls {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let g = &self.d.gateway;
        let (base, ca) = (g.base.clone(), g.ca_pem.clone());
        let (stop2, ok2) = (stop.clone(), ok.clone());
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let mut c = Client::with_ca(&base, &ca);
                c.auth = Some(portcullis_tests::client::TokenAuth::new(
                    &format!("{base}/token"),
                    portcullis_tests::deployment::SERVICE,
                    Some(("bob", "bob-pw")),
                ));
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(20), pull_once(&c)).await {
                    Ok(Ok(())) => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => failures.push(format!("{e:#}")),
                    Err(_) => failures.push(format!("a pull hung for {:?}", started.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        });
        Pulls { stop, ok, task }
    }
}

/// One legitimate pull: the manifest, then the layer, checked against its digest.
async fn pull_once(c: &Client) -> anyhow::Result<()> {
    let r = c.get("/v2/team-a/app/manifests/v1").await?;
    ensure!(r.status() == 200, "manifest: {}", r.status());
    r.bytes().await?;
    let r = c
        .get(&format!("/v2/team-a/app/blobs/{}", sha256(LAYER)))
        .await?;
    ensure!(r.status() == 200, "blob: {}", r.status());
    ensure!(r.bytes().await? == LAYER, "blob content");
    Ok(())
}

struct Pulls {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Pulls {
    fn count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further pulls have succeeded (the legitimate client gets through
    /// while the attack holds), within `within`.
    async fn wait_more(&self, more: u64, within: Duration) -> anyhow::Result<()> {
        let target = self.count() + more;
        let deadline = Instant::now() + within;
        while self.count() < target {
            ensure!(
                Instant::now() < deadline && !self.task.is_finished(),
                "only {} of {more} pulls succeeded in {within:?} during the attack",
                more + self.count() - target
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the client: every pull it made must have succeeded.
    async fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await?;
        ensure!(failures.is_empty(), "legitimate pulls failed: {failures:?}");
        Ok(self.ok.load(Ordering::Relaxed))
    }
}

/// A TCP connection to `host` from the loopback address `source` (Linux answers every
/// 127.0.0.0/8 address on `lo`): attackers and the legitimate client count as different
/// sources for the per-source connection cap.
async fn connect_from(source: &str, host: &str) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    let s = socket.connect(host.parse()?).await?.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Whether the gateway closed `s` (end of stream or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            return true;
        }
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_and_half_open_connections_are_closed_after_the_hello_timeout() -> anyhow::Result<()>
{
    // The gateway starts with a soft descriptor limit of 4,096 (its children inherit this
    // process's), too few for what follows on a machine whose soft limit is 1,024 but
    // whose hard limit is higher, and raises it to the hard one.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    ensure!(
        hard >= 4096,
        "the hard descriptor limit is {hard}: this test needs 4,096"
    );
    setrlimit(Resource::RLIMIT_NOFILE, 4096, hard)?;
    let e = Edge::start().await?;
    let pulls = e.pulls();
    pulls.wait_more(1, Duration::from_secs(30)).await?;
    // The gateway raised its soft descriptor limit to the hard one at start.
    let pid = e.d.gateway.pid().context("gateway pid")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no descriptor limit in /proc/<pid>/limits")?
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    ensure!(
        files == [hard.to_string(), hard.to_string()],
        "the gateway's descriptor limits (soft, hard) are {files:?}, not {hard}"
    );
    let before = e.open_fds()?;
    // 1,500 connections that never send a byte (a TCP handshake and nothing else), from
    // four addresses (375 each: under the per-source cap, which has its own test).
    let mut silent = Vec::new();
    for i in 0..1500 {
        silent.push(connect_from(&format!("127.0.0.{}", 2 + i % 4), e.host()).await?);
    }
    let opened = Instant::now();
    pulls.wait_more(5, Duration::from_secs(30)).await?;
    let during = e.open_fds()?;
    ensure!(
        during >= before + 1000,
        "the gateway held {during} descriptors with 1,500 silent connections (before: {before})"
    );
    // Every one is closed by the gateway after the 10 s hello timeout (not Pingora's 60 s).
    let mut open = 0;
    for s in &mut silent {
        let left = Duration::from_secs(20).saturating_sub(opened.elapsed());
        if !closed_within(s, left) {
            open += 1;
        }
    }
    ensure!(
        open == 0,
        "{open} silent connections still open after {:?}",
        opened.elapsed()
    );
    let took = opened.elapsed();
    ensure!(
        took >= Duration::from_secs(9),
        "closed after {took:?}, before the hello timeout"
    );
    drop(silent);
    // Their descriptors are released.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.open_fds()? > before + 20 {
        ensure!(
            Instant::now() < deadline,
            "the gateway still holds {} descriptors (before: {before})",
            e.open_fds()?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

/// A sample of the gateway's `/metrics` (0 when the series is not there yet).
async fn metric(e: &Edge, series: &str) -> anyhow::Result<f64> {
    let text = metrics_text(&e.d.gateway.admin).await?;
    Ok(metric_sample(&text, series).unwrap_or(0.0))
}

/// Polls `series` until it is `want`, for up to 10 s.
async fn wait_metric(e: &Edge, series: &str, want: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(e, series).await?;
        if got == want {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{series} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection from `source` that has begun a TLS handshake (one byte of a hello): past the
/// hello timeout, held by the gateway until the handshake times out (60 s).
async fn half_hello_from(source: &str, host: &str) -> anyhow::Result<TcpStream> {
    let mut s = connect_from(source, host).await?;
    // A refused connection may be reset before the byte goes: that is for the caller to see.
    let _ = s.write_all(&[0x16]);
    Ok(s)
}

/// How many of `conns` the gateway has closed.
fn count_closed(conns: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for s in conns {
        if closed_within(s, Duration::from_millis(5)) {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_gets_at_most_its_cap_of_connections_and_slots_come_back() -> anyhow::Result<()>
{
    const CAP: usize = 40;
    let refused = r#"gateway_connections_refused_total{reason="per_source_cap"}"#;
    let e = Edge::start_with(&format!("[limits]\nconnections_per_source = {CAP}\n")).await?;
    let pulls = e.pulls();
    pulls.wait_more(1, Duration::from_secs(30)).await?;
    // 100 connections from one address: 40 are held, 60 closed at once.
    let opened = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(half_hello_from("127.0.0.7", e.host()).await?);
    }
    wait_metric(&e, refused, 60.0).await?;
    let closed = count_closed(&mut conns);
    ensure!(
        closed == 60,
        "{closed} of 100 connections closed (cap {CAP})"
    );
    // Others are not affected: the legitimate client (127.0.0.1) and another address.
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    let mut other = vec![half_hello_from("127.0.0.8", e.host()).await?];
    ensure!(count_closed(&mut other) == 0, "another address was refused");
    pulls.finish().await?;
    // With the legitimate client gone, the gauge holds the 40 and the other address's one.
    wait_metric(&e, "gateway_connections_open", (CAP + 1) as f64).await?;
    // Closing ten gives ten slots back: of eleven new ones, one is refused.
    conns.retain_mut(|s| !closed_within(s, Duration::from_millis(1)));
    ensure!(conns.len() == CAP, "{} held", conns.len());
    conns.truncate(CAP - 10);
    wait_metric(&e, "gateway_connections_open", (CAP - 10 + 1) as f64).await?;
    for _ in 0..11 {
        conns.push(half_hello_from("127.0.0.7", e.host()).await?);
    }
    wait_metric(&e, refused, 61.0).await?;
    let closed = count_closed(&mut conns);
    ensure!(closed == 1, "{closed} of the 41 connections closed, not 1");
    // All of it within the 60 s TLS handshake timeout that ends half hellos.
    ensure!(
        opened.elapsed() < Duration::from_secs(50),
        "took {:?}",
        opened.elapsed()
    );
    drop((conns, other));
    wait_metric(&e, "gateway_connections_open", 0.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_headers_and_bodies_do_not_starve_pulls_and_are_closed_when_idle()
-> anyhow::Result<()> {
    let e = Arc::new(Edge::start().await?);
    let pulls = e.pulls();
    pulls.wait_more(1, Duration::from_secs(30)).await?;
    let token = e
        .bob()
        .token(&["repository:team-a/app:pull,push".to_string()])
        .await?;
    // 150 connections trickle a request's headers, 50 an upload's body, a byte every 200 ms.
    let trickle = Arc::new(AtomicBool::new(true));
    let mut attackers = Vec::new();
    for i in 0..200 {
        let (e, trickle, token) = (e.clone(), trickle.clone(), token.clone());
        attackers.push(std::thread::spawn(move || -> anyhow::Result<SslStream<TcpStream>> {
            let mut s = e.tls()?;
            let head = if i < 150 {
                "GET /v2/team-a/app/manifests/v1 HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".to_string()
            } else {
                format!(
                    "POST /v2/team-a/app/blobs/uploads/?digest={} HTTP/1.1\r\nHost: localhost\r\n\
                     Authorization: Bearer {token}\r\nContent-Length: 1000000\r\n\
                     Content-Type: application/octet-stream\r\n\r\n",
                    sha256(&[0u8; 1_000_000])
                )
            };
            s.write_all(head.as_bytes())?;
            while trickle.load(Ordering::Relaxed) {
                s.write_all(b"a")?;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(s)
        }));
    }
    // Pulls go on while all 200 trickle.
    pulls.wait_more(10, Duration::from_secs(60)).await?;
    trickle.store(false, Ordering::Relaxed);
    let mut conns = Vec::new();
    for a in attackers {
        conns.push(
            a.join()
                .map_err(|_| anyhow::anyhow!("attacker panicked"))??,
        );
    }
    // Gone quiet, each is closed by the gateway's read timeout (60 s), never answered 200.
    let quiet = Instant::now();
    let mut still_open = 0;
    for s in &mut conns {
        let left = Duration::from_secs(90).saturating_sub(quiet.elapsed());
        s.get_ref()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                still_open += 1
            }
            Err(_) => {}
        }
        let answer = String::from_utf8_lossy(&out);
        ensure!(
            !answer.starts_with("HTTP/1.1 2"),
            "a slow request was served: {answer}"
        );
    }
    ensure!(
        still_open == 0,
        "{still_open} idle slowloris connections still open after {:?}",
        quiet.elapsed()
    );
    pulls.wait_more(2, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_trickled_past_its_total_deadline_is_cut_off() -> anyhow::Result<()> {
    let e = Arc::new(Edge::start_with("[tls]\nhead_timeout_seconds = 2\n").await?);
    // A head that never ends, a byte every 200 ms: each read is in time, the whole is not.
    let slow = {
        let e = e.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
            let mut s = e.tls()?;
            let started = Instant::now();
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")?;
            s.get_ref()
                .set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut buf = [0u8; 512];
            loop {
                ensure!(
                    started.elapsed() < Duration::from_secs(20),
                    "still open after 20 s"
                );
                if s.write_all(b"a").is_err() {
                    return Ok(started.elapsed());
                }
                match s.read(&mut buf) {
                    Ok(0) => return Ok(started.elapsed()),
                    Ok(n) => anyhow::bail!("answered: {}", String::from_utf8_lossy(&buf[..n])),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return Ok(started.elapsed()),
                }
            }
        })
    };
    // A connection whose head came in time stays open past the deadline (keep-alive), over
    // HTTP/1.1 and HTTP/2.
    let mut kept = e.tls()?;
    kept.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    ensure!(read_answer(&mut kept)?.starts_with("HTTP/1.1 401"));
    let h2 = h2_client(&e).await?;
    ensure!(h2_status(&h2, "/v2/").await? == 401);
    let closed_after = slow.await??;
    ensure!(
        closed_after >= Duration::from_millis(1500),
        "closed before its deadline: {closed_after:?}"
    );
    kept.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    ensure!(
        read_answer(&mut kept)?.starts_with("HTTP/1.1 401"),
        "the connection with a head in time was closed"
    );
    ensure!(
        h2_status(&h2, "/v2/").await? == 401,
        "the HTTP/2 connection with a head in time was closed"
    );
    ensure!(
        metric(
            &e,
            "gateway_connections_refused_total{reason=\"head_timeout\"}"
        )
        .await?
            >= 1.0
    );
    // Legitimate clients are served as before.
    pull_once(&e.bob()).await?;
    Ok(())
}

/// The status line of a raw answer, or `closed` when the gateway closed without one.
fn status_of(answer: &str) -> &str {
    answer
        .lines()
        .next()
        .filter(|l| !l.is_empty())
        .unwrap_or("closed")
}

/// A hostile request was refused: no success, and no server error (a client mistake is
/// never a 5xx).
fn ensure_refused(what: &str, answer: &str) -> anyhow::Result<()> {
    let status = status_of(answer);
    ensure!(
        !status.starts_with("HTTP/1.1 2") && !status.starts_with("HTTP/1.1 5"),
        "{what}: {answer}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_headers_urls_and_header_counts_are_refused() -> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    let long_url = format!(
        "GET /v2/team-a/{}/manifests/v1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "a".repeat(70_000)
    );
    let big_header = format!(
        "GET /v2/ HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "b".repeat(2 << 20)
    );
    let mut many = String::from("GET /v2/ HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..1000 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    for (what, raw) in [
        ("a 70 KB URL", &long_url),
        ("a 2 MiB header", &big_header),
        ("1,000 headers", &many),
    ] {
        let answer = e.raw(raw.as_bytes())?;
        println!("{what}: {}", status_of(&answer));
        ensure_refused(what, &answer)?;
    }
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_smuggling_attempts_are_refused_whole() -> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    // Each carries a second request in its body; only ever one answer, and never a 2xx.
    let smuggled = "GET /v2/_catalog HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let cases = [
        (
            "Content-Length with Transfer-Encoding",
            format!(
                "POST /v2/team-a/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /v2/team-a/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
                 Content-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "an obfuscated Transfer-Encoding",
            format!(
                "POST /v2/team-a/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\n\
                 Transfer-Encoding: xchunked\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "a header folded over two lines",
            format!(
                "POST /v2/team-a/app/blobs/uploads/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
                 X-Folded: a\r\n Transfer-Encoding: chunked\r\n\r\n{smuggled}"
            ),
        ),
    ];
    for (what, raw) in cases {
        let answer = e.raw(raw.as_bytes())?;
        let answers = answer.matches("HTTP/1.1 ").count();
        println!("{what}: {} ({answers} answers)", status_of(&answer));
        ensure!(answers <= 1, "{what}: {answers} answers: {answer}");
        ensure_refused(what, &answer)?;
    }
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_tricks_never_reach_another_repository() -> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    let tricks = [
        "/v2/team-a/app/../../team-b/app/manifests/secret",
        "/v2/team-a/%2e%2e/team-b/app/manifests/secret",
        "/v2/team-a/app/%2E%2E/%2E%2E/team-b/app/manifests/secret",
        "/v2/team-a/..%2fteam-b/app/manifests/secret",
        "/v2/team-a%2F..%2Fteam-b/app/manifests/secret",
        "/v2//team-b/app/manifests/secret",
        "/v2/team-a//../team-b/app/manifests/secret",
        "/v2/team-b%2Fapp/manifests/secret",
        "/v2/team-a/app/manifests/..%2F..%2Fteam-b%2Fapp%2Fmanifests%2Fsecret",
        "/v2/./team-b/app/manifests/secret",
        "/v2/team-a/app%00/../../team-b/app/manifests/secret",
    ];
    // bob may pull team-a/app, not team-b/app: no spelling gets him team-b's manifest. His
    // token names both; only team-a/app is granted.
    let token = e
        .bob()
        .token(&[
            "repository:team-a/app:pull".to_string(),
            "repository:team-b/app:pull".to_string(),
        ])
        .await?;
    let http = portcullis_tests::client::https(&e.d.gateway.ca_pem, false);
    let secret = user_client(&e.d.gateway, "alice", "alice-pw")
        .get("/v2/team-b/app/manifests/secret")
        .await?
        .bytes()
        .await?;
    let r = http
        .get(format!(
            "{}/v2/team-b/app/manifests/secret",
            e.d.gateway.base
        ))
        .bearer_auth(&token)
        .send()
        .await?;
    ensure!(r.status() == 401, "team-b straight: {}", r.status());
    for path in tricks {
        // reqwest keeps percent-escapes and `..` as given (no normalisation of the path).
        let r = http
            .get(format!("{}{path}", e.d.gateway.base))
            .bearer_auth(&token)
            .send()
            .await?;
        let status = r.status();
        let body = r.bytes().await?;
        println!("{path}: {status} {}", String::from_utf8_lossy(&body));
        ensure!(
            status != 200 && body != secret,
            "{path}: {status} served team-b's manifest"
        );
        ensure!(status.is_client_error(), "{path}: {status}");
    }
    // A token for a path-trick name grants nothing.
    for name in [
        "team-a/../team-b/app",
        "team-a/%2e%2e/team-b/app",
        "team-a//app",
    ] {
        let claims = portcullis_tests::client::jwt_claims(
            &e.bob().token(&[format!("repository:{name}:pull")]).await?,
        )
        .context("claims")?;
        println!("token for {name}: access {}", claims["access"]);
        ensure!(
            claims["access"].as_array().is_none_or(|a| a.is_empty()),
            "{name}: {}",
            claims["access"]
        );
    }
    // Raw, as sent (reqwest resolves `..` and `%2e%2e` itself before sending): no path with a
    // dot segment, an empty one, an encoded slash or a NUL names a repository.
    for path in tricks {
        let answer = e.raw(
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let status = status_of(&answer);
        println!("raw {path}: {status}");
        // 400 for a name that is none, 401 for one not granted; the one path whose name is
        // bob's own and whose reference cannot name a manifest is 404, as distribution
        // answers a GET by such a reference.
        if path.starts_with("/v2/team-a/app/manifests/") {
            ensure!(
                status.starts_with("HTTP/1.1 404") && answer.contains("MANIFEST_UNKNOWN"),
                "raw {path}: {answer}"
            );
            continue;
        }
        ensure!(
            status.starts_with("HTTP/1.1 400") || status.starts_with("HTTP/1.1 401"),
            "raw {path}: {answer}"
        );
        ensure!(
            answer.contains("NAME_INVALID") || answer.contains("DENIED"),
            "raw {path}: {answer}"
        );
    }
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

/// A TLS connection negotiating HTTP/2, as an `h2` client.
async fn h2_client(e: &Edge) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    Ok(h2_connection(e).await?.0)
}

/// [`h2_client`], with the connection's task: it ends when the connection closes.
async fn h2_connection(
    e: &Edge,
) -> anyhow::Result<(
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
)> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.cert_store_mut()
        .add_cert(openssl::x509::X509::from_pem(&e.d.gateway.ca_pem)?)?;
    b.set_alpn_protos(b"\x02h2")?;
    let ssl = b.build().configure()?.into_ssl("localhost")?;
    let tcp = tokio::net::TcpStream::connect(e.host()).await?;
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp)?;
    std::pin::Pin::new(&mut tls).connect().await?;
    ensure!(
        tls.ssl().selected_alpn_protocol() == Some(b"h2"),
        "no h2 by ALPN"
    );
    let (send, conn) = h2::client::handshake(tls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

/// The status of a GET on an `h2` connection.
async fn h2_status(
    send: &h2::client::SendRequest<bytes::Bytes>,
    path: &str,
) -> anyhow::Result<u16> {
    let (answer, _) = send
        .clone()
        .ready()
        .await?
        .send_request(h2_get(path), true)?;
    Ok(answer.await?.status().as_u16())
}

const IDLE: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keep_alive_and_http2_connections_are_closed_between_requests() -> anyhow::Result<()> {
    let e = Edge::start_with(&format!("[tls]\nidle_timeout_seconds = {IDLE}\n")).await?;
    let pulls = e.pulls();
    pulls.wait_more(1, Duration::from_secs(30)).await?;
    // HTTP/1.1 asking to be kept for a day: answered, kept for a next request, then closed
    // once idle for the gateway's time, not the client's.
    let mut h1 = e.tls()?;
    let ask = b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\
                Keep-Alive: timeout=86400\r\n\r\n";
    h1.write_all(ask)?;
    ensure!(read_answer(&mut h1)?.contains(" 401 "), "first request");
    std::thread::sleep(Duration::from_secs(1));
    h1.write_all(ask)?;
    ensure!(
        read_answer(&mut h1)?.contains(" 401 "),
        "a second request within the idle time"
    );
    // HTTP/2: the same.
    let (h2, h2_task) = h2_connection(&e).await?;
    ensure!(h2_status(&h2, "/v2/").await? == 401, "h2 request");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        h2_status(&h2, "/v2/").await? == 401,
        "a second h2 request within the idle time"
    );
    let idle = Instant::now();
    let h1_closed = tokio::task::spawn_blocking(move || {
        h1.get_ref()
            .set_read_timeout(Some(Duration::from_secs(IDLE + 20)))?;
        let mut rest = Vec::new();
        match h1.read_to_end(&mut rest) {
            Ok(_) => Ok(rest.is_empty()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::bail!(
                    "an idle HTTP/1.1 connection still open after {:?}",
                    idle.elapsed()
                )
            }
            // Closed without TLS close_notify: closed all the same.
            Err(_) => Ok(true),
        }
    });
    tokio::time::timeout(Duration::from_secs(IDLE + 20), h2_task)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "an idle HTTP/2 connection still open after {:?}",
                idle.elapsed()
            )
        })??;
    ensure!(
        h1_closed.await??,
        "the idle HTTP/1.1 connection was sent more"
    );
    ensure!(
        idle.elapsed() >= Duration::from_secs(IDLE - 1),
        "closed after {:?}, before the idle time",
        idle.elapsed()
    );
    pulls.wait_more(2, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

fn h2_get(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("GET")
        .uri(format!("https://localhost{path}"))
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_rapid_reset_stream_floods_and_huge_headers_leave_the_gateway_serving()
-> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    pulls.wait_more(1, Duration::from_secs(30)).await?;
    // Rapid reset (CVE-2023-44487): open streams and cancel them at once, 20,000 times.
    let mut resets = 0u64;
    let mut cut_off = None;
    let mut send = h2_client(&e).await?;
    for _ in 0..20_000 {
        match send.clone().ready().await {
            Ok(mut s) => match s.send_request(h2_get("/v2/team-a/app/manifests/v1"), true) {
                Ok((response, _)) => {
                    drop(response); // RST_STREAM(CANCEL)
                    resets += 1;
                }
                Err(err) => {
                    cut_off = Some(err.to_string());
                    break;
                }
            },
            Err(err) => {
                cut_off = Some(err.to_string());
                break;
            }
        }
        send = send.clone();
    }
    println!("rapid reset: {resets} streams reset; connection: {cut_off:?}");
    ensure!(
        cut_off.is_some() && resets < 20_000,
        "20,000 reset streams and the connection still open"
    );
    pulls.wait_more(3, Duration::from_secs(30)).await?;

    // A stream flood: 500 streams at once on each of 4 connections, as many concurrent as
    // the gateway allows (100), the rest waiting for a slot. One request first, so that the
    // client holds the gateway's SETTINGS (sent before its first answer) and keeps to its
    // limit: streams opened before it knows the limit are refused, which is right but would
    // make the count depend on when the SETTINGS frame happened to arrive.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let send = h2_client(&e).await?;
        ensure!(h2_status(&send, "/v2/").await? == 401, "before the flood");
        for _ in 0..500 {
            let send = send.clone();
            flood.spawn(async move {
                let mut s = send.ready().await.ok()?;
                let (resp, _) = s.send_request(h2_get("/v2/"), true).ok()?;
                Some(resp.await.ok()?.status().as_u16())
            });
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(r) = flood.join_next().await {
        *statuses.entry(r?).or_insert(0) += 1;
    }
    println!("stream flood: {statuses:?}");
    let answered = statuses.get(&Some(401)).copied().unwrap_or(0);
    ensure!(
        answered == 2000,
        "only {answered} of 2,000 flood streams answered: {statuses:?}"
    );
    ensure!(
        !statuses.keys().any(|s| s.is_some_and(|s| s >= 500)),
        "5xx in the flood: {statuses:?}"
    );
    pulls.wait_more(3, Duration::from_secs(30)).await?;

    // A header list far past the limit: the stream (or connection) is refused, not served.
    let mut send = h2_client(&e).await?.ready().await?;
    let req = http::Request::builder()
        .method("GET")
        .uri("https://localhost/v2/")
        .header("x-huge", "h".repeat(1 << 20))
        .body(())?;
    let outcome = match send.send_request(req, true) {
        Ok((resp, _)) => match resp.await {
            Ok(r) => format!("status {}", r.status()),
            Err(err) => format!("refused: {err}"),
        },
        Err(err) => format!("refused: {err}"),
    };
    println!("1 MiB header over h2: {outcome}");
    ensure!(
        outcome.starts_with("refused") || outcome.starts_with("status 4"),
        "1 MiB header over h2: {outcome}"
    );
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

/// `sslscan` (Debian) against the gateway: nothing below TLS 1.2, only AEAD ciphers with
/// forward secrecy of at least 128 bits, no renegotiation by clients, no Heartbleed; the
/// chain verifies against the deployment's CA; every answer carries HSTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_offers_only_1_2_and_up_with_aead_ciphers_and_a_chain_that_verifies()
-> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    let out = std::process::Command::new("sslscan")
        .args(["--no-colour", e.host()])
        .output()
        .context("running sslscan (tests/services/install.sh installs it)")?;
    let scan = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "sslscan: {scan}");
    println!("{scan}");
    for (protocol, state) in [
        ("SSLv2", "disabled"),
        ("SSLv3", "disabled"),
        ("TLSv1.0", "disabled"),
        ("TLSv1.1", "disabled"),
        ("TLSv1.2", "enabled"),
        ("TLSv1.3", "enabled"),
    ] {
        ensure!(
            scan.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(protocol) && w.next() == Some(state)
            }),
            "{protocol} is not {state}:\n{scan}"
        );
    }
    let ciphers: Vec<&str> = scan
        .lines()
        .filter(|l| l.starts_with("Accepted") || l.starts_with("Preferred"))
        .collect();
    ensure!(ciphers.len() >= 3, "no ciphers listed:\n{scan}");
    for c in &ciphers {
        let w: Vec<&str> = c.split_whitespace().collect();
        let (bits, name) = (w[2].parse::<u32>()?, w[4]);
        let aead = ["GCM", "CHACHA20", "CCM"].iter().any(|a| name.contains(a));
        let forward_secret = name.starts_with("TLS_") || name.starts_with("ECDHE-");
        ensure!(
            bits >= 128 && aead && forward_secret,
            "a weak cipher is accepted: {c}"
        );
    }
    ensure!(
        scan.contains("Session renegotiation not supported")
            || scan.contains("Secure session renegotiation supported"),
        "insecure renegotiation:\n{scan}"
    );
    let heartbleed: Vec<&str> = scan.lines().filter(|l| l.contains("heartbleed")).collect();
    ensure!(
        !heartbleed.is_empty() && heartbleed.iter().all(|l| l.contains("not vulnerable")),
        "heartbleed:\n{scan}"
    );
    // The chain: verified by openssl against the deployment's CA, for the name clients use.
    let ca = tempfile::NamedTempFile::new()?;
    std::fs::write(ca.path(), &e.d.gateway.ca_pem)?;
    let mut s_client = std::process::Command::new("openssl")
        .args(["s_client", "-connect", e.host(), "-servername", "localhost"])
        .args([
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(ca.path())
        .stdin(std::process::Stdio::null())
        .output()?;
    let verify = String::from_utf8_lossy(&s_client.stdout).into_owned();
    ensure!(
        s_client.status.success() && verify.contains("Verify return code: 0 (ok)"),
        "chain: {verify}{}",
        String::from_utf8_lossy(&s_client.stderr)
    );
    // And TLS 1.1 is refused outright.
    s_client = std::process::Command::new("openssl")
        .args(["s_client", "-connect", e.host(), "-tls1_1"])
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(!s_client.status.success(), "a TLS 1.1 handshake succeeded");
    // HSTS on the gateway's own answers and on proxied ones.
    let http = portcullis_tests::client::https(&e.d.gateway.ca_pem, false);
    let r = http.get(format!("{}/v2/", e.d.gateway.base)).send().await?;
    ensure!(
        r.headers()
            .get("strict-transport-security")
            .is_some_and(|v| v == "max-age=31536000"),
        "no HSTS on /v2/: {:?}",
        r.headers()
    );
    let r = e.bob().get("/v2/team-a/app/manifests/v1").await?;
    ensure!(
        r.status() == 200 && r.headers().contains_key("strict-transport-security"),
        "no HSTS on a pull: {:?}",
        r.headers()
    );
    pulls.wait_more(2, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}

/// Reads one HTTP/1.1 answer (head and `Content-Length` body) from `s`: its status line.
fn read_answer(s: &mut SslStream<TcpStream>) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(s.read(&mut byte)? == 1, "closed in the middle of an answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok(head.lines().next().unwrap_or_default().to_string())
}

/// The serial number of the certificate the gateway presented on `s`.
fn serial_of(s: &SslStream<TcpStream>) -> anyhow::Result<String> {
    let cert = s.ssl().peer_certificate().context("no certificate")?;
    Ok(cert.serial_number().to_bn()?.to_hex_str()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_certificate_is_served_after_sighup_without_dropping_connections()
-> anyhow::Result<()> {
    let e = Edge::start().await?;
    let pulls = e.pulls();
    let tls_dir = e.d.dir.path().join("tls");
    let ask = b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut open = e.tls()?;
    open.write_all(ask)?;
    ensure!(
        read_answer(&mut open)? == "HTTP/1.1 401 Unauthorized",
        "first answer"
    );
    let old = serial_of(&open)?;
    let hup = || -> anyhow::Result<()> {
        let pid = e.d.gateway.pid().context("pid")?;
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?
            .success();
        ensure!(ok, "kill -HUP");
        Ok(())
    };

    // Renewed (same CA, new key and serial), then SIGHUP: new connections get it.
    gateway::edge::tls::issue_server_certificate(&tls_dir)?;
    hup()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let s = serial_of(&e.tls()?)?;
        if s != old {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "still the old certificate after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The connection opened before goes on.
    open.write_all(ask)?;
    ensure!(
        read_answer(&mut open)? == "HTTP/1.1 401 Unauthorized",
        "the open connection after the reload"
    );

    // A broken pair (a certificate whose key is elsewhere) is refused: the renewed one stays.
    let renewed = std::fs::read(tls_dir.join("server.crt"))?;
    let other = tempfile::tempdir()?;
    std::fs::copy(tls_dir.join("ca.crt"), other.path().join("ca.crt"))?;
    std::fs::copy(tls_dir.join("ca.key"), other.path().join("ca.key"))?;
    gateway::edge::tls::issue_server_certificate(other.path())?;
    std::fs::copy(other.path().join("server.crt"), tls_dir.join("server.crt"))?;
    hup()?;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        ensure!(
            serial_of(&e.tls()?)? == new,
            "a certificate without its key was taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(tls_dir.join("server.crt"), renewed)?;
    pulls.wait_more(3, Duration::from_secs(30)).await?;
    pulls.finish().await?;
    Ok(())
}
