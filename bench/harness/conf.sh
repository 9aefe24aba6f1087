# Renders the contenders' configurations and commands for a benchmark run. Sourced by
# run.sh and ../instructions.sh, so that both start the same nginx and the same extra
# contenders.

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
