#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the cluster tests
# (tests/cluster): txq1@localhost, txq2@localhost and txq3@localhost.
#
#   bash scripts/cluster.sh up       start the nodes and cluster them (idempotent:
#                                    repairs a partly running cluster)
#   bash scripts/cluster.sh status   the cluster's status; exit 1 unless all three
#                                    nodes run and are clustered
#   bash scripts/cluster.sh down     stop the three nodes and remove their data
#
#   node   AMQP (127.0.0.1)   Erlang distribution
#   txq1   5681               25681
#   txq2   5682               25682
#   txq3   5683               25683
#
# Guest login works (loopback only). The management plugin runs on txq1 only, on
# 127.0.0.1:15681 (txq's policy check is tested against it); the other nodes have
# no plugin at all (quicker to start, less memory). Use rabbitmqctl -n txqN@localhost.
#
# The nodes use the installed rabbitmq-server, run as the rabbitmq user with its
# Erlang cookie (HOME=/var/lib/rabbitmq, like the main node) and share epmd (4369).
# Each has its own env file, config file, enabled-plugins file, mnesia, log and
# pid file under $TXQ_CLUSTER_DIR (default /var/lib/rabbitmq/txq-cluster/txqN).
# The machine's main node (rabbit@localhost, 5672) is never stopped, reset or
# reconfigured. Run as root (or as the rabbitmq user).
set -euo pipefail

NODES=(txq1 txq2 txq3)
SEED=txq1
AMQP_BASE=5680
DIST_BASE=25680
MGMT_BASE=15680
START_TIMEOUT=${TXQ_CLUSTER_START_TIMEOUT:-120} # seconds, per step

RABBITMQ_USER=rabbitmq
RABBITMQ_HOME_DIR=$(getent passwd "$RABBITMQ_USER" | cut -d: -f6 || true)
RABBITMQ_HOME_DIR=${RABBITMQ_HOME_DIR:-/var/lib/rabbitmq}
BASE=${TXQ_CLUSTER_DIR:-$RABBITMQ_HOME_DIR/txq-cluster}

log() { echo "cluster: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# The directory of the real rabbitmq-server/rabbitmqctl scripts: Debian's
# /usr/sbin entries are links to a wrapper that switches users and sends the
# server's output to the main node's startup log, which we do not want.
bin_dir() {
  local server
  server=$(command -v rabbitmq-server) || die "rabbitmq-server is not installed"
  server=$(readlink -f "$server")
  dirname "$server"
}
BIN=$(bin_dir)
[ -x "$BIN/rabbitmqctl" ] || die "no rabbitmqctl beside $BIN/rabbitmq-server"

# Runs a command as the rabbitmq user, with its HOME (hence its Erlang cookie).
as_rabbitmq() {
  if [ "$(id -un)" = "$RABBITMQ_USER" ]; then
    env HOME="$RABBITMQ_HOME_DIR" "$@"
  elif [ "$(id -u)" = 0 ]; then
    runuser -u "$RABBITMQ_USER" -- env HOME="$RABBITMQ_HOME_DIR" "$@"
  else
    die "run this as root or as the $RABBITMQ_USER user"
  fi
}

ctl() { # node args...
  local node=$1
  shift
  as_rabbitmq "$BIN/rabbitmqctl" -q -n "$node@localhost" "$@"
}

index() { # node -> 1..3
  echo "${1#txq}"
}

dir() { echo "$BASE/$1"; }

pid_file() { echo "$(dir "$1")/mnesia/$1@localhost.pid"; }

# The beam pid of a node: from its pid file if that process is alive, else from
# the node itself.
node_pid() {
  local f pid=
  f=$(pid_file "$1")
  [ -f "$f" ] && pid=$(tr -dc '0-9' <"$f")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    pid=$(ctl "$1" eval 'os:getpid().' 2>/dev/null | tr -dc '0-9') || true
  fi
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# Whether the node's Erlang VM answers.
vm_up() { ctl "$1" ping >/dev/null 2>&1; }

# Whether the rabbit application runs on the node.
app_up() {
  [ "$(ctl "$1" eval 'rabbit:is_running().' 2>/dev/null)" = true ]
}

# The cluster's member nodes, or its running nodes, as seen from node $1
# (space-separated short names).
members() { # node all|running
  local out
  out=$(ctl "$1" eval "io:format(\"~s~n\", [lists:join(\" \", [atom_to_list(N) || N <- lists:sort(rabbit_mnesia:cluster_nodes($2))])])." 2>/dev/null) || return 1
  out=$(head -n 1 <<<"$out")
  echo "${out//@localhost/}"
}

write_files() { # node
  local node=$1 i d
  i=$(index "$node")
  d=$(dir "$node")
  mkdir -p "$d/mnesia" "$d/log"
  # Everything a node reads comes from here, not from /etc/rabbitmq (whose
  # rabbitmq-env.conf names the main node).
  cat >"$d/rabbitmq-env.conf" <<EOF
NODENAME=$node@localhost
ERL_EPMD_ADDRESS=127.0.0.1
DIST_PORT=$((DIST_BASE + i))
CONFIG_FILE=$d/rabbitmq.conf
ENABLED_PLUGINS_FILE=$d/enabled_plugins
MNESIA_BASE=$d/mnesia
LOG_BASE=$d/log
PID_FILE=$(pid_file "$node")
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$((AMQP_BASE + i))
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
  if [ "$node" = "$SEED" ]; then
    # The seed serves the management API on loopback, for txq's policy check.
    cat >>"$d/rabbitmq.conf" <<EOF
management.tcp.ip = 127.0.0.1
management.tcp.port = $((MGMT_BASE + i))
EOF
    echo '[rabbitmq_management].' >"$d/enabled_plugins"
  else
    echo '[].' >"$d/enabled_plugins"
  fi
  chown -R "$RABBITMQ_USER:" "$d" 2>/dev/null || true
}

start_vm() { # node
  local node=$1 d
  d=$(dir "$node")
  write_files "$node"
  log "starting $node@localhost (AMQP 127.0.0.1:$((AMQP_BASE + $(index "$node"))))"
  # -detached: the VM daemonizes; RABBITMQ_CONF_ENV_FILE gives it its own identity.
  as_rabbitmq env RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$node@localhost" \
    "$BIN/rabbitmq-server" -detached >>"$d/log/startup.log" 2>&1
}

wait_for() { # description seconds command...
  local what=$1 seconds=$2 i
  shift 2
  for ((i = 0; i < seconds * 2; i++)); do
    "$@" && return 0
    sleep 0.5
  done
  die "$what: not after ${seconds}s (logs: $BASE/*/log; try: bash scripts/cluster.sh down && bash scripts/cluster.sh up)"
}

join() { # node: joins the seed's cluster, dropping the node's own (test) data
  local node=$1 out
  out="$(dir "$node")/log/join.log"
  log "joining $node@localhost to $SEED@localhost"
  # The CLI prints harmless boot warnings while joining: keep them in a file.
  {
    ctl "$node" stop_app &&
      ctl "$node" reset &&
      ctl "$node" join_cluster "$SEED@localhost" &&
      ctl "$node" start_app
  } >"$out" 2>&1 || {
    cat "$out" >&2
    die "$node@localhost could not join $SEED@localhost"
  }
}

clustered() { # every node a member and running, as the seed sees it
  local want=${NODES[*]}
  [ "$(members "$SEED" all)" = "$want" ] && [ "$(members "$SEED" running)" = "$want" ]
}

cmd_up() {
  mkdir -p "$BASE"
  chown "$RABBITMQ_USER:" "$BASE" 2>/dev/null || true
  local node
  # Start every stopped VM first: a node that was clustered waits at boot for its
  # peers, so they must come up together.
  for node in "${NODES[@]}"; do
    if ! vm_up "$node"; then
      start_vm "$node"
    fi
  done
  for node in "${NODES[@]}"; do
    wait_for "$node@localhost answering" "$START_TIMEOUT" vm_up "$node"
  done
  for node in "${NODES[@]}"; do
    # A VM whose app was stopped (rabbitmqctl stop_app) is started again; a
    # booting one is waited for.
    if ! app_up "$node"; then
      ctl "$node" start_app >/dev/null 2>&1 || true
    fi
    ctl "$node" await_startup -t "$START_TIMEOUT" >/dev/null ||
      die "$node@localhost did not start (log: $(dir "$node")/log)"
  done
  for node in "${NODES[@]}"; do
    [ "$node" = "$SEED" ] && continue
    if ! [[ " $(members "$SEED" all) " == *" $node "* ]]; then
      join "$node"
    fi
  done
  wait_for "all three nodes running in one cluster" "$START_TIMEOUT" clustered
  log "up: ${NODES[*]} clustered on 127.0.0.1:5681-5683"
}

cmd_status() {
  local rc=0 node all running
  for node in "${NODES[@]}"; do
    if ! vm_up "$node"; then
      echo "$node@localhost: down"
      rc=1
    elif ! app_up "$node"; then
      echo "$node@localhost: VM up, rabbit app stopped"
      rc=1
    else
      echo "$node@localhost: running (pid $(node_pid "$node" || echo '?'), AMQP 127.0.0.1:$((AMQP_BASE + $(index "$node"))))"
    fi
  done
  for node in "${NODES[@]}"; do
    if app_up "$node"; then
      all=$(members "$node" all) || all=
      running=$(members "$node" running) || running=
      echo "cluster (as $node@localhost sees it): members [$all], running [$running]"
      [ "$all" = "${NODES[*]}" ] && [ "$running" = "${NODES[*]}" ] || rc=1
      break
    fi
  done
  if [ "$rc" != 0 ]; then
    echo "not all of ${NODES[*]} are running and clustered: bash scripts/cluster.sh up" >&2
  fi
  return "$rc"
}

cmd_down() {
  local node pid pids=()
  for node in "${NODES[@]}"; do
    if pid=$(node_pid "$node"); then
      pids+=("$pid")
      log "stopping $node@localhost (pid $pid)"
      ctl "$node" stop >/dev/null 2>&1 &
    fi
  done
  wait || true
  # Whatever did not stop in time is killed: its data goes anyway.
  for pid in "${pids[@]}"; do
    local i
    for ((i = 0; i < 20; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "killing pid $pid"
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  for node in "${NODES[@]}"; do
    rm -rf "$(dir "$node")"
  done
  rmdir "$BASE" 2>/dev/null || true
  log "down: ${NODES[*]} stopped, data removed"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
  echo "usage: $0 up|down|status" >&2
  exit 2
  ;;
esac
