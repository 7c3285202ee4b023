//! `--ldap`: logins at the token endpoint against a real slapd, cached and uncached, next to
//! slapd's own bind rate.

use crate::cli::Args;
use crate::measure::{print_rate, rate};
use anyhow::{Context, ensure};
use portcullis_tests::client::{describe, https};
use portcullis_tests::deployment::SERVICE;
use portcullis_tests::server::{GatewayServer, StorageServer};
use std::path::Path;

/// `--ldap`: a real slapd (seeded like the tests, plus a user in 50 groups) behind the
/// gateway in production shape.
pub(crate) async fn ldap_suite(args: &Args, scratch: &Path) -> anyhow::Result<()> {
    use portcullis_tests::ldap::{self, READER_DN, READER_PW, SUFFIX, Slapd};
    let slapd = Slapd::start().context("starting slapd")?;
    let mut ldif = ldap::user_ldif("many");
    for i in 0..50 {
        ldif.push_str(&format!(
            "dn: cn=bench-{i:02},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: bench-{i:02}\nmember: uid=many,ou=people,{SUFFIX}\n\n"
        ));
    }
    slapd.modify("ldapadd", &ldif)?;
    let table = |ttl: u64| {
        format!(
            "\n[auth.ldap]\nurls = [\"{url}\"]\nbind_dn = \"{READER_DN}\"\nuser_base_dn = \"ou=people,{SUFFIX}\"\n\
             user_filter = \"(objectClass=inetOrgPerson)\"\ngroup_base_dn = \"ou=groups,{SUFFIX}\"\ncache_ttl_seconds = {ttl}\n",
            url = slapd.url
        )
    };
    let env = [("PORTCULLIS_LDAP_BIND_PASSWORD", READER_PW)];
    let start = |name: &str, ttl: u64| -> anyhow::Result<(StorageServer, GatewayServer)> {
        let d = scratch.join(name);
        std::fs::create_dir_all(&d)?;
        let storage = portcullis_tests::deployment::storage_node(&d.join("storage"))?;
        let g = portcullis_tests::deployment::start_gateway_with(
            &d,
            &[&storage],
            &[],
            4,
            &table(ttl),
            &env,
        )?;
        Ok((storage, g))
    };
    let (_s1, cached) = start("cached", 300)?;
    let (_s2, uncached) = start("uncached", 0)?;
    let conc = args.token_concurrency;
    println!(
        "regbench --ldap: slapd {} ({} groups for `many`), token requests at concurrency {conc}",
        slapd.url, 50
    );
    let get_token = |g: &GatewayServer, user: &'static str| {
        let http = https(&g.ca_pem, false);
        let url = format!(
            "{}/token?service={SERVICE}&scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush",
            g.base
        );
        move || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .get(&url)
                    .basic_auth(user, Some(ldap::password(user)))
                    .send()
                    .await?;
                ensure!(r.status() == 200, "token: {}", describe(r).await);
                let v: serde_json::Value = r.json().await?;
                ensure!(v["token"].is_string(), "no token");
                Ok(())
            }
        }
    };

    // slapd's own rate: simple binds of the same user on reused connections (ldap3).
    let binds = {
        let url = slapd.url.clone();
        let dn = format!("uid=bob,ou=people,{SUFFIX}");
        let pw = ldap::password("bob");
        let mut conns = Vec::new();
        for _ in 0..conc {
            let (conn, ldap) = ldap3::LdapConnAsync::new(&url).await?;
            tokio::spawn(async move {
                let _ = conn.drive().await;
            });
            conns.push(ldap);
        }
        let pool = std::sync::Arc::new(std::sync::Mutex::new(conns));
        move || {
            let (pool, dn, pw) = (pool.clone(), dn.clone(), pw.clone());
            async move {
                let mut l = pool.lock().expect("pool").pop().context("no connection")?;
                let r = l.simple_bind(&dn, &pw).await?;
                pool.lock().expect("pool").push(l);
                ensure!(r.rc == 0, "bind: {}", r.rc);
                Ok(())
            }
        }
    };
    let (b, bl) = rate(args.ldap_uncached, conc, binds).await?;
    print_rate("slapd simple bind (reference)", b, &bl);
    let (u, ul) = rate(args.ldap_uncached, conc, get_token(&uncached, "bob")).await?;
    print_rate("token, LDAP uncached (search, bind, 2 groups)", u, &ul);
    println!("  ratio uncached tokens / slapd binds: {:.2}×", u / b);
    let (m, ml) = rate(200, 1, get_token(&uncached, "many")).await?;
    print_rate("token, LDAP uncached, 50 groups, one at a time", m, &ml);
    let f = get_token(&cached, "bob");
    f().await?; // fills the cache
    let (c, cl) = rate(args.ldap_cached, conc, f).await?;
    print_rate("token, LDAP cached", c, &cl);
    Ok(())
}
