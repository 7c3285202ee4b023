//! End-to-end tests of the audit trail against the real gateway (`gateway dev`, whose trail is
//! `<data>/audit/audit.jsonl`) and `gateway audit verify`. `cargo test --release --test audit`
//! runs exactly these.

use anyhow::{Context, ensure};
use portcullis_tests::client::https;
use portcullis_tests::server::{GatewayServer, binary};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const PASSWORD: &str = "audit-admin-password";

fn events(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// Polls the trail until it has `n` events (they are written as requests finish).
fn wait_for(file: &Path, n: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = events(file).unwrap_or_default();
        if e.len() >= n {
            return Ok(e);
        }
        ensure!(
            Instant::now() < deadline,
            "{} events, {n} expected",
            e.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `gateway audit verify <file>`: (success, its output).
fn verify(file: &Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(binary("gateway"))
        .args(["audit", "verify"])
        .arg(file)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// Traffic that makes events: a token, a failed login, a robot created and used.
async fn traffic(g: &GatewayServer) -> anyhow::Result<String> {
    let http = https(&g.ca_pem, false);
    let token = |user: &str, pw: &str| {
        http.get(format!(
            "{}/token?service=portcullis&scope=repository:team-a/app:pull,push",
            g.base
        ))
        .basic_auth(user, Some(pw))
        .send()
    };
    ensure!(
        token("admin", PASSWORD).await?.status() == 200,
        "admin token"
    );
    ensure!(
        token("admin", "wrong-password").await?.status() == 401,
        "wrong password"
    );
    let r = http
        .post(format!("{}/admin/robots", g.base))
        .basic_auth("admin", Some(PASSWORD))
        .json(
            &json!({"project": "team-a", "name": "ci", "expires_in_seconds": 600,
                      "scope": [{"repositories": ["team-a/**"], "actions": ["pull", "push"]}]}),
        )
        .send()
        .await?;
    ensure!(r.status() == 201, "robot create: {}", r.status());
    let secret = r.json::<Value>().await?["secret"]
        .as_str()
        .context("no secret")?
        .to_string();
    ensure!(
        token("robot$team-a+ci", &secret).await?.status() == 200,
        "robot token"
    );
    Ok(secret)
}

#[tokio::test]
async fn the_trail_records_decisions_chains_them_and_verify_finds_tampering() -> anyhow::Result<()>
{
    let data = tempfile::tempdir()?;
    let file = data.path().join("audit/audit.jsonl");
    let mut g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    let secret = traffic(&g).await?;
    let all = wait_for(&file, 4)?;
    let find = |action: &str, outcome: &str, user: &str| {
        all.iter()
            .find(|e| {
                e["event.action"] == action
                    && e["event.outcome"] == outcome
                    && e["user.name"] == user
            })
            .cloned()
    };
    let issued = find("token", "success", "admin").context("admin's token event")?;
    ensure!(
        issued["token.granted"] == json!(["repository:team-a/app:pull,push"]),
        "{issued}"
    );
    ensure!(
        issued["identity.kind"] == "user" && issued["user.roles"] == json!(["registry-admins"]),
        "{issued}"
    );
    let failed = find("login", "failure", "admin").context("the failed login")?;
    ensure!(failed["event.reason"] == "invalid credentials", "{failed}");
    let created = find("robot-create", "success", "admin").context("robot-create")?;
    ensure!(created["robot"] == "robot$team-a+ci", "{created}");
    let robot = find("token", "success", "robot$team-a+ci").context("robot token")?;
    ensure!(robot["authenticator"] == "robot", "{robot}");
    for (i, e) in all.iter().enumerate() {
        ensure!(e["event.sequence"] == json!(i + 1), "sequence of {e}");
        ensure!(
            e["@timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{e}"
        );
    }
    let text = std::fs::read_to_string(&file)?;
    ensure!(
        !text.contains(PASSWORD) && !text.contains("wrong-password"),
        "a password in the trail"
    );
    ensure!(!text.contains(&secret), "the robot secret in the trail");
    ensure!(!text.contains("eyJ"), "a JWT in the trail");
    let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions());
    ensure!(
        mode & 0o077 == 0,
        "the trail is readable by others: {mode:o}"
    );

    // Intact, and still after a restart (the chain continues from the last line).
    let (ok, out) = verify(&file)?;
    ensure!(ok && out.contains("intact"), "{out}");
    drop(g);
    g = GatewayServer::start_dev(data.path(), Some(PASSWORD))?;
    traffic_after_restart(&g).await?;
    let all = wait_for(&file, all.len() + 1)?;
    let (ok, out) = verify(&file)?;
    ensure!(ok, "after a restart: {out}");
    ensure!(
        all.last().context("events")?["event.sequence"] == json!(all.len()),
        "sequence restarted"
    );

    // Tampering, each named by its line.
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let tampered = data.path().join("tampered.jsonl");
    let check = |lines: &[String], line: usize, word: &str| -> anyhow::Result<()> {
        std::fs::write(&tampered, lines.join("\n") + "\n")?;
        let (ok, out) = verify(&tampered)?;
        ensure!(
            !ok && out.contains(&format!("line {line}:")) && out.contains(word),
            "{out}"
        );
        Ok(())
    };
    let mut deleted = lines.clone();
    deleted.remove(1);
    check(&deleted, 2, "missing")?;
    let mut edited = lines.clone();
    edited[2] = edited[2].replacen("team-a", "team-b", 1);
    ensure!(edited[2] != lines[2], "nothing to edit in {}", lines[2]);
    check(&edited, 3, "edited")?;
    let mut swapped = lines.clone();
    swapped.swap(1, 2);
    check(&swapped, 2, "reordered")?;
    drop(g);
    Ok(())
}

async fn traffic_after_restart(g: &GatewayServer) -> anyhow::Result<()> {
    let http = https(&g.ca_pem, false);
    let r = http
        .get(format!("{}/token?service=portcullis", g.base))
        .basic_auth("admin", Some("wrong-again"))
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    Ok(())
}
