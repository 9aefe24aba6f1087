#!/usr/bin/env bash
# The compose stack on this machine's Docker engine: build the image from a static binary
# (no registry needed), bring up the gateway and two echo backends, connect a WebSocket
# through the published port, edit config.toml on the host and see the change without a
# restart, then `docker-compose down`.
set -euo pipefail
{
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
log() { printf '[docker-test %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
COMPOSE=(docker-compose -f docker/docker-compose.yml -p wsgateci)

log "static binary"
RUSTFLAGS="-C target-feature=+crt-static" pgo/build.sh --target x86_64-unknown-linux-gnu >&2
ctx=$(mktemp -d)
cfg=$(mktemp -d)
cleanup() {
  "${COMPOSE[@]}" down -t 5 >/dev/null 2>&1 || true
  rm -rf "$ctx" "$cfg"
}
trap cleanup EXIT
cp target/x86_64-unknown-linux-gnu/release/wsgate docker/config/config.toml "$ctx/"
log "image wsgate:local (FROM scratch)"
docker build -q -f docker/Dockerfile.local -t wsgate:local "$ctx" >&2

# The config directory is bind-mounted; the container's user (65532) must be able to read it.
cp docker/config/config.toml "$cfg/"
chmod 755 "$cfg"; chmod 644 "$cfg/config.toml"
# The published port: free on every address, and below the ephemeral range, so that no
# outgoing connection can take it between this check and Docker's bind (that race once
# failed a run with "address already in use"). A failed start is retried on another port.
free_port() {
  python3 -c '
import random, socket
for _ in range(500):
    port = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break'
}
export WSGATE_CONFIG_DIR="$cfg"
for attempt in 1 2 3; do
  port=$(free_port)
  export WSGATE_PORT="$port"
  log "compose up (port $port)"
  "${COMPOSE[@]}" up -d gateway echo1 echo2 >&2 && break
  "${COMPOSE[@]}" down -t 5 >/dev/null 2>&1 || true
  (( attempt < 3 )) || { log "FAIL: the stack did not start"; exit 1; }
done

probe() { timeout 10 python3 tests/docker/ws_probe.py "127.0.0.1:$port" 2>/dev/null || true; }
seen=""
for _ in $(seq 100); do
  seen="$seen $(probe)"
  [[ "$seen" == *echo-1* && "$seen" == *echo-2* ]] && break
  sleep 0.2
done
[[ "$seen" == *echo-1* && "$seen" == *echo-2* ]] || { "${COMPOSE[@]}" logs >&2; log "FAIL: no WebSocket reached both backends: $seen"; exit 1; }
log "WebSockets through the published port reach both backends"

log "edit config.toml on the host: only echo2"
sed -i 's/servers = \["echo1:9000", "echo2:9000"\]/servers = ["echo2:9000"]/' "$cfg/config.toml"
ok=0
for _ in $(seq 100); do
  if [[ "$(probe)" == *echo-2* ]]; then ok=$((ok + 1)); else ok=0; fi
  (( ok >= 6 )) && break
  sleep 0.1
done
if (( ok < 6 )); then "${COMPOSE[@]}" logs >&2; log "FAIL: the edit was not applied"; exit 1; fi
restarts=$(docker inspect -f '{{.RestartCount}}' "$("${COMPOSE[@]}" ps -q gateway)")
[[ "$restarts" == 0 ]] || { log "FAIL: the gateway container restarted"; exit 1; }
log "the edit is live without a restart; docker-compose down"
"${COMPOSE[@]}" down -t 5 >&2
echo "docker-test: PASS"
}
