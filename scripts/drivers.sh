#!/usr/bin/env bash
# Installs the drivers of the driver matrix (tests/integration/tests/drivers.rs) from their
# ordinary registries, once, and again whenever their pinned versions change:
#   * Python (PyPI): tests/drivers/python/requirements.txt into target/drivers/venv;
#   * Node.js (npm): tests/drivers/node/package-lock.json into tests/drivers/node/node_modules;
#   * JDBC (Debian's libpostgresql-jdbc-java, installed by scripts/setup.sh): the matrix
#     program compiled into target/drivers/java.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/drivers
mkdir -p "$out"

for tool in python3 node npm javac; do
    command -v "$tool" >/dev/null || { echo "drivers: $tool is missing (this machine kind provides Python 3 with pip and Node.js with npm; javac comes with make setup)" >&2; exit 1; }
done
[ -f /usr/share/java/postgresql.jar ] || { echo "drivers: /usr/share/java/postgresql.jar is missing: run make setup (Debian's libpostgresql-jdbc-java)" >&2; exit 1; }

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

sum=$(sha256sum tests/drivers/python/requirements.txt | cut -d' ' -f1)
if ! stamp_ok "$out/venv.stamp" "$sum"; then
    echo "drivers: installing the Python drivers from PyPI"
    rm -rf "$out/venv"
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install -q --disable-pip-version-check --no-deps -r tests/drivers/python/requirements.txt
    echo "$sum" >"$out/venv.stamp"
fi

sum=$(sha256sum tests/drivers/node/package-lock.json | cut -d' ' -f1)
if ! stamp_ok "$out/node.stamp" "$sum" || [ ! -d tests/drivers/node/node_modules ]; then
    echo "drivers: installing the Node.js drivers from npm"
    (cd tests/drivers/node && npm ci --silent --no-audit --no-fund >/dev/null)
    echo "$sum" >"$out/node.stamp"
fi

jar=/usr/share/java/postgresql.jar
sum=$(cat tests/drivers/java/Matrix.java "$jar" | sha256sum | cut -d' ' -f1)
if ! stamp_ok "$out/java.stamp" "$sum"; then
    echo "drivers: compiling the JDBC matrix"
    rm -rf "$out/java" && mkdir -p "$out/java"
    javac -d "$out/java" -cp "$jar" tests/drivers/java/Matrix.java
    echo "$sum" >"$out/java.stamp"
fi
