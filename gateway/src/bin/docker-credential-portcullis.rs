//! `docker-credential-portcullis`: the Docker credential-helper protocol (`store`, `get`,
//! `erase`, `list`; JSON or a server URL on stdin, JSON on stdout) over a file of registry
//! refresh tokens, mode 0600, one entry per server. Docker and podman send the stored
//! `Secret` as an identity token (`Username` `<token>`) and trade it at `POST /token`.
//!
//! The file is `$PORTCULLIS_CREDENTIALS`, else `$XDG_CONFIG_HOME/portcullis/credentials.json`,
//! else `~/.config/portcullis/credentials.json`.
//!
//! On `get`, a stored token is checked with one refresh grant at `https://<server>/token`;
//! when none is stored or the registry says it is no longer valid (`invalid_grant`), the
//! helper runs the registry's device flow (`POST /auth/oidc/device`, RFC 8628): it prints
//! the address and the code to stderr (and the terminal), opens a browser when there is a
//! display, polls `POST /token` with the device-code grant until the user has signed in,
//! stores the refresh token it gets and answers with it. `PORTCULLIS_NO_DEVICE_FLOW=1`
//! turns that off (then: the protocol's "credentials not found"); `PORTCULLIS_CA_FILE`
//! names an extra CA certificate (PEM) to trust for the registry. The device flow runs only
//! for registries the user named, in `$PORTCULLIS_REGISTRIES` or in the file `registries`
//! beside the credentials file ([`gateway::client::credential_helper::sign_in_allowed`]); for any
//! other server `get` answers "credentials not found".
//!
//! Every read-change-write of the file holds an exclusive lock on `credentials.json.lock`
//! (docker runs several helpers at once, one per image) — never across a network call — and
//! each process writes its own temporary file.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use gateway::client::credential_helper::{
    Credentials, Entry, IDENTITY_TOKEN_USER, NOT_FOUND, Request, get_answer, parse_request,
};
use zeroize::Zeroize;

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

/// An exclusive lock on the credentials file, held until dropped.
fn lock() -> Result<std::fs::File, String> {
    let path = store_path().with_extension("json.lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    f.lock()
        .map_err(|e| format!("locking {}: {e}", path.display()))?;
    Ok(f)
}

/// The registries the user named for sign-in: `$PORTCULLIS_REGISTRIES` and the file
/// `registries` beside the credentials.
fn named_registries() -> String {
    let mut text =
        std::env::var(gateway::client::credential_helper::REGISTRIES_ENV).unwrap_or_default();
    let file = store_path().with_file_name("registries");
    if let Ok(t) = std::fs::read_to_string(file) {
        text.push('\n');
        text.push_str(&t);
    }
    text
}

fn load() -> Result<Credentials, String> {
    match std::fs::read(store_path()) {
        Ok(b) => Credentials::from_json(&b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
        Err(e) => Err(format!("reading the credentials file: {e}")),
    }
}

/// Writes the file with mode 0600 (temp file + rename, so a crash leaves the old one).
fn save(all: &Credentials) -> Result<(), String> {
    let path = store_path();
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let mut body = all.to_json();
    let written = f.write_all(&body);
    body.zeroize();
    written
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("replacing {}: {e}", path.display()))
}

const CLIENT_ID: &str = "docker-credential-portcullis";

fn http() -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!(
            "docker-credential-portcullis/",
            env!("CARGO_PKG_VERSION")
        ));
    if let Some(ca) = std::env::var_os("PORTCULLIS_CA_FILE") {
        let pem = std::fs::read(&ca)
            .map_err(|e| format!("reading {}: {e}", PathBuf::from(&ca).display()))?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|e| format!("PORTCULLIS_CA_FILE: {e}"))?;
        b = b.add_root_certificate(cert);
    }
    b.build().map_err(|e| e.to_string())
}

/// Whether the registry still accepts `refresh`. Only a definite `invalid_grant` says no:
/// an unreachable registry keeps the stored token.
async fn still_valid(server: &str, refresh: &str) -> bool {
    let Ok(client) = http() else { return true };
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("client_id", CLIENT_ID),
    ];
    let Ok(r) = client
        .post(format!("https://{server}/token"))
        .form(&form)
        .send()
        .await
    else {
        return true;
    };
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    body["error"] != "invalid_grant"
}

/// Says something to the person at the keyboard: on stderr, and on the terminal when there
/// is one (docker does not show a helper's stderr).
fn tell(msg: &str) {
    eprintln!("{msg}");
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        let _ = writeln!(tty, "{msg}");
    }
}

fn device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| CLIENT_ID.to_string())
}

/// RFC 8628 against the registry: the refresh token once the user has signed in.
async fn device_flow(server: &str) -> Result<String, String> {
    let client = http()?;
    let device = device_name();
    let r = client
        .post(format!("https://{server}/auth/oidc/device"))
        .form(&[("client_id", CLIENT_ID), ("device", device.as_str())])
        .send()
        .await
        .map_err(|e| format!("{server}: {e}"))?;
    let status = r.status();
    let start: serde_json::Value = r.json().await.unwrap_or_default();
    if status == reqwest::StatusCode::NOT_FOUND || start["error"] == "unsupported_grant_type" {
        // No single sign-on there: the client asks for a login as usual.
        return Err(NOT_FOUND.into());
    }
    let (Some(code), Some(user_code), Some(uri)) = (
        start["device_code"].as_str(),
        start["user_code"].as_str(),
        start["verification_uri"].as_str(),
    ) else {
        return Err(format!(
            "{server}: the device sign-in could not start ({status}): {}",
            start["error_description"].as_str().unwrap_or("")
        ));
    };
    let complete = start["verification_uri_complete"].as_str();
    tell(&format!(
        "To sign in to {server}, open {uri} and enter the code {user_code}{}",
        complete.map_or(String::new(), |c| format!("\n(or open {c})"))
    ));
    if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some() {
        let _ = std::process::Command::new("xdg-open")
            .arg(complete.unwrap_or(uri))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let mut interval = start["interval"].as_u64().unwrap_or(5).max(1);
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_secs(start["expires_in"].as_u64().unwrap_or(600));
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(interval)).await;
        if std::time::Instant::now() > deadline {
            return Err(format!("{server}: the sign-in code expired; try again"));
        }
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", code),
            ("client_id", CLIENT_ID),
        ];
        let r = match client
            .post(format!("https://{server}/token"))
            .form(&form)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => continue, // a blip: poll again
        };
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if let Some(t) = body["refresh_token"].as_str() {
            tell(&format!("Signed in to {server}."));
            return Ok(t.to_string());
        }
        match body["error"].as_str() {
            Some("authorization_pending") | Some("temporarily_unavailable") => {}
            Some("slow_down") => interval += 5,
            Some(e) => {
                return Err(format!(
                    "{server}: sign-in failed: {e} {}",
                    body["error_description"].as_str().unwrap_or("")
                ));
            }
            None => {
                return Err(format!(
                    "{server}: unexpected answer from the token endpoint"
                ));
            }
        }
    }
}

/// Runs `f` on the credentials file under its lock: read, change, written back if `f` says
/// so. The lock is never held across a network call (a device sign-in takes minutes, and
/// every other helper run would wait for it).
fn locked<T>(f: impl FnOnce(&mut Credentials) -> Result<(T, bool), String>) -> Result<T, String> {
    let _held = lock()?;
    let mut all = load()?;
    let (out, changed) = f(&mut all)?;
    if changed {
        save(&all)?;
    }
    Ok(out)
}

fn run(action: &str, input: &str) -> Result<String, String> {
    match parse_request(action, input)? {
        Request::Store { key, entry } => locked(|all| {
            all.insert(key, entry);
            Ok((String::new(), true))
        }),
        Request::Get { server, key } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let stored = locked(|all| Ok((all.get(&key).cloned(), false)))?;
            if let Some(e) = stored {
                if e.username != IDENTITY_TOKEN_USER || rt.block_on(still_valid(&key, &e.secret)) {
                    return Ok(get_answer(&server, &e));
                }
                eprintln!("the stored token for {key} is no longer valid");
                // Only if it is still the one found invalid (another run may have stored a
                // fresh one meanwhile).
                locked(|all| {
                    let same = all.get(&key) == Some(&e);
                    if same {
                        all.remove(&key);
                    }
                    Ok(((), same))
                })?;
            }
            if std::env::var_os("PORTCULLIS_NO_DEVICE_FLOW").is_some() {
                return Err(NOT_FOUND.into());
            }
            if !gateway::client::credential_helper::sign_in_allowed(&named_registries(), &key) {
                eprintln!(
                    "not signing in to {key}: it is not among the registries named in ${} or the registries file",
                    gateway::client::credential_helper::REGISTRIES_ENV
                );
                return Err(NOT_FOUND.into());
            }
            let e = Entry {
                username: IDENTITY_TOKEN_USER.into(),
                secret: rt.block_on(device_flow(&key))?,
            };
            let answer = get_answer(&server, &e);
            locked(|all| {
                all.insert(key, e);
                Ok(((), true))
            })?;
            Ok(answer)
        }
        Request::Erase { key } => locked(|all| {
            if !all.remove(&key) {
                return Err(NOT_FOUND.into());
            }
            Ok((String::new(), true))
        }),
        Request::List => locked(|all| Ok((all.list_json(), false))),
        Request::Version => Ok(gateway::client::credential_helper::version()),
    }
}

fn main() -> std::process::ExitCode {
    let Some(action) = std::env::args().nth(1) else {
        eprintln!("usage: docker-credential-portcullis <store|get|erase|list|version>");
        return std::process::ExitCode::from(1);
    };
    let mut input = String::new();
    if Request::reads_input(&action)
        && let Err(e) = std::io::stdin()
            .take(gateway::client::credential_helper::MAX_INPUT as u64 + 1)
            .read_to_string(&mut input)
    {
        println!("reading stdin: {e}");
        return std::process::ExitCode::from(1);
    }
    let result = run(&action, &input);
    input.zeroize();
    match result {
        Ok(mut out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            out.zeroize();
            std::process::ExitCode::SUCCESS
        }
        // The protocol reports errors on stdout.
        Err(e) => {
            println!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}
