#!/usr/bin/env bash
# scripts/profile.sh -- where a message's server CPU goes (issue 23).
#
# Starts `tern serve` pinned to core 0 and one `tern-loadgen saturate` step
# pinned to core 1 (one window, --step-time long enough to measure inside),
# then, against the server's pid while the step runs: `perf stat` (CPU,
# context switches, system calls, io_uring SQEs) for STAT_SECS, then
# `perf record -g` for RECORD_SECS. Writes to OUT:
#   NAME.loadgen.txt   the load generator's line (msgs/s, µs/msg)
#   NAME.stat.txt      perf stat output
#   NAME.self.txt      perf report --no-children, top 60 lines
#   NAME.children.txt  perf report --children, top 60 lines
#   NAME.dso.txt       perf report --sort dso (user vs kernel share)
#   NAME.threads.txt   perf report --sort comm,dso (per thread: shard, sync)
# perf.data is kept in a temp dir and removed. Bounded: every process has a
# timeout; the server and the load generator are stopped on any exit.
#
# Usage: scripts/profile.sh NAME SHAPE SHARDS WINDOW USERS OUT [-- extra tern serve args]
#   e.g. scripts/profile.sh pipelined-1s pipelined 1 64 2 results/saturation/profile
# DURABILITY=fsync in the environment runs the server with --durability fsync
# (default memory); perf follows all the server's threads, the sync thread too.
set -euo pipefail

[ "$#" -ge 6 ] || { sed -n 2,21p "$0" >&2; exit 2; }
name=$1 shape=$2 shards=$3 window=$4 users=$5 out=$6
durability=${DURABILITY:-memory}
shift 6
[ "${1:-}" = "--" ] && shift
server_extra=("$@")
readonly STAT_SECS=4 RECORD_SECS=4 WARM_SECS=3
step_secs=$((WARM_SECS + STAT_SECS + RECORD_SECS + 3))

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-profile.XXXXXX")
server_pid="" lg_pid=""
cleanup() {
    set +e
    [ -z "$lg_pid" ] || { kill "$lg_pid" 2>/dev/null; wait "$lg_pid" 2>/dev/null; }
    [ -z "$server_pid" ] || { kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; }
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

cp "$root/target/release/tern" "$root/target/release/tern-loadgen" "$tmp/"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server_cmd=("$tmp/tern" serve --io uring --shards "$shards" --listen "127.0.0.1:$port"
    --durability "$durability" --data-dir "$tmp/data" --stats-socket "$tmp/tern.sock"
    --sends-per-s-max 0 --receipts-per-s-max 0 --addr-conns-per-s-max 0
    --addr-pending-max 0 --pending-max 0 --deliver-inflight-max 1024 --queue-len-max 100000
    "${server_extra[@]}")
taskset -c 0 timeout 300 "${server_cmd[@]}" >"$tmp/server.log" 2>&1 &
server_pid=$!
for ((i = 0; i < 100; i++)); do
    "$tmp/tern" stats --socket "$tmp/tern.sock" show info >/dev/null 2>&1 && break
    sleep 0.1
done
tern_pid=$(pgrep -P "$server_pid" -x tern || echo "$server_pid")   # timeout's child
lg_cmd=("$tmp/tern-loadgen" saturate --server "127.0.0.1:$port" --shape "$shape"
    --users "$users" --windows "$window" --step-time "${step_secs}s" --warmup 1s
    --p99-bound 1s --server-pid "$tern_pid" --max-time 120s)
{
    echo "taskset -c 0 tern ${server_cmd[*]:1}" | sed "s#$tmp#\$TMP#g"
    echo "taskset -c 1 tern-loadgen ${lg_cmd[*]:1}" | sed "s#$tmp#\$TMP#g"
    echo "# after ${WARM_SECS}s: perf stat -p PID -- sleep $STAT_SECS, then perf record -g -p PID -- sleep $RECORD_SECS"
} >"$out/$name.commands.txt"
taskset -c 1 timeout 150 "${lg_cmd[@]}" >"$tmp/lg.txt" 2>&1 &
lg_pid=$!
sleep "$((WARM_SECS + 1))"   # + the load generator's 1 s warm-up
perf stat -e task-clock,context-switches,cpu-migrations,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_futex,io_uring:io_uring_submit_req,io_uring:io_uring_complete \
    -p "$tern_pid" -- sleep "$STAT_SECS" 2>"$out/$name.stat.txt"
perf record -q -g -p "$tern_pid" -o "$tmp/perf.data" -- sleep "$RECORD_SECS" 2>/dev/null
wait "$lg_pid" || true
lg_pid=""
grep -E '^window' "$tmp/lg.txt" >"$out/$name.loadgen.txt" || cp "$tmp/lg.txt" "$out/$name.loadgen.txt"
perf report -i "$tmp/perf.data" --no-children --stdio --percent-limit 0.3 2>/dev/null \
    | grep -v '^$' | grep -E '^ +[0-9]' | head -60 >"$out/$name.self.txt" || true   # head closes the pipe early
perf report -i "$tmp/perf.data" --children --stdio --percent-limit 1 2>/dev/null \
    | grep -v '^$' | grep -E '^ +[0-9]' | head -60 >"$out/$name.children.txt" || true
perf report -i "$tmp/perf.data" --no-children --stdio --sort dso 2>/dev/null \
    | grep -v '^$' | grep -E '^ +[0-9]' | head -20 >"$out/$name.dso.txt" || true
perf report -i "$tmp/perf.data" --no-children --stdio --sort comm,dso 2>/dev/null \
    | grep -v '^$' | grep -E '^ +[0-9]' | head -20 >"$out/$name.threads.txt" || true
cat "$out/$name.loadgen.txt"
