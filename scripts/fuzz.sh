#!/usr/bin/env bash
# Short, bounded fuzz runs (CI): builds the cargo-fuzz targets in fuzz/ once,
# then runs each for FUZZ_SECONDS seconds (default 30) or FUZZ_RUNS
# executions (default 100000), whichever comes first, starting from the
# committed seeds: with six targets, at most 3 minutes after the build. Installs the nightly toolchain and cargo-fuzz if missing.
# Exits non-zero on the first crash and names the reproducer.
# Long runs: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-30}
runs=${FUZZ_RUNS:-100000}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# The store targets write files for every input: a tmpfs when there is one.
parent=/tmp
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    parent=/dev/shm
fi
scratch=$(mktemp -d "$parent/tern-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

# No AddressSanitizer (safe Rust, faster runs); debug assertions and
# overflow checks on, so the code's own asserts are checked too.
flags=(--sanitizer none --debug-assertions)
cargo +nightly fuzz build "${flags[@]}"

for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    log=$scratch/$target.log
    if ! cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -runs="$runs" -timeout=25 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    echo "fuzz: $target: $(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)"
done
