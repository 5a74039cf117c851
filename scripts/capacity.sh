#!/usr/bin/env bash
# scripts/capacity.sh -- one command for a Tern capacity run (issue 3).
#
# Builds release binaries, starts `tern serve` (own data dir and stats socket in
# a temp dir), then for each step N of a ladder up to --target:
#   1. `tern-loadgen connect --conns N`, and while the N logged-in connections
#      are held idle (no PINGs; with --ping-every-secs S, each PINGs once every
#      S s, spread evenly: the keepalive figure): server RSS, kernel memory (/proc/meminfo Slab
#      and SUnreclaim, live slab objects from /proc/slabinfo, /proc/net/sockstat
#      TCP inuse/mem), MemAvailable, and server CPU over --idle-secs;
#   2. --chat-runs x `tern-loadgen chat --conns N --msg-rate R` (every chat run
#      holds all N connections and sends between random pairs of them).
# Raw JSON and the measurements of every step go to
# results/<date>-<host>-<backend>/, then scripts/capacity_report.py writes
# summary.md and the SVG plots there.
#
# Bounded everywhere: every load-generator run has --max-time and a `timeout`,
# every wait loop a deadline, the ladder at most STEPS_MAX steps, the whole run
# --run-secs-max. The server and load-generator processes it started are
# stopped, the temp dir and the network namespace (--netns) removed, on any
# exit including Ctrl-C. The host's sysctls are never written; with --netns the
# tuning happens inside a namespace of our own.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/capacity.sh [OPTIONS]

  --io uring|poll        server I/O backend (default uring)
  --target N             most connections to try (default: what this box holds:
                         19000 for poll -- RLIMIT_NOFILE 20000 per process --,
                         1000000 for uring)
  --steps A,B,C          connection counts of the ladder (default: 1-2-5 series
                         from 1000 up to the target, then the target)
  --shards N             server shards (default 0 = one per core)
  --durability MODE      memory (default), os or fsync
  --rate R               login ramp rate of the load generator, e.g. 50000/s
                         (default 0 = as fast as it goes: the login rate reached)
  --msg-rate R           chat messages/s with all connections held (default 1000/s)
  --chat-secs S          chat sending time per run (default 30)
  --chat-runs K          chat runs per step; the summary takes the median (default 3)
  --idle-secs S          CPU sampling window while idle (default 10)
  --ping-every-secs S    keepalive: while held (and during chat runs) every
                         connection PINGs once every S s, spread evenly over the
                         S s; the idle window then measures the keepalive CPU
                         (default 0 = no PINGs)
  --pin                  server on core 0, load generator on core 1 (taskset)
  --nice N               run server and load generators at nice N (e.g. -10, as
                         root: ahead of other people's builds on a shared box, so
                         the latency measured is Tern's, not the box's queue;
                         default 0 = left as it is)
  --file-max N           raise the host's fs.file-max to N for the run if it is
                         lower (2M pairs are 4M open files; BOX-FACTS), and put
                         the old value back on any exit, Ctrl-C included
                         (default 0 = leave it)
  --port P               server port (default 7222; below the ephemeral range)
  --ws                   clients speak WebSocket: the server also listens with
                         ws_listen on port P+1 and every load generator runs
                         with --ws against it (the idle figure of issue 13)
  --netns                run server and load generator in a network namespace of
                         our own, with somaxconn/backlog/port range tuned there
  --mem-floor-gib G      never plan a step that would leave MemAvailable below
                         G GiB; also the load generator's --mem-floor (default 3)
  --run-secs-max S       whole-run time limit (default 7200)
  --quiet-wait-secs S    before each idle window and chat run, wait up to S s
                         (default 300) for other people's work on the box to
                         fall under --quiet-busy-pct % of all cores (default 25)
  --server-arg ARG       extra argument for `tern serve` (repeatable)
  --lg-arg ARG           extra argument for every `tern-loadgen` run (repeatable),
                         e.g. --lg-arg --inflight-max=2000 on a busy box, so logins
                         wait in the load generator rather than past the server's
                         login timeout
  --ramp-secs-max S      give up a step's ramp after S s (default: a minute, or
                         N / 5000 s if longer)
  --out DIR              results directory (default results/<date>-<host>-<io>)
  --no-build             use the existing target/release binaries
  -h, --help             this text
EOF
}

# ---- options --------------------------------------------------------------------------
io=uring target="" steps_csv="" shards=0 durability=memory ramp_rate=0
msg_rate=1000/s chat_secs=30 chat_runs=3 idle_secs=10 port=7222 use_netns=0
mem_floor_gib=3 run_secs_max=7200 out="" build=1 quiet_wait_secs=300 quiet_busy_pct=25
ping_every_secs=0 pin=0 file_max=0 nice_n=0 use_ws=0
server_extra=() lg_extra=() ramp_secs_max=0
readonly STEPS_MAX=16          # ladder length cap
readonly SETTLE_SECS=3         # after the ramp, before sampling
readonly DRAIN_SECS_MAX=120    # wait for the server to drop to 0 connections
invocation="scripts/capacity.sh${*:+ $*}"

need_arg() { [ "$#" -ge 2 ] || { echo "capacity.sh: $1 needs a value" >&2; exit 2; }; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --io) need_arg "$@"; io=$2; shift ;;
        --target) need_arg "$@"; target=$2; shift ;;
        --steps) need_arg "$@"; steps_csv=$2; shift ;;
        --shards) need_arg "$@"; shards=$2; shift ;;
        --durability) need_arg "$@"; durability=$2; shift ;;
        --rate) need_arg "$@"; ramp_rate=$2; shift ;;
        --msg-rate) need_arg "$@"; msg_rate=$2; shift ;;
        --chat-secs) need_arg "$@"; chat_secs=$2; shift ;;
        --chat-runs) need_arg "$@"; chat_runs=$2; shift ;;
        --idle-secs) need_arg "$@"; idle_secs=$2; shift ;;
        --ping-every-secs) need_arg "$@"; ping_every_secs=$2; shift ;;
        --pin) pin=1 ;;
        --nice) need_arg "$@"; nice_n=$2; shift ;;
        --file-max) need_arg "$@"; file_max=$2; shift ;;
        --port) need_arg "$@"; port=$2; shift ;;
        --netns) use_netns=1 ;;
        --ws) use_ws=1 ;;
        --mem-floor-gib) need_arg "$@"; mem_floor_gib=$2; shift ;;
        --run-secs-max) need_arg "$@"; run_secs_max=$2; shift ;;
        --quiet-wait-secs) need_arg "$@"; quiet_wait_secs=$2; shift ;;
        --quiet-busy-pct) need_arg "$@"; quiet_busy_pct=$2; shift ;;
        --server-arg) need_arg "$@"; server_extra+=("$2"); shift ;;
        --lg-arg) need_arg "$@"; lg_extra+=("$2"); shift ;;
        --ramp-secs-max) need_arg "$@"; ramp_secs_max=$2; shift ;;
        --out) need_arg "$@"; out=$2; shift ;;
        --no-build) build=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "capacity.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
case "$io" in uring|poll) ;; *) echo "capacity.sh: --io must be uring or poll" >&2; exit 2 ;; esac
[[ "$nice_n" =~ ^-?[0-9]+$ ]] || { echo "capacity.sh: --nice must be a whole number" >&2; exit 2; }
case "$durability" in memory|os|fsync) ;; *) echo "capacity.sh: bad --durability" >&2; exit 2 ;; esac
if [ -z "$target" ]; then
    if [ "$io" = poll ]; then target=19000; else target=1000000; fi
fi
for v in ramp_secs_max file_max target shards chat_secs chat_runs idle_secs ping_every_secs port mem_floor_gib run_secs_max quiet_wait_secs quiet_busy_pct; do
    is_uint "${!v}" || { echo "capacity.sh: --${v//_/-} must be a whole number" >&2; exit 2; }
done
if [ "$target" -lt 1 ] || [ "$chat_runs" -gt 9 ] || [ "$idle_secs" -lt 1 ] || [ "$idle_secs" -gt 300 ]; then
    echo "capacity.sh: need --target >= 1, --chat-runs <= 9, 1 <= --idle-secs <= 300" >&2; exit 2
fi

# The ladder: a 1-2-5 series below the target, then the target itself.
steps=()
if [ -n "$steps_csv" ]; then
    IFS=, read -r -a steps <<<"$steps_csv"
    for n in "${steps[@]}"; do
        if ! is_uint "$n" || [ "$n" -lt 1 ]; then echo "capacity.sh: bad step '$n'" >&2; exit 2; fi
    done
else
    for n in 1000 2000 5000 10000 20000 50000 100000 200000 500000 1000000 2000000 5000000; do
        [ "$n" -lt "$target" ] && steps+=("$n")
    done
    steps+=("$target")
fi
if [ "${#steps[@]}" -gt "$STEPS_MAX" ]; then
    echo "capacity.sh: at most $STEPS_MAX steps" >&2; exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host=$(hostname -s 2>/dev/null || hostname)
[ -n "$out" ] || out="$root/results/$(date -u +%Y-%m-%d)-$host-$io"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A rerun into the same directory replaces the previous run's files, never mixes them.
rm -f "$out"/step-* "$out"/summary.md "$out"/*.svg "$out"/commands.txt "$out"/run.env \
    "$out"/run.log "$out"/server.log
report_py="$root/scripts/capacity_report.py"
t_start=$(date +%s)
log() { printf '[capacity %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$out/run.log" >&2; }
: >"$out/run.log"

# ---- state and cleanup ----------------------------------------------------------------
tmp="" server_pid="" lg_pid="" netns="" stop_reason="" cleaned=0 file_max_was=""
ns_exec=()
server_taskset=() lg_taskset=()
if [ "$pin" = 1 ]; then
    server_taskset=(taskset -c 0)
    lg_taskset=(taskset -c 1)
fi
if [ "$nice_n" != 0 ]; then
    # nice execs taskset, which execs the program: the pid is still the one stopped.
    server_taskset=(nice -n "$nice_n" "${server_taskset[@]}")
    lg_taskset=(nice -n "$nice_n" "${lg_taskset[@]}")
fi

stop_pid() {   # stop_pid PID SECS: TERM, wait up to SECS, then KILL (its group too)
    local pid=$1 secs=$2 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    [ "$cleaned" = 1 ] && return 0
    cleaned=1
    set +e
    stop_pid "$lg_pid" 20
    lg_pid=""
    stop_pid "$server_pid" 15
    server_pid=""
    if [ -n "$tmp" ] && [ -f "$tmp/server.log" ]; then cp "$tmp/server.log" "$out/server.log"; fi
    if [ -n "$netns" ]; then ip netns del "$netns" 2>/dev/null; netns=""; fi
    if [ -n "$file_max_was" ]; then
        sysctl -qw "fs.file-max=$file_max_was" && log "fs.file-max restored to $file_max_was"
        file_max_was=""
    fi
    if [ -n "$tmp" ]; then rm -rf "$tmp"; tmp=""; fi
}
on_signal() {
    log "interrupted ($1): stopping what this script started"
    stop_reason="interrupted by SIG$1"
    cleanup
    exit 130
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# ---- build ------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-capacity.XXXXXX")
if [ "$build" = 1 ]; then
    log "building release binaries"
    built=0
    for attempt in 1 2 3; do   # src/ is edited by others: a mid-edit tree may not compile
        if (cd "$root" && timeout 900 cargo build --release -q -p tern -p tern-loadgen) >"$tmp/build.log" 2>&1; then
            built=1; break
        fi
        log "build attempt $attempt failed; retrying in 30 s"
        sleep 30
    done
    [ "$built" = 1 ] || { cat "$tmp/build.log" >&2; log "build failed"; exit 1; }
fi
# Private copies: a rebuild by someone else must not swap binaries mid-run.
cp "$root/target/release/tern" "$root/target/release/tern-loadgen" "$tmp/"
tern="$tmp/tern" lg="$tmp/tern-loadgen"

# ---- fs.file-max (optional; host-wide, restored by cleanup) ----------------------------
if [ "$file_max" -gt 0 ]; then
    current=$(cat /proc/sys/fs/file-max)
    if [ "$current" -lt "$file_max" ]; then
        file_max_was=$current
        sysctl -qw "fs.file-max=$file_max" || { log "cannot raise fs.file-max (root needed)"; exit 1; }
        log "fs.file-max raised from $current to $file_max for this run"
    fi
fi

# ---- network namespace (optional) -------------------------------------------------------
if [ "$use_netns" = 1 ]; then
    netns="tern-cap-$$"
    ip netns add "$netns"
    ns_exec=(ip netns exec "$netns")
    "${ns_exec[@]}" ip link set lo up
    # Only inside the namespace: the host keeps its values.
    "${ns_exec[@]}" sysctl -q -w net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
        "net.ipv4.ip_local_port_range=1024 65535" "net.ipv4.ip_local_reserved_ports=$port-$((port + 1))" \
        net.ipv4.tcp_max_tw_buckets=2000000
    server_extra=(--listen-backlog 65535 "${server_extra[@]}")
    log "network namespace $netns: somaxconn 65535, port range 1024-65535, port $port reserved"
elif ss -Hltn "sport = :$port" | grep -q .; then
    echo "capacity.sh: port $port is in use on this host; pick --port or use --netns" >&2
    exit 2
fi

# ---- helpers: /proc readers --------------------------------------------------------------
meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
# sockstat of the server's namespace: "inuse mem(pages)"
tcp_sockstat() { awk '$1 == "TCP:" { for (i = 2; i < NF; i += 2) v[$i] = $(i + 1); print v["inuse"] + 0, v["mem"] + 0 }' "/proc/$server_pid/net/sockstat"; }
# bytes in live slab objects over every cache (root only: /proc/slabinfo)
slab_objects_bytes() { awk 'NR > 2 { s += $2 * $4 } END { printf "%d\n", s }' /proc/slabinfo 2>/dev/null || echo 0; }
# slab_snap FILE: live objects and bytes of every slab cache, for the per-cache breakdown
slab_snap() { awk 'NR > 2 { print $1, $2, $4 }' /proc/slabinfo >"$1" 2>/dev/null || : >"$1"; }
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }    # utime+stime
# CPU of this shell's waited-for children (the load generator once reaped): cutime+cstime
children_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"; }
box_ticks() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6 }' /proc/stat; }
vmrss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }
now_ns() { date +%s%N; }
# wait_quiet WHAT: someone else's heavy work skews latency and CPU figures; wait
# (at most --quiet-wait-secs) until the whole box is under --quiet-busy-pct busy
# over 3 s, counting our own server's share out.
wait_quiet() {
    local what=$1 deadline b0 b1 c0 c1 busy
    deadline=$(($(date +%s) + quiet_wait_secs))
    while :; do
        b0=$(box_ticks); c0=$(proc_ticks "$server_pid")
        sleep 3
        b1=$(box_ticks); c1=$(proc_ticks "$server_pid")
        busy=$(echo "$b0 $b1 $((c1 - c0))" | awk '{ t = $3 - $1; i = $4 - $2; printf "%d", t ? 100 * (t - i - $5) / t : 0 }')
        [ "$busy" -lt "$quiet_busy_pct" ] && return 0
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "$what: box still ${busy}% busy with other work after ${quiet_wait_secs} s; going on (figures may be skewed)"
            return 0
        fi
        log "$what: box ${busy}% busy with other work; waiting"
        sleep 5
    done
}
stat_field() { "$tern" stats --socket "$tmp/tern.sock" show info 2>/dev/null | awk -v k="$1:" '$1 == k { print $2 }'; }
server_alive() { [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; }
clk_tck=$(getconf CLK_TCK)
mem_floor_kb=$((mem_floor_gib * 1024 * 1024))

# wait_server_conns_zero: bounded wait until the server holds no connection
wait_server_drained() {
    local i c
    for ((i = 0; i < DRAIN_SECS_MAX; i++)); do
        server_alive || return 1
        c=$(stat_field Conns)
        [ "${c:-1}" = 0 ] && return 0
        sleep 1
    done
    log "server still reports ${c:-?} connections after ${DRAIN_SECS_MAX} s"
    return 1
}

# run_lg_bg NAME ARGS...: start the load generator in the background, output in $out/NAME.*
run_lg_bg() {
    local name=$1 max_s
    shift
    max_s=$LG_MAX_S
    printf '%s\n' "tern-loadgen $*${lg_extra[*]:+ ${lg_extra[*]}}" >>"$out/commands.txt"
    "${ns_exec[@]}" timeout --kill-after=15 "$((max_s + 30))" "${lg_taskset[@]}" "$lg" "$@" "${lg_extra[@]}" --max-time "${max_s}s" \
        --json "$out/$name.json" >"$out/$name.out" 2>"$out/$name.err" &
    lg_pid=$!
}
wait_lg() {   # wait_lg: exit status of the load generator started last
    local rc=0
    wait "$lg_pid" || rc=$?
    lg_pid=""
    return "$rc"
}

# ---- start the server -------------------------------------------------------------------
# Room above the target so no shard's share is the limit (connections are spread
# over shards, not always evenly).
conns_max=$((target + target / 10 + 1000))
export TERN_TOKEN_SECRET
TERN_TOKEN_SECRET=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')   # per-run secret, shared with the load generator
# The per-address and not-logged-in limits (docs/HARDENING.md) are off: the load
# generator opens up to millions of connections from a few 127.x addresses as
# fast as it can, which those limits exist to refuse; the per-user rates too, so
# a high --msg-rate over few connections measures the server, not the limits.
server_cmd=("$tern" serve --io "$io" --shards "$shards" --listen "127.0.0.1:$port"
    --stats-socket "$tmp/tern.sock" --data-dir "$tmp/data" --durability "$durability"
    --accept-rate-per-s-max 0 --conns-max "$conns_max" --idle-timeout-ms 900000
    --addr-conns-per-s-max 0 --addr-pending-max 0 --pending-max 0
    --sends-per-s-max 0 --receipts-per-s-max 0
    "${server_extra[@]}")
# --ws: the clients go to the WebSocket listener, one port above.
client_server=(--server "127.0.0.1:$port")
if [ "$use_ws" = 1 ]; then
    server_cmd+=(--ws-listen "127.0.0.1:$((port + 1))")
    client_server=(--ws --server "127.0.0.1:$((port + 1))")
fi
{
    echo "# server"
    echo "${ns_exec[*]}${ns_exec[*]:+ }${server_taskset[*]}${server_taskset[*]:+ }tern ${server_cmd[*]:1}"
    echo "# load generators run under: ${lg_taskset[*]:-nothing (not pinned, not niced)}"
    echo "# load generator runs (each also gets --max-time and --json)"
} >"$out/commands.txt"
"${ns_exec[@]}" "${server_taskset[@]}" "${server_cmd[@]}" >"$tmp/server.log" 2>&1 &
server_pid=$!
for ((i = 0; i < 300; i++)); do
    server_alive || { cat "$tmp/server.log" >&2; log "server exited at start-up"; exit 1; }
    [ -n "$(stat_field Conns)" ] && break
    sleep 0.1
done
[ -n "$(stat_field Conns)" ] || { log "stats socket never answered"; exit 1; }
backend=$(stat_field Backend)
log "server pid $server_pid, backend $backend, port $port, conns-max $conns_max; ladder: ${steps[*]}"

# ---- run-wide facts ---------------------------------------------------------------------
{
    echo "invocation=$invocation"
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$host"
    echo "kernel=$(uname -r)"
    echo "cpus=$(nproc)"
    echo "mem_total_kb=$(meminfo_kb MemTotal)"
    echo "mem_available_start_kb=$(meminfo_kb MemAvailable)"
    echo "nofile=$(ulimit -n)"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "io=$io"
    echo "backend=$backend"
    echo "transport=$([ "$use_ws" = 1 ] && echo ws || echo tcp)"
    echo "target=$target"
    echo "steps=${steps[*]}"
    echo "durability=$durability"
    echo "shards=$shards"
    echo "ramp_rate=$ramp_rate"
    echo "msg_rate=$msg_rate"
    echo "chat_secs=$chat_secs"
    echo "chat_runs=$chat_runs"
    echo "idle_secs=$idle_secs"
    echo "ping_every_secs=$ping_every_secs"
    echo "pin=$pin"
    echo "nice=$nice_n"
    echo "netns=$use_netns"
    echo "conns_max=$conns_max"
    echo "mem_floor_gib=$mem_floor_gib"
    echo "tern_sha256=$(sha256sum "$tern" | cut -c1-16)"
    echo "loadgen_sha256=$(sha256sum "$lg" | cut -c1-16)"
    # other people's heavy processes at the start (RSS over 256 MiB), for the record
    ps -eo pid=,rss=,comm= --sort=-rss | awk '$2 > 262144 { printf "other_process=%s %s %d MiB\n", $1, $3, $2 / 1024 }' | head -5
} >"$out/run.env"

# ---- step 0: the server with no connection ----------------------------------------------
sleep 2
rss0_kb=$(vmrss_kb "$server_pid")
c0=$(proc_ticks "$server_pid"); b0=$(box_ticks); w0=$(now_ns)
sleep "$idle_secs"
c1=$(proc_ticks "$server_pid"); b1=$(box_ticks); w1=$(now_ns)
rss0_kb=$(( $(vmrss_kb "$server_pid") > rss0_kb ? $(vmrss_kb "$server_pid") : rss0_kb ))
cat >"$out/step-0.json" <<EOF
{"conns_target": 0, "conns_held": 0, "users_online": 0, "rss_kb": $rss0_kb,
 "cpu_ticks": $((c1 - c0)), "clk_tck": $clk_tck, "wall_ns": $((w1 - w0)),
 "box_ticks": [$(echo "$b0 $b1" | awk '{ print $3 - $1 ", " $4 - $2 }')]}
EOF
log "0 connections: server RSS $((rss0_kb / 1024)) MiB"

# ---- the ladder -------------------------------------------------------------------------
prev_n=0 prev_mem_per_conn_b=16384   # first guess for the memory check: 16 KB per connection, all in
largest_ok=0
for n in "${steps[@]}"; do
    elapsed=$(($(date +%s) - t_start))
    if [ "$elapsed" -ge "$run_secs_max" ]; then
        stop_reason="time: the run passed --run-secs-max ${run_secs_max} s before step $n"
        break
    fi
    server_alive || { stop_reason="server exited before step $n (see server.log)"; break; }

    # Memory check: MemAvailable must stay above the floor with N held, at the
    # per-connection cost measured in the previous step (plus 25%).
    avail_kb=$(meminfo_kb MemAvailable)
    need_kb=$((n * prev_mem_per_conn_b * 5 / 4 / 1024))
    if [ $((avail_kb - need_kb)) -lt "$mem_floor_kb" ]; then
        stop_reason="memory: $n connections need about $((need_kb / 1024)) MiB at $prev_mem_per_conn_b B each (measured at $prev_n); MemAvailable is $((avail_kb / 1024)) MiB and the floor $mem_floor_gib GiB"
        break
    fi

    # Ramp timeout: a minute, or 5,000 logins/s at worst, whichever is longer.
    ramp_s=$((n / 5000 > 60 ? n / 5000 : 60))
    [ "$ramp_secs_max" -gt 0 ] && ramp_s=$ramp_secs_max
    hold_s=$((SETTLE_SECS + idle_secs + quiet_wait_secs + 15))
    LG_MAX_S=$((ramp_s + hold_s + 60))
    common=("${client_server[@]}" --conns "$n" --rate "$ramp_rate" --ping-every "${ping_every_secs}s"
        --ramp-timeout "${ramp_s}s" --mem-floor "${mem_floor_gib}GiB")

    # -- 1. connect and hold idle
    wait_quiet "step $n ramp"   # the kernel figures are system-wide: others' socket churn is noise
    log "step $n: connect"
    slab0_kb=$(meminfo_kb Slab); sunr0_kb=$(meminfo_kb SUnreclaim); objs0=$(slab_objects_bytes)
    slab_snap "$out/step-$n-slab-before.txt"
    read -r inuse0 tcpmem0 < <(tcp_sockstat)
    name="step-$n-connect"
    run_lg_bg "$name" connect "${common[@]}" --hold "${hold_s}s"
    deadline=$(($(date +%s) + ramp_s + 60))
    held=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if grep -q '^holding ' "$out/$name.err" 2>/dev/null; then held=1; break; fi
        kill -0 "$lg_pid" 2>/dev/null || break
        server_alive || break
        sleep 0.5
    done
    if [ "$held" = 1 ] && server_alive; then
        sleep "$SETTLE_SECS"
        wait_quiet "step $n idle window"
        conns_held=$(stat_field Conns); users=$(stat_field Users_online); rss_stats=$(stat_field Rss_bytes)
        rss_kb=$(vmrss_kb "$server_pid")
        slab1_kb=$(meminfo_kb Slab); sunr1_kb=$(meminfo_kb SUnreclaim); objs1=$(slab_objects_bytes)
        slab_snap "$out/step-$n-slab-held.txt"
        read -r inuse1 tcpmem1 < <(tcp_sockstat)
        avail1_kb=$(meminfo_kb MemAvailable)
        lg_child=$(pgrep -n -f "^$lg " || true)
        lg_rss_kb=0
        [ -z "$lg_child" ] || lg_rss_kb=$(vmrss_kb "$lg_child" 2>/dev/null || echo 0)
        c0=$(proc_ticks "$server_pid"); b0=$(box_ticks); w0=$(now_ns)
        sleep "$idle_secs"
        c1=$(proc_ticks "$server_pid"); b1=$(box_ticks); w1=$(now_ns)
        rss2_kb=$(vmrss_kb "$server_pid")
        [ "$rss2_kb" -gt "$rss_kb" ] && rss_kb=$rss2_kb
        conns_after=$(stat_field Conns)
        # The hold has done its job: end it now (SIGTERM: the load generator
        # closes everything and writes its report) rather than wait for --hold.
        kill -TERM "$lg_pid" 2>/dev/null || true
        cat >"$out/step-$n.json" <<EOF
{"conns_target": $n, "conns_held": ${conns_held:-0}, "users_online": ${users:-0},
 "conns_after_idle": ${conns_after:-0},
 "rss_kb": $rss_kb, "rss_stats_bytes": ${rss_stats:-0}, "rss0_kb": $rss0_kb,
 "slab_delta_kb": $((slab1_kb - slab0_kb)), "sunreclaim_delta_kb": $((sunr1_kb - sunr0_kb)),
 "slab_objects_delta_bytes": $((objs1 - objs0)),
 "tcp_inuse_delta": $((inuse1 - inuse0)), "tcp_mem_pages": $tcpmem1, "tcp_mem_pages_before": $tcpmem0,
 "mem_available_before_kb": $avail_kb, "mem_available_held_kb": $avail1_kb,
 "cpu_ticks": $((c1 - c0)), "clk_tck": $clk_tck, "wall_ns": $((w1 - w0)),
 "box_ticks": [$(echo "$b0 $b1" | awk '{ print $3 - $1 ", " $4 - $2 }')],
 "loadgen_rss_kb": ${lg_rss_kb:-0}, "ping_every_secs": $ping_every_secs,
 "connect_json": "$name.json", "chat_jsons": []}
EOF
        log "step $n: held ${conns_held:-?} (users ${users:-?}), RSS $((rss_kb / 1024)) MiB, Slab +$(((slab1_kb - slab0_kb) / 1024)) MiB, CPU $((c1 - c0)) ticks in $idle_secs s"
        if [ "$ping_every_secs" -gt 0 ]; then
            # keepalive: CPU % of one core, and per PING at the offered N / S PINGs/s
            log "step $n: keepalive $(echo "$((c1 - c0)) $clk_tck $((w1 - w0)) ${conns_held:-0} $ping_every_secs" | awk '{ cpu = $1 / $2; wall = $3 / 1e9; pings = $4 / $5 * wall; printf "%.2f %% of one core, %.2f us per PING (%d PINGs/s offered)", 100 * cpu / wall, pings ? 1e6 * cpu / pings : 0, $4 / $5 }')"
        fi
    else
        conns_held=$(stat_field Conns || true)
        log "step $n: the ramp did not finish (server holds ${conns_held:-?})"
        cat >"$out/step-$n.json" <<EOF
{"conns_target": $n, "conns_held": ${conns_held:-0}, "ramp_unfinished": true,
 "connect_json": "$name.json", "chat_jsons": []}
EOF
        stop_pid "$lg_pid" 20; lg_pid=""
    fi
    lg_rc=0
    [ -z "$lg_pid" ] || wait_lg || lg_rc=$?
    lg_failed=$(python3 "$report_py" get "$out/$name.json" connections.failed 2>/dev/null || echo "?")
    lg_up=$(python3 "$report_py" get "$out/$name.json" connections.up_max 2>/dev/null || echo 0)
    floor_hit=$(python3 "$report_py" get "$out/$name.json" memory.floor_hit 2>/dev/null || echo "?")
    log "step $n: load generator exit $lg_rc, up max $lg_up, failed $lg_failed"
    wait_server_drained || true
    sleep 2   # closed sockets are freed after an RCU grace period
    slab_snap "$out/step-$n-slab-after.txt"

    # -- why would this be the last step?
    if ! server_alive; then
        stop_reason="server exited during step $n (see server.log)"
    elif [ "$held" != 1 ] || [ "$lg_rc" != 0 ] || [ "$lg_failed" != 0 ] || [ "${conns_held:-0}" -lt "$n" ]; then
        failures=$(python3 "$report_py" get "$out/$name.json" connections.failures 2>/dev/null || echo "{}")
        if [ "$floor_hit" = true ]; then
            stop_reason="memory: the load generator stopped at its MemAvailable floor (${mem_floor_gib} GiB) during step $n"
        elif grep -q 'EADDRNOTAVAIL' <<<"$failures"; then
            stop_reason="ports: EADDRNOTAVAIL during step $n ($failures)"
        elif grep -qiE 'EMFILE|too many open files|ENFILE' "$tmp/server.log"; then
            stop_reason="fd limit: the server hit the open-files limit (RLIMIT_NOFILE $(ulimit -n)) during step $n"
        else
            stop_reason="failures at step $n: held ${conns_held:-?} of $n, load generator exit $lg_rc, failures $failures (see step-$n-connect.err and server.log)"
        fi
    fi
    if [ -n "$stop_reason" ]; then break; fi
    largest_ok=$n

    # -- 2. chat at a fixed rate with all N connections held, chat_runs times
    chat_list=""
    for ((k = 1; k <= chat_runs; k++)); do
        name="step-$n-chat-$k"
        LG_MAX_S=$((ramp_s + chat_secs + 120))
        wait_quiet "step $n chat run $k"
        log "step $n: chat run $k/$chat_runs"
        b0=$(box_ticks); c0=$(proc_ticks "$server_pid"); k0=$(children_ticks); w0=$(now_ns)
        run_lg_bg "$name" chat "${common[@]}" --msg-rate "$msg_rate" --duration "${chat_secs}s" \
            --settle 2s --drain 10s
        rc=0; wait_lg || rc=$?
        b1=$(box_ticks); c1=$(proc_ticks "$server_pid"); k1=$(children_ticks); w1=$(now_ns)
        # CPU during the run: ours (server, load generator) and everything else on the box
        cat >"$out/$name.cpu.json" <<EOF
{"wall_ns": $((w1 - w0)), "clk_tck": $clk_tck, "cpus": $(nproc),
 "box_ticks": [$(echo "$b0 $b1" | awk '{ print $3 - $1 ", " $4 - $2 }')],
 "server_ticks": $((c1 - c0)), "loadgen_ticks": $((k1 - k0)), "exit": $rc}
EOF
        lost=$(python3 "$report_py" get "$out/$name.json" messages.lost 2>/dev/null || echo "?")
        overdue=$(python3 "$report_py" get "$out/$name.json" messages.not_delivered_within_drain 2>/dev/null || echo "?")
        log "step $n: chat run $k exit $rc, lost $lost, not delivered within the drain window $overdue"
        chat_list="$chat_list${chat_list:+, }\"$name.json\""
        wait_server_drained || true
        server_alive || break
    done
    python3 "$report_py" set-chats "$out/step-$n.json" "[$chat_list]"
    server_alive || { stop_reason="server exited during the chat runs of step $n (see server.log)"; break; }

    # per-connection memory of this step, all in, for the next memory check
    used_kb=$((avail_kb - avail1_kb))
    if [ "$used_kb" -gt 0 ]; then prev_mem_per_conn_b=$((used_kb * 1024 / n)); fi
    [ "$prev_mem_per_conn_b" -ge 4096 ] || prev_mem_per_conn_b=4096
    prev_n=$n
done
[ -n "$stop_reason" ] || stop_reason="target: every step of the ladder held (last: ${steps[-1]} connections, --target $target)"
log "stopped: $stop_reason"
{
    echo "stop_reason=$stop_reason"
    echo "largest_ok=$largest_ok"
    echo "duration_s=$(($(date +%s) - t_start))"
    echo "mem_available_end_kb=$(meminfo_kb MemAvailable)"
} >>"$out/run.env"

cleanup
python3 "$report_py" render "$out"
log "results in $out"
