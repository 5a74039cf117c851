#!/usr/bin/env bash
# Memory after a burst: a server (2 shards, DURABILITY) holds HELD idle
# logged-in connections (tern-loadgen connect); RSS is read, then a chat burst
# runs (2,000 more users, RATE (default 20,000) msgs/s offered for 10 s, all four ticks), and
# RSS is read right after it (once the burst users are gone) and 60 s later.
# usage: burst.sh TERN_BINARY DURABILITY(memory|fsync) HELD
set -euo pipefail
TERN=${1:?tern binary}; DUR=${2:?memory|fsync}; HELD=${3:?held connections}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LG=$ROOT/target/release/tern-loadgen
D=$(mktemp -d /tmp/tern-burst.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
"$TERN" serve ${CONFIG:+--config "$CONFIG"} --shards 2 --durability "$DUR" --listen "127.0.0.1:$PORT" --data-dir "$D/data" \
  --stats-socket "$D/s.sock" --accept-rate-per-s-max 0 2>"$D/log" >/dev/null &
SRV=$!
for _ in $(seq 200); do grep -q "listening on" "$D/log" && break; sleep 0.05; done
"$LG" connect --server "127.0.0.1:$PORT" --conns "$HELD" --rate 0 --hold 1h --quiet >"$D/hold.out" 2>&1 &
HOLD=$!
online() { "$TERN" stats -s "$D/s.sock" show info | awk '/^Users_online:/{print $2}'; }
for _ in $(seq 600); do [ "$(online)" = "$HELD" ] && break; sleep 0.1; done
sleep 5
R0=$(rss "$SRV")
"$LG" chat --server "127.0.0.1:$PORT" --conns 2000 --user-base 5000000 --rate 0 \
  --msg-rate "${RATE:-20000}/s" --duration 10s --drain 10s --final-drain 30s --quiet >"$D/chat.out" 2>&1 || true
for _ in $(seq 300); do [ "$(online)" = "$HELD" ] && break; sleep 0.1; done
R1=$(rss "$SRV")
sleep 60
R2=$(rss "$SRV")
Q=$("$TERN" stats -s "$D/s.sock" show info | awk '/^Queued:/{print $2}')
echo "durability=$DUR held=$HELD rss_before_kib=$R0 rss_after_kib=$R1 rss_60s_kib=$R2 queued_60s=$Q"
grep -E "delivered|msgs/s" "$D/chat.out" | tail -2 || true
kill "$HOLD"; wait "$HOLD" 2>/dev/null || true
kill "$SRV"; wait "$SRV" 2>/dev/null || true
rm -rf "$D"
