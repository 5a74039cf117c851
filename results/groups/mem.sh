#!/usr/bin/env bash
# Server memory per group and per membership: builds GROUPS groups of
# MEMBERS members each with `tern-loadgen group --msgs 1` (every member
# online and answering each membership event with DELIVERED, so the
# events' queue entries are gone when a run ends) and reads the server's
# VmRSS before and after, each once it stopped moving (20 s at least). A
# fresh server (2 shards, io_uring, DURABILITY: `os` by default, `memory` for
# the structures without the log's index) per round; two warm-up groups of
# other users first, so the connection buffers and the allocator's first
# pages are in the baseline. The sender leaves before its own copy of the
# one message (and a few late events) is delivered: `queued` counts them.
# Run k uses users BASE+k .. BASE+k+MEMBERS-1 (sender BASE+k): consecutive
# groups share all but one user, so the figure holds the memberships and
# groups plus one new user per group (see README.md).
# MEMBERS = 1:1 is the control: GROUPS runs of one 1:1 message between two
# new users each (`--one-to-one`), bytes_per_user is what a user who was
# online once costs after going offline.
# Prints one line per round; README.md takes the medians.
# Usage: [DURABILITY=memory] results/groups/mem.sh MEMBERS GROUPS [ROUNDS]  (repository root,
#        after `cargo build --release -p tern -p tern-loadgen`)
set -euo pipefail
T=target/release
M=$1
G=$2
R=${3:-3}
DUR=${DURABILITY:-os}
export TERN_TOKEN_SECRET=bench-secret-0123456789

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# VmRSS once it stopped moving: read every second for at least 20 s and
# until the last 6 reads agree (bounded: 90 reads). The pages a burst of
# membership events used come back to the OS in steps over some 20 s.
settled_rss() {
  local pid=$1 i same=0 last=-1 now
  for i in $(seq 1 90); do
    sleep 1
    now=$(rss_kb "$pid")
    if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; fi
    last=$now
    if [ "$i" -ge 20 ] && [ "$same" -ge 5 ]; then break; fi
  done
  echo "$now"
}

queued() { $T/tern stats --socket "$1" show info | awk '/^Queued:/ {q=$2} /^Receipts_waiting:/ {r=$2} END {print q "," r}'; }

for round in $(seq 1 "$R"); do
  DIR=$(mktemp -d)
  ADDR=127.0.0.1:$((17440 + round))
  printf "memory_release_ms = 100\naddr_conns_per_s_max = 0\naccept_rate_per_s_max = 0\n" >"$DIR/tern.toml"
  $T/tern serve --config "$DIR/tern.toml" --listen $ADDR --shards 2 --data-dir "$DIR/data" \
    --stats-socket "$DIR/s.sock" --durability "$DUR" --sends-per-s-max 0 \
    --receipts-per-s-max 0 --queue-len-max 100000 --groups-per-user-max 100000 \
    >"$DIR/server.log" 2>&1 &
  PID=$!
  trap 'kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
  for _ in $(seq 1 50); do queued "$DIR/s.sock" >/dev/null 2>&1 && break; sleep 0.1; done
  if [ "$M" = 1:1 ]; then mode=(--one-to-one); step=2; else mode=(--members "$M"); step=1; fi
  group() {
    timeout 300 $T/tern-loadgen group --addr $ADDR "${mode[@]}" --msgs 1 --window 1 \
      --user-base "$1" >/dev/null
  }
  group 50000000
  group 60000000
  rss0=$(settled_rss $PID)
  q0=$(queued "$DIR/s.sock")
  start=$(date +%s.%N)
  for k in $(seq 0 $((G - 1))); do group $((10000000 + k * step)); done
  took=$(echo "$(date +%s.%N) - $start" | bc)
  rss1=$(settled_rss $PID)
  q1=$(queued "$DIR/s.sock")
  d=$(( (rss1 - rss0) * 1024 ))
  if [ "$M" = 1:1 ]; then
    per="bytes_per_user=$((d / (2 * G)))"
  else
    per="bytes_per_group=$((d / G)) bytes_per_membership=$((d / (G * M)))"
  fi
  echo "round=$round durability=$DUR members=$M groups=$G build_s=$took rss0_kb=$rss0 rss1_kb=$rss1" \
    "queued,receipts_waiting0=$q0 queued,receipts_waiting1=$q1 $per load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)"
  kill $PID
  wait $PID || true
  rm -rf "$DIR"
  trap - EXIT
done
