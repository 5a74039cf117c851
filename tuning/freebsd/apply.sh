#!/bin/sh
# tuning/freebsd/apply.sh -- make a FreeBSD box ready for millions of Tern connections.
#
#   apply.sh                  dry run: show current -> recommended and the file
#                             changes it would make; changes nothing
#   apply.sh --apply          write the files below (backing up any file it
#                             changes as FILE.YYYYmmdd-HHMMSS.bak) and, when the
#                             root is /, set the short runtime values with sysctl
#                             and rebuild the login class database (cap_mkdb)
#   --root DIR                write the files under DIR instead of / (tests,
#                             jails, image builds); the running kernel is left alone
#   --no-runtime              write the files but do not touch running values
#
# Files (paths relative to the root):
#   boot/loader.conf.local    managed block from loader.conf (takes effect at boot)
#   etc/sysctl.conf.local     managed block from sysctl.conf
#   etc/login.conf            managed block from login.conf.tern (if the file exists)
#   usr/local/etc/rc.d/tern   from rc.d/tern (not enabled: sysrc tern_enable=YES)
#   usr/local/etc/tern.toml   the sample tern.toml, only when there is none yet
#                             (never overwritten; mode 0640: it holds token_secret)
# A managed block starts and ends with a "tern tuning" marker line; it is
# replaced in place on later runs and appended at the end the first time, so
# the rest of the file is left as it was.
#
# Idempotent: a second run finds nothing to change. A value already better than
# the recommendation (larger for "min" keys, smaller for "max" keys) is kept,
# never lowered: the installed block carries this box's value for that key.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

do_apply=0 root=/ runtime=1
usage() { sed -n '2,26s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --apply) do_apply=1 ;;
        --root)
            [ $# -ge 2 ] || { echo "apply.sh: --root needs a directory" >&2; exit 2; }
            root=$2; shift ;;
        --root=*) root=${1#--root=} ;;
        --no-runtime) runtime=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "apply.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[ -d "$root" ] || { echo "apply.sh: root $root is not a directory" >&2; exit 2; }
root_abs=$(cd "$root" && pwd -P)
prefix=${root_abs%/}            # "" for /, so "$prefix/etc/..." is always right
live=0
if [ "$root_abs" = / ]; then
    live=1
    if [ "$do_apply" -eq 1 ] && [ "$(uname -s)" != FreeBSD ]; then
        echo "apply.sh: this is not FreeBSD; use tuning/linux/apply.sh or --root DIR" >&2
        exit 2
    fi
    if [ "$do_apply" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
        echo "apply.sh: --apply on / needs root" >&2
        exit 2
    fi
fi
[ "$live" -eq 1 ] || runtime=0

ts=$(date +%Y%m%d-%H%M%S)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-apply.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

begin_mark="# >>> tern tuning: managed by tuning/freebsd/apply.sh; edit the fragment there, not this block"
end_mark="# <<< tern tuning"

if [ "$do_apply" -eq 1 ]; then mode_word="apply"; else mode_word="dry run (nothing is changed; add --apply)"; fi
if [ "$runtime" -eq 1 ]; then rt_word=yes; else rt_word=no; fi
echo "Tern tuning for FreeBSD: $mode_word"
echo "root: $root_abs   current values from: sysctl -n   runtime changes: $rt_word"
echo

# ---- 1. current -> recommended ---------------------------------------------------
# plan: key, mode, recommended, source, current|-, status, merged
{ tern_records "$here/loader.conf" loader; tern_records "$here/sysctl.conf" sysctl; } > "$tmp/records"
: > "$tmp/plan"
tern_row KEY CURRENT RECOMMENDED MODE ACTION
while IFS="$TAB" read -r key mode rec src; do
    if cur=$(tern_current "$key"); then
        out=$(tern_compare "$mode" "$cur" "$rec")
        status=${out%%"$TAB"*} merged=${out#*"$TAB"}
        if [ "$mode" = info ]; then
            status=info action="reported only"
        elif [ "$status" = short ]; then
            if [ "$src" = loader ]; then action="at next boot"
            elif [ "$runtime" -eq 1 ]; then action="set now + file"
            else action="file only"; fi
            [ "$merged" = "$rec" ] || action="$action, as: $merged"
        elif [ "$merged" != "$rec" ]; then
            action="ok, keeps current"
        else
            action=ok
        fi
    else
        cur=- merged=$rec
        if [ "$mode" = info ]; then status=info action="reported only"
        else status=absent action="absent (line commented out)"; fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$mode" "$rec" "$src" "$cur" "$status" "$merged" >> "$tmp/plan"
    tern_row "$key" "$cur" "$rec" "$mode" "$action"
done < "$tmp/records"
echo

# ---- 2. render the managed blocks ------------------------------------------------
# render FRAGMENT: the fragment between the markers, each setting with the value
# to keep; a key this kernel lacks is commented out (no "unknown oid" at boot).
render() {
    {
        printf '%s\n' "$begin_mark"
        awk -v plan="$tmp/plan" '
            BEGIN {
                while ((getline l < plan) > 0) {
                    split(l, f, "\t"); merged[f[1]] = f[7]; status[f[1]] = f[6]; rec[f[1]] = f[3]
                }
            }
            /^[ \t]*#/ || /^[ \t]*$/ { print; next }
            {
                line = $0; sub(/^[ \t]+/, "", line)
                eq = index(line, "="); key = substr(line, 1, eq - 1); gsub(/[ \t]+$/, "", key)
                val = substr(line, eq + 1); gsub(/^[ \t]+/, "", val)
                q = (substr(val, 1, 1) == "\"") ? "\"" : ""
                if (!(key in merged)) { print; next }
                if (status[key] == "absent") {
                    print "# apply.sh: " key " does not exist on this kernel; left commented out."
                    print "#" key "=" q rec[key] q
                } else {
                    if (merged[key] != rec[key])
                        print "# apply.sh: kept the running value where it was already better (shipped: " rec[key] ")."
                    print key "=" q merged[key] q
                }
            }' "$1"
        printf '%s\n' "$end_mark"
    } > "$2"
}

# merge_block TARGET BLOCK OUT: TARGET with its managed block replaced by BLOCK,
# or with BLOCK appended (after a blank line) when it has none yet.
merge_block() {
    if [ -f "$1" ]; then
        nb=$(grep -cxF "$begin_mark" "$1" || true)
        ne=$(grep -cxF "$end_mark" "$1" || true)
        if [ "$nb" -gt 1 ] || [ "$nb" -ne "$ne" ]; then
            echo "apply.sh: $1 has $nb begin and $ne end markers of the tern block; fix it by hand" >&2
            exit 1
        fi
        src_file=$1
    else
        src_file=/dev/null
    fi
    awk -v blockfile="$2" -v begin="$begin_mark" -v end="$end_mark" '
        BEGIN { while ((getline l < blockfile) > 0) block = block l "\n" }
        $0 == begin { printf "%s", block; done = 1; skip = 1; next }
        skip { if ($0 == end) skip = 0; next }
        { print; last = $0; n++ }
        END {
            if (!done) {
                if (n > 0 && last != "") print ""
                printf "%s", block
            }
        }' "$src_file" > "$3"
}

render "$here/loader.conf" "$tmp/loader.block"
render "$here/sysctl.conf" "$tmp/sysctl.block"
{ printf '%s\n' "$begin_mark"; cat "$here/login.conf.tern"; printf '%s\n' "$end_mark"; } > "$tmp/login.block"

# ---- 3. files --------------------------------------------------------------------
changed=0
# put_file NEW TARGET MODE
put_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        echo "  $2: unchanged"
        return 0
    fi
    if [ "$do_apply" -eq 0 ]; then
        if [ -f "$2" ]; then
            echo "  $2: would update (old copy kept as $2.$ts.bak):"
            diff -u "$2" "$1" | sed 's/^/      /' || true
        else
            echo "  $2: would create ($(wc -l < "$1" | tr -d ' ') lines)"
        fi
        return 0
    fi
    mkdir -p "$(dirname "$2")"
    if [ -f "$2" ]; then
        bak=$2.$ts.bak
        n=1
        while [ -e "$bak" ]; do bak=$2.$ts.$n.bak; n=$((n + 1)); done
        cp -p "$2" "$bak"
        cat "$1" > "$2"
        echo "  $2: updated (backup: $bak)"
    else
        cp "$1" "$2"
        chmod "$3" "$2"
        echo "  $2: created"
    fi
    changed=$((changed + 1))
}

echo "Files:"
loader_target=$prefix/boot/loader.conf.local
sysctl_target=$prefix/etc/sysctl.conf.local
login_target=$prefix/etc/login.conf
rcd_target=$prefix/usr/local/etc/rc.d/tern

merge_block "$loader_target" "$tmp/loader.block" "$tmp/loader.new"
put_file "$tmp/loader.new" "$loader_target" 0644
merge_block "$sysctl_target" "$tmp/sysctl.block" "$tmp/sysctl.new"
put_file "$tmp/sysctl.new" "$sysctl_target" 0644
login_changed=0
if [ -f "$login_target" ]; then
    merge_block "$login_target" "$tmp/login.block" "$tmp/login.new"
    cmp -s "$tmp/login.new" "$login_target" || login_changed=1
    put_file "$tmp/login.new" "$login_target" 0644
else
    echo "  $login_target: not found; login class not installed (see login.conf.tern)"
fi
put_file "$here/rc.d/tern" "$rcd_target" 0555
# The sample config is a starting point the operator edits: installed once,
# never replaced.
conf_target=$prefix/usr/local/etc/tern.toml
if [ -f "$conf_target" ]; then
    echo "  $conf_target: exists, left as it is (sample: $here/tern.toml)"
elif [ ! -f "$here/tern.toml" ]; then
    echo "  $conf_target: not installed, no sample at $here/tern.toml"
else
    put_file "$here/tern.toml" "$conf_target" 0640
fi
echo

# Same keys set outside our block: the assignment read last wins (loader.conf is
# read before loader.conf.local, sysctl.conf before sysctl.conf.local).
for f in "$prefix/boot/loader.conf" "$loader_target" "$prefix/etc/sysctl.conf" "$sysctl_target"; do
    [ -f "$f" ] || continue
    awk -v plan="$tmp/plan" -v begin="$begin_mark" -v end="$end_mark" '
        BEGIN { while ((getline l < plan) > 0) { split(l, f, "\t"); want[f[1]] = 1 } }
        $0 == begin { skip = 1; next }
        skip { if ($0 == end) skip = 0; next }
        /^[ \t]*#/ { next }
        {
            line = $0; eq = index(line, "="); if (eq == 0) next
            key = substr(line, 1, eq - 1); gsub(/^[ \t]+|[ \t]+$/, "", key)
            if (key in want)
                printf "note: %s is also set in %s:%d (the assignment read last wins)\n", key, FILENAME, FNR
        }' "$f"
done

# ---- 4. running system -----------------------------------------------------------
n_short=$(awk -F'\t' '$4 == "sysctl" && $6 == "short"' "$tmp/plan" | wc -l | tr -d ' ')
n_boot=$(awk -F'\t' '$4 == "loader" && $6 == "short"' "$tmp/plan" | wc -l | tr -d ' ')
if [ "$runtime" -eq 0 ] && [ "$live" -eq 0 ]; then
    echo "Runtime: root is not /, running kernel left alone."
elif [ "$runtime" -eq 0 ]; then
    echo "Runtime: --no-runtime given, running kernel left alone."
elif [ "$n_short" -eq 0 ]; then
    echo "Runtime: all runtime values already ok."
elif [ "$do_apply" -eq 0 ]; then
    echo "Runtime: would set $n_short value(s) with sysctl (see 'set now' above)."
else
    echo "Runtime:"
    while IFS="$TAB" read -r key _mode _rec src _cur status merged; do
        if [ "$src" != sysctl ] || [ "$status" != short ]; then continue; fi
        if tern_sysctl_set "$key" "$merged" >/dev/null 2>&1; then
            echo "  $key = $merged"
        else
            echo "  $key: could not set now (e.g. inside a jail); the file applies it at boot"
        fi
    done < "$tmp/plan"
fi
if [ "$live" -eq 1 ] && [ "$do_apply" -eq 1 ] && [ "$login_changed" -eq 1 ]; then
    cap_mkdb "$login_target" && echo "login.conf: cap_mkdb done"
fi
[ "$n_boot" -eq 0 ] || echo "Boot: $n_boot loader tunable(s) below the recommendation take effect after a reboot."

# ---- 5. reminders ----------------------------------------------------------------
if ! grep -q '^tern:' "$prefix/etc/passwd" 2>/dev/null; then
    echo "hint: no user 'tern': pw useradd tern -L tern -d /nonexistent -s /usr/sbin/nologin"
fi
if [ -f "$prefix/usr/local/etc/tern.toml" ]; then
    echo "hint: the server reads $prefix/usr/local/etc/tern.toml as user tern: chgrp tern it (mode 0640), set token_secret"
else
    echo "hint: rc.d/tern expects $prefix/usr/local/etc/tern.toml"
fi
echo "hint: enable with: sysrc tern_enable=YES"
echo
if [ "$do_apply" -eq 1 ]; then
    echo "Done: $changed file(s) changed. Verify with: $here/check.sh"
else
    if [ "$live" -eq 1 ]; then again="$0 --apply"; else again="$0 --apply --root $root"; fi
    echo "Dry run only. Apply with: $again"
fi
