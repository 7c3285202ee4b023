//! Random tokens. A leaf: it imports nothing of the gateway's.

/// `n` bytes from the OS random generator, base64url without padding: refresh tokens, OIDC
/// `state`, `nonce`, PKCE verifiers and cookies.
pub fn random_token(n: usize) -> String {
    use base64::Engine as _;
    let mut raw = vec![0u8; n];
    openssl::rand::rand_bytes(&mut raw).expect("the OS random generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
