#!/bin/bash
# The script as it was run; its arguments are single words (paths without
# spaces, numbers), so the unquoted expansions are kept as run.
# shellcheck disable=SC2086,SC2034
# usage: lowrate.sh BIN_DIR IO SHARDS RATE DUR [extra server args]
bin=$1 io=$2 shards=$3 rate=$4 dur=$5; shift 5
export TERN_TOKEN_SECRET=0123456789abcdef0123456789abcdef
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
d=$(mktemp -d /tmp/p23/run.XXXX)
taskset -c 0 $bin/tern serve --io $io --shards $shards --listen 127.0.0.1:$port --durability memory --data-dir $d/data --stats-socket $d/s.sock --sends-per-s-max 0 --receipts-per-s-max 0 --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0 "$@" >$d/server.log 2>&1 &
sp=$!
for i in $(seq 100); do $bin/tern stats --socket $d/s.sock show info >/dev/null 2>&1 && break; sleep 0.1; done
timeout 120 taskset -c 1 $bin/tern-loadgen chat --server 127.0.0.1:$port --conns 2000 --msg-rate $rate --duration $dur --json $d/chat.json > $d/lg.txt 2>&1
$bin/tern stats --socket $d/s.sock show latency > $d/lat.txt 2>&1
kill $sp; wait $sp 2>/dev/null
python3 - $d/chat.json <<'P'
import json,sys
j=json.load(open(sys.argv[1]))
def walk(o,p=""):
    if isinstance(o,dict):
        for k,v in o.items(): walk(v,p+"."+k)
    elif isinstance(o,(int,float)) and any(s in p for s in ("p50","p99","p90","rate","sent","lost")): print(p,o)
walk(j)
P
cat $d/lat.txt | head -20
cat $d/lg.txt | tail -15; rm -rf $d
