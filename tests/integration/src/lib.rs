//! The integration harness: throwaway PostgreSQL clusters (Debian's 15, or the major in
//! `CELLCRYPT_PGBIN`) (via `scripts/cluster.sh`) with
//! pg_cellcrypt preloaded and SSL on, reached over TCP with and without SSL and over the Unix
//! socket through a real client library, plus psql and pg_dump for what they do best.
//!
//! Clusters run as the `postgres` OS user in `/tmp/pg_cellcrypt-it/<name>-<port>` and are
//! stopped and removed when the [`Cluster`] is dropped.

use postgres::config::SslMode;
use postgres::{Client, Config, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The `bin/` of the PostgreSQL the suites run against: `CELLCRYPT_PGBIN` (set by `make
/// test-integration PG=N` to that major's build), or Debian's PostgreSQL 15.
pub fn pgbin() -> PathBuf {
    PathBuf::from(std::env::var("CELLCRYPT_PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()))
}

/// The version of this repository's extension (Cargo.toml's package version).
pub fn cargo_version() -> String {
    let toml = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let line = toml.lines().find(|l| l.starts_with("version = ")).expect("the package version");
    line.trim_start_matches("version = ").trim_matches('"').to_owned()
}

/// The major version of [`pgbin`]'s server (14 to 18).
pub fn pg_major() -> u32 {
    let out = Command::new(pgbin().join("pg_config")).arg("--version").output().expect("pg_config");
    let v = String::from_utf8_lossy(&out.stdout);
    v.split_whitespace().nth(1).and_then(|v| v.split('.').next()).and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("pg_config --version: {v}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP to 127.0.0.1 without SSL.
    Tcp,
    /// TCP to 127.0.0.1 with SSL required.
    TcpSsl,
    /// The Unix-domain socket.
    Unix,
}

pub const ALL_TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::TcpSsl, Transport::Unix];

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The server's `bin/` (Debian's PostgreSQL 15 unless made with [`Cluster::start_on`]).
    pub bin: PathBuf,
}

fn check(out: Output, what: &str) -> String {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cluster {
    /// The next free port of this test process, and the cluster directory named after it.
    /// Ports lie below Linux's ephemeral range (32768 and up), where a client connection's own
    /// port could take one between this check and the server's start, and each is checked free.
    fn place(name: &str) -> (PathBuf, u16) {
        loop {
            let port = 20000 + (std::process::id() % 500) as u16 * 20 + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % 20;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return (PathBuf::from(format!("/tmp/pg_cellcrypt-it/{name}-{port}")), port);
            }
        }
    }

    /// Starts a fresh cluster; `extra` lines are appended to postgresql.conf.
    pub fn start(name: &str, extra: &[&str]) -> Cluster {
        Cluster::start_on(&pgbin(), name, extra)
    }

    /// As [`Cluster::start`], with the server in `bin` (another PostgreSQL build, see
    /// `scripts/pg-major.sh`).
    pub fn start_on(bin: &Path, name: &str, extra: &[&str]) -> Cluster {
        Cluster::start_with_initdb(bin, name, extra, "")
    }

    /// As [`Cluster::start_on`], with extra `initdb` options (`--no-data-checksums` for a
    /// PostgreSQL 18 cluster that pg_upgrade fills from a cluster without checksums).
    pub fn start_with_initdb(bin: &Path, name: &str, extra: &[&str], initdb_options: &str) -> Cluster {
        let (dir, port) = Cluster::place(name);
        std::fs::create_dir_all("/tmp/pg_cellcrypt-it").unwrap();
        let out = Command::new(repo().join("scripts/cluster.sh"))
            .env("PGBIN", bin)
            .env("INITDB_OPTS", initdb_options)
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .args(extra)
            .output()
            .unwrap();
        check(out, "starting the cluster");
        Cluster { dir, port, bin: bin.to_path_buf() }
    }

    /// A streaming standby of this cluster, made with pg_basebackup, with its own (empty) key
    /// directory; `extra` lines are appended to its postgresql.conf.
    pub fn standby(&self, name: &str, extra: &[&str]) -> Cluster {
        let (dir, port) = Cluster::place(name);
        let out = Command::new(repo().join("scripts/cluster.sh"))
            .env("PGBIN", &self.bin)
            .arg("standby")
            .arg(&self.dir)
            .arg(&dir)
            .arg(port.to_string())
            .args(extra)
            .output()
            .unwrap();
        check(out, "starting the standby");
        Cluster { dir, port, bin: self.bin.clone() }
    }

    /// A cluster recovered from `backup` (a plain-format base backup of this cluster), whose
    /// key directory starts as a copy of `keys_from`; `extra` lines (restore_command, the
    /// recovery target) are appended to its postgresql.conf. Started, it has reached its target.
    pub fn recover(&self, name: &str, backup: &Path, keys_from: &Path, extra: &[&str]) -> Cluster {
        let (dir, port) = Cluster::place(name);
        let out = Command::new(repo().join("scripts/cluster.sh"))
            .env("PGBIN", &self.bin)
            .arg("recover")
            .arg(backup)
            .arg(keys_from)
            .arg(&dir)
            .arg(port.to_string())
            .args(extra)
            .output()
            .unwrap();
        check(out, "recovering from the base backup");
        Cluster { dir, port, bin: self.bin.clone() }
    }

    /// Waits until `standby` has replayed everything this cluster has written so far.
    pub fn wait_replayed_by(&self, standby: &Cluster) {
        let lsn = self.psql("postgres", "SELECT pg_current_wal_lsn()").trim().to_owned();
        let started = std::time::Instant::now();
        while standby.psql("postgres", &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")).trim() != "t" {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "the standby did not replay up to {lsn}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn config(&self, how: Transport, db: &str) -> Config {
        let mut c = Config::new();
        c.user("postgres").dbname(db).port(self.port);
        match how {
            Transport::Tcp => c.host("127.0.0.1").ssl_mode(SslMode::Disable),
            Transport::TcpSsl => c.host("127.0.0.1").ssl_mode(SslMode::Require),
            Transport::Unix => c.host_path(&self.dir).ssl_mode(SslMode::Disable),
        };
        c
    }

    /// A client connected the given way, as the superuser `postgres`.
    pub fn connect(&self, how: Transport, db: &str) -> Client {
        self.connect_as(how, db, "postgres")
    }

    /// A client connected the given way, as `user`.
    pub fn connect_as(&self, how: Transport, db: &str, user: &str) -> Client {
        self.try_connect_as(how, db, user).unwrap_or_else(|e| panic!("connecting over {how:?} as {user}: {e}"))
    }

    pub fn try_connect_as(&self, how: Transport, db: &str, user: &str) -> Result<Client, postgres::Error> {
        let mut cfg = self.config(how, db);
        cfg.user(user);
        if how == Transport::TcpSsl {
            // The test clusters use a throwaway self-signed certificate.
            let tls = native_tls::TlsConnector::builder().danger_accept_invalid_certs(true).build().unwrap();
            cfg.connect(postgres_native_tls::MakeTlsConnector::new(tls))
        } else {
            cfg.connect(NoTls)
        }
    }

    /// Runs SQL through psql over the Unix socket and returns its output, panicking on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        check(self.psql_raw(db, sql), "psql")
    }

    /// Runs SQL through psql; the caller inspects success and stderr.
    pub fn psql_raw(&self, db: &str, sql: &str) -> Output {
        self.psql_command(db).arg("-c").arg(sql).output().unwrap()
    }

    /// Runs several commands through one psql session, each in its own transaction (`-c` each).
    pub fn psql_raw_many(&self, db: &str, commands: &[&str]) -> Output {
        let mut cmd = self.psql_command(db);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        cmd.output().unwrap()
    }

    /// Runs a SQL file (a plain-format dump, say) through psql, panicking on error.
    pub fn psql_file(&self, db: &str, file: &Path) {
        check(self.psql_command(db).arg("-f").arg(file).output().unwrap(), "psql -f");
    }

    /// psql over the Unix socket, unaligned and tuples-only, stopping at the first error.
    fn psql_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db);
        cmd
    }

    pub fn createdb(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {db}"));
    }

    /// A database with the extension created.
    pub fn database_with_extension(&self, db: &str) {
        self.createdb(db);
        self.psql(db, "CREATE EXTENSION pg_cellcrypt");
    }

    /// pg_dump in plain format, extra arguments appended.
    pub fn pg_dump(&self, db: &str, args: &[&str]) -> String {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["-U", "postgres", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .arg(db)
            .output()
            .unwrap();
        check(out, "pg_dump")
    }

    /// pg_restore of a custom-format dump file into `db`.
    pub fn pg_restore(&self, db: &str, file: &Path) {
        let out = Command::new(self.bin.join("pg_restore"))
            .args(["-U", "postgres", "--exit-on-error", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg(file)
            .output()
            .unwrap();
        check(out, "pg_restore");
    }

    /// Waits until the re-encryption after a key change has finished and retired the older
    /// keys (at most two minutes).
    pub fn wait_reencrypted(&self, db: &str) {
        let started = std::time::Instant::now();
        loop {
            let s = self.psql(db, "SELECT reencryption FROM data_encryption_status");
            if s.trim() == "complete" {
                return;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "re-encryption did not finish: {s}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The running server's major version (`server_version_num` / 10000).
    pub fn server_major(&self) -> u32 {
        self.psql("postgres", "SHOW server_version_num").trim().parse::<u32>().unwrap() / 10000
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("server.log")).unwrap_or_default()).into_owned()
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(args)
            .output()
            .unwrap();
        check(out, "pg_ctl");
    }

    pub fn restart(&self) {
        self.pg_ctl(&["-w", "-t", "60", "restart"]);
    }

    /// A clean shutdown (`-m fast`).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    pub fn stop_immediate(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["-w", "-t", "60", "start"]);
    }

    /// The data directory path of a table's main fork.
    pub fn relation_file(&self, db: &str, table: &str) -> PathBuf {
        let rel = self.psql(db, &format!("SELECT pg_relation_filepath('{table}')"));
        self.dir.join("data").join(rel.trim())
    }

    /// Waits (at most `seconds`) until the boolean query `sql`, run in `db`, answers true.
    pub fn wait_until(&self, db: &str, sql: &str, seconds: u64) -> bool {
        let started = std::time::Instant::now();
        while self.psql(db, sql).trim() != "t" {
            if started.elapsed() > std::time::Duration::from_secs(seconds) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    /// The key files of the `file` provider.
    pub fn key_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/cluster.sh")).env("PGBIN", &self.bin).arg("stop").arg(&self.dir).output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("cluster kept for inspection: {}", self.dir.display());
        }
    }
}

/// A fresh directory `/tmp/pg_cellcrypt-it/<name>-<test process id>` owned by the `postgres` OS
/// user (a fake KMS, a WAL archive), with `files` written into it, readable by the server only.
pub fn server_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/pg_cellcrypt-it/{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    let owned = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap().success()
        && Command::new("chmod").args(["-R", "go-rwx"]).arg(&dir).status().unwrap().success();
    assert!(owned, "could not hand {} to the postgres user", dir.display());
    dir
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Every file under `dir`, read whole.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(read_tree(&p));
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

/// The server's error from a failed call.
pub fn db_error<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> postgres::error::DbError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.as_db_error().cloned().unwrap_or_else(|| panic!("not a server error: {e}")),
    }
}

/// A literal of each plain type and of each type pg_cast lets PostgreSQL assign to one of them
/// (by `format_type` name): what the cast tests (`drivers.rs`, `security.rs`) cast.
pub const SAMPLES: &[(&str, &str)] = &[
    ("text", "'text value'"),
    ("bytea", "'\\x00ff'"),
    ("jsonb", "'{\"k\": 1}'"),
    ("character varying", "'varchar value'"),
    ("character", "'bpchar value  '"),
    ("name", "'a name'"),
    ("boolean", "true"),
    ("xml", "'<a>x</a>'"),
    ("cidr", "'10.0.0.0/8'"),
    ("inet", "'10.1.2.3/16'"),
    ("json", "'{\"b\": [1, 2], \"a\": 1}'"),
    ("real", "5.5"),
    ("double precision", "1234567.125"),
    ("money", "'12.34'"),
    ("numeric", "42.7"),
    ("timestamp without time zone", "'2030-03-10 02:30'"),
    ("timestamp with time zone", "'2030-03-10 02:30+00'"),
    ("date", "'2030-03-10'"),
    ("bigint", "9007199254740993"),
    ("integer", "-7"),
    ("smallint", "7"),
    ("oid", "4000000000"),
    ("regproc", "'1'"),
    ("regprocedure", "'1'"),
    ("regoper", "'1'"),
    ("regoperator", "'1'"),
    ("regclass", "'1'"),
    ("regtype", "'1'"),
    ("regconfig", "'1'"),
    ("regdictionary", "'1'"),
    ("regnamespace", "'1'"),
    ("regrole", "'1'"),
    ("regcollation", "'1'"),
];

/// A table `t` with a column of every encrypted type, 300 rows (with `people`, the fixture of
/// the upgrade suites).
pub const ALL_TYPES_FILL: &str = "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, n encrypted_numeric, \
     i encrypted_int8, d encrypted_date, ts encrypted_timestamptz, b encrypted_bytea); \
     INSERT INTO t SELECT g, 'value ' || g, jsonb_build_object('g', g), g * 1.5, g::int8 * 1000000007, \
     date '2000-01-01' + g, timestamptz '2024-02-29 12:00:00+00' + g * interval '1 hour', \
     decode(md5(g::text), 'hex') FROM generate_series(1, 300) g; \
     CREATE TABLE people (id int PRIMARY KEY, email encrypted_text); \
     INSERT INTO people SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100) g";
/// [`ALL_TYPES_DIGEST`] and [`PEOPLE_DIGEST`] of `db`.
pub fn all_types_digests(c: &Cluster, db: &str) -> (String, String) {
    (c.psql(db, ALL_TYPES_DIGEST), c.psql(db, PEOPLE_DIGEST))
}

/// The row count and a digest of every decrypted value of `t`.
pub const ALL_TYPES_DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s) || '/' || decrypt(j)::text || '/' || decrypt(n) \
     || '/' || decrypt(i) || '/' || decrypt(d) || '/' || decrypt(ts) || '/' || encode(decrypt(b), 'hex'), ',' ORDER BY id)) FROM t";
/// The same for `people`.
pub const PEOPLE_DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email), ',' ORDER BY id)) FROM people";

/// Looks up ' USER7@example.com' in `people` through its blind index, with sequential scans
/// off, and checks that the plan uses the index `people_email_bidx` (so that the index, not a
/// recomputation row by row, answers). Returns the ids found.
pub fn blind_index_lookup(c: &Cluster, db: &str) -> String {
    let q = "SELECT id FROM people WHERE blind_index(email) = blind_index(' USER7@example.com', 'people', 'email')";
    let plan = c.psql(db, &format!("SET enable_seqscan = off; EXPLAIN (COSTS OFF) {q}"));
    assert!(plan.contains("people_email_bidx"), "{db}: the blind index answers: {plan}");
    c.psql(db, &format!("SET enable_seqscan = off; {q}")).trim().to_owned()
}

/// Every object of the extension in `db`, one line each, with what defines it, by name (never
/// by OID), so that two databases compare: functions (arguments with names and defaults,
/// result, kind, volatility, strictness, leakproofness, parallel safety, cost, SECURITY
/// DEFINER, settings, language, body, library symbol, privileges), casts, types (I/O and typmod
/// functions, storage, alignment, element, default, collation, privileges), tables, views and
/// sequences (owner, persistence, options, columns with their defaults, identity, generation,
/// collation, storage and privileges; view text; indexes, constraints, triggers, policies;
/// sequence parameters), schemas, event triggers, operators, the initial privileges pg_dump
/// reads (pg_init_privs), comments, and the extension's own row (what pg_dump dumps of it).
/// Privileges are compared as they take effect: an ACL or initial ACL that is absent counts as
/// the default one (`acldefault`). pg_upgrade from 15 to 17 or 18 leaves the tables whose ACL
/// was the owner's own privileges with no ACL at all, which grants exactly the same, while a
/// fresh install writes the same privileges out.
pub const EXTENSION_CATALOG: &str = r#"
WITH ext AS (SELECT oid, extowner, extnamespace, extrelocatable, extconfig, extcondition FROM pg_catalog.pg_extension WHERE extname = 'pg_cellcrypt'),
m AS (SELECT d.classid, d.objid, d.objsubid FROM pg_catalog.pg_depend d, ext
      WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
        -- Array types and tables' row types: PostgreSQL 17 and later record them as members
        -- (pg_upgrade into 17 adds them), earlier majors do not; their element type or table
        -- is compared.
        AND NOT EXISTS (SELECT FROM pg_catalog.pg_type y WHERE d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND y.oid = d.objid
                                                          AND (y.typcategory = 'A'
                                                               OR EXISTS (SELECT FROM pg_catalog.pg_class r WHERE r.oid = y.typrelid AND r.relkind <> 'c')))),
lines AS (
  SELECT pg_catalog.pg_describe_object(m.classid, m.objid, m.objsubid) || ' | ' || coalesce(CASE m.classid
    WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('(%s) -> %s kind=%s vol=%s strict=%s leakproof=%s parallel=%s cost=%s rows=%s secdef=%s config=%s lang=%s body=%s bin=%s owner=%s acl=%s init_privs=%s',
             pg_catalog.pg_get_function_arguments(p.oid), pg_catalog.pg_get_function_result(p.oid), p.prokind, p.provolatile, p.proisstrict,
             p.proleakproof, p.proparallel, p.procost, p.prorows, p.prosecdef, p.proconfig, l.lanname, pg_catalog.md5(p.prosrc), p.probin,
             p.proowner::pg_catalog.regrole, coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner)),
             coalesce((SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip WHERE ip.classoid = m.classid AND ip.objoid = m.objid AND ip.objsubid = 0), pg_catalog.acldefault('f', p.proowner)))
      FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang WHERE p.oid = m.objid)
    WHEN 'pg_catalog.pg_cast'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('func=%s context=%s method=%s', nullif(c.castfunc, 0)::pg_catalog.regprocedure, c.castcontext, c.castmethod)
      FROM pg_catalog.pg_cast c WHERE c.oid = m.objid)
    WHEN 'pg_catalog.pg_type'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('type=%s len=%s byval=%s in=%s out=%s recv=%s send=%s typmod_in=%s typmod_out=%s analyze=%s align=%s storage=%s category=%s preferred=%s elem=%s default=%s collation=%s owner=%s acl=%s init_privs=%s',
             t.typtype, t.typlen, t.typbyval, t.typinput, t.typoutput, t.typreceive, t.typsend, t.typmodin, t.typmodout, t.typanalyze, t.typalign, t.typstorage,
             t.typcategory, t.typispreferred, nullif(t.typelem, 0)::pg_catalog.regtype, t.typdefault, nullif(t.typcollation, 0), t.typowner::pg_catalog.regrole, coalesce(t.typacl, pg_catalog.acldefault('T', t.typowner)),
             coalesce((SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip WHERE ip.classoid = m.classid AND ip.objoid = m.objid AND ip.objsubid = 0), pg_catalog.acldefault('T', t.typowner)))
      FROM pg_catalog.pg_type t WHERE t.oid = m.objid)
    WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('kind=%s owner=%s persistence=%s options=%s acl=%s init_privs=%s rls=%s/%s columns=%s view=%s indexes=%s constraints=%s triggers=%s policies=%s sequence=%s',
             c.relkind, c.relowner::pg_catalog.regrole, c.relpersistence, c.reloptions,
             coalesce(c.relacl, pg_catalog.acldefault(CASE c.relkind WHEN 'S' THEN 's'::"char" ELSE 'r'::"char" END, c.relowner)),
             coalesce((SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip WHERE ip.classoid = m.classid AND ip.objoid = m.objid AND ip.objsubid = 0), pg_catalog.acldefault(CASE c.relkind WHEN 'S' THEN 's'::"char" ELSE 'r'::"char" END, c.relowner)), c.relrowsecurity, c.relforcerowsecurity,
             (SELECT pg_catalog.string_agg(pg_catalog.format('%s %s notnull=%s default=%s identity=%s generated=%s collation=%s storage=%s acl=%s',
                                   a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid),
                                   a.attidentity, a.attgenerated, nullif(a.attcollation, 0), a.attstorage, a.attacl), ', ' ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
             CASE WHEN c.relkind = 'v' THEN pg_catalog.md5(pg_catalog.pg_get_viewdef(c.oid)) END,
             (SELECT pg_catalog.string_agg(x, '; ' ORDER BY x) FROM (SELECT pg_catalog.pg_get_indexdef(i.indexrelid) AS x FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid) q),
             (SELECT pg_catalog.string_agg(x, '; ' ORDER BY x) FROM (SELECT o.conname || ' ' || pg_catalog.pg_get_constraintdef(o.oid) AS x FROM pg_catalog.pg_constraint o WHERE o.conrelid = c.oid) q),
             (SELECT pg_catalog.string_agg(x, '; ' ORDER BY x) FROM (SELECT pg_catalog.pg_get_triggerdef(g.oid) || ' enabled=' || g.tgenabled::text AS x FROM pg_catalog.pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal) q),
             (SELECT pg_catalog.string_agg(x, '; ' ORDER BY x) FROM (SELECT pg_catalog.format('%s %s permissive=%s %s %s %s', y.polname, y.polcmd, y.polpermissive, y.polroles::pg_catalog.regrole[], pg_catalog.pg_get_expr(y.polqual, y.polrelid), pg_catalog.pg_get_expr(y.polwithcheck, y.polrelid)) AS x
              FROM pg_catalog.pg_policy y WHERE y.polrelid = c.oid) q),
             (SELECT pg_catalog.format('%s start=%s inc=%s min=%s max=%s cache=%s cycle=%s', q.seqtypid::pg_catalog.regtype, q.seqstart, q.seqincrement, q.seqmin, q.seqmax, q.seqcache, q.seqcycle)
              FROM pg_catalog.pg_sequence q WHERE q.seqrelid = c.oid))
      FROM pg_catalog.pg_class c WHERE c.oid = m.objid)
    WHEN 'pg_catalog.pg_namespace'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('owner=%s acl=%s init_privs=%s', n.nspowner::pg_catalog.regrole, coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner)),
             coalesce((SELECT ip.initprivs FROM pg_catalog.pg_init_privs ip WHERE ip.classoid = m.classid AND ip.objoid = m.objid AND ip.objsubid = 0), pg_catalog.acldefault('n', n.nspowner))) FROM pg_catalog.pg_namespace n WHERE n.oid = m.objid)
    WHEN 'pg_catalog.pg_event_trigger'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('event=%s func=%s enabled=%s tags=%s', e.evtevent, e.evtfoid::pg_catalog.regprocedure, e.evtenabled, e.evttags)
      FROM pg_catalog.pg_event_trigger e WHERE e.oid = m.objid)
    WHEN 'pg_catalog.pg_operator'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('func=%s commutator=%s negator=%s', o.oprcode, o.oprcom::pg_catalog.regoperator, o.oprnegate::pg_catalog.regoperator)
      FROM pg_catalog.pg_operator o WHERE o.oid = m.objid)
    END, '')
    || ' | comment=' || coalesce((SELECT pg_catalog.md5(ds.description) FROM pg_catalog.pg_description ds
                                  WHERE ds.classoid = m.classid AND ds.objoid = m.objid AND ds.objsubid = 0), '') AS line
  FROM m
  UNION ALL
  SELECT pg_catalog.format('extension: owner=%s schema=%s relocatable=%s dumps=%s where=%s', ext.extowner::pg_catalog.regrole, ext.extnamespace::pg_catalog.regnamespace, ext.extrelocatable,
         (SELECT pg_catalog.string_agg(x::pg_catalog.regclass::text, ', ' ORDER BY x::pg_catalog.regclass::text) FROM pg_catalog.unnest(ext.extconfig) x),
         pg_catalog.array_to_string(ext.extcondition, ' / '))
  FROM ext
)
SELECT line FROM lines ORDER BY line
"#;

/// [`EXTENSION_CATALOG`] of `db`.
pub fn extension_catalog(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(db, EXTENSION_CATALOG).lines().map(str::to_owned).collect()
}

/// Panics, listing the lines that differ, unless two [`extension_catalog`]s are equal.
pub fn assert_same_catalog(what: &str, got: &[String], fresh: &[String]) {
    assert!(fresh.len() > 100, "the catalog query sees the extension: {} lines", fresh.len());
    let only_got: Vec<_> = got.iter().filter(|l| !fresh.contains(l)).collect();
    let only_fresh: Vec<_> = fresh.iter().filter(|l| !got.contains(l)).collect();
    assert!(
        only_got.is_empty() && only_fresh.is_empty(),
        "{what} differs from a fresh install.\nonly in {what}:\n{}\nonly in a fresh install:\n{}",
        only_got.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"),
        only_fresh.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
    );
}
