//! Online re-encryption after a key change, against real clusters: every table (partitioned
//! ones and other schemas included) finishes with no old-key cell and the old key retired;
//! concurrent writers lose nothing; crashes at several points resume with identical plaintext;
//! the foreground procedure; and the refusal of a second change meanwhile.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;
use std::time::{Duration, Instant};

/// A checksum of every decrypted value of the database's three tables.
const DIGEST: &str = "SELECT md5((SELECT string_agg(decrypt(s) || '/' || decrypt(j)::text, ',' ORDER BY id) FROM t) \
                      || (SELECT string_agg(decrypt(n)::text, ',' ORDER BY id) FROM billing.invoice) \
                      || (SELECT string_agg(decrypt(note), ',' ORDER BY id) FROM events))";

const OLD_KEY_CELLS: &str = "SELECT (SELECT count(*) FROM t WHERE encryption_key_version(s) <> v OR encryption_key_version(j) <> v) \
                             + (SELECT count(*) FROM billing.invoice WHERE encryption_key_version(n) <> v) \
                             + (SELECT count(*) FROM events WHERE encryption_key_version(note) <> v) \
                             FROM (SELECT key_version AS v FROM data_encryption_status) k";

fn populated(name: &str, rows: i32, extra: &[&str]) -> Cluster {
    let c = Cluster::start(name, extra);
    c.database_with_extension("app");
    c.psql(
        "app",
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, plain text); \
             INSERT INTO t SELECT g, 'secret ' || g, jsonb_build_object('g', g), repeat('x', 50) FROM generate_series(1, {rows}) g; \
             CREATE SCHEMA billing; \
             CREATE TABLE billing.invoice (id int PRIMARY KEY, n encrypted_numeric); \
             INSERT INTO billing.invoice SELECT g, g * 1.25 FROM generate_series(1, {rows}) g; \
             CREATE TABLE events (id int, at date, note encrypted_text) PARTITION BY RANGE (at); \
             CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
             CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
             INSERT INTO events SELECT g, date '2025-06-01' + (g % 400), 'event ' || g FROM generate_series(1, {rows}) g; \
             ANALYZE"
        ),
    );
    c
}

fn progress(c: &Cluster) -> i64 {
    c.psql("app", "SELECT coalesce(sum(cells_done), 0) FROM data_encryption_progress").trim().parse().unwrap()
}

fn wait_for_progress(c: &Cluster, at_least: i64) {
    let started = Instant::now();
    while progress(c) < at_least {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn worker_pid(c: &Cluster) -> Option<i32> {
    let s = c.psql("app", "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_cellcrypt re-encryption'");
    s.trim().parse().ok()
}

#[test]
fn a_change_over_many_tables_finishes_with_no_old_key_cell_and_retires_the_old_key() {
    let c = populated("reenc-all", 3000, &[]);
    let digest = c.psql("app", DIGEST);
    let old = c.psql("app", "SELECT format('%s', 'made under version 1'::text::encrypted_text)").trim().to_owned();
    let msg = c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(msg.contains("4 tables will be re-encrypted"), "{msg}");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", OLD_KEY_CELLS).trim(), "0");
    assert_eq!(c.psql("app", DIGEST), digest);
    // The old key is retired: nothing in the database opens a value made under it any more.
    assert_eq!(c.psql("app", "SELECT state, wrapped_data_key IS NULL FROM cellcrypt.keyring WHERE key_version = 1").trim(), "retired|t");
    let out = c.psql_raw("app", &format!("SELECT decrypt('{old}'::encrypted_text)"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key version 1"), "{err}");
    // The status and the audit record say so.
    assert_eq!(c.psql("app", "SELECT previous_key_versions, reencryption, reencrypted_values FROM data_encryption_status").trim(), "{}|complete|12000");
    let audit = c.psql("app", "SELECT action, outcome, detail FROM data_encryption_audit WHERE action = 'reencryption'");
    assert_eq!(audit.trim(), "reencryption|completed|12000 values re-encrypted; retired key versions: 1");
    assert_eq!(c.psql("app", "SELECT count(*) FROM data_encryption_progress").trim(), "0");
}

#[test]
fn rewritten_rows_fill_the_space_their_old_versions_left() {
    // 40 batches of 500 rows over a table with an index; autovacuum is off for it, so any space
    // reused is what the re-encryption freed. `UPDATE t SET s = s` would double the table.
    let c = Cluster::start("reenc-space", &["pg_cellcrypt.reencrypt_batch_size = 500", "pg_cellcrypt.reencrypt_pause = 0"]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text) WITH (autovacuum_enabled = off); \
         INSERT INTO t SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 20000) g",
    );
    c.psql("app", "VACUUM ANALYZE t");
    let size = |c: &Cluster| -> i64 { c.psql("app", "SELECT pg_relation_size('t')").trim().parse().unwrap() };
    let before = size(&c);
    let digest = c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY id)) FROM t");
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    let after = size(&c);
    assert!(after * 2 < before * 3, "the table grew from {before} to {after} bytes");
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(s) <> 2").trim(), "0");
    assert_eq!(c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY id)) FROM t"), digest);
    assert_eq!(c.psql("app", "SET enable_seqscan = off; SELECT decrypt(s) FROM t WHERE id = 12345").trim(), c.psql("app", "SELECT repeat(md5('12345'), 3)").trim());
}

#[test]
fn concurrent_writers_lose_no_update_and_late_old_key_cells_are_caught() {
    let c = populated("reenc-writers", 2000, &["pg_cellcrypt.reencrypt_batch_size = 50", "pg_cellcrypt.reencrypt_pause = 20"]);
    // A session whose transaction began before the change switches to the new key as soon as
    // the change commits, even inside that transaction.
    let mut late = c.connect(Transport::Unix, "app");
    late.batch_execute("BEGIN; INSERT INTO t VALUES (-1, 'warm', '{}')").unwrap();
    // An envelope made under the old key, as an application might hold it and write it back.
    let old = c.psql("app", "SELECT format('%s', 'written late under the old key'::text::encrypted_text)").trim().to_owned();
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    late.batch_execute("INSERT INTO t VALUES (-3, 'after the change', '{}')").unwrap();
    let v: i32 = late.query_one("SELECT encryption_key_version(s) FROM t WHERE id = -3", &[]).unwrap().get(0);
    assert_eq!(v, 2);
    late.batch_execute(&format!("INSERT INTO t VALUES (-2, '{old}', '{{}}')")).unwrap();
    let v: i32 = late.query_one("SELECT encryption_key_version(s) FROM t WHERE id = -2", &[]).unwrap().get(0);
    assert_eq!(v, 1);
    // An application keeps updating rows while the worker runs.
    let mut app = c.connect(Transport::TcpSsl, "app");
    let mut last = std::collections::HashMap::new();
    let started = Instant::now();
    let mut n = 0;
    while c.psql("app", "SELECT count(*) FROM cellcrypt.reencryption_job WHERE state = 'pending'").trim() != "0" || n < 50 {
        let id = (n * 37) % 2000 + 1;
        let value = format!("updated {id} #{n}");
        app.execute("UPDATE t SET s = $1::text WHERE id = $2", &[&value, &id]).unwrap();
        last.insert(id, value);
        n += 1;
        assert!(started.elapsed() < Duration::from_secs(90));
    }
    late.batch_execute("COMMIT").unwrap();
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", OLD_KEY_CELLS).trim(), "0", "the late old-key cell was caught");
    assert_eq!(c.psql("app", "SELECT decrypt(s) FROM t WHERE id = -2").trim(), "written late under the old key");
    for (id, value) in &last {
        let got: String = app.query_one("SELECT decrypt(s) FROM t WHERE id = $1", &[id]).unwrap().get(0);
        assert_eq!(&got, value, "lost update on row {id}");
    }
    assert!(last.len() > 40, "{} rows updated", last.len());
}

#[test]
fn crashes_at_several_points_resume_and_lose_nothing() {
    let c = populated("reenc-crash", 4000, &["pg_cellcrypt.reencrypt_batch_size = 100", "pg_cellcrypt.reencrypt_pause = 50"]);
    let digest = c.psql("app", DIGEST);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");

    // 1. kill -9 of the worker after some batches (the postmaster restarts every backend).
    wait_for_progress(&c, 500);
    let pid = worker_pid(&c).expect("the worker runs");
    let before = progress(&c);
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    while c.psql_raw("app", "SELECT 1").status.code() != Some(0) {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for_progress(&c, before + 200);
    assert!(progress(&c) >= before, "progress kept: committed batches are not redone");

    // 2. an immediate shutdown mid-work, then a start: the launcher resumes it.
    let before = progress(&c);
    c.stop_immediate();
    c.start_again();
    assert!(progress(&c) >= before);
    wait_for_progress(&c, before + 200);

    // 3. a crash while the worker verifies or retires: stop again as soon as every table is done.
    let started = Instant::now();
    while c.psql("app", "SELECT count(*) FROM cellcrypt.reencryption_job WHERE state = 'pending'").trim() != "0" {
        assert!(started.elapsed() < Duration::from_secs(90));
        std::thread::sleep(Duration::from_millis(20));
    }
    c.stop_immediate();
    c.start_again();

    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", OLD_KEY_CELLS).trim(), "0");
    assert_eq!(c.psql("app", DIGEST), digest);
    assert_eq!(c.psql("app", "SELECT state FROM cellcrypt.keyring WHERE key_version = 1").trim(), "retired");
}

#[test]
fn a_dba_can_finish_the_work_in_the_foreground_and_a_second_change_waits() {
    // A worker so slow that the procedure does nearly all of the work.
    let c = populated("reenc-foreground", 1500, &["pg_cellcrypt.reencrypt_batch_size = 10", "pg_cellcrypt.reencrypt_pause = 5000"]);
    let digest = c.psql("app", DIGEST);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    // Meanwhile a second change is refused at once, and the status says why.
    let mut admin = c.connect(Transport::TcpSsl, "app");
    let err = db_error(admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(err.code(), &SqlState::LOCK_NOT_AVAILABLE);
    assert!(err.hint().unwrap_or("").contains("finish_data_encryption_reencryption"), "{:?}", err.hint());
    let status: String = admin.query_one("SELECT reencryption FROM data_encryption_status", &[]).unwrap().get(0);
    assert!(status.starts_with("running"), "{status}");
    let rows: Vec<(String, i64)> = admin
        .query("SELECT table_name::text, cells_remaining FROM data_encryption_progress ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["billing.invoice", "events_2025", "events_2026", "t"]);
    assert!(rows.iter().map(|r| r.1).sum::<i64>() > 3000, "{rows:?}");
    // The procedure, with NOTICE progress, in batches of its own size.
    let out = c.psql_raw_many("app", &["SET pg_cellcrypt.reencrypt_batch_size = 500", "CALL finish_data_encryption_reencryption()"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("NOTICE:  pg_cellcrypt re-encryption: working") || stderr.contains("finished"), "{stderr}");
    assert!(stderr.contains("finished; older keys retired") || c.psql("app", "SELECT reencryption FROM data_encryption_status").trim() == "complete", "{stderr}");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", OLD_KEY_CELLS).trim(), "0");
    assert_eq!(c.psql("app", DIGEST), digest);
    // Now a change goes ahead.
    let msg: String = admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]).unwrap().get(0);
    assert!(msg.contains("key version 3"), "{msg}");
}
