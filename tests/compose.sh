#!/usr/bin/env bash
# Brings up docker-compose.yml with Debian's dockerd and checks it end to end: docker-compose
# config validates, every image builds here (nothing can be pulled: the base is a Debian 12
# made with debootstrap and `docker import`ed), then through the load balancer an LDAP user
# logs in, pushes and pulls with skopeo (digests compared) and with docker, a token from one
# gateway is used on the other, and the stack goes down with its volumes.
# Needs the release binaries (cargo build --release) and tests/services/install.sh.
# Prints the time each phase took. Run by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="$root/target/compose"
mkdir -p "$work"
started=$(date +%s)
phase() { echo "compose: $1 ($(( $(date +%s) - started )) s)"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Our own dockerd (bridge networks and published ports need its iptables rules).
export DOCKER_HOST="unix://$work/docker.sock"
dockerd --data-root "$work/data" --exec-root "$work/exec" -H "$DOCKER_HOST" \
  --pidfile "$work/dockerd.pid" --storage-driver overlay2 --bridge=none \
  > "$work/dockerd.log" 2>&1 &
dockerd_pid=$!
project="portcullis-ci-$$"
cleanup() {
  docker-compose -p "$project" down -v --remove-orphans > /dev/null 2>&1 || true
  rm -rf "/etc/docker/certs.d/localhost:${port:-0}"
  kill "$dockerd_pid" 2> /dev/null || true
  wait "$dockerd_pid" 2> /dev/null || true
  # dockerd leaves its network namespace mounted under its exec root; the tree cannot be
  # removed (target/ of a finished run included) until it is unmounted.
  awk -v root="$work/exec/" 'index($2, root) == 1 { print $2 }' /proc/mounts |
    xargs -r umount 2> /dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do docker info > /dev/null 2>&1 && break; sleep 0.2; done
docker info > /dev/null
phase "dockerd up"

docker-compose config -q
phase "docker-compose config validates"

if ! docker image inspect portcullis/debian:bookworm > /dev/null 2>&1; then
  if [ ! -x "$work/rootfs/usr/bin/apt-get" ]; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian > "$work/debootstrap.log"
  fi
  tar -C "$work/rootfs" -c . | docker import - portcullis/debian:bookworm > /dev/null
fi
export PORTCULLIS_BASE_IMAGE=portcullis/debian:bookworm
# The IdP's node: the machine's (the one the SSO tests run), on that base.
rm -rf "$work/node" && mkdir -p "$work/node"
cp "$(command -v node)" "$work/node/node"
printf 'FROM portcullis/debian:bookworm\nCOPY node /usr/local/bin/node\n' > "$work/node/Dockerfile"
docker build -q -t portcullis/node:local "$work/node" > "$work/node.log" 2>&1
export PORTCULLIS_NODE_IMAGE=portcullis/node:local
phase "base images"

conf/compose/make-secrets.sh > /dev/null
secrets="$root/conf/compose/secrets"
port=$(free_port)
export PORTCULLIS_PORT=$port PORTCULLIS_IDP_PORT=$(free_port) PORTCULLIS_PROMETHEUS_PORT=$(free_port)
docker-compose -p "$project" build -q > "$work/build.log" 2>&1 || { tail -50 "$work/build.log"; df -h "$work"; exit 1; }
phase "images built"
docker-compose -p "$project" up -d > "$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
registry="localhost:$port"
ok=""
for _ in $(seq 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$secrets/ca.crt" "https://$registry/v2/" || true)
  if [ "$code" = 401 ]; then ok=1; break; fi
  sleep 0.5
done
if [ -z "$ok" ]; then
  docker-compose -p "$project" ps
  docker-compose -p "$project" logs --tail 30
  exit 1
fi
phase "stack up, the load balancer answers"

# Only the load balancer (and the two 127.0.0.1 try-out ports) are published.
published=$(docker-compose -p "$project" ps | grep -c -- '->' || true)
[ "$published" = 3 ] || { docker-compose -p "$project" ps; echo "expected 3 published ports"; exit 1; }

# An LDAP user logs in, pushes and pulls with skopeo through the load balancer.
ctr="$work/containers"
rm -rf "$ctr" && mkdir -p "$ctr/certs" "$ctr/img"
cp "$secrets/ca.crt" "$ctr/certs/"
export REGISTRY_AUTH_FILE="$ctr/auth.json"
skopeo login --cert-dir "$ctr/certs" -u bob -p "$(cat "$secrets/bob-password")" "$registry" > /dev/null
head -c 65536 /dev/urandom > "$ctr/layer"
layer=$(sha256sum "$ctr/layer" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux"}' > "$ctr/config"
config=$(sha256sum "$ctr/config" | cut -d' ' -f1)
cp "$ctr/layer" "$ctr/img/$layer"
cp "$ctr/config" "$ctr/img/$config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":65536}]}' \
  "$config" "$(stat -c %s "$ctr/config")" "$layer" > "$ctr/img/manifest.json"
echo "Directory Transport Version: 1.1" > "$ctr/img/version"
skopeo copy -q --preserve-digests --dest-cert-dir "$ctr/certs" "dir:$ctr/img" "docker://$registry/team-a/compose:v1"
skopeo copy -q --src-cert-dir "$ctr/certs" "docker://$registry/team-a/compose:v1" "dir:$ctr/back"
cmp "$ctr/img/manifest.json" "$ctr/back/manifest.json"
cmp "$ctr/layer" "$ctr/back/$layer"
phase "skopeo: LDAP login, push, pull back identical"

# carol (in no group) may not push; the local admin may.
if skopeo copy -q --dest-creds "carol:$(cat "$secrets/carol-password")" --dest-cert-dir "$ctr/certs" \
   "dir:$ctr/img" "docker://$registry/team-a/compose:carol" 2> /dev/null; then
  echo "carol pushed to team-a"; exit 1
fi
skopeo copy -q --dest-creds "admin:$(cat "$secrets/admin-password")" --dest-cert-dir "$ctr/certs" \
  "dir:$ctr/img" "docker://$registry/library/compose:v1"

# docker: login, push and pull through the load balancer.
mkdir -p "/etc/docker/certs.d/$registry"
cp "$secrets/ca.crt" "/etc/docker/certs.d/$registry/ca.crt"
rm -rf "$work/bb" && mkdir -p "$work/bb/bin"
cp /bin/busybox "$work/bb/bin/"
tar -C "$work/bb" -c . | docker import - "$registry/team-a/busybox:v1" > /dev/null
docker --config "$ctr/docker" login -u bob --password-stdin "$registry" < "$secrets/bob-password" > /dev/null
docker --config "$ctr/docker" push -q "$registry/team-a/busybox:v1" > /dev/null
pushed=$(docker image inspect -f '{{index .RepoDigests 0}}' "$registry/team-a/busybox:v1")
docker rmi -f "$registry/team-a/busybox:v1" > /dev/null
docker --config "$ctr/docker" pull -q "$registry/team-a/busybox:v1" > /dev/null
pulled=$(docker image inspect -f '{{index .RepoDigests 0}}' "$registry/team-a/busybox:v1")
[ "$pushed" = "$pulled" ] || { echo "docker pulled $pulled, pushed $pushed"; exit 1; }
phase "docker: login, push, pull"

# Both gateways served (HAProxy spreads connections), and share state through Redis: each
# one's metrics count token requests.
for g in gateway-1 gateway-2; do
  n=$(docker-compose -p "$project" exec -T "$g" curl -fsS http://127.0.0.1:9443/metrics \
      | awk '/^gateway_token_requests_total/ { s += $2 } END { print s + 0 }')
  [ "$n" -gt 0 ] || { echo "$g served no token request"; exit 1; }
done
# The gateways saw the clients' address (PROXY protocol), never the load balancer's.
events=$(docker-compose -p "$project" logs --no-color gateway-1 gateway-2 | { grep -o '"source.ip":"[^"]*"' || true; } | sort | uniq -c)
echo "$events"
if echo "$events" | grep -q '172.31.250.200'; then echo "a gateway saw the load balancer as the client"; exit 1; fi
echo "$events" | grep -q '"source.ip"' || { echo "no audit event with source.ip"; exit 1; }
phase "both gateways served, each client's own address audited; done"
