#!/usr/bin/env bash
# tuning/linux/apply.sh -- make a Linux box ready for millions of Tern connections.
#
#   apply.sh                  dry run: show current -> recommended and the file
#                             changes it would make; changes nothing
#   apply.sh --apply          write the files below (backing up any file it
#                             changes as FILE.YYYYmmdd-HHMMSS.bak) and, when the
#                             root is /, set the short values now via /proc/sys
#   --root DIR                write the files under DIR instead of / (tests,
#                             image builds); the running kernel is then left alone
#   --no-runtime              write the files but do not touch running values
#
# Files (paths relative to the root):
#   etc/sysctl.d/99-tern.conf              from 99-tern.conf
#   etc/security/limits.d/99-tern.conf     from limits.conf
#   etc/systemd/system/tern.service        from tern.service (not enabled)
#   etc/tern/tern.toml                     from tern.toml, only if absent (never
#                                          overwritten), mode 0640, group tern
# and the system user "tern" if missing (useradd --system; on --root DIR only
# when DIR/etc/passwd exists, with useradd --root DIR).
#
# Idempotent: a second run finds nothing to change. A value already better than
# the recommendation (larger for "min" keys, smaller for "max" keys) is kept,
# never lowered: the installed fragment carries this box's value for that key.
# Environment: TERN_PROC_SYS=DIR reads current values from DIR (tests).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

do_apply=0 root=/ runtime=1
usage() { sed -n '2,27s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --apply) do_apply=1 ;;
        --root) [ $# -ge 2 ] || { echo "apply.sh: --root needs a directory" >&2; exit 2; }
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
    if [ "$do_apply" -eq 1 ] && [ "$(uname -s)" != Linux ]; then
        echo "apply.sh: this is not Linux; use tuning/freebsd/apply.sh or --root DIR" >&2
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

fragment=$here/99-tern.conf
sysctl_target=$prefix/etc/sysctl.d/99-tern.conf

if [ "$do_apply" -eq 1 ]; then mode_word="apply"; else mode_word="dry run (nothing is changed; add --apply)"; fi
echo "Tern tuning for Linux: $mode_word"
echo "root: $root_abs   current values from: $TERN_PROC_SYS   runtime changes: $([ "$runtime" -eq 1 ] && echo yes || echo no)"
echo

# ---- 1. current -> recommended, and what the installed fragment will say ------
# plan.tsv: key, mode, recommended, dash, current|-, status, merged
: > "$tmp/plan.tsv"
tern_row KEY CURRENT RECOMMENDED MODE ACTION
while IFS=$'\t' read -r key mode rec dash; do
    if cur=$(tern_current "$key"); then
        IFS=$'\t' read -r status merged < <(tern_compare "$mode" "$cur" "$rec")
        if [ "$status" = short ]; then
            if [ "$runtime" -eq 1 ]; then action="set now + file"; else action="file only"; fi
            [ "$merged" = "$rec" ] || action="$action, as: $merged"
        elif [ "$merged" != "$rec" ]; then
            action="ok, keeps current"
        else
            action=ok
        fi
    else
        cur=- status=absent merged=$rec
        if [ "$dash" = 1 ]; then action="absent (line kept, optional)"; else action="absent (line commented out)"; fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$mode" "$rec" "$dash" "$cur" "$status" "$merged" >> "$tmp/plan.tsv"
    tern_row "$key" "$cur" "$rec" "$mode" "$action"
done < <(tern_records "$fragment")
echo

# tcp_mem is sized for a 64 GiB box; say so when it is too big for this one.
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null || true)
high=$(awk -F'\t' '$1 == "net.ipv4.tcp_mem" && $6 == "short" { n = split($3, v, " "); print v[n] }' "$tmp/plan.tsv")
if [ -n "$mem_kb" ] && [ -n "$high" ] && [ $((high * 4)) -gt $((mem_kb / 4)) ]; then
    echo "warning: net.ipv4.tcp_mem high = $((high * 4 / 1024)) MiB is more than a quarter of this"
    echo "         box's RAM ($((mem_kb / 1024)) MiB); 99-tern.conf is sized for 64 GiB. Scale it"
    echo "         (high ~ 12% of RAM) before applying on this box."
    echo
fi

# ---- 2. render the installed sysctl fragment ------------------------------------
# Same text as 99-tern.conf; for a key where this box is already better its value
# is kept (with a note), a missing key without "-" is commented out.
awk -v plan="$tmp/plan.tsv" '
    BEGIN {
        while ((getline l < plan) > 0) {
            split(l, f, "\t"); merged[f[1]] = f[7]; status[f[1]] = f[6]; rec[f[1]] = f[3]
        }
    }
    /^[ \t]*[#;]/ || /^[ \t]*$/ { print; next }
    {
        line = $0; sub(/^[ \t]+/, "", line); dash = ""
        if (substr(line, 1, 1) == "-") { dash = "-"; line = substr(line, 2) }
        eq = index(line, "="); key = substr(line, 1, eq - 1); gsub(/[ \t]+$/, "", key)
        if (!(key in merged)) { print; next }
        if (status[key] == "absent" && dash == "") {
            print "# apply.sh: " key " does not exist on this kernel; left commented out."
            print "#" key " = " rec[key]
        } else {
            if (merged[key] != rec[key])
                print "# apply.sh: kept the running value where it was already better (shipped: " rec[key] ")."
            print dash key " = " merged[key]
        }
    }' "$fragment" > "$tmp/99-tern.conf"

# ---- 3. the service user -------------------------------------------------------------
# Created before the files so the config can be given to its group.
echo "User:"
if grep -q '^tern:' "$prefix/etc/passwd" 2>/dev/null; then
    echo "  tern: exists"
elif [ "$do_apply" -eq 0 ]; then
    echo "  tern: would create (useradd --system --user-group, no home, no login shell)"
elif [ "$(id -u)" -eq 0 ] && command -v useradd >/dev/null 2>&1 \
    && { [ "$live" -eq 1 ] || [ -f "$prefix/etc/passwd" ]; }; then
    root_opt=()
    [ "$live" -eq 1 ] || root_opt=(--root "$root_abs")
    useradd "${root_opt[@]}" --system --user-group --no-create-home \
        --home-dir /var/lib/tern --shell /usr/sbin/nologin tern
    echo "  tern: created"
else
    echo "  tern: not created (needs root, useradd and $prefix/etc/passwd); create it with:"
    echo "      useradd --system --user-group --no-create-home --home-dir /var/lib/tern --shell /usr/sbin/nologin tern"
fi
echo

# ---- 4. files ----------------------------------------------------------------------
changed=0
# put_file NEW TARGET MODE
put_file() {
    local new=$1 target=$2 perm=$3 bak
    if [ -f "$target" ] && cmp -s "$new" "$target"; then
        echo "  $target: unchanged"
        return 0
    fi
    if [ "$do_apply" -eq 0 ]; then
        if [ -f "$target" ]; then
            echo "  $target: would update (old copy kept as $target.$ts.bak):"
            diff -u "$target" "$new" | sed 's/^/      /' || true
        else
            echo "  $target: would create ($(wc -l < "$new") lines)"
        fi
        return 0
    fi
    mkdir -p "$(dirname "$target")"
    if [ -f "$target" ]; then
        bak=$target.$ts.bak
        n=1
        while [ -e "$bak" ]; do bak=$target.$ts.$n.bak; n=$((n + 1)); done
        cp -p "$target" "$bak"
        cat "$new" > "$target"
        echo "  $target: updated (backup: $bak)"
    else
        cp "$new" "$target"
        chmod "$perm" "$target"
        echo "  $target: created"
    fi
    changed=$((changed + 1))
}

echo "Files:"
put_file "$tmp/99-tern.conf" "$sysctl_target" 0644
put_file "$here/limits.conf" "$prefix/etc/security/limits.d/99-tern.conf" 0644
unit_target=$prefix/etc/systemd/system/tern.service
unit_before=$(cat "$unit_target" 2>/dev/null || true)
put_file "$here/tern.service" "$unit_target" 0644
# The sample configuration is the operator's to edit: installed once, never
# replaced, readable by root and the tern group only (it holds token_secret).
conf_target=$prefix/etc/tern/tern.toml
if [ -e "$conf_target" ]; then
    echo "  $conf_target: exists, left alone (sample: $here/tern.toml)"
elif [ "$do_apply" -eq 0 ]; then
    echo "  $conf_target: would create from the sample tern.toml (mode 0640, group tern)"
else
    mkdir -p "$(dirname "$conf_target")"
    cp "$here/tern.toml" "$conf_target"
    chmod 0640 "$conf_target"
    gid=$(awk -F: '$1 == "tern" { print $3 }' "$prefix/etc/group" 2>/dev/null || true)
    if [ -n "$gid" ]; then chgrp "$gid" "$conf_target"; fi
    echo "  $conf_target: created from the sample; set token_secret and listen in it"
    changed=$((changed + 1))
fi
echo

# Other sysctl files that set the same keys: the file read last wins.
others=()
for f in "$prefix"/etc/sysctl.conf "$prefix"/etc/sysctl.d/*.conf "$prefix"/run/sysctl.d/*.conf \
         "$prefix"/usr/local/lib/sysctl.d/*.conf "$prefix"/usr/lib/sysctl.d/*.conf "$prefix"/lib/sysctl.d/*.conf; do
    if [ -f "$f" ] && [ "$f" != "$sysctl_target" ]; then others+=("$f"); fi
done
if [ "${#others[@]}" -gt 0 ]; then
    awk -v plan="$tmp/plan.tsv" '
        BEGIN { while ((getline l < plan) > 0) { split(l, f, "\t"); want[f[1]] = 1 } }
        /^[ \t]*[#;]/ { next }
        {
            line = $0; sub(/^[ \t]*-?/, "", line); eq = index(line, "="); if (eq == 0) next
            key = substr(line, 1, eq - 1); gsub(/^[ \t]+|[ \t]+$/, "", key)
            if (key in want)
                printf "note: %s is also set in %s:%d (the file read last wins)\n", key, FILENAME, FNR
        }' "${others[@]}"
fi

# ---- 5. running kernel ---------------------------------------------------------------
n_short=$(awk -F'\t' '$6 == "short"' "$tmp/plan.tsv" | wc -l | tr -d ' ')
if [ "$runtime" -eq 0 ] && [ "$live" -eq 0 ]; then
    echo "Runtime: root is not /, running kernel left alone."
elif [ "$runtime" -eq 0 ]; then
    echo "Runtime: --no-runtime given, running kernel left alone."
elif [ "$n_short" -eq 0 ]; then
    echo "Runtime: all values already ok."
elif [ "$do_apply" -eq 0 ]; then
    echo "Runtime: would set $n_short value(s) in $TERN_PROC_SYS (see 'set now' above)."
else
    echo "Runtime:"
    while IFS=$'\t' read -r key _mode _rec _dash _cur status merged; do
        [ "$status" = short ] || continue
        if printf '%s\n' "$merged" > "$TERN_PROC_SYS/${key//.//}" 2>/dev/null; then
            echo "  $key = $merged"
        else
            echo "  $key: could not set (read-only here, e.g. a container or a" \
                 "non-initial network namespace); the file applies it at boot"
        fi
    done < "$tmp/plan.tsv"
fi

# ---- 6. reminders ----------------------------------------------------------------------
# limits.d and LimitNOFILE ask for more than fs.nr_open allows: logins as tern are
# refused and the service does not start until the kernel value is raised.
if [ "$live" -eq 1 ] && [ "$do_apply" -eq 1 ]; then
    nofile=$(tern_unit_nofile "$here/tern.service" || echo 0)
    nr_open=$(tern_current fs.nr_open || echo 0)
    if [ "$nr_open" -lt "$nofile" ]; then
        echo "warning: fs.nr_open is $nr_open, below the $nofile open files tern.service and"
        echo "         limits.d ask for: the service cannot start until it is raised."
    fi
fi
if [ "$do_apply" -eq 1 ] && [ "$live" -eq 1 ] && [ "$unit_before" != "$(cat "$unit_target")" ] \
    && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload && echo "systemd: daemon-reload done (tern.service not enabled or started)"
fi
echo
if [ "$do_apply" -eq 1 ]; then
    echo "Done: $changed file(s) changed. Verify with: $here/check.sh"
else
    if [ "$live" -eq 1 ]; then again="$0 --apply"; else again="$0 --apply --root $root"; fi
    echo "Dry run only. Apply with: $again"
fi
