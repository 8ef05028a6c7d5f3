#!/usr/bin/env bash
# Instruction-level profiles of the hot paths with valgrind --tool=callgrind, run by make bench.
#
# Each case runs in a single-user backend (`postgres --single`) under callgrind, after a warm-up
# query that loads the key (so Argon2id and catalog lookups are not in the profile). Callgrind
# dumps a profile part at the end of every executor run; the last part is the measured query
# alone. Prints, per case, the functions that execute the most instructions, and writes the
# same to CALLGRIND_OUT (default bench/callgrind.md).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${CALLGRIND_DIR:-/tmp/pg_cellcrypt-callgrind}
port=${CALLGRIND_PORT:-55462}
out=${CALLGRIND_OUT:-$here/bench/callgrind.md}
top=${CALLGRIND_TOP:-12}
bin=/usr/lib/postgresql/15/bin

if ! command -v valgrind >/dev/null; then
    echo "callgrind: installing valgrind"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

"$here/scripts/cluster.sh" start "$dir" "$port" "jit = off" "max_parallel_workers_per_gather = 0" >/dev/null
trap '"$here/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true' EXIT
q() { psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres "$@"; }
q -c "CREATE EXTENSION pg_cellcrypt" \
  -c "CREATE TABLE big (c encrypted_bytea); CREATE TABLE small (c encrypted_text); CREATE TABLE small_plain (c text)" \
  -c "INSERT INTO big SELECT decode(repeat(md5(g::text), 2048), 'hex') FROM generate_series(1, 200) g" \
  -c "INSERT INTO small_plain SELECT repeat(md5(g::text), 3) || 'abcd' FROM generate_series(1, 20000) g" \
  -c "INSERT INTO small SELECT c FROM small_plain" -c "CHECKPOINT"
runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null

PROFILED=()
# profile NAME SQL: the top functions by instructions executed for SQL, after a warm-up.
profile() {
    local name=$1 sql=$2 base="$dir/cg.${#PROFILED[@]}"
    PROFILED+=("$1")
    rm -f "$base".*
    printf '%s\n' "SELECT decrypt(c) FROM small LIMIT 1" "$sql" |
        (cd "$dir" && runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$base.%p" --compress-strings=no --compress-pos=no \
            --dump-after=standard_ExecutorRun "$bin/postgres" --single -D "$dir/data" postgres >/dev/null 2>&1)
    local last
    last=$(ls -v "$base".* | tail -1)
    # Self cost per function, read from the profile itself (callgrind_annotate misreads the
    # parts that --dump-after writes): a cost line after `calls=` is the callee's inclusive
    # cost and not the caller's own.
    local selfcost
    selfcost=$(awk '
        /^fn=/ { fn = substr($0, 4); next }
        /^calls=/ { skip = 1; next }
        /^[0-9+-]+ [0-9]+$/ { if (skip) { skip = 0 } else { self[fn] += $2; total += $2 }; next }
        END { for (f in self) printf "%d\t%.1f\t%s\n", self[f], 100 * self[f] / total, f; printf "%d\t100\tTOTAL\n", total }
    ' "$last" | sort -t$'\t' -k1,1nr)
    local total
    total=$(echo "$selfcost" | awk -F'\t' '$3 == "TOTAL" {print $1}')
    echo "### $name"
    echo
    echo "\`$sql\`: $(awk -v t="$total" 'BEGIN{printf "%.1f", t/1e6}') M instructions."
    echo
    echo "| share | instructions | function |"
    echo "|---:|---:|---|"
    echo "$selfcost" | awk -F'\t' -v top="$top" '$3 != "TOTAL" && ++n <= top' | awk -F'\t' '{printf "| %s %% | %\047d | `%s` |\n", $2, $1, $3}'
    echo
}

{
    echo "## callgrind profiles"
    echo
    echo "\`scripts/callgrind.sh\` (run by \`make bench\`): valgrind $(valgrind --version | sed 's/valgrind-//'), a single-user backend,"
    echo "the key already loaded; instructions executed by the query alone, self cost per function."
    echo
    profile "decrypting 200 values of 64 KiB" "SELECT sum(length(decrypt(c))) FROM big"
    profile "encrypting 200 values of 64 KiB" "INSERT INTO big SELECT decode(repeat(md5(g::text), 2048), 'hex') FROM generate_series(1, 200) g"
    profile "decrypting 20,000 values of 100 bytes" "SELECT sum(length(decrypt(c))) FROM small"
    profile "the same scan over plaintext" "SELECT sum(length(c)) FROM small_plain"
} | tee "$out"
