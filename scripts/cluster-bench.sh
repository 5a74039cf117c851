#!/usr/bin/env bash
# scripts/cluster-bench.sh -- figures for issue 15 (cluster on NATS
# JetStream), written to results/cluster/<UTC date>/:
#
#   chat      the same `tern-loadgen chat` shape against one standalone
#             server (durability fsync, its default, and memory) and against
#             two Tern nodes on one nats-server (for each --chat-partitions):
#             msgs/s, ACK and deliver p50/p99 (client side), the nodes'
#             `cluster_publish` histogram and each process's CPU seconds
#             during the run; median of --runs runs.
#   takeover  two nodes; `kill -9` of one; time until every user logs in
#             again through the survivor (REDIRECTs followed), with the
#             lease used; median of --runs runs.
#   storage   two nodes; --queued messages to offline users, for each body
#             size of --body-bytes; JetStream's stream TERN bytes / messages
#             (NATS monitoring port, /jsz) and the stream's directory on disk.
#
# Everything runs on loopback ports in a temp dir: its own nats-server
# (`-js`, one server, so stream replicas 1; or, with --nats-servers 3, a
# NATS cluster of three JetStream servers, so stream_replicas 3), its own
# Tern nodes and load
# generators. Bounded: every load-generator run has --max-time and a
# `timeout`, every wait a deadline. Only the PIDs this script started are
# stopped, also on Ctrl-C; the temp dir is removed on exit.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/cluster-bench.sh [OPTIONS]

  --parts LIST        which figures, space-separated (default "chat takeover storage")
  --runs K            repeats; the summary takes medians (default 3)
  --conns N           chat: connections (default 2000)
  --msg-rates LIST    chat: offered msgs/s, space-separated (default "1000 4000")
  --duration T        chat: sending time per run (default 10s)
  --chat-partitions L chat: partition counts of the cluster runs (default "4096 64")
  --no-standalone     chat: skip the standalone runs (cluster runs only)
  --partitions P      takeover, storage: partitions (default 4096, the production default)
  --lease-s S         lease seconds (default 10, the production default)
  --takeover-users N  takeover: users that log in again (default 1000)
  --queued N          storage: messages left waiting (default 10000)
  --body-bytes LIST   storage: body sizes in bytes (default "100 1000")
  --out DIR           results directory (default results/cluster/<UTC date>)
  --nats-servers N    1 (default: one nats-server, stream replicas 1) or 3 (a NATS
                      cluster of three JetStream servers with routes; the nodes use
                      stream_replicas 3, the production layout)
  --no-build          use the existing target/release binaries
  -h, --help          this text
USAGE
}

invocation="$*"
parts="chat takeover storage" runs=3 conns=2000 msg_rates="1000 4000" duration=10s
chat_partitions="4096 64" partitions=4096 lease_s=10 takeover_users=1000 queued=10000 body_bytes="100 1000" out="" build=1
standalone=1 nats_servers=1

need_arg() { [ $# -ge 2 ] || { echo "cluster-bench.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case $1 in
        --parts) need_arg "$@"; parts=$2; shift ;;
        --runs) need_arg "$@"; runs=$2; shift ;;
        --conns) need_arg "$@"; conns=$2; shift ;;
        --msg-rates) need_arg "$@"; msg_rates=$2; shift ;;
        --duration) need_arg "$@"; duration=$2; shift ;;
        --chat-partitions) need_arg "$@"; chat_partitions=$2; shift ;;
        --partitions) need_arg "$@"; partitions=$2; shift ;;
        --lease-s) need_arg "$@"; lease_s=$2; shift ;;
        --takeover-users) need_arg "$@"; takeover_users=$2; shift ;;
        --queued) need_arg "$@"; queued=$2; shift ;;
        --body-bytes) need_arg "$@"; body_bytes=$2; shift ;;
        --out) need_arg "$@"; out=$2; shift ;;
        --nats-servers) need_arg "$@"; nats_servers=$2; shift ;;
        --no-build) build=0 ;;
        --no-standalone) standalone=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "cluster-bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

case $nats_servers in
    1 | 3) ;;
    *) echo "cluster-bench.sh: --nats-servers must be 1 or 3" >&2; exit 2 ;;
esac
command -v nats-server >/dev/null || { echo "cluster-bench.sh: nats-server is not on PATH (apt-get install nats-server)" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${out:-results/cluster/$(date -u +%Y-%m-%d)}
mkdir -p "$out/raw"
tmp=$(mktemp -d)
# PIDs this script started and has not stopped yet.
pids=()

log() { echo "[cluster-bench $(date -u +%H:%M:%S)] $*" >&2; }

# Stops one PID this script started (SIGTERM, then waits).
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    pids=("${keep[@]}")
}

stop_all() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}

cleanup() {
    stop_all
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

if [ "$build" = 1 ]; then
    cargo build --release -q -p tern -p tern-loadgen
fi
tern=$root/target/release/tern
loadgen=$root/target/release/tern-loadgen

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

# Server flags of every Tern process here, as scripts/saturation.sh: the
# per-user and per-address limits off (the load generator's users send
# faster than a person).
server_flags=(--sends-per-s-max 0 --receipts-per-s-max 0 --addr-conns-per-s-max 0
    --addr-pending-max 0 --pending-max 0 --queue-len-max 100000)

{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $(nproc) cores, $(nats-server --version)"
    echo "# invocation: scripts/cluster-bench.sh $invocation"
    echo "# the box is shared with other work: figures are noisy"
} >"$out/commands.txt"

# Records a command line (temp dir shown as $TMP).
note() { echo "$*" | sed "s#$tmp#\$TMP#g; s#$root/target/release/##g" >>"$out/commands.txt"; }

# start_nats DIR: JetStream in DIR, one nats-server or (--nats-servers 3) a
# cluster of three; sets nats_url (every client URL, comma-separated),
# nats_mon (server 1's monitoring URL), nats_mons (every server's),
# nats_pid (server 1), nats_pids (all) and nats_store (server 1's store
# directory).
start_nats() {
    local dir=$1 port mport mports=()
    mkdir -p "$dir"
    nats_pids=() nats_url="" nats_mons=()
    if [ "$nats_servers" = 1 ]; then
        port=$(free_port) mport=$(free_port)
        local cmd=(nats-server -js -a 127.0.0.1 -p "$port" -m "$mport" -sd "$dir/js")
        note "${cmd[*]}"
        "${cmd[@]}" >"$dir/nats.log" 2>&1 &
        nats_pid=$!
        pids+=("$nats_pid")
        nats_pids=("$nats_pid")
        nats_url="nats://127.0.0.1:$port" nats_mon="http://127.0.0.1:$mport"
        nats_store="$dir/js"
        nats_mons=("$nats_mon")
    else
        # Three servers, each with its own name, store and ports, routes to
        # the two others (as tests/cluster/nats.rs).
        local n ports=() routes=()
        for n in 1 2 3; do ports+=("$(free_port)") mports+=("$(free_port)") routes+=("$(free_port)"); done
        for n in 1 2 3; do
            local others=() m
            for m in 1 2 3; do [ "$m" = "$n" ] || others+=("nats-route://127.0.0.1:${routes[m - 1]}"); done
            cat >"$dir/n$n.conf" <<EOF
server_name: n$n
listen: 127.0.0.1:${ports[n - 1]}
http: 127.0.0.1:${mports[n - 1]}
jetstream { store_dir: "$dir/js$n" }
cluster {
  name: tern_bench
  listen: 127.0.0.1:${routes[n - 1]}
  routes: [${others[0]}, ${others[1]}]
}
EOF
            local cmd=(nats-server -c "$dir/n$n.conf")
            note "${cmd[*]}   # server_name n$n, jetstream store_dir, cluster routes to the other two"
            "${cmd[@]}" >"$dir/nats$n.log" 2>&1 &
            nats_pids+=("$!")
            pids+=("$!")
            nats_url+="${nats_url:+,}nats://127.0.0.1:${ports[n - 1]}"
        done
        nats_pid=${nats_pids[0]} nats_mon="http://127.0.0.1:${mports[0]}" nats_store="$dir/js1"
        for n in 1 2 3; do nats_mons+=("http://127.0.0.1:${mports[n - 1]}"); done
    fi
    # Up, and (cluster) every server names a JetStream meta leader (60 s).
    local i s ok
    for ((i = 0; i < 600; i++)); do
        ok=1
        if [ "$nats_servers" = 1 ]; then
            curl -sf "$nats_mon/healthz" >/dev/null 2>&1 || ok=0
        else
            for s in "${mports[@]}"; do
                curl -sf "http://127.0.0.1:$s/jsz" 2>/dev/null |
                    python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("meta_cluster", {}).get("leader") else 1)' \
                        2>/dev/null || { ok=0; break; }
            done
        fi
        [ "$ok" = 1 ] && return 0
        sleep 0.1
    done
    cat "$dir"/nats*.log >&2
    log "nats-server did not start (or no JetStream meta leader)"
    exit 1
}

# nats_cpu_labels: label=PID arguments of cpu_report for the nats-servers.
nats_cpu_labels() {
    if [ "$nats_servers" = 1 ]; then
        echo "nats-server=$nats_pid"
    else
        local n
        for n in 1 2 3; do echo "nats-n$n=${nats_pids[n - 1]}"; done
    fi
}

# wait_stats SOCKET PID NAME: until the stats socket answers (every shard runs).
wait_stats() {
    local i
    for ((i = 0; i < 100; i++)); do
        "$tern" stats --socket "$1" show info >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    log "$3 did not start"
    exit 1
}

# cpu_ticks PID: user + system CPU time of a process so far, in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# cpu_report NAME LABEL=PID... TICKS...: CPU seconds of each process since
# its TICKS reading, into raw/NAME.cpu ("label seconds" lines).
cpu_report() {
    local name=$1 hz n i
    shift
    hz=$(getconf CLK_TCK)
    n=$(($# / 2))
    local args=("$@")
    : >"$out/raw/$name.cpu"
    for ((i = 0; i < n; i++)); do
        local label=${args[i]%%=*} pid=${args[i]#*=} before=${args[i + n]} now
        now=$(cpu_ticks "$pid")
        echo "$label $(python3 -c "print(f'{($now - $before) / $hz:.2f}')")" >>"$out/raw/$name.cpu"
    done
}

# start_node DIR ID [PARTITIONS]: a clustered Tern node; sets node_pid,
# node_addr, node_sock.
start_node() {
    local dir=$1 id=$2 parts=${3:-$partitions} port
    port=$(free_port)
    mkdir -p "$dir"
    cat >"$dir/tern.toml" <<EOF
listen = "127.0.0.1:$port"
stats_socket = "$dir/tern.sock"
data_dir = "$dir/data"

[cluster]
node_id = "$id"
nats_urls = ["${nats_url//,/\", \"}"]
public_addr = "127.0.0.1:$port"
partitions = $parts
lease_s = $lease_s
stream_replicas = $nats_servers
EOF
    local cmd=("$tern" serve --config "$dir/tern.toml" "${server_flags[@]}")
    note "${cmd[*]}   # $dir/tern.toml: listen, stats_socket, data_dir, [cluster] node_id=$id nats_urls public_addr=listen partitions=$parts lease_s=$lease_s stream_replicas=$nats_servers"
    "${cmd[@]}" >"$dir/tern.log" 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
    node_addr="127.0.0.1:$port" node_sock="$dir/tern.sock"
    wait_stats "$node_sock" "$node_pid" "node $id"
}

# info SOCKET KEY: one number of `show info` (empty if absent).
info() {
    "$tern" stats --socket "$1" show info 2>/dev/null | awk -F': ' -v k="$2" '$1 == k { print $2 }'
}

# wait_split PARTITIONS SOCKET...: until the nodes hold equal shares of the
# partitions, know every owner and run their consumers (deadline 300 s).
wait_split() {
    local parts=$1
    shift
    local n=$# share=$((parts / $#)) i s ok c
    for ((i = 0; i < 3000; i++)); do
        ok=1
        for s in "$@"; do
            # Consumers: one per whole stream of 64 partitions held, or
            # (versions before whole-stream consumers, or fewer streams
            # than nodes) one per partition.
            c=$(info "$s" Cluster_consumers)
            if [ "$(info "$s" Cluster_partitions_owned)" != "$share" ] ||
                [ "$(info "$s" Cluster_partitions_unowned)" != 0 ] ||
                { [ "$c" != "$share" ] && [ "$c" != "$(((share + 63) / 64))" ]; }; then
                ok=0
                break
            fi
        done
        [ "$ok" = 1 ] && return 0
        sleep 0.1
    done
    log "$n nodes never split $parts partitions evenly"
    exit 1
}

# run_loadgen NAME SECS ARGS...: one load-generator run, bounded, JSON in raw/.
run_loadgen() {
    local name=$1 secs=$2 rc=0
    shift 2
    local cmd=("$loadgen" "$@" --source 127.0.0.1 --max-time "${secs}s" --json "$out/raw/$name.json")
    note "${cmd[*]}"
    timeout "$((secs + 30))" "${cmd[@]}" >"$out/raw/$name.txt" 2>&1 &
    local pid=$!
    pids+=("$pid")
    wait "$pid" || rc=$?
    stop_pid "$pid"
    return "$rc"
}

# ---- chat: standalone against two nodes ----
# chat_run NAME SERVERS RATE: the chat shape against SERVERS at RATE msgs/s.
chat_run() {
    log "$1"
    run_loadgen "$1" 120 chat --server "$2" --conns "$conns" --rate 2000/s \
        --msg-rate "$3/s" --duration "$duration" --drain 20s ||
        log "$1: load generator exited $? (raw/$1.txt)"
}

chat_part() {
    local rate run name dir durability parts
    for rate in $msg_rates; do
        for ((run = 1; run <= runs; run++)); do
            # Standalone: one server, durability fsync (its default) and memory.
            local durabilities="fsync memory"
            [ "$standalone" = 1 ] || durabilities=""
            for durability in $durabilities; do
                name="chat-standalone_$durability-${rate}-run$run" dir="$tmp/$name"
                mkdir -p "$dir"
                local port
                port=$(free_port)
                local cmd=("$tern" serve --listen "127.0.0.1:$port" --data-dir "$dir/data"
                    --stats-socket "$dir/tern.sock" --durability "$durability" "${server_flags[@]}")
                note "${cmd[*]}"
                "${cmd[@]}" >"$dir/tern.log" 2>&1 &
                local spid=$!
                pids+=("$spid")
                wait_stats "$dir/tern.sock" "$spid" standalone
                local before
                before=$(cpu_ticks "$spid")
                chat_run "$name" "127.0.0.1:$port" "$rate"
                cpu_report "$name" "tern=$spid" "$before"
                "$tern" stats --socket "$dir/tern.sock" show latency >"$out/raw/$name.latency.txt" 2>&1 || true
                stop_pid "$spid"
            done

            # Cluster: nats-server and two nodes; the load generator spreads
            # its connections over both, and follows REDIRECTs.
            for parts in $chat_partitions; do
                name="chat-cluster_p$parts-${rate}-run$run" dir="$tmp/$name"
                start_nats "$dir/nats"
                start_node "$dir/a" a "$parts"
                local a_sock=$node_sock a_addr=$node_addr a_pid=$node_pid
                start_node "$dir/b" b "$parts"
                local b_sock=$node_sock b_addr=$node_addr b_pid=$node_pid
                wait_split "$parts" "$a_sock" "$b_sock"
                local labels=() before=() l
                mapfile -t labels < <(nats_cpu_labels)
                labels+=("tern_a=$a_pid" "tern_b=$b_pid")
                # CPU with no clients at all: leases, heartbeats, consumers.
                for l in "${labels[@]}"; do before+=("$(cpu_ticks "${l#*=}")"); done
                sleep 10
                cpu_report "$name.idle10s" "${labels[@]}" "${before[@]}"
                before=()
                for l in "${labels[@]}"; do before+=("$(cpu_ticks "${l#*=}")"); done
                # Node a's last lease round, sampled every second of the run
                # (empty lines from a version without the key).
                (for ((i = 0; i < 150; i++)); do info "$a_sock" Cluster_lease_round_ms; sleep 1; done) \
                    >"$out/raw/$name.a.lease_round_ms" 2>/dev/null &
                local sampler=$!
                pids+=("$sampler")
                chat_run "$name" "$a_addr,$b_addr" "$rate"
                stop_pid "$sampler"
                cpu_report "$name" "${labels[@]}" "${before[@]}"
                # What JetStream still holds after the run: messages not
                # DELIVERED yet and receipts not consumed yet.
                curl -sf "$nats_mon/jsz?accounts=true&streams=true" >"$out/raw/$name.jsz.json" || true
                # Every server's view 5 s later (a replica's state can lag).
                sleep 5
                local k
                for ((k = 0; k < ${#nats_mons[@]}; k++)); do
                    curl -sf "${nats_mons[k]}/jsz?accounts=true&streams=true" \
                        >"$out/raw/$name.jsz5s.n$((k + 1)).json" || true
                done
                "$tern" stats --socket "$a_sock" show latency >"$out/raw/$name.a.latency.txt" 2>&1 || true
                "$tern" stats --socket "$b_sock" show latency >"$out/raw/$name.b.latency.txt" 2>&1 || true
                "$tern" stats --socket "$a_sock" show info >"$out/raw/$name.a.info.txt" 2>&1 || true
                "$tern" stats --socket "$b_sock" show info >"$out/raw/$name.b.info.txt" 2>&1 || true
                stop_all
            done
        done
    done
}

# ---- takeover: kill -9 one node, time until its users are served again ----
takeover_part() {
    local run name dir
    for ((run = 1; run <= runs; run++)); do
        name="takeover-run$run" dir="$tmp/$name"
        start_nats "$dir/nats"
        start_node "$dir/a" a
        local a_sock=$node_sock a_addr=$node_addr
        start_node "$dir/b" b
        local b_pid=$node_pid b_addr=$node_addr b_sock=$node_sock
        wait_split "$partitions" "$a_sock" "$b_sock"
        # Every user logs in once through a (b's users are redirected).
        run_loadgen "$name-before" 60 connect --server "$a_addr" --conns "$takeover_users" \
            --rate 0 --hold 0s --connect-timeout 1s ||
            { log "$name: logins before the kill failed (raw/$name-before.txt)"; exit 1; }
        local t0 t1 try ok=0
        t0=$(date +%s.%N)
        kill -9 "$b_pid"
        wait "$b_pid" 2>/dev/null || true
        local keep=() p
        for p in "${pids[@]}"; do [ "$p" = "$b_pid" ] || keep+=("$p"); done
        pids=("${keep[@]}")
        note "kill -9 <node b>   # then the same connect run until it has no failure"
        log "$name: killed node b ($b_addr)"
        # Tries until one run logs every user in (at most 10 leases).
        for ((try = 1; try <= 600; try++)); do
            if run_loadgen "$name-after" 30 connect --server "$a_addr" --conns "$takeover_users" \
                --rate 0 --hold 0s --connect-timeout 1s --quiet; then
                ok=1
                break
            fi
            t1=$(date +%s.%N)
            if python3 -c "import sys; sys.exit(0 if $t1 - $t0 < 10 * $lease_s else 1)"; then
                sleep 0.1
            else
                break
            fi
        done
        t1=$(date +%s.%N)
        [ "$ok" = 1 ] || { log "$name: users never served again"; exit 1; }
        python3 -c "print(f'{$t1 - $t0:.2f}')" >"$out/raw/$name.seconds"
        echo "$try" >"$out/raw/$name.tries"
        "$tern" stats --socket "$a_sock" show info >"$out/raw/$name.a.info.txt" 2>&1 || true
        log "$name: served again after $(cat "$out/raw/$name.seconds") s ($try tries)"
        stop_all
    done
}

# ---- storage: JetStream bytes per waiting message ----
storage_part() {
    local body name dir
    for body in $body_bytes; do
        name="storage-$body" dir="$tmp/$name"
        start_nats "$dir/nats"
        start_node "$dir/a" a
        local a_sock=$node_sock a_addr=$node_addr
        start_node "$dir/b" b
        local b_sock=$node_sock b_addr=$node_addr
        wait_split "$partitions" "$a_sock" "$b_sock"
        log "$name: $queued messages of $body bytes to offline users"
        # Ten messages from each sender to its own receiver, who never logs in.
        run_loadgen "$name" 300 offline --server "$a_addr,$b_addr" --conns "$((queued / 10))" \
            --per-user 10 --body-bytes "$body" --msg-rate 2000/s --login-receivers 0 \
            --drain 5s --final-drain 0 ||
            log "$name: load generator exited $? (raw/$name.txt)"
        note "curl '$nats_mon/jsz?accounts=true&streams=true'; du -sbc <nats store>/jetstream/\$G/streams/TERN*"
        curl -sf "$nats_mon/jsz?accounts=true&streams=true" >"$out/raw/$name.jsz.json"
        du -sbc "$nats_store/jetstream/\$G/streams/"TERN* | tail -1 | cut -f1 >"$out/raw/$name.du_bytes"
        "$tern" stats --socket "$a_sock" show info >"$out/raw/$name.a.info.txt" 2>&1 || true
        "$tern" stats --socket "$b_sock" show info >"$out/raw/$name.b.info.txt" 2>&1 || true
        stop_all
    done
}

for part in $parts; do
    case $part in
        chat) chat_part ;;
        takeover) takeover_part ;;
        storage) storage_part ;;
        *) log "unknown part $part"; exit 2 ;;
    esac
done

python3 "$root/scripts/cluster_report.py" "$out" "$lease_s" "$partitions" "$nats_servers" >"$out/summary.md"
log "wrote $out/summary.md"
