//! Bearer tokens presented on `/v2/` (and to `/auth/revoke`): the gateway's ES256 JWT check
//! never panics, and nothing but a token it signed verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokens() -> &'static gateway::token::jwt::Tokens {
    static T: OnceLock<gateway::token::jwt::Tokens> = OnceLock::new();
    T.get_or_init(|| {
        let pem = gateway::token::keys::generate_pem().expect("a key");
        let key = gateway::token::keys::SigningKey::from_pem(&pem).expect("the key");
        gateway::token::jwt::Tokens::new(vec![key], "fuzz-issuer", "fuzz-service")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    // A fresh key each process: no input from the corpus can carry its signature.
    assert!(tokens().verify(token).is_err(), "a forged token verified: {token}");
});
