#!/usr/bin/env bash
# make fuzz: every cargo-fuzz target of the crypto core for a bounded time (FUZZ_SECONDS each,
# default 60). Inputs in fuzz/regressions/<target>/ (crashes found earlier) are replayed first
# as part of the corpus. cargo-fuzz needs compiler flags of the nightly channel; this machine
# has the stable compiler only, so RUSTC_BOOTSTRAP=1 enables them on it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
seconds=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$here/fuzz"
export RUSTC_BOOTSTRAP=1
status=0
for target in envelope open admin_key redact; do
    mkdir -p "corpus/$target" "regressions/$target"
    echo "== fuzzing $target for ${seconds}s"
    log=$(mktemp)
    set +e
    cargo fuzz run "$target" "corpus/$target" "regressions/$target" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done|==[0-9]+==ERROR|thread .* panicked)" "$log" || tail -5 "$log"
    if [ "$rc" != 0 ]; then
        echo "!! $target failed (exit $rc); its input is kept in fuzz/regressions/$target"
        cp "artifacts/$target"/* "regressions/$target/" 2>/dev/null || true
        tail -30 "$log"
        status=1
    fi
    rm -f "$log"
done
exit $status
