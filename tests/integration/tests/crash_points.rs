//! A crash between each step of a key change loses nothing. Each test arms one crash point
//! (`src/fault.rs`, built into the test install), runs the step, checks that the process
//! really died there, and then that what every session sees is the committed state: every
//! committed value reads back (checksum), the key version is the committed one, re-encryption
//! finishes and says "complete" only when no value is under an older key, a new change goes
//! through, and all of it again from fresh sessions after a restart.

use cellcrypt_integration::{Cluster, Transport};
use std::time::{Duration, Instant};

const CONF: [&str; 2] = [
    "pg_cellcrypt.reencrypt_batch_size = 100",
    "pg_cellcrypt.reencrypt_pause = 10",
];

const DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s) || '/' || decrypt(n), ',' ORDER BY id)) FROM t";
const NOT_CURRENT: &str = "SELECT count(*) FROM t WHERE encryption_key_version(s) <> (SELECT key_version FROM data_encryption_status) \
                           OR encryption_key_version(n) <> (SELECT key_version FROM data_encryption_status)";

fn cluster(name: &str) -> Cluster {
    let c = Cluster::start(name, &CONF);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, n encrypted_numeric); \
         INSERT INTO t SELECT g, 'value ' || g, g FROM generate_series(1, 1500) g",
    );
    c
}

/// Arms crash point `point`: the next process to reach it dies there.
fn arm(c: &Cluster, point: &str) {
    let f = c.dir.join("data/pg_cellcrypt.crash");
    std::fs::write(&f, point).unwrap();
    std::process::Command::new("chown").arg("postgres:postgres").arg(&f).status().unwrap();
}

/// Waits until the server takes connections again after a crash, and checks that the crash
/// was the armed point's.
fn crashed_at(c: &Cluster, point: &str) {
    let started = Instant::now();
    loop {
        // The kill and the recovery after this point's message (an earlier crash of the same
        // test left "terminated by signal 9" in the log already).
        let log = c.server_log();
        let seen = log
            .rfind(&format!("pg_cellcrypt: crash point {point}"))
            .map(|at| &log[at..])
            .is_some_and(|after| after.contains("terminated by signal 9") && after.contains("database system is ready to accept connections"));
        if seen && c.psql_raw("app", "SELECT 1").status.success() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "no crash at {point}:\n{}", c.server_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!c.dir.join("data/pg_cellcrypt.crash").exists(), "the point fired once");
}

fn version(c: &Cluster) -> String {
    c.psql("app", "SELECT key_version FROM data_encryption_status").trim().to_owned()
}

fn wait_complete(c: &Cluster) {
    let started = Instant::now();
    loop {
        let s = c.psql("app", "SELECT reencryption FROM data_encryption_status");
        if s.trim() == "complete" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "re-encryption did not finish: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.psql("app", NOT_CURRENT).trim(), "0", "complete means no value under an older key");
}

/// What every crash must leave: the committed values, the committed key version, working
/// keys (a new change goes through and finishes), the same after a restart. Returns the
/// version of that new change.
fn nothing_lost(c: &Cluster, digest: &str, committed: u32) -> u32 {
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(version(c), committed.to_string(), "the committed key version");
    assert_eq!(c.psql("app", DIGEST), digest, "right after the crash");
    wait_complete(c);
    assert_eq!(c.psql("app", DIGEST), digest);
    let msg = c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    let next: u32 = version(c).parse().unwrap();
    assert!(next > committed && msg.contains(&format!("key version {next}")), "{msg}");
    wait_complete(c);
    c.restart();
    assert_eq!(c.psql("app", DIGEST), digest, "after a restart");
    assert_eq!(version(c), next.to_string());
    assert_eq!(c.psql("app", NOT_CURRENT).trim(), "0");
    next
}

/// The version of the change just made, read right away (the server may crash soon after).
fn current(c: &Cluster) -> u32 {
    version(c).parse().unwrap()
}

/// A key change; its version, as its message says (the worker may crash the server next).
fn change(c: &Cluster) -> u32 {
    let msg = c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    msg.split("key version ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{msg}"))
}

#[test]
fn a_crash_at_each_step_of_a_key_change_loses_nothing() {
    let c = cluster("crash-change");
    let digest = c.psql("app", DIGEST);

    // Before the change commits: the key file already holds the new version.
    arm(&c, "change:key_file_written");
    let out = c.psql_raw("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(!out.status.success());
    crashed_at(&c, "change:key_file_written");
    let v = nothing_lost(&c, &digest, 1);

    // Committed, before the shared cache, the other sessions and the worker hear of it: the
    // client may not even learn that it committed.
    arm(&c, "commit:before_effects");
    let _ = c.psql_raw("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    crashed_at(&c, "commit:before_effects");
    let committed = current(&c);
    assert!(committed > v, "the change committed");
    let v = nothing_lost(&c, &digest, committed);

    // In the middle of the re-encryption: a batch rewrote its rows but did not commit.
    arm(&c, "reencrypt:batch_done");
    let committed = change(&c);
    assert!(committed > v);
    crashed_at(&c, "reencrypt:batch_done");
    let v = nothing_lost(&c, &digest, committed);

    // The older keys retired, not yet committed.
    arm(&c, "reencrypt:retired");
    let committed = change(&c);
    assert!(committed > v);
    crashed_at(&c, "reencrypt:retired");
    nothing_lost(&c, &digest, committed);

    // Every version the keyring ever committed is in the key file (backups and PITR need them).
    let versions = c.psql("app", "SELECT string_agg(key_version::text, ',' ORDER BY key_version) FROM cellcrypt.keyring");
    let file = std::fs::read_to_string(std::fs::read_dir(c.key_dir()).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|x| x == "key")).unwrap()).unwrap();
    for v in versions.trim().split(',') {
        assert!(file.lines().any(|l| l.starts_with(&format!("{v} "))), "version {v} kept in the key file");
    }
}

#[test]
fn a_crash_while_creating_or_restoring_a_key_loses_nothing() {
    let c = Cluster::start("crash-create", &CONF);
    c.createdb("app");
    // CREATE EXTENSION dies after writing the first key: nothing committed; the next CREATE
    // EXTENSION keeps that line and uses a version above it.
    arm(&c, "create:key_file_written");
    assert!(!c.psql_raw("app", "CREATE EXTENSION pg_cellcrypt").status.success());
    crashed_at(&c, "create:key_file_written");
    assert_eq!(c.psql("app", "SELECT count(*) FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), "0");
    c.psql("app", "CREATE EXTENSION pg_cellcrypt");
    assert_eq!(version(&c), "2");
    c.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, n encrypted_numeric); \
         INSERT INTO t SELECT g, 'value ' || g, g FROM generate_series(1, 1500) g",
    );
    let digest = c.psql("app", DIGEST);
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();

    // A copy that waits for its key (restored from a dump); the restore dies after writing
    // the key file, before it commits.
    let dump = c.dir.join("app.dump");
    c.pg_dump("app", &["-Fc", "-f", dump.to_str().unwrap()]);
    c.createdb("copy");
    c.pg_restore("copy", &dump);
    assert_eq!(c.psql("copy", "SELECT is_data_encryption_active()").trim(), "f");
    arm(&c, "restore:key_file_written");
    assert!(!c.psql_raw("copy", &format!("SELECT set_data_encryption_key('{key}')")).status.success());
    crashed_at(&c, "restore:key_file_written");
    // The file holds the right key (it was checked against the fingerprint before it was
    // written), so the copy may read with it; a restore then goes through either way.
    let mut s = c.connect(Transport::Unix, "copy");
    let msg: String = s.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap().get(0);
    assert!(msg.contains("restored") || msg.contains("already"), "{msg}");
    drop(s);
    assert_eq!(c.psql("copy", DIGEST), digest);
    nothing_lost(&c, &digest, 2);
    c.restart();
    assert_eq!(c.psql("copy", DIGEST), digest);
}

#[test]
fn the_launcher_comes_back_after_it_is_terminated() {
    let c = Cluster::start("launcher", &CONF);
    let launcher = "SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE backend_type = 'pg_cellcrypt launcher'";
    let first: i32 = c.psql("postgres", launcher).trim().parse().unwrap();
    assert!(first > 0, "the launcher runs");
    c.psql("postgres", &format!("SELECT pg_terminate_backend({first})"));
    let started = Instant::now();
    loop {
        let now: i32 = c.psql("postgres", launcher).trim().parse().unwrap();
        if now > 0 && now != first {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no launcher again after it was terminated");
        std::thread::sleep(Duration::from_millis(200));
    }
}
