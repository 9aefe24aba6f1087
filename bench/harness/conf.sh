# Shared by the benchmark scripts: renders the contenders' configurations and commands
# (sourced by run.sh, ../instructions.sh and ../syscalls.sh, so that all three start the
# same nginx and the same extra contenders), and sets up the runs of the last two, which
# measure one proxy at a time.

render() {        # render TEMPLATE OUT KEY=VALUE...: every @KEY@ in TEMPLATE becomes VALUE
  local tpl=$1 out=$2 text kv
  shift 2
  text=$(<"$tpl")
  for kv in "$@"; do text=${text//@${kv%%=*}@/${kv#*=}}; done
  printf '%s\n' "$text" >"$out"
}

# nginx_conf DIR PORT NOFILE PROXY_BUFFER MASTER_PROCESS(on|off) BACKEND...: DIR/nginx.conf
# for one worker on 127.0.0.1:PORT in front of the BACKENDs (host:port).
nginx_conf() {
  local dir=$1 port=$2 nofile=$3 buffer=$4 master=$5 servers="" b extra=""
  shift 5
  for b in "$@"; do servers+="        server $b;"$'\n'; done
  [[ "$buffer" == 4k ]] || extra=$'\n'"            proxy_buffers 8 $buffer;"$'\n'"            proxy_busy_buffers_size $buffer;"
  render "$(dirname "${BASH_SOURCE[0]}")/conf/nginx.conf.in" "$dir/nginx.conf" RUNDIR="$dir" NOFILE="$nofile" \
    PROXY_BUFFER="$buffer" PROXY_BUFFER_EXTRA="$extra" MASTER_PROCESS="$master" \
    LISTEN="127.0.0.1:$port" UPSTREAM_SERVERS="${servers%$'\n'}"
}

# contender_command TEMPLATE PORT BACKENDS DIR: an extra contender's command, with {PORT},
# {BACKENDS} (comma-separated host:port) and {RUNDIR} filled in.
contender_command() {
  local c=$1
  c=${c//\{PORT\}/$2}; c=${c//\{BACKENDS\}/$3}; c=${c//\{RUNDIR\}/$4}
  printf '%s' "$c"
}

json_num() {      # json_num FIELD: first numeric value of "FIELD" in the JSON on stdin
  grep -o "\"$1\":[0-9.eE+-]*" | head -1 | cut -d: -f2
}

# The rest serves the scripts that measure one proxy at a time (../instructions.sh,
# ../syscalls.sh): their contenders, how each is started, the echo backend.

# contenders DEFAULT_WSGATE ARG...: sets NAMES (in order) and BIN (name -> wsgate binary or
# command template) from $CONTENDERS (built-in: wsgate, which is DEFAULT_WSGATE, and
# nginx) and the NAME=WSGATE_BINARY or NAME=COMMAND arguments.
contenders() {
  local name arg
  declare -gA BIN=([wsgate]="$1")
  shift
  NAMES=()
  for name in ${CONTENDERS//,/ }; do NAMES+=("$name"); done
  for arg in "$@"; do
    if [[ "$arg" != *=* ]]; then
      echo "extra contender must be NAME=WSGATE_BINARY or NAME=COMMAND: $arg" >&2
      return 1
    fi
    BIN[${arg%%=*}]=${arg#*=}
    NAMES+=("${arg%%=*}")
  done
}

# proxy_argv NAME PORT BACKENDS DIR: sets PROXY_ARGV to the command that runs contender
# NAME on 127.0.0.1:PORT as one process (nginx without a master, so that a tool attached to
# the process measures the worker itself), its files in DIR.
proxy_argv() {
  local name=$1 port=$2 backends=$3 dir=$4
  if [[ "$name" == nginx ]]; then
    nginx_conf "$dir" "$port" 4096 4k off ${backends//,/ }
    PROXY_ARGV=(nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log")
  elif [[ "${BIN[$name]}" == *"{PORT}"* ]]; then
    PROXY_ARGV=(bash -c "exec $(contender_command "${BIN[$name]}" "$port" "$backends" "$dir")")
  else
    PROXY_ARGV=(bash "$(dirname "${BASH_SOURCE[0]}")/../wsgate-contender.sh" "${BIN[$name]}" "$port" "$backends" "$dir")
  fi
}

# prepare_run ARG...: what those scripts do before measuring. Sets their shared settings
# (CONTENDERS, PROXY_CPU and LOADGEN_CPU unless given; ROOT, BIN_DIR, WSLOAD, BACKENDS),
# builds wsgate and the load generator, reads the contenders from ARG..., starts the echo
# backend on 127.0.0.1:9011 and :9012 pinned to LOADGEN_CPU and waits until it answers.
# Everything started and added to PIDS is stopped on exit.
prepare_run() {
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  BIN_DIR="$ROOT/bench/harness/wsload/target/release"
  WSLOAD="$BIN_DIR/wsload"
  : "${CONTENDERS:=wsgate,nginx}" "${PROXY_CPU:=1}" "${LOADGEN_CPU:=0}"
  BACKENDS="127.0.0.1:9011,127.0.0.1:9012"
  mkdir -p "$RUN_DIR"
  "$ROOT/pgo/build.sh" >&2
  cargo build --release --manifest-path "$ROOT/bench/harness/wsload/Cargo.toml" >&2
  contenders "$ROOT/target/release/wsgate" "$@" || return 1
  PIDS=()
  trap stop_all EXIT
  taskset -c "$LOADGEN_CPU" "$BIN_DIR/echo-backend" --ports 9011,9012 --threads 1 >"$RUN_DIR/backend.log" 2>&1 &
  PIDS+=($!)
  "$WSLOAD" probe --url "ws://127.0.0.1:9011/" --timeout 15 >/dev/null
}

stop_all() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

# load WSLOAD_ARG...: the load generator pinned to LOADGEN_CPU, its JSON on stdout.
load() { taskset -c "$LOADGEN_CPU" "$WSLOAD" "$@" 2>/dev/null; }

# drive KIND PORT SECS: the loads those scripts measure, on PORT for SECS, the JSON on
# stdout. tp: 64 B echoes over 64 connections with 32 in flight each; hs: HS_CONNS loops
# of connect, upgrade, close handshake and TCP end.
drive() {
  if [[ "$1" == tp ]]; then
    load echo-throughput --url "ws://127.0.0.1:$2/" --conns 64 --inflight 32 --size 64 --duration "$3" --warmup 0
  else
    load handshakes --url "ws://127.0.0.1:$2/" --conns "$HS_CONNS" --duration "$3"
  fi
}

# units KIND: from drive's JSON on stdin, how many units its counts are divided by:
# relayed messages (every echo crossed the proxy twice) or completed handshakes.
units() {
  if [[ "$1" == tp ]]; then echo $((2 * $(json_num msgs))); else json_num completed; fi
}
