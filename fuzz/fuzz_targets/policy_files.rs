//! Policy files (`conf/policy.toml`, reloaded on SIGHUP) and the scopes a token request asks
//! for. Input: the policy text, a NUL, a scope list. Compiling never panics, and a policy
//! that compiles never grants more than was asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::{Policy, Subject};

fuzz_target!(|data: &[u8]| {
    let (text, scopes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"repository:team-a/app:pull,push"[..]),
    };
    let (Ok(text), Ok(scopes)) = (std::str::from_utf8(text), std::str::from_utf8(scopes)) else {
        return;
    };
    let Ok(p) = Policy::compile("fuzz.toml", text) else {
        return;
    };
    let Ok(requested) = oci::scope::Scope::parse_list(scopes) else {
        return;
    };
    for subject in [
        Subject::user("bob", &["team-a"]),
        Subject::robot("robot$team-a+ci"),
        Subject::anonymous(),
    ] {
        for granted in p.grant(&subject, &requested, 1_800_000_000) {
            let asked = requested
                .iter()
                .filter(|r| r.resource_type == granted.resource_type && r.name == granted.name);
            let asked: Vec<&String> = asked.flat_map(|r| r.actions.iter()).collect();
            assert!(
                granted.actions.iter().all(|a| asked.contains(&a)),
                "{subject:?} got {granted} for {requested:?}"
            );
        }
    }
});
