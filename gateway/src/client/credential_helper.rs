//! The Docker credential-helper protocol of `docker-credential-portcullis`, without I/O:
//! what a request on stdin says ([`parse_request`]), the content of the credentials file
//! ([`Credentials`]) and the answers written to stdout. The binary adds the file, the
//! network (refresh check, device flow) and the terminal; keeping those out of here lets the
//! protocol be tested and fuzzed on its own (`fuzz/fuzz_targets/credential_helper.rs`).
//!
//! Protocol: `store` reads `{"ServerURL","Username","Secret"}`; `get` and `erase` read a
//! server URL; `list` and `version` read nothing. Answers are JSON (or nothing) on stdout;
//! errors are one line of text on stdout with exit status 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// What the protocol says when a server has no credentials (clients match this text).
pub const NOT_FOUND: &str = "credentials not found in native keychain";

/// Docker's identity-token user name: the secret is a registry refresh token.
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// The environment variable listing the registries the helper signs in to (device flow).
pub const REGISTRIES_ENV: &str = "PORTCULLIS_REGISTRIES";

/// Whether the helper may run the device flow for the server `key`: only for a registry the
/// user named — in `$PORTCULLIS_REGISTRIES` or the `registries` file beside the credentials
/// (`text`: both, server names separated by commas, spaces or new lines; `#` starts a
/// comment). Docker calls a global `credsStore` for *every* server an image names, so without
/// this `docker pull evil.example/x` would open a sign-in page that server chose.
pub fn sign_in_allowed(text: &str, key: &str) -> bool {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split([',', ' ', '\t']))
        .filter(|s| !s.is_empty())
        .any(|s| server_key(s) == key)
}

/// A request longer than this is refused (a server URL or a token is far shorter).
pub const MAX_INPUT: usize = 64 * 1024;

/// One server's credentials. The secret is wiped from memory when the entry is dropped, and
/// never shown by `Debug`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Entry {
    #[serde(rename = "Username")]
    pub username: String,
    #[serde(rename = "Secret")]
    pub secret: String,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep `entry` for the server `key`.
    Store {
        key: String,
        entry: Entry,
    },
    /// The credentials for `key`; the answer names the server as `server` (the input, trimmed).
    Get {
        server: String,
        key: String,
    },
    /// Forget `key`.
    Erase {
        key: String,
    },
    List,
    Version,
}

impl Request {
    /// Whether the action reads stdin.
    pub fn reads_input(action: &str) -> bool {
        !matches!(action, "list" | "version")
    }
}

/// `https://host:port/`, `http://host:port` and `host:port` name the same server. The result
/// is its own key (`server_key(&server_key(u)) == server_key(u)`), so the keys `list` shows
/// find their entries through `get` and `erase`.
pub fn server_key(url: &str) -> String {
    let mut u = url.trim();
    loop {
        let next = u
            .strip_prefix("https://")
            .or_else(|| u.strip_prefix("http://"))
            .unwrap_or(u)
            .trim_end_matches('/')
            .trim();
        if next == u {
            return u.to_string();
        }
        u = next;
    }
}

/// Where a JSON error is, without serde_json's message (which can quote a string it did
/// not expect: a secret).
fn position(e: &serde_json::Error) -> String {
    format!("line {}, column {}", e.line(), e.column())
}

/// A server key must name something: no control characters, not empty.
fn checked_key(action: &str, url: &str) -> Result<String, String> {
    let key = server_key(url);
    if key.is_empty() {
        return Err(format!("{action}: no server URL given"));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("{action}: the server URL holds control characters"));
    }
    Ok(key)
}

/// Reads one request: the action (the helper's first argument) and what came on stdin.
pub fn parse_request(action: &str, input: &str) -> Result<Request, String> {
    if input.len() > MAX_INPUT {
        return Err(format!(
            "{action}: input longer than {MAX_INPUT} bytes refused"
        ));
    }
    match action {
        "store" => {
            #[derive(Deserialize)]
            struct Store {
                #[serde(rename = "ServerURL")]
                server: String,
                #[serde(flatten)]
                entry: Entry,
            }
            // serde_json's message can quote a string it did not expect (the secret, when
            // the input is one bare string): say only where, never what.
            let s: Store = serde_json::from_str(input).map_err(|e| {
                format!(
                    "store: bad input: not a JSON object with the strings ServerURL, Username \
                     and Secret ({})",
                    position(&e)
                )
            })?;
            Ok(Request::Store {
                key: checked_key(action, &s.server)?,
                entry: s.entry,
            })
        }
        "get" => Ok(Request::Get {
            server: input.trim().to_string(),
            key: checked_key(action, input)?,
        }),
        "erase" => Ok(Request::Erase {
            key: checked_key(action, input)?,
        }),
        "list" => Ok(Request::List),
        "version" => Ok(Request::Version),
        other => Err(format!(
            "unknown action {:?}: use store, get, erase, list or version",
            other.chars().take(64).collect::<String>()
        )),
    }
}

/// The answer to `version`.
pub fn version() -> String {
    format!("docker-credential-portcullis {}", env!("CARGO_PKG_VERSION"))
}

/// The answer to `get`.
pub fn get_answer(server: &str, entry: &Entry) -> String {
    serde_json::json!({
        "ServerURL": server,
        "Username": entry.username,
        "Secret": entry.secret,
    })
    .to_string()
}

/// The credentials file: one entry per server key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, Entry>);

impl Credentials {
    /// Reads the file's content. Keys are normalised with [`server_key`] (a file written by
    /// hand with `https://` keys still answers).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let raw: BTreeMap<String, Entry> = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "the credentials file is not a JSON object of {{\"Username\", \"Secret\"}} \
                 entries ({})",
                position(&e)
            )
        })?;
        Ok(Credentials(
            raw.into_iter().map(|(k, e)| (server_key(&k), e)).collect(),
        ))
    }

    /// The file's content.
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings always serialises.
        serde_json::to_vec_pretty(&self.0).unwrap_or_default()
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: String, entry: Entry) {
        self.0.insert(key, entry);
    }

    /// Whether there was an entry to forget.
    pub fn remove(&mut self, key: &str) -> bool {
        self.0.remove(key).is_some()
    }

    /// The answer to `list`: server key → user name (no secrets).
    pub fn list_json(&self) -> String {
        let list: BTreeMap<&String, &String> =
            self.0.iter().map(|(k, e)| (k, &e.username)).collect();
        serde_json::to_string(&list).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str, secret: &str) -> Entry {
        Entry {
            username: user.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn the_device_flow_runs_only_for_registries_the_user_named() {
        let named = "registry.corp:443, https://other.corp/\n# old.corp\nthird.corp";
        for server in [
            "registry.corp:443",
            "https://registry.corp:443/",
            "other.corp",
            "third.corp",
        ] {
            assert!(sign_in_allowed(named, &server_key(server)), "{server}");
        }
        for server in ["evil.example", "old.corp", "registry.corp", "corp"] {
            assert!(!sign_in_allowed(named, &server_key(server)), "{server}");
        }
        assert!(!sign_in_allowed("", &server_key("registry.corp")));
    }

    #[test]
    fn server_urls_with_and_without_scheme_name_one_server() {
        for u in [
            "registry.example:8443",
            "https://registry.example:8443",
            "https://registry.example:8443/",
            "http://registry.example:8443//",
            " https://registry.example:8443 \n",
            "https://https://registry.example:8443/ /",
        ] {
            assert_eq!(server_key(u), "registry.example:8443", "{u:?}");
        }
        assert_eq!(server_key("https://"), "");
    }

    #[test]
    fn store_get_erase_and_list_follow_the_protocol() {
        let Request::Store { key, entry: e } = parse_request(
            "store",
            r#"{"ServerURL":"https://r.example/","Username":"<token>","Secret":"s3cret"}"#,
        )
        .unwrap() else {
            panic!("not a store request")
        };
        assert_eq!(key, "r.example");
        let mut all = Credentials::default();
        all.insert(key, e);
        let Request::Get { server, key } = parse_request("get", "r.example\n").unwrap() else {
            panic!("not a get request")
        };
        let answer: serde_json::Value =
            serde_json::from_str(&get_answer(&server, all.get(&key).unwrap())).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"ServerURL": "r.example", "Username": "<token>", "Secret": "s3cret"})
        );
        assert_eq!(all.list_json(), r#"{"r.example":"<token>"}"#);
        let again = Credentials::from_json(&all.to_json()).unwrap();
        assert_eq!(again, all);
        assert!(all.remove("r.example"));
        assert!(!all.remove("r.example"));
        assert_eq!(all.list_json(), "{}");
    }

    #[test]
    fn bad_requests_are_refused_without_echoing_secrets() {
        let e = parse_request("store", r#"{"ServerURL":"r","Username":"u"}"#).unwrap_err();
        assert!(e.starts_with("store: bad input"), "{e}");
        let e =
            parse_request("store", r#"{"ServerURL":"r","Username":"u","Secret":7}"#).unwrap_err();
        assert!(e.starts_with("store: bad input"), "{e}");
        let e = parse_request(
            "store",
            r#"{"ServerURL":"https://","Username":"u","Secret":"hush"}"#,
        )
        .unwrap_err();
        assert_eq!(e, "store: no server URL given");
        let e = parse_request("get", "a\u{7}b").unwrap_err();
        assert!(e.contains("control characters"), "{e}");
        assert!(parse_request("erase", "  ").is_err());
        assert!(parse_request("get", &"a".repeat(MAX_INPUT + 1)).is_err());
        let e = parse_request("steal", "").unwrap_err();
        assert!(e.starts_with("unknown action \"steal\""), "{e}");
        let e = parse_request("store", r#""hush""#).unwrap_err();
        assert!(!e.contains("hush"), "{e}");
        assert!(!format!("{:?}", entry("u", "hush")).contains("hush"));
    }

    #[test]
    fn a_hand_written_file_with_scheme_keys_answers() {
        let all =
            Credentials::from_json(br#"{"https://r.example/": {"Username": "u", "Secret": "p"}}"#)
                .unwrap();
        assert_eq!(all.get("r.example"), Some(&entry("u", "p")));
        assert!(Credentials::from_json(b"[]").is_err());
        let e = Credentials::from_json(br#"{"r": "hush"}"#).unwrap_err();
        assert!(!e.contains("hush"), "{e}");
        assert!(Credentials::from_json(br#"{"r": {"Username": "u"}}"#).is_err());
    }
}
