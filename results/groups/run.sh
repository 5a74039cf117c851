#!/usr/bin/env bash
# Server CPU per delivered copy: groups of 10, 100 and 1000 members against
# 1:1 messages, on one server run (2 shards, fsync durability, rate limits
# off, queues of 100000). Three rounds; each run uses fresh users (a new
# group). Prints one line per run; README.md takes the medians.
# Usage: results/groups/run.sh   (from the repository root, release build)
set -euo pipefail
T=target/release
export TERN_TOKEN_SECRET=bench-secret-0123456789
DIR=$(mktemp -d)
ADDR=127.0.0.1:17333
$T/tern serve --listen $ADDR --shards 2 --data-dir "$DIR/data" \
  --stats-socket "$DIR/s.sock" --durability fsync --sends-per-s-max 0 \
  --receipts-per-s-max 0 --queue-len-max 100000 >"$DIR/server.log" 2>&1 &
PID=$!
trap 'kill $PID; rm -rf "$DIR"' EXIT
sleep 1
base=10000000
for round in 1 2 3; do
  for spec in "one 1 50000 64" "group 10 10000 64" "group 100 2000 16" "group 1000 400 16"; do
    read -r kind members msgs window <<<"$spec"
    base=$((base + 10000))
    if [ "$kind" = one ]; then mode=(--one-to-one); else mode=(--members "$members"); fi
    echo -n "round=$round "
    timeout 300 $T/tern-loadgen group --addr $ADDR "${mode[@]}" --msgs "$msgs" --window "$window" \
      --user-base $base --server-pid $PID | tr '\n' ' '
    echo
  done
done
echo "rss_kb=$(grep VmRSS /proc/$PID/status | awk '{print $2}')"
