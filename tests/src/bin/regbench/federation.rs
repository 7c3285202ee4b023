//! `--federation`: a CI job's OIDC token traded at the token endpoint (jwt-bearer grant and
//! JWT as Basic password) with the issuer's keys cached, against the JWKS GET.

use crate::cli::Args;
use crate::measure::{print_rate, rate};
use crate::sso::jwks_get;
use anyhow::{Context, ensure};
use portcullis_tests::client::{describe, https};
use portcullis_tests::deployment::SERVICE;
use std::path::Path;

/// `--federation`: a real IdP issues a CI token (RS256 JWT access token); a gateway in
/// production shape trusts it. After one exchange (keys fetched), `POST /token` with the
/// jwt-bearer grant and `GET /token` with the JWT as Basic password, against the JWKS GET.
pub(crate) async fn federation_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::oidc;
    let n = args.sso_grants;
    let conc = args.token_concurrency;
    println!("regbench --federation: {n} requests per measurement at concurrency {conc}");
    let storage = portcullis_tests::deployment::storage_node(&scratch.join("storage"))?;
    let port = portcullis_tests::tools::free_port()?;
    let g = portcullis_tests::deployment::start_gateway_with(
        scratch,
        &[&storage],
        &[],
        4,
        &oidc::federation_table(&format!("http://127.0.0.1:{port}")),
        &[],
    )?;
    let idp = oidc::start_ci_idp(port)?;
    let ci = oidc::ci_token(&idp.issuer, "ci-team-a", oidc::CI_SECRET, "urn:registry").await?;
    let http = https(&g.ca_pem, false);
    let grant = {
        let (http, url, ci) = (http.clone(), format!("{}/token", g.base), ci.clone());
        move || {
            let (http, url, ci) = (http.clone(), url.clone(), ci.clone());
            async move {
                let r = http
                    .post(&url)
                    .form(&[
                        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                        ("assertion", ci.as_str()),
                        ("client_id", "regbench"),
                        ("service", SERVICE),
                        ("scope", "repository:team-a/app:pull,push"),
                    ])
                    .send()
                    .await?;
                ensure!(r.status() == 200, "jwt-bearer grant: {}", describe(r).await);
                let v: serde_json::Value = r.json().await?;
                ensure!(v["access_token"].is_string(), "no access token");
                Ok(())
            }
        }
    };
    let password = {
        let url = format!(
            "{}/token?service={SERVICE}&scope=repository:team-a/app:pull,push",
            g.base
        );
        let (http, ci) = (http.clone(), ci.clone());
        move || {
            let (http, url, ci) = (http.clone(), url.clone(), ci.clone());
            async move {
                let r = http.get(&url).basic_auth("ci", Some(&ci)).send().await?;
                ensure!(r.status() == 200, "JWT password: {}", describe(r).await);
                r.bytes().await?;
                Ok(())
            }
        }
    };
    grant()
        .await
        .context("the first exchange (fetches the keys)")?;
    // Rounds interleave the three, so noise from other work on the machine hits them alike;
    // each keeps its best round.
    let reference = jwks_get(&http, &g.base);
    let mut best = [(0.0, Vec::new()), (0.0, Vec::new()), (0.0, Vec::new())];
    for _ in 0..args.rounds.max(1) {
        let round = [
            rate(n, conc, &reference).await?,
            rate(n, conc, &grant).await?,
            rate(n, conc, &password).await?,
        ];
        for (b, r) in best.iter_mut().zip(round) {
            if r.0 > b.0 {
                *b = r;
            }
        }
    }
    let [(j, jl), (r, rl), (p, pl)] = best;
    println!("best of {} rounds:", args.rounds.max(1));
    print_rate("GET /auth/jwks.json (reference)", j, &jl);
    print_rate("POST /token, jwt-bearer (CI token, keys cached)", r, &rl);
    print_rate("GET /token, CI token as Basic password", p, &pl);
    println!("  ratio jwt-bearer / reference: {:.2}×", r / j);
    println!("  ratio JWT password / reference: {:.2}×", p / j);
    Ok(())
}
