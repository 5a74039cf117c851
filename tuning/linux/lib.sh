# shellcheck shell=bash
# tuning/linux/lib.sh -- helpers shared by apply.sh and check.sh (sourced, not run).
#
# The fragment 99-tern.conf is the single source of truth: both scripts read the
# keys, recommended values and comparison modes ("#@ min|max|exact") from it.

# Where current values are read from. Tests point this at a fake tree.
TERN_PROC_SYS=${TERN_PROC_SYS:-/proc/sys}

# Print one tab-separated record per setting of a sysctl-style fragment:
#   key <TAB> mode <TAB> recommended value <TAB> dash (1 = may be absent)
# Values are whitespace-normalised; surrounding double quotes are removed.
tern_records() {
    awk '
        BEGIN { OFS = "\t"; mode = "" }
        /^[ \t]*#@[ \t]*(min|max|exact)[ \t]*$/ {
            m = $0; gsub(/[ \t#@]/, "", m); mode = m; next
        }
        /^[ \t]*$/ || /^[ \t]*[#;]/ { next }
        {
            line = $0; dash = 0
            sub(/^[ \t]+/, "", line)
            if (substr(line, 1, 1) == "-") { dash = 1; line = substr(line, 2) }
            eq = index(line, "="); if (eq == 0) next
            key = substr(line, 1, eq - 1); val = substr(line, eq + 1)
            gsub(/^[ \t]+|[ \t]+$/, "", key); gsub(/^[ \t]+|[ \t]+$/, "", val)
            if (val ~ /^".*"$/) val = substr(val, 2, length(val) - 2)
            gsub(/[ \t]+/, " ", val)
            print key, (mode == "" ? "exact" : mode), val, dash
            mode = ""
        }' "$1"
}

# Current value of a sysctl key, whitespace-normalised; fails when absent.
tern_current() {
    local path="$TERN_PROC_SYS/${1//.//}"
    [ -f "$path" ] && [ -r "$path" ] || return 1
    local v
    v=$(awk '{ $1 = $1; printf "%s%s", (NR > 1 ? " " : ""), $0 }' "$path" 2>/dev/null) || return 1
    [ -n "$v" ] || return 1
    printf '%s\n' "$v"
}

# tern_compare MODE CURRENT RECOMMENDED
# Prints "status<TAB>merged": status is ok or short; merged is the value to keep:
# for min/max the element-wise better of current and recommended (so nothing is
# ever made worse), for exact the recommended value. Numbers are compared as
# numbers, but the output reuses the original digits (no float rounding).
tern_compare() {
    awk -v mode="$1" -v cur="$2" -v rec="$3" 'BEGIN {
        nc = split(cur, c, " "); nr = split(rec, r, " ")
        numeric = (nc == nr)
        for (i = 1; i <= nr && numeric; i++)
            if (c[i] !~ /^-?[0-9]+$/ || r[i] !~ /^-?[0-9]+$/) numeric = 0
        if (mode == "exact" || !numeric) {
            printf "%s\t%s\n", (cur == rec ? "ok" : "short"), rec; exit
        }
        st = "ok"; out = ""
        for (i = 1; i <= nr; i++) {
            a = c[i] + 0; b = r[i] + 0; v = c[i]
            if ((mode == "min" && a < b) || (mode == "max" && a > b)) { st = "short"; v = r[i] }
            out = out (i > 1 ? " " : "") v
        }
        printf "%s\t%s\n", st, out
    }'
}

# Name of the server process whose open-files limit check.sh reports;
# TERN_PROCESS= (empty) leaves that row out (tests, boxes without the server).
TERN_PROCESS=${TERN_PROCESS-tern}

# Soft RLIMIT_NOFILE of the running server process; fails when not running.
tern_proc_nofile() {
    local pid
    command -v pgrep >/dev/null 2>&1 || return 1
    pid=$(pgrep -x "$TERN_PROCESS" 2>/dev/null | head -n 1)
    [ -n "$pid" ] && [ -r "/proc/$pid/limits" ] || return 1
    awk -v pid="$pid" '/^Max open files/ { print $4 " (pid " pid ")"; found = 1 }
        END { exit !found }' "/proc/$pid/limits"
}

# LimitNOFILE= from a unit file (the recommended per-process limit).
tern_unit_nofile() {
    awk -F= '/^LimitNOFILE=/ { v = $2 } END { if (v == "") exit 1; print v }' "$1"
}

# Table layout shared by both scripts.
tern_row() {
    printf '%-38s %-24s %-24s %-6s %s\n' "$1" "$2" "$3" "$4" "$5"
}
