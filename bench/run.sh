#!/usr/bin/env bash
# wsgate's benchmark: wsgate, nginx and HAProxy (Debian packages) side by side in front of
# the same echo backend, each proxy pinned to one core, one table with ratios to nginx.
#
#   bench/run.sh              # full run (~6 min)
#   QUICK=1 bench/run.sh      # smoke run (~2 min)
#   CONTENDERS=nginx,haproxy,caddy bench/run.sh   # add Caddy (needs the caddy package)
#   bench/run.sh "wsgate-old=bash bench/wsgate-contender.sh /path/to/old/wsgate {PORT} {BACKENDS} {RUNDIR},8096"
#                             # an earlier build as one more contender, for before/after
#
# Every other setting of the harness (bench/harness/README.md) passes through the
# environment. Results go to $RUN_DIR (printed at the start): report.md and results.jsonl.
set -euo pipefail
{
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
  echo "bench: installing ${need[*]} (Debian packages)" >&2
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "bench: building wsgate (release)" >&2
cargo build --release --manifest-path "$REPO/Cargo.toml" >&2
WSGATE="$REPO/target/release/wsgate"

export CONTENDERS="${CONTENDERS:-nginx,haproxy}"
export WSGATE_PORT="${WSGATE_PORT:-8090}"
# Extra contenders given on the command line (NAME=COMMAND,PORT) run in the same rounds,
# e.g. an earlier wsgate build for a before/after comparison beside nginx.
exec "$HERE/harness/run.sh" \
  "wsgate=bash $HERE/wsgate-contender.sh $WSGATE {PORT} {BACKENDS} {RUNDIR},$WSGATE_PORT" "$@"
}
