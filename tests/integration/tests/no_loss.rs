//! No committed value is ever lost: key changes and rotations that roll back (whole, to a
//! savepoint, in a PL/pgSQL EXCEPTION block) leave the session on the committed keys while an
//! earlier savepoint's change still commits; no encrypted value is stored in the catalog or
//! nested where re-encryption cannot reach it; tables created during a change are re-encrypted
//! before the old key goes, and materialized views and prepared transactions hold retirement
//! back; DROP and CREATE EXTENSION (as `pg_restore --clean` runs them) keep the key. Each ends
//! by reading every committed value back from a fresh session after a restart.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;

const KDF: [&str; 2] = ["pg_cellcrypt.kdf_memory_kib = 1024", "pg_cellcrypt.kdf_iterations = 1"];

/// A checksum of every committed plaintext of table `t`.
const DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s), ',' ORDER BY id)) FROM t";

fn cluster(name: &str, extra: &[&str]) -> Cluster {
    let mut conf = KDF.to_vec();
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
    let started = std::time::Instant::now();
    loop {
        let s = c.psql("app", "SELECT reencryption FROM data_encryption_status").trim().to_owned();
        if done(&s) || started.elapsed() > std::time::Duration::from_secs(60) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
    let out = std::process::Command::new(format!("{}/pg_dump", cellcrypt_integration::PGBIN))
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
    let out = std::process::Command::new(format!("{}/pg_restore", cellcrypt_integration::PGBIN))
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
    let mut conf = KDF.to_vec();
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
