//! The `portcullis-policy` explain command, run as a process.

use std::process::Command;

fn policy_file() -> String {
    format!("{}/../conf/policy.toml", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-policy"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_decision_and_the_deciding_rule() {
    let p = policy_file();
    let (code, out, _) = run(&[
        "check",
        "--policy",
        &p,
        "--user",
        "bob",
        "--group",
        "team-a",
        "push",
        "team-a/app:v1.2.3",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOW user bob push team-a/app: binding at line"),
        "{out}"
    );
    assert!(
        out.contains("tag v1.2.3: immutable") && out.contains("may be created, never moved"),
        "{out}"
    );

    let (code, out, _) = run(&[
        "check",
        "--policy",
        &p,
        "--user",
        "bob",
        "--group",
        "team-a",
        "push",
        "team-a/prod/api",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DENY") && out.contains("team-a/prod/**"),
        "{out}"
    );

    let (code, out, _) = run(&[
        "check",
        "--policy",
        &p,
        "--user",
        "bob",
        "--group",
        "team-a",
        "--tag-exists",
        "yes",
        "push",
        "team-a/app:v1.2.3",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DENY tag v1.2.3: immutable"), "{out}");
}

#[test]
fn validate_reports_file_and_line_of_errors() {
    let (code, out, _) = run(&["validate", "--policy", &policy_file()]);
    assert_eq!(code, 0, "{out}");
    let dir = std::env::temp_dir().join(format!("policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[bindings]]\nrepositories = [\"a/**\"]\ngroups = [\"g\"]\nrole = \"nope\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["validate", "--policy", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml:4: bindings[0].role: unknown role \"nope\""),
        "{err}"
    );
}

#[test]
fn retention_prints_a_dry_run() {
    let dir = std::env::temp_dir().join(format!("policy-cli-r-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tags = dir.join("tags.json");
    let mut entries = vec![
        r#"{"tag": "latest", "digest": "sha256:aa", "pushed_at": "2020-01-01T00:00:00Z"}"#
            .to_string(),
    ];
    for i in 0..25 {
        entries.push(format!(
            r#"{{"tag": "build-{i}", "digest": "sha256:{i:02}", "pushed_at": {}}}"#,
            1_600_000_000 + i * 86_400
        ));
    }
    entries.push(r#"{"tag": null, "digest": "sha256:ff", "pushed_at": 1500000000}"#.to_string());
    std::fs::write(&tags, format!("[{}]", entries.join(","))).unwrap();
    let (code, out, err) = run(&[
        "retention",
        "--policy",
        &policy_file(),
        "--repository",
        "team-a/app",
        "--tags",
        tags.to_str().unwrap(),
        "--now",
        "1800000000",
    ]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let deleted: Vec<&str> = plan["delete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["digest"].as_str().unwrap())
        .collect();
    // 25 builds, the 20 newest kept (latest is kept by pattern), the 5 oldest and the untagged go.
    assert_eq!(
        deleted,
        [
            "sha256:04",
            "sha256:03",
            "sha256:02",
            "sha256:01",
            "sha256:00",
            "sha256:ff"
        ],
        "{out}"
    );
}
