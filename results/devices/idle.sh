#!/bin/sh
# Userspace memory per idle logged-in connection, by devices per user.
# Usage: results/devices/idle.sh TERN_BIN LOADGEN_BIN CONNS DEVICES
# Starts a server (2 shards, io_uring, --durability memory) on a free
# loopback port, reads its VmRSS with no connection, opens CONNS idle
# logged-in connections (`tern-loadgen connect --devices DEVICES`), reads
# VmRSS and Sessions_online/Users_online 10 s after the ramp, and prints
#   devices conns users sessions rss_base_kb rss_held_kb bytes_per_conn
set -eu
TERN=$1; LG=$2; CONNS=$3; DEVICES=$4
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$TERN" serve --listen 127.0.0.1:"$PORT" --shards 2 --io uring --durability memory \
  --data-dir "$DIR/data" --stats-socket "$DIR/s.sock" >"$DIR/server.log" 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null; wait $SRV 2>/dev/null; rm -rf "$DIR"' EXIT
i=0; while [ ! -S "$DIR/s.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
sleep 2
rss() { awk '/VmRSS/ {print $2}' /proc/$SRV/status; }
BASE=$(rss)
"$LG" connect --server 127.0.0.1:"$PORT" --conns "$CONNS" --devices "$DEVICES" \
  --rate 0 --hold 15s --ping-every 0 --quiet --user-base 70000000 >"$DIR/lg.out" 2>&1 &
LGP=$!
# Wait for the ramp (bounded: 60 s), then 10 s of idle.
i=0
while [ $i -lt 600 ]; do
  S=$("$TERN" stats --socket "$DIR/s.sock" 2>/dev/null | awk '/^Sessions_online/ {print $2}')
  [ "${S:-0}" -ge "$CONNS" ] && break
  sleep 0.1; i=$((i+1))
done
sleep 10
HELD=$(rss)
INFO=$("$TERN" stats --socket "$DIR/s.sock")
USERS=$(echo "$INFO" | awk '/^Users_online/ {print $2}')
SESS=$(echo "$INFO" | awk '/^Sessions_online/ {print $2}')
wait $LGP || true
echo "$DEVICES $CONNS $USERS $SESS $BASE $HELD $(( (HELD - BASE) * 1024 / CONNS ))"
