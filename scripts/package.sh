#!/usr/bin/env bash
# `make package PG=N`: the release build for one PostgreSQL major as an installable tree
# (cargo pgrx package) and a tarball of it:
#
#   target/package/pg_cellcrypt-<version>-pg<N>/        lib/ and share/ under the paths pg_config gives
#   target/package/pg_cellcrypt-<version>-pg<N>-linux-x86_64.tar.gz
#
# The paths inside are those the pg_config it was built with names: Debian's for PG=15, the
# upstream build's under /opt/pg_cellcrypt-pg for the others. To package for your own server,
# build with its pg_config (README). Install the tarball with
# `tar xzf ... -C / --no-overwrite-dir` on servers whose pg_config names the same paths, or copy
# `pg_cellcrypt.so` and `extension/pg_cellcrypt*` into the directories your pg_config names.
# The tree holds the control file, the install script of this version and every upgrade script
# in sql/; the tarball holds only those files and their directories.
set -euo pipefail
major=${1:?usage: package.sh <major> <pg_config>}
pg_config=${2:?pg_config}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
suffix=
[ "${CRYPTO:-aws-lc}" != fips ] || suffix=-fips
name="pg_cellcrypt-$version-pg$major$suffix"
out="$here/target/package/$name"
target=$here/target
[ "$major" = 15 ] || target=$here/target/majors
# The FIPS build (CRYPTO=fips, make package FIPS=1) has target directories of its own, as in the Makefile.
[ "${CRYPTO:-aws-lc}" != fips ] || { [ "$major" = 15 ] && target=$here/target/fips || target=$here/target/majors-fips; }
rm -rf "$out"
(cd "$here" && CARGO_TARGET_DIR="$target" cargo pgrx package --pg-config "$pg_config" \
    --no-default-features --features "pg$major ${CRYPTO:-aws-lc}" --out-dir "$out")
# The tree holds what an install needs, and the library was built for this major.
so=$(find "$out" -name pg_cellcrypt.so)
ctl=$(find "$out" -name pg_cellcrypt.control)
[ -n "$so" ] && [ -n "$ctl" ] && [ -f "$(dirname "$ctl")/pg_cellcrypt--$version.sql" ] || { echo "package: incomplete tree in $out" >&2; exit 1; }
for up in "$here"/sql/pg_cellcrypt--*--*.sql; do
    [ -e "$up" ] || continue
    [ -f "$(dirname "$ctl")/$(basename "$up")" ] || { echo "package: $(basename "$up") missing from $out" >&2; exit 1; }
done
(cd "$out" && find . -type f -printf '%P\n' | sort | tar czf "$out-linux-x86_64.tar.gz" --owner=0 --group=0 --no-recursion -T -)
echo "package: $out"
echo "package: $out-linux-x86_64.tar.gz ($(du -h "$out-linux-x86_64.tar.gz" | cut -f1))"
