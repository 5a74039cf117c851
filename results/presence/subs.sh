#!/usr/bin/env bash
# Memory per idle logged-in connection with N presence subscriptions each:
# a server (2 shards, durability memory, io_uring) holds CONNS idle v2
# connections (tern-loadgen connect), each of which SUBSCRIBEs to the next
# SUBS users of the run once logged in; RSS (VmRSS) is read 5 s after every
# subscription is in place (tern_presence_subs summed = online * SUBS; a
# run that got fewer than CONNS up, the box being busy, prints what it had).
# usage: subs.sh CONNS SUBS
set -euo pipefail
CONNS=${1:?connections}; SUBS=${2:?subscriptions per connection}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TERN=$ROOT/target/release/tern
LG=$ROOT/target/release/tern-loadgen
D=$(mktemp -d /tmp/tern-subs.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
"$TERN" serve --shards 2 --durability memory --io uring --listen "127.0.0.1:$PORT" \
  --data-dir "$D/data" --stats-socket "$D/s.sock" --accept-rate-per-s-max 0 \
  --addr-conns-per-s-max 0 --addr-pending-max 0 2>"$D/log" >/dev/null &
SRV=$!
trap 'kill $SRV 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 200); do grep -q "listening on" "$D/log" && break; sleep 0.05; done
"$LG" connect --server "127.0.0.1:$PORT" --conns "$CONNS" --rate 10000/s --connect-timeout 30s \
  --hold 1h --max-time 10m --subscribe "$SUBS" --quiet >"$D/hold.out" 2>&1 &
HOLD=$!
online() { "$TERN" stats -s "$D/s.sock" show info | awk '/^Users_online:/{print $2}'; }
subs() { "$TERN" stats -s "$D/s.sock" show metrics | awk '$1 ~ /^tern_presence_subs\{/ {s += $2} END {print s + 0}'; }
for _ in $(seq 600); do [ "$(online)" = "$CONNS" ] && break; sleep 0.1; done
# Every logged-in connection subscribes (the watched need not be online).
for _ in $(seq 1200); do [ "$(subs)" = "$(($(online) * SUBS))" ] && break; sleep 0.1; done
sleep 5
R=$(rss "$SRV"); ON=$(online); S=$(subs)
echo "conns=$CONNS subs_each=$SUBS online=$ON subs=$S rss_kib=$R bytes_per_conn=$((R * 1024 / ON))"
kill "$HOLD"; wait "$HOLD" 2>/dev/null || true
