#!/usr/bin/env bash
# Starts wsgate as a benchmark contender: writes its configuration for the harness's
# port and backends into the contender's run directory, then execs the gateway in the
# foreground (the harness pins it to the proxy CPU and stops it with SIGTERM).
#   wsgate-contender.sh WSGATE_BIN PORT BACKENDS RUNDIR
set -euo pipefail
bin=$1 port=$2 backends=$3 rundir=$4
servers=$(printf '"%s", ' ${backends//,/ })
cat >"$rundir/wsgate.toml" <<TOML
[gateway]
# One worker: the proxy is pinned to one core, like nginx's worker_processes 1.
workers = 1
[defaults]
ping_interval = "20s"
[[listener]]
name = "bench"
bind = "127.0.0.1:$port"
[[route]]
path = "/"
upstream = "echo"
[upstream.echo]
servers = [${servers%, }]
TOML
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUST_LOG=${RUST_LOG:-warn} exec "$bin" run -c "$rundir/wsgate.toml"
