#!/usr/bin/env bash
# Installs what building and testing pg_cellcrypt needs, and nothing that is already there.
# Safe to run any number of times.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    # Not Debian or Ubuntu: building needs clang, libclang, the server headers of your major and
    # cargo-pgrx 0.18.1 (README, "Building for your own PostgreSQL"); the tests need Debian.
    echo "setup: not a Debian system; install the build requirements yourself (README)" >&2
    command -v cargo-pgrx >/dev/null || cargo pgrx --version >/dev/null 2>&1 || { echo "setup: cargo-pgrx 0.18.1 is missing" >&2; exit 1; }
    exit 0
fi
packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo openssl libssl-dev pkg-config gdb libpostgresql-jdbc-java openjdk-17-jdk-headless python3-pip)
# The FIPS build (FIPS=1, and `make test`, which runs test-fips): AWS-LC's FIPS module builds
# with cmake, Go and Perl.
packages+=(cmake golang-go perl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q ' 0\.18\.1$'; then
    echo "setup: installing cargo-pgrx 0.18.1 (takes a few minutes)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

# PG=N (make ... PG=N) other than Debian's 15: the tested upstream build of that major, with
# its pgrx settings (scripts/pg-major.sh; the builds themselves come with make install/test).
if [ -n "${PG:-}" ] && [ "$PG" != 15 ]; then
    "$(dirname "$0")/pg-major.sh" "$PG" >/dev/null
fi
