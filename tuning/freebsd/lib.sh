# shellcheck shell=sh
# tuning/freebsd/lib.sh -- helpers shared by apply.sh and check.sh (sourced, POSIX sh).
#
# The fragments loader.conf and sysctl.conf are the single source of truth: both
# scripts read keys, recommended values and comparison modes ("#@ min|max|exact",
# "#@info key=value") from them.

# Used by the scripts that source this file.
# shellcheck disable=SC2034
TAB=$(printf '\t')

# Print one tab-separated record per setting of a fragment:
#   key <TAB> mode <TAB> recommended value <TAB> source
# mode is min, max, exact or info; source is the fragment's tag (loader|sysctl).
tern_records() {
    awk -v src="$2" '
        BEGIN { OFS = "\t"; mode = "" }
        /^[ \t]*#@[ \t]*info[ \t]/ {
            line = $0; sub(/^[ \t]*#@[ \t]*info[ \t]+/, "", line)
            eq = index(line, "="); if (eq == 0) next
            key = substr(line, 1, eq - 1); val = substr(line, eq + 1)
            gsub(/^[ \t]+|[ \t]+$/, "", key); gsub(/^[ \t]+|[ \t]+$/, "", val)
            print key, "info", val, src; next
        }
        /^[ \t]*#@[ \t]*(min|max|exact)[ \t]*$/ {
            m = $0; gsub(/[ \t#@]/, "", m); mode = m; next
        }
        /^[ \t]*$/ || /^[ \t]*#/ { next }
        {
            line = $0; sub(/^[ \t]+/, "", line)
            eq = index(line, "="); if (eq == 0) next
            key = substr(line, 1, eq - 1); val = substr(line, eq + 1)
            gsub(/^[ \t]+|[ \t]+$/, "", key); gsub(/^[ \t]+|[ \t]+$/, "", val)
            if (val ~ /^".*"$/) val = substr(val, 2, length(val) - 2)
            gsub(/[ \t]+/, " ", val)
            print key, (mode == "" ? "exact" : mode), val, src
            mode = ""
        }' "$1"
}

# tern_sysctl_set KEY VALUE: set a runtime sysctl now (apply.sh --apply on /).
# Fails for a read-only tunable (loader.conf only), an unknown oid, or inside a
# jail; the caller says so and the file applies it at the next boot.
tern_sysctl_set() {
    sysctl "$1=$2"
}

# Current value of a sysctl, whitespace-normalised; fails when the oid is absent.
tern_current() {
    _v=$(sysctl -n "$1" 2>/dev/null) || return 1
    _v=$(printf '%s\n' "$_v" | awk '{ $1 = $1; printf "%s%s", (NR > 1 ? " " : ""), $0 }')
    [ -n "$_v" ] || return 1
    printf '%s\n' "$_v"
}

# tern_compare MODE CURRENT RECOMMENDED
# Prints "status<TAB>merged": status is ok or short (info: always ok); merged is
# the value to keep: for min/max the better of current and recommended (nothing
# is ever made worse), for exact the recommended value. Numbers compare as
# numbers; the output reuses the original digits.
tern_compare() {
    awk -v mode="$1" -v cur="$2" -v rec="$3" 'BEGIN {
        if (mode == "info") { printf "ok\t%s\n", rec; exit }
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

# Soft open-files limit of the running server process; fails when not running.
tern_proc_nofile() {
    command -v pgrep >/dev/null 2>&1 || return 1
    _pid=$(pgrep -x "$TERN_PROCESS" 2>/dev/null | head -n 1)
    [ -n "$_pid" ] || return 1
    command -v procstat >/dev/null 2>&1 || return 1
    procstat -l "$_pid" 2>/dev/null |
        awk -v pid="$_pid" '$3 == "openfiles" { print $4 " (pid " pid ")"; found = 1 }
            END { exit !found }'
}

# openfiles= of the login class shipped in login.conf.tern.
tern_class_openfiles() {
    awk -F: '{ for (i = 1; i <= NF; i++) if ($i ~ /^openfiles=/) { sub(/^openfiles=/, "", $i); v = $i } }
        END { if (v == "") exit 1; print v }' "$1"
}

tern_row() {
    printf '%-38s %-22s %-22s %-6s %s\n' "$1" "$2" "$3" "$4" "$5"
}
