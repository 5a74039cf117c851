#!/usr/bin/env bash
# CPU of a login/logout storm with presence subscribers: a server (2 shards,
# durability fsync, io_uring, last_seen_write_s default 60) holds CONNS v2
# connections, each watching the next SUBS users (tern-loadgen storm
# --subscribe SUBS: every reconnect subscribes again); then every connection
# is reset at once and reconnects (jitter 2 s), ROUNDS times. Prints the
# server's CPU time (utime + stime from /proc/PID/stat) over the storm and
# the PRESENCE frames it pushed.
# usage: storm.sh CONNS SUBS ROUNDS
set -euo pipefail
CONNS=${1:?connections}; SUBS=${2:?subscriptions per connection}; ROUNDS=${3:-2}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TERN=$ROOT/target/release/tern
LG=$ROOT/target/release/tern-loadgen
D=$(mktemp -d /tmp/tern-storm.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
"$TERN" serve --shards 2 --durability fsync --io uring --listen "127.0.0.1:$PORT" \
  --data-dir "$D/data" --stats-socket "$D/s.sock" --accept-rate-per-s-max 0 \
  --addr-conns-per-s-max 0 --addr-pending-max 0 2>"$D/log" >/dev/null &
SRV=$!
trap 'kill $SRV 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 200); do grep -q "listening on" "$D/log" && break; sleep 0.05; done
ticks() { awk '{print $14 + $15}' "/proc/$SRV/stat"; }
metric() { "$TERN" stats -s "$D/s.sock" show metrics | awk -v m="$1" '$1 ~ "^"m"\\{" {s += $2} END {print s + 0}'; }
T0=$(ticks); P0=$(metric tern_presence_pushes_total); L0=$(metric tern_logins_ok_total)
"$LG" storm --server "127.0.0.1:$PORT" --conns "$CONNS" --rate 10000/s --connect-timeout 30s \
  --jitter 2s --rounds "$ROUNDS" --subscribe "$SUBS" --max-time 10m --quiet >"$D/storm.out" 2>&1 || true
T1=$(ticks); P1=$(metric tern_presence_pushes_total); L1=$(metric tern_logins_ok_total)
HZ=$(getconf CLK_TCK)
echo "conns=$CONNS subs_each=$SUBS rounds=$ROUNDS logins=$((L1 - L0)) presence_pushes=$((P1 - P0)) cpu_ms=$(((T1 - T0) * 1000 / HZ)) cpu_us_per_login=$(((T1 - T0) * 1000000 / HZ / (L1 - L0 + 1)))"
grep -E "back|storm" "$D/storm.out" | tail -3 || true
