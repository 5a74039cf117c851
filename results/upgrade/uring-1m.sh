#!/usr/bin/env bash
# results/upgrade/uring-1m.sh -- live upgrade with 1,000,000 idle logged-in
# connections on io_uring: how long the hand-over takes, and the longest pause
# a chatting client sees during it. Loopback only, in a network namespace of
# its own (somaxconn, port range tuned there; the host's sysctls are never
# written).
#
#   results/upgrade/uring-1m.sh            # CONNS=1000000 RUNS=3 by default
#
# Needs release binaries (cargo build --release -p tern -p tern-loadgen) and
# root (ip netns). Steps:
#   1. `tern serve --io uring --shards 2` (durability fsync, the default) in the
#      namespace; `tern-loadgen connect --conns $CONNS --rate 0 --hold ...`
#      logs in CONNS connections and holds them idle (no PINGs);
#   2. RUNS times: `tern-loadgen chat --conns 200 --msg-rate 400/s` for
#      CHAT_SECS, and CHAT_SECS/3 into it `tern upgrade` (same binary). The
#      old process logs the hand-over time; the chat run's largest
#      send->DELIVER latency is the longest pause a chatting client saw.
#   3. The holder's summary must show no connection dropped (every one was
#      carried, RUNS times).
# Bounded: every wait has a deadline, every load generator --max-time and
# `timeout`; everything this script started is stopped by PID on any exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
conns=${CONNS:-1000000}
runs=${RUNS:-3}
chat_secs=${CHAT_SECS:-30}
port=${PORT:-7322}
out=${OUT:-$root/results/upgrade/uring-1m}
mkdir -p "$out"
: >"$out/run.log"
log() { printf '[uring-1m %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$out/run.log" >&2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-up1m.XXXXXX")
netns="tern-up1m-$$"
server_pid="" holder_pid="" chat_pid=""
# Private copies: a rebuild by someone else must not swap binaries mid-run.
cp "$root/target/release/tern" "$root/target/release/tern-loadgen" "$tmp/"
tern="$tmp/tern" lg="$tmp/tern-loadgen" sock="$tmp/s.sock"

current_pid() { "$tern" stats --socket "$sock" show info 2>/dev/null | awk '$1 == "Pid:" { print $2 }'; }
info_field() { "$tern" stats --socket "$sock" show info 2>/dev/null | awk -v k="$1:" '$1 == k { print $2 }'; }
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    set +e
    stop_pid "$chat_pid"
    stop_pid "$holder_pid"
    # The server now running is the last successor (started by our server).
    local pid
    pid=$(current_pid)
    stop_pid "${pid:-$server_pid}"
    stop_pid "$server_pid"
    [ -f "$tmp/server.log" ] && cp "$tmp/server.log" "$out/server.log"
    ip netns del "$netns" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM HUP

ip netns add "$netns"
ns=(ip netns exec "$netns")
"${ns[@]}" ip link set lo up
"${ns[@]}" sysctl -q -w net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    "net.ipv4.ip_local_port_range=1024 65535" "net.ipv4.ip_local_reserved_ports=$port"

load() { awk '{ print $1, $2, $3 }' /proc/loadavg; }
log "box: $(nproc) cores, load $(load), MemAvailable $(awk '$1 == "MemAvailable:" { print $2 / 1048576 " GiB" }' /proc/meminfo)"
printf '%s\n' "tern serve --listen 127.0.0.1:$port --io uring --shards 2 --conns-max $((conns + conns / 10 + 1000)) ..." >"$out/commands.txt"
"${ns[@]}" "$tern" serve --listen "127.0.0.1:$port" --io uring --shards 2 \
    --data-dir "$tmp/data" --stats-socket "$sock" --conns-max "$((conns + conns / 10 + 1000))" \
    --listen-backlog 65535 --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0 \
    2>"$tmp/server.log" &
server_pid=$!
for ((i = 0; i < 100; i++)); do [ -S "$sock" ] && break; sleep 0.1; done

hold_secs=$((runs * (chat_secs + 40) + 30))
printf '%s\n' "tern-loadgen connect --conns $conns --rate 0 --inflight-max 4000 --hold ${hold_secs}s --ping-every 0" >>"$out/commands.txt"
"${ns[@]}" timeout --kill-after=15 "$((hold_secs + 400))" "$lg" connect --server "127.0.0.1:$port" \
    --conns "$conns" --rate 0 --inflight-max 4000 --hold "${hold_secs}s" --ping-every 0 --mem-floor 3GiB \
    --max-time "$((hold_secs + 360))s" --json "$out/held.json" >"$out/held.out" 2>"$out/held.err" &
holder_pid=$!
# The ramp ends with CONNS logged in, or (a busy box: some connects time
# out) with the count flat for 10 s at 90 % of it or more.
deadline=$(($(date +%s) + 600)) last=-1 flat=0
while :; do
    c=$(info_field Conns); c=${c:-0}
    [ "$c" -ge "$conns" ] && break
    if [ "$c" = "$last" ]; then flat=$((flat + 1)); else flat=0; fi
    last=$c
    [ "$flat" -ge 5 ] && [ "$c" -ge $((conns * 9 / 10)) ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { log "only $c of $conns connections after 600 s"; exit 1; }
    kill -0 "$holder_pid" 2>/dev/null || { log "the holder exited"; tail "$out/held.err" >&2; exit 1; }
    sleep 2
done
log "$c connections held (load $(load))"

for ((r = 1; r <= runs; r++)); do
    base=$((5000000 + r * 10000))
    printf '%s\n' "tern-loadgen chat --conns 200 --user-base $base --msg-rate 400/s --duration ${chat_secs}s" >>"$out/commands.txt"
    "${ns[@]}" timeout --kill-after=15 "$((chat_secs + 200))" "$lg" chat --server "127.0.0.1:$port" \
        --conns 200 --user-base "$base" --msg-rate 400/s --duration "${chat_secs}s" --ping-every 0 \
        --max-time "$((chat_secs + 180))s" --json "$out/chat-$r.json" >"$out/chat-$r.out" 2>"$out/chat-$r.err" &
    chat_pid=$!
    sleep "$((chat_secs / 3))"
    before=$(current_pid)
    log "run $r: upgrading pid $before (load $(load))"
    t0=$(date +%s%N)
    "$tern" upgrade --socket "$sock" >"$out/upgrade-$r.txt" 2>&1 || { log "upgrade $r failed: $(cat "$out/upgrade-$r.txt")"; exit 1; }
    t1=$(date +%s%N)
    log "run $r: $(cat "$out/upgrade-$r.txt") ($(((t1 - t0) / 1000000)) ms until tern upgrade returned; load $(load))"
    wait "$chat_pid" || log "chat run $r exited non-zero"
    chat_pid=""
    log "run $r: connections now $(info_field Conns)"
done

# The holder ends by itself after --hold; its summary says whether any of
# its connections was dropped.
log "waiting for the holder to end its hold"
wait "$holder_pid" || log "holder exited non-zero"
holder_pid=""
grep -E "hand-over to pid|connections carried|took over" "$tmp/server.log" >"$out/handover.log" || true
log "done: $out"
