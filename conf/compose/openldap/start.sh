#!/bin/sh
# Builds slapd's configuration and the example directory (once per container), then runs
# slapd in the foreground.
set -eu
s=/run/secrets
suffix="dc=example,dc=org"
if [ ! -d /etc/ldap/slapd.d ]; then
  mkdir -p /etc/ldap/slapd.d /var/lib/ldap
  cat > /tmp/config.ldif <<LDIF
dn: cn=config
objectClass: olcGlobal
cn: config

dn: cn=module{0},cn=config
objectClass: olcModuleList
cn: module{0}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/nis.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

dn: olcDatabase={-1}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {-1}frontend

dn: olcDatabase={0}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {0}config
olcAccess: {0}to * by * none

dn: olcDatabase={1}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {1}mdb
olcDbDirectory: /var/lib/ldap
olcSuffix: $suffix
olcAccess: {0}to attrs=userPassword by anonymous auth by * none
olcAccess: {1}to * by users read by * none
LDIF
  slapadd -n0 -F /etc/ldap/slapd.d -l /tmp/config.ldif
  user() {
    printf 'dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nuid: %s\ncn: %s\nsn: %s\nuserPassword: %s\n\n' \
      "$1" "$suffix" "$1" "$1" "$1" "$(slappasswd -s "$(cat "$s/$1-password")")"
  }
  {
    printf 'dn: %s\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n' "$suffix"
    for ou in people services groups; do
      printf 'dn: ou=%s,%s\nobjectClass: organizationalUnit\nou: %s\n\n' "$ou" "$suffix" "$ou"
    done
    printf 'dn: cn=reader,ou=services,%s\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\nuserPassword: %s\n\n' \
      "$suffix" "$(slappasswd -s "$(cat $s/ldap-reader-password)")"
    user alice
    user bob
    user carol
    printf 'dn: cn=registry-admins,ou=groups,%s\nobjectClass: groupOfNames\ncn: registry-admins\nmember: uid=alice,ou=people,%s\n\n' "$suffix" "$suffix"
    printf 'dn: cn=team-a,ou=groups,%s\nobjectClass: groupOfNames\ncn: team-a\nmember: uid=bob,ou=people,%s\n\n' "$suffix" "$suffix"
  } > /tmp/seed.ldif
  slapadd -n1 -F /etc/ldap/slapd.d -l /tmp/seed.ldif
  rm -f /tmp/seed.ldif /tmp/config.ldif
fi
exec slapd -d 0 -h "ldap:///" -F /etc/ldap/slapd.d
