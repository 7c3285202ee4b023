//! `gateway robot …`: the robot accounts' admin API from a shell. Authenticates with the
//! admin token (`PORTCULLIS_ADMIN_TOKEN`) or, with `--user`, a password read from
//! `PORTCULLIS_PASSWORD` or stdin. Prints the API's JSON; a refusal exits with status 1.

use crate::auth::robots::ADMIN_TOKEN_ENV;
use crate::auth::scope::ScopeEntry;
use crate::route::ROBOTS_PATH;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct RobotArgs {
    /// The registry, e.g. https://registry.corp.example
    #[arg(long, env = "PORTCULLIS_URL")]
    pub url: String,
    /// CA certificates (PEM) for the registry's TLS.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Log in as this user or robot (password from PORTCULLIS_PASSWORD or stdin) instead of
    /// using the admin token.
    #[arg(long)]
    pub user: Option<String>,
    #[command(subcommand)]
    pub command: RobotCommand,
}

#[derive(Subcommand)]
pub enum RobotCommand {
    /// Create a robot `robot$<project>+<name>`; prints its secret once.
    Create {
        #[arg(long)]
        project: String,
        #[arg(long)]
        name: String,
        /// `<repository pattern>=<actions>`, e.g. `team-a/**=pull,push` (repeat for more).
        #[arg(long = "scope", required = true)]
        scope: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, conflicts_with = "never_expires")]
        expires_in_seconds: Option<u64>,
        #[arg(long)]
        never_expires: bool,
        /// It may create robots within its own scope.
        #[arg(long)]
        may_create_robots: bool,
    },
    List,
    Show {
        robot: String,
    },
    /// A new secret; the previous one stays valid for the overlap.
    Rotate {
        robot: String,
        #[arg(long)]
        overlap_seconds: Option<u64>,
    },
    Disable {
        robot: String,
    },
    Enable {
        robot: String,
    },
    Delete {
        robot: String,
    },
}

/// `team-a/**=pull,push` → a scope entry.
pub fn parse_scope(s: &str) -> anyhow::Result<ScopeEntry> {
    let Some((repo, actions)) = s.rsplit_once('=') else {
        bail!("scope {s:?}: write <repository pattern>=<action,action>");
    };
    Ok(ScopeEntry {
        repositories: vec![repo.to_string()],
        actions: actions.split(',').map(|a| a.trim().to_string()).collect(),
    })
}

/// A robot name as a path segment (`$` and `+` percent-encoded).
fn segment(name: &str) -> String {
    name.replace('%', "%25")
        .replace('$', "%24")
        .replace('+', "%2B")
        .replace('/', "%2F")
}

pub async fn run(args: RobotArgs) -> anyhow::Result<()> {
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = &args.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem)? {
            http = http.add_root_certificate(c);
        }
    }
    let http = http.build()?;
    let base = format!("{}{ROBOTS_PATH}", args.url.trim_end_matches('/'));
    let (method, url, body) = match args.command {
        RobotCommand::Create {
            project,
            name,
            scope,
            description,
            expires_in_seconds,
            never_expires,
            may_create_robots,
        } => {
            let scope = scope
                .iter()
                .map(|s| parse_scope(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let body = serde_json::json!({
                "project": project,
                "name": name,
                "description": description,
                "scope": scope,
                "expires_in_seconds": expires_in_seconds,
                "never_expires": never_expires,
                "may_create_robots": may_create_robots,
            });
            (reqwest::Method::POST, base, Some(body))
        }
        RobotCommand::List => (reqwest::Method::GET, base, None),
        RobotCommand::Show { robot } => (
            reqwest::Method::GET,
            format!("{base}/{}", segment(&robot)),
            None,
        ),
        RobotCommand::Rotate {
            robot,
            overlap_seconds,
        } => (
            reqwest::Method::POST,
            format!("{base}/{}/rotate", segment(&robot)),
            Some(serde_json::json!({ "overlap_seconds": overlap_seconds })),
        ),
        RobotCommand::Disable { robot } => (
            reqwest::Method::PATCH,
            format!("{base}/{}", segment(&robot)),
            Some(serde_json::json!({ "disabled": true })),
        ),
        RobotCommand::Enable { robot } => (
            reqwest::Method::PATCH,
            format!("{base}/{}", segment(&robot)),
            Some(serde_json::json!({ "disabled": false })),
        ),
        RobotCommand::Delete { robot } => (
            reqwest::Method::DELETE,
            format!("{base}/{}", segment(&robot)),
            None,
        ),
    };
    let mut req = http.request(method, &url);
    req = match &args.user {
        Some(user) => {
            let password = match std::env::var("PORTCULLIS_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\n', '\r']).to_string()
                }
            };
            req.basic_auth(user, Some(password))
        }
        None => {
            let token = std::env::var(ADMIN_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
                .with_context(|| format!("set {ADMIN_TOKEN_ENV} or give --user"))?;
            req.bearer_auth(token)
        }
    };
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("calling {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let shown = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if !status.is_success() {
        bail!("{status}: {shown}");
    }
    println!("{shown}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_segments() {
        let s = parse_scope("team-a/**=pull,push").unwrap();
        assert_eq!(s.repositories, ["team-a/**"]);
        assert_eq!(s.actions, ["pull", "push"]);
        assert!(parse_scope("team-a").is_err());
        assert_eq!(segment("robot$a+b"), "robot%24a%2Bb");
    }
}
