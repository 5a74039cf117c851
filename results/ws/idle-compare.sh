#!/usr/bin/env bash
# Server userspace bytes per idle, logged-in connection, raw TCP against
# WebSocket, on a backend: RUNS fresh `scripts/capacity.sh` runs of each
# transport (alternating), one step of CONNS connections each, in a network
# namespace of the run, the load generator at most 1,500 logins in flight per
# worker (on a busy box more would wait past the server's login timeout);
# prints one line per run with the headline figure.
# Usage (from the repository root, after
# `cargo build --release -p tern -p tern-loadgen`):
#   results/ws/idle-compare.sh uring|poll CONNS RUNS OUTDIR
set -euo pipefail
io=$1 conns=$2 runs=$3 out=$4
mkdir -p "$out"
for run in $(seq 1 "$runs"); do
    for transport in tcp ws; do
        dir="$out/$io-$transport-$conns-$run"
        ws=()
        [ "$transport" = ws ] && ws=(--ws)
        timeout 900 scripts/capacity.sh --io "$io" --netns "${ws[@]}" --target "$conns" --steps "$conns" \
            --chat-runs 0 --idle-secs 5 --quiet-wait-secs 0 --mem-floor-gib 2 --no-build \
            --lg-arg --inflight-max=1500 \
            --out "$dir" >"$dir.log" 2>&1 || true
        b=$(sed -n 's/.*Server userspace per idle connection: \*\*\([0-9,]*\) B\*\*.*/\1/p' "$dir/summary.md" 2>/dev/null)
        held=$(sed -n 's/.*Largest number of logged-in idle connections held: \*\*\([0-9,]*\)\*\*.*/\1/p' "$dir/summary.md" 2>/dev/null)
        echo "io=$io transport=$transport conns=$conns run=$run held=${held:-?} server_bytes_per_conn=${b:-?}"
    done
done
