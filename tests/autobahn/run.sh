#!/usr/bin/env bash
# tests/autobahn/run.sh - Autobahn|Testsuite conformance of wsgate as a WebSocket proxy
#
# Starts the known-good echo backend (shared/autobahn/echo_server.py) and wsgate
# in front of it on free 127.0.0.1 ports, runs the Autobahn fuzzingclient
# (shared/autobahn/run.sh) against the echo server directly and then through
# wsgate with the same cases, and compares the two reports.
#
# Usage: tests/autobahn/run.sh [WSGATE_BIN] [CASES]
#   WSGATE_BIN  default target/release/wsgate (relative to the repo root; a
#               relative path is tried from the current directory first)
#   CASES       comma-separated Autobahn case patterns, default "*"
#               (run.sh leaves out the 12.*/13.* compression cases unless named;
#               .ci/run runs a subset of them in a second run)
# Env:
#   AUTOBAHN_OUT         reports go to $AUTOBAHN_OUT/{direct,gateway}
#                        (default /tmp/wsgate-autobahn); wsgate/echo logs and
#                        the config are copied there too
#   AUTOBAHN_SHARED      the shared autobahn dir (default $REPO/../shared/autobahn)
#   AUTOBAHN_ECHO_VENV   venv made by setup.sh (default /opt/autobahn-echo-venv)
#   AUTOBAHN_TIMEOUT     per-run wstest timeout in seconds (passed to run.sh)
# Exit: 0 when the run through wsgate has FAILED=0, no MISSING case and no case that is
#       UNIMPLEMENTED through wsgate only (an extension the backend has, lost on the way);
#       1 otherwise (2 for usage / setup / start-up errors).
# Needs root (the shared run.sh chroots into the wstest environment).
set -euo pipefail
{ # one compound command: bash parses the whole script before running it,
  # so editing this file while a run is going does not break that run

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SHARED="${AUTOBAHN_SHARED:-$REPO/../shared/autobahn}"
ECHO_VENV="${AUTOBAHN_ECHO_VENV:-/opt/autobahn-echo-venv}"
OUT="${AUTOBAHN_OUT:-/tmp/wsgate-autobahn}"
CASES="${2:-*}"

log() { printf '[wsgate-autobahn %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { local rc="$1"; shift; log "ERROR: $*" >&2; exit "$rc"; }

# ---- wsgate binary: as given (cwd-relative), else relative to the repo root
bin="${1:-target/release/wsgate}"
if [[ "$bin" != /* ]]; then
  if [ -e "$bin" ]; then bin="$PWD/$bin"; else bin="$REPO/$bin"; fi
fi
[ -x "$bin" ] || die 2 "wsgate binary not found or not executable: $bin (build it, or pass its path as \$1)"
[ -d "$SHARED" ] && [ -x "$SHARED/run.sh" ] || die 2 "shared autobahn dir not found: $SHARED (set AUTOBAHN_SHARED)"
SHARED="$(cd "$SHARED" && pwd)"
command -v python3 >/dev/null || die 2 "python3 is needed"

work="$(mktemp -d /tmp/wsgate-autobahn-work.XXXXXX)"
echo_pid=""; gw_pid=""; run_pid=""; tail_pid=""

stop_pid() {   # stop_pid PID NAME: SIGTERM one PID we started, wait up to 10 s, then SIGKILL
  local pid="$1" name="$2" i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  log "$name (PID $pid) still alive 10 s after SIGTERM, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}
stop_run() {   # stop_run PID: the shared run.sh we started, and the wstest it runs
  local pid="$1" k
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  # run.sh runs wstest under `timeout`, which sits in a process group of its own and would
  # outlive run.sh: signal that `timeout` by PID (it passes SIGTERM on to wstest) first
  for k in $(pgrep -P "$pid" -x timeout 2>/dev/null || true); do
    kill -TERM "$k" 2>/dev/null || true
  done
  stop_pid "$pid" "autobahn run.sh"
}
cleanup() {
  stop_run "$run_pid"
  [ -z "$tail_pid" ] || kill -TERM "$tail_pid" 2>/dev/null || true
  stop_pid "$gw_pid" wsgate
  stop_pid "$echo_pid" "echo server"
  if [ -d "$OUT" ]; then
    cp -f "$work"/wsgate.toml "$work"/wsgate.log "$work"/echo_server.log "$OUT/" 2>/dev/null || true
  fi
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() {  # wait_port PORT PID: until 127.0.0.1:PORT accepts TCP (10 s at most; PID must live)
  local i
  for i in $(seq 1 100); do
    python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ---- setup (idempotent: ~0.05 s once done)
log "setup: $SHARED/setup.sh"
"$SHARED/setup.sh" || die 2 "setup.sh failed"
[ -x "$ECHO_VENV/bin/python" ] || die 2 "echo venv missing: $ECHO_VENV/bin/python"

# ---- two distinct free loopback ports (held together while picked, so they differ)
read -r ECHO_PORT GW_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss: s.close()')
[ -n "${GW_PORT:-}" ] || die 2 "could not pick free ports"

# ---- echo backend
"$ECHO_VENV/bin/python" "$SHARED/echo_server.py" --host 127.0.0.1 --port "$ECHO_PORT" \
  >"$work/echo_server.log" 2>&1 &
echo_pid=$!
if ! wait_port "$ECHO_PORT" "$echo_pid"; then
  cat "$work/echo_server.log" >&2
  die 2 "echo server did not accept TCP on 127.0.0.1:$ECHO_PORT within 10 s"
fi
log "echo server PID $echo_pid: $(head -1 "$work/echo_server.log")"

# ---- wsgate in front of it
cat >"$work/wsgate.toml" <<EOF
# generated by tests/autobahn/run.sh
[gateway]
workers = 1

[[listener]]
name = "autobahn"
bind = "127.0.0.1:$GW_PORT"

[[route]]
path = "/"
upstream = "echo"

[upstream.echo]
servers = ["127.0.0.1:$ECHO_PORT"]
EOF
if ! "$bin" check -c "$work/wsgate.toml" >"$work/check.log" 2>&1; then
  cat "$work/check.log" >&2
  die 2 "wsgate check rejected the generated config $work/wsgate.toml"
fi
"$bin" run -c "$work/wsgate.toml" >"$work/wsgate.log" 2>&1 &
gw_pid=$!
if ! wait_port "$GW_PORT" "$gw_pid"; then
  tail -n 30 "$work/wsgate.log" >&2
  die 2 "wsgate did not accept TCP on 127.0.0.1:$GW_PORT within 10 s"
fi
log "wsgate PID $gw_pid ($bin) on 127.0.0.1:$GW_PORT -> echo 127.0.0.1:$ECHO_PORT"

# ---- the two runs
mkdir -p "$OUT"
run_suite() {  # run_suite NAME URL: shared run.sh into $OUT/NAME; sets rc_NAME, t_NAME, line_NAME
  local name="$1" url="$2" rc=0 t0 t1 line
  log "run $name: $url cases=$CASES -> $OUT/$name"
  t0=$(date +%s.%N)
  # In the background + `wait`, so a SIGTERM/SIGINT to this script is handled at once;
  # in a session of its own (setsid execs, so $! is run.sh's PID), so a signal to our
  # process group (Ctrl-C, `timeout`) cannot kill run.sh before cleanup has stopped the
  # wstest it runs (see stop_run). tail --pid streams its output and ends with it.
  : >"$work/$name.out"
  setsid "$SHARED/run.sh" "$url" "$CASES" "$OUT/$name" >"$work/$name.out" 2>&1 </dev/null &
  run_pid=$!
  tail -n +1 -s 0.2 -f --pid="$run_pid" "$work/$name.out" &
  tail_pid=$!
  wait "$run_pid" || rc=$?
  run_pid=""
  wait "$tail_pid" || true
  tail_pid=""
  t1=$(date +%s.%N)
  line=$(grep -E '^autobahn: [0-9]+ cases' "$work/$name.out" | tail -n 1 || true)
  printf -v "rc_$name" '%s' "$rc"
  printf -v "t_$name" '%s' "$(python3 -c 'import sys; print("%.1f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$t0" "$t1")"
  printf -v "line_$name" '%s' "${line:-no summary line (run.sh exit $rc)}"
}
run_suite direct "ws://127.0.0.1:$ECHO_PORT/"
run_suite gateway "ws://127.0.0.1:$GW_PORT/"
gw_alive=1; kill -0 "$gw_pid" 2>/dev/null || gw_alive=0

# ---- stop wsgate now (graceful SIGTERM) so its log is complete
gw_status="exited before the end of the run"
if [ "$gw_alive" = 1 ]; then
  stop_pid "$gw_pid" wsgate
  gw_rc=0; wait "$gw_pid" 2>/dev/null || gw_rc=$?
  gw_status="stopped by SIGTERM, exit status $gw_rc"
fi
gw_pid=""

# ---- result
echo
echo "direct  (${t_direct}s, run.sh exit $rc_direct): $line_direct"
echo "gateway (${t_gateway}s, run.sh exit $rc_gateway): $line_gateway"
echo "wsgate: $gw_status"
set +e
rm -f "$work/lost"
python3 - "$OUT/direct/index.json" "$OUT/gateway/index.json" "$work/lost" <<'EOF'
import json, sys
def load(p):
    try:
        return json.load(open(p)).get("target", {})
    except (OSError, ValueError):
        return None
a, b = load(sys.argv[1]), load(sys.argv[2])
if a is None or b is None:
    print("cases whose behavior differs direct -> gateway: (cannot compare: %s missing)"
          % " and ".join(p for p, x in zip(sys.argv[1:3], (a, b)) if x is None))
    sys.exit(0)
key = lambda c: [int(x) for x in c.split(".")]
ids = sorted(set(a) | set(b), key=key)
g = lambda d, c, k: d.get(c, {}).get(k, "absent")
diff = ["%s %s->%s" % (c, g(a, c, "behavior"), g(b, c, "behavior"))
        for c in ids if g(a, c, "behavior") != g(b, c, "behavior")]
print("cases whose behavior differs direct -> gateway: %s" % (", ".join(diff) or "none"))
# A feature the backend has that the gateway takes away (an extension it does not let the
# two ends agree on) shows as UNIMPLEMENTED through the gateway only: a failure too.
lost = [c for c in ids if g(b, c, "behavior") == "UNIMPLEMENTED" != g(a, c, "behavior")]
if lost:
    print("cases the gateway leaves UNIMPLEMENTED that the backend implements: %s" % ", ".join(lost))
    open(sys.argv[3], "w").write("\n".join(lost))
groups = {}
for c in ids:
    t = (g(a, c, "behaviorClose"), g(b, c, "behaviorClose"))
    if t[0] != t[1]:
        groups.setdefault(t, []).append(c)
if groups:
    print("closing behaviour differs (informational, not graded): %s" % "; ".join(
        "%s->%s x%d (%s%s)" % (t[0], t[1], len(cs), ", ".join(cs[:8]),
                               " ... %s" % cs[-1] if len(cs) > 9 else
                               (", %s" % cs[8] if len(cs) == 9 else ""))
        for t, cs in sorted(groups.items(), key=lambda kv: key(kv[1][0]))))
EOF
python3 - "$OUT/gateway/summary.json" <<'EOF'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if s.get("cases_reported", 0) > 0 and s["counts"].get("FAILED", 1) == 0
         and not s.get("missing") else 1)
EOF
ok=$?
set -e
echo "reports: $OUT/direct/index.html $OUT/gateway/index.html (wsgate log: $OUT/wsgate.log)"
if [ "$ok" != 0 ] || [ "$gw_alive" != 1 ] || [ -s "$work/lost" ]; then
  echo
  echo "---- last 30 lines of the wsgate log ($work/wsgate.log, copied to $OUT/wsgate.log) ----"
  tail -n 30 "$work/wsgate.log" | sed 's/\x1b\[[0-9;]*m//g' || true
  echo "wsgate-autobahn: FAIL (gateway run has FAILED or MISSING cases, cases it leaves UNIMPLEMENTED, or wsgate died)"
  exit 1
fi
echo "wsgate-autobahn: PASS"
exit 0
}
