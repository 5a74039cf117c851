#!/usr/bin/env bash
# results/ops/measure.sh BIN_DIR LABEL [CONNS] [RUNS] -- issue 24's figures:
# server memory per idle logged-in connection, and (with a build that has it)
# the cost of `show conns` with CONNS connections held.
#
# Each run: `tern serve` (2 shards, io_uring, durability memory, port 7322 on
# loopback) from BIN_DIR, its RSS with no connection, then `tern-loadgen
# connect` holds CONNS logged-in idle connections (no PINGs); once the server
# counts them all: its RSS again, `show conns` timed 5 times, `show shards`
# loop p99 before and after, and `show info` timed the same way as a
# baseline (the stats thread polls its socket every 50 ms, and each query
# starts a `tern stats` process). Everything this script starts is bounded
# (--max-time, timeout) and stopped by PID on exit. Lines go to stdout.
set -euo pipefail

bin=${1:?BIN_DIR}
label=${2:?LABEL}
conns=${3:-100000}
runs=${4:-3}
port=7322
readonly HOLD_S=90 WAIT_S=80

tmp=$(mktemp -d)
server_pid="" lg_pid=""
cleanup() {
    local pid
    for pid in "$lg_pid" "$server_pid"; do
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

q() { timeout 10 "$bin/tern" stats --socket "$tmp/sock" "$@"; }
info() { q show info | awk -F': ' -v k="$1" '$1 == k { print $2 }'; }
ms_now() { date +%s%3N; }

for run in $(seq 1 "$runs"); do
    rm -rf "$tmp/data" "$tmp/sock"
    timeout 300 "$bin/tern" serve --listen "127.0.0.1:$port" --shards 2 --io uring \
        --durability memory --data-dir "$tmp/data" --stats-socket "$tmp/sock" \
        --accept-rate-per-s-max 0 --conns-max $((conns + 10000)) --idle-timeout-ms 900000 \
        --listen-backlog 65535 \
        >"$tmp/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do [[ -S $tmp/sock ]] && break; sleep 0.1; done
    sleep 1
    rss0=$(info Rss_bytes)
    timeout $((HOLD_S + 60)) "$bin/tern-loadgen" connect --server "127.0.0.1:$port" \
        --conns "$conns" --rate 50000/s --ping-every 0 --hold "${HOLD_S}s" \
        --max-time "$((HOLD_S + 30))s" --quiet >"$tmp/lg.out" 2>&1 &
    lg_pid=$!
    held=0
    for _ in $(seq 1 $((WAIT_S * 2))); do
        held=$(info Users_online)
        [[ $held -ge $conns ]] && break
        sleep 0.5
    done
    sleep 3
    if [[ ${held:-0} -eq 0 ]]; then echo "$label run $run: nothing held"; tail -5 "$tmp/lg.out" "$tmp/server.log"; exit 1; fi
    rss1=$(info Rss_bytes)
    per=$(( (rss1 - rss0) / held ))
    echo "$label run $run: users_online $held rss_empty $rss0 rss_held $rss1 bytes_per_idle_conn $per"
    q help >"$tmp/help.txt"
    if grep -q "show conns" "$tmp/help.txt"; then
        p99_before=$(q show shards | awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "loop_p99_us") c = i } NR > 1 { print $c }' | tr '\n' ' ')
        for i in 1 2 3 4 5; do
            t0=$(ms_now)
            q show info >/dev/null
            t1=$(ms_now)
            echo "$label run $run: show info #$i in $((t1 - t0)) ms"
        done
        for i in 1 2 3 4 5; do
            t0=$(ms_now)
            answer=$(q show conns sort by queue limit 10)
            first=${answer%%$'\n'*}
            t1=$(ms_now)
            echo "$label run $run: show conns #$i ${first} in $((t1 - t0)) ms"
        done
        p99_after=$(q show shards | awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "loop_p99_us") c = i } NR > 1 { print $c }' | tr '\n' ' ')
        echo "$label run $run: loop p99 us per shard before: $p99_before after: $p99_after"
    fi
    kill "$lg_pid" 2>/dev/null || true
    wait "$lg_pid" 2>/dev/null || true
    lg_pid=""
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
done
