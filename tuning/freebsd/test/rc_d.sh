#!/bin/sh
# tuning/freebsd/test/rc_d.sh -- runs rc.d/tern's start, status and stop paths
# against the rc.subr stand-in (rc.subr.sh next to this file) and checks the
# command lines that would run on FreeBSD.
#
#   sh tuning/freebsd/test/rc_d.sh      exit 0 when every check passes
#
# Works on any OS, as any user, and touches nothing outside a mktemp -d
# directory: "/" is a scratch tree, and daemon(8), su, limits, install, id,
# pw and sysctl are stubs that record their arguments. The stand-in replaces
# the shell's kill, so no real process is ever signalled.
set -u

here=$(cd "$(dirname "$0")" && pwd)
script=$here/../rc.d/tern
standin=$here/rc.subr.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/tern-rcd.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

pass=0 fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
# has DESC FILE LINE: FILE has LINE, exactly
has() {
    if grep -qxF -- "$3" "$2"; then ok "$1"; else bad "$1: no line '$3' in $(basename "$2"):"; sed 's/^/     | /' "$2"; fi
}
# matches DESC FILE REGEX
matches() {
    if grep -qE -- "$3" "$2"; then ok "$1"; else bad "$1: nothing matches '$3' in $(basename "$2"):"; sed 's/^/     | /' "$2"; fi
}
# lacks DESC FILE REGEX
lacks() {
    if grep -q -- "$3" "$2"; then bad "$1: '$3' found:"; grep -- "$3" "$2" | sed 's/^/     | /'; else ok "$1"; fi
}
mode_of() { stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1"; }

# ---- the script under test, sourcing the stand-in instead of /etc/rc.subr -----
n=$(grep -c '^\. /etc/rc\.subr$' "$script")
if [ "$n" -eq 1 ]; then ok "rc.d/tern sources /etc/rc.subr once"; else bad "rc.d/tern sources /etc/rc.subr $n times"; fi
# shellcheck disable=SC2016 # $STANDIN_SUBR is for the copy to expand
sed 's|^\. /etc/rc\.subr$|. "$STANDIN_SUBR"|' "$script" > "$work/tern"

# ---- reserved names -----------------------------------------------------------
# rc.subr reads these ${name}_* settings itself (rc.subr(8)); the script may use
# tern_login_class in rc.subr's sense, and none of the others.
reserved='tern_(program|user|flags|chdir|chroot|nice|group|groups|prepend|setup|limits|env|env_file|fib|cpuset|oomprotect|umask|svcj|svcj_options)([^a-z_]|$)'
grep -v '^[[:space:]]*#' "$script" | grep -E "$reserved" > "$work/reserved" || true
if [ ! -s "$work/reserved" ]; then ok "no rc.subr-reserved tern_* name set or read in code"; else bad "reserved names in code:"; sed 's/^/     | /' "$work/reserved"; fi

# ---- a scratch "/" with stubs ---------------------------------------------------
# new_root NAME: $work/NAME with the tern user, a config, a tuned kernel, stubs.
new_root() {
    r=$work/$1
    mkdir -p "$r/bin" "$r/etc" "$r/usr/sbin" "$r/usr/local/bin" "$r/usr/local/etc" "$r/var/run" "$r/var/db"
    # master.passwd fields: name:pw:uid:gid:class:change:expire:gecos:home:shell
    printf 'tern:*:1001:1001:tern:0:0:Tern:/nonexistent:/usr/sbin/nologin\n' > "$r/etc/master.passwd"
    printf 'kern.maxfilesperproc=2700000\n' > "$r/sysctl"
    printf 'tern_enable="YES"\n' > "$r/rc.conf"
    : > "$r/proctable"
    : > "$r/log"
    : > "$r/usr/local/etc/tern.toml"
    printf '#!/bin/sh\necho "tern stub: never run by the stub daemon" >&2; exit 1\n' > "$r/usr/local/bin/tern"

    cat > "$r/bin/limits" <<'EOF'
#!/bin/sh
# limits stub: record, drop the options, run the rest ("/" is $STANDIN_ROOT).
echo "limits $*" >> "$STANDIN_LOG"
while [ $# -gt 0 ]; do
    case $1 in
        -C) shift 2 ;;
        -[BeESU]) shift ;;
        -*) shift 2 ;;
        *) break ;;
    esac
done
case $1 in
    /*) cmd=$STANDIN_ROOT$1; shift; exec "$cmd" "$@" ;;
    *) exec "$@" ;;
esac
EOF
    cat > "$r/bin/su" <<'EOF'
#!/bin/sh
# su stub: records only (a command under su -m would run as that user).
echo "su $*" >> "$STANDIN_LOG"
EOF
    cat > "$r/usr/sbin/daemon" <<'EOF'
#!/bin/sh
# daemon(8) stub: checks its options and the user as daemon(8) does, then
# "starts" the program: a process table entry and the pidfile (-p: the
# child's pid), written by the caller, i.e. root unless su ran it.
echo "daemon as=${STANDIN_AS:-root} $*" >> "$STANDIN_LOG"
pidfile= user=
while getopts cfHrSl:m:o:p:P:R:s:t:T:u: opt; do
    case $opt in
        p) pidfile=$OPTARG ;;
        u) user=$OPTARG ;;
        \?) echo "usage: daemon [-cfHrS] [-p pidfile] [-u user] ... command arguments ..." >&2; exit 1 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "daemon: no command" >&2; exit 1; }
if [ -n "$user" ] && ! grep -q "^$user:" "$STANDIN_ROOT/etc/master.passwd"; then
    echo "daemon: unknown user: $user" >&2; exit 1
fi
[ -x "$STANDIN_ROOT$1" ] || { echo "daemon: $1: No such file or directory" >&2; exit 1; }
pid=$((70000 + $(wc -l < "$STANDIN_ROOT/proctable")))
echo "$pid $*" >> "$STANDIN_ROOT/proctable"
[ -z "$pidfile" ] || echo "$pid" > "$STANDIN_ROOT$pidfile"
EOF
    cat > "$r/bin/install" <<'EOF'
#!/bin/sh
# install stub: only -d [-o owner] [-g group] [-m mode] dir...
echo "install $*" >> "$STANDIN_LOG"
d=0 owner= mode=
while getopts dg:m:o: opt; do
    case $opt in
        d) d=1 ;;
        o) owner=$OPTARG ;;
        m) mode=$OPTARG ;;
        g) ;;
        \?) exit 64 ;;
    esac
done
shift $((OPTIND - 1))
[ "$d" -eq 1 ] || { echo "install stub: only -d" >&2; exit 64; }
if [ -n "$owner" ] && ! grep -q "^$owner:" "$STANDIN_ROOT/etc/master.passwd"; then
    echo "install: unknown user $owner" >&2; exit 67
fi
for dir; do
    mkdir -p "$STANDIN_ROOT$dir" || exit 1
    [ -z "$mode" ] || chmod "$mode" "$STANDIN_ROOT$dir" || exit 1
done
EOF
    cat > "$r/bin/id" <<'EOF'
#!/bin/sh
# id stub: `id NAME` succeeds when NAME is in the scratch passwd.
line=$(grep "^$1:" "$STANDIN_ROOT/etc/master.passwd") || { echo "id: $1: no such user" >&2; exit 1; }
echo "$line" | awk -F: '{ printf "uid=%s(%s) gid=%s\n", $3, $1, $4 }'
EOF
    cat > "$r/bin/pw" <<'EOF'
#!/bin/sh
# pw stub: `pw usershow NAME` prints the master.passwd line.
[ "$1" = usershow ] || { echo "pw stub: only usershow" >&2; exit 64; }
grep "^$2:" "$STANDIN_ROOT/etc/master.passwd" || { echo "pw: no such user \`$2'" >&2; exit 67; }
EOF
    cat > "$r/bin/sysctl" <<'EOF'
#!/bin/sh
# sysctl stub: `sysctl -n KEY` from $STANDIN_ROOT/sysctl (KEY=VALUE lines).
[ "$1" = -n ] || { echo "sysctl stub: only -n" >&2; exit 2; }
awk -F= -v k="$2" '$1 == k { sub(/^[^=]*=/, ""); print; found = 1 }
    END { if (!found) { print "sysctl: unknown oid '\''" k "'\''" > "/dev/stderr"; exit 1 } }' "$STANDIN_ROOT/sysctl"
EOF
    chmod +x "$r/bin/"* "$r/usr/sbin/daemon" "$r/usr/local/bin/tern"
}

# rc ROOT ARG [SCRIPT]: run the script (default: the one under test) with ARG;
# output in $work/out, exit status in $rc.
rc() {
    env PATH="$work/$1/bin:$PATH" STANDIN_ROOT="$work/$1" STANDIN_LOG="$work/$1/log" \
        STANDIN_RC_CONF="$work/$1/rc.conf" STANDIN_SUBR="$standin" \
        sh "${3:-$work/tern}" "$2" > "$work/out" 2>&1
    rc=$?
}
# expect ROOT ARG WANT DESC
expect() {
    rc "$1" "$2"
    if [ "$rc" -eq "$3" ]; then ok "$4 (exit $rc)"; else bad "$4: exit $rc, wanted $3:"; sed 's/^/     | /' "$work/out"; fi
}

daemon_args='-f -S -T tern -p /var/run/tern.pid -u tern /usr/local/bin/tern serve --config /usr/local/etc/tern.toml --data-dir /var/db/tern --stats-socket /var/run/tern/tern.sock'

# ---- defaults: start, status, stop ---------------------------------------------
new_root a
R=$work/a
expect a start 0 "start"
has "rc.subr runs daemon(8) under the tern login class" "$R/log" "limits -C tern /usr/sbin/daemon $daemon_args"
has "daemon(8) runs as root, drops to tern (-u), runs tern serve" "$R/log" "daemon as=root $daemon_args"
lacks "no su wrapping" "$R/log" '^su '
has "store dir made 0700 for tern" "$R/log" "install -d -o tern -m 0700 /var/db/tern"
has "runtime dir made 0750 for tern" "$R/log" "install -d -o tern -m 0750 /var/run/tern"
if [ "$(mode_of "$R/var/db/tern")" = 700 ]; then ok "/var/db/tern is 0700"; else bad "/var/db/tern mode $(mode_of "$R/var/db/tern")"; fi
if [ "$(mode_of "$R/var/run/tern")" = 750 ]; then ok "/var/run/tern is 0750"; else bad "/var/run/tern mode $(mode_of "$R/var/run/tern")"; fi
has "pidfile holds the server's pid" "$R/var/run/tern.pid" "70000"
has "the server runs tern_bin" "$R/proctable" "70000 /usr/local/bin/tern serve --config /usr/local/etc/tern.toml --data-dir /var/db/tern --stats-socket /var/run/tern/tern.sock"
lacks "no login-class warning for a user of class tern" "$work/out" "has login class"
expect a status 0 "status while running"
has "status names the pid" "$work/out" "tern is running as pid 70000."
expect a start 1 "second start refused"
has "second start says why" "$work/out" "tern already running? (pid=70000)."
expect a stop 0 "stop"
has "stop sends SIGTERM to the server" "$R/log" "kill -TERM 70000"
if [ ! -s "$R/proctable" ]; then ok "server gone after stop"; else bad "server still in the process table"; fi
expect a status 1 "status after stop"
has "status says not running" "$work/out" "tern is not running."
expect a stop 1 "stop when stopped"
has "stop names the pidfile" "$work/out" "tern not running? (check /var/run/tern.pid)."
n=$(grep -c '^daemon ' "$R/log")
if [ "$n" -eq 1 ]; then ok "daemon(8) ran once in all"; else bad "daemon(8) ran $n times"; fi

# The command line daemon(8) would exec, parsed by the real tern (when one is
# built: $TERN_BIN, else target/debug or target/release of this checkout).
# --print-config makes it print the effective config and exit.
tern_real=${TERN_BIN:-}
for b in "$here/../../../target/debug/tern" "$here/../../../target/release/tern"; do
    [ -n "$tern_real" ] || [ ! -x "$b" ] || tern_real=$b
done
# real_argv ROOT: the server's argv from the process table, runnable here
real_argv() {
    awk 'NR == 1 { $1 = ""; $2 = ""; print }' "$work/$1/proctable" |
        sed "s|--config /usr/local/etc/tern.toml|--config $work/$1/usr/local/etc/tern.toml|"
}
if [ -n "$tern_real" ]; then
    rc a start
    # shellcheck disable=SC2046 # the argv is split into words on purpose
    if "$tern_real" $(real_argv a) --print-config > "$work/printed" 2>&1; then
        ok "the real tern accepts the rc.d command line ($tern_real)"
    else
        bad "the real tern refuses the rc.d command line:"; sed 's/^/     | /' "$work/printed"
    fi
    has "tern stores in /var/db/tern" "$work/printed" 'data_dir = "/var/db/tern"'
    has "tern's stats socket is /var/run/tern/tern.sock" "$work/printed" 'stats_socket = "/var/run/tern/tern.sock"'
    rc a stop
else
    echo "skip the real tern's parse of the command line (no binary; set TERN_BIN or cargo build)"
fi

# ---- not enabled: only onestart ------------------------------------------------
new_root b
R=$work/b
: > "$R/rc.conf"
expect b start 0 "start without tern_enable"
has "start explains tern_enable" "$work/out" "Cannot 'start' tern. Set tern_enable to YES in /etc/rc.conf or use 'onestart' instead of 'start'."
lacks "nothing started" "$R/log" '^daemon '
expect b onestart 0 "onestart"
has "onestart runs daemon(8)" "$R/log" "daemon as=root $daemon_args"
expect b onestatus 0 "onestatus"
expect b onestop 0 "onestop"

# ---- rc.conf settings ----------------------------------------------------------
new_root c
R=$work/c
printf 'chat:*:1002:1002:default:0:0:Chat:/nonexistent:/usr/sbin/nologin\n' >> "$R/etc/master.passwd"
mkdir -p "$R/opt/tern/bin"
cp "$R/usr/local/bin/tern" "$R/opt/tern/bin/tern"
cat > "$R/rc.conf" <<'EOF'
tern_enable="YES"
tern_bin="/opt/tern/bin/tern"
tern_runas="chat"
tern_dbdir="/srv/tern"
tern_flags="--shards 4"
tern_chdir="/srv/tern"
EOF
expect c start 0 "start with rc.conf settings"
has "settings reach daemon(8) and tern; tern_flags go to tern" "$R/log" \
    "daemon as=root -f -S -T tern -p /var/run/tern.pid -u chat /opt/tern/bin/tern serve --config /usr/local/etc/tern.toml --data-dir /srv/tern --stats-socket /var/run/tern/tern.sock --shards 4"
has "tern_dbdir made 0700 for tern_runas" "$R/log" "install -d -o chat -m 0700 /srv/tern"
has "an operator's tern_chdir is entered (after the precmd made it)" "$R/log" "chdir: /srv/tern"
has "warns when the user's login class is not tern" "$work/out" \
    "$work/tern: WARNING: user chat has login class 'default', not 'tern': daemon(8) -u applies the user's class (pw usermod chat -L tern)"
expect c status 0 "status finds the server by tern_bin"
expect c stop 0 "stop"

# ---- refusals --------------------------------------------------------------------
new_root d
R=$work/d
: > "$R/etc/master.passwd"
expect d start 1 "start without the user"
has "names the missing user and the fix" "$work/out" \
    "$work/tern: ERROR: user tern does not exist (pw useradd tern -L tern -d /nonexistent -s /usr/sbin/nologin)"
lacks "nothing started without the user" "$R/log" '^daemon '

new_root e
R=$work/e
rm "$R/usr/local/etc/tern.toml"
expect e start 1 "start without the config file"
has "names the config file" "$work/out" "$work/tern: WARNING: /usr/local/etc/tern.toml is not readable."
lacks "nothing started without the config" "$R/log" '^daemon '

new_root f
R=$work/f
printf 'kern.maxfilesperproc=1855227\n' > "$R/sysctl"
expect f start 0 "start on an untuned kernel"
has "warns about kern.maxfilesperproc" "$work/out" \
    "$work/tern: WARNING: kern.maxfilesperproc is 1855227, below 2700000: run tuning/freebsd/apply.sh"

# ---- the stand-in catches the trap of issue 20 ------------------------------------
# With the reserved names (tern_program, tern_user) rc.subr replaces daemon(8)
# by the server and wraps it in su; the stand-in must show that, or the checks
# above would prove nothing.
sed -e 's/tern_bin/tern_program/g' -e 's/tern_runas/tern_user/g' "$work/tern" > "$work/tern-reserved"
new_root g
R=$work/g
rc g start "$work/tern-reserved"
matches "control: tern_user wraps the start in su -m, tern gets daemon's flags" "$R/log" \
    '^su -m tern -c sh -c "/usr/local/bin/tern +-f -S -T tern -p /var/run/tern.pid -u tern /usr/local/bin/tern serve'
lacks "control: daemon(8) never runs" "$R/log" '^daemon '

echo
echo "rc.d/tern: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
