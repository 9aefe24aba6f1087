#!/usr/bin/env bash
# Makes pgo/wsgate.profdata anew: builds an instrumented wsgate, runs the gateway's main
# job through it on loopback, and merges the counts the binary wrote.
#
#   pgo/train.sh
#
# Run it after a change to the handshake or relay path, or to Cargo.lock, and commit the
# new profile with the change (pgo/README.md says why and what it measured). It takes
# ~4 minutes on 2 cores. Needs llvm-profdata of the LLVM major version rustc reports
# (`rustc -vV`): Debian's llvm-N package, or `rustup component add llvm-tools`; openssl
# for the test certificate, and curl. Ports 8301-8302, 9301-9303.
#
# The load is the benchmark's (bench/run.sh): handshakes, 64 B binary and text messages,
# 16 KiB messages, idle tunnels answering heartbeats; and the same through a second
# gateway over TLS, so the TLS listener and TLS backend paths are trained too. A path the
# training never runs is laid out as cold code, so what the gateway does in production
# belongs here.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WORK="$ROOT/target/pgo-train"
die() { echo "pgo/train.sh: $*" >&2; exit 1; }
say() { echo "[pgo/train.sh $(date +%H:%M:%S)] $*" >&2; }

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=""
for candidate in "llvm-profdata-$llvm_major" \
  "$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"; do
  if command -v "$candidate" >/dev/null 2>&1; then profdata=$candidate; break; fi
done
[[ -n "$profdata" ]] || die "no llvm-profdata for LLVM $llvm_major (apt-get install llvm-$llvm_major, or rustup component add llvm-tools)"
command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

rm -rf "$WORK/raw" "$WORK/run"
mkdir -p "$WORK/raw" "$WORK/run"
say "building the instrumented gateway ($WORK/release/wsgate)"
CARGO_TARGET_DIR="$WORK" RUSTFLAGS="-Cprofile-generate=$WORK/raw" \
  cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" >&2
# The build's own programs (build scripts, proc macros) are instrumented too and left
# counts here while cargo ran them: only the gateway's traffic belongs in the profile.
rm -f "$WORK"/raw/*.profraw
say "building the load generator and echo backend (bench/harness/wsload)"
cargo build --release --manifest-path "$ROOT/bench/harness/wsload/Cargo.toml" >&2
BIN_DIR="$ROOT/bench/harness/wsload/target/release"
WSGATE="$WORK/release/wsgate"
run="$WORK/run"

PIDS=()
stop_all() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop_all EXIT

# A CA and a server certificate signed by it (webpki refuses a CA as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=wsgate-pgo-ca -keyout "$run/ca.key" -out "$run/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
  -keyout "$run/key.pem" -out "$run/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n' >"$run/server.ext"
openssl x509 -req -in "$run/server.csr" -CA "$run/ca.pem" -CAkey "$run/ca.key" -CAcreateserial \
  -days 2 -extfile "$run/server.ext" -out "$run/cert.pem" 2>/dev/null

# The front gateway: the benchmark's route, and /tls/ to the back gateway over TLS.
# Heartbeats every second, so the idle tunnels of the hold phase run them.
cat >"$run/front.toml" <<TOML
[gateway]
workers = 1
admin = "127.0.0.1:9303"
[defaults]
ping_interval = "1s"
[[listener]]
name = "plain"
bind = "127.0.0.1:8301"
[[route]]
path = "/"
upstream = "echo"
[[route]]
path = "/tls/"
upstream = "back"
[upstream.echo]
servers = ["127.0.0.1:9301", "127.0.0.1:9302"]
[upstream.back]
servers = ["wss://127.0.0.1:8302"]
ca = "ca.pem"
TOML
# The back gateway: a TLS listener in front of the same echo backend.
cat >"$run/back.toml" <<TOML
[gateway]
workers = 1
[[listener]]
name = "tls"
bind = "127.0.0.1:8302"
tls = { cert = "cert.pem", key = "key.pem" }
[[route]]
path = "/"
upstream = "echo"
[upstream.echo]
servers = ["127.0.0.1:9301"]
TOML

"$BIN_DIR/echo-backend" --ports 9301,9302 --threads 1 >"$run/backend.log" 2>&1 &
PIDS+=($!)
ulimit -n "$(ulimit -Hn)"
RUST_LOG=warn "$WSGATE" run -c "$run/back.toml" 2>"$run/back.log" &
back=$!
PIDS+=("$back")
RUST_LOG=warn "$WSGATE" run -c "$run/front.toml" 2>"$run/front.log" &
front=$!
PIDS+=("$front")
plain=ws://127.0.0.1:8301/
tls=ws://127.0.0.1:8301/tls/
"$BIN_DIR/wsload" probe --url "$plain,$tls" --timeout 20 >/dev/null || die "the gateways did not answer (see $run)"

load() { say "wsload $*"; "$BIN_DIR/wsload" "$@" >/dev/null; }
load handshakes --url "$plain" --conns 32 --duration 6
load echo-throughput --url "$plain" --size 64 --duration 6 --warmup 1
load echo-throughput --url "$plain" --size 64 --text --duration 3 --warmup 1
load echo-throughput --url "$plain" --size 16384 --conns 16 --inflight 4 --duration 4 --warmup 1
load hold --url "$plain" --conns 2000 --hold 3 --linger 2 --answer-pings
load handshakes --url "$tls" --conns 16 --duration 3
load echo-throughput --url "$tls" --size 64 --duration 3 --warmup 1
load echo-throughput --url "$tls" --size 16384 --conns 16 --inflight 4 --duration 3 --warmup 1
for _ in $(seq 20); do
  for path in status metrics healthz; do
    curl -fsS -o /dev/null "http://127.0.0.1:9303/$path"
  done
done

# The counts are written when the gateway exits, after SIGTERM's graceful shutdown.
kill -TERM "$front" "$back"
wait "$front" "$back" || die "a gateway did not exit cleanly (see $run/*.log)"
"$profdata" merge --sparse -o "$HERE/wsgate.profdata" "$WORK"/raw/*.profraw
say "wrote $HERE/wsgate.profdata ($(stat -c %s "$HERE/wsgate.profdata") bytes):" \
  "$("$profdata" show "$HERE/wsgate.profdata" | grep -m1 'Total functions')"
