//! The gateway's authorization of `/v2/` requests against what storage will do with them
//! (issue 24): a method byte and a request URI (path and query, any bytes), sent by bob with
//! a token for `team-a/app` (pull, push, delete) only. Whatever the gateway forwards, parsed
//! as storage parses it, must be within his grant — his own repository for the endpoint's
//! action, and `pull` on a mount's source — and a request it cannot decide on is refused.
#![no_main]

use gateway::audit::request::Operation;
use gateway::registry::authz::{Authz, Verdict, forwarded_within_grant};
use gateway::token::jwt::{Access, Claims, TokenSubject, Tokens};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"];

fn setup() -> &'static (Authz, Claims, String) {
    static S: OnceLock<(Authz, Claims, String)> = OnceLock::new();
    S.get_or_init(|| {
        let key = gateway::token::keys::SigningKey::from_pem(
            &gateway::token::keys::generate_pem().expect("key"),
        )
        .expect("key");
        let tokens = Arc::new(Tokens::new(vec![key], "fuzz", "registry.fuzz"));
        let policy = policy::Policy::compile("policy.toml", include_str!("../../conf/policy.toml"))
            .expect("the shipped policy");
        let now = gateway::token::unix_now();
        let claims = Claims {
            iss: "fuzz".into(),
            sub: "bob".into(),
            aud: "registry.fuzz".into(),
            exp: now + 86_400,
            nbf: now,
            iat: now,
            jti: "fuzz".into(),
            access: vec![Access {
                resource_type: "repository".into(),
                name: "team-a/app".into(),
                actions: vec!["pull".into(), "push".into(), "delete".into()],
            }],
            subject: TokenSubject {
                kind: "user".into(),
                groups: vec!["team-a".into()],
            },
        };
        let jwt = tokens.sign(&claims).expect("sign");
        let authz = Authz {
            tokens,
            policy: Arc::new(gateway::live_policy::LivePolicy::fixed(policy)),
            service: "registry.fuzz".into(),
            realm: Some("https://registry.fuzz/token".into()),
        };
        (authz, claims, jwt)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[m as usize % METHODS.len()];
    // What a client can put on the wire: Pingora hands the gateway a parsed URI.
    let Ok(mut head) = pingora::http::RequestHeader::build(method, rest, None) else {
        return;
    };
    let (authz, claims, jwt) = setup();
    head.insert_header("authorization", format!("Bearer {jwt}"))
        .expect("header");
    let verdict = authz.check(&head, &mut Operation::default());
    match verdict {
        Verdict::Forward { forward, .. } => {
            let uri = forward
                .uri
                .as_ref()
                .expect("a forwarded request carries the URI it was authorized as");
            if let Err(e) = forwarded_within_grant(claims, method, uri) {
                panic!("{e}");
            }
        }
        Verdict::Respond { failure, .. } => assert!((400..500).contains(&failure.status), "{}", failure.status),
    }
});
