//! A real OpenLDAP `slapd` for tests: its own cn=config in a temporary directory (mdb
//! database for `dc=example,dc=org`, the memberof overlay), plain LDAP and LDAPS (plus
//! StartTLS) on free loopback ports with a certificate from a generated CA, seeded over LDAP
//! (`ldapadd`) so the overlay fills `memberOf`. Stopped on drop.
//!
//! Directory: `ou=people` (alice, bob, carol, dave), `ou=services` (the read-only `reader`),
//! `ou=groups`: groupOfNames `registry-admins` (alice and the group `ops`), `team-a` (bob),
//! `ops` (dave), posixGroup `posix-team` (memberUid bob). carol is in no group.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SUFFIX: &str = "dc=example,dc=org";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
pub const ADMIN_PW: &str = "admin-secret";
pub const READER_DN: &str = "cn=reader,ou=services,dc=example,dc=org";
pub const READER_PW: &str = "reader-secret";

/// Password of every seeded user `<name>`: `<name>-ldap-pw`.
pub fn password(user: &str) -> String {
    format!("{user}-ldap-pw")
}

pub struct Slapd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// `ldap://127.0.0.1:<port>` (StartTLS available)
    pub url: String,
    /// `ldaps://127.0.0.1:<port>`
    pub ldaps_url: String,
    /// The CA that signed slapd's certificate.
    pub ca_file: PathBuf,
}

fn config_ldif(dir: &Path, tls: &gateway::edge::tls::TlsFiles) -> String {
    let d = dir.display();
    format!(
        "dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {d}/slapd.pid
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: memberof

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/nis.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {d}/db
olcDbMaxSize: 268435456
olcSuffix: {SUFFIX}
olcRootDN: {ADMIN_DN}
olcRootPW: {ADMIN_PW}
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfRefInt: TRUE
",
        cert = tls.cert.display(),
        key = tls.key.display(),
    )
}

fn seed_ldif() -> String {
    let mut s = format!(
        "dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: {READER_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: {READER_PW}

"
    );
    for u in ["alice", "bob", "carol", "dave"] {
        s.push_str(&user_ldif(u));
    }
    s.push_str(&format!(
        "dn: cn=ops,ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: ops
member: uid=dave,ou=people,{SUFFIX}

dn: cn=registry-admins,ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: registry-admins
member: uid=alice,ou=people,{SUFFIX}
member: cn=ops,ou=groups,{SUFFIX}

dn: cn=team-a,ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: team-a
member: uid=bob,ou=people,{SUFFIX}

dn: cn=posix-team,ou=groups,{SUFFIX}
objectClass: posixGroup
cn: posix-team
gidNumber: 5000
memberUid: bob

"
    ));
    s
}

/// An inetOrgPerson `uid=<name>,ou=people` with password [`password`]`(name)`.
pub fn user_ldif(name: &str) -> String {
    format!(
        "dn: uid={name},ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: {name}
cn: {name}
sn: {name}
userPassword: {pw}

",
        pw = password(name)
    )
}

impl Slapd {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tls = gateway::edge::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
        std::fs::create_dir_all(dir.path().join("db"))?;
        std::fs::create_dir_all(dir.path().join("slapd.d"))?;
        let ldif = dir.path().join("config.ldif");
        std::fs::write(&ldif, config_ldif(dir.path(), &tls))?;
        crate::tools::run(
            Command::new("slapadd")
                .args(["-n", "0", "-F"])
                .arg(dir.path().join("slapd.d"))
                .arg("-l")
                .arg(&ldif),
        )
        .context("loading slapd's cn=config (apt-get install slapd ldap-utils)")?;
        let port = crate::tools::free_port()?;
        let tls_port = crate::tools::free_port()?;
        let mut s = Slapd {
            child: None,
            url: format!("ldap://127.0.0.1:{port}"),
            ldaps_url: format!("ldaps://127.0.0.1:{tls_port}"),
            ca_file: tls.ca_cert.clone(),
            dir,
        };
        s.run()?;
        s.modify("ldapadd", &seed_ldif())?;
        Ok(s)
    }

    /// Starts slapd (again) on the same ports and data, and waits until it answers.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let child = Command::new("slapd")
            .args(["-d", "0", "-h"])
            .arg(format!("{}/ {}/", self.url, self.ldaps_url))
            .arg("-F")
            .arg(self.dir.path().join("slapd.d"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting slapd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("ldapsearch")
                .args([
                    "-x",
                    "-H",
                    &self.url,
                    "-s",
                    "base",
                    "-b",
                    "",
                    "namingContexts",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("slapd exited ({status}) before answering");
            }
            if Instant::now() > deadline {
                bail!("slapd did not answer on {} within 15 s", self.url);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops slapd (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `ldapadd` or `ldapmodify` as the directory's admin with `ldif` on stdin.
    pub fn modify(&self, tool: &str, ldif: &str) -> anyhow::Result<()> {
        let mut child = Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PW])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {tool}"))?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(ldif.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Adds `uid=<user>` to the groupOfNames `cn=<group>`.
    pub fn add_to_group(&self, user: &str, group: &str) -> anyhow::Result<()> {
        self.modify(
            "ldapmodify",
            &format!(
                "dn: cn={group},ou=groups,{SUFFIX}\nchangetype: modify\nadd: member\nmember: uid={user},ou=people,{SUFFIX}\n"
            ),
        )
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
