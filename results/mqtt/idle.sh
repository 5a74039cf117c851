#!/usr/bin/env bash
# Server userspace bytes per idle, logged-in connection: Tern over its own
# protocol, Tern's MQTT listener, and mosquitto (the broker, apt `mosquitto`),
# each driven by results/mqtt/idle.py (MQTT: CONNECT 3.1.1 + SUBSCRIBE u/<id>
# QoS 1, then idle). Each run: a fresh server, VmRSS before, CONNS
# connections held, VmRSS 3 s after the ramp; (after - before) / CONNS.
# Tern: release build, 2 shards, memory durability, accept limits off.
# Usage: [IO=auto|uring|poll] results/mqtt/idle.sh [CONNS] [RUNS]
#   (from the repository root, after `cargo build --release -p tern`)
set -euo pipefail
conns=${1:-15000} runs=${2:-3}
tern=target/release/tern
export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
wait_port() { for _ in $(seq 100); do ss -ltn | grep -q ":$1 " && return; sleep 0.1; done; }
for run in $(seq 1 "$runs"); do
    for target in tern mqtt mosquitto; do
        tmp=$(mktemp -d)
        # Below the ephemeral range (32768-60999), where the last run's
        # client ports may still be in TIME_WAIT.
        port=$((20000 + RANDOM % 6000)) mport=$((26000 + RANDOM % 6000))
        if [ $target = mosquitto ]; then
            printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n' \
                "$mport" >"$tmp/mosquitto.conf"
            mosquitto -c "$tmp/mosquitto.conf" >"$tmp/server.log" 2>&1 &
        else
            "$tern" serve --io "${IO:-auto}" --shards 2 --listen "127.0.0.1:$port" \
                --mqtt-listen "127.0.0.1:$mport" \
                --stats-socket "$tmp/tern.sock" --data-dir "$tmp/data" --durability memory \
                --accept-rate-per-s-max 0 --conns-max $((conns + 2000)) --idle-timeout-ms 900000 \
                --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0 >"$tmp/server.log" 2>&1 &
        fi
        spid=$!
        wait_port "$mport"
        if [ $target = tern ]; then p=$port proto=tern; else p=$mport proto=mqtt; fi
        if ! line=$(timeout 120 python3 results/mqtt/idle.py --pid "$spid" --port "$p" --proto "$proto" --conns "$conns"); then
            echo "run=$run server=$target failed; its log:" >&2
            tail -n 20 "$tmp/server.log" >&2
            exit 1
        fi
        kill $spid; wait $spid || true
        echo "run=$run server=$target $line"
        rm -rf "$tmp"
    done
done
