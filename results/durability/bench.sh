#!/usr/bin/env bash
# One chat run against a fresh server: bench.sh MODE RATE DURATION OUT.json
#   MODE     fsync | os | memory  (tern serve --durability MODE)
#   RATE     messages/s over all connections (tern-loadgen chat --msg-rate)
#   DURATION e.g. 20s
# Build first: cargo build --release -p tern -p tern-loadgen
# The server gets a fresh data directory on the same disk as /tmp.
set -euo pipefail
mode=$1 rate=$2 duration=$3 out=$4
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d /tmp/tern-durbench.XXXXXX)
# Port 0: a fixed port could be shared, silently, with another tern that
# binds it too (SO_REUSEPORT), which mixes two runs.
"$bin/tern" serve --io poll --durability "$mode" --shards 2 \
    --listen 127.0.0.1:0 --data-dir "$work/data" --stats-socket "$work/s.sock" \
    >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
addr=
for _ in $(seq 100); do
  addr=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$work/server.log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log" >&2; exit 2; }
"$bin/tern-loadgen" chat --server "$addr" --conns 2000 --msg-rate "$rate/s" \
    --duration "$duration" --json "$out" --quiet --max-time 5m >/dev/null
