//! `docker-credential-portcullis`: the Docker credential-helper protocol (`store`, `get`,
//! `erase`, `list`; JSON or a server URL on stdin, JSON on stdout) over a file of registry
//! refresh tokens, mode 0600, one entry per server. Docker and podman send the stored
//! `Secret` as an identity token (`Username` `<token>`) and trade it at `POST /token`.
//!
//! The file is `$PORTCULLIS_CREDENTIALS`, else `$XDG_CONFIG_HOME/portcullis/credentials.json`,
//! else `~/.config/portcullis/credentials.json`.
//!
//! Not yet: on `get` with nothing stored, running the device flow (issue 6); today it answers
//! the protocol's "credentials not found" so the client falls back to asking for a login.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Entry {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// What the protocol says when a server has no credentials (clients match this text).
const NOT_FOUND: &str = "credentials not found in native keychain";

fn store_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_CREDENTIALS") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("portcullis/credentials.json")
}

/// `https://host:port/` and `host:port` name the same server.
fn server_key(url: &str) -> String {
    let u = url.trim();
    let u = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .unwrap_or(u);
    u.trim_end_matches('/').to_string()
}

fn load() -> Result<BTreeMap<String, Entry>, String> {
    match std::fs::read(store_path()) {
        Ok(b) => {
            serde_json::from_slice(&b).map_err(|e| format!("reading the credentials file: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("reading the credentials file: {e}")),
    }
}

/// Writes the file with mode 0600 (temp file + rename, so a crash leaves the old one).
fn save(all: &BTreeMap<String, Entry>) -> Result<(), String> {
    let path = store_path();
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec_pretty(all).map_err(|e| e.to_string())?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("replacing {}: {e}", path.display()))
}

fn run(action: &str, input: &str) -> Result<String, String> {
    match action {
        "store" => {
            #[derive(serde::Deserialize)]
            struct Store {
                #[serde(rename = "ServerURL")]
                server: String,
                #[serde(rename = "Username")]
                username: String,
                #[serde(rename = "Secret")]
                secret: String,
            }
            let s: Store =
                serde_json::from_str(input).map_err(|e| format!("store: bad input: {e}"))?;
            let mut all = load()?;
            all.insert(
                server_key(&s.server),
                Entry {
                    username: s.username,
                    secret: s.secret,
                },
            );
            save(&all)?;
            Ok(String::new())
        }
        "get" => {
            let key = server_key(input);
            let all = load()?;
            let e = all.get(&key).ok_or_else(|| NOT_FOUND.to_string())?;
            Ok(serde_json::json!({"ServerURL": input.trim(), "Username": e.username, "Secret": e.secret}).to_string())
        }
        "erase" => {
            let mut all = load()?;
            if all.remove(&server_key(input)).is_none() {
                return Err(NOT_FOUND.into());
            }
            save(&all)?;
            Ok(String::new())
        }
        "list" => {
            let all = load()?;
            let list: BTreeMap<&String, &String> =
                all.iter().map(|(k, e)| (k, &e.username)).collect();
            serde_json::to_string(&list).map_err(|e| e.to_string())
        }
        "version" => Ok(format!(
            "docker-credential-portcullis {}",
            env!("CARGO_PKG_VERSION")
        )),
        other => Err(format!(
            "unknown action {other:?}: use store, get, erase, list or version"
        )),
    }
}

fn main() -> std::process::ExitCode {
    let Some(action) = std::env::args().nth(1) else {
        eprintln!("usage: docker-credential-portcullis <store|get|erase|list|version>");
        return std::process::ExitCode::from(1);
    };
    let mut input = String::new();
    if action != "list"
        && action != "version"
        && let Err(e) = std::io::stdin().read_to_string(&mut input)
    {
        println!("reading stdin: {e}");
        return std::process::ExitCode::from(1);
    }
    match run(&action, &input) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            std::process::ExitCode::SUCCESS
        }
        // The protocol reports errors on stdout.
        Err(e) => {
            println!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}
