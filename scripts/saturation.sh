#!/usr/bin/env bash
# scripts/saturation.sh -- saturation runs for issue 23: the highest msgs/s
# with all four ticks whose deliver p99 stays under a bound, and the server's
# CPU per message, for each point of a grid (shape x durability x shards x
# I/O backend).
#
# For every point and every repeat: a fresh `tern serve` on a free loopback
# port with its own temp data dir and stats socket, then `tern-loadgen
# saturate` against it (optionally pinned: server on core 0, load generator on
# core 1, with --pin), then the server is stopped. The median of the repeats
# goes into results/saturation/<date>/summary.md; the raw JSON of every run
# (and the server's `show latency` at its end, raw/<run>.latency.txt),
# the exact commands (commands.txt) and an SVG plot (saturation.svg, written by
# scripts/saturation_report.py with no plotting library) go there too.
#
# Bounded: every load-generator run has --max-time and a `timeout`, every wait
# a deadline. Only the server and load-generator PIDs this script started are
# stopped, also on Ctrl-C; the temp dir is removed on exit.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/saturation.sh [OPTIONS]

  --shapes LIST       load shapes, space-separated (default "pipelined chat")
  --durability LIST   durability modes (default "memory fsync")
  --shards LIST       shard counts (default "1 2")
  --io LIST           server I/O backends (default "uring poll")
  --runs K            repeats per point; the summary takes medians (default 3)
  --windows LIST      windows per sender, comma-separated (default 1,4,16,64,256)
  --step-time T       measured time per step (default 1s)
  --warmup T          unmeasured traffic before each step (default 300ms)
  --p99-bound T       deliver p99 bound (default 10ms)
  --chat-users N      users in the chat shape (default 2000)
  --pipelined-users N users in the pipelined shape (default 2)
  --pin               server on core 0, load generator on core 1 (taskset)
  --run-secs-max S    time cap of one load-generator run (default 120)
  --out DIR           results directory (default results/saturation/<UTC date>)
  --no-build          use the existing target/release binaries
  -h, --help          this text
USAGE
}

invocation="$*"
shapes="pipelined chat" durabilities="memory fsync" shard_counts="1 2" ios="uring poll"
runs=3 windows=1,4,16,64,256 step_time=1s warmup=300ms p99_bound=10ms
chat_users=2000 pipelined_users=2 pin=0 run_secs_max=120 out="" build=1

need_arg() { [ $# -ge 2 ] || { echo "saturation.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case $1 in
        --shapes) need_arg "$@"; shapes=$2; shift ;;
        --durability) need_arg "$@"; durabilities=$2; shift ;;
        --shards) need_arg "$@"; shard_counts=$2; shift ;;
        --io) need_arg "$@"; ios=$2; shift ;;
        --runs) need_arg "$@"; runs=$2; shift ;;
        --windows) need_arg "$@"; windows=$2; shift ;;
        --step-time) need_arg "$@"; step_time=$2; shift ;;
        --warmup) need_arg "$@"; warmup=$2; shift ;;
        --p99-bound) need_arg "$@"; p99_bound=$2; shift ;;
        --chat-users) need_arg "$@"; chat_users=$2; shift ;;
        --pipelined-users) need_arg "$@"; pipelined_users=$2; shift ;;
        --pin) pin=1 ;;
        --run-secs-max) need_arg "$@"; run_secs_max=$2; shift ;;
        --out) need_arg "$@"; out=$2; shift ;;
        --no-build) build=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "saturation.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${out:-results/saturation/$(date -u +%Y-%m-%d)}
mkdir -p "$out/raw"
tmp=$(mktemp -d)
server_pid="" lg_pid=""

log() { echo "[saturation $(date -u +%H:%M:%S)] $*" >&2; }

stop_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    fi
}

cleanup() {
    if [ -n "$lg_pid" ]; then
        kill "$lg_pid" 2>/dev/null || true
        wait "$lg_pid" 2>/dev/null || true
        lg_pid=""
    fi
    stop_server
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

if [ "$build" = 1 ]; then
    cargo build --release -q -p tern -p tern-loadgen
fi
tern=$root/target/release/tern
loadgen=$root/target/release/tern-loadgen

server_taskset=() lg_taskset=()
if [ "$pin" = 1 ]; then
    server_taskset=(taskset -c 0)
    lg_taskset=(taskset -c 1)
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $(nproc) cores; pin=$pin"
    echo "# invocation: scripts/saturation.sh $invocation"
    echo "# the box is shared with other work: figures are noisy"
} >"$out/commands.txt"

for shape in $shapes; do
    users=$chat_users
    [ "$shape" = pipelined ] && users=$pipelined_users
    for durability in $durabilities; do
        for shards in $shard_counts; do
            for io in $ios; do
                for ((run = 1; run <= runs; run++)); do
                    name="$shape-$durability-${shards}s-$io-run$run"
                    port=$(free_port)
                    rm -rf "$tmp/data" "$tmp/tern.sock"
                    # Per-user and per-address limits off: few users sending
                    # as fast as they can is what those limits refuse.
                    server_cmd=("$tern" serve --io "$io" --shards "$shards"
                        --listen "127.0.0.1:$port" --durability "$durability"
                        --data-dir "$tmp/data" --stats-socket "$tmp/tern.sock"
                        --sends-per-s-max 0 --receipts-per-s-max 0
                        --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0
                        --deliver-inflight-max 1024 --queue-len-max 100000)
                    "${server_taskset[@]}" "${server_cmd[@]}" >"$tmp/server.log" 2>&1 &
                    server_pid=$!
                    up=0
                    for ((i = 0; i < 100; i++)); do
                        # Up when the stats socket answers: every shard runs.
                        if "$tern" stats --socket "$tmp/tern.sock" show info >/dev/null 2>&1; then up=1; break; fi
                        kill -0 "$server_pid" 2>/dev/null || break
                        sleep 0.1
                    done
                    if [ "$up" != 1 ]; then
                        cat "$tmp/server.log" >&2
                        log "$name: server did not start"
                        exit 1
                    fi
                    lg_cmd=("$loadgen" saturate --server "127.0.0.1:$port" --shape "$shape"
                        --users "$users" --windows "$windows" --step-time "$step_time"
                        --warmup "$warmup" --p99-bound "$p99_bound" --server-pid "$server_pid"
                        --max-time "${run_secs_max}s" --json "$out/raw/$name.json")
                    echo "${server_taskset[*]}${server_taskset[*]:+ }tern ${server_cmd[*]:1}" | sed "s#$tmp#\$TMP#g" >>"$out/commands.txt"
                    echo "${lg_taskset[*]}${lg_taskset[*]:+ }tern-loadgen ${lg_cmd[*]:1}" | sed "s#$tmp#\$TMP#g" >>"$out/commands.txt"
                    log "$name"
                    timeout "$((run_secs_max + 30))" "${lg_taskset[@]}" "${lg_cmd[@]}" >"$out/raw/$name.txt" 2>&1 &
                    lg_pid=$!
                    rc=0
                    wait "$lg_pid" || rc=$?
                    lg_pid=""
                    if [ "$rc" != 0 ]; then
                        cp "$tmp/server.log" "$out/raw/$name.server.log"
                        log "$name: load generator exited $rc (see raw/$name.txt and raw/$name.server.log)"
                    fi
                    # The server's own histograms (fsync among them) of the run.
                    "$tern" stats --socket "$tmp/tern.sock" show latency >"$out/raw/$name.latency.txt" 2>&1 || true
                    stop_server
                done
            done
        done
    done
done

python3 "$root/scripts/saturation_report.py" "$out"
log "wrote $out/summary.md and $out/saturation.svg"
