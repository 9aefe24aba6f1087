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
"$REPO/pgo/build.sh" >&2
WSGATE="$REPO/target/release/wsgate"

export CONTENDERS="${CONTENDERS:-nginx,haproxy}"
export WSGATE_PORT="${WSGATE_PORT:-8090}"

# Every handshake leaves two connections in netfilter's conntrack table for its TIME_WAIT
# timeout (120 s by default). Once the table is full the kernel drops new SYNs, connects
# wait for retransmits, and the handshake figures measure that instead of the proxies.
ct=/proc/sys/net/netfilter
if [[ -r $ct/nf_conntrack_max && -r $ct/nf_conntrack_count ]] &&
  (( $(cat $ct/nf_conntrack_tcp_timeout_time_wait 2>/dev/null || echo 120) > 10 )); then
  IFS=, read -ra built_in <<<"$CONTENDERS"
  proxies=$(( ${#built_in[@]} + 1 + $# ))
  # at ~10,000 handshakes/s, two tracked connections each
  need=$(( proxies * ${HS_ROUNDS:-2} * ${HS_SECS:-4} * 10000 * 2 ))
  free=$(( $(cat $ct/nf_conntrack_max) - $(cat $ct/nf_conntrack_count) ))
  if (( need > free )); then
    echo "bench: warning: the handshake runs may need ~$need conntrack entries, $free are free;" \
      "if dmesg then says 'nf_conntrack: table full', the handshake figures are void. Wait for" \
      "the table to drain, lower HS_SECS, or on a machine of your own:" \
      "sysctl -w net.netfilter.nf_conntrack_max=1048576 net.netfilter.nf_conntrack_tcp_timeout_time_wait=5" >&2
  fi
fi
# Extra contenders given on the command line (NAME=COMMAND,PORT) run in the same rounds,
# e.g. an earlier wsgate build for a before/after comparison beside nginx.
exec "$HERE/harness/run.sh" \
  "wsgate=bash $HERE/wsgate-contender.sh $WSGATE {PORT} {BACKENDS} {RUNDIR},$WSGATE_PORT" "$@"
}
