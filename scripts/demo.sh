#!/usr/bin/env bash
# Starts a throwaway cluster and shows pg_cellcrypt's main job in a short psql session.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${DEMO_DIR:-$here/.demo}
port=${DEMO_PORT:-55440}

"$here/scripts/cluster.sh" start "$dir" "$port"
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBIN=${PGBIN%/}
export PGBIN
psql_demo() { "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"; }
psql_demo -q -c "CREATE DATABASE demo"

echo
echo "=== pg_cellcrypt demo (cluster in $dir, port $port) ==="
psql_demo -d demo --echo-queries <<'SQL'
CREATE EXTENSION pg_cellcrypt;
SELECT is_data_encryption_active();
CREATE TABLE mailbox (id serial PRIMARY KEY, username text, password encrypted_text, settings encrypted_jsonb);
INSERT INTO mailbox (username, password, settings)
    VALUES ('alice', 'correct horse battery staple', '{"imap": "imap.example.com", "port": 993}');
\d mailbox
-- What the table holds, and what SELECT shows: an envelope, never the plaintext.
SELECT id, username, password, pg_column_size(password) AS bytes_on_disk FROM mailbox;
-- Plaintext only through decrypt() or an explicit cast, for superusers and data_encryption_reader.
SELECT username, decrypt(password) AS password, settings::jsonb ->> 'imap' AS imap FROM mailbox;
-- Tampering is detected, never turned into wrong plaintext: overwrite 3 bytes of the stored ciphertext.
SELECT overlay(format('%s', password) placing 'AAAA' from 41 for 4) AS tampered FROM mailbox \gset
UPDATE mailbox SET password = :'tampered';
\set ON_ERROR_STOP 0
SELECT decrypt(password) FROM mailbox;
SQL

cat <<MSG

The demo cluster keeps running. Connect with:
    $PGBIN/psql -h $dir -p $port -U postgres demo                       (Unix socket)
    $PGBIN/psql "host=127.0.0.1 port=$port user=postgres dbname=demo sslmode=require"   (TCP with SSL)
Stop it with:
    make demo-stop${PG:+ PG=$PG}
MSG
