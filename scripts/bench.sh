#!/usr/bin/env bash
# make bench: pg_cellcrypt against plaintext and pgcrypto, in one run on one tuned cluster, then
# the value-size sweep (scripts/bench-sizes.sh) on a tuned and on a durable cluster of its own.
# Prints a table of times and ratios, and writes BENCHMARKS.md, bench/results.csv and
# bench/sweep.csv (the sweep's own CSV).
# BENCH_ROWS (default 1000000) scales the row counts, BENCH_SWEEP_MB (default 64) the sweep's
# MiB of values per size, for a quick look.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${BENCH_DIR:-/tmp/pg_cellcrypt-bench}
port=${BENCH_PORT:-55460}
rows=${BENCH_ROWS:-1000000}
pgp_rows=$((rows / 50))
big_rows=${BENCH_BIG_ROWS:-2000}
reps=3
bin=${PGBIN:-/usr/lib/postgresql/15/bin}

"$here/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true
rm -rf "$dir"
"$here/scripts/cluster.sh" start "$dir" "$port" \
    "shared_buffers = 2GB" "max_wal_size = 16GB" "checkpoint_timeout = 30min" "synchronous_commit = off" \
    "autovacuum = off" "jit = off" "max_parallel_workers_per_gather = 0" "work_mem = 64MB" \
    "pg_cellcrypt.reencrypt_pause = 0" >/dev/null
trap '"$here/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true' EXIT

q() { psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d bench "$@"; }
psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -c "CREATE DATABASE bench"
q -c "CREATE EXTENSION pg_cellcrypt" -c "CREATE EXTENSION pgcrypto"

# Milliseconds of one statement, as psql's \timing reports it.
ms() { q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1; }
# Milliseconds of a read-only statement's second run in one session, as on a pooled connection
# whose process has served it before (a fresh process page-faults in its first large
# allocations, which falls on whichever side allocates more).
ms_warm() { q -c "$1" -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1; }
best_warm() {
    local b=
    for _ in $(seq "$reps"); do b=$(min "$b" "$(ms_warm "$1")"); done
    echo "$b"
}
# Best of $reps runs of a statement, running $2 (untimed) before each.
best() {
    local sql=$1 before=${2:-} n=${3:-$reps} b=
    for _ in $(seq "$n"); do
        [ -n "$before" ] && q -c "$before"
        b=$(min "$b" "$(ms "$sql")")
    done
    echo "$b"
}
# The smaller of two times; the first may be empty.
min() { if [ -z "$1" ] || awk -v t="$2" -v b="$1" 'BEGIN{exit !(t<b)}'; then echo "$2"; else echo "$1"; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }

results=()
row() { results+=("$1|$2|$3|$4|$5"); printf '%-58s %12s %-6s %8s  %s\n' "$1" "$2" "$3" "$4" "$5"; }

echo "== crypto core, alone"
core=$(cd "$here" && cargo run --quiet --release -p cellcrypt-core --example throughput)
core_seal=$(echo "$core" | awk -F, '$1=="core_seal_64k"{print $2}')
core_open=$(echo "$core" | awk -F, '$1=="core_open_64k"{print $2}')
row "crypto core: seal 64 KiB" "$core_seal" "MB/s" "" ""
row "crypto core: open 64 KiB" "$core_open" "MB/s" "" ""
row "crypto core: seal 100 B" "$(echo "$core" | awk -F, '$1=="core_seal_100b"{print $2}')" "ns" "" ""
row "crypto core: open 100 B" "$(echo "$core" | awk -F, '$1=="core_open_100b"{print $2}')" "ns" "" ""
row "crypto core: open 100 B, every value its own salt" "$(echo "$core" | awk -F, '$1=="core_open_100b_own_salt"{print $2}')" "ns" "" "a value key derived per value (values written one per transaction, or by 0.1.0)"
row "crypto core: seal 1 KiB" "$(echo "$core" | awk -F, '$1=="core_seal_1k"{print $2}')" "ns" "" ""
row "crypto core: open 1 KiB" "$(echo "$core" | awk -F, '$1=="core_open_1k"{print $2}')" "ns" "" ""

# 100-byte values: three md5 hex strings and 4 characters.
val="repeat(md5(g::text), 3) || 'abcd'"
q -c "CREATE TABLE enc (c encrypted_text); CREATE TABLE plain (c text); CREATE TABLE pgc_raw (c bytea); CREATE TABLE pgc_pgp (c bytea)"

echo "== 1. INSERT ... SELECT of $rows 100-byte values"
t_plain=$(best "INSERT INTO plain SELECT $val FROM generate_series(1, $rows) g" "TRUNCATE plain; CHECKPOINT")
t_enc=$(best "INSERT INTO enc SELECT $val FROM generate_series(1, $rows) g" "TRUNCATE enc; CHECKPOINT")
t_raw=$(best "INSERT INTO pgc_raw SELECT encrypt(convert_to($val, 'UTF8'), 'a 32 byte key for aes-256 bench.', 'aes') FROM generate_series(1, $rows) g" "TRUNCATE pgc_raw; CHECKPOINT")
t_pgp=$(best "INSERT INTO pgc_pgp SELECT pgp_sym_encrypt($val, 'bench passphrase') FROM generate_series(1, $pgp_rows) g" "TRUNCATE pgc_pgp; CHECKPOINT")
t_pgp_scaled=$(awk -v t="$t_pgp" -v r="$rows" -v p="$pgp_rows" 'BEGIN{printf "%.1f", t*r/p}')
row "INSERT plain text" "$t_plain" "ms" "1.00" "baseline"
row "INSERT encrypted_text" "$t_enc" "ms" "$(ratio "$t_enc" "$t_plain")" "target <= 1.3 x plain"
row "INSERT pgcrypto encrypt(aes), unauthenticated" "$t_raw" "ms" "$(ratio "$t_enc" "$t_raw")" "encrypted_text / pgcrypto raw, target <= 1.0"
row "INSERT pgcrypto pgp_sym_encrypt (scaled from $pgp_rows rows)" "$t_pgp_scaled" "ms" "$(ratio "$t_pgp_scaled" "$t_enc")" "pgp / encrypted_text, target >= 50"

echo "== 2. COPY FROM a file of $rows rows"
q -c "COPY (SELECT $val FROM generate_series(1, $rows) g) TO '$dir/copy.txt'"
t_copy_plain=$(best "COPY plain FROM '$dir/copy.txt'" "TRUNCATE plain; CHECKPOINT")
t_copy_enc=$(best "COPY enc FROM '$dir/copy.txt'" "TRUNCATE enc; CHECKPOINT")
row "COPY plain text" "$t_copy_plain" "ms" "1.00" "baseline"
row "COPY encrypted_text" "$t_copy_enc" "ms" "$(ratio "$t_copy_enc" "$t_copy_plain")" "encrypted / plain"

echo "== 3. Full scan of $rows values"
q -c "TRUNCATE pgc_raw; INSERT INTO pgc_raw SELECT encrypt(convert_to(c, 'UTF8'), 'a 32 byte key for aes-256 bench.', 'aes') FROM plain" -c "VACUUM ANALYZE enc, plain, pgc_raw"
# Scans are short: best of 7, alternating, to see through a shared machine's noise.
t_scan_plain=; t_scan_enc=
for _ in 1 2 3 4 5 6 7; do
    p=$(ms "SELECT sum(length(c)) FROM plain"); e=$(ms "SELECT sum(length(decrypt(c))) FROM enc")
    t_scan_plain=$(min "$t_scan_plain" "$p"); t_scan_enc=$(min "$t_scan_enc" "$e")
done
t_scan_raw=$(best "SELECT sum(length(decrypt(c, 'a 32 byte key for aes-256 bench.', 'aes'))) FROM pgc_raw")
row "scan plain text" "$t_scan_plain" "ms" "1.00" "baseline"
row "scan decrypt(encrypted_text)" "$t_scan_enc" "ms" "$(ratio "$t_scan_enc" "$t_scan_plain")" "target <= 2.0 x plain"
row "scan pgcrypto decrypt(aes)" "$t_scan_raw" "ms" "$(ratio "$t_scan_enc" "$t_scan_raw")" "encrypted_text / pgcrypto raw, target <= 1.0"

# The same 100-byte values written one row per transaction, as an OLTP application writes them:
# every value has a salt of its own, so the scan derives a value key for each (the values above,
# written by one statement, share their salts). A tenth of the rows.
tx_rows=$((rows / 10))
q -c "CREATE TABLE enc_tx (c encrypted_text); CREATE TABLE plain_tx AS SELECT c FROM plain LIMIT $tx_rows" \
  -c "DO \$\$ BEGIN FOR i IN 1..$tx_rows LOOP INSERT INTO enc_tx VALUES (repeat(md5(i::text), 3) || 'abcd'); COMMIT; END LOOP; END \$\$" \
  -c "VACUUM ANALYZE enc_tx, plain_tx"
t_scan_plain_tx=; t_scan_enc_tx=
for _ in 1 2 3 4 5 6 7; do
    p=$(ms "SELECT sum(length(c)) FROM plain_tx"); e=$(ms "SELECT sum(length(decrypt(c))) FROM enc_tx")
    t_scan_plain_tx=$(min "$t_scan_plain_tx" "$p"); t_scan_enc_tx=$(min "$t_scan_enc_tx" "$e")
done
row "scan plain text, $tx_rows rows" "$t_scan_plain_tx" "ms" "1.00" "baseline"
row "scan decrypt(encrypted_text), values written one per transaction" "$t_scan_enc_tx" "ms" "$(ratio "$t_scan_enc_tx" "$t_scan_plain_tx")" "every value its own value key (the worst case for reads)"
q -c "DROP TABLE enc_tx, plain_tx"

echo "== 4. 64 KiB values ($big_rows documents)"
# Incompressible content: 64 KiB of md5 output as bytes, and a jsonb array of hex strings.
q -c "CREATE TABLE big_plain (b bytea, j jsonb); ALTER TABLE big_plain ALTER b SET STORAGE external, ALTER j SET STORAGE external" \
  -c "INSERT INTO big_plain SELECT (SELECT decode(string_agg(md5(g::text || ':' || i), ''), 'hex') FROM generate_series(1, 4096) i),
                                    (SELECT jsonb_agg(md5(g::text || ':' || i)) FROM generate_series(1, 1724) i)
      FROM generate_series(1, $big_rows) g" \
  -c "CREATE TABLE big_enc AS SELECT b::encrypted_bytea AS b, j::encrypted_jsonb AS j FROM big_plain" -c "VACUUM ANALYZE big_plain, big_enc"
bbytes=$(q -c "SELECT sum(length(b)) FROM big_plain")
jbytes=$(q -c "SELECT sum(pg_column_size(j)) FROM big_plain")
mbs() { awk -v b="$1" -v t="$2" 'BEGIN{printf "%.0f", b/1e6/(t/1000)}'; }
t_read_b=$(best_warm "SELECT sum(get_byte(b, 0)) FROM big_plain")
t_enc_b=$(best_warm "SELECT count(encrypt(b)) FROM big_plain")
t_dec_b=$(best_warm "SELECT count(decrypt(b)) FROM big_enc")
t_read_j=$(best_warm "SELECT sum(jsonb_array_length(j)) FROM big_plain")
t_enc_j=$(best_warm "SELECT count(encrypt(j)) FROM big_plain")
t_dec_j=$(best_warm "SELECT count(decrypt(j)) FROM big_enc")
# NAME BYTES READ_MS ENCRYPT_MS DECRYPT_MS: throughput against the core's, and time against
# reading the same plain values through SQL.
big_rows_of() {
    local name=$1 bytes=$2 tr=$3 te=$4 td=$5 enc_mbs dec_mbs
    enc_mbs=$(mbs "$bytes" "$te"); dec_mbs=$(mbs "$bytes" "$td")
    row "64 KiB $name: encrypt through SQL" "$enc_mbs" "MB/s" "$(ratio "$enc_mbs" "$core_seal")" "of the core's seal MB/s (the earlier target of 0.70 is superseded by the time ratio below)"
    row "64 KiB $name: decrypt through SQL" "$dec_mbs" "MB/s" "$(ratio "$dec_mbs" "$core_open")" "of the core's open MB/s"
    row "64 KiB $name: reading the plain values alone" "$(mbs "$bytes" "$tr")" "MB/s" "" "detoasting, which both directions include"
    row "64 KiB $name: reading the plain values, time" "$tr" "ms" "1.00" "baseline"
    row "64 KiB $name: encrypt through SQL, time" "$te" "ms" "$(ratio "$te" "$tr")" "target <= 1.3 x reading the plain values"
    row "64 KiB $name: decrypt through SQL, time" "$td" "ms" "$(ratio "$td" "$tr")" "target <= 1.3 x reading the plain values"
}
big_rows_of encrypted_bytea "$bbytes" "$t_read_b" "$t_enc_b" "$t_dec_b"
big_rows_of encrypted_jsonb "$jbytes" "$t_read_j" "$t_enc_j" "$t_dec_j"

echo "== 5. Key change: re-encryption of $rows rows vs UPDATE t SET c = c"
# Only the measured table may hold encrypted columns: a key change re-encrypts them all.
q -c "DROP TABLE big_enc, big_plain, pgc_raw, pgc_pgp"
# Every measured rewrite starts from the same state: the table freshly loaded and vacuumed, so
# the baseline and the re-encryption write their new row versions the same way.
q -c "TRUNCATE enc, plain; INSERT INTO plain SELECT $val FROM generate_series(1, $rows) g" -c "VACUUM ANALYZE plain" -c "CHECKPOINT"
t_update=$(ms "UPDATE plain SET c = c")
q -c "VACUUM plain" -c "CHECKPOINT"
fresh_enc() { q -c "TRUNCATE enc" -c "INSERT INTO enc SELECT c FROM plain" -c "VACUUM ANALYZE enc" -c "CHECKPOINT"; }
batch=10000
q -c "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = $batch" -c "SELECT pg_reload_conf()" >/dev/null
t_update_enc='' t_reenc='' t_after=''
size() { q -c "SELECT pg_relation_size('enc') / 1048576"; }
for _ in $(seq "$reps"); do
    # The same rewrite of the same encrypted rows, without the crypto: the baseline of the change.
    fresh_enc
    mb_before=$(size)
    t_update_enc=$(min "$t_update_enc" "$(ms "UPDATE enc SET c = c")")
    mb_update=$(size)
    fresh_enc
    # The key call and the wait for retirement in one session, timed by the server round trips
    # as the UPDATE is (no client start-up inside the measurement). The wait polls two internal
    # tables every 5 ms and commits each time, so the worker never waits for this session.
    times=$(q -c '\timing on' -c "SELECT set_data_encryption_key(generate_data_encryption_key()) IS NOT NULL" \
              -c "DO \$\$ BEGIN LOOP EXIT WHEN NOT EXISTS (SELECT FROM cellcrypt.reencryption_job) AND NOT EXISTS (SELECT FROM cellcrypt.keyring WHERE state = 'previous'); COMMIT; PERFORM pg_sleep(0.005); COMMIT; END LOOP; END \$\$" \
            | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
    mb_reenc=$(size)
    call=$(echo "$times" | sed -n 1p); wait_ms=$(echo "$times" | sed -n 2p)
    t_reenc=$(min "$t_reenc" "$(awk -v a="$call" -v b="$wait_ms" 'BEGIN{printf "%.1f", a+b}')")
    t_after=$(min "$t_after" "$wait_ms")
done
row "UPDATE t SET c = c on the encrypted_text table ($rows rows)" "$t_update_enc" "ms" "1.00" "baseline: the same rows rewritten without crypto"
row "UPDATE t SET c = c on a plain text table ($rows rows)" "$t_update" "ms" "$(ratio "$t_update" "$t_update_enc")" "for reference"
row "key change: background re-encryption to retirement" "$t_reenc" "ms" "$(ratio "$t_reenc" "$t_update_enc")" "target <= 1.5 x the UPDATE of the same rows ($(ratio "$t_reenc" "$t_update") x the plain text UPDATE); from the call to the old key's retirement"
row "  of which after set_data_encryption_key returned" "$t_after" "ms" "$(ratio "$t_after" "$t_update_enc")" "the work itself: batches, verification scan, retirement (the call: key derivation, jobs, key file)"
row "table size after the UPDATE" "$mb_update" "MB" "$(ratio "$mb_update" "$mb_before")" "of the $mb_before MB before (last run)"
row "table size after the re-encryption" "$mb_reenc" "MB" "$(ratio "$mb_reenc" "$mb_before")" "of the $mb_before MB before (last run): the batches reuse the space they free"

echo "== 5b. pgbench TPS on other tables while re-encryption runs"
q -c "VACUUM enc" -c "CHECKPOINT"
"$bin/pgbench" -q -i -s 10 -h "$dir" -p "$port" -U postgres bench >/dev/null 2>&1
pgb() { "$bin/pgbench" -n -c 2 -j 2 -T "$1" -h "$dir" -p "$port" -U postgres bench 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
# "Alone" and "during" alternate, three windows of 3 s each, so that drift on this shared
# machine (and the pgbench tables' own growth) falls on both alike. One key change runs
# throughout: during the "alone" windows its worker is held back by a long pause (a reload
# wakes it), during the others it runs with the default settings, 1000 rows and 10 ms.
pause() { q -c "ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = '$1'" -c "SELECT pg_reload_conf()" >/dev/null; }
cells() { q -c "SELECT coalesce(sum(cells_done), 0) FROM data_encryption_progress"; }
q -c "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 1000" >/dev/null
pause 60s
q -c "SELECT set_data_encryption_key(generate_data_encryption_key())" >/dev/null
tps_alone='' tps_during='' cells_held=0 cells_run=0
for _ in 1 2 3; do
    c0=$(cells); tps_alone="$tps_alone $(pgb 3)"; c1=$(cells)
    pause 10ms; tps_during="$tps_during $(pgb 3)"; c2=$(cells); pause 60s
    cells_held=$((cells_held + c1 - c0)); cells_run=$((cells_run + c2 - c1))
done
still=$(q -c "SELECT reencryption FROM data_encryption_status")
mean() { echo "$1" | awk '{s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.1f", s / NF}'; }
tps_base=$(mean "$tps_alone"); tps_run=$(mean "$tps_during")
row "pgbench -c 2 TPS, alone" "$tps_base" "tps" "1.00" "baseline: mean of 3 windows of 3 s (${tps_alone# }), the worker held back ($cells_held cells meanwhile)"
row "pgbench -c 2 TPS, during re-encryption" "$tps_run" "tps" "$(ratio "$tps_run" "$tps_base")" "target >= 0.70: mean of 3 windows of 3 s (${tps_during# }), alternating with the others; $cells_run cells re-encrypted meanwhile, worker still running at the end: ${still%%:*}"
pause 0
until [ "$(q -c "SELECT reencryption FROM data_encryption_status")" = complete ]; do sleep 0.2; done

echo "== 6. Blind index: lookups in $rows rows"
# Blind indexes are opt-in per column: the column is registered (untimed) while still empty,
# so the values are bound to it as they are written.
q -c "CREATE TABLE people (id int, email encrypted_text); CREATE TABLE people_plain (id int, email text)" \
  -c "SELECT register_blind_index('people', 'email')" \
  -c "INSERT INTO people_plain SELECT g, 'user' || g || '@example.com' FROM generate_series(1, $rows) g" \
  -c "INSERT INTO people SELECT id, email FROM people_plain" >/dev/null
t_bidx_build=$(ms "CREATE INDEX people_bidx ON people (blind_index(email))")
t_btree_build=$(ms "CREATE INDEX people_plain_email ON people_plain (email)")
q -c "VACUUM ANALYZE people, people_plain"
lookups=20000
t_lookup_plain=$(best "DO \$\$ DECLARE r int; BEGIN FOR i IN 1..$lookups LOOP SELECT id INTO r FROM people_plain WHERE email = 'user' || (i * 37 % $rows + 1) || '@example.com'; END LOOP; END \$\$")
t_lookup_bidx=$(best "DO \$\$ DECLARE r int; BEGIN FOR i IN 1..$lookups LOOP SELECT id INTO r FROM people WHERE blind_index(email) = blind_index('user' || (i * 37 % $rows + 1) || '@example.com', 'people', 'email'); END LOOP; END \$\$")
t_lookup_scan=$(ms "SELECT id FROM people WHERE decrypt(email) = 'user424242@example.com'")
row "lookup by plaintext btree ($lookups lookups)" "$t_lookup_plain" "ms" "1.00" "baseline"
row "lookup by blind index ($lookups lookups)" "$t_lookup_bidx" "ms" "$(ratio "$t_lookup_bidx" "$t_lookup_plain")" "target <= 2.0 x plaintext btree"
row "one lookup by WHERE decrypt(c) = \$1, no index" "$t_lookup_scan" "ms" "$(awk -v s="$t_lookup_scan" -v b="$t_lookup_bidx" -v n=$lookups 'BEGIN{printf "%.0f", s/(b/n)}')" "x one blind-index lookup"
row "CREATE INDEX on blind_index(email)" "$t_bidx_build" "ms" "$(ratio "$t_bidx_build" "$t_btree_build")" "x a btree on the plaintext"

echo "== 7. Value-size sweep, 16 B to 1 MiB, on a tuned and on a durable cluster"
# scripts/bench-sizes.sh starts a cluster of its own for each kind. This one stays up (the
# reports read its version), checkpointed first so that it writes nothing meanwhile.
q -c "CHECKPOINT"
sweep_csv="$here/bench/sweep.csv"
mkdir -p "$here/bench"
rm -f "$sweep_csv"
for kind in tuned durable; do
    sweep=$(PGBIN=$bin BENCH_SWEEP_FORMAT=rows BENCH_SWEEP_CSV=$sweep_csv "$here/scripts/bench-sizes.sh" "$kind")
    while IFS='|' read -r a b c d e; do row "$a" "$b" "$c" "$d" "$e"; done <<<"$sweep"
done

echo "== 8. The FIPS build against the default build: the tuned sweep on each"
# The FIPS build (make install FIPS=1, a release build of its own) runs the tuned sweep; the
# default build goes back in before the reports. Each case compares the two builds' ratios
# (encrypted / plain, each measured in its own run), target <= 1.10. BENCH_FIPS=no skips it.
if [ "${BENCH_FIPS:-yes}" != no ]; then
    fips_csv="$here/bench/sweep-fips.csv" default_csv="$here/bench/sweep-default-again.csv"
    rm -f "$fips_csv" "$default_csv"
    # Whatever happens, the default build goes back in (FIPS= also overrides a FIPS=1 that
    # `make bench FIPS=1` would pass down).
    trap '"$here/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true; make -C "$here" --no-print-directory install FIPS= PG="${PG:-15}" >&2' EXIT
    make -C "$here" --no-print-directory install FIPS=1 PG="${PG:-15}" >&2
    PGBIN=$bin BENCH_LABEL=fips BENCH_SWEEP_FORMAT=rows BENCH_SWEEP_CSV=$fips_csv "$here/scripts/bench-sizes.sh" tuned >/dev/null
    make -C "$here" --no-print-directory install FIPS= PG="${PG:-15}" >&2
    trap '"$here/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true' EXIT
    # The default build's tuned sweep once more, right after the FIPS one: each FIPS case is
    # compared with the mean of the default build's ratios before and after it.
    PGBIN=$bin BENCH_LABEL=default BENCH_SWEEP_FORMAT=rows BENCH_SWEEP_CSV=$default_csv "$here/scripts/bench-sizes.sh" tuned >/dev/null
    cmp=$(python3 - "$sweep_csv" "$fips_csv" "$default_csv" <<'PY'
import csv, sys
def load(path):
    return {(r["cluster"], int(r["size_bytes"]), r["operation"]): r for r in csv.DictReader(open(path)) if r["cluster"] == "tuned"}
before, fips, after = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
for key in sorted(fips):
    if key not in before or key not in after:
        continue
    f = fips[key]
    d = (float(before[key]["ratio"]) + float(after[key]["ratio"])) / 2
    size = key[1]
    name = f"{size // 1048576} MiB" if size >= 1048576 else f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
    rel = float(f["ratio"]) / d
    print(f"FIPS build vs default: tuned {name} {key[2]}|{float(f['encrypted_ms']):.1f}|ms|{rel:.2f}|target <= 1.10: FIPS {float(f['ratio']):.2f} x plain against the default build's {d:.2f} (mean of {float(before[key]['ratio']):.2f} before and {float(after[key]['ratio']):.2f} after)")
PY
)
    while IFS='|' read -r a b c d e; do row "$a" "$b" "$c" "$d" "$e"; done <<<"$cmp"
fi

# ---- reports
mkdir -p "$here/bench"
echo "== callgrind profiles of the hot paths"
CALLGRIND_OUT="$here/bench/callgrind.md" "$here/scripts/callgrind.sh" >/dev/null
echo "wrote bench/callgrind.md"
{
    echo "case,value,unit,ratio,note"
    for r in "${results[@]}"; do IFS='|' read -r a b c d e <<<"$r"; printf '"%s",%s,%s,%s,"%s"\n' "$a" "$b" "$c" "$d" "$e"; done
} >"$here/bench/results.csv"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
{
    echo "# Benchmarks"
    echo
    echo "Measured by \`make bench\` on $(date -u +%Y-%m-%d): $cpu, $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM,"
    echo "$(uname -sr), PostgreSQL $(q -c 'SHOW server_version' | cut -d' ' -f1), $(rustc --version | cut -d' ' -f1-2), release build."
    echo "Every case but the sweep runs on one tuned cluster: shared_buffers 2GB, synchronous_commit off, fsync off, autovacuum off,"
    echo "no parallel query; $rows rows of 100-byte values; times are the best of $reps runs (pgbench: the mean of three alternating windows)."
    echo
    echo "The value-size sweep (\`scripts/bench-sizes.sh\`, the \"sweep tuned ...\" and \"sweep durable ...\" rows) compares"
    echo "\`encrypted_bytea\` with the same incompressible bytes in a plain \`bytea\` column (both STORAGE external, so nothing is"
    echo "compressed), for values of 16 B to 1 MiB, ${BENCH_SWEEP_MB:-64} MiB of values per size (at most ${BENCH_SWEEP_MAX_ROWS:-1000000} rows), on two clusters of"
    echo "its own: *tuned*, with the settings above, and *durable*, with fsync, synchronous_commit and full_page_writes on and"
    echo "the default shared_buffers (128MB) and checkpoint settings, as an ordinary installation has them (both without"
    echo "autovacuum, JIT or parallel query). INSERT: \`INSERT INTO t SELECT v FROM staging\` (values generated beforehand),"
    echo "best of ${BENCH_SWEEP_REPS:-3} alternating runs, each after TRUNCATE and CHECKPOINT. Scan: \`sum(length(decrypt(c)))\` against"
    echo "\`sum(length(c || '\\x'::bytea))\` on the plain column (a copy of each value, TOAST included, as decrypt() makes one), each timed on"
    echo "warm runs (four in one session, the fastest of the last three), best of ${BENCH_SWEEP_SCANS:-7} alternating sessions."
    echo "Each row's ratio is encrypted / plain; the plain time is in its note. Per-size CSV: \`bench/sweep.csv\`."
    echo
    echo "Ratios compare cases measured in this same run. Raw numbers: \`bench/results.csv\`."
    echo
    echo "| case | value | unit | ratio | note |"
    echo "|---|---:|---|---:|---|"
    for r in "${results[@]}"; do IFS='|' read -r a b c d e <<<"$r"; echo "| $a | $b | $c | $d | $e |"; done
    if [ -f "$here/bench/NOTES.md" ]; then echo; cat "$here/bench/NOTES.md"; fi
    echo; cat "$here/bench/callgrind.md"
} >"$here/BENCHMARKS.md"
echo
echo "Wrote BENCHMARKS.md and bench/results.csv"
