//! No committed value is ever lost: key changes and rotations that roll back (whole, to a
//! savepoint, in a PL/pgSQL EXCEPTION block) leave the session on the committed keys while an
//! earlier savepoint's change still commits; no encrypted value is stored in the catalog or
//! nested where re-encryption cannot reach it; tables created during a change are re-encrypted
//! before the old key goes, and materialized views and prepared transactions hold retirement
//! back; DROP and CREATE EXTENSION (as `pg_restore --clean` runs them) keep the key. Each ends
//! by reading every committed value back from a fresh session after a restart.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;


/// A checksum of every committed plaintext of table `t`.
const DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s), ',' ORDER BY id)) FROM t";

fn cluster(name: &str, extra: &[&str]) -> Cluster {
    let mut conf: Vec<&str> = Vec::new();
    conf.extend_from_slice(extra);
    let c = Cluster::start(name, &conf);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text); INSERT INTO t SELECT g, 'value ' || g FROM generate_series(1, 200) g");
    c
}

fn current_version(c: &Cluster) -> i32 {
    c.psql("app", "SELECT key_version FROM data_encryption_status").trim().parse().unwrap()
}

/// Every committed value reads back, from a fresh session after a restart.
fn reads_back_after_restart(c: &Cluster, digest: &str) {
    c.restart();
    assert_eq!(c.psql("app", DIGEST), digest, "after a restart");
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(s) <> (SELECT key_version FROM data_encryption_status)").trim(), "0");
}

#[test]
fn rolled_back_changes_leave_the_session_on_the_committed_keys() {
    let c = cluster("rollback", &[]);
    let mut s = c.connect(Transport::Unix, "app");

    // ROLLBACK of a change: the same session keeps sealing with the committed key.
    s.batch_execute("BEGIN; SELECT set_data_encryption_key(generate_data_encryption_key()); ROLLBACK").unwrap();
    s.batch_execute("INSERT INTO t VALUES (1001, 'after a rolled-back change')").unwrap();
    let v: i32 = s.query_one("SELECT encryption_key_version(s) FROM t WHERE id = 1001", &[]).unwrap().get(0);
    assert_eq!(v, 1, "sealed under the committed key, not the rolled-back one");

    // ROLLBACK TO SAVEPOINT, and a PL/pgSQL EXCEPTION block, likewise.
    s.batch_execute("BEGIN; SAVEPOINT a; SELECT set_data_encryption_key(generate_data_encryption_key()); ROLLBACK TO SAVEPOINT a; INSERT INTO t VALUES (1002, 'after a savepoint'); COMMIT").unwrap();
    s.batch_execute(
        "DO $$ BEGIN PERFORM set_data_encryption_key(generate_data_encryption_key()); RAISE EXCEPTION 'undo'; \
         EXCEPTION WHEN raise_exception THEN NULL; END $$; INSERT INTO t VALUES (1003, 'after an exception block')",
    )
    .unwrap();
    // An index key rotation rolled back to a savepoint.
    s.batch_execute("BEGIN; SAVEPOINT a; SELECT rotate_blind_index_key(); ROLLBACK TO SAVEPOINT a; COMMIT").unwrap();
    let versions: String = s.query_one("SELECT string_agg(DISTINCT encryption_key_version(s)::text, ',') FROM t", &[]).unwrap().get(0);
    assert_eq!(versions, "1");
    assert_eq!(current_version(&c), 1);

    // Other sessions read everything; the next real change does not reuse a version that was
    // handed out and rolled back in a way that could collide.
    let digest = c.psql("app", DIGEST);
    assert!(digest.starts_with("203:"), "{digest}");

    // A change, then a later savepoint that rolls back: the change still commits, with all its
    // effects (key file, other sessions, re-encryption).
    s.batch_execute(
        "BEGIN; SELECT set_data_encryption_key(generate_data_encryption_key()); SAVEPOINT b; \
         SELECT rotate_blind_index_key(); ROLLBACK TO SAVEPOINT b; INSERT INTO t VALUES (1004, 'inside the change'); COMMIT",
    )
    .unwrap();
    assert_eq!(current_version(&c), 2);
    c.wait_reencrypted("app");
    let digest = c.psql("app", DIGEST);
    assert!(digest.starts_with("204:"), "{digest}");
    reads_back_after_restart(&c, &digest);

    // Key calls refuse read-only transactions before they touch anything (25006).
    let mut s = c.connect(Transport::Unix, "app");
    let e = db_error(s.batch_execute("BEGIN READ ONLY; SELECT set_data_encryption_key(generate_data_encryption_key())"));
    assert_eq!(e.code(), &SqlState::READ_ONLY_SQL_TRANSACTION, "{}", e.message());
    s.batch_execute("ROLLBACK").unwrap();
    assert_eq!(current_version(&c), 2);

    // Key calls cannot be prepared for two-phase commit.
    let c2 = cluster("prepared", &["max_prepared_transactions = 2"]);
    let mut s = c2.connect(Transport::Unix, "app");
    let e = db_error(s.batch_execute("BEGIN; SELECT set_data_encryption_key(generate_data_encryption_key()); PREPARE TRANSACTION 'k'"));
    assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{}", e.message());
    assert_eq!(c2.psql("app", "SELECT count(*) FROM pg_prepared_xacts").trim(), "0");
    assert_eq!(current_version(&c2), 1);
}

#[test]
fn no_encrypted_value_is_stored_in_the_catalog_or_nested_in_other_types() {
    let c = cluster("catalog", &[]);
    let mut s = c.connect(Transport::Unix, "app");
    s.batch_execute("CREATE TABLE t2 (s encrypted_text)").unwrap();
    for ddl in [
        "CREATE TABLE d1 (id int, note encrypted_text DEFAULT 'none')",
        "ALTER TABLE t ADD COLUMN note encrypted_text DEFAULT 'none'",
        "CREATE VIEW v1 AS SELECT id, 'constant'::encrypted_text AS c FROM t",
        "CREATE RULE r1 AS ON INSERT TO t DO ALSO INSERT INTO t2 VALUES ('x'::encrypted_text)",
        "CREATE DOMAIN d_default AS text DEFAULT 'x'",
        "CREATE FUNCTION f1() RETURNS encrypted_text LANGUAGE sql BEGIN ATOMIC SELECT 'x'::encrypted_text; END",
        "CREATE DOMAIN secret AS encrypted_text",
        "CREATE TYPE pair AS (a int, b encrypted_text)",
        "CREATE TABLE arr (id int, tags encrypted_text[])",
        "CREATE TABLE ctas AS SELECT array_agg(s) AS all_s FROM t",
    ] {
        let r = s.batch_execute(ddl);
        if ddl.starts_with("CREATE DOMAIN d_default") {
            r.unwrap_or_else(|e| panic!("{ddl}: a plain domain is fine: {e}"));
            continue;
        }
        let e = db_error(r);
        assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{ddl}: {}", e.message());
        assert!(e.hint().is_some_and(|h| !h.is_empty()), "{ddl}");
    }
    // What is allowed: a DEFAULT of the plain type, encrypted for each row.
    s.batch_execute("ALTER TABLE t ADD COLUMN note encrypted_text DEFAULT 'none'::text; INSERT INTO t (id, s) VALUES (2001, 'x'), (2002, 'y')").unwrap();
    let distinct: i64 = s.query_one("SELECT count(DISTINCT format('%s', note)) FROM t WHERE id > 2000", &[]).unwrap().get(0);
    assert_eq!(distinct, 2, "each row's default is encrypted on its own (distinct envelopes)");

    // A prepared statement and a PL/pgSQL function that seal a literal at parse time: after a
    // key change and its retirement, their next run seals under the current key.
    s.batch_execute(
        "PREPARE ins(int) AS INSERT INTO t (id, s) VALUES ($1, 'prepared literal'::encrypted_text); EXECUTE ins(3001); \
         CREATE FUNCTION ins_fn(i int) RETURNS void LANGUAGE plpgsql AS $$ BEGIN INSERT INTO t (id, s) VALUES (i, 'plpgsql literal'::encrypted_text); END $$; \
         SELECT ins_fn(3002)",
    )
    .unwrap();
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    s.batch_execute("EXECUTE ins(3003); SELECT ins_fn(3004)").unwrap();
    let v: String = s.query_one("SELECT string_agg(encryption_key_version(s)::text, ',' ORDER BY id) FROM t WHERE id IN (3003, 3004)", &[]).unwrap().get(0);
    assert_eq!(v, "2,2");
    let digest = c.psql("app", DIGEST);
    assert!(digest.starts_with("206:"), "{digest}");
    reads_back_after_restart(&c, &digest);
}

/// `data_encryption_status.reencryption` once it satisfies `done` (or after a minute).
fn status_once(c: &Cluster, done: impl Fn(&str) -> bool) -> String {
    status_within(c, 60, done)
}

#[test]
fn retirement_reaches_new_tables_and_waits_for_what_it_cannot_read() {
    let c = cluster("retire", &["max_prepared_transactions = 2", "pg_cellcrypt.reencrypt_pause = '200ms'", "pg_cellcrypt.reencrypt_batch_size = 50"]);
    c.psql("app", "CREATE MATERIALIZED VIEW mv AS SELECT id, s FROM t");
    // A prepared transaction that wrote under the old key, and a session with a temp table.
    let mut p = c.connect(Transport::Unix, "app");
    p.batch_execute("BEGIN; INSERT INTO t VALUES (5000, 'prepared'); PREPARE TRANSACTION 'p1'").unwrap();
    let mut temp = c.connect(Transport::Unix, "app");
    temp.batch_execute("CREATE TEMP TABLE tt (s encrypted_text); INSERT INTO tt VALUES ('temp')").unwrap();

    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    // Tables made while the change runs, with old-key values copied in.
    let mut old = c.connect(Transport::Unix, "app");
    old.batch_execute("CREATE TABLE made_during AS SELECT id, s FROM t WHERE id <= 10").unwrap();

    // Retirement waits, and says why.
    let status = status_once(&c, |s| s.starts_with("waiting"));
    assert!(status.contains("prepared transaction") || status.contains("temporary table"), "{status}");
    p.batch_execute("COMMIT PREPARED 'p1'").unwrap();
    drop(temp);
    // Then the materialized view holds it back until it is refreshed.
    let status = status_once(&c, |s| s.contains("REFRESH MATERIALIZED VIEW"));
    assert!(status.contains("REFRESH MATERIALIZED VIEW public.mv"), "{status}");
    c.psql("app", "REFRESH MATERIALIZED VIEW mv");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", "SELECT count(*) FROM made_during WHERE encryption_key_version(s) <> 2").trim(), "0");
    assert_eq!(c.psql("app", "SELECT count(*) FROM mv WHERE encryption_key_version(s) <> 2").trim(), "0");
    assert_eq!(c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY id)) FROM made_during"), c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY id)) FROM t WHERE id <= 10"));
    let digest = c.psql("app", DIGEST);
    assert!(digest.starts_with("201:"), "{digest}");
    reads_back_after_restart(&c, &digest);
}

#[test]
fn drop_and_create_extension_keep_the_key_as_pg_restore_clean_does() {
    let c = cluster("clean", &[]);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let digest = c.psql("app", DIGEST);
    let dump = c.dir.join("app.dump");
    let out = std::process::Command::new(cellcrypt_integration::pgbin().join("pg_dump"))
        .args(["-U", "postgres", "-Fc", "-h"])
        .arg(&c.dir)
        .arg("-p")
        .arg(c.port.to_string())
        .arg("-f")
        .arg(&dump)
        .arg("app")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(cellcrypt_integration::pgbin().join("pg_restore"))
        .args(["-U", "postgres", "--clean", "--if-exists", "--exit-on-error", "-h"])
        .arg(&c.dir)
        .arg("-p")
        .arg(c.port.to_string())
        .args(["-d", "app"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Readable at once, with the same key: nothing had to be restored by hand.
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(c.psql("app", DIGEST), digest);
    assert_eq!(c.psql("app", "SELECT retrieve_data_encryption_key()").trim(), key);
    reads_back_after_restart(&c, &digest);
}

#[test]
fn the_none_provider_never_commits_a_key_the_shared_cache_cannot_hold() {
    // With provider "none" a key lives only in the shared cache (64 slots). The 65th database
    // is refused before anything commits; a dropped database's slot is then reused.
    let mut conf: Vec<&str> = Vec::new();
    conf.push("pg_cellcrypt.key_provider = none");
    let c = Cluster::start("cache", &conf);
    c.createdb("tmpl");
    for i in 1..=64 {
        c.psql("postgres", &format!("CREATE DATABASE d{i} TEMPLATE tmpl"));
        let out = c.psql_raw(&format!("d{i}"), "CREATE EXTENSION pg_cellcrypt");
        assert!(out.status.success(), "d{i}: {}", String::from_utf8_lossy(&out.stderr));
    }
    c.psql("postgres", "CREATE DATABASE d65 TEMPLATE tmpl");
    let mut s = c.connect(Transport::Unix, "d65");
    let e = db_error(s.batch_execute("CREATE EXTENSION pg_cellcrypt"));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_RESOURCES, "{}", e.message());
    drop(s);
    // Every database that has a key still has it, readable from a fresh session.
    c.psql("d1", "CREATE TABLE t (id int, s encrypted_text); INSERT INTO t VALUES (1, 'kept')");
    assert_eq!(c.psql("d1", "SELECT decrypt(s) FROM t").trim(), "kept");
    // A dropped database's slot goes to the next database that needs one.
    c.psql("postgres", "DROP DATABASE d64");
    c.psql("d65", "CREATE EXTENSION pg_cellcrypt; CREATE TABLE t (id int, s encrypted_text); INSERT INTO t VALUES (1, 'new')");
    assert_eq!(c.psql("d65", "SELECT decrypt(s) FROM t").trim(), "new");
    assert_eq!(c.psql("d1", "SELECT decrypt(s) FROM t").trim(), "kept");
}

#[test]
fn a_database_made_from_an_encrypted_template_waits_for_the_key_then_can_get_its_own() {
    let c = cluster("template", &[]);
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let digest = c.psql("app", DIGEST);
    c.psql("postgres", "CREATE DATABASE copy TEMPLATE app");
    // The copy has the template's keyring and data, but no key of its own: unreadable.
    assert_eq!(c.psql("copy", "SELECT is_data_encryption_active()").trim(), "f");
    let mut s = c.connect(Transport::Unix, "copy");
    let e = db_error(s.query_one("SELECT decrypt(s) FROM t LIMIT 1", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    drop(s);
    // Restoring the template's key makes it readable: the two now share that key.
    let msg = c.psql("copy", &format!("SELECT set_data_encryption_key('{key}')"));
    assert!(msg.contains("restored"), "{msg}");
    assert_eq!(c.psql("copy", DIGEST), digest);
    // A key change gives the copy its own key; the template keeps its own.
    c.psql("copy", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("copy");
    assert_ne!(c.psql("copy", "SELECT retrieve_data_encryption_key()").trim(), key);
    assert_eq!(c.psql("app", "SELECT retrieve_data_encryption_key()").trim(), key);
    c.restart();
    assert_eq!(c.psql("copy", DIGEST), digest);
    assert_eq!(c.psql("app", DIGEST), digest);
}

/// The output of `sql` in `app` through psql, or its error.
fn try_psql(c: &Cluster, sql: &str) -> Result<String, String> {
    let out = c.psql_raw("app", sql);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// [`DIGEST`] of another table with columns `id` and `s`, or the error reading it.
fn digest_of(c: &Cluster, table: &str) -> Result<String, String> {
    try_psql(c, &format!("{} FROM {table}", DIGEST.strip_suffix(" FROM t").unwrap()))
}

/// How many values of `table` (column `s`) are not under the current key.
fn not_current(c: &Cluster, table: &str) -> String {
    c.psql("app", &format!("SELECT count(*) FROM {table} WHERE encryption_key_version(s) <> (SELECT key_version FROM data_encryption_status)")).trim().to_owned()
}

/// `data_encryption_status.reencryption` once it satisfies `done`, or after `seconds`.
fn status_within(c: &Cluster, seconds: u64, done: impl Fn(&str) -> bool) -> String {
    let started = std::time::Instant::now();
    loop {
        let s = c.psql("app", "SELECT reencryption FROM data_encryption_status").trim().to_owned();
        if done(&s) || started.elapsed() > std::time::Duration::from_secs(seconds) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}


#[test]
fn retirement_waits_for_a_snapshot_taken_after_the_work_started() {
    let c = cluster("snapshot", &[]);
    c.psql("app", "CREATE TABLE t2 (id int, s encrypted_text)");
    let digest = c.psql("app", DIGEST);
    // L, a transaction from before the change, holds every row of t: the worker's batch on t
    // waits for it.
    let mut l = c.connect(Transport::Unix, "app");
    l.batch_execute("BEGIN; SELECT * FROM t FOR UPDATE").unwrap();
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(
        c.wait_until("app", "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'pg_cellcrypt re-encryption' AND wait_event_type = 'Lock'", 15),
        "the worker did not wait for L's row locks"
    );
    // B: a snapshot taken after the work started, while t's rows are all still under the old key.
    let mut b = c.connect(Transport::Unix, "app");
    b.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t").unwrap();
    l.batch_execute("COMMIT").unwrap();
    // Time for the worker to finish what it can; the old key must outlive B's snapshot.
    let status = status_within(&c, 6, |s| s == "complete");
    b.batch_execute("INSERT INTO t2 SELECT id, s FROM t; COMMIT")
        .unwrap_or_else(|e| panic!("B copying t into t2 (status before: {status}): {e}"));
    c.wait_reencrypted("app");
    reads_back_after_restart(&c, &digest);
    assert_eq!(
        digest_of(&c, "t2"),
        Ok(digest.clone()),
        "every value B copied from its snapshot reads back after a restart (status while B's snapshot was open: {status})"
    );
    assert_eq!(not_current(&c, "t2"), "0", "values of t2 left under the old key");
}

#[test]
fn a_transaction_prepared_after_the_work_started_holds_retirement() {
    let c = cluster("prepared-late", &["max_prepared_transactions = 2"]);
    c.psql("app", "CREATE TABLE t2 (id int, s encrypted_text)");
    let digest = c.psql("app", DIGEST);
    // Old-key values written before the change, in a transaction prepared after the work started.
    let mut p = c.connect(Transport::Unix, "app");
    p.batch_execute("BEGIN; INSERT INTO t2 SELECT id, s FROM t").unwrap();
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(
        c.wait_until("app", "SELECT count(*) > 0 FROM cellcrypt.reencryption_job WHERE started_at IS NOT NULL", 15),
        "the re-encryption did not start"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.batch_execute("PREPARE TRANSACTION 'late'").unwrap();
    let status = status_within(&c, 6, |s| s == "complete");
    assert_ne!(status, "complete", "the old key was retired while prepared transaction 'late' (old-key values of t2) was still to commit");
    p.batch_execute("COMMIT PREPARED 'late'").unwrap();
    c.wait_reencrypted("app");
    assert_eq!(not_current(&c, "t2"), "0", "values of t2 left under the old key");
    reads_back_after_restart(&c, &digest);
    assert_eq!(digest_of(&c, "t2"), Ok(digest.clone()), "every value the prepared transaction wrote reads back after a restart");
}

#[test]
fn ddl_nesting_encrypted_values_in_row_types_in_use_or_array_constants_is_refused() {
    let c = cluster("nested", &[]);
    let mut s = c.connect(Transport::Unix, "app");
    s.batch_execute("CREATE TABLE inner_t (a int); CREATE TABLE outer_t (r inner_t); CREATE TYPE comp AS (a int); CREATE TABLE uses_comp (x comp); CREATE TABLE lonely (a int)")
        .unwrap();
    let mut failures = Vec::new();
    for ddl in [
        "ALTER TABLE inner_t ADD COLUMN s encrypted_text",
        "ALTER TYPE comp ADD ATTRIBUTE s encrypted_text",
        "CREATE TABLE d2 (id int, note encrypted_text DEFAULT ('{s}'::encrypted_text[])[1])",
        "CREATE VIEW v2 AS SELECT ('{x}'::encrypted_text[])[1] AS c",
    ] {
        match s.batch_execute(ddl) {
            Ok(()) => failures.push(format!("{ddl}: accepted")),
            Err(e) => match e.as_db_error() {
                Some(db) if db.code() == &SqlState::FEATURE_NOT_SUPPORTED && db.hint().is_some_and(|h| !h.is_empty()) => {}
                Some(db) => failures.push(format!("{ddl}: {} {} (hint: {:?})", db.code().code(), db.message(), db.hint())),
                None => failures.push(format!("{ddl}: {e}")),
            },
        }
    }
    // A table whose row type no other column uses may get an encrypted column.
    if let Err(e) = s.batch_execute("ALTER TABLE lonely ADD COLUMN s encrypted_text") {
        failures.push(format!("ALTER TABLE lonely ADD COLUMN s encrypted_text (row type not in use): {e}"));
    }
    let left = c.psql(
        "app",
        "SELECT string_agg(attrelid::regclass || '.' || attname, ',' ORDER BY attrelid::regclass::text, attnum) FROM pg_attribute \
         WHERE attrelid IN ('inner_t'::regclass, (SELECT typrelid FROM pg_type WHERE oid = 'comp'::regtype)) AND attnum > 0 AND NOT attisdropped \
         UNION ALL SELECT coalesce(string_agg(c, ','), 'none') FROM (VALUES (to_regclass('d2')::text), (to_regclass('v2')::text)) v(c)",
    );
    if left != "comp.a,inner_t.a\nnone\n" {
        failures.push(format!("the refused DDL left something behind:\n{left}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let digest = c.psql("app", DIGEST);
    reads_back_after_restart(&c, &digest);
}

#[test]
fn plans_cached_without_a_table_seal_under_the_current_key_after_retirement() {
    let c = cluster("plans", &[]);
    let mut s = c.connect(Transport::Unix, "app");
    s.batch_execute(
        "CREATE TABLE t3 (id int, s encrypted_text); \
         CREATE FUNCTION fpc() RETURNS encrypted_text LANGUAGE plpgsql AS $$ BEGIN RETURN 'plan-secret'::encrypted_text; END $$; \
         PREPARE p AS SELECT 'x'::encrypted_text AS s; \
         PREPARE p2 AS INSERT INTO t3 VALUES (3, 'prepared insert'::encrypted_text); \
         SELECT fpc(); EXECUTE p",
    )
    .unwrap();
    // Another session changes the key, and the old one is retired.
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    s.batch_execute("INSERT INTO t3 SELECT 1, fpc(); CREATE TABLE t4 AS EXECUTE p; EXECUTE p2").unwrap();
    drop(s);
    let mut failures = Vec::new();
    let versions = c.psql("app", "SELECT string_agg(id || ':' || encryption_key_version(s), ',' ORDER BY id) FROM t3").trim().to_owned();
    if versions != "1:2,3:2" {
        failures.push(format!("t3 (1: plpgsql fpc(), 3: EXECUTE p2), id:key version: {versions}"));
    }
    let version = c.psql("app", "SELECT encryption_key_version(s) FROM t4").trim().to_owned();
    if version != "2" {
        failures.push(format!("t4 (CREATE TABLE AS EXECUTE p) is under key version {version}"));
    }
    let digest = c.psql("app", DIGEST);
    reads_back_after_restart(&c, &digest);
    for (sql, expected) in [("SELECT string_agg(decrypt(s), ',' ORDER BY id) FROM t3", "plan-secret,prepared insert\n"), ("SELECT decrypt(s) FROM t4", "x\n")] {
        let got = try_psql(&c, sql);
        if got.as_deref() != Ok(expected) {
            failures.push(format!("after a restart, {sql}: {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `(version, key)` of every line of this database's key file.
fn key_file_entries(c: &Cluster) -> (std::path::PathBuf, Vec<(String, String)>) {
    key_file_entries_of(c, "app")
}

fn key_file_entries_of(c: &Cluster, db: &str) -> (std::path::PathBuf, Vec<(String, String)>) {
    let oid = c.psql("postgres", &format!("SELECT oid FROM pg_database WHERE datname = '{db}'")).trim().to_owned();
    let file = std::fs::read_dir(c.key_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&format!("_{oid}.key"))))
        .unwrap_or_else(|| panic!("no key file for database {oid} in {}", c.key_dir().display()));
    let text = std::fs::read_to_string(&file).unwrap();
    let entries = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (v, k) = l.split_once(' ').unwrap_or_else(|| panic!("malformed key file line in {}", file.display()));
            (v.to_owned(), k.trim().to_owned())
        })
        .collect();
    (file, entries)
}

#[test]
fn keys_with_control_characters_are_refused_and_create_extension_keeps_the_key_files_versions() {
    let c = cluster("hygiene", &[]);
    let digest = c.psql("app", DIGEST);
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let (file, _) = key_file_entries(&c);
    let file_before = std::fs::read(&file).unwrap();

    // A passphrase with a line break: a key is kept as one line of text.
    let mut s = c.connect(Transport::Unix, "app");
    match s.query_one("SELECT set_data_encryption_key($1)", &[&"Zebra quantum 7 fjord\nVex blimp 93 Kowz!"]) {
        Ok(r) => panic!("a passphrase with a line break was accepted: {}", r.get::<_, String>(0)),
        Err(e) => {
            let e = e.as_db_error().cloned().unwrap_or_else(|| panic!("not a server error: {e}"));
            assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE, "{}", e.message());
        }
    }
    drop(s);
    assert_eq!(current_version(&c), 1, "nothing changed");
    assert_eq!(c.psql("app", "SELECT retrieve_data_encryption_key()").trim(), key);
    assert!(std::fs::read(&file).unwrap() == file_before, "the key file changed");
    reads_back_after_restart(&c, &digest);

    // DROP and CREATE EXTENSION (pg_restore --clean without the keyring): the key file keeps
    // every version it held, and the new current key is a fresh one.
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    let (_, before) = key_file_entries(&c);
    let versions: Vec<&str> = before.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(versions, ["1", "2"], "the key file keeps every version");
    let previous = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let out = c.psql_raw_many("app", &["DROP TABLE t", "DROP EXTENSION pg_cellcrypt", "CREATE EXTENSION pg_cellcrypt"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, after) = key_file_entries(&c);
    for (v, k) in &before {
        assert!(after.iter().any(|(v2, k2)| v2 == v && k2 == k), "key version {v} was lost or changed by CREATE EXTENSION (versions now: {:?})", after.iter().map(|(v, _)| v).collect::<Vec<_>>());
    }
    let fresh = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    assert_ne!(fresh, previous, "CREATE EXTENSION adopted the key file's current key instead of a fresh one");
    assert!(before.iter().all(|(_, k)| *k != fresh), "CREATE EXTENSION adopted a key the key file held");
    c.psql("app", "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text); INSERT INTO t SELECT g, 'fresh ' || g FROM generate_series(1, 200) g");
    let digest = c.psql("app", DIGEST);
    reads_back_after_restart(&c, &digest);
}

#[test]
fn retirement_waits_for_a_transaction_older_than_the_change_even_with_no_table_to_do() {
    // No table holds encrypted values when the key changes; a transaction that began before
    // creates one and fills it under the old key. The old key outlives that transaction.
    let mut conf: Vec<&str> = Vec::new();
    conf.push("max_worker_processes = 1");
    let c = Cluster::start("placeholder", &conf);
    c.database_with_extension("app");
    let mut a = c.connect(Transport::Unix, "app");
    a.batch_execute("BEGIN; CREATE TABLE m (id int, c encrypted_text); INSERT INTO m VALUES (1, 'made by an old transaction')").unwrap();
    let mut admin = c.connect(Transport::Unix, "app");
    admin.batch_execute("SELECT set_data_encryption_key(generate_data_encryption_key())").unwrap();
    // Steps in the foreground, in their own transactions: none may retire the old key while A runs.
    for _ in 0..20 {
        let s: String = admin.query_one("SELECT cellcrypt._reencrypt_step()", &[]).unwrap().get(0);
        assert_ne!(s, "done", "the old key was retired while a transaction from before the change was open");
    }
    a.batch_execute("COMMIT").unwrap();
    // No worker slot here: the administrator finishes in the foreground.
    c.psql("app", "CALL finish_data_encryption_reencryption()");
    c.wait_reencrypted("app");
    c.restart();
    assert_eq!(c.psql("app", "SELECT decrypt(c) FROM m").trim(), "made by an old transaction");
    assert_eq!(c.psql("app", "SELECT encryption_key_version(c) FROM m").trim(), "2");
}

#[test]
fn a_column_added_by_an_older_transaction_is_reencrypted_before_the_old_key_goes() {
    let c = cluster("added-column", &["pg_cellcrypt.reencrypt_pause = '100ms'"]);
    let mut a = c.connect(Transport::Unix, "app");
    a.batch_execute("BEGIN; ALTER TABLE t ADD COLUMN b encrypted_text; UPDATE t SET b = 'b of ' || id").unwrap();
    let mut admin = c.connect(Transport::Unix, "app");
    // The change waits for A's lock on t only in its batches; start it, then let A commit.
    admin.batch_execute("SELECT set_data_encryption_key(generate_data_encryption_key())").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    a.batch_execute("COMMIT").unwrap();
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(b) <> 2 OR encryption_key_version(s) <> 2").trim(), "0");
    c.restart();
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE decrypt(b) = 'b of ' || id").trim(), "200");
}

#[test]
fn schema_ddl_in_a_users_transaction_never_deadlocks_with_the_worker() {
    let c = cluster("ns-deadlock", &["pg_cellcrypt.reencrypt_pause = '20ms'", "pg_cellcrypt.reencrypt_batch_size = 20"]);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    // The user's transaction locks t (the worker then waits for it), then creates a schema.
    let mut b = c.connect(Transport::Unix, "app");
    b.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    b.batch_execute("CREATE SCHEMA s_made_meanwhile; COMMIT").unwrap_or_else(|e| panic!("the user's schema DDL failed: {e}"));
    c.wait_reencrypted("app");
    reads_back_after_restart(&c, &c.psql("app", DIGEST));
}

/// `pg_restore` of `file` into `db` with `args`; the caller checks the outcome.
fn restore(c: &Cluster, db: &str, args: &[&str], file: &std::path::Path) -> std::process::Output {
    restore_with(c, db, args, file, "")
}

/// As [`restore`], with `PGOPTIONS` set to `options` for the restoring sessions.
fn restore_with(c: &Cluster, db: &str, args: &[&str], file: &std::path::Path, options: &str) -> std::process::Output {
    std::process::Command::new(c.bin.join("pg_restore"))
        .env("PGOPTIONS", options)
        .args(["-U", "postgres", "--exit-on-error", "-h"])
        .arg(&c.dir)
        .arg("-p")
        .arg(c.port.to_string())
        .args(["-d", db])
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

fn keyring(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT string_agg(key_version || ':' || fingerprint || ':' || encode(kdf_salt, 'hex') || ':' || state || ':' || coalesce(md5(wrapped_data_key), '-'), ',' ORDER BY key_version) FROM cellcrypt.keyring",
    )
}

#[test]
fn a_data_only_restore_never_replaces_a_keyring_its_data_needs() {
    let c = cluster("dataonly", &[]);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    let digest = c.psql("app", DIGEST);
    let ring = keyring(&c, "app");
    assert_eq!(ring.split(',').count(), 2, "{ring}");

    // A data-only dump of this very database, restored into it after the data was emptied:
    // its keyring rows are the ones in place and are kept as they are.
    let own = c.dir.join("own.dump");
    c.pg_dump("app", &["-Fc", "--data-only", "-f", own.to_str().unwrap()]);
    c.psql("app", "TRUNCATE t");
    let out = restore(&c, "app", &["--data-only"], &own);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(keyring(&c, "app"), ring);
    assert_eq!(c.psql("app", DIGEST), digest);

    // Another database, with its own key, and a table in a schema that sorts before the
    // extension's, so that a restore brings its values before its keyring.
    c.database_with_extension("other");
    c.psql(
        "other",
        "CREATE SCHEMA a; CREATE TABLE a.early (id int PRIMARY KEY, s encrypted_text); \
         INSERT INTO a.early SELECT g, 'early ' || g FROM generate_series(1, 50) g",
    );
    let other_key = c.psql("other", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let early = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s), ',' ORDER BY id)) FROM a.early";
    let other_digest = c.psql("other", early);
    let other_dump = c.dir.join("other.dump");
    c.pg_dump("other", &["-Fc", "-f", other_dump.to_str().unwrap()]);

    // Its data restored data-only into the populated database: refused before anything of the
    // keyring in place is replaced (55000, saying what to do).
    c.psql("app", "CREATE SCHEMA a; CREATE TABLE a.early (id int PRIMARY KEY, s encrypted_text)");
    let out = restore(&c, "app", &["--data-only"], &other_dump);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("would replace this database's keyring while its data may need it"), "{err}");
    assert!(err.contains("public.t holds values encrypted under this database's key"), "{err}");
    assert_eq!(keyring(&c, "app"), ring, "nothing of the keyring was replaced");
    assert_eq!(c.psql("app", "SELECT count(*) FROM data_encryption_audit WHERE action = 'restore from dump' AND outcome = 'refused'").trim(), "1");
    c.psql("app", "DROP SCHEMA a CASCADE");

    // The usual target: a new database, schema restored (its extension gets a fresh key),
    // then the data. The dumped keyring replaces the fresh key although the table restored
    // before it already holds values under the same key version (they do not open under the
    // fresh key), and the database waits for its key.
    // Under REPEATABLE READ the check could not see values committed meanwhile: refused.
    c.createdb("fresh_rr");
    let out = restore(&c, "fresh_rr", &["--schema-only"], &other_dump);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = restore_with(&c, "fresh_rr", &["--data-only"], &other_dump, "-c default_transaction_isolation=repeatable\\ read");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in a REPEATABLE READ or SERIALIZABLE transaction"), "{err}");
    c.createdb("fresh");
    let out = restore(&c, "fresh", &["--schema-only"], &other_dump);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = restore(&c, "fresh", &["--data-only", "-j", "3"], &other_dump);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(keyring(&c, "fresh"), keyring(&c, "other"));
    assert_eq!(c.psql("fresh", "SELECT is_data_encryption_active()").trim(), "f");
    let msg = c.psql("fresh", &format!("SELECT set_data_encryption_key('{other_key}')"));
    assert!(msg.contains("restored"), "{msg}");
    assert_eq!(c.psql("fresh", early), other_digest);

    // The interleaving pg_restore -j may produce, made on purpose: the table's values come
    // first, then one session replaces the keyring and, before it commits, another brings the
    // index key. The second waits for the first (one restoring session at a time looks at what
    // the rows in place are needed for) and then sees the keyring already replaced.
    let inserts = c.pg_dump("other", &["--data-only", "--inserts"]);
    let rows_of = |table: &str| {
        inserts.lines().filter(|l| l.starts_with(&format!("INSERT INTO {table} "))).collect::<Vec<_>>().join("\n")
    };
    c.createdb("fresh2");
    let out = restore(&c, "fresh2", &["--schema-only"], &other_dump);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.psql("fresh2", &rows_of("a.early"));
    let mut first = c.connect(Transport::Unix, "fresh2");
    first.batch_execute(&format!("BEGIN; {}", rows_of("cellcrypt.keyring"))).unwrap();
    let index_rows = rows_of("cellcrypt.index_key");
    assert!(!index_rows.is_empty());
    let second = {
        let mut client = c.connect(Transport::Unix, "fresh2");
        std::thread::spawn(move || client.batch_execute(&index_rows).map_err(|e| e.to_string()))
    };
    assert!(
        c.wait_until("fresh2", "SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = 'fresh2' AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO cellcrypt.index_key%'", 30),
        "the second session waits for the first"
    );
    first.batch_execute("COMMIT").unwrap();
    second.join().unwrap().expect("the index key rows are restored once the keyring is");
    assert_eq!(keyring(&c, "fresh2"), keyring(&c, "other"));
    c.psql("fresh2", &format!("SELECT set_data_encryption_key('{other_key}')"));
    assert_eq!(c.psql("fresh2", early), other_digest);

    // A database that shares its first key version with the dump (a template copy of the
    // dumped one) but has changed keys since: the row they share is identical, the rest is
    // not. Whatever the order of the rows, the result is the dump's keyring, and the rows it
    // replaced are kept aside.
    c.psql("postgres", "CREATE DATABASE twin TEMPLATE other");
    c.psql("twin", &format!("SELECT set_data_encryption_key('{other_key}')"));
    for db in ["other", "twin"] {
        c.psql(db, "SELECT set_data_encryption_key(generate_data_encryption_key())");
        c.wait_reencrypted(db);
    }
    let other_key = c.psql("other", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let twin_ring = keyring(&c, "twin");
    let twin_v2 = c.psql("twin", "SELECT fingerprint FROM cellcrypt.keyring WHERE state = 'current'").trim().to_owned();
    assert_ne!(twin_ring, keyring(&c, "other"));
    assert_eq!(twin_ring.split(',').next(), keyring(&c, "other").split(',').next(), "version 1 is the same row in both");
    let other_digest = c.psql("other", early);
    let twin_key = c.psql("twin", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    // A plain dump with one INSERT per row, run by psql: each row is a transaction of its own.
    let data = c.dir.join("other-data.sql");
    std::fs::write(&data, c.pg_dump("other", &["--data-only", "--inserts"])).unwrap();
    c.psql("twin", "TRUNCATE a.early");
    c.psql_file("twin", &data);
    assert_eq!(keyring(&c, "twin"), keyring(&c, "other"));
    assert_eq!(
        c.psql("twin", &format!("SELECT count(*) FROM cellcrypt.replaced_key_row WHERE table_name = 'keyring' AND key_row->>'fingerprint' = '{twin_v2}'")).trim(),
        "1",
        "twin's own version 2, kept aside"
    );
    c.psql("twin", &format!("SELECT set_data_encryption_key('{other_key}')"));
    assert_eq!(c.psql("twin", early), other_digest);
    // The key file keeps both keys of version 2: twin's own, which a backup of twin from
    // before the restore needs, and the restored one.
    let (_, lines) = key_file_entries_of(&c, "twin");
    for key in [&twin_key, &other_key] {
        assert!(lines.iter().any(|(v, k)| v == "2" && k == key), "version 2 line kept for each key");
    }
    // The same restore once more: every row is now identical, nothing is replaced.
    c.psql("twin", "TRUNCATE a.early");
    c.psql_file("twin", &data);
    assert_eq!(keyring(&c, "twin"), keyring(&c, "other"));
    assert_eq!(c.psql("twin", early), other_digest);

    // While a key change is still re-encrypting, a restore is refused (55P03): the change's
    // jobs would outlive the keyring they were made for.
    c.psql("postgres", "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 10");
    c.psql("postgres", "ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = 60000");
    c.psql("postgres", "SELECT pg_reload_conf()");
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.psql("app", "CREATE SCHEMA a; CREATE TABLE a.early (id int PRIMARY KEY, s encrypted_text)");
    let out = restore(&c, "app", &["--data-only"], &other_dump);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is under way"), "{err}");
    c.psql("app", "DROP SCHEMA a CASCADE");
    c.psql("postgres", "ALTER SYSTEM RESET pg_cellcrypt.reencrypt_batch_size");
    c.psql("postgres", "ALTER SYSTEM RESET pg_cellcrypt.reencrypt_pause");
    c.psql("postgres", "SELECT pg_reload_conf()");
    c.psql("app", "CALL finish_data_encryption_reencryption()");
    c.wait_reencrypted("app");

    // Nothing lost anywhere, from fresh sessions after a restart.
    c.restart();
    assert_eq!(c.psql("app", DIGEST), digest);
    assert_eq!(c.psql("other", early), other_digest);
    assert_eq!(c.psql("fresh", early).split(':').next(), Some("50"));
    assert_eq!(c.psql("twin", early), other_digest);
}

/// Waits until a recovered cluster has reached its target and been promoted.
fn promoted(c: &Cluster) {
    assert!(c.wait_until("postgres", "SELECT NOT pg_is_in_recovery()", 120), "{} did not finish its recovery", c.dir.display());
}

#[test]
fn point_in_time_recovery_to_before_a_completed_change_finds_its_key() {
    // WAL archiving, a base backup, then a key change that completes (version 1 retired).
    let archive = cellcrypt_integration::server_dir("archive", &[]);
    let archive_command = format!("archive_command = 'cp %p {}/%f'", archive.display());
    let c = cluster("pitr", &["archive_mode = on", &archive_command]);
    let base = c.dir.join("base");
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(c.bin.join("pg_basebackup"))
        .arg("-h")
        .arg(&c.dir)
        .args(["-p", &c.port.to_string(), "-U", "postgres", "-X", "stream", "-c", "fast", "-D"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.psql("app", "INSERT INTO t SELECT g, 'value ' || g FROM generate_series(201, 300) g");
    let before = c.psql("app", DIGEST);
    c.psql("app", "SELECT pg_create_restore_point('before_change')");
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", "SELECT state FROM cellcrypt.keyring WHERE key_version = 1").trim(), "retired");
    c.psql("app", "INSERT INTO t SELECT g, 'value ' || g FROM generate_series(301, 400) g");
    let after = c.psql("app", DIGEST);
    let last = c.psql("app", "SELECT pg_walfile_name(pg_switch_wal())").trim().to_owned();
    assert!(c.wait_until("app", &format!("SELECT coalesce(last_archived_wal >= '{last}', false) FROM pg_stat_archiver"), 60), "WAL archived");

    // Recovered to the restore point, with today's key files (which keep every version): the
    // database is back on version 1, and every value of that moment reads back.
    let restore_command = format!("restore_command = 'cp {}/%f %p'", archive.display());
    let r = c.recover("pitr-before", &base, &c.key_dir(), &[&restore_command, "recovery_target_name = 'before_change'", "recovery_target_action = 'promote'"]);
    promoted(&r);
    assert_eq!(r.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "1");
    assert_eq!(r.psql("app", DIGEST), before);
    // It goes on from there: a change of its own, then a restart.
    r.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    r.wait_reencrypted("app");
    reads_back_after_restart(&r, &before);

    // Recovered to the end of the WAL: the change and everything after it.
    let r2 = c.recover("pitr-end", &base, &c.key_dir(), &[&restore_command, "recovery_target_timeline = 'latest'"]);
    promoted(&r2);
    assert_eq!(r2.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "2");
    assert_eq!(r2.psql("app", DIGEST), after);
    drop(r2);
    drop(r);
    let _ = std::fs::remove_dir_all(&archive);
}
