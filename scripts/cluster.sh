#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for the demo and the integration tests (PGBIN: the server's bin/,
# Debian's PostgreSQL 15 by default).
#
#   scripts/cluster.sh start DIR PORT [extra postgresql.conf lines...]
#   scripts/cluster.sh standby PRIMARY_DIR DIR PORT [extra postgresql.conf lines...]
#   scripts/cluster.sh recover BACKUP_DATA KEYS_FROM DIR PORT [extra postgresql.conf lines...]
#   scripts/cluster.sh stop DIR
#
# The cluster lives in DIR/data, owned by the `postgres` OS user (initdb refuses root). It listens
# on 127.0.0.1:PORT and on a Unix socket in DIR, has SSL on with a fresh self-signed
# certificate, preloads pg_cellcrypt, and keeps its key files in DIR/keys, outside the data
# directory. Authentication is `trust` for local and loopback connections: these clusters are
# throwaway and reachable only from this machine.
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
cmd=${1:?usage: cluster.sh start DIR PORT | standby PRIMARY_DIR DIR PORT | stop DIR}
dir=${2:?cluster directory}

# An upstream build (scripts/pg-major.sh) finds its own libraries through its binaries' RUNPATH,
# but the modules it loads do not: without this, PostgreSQL 18's walreceiver would load the
# system's older libpq, which refuses the `sslnegotiation` option pg_basebackup -R writes.
if [ -e "$PGBIN/../lib/libpq.so.5" ]; then
    LD_LIBRARY_PATH="$(cd "$PGBIN/../lib" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
fi
as_postgres() { runuser -u postgres -- "$@"; }

# Appends the extra postgresql.conf lines given after DIR, then starts the cluster in DIR/data.
append_and_start() {
    local d=$1
    shift
    for line in "$@"; do echo "$line" >>"$d/data/postgresql.conf"; done
    as_postgres "$PGBIN/pg_ctl" -D "$d/data" -l "$d/server.log" -w -t 120 start >/dev/null
}

case "$cmd" in
start)
    port=${3:?port}
    shift 3
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    chmod 700 "$dir"
    # shellcheck disable=SC2086 # INITDB_OPTS: extra initdb options, split on spaces
    as_postgres "$PGBIN/initdb" -D "$dir/data" --auth=trust --encoding=UTF8 --locale=C.UTF-8 ${INITDB_OPTS:-} >"$dir/initdb.log"
    (
        cd "$dir/data"
        openssl req -new -x509 -days 2 -nodes -subj /CN=localhost \
            -keyout server.key -out server.crt >/dev/null 2>&1
        chown postgres:postgres server.key server.crt
        chmod 600 server.key
    )
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
ssl = on
shared_preload_libraries = 'pg_cellcrypt'
pg_cellcrypt.key_directory = '$dir/keys'
fsync = off
CONF
    cat >"$dir/data/pg_hba.conf" <<HBA
local     all  all                trust
hostssl   all  all  127.0.0.1/32  trust
hostnossl all  all  127.0.0.1/32  trust
local     replication  all                trust
host      replication  all  127.0.0.1/32  trust
HBA
    append_and_start "$dir" "$@"
    ;;
standby)
    # A streaming standby of the cluster in PRIMARY_DIR, made with pg_basebackup. It has its own
    # socket directory and key directory (DIR/keys, empty: give it its key).
    primary=$dir
    dir=${3:?standby directory}
    port=${4:?port}
    shift 4
    rm -rf "$dir"
    mkdir -p "$dir/keys"
    chown postgres:postgres "$dir" "$dir/keys"
    chmod 700 "$dir" "$dir/keys"
    primary_port=$(sed -n "s/^port = \([0-9]*\)$/\1/p" "$primary/data/postgresql.conf" | tail -1)
    as_postgres "$PGBIN/pg_basebackup" -h "$primary" -p "$primary_port" -U postgres -D "$dir/data" -R -X stream -c fast >"$dir/basebackup.log" 2>&1
    cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$dir'
pg_cellcrypt.key_directory = '$dir/keys'
hot_standby = on
CONF
    append_and_start "$dir" "$@"
    ;;
recover)
    # A cluster recovered from a base backup (a plain-format pg_basebackup in BACKUP_DATA),
    # with recovery.signal: the extra lines give restore_command and the recovery target. Its
    # key directory DIR/keys starts as a copy of KEYS_FROM (the key files backed up).
    backup=$dir
    keys_from=${3:?key files to copy}
    dir=${4:?cluster directory}
    port=${5:?port}
    shift 5
    rm -rf "$dir"
    mkdir -p "$dir"
    cp -a "$backup" "$dir/data"
    cp -a "$keys_from" "$dir/keys"
    chown -R postgres:postgres "$dir"
    chmod 700 "$dir" "$dir/data" "$dir/keys"
    rm -f "$dir/data/postmaster.pid"
    touch "$dir/data/recovery.signal"
    cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$dir'
pg_cellcrypt.key_directory = '$dir/keys'
archive_mode = off
CONF
    chown postgres:postgres "$dir/data/postgresql.conf" "$dir/data/recovery.signal"
    append_and_start "$dir" "$@"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    ;;
*)
    echo "usage: cluster.sh start DIR PORT | standby PRIMARY_DIR DIR PORT | recover BACKUP_DATA KEYS_FROM DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
