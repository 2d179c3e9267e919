#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on the stable toolchain (no
# sanitizer) and fails if any of them finds a crash. Installs cargo-fuzz if
# it is missing. SECONDS_PER_TARGET (default 30) bounds each target;
# TARGETS (space-separated) picks a subset.
#
#   fuzz/ci.sh                          # every target, 30 s each
#   SECONDS_PER_TARGET=600 TARGETS=stack_frames fuzz/ci.sh
set -euo pipefail

cd "$(dirname "$0")"
seconds="${SECONDS_PER_TARGET:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

targets="${TARGETS:-$(cargo fuzz list)}"
cargo fuzz build -s none >&2

failed=()
for target in $targets; do
    mkdir -p "corpus/$target"
    echo "fuzz/ci.sh: $target for ${seconds}s" >&2
    log="$(mktemp)"
    # A scratch corpus first, then the committed seeds (read only for libFuzzer).
    if cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec)|^#[0-9]+ +DONE' "$log" >&2 || true
    else
        failed+=("$target")
        # The panic message and the reproducer path, without libFuzzer's noise.
        grep -vE '^ +[0-9]+: |^ +at ' "$log" | tail -40 >&2
    fi
    rm -f "$log"
done

if ((${#failed[@]})); then
    echo "fuzz/ci.sh: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/ci.sh: no crashes in $(echo $targets | wc -w) targets at ${seconds}s each" >&2
