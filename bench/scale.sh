#!/usr/bin/env bash
# Holds TOTAL concurrent WebSocket tunnels through wsgate with heartbeats on, and checks
# every one still echoes afterwards.
#
#   bench/scale.sh                       # 100,000 tunnels, 75 s held, pings every 30 s
#   TOTAL=20000 HOLD=20 bench/scale.sh   # smaller
#
# One process holds at most (open-file limit − reserve) / 2 tunnels: each tunnel is two
# sockets in the gateway, which refuses upgrades beyond that room with 503 (see
# `tunnel_room` in src/limits.rs). The hard limit here is 20,000 and cannot be raised without
# CAP_SYS_RESOURCE, so the tunnels are spread over REPLICAS gateway processes — the way
# wsgate scales out behind an L4 balancer — each with its own echo backend and its own
# load-generator process (which have the same limit), clients coming from 127.x.y.z
# sources. Prints tunnels up, pings answered, tunnels verified, and the gateways' memory
# per tunnel and CPU while holding.
#
# The load generator answers pings only once all its connections are up, so PING must be
# longer than the ramp (about 25 s for 100,000 here), or the gateway rightly cuts the
# first tunnels for not answering.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
TOTAL=${TOTAL:-100000}
HOLD=${HOLD:-75}
PING=${PING:-30s}
NOFILE=$(ulimit -Hn)
ulimit -n "$NOFILE"
# The gateway's own room (src/limits.rs: reserved_descriptors, tunnel_room).
RESERVE=$((128 + NOFILE / 64)); ((RESERVE > NOFILE / 2)) && RESERVE=$((NOFILE / 2))
PER_PROCESS_MAX=$(((NOFILE - RESERVE) / 2))
REPLICAS=${REPLICAS:-$(((TOTAL + PER_PROCESS_MAX - 1) / PER_PROCESS_MAX))}
PER=$((TOTAL / REPLICAS))
RUN_DIR=${RUN_DIR:-/tmp/wsgate-scale.$$}
mkdir -p "$RUN_DIR"

"$REPO/pgo/build.sh" >&2
cargo build --release --manifest-path "$HERE/harness/wsload/Cargo.toml" >&2
WSGATE="$REPO/target/release/wsgate"
WSLOAD="$HERE/harness/wsload/target/release/wsload"
BACKEND="$HERE/harness/wsload/target/release/echo-backend"

# Every tunnel is two tracked connections in netfilter's conntrack table (where it is
# loaded); a full table drops packets, which shows as connect timeouts and 504s. Entries
# of earlier runs (the benchmark's handshakes, say) linger about two minutes after they
# close, so wait for room first.
ct=/proc/sys/net/netfilter
if [[ -r $ct/nf_conntrack_max ]]; then
  need=$((2 * TOTAL + 10000))
  for _ in $(seq 60); do
    (($(cat $ct/nf_conntrack_count) + need <= $(cat $ct/nf_conntrack_max))) && break
    echo "scale: waiting for room in the conntrack table ($(cat $ct/nf_conntrack_count) of $(cat $ct/nf_conntrack_max) in use, $need needed)" >&2
    sleep 5
  done
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "scale: $TOTAL tunnels over $REPLICAS gateway processes (about $PER each; open-file limit $NOFILE), ping every $PING, held ${HOLD}s; output in $RUN_DIR" >&2
gw_pids=()
for i in $(seq 0 $((REPLICAS - 1))); do
  bport=$((19000 + i)) gport=$((18000 + i)) aport=$((17000 + i))
  "$BACKEND" --ports "$bport" --threads 1 >"$RUN_DIR/backend.$i.log" 2>&1 &
  pids+=($!)
  cat >"$RUN_DIR/gw.$i.toml" <<TOML
[gateway]
workers = 1
admin = "127.0.0.1:$aport"
[defaults]
ping_interval = "$PING"
pong_timeout = "5s"
[[listener]]
name = "scale"
bind = "127.0.0.1:$gport"
[[route]]
path = "/"
upstream = "echo"
access_log = false
[upstream.echo]
servers = ["127.0.0.1:$bport"]
TOML
  RUST_LOG=warn "$WSGATE" run -c "$RUN_DIR/gw.$i.toml" >"$RUN_DIR/gw.$i.log" 2>&1 &
  pids+=($!) gw_pids+=($!)
done
sleep 2

rss_sum() { local s=0 p; for p in "${gw_pids[@]}"; do s=$((s + $(awk '/VmRSS/{print $2}' "/proc/$p/status") * 1024)); done; echo $s; }
cpu_sum() { local s=0 p; for p in "${gw_pids[@]}"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $s; }
idle_rss=$(rss_sum)

load_pids=()
for i in $(seq 0 $((REPLICAS - 1))); do
  sources=$(printf '127.%d.%d.1,' $((100 + i / 4)) $((i % 4 * 10 + 1)) $((100 + i / 4)) $((i % 4 * 10 + 2)) \
    $((100 + i / 4)) $((i % 4 * 10 + 3)) $((100 + i / 4)) $((i % 4 * 10 + 4)))
  conns=$((PER + (i < TOTAL % REPLICAS ? 1 : 0)))
  "$WSLOAD" --label "gw$i" hold --url "ws://127.0.0.1:$((18000 + i))/" --conns "$conns" \
    --sources "${sources%,}" --hold "$HOLD" --answer-pings --concurrency 128 --linger 10 \
    >"$RUN_DIR/load.$i.jsonl" 2>"$RUN_DIR/load.$i.err" &
  load_pids+=($!) pids+=($!)
done

# Waits (at most 10 minutes) until every load generator has logged PATTERN.
wait_for_all() {
  local n
  for _ in $(seq 1200); do
    n=$(cat "$RUN_DIR"/load.*.err 2>/dev/null | grep -c "$1" || true)
    [[ "$n" -ge "$REPLICAS" ]] && return
    sleep 0.5
  done
}

# All up, then memory and the CPU of the idle hold (heartbeats are all that runs).
wait_for_all 'all up'
sleep 2
up=$(cat "$RUN_DIR"/load.*.jsonl | python3 -c 'import sys,json; print(sum(d["up"] for d in map(json.loads, sys.stdin) if d.get("event")=="all_up"))')
loaded_rss=$(rss_sum)
cpu0=$(cpu_sum) t0=$(date +%s.%N)
sleep $((HOLD / 2))
cpu1=$(cpu_sum) t1=$(date +%s.%N)
live=0
for i in $(seq 0 $((REPLICAS - 1))); do
  l=$(curl -s "http://127.0.0.1:$((17000 + i))/status" | python3 -c 'import sys,json; d=json.load(sys.stdin); print(sum(r["live_tunnels"] for r in d["routes"]))')
  live=$((live + l))
done
# Once every load generator has verified (they linger with the tunnels still open), count
# the close frames the gateways sent: heartbeats must not have cut anything.
wait_for_all 'verified'
gateway_closes=0
for i in $(seq 0 $((REPLICAS - 1))); do
  c=$(curl -s "http://127.0.0.1:$((17000 + i))/metrics" | awk '/^wsgate_close_frames_total\{.*side="gateway"/{s+=$2} END{print s+0}')
  gateway_closes=$((gateway_closes + ${c%.*}))
done
rc=0
for p in "${load_pids[@]}"; do wait "$p" || rc=1; done
read -r pings verified <<<"$(cat "$RUN_DIR"/load.*.jsonl | python3 -c '
import sys, json
p = v = 0
for d in map(json.loads, sys.stdin):
    if d.get("event") == "pings": p += d["pings"]
    if d.get("event") == "verified": v += d["verified_ok"]
print(p, v)')"
hz=$(getconf CLK_TCK)
python3 - "$TOTAL" "$REPLICAS" "$up" "$live" "$pings" "$verified" "$gateway_closes" "$idle_rss" "$loaded_rss" \
  "$cpu0" "$cpu1" "$t0" "$t1" "$hz" "$PING" "$HOLD" <<'PY' | tee "$RUN_DIR/report.md"
import sys
(total, replicas, up, live, pings, verified, gw_closes, idle, loaded, c0, c1, t0, t1, hz, ping, hold) = sys.argv[1:]
total, replicas, up, live, pings, verified, gw_closes = map(int, (total, replicas, up, live, pings, verified, gw_closes))
per_tunnel = (int(loaded) - int(idle)) / max(up, 1)
cpu = (int(c1) - int(c0)) / int(hz) / (float(t1) - float(t0))
print(f"| tunnels asked | up | live (admin /status) | client pings answered | verified echo after {hold} s | closed by the gateway | gateway processes | gateway bytes per tunnel | gateways' CPU while holding (ping every {ping}) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {total:,} | {up:,} | {live:,} | {pings:,} | {verified:,} | {gw_closes} | {replicas} | {per_tunnel:,.0f} | {cpu * 100:.1f} % of one core |")
PY
[[ "$verified" -eq "$TOTAL" && "$gateway_closes" -eq 0 ]] || { echo "scale: FAILED (verified $verified of $TOTAL)" >&2; rc=1; }
exit $rc
