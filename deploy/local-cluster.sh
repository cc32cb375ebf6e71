#!/usr/bin/env bash
# Starts or stops the two-region example cluster of deploy/cluster.toml as
# separate processes on this machine: three metadata voters and six nodes.
# Data and logs go to ./harbor-cluster (relative to where you run it).
#
#   deploy/local-cluster.sh start    # build (release) and start everything
#   deploy/local-cluster.sh status   # harbor status against the madrid gateway
#   deploy/local-cluster.sh stop     # stop what start started (SIGTERM)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
run="harbor-cluster"
pids="$run/pids"

case "${1:-}" in
start)
  if [ -f "$pids" ]; then
    while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then
        echo "already started from here ($name is pid $pid); stop it first: $0 stop" >&2
        exit 1
      fi
    done < "$pids"
  fi
  cargo build --release --quiet --manifest-path "$here/../Cargo.toml"
  harbor="$here/../target/release/harbor"
  mkdir -p "$run/logs"
  : > "$pids"
  for i in 1 2 3; do
    "$harbor" meta --config "$here/meta-$i.toml" > "$run/logs/meta-$i.log" 2>&1 &
    echo "$! meta-$i" >> "$pids"
  done
  for n in madrid-1 madrid-2 madrid-3 newyork-1 newyork-2 newyork-3; do
    "$harbor" node --config "$here/$n.toml" > "$run/logs/$n.log" 2>&1 &
    echo "$! $n" >> "$pids"
  done
  # A process that exited is reported with the end of its log, whether or
  # not the rest became healthy without it.
  exited() {
    local gone=0
    while read -r pid name; do
      if ! kill -0 "$pid" 2>/dev/null; then
        gone=1
        echo "$name (pid $pid) exited; from $run/logs/$name.log:" >&2
        { grep -m 3 '^Error' "$run/logs/$name.log" || tail -n 5 "$run/logs/$name.log"; } \
          | sed 's/^/  /' >&2
      fi
    done < "$pids"
    return $gone
  }
  echo "waiting for the cluster to be healthy ..."
  for _ in $(seq 1 120); do
    if ! exited; then
      echo "not started: a process exited (the others still run; stop them with: $0 stop)" >&2
      exit 1
    fi
    if curl -sf http://127.0.0.1:7400/v1/health > /dev/null \
      && curl -sf http://127.0.0.1:7401/v1/health > /dev/null; then
      sleep 1 # a process that fails at start fails within this
      if exited; then
        echo "ready: gateways http://127.0.0.1:7400 (madrid), http://127.0.0.1:7401 (newyork); logs in $run/logs"
        exit 0
      fi
      echo "not started: a process exited (the others still run; stop them with: $0 stop)" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "not healthy after 60 s; see $run/logs" >&2
  exit 1
  ;;
stop)
  [ -f "$pids" ] || { echo "nothing started from here ($pids missing)"; exit 0; }
  while read -r pid _; do kill -TERM "$pid" 2>/dev/null || true; done < "$pids"
  rm -f "$pids"
  echo "stopped"
  ;;
status)
  "$here/../target/release/harbor" status --url http://127.0.0.1:7400
  ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac
