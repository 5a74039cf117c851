#!/usr/bin/env bash
# tuning/selftest.sh -- test the tuning scripts without touching this machine.
#
# Everything runs against scratch directories: apply.sh only with --root DIR,
# current values from a fake /proc/sys tree (Linux) or a stub `sysctl` first in
# PATH (FreeBSD scripts, so they can be tested on any OS). Real values are only
# read (check.sh --report-only and dry runs). Exit 0 when every test passes.
set -u

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/tern-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
export TERN_PROCESS=    # no process row: the result must not depend on what runs here

pass=0 fail=0
ok()  { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
# expect_rc WANT DESC CMD...: run CMD, output to $work/out, compare exit status
expect_rc() {
    local want=$1 desc=$2 rc
    shift 2
    "$@" > "$work/out" 2>&1
    rc=$?
    if [ "$rc" -eq "$want" ]; then ok "$desc (exit $rc)"; else bad "$desc: exit $rc, wanted $want"; sed 's/^/     | /' "$work/out"; fi
}
expect_grep() {   # expect_grep DESC PATTERN FILE
    if grep -q -- "$2" "$3"; then ok "$1"; else bad "$1: no '$2' in $3"; fi
}
snapshot() { (cd "$1" && find . -type f | LC_ALL=C sort | xargs cksum); }

# ---- shellcheck ---------------------------------------------------------------------
if command -v shellcheck >/dev/null 2>&1; then
    expect_rc 0 "shellcheck, all scripts" shellcheck -x "$here"/linux/*.sh "$here"/freebsd/*.sh \
        "$here"/freebsd/rc.d/tern "$here"/freebsd/test/*.sh "$here"/selftest.sh
else
    echo "skip shellcheck (not installed)"
fi
for f in "$here"/freebsd/*.sh "$here"/freebsd/rc.d/tern "$here"/freebsd/test/*.sh; do
    if command -v dash >/dev/null 2>&1; then
        expect_rc 0 "dash -n $(basename "$f")" dash -n "$f"
    fi
done

# ---- Linux ------------------------------------------------------------------------------
L=$here/linux
expect_rc 0 "linux check.sh --report-only on this machine" "$L/check.sh" --report-only
expect_rc 0 "linux apply.sh dry run on this machine" "$L/apply.sh"

# fake /proc/sys trees: "tuned" = every recommended value, "mixed" = some better,
# some short, some absent
# shellcheck source-path=SCRIPTDIR source=linux/lib.sh
. "$L/lib.sh"
tuned=$work/proc-tuned mixed=$work/proc-mixed
while IFS=$'\t' read -r key _mode rec _dash; do
    for t in "$tuned" "$mixed"; do
        mkdir -p "$(dirname "$t/${key//.//}")"
        printf '%s\n' "$rec" > "$t/${key//.//}"
    done
done < <(tern_records "$L/99-tern.conf")
echo 9223372036854775807 > "$mixed/fs/file-max"                  # better (systemd)
printf '3000000\t500000\t9000000\n' > "$mixed/net/ipv4/tcp_mem"   # partly better
echo 60 > "$mixed/net/ipv4/tcp_fin_timeout"                        # short (max key)
echo 4096 > "$mixed/net/core/somaxconn"                            # short
rm -rf "$mixed/net/netfilter" "$mixed/net/ipv4/tcp_max_tw_buckets" # absent

expect_rc 0 "linux check.sh, tuned tree" env TERN_PROC_SYS="$tuned" "$L/check.sh"
expect_rc 1 "linux check.sh, mixed tree" env TERN_PROC_SYS="$mixed" "$L/check.sh"
expect_grep "linux check.sh reports absent keys" "nf_conntrack_max .* absent" "$work/out"
expect_rc 0 "linux check.sh --report-only, mixed tree" env TERN_PROC_SYS="$mixed" "$L/check.sh" --report-only

for t in tuned mixed; do
    r=$work/root-linux-$t
    mkdir -p "$r"
    expect_rc 0 "linux apply.sh --apply --root, $t, 1st run" env TERN_PROC_SYS="$work/proc-$t" "$L/apply.sh" --apply --root "$r"
    expect_grep "linux 1st run wrote 4 files ($t)" "Done: 4 file(s) changed" "$work/out"
    expect_grep "linux root without passwd: user not created, command shown ($t)" "useradd --system" "$work/out"
    snapshot "$r" > "$work/snap1"
    expect_rc 0 "linux apply.sh --apply --root, $t, 2nd run" env TERN_PROC_SYS="$work/proc-$t" "$L/apply.sh" --apply --root "$r"
    expect_grep "linux 2nd run changed nothing ($t)" "Done: 0 file(s) changed" "$work/out"
    snapshot "$r" > "$work/snap2"
    if cmp -s "$work/snap1" "$work/snap2"; then ok "linux root tree identical after 2nd run ($t)"; else bad "linux root tree changed on 2nd run ($t)"; fi
done
r=$work/root-linux-tuned
if cmp -s "$L/99-tern.conf" "$r/etc/sysctl.d/99-tern.conf"; then ok "linux tuned box gets the fragment verbatim"; else bad "linux tuned box fragment differs"; fi
r=$work/root-linux-mixed/etc/sysctl.d/99-tern.conf
expect_grep "linux keeps a larger fs.file-max" "^fs.file-max = 9223372036854775807$" "$r"
expect_grep "linux keeps the larger parts of tcp_mem" "^net.ipv4.tcp_mem = 3000000 1572864 9000000$" "$r"
expect_grep "linux comments out an absent key" "^#net.ipv4.tcp_max_tw_buckets = 1048576$" "$r"
expect_grep "linux keeps optional absent keys" "^-net.netfilter.nf_conntrack_max = 4194304$" "$r"
r=$work/root-linux-tuned/etc/tern/tern.toml
if cmp -s "$L/tern.toml" "$r"; then ok "linux sample config installed verbatim"; else bad "linux sample config not installed"; fi
if [ "$(stat -c %a "$r" 2>/dev/null || stat -f %Lp "$r")" = 640 ]; then ok "linux sample config is 0640"; else bad "linux sample config mode"; fi
# an operator's config is never replaced, not even by a newer sample
r=$work/root-linux-own
mkdir -p "$r/etc/tern"
printf 'listen = "0.0.0.0:5222"\n' > "$r/etc/tern/tern.toml"
expect_rc 0 "linux apply.sh --apply --root with an existing tern.toml" env TERN_PROC_SYS="$tuned" "$L/apply.sh" --apply --root "$r"
expect_grep "linux says the existing tern.toml is left alone" "tern.toml: exists, left alone" "$work/out"
expect_grep "linux existing tern.toml kept" '^listen = "0.0.0.0:5222"$' "$r/etc/tern/tern.toml"

# an older installed fragment is updated once, with a backup
r=$work/root-linux-tuned
sed 's/^net.core.somaxconn = 65535$/net.core.somaxconn = 1024/' "$r/etc/sysctl.d/99-tern.conf" > "$work/old.conf"
cat "$work/old.conf" > "$r/etc/sysctl.d/99-tern.conf"
expect_rc 0 "linux dry run on an outdated root" env TERN_PROC_SYS="$tuned" "$L/apply.sh" --root "$r"
expect_grep "linux dry run shows the diff" "^ *+net.core.somaxconn = 65535" "$work/out"
expect_rc 0 "linux apply on an outdated root" env TERN_PROC_SYS="$tuned" "$L/apply.sh" --apply --root "$r"
if ls "$r"/etc/sysctl.d/99-tern.conf.*.bak >/dev/null 2>&1; then ok "linux backup written"; else bad "linux no backup"; fi
expect_rc 0 "linux apply again" env TERN_PROC_SYS="$tuned" "$L/apply.sh" --apply --root "$r"
expect_grep "linux nothing left to change" "Done: 0 file(s) changed" "$work/out"

# ---- FreeBSD (stub sysctl) ----------------------------------------------------------------
F=$here/freebsd
mkdir -p "$work/bin"
cat > "$work/bin/sysctl" <<'EOF'
#!/bin/sh
# stub: `sysctl -n KEY` answers from the KEY=VALUE file $FAKE_SYSCTL (a key
# not in it is an unknown oid); `sysctl KEY=VALUE` changes that file the way
# FreeBSD would, by the key's flags in $FAKE_SYSCTL_OIDS: a read-only tunable
# is refused (it can only be set from loader.conf).
if [ "$1" = -n ]; then
    awk -F= -v k="$2" '$1 == k { sub(/^[^=]*=/, ""); print; found = 1 }
        END { if (!found) { print "sysctl: unknown oid '\''" k "'\''" > "/dev/stderr"; exit 1 } }' "$FAKE_SYSCTL"
    exit
fi
case $1 in *=*) ;; *) echo "stub sysctl: only -n KEY and KEY=VALUE" >&2; exit 2 ;; esac
key=${1%%=*} val=${1#*=}
old=$(awk -F= -v k="$key" '$1 == k { sub(/^[^=]*=/, ""); print }' "$FAKE_SYSCTL")
[ -n "$old" ] || { echo "sysctl: unknown oid '$key'" >&2; exit 1; }
flags=$(awk -v k="$key" '$1 == k { print $2 }' "$FAKE_SYSCTL_OIDS")
case $flags in
    rdtun) printf "sysctl: oid '%s' is a read only tunable\nsysctl: Tunable values are set in /boot/loader.conf\n" "$key" >&2; exit 1 ;;
    rw | rwtun) ;;
    *) echo "stub sysctl: $key is not classified in $FAKE_SYSCTL_OIDS" >&2; exit 3 ;;
esac
awk -F= -v k="$key" -v v="$val" 'BEGIN { OFS = "=" } $1 == k { print k, v; next } { print }' "$FAKE_SYSCTL" > "$FAKE_SYSCTL.new"
mv "$FAKE_SYSCTL.new" "$FAKE_SYSCTL"
echo "$key: $old -> $val"
EOF
chmod +x "$work/bin/sysctl"
cat > "$work/fbsd-default" <<'EOF'
kern.ipc.maxsockets=2061374
kern.ipc.nmbclusters=4074990
net.inet.tcp.tcbhashsize=524288
net.inet.tcp.syncache.hashsize=512
net.inet.tcp.hostcache.hashsize=512
net.inet.tcp.hostcache.cachelimit=15360
net.inet.tcp.hostcache.bucketlimit=30
kern.timecounter.hardware=TSC-low
kern.maxfiles=2061374
kern.maxfilesperproc=1855227
kern.ipc.soacceptqueue=4096
net.inet.tcp.sendspace=32768
net.inet.tcp.recvspace=65536
net.inet.tcp.sendbuf_max=2097152
net.inet.tcp.recvbuf_max=2097152
net.inet.ip.portrange.first=10000
net.inet.ip.portrange.last=65535
net.inet.tcp.msl=30000
net.inet.tcp.fast_finwait2_recycle=0
net.inet.tcp.finwait2_timeout=60000
EOF
fb() { env PATH="$work/bin:$PATH" FAKE_SYSCTL="$work/$1" FAKE_SYSCTL_OIDS="$F/test/sysctl-oids" "${@:2}"; }
sh_="sh"
if command -v dash >/dev/null 2>&1; then sh_="dash"; fi

expect_rc 0 "freebsd check.sh --report-only on this machine (all absent)" $sh_ "$F/check.sh" --report-only
expect_rc 1 "freebsd check.sh, default box" fb fbsd-default $sh_ "$F/check.sh"
expect_grep "freebsd reports a missing key as absent" "net.inet.tcp.maxtcptw .* absent" "$work/out"
expect_rc 0 "freebsd check.sh --report-only, default box" fb fbsd-default $sh_ "$F/check.sh" --report-only

r=$work/root-fbsd
mkdir -p "$r/boot" "$r/etc"
printf 'zfs_load="YES"\n' > "$r/boot/loader.conf.local"
printf 'default:\\\n\t:openfiles=unlimited:\n\ndaemon:\\\n\t:tc=default:\n' > "$r/etc/login.conf"
expect_rc 0 "freebsd dry run, scratch root" fb fbsd-default $sh_ "$F/apply.sh" --root "$r"
if [ ! -e "$r/etc/sysctl.conf.local" ]; then ok "freebsd dry run wrote nothing"; else bad "freebsd dry run wrote a file"; fi
expect_rc 0 "freebsd apply.sh --apply --root, 1st run" fb fbsd-default $sh_ "$F/apply.sh" --apply --root "$r"
# loader.conf.local, sysctl.conf.local, login.conf, rc.d/tern, and the sample
# tern.toml once there is one
n_first=4
if [ -f "$F/tern.toml" ]; then n_first=5; fi
expect_grep "freebsd 1st run wrote $n_first files" "Done: $n_first file(s) changed" "$work/out"
snapshot "$r" > "$work/snap1"
expect_rc 0 "freebsd apply.sh --apply --root, 2nd run" fb fbsd-default $sh_ "$F/apply.sh" --apply --root "$r"
expect_grep "freebsd 2nd run changed nothing" "Done: 0 file(s) changed" "$work/out"
snapshot "$r" > "$work/snap2"
if cmp -s "$work/snap1" "$work/snap2"; then ok "freebsd root tree identical after 2nd run"; else bad "freebsd root tree changed on 2nd run"; fi
expect_grep "freebsd keeps other loader lines" '^zfs_load="YES"$' "$r/boot/loader.conf.local"
expect_grep "freebsd keeps a larger nmbclusters" '^kern.ipc.nmbclusters="4074990"$' "$r/boot/loader.conf.local"
expect_grep "freebsd comments out an absent key" '^#net.inet.tcp.maxtcptw=1048576$' "$r/etc/sysctl.conf.local"
expect_grep "freebsd login class installed" '^tern:\\$' "$r/etc/login.conf"
if [ "$(stat -c %a "$r/usr/local/etc/rc.d/tern" 2>/dev/null || stat -f %Lp "$r/usr/local/etc/rc.d/tern")" = 555 ]; then
    ok "freebsd rc.d script installed 0555"; else bad "freebsd rc.d script mode"; fi
if [ -f "$F/tern.toml" ]; then
    if cmp -s "$F/tern.toml" "$r/usr/local/etc/tern.toml"; then ok "freebsd sample tern.toml installed"; else bad "freebsd sample tern.toml not installed"; fi
else
    expect_grep "freebsd says there is no sample tern.toml" "tern.toml: not installed, no sample" "$work/out"
fi
# an operator's tern.toml is never replaced
r2=$work/root-fbsd-conf
mkdir -p "$r2/usr/local/etc"
printf 'listen = "0.0.0.0:5222"\n' > "$r2/usr/local/etc/tern.toml"
cp "$r2/usr/local/etc/tern.toml" "$work/tern.toml.mine"
expect_rc 0 "freebsd apply.sh --apply, root with a tern.toml" fb fbsd-default $sh_ "$F/apply.sh" --apply --root "$r2"
if cmp -s "$work/tern.toml.mine" "$r2/usr/local/etc/tern.toml"; then ok "freebsd keeps the operator's tern.toml"; else bad "freebsd replaced tern.toml"; fi
expect_grep "freebsd says it left tern.toml alone" "tern.toml: exists, left as it is" "$work/out"

# after the runtime change and a reboot the box reports the installed values
grep -h '^[a-z]' "$r/boot/loader.conf.local" "$r/etc/sysctl.conf.local" | grep -v '^zfs_load=' | tr -d '"' > "$work/fbsd-tuned"
echo kern.timecounter.hardware=HPET >> "$work/fbsd-tuned"
expect_rc 0 "freebsd check.sh, tuned box (info row never counts)" fb fbsd-tuned $sh_ "$F/check.sh"
expect_rc 0 "freebsd apply on the tuned box" fb fbsd-tuned $sh_ "$F/apply.sh" --apply --root "$r"
expect_grep "freebsd tuned box: nothing to change" "Done: 0 file(s) changed" "$work/out"

# a damaged managed block is refused, not guessed at
printf '# >>> tern tuning: managed by tuning/freebsd/apply.sh; edit the fragment there, not this block\n' >> "$r/etc/sysctl.conf.local"
expect_rc 1 "freebsd refuses a file with an unterminated block" fb fbsd-default $sh_ "$F/apply.sh" --root "$r"

# ---- FreeBSD: loader.conf or sysctl.conf, for every key ----------------------------
# A read-only tunable in sysctl.conf fails at boot; a runtime-only sysctl in
# loader.conf is ignored. test/sysctl-oids says which is which (with sources).
# shellcheck disable=SC1091 # FreeBSD's lib.sh has its own tern_records
( . "$F/lib.sh"; tern_records "$F/loader.conf" loader; tern_records "$F/sysctl.conf" sysctl ) > "$work/fbsd-records"
n_keys=0
while IFS=$'\t' read -r key mode _rec src; do
    [ "$mode" != info ] || continue
    n_keys=$((n_keys + 1))
    flags=$(awk -v k="$key" '$1 == k { print $2 }' "$F/test/sysctl-oids")
    case $src:$flags in
        loader:rdtun | loader:rwtun | sysctl:rw | sysctl:rwtun) ok "freebsd $key ($flags) belongs in $src.conf" ;;
        *:) bad "freebsd $key is not classified in test/sysctl-oids" ;;
        *) bad "freebsd $key ($flags) must not be in $src.conf" ;;
    esac
done < "$work/fbsd-records"
if [ "$n_keys" -ge 15 ]; then ok "freebsd split checked for $n_keys keys"; else bad "freebsd only $n_keys keys read"; fi

# `sysctl key=value`, as apply.sh sets runtime values (tern_sysctl_set), against
# the stub on a default box: every sysctl.conf key takes its value, except one
# this kernel lacks (maxtcptw: 14.x); a loader.conf read-only tunable is refused.
cp "$work/fbsd-default" "$work/fbsd-live"
while IFS=$'\t' read -r key mode rec src; do
    [ "$mode" != info ] || continue
    # shellcheck disable=SC1091
    (
        export PATH="$work/bin:$PATH" FAKE_SYSCTL="$work/fbsd-live" FAKE_SYSCTL_OIDS="$F/test/sysctl-oids"
        . "$F/lib.sh"
        tern_sysctl_set "$key" "$rec"
    ) > "$work/out" 2>&1
    set_rc=$?
    now=$(fb fbsd-live sysctl -n "$key" 2>/dev/null)
    flags=$(awk -v k="$key" '$1 == k { print $2 }' "$F/test/sysctl-oids")
    if [ "$src" = sysctl ] && [ "$key" = net.inet.tcp.maxtcptw ]; then
        if [ "$set_rc" -ne 0 ] && grep -q "unknown oid" "$work/out"; then ok "freebsd sysctl $key=$rec: unknown oid on 14.x"; else bad "freebsd sysctl $key=$rec: rc $set_rc"; fi
    elif [ "$src" = sysctl ]; then
        if [ "$set_rc" -eq 0 ] && [ "$now" = "$rec" ]; then ok "freebsd sysctl $key=$rec"; else bad "freebsd sysctl $key=$rec: rc $set_rc, now $now"; sed 's/^/     | /' "$work/out"; fi
    elif [ "$flags" = rdtun ]; then
        if [ "$set_rc" -ne 0 ] && grep -q "read only tunable" "$work/out"; then ok "freebsd sysctl $key=...: refused, loader.conf only"; else bad "freebsd sysctl $key=$rec was not refused"; fi
    fi
done < "$work/fbsd-records"
cp "$work/fbsd-default" "$work/fbsd-live"

# ---- FreeBSD: the numbers leave room for TIME_WAIT --------------------------------
# 13.x: sockets with a descriptor (at most kern.maxfiles) and TIME_WAIT entries
# (at most net.inet.tcp.maxtcptw) each hold an inpcb from the zone capped at
# kern.ipc.maxsockets (sys/netinet/in_pcb.c, tcp_timewait.c).
val() { awk -F'\t' -v k="$1" '$1 == k { print $3 }' "$work/fbsd-records"; }
maxsockets=$(val kern.ipc.maxsockets) maxfiles=$(val kern.maxfiles)
maxtcptw=$(val net.inet.tcp.maxtcptw) perproc=$(val kern.maxfilesperproc)
# shellcheck disable=SC1091
openfiles=$( . "$F/lib.sh"; tern_class_openfiles "$F/login.conf.tern")
if [ "$maxsockets" -ge $((maxfiles + maxtcptw)) ]; then
    ok "freebsd maxsockets $maxsockets >= maxfiles $maxfiles + maxtcptw $maxtcptw"
else
    bad "freebsd maxsockets $maxsockets < maxfiles $maxfiles + maxtcptw $maxtcptw: TIME_WAIT after a restart exhausts the inpcb zone"
fi
if [ "$perproc" -ge 2500000 ] && [ "$perproc" -lt "$maxfiles" ]; then ok "freebsd 2.5M < maxfilesperproc $perproc < maxfiles $maxfiles"; else bad "freebsd maxfilesperproc $perproc vs 2.5M and maxfiles $maxfiles"; fi
if [ "$openfiles" = "$perproc" ]; then ok "freebsd login class openfiles = maxfilesperproc"; else bad "freebsd openfiles $openfiles != maxfilesperproc $perproc"; fi

# ---- FreeBSD: rc.d/tern against the rc.subr stand-in -------------------------------
expect_rc 0 "freebsd rc.d/tern start/status/stop against the rc.subr stand-in" $sh_ "$F/test/rc_d.sh"
tail -n 1 "$work/out" | sed 's/^/     /'

# refusing to write / on the wrong OS
if [ "$(uname -s)" != FreeBSD ]; then
    expect_rc 2 "freebsd apply.sh --apply refuses / on $(uname -s)" $sh_ "$F/apply.sh" --apply
fi

echo
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
