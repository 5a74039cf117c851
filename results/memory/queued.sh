#!/usr/bin/env bash
# Queued messages: USERS senders send PER_USER messages of BODY bytes each to
# as many offline receivers (fsync, 2 shards; io_uring for the fill, poll for the replay as in results/durability/recovery.py), then:
#   RSS before the sends, after (all queued), disk bytes of the log,
#   kill -9, restart on the same data dir: time to `listening on` (the
#   moment logins are served), replay MB/s from the `store recovered` lines,
#   RSS after recovery.
# usage: queued.sh TERN_BINARY [USERS] [PER_USER] [BODY]
set -euo pipefail
TERN=${1:?tern binary}; USERS=${2:-100000}; PER=${3:-20}; BODY=${4:-100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LG=$ROOT/target/release/tern-loadgen
D=$(mktemp -d /tmp/tern-queued.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
start() {
  RUST_LOG=info "$TERN" serve --io "${IO:-uring}" --shards 2 --durability fsync --listen "127.0.0.1:$PORT" \
    --data-dir "$D/data" --stats-socket "$D/s.sock" --queue-len-max 1000 \
    --conns-max 300000 --accept-rate-per-s-max 0 2>"$D/log.$1" >/dev/null &
  echo $!
}
waitlisten() { for _ in $(seq 600); do grep -q "listening on" "$D/log.$1" && return 0; sleep 0.05; done; return 1; }
PID=$(start 1); waitlisten 1; sleep 2
R0=$(rss "$PID")
"$LG" offline --server "127.0.0.1:$PORT" --engine uring --conns "$USERS" --rate 50000/s --per-user "$PER" \
  --body-bytes "$BODY" --msg-rate 400000/s --drain 60s --final-drain 0 --login-receivers 0 \
  >"$D/lg.out" 2>&1 || true
sleep 3
R1=$(rss "$PID")
DISK=$(du -sb "$D/data" | cut -f1)
QUEUED=$((USERS * PER))
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
T1=$(date +%s.%N); PID=$(IO=poll start 2); waitlisten 2; T2=$(date +%s.%N)
sleep 1
R2=$(rss "$PID")
echo "users=$USERS per_user=$PER body=$BODY queued=$QUEUED"
grep -E "^messages|^  failure" "$D/lg.out" || true
echo "rss_before_kib=$R0 rss_queued_kib=$R1 rss_recovered_kib=$R2"
echo "rss_per_msg_b=$(( (R1 - R0) * 1024 / QUEUED )) disk_per_msg_b=$(( DISK / QUEUED ))"
echo "listening_after_s=$(echo "$T2 - $T1" | bc)"
grep "store recovered" "$D/log.2" | sed 's/.*\] //'
kill "$PID"; wait "$PID" 2>/dev/null || true
rm -rf "$D"
