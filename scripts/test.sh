#!/usr/bin/env bash
# Runs the test layers, stops at the first failing one, and ends with one closing line that
# sums them: "make test: N passed, N failed".
#
# MATRIX=yes (plain `make test`): the crypto core once; every layer (the #[pg_test]s and all
# integration suites) on PostgreSQL 15 (Debian's) and 18; the #[pg_test]s and the smoke suites
# on 14, 16 and 17; and last the pg_upgrade suite (15 -> 17 -> 18), when the dev builds it needs
# for 17 and 18 are already installed. Otherwise (`make test PG=N`): every layer on PG (with
# PG=15, the pg_upgrade suite too). The matrix ends with the FIPS build on 15 (make test-fips;
# FIPS_IN_TEST=no leaves it out). Both run test-citus (a Citus coordinator and two workers) on
# 15 (or PG) when Citus can be built there, and say so when it cannot (CITUS_IN_TEST=no leaves
# it out). Each step must run at least one test.
set -uo pipefail
# No incremental compilation caches: they added about 3 GB to the target directories, and a
# test run builds each configuration once.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
here=$(cd "$(dirname "$0")/.." && pwd)
# The matrix's builds (target/, about 6 GB) and clusters (/tmp/pg_cellcrypt-it, about 0.5 GB)
# took about 6.5 GB at the last full run; say so up front when the disk has less room (a full
# disk fails a build midway, "No space left on device").
low_disk() { # <directory> <GB wanted>
    local free_kb
    free_kb=$(df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print $4}')
    case "$free_kb" in '' | *[!0-9]*) return ;; esac
    [ "$free_kb" -ge $(($2 * 1024 * 1024)) ] ||
        echo "==> warning: $((free_kb / 1024)) MB free in $1; a full make test needs about $2 GB there"
}
low_disk "$here" 8
low_disk /tmp 2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Adds `test-citus PG=$1` when Citus can be built for that major here (or is installed);
# otherwise says why it is left out.
citus_step() {
    local major=$1 pg_config
    if [ "$major" = 15 ]; then pg_config=/usr/lib/postgresql/15/bin/pg_config; else pg_config="$("$here/scripts/pg-major.sh" "$major" 2>/dev/null)/bin/pg_config"; fi
    if [ "${CITUS_IN_TEST:-yes}" != no ] && [ -x "$pg_config" ] && "$here/scripts/citus.sh" --check "$major" "$pg_config" >/dev/null 2>"$log.citus"; then
        steps+=("test-citus PG=$major")
    else
        echo "==> make test-citus PG=$major: left out ($(cat "$log.citus" 2>/dev/null || true)${CITUS_IN_TEST:+ CITUS_IN_TEST=$CITUS_IN_TEST})"
    fi
    rm -f "$log.citus"
}
if [ "${MATRIX:-}" = yes ]; then
    steps=("test-core" "test-pg PG=15" "test-integration PG=15 WITH_UPGRADE=no")
    # Citus (a coordinator and two workers) on 15, when Citus can be built here.
    citus_step 15
    steps+=("test-pg PG=18" "test-integration PG=18")
    for major in 14 16 17; do steps+=("test-pg PG=$major" "test-smoke PG=$major"); done
    steps+=("test-upgrade")
    # The FIPS build (AWS-LC's FIPS module) on 15: its core, #[pg_test]s and suites.
    [ "${FIPS_IN_TEST:-yes}" = no ] || steps+=("test-fips PG=15")
else
    steps=("test-core" "test-pg PG=${PG:-15}" "test-integration PG=${PG:-15}")
    citus_step "${PG:-15}"
fi
start=$SECONDS
for step in "${steps[@]}"; do
    t0=$SECONDS
    echo "==> make $step"
    step_log=$(mktemp)
    # shellcheck disable=SC2086 # a step is a target and its PG=N
    make -C "$here" --no-print-directory $step 2>&1 | tee "$step_log"
    rc=${PIPESTATUS[0]}
    cat "$step_log" >>"$log"
    ran=$(grep -oE '^test result: [a-zA-Z]+\. [0-9]+ passed' "$step_log" | awk '{s += $4} END {print s + 0}')
    rm -f "$step_log"
    if [ "$rc" -ne 0 ] || [ "$ran" -eq 0 ]; then
        status=1
        echo "==> make $step FAILED ($([ "$rc" -ne 0 ] && echo "exit $rc" || echo "no test ran"))"
        break
    fi
    echo "==> make $step: $ran passed, $((SECONDS - t0)) s"
done
passed=$(grep -oE '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || status=1
echo "make test: $passed passed, $failed failed ($((SECONDS - start)) s)"
exit "$status"
