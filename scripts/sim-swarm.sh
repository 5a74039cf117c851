#!/usr/bin/env bash
# Swarm run of the deterministic simulator (docs/SIMULATION.md): one
# tern-sim per core, each on its own range of seeds (every seed picks its
# own fault mix), bounded by SIM_SEEDS seeds in all (default 1000) and
# SIM_SECONDS real seconds per worker (default 60), whichever ends first.
# SIM_FIRST is the first seed (default: the clock), SIM_WORKERS the number
# of workers (default: nproc); further arguments go to tern-sim (e.g.
# --clients 1000). Writes results/sim/swarm-<first>.log (SIM_OUT: another
# directory) with every failure, its replay command and a summary line per
# worker. Exits non-zero when a seed failed.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=${SIM_SEEDS:-1000}
seconds=${SIM_SECONDS:-60}
first=${SIM_FIRST:-$(date +%s)}
workers=${SIM_WORKERS:-$(nproc)}
out=${SIM_OUT:-results/sim}

cargo build --release --quiet --bin tern-sim

# The simulated disk's files are real: a tmpfs when there is one.
parent=/tmp
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    parent=/dev/shm
fi
scratch=$(mktemp -d "$parent/tern-sim.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

per=$(( (seeds + workers - 1) / workers ))
pids=()
for w in $(seq 0 $((workers - 1))); do
    TMPDIR=$scratch target/release/tern-sim --seeds "$per" --first $((first + w * per)) \
        --time-limit-s "$seconds" --quiet --keep-going "$@" >"$scratch/worker-$w.log" 2>&1 &
    pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done

mkdir -p "$out"
log=$out/swarm-$first.log
{
    echo "sim-swarm: first seed $first, $workers workers, at most $seeds seeds and $seconds s; args: $*"
    cat "$scratch"/worker-*.log
} >"$log"
awk '/^summary:/ { ran += $2; failed += $5 }
     END { printf "sim-swarm: %d seeds run, %d failed\n", ran, failed }' "$log" | tee -a "$log"
grep '^replay:' "$log" || true
exit "$status"
