#!/usr/bin/env bash
# sweep.sh OUTDIR RUNS DURATION RATE... : for each run and rate, one fsync
# and one memory run back to back (so background load hits both alike),
# written as OUTDIR/MODE-RATE-RUN.json; then summarize.py OUTDIR. Each run
# first waits (bounded) until no other tern-loadgen is running.
set -euo pipefail
out=$1 runs=$2 duration=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# FIRST_RUN (default 1) numbers the runs, to add runs to an earlier sweep.
for run in $(seq "${FIRST_RUN:-1}" $(( ${FIRST_RUN:-1} + runs - 1 ))); do
  for rate in "$@"; do
    for mode in fsync memory; do
      # The box is shared: wait (at most 5 min) until no other load
      # generator runs, so runs overlap other benchmarks less.
      for _ in $(seq 300); do
        pgrep -x tern-loadgen >/dev/null || break
        sleep 1
      done
      echo "$(date +%T) run $run rate $rate $mode (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
      "$here/bench.sh" "$mode" "$rate" "$duration" "$out/$mode-$rate-$run.json" || echo "  failed" >&2
    done
  done
done
"$here/summarize.py" "$out"
