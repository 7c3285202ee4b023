//! Pull-through caches (`[[proxy_cache]]`): real upstreams (distribution 2.8.2 with htpasswd,
//! a second Portcullis with token auth), real clients (skopeo, podman, docker through a
//! mirror listener), and the faults a cache must survive, produced by a relay in front of the
//! real upstream (`faulty`): a cut transfer, a slow link, 429s, an upstream gone.

use anyhow::{Context, ensure};
use oci::Digest;
use portcullis_tests::client::{Client, TokenAuth, describe, expect_error, https, sha256};
use portcullis_tests::deployment::{self, SERVICE};
use portcullis_tests::faulty::{Faulty, Mode};
use portcullis_tests::server::{
    GatewayServer, StorageServer, metric_sample, metrics_text, workspace_root,
};
use portcullis_tests::tools::{
    Containers, Distribution, DockerTrust, Dockerd, cert_dir, dir_files, free_port,
};
use reqwest::Method;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The cache's account at the upstream.
const UPSTREAM_USER: (&str, &str) = ("mirror", "upstream-password-27");
const ALICE: (&str, &str) = ("alice", "alice-cache-password");
const ADMIN_PASSWORD: &str = "cache-admin-password";

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The shipped policy plus anonymous pulls of the cache (docker's mirror pulls anonymously).
fn write_policy(path: &Path) -> anyhow::Result<()> {
    let shipped = std::fs::read_to_string(workspace_root().join("conf/policy.toml"))?;
    std::fs::write(
        path,
        format!("{shipped}\n[[anonymous]]\nrepositories = [\"hub/**\"]\nrole = \"reader\"\n"),
    )?;
    Ok(())
}

/// A `[[proxy_cache]]` table for `url` signing in as `user`, its password in `dir`.
fn cache_table(dir: &Path, url: &str, user: (&str, &str), more: &str) -> anyhow::Result<String> {
    let pw = dir.join("upstream-password");
    gateway::edge::tls::write_private(&pw, user.1.as_bytes())?;
    Ok(format!(
        "[[proxy_cache]]\nprefix = \"hub\"\nurl = \"{url}\"\nusername = \"{}\"\npassword_file = \"{}\"\n{more}\n",
        user.0,
        pw.display()
    ))
}

/// A client of the distribution upstream, with the cache's Basic credentials.
fn upstream_client(d: &Distribution) -> Client {
    d.basic_client(UPSTREAM_USER)
}

/// A gateway in production shape with one storage node and a cache of `url`.
struct Cached {
    dir: tempfile::TempDir,
    storage: StorageServer,
    gateway: GatewayServer,
}

impl Cached {
    fn start(url: &str, user: (&str, &str), more: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let storage_root = dir.path().join("storage");
        std::fs::create_dir_all(&storage_root)?;
        let storage = deployment::storage_node(&storage_root)?;
        Self::start_on(dir, storage, url, user, more)
    }

    /// The same, its storage node started with the config file `storage` (`[gc]`…).
    fn start_with_storage(
        url: &str,
        user: (&str, &str),
        more: &str,
        storage: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let storage_root = dir.path().join("storage");
        std::fs::create_dir_all(&storage_root)?;
        let conf = dir.path().join("storage.toml");
        std::fs::write(&conf, storage)?;
        let storage = deployment::storage_node_with(&storage_root, Some(&conf))?;
        Self::start_on(dir, storage, url, user, more)
    }

    fn start_on(
        dir: tempfile::TempDir,
        storage: StorageServer,
        url: &str,
        user: (&str, &str),
        more: &str,
    ) -> anyhow::Result<Self> {
        let gateway = cache_gateway(&dir.path().join("gw"), &storage, url, user, more)?;
        Ok(Cached {
            dir,
            storage,
            gateway,
        })
    }

    /// The gateway's directory: its `gateway.toml` (the cache table last) and the upstream
    /// password's file.
    fn gw(&self) -> std::path::PathBuf {
        self.dir.path().join("gw")
    }

    fn client(&self) -> Client {
        alice(&self.gateway)
    }

    /// Whether storage itself has the blob in `repo` (asked directly, not through the cache).
    async fn stored(&self, repo: &str, digest: &Digest) -> anyhow::Result<bool> {
        let r = deployment::storage_client(&self.storage)
            .req(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
            .send()
            .await?;
        Ok(r.status() == 200)
    }
}

/// A gateway in production shape in `gw` (made if missing) with a cache of `url` in front of
/// `storage`.
fn cache_gateway(
    gw: &Path,
    storage: &StorageServer,
    url: &str,
    user: (&str, &str),
    more: &str,
) -> anyhow::Result<GatewayServer> {
    std::fs::create_dir_all(gw)?;
    write_policy(&gw.join("policy.toml"))?;
    let table = cache_table(gw, url, user, more)?;
    deployment::start_gateway_with(gw, &[storage], &[ALICE], 4, &table, &[])
}

/// Alice's client of the gateway `g`.
fn alice(g: &GatewayServer) -> Client {
    let mut c = Client::with_ca(&g.base, &g.ca_pem);
    c.auth = Some(TokenAuth::new(
        &format!("{}/token", g.base),
        SERVICE,
        Some(ALICE),
    ));
    c
}

/// Pushes an image of `layers` (and a config) `repo:tag` to the upstream; its manifest digest
/// and blobs (the config first, then the layers).
async fn push_upstream(
    c: &Client,
    repo: &str,
    tag: &str,
    layers: &[&[u8]],
) -> anyhow::Result<(Digest, Vec<(Digest, usize)>)> {
    let (manifest, digest) = c.push_image(repo, tag, layers).await?;
    let m: Value = serde_json::from_slice(&manifest)?;
    let mut blobs = vec![(
        Digest::parse(m["config"]["digest"].as_str().context("config")?)?,
        m["config"]["size"].as_u64().context("size")? as usize,
    )];
    for l in m["layers"].as_array().context("layers")? {
        blobs.push((
            Digest::parse(l["digest"].as_str().context("digest")?)?,
            l["size"].as_u64().context("size")? as usize,
        ));
    }
    Ok((digest, blobs))
}

/// Pulls `repo:tag` blob by blob, checking every digest; the manifest's digest.
async fn pull_verified(c: &Client, repo: &str, tag: &str) -> anyhow::Result<Digest> {
    let r = c
        .req(Method::GET, &format!("/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(r.status() == 200, "manifest: {}", describe(r).await);
    let body = r.bytes().await?;
    let m: Value = serde_json::from_slice(&body)?;
    let mut digests = vec![m["config"]["digest"].as_str().context("config")?.to_owned()];
    for l in m["layers"].as_array().context("layers")? {
        digests.push(l["digest"].as_str().context("layer")?.to_owned());
    }
    for d in digests {
        let r = c.get(&format!("/v2/{repo}/blobs/{d}")).await?;
        ensure!(r.status() == 200, "blob {d}: {}", describe(r).await);
        let got = r.bytes().await?;
        ensure!(sha256(&got).to_string() == d, "blob {d} arrived corrupted");
    }
    Ok(sha256(&body))
}

/// Lines of distribution's access log for `GET <path>` answered 200.
fn upstream_gets(log: &Path, path: &str) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(log)?;
    let needle = format!("\"GET {path} HTTP/1.1\" 200");
    Ok(text.lines().filter(|l| l.contains(&needle)).count())
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The host's platform as image indexes name it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The platform that is not the host's.
fn other_arch() -> &'static str {
    if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// Builds a two-platform image list `multi-list` in `ctr` (busybox, labelled with the host's
/// architecture and another).
fn build_two_platform_list(ctr: &Containers) -> anyhow::Result<()> {
    for arch in [host_arch(), other_arch()] {
        let c = ctr.run("buildah", &["from", "scratch"])?.trim().to_string();
        ctr.run("buildah", &["copy", &c, "/bin/busybox", "/bin/busybox"])?;
        ctr.run(
            "buildah",
            &[
                "config",
                "--arch",
                arch,
                "--os",
                "linux",
                "--cmd",
                "/bin/busybox",
                &c,
            ],
        )?;
        ctr.run("buildah", &["commit", "-q", &c, &format!("multi-{arch}")])?;
        ctr.run("buildah", &["rm", &c])?;
    }
    ctr.run("buildah", &["manifest", "create", "multi-list"])?;
    for arch in [host_arch(), other_arch()] {
        ctr.run(
            "buildah",
            &[
                "manifest",
                "add",
                "multi-list",
                &format!("containers-storage:localhost/multi-{arch}"),
            ],
        )?;
    }
    Ok(())
}

/// `buildah manifest push --all multi-list <dest>` with `tls` (e.g. `--cert-dir d`).
fn push_list(ctr: &Containers, tls: &str, creds: &str, dest: &str) -> anyhow::Result<()> {
    ctr.run(
        "buildah",
        &[
            "manifest",
            "push",
            "-q",
            "--all",
            tls,
            "--creds",
            creds,
            "multi-list",
            dest,
        ],
    )?;
    Ok(())
}

/// `skopeo copy --all` of `src` into an OCI layout at `dir`, with `args` before the names;
/// the layout's blobs by name.
fn copy_all(
    ctr: &Containers,
    args: &[&str],
    src: &str,
    dir: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut a = vec!["copy", "-q", "--all"];
    a.extend_from_slice(args);
    let dest = format!("oci:{}", dir.display());
    a.extend_from_slice(&[src, &dest]);
    ctr.run("skopeo", &a)?;
    dir_files(&dir.join("blobs/sha256"))
}

/// The digest of the child manifest of `platform` in the index `repo:tag` of a registry.
async fn child_of(c: &Client, repo: &str, tag: &str, arch: &str) -> anyhow::Result<String> {
    let r = c
        .req(Method::GET, &format!("/v2/{repo}/manifests/{tag}"))
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", describe(r).await);
    let index: Value = r.json().await?;
    index["manifests"]
        .as_array()
        .context("not an index")?
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_owned)
        .context("no such platform")
}

/// The value of a gateway metric series (0 when it has none yet).
async fn metric(admin: &str, series: String) -> anyhow::Result<f64> {
    Ok(metric_sample(&metrics_text(admin).await?, &series).unwrap_or(0.0))
}

/// `gateway_cache_requests_total` of the `hub` cache with this result.
fn results(result: &str) -> String {
    format!("gateway_cache_requests_total{{prefix=\"hub\",result=\"{result}\"}}")
}

/// Polls until `f` holds (what a cache does after a client's last byte: storage's commit, an
/// upstream's access log line), for at most 20 s.
async fn eventually<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f().await? {
        ensure!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_podman_and_docker_pull_multi_platform_images_through_the_cache_as_the_upstream_has_them()
-> anyhow::Result<()> {
    let up_root = tempfile::tempdir()?;
    let log = up_root.path().join("access.log");
    let upstream = Distribution::start_with(
        &up_root.path().join("data"),
        Some(&[UPSTREAM_USER]),
        Some(&log),
    )?;
    let ctr = Containers::new()?;
    build_two_platform_list(&ctr)?;
    let creds = format!("{}:{}", UPSTREAM_USER.0, UPSTREAM_USER.1);
    // The same list in two repositories: docker and podman each pull one cold.
    for repo in ["multi", "multi-podman"] {
        push_list(
            &ctr,
            "--tls-verify=false",
            &creds,
            &format!("docker://{}/library/{repo}:1", upstream.addr),
        )?;
    }

    // `gateway dev --config`: the cache over the embedded default, with a mirror listener.
    let data = tempfile::tempdir()?;
    let mirror_port = free_port()?;
    write_policy(&data.path().join("policy.toml"))?;
    let config = data.path().join("dev.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\nstdout = true\n[policy]\nfile = \"{}\"\n{}",
            data.path().join("policy.toml").display(),
            cache_table(
                data.path(),
                &upstream.base,
                UPSTREAM_USER,
                &format!("mirror_listen = \"127.0.0.1:{mirror_port}\"")
            )?
        ),
    )?;
    let g = GatewayServer::start_dev_with(
        data.path(),
        Some(ADMIN_PASSWORD),
        &[std::ffi::OsStr::new("--config"), config.as_os_str()],
    )?;
    ensure!(
        g.banner.contains("pulls through"),
        "the banner names the cache:\n{}",
        g.banner
    );
    let certs = cert_dir(&ctr, &g.ca_pem)?;
    let h = &g.host;
    let admin = format!("admin:{ADMIN_PASSWORD}");
    let misses = || metric(&g.admin, results("miss"));

    // docker with the mirror listener as `registry-mirrors`, cold: names without the prefix,
    // anonymous (docker sends no credentials to a mirror).
    let mirror = format!("127.0.0.1:{mirror_port}");
    let _trust = DockerTrust::install(&mirror, &g.ca_pem)?;
    let dk = Dockerd::start_with(&["--registry-mirror", &format!("https://{mirror}")])?;
    dk.run(&["pull", "-q", "multi:1"])?;
    let arch = dk.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Architecture}}",
        "multi:1",
    ])?;
    ensure!(arch.trim() == host_arch(), "docker pulled {arch}");
    ensure!(
        misses().await? >= 3.0,
        "docker's pull came through the mirror (index, manifest, blobs fetched)"
    );

    // podman, cold: the host's platform only.
    let image = format!("{h}/hub/library/multi-podman:1");
    ctr.run(
        "podman",
        &[
            "pull",
            "-q",
            "--cert-dir",
            &certs,
            "--creds",
            &admin,
            &image,
        ],
    )?;
    let arch = ctr.run(
        "podman",
        &["image", "inspect", "--format", "{{.Architecture}}", &image],
    )?;
    ensure!(arch.trim() == host_arch(), "podman pulled {arch}");
    // Neither fetched the other platform from the upstream.
    let up = upstream_client(&upstream);
    for repo in ["multi", "multi-podman"] {
        let other = child_of(&up, &format!("library/{repo}"), "1", other_arch()).await?;
        let path = format!("/v2/library/{repo}/manifests/{other}");
        ensure!(upstream_gets(&log, &path)? == 0, "{path} was fetched");
    }

    // skopeo, every platform, through the cache and straight from the upstream: same bytes.
    let via = copy_all(
        &ctr,
        &["--src-cert-dir", &certs, "--src-creds", &admin],
        &format!("docker://{h}/hub/library/multi:1"),
        &ctr.dir.path().join("via-cache"),
    )?;
    let direct = copy_all(
        &ctr,
        &["--src-tls-verify=false", "--src-creds", &creds],
        &format!("docker://{}/library/multi:1", upstream.addr),
        &ctr.dir.path().join("direct"),
    )?;
    ensure!(
        via.len() >= 6,
        "an index, two manifests, configs and layers: {}",
        via.len()
    );
    ensure!(
        via == direct,
        "the cache's copy differs from the upstream's"
    );

    // Pushes into the cache are refused.
    let pushed = ctr.run(
        "skopeo",
        &[
            "copy",
            "-q",
            "--dest-cert-dir",
            &certs,
            "--dest-creds",
            &admin,
            &format!("oci:{}", ctr.dir.path().join("via-cache").display()),
            &format!("docker://{h}/hub/library/mine:1"),
        ],
    );
    let why = format!(
        "{:#}",
        pushed.err().context("a push into the cache went through")?
    );
    ensure!(why.contains("denied") || why.contains("403"), "{why}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_portcullis_upstream_with_token_auth_is_pulled_through_and_served_when_it_is_gone()
-> anyhow::Result<()> {
    // The upstream: a Portcullis deployment (token auth); the cache signs in there as its
    // `alice`, with a password of its own.
    let up_alice = ("alice", "upstream-alice-password");
    let up = tempfile::tempdir()?;
    let up_storage_root = up.path().join("storage");
    std::fs::create_dir_all(&up_storage_root)?;
    let up_storage = deployment::storage_node(&up_storage_root)?;
    let up_gw = up.path().join("gw");
    std::fs::create_dir_all(&up_gw)?;
    let upstream = deployment::start_gateway(&up_gw, &[&up_storage], &[up_alice], 4)?;
    let mut pusher = Client::with_ca(&upstream.base, &upstream.ca_pem);
    pusher.auth = Some(TokenAuth::new(
        &format!("{}/token", upstream.base),
        SERVICE,
        Some(up_alice),
    ));
    let (digest, blobs) = push_upstream(
        &pusher,
        "vendor/tool",
        "2.0",
        &[&random(300_000, 1), &random(70_000, 2)],
    )
    .await?;
    let ctr = Containers::new()?;
    build_two_platform_list(&ctr)?;
    let up_certs = ctr.dir.path().join("up-certs");
    std::fs::create_dir_all(&up_certs)?;
    std::fs::write(up_certs.join("ca.crt"), &upstream.ca_pem)?;
    let up_creds = format!("{}:{}", up_alice.0, up_alice.1);
    push_list(
        &ctr,
        &format!("--cert-dir={}", up_certs.display()),
        &up_creds,
        &format!("docker://{}/vendor/multi:1", upstream.host),
    )?;

    let ca = tempfile::NamedTempFile::new()?;
    std::fs::write(ca.path(), &upstream.ca_pem)?;
    let cached = Cached::start(
        &upstream.base,
        up_alice,
        &format!("ca_file = \"{}\"\ntag_ttl_seconds = 1", ca.path().display()),
    )?;
    let c = cached.client();
    ensure!(pull_verified(&c, "hub/vendor/tool", "2.0").await? == digest);
    for (d, _) in &blobs {
        eventually("the blob is stored", || async {
            cached.stored("hub/vendor/tool", d).await
        })
        .await?;
    }
    // By digest too, and the same bytes as the upstream's.
    let r = c
        .req(
            Method::GET,
            &format!("/v2/hub/vendor/tool/manifests/{digest}"),
        )
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(r.status() == 200 && sha256(&r.bytes().await?) == digest);
    // skopeo (every platform) and podman (the host's) through the cache.
    let certs = cert_dir(&ctr, &cached.gateway.ca_pem)?;
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    let g = &cached.gateway.host;
    let via = copy_all(
        &ctr,
        &["--src-cert-dir", &certs, "--src-creds", &creds],
        &format!("docker://{g}/hub/vendor/multi:1"),
        &ctr.dir.path().join("via"),
    )?;
    let direct = copy_all(
        &ctr,
        &[
            "--src-cert-dir",
            &up_certs.display().to_string(),
            "--src-creds",
            &up_creds,
        ],
        &format!("docker://{}/vendor/multi:1", upstream.host),
        &ctr.dir.path().join("direct"),
    )?;
    ensure!(via == direct && via.len() >= 6, "the cache's copy differs");
    ctr.run(
        "podman",
        &[
            "pull",
            "-q",
            "--cert-dir",
            &certs,
            "--creds",
            &creds,
            &format!("{g}/hub/vendor/multi:1"),
        ],
    )?;

    // docker, with the prefix, signed in at the cache.
    let _trust = DockerTrust::install(g, &cached.gateway.ca_pem)?;
    let dk = Dockerd::start()?;
    let login = dk
        .cmd()
        .args(["login", g, "-u", ALICE.0, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .map(|mut i| i.write_all(ALICE.1.as_bytes()))
                .transpose()?;
            child.wait_with_output()
        })?;
    ensure!(
        login.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    let image = format!("{g}/hub/vendor/multi:1");
    dk.run(&["pull", "-q", &image])?;
    let arch = dk.run(&["image", "inspect", "--format", "{{.Architecture}}", &image])?;
    ensure!(arch.trim() == host_arch(), "docker pulled {arch}");

    // The upstream goes away: tags (past their TTL) and digests are served from the cache.
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the tag's TTL of 1 s runs out
    ensure!(pull_verified(&c, "hub/vendor/tool", "2.0").await? == digest);
    let r = c
        .req(
            Method::HEAD,
            &format!("/v2/hub/vendor/tool/manifests/{digest}"),
        )
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", describe(r).await);
    // What the cache never held is an error, not a hang.
    let r = c.get("/v2/hub/vendor/tool/manifests/3.0").await?;
    ensure!(r.status() == 502, "{}", describe(r).await);
    let stale = metric(&cached.gateway.admin, results("stale")).await?;
    ensure!(stale >= 1.0, "a stale serve is counted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_cold_pulls_fetch_each_blob_once_and_a_cut_transfer_stores_nothing()
-> anyhow::Result<()> {
    let up_root = tempfile::tempdir()?;
    let log = up_root.path().join("access.log");
    let up_data = up_root.path().join("data");
    let upstream = Distribution::start_with(&up_data, Some(&[UPSTREAM_USER]), Some(&log))?;
    let relay = Faulty::start(&upstream.addr).await?;
    let cached = Cached::start(
        &format!("http://{}", relay.addr),
        UPSTREAM_USER,
        "tag_ttl_seconds = 1",
    )?;
    let (digest, blobs) = push_upstream(
        &upstream_client(&upstream),
        "library/app",
        "1",
        &[&random(4 << 20, 3), &random(1 << 20, 4), &random(10_000, 5)],
    )
    .await?;

    // 16 clients at once, cold.
    let c = cached.client();
    let pulls: Vec<_> = (0..16)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { pull_verified(&c, "hub/library/app", "1").await })
        })
        .collect();
    for p in pulls {
        ensure!(p.await?? == digest);
    }
    let mut paths: Vec<String> = blobs
        .iter()
        .map(|(d, _)| format!("/v2/library/app/blobs/{d}"))
        .collect();
    paths.push(format!("/v2/library/app/manifests/{digest}"));
    for (d, _) in &blobs {
        eventually("the blob is stored", || async {
            cached.stored("hub/library/app", d).await
        })
        .await?;
    }
    for path in &paths {
        eventually("the upstream logged the GET", || async {
            Ok(upstream_gets(&log, path)? >= 1)
        })
        .await?;
        let n = upstream_gets(&log, path)?;
        ensure!(n == 1, "{path} was fetched {n} times from the upstream");
    }
    // A blob the upstream does not have: its 404, in the registry's words.
    let missing = sha256(b"not at the upstream");
    let r = c
        .get(&format!("/v2/hub/library/app/blobs/{missing}"))
        .await?;
    expect_error(r, 404, "BLOB_UNKNOWN").await?;

    // The upstream holds a corrupt copy (its last byte changed on disk): over HTTP/1.1 and
    // HTTP/2 the pull fails before its body ends, and nothing is stored.
    let small = random(1 << 20, 8);
    let small_digest = upstream_client(&upstream)
        .push_blob("library/app", small.clone())
        .await?;
    let hex = small_digest.to_string()["sha256:".len()..].to_string();
    let data = up_data.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bad = small.clone();
    *bad.last_mut().context("empty")? ^= 0xff;
    std::fs::write(&data, &bad)?;
    let errors = || {
        metric(
            &cached.gateway.admin,
            "gateway_cache_upstream_errors_total{kind=\"invalid\",prefix=\"hub\"}".into(),
        )
    };
    for http1 in [true, false] {
        let before = errors().await?;
        let mut client =
            Client::with_http(&cached.gateway.base, https(&cached.gateway.ca_pem, http1));
        client.auth = c.auth.clone();
        let r = client
            .get(&format!("/v2/hub/library/app/blobs/{small_digest}"))
            .await?;
        let got = r.bytes().await;
        ensure!(
            got.is_err() || got.as_ref().is_ok_and(|b| b.len() < small.len()),
            "a corrupt blob ended as if whole (HTTP/1.1: {http1})"
        );
        eventually("the fetch failed", || async {
            Ok(errors().await? > before)
        })
        .await?;
        ensure!(!cached.stored("hub/library/app", &small_digest).await?);
    }
    std::fs::write(&data, &small)?;

    // The upstream dies in the middle of a blob: that pull fails, nothing is stored under the
    // digest, and the next pull (upstream back) succeeds.
    let big = random(6 << 20, 6);
    let big_digest = upstream_client(&upstream)
        .push_blob("library/app", big.clone())
        .await?;
    relay.set(Mode::CutAfter(2 << 20));
    let r = c
        .get(&format!("/v2/hub/library/app/blobs/{big_digest}"))
        .await?;
    let got = r.bytes().await;
    ensure!(
        got.as_ref().map_or(true, |b| b.len() < big.len()),
        "a cut transfer ended as if it were whole"
    );
    relay.set(Mode::Pass);
    ensure!(!cached.stored("hub/library/app", &big_digest).await?);
    let r = c
        .get(&format!("/v2/hub/library/app/blobs/{big_digest}"))
        .await?;
    ensure!(r.status() == 200, "{}", describe(r).await);
    ensure!(sha256(&r.bytes().await?) == big_digest);
    // Storage has it once the fetch handed it over (a moment after the last byte).
    eventually("the blob is stored", || async {
        cached.stored("hub/library/app", &big_digest).await
    })
    .await?;

    // 429 from the upstream: the cached tag is served (its TTL of 1 s ran out first).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    relay.set(Mode::TooMany);
    let stale = || metric(&cached.gateway.admin, results("stale"));
    let before = stale().await?;
    ensure!(pull_verified(&c, "hub/library/app", "1").await? == digest);
    ensure!(stale().await? == before + 1.0, "the tag was served stale");
    // A tag it never held: the upstream's 429, with Retry-After.
    let r = c.get("/v2/hub/library/app/manifests/2").await?;
    ensure!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "TOOMANYREQUESTS").await?;
    // Upstream gone: by tag and by digest still.
    relay.set(Mode::Down);
    drop(upstream);
    ensure!(pull_verified(&c, "hub/library/app", "1").await? == digest);
    ensure!(pull_verified(&c, "hub/library/app", &digest.to_string()).await? == digest);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_upstream_images_share_is_fetched_once_and_never_linked_where_the_upstream_lacks_it()
-> anyhow::Result<()> {
    let up_root = tempfile::tempdir()?;
    let log = up_root.path().join("access.log");
    let up_data = up_root.path().join("data");
    let upstream = Distribution::start_with(&up_data, Some(&[UPSTREAM_USER]), Some(&log))?;
    let cached = Cached::start(&upstream.base, UPSTREAM_USER, "")?;
    let up = upstream_client(&upstream);
    // Three images, library/{a,b,c}:1, on one base layer; their blobs are [config, base, own]
    // (push_upstream's order), and the config is shared too (the same tag's).
    let (config, base_layer, own_layer) = (0, 1, 2);
    let base = random(2 << 20, 41);
    let mut images = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let own = random(100_000, 42 + i as u64);
        let repo = format!("library/{name}");
        images.push(push_upstream(&up, &repo, "1", &[&base, &own]).await?);
    }
    let shared: Vec<Digest> = images[0].1[config..=base_layer]
        .iter()
        .map(|(d, _)| d.clone())
        .collect();
    ensure!(
        images[1].1[config..=base_layer]
            .iter()
            .map(|(d, _)| d)
            .eq(shared.iter())
    );
    let gets =
        |name: &str, d: &Digest| upstream_gets(&log, &format!("/v2/library/{name}/blobs/{d}"));
    let c = cached.client();
    let shares = || metric(&cached.gateway.admin, results("shared"));

    ensure!(pull_verified(&c, "hub/library/a", "1").await? == images[0].0);
    // A HEAD through another repository links each shared blob once its fetch is recorded
    // (a HEAD never fetches: until then the upstream's HEAD answers it).
    for d in &shared {
        eventually("the shared blob is linked by a HEAD", || async {
            let r = c
                .req(Method::HEAD, &format!("/v2/hub/library/b/blobs/{d}"))
                .send()
                .await?;
            ensure!(r.status() == 200, "HEAD {d}: {}", r.status());
            cached.stored("hub/library/b", d).await
        })
        .await?;
    }
    ensure!(pull_verified(&c, "hub/library/b", "1").await? == images[1].0);
    // By GET: the third image's shared blobs (config and base) are linked, not fetched.
    let before = shares().await?;
    ensure!(pull_verified(&c, "hub/library/c", "1").await? == images[2].0);
    ensure!(shares().await? == before + 2.0, "two blobs shared by GET");
    // c's own layer was fetched, after its shared ones: once the log has that GET, it has
    // every request before it.
    eventually("the upstream logged the GET", || async {
        Ok(gets("c", &images[2].1[own_layer].0)? == 1)
    })
    .await?;
    for d in &shared {
        ensure!(
            gets("a", d)? == 1,
            "{d} was fetched {} times",
            gets("a", d)?
        );
        ensure!(
            gets("b", d)? == 0 && gets("c", d)? == 0,
            "{d} was fetched again"
        );
        ensure!(cached.stored("hub/library/c", d).await?);
    }

    // Through a repository whose upstream image lacks a blob the cache holds: nothing is
    // linked, the upstream's 404 (nor by HEAD); one the upstream does not know at all alike.
    // The cache did ask (a GET asks the upstream for a HEAD only when it holds the blob).
    let a_only = &images[0].1[own_layer].0;
    let r = c.get(&format!("/v2/hub/library/b/blobs/{a_only}")).await?;
    expect_error(r, 404, "BLOB_UNKNOWN").await?;
    let asked = format!("\"HEAD /v2/library/b/blobs/{a_only} HTTP/1.1\" 404");
    eventually("the upstream logged the HEAD", || async {
        Ok(std::fs::read_to_string(&log)?.contains(&asked))
    })
    .await?;
    for method in [Method::HEAD, Method::GET] {
        let r = c
            .req(method.clone(), &format!("/v2/hub/library/b/blobs/{a_only}"))
            .send()
            .await?;
        ensure!(
            r.status() == 404,
            "{method} {a_only} through b: {}",
            r.status()
        );
        let r = c
            .req(
                method.clone(),
                &format!("/v2/hub/library/none/blobs/{a_only}"),
            )
            .send()
            .await?;
        ensure!(
            r.status() == 404,
            "{method} {a_only} through none: {}",
            r.status()
        );
    }
    ensure!(!cached.stored("hub/library/b", a_only).await?);
    ensure!(!cached.stored("hub/library/none", a_only).await?);

    // The repository the record names (a: where it was fetched; links keep it) lost the blob,
    // evicted by a delete, and so did the others: the next repository fetches it, as any
    // cold blob, and the record is made anew.
    let admin = deployment::storage_client(&cached.storage);
    for repo in ["hub/library/a", "hub/library/b", "hub/library/c"] {
        let r = admin
            .req(
                Method::DELETE,
                &format!("/v2/{repo}/blobs/{}", shared[base_layer]),
            )
            .send()
            .await?;
        ensure!(r.status() == 202, "delete from {repo}: {}", r.status());
    }
    let own = random(1000, 49);
    let (d, _) = push_upstream(&up, "library/d", "1", &[&base, &own]).await?;
    ensure!(pull_verified(&c, "hub/library/d", "1").await? == d);
    eventually("the upstream logged the GET", || async {
        Ok(gets("d", &shared[base_layer])? == 1)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_256_mib_blob_streams_before_the_upstream_is_done_and_ranges_work_in_flight()
-> anyhow::Result<()> {
    let up_root = tempfile::tempdir()?;
    let upstream = Distribution::start_with(up_root.path(), Some(&[UPSTREAM_USER]), None)?;
    let relay = Faulty::start(&upstream.addr).await?;
    let cached = Cached::start(&format!("http://{}", relay.addr), UPSTREAM_USER, "")?;
    let size = 256usize << 20;
    let blob = random(size, 7);
    let digest = upstream_client(&upstream)
        .push_blob("library/big", blob.clone())
        .await?;
    // About 4 s for the whole transfer.
    relay.set(Mode::Throttle(64 << 20));
    let c = cached.client();
    let path = format!("/v2/hub/library/big/blobs/{digest}");
    let mut r = c.get(&path).await?;
    ensure!(r.status() == 200, "{}", describe(r).await);
    ensure!(r.content_length() == Some(size as u64));
    let first = r.chunk().await?.context("no first chunk")?;
    let relayed = relay.from_server();
    ensure!(
        relayed < size as u64,
        "the first byte came only after the upstream sent everything ({relayed} bytes)"
    );
    // A range of the blob while it is in flight.
    let ranged = c
        .req(Method::GET, &path)
        .header("range", "bytes=1000-1999")
        .send()
        .await?;
    ensure!(ranged.status() == 206, "{}", describe(ranged).await);
    ensure!(ranged.headers()["content-range"] == format!("bytes 1000-1999/{size}").as_str());
    ensure!(ranged.bytes().await? == blob[1000..2000]);
    let mut got = first.to_vec();
    while let Some(chunk) = r.chunk().await? {
        got.extend_from_slice(&chunk);
    }
    ensure!(
        got.len() == size && sha256(&got) == digest,
        "the streamed blob differs"
    );
    // Once cached, ranges are storage's.
    relay.set(Mode::Down);
    eventually("the blob is stored", || async {
        cached.stored("hub/library/big", &digest).await
    })
    .await?;
    let ranged = c
        .req(Method::GET, &path)
        .header("range", "bytes=0-9")
        .send()
        .await?;
    ensure!(ranged.status() == 206 && ranged.bytes().await? == blob[..10]);
    // The metrics say how the pulls were answered.
    ensure!(metric(&cached.gateway.admin, results("miss")).await? >= 1.0);
    Ok(())
}

/// `SIGHUP` puts `[[proxy_cache]]` changes in force: a rotated upstream password (the file read
/// again), a narrowed list of repositories; a table that does not load changes nothing and is
/// audited; another mirror listener is named as needing a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_puts_a_rotated_upstream_password_and_changed_tables_in_force()
-> anyhow::Result<()> {
    let up_root = tempfile::tempdir()?;
    let upstream =
        Distribution::start_with(&up_root.path().join("data"), Some(&[UPSTREAM_USER]), None)?;
    let up = upstream_client(&upstream);
    let (app, _) = push_upstream(&up, "library/app", "1", &[&random(50_000, 11)]).await?;
    push_upstream(&up, "library/other", "1", &[&random(50_000, 12)]).await?;
    // The cache starts with a password the upstream refuses.
    let cached = Cached::start(&upstream.base, (UPSTREAM_USER.0, "an-old-password"), "")?;
    let (g, c) = (&cached.gateway, cached.client());
    let r = c.get("/v2/hub/library/app/manifests/1").await?;
    let (status, text) = (r.status(), describe(r).await);
    ensure!(
        status == 502 && text.contains("upstream failed (denied)"),
        "with a wrong upstream password: {text}"
    );

    // The password rotated in its file: the next reload uses it.
    gateway::edge::tls::write_private(
        &cached.gw().join("upstream-password"),
        UPSTREAM_USER.1.as_bytes(),
    )?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "success"
            && e["config.applied"] == serde_json::json!(["proxy_cache"]),
        "{e}"
    );
    ensure!(pull_verified(&c, "hub/library/app", "1").await? == app);

    // The table narrowed to one repository: another is refused, the first still served.
    let conf = cached.gw().join("gateway.toml");
    let text = std::fs::read_to_string(&conf)?;
    std::fs::write(&conf, format!("{text}repositories = [\"library/app\"]\n"))?;
    let e = g.reload().await?;
    ensure!(
        e["config.applied"] == serde_json::json!(["proxy_cache"]),
        "{e}"
    );
    let refused = |what: &'static str| {
        let c = c.clone();
        async move {
            let r = c.get("/v2/hub/library/other/manifests/1").await?;
            expect_error(r, 403, "DENIED").await.context(what)
        }
    };
    refused("a repository the table no longer allows").await?;
    ensure!(pull_verified(&c, "hub/library/app", "1").await? == app);

    // A password file that is not there: nothing changes.
    let narrowed = std::fs::read_to_string(&conf)?;
    std::fs::write(
        &conf,
        narrowed.replace("upstream-password", "no-such-password-file"),
    )?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "failure"
            && e["event.reason"]
                .as_str()
                .is_some_and(|r| r.contains("proxy_cache")),
        "{e}"
    );
    refused("after a broken reload").await?;
    ensure!(pull_verified(&c, "hub/library/app", "1").await? == app);

    // A new mirror listener needs a restart: the table's other change waits for it too.
    std::fs::write(
        &conf,
        format!(
            "{}mirror_listen = \"127.0.0.1:{}\"\n",
            narrowed.replace("repositories = [\"library/app\"]\n", ""),
            free_port()?
        ),
    )?;
    let e = g.reload().await?;
    ensure!(
        e["event.outcome"] == "success"
            && e["config.applied"] == serde_json::json!([])
            && e["config.restart_needed"] == serde_json::json!(["proxy_cache.mirror_listen"]),
        "{e}"
    );
    refused("with a change waiting for a restart").await?;
    Ok(())
}

/// Makes everything of the repository `repo` in the storage root `root` look 10 days old: its
/// files' times, and the times its pull markers hold.
fn age_ten_days(root: &Path, repo: &str) -> anyhow::Result<()> {
    fn walk(dir: &Path, then: std::time::SystemTime) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            // Upload sessions are not retention's (and go as they finish).
            if e.file_name() == "_uploads" {
                continue;
            }
            if e.file_type()?.is_dir() {
                walk(&e.path(), then)?;
            } else {
                std::fs::File::options()
                    .write(true)
                    .open(e.path())?
                    .set_modified(then)?;
            }
        }
        Ok(())
    }
    let then = std::time::SystemTime::now() - Duration::from_secs(10 * 86_400);
    let dir = root.join("docker/registry/v2/repositories").join(repo);
    walk(&dir, then)?;
    let secs = then.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    for marker in std::fs::read_dir(dir.join("_manifests/_pulled/sha256"))? {
        std::fs::write(marker?.path(), secs.to_string())?;
    }
    Ok(())
}

/// The time storage holds for the last pull of `digest` in `repo` (none: never told).
fn pulled_at(root: &Path, repo: &str, digest: &Digest) -> anyhow::Result<Option<u64>> {
    let marker = root
        .join("docker/registry/v2/repositories")
        .join(repo)
        .join("_manifests/_pulled/sha256")
        .join(digest.hex());
    match std::fs::read_to_string(marker) {
        Ok(t) => Ok(Some(t.trim().parse()?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_cached_tags_pulled_lately_and_lets_the_rest_go() -> anyhow::Result<()>
{
    let up_root = tempfile::tempdir()?;
    let upstream =
        Distribution::start_with(&up_root.path().join("data"), Some(&[UPSTREAM_USER]), None)?;
    let up = upstream_client(&upstream);
    let policy = up_root.path().join("retention.toml");
    std::fs::write(
        &policy,
        "[[retention]]\nrepositories = [\"hub/**\"]\nkeep_pulled_days = 7\n",
    )?;
    let cached = Cached::start_with_storage(
        &upstream.base,
        UPSTREAM_USER,
        "",
        &format!(
            "[gc]\ngrace_seconds = 0\nfence_seconds = 0.2\nretention_policy = \"{}\"\n",
            policy.display()
        ),
    )?;
    let root = cached.dir.path().join("storage");
    // Three images, each with a layer of its own, pulled through the cache: each pull is told
    // to storage.
    let mut images = std::collections::HashMap::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let own = random(60_000, 70 + i as u64);
        let (digest, blobs) = push_upstream(&up, &format!("library/{name}"), "1", &[&own]).await?;
        let repo = format!("hub/library/{name}");
        ensure!(pull_verified(&cached.client(), &repo, "1").await? == digest);
        eventually("the pull is told to storage", || async {
            Ok(pulled_at(&root, &repo, &digest)?.is_some())
        })
        .await?;
        // The cache stores what it streamed once the client has it all: wait until it is done
        // writing (and its upload sessions are gone).
        for (d, _) in &blobs {
            eventually("the blob is stored", || cached.stored(&repo, d)).await?;
        }
        images.insert(name, (repo, digest, blobs));
    }
    // Ten days later, as the store's times say.
    for (repo, _, _) in images.values() {
        age_ten_days(&root, repo)?;
    }
    // Storage was first told of a pull just now: until keep_pulled_days after that, nothing
    // is deleted for want of pulls (they were not told before).
    let storage = deployment::storage_client(&cached.storage);
    let gc = |dry_run: bool| {
        let storage = &storage;
        async move {
            let path = if dry_run { "/gc?dry_run=true" } else { "/gc" };
            let r = storage.req(Method::POST, path).send().await?;
            ensure!(r.status() == 200, "POST {path}: {}", describe(r).await);
            Ok::<Value, anyhow::Error>(r.json().await?)
        }
    };
    let planned = gc(true).await?;
    ensure!(
        planned["retention"].as_array().is_some_and(Vec::is_empty),
        "pulls are told since just now: {planned:#}"
    );
    let since = root.join("docker/registry/v2/_pulls/since");
    let told_since: u64 = std::fs::read_to_string(&since)?.trim().parse()?;
    std::fs::write(&since, (told_since - 10 * 86_400).to_string())?;
    // A gateway that has told nothing yet — a fresh one — is asked for a's manifest by tag
    // and c's by a HEAD (a node checking the image it holds); nobody asks for b.
    let second = cache_gateway(
        &cached.dir.path().join("gw2"),
        &cached.storage,
        &upstream.base,
        UPSTREAM_USER,
        "",
    )?;
    let c2 = alice(&second);
    let r = c2
        .req(Method::GET, "/v2/hub/library/a/manifests/1")
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(r.status() == 200, "a: {}", describe(r).await);
    let (_, c_digest, _) = &images["c"];
    let r = c2
        .req(
            Method::HEAD,
            &format!("/v2/hub/library/c/manifests/{c_digest}"),
        )
        .header("accept", ACCEPT)
        .send()
        .await?;
    ensure!(r.status() == 200, "c: {}", r.status());
    let recent = |name: &str| {
        let (repo, digest, _) = &images[name];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok::<_, anyhow::Error>(pulled_at(&root, repo, digest)?.is_some_and(|t| t + 3600 > now))
    };
    for name in ["a", "c"] {
        eventually("the second gateway tells the pull", || async {
            recent(name)
        })
        .await?;
    }
    let told = |result: &str| {
        metric(
            &second.admin,
            format!("gateway_pulls_told_total{{result=\"{result}\"}}"),
        )
    };
    eventually(
        "the second gateway counts what storage recorded",
        || async { Ok(told("told").await? == 2.0) },
    )
    .await?;
    ensure!(told("skipped").await? == 0.0 && told("failed").await? == 0.0);
    ensure!(!recent("b")?, "b was not pulled");

    // Retention: only b goes, for not being pulled (nor pushed) within 7 days; then GC
    // sweeps its manifest and its own layer.
    let planned = gc(true).await?;
    let deleted: Vec<(String, String)> = planned["retention"]
        .as_array()
        .context("retention")?
        .iter()
        .map(|d| {
            (
                format!(
                    "{}:{}",
                    d["repository"].as_str().unwrap_or("?"),
                    d["tag"].as_str().unwrap_or("?")
                ),
                d["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    ensure!(
        deleted
            == [(
                "hub/library/b:1".to_owned(),
                "neither pulled nor pushed within 7 days".to_owned()
            )],
        "retention's plan: {planned:#}"
    );
    let report = gc(false).await?;
    ensure!(report["retention"] == planned["retention"], "{report:#}");
    let (_, b_digest, b_blobs) = &images["b"];
    let b_own = &b_blobs[b_blobs.len() - 1].0;
    let swept: Vec<&str> = report["blobs_deleted"]
        .as_array()
        .context("blobs_deleted")?
        .iter()
        .filter_map(|b| b["digest"].as_str())
        .collect();
    ensure!(
        swept.contains(&b_digest.to_string().as_str())
            && swept.contains(&b_own.to_string().as_str()),
        "b's manifest and own layer swept: {report:#}"
    );
    ensure!(
        pulled_at(&root, "hub/library/b", b_digest)?.is_none(),
        "b's marker went with it"
    );
    // What is left is whole, and b, being a cache's, comes back from the upstream when asked.
    for name in ["a", "c"] {
        let (repo, digest, _) = &images[name];
        ensure!(
            pull_verified(&c2, repo, "1").await? == *digest,
            "{name} after GC"
        );
    }
    ensure!(pull_verified(&c2, "hub/library/b", "1").await? == *b_digest);

    // Storage takes pull times from gateways only, for manifests the repository holds.
    let tell = |client: Client, repository: &str, digest: String| {
        let body = serde_json::json!({"pulls": [{"repository": repository, "digest": digest}]});
        async move {
            let r = client
                .req(Method::POST, "/internal/pulled")
                .json(&body)
                .send()
                .await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.text().await?))
        }
    };
    let recorded = |text: &str| {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["recorded"].as_u64())
    };
    let (a_repo, a_digest, _) = &images["a"];
    let (status, text) = tell(storage.clone(), a_repo, a_digest.to_string()).await?;
    ensure!(
        status == 200 && recorded(&text) == Some(1),
        "{status} {text}"
    );
    let (status, text) = tell(storage.clone(), "hub/library/zzz", b_digest.to_string()).await?;
    ensure!(
        status == 200 && recorded(&text) == Some(0),
        "{status} {text}"
    );
    ensure!(pulled_at(&root, "hub/library/zzz", b_digest)?.is_none());
    let (status, text) = tell(storage.clone(), "hub/library/a", "sha256:nope".into()).await?;
    ensure!(
        status == 400 && text.contains("DIGEST_INVALID"),
        "{status} {text}"
    );
    let anonymous = Client::new(&cached.storage.base);
    let (status, _) = tell(anonymous, "hub/library/b", b_digest.to_string()).await?;
    ensure!(status == 401, "without the internal secret: {status}");
    Ok(())
}
