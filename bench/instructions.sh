#!/usr/bin/env bash
# Counts the user-space instructions a proxy spends per relayed 64 B message and per
# handshake cycle, for wsgate and nginx side by side, under valgrind's callgrind.
#
# Why: on a shared 2-core VM the end-to-end CPU figures of run.sh move 5-20 % between
# runs, so a change worth 1-5 % cannot be seen there. Instruction counts are repeatable
# (the same binary and load give the same count to ~1 %), and the kernel side (the
# syscalls, the TCP segments) is the same for every proxy on this load, so user-space
# instructions are where proxies differ. Counts come from the slowed-down proxy, whose
# reads each carry more messages than at full speed (the "msgs/read" column); compare
# contenders at similar msgs/read, and a build with its predecessor.
#
#   bench/instructions.sh                          # wsgate (target/release) and nginx
#   bench/instructions.sh wsgate-old=/path/to/wsgate   # one more wsgate build
#   CONTENDERS=wsgate bench/instructions.sh        # wsgate only
#   bench/instructions.sh "tokio-floor=bench/harness/wsload/target/release/tokio-floor --listen 127.0.0.1:{PORT} --backends {BACKENDS}"
#                                                  # any proxy: a command with {PORT}, {BACKENDS}
#                                                  # and {RUNDIR}, as bench/run.sh takes it
#   CALLGRIND_OPTS=--dump-instr=yes bench/instructions.sh   # per-instruction counts, for
#                                                  # callgrind_annotate/kcachegrind on the run dir
#
# HS_CONNS sets the handshake loops at once (default 4); TP_SECS and HS_SECS the
# measured seconds.
#
# Needs valgrind and nginx (apt-get install valgrind nginx). Ports 8097-8099, 9011-9012.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="${RUN_DIR:-/tmp/wsinstr.$(date +%Y%m%d-%H%M%S).$$}"
TP_SECS="${TP_SECS:-8}"
HS_SECS="${HS_SECS:-6}"
HS_CONNS="${HS_CONNS:-4}"

# shellcheck source=harness/conf.sh
source "$HERE/harness/conf.sh"

die() { echo "instructions.sh: $*" >&2; exit 1; }
command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"
prepare_run "$@" || die "cannot start the run (see $RUN_DIR)"

# Starts NAME under callgrind on PORT, runs KIND (tp|hs) after a warm-up with the counters
# zeroed, dumps them, and prints "instructions units reads".
measure() {
  local name=$1 kind=$2 port=$3 dir="$RUN_DIR/$1-$2" vg
  mkdir -p "$dir"
  proxy_argv "$name" "$port" "$BACKENDS" "$dir"
  taskset -c "$PROXY_CPU" valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$dir/cg.%p" \
    ${CALLGRIND_OPTS:-} "${PROXY_ARGV[@]}" >"$dir/valgrind.log" 2>&1 &
  vg=$!
  PIDS+=("$vg")
  "$WSLOAD" probe --url "ws://127.0.0.1:$port/" --timeout 60 >/dev/null || die "$name did not start (see $dir)"
  # taskset, valgrind, the contender script and the proxy exec one another: one PID.
  local target=$vg count json secs=$TP_SECS
  [[ "$kind" == hs ]] && secs=$HS_SECS
  drive "$kind" "$port" 2 >/dev/null
  callgrind_control -z "$target" >/dev/null 2>&1
  json=$(drive "$kind" "$port" "$secs")
  count=$(units "$kind" <<<"$json")
  callgrind_control -d "$target" >/dev/null 2>&1
  kill "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  local dump="$dir/cg.$vg.1"
  [[ -s "$dump" ]] || die "no callgrind dump for $name in $dir"
  python3 - "$dump" "$count" <<'PY'
import re, sys
path, units = sys.argv[1], int(sys.argv[2])
total = reads = 0
names, callee = {}, None
for line in open(path):
    if line.startswith("summary:") or line.startswith("totals:"):
        total = int(line.split()[1])
    elif line.startswith("cfn="):
        m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.strip())
        if m.group(2):
            names[m.group(1)] = m.group(2)
        callee = names.get(m.group(1))
    elif line.startswith("fn="):
        m = re.match(r"fn=\((\d+)\)(?: (.*))?", line.strip())
        if m and m.group(2):
            names[m.group(1)] = m.group(2)
    elif line.startswith("calls=") and callee == "recv":
        reads += int(line[6:].split()[0])
print(total, units, reads)
PY
}

printf '%-12s %14s %12s %12s %16s %10s\n' proxy "instr/message" "msgs/read" "instr/read" "instr/handshake" "handshakes"
port=8097
for name in "${NAMES[@]}"; do
  read -r tp_instr msgs reads < <(measure "$name" tp "$port")
  read -r hs_instr hs _ < <(measure "$name" hs "$port")
  awk -v n="$name" -v ti="$tp_instr" -v m="$msgs" -v r="$reads" -v hi="$hs_instr" -v h="$hs" 'BEGIN {
    printf "%-12s %14.1f %12.1f %12.0f %16.0f %10d\n", n, ti / m, (r ? m / r : 0), (r ? ti / r : 0), hi / h, h }'
  port=$((port + 1))
done
echo "(run dir: $RUN_DIR)" >&2
