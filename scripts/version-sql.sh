#!/usr/bin/env bash
# Prints the install script pgrx generates for a released version, from its git tag:
#
#   scripts/version-sql.sh v0.1.0 > sql/pg_cellcrypt--0.1.0.sql
#
# It builds the tagged sources in a temporary worktree (against Debian's PostgreSQL 15), in a
# cargo target directory of its own (target/version-sql): the library of another version must
# never land where the current build's is taken from.
set -euo pipefail
tag=${1:?usage: version-sql.sh <tag, e.g. v0.1.0>}
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git -C "$here" worktree add -q --detach "$tree" "$tag"
out=$(mktemp)
(cd "$tree" && PGRX_HOME="$here/pgrx-config" CARGO_TARGET_DIR="$here/target/version-sql" \
    cargo pgrx schema pg15 --pg-config /usr/lib/postgresql/15/bin/pg_config -o "$out" >&2)
cat "$out"
rm -f "$out"
