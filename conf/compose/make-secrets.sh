#!/usr/bin/env bash
# Makes the secrets docker-compose.yml mounts, as files in conf/compose/secrets/ (mode 0600,
# never committed): the internal secret, the pepper of stored robot secrets, Redis's password, the token signing key, a CA and the
# registry's TLS certificate (for localhost and 127.0.0.1), the local admin's htpasswd, the
# LDAP service account's and example users' passwords, the OIDC client secret.
# Existing files are kept. Prints where the generated passwords are.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
cd secrets
rand() { openssl rand -base64 24 | tr -d '/+=\n' | cut -c1-24; }
for f in internal-secret pepper redis-password ldap-reader-password oidc-client-secret \
         admin-password alice-password bob-password carol-password; do
  [ -s "$f" ] || rand > "$f"
done
[ -s signing-key.pem ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out signing-key.pem 2>/dev/null
if [ ! -s tls-cert.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=Portcullis compose CA" -keyout ca-key.pem -out ca.crt 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout tls-key.pem -out tls.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > tls.ext
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca-key.pem -CAcreateserial -days 825 \
    -extfile tls.ext -out tls-cert.pem 2>/dev/null
  rm -f tls.csr tls.ext ca.srl
fi
[ -s htpasswd ] || htpasswd -nbB -C 10 admin "$(cat admin-password)" | head -n 1 > htpasswd
# The containers run as unprivileged users: let them read the files (the directory stays 0700
# to everyone but this machine's owner and root).
chmod 0644 ./*
chmod 0600 ca-key.pem
chmod 0700 .
echo "secrets in $(pwd): the registry's CA is ca.crt; passwords: admin-password, alice-password, bob-password, carol-password"
