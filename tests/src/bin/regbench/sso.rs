//! `--sso`: the refresh grant of a session made by single sign-on (a real OpenID provider),
//! against the gateway's JWKS GET, the cheapest request on the same TLS path.

use crate::cli::Args;
use crate::measure::{print_rate, rate};
use anyhow::ensure;
use portcullis_tests::client::{describe, https};
use portcullis_tests::deployment::SERVICE;
use std::path::Path;

/// `--sso`: a real IdP (oidc-provider) and a gateway in production shape; a browser sign-in
/// for bob; then `POST /token` with his refresh token, against `GET /auth/jwks.json` (the same
/// TLS and HTTP path, no work) as the reference. A second gateway reads groups from the IdP at
/// every refresh (`groups_refresh_seconds = 0`), to show what that costs.
pub(crate) async fn sso_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::oidc;
    let users = serde_json::json!({"bob": {"password": "bob-idp-pw", "groups": ["team-a"]}});
    let conc = args.token_concurrency;
    println!(
        "regbench --sso: {} requests per measurement at concurrency {conc}",
        args.sso_grants
    );
    for (name, extra, n) in [
        ("groups cached (shipped 300 s)", "", args.sso_grants),
        (
            "groups read at the IdP every time",
            "groups_refresh_seconds = 0",
            (args.sso_grants / 20).max(50),
        ),
    ] {
        let dir = scratch.join(name.split(' ').next().unwrap_or("sso"));
        std::fs::create_dir_all(&dir)?;
        let (_storage, g, idp) = oidc::start_sso(&dir, extra, &users)?;
        let http = https(&g.ca_pem, false);
        let refresh = oidc::sign_in(&http, &g.base, &idp, "bob", "bob-idp-pw", "bench").await?;
        let jwks = jwks_get(&http, &g.base);
        let grant = {
            let (http, url) = (http.clone(), format!("{}/token", g.base));
            let refresh = refresh.clone();
            move || {
                let (http, url, refresh) = (http.clone(), url.clone(), refresh.clone());
                async move {
                    let r = http
                        .post(&url)
                        .form(&[
                            ("grant_type", "refresh_token"),
                            ("refresh_token", refresh.as_str()),
                            ("client_id", "regbench"),
                            ("service", SERVICE),
                            ("scope", "repository:team-a/app:pull,push"),
                        ])
                        .send()
                        .await?;
                    ensure!(r.status() == 200, "refresh grant: {}", describe(r).await);
                    let v: serde_json::Value = r.json().await?;
                    ensure!(v["access_token"].is_string(), "no access token");
                    Ok(())
                }
            }
        };
        println!("{name}:");
        let (j, jl) = rate(n, conc, jwks).await?;
        print_rate("GET /auth/jwks.json (reference)", j, &jl);
        let (r, rl) = rate(n, conc, grant).await?;
        print_rate("POST /token, refresh_token (SSO session)", r, &rl);
        println!("  ratio refresh grants / reference: {:.2}×", r / j);
    }
    Ok(())
}

/// A GET of the gateway's JWKS: the same TLS and HTTP path as a token request, no work.
pub(crate) fn jwks_get(
    http: &reqwest::Client,
    base: &str,
) -> impl Fn() -> futures_util::future::BoxFuture<'static, anyhow::Result<()>> + use<> {
    let (http, url) = (http.clone(), format!("{base}/auth/jwks.json"));
    move || {
        let (http, url) = (http.clone(), url.clone());
        Box::pin(async move {
            let r = http.get(&url).send().await?;
            ensure!(r.status() == 200, "jwks: {}", describe(r).await);
            r.bytes().await?;
            Ok(())
        })
    }
}
