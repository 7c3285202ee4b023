#!/usr/bin/env bash
# Installs, on Debian 12, every package the test suite and the benchmarks use.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

packages=(
  skopeo podman buildah          # real registry clients
  docker-registry apache2-utils  # CNCF distribution 2.8.2, the peer for layout and speed
  busybox-static                 # image content made without pulling anything
  curl ca-certificates
  cmake pkg-config libssl-dev   # build dependencies of pingora (zlib-ng, openssl)
  openssl                       # TLS protocol checks (s_client)
  sslscan testssl.sh            # TLS review of the gateway (hostile test, docs/security.md)
  docker.io                     # dockerd for docker push/pull tests (the docker CLI is on the machine)
  nginx                         # regbench --gateway: the reference for serving a file over TLS
  slapd ldap-utils              # OpenLDAP for the LDAP login tests
  rsyslog rsyslog-openssl rsyslog-relp  # syslog receiver of the audit tests (UDP, TCP, TLS, RELP)
  prometheus                    # promtool check metrics
  redis-server                  # the shared state store of the HA tests
  haproxy                       # the load balancer in front of several gateways (HA tests)
  docker-compose debootstrap    # tests/compose.sh: the compose stack, images from a local Debian base
  python3-venv                  # the venv of moto (the S3-compatible server of the object-storage tests)
  time                          # regbench --scale: peak RSS of the GC dry runs (/usr/bin/time -v)
  chromium chromium-driver      # the web console's browser tests (WebDriver)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -q
  apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
fi

# The OpenID provider of the SSO tests: oidc-provider pinned by package-lock.json, on the
# machine's Node.js.
oidc_dir="$(cd "$(dirname "$0")" && pwd)/oidc"
if [ ! -d "$oidc_dir/node_modules/oidc-provider" ]; then
  echo "installing the test OpenID provider (npm ci)"
  (cd "$oidc_dir" && npm ci --no-audit --no-fund)
fi

# The Azure Blob Storage emulator of the object-storage tests: Microsoft's Azurite, pinned by
# package-lock.json.
azurite_dir="$(cd "$(dirname "$0")" && pwd)/azurite"
if [ ! -x "$azurite_dir/node_modules/.bin/azurite-blob" ]; then
  echo "installing azurite (Azure Blob Storage emulator; npm ci)"
  (cd "$azurite_dir" && npm ci --no-audit --no-fund)
fi

# The S3-compatible server of the object-storage tests: moto, pinned, in its own venv.
moto_dir="$(cd "$(dirname "$0")" && pwd)/moto"
if [ ! -x "$moto_dir/venv/bin/moto_server" ]; then
  echo "installing moto (S3-compatible server) in $moto_dir/venv"
  python3 -m venv "$moto_dir/venv"
  "$moto_dir/venv/bin/pip" install -q --disable-pip-version-check "moto[s3]==5.2.5" flask flask-cors
fi
