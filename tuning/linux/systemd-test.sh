#!/usr/bin/env bash
# tuning/linux/systemd-test.sh -- tern.service under real systemd, in a container.
#
#   systemd-test.sh [--tern BIN | --deb FILE] [--ledger BIN] [--cache DIR] [--keep]
#
#   --tern BIN     the tern binary to install (default: cargo build --release)
#   --deb FILE     install the Debian package FILE with dpkg -i instead
#                  (scripts/build_deb.py or cargo deb); checks 1, 2a and 3
#                  below, then dpkg -r
#   --ledger BIN   the ledger client (default: cargo build --release -p
#                  tern-client --example ledger)
#   --cache DIR    where the Debian root file system is cached (default
#                  $TERN_CI_CACHE or /var/cache/tern-ci); one directory per
#                  package list, so a rerun skips debootstrap
#   --keep         keep the container's root (in a temporary directory) at the end
#
# Needs root, debootstrap, systemd-nspawn (systemd-container) and nsenter. It
# makes a minimal Debian bookworm with systemd (debootstrap, about 40 s, once),
# boots a copy of it with systemd-nspawn (sharing this host's network), installs
# Tern the way an operator does (binary to /usr/local/bin, tuning/linux/apply.sh
# --apply inside the container: user, unit, sample config; or, with --deb,
# dpkg -i of the package: /usr/bin/tern, the unit and its drop-in, the user by
# the postinst, the config as a conffile), and checks:
#   1. systemctl start works; the unit runs as tern with the uring backend (no
#      EPERM fall-back to poll under the hardening); the store is /var/lib/tern,
#      mode 0700, owned by tern; nothing of it under /run/tern.
#   2. messages queued to offline users and ACKed survive, each delivered once
#      and exactly as ACKed, after: systemctl restart; kill -9 of the main PID
#      (Restart=on-failure brings it back); a reboot of the container (the unit
#      is enabled). A fresh batch is queued before each step, and one batch
#      queued before the first step is read only after the last.
#   2d. live upgrade under the unit (Type=notify, NotifyAccess=all):
#      systemctl reload (SIGUSR2), then tern upgrade: each time the unit's
#      main PID moves to the successor (its MAINPID=), the unit is not
#      restarted (same invocation, NRestarts unchanged), the generation
#      counts up, and a batch queued before is delivered as ACKed.
#   3. systemctl stop, right after the live upgrades (so the main process is
#      not systemd's child), ends within TimeoutStopSec and the server exits 0.
#   4. (--deb) dpkg -r removes the binary and the unit, keeps the store.
# Any failure prints the unit's journal and exits 1; bad usage or a missing
# tool exits 2. Every wait is bounded; the container (the systemd-nspawn
# process this script started) is stopped on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
tern_bin='' deb='' ledger_bin='' keep=0
cache=${TERN_CI_CACHE:-/var/cache/tern-ci}
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --tern) tern_bin=${2:?--tern needs a file}; shift ;;
        --deb) deb=${2:?--deb needs a file}; shift ;;
        --ledger) ledger_bin=${2:?--ledger needs a file}; shift ;;
        --cache) cache=${2:?--cache needs a directory}; shift ;;
        --keep) keep=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "systemd-test: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "systemd-test: $*" >&2; exit 2; }
[ -z "$tern_bin" ] || [ -z "$deb" ] || die "--tern and --deb exclude each other"
if [ -n "$deb" ]; then
    [ -f "$deb" ] || die "not a file: $deb"
    deb=$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")
fi
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, systemd-nspawn)"
for tool in debootstrap systemd-nspawn nsenter flock timeout; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap systemd-container)"
done

t0=$SECONDS
step() { printf '== [%3ss] %s\n' "$((SECONDS - t0))" "$*"; }

# ---- binaries -------------------------------------------------------------------
if [ -z "$tern_bin" ] && [ -z "$deb" ]; then
    step "cargo build --release (tern)"
    (cd "$repo" && cargo build --release -q -p tern --bin tern)
    tern_bin=$repo/target/release/tern
fi
if [ -z "$ledger_bin" ]; then
    step "cargo build --release (ledger client)"
    (cd "$repo" && cargo build --release -q -p tern-client --example ledger)
    ledger_bin=$repo/target/release/examples/ledger
fi
[ -n "$deb" ] || [ -x "$tern_bin" ] || die "not an executable: $tern_bin"
[ -x "$ledger_bin" ] || die "not an executable: $ledger_bin"

# ---- root file system, cached per package list ------------------------------------
suite=bookworm
packages=systemd,systemd-sysv,dbus,procps
# The mirror this host already uses (deb822 .sources or sources.list).
mirror=$(
    { awk 'BEGIN { RS = ""; FS = "\n" }
           /(^|\n)Suites:[^\n]*[ \t]'"$suite"'([ \t]|\n|$)/ {
               for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); print u[2] }
           }' /etc/apt/sources.list.d/*.sources 2>/dev/null
      awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $(i + 1) == "'"$suite"'") print $i }' \
          /etc/apt/sources.list 2>/dev/null
    } | grep -v -- '-security' | head -n 1 || true
)
mirror=${mirror:-http://deb.debian.org/debian}
key=$(printf '%s %s %s' "$suite" minbase "$packages" | sha256sum | cut -c 1-12)
base=$cache/rootfs-$suite-$key
mkdir -p "$cache"
exec 9> "$cache/.lock"
flock -w 900 9 || die "cache $cache is locked by another run for 15 min"
if [ ! -f "$base/.complete" ]; then
    step "debootstrap $suite ($packages) from $mirror into $base"
    rm -rf "$base" "$base.new"
    timeout 900 debootstrap --variant=minbase --include="$packages" "$suite" "$base.new" "$mirror" \
        > "$cache/debootstrap.log" 2>&1 || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$base.new"/var/cache/apt/archives/*.deb
    touch "$base.new/.complete"
    mv "$base.new" "$base"
else
    step "root file system from cache: $base"
fi
flock -u 9

# ---- a container of our own --------------------------------------------------------
work=$(mktemp -d /var/tmp/tern-systemd-test.XXXXXX)
root=$work/root
nspawn_pid='' ct=''
cleanup() {
    local rc=$? i
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGTERM makes nspawn shut the container down; SIGKILL if it hangs.
        kill "$nspawn_pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    if [ "$keep" -eq 1 ]; then echo "systemd-test: kept $work" >&2; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "systemd-test: line $LINENO failed: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM

step "copy root file system to $root"
cp -a "$base" "$root"
rm -f "$root/.complete"

# A loopback port nobody listens on (the container shares this network).
port=
for ((i = 0; i < 50; i++)); do
    p=$((20000 + RANDOM % 20000))
    if ! timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$p" 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || die "no free loopback port found in 50 tries"
addr=127.0.0.1:$port
secret=systemd-test-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
ledger=$work/ledger.tsv

# in_ct CMD...: run CMD inside the container (all its namespaces), clean env.
in_ct() {
    timeout 120 nsenter -t "$ct" -a -- env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}
prop() { in_ct systemctl show -p "$1" --value tern; }

fail() {
    echo "systemd-test: FAIL: $*" >&2
    if [ -n "$ct" ] && kill -0 "$ct" 2>/dev/null; then
        echo "---- systemctl status tern" >&2
        in_ct systemctl status --no-pager tern >&2 || true
        echo "---- journalctl -u tern (this boot, last 150 lines)" >&2
        in_ct journalctl -u tern -b --no-pager | tail -n 150 >&2 || true
    else
        echo "---- container console (last 60 lines)" >&2
        tail -n 60 "$work/console.log" >&2 || true
    fi
    exit 1
}

boot() {
    local i state
    systemd-nspawn -D "$root" -b --register=no --keep-unit --console=pipe -q \
        < /dev/null >> "$work/console.log" 2>&1 &
    nspawn_pid=$!
    ct=
    for ((i = 0; i < 100; i++)); do
        ct=$(ps -o pid= --ppid "$nspawn_pid" | tr -d ' ' | head -n 1 || true)
        if [ -n "$ct" ] && [ "$(cat "/proc/$ct/comm" 2>/dev/null)" = systemd ]; then break; fi
        ct=
        kill -0 "$nspawn_pid" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$ct" ] || fail "the container's systemd did not start"
    # Until its bus is up systemctl cannot even ask; then --wait waits for
    # the boot to end. "degraded" (a unit that is not ours failed) is fine.
    for ((i = 0; i < 180; i++)); do
        state=$(in_ct timeout 60 systemctl is-system-running --wait 2> /dev/null || true)
        case $state in
            running | degraded) return 0 ;;
        esac
        kill -0 "$nspawn_pid" 2>/dev/null || break
        sleep 0.5
    done
    fail "container did not finish booting (state: ${state:-no answer})"
}

# wait_up OLD_PID: the unit is active with a main PID other than OLD_PID and
# accepts connections. Bounded; tolerates failed starts in between.
wait_up() {
    local old=$1 i pid
    for ((i = 0; i < 240; i++)); do
        pid=$(prop MainPID)
        # "failed" is final: systemd gave up (e.g. the start limit was hit).
        [ "$(prop ActiveState)" != failed ] || fail "tern.service failed: Result=$(prop Result)"
        if [ "$(prop ActiveState)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$old" ] \
            && timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.25
    done
    fail "tern.service not serving on $addr within 60 s (old main PID $old)"
}

# Journal lines of the unit's current run only.
journal_now() { in_ct journalctl --no-pager -o cat "_SYSTEMD_INVOCATION_ID=$(prop InvocationID)"; }

check_running() {
    local what=$1 pid journal mode
    pid=$(prop MainPID)
    journal=$(journal_now)
    grep -q "backend uring" <<< "$journal" \
        || fail "$what: the journal does not show the uring backend"
    if grep -Eq "io_uring unavailable|EPERM|Operation not permitted" <<< "$journal"; then
        fail "$what: io_uring was refused under the unit's hardening"
    fi
    [ "$(in_ct ps -o user= -p "$pid" | tr -d ' ')" = tern ] || fail "$what: main PID $pid does not run as tern"
    mode=$(in_ct stat -c '%a %U:%G' /var/lib/tern)
    [ "$mode" = "700 tern:tern" ] || fail "$what: /var/lib/tern is '$mode', wanted '700 tern:tern'"
    in_ct test -d /var/lib/tern/shard-0 || fail "$what: no store in /var/lib/tern"
    in_ct cat "/proc/$pid/cmdline" | tr '\0' ' ' | grep -q -- "--data-dir /var/lib/tern" \
        || fail "$what: tern was not started with --data-dir /var/lib/tern"
    [ "$(in_ct readlink "/proc/$pid/exe")" = "$tern_path" ] \
        || fail "$what: main PID $pid is not $tern_path"
    [ -z "$(in_ct find /run/tern -mindepth 1 ! -name tern.sock)" ] \
        || fail "$what: files other than the stats socket under /run/tern"
    in_ct tern stats -s /run/tern/tern.sock show info > /dev/null || fail "$what: stats socket does not answer"
    echo "   ok: $what: main PID $pid as tern, backend uring, store /var/lib/tern 700 tern:tern"
}

# queue BATCH FIRST-LAST: 5 messages to each (offline) user, all ACKed.
queue() {
    local rc=0
    timeout 60 "$ledger_bin" send --addr "$addr" --secret "$secret" --batch "$1" --to "$2" \
        --per-user 5 --ledger "$ledger" > "$work/out" 2>&1 || rc=$?
    sed 's/^/   /' "$work/out"
    [ "$rc" -eq 0 ] || fail "queueing batch $1: not every message ACKed (exit $rc)"
}
# deliver BATCH: every ACKed message of BATCH arrives once, as ACKed.
deliver() {
    local rc=0
    timeout 120 "$ledger_bin" check --addr "$addr" --secret "$secret" --batch "$1" \
        --ledger "$ledger" > "$work/out" 2>&1 || rc=$?
    sed 's/^/   /' "$work/out"
    [ "$rc" -eq 0 ] || fail "batch $1 not delivered exactly as ACKed (exit $rc)"
}

# ---- install, as an operator does -------------------------------------------------------
if [ -z "$deb" ]; then
    tern_path=/usr/local/bin/tern
    step "install: binary, then tuning/linux/apply.sh --apply inside the container"
    install -m 0755 "$tern_bin" "$root/usr/local/bin/tern"
    mkdir -p "$root/root/tern-tuning"
    cp -a "$here" "$root/root/tern-tuning/linux"
    boot
    in_ct bash /root/tern-tuning/linux/apply.sh --apply > "$work/apply.log" 2>&1 \
        || { cat "$work/apply.log" >&2; fail "apply.sh --apply failed"; }
    grep -q "tern: created" "$work/apply.log" || fail "apply.sh did not create the tern user"
    in_ct id tern > /dev/null || fail "no user tern after apply.sh"
    [ "$(in_ct stat -c '%a %U:%G' /etc/tern/tern.toml)" = "640 root:tern" ] \
        || fail "/etc/tern/tern.toml is not 640 root:tern"
    in_ct cmp -s /root/tern-tuning/linux/tern.service /etc/systemd/system/tern.service \
        || fail "tern.service not installed"
else
    tern_path=/usr/bin/tern
    step "install: dpkg -i $(basename "$deb") inside the container"
    cp "$deb" "$root/root/tern.deb"
    boot
    in_ct dpkg -i /root/tern.deb > "$work/dpkg.log" 2>&1 \
        || { cat "$work/dpkg.log" >&2; fail "dpkg -i failed"; }
    in_ct id tern > /dev/null || fail "no user tern after dpkg -i (postinst)"
    [ "$(in_ct stat -c '%a %U:%G' /etc/tern/tern.toml)" = "640 root:tern" ] \
        || fail "/etc/tern/tern.toml is not 640 root:tern"
    # shellcheck disable=SC2016 # a dpkg-query field, not a shell variable
    in_ct dpkg-query -W -f '${Conffiles}' tern | grep -q /etc/tern/tern.toml \
        || fail "/etc/tern/tern.toml is not a conffile"
    in_ct systemctl cat tern | grep -q '^ExecStart=/usr/bin/tern serve ' \
        || fail "systemd does not see the package's ExecStart drop-in"
    [ "$(prop ActiveState)" = inactive ] || fail "dpkg -i started tern before it was configured"
fi
# The operator's edits: a real secret, a free port, two shards.
sed -i -e "s|^listen = .*|listen = \"$addr\"|" -e "s|^shards = .*|shards = 2|" \
    -e "s|^# token_secret = .*|token_secret = \"$secret\"|" "$root/etc/tern/tern.toml"
in_ct tern check-config /etc/tern/tern.toml > /dev/null || fail "edited tern.toml refused by check-config"
if [ -z "$deb" ]; then
    cp "$root/etc/tern/tern.toml" "$work/tern.toml.edited"
    in_ct bash /root/tern-tuning/linux/apply.sh --apply > "$work/apply2.log" 2>&1 || fail "apply.sh 2nd run failed"
    cmp -s "$work/tern.toml.edited" "$root/etc/tern/tern.toml" || fail "apply.sh 2nd run overwrote tern.toml"
fi
stop_timeout_s=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$here/tern.service")
[ -n "$stop_timeout_s" ] || fail "no TimeoutStopSec=N in tern.service"

step "1. systemctl enable --now tern"
in_ct systemctl enable --now tern > /dev/null 2>&1 || fail "systemctl enable --now tern"
wait_up 0
check_running "first start"

step "2a. queue, then systemctl restart"
queue kept 1001-1010
queue restart 2001-2010
pid=$(prop MainPID)
in_ct systemctl restart tern || fail "systemctl restart tern"
wait_up "$pid"
check_running "after restart"
deliver restart
# The checker is not vacuous: a batch already read is reported lost.
rc=0
timeout 60 "$ledger_bin" check --addr "$addr" --secret "$secret" --batch restart \
    --ledger "$ledger" > "$work/negative.log" 2>&1 || rc=$?
if [ "$rc" -ne 1 ] || ! grep -q "LOST" "$work/negative.log"; then
    cat "$work/negative.log" >&2
    fail "ledger check of an already delivered batch: exit $rc, wanted 1 with LOST lines"
fi
echo "   ok: checking the same batch again reports its 50 messages LOST (exit 1): the check can fail"

# live_upgrade HOW...: runs HOW (inside the container) to upgrade, then
# checks the unit followed the service to the successor.
live_upgrade() {
    local pid restarts invocation want i info gen new
    pid=$(prop MainPID)
    restarts=$(prop NRestarts)
    invocation=$(prop InvocationID)
    want=$(($(in_ct tern stats -s /run/tern/tern.sock show info | awk '$1 == "Generation:" { print $2 }') + 1))
    in_ct "$@" > "$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log" >&2; fail "live upgrade ($*) failed"; }
    wait_up "$pid"
    new=$(prop MainPID)
    for ((i = 0; i < 240; i++)); do
        info=$(in_ct tern stats -s /run/tern/tern.sock show info 2> /dev/null || true)
        gen=$(awk '$1 == "Generation:" { print $2 }' <<< "$info")
        [ "$gen" = "$want" ] && [ "$(awk '$1 == "Pid:" { print $2 }' <<< "$info")" = "$new" ] && break
        sleep 0.25
    done
    [ "$gen" = "$want" ] || fail "live upgrade ($*): generation ${gen:-?}, wanted $want"
    [ "$(prop NRestarts)" = "$restarts" ] || fail "live upgrade ($*): the unit was restarted"
    [ "$(prop InvocationID)" = "$invocation" ] || fail "live upgrade ($*): a new invocation of the unit"
    [ "$(prop ActiveState)" = active ] || fail "live upgrade ($*): unit $(prop ActiveState)"
    # The old process exits once its successor serves.
    for ((i = 0; i < 120; i++)); do
        in_ct kill -0 "$pid" 2> /dev/null || break
        sleep 0.25
    done
    ! in_ct kill -0 "$pid" 2> /dev/null || fail "live upgrade ($*): the old process $pid still runs"
    check_running "after live upgrade ($*): generation $gen, main PID $pid -> $new"
}

# The package's unit is the same file; kill -9 and reboot are checked by
# the run without --deb.
if [ -z "$deb" ]; then
    step "2b. queue, then kill -9 of the main PID"
    queue kill 3001-3010
    pid=$(prop MainPID)
    restarts=$(prop NRestarts)
    in_ct kill -9 "$pid"
    wait_up "$pid"
    [ "$(prop NRestarts)" -gt "$restarts" ] || fail "kill -9: NRestarts did not grow (not restarted by Restart=on-failure?)"
    check_running "after kill -9 (Restart=on-failure)"
    deliver kill

    step "2c. queue, then reboot the container"
    queue reboot 4001-4010
    in_ct systemctl reboot 2> /dev/null || true   # the call may die with the manager
    for ((i = 0; i < 240; i++)); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$nspawn_pid" 2>/dev/null && fail "the container did not reboot within 60 s"
    rc=0
    wait "$nspawn_pid" || rc=$?
    nspawn_pid=
    # systemd-nspawn exits 133 when the container asked for a reboot.
    [ "$rc" -eq 133 ] || fail "systemd-nspawn exited $rc after systemctl reboot, wanted 133"
    boot
    wait_up 0
    check_running "after reboot (unit enabled)"
    deliver reboot
fi

# Last before the stop in both runs: after an upgrade the main process is not
# systemd's child, and the stop must still be graceful.
step "2d. queue, then live upgrades: systemctl reload, then tern upgrade"
queue upgrade 5001-5010
live_upgrade systemctl reload tern
live_upgrade tern upgrade --socket /run/tern/tern.sock
deliver upgrade
deliver kept

step "3. systemctl stop (with a client connection open)"
exec 4<> "/dev/tcp/127.0.0.1/$port" || fail "cannot connect to $addr before the stop"
start_ns=$(date +%s%N)
in_ct timeout "$((stop_timeout_s + 30))" systemctl stop tern || fail "systemctl stop tern failed"
exec 4>&-
elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
[ "$elapsed_ms" -lt "$((stop_timeout_s * 1000))" ] \
    || fail "systemctl stop took $elapsed_ms ms, TimeoutStopSec is $stop_timeout_s s"
[ "$(prop Result)" = success ] || fail "stop: Result=$(prop Result), wanted success"
[ "$(prop ExecMainStatus)" = 0 ] || fail "stop: exit status $(prop ExecMainStatus), wanted 0"
in_ct journalctl -u tern -b --no-pager -o cat | tail -n 5 | grep -Eq '\] stopped$' \
    || fail "stop: no 'stopped' line from tern in the journal"
in_ct test -d /var/lib/tern/shard-0 || fail "stop: /var/lib/tern is gone"
echo "   ok: stopped in $elapsed_ms ms (TimeoutStopSec=${stop_timeout_s}s), Result=success, exit 0"

if [ -n "$deb" ]; then
    step "4. dpkg -r tern"
    in_ct dpkg -r tern > "$work/dpkg-r.log" 2>&1 || { cat "$work/dpkg-r.log" >&2; fail "dpkg -r failed"; }
    in_ct test ! -e /usr/bin/tern || fail "dpkg -r left /usr/bin/tern"
    in_ct test ! -e /lib/systemd/system/tern.service || fail "dpkg -r left the unit"
    in_ct test -d /var/lib/tern/shard-0 || fail "dpkg -r removed the store"
    echo "   ok: removed; /var/lib/tern kept"
fi

step "PASS: tern.service${deb:+ from $(basename "$deb")} under systemd $(in_ct systemctl --version | head -n 1 | cut -d' ' -f2)"
