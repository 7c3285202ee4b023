//! The token endpoint (`GET`/`POST /token`, Docker token spec and OAuth2 forms): any method,
//! query, `Authorization` header and form body. Input: a method byte, then the query, the
//! header and the body separated by NULs. Never a panic, never a 5xx (the state store is in
//! memory and cannot fail), always a JSON answer, and an access token only for the right
//! password or none asked for.
#![no_main]

use gateway::token::{Request, TokenService};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn service() -> &'static (tokio::runtime::Runtime, TokenService) {
    static S: OnceLock<(tokio::runtime::Runtime, TokenService)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let key = gateway::token::keys::SigningKey::from_pem(
            &gateway::token::keys::generate_pem().expect("key"),
        )
        .expect("key");
        let tokens = Arc::new(gateway::token::jwt::Tokens::new(
            vec![key],
            "fuzz",
            "registry.fuzz",
        ));
        let mut groups = std::collections::BTreeMap::new();
        groups.insert("team-a".to_string(), vec!["bob".to_string()]);
        let users = gateway::auth::htpasswd::Htpasswd::parse(
            &format!("bob:{}\n", bcrypt::hash("pw", 4).expect("hash")),
            &groups,
        )
        .expect("htpasswd");
        let policy = policy::Policy::compile("policy.toml", include_str!("../../conf/policy.toml"))
            .expect("the shipped policy");
        let store: Arc<dyn gateway::state::StateStore> =
            Arc::new(gateway::state::MemoryStore::default());
        let service = TokenService {
            tokens,
            auth: Arc::new(users),
            policy: Arc::new(gateway::live_policy::LivePolicy::fixed(policy)),
            sessions: gateway::token::refresh::Sessions::new(store.clone(), 86_400, 86_400),
            users: None,
            expires_in_seconds: 300,
            oidc: None,
            reread_lock: Default::default(),
            robots: None,
            federation: None,
            limits: Arc::new(gateway::limits::Limits::new(Default::default(), store)),
        };
        (rt, service)
    })
}

const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |&b| b == 0);
    let (query, header, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (Ok(query), Ok(header)) = (std::str::from_utf8(query), std::str::from_utf8(header)) else {
        return;
    };
    let (rt, service) = service();
    let req = Request {
        method: METHODS[m as usize % METHODS.len()],
        query: (!query.is_empty()).then_some(query),
        authorization: (!header.is_empty()).then_some(header),
        body,
        source: Some("192.0.2.1"),
    };
    let reply = rt.block_on(service.handle(&req));
    assert!(reply.status < 500, "{} {}", reply.status, reply.body);
    let json: serde_json::Value = serde_json::from_str(&reply.body).expect("a JSON answer");
    if reply.status == 200
        && let Some(token) = json["token"].as_str()
    {
        let claims = service.tokens.verify(token).expect("an issued token verifies");
        if claims.sub == "bob" {
            let basic = gateway::token::parse_basic(header);
            let form_password = form_urlencoded::parse(body).any(|(k, v)| k == "password" && v == "pw");
            assert!(
                basic.is_some_and(|(u, p)| u == "bob" && p == "pw") || form_password,
                "a token for bob without his password: {header:?} {body:?}"
            );
        }
    }
});
