#!/usr/bin/env bash
# Counts the system calls a proxy makes per relayed 64 B message and per handshake cycle,
# by call, for wsgate and nginx side by side, from the kernel's syscall tracepoints.
#
# Why: most of a proxy's CPU on this load is in the kernel, and on a shared VM the kernel
# time moves more between runs than proxies differ. The calls themselves do not: a proxy
# that makes one call more per handshake (an EAGAIN read, an epoll_ctl) shows it here
# exactly, whatever else the machine does.
#
#   bench/syscalls.sh                              # wsgate (target/release) and nginx
#   bench/syscalls.sh wsgate-old=/path/to/wsgate   # one more wsgate build
#   CONTENDERS=wsgate bench/syscalls.sh            # wsgate only
#   bench/syscalls.sh "tokio-floor=bench/harness/wsload/target/release/tokio-floor --listen 127.0.0.1:{PORT} --backends {BACKENDS}"
#                                                  # any proxy: a command with {PORT}, {BACKENDS}
#                                                  # and {RUNDIR}, as bench/run.sh takes it
#
# HS_CONNS sets the handshake loops at once (default 32); TP_SECS and HS_SECS the
# measured seconds.
#
# Needs perf (apt-get install linux-perf) with the syscalls tracepoints (root, or
# perf_event_paranoid allowing it), and nginx. Ports 8097-8099, 9011-9012.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN_DIR="${RUN_DIR:-/tmp/wssyscalls.$(date +%Y%m%d-%H%M%S).$$}"
TP_SECS="${TP_SECS:-4}"
HS_SECS="${HS_SECS:-4}"
HS_CONNS="${HS_CONNS:-32}"

# shellcheck source=harness/conf.sh
source "$HERE/harness/conf.sh"

die() { echo "syscalls.sh: $*" >&2; exit 1; }
command -v perf >/dev/null || die "perf is missing (apt-get install linux-perf)"
perf stat -e 'syscalls:sys_enter_recvfrom' true >/dev/null 2>&1 ||
  die "perf cannot read the syscalls tracepoints here (run as root, or lower kernel.perf_event_paranoid)"
prepare_run "$@" || die "cannot start the run (see $RUN_DIR)"

# Starts NAME on PORT, runs KIND (tp|hs) after a warm-up with perf counting the proxy's
# syscalls, and writes "CALL PER_UNIT" lines (and TOTAL) to DIR/per-unit.
measure() {
  local name=$1 kind=$2 port=$3 dir="$RUN_DIR/$1-$2" proxy count json counter secs=$TP_SECS
  [[ "$kind" == hs ]] && secs=$HS_SECS
  mkdir -p "$dir"
  proxy_argv "$name" "$port" "$BACKENDS" "$dir"
  taskset -c "$PROXY_CPU" "${PROXY_ARGV[@]}" >"$dir/proxy.log" 2>&1 &
  # taskset, the contender script and the proxy exec one another: one PID.
  proxy=$!
  PIDS+=("$proxy")
  "$WSLOAD" probe --url "ws://127.0.0.1:$port/" --timeout 30 >/dev/null || die "$name did not start (see $dir)"
  drive "$kind" "$port" 1 >/dev/null
  # Besides every call, the reads and writes that failed with EAGAIN (-11): a call that
  # found nothing to do, which the per-call count alone does not tell from a useful one.
  perf stat -x, -e 'syscalls:sys_enter_*' \
    -e syscalls:sys_exit_recvfrom --filter 'ret == -11' \
    -e syscalls:sys_exit_sendto --filter 'ret == -11' \
    -p "$proxy" -o "$dir/perf.csv" &
  counter=$!
  # perf attaches within a few ms; counting from before the load starts misses none of
  # its calls (the idle proxy makes next to none meanwhile).
  sleep 0.3
  json=$(drive "$kind" "$port" "$secs")
  count=$(units "$kind" <<<"$json")
  kill -INT "$counter"
  wait "$counter" 2>/dev/null || true
  kill "$proxy" 2>/dev/null || true
  wait "$proxy" 2>/dev/null || true
  [[ -s "$dir/perf.csv" && "${count:-0}" -gt 0 ]] || die "no syscall counts for $name ($kind) in $dir"
  awk -F, -v units="$count" '$1 ~ /^[0-9]+$/ && $1 > 0 && $3 ~ /sys_exit_/ {
      call = $3; sub("syscalls:sys_exit_", "", call); n[call ":EAGAIN"] = $1 / units; next }
    $1 ~ /^[0-9]+$/ && $1 > 0 {
      call = $3; sub("syscalls:sys_enter_", "", call); n[call] = $1 / units; total += $1 / units }
    END { for (c in n) printf "%s %.6f\n", c, n[c]; printf "TOTAL %.6f\n", total }' \
    "$dir/perf.csv" >"$dir/per-unit"
}

# One table per load: a row per call, a column per contender; counts per unit x SCALE.
table() {
  local kind=$1 scale=$2 title=$3
  python3 - "$RUN_DIR" "$kind" "$scale" "$title" "${NAMES[@]}" <<'PY'
import sys
run_dir, kind, scale, title, names = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:]
per = {}
for name in names:
    per[name] = dict((c, float(v) * scale) for c, v in (l.split() for l in open(f"{run_dir}/{name}-{kind}/per-unit")))
def shown(c):
    return max(p.get(c, 0.0) for p in per.values()) >= 0.005
calls = sorted({c for p in per.values() for c in p if c != "TOTAL" and ":" not in c},
               key=lambda c: -max(p.get(c, 0.0) for p in per.values()))
# Each call's failed share (":EAGAIN") right under it; counted in it, not in the total.
calls = [row for c in calls if shown(c) for row in (c, c + ":EAGAIN") if shown(row)] + ["TOTAL"]
label = {"TOTAL": "**total**"}
print(f"\n{title}\n")
print("| call | " + " | ".join(names) + " |")
print("|---|" + "---:|" * len(names))
for c in calls:
    cells = " | ".join(f"{per[n].get(c, 0.0):.2f}" for n in names)
    print(f"| {label.get(c, c.replace(':EAGAIN', ' (of which EAGAIN)'))} | {cells} |")
PY
}

port=8097
for name in "${NAMES[@]}"; do
  measure "$name" tp "$port"
  measure "$name" hs "$port"
  port=$((port + 1))
done
table tp 1000 "System calls per 1,000 relayed 64 B messages (64 connections x 32 in flight)"
table hs 1 "System calls per handshake cycle (connect, upgrade, close, TCP end; $HS_CONNS at once)"
echo "(run dir: $RUN_DIR)" >&2
