#!/bin/bash
# The script as it was run; its arguments are single words (paths without
# spaces, numbers), so the unquoted expansions are kept as run.
# shellcheck disable=SC2086,SC2034
# usage: sat.sh BIN_DIR IO SHARDS SHAPE USERS WINDOWS STEP
bin=$1 io=$2 shards=$3 shape=$4 users=$5 windows=$6 step=$7; shift 7
export TERN_TOKEN_SECRET=0123456789abcdef0123456789abcdef
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
d=$(mktemp -d /tmp/p23/run.XXXX)
taskset -c 0 $bin/tern serve --io $io --shards $shards --listen 127.0.0.1:$port --durability memory --data-dir $d/data --stats-socket $d/s.sock --sends-per-s-max 0 --receipts-per-s-max 0 --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0 --deliver-inflight-max 1024 --queue-len-max 100000 "$@" >$d/server.log 2>&1 &
sp=$!
for i in $(seq 100); do $bin/tern stats --socket $d/s.sock show info >/dev/null 2>&1 && break; sleep 0.1; done
timeout 120 taskset -c 1 $bin/tern-loadgen saturate --server 127.0.0.1:$port --shape $shape --users $users --windows $windows --step-time $step --warmup 300ms --server-pid $sp --max-time 60s --json $d/sat.json > $d/lg.txt 2>&1
$bin/tern stats --socket $d/s.sock show latency > $d/lat.txt 2>&1
$bin/tern stats --socket $d/s.sock show metrics > $d/stats.txt 2>&1
kill $sp; wait $sp 2>/dev/null
cat $d/lg.txt; head -4 $d/lat.txt; grep -i "loop" $d/stats.txt | head
cp $d/stats.txt /tmp/p23/last-stats.txt; rm -rf $d
