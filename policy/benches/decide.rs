//! Policy benchmark: compile 10 000 bindings, then decide 1 000 000 requests on one core,
//! and compare with an unindexed scan of the same bindings (the reference).
//!
//! `cargo bench -p policy --bench decide`

use policy::pattern::RepoPattern;
use policy::{Action, Policy, Subject};
use std::fmt::Write;
use std::hint::black_box;
use std::time::Instant;

const TEAMS: usize = 2500;
const DECISIONS: usize = 1_000_000;

fn main() {
    // 4 bindings per team → 10 000 bindings.
    let mut text = String::from("admin_groups = [\"registry-admins\"]\n");
    for t in 0..TEAMS {
        let _ = write!(
            text,
            "[[bindings]]\nrepositories = [\"team-{t}/**\"]\ngroups = [\"team-{t}\"]\nrole = \"developer\"\n\
             [[bindings]]\nrepositories = [\"team-{t}/prod/**\"]\ngroups = [\"team-{t}\"]\nrole = \"reader\"\n\
             [[bindings]]\nrepositories = [\"team-{t}/**\"]\nusers = [\"lead-{t}\"]\nrole = \"maintainer\"\n\
             [[bindings]]\nrepositories = [\"shared/{t}-*\"]\ngroups = [\"team-{t}\"]\nrole = \"reader\"\n"
        );
    }
    let t = Instant::now();
    let policy = Policy::compile("bench.toml", &text).expect("bench policy compiles");
    let compile = t.elapsed();
    println!(
        "compiled {} bindings in {:.1} ms",
        policy.binding_count(),
        compile.as_secs_f64() * 1e3
    );

    // Requests: subjects with three groups, repositories in and out of their teams.
    let subjects: Vec<Subject> = (0..1000)
        .map(|i| {
            let g: Vec<String> = (0..3)
                .map(|k| format!("team-{}", (i * 7 + k * 13) % TEAMS))
                .collect();
            let refs: Vec<&str> = g.iter().map(String::as_str).collect();
            Subject::user(&format!("user-{i}"), &refs)
        })
        .collect();
    // Per subject: its team's app, its team's prod, a shared repo of its team, another team's.
    let repos: Vec<[String; 4]> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let g = &s.groups[i % 3];
            let n = g.trim_start_matches("team-");
            [
                format!("{g}/app-{i}"),
                format!("{g}/prod/api"),
                format!("shared/{n}-tools"),
                format!("team-{}/other", (i * 31 + 5) % TEAMS),
            ]
        })
        .collect();
    let actions = [Action::Pull, Action::Push, Action::Delete];

    let t = Instant::now();
    let mut allowed = 0usize;
    for i in 0..DECISIONS {
        let d = policy.authorize(
            &subjects[i % 1000],
            actions[i % 3],
            &repos[i % 1000][(i / 1000) % 4],
            0,
        );
        allowed += usize::from(black_box(d.allowed));
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = DECISIONS as f64 / secs;

    // Reference: scan every (group, pattern) pair for each request, as an unindexed
    // implementation would. Measured on fewer requests; compared per decision.
    let scan: Vec<(String, RepoPattern)> = (0..TEAMS)
        .flat_map(|t| {
            [
                format!("team-{t}/**"),
                format!("team-{t}/prod/**"),
                format!("team-{t}/**"),
                format!("shared/{t}-*"),
            ]
            .into_iter()
            .map(move |p| {
                (
                    format!("team-{t}"),
                    RepoPattern::compile(&p).expect("pattern"),
                )
            })
        })
        .collect();
    let n_ref = 2_000;
    let t = Instant::now();
    let mut hits = 0usize;
    for i in 0..n_ref {
        let s = &subjects[i % 1000];
        let repo = &repos[i % 1000][(i / 1000) % 4];
        hits += scan
            .iter()
            .filter(|(g, p)| s.groups.iter().any(|sg| sg == g) && p.matches(repo, Some(&s.name)))
            .count();
    }
    black_box(hits);
    let ref_rate = n_ref as f64 / t.elapsed().as_secs_f64();

    println!(
        "{DECISIONS} decisions in {secs:.3} s: {:.2} M decisions/s on one core ({allowed} allowed)",
        rate / 1e6
    );
    println!(
        "reference (unindexed scan of the same bindings): {:.0} decisions/s",
        ref_rate
    );
    println!(
        "ratio to the reference: {:.0}×; ratio to the 1 M/s target: {:.2}×",
        rate / ref_rate,
        rate / 1e6
    );
}
