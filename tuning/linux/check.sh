#!/usr/bin/env bash
# tuning/linux/check.sh -- is this Linux box tuned for millions of Tern connections?
#
# Prints current vs recommended for every key of 99-tern.conf (plus the open-files
# limit of a running tern process) and exits 1 when any value is short.
#
#   check.sh                 exit 0 when everything is ok, 1 when something is short
#   check.sh --report-only   print the same table, always exit 0 (CI, untuned boxes)
#
# Comparison: "min" keys must be >= the recommendation (element-wise for
# multi-value keys such as tcp_mem), "max" keys <=, "exact" keys equal. Keys that
# do not exist on this kernel (e.g. conntrack not loaded) are "absent" and never
# count as short. Read-only: needs no privileges and changes nothing.
#
# Environment: TERN_PROC_SYS=DIR reads values from DIR instead of /proc/sys;
# TERN_PROCESS=NAME checks the open-files limit of process NAME (default tern,
# empty: no process row).
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

fragment=$here/99-tern.conf
[ -r "$fragment" ] || { echo "check.sh: cannot read $fragment" >&2; exit 2; }

n_ok=0 n_short=0 n_absent=0
count() {
    case $1 in
        ok) n_ok=$((n_ok + 1)) ;;
        SHORT) n_short=$((n_short + 1)) ;;
        absent) n_absent=$((n_absent + 1)) ;;
    esac
}

echo "Tern kernel tuning check (Linux), values from $TERN_PROC_SYS"
echo
tern_row KEY CURRENT RECOMMENDED MODE STATUS
while IFS=$'\t' read -r key mode rec _dash; do
    if cur=$(tern_current "$key"); then
        status=$(tern_compare "$mode" "$cur" "$rec" | cut -f1)
        [ "$status" = short ] && status=SHORT
    else
        cur="-" status=absent
    fi
    tern_row "$key" "$cur" "$rec" "$mode" "$status"
    count "$status"
done < <(tern_records "$fragment")

# The limit that really binds: RLIMIT_NOFILE of the running daemon.
if [ -n "$TERN_PROCESS" ] && want=$(tern_unit_nofile "$here/tern.service"); then
    if cur=$(tern_proc_nofile); then
        status=$(tern_compare min "${cur%% *}" "$want" | cut -f1)
        [ "$status" = short ] && status=SHORT
    else
        cur="(not running)" status=absent
    fi
    tern_row "process $TERN_PROCESS: open files" "$cur" "$want" min "$status"
    count "$status"
fi

echo
echo "$n_ok ok, $n_short short, $n_absent absent"
if [ "$n_short" -gt 0 ]; then
    echo "Fix with: $here/apply.sh (dry run), then $here/apply.sh --apply as root."
    [ "$report_only" -eq 1 ] && exit 0
    exit 1
fi
exit 0
