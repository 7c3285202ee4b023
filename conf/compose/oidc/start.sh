#!/bin/sh
# The example IdP: client `portcullis` (secret from a file), users alice (registry-admins) and
# bob (team-a) with passwords from files.
set -eu
s=/run/secrets
export IDP_PORT=3000 IDP_LISTEN_HOST=0.0.0.0 IDP_ISSUER="${IDP_ISSUER:-http://idp.portcullis.test:3000}"
export IDP_CLIENTS="[{\"client_id\":\"portcullis\",\"client_secret\":\"$(cat $s/oidc-client-secret)\",
 \"redirect_uris\":[\"https://localhost:8443/auth/oidc/callback\"],
 \"grant_types\":[\"authorization_code\",\"refresh_token\",\"urn:ietf:params:oauth:grant-type:device_code\"],
 \"response_types\":[\"code\"]}]"
export IDP_USERS="{\"alice\":{\"password\":\"$(cat $s/alice-password)\",\"groups\":[\"registry-admins\"]},
 \"bob\":{\"password\":\"$(cat $s/bob-password)\",\"groups\":[\"team-a\"]}}"
exec node idp.mjs
