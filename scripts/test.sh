#!/usr/bin/env bash
# Runs every test layer in order, stops at the first failing one, and ends with one closing
# line that sums the layers: "make test: N passed, N failed".
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
for layer in test-core test-pg test-integration; do
    echo "==> make $layer"
    make -C "$here" --no-print-directory "$layer" 2>&1 | tee -a "$log"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        status=1
        echo "==> make $layer FAILED"
        break
    fi
done
passed=$(grep -oE '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || status=1
echo "make test: $passed passed, $failed failed"
exit "$status"
