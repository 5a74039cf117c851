#!/usr/bin/env bash
# Server userspace bytes per idle, logged-in connection, raw TCP vs WebSocket,
# measured with `tern-loadgen connect` (plain, and `--ws`). Each run: a fresh
# release server (2 shards, memory durability, limits off), VmRSS before,
# N connections logged in and held without keepalives, VmRSS 6 s after the
# ramp; (after - before) / N. Bounded: every load generator has --max-time.
# Usage: [IO=auto|uring|poll] results/ws/loadgen-idle.sh [CONNS] [RUNS]   (from the repository root,
# after `cargo build --release -p tern -p tern-loadgen`)
set -euo pipefail
conns=${1:-19000} runs=${2:-3}
tern=target/release/tern lg=target/release/tern-loadgen
rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }
export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
for run in $(seq 1 "$runs"); do
    for transport in tcp ws; do
        tmp=$(mktemp -d)
        port=$((21000 + RANDOM % 20000)) wsport=$((41000 + RANDOM % 20000))
        "$tern" serve --io "${IO:-auto}" --shards 2 --listen "127.0.0.1:$port" --ws-listen "127.0.0.1:$wsport" \
            --stats-socket "$tmp/tern.sock" --data-dir "$tmp/data" --durability memory \
            --accept-rate-per-s-max 0 --conns-max $((conns + 2000)) --idle-timeout-ms 900000 \
            --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0 >"$tmp/server.log" 2>&1 &
        spid=$!
        for _ in $(seq 100); do ss -ltn | grep -q ":$wsport " && break; sleep 0.1; done
        sleep 1
        rss0=$(rss_kb $spid)
        if [ $transport = ws ]; then args=(--ws --server "127.0.0.1:$wsport"); else args=(--server "127.0.0.1:$port"); fi
        "$lg" connect "${args[@]}" --conns "$conns" --rate 10000/s --hold 12s --ping-every 0 \
            --max-time 60s --quiet --json "$tmp/lg.json" >"$tmp/lg.out" 2>&1 &
        lpid=$!
        sleep $((conns / 10000 + 6))
        rss1=$(rss_kb $spid) lrss=$(rss_kb $lpid)
        wait $lpid || true
        up=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['connections']['up_max'], r['connections']['failed'])" "$tmp/lg.json")
        kill $spid; wait $spid || true
        echo "run=$run transport=$transport conns=$conns up_max,failed=$up server_rss0_kb=$rss0 server_rss_kb=$rss1 server_bytes_per_conn=$(( (rss1 - rss0) * 1024 / conns )) loadgen_rss_kb=$lrss"
        rm -rf "$tmp"
    done
done
