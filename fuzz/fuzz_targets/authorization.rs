//! `Authorization: Basic …` headers of token requests and the admin APIs: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((user, _password)) = gateway::token::parse_basic(header) {
        assert!(!user.contains(':'), "{header:?}");
    }
});
