#!/bin/sh
# tuning/freebsd/check.sh -- is this FreeBSD box tuned for millions of Tern connections?
#
# Prints current vs recommended for every key of loader.conf and sysctl.conf
# (plus the open-files limit of a running tern process) and exits 1 when any
# value is short.
#
#   check.sh                 exit 0 when everything is ok, 1 when something is short
#   check.sh --report-only   print the same table, always exit 0 (CI, untuned boxes)
#
# Comparison: "min" keys must be >= the recommendation, "max" keys <=, "exact"
# keys equal; "info" rows are shown and never count. Keys this kernel does not
# have are "absent" and never count as short. Values come from `sysctl -n`.
# Read-only: needs no privileges and changes nothing.
#
# Environment: TERN_PROCESS=NAME checks the open-files limit of process NAME
# (default tern, empty: no process row).
set -u

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

report_only=0
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --report-only) report_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

for f in loader.conf sysctl.conf; do
    [ -r "$here/$f" ] || { echo "check.sh: cannot read $here/$f" >&2; exit 2; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tern-check.XXXXXX") || exit 2
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
{ tern_records "$here/loader.conf" loader; tern_records "$here/sysctl.conf" sysctl; } > "$tmp/records"

n_ok=0 n_short=0 n_absent=0
count() {
    case $1 in
        ok) n_ok=$((n_ok + 1)) ;;
        SHORT) n_short=$((n_short + 1)) ;;
        absent) n_absent=$((n_absent + 1)) ;;
    esac
}

echo "Tern kernel tuning check (FreeBSD), values from sysctl -n"
echo
tern_row KEY CURRENT RECOMMENDED MODE STATUS
while IFS="$TAB" read -r key mode rec _src; do
    if cur=$(tern_current "$key"); then
        if [ "$mode" = info ]; then
            status=info
        else
            status=$(tern_compare "$mode" "$cur" "$rec" | cut -f1)
            [ "$status" = short ] && status=SHORT
        fi
    else
        cur="-"
        if [ "$mode" = info ]; then status=info; else status=absent; fi
    fi
    tern_row "$key" "$cur" "$rec" "$mode" "$status"
    count "$status"
done < "$tmp/records"

# The limit that really binds: the open-files limit of the running daemon.
if [ -n "$TERN_PROCESS" ] && want=$(tern_class_openfiles "$here/login.conf.tern"); then
    if cur=$(tern_proc_nofile); then
        status=$(tern_compare min "${cur%% *}" "$want" | cut -f1)
        [ "$status" = short ] && status=SHORT
    else
        cur="(not running)" status=absent
    fi
    tern_row "process $TERN_PROCESS: openfiles" "$cur" "$want" min "$status"
    count "$status"
fi

echo
echo "$n_ok ok, $n_short short, $n_absent absent"
echo "(loader.conf keys change only at boot: after apply.sh, reboot before re-checking them)"
if [ "$n_short" -gt 0 ]; then
    echo "Fix with: $here/apply.sh (dry run), then $here/apply.sh --apply as root."
    [ "$report_only" -eq 1 ] && exit 0
    exit 1
fi
exit 0
