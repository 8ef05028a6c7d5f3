#!/usr/bin/env bash
# Builds Citus from ../shared/citus (or $CITUS_SRC_DIR) into the server of PG major $1 and prints
# its version, or uses a Citus already installed there. Exit 3: Citus cannot be built for this
# major here (no source, PostgreSQL 14, no build tools); the message says why.
#   scripts/citus.sh 15 /usr/lib/postgresql/15/bin/pg_config
# Citus 13.2.2 for PostgreSQL 15 (its 16 and 17 also build it), 14.0.1 for 16 to 18
# (../shared/citus/README.md). A build takes about a minute on 2 cores, once per server.
#   scripts/citus.sh --check 15 PG_CONFIG   exit 0 when Citus is installed or can be built, 3 if not
set -euo pipefail
check=""
if [ "${1:-}" = --check ]; then check=yes; shift; fi
major="$1"; pg_config="$2"
root="$(cd "$(dirname "$0")/.." && pwd)"
# The sources: $CITUS_SRC_DIR, or shared/citus beside this checkout (this project's machines).
src_dir="${CITUS_SRC_DIR:-$root/../shared/citus}"
if [ -z "${CITUS_SRC_DIR:-}" ] && [ ! -d "$src_dir" ] && [ -d /work/shared/citus ]; then src_dir=/work/shared/citus; fi
case "$major" in
    15) version=13.2.2 ;;
    16|17|18) version=14.0.1 ;;
    *) echo "citus: no Citus release in $src_dir supports PostgreSQL $major (13.2.2: 15-17, 14.0.1: 16-18)" >&2; exit 3 ;;
esac
pkglibdir="$("$pg_config" --pkglibdir)"
sharedir="$("$pg_config" --sharedir)"
installed=""
if [ -f "$pkglibdir/citus.so" ] && [ -f "$sharedir/extension/citus.control" ]; then
    installed="$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$sharedir/extension/citus.control")"
fi
# A Citus already installed in this server is used as it is (CITUS_REBUILD=1 builds anyway).
if [ -n "$installed" ] && [ -z "${CITUS_REBUILD:-}" ]; then
    echo "$installed"; exit 0
fi
tarball="$src_dir/citus-$version.tar.gz"
[ -f "$tarball" ] || { echo "citus: $tarball is missing (Citus is not in Debian's archive; see README, Scaling out with Citus)" >&2; exit 3; }
command -v make >/dev/null && command -v gcc >/dev/null || { echo "citus: building Citus needs make and gcc" >&2; exit 3; }
[ -z "$check" ] || exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
if command -v dpkg-query >/dev/null; then
    missing=()
    for p in liblz4-dev libzstd-dev libcurl4-openssl-dev libkrb5-dev make gcc; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "citus: installing ${missing[*]}" >&2
        $SUDO apt-get update -qq >&2
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
build="$root/target/citus/citus-$version-pg$major"
rm -rf "$build"; mkdir -p "$build"
tar xzf "$tarball" -C "$build" --strip-components=1
cd "$build"
# Debian's 15.20 exports have_createdb_privilege(), which 13.2.2 also defines for 15
# (../shared/citus/citus-13.2.2-pg15-minor.patch renames Citus' copy).
patchfile="$src_dir/citus-$version-pg15-minor.patch"
if [ "$major" = 15 ] && [ -f "$patchfile" ] \
   && grep -q 'have_createdb_privilege' "$("$pg_config" --includedir-server)/commands/dbcommands.h"; then
    patch -s -p1 < "$patchfile"
fi
echo "citus: building Citus $version for PostgreSQL $major (a few minutes, once)" >&2
./configure PG_CONFIG="$pg_config" >"$build/configure.log" 2>&1 || { tail -20 "$build/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$build/make.log" 2>&1 || { tail -30 "$build/make.log" >&2; exit 1; }
$SUDO make install >"$build/install.log" 2>&1 || { tail -20 "$build/install.log" >&2; exit 1; }
sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$sharedir/extension/citus.control"
