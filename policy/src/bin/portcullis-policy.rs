//! `portcullis-policy`: validate a policy file and explain its decisions.
//!
//! ```text
//! portcullis-policy validate  --policy conf/policy.toml
//! portcullis-policy check     --policy conf/policy.toml --user bob --group team-a push team-a/app:v1.2.3
//! portcullis-policy retention --policy conf/policy.toml --repository team-a/app --tags tags.json
//! ```
//!
//! `check` exits 0 when allowed, 1 when denied; every command exits 2 on a bad policy or
//! bad arguments. `tags.json` is a list of `{"tag": "v1" | null, "digest": "sha256:…",
//! "pushed_at": <unix seconds> | "2026-01-31T12:00:00Z"}`, with an optional `"pulled_at"` of the
//! same form (the last pull, for `keep_pulled_days`).

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use policy::{Action, ManifestRecord, Policy, Subject, SubjectKind, TagState};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "Validate a Portcullis policy and explain its decisions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile the policy and report the first error.
    Validate {
        #[arg(long)]
        policy: PathBuf,
    },
    /// Decide one request and print the rule that decided it.
    Check {
        #[arg(long)]
        policy: PathBuf,
        /// A user (default kind).
        #[arg(long, conflicts_with_all = ["robot", "ci", "anonymous"])]
        user: Option<String>,
        #[arg(long)]
        robot: Option<String>,
        #[arg(long)]
        ci: Option<String>,
        #[arg(long)]
        anonymous: bool,
        /// A group of the subject (repeatable).
        #[arg(long)]
        group: Vec<String>,
        /// Unix seconds (default: now).
        #[arg(long)]
        now: Option<i64>,
        /// For push with a tag: whether the tag exists (yes, no, unknown).
        #[arg(long, default_value = "unknown")]
        tag_exists: String,
        /// pull, push, delete, catalog, override-immutable.
        action: String,
        /// repository[:tag]
        target: String,
    },
    /// Print what retention would delete in a repository (a dry run), as JSON.
    Retention {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        repository: String,
        #[arg(long)]
        tags: PathBuf,
        #[arg(long)]
        now: Option<i64>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis-policy: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load(path: &PathBuf) -> anyhow::Result<Policy> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Policy::compile(&path.display().to_string(), &text)?)
}

fn now_or(now: Option<i64>) -> i64 {
    now.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    })
}

fn run() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Validate { policy } => {
            let p = load(&policy)?;
            println!(
                "{}: ok ({} binding entries)",
                policy.display(),
                p.binding_count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            policy,
            user,
            robot,
            ci,
            anonymous,
            group,
            now,
            tag_exists,
            action,
            target,
        } => {
            let p = load(&policy)?;
            let now = now_or(now);
            let groups: Vec<&str> = group.iter().map(String::as_str).collect();
            let subject = match (user, robot, ci, anonymous) {
                (Some(u), None, None, false) => Subject::user(&u, &groups),
                (None, Some(r), None, false) => Subject {
                    groups: group.clone(),
                    ..Subject::robot(&r)
                },
                (None, None, Some(c), false) => Subject::ci(&c, &groups),
                (None, None, None, true) => Subject::anonymous(),
                _ => bail!("give exactly one of --user, --robot, --ci, --anonymous"),
            };
            let action =
                Action::parse(&action).with_context(|| format!("unknown action {action:?}"))?;
            let (repo, tag) = match target.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
                _ => (target.clone(), None),
            };
            let who = match subject.kind {
                SubjectKind::Anonymous => "anonymous".to_string(),
                k => format!("{k:?} {}", subject.name).to_lowercase(),
            };
            let d = p.authorize(&subject, action, &repo, now);
            println!(
                "{} {who} {action} {repo}: {}",
                if d.allowed { "ALLOW" } else { "DENY" },
                d.reason
            );
            let mut allowed = d.allowed;
            if let (true, Some(tag)) = (d.allowed, tag) {
                let state = match tag_exists.as_str() {
                    "yes" => TagState::Present,
                    "no" => TagState::Absent,
                    "unknown" => TagState::Unknown,
                    other => bail!("--tag-exists is yes, no or unknown, not {other:?}"),
                };
                let change = match action {
                    Action::Push => Some(p.check_tag_write(&subject, &repo, &tag, state, now)),
                    Action::Delete => Some(p.check_tag_delete(&subject, &repo, &tag, now)),
                    _ => None,
                };
                if let Some(change) = change {
                    allowed = change.is_allowed();
                    println!("{}", change.describe(&tag));
                }
            }
            Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Retention {
            policy,
            repository,
            tags,
            now,
        } => {
            let p = load(&policy)?;
            let text = std::fs::read_to_string(&tags)
                .with_context(|| format!("reading {}", tags.display()))?;
            let raw: Vec<serde_json::Value> = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", tags.display()))?;
            let mut records = Vec::new();
            for (i, v) in raw.iter().enumerate() {
                let time = |field: &str| match &v[field] {
                    serde_json::Value::Number(n) => n.as_i64(),
                    serde_json::Value::String(s) => s
                        .parse::<toml::value::Datetime>()
                        .ok()
                        .and_then(|d| policy::datetime_to_unix(&d)),
                    _ => None,
                };
                let must_be = |field: &str| {
                    format!("entry {i}: {field} must be unix seconds or an RFC 3339 time")
                };
                let pushed_at = time("pushed_at").with_context(|| must_be("pushed_at"))?;
                let pulled_at = match v.get("pulled_at") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(_) => Some(time("pulled_at").with_context(|| must_be("pulled_at"))?),
                };
                records.push(ManifestRecord {
                    tag: v["tag"].as_str().map(String::from),
                    digest: v["digest"]
                        .as_str()
                        .with_context(|| format!("entry {i}: no digest"))?
                        .to_string(),
                    pushed_at,
                    pulled_at,
                });
            }
            let plan = p.retention(&repository, &records, now_or(now));
            println!("{}", serde_json::to_string_pretty(&plan)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
