//! The credential helper's protocol (`docker-credential-portcullis`): a credentials file, an
//! action and what comes on stdin. Input: `<file bytes> NUL <action> LF <stdin>`.
//!
//! Properties: never a panic; a file that reads writes back to the same content; a key is its
//! own key; `store` then `get` answers exactly what was stored, `list` shows the key with the
//! user name and never the secret, `erase` forgets it; an error never quotes a secret.
#![no_main]

use gateway::client::credential_helper::{Credentials, Request, get_answer, parse_request, server_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (file, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"{}"[..], data),
    };
    let Ok(request) = std::str::from_utf8(request) else {
        return;
    };
    let (action, input) = request.split_once('\n').unwrap_or((request, ""));

    let mut all = match Credentials::from_json(file) {
        Ok(all) => {
            let again = Credentials::from_json(&all.to_json()).expect("a written file reads");
            assert_eq!(again, all, "the file round-trips");
            all
        }
        Err(e) => {
            // A fixed message and a position: the file's text (its secrets) is never quoted.
            assert!(e.starts_with("the credentials file is not") && e.len() < 160, "{e}");
            Credentials::default()
        }
    };

    let key = server_key(input);
    assert_eq!(server_key(&key), key, "a key is its own key: {input:?}");

    match parse_request(action, input) {
        Ok(Request::Store { key, entry }) => {
            assert_eq!(server_key(&key), key);
            assert!(!key.is_empty());
            let (user, secret) = (entry.username.clone(), entry.secret.clone());
            all.insert(key.clone(), entry);
            let got = all.get(&key).expect("stored");
            let answer: serde_json::Value =
                serde_json::from_str(&get_answer(&key, got)).expect("get answers JSON");
            assert_eq!(answer["ServerURL"], key.as_str());
            assert_eq!(answer["Username"], user.as_str());
            assert_eq!(answer["Secret"], secret.as_str());
            let list: serde_json::Value =
                serde_json::from_str(&all.list_json()).expect("list answers JSON");
            assert_eq!(list[&key], user.as_str());
            assert!(
                list.as_object()
                    .expect("list is an object")
                    .values()
                    .all(|u| u.as_str().is_some()),
                "list shows user names only"
            );
            let written = Credentials::from_json(&all.to_json()).expect("the file reads back");
            assert_eq!(written, all);
            assert!(all.remove(&key));
            assert!(all.get(&key).is_none());
        }
        Ok(Request::Get { server, key }) => {
            assert_eq!(server_key(&server), key);
            if let Some(e) = all.get(&key) {
                let answer: serde_json::Value =
                    serde_json::from_str(&get_answer(&server, e)).expect("get answers JSON");
                assert_eq!(answer["Secret"], e.secret.as_str());
            }
        }
        Ok(Request::Erase { key }) => {
            let had = all.get(&key).is_some();
            assert_eq!(all.remove(&key), had);
            assert!(all.get(&key).is_none());
        }
        Ok(Request::List) => {
            serde_json::from_str::<serde_json::Value>(&all.list_json()).expect("list is JSON");
        }
        Ok(Request::Version) => {}
        Err(e) => {
            // Fixed messages (an unknown action quotes at most 64 of its characters): stdin's
            // text is never quoted.
            assert!(e.len() < 1000, "{e}");
            if action != "store" && action != "get" && action != "erase" {
                assert!(e.starts_with("unknown action"), "{e}");
            } else {
                assert!(e.starts_with(&format!("{action}: ")), "{e}");
            }
        }
    }
});
