#!/usr/bin/env bash
# Installs what building and testing pg_cellcrypt needs, and nothing that is already there.
# Safe to run any number of times.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo openssl libssl-dev pkg-config gdb libpostgresql-jdbc-java openjdk-17-jdk-headless)
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
