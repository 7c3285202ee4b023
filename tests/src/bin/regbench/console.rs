//! `--console`: the web console's pages at scale. At each of `--scale-sizes`, a registry:2
//! root is written directly (as `--scale` writes it: that many repositories over 100 teams,
//! one repository with that many tags), served by one storage node behind `gateway serve`
//! with a policy under which an administrator sees every repository, a team member the
//! tenth of them in teams 00–09 (the first in the catalog's order), and a person one
//! repository at the catalog's end (so a page of theirs looks at as many names as a page may,
//! 5 000, and finds none). Each figure is the median of `--scale-gets` sequential GETs of a
//! signed-in browser's session (TLS, HTTP/2), the body read; printed beside the gateway's
//! cheapest TLS request (`GET /ui/static/style.css`) measured the same way, and the target
//! (100 ms).

use crate::cli::Args;
use crate::scale::{fill, repo_name, tag_name};
use anyhow::{Context, ensure};
use portcullis_tests::deployment;
use std::path::Path;
use std::time::{Duration, Instant};

const TARGET_MS: f64 = 100.0;

/// A signed-in console session: its client and cookie.
struct Session {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

impl Session {
    /// Signs `user` in with the console's password form.
    async fn sign_in(base: &str, ca: &[u8], user: (&str, &str)) -> anyhow::Result<Self> {
        let (http, cookie) = deployment::console_sign_in(base, ca, user).await?;
        Ok(Session {
            http,
            base: base.to_owned(),
            cookie,
        })
    }

    /// The page at `path` (answered 200, containing `needle`).
    async fn get(&self, path: &str, needle: &str) -> anyhow::Result<String> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", format!("__Host-portcullis_ui={}", self.cookie))
            .send()
            .await?;
        let status = r.status();
        let body = r.text().await?;
        ensure!(
            status == 200 && body.contains(needle),
            "{path}: {status}, no {needle:?} in the page"
        );
        Ok(body)
    }

    /// Median of `gets` sequential GETs of `path`.
    async fn median(&self, path: &str, needle: &str, gets: usize) -> anyhow::Result<Duration> {
        let mut times = Vec::with_capacity(gets);
        for _ in 0..gets.max(1) {
            let t = Instant::now();
            self.get(path, needle).await?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[times.len() / 2])
    }
}

/// The "More" link of a repositories page.
fn more_link(page: &str) -> anyhow::Result<String> {
    let at = page.find("/ui/?").context("no More link")?;
    let end = at + page[at..].find('"').context("unterminated link")?;
    Ok(page[at..end].replace("&amp;", "&"))
}

const ALICE: (&str, &str) = ("alice", "bench-alice-pw");
const BOB: (&str, &str) = ("bob", "bench-bob-pw");
const CAROL: (&str, &str) = ("carol", "bench-carol-pw");

pub(crate) async fn console_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    println!(
        "regbench --console: pages of a signed-in session, median of {} sequential GETs (ms); target < {TARGET_MS} ms",
        args.scale_gets
    );
    let gets = args.scale_gets;
    let mut worst = 0f64;
    for &size in &args.scale_sizes {
        let dir = scratch.join(format!("console-{size}"));
        let root = dir.join("root");
        let (took, _) = fill(&root, size)?;
        let storage = deployment::storage_node(&root)?;
        let gw = dir.join("gw");
        std::fs::create_dir_all(&gw)?;
        let last_team = repo_name(size - 1);
        std::fs::write(
            gw.join("policy.toml"),
            format!(
                "admin_groups = [\"registry-admins\"]\n\
                 [[bindings]]\nrepositories = [\"team-0*/**\", \"big/**\"]\ngroups = [\"team-a\"]\nrole = \"developer\"\n\
                 [[bindings]]\nrepositories = [\"{last_team}\"]\nusers = [\"carol\"]\nrole = \"reader\"\n"
            ),
        )?;
        let g = deployment::start_gateway(&gw, &[&storage], &[ALICE, BOB, CAROL], 4)?;
        let alice = Session::sign_in(&g.base, &g.ca_pem, ALICE).await?;
        let bob = Session::sign_in(&g.base, &g.ca_pem, BOB).await?;
        let carol = Session::sign_in(&g.base, &g.ca_pem, CAROL).await?;
        let first = alice.get("/ui/", "team-").await?;
        let more = more_link(&first)?;
        let middle_team = format!("team-{:02}/", 50);
        let big = format!("/ui/repo?name=big%2Ftags&last={}", tag_name(size / 2));
        let manifest = format!(
            "/ui/manifest?name={}&ref={}",
            repo_name(0).replace('/', "%2F"),
            tag_name(0)
        );
        let reference = alice.median("/ui/static/style.css", "", gets).await?;
        let figures = [
            (
                "repositories, first page (administrator)",
                alice.median("/ui/", "team-00/", gets).await?,
            ),
            (
                "repositories, next page (administrator)",
                alice.median(&more, "team-", gets).await?,
            ),
            (
                "repositories, search team-50/ (administrator)",
                alice
                    .median(&format!("/ui/?q={middle_team}"), &middle_team, gets)
                    .await?,
            ),
            (
                "repositories, first page (team member: a tenth)",
                bob.median("/ui/", "team-00/", gets).await?,
            ),
            (
                "repositories, first page (one repository at the end: 5 000 names looked at)",
                carol.median("/ui/", "Repositories", gets).await?,
            ),
            (
                "tags of a repository of that many tags, middle page (50 tags)",
                alice.median(&big, "t0", gets).await?,
            ),
            (
                "manifest page",
                alice.median(&manifest, "sha256:", gets).await?,
            ),
        ];
        println!(
            "\n{size} repositories (root written in {:.1} s); reference: GET /ui/static/style.css {:.2} ms",
            took.as_secs_f64(),
            ms(reference)
        );
        for (what, d) in figures {
            let m = ms(d);
            worst = worst.max(m);
            println!(
                "  {what:<80} {m:>8.2} ms  ({:>5.1}× the reference)",
                m / ms(reference).max(0.001)
            );
        }
        drop(g);
        drop(storage);
        std::fs::remove_dir_all(&dir).ok();
    }
    println!(
        "\nslowest page: {worst:.2} ms — {} the {TARGET_MS} ms target",
        if worst < TARGET_MS { "within" } else { "OVER" }
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
