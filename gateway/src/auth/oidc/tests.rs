use super::device::{normalize_user_code, user_code};
use super::*;

#[test]
fn user_codes_are_eight_letters_without_vowels() {
    for _ in 0..100 {
        let c = user_code();
        assert_eq!(c.len(), 9, "{c}");
        assert_eq!(&c[4..5], "-");
        assert_eq!(normalize_user_code(&c).len(), 8);
    }
    assert_eq!(normalize_user_code(" bcdf-ghjk\n"), "BCDFGHJK");
    assert_eq!(normalize_user_code("AEIOU"), "");
}

#[test]
fn cookies_are_found_by_name() {
    let h = Some("a=1; __Host-portcullis_oidc=xyz; b=2");
    assert_eq!(cookie(h, COOKIE), Some("xyz"));
    assert_eq!(cookie(Some("__Host-portcullis_oidcx=1"), COOKIE), None);
    let planted = Some("__Host-portcullis_oidc=mine; __Host-portcullis_oidc=xyz");
    assert_eq!(cookie(planted, COOKIE), None, "two are none");
    assert_eq!(cookie(None, COOKIE), None);
}

#[test]
fn symmetric_and_unknown_algorithms_are_refused() {
    let base = r#"issuer = "http://127.0.0.1:1"
client_id = "c""#;
    let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
    for algs in [r#"["HS256"]"#, r#"["none"]"#, "[]"] {
        let cfg: OidcConfig = toml::from_str(&format!("{base}\nalgorithms = {algs}")).unwrap();
        assert!(Oidc::new(cfg, store.clone()).is_err(), "{algs}");
    }
    let cfg: OidcConfig = toml::from_str(base).unwrap();
    Oidc::new(cfg, store).unwrap();
}

#[test]
fn the_page_escapes_what_it_shows() {
    let id = Identity {
        subject: "<b>".into(),
        groups: vec!["a&b".into()],
        kind: SubjectKind::User,
        machine: None,
    };
    let p = success_page("h", &id, "<script>", "tok");
    assert!(!p.contains("<script>"), "{p}");
    assert!(p.contains("Signed in as &lt;b&gt;"), "{p}");
    assert!(p.contains("a&amp;b"), "{p}");
}

/// An issuer the tests control: discovery and JWKS for one EC key, on a loopback port.
/// (The real IdP of `tests/tests/sso.rs` never signs an expired or misdirected ID token;
/// this stand-in does, so the refusals can be shown.)
async fn fake_issuer() -> (String, crate::token::keys::SigningKey) {
    let key =
        crate::token::keys::SigningKey::from_pem(&crate::token::keys::generate_pem().unwrap())
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let discovery = serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/auth"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
    })
    .to_string();
    let jwks = serde_json::json!({ "keys": [key.jwk.clone()] }).to_string();
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || std::future::ready(discovery.clone())),
        )
        .route(
            "/jwks",
            axum::routing::get(move || std::future::ready(jwks.clone())),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (issuer, key)
}

#[tokio::test]
async fn id_tokens_are_checked_and_a_name_stays_with_its_first_account() {
    let (issuer, key) = fake_issuer().await;
    let cfg: OidcConfig = toml::from_str(&format!(
        "issuer = \"{issuer}\"\nclient_id = \"portcullis\"\ngroups_filter = \"^team-\""
    ))
    .unwrap();
    let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
    let oidc = Oidc::new(cfg, store).unwrap();
    let now = crate::clock::unix_now();
    let good = serde_json::json!({
        "iss": issuer, "aud": "portcullis", "sub": "u1", "exp": now + 300, "iat": now,
        "nonce": "n1", "preferred_username": "bob", "groups": ["team-a", "staff"],
    });
    let sign = |claims: &serde_json::Value, kid: &str| {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(kid.to_string());
        jsonwebtoken::encode(&h, claims, &key.encoding).unwrap()
    };
    let id = oidc
        .verify_id_token(&sign(&good, &key.kid), Some("n1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id.subject, "bob");
    assert_eq!(id.groups, ["team-a"]);

    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let mut no_user = good.clone();
    no_user
        .as_object_mut()
        .unwrap()
        .remove("preferred_username");
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "kid": key.kid})),
        b64(&good)
    );
    // HS256 keyed with the IdP's public key: the classic algorithm confusion.
    let confused = {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some(key.kid.clone());
        let public = key.jwk.to_string();
        jsonwebtoken::encode(
            &h,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap()
    };
    let other_key =
        crate::token::keys::SigningKey::from_pem(&crate::token::keys::generate_pem().unwrap())
            .unwrap();
    let foreign = {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(other_key.kid.clone());
        jsonwebtoken::encode(&h, &good, &other_key.encoding).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign(&with("exp", (now - 120).into()), &key.kid),
            "n1",
        ),
        (
            "issued in the future",
            sign(&with("iat", (now + 600).into()), &key.kid),
            "n1",
        ),
        (
            "not yet valid",
            sign(&with("nbf", (now + 600).into()), &key.kid),
            "n1",
        ),
        (
            "wrong audience",
            sign(&with("aud", "someone-else".into()), &key.kid),
            "n1",
        ),
        (
            "another issuer",
            sign(&with("iss", "https://evil.example".into()), &key.kid),
            "n1",
        ),
        ("nonce mismatch", sign(&good, &key.kid), "n2"),
        (
            "no nonce",
            sign(&with("nonce", serde_json::Value::Null), &key.kid),
            "n1",
        ),
        ("no username", sign(&no_user, &key.kid), "n1"),
        ("no sub", sign(&with("sub", "".into()), &key.kid), "n1"),
        (
            "issued to another client",
            sign(&with("azp", "another-client".into()), &key.kid),
            "n1",
        ),
        (
            "the name of another account (a rename, or a freed name given again)",
            sign(&with("sub", "u2".into()), &key.kid),
            "n1",
        ),
        ("alg none", unsigned, "n1"),
        ("HS256 with the public key", confused, "n1"),
        ("unknown key", foreign, "n1"),
        ("garbage", "a.b.c".into(), "n1"),
    ];
    for (what, token, nonce) in cases {
        let r = oidc.verify_id_token(&token, Some(nonce)).await.unwrap();
        assert!(r.is_err(), "{what}: accepted");
    }
}
