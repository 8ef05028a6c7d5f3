//! The data encryption key against real clusters: changes that reach every session at commit,
//! one change at a time, crashes mid-change, restores after an import, each key provider
//! across restarts, separate databases, the audit record, and no key in the logs, statistics or
//! core dumps.

use cellcrypt_integration::{contains, db_error, Cluster, Transport};
use postgres::error::SqlState;

fn key_of(c: &Cluster, db: &str) -> String {
    c.psql(db, "SELECT retrieve_data_encryption_key()").trim().to_owned()
}

fn generate(c: &Cluster, db: &str) -> String {
    c.psql(db, "SELECT generate_data_encryption_key()").trim().to_owned()
}

fn set_key(c: &Cluster, db: &str, key: &str) -> String {
    c.psql(db, &format!("SELECT set_data_encryption_key('{key}')")).trim().to_owned()
}

/// A checksum of every plaintext, to compare databases.
const PLAINTEXT_DIGEST: &str = "SELECT md5(string_agg(decrypt(s) || '/' || decrypt(j)::text, ',' ORDER BY id)) FROM t";

fn fill(c: &Cluster, db: &str, rows: i32) {
    c.psql(
        db,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb); \
             INSERT INTO t SELECT g, 'secret number ' || g, jsonb_build_object('g', g) FROM generate_series(1, {rows}) g"
        ),
    );
}

#[test]
fn a_change_reaches_every_session_and_parallel_worker_at_commit() {
    let c = Cluster::start("change", &[]);
    c.database_with_extension("app");
    fill(&c, "app", 300);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    let new_key = generate(&c, "app");

    // A session that loaded the old key before the change.
    let mut other = c.connect(Transport::Unix, "app");
    other.batch_execute("INSERT INTO t VALUES (1000, 'before the change', '{}')").unwrap();

    let mut admin = c.connect(Transport::TcpSsl, "app");
    admin.batch_execute("BEGIN").unwrap();
    let msg: String = admin.query_one("SELECT set_data_encryption_key($1)", &[&new_key]).unwrap().get(0);
    assert!(msg.contains("key version 2") && msg.contains("1 tables will be re-encrypted"), "{msg}");
    // Until the change commits, other sessions keep the old key, and what they write under it
    // stays readable afterwards.
    other.batch_execute("INSERT INTO t VALUES (1001, 'during the change', '{}')").unwrap();
    let v: i32 = other.query_one("SELECT encryption_key_version(s) FROM t WHERE id = 1001", &[]).unwrap().get(0);
    assert_eq!(v, 1);
    admin.batch_execute("COMMIT").unwrap();

    // From the commit on, the same session seals with the new key, without reconnecting.
    other.batch_execute("INSERT INTO t VALUES (1002, 'after the change', '{}')").unwrap();
    let v: i32 = other.query_one("SELECT encryption_key_version(s) FROM t WHERE id = 1002", &[]).unwrap().get(0);
    assert_eq!(v, 2);
    // ... and so do parallel workers.
    other
        .batch_execute(
            "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
             SET min_parallel_table_scan_size = 0; SET parallel_leader_participation = off",
        )
        .unwrap();
    let plan: Vec<String> = other
        .query("EXPLAIN (ANALYZE, COSTS OFF) SELECT min(encryption_key_version(encrypt(id::text))) FROM t", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("Parallel Seq Scan") && plan.contains("Workers Launched: 2"), "{plan}");
    let (lo, hi): (i32, i32) = {
        let r = other.query_one("SELECT min(encryption_key_version(encrypt(id::text))), max(encryption_key_version(encrypt(id::text))) FROM t", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((lo, hi), (2, 2));
    // Every value is readable: the one written under the old key during the change (the old
    // key is kept, wrapped, until no cell needs it), and, once the background work is over,
    // every value is under the new key.
    assert_eq!(c.psql("app", "SELECT decrypt(s) FROM t WHERE id = 1001").trim(), "during the change");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(s) <> 2 OR encryption_key_version(j) <> 2").trim(), "0");
    assert_eq!(c.psql("app", "SELECT decrypt(s) FROM t WHERE id = 1001").trim(), "during the change");
    assert_eq!(c.psql("app", "DELETE FROM t WHERE id >= 1000; SELECT 1").trim(), "1");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    assert_eq!(key_of(&c, "app"), new_key);
    // The key file holds the new key as version 2 and keeps version 1, which a backup or a
    // point-in-time recovery from before the change needs.
    let file = std::fs::read_dir(c.key_dir()).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "key")).unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let versions: Vec<&str> = text.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit())).map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(versions, ["1", "2"], "{text}");
    assert!(text.contains(&format!("2 {new_key}")), "{text}");
    // The status says so.
    let status = c.psql("app", "SELECT active, key_version, provider, previous_key_versions, reencryption, reencrypted_values FROM data_encryption_status");
    let (head, count) = status.trim().rsplit_once('|').unwrap();
    assert_eq!(head, "t|2|file|{}|complete");
    // 302 rows under the old key, two values each; the first pass may also rewrite the row
    // written under the new key after the change.
    assert!((604..=606).contains(&count.parse::<i64>().unwrap()), "{status}");
}

#[test]
fn only_one_change_runs_at_a_time() {
    let c = Cluster::start("lock", &["pg_cellcrypt.reencrypt_batch_size = 10", "pg_cellcrypt.reencrypt_pause = 300"]);
    c.database_with_extension("app");
    fill(&c, "app", 50);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    let (k2, k3) = (generate(&c, "app"), generate(&c, "app"));

    // A change in progress (its transaction still open) refuses a second one at once.
    let mut first = c.connect(Transport::Unix, "app");
    let first_pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    first.batch_execute("BEGIN").unwrap();
    first.query_one("SELECT set_data_encryption_key($1)", &[&k2]).unwrap();
    let mut second = c.connect(Transport::TcpSsl, "app");
    let started = std::time::Instant::now();
    let err = db_error(second.query_one("SELECT set_data_encryption_key($1)", &[&k3]));
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "the second change waited instead of failing");
    assert_eq!(err.code(), &SqlState::LOCK_NOT_AVAILABLE);
    let detail = err.detail().unwrap_or("");
    assert!(detail.contains(&format!("process {first_pid}")) && detail.contains("role postgres") && detail.contains("started at"), "{detail}");
    assert!(err.hint().is_some());
    first.batch_execute("COMMIT").unwrap();
    // Its re-encryption runs in the background (10 rows every 300 ms here), and the change
    // lasts until it is done: the next change is refused, and the status says why.
    let err = db_error(second.query_one("SELECT set_data_encryption_key($1)", &[&k3]));
    assert_eq!(err.code(), &SqlState::LOCK_NOT_AVAILABLE, "{}", err.message());
    let status: String = second.query_one("SELECT reencryption FROM data_encryption_status", &[]).unwrap().get(0);
    assert!(status.starts_with("running"), "{status}");
    c.wait_reencrypted("app");
    // Once it is over, the next change goes ahead.
    let msg: String = second.query_one("SELECT set_data_encryption_key($1)", &[&k3]).unwrap().get(0);
    assert!(msg.contains("key version 3"), "{msg}");
    c.wait_reencrypted("app");

    // Two sessions racing: exactly one wins, the other gets 55P03.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let results: Vec<Result<String, String>> = (0..2)
        .map(|i| {
            let barrier = barrier.clone();
            let mut client = c.connect(if i == 0 { Transport::Unix } else { Transport::TcpSsl }, "app");
            let key: String = client.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
            std::thread::spawn(move || {
                client.batch_execute("BEGIN").unwrap();
                barrier.wait();
                let r = client.query_one("SELECT set_data_encryption_key($1)", &[&key]);
                let r = match r {
                    Ok(row) => {
                        std::thread::sleep(std::time::Duration::from_millis(500));
                        client.batch_execute("COMMIT").unwrap();
                        Ok(row.get::<_, String>(0))
                    }
                    Err(e) => Err(e.code().map(|c| c.code().to_owned()).unwrap_or_default()),
                };
                r
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().any(|r| r.as_ref().err().map(String::as_str) == Some("55P03")), "{results:?}");
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "4");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
}

#[test]
fn a_crash_in_the_middle_of_a_change_leaves_nothing_stuck() {
    let c = Cluster::start("crash", &[]);
    c.database_with_extension("app");
    fill(&c, "app", 100);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    let old_key = key_of(&c, "app");
    let mut admin = c.connect(Transport::Unix, "app");
    admin.batch_execute("BEGIN").unwrap();
    let k2 = generate(&c, "app");
    admin.query_one("SELECT set_data_encryption_key($1)", &[&k2]).unwrap();
    // The server dies with the change (and its re-encryption) uncommitted.
    c.stop_immediate();
    drop(admin);
    c.start_again();
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "1");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    assert_eq!(key_of(&c, "app"), old_key);
    // Neither the lock nor the key state is stuck: a new change goes through, under a version
    // above the one the crashed change left in the key file (3).
    let k3 = generate(&c, "app");
    assert!(set_key(&c, "app", &k3).contains("key version 3"));
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);

    // A session killed mid-change behaves the same.
    let mut admin = c.connect(Transport::Unix, "app");
    let pid: i32 = admin.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    admin.batch_execute("BEGIN").unwrap();
    admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]).unwrap();
    c.psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    drop(admin);
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "3");
    assert_eq!(key_of(&c, "app"), k3);
    // The killed session's abort took its line out of the key file: no version is skipped.
    assert!(set_key(&c, "app", &generate(&c, "app")).contains("key version 4"));
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
}

#[test]
fn set_needs_a_secure_connection_and_the_admin_role_and_everything_is_audited() {
    let c = Cluster::start("setrules", &[]);
    c.database_with_extension("app");
    fill(&c, "app", 10);
    let k2 = generate(&c, "app");
    // TCP without SSL: refused with a hint.
    let mut plain = c.connect(Transport::Tcp, "app");
    let err = db_error(plain.query_one("SELECT set_data_encryption_key($1)", &[&k2]));
    assert_eq!(err.code(), &SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(err.hint().unwrap_or("").contains("SSL"));
    // Not an administrator: refused, with the role named.
    c.psql("app", "CREATE ROLE clerk LOGIN; CREATE ROLE keeper LOGIN IN ROLE data_encryption_admin");
    let mut clerk = c.connect_as(Transport::Unix, "app", "clerk");
    let err = db_error(clerk.query_one("SELECT set_data_encryption_key($1)", &[&k2]));
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(err.hint().unwrap_or("").contains("data_encryption_admin"));
    // A weak key: refused with a hint to generate one.
    let mut keeper = c.connect_as(Transport::TcpSsl, "app", "keeper");
    let err = db_error(keeper.query_one("SELECT set_data_encryption_key('password1234')", &[]));
    assert_eq!(err.code(), &SqlState::INVALID_PARAMETER_VALUE);
    assert!(err.hint().unwrap_or("").contains("generate_data_encryption_key()"));
    // SSL and the Unix socket: allowed, for a member of data_encryption_admin too.
    let msg: String = keeper.query_one("SELECT set_data_encryption_key($1)", &[&k2]).unwrap().get(0);
    assert!(msg.contains("key version 2"), "{msg}");
    c.wait_reencrypted("app");
    let k3 = generate(&c, "app");
    let msg: String = c.connect_as(Transport::Unix, "app", "keeper").query_one("SELECT set_data_encryption_key($1)", &[&k3]).unwrap().get(0);
    assert!(msg.contains("key version 3"), "{msg}");
    let _: String = keeper.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);

    // The audit record: who, when, what, from where, and the outcome; never a key.
    let rows = c.psql("app", "SELECT session_role, client_addr, action, outcome, coalesce(key_version::text, ''), detail FROM data_encryption_audit ORDER BY at");
    let expect = [
        "postgres|local|create|committed|1|",
        "postgres|127.0.0.1|set_data_encryption_key()|refused||TCP connection without SSL",
        "clerk|local|set_data_encryption_key()|refused||not a member of data_encryption_admin",
        "keeper|127.0.0.1|set_data_encryption_key()|refused||weak or malformed key",
        "keeper|127.0.0.1|change|committed|2|",
        "postgres||reencryption|completed|2|20 values re-encrypted; retired key versions: 1",
        "keeper|local|change|committed|3|",
        "keeper|127.0.0.1|retrieve|succeeded|3|",
    ];
    for e in expect {
        assert!(rows.lines().any(|l| l.starts_with(e)), "no audit line starting {e:?} in\n{rows}");
    }
    for key in [&k2, &k3] {
        assert!(!rows.contains(key.as_str()));
        for (_, bytes) in cellcrypt_integration::read_tree(&c.key_dir()).iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "audit")) {
            assert!(!cellcrypt_integration::contains(bytes, &key.as_bytes()[5..]), "a key in the audit file");
        }
    }
    // PUBLIC cannot read it.
    let err = db_error(clerk.query("SELECT * FROM data_encryption_audit", &[]));
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    let err = db_error(clerk.query("SELECT * FROM data_encryption_status", &[]));
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    // is_data_encryption_active is for everyone.
    let active: bool = clerk.query_one("SELECT is_data_encryption_active()", &[]).unwrap().get(0);
    assert!(active);
}

#[test]
fn restore_after_import_into_a_fresh_cluster() {
    // Slow re-encryption at the source, so the dump is taken in the middle of a key change.
    let a = Cluster::start("import-from", &["pg_cellcrypt.reencrypt_batch_size = 10", "pg_cellcrypt.reencrypt_pause = 300"]);
    let b = Cluster::start("import-to", &[]);
    a.database_with_extension("app");
    fill(&a, "app", 1000);
    // A value sealed under key version 1 and written during the change: the dump must carry
    // what opens it too.
    let old = a.psql("app", "SELECT format('%s', 'sealed under version 1'::text::encrypted_text)").trim().to_owned();
    set_key(&a, "app", &generate(&a, "app"));
    a.psql("app", &format!("INSERT INTO t VALUES (1001, '{old}', '[]')"));
    let digest = a.psql("app", PLAINTEXT_DIGEST);
    let key = key_of(&a, "app");

    let file = b.dir.join("app.sql");
    std::fs::write(&file, a.pg_dump("app", &[])).unwrap();
    b.createdb("app");
    b.psql_file("app", &file);

    // The data arrives and stays unreadable.
    assert_eq!(b.psql("app", "SELECT count(*) FROM t").trim(), "1001");
    assert_ne!(b.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(s) = 1").trim(), "0", "the dump was taken mid-change");
    assert_eq!(b.psql("app", "SELECT is_data_encryption_active()").trim(), "f");
    let mut client = b.connect(Transport::Unix, "app");
    let err = db_error(client.query_one("SELECT decrypt(s) FROM t WHERE id = 1", &[]));
    assert_eq!(err.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(err.hint().unwrap_or("").contains("set_data_encryption_key"), "{:?}", err.hint());

    // A wrong key is refused with both fingerprints, and changes nothing.
    let wrong = generate(&b, "app");
    let err = db_error(client.query_one("SELECT set_data_encryption_key($1)", &[&wrong]));
    assert_eq!(err.code(), &SqlState::INVALID_PARAMETER_VALUE);
    let expected_fp = a.psql("app", "SELECT fingerprint FROM data_encryption_status").trim().to_owned();
    let detail = err.detail().unwrap_or("").to_owned();
    assert!(detail.contains(&format!("Expected a key with fingerprint {expected_fp}")) && detail.contains("the given key has fingerprint"), "{detail}");
    assert!(!detail.contains(&wrong) && !err.message().contains(&wrong));
    assert_eq!(b.psql("app", "SELECT is_data_encryption_active()").trim(), "f");

    // The original key makes everything readable, in every session.
    let msg: String = client.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap().get(0);
    assert!(msg.starts_with("restored: key version 2"), "{msg}");
    assert_eq!(b.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(b.psql("app", PLAINTEXT_DIGEST), digest);
    assert_eq!(b.psql("app", "SELECT decrypt(s) FROM t WHERE id = 1001").trim(), "sealed under version 1");
    // The restore resumes the interrupted change's re-encryption there.
    b.wait_reencrypted("app");
    assert_eq!(b.psql("app", "SELECT count(*) FROM t WHERE encryption_key_version(s) <> 2").trim(), "0");
    // ... and after a restart the key comes from the file provider.
    b.restart();
    assert_eq!(b.psql("app", PLAINTEXT_DIGEST), digest);
}

#[test]
fn dump_into_another_database_of_the_same_cluster_gives_identical_plaintext() {
    let c = Cluster::start("samecluster", &[]);
    c.database_with_extension("app");
    fill(&c, "app", 200);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    let key = key_of(&c, "app");
    for (target, format) in [("copy_plain", "p"), ("copy_custom", "c")] {
        let file = c.dir.join(format!("{target}.dump"));
        let out = std::process::Command::new(cellcrypt_integration::pgbin().join("pg_dump"))
            .args(["-U", "postgres", "-h"])
            .arg(&c.dir)
            .args(["-p", &c.port.to_string(), "-F", format, "-f"])
            .arg(&file)
            .arg("app")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        c.createdb(target);
        if format == "p" {
            c.psql_file(target, &file);
        } else {
            c.pg_restore(target, &file);
        }
        assert_eq!(c.psql(target, "SELECT is_data_encryption_active()").trim(), "f", "{target}");
        assert!(set_key(&c, target, &key).starts_with("restored"));
        assert_eq!(c.psql(target, PLAINTEXT_DIGEST), digest, "{target}");
    }
}

#[test]
fn databases_have_separate_keys() {
    let c = Cluster::start("separate", &[]);
    c.database_with_extension("one");
    c.database_with_extension("two");
    fill(&c, "one", 20);
    fill(&c, "two", 20);
    let (k1, k2) = (key_of(&c, "one"), key_of(&c, "two"));
    assert_ne!(k1, k2);
    let fp2 = c.psql("two", "SELECT fingerprint FROM data_encryption_status");
    let d2 = c.psql("two", PLAINTEXT_DIGEST);
    set_key(&c, "one", &generate(&c, "one"));
    assert_eq!(c.psql("two", "SELECT fingerprint FROM data_encryption_status"), fp2);
    assert_eq!(c.psql("two", "SELECT key_version FROM data_encryption_status").trim(), "1");
    assert_eq!(key_of(&c, "two"), k2);
    assert_eq!(c.psql("two", PLAINTEXT_DIGEST), d2);
    assert_eq!(c.psql("one", "SELECT key_version FROM data_encryption_status").trim(), "2");
    let key_files = std::fs::read_dir(c.key_dir()).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "key")).count();
    assert_eq!(key_files, 2);
}

#[test]
fn the_file_provider_needs_no_step_after_a_restart() {
    let c = Cluster::start("prov-file", &[]);
    c.database_with_extension("app");
    fill(&c, "app", 30);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    set_key(&c, "app", &generate(&c, "app"));
    c.restart();
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    c.wait_reencrypted("app");
}

#[test]
fn the_command_provider_reads_the_key_from_a_kms_and_never_writes_to_it() {
    let first = "kms managed passphrase 7f3a9c2e 1b5d8f04 a6c3 Zq8xR2";
    let kms = cellcrypt_integration::server_dir("kms", &[("app.key", first)]);
    let command = format!("pg_cellcrypt.key_command = 'cat {}/$PG_CELLCRYPT_DATABASE.key'", kms.display());
    let c = Cluster::start("prov-command", &["pg_cellcrypt.key_provider = command", &command]);
    c.database_with_extension("app");
    fill(&c, "app", 30);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    // Bring your own key: the first key is the one the command prints.
    assert_eq!(key_of(&c, "app"), first);
    assert!(std::fs::read_dir(c.key_dir()).map(|d| d.flatten().all(|e| e.path().extension().is_none_or(|x| x != "key"))).unwrap_or(true));
    c.restart();
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest, "no manual step after a restart");

    // The extension never writes to the KMS, and a change is refused until the KMS already
    // holds the new key: a restart right after it must find the key.
    let second = generate(&c, "app");
    let mut admin = c.connect(Transport::Unix, "app");
    let e = db_error(admin.query_one("SELECT set_data_encryption_key($1)", &[&second]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("# pg_cellcrypt") && e.hint().unwrap_or("").contains("2 <the new key>"), "{:?}", e.hint());
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "1", "nothing changed");
    assert_eq!(std::fs::read_to_string(kms.join("app.key")).unwrap(), first);
    // The administrator adds the new key to the KMS (the key file format: both versions), then
    // changes the key; the next restart needs no manual step.
    std::fs::write(kms.join("app.key"), format!("# pg_cellcrypt keys of app\n1 {first}\n2 {second}\n")).unwrap();
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest, "the current key is still found in the new format");
    let msg: String = admin.query_one("SELECT set_data_encryption_key($1)", &[&second]).unwrap().get(0);
    assert!(msg.contains("key version 2"), "{msg}");
    c.restart();
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "2");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    c.wait_reencrypted("app");
    // Once the old key is retired, the KMS may print the new key alone.
    std::fs::write(kms.join("app.key"), &second).unwrap();
    c.restart();
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    let _ = std::fs::remove_dir_all(&kms);
}

#[test]
fn the_none_provider_keeps_the_key_in_memory_and_needs_a_restore_after_a_restart() {
    let c = Cluster::start("prov-none", &["pg_cellcrypt.key_provider = none"]);
    c.createdb("app");
    let out = c.psql_raw("app", "CREATE EXTENSION pg_cellcrypt");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("retrieve_data_encryption_key()"), "the admin is told to back the key up");
    fill(&c, "app", 30);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    let key = key_of(&c, "app");
    assert!(std::fs::read_dir(c.key_dir()).map(|d| d.flatten().all(|e| e.path().extension().is_none_or(|x| x != "key"))).unwrap_or(true), "nothing on disk");
    c.restart();
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "f");
    let mut client = c.connect(Transport::Unix, "app");
    let err = db_error(client.query_one("SELECT decrypt(s) FROM t LIMIT 1", &[]));
    assert_eq!(err.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(err.hint().unwrap_or("").contains("set_data_encryption_key"));
    let err = db_error(client.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(err.code(), &SqlState::INVALID_PARAMETER_VALUE);
    let msg: String = client.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap().get(0);
    assert!(msg.starts_with("restored"), "{msg}");
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
    // A change works with it too, and the new key must be restored after the next restart.
    let k2 = generate(&c, "app");
    set_key(&c, "app", &k2);
    c.wait_reencrypted("app");
    c.restart();
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "f");
    assert!(set_key(&c, "app", &k2).starts_with("restored: key version 2"));
    assert_eq!(c.psql("app", PLAINTEXT_DIGEST), digest);
}

#[test]
fn no_key_reaches_the_server_log_pg_stat_statements_or_a_core_dump() {
    let c = Cluster::start(
        "canary",
        &[
            // pg_cellcrypt after pg_stat_statements: its utility hook then runs first (the
            // README's advice), and DO blocks reach pg_stat_statements with their literals masked.
            "shared_preload_libraries = 'pg_stat_statements,pg_cellcrypt'",
            "log_statement = all",
            "log_min_duration_statement = 0",
            "log_min_error_statement = error",
            "log_parameter_max_length = -1",
            "log_parameter_max_length_on_error = -1",
            // Small core files to search.
            "shared_buffers = 16MB",
        ],
    );
    c.database_with_extension("app");
    c.psql("app", "CREATE EXTENSION pg_stat_statements");
    fill(&c, "app", 5);
    let canary = generate(&c, "app");
    let passphrase = "canary passphrase Zq8xR2mW5vT9 kP3nL7";
    // The last character replaced by another one (a generated key ends in 'Z' one time in 32).
    let last = if canary.ends_with('Z') { 'Y' } else { 'Z' };
    let mistyped = format!("{}{last}", &canary[..canary.len() - 1]);
    // successes, over the simple and the extended protocol
    set_key(&c, "app", &canary);
    c.wait_reencrypted("app");
    let mut ssl = c.connect(Transport::TcpSsl, "app");
    ssl.query_one("SELECT set_data_encryption_key($1)", &[&passphrase]).unwrap();
    c.wait_reencrypted("app");
    // failures: a mistyped key, a syntax error, plain TCP, a wrong restore-time key
    assert!(!c.psql_raw("app", &format!("SELECT set_data_encryption_key('{mistyped}')")).status.success());
    assert!(!c.psql_raw("app", &format!("SELECT set_data_encryption_key('{canary}'")).status.success());
    let mut plain = c.connect(Transport::Tcp, "app");
    assert!(plain.query_one("SELECT set_data_encryption_key($1)", &[&canary]).is_err());
    ssl.query_one("SELECT set_data_encryption_key($1)", &[&canary]).unwrap();
    let _: String = ssl.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);

    // Every other form of the call, each from a session left idle afterwards: what
    // pg_stat_activity shows of it (and of the failed ones) is the text with literals redacted.
    let wrong = "wrong canary passphrase Hq4vB8nM2xK6 pW9rT3";
    let forms = [
        format!("SELECT set_data_encryption_key('{canary}')"),
        format!("PREPARE p(text) AS SELECT set_data_encryption_key($1); EXECUTE p('{canary}')"),
        format!("DO $$ BEGIN PERFORM set_data_encryption_key('{canary}'); END $$"),
        format!("CREATE OR REPLACE FUNCTION set_key_for_app(k text) RETURNS text LANGUAGE sql AS 'SELECT set_data_encryption_key(k)'; SELECT set_key_for_app('{canary}')"),
        format!("SELECT set_data_encryption_key('{wrong}')"),
        format!("PREPARE q(text) AS SELECT set_data_encryption_key($1); EXECUTE q('{wrong}')"),
        format!("/* rotate Bob's key */ SELECT set_data_encryption_key('{wrong}')"),
        format!("SELECT 1 AS \"it's\", set_data_encryption_key('{wrong}')"),
        // Never reaching the call: a syntax error, a missing table.
        format!("SELECT set_data_encryption_key('{wrong}'"),
        format!("SELECT set_data_encryption_key('{wrong}') FROM no_such_table"),
        format!("PREPARE \"MixedCase\"(text) AS SELECT set_data_encryption_key($1); SELECT 1; EXECUTE \"MixedCase\"('{wrong}')"),
        format!("PREPARE r(text) AS SELECT set_data_encryption_key($1); EXECUTE/**/r('{wrong}')"),
        // Errors raised inside PL/pgSQL: CONTEXT and QUERY lines quote the SQL.
        format!("DO $$ BEGIN PERFORM set_data_encryption_key('{wrong}'); END $$"),
        format!("DO $$ BEGIN PERFORM set_data_encryption_key('{wrong}', 1); END $$"),
        format!("DO $$ BEGIN PERFORM /* Bob's */ set_data_encryption_key('{wrong}'); END $$"),
    ];
    let mut idle = Vec::new();
    for form in &forms {
        let mut s = c.connect(Transport::TcpSsl, "app");
        let _ = s.simple_query(form);
        idle.push(s);
    }
    // A wrapper of one's own, created apart: nothing in the calling statement's text names a key
    // function, so log_statement logs its literal before it runs (the documented gap, shown
    // here with a call that never runs) unless pg_cellcrypt.redact_all_log_literals is on for
    // the session, which masks the literal and a bound value alike.
    c.psql("app", "CREATE FUNCTION rotate_for_app(k text) RETURNS text LANGUAGE sql AS 'SELECT set_data_encryption_key(k)'");
    let leaky = "leaky wrapper passphrase Yd6tF2 kS8mQ4 rN3v";
    let mut l = c.connect(Transport::TcpSsl, "app");
    assert!(l.simple_query(&format!("SELECT rotate_for_app('{leaky}') FROM no_such_table")).is_err());
    drop(l);
    // With the setting on, the session stays idle after its failed call: pg_stat_activity
    // (checked below) shows the call masked too, and a DO block reaches pg_stat_statements masked.
    let mut w = c.connect(Transport::TcpSsl, "app");
    w.batch_execute("SET pg_cellcrypt.redact_all_log_literals = on").unwrap();
    assert!(w.query("SELECT rotate_for_app($1) WHERE false", &[&wrong]).unwrap().is_empty());
    assert!(w.simple_query(&format!("DO $$ BEGIN IF false THEN PERFORM rotate_for_app('{wrong}'); END IF; END $$")).is_ok());
    assert!(w.simple_query(&format!("SELECT rotate_for_app('{wrong}') FROM no_such_table")).is_err());
    idle.push(w);
    c.psql("app", "CREATE ROLE nobody_special LOGIN");
    let mut n = c.connect_as(Transport::Unix, "app", "nobody_special");
    assert_eq!(db_error(n.batch_execute("SET pg_cellcrypt.redact_all_log_literals = off")).code(), &SqlState::INSUFFICIENT_PRIVILEGE, "a superuser setting");
    drop(n);
    let activity = c.psql("app", "SELECT string_agg(query, E'\\n') FROM pg_stat_activity WHERE datname = 'app'");
    assert!(activity.contains("set_data_encryption_key('****"), "{activity}");
    for secret in [&canary[5..], wrong] {
        assert!(!activity.contains(secret), "a key in pg_stat_activity:\n{activity}");
    }
    // Nor a query id computed from the raw text of a utility statement (a fast hash to test
    // guesses against): two DO blocks that differ only in the key show the same id.
    let mut ids = Vec::new();
    let guesses = ["first guess passphrase Tq7wR3 mV9xK2 pL4n", "other guess passphrase Zj5hN8 cB2vX6 qW1m"];
    for k in guesses {
        let mut d = c.connect(Transport::TcpSsl, "app");
        let pid: i32 = d.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let _ = d.simple_query(&format!("DO $$ BEGIN PERFORM set_data_encryption_key('{k}'); END $$"));
        ids.push(c.psql("app", &format!("SELECT coalesce(query_id, 0) FROM pg_stat_activity WHERE pid = {pid}")));
        idle.push(d);
    }
    assert_eq!(ids[0], ids[1], "query ids of key calls must not depend on the key");

    // Core dumps (gdb's gcore) of the postmaster and of a session that only reads, taken while
    // the sessions above are still idle. The shared key mapping is in neither (MADV_DONTDUMP):
    // the postmaster's core holds no key at all. The reader holds the derived keys it uses
    // (found: the search works) and the plaintext it read, but no key text of any call form
    // (pg_stat_activity's shared buffers included) and no master key.
    let current = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    assert!([canary.as_str(), wrong, guesses[0], guesses[1]].contains(&current.as_str()), "the current key is one of the canaries");
    let keys = version_keys_of(&c, "app", &current);
    let mut reader = c.connect(Transport::Unix, "app");
    let pid: i32 = reader.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let read: String = reader.query_one("SELECT decrypt(s) FROM t WHERE id = 3", &[]).unwrap().get(0);
    assert_eq!(read, "secret number 3");
    let postmaster: i32 = std::fs::read_to_string(c.dir.join("data/postmaster.pid")).unwrap().lines().next().unwrap().parse().unwrap();
    let reader_core = core_of(&c, pid);
    let postmaster_core = core_of(&c, postmaster);
    assert!(contains(&reader_core, read.as_bytes()), "the reader's core holds what it read");
    assert!(contains(&reader_core, keys.data.expose()), "the reader's core holds the data key it uses");
    assert!(!contains(&postmaster_core, keys.data.expose()), "the data key in the postmaster's core: the shared key mapping was dumped");
    assert!(!contains(&postmaster_core, keys.wrap.expose()), "the wrap key in the postmaster's core");
    for (name, core) in [("reader", &reader_core), ("postmaster", &postmaster_core)] {
        assert!(!contains(core, keys.master.expose()), "the master key in the {name}'s core");
        for secret in [&canary[5..], passphrase, wrong, &mistyped[5..], guesses[0], guesses[1]] {
            assert!(!contains(core, secret.as_bytes()), "a key text in the {name}'s core");
        }
    }
    drop(reader);
    drop(idle);

    let log = c.server_log();
    assert!(log.contains("set_data_encryption_key"), "the statements were logged (redacted)");
    assert!(log.contains(leaky), "log_statement logs a wrapper's literal when the setting is off");
    assert!(log.contains("rotate_for_app($1) WHERE false") && log.contains("parameters: $1 = '<redacted>'"), "the bound value was logged, masked:\n{log}");
    let statements = c.psql("app", "SELECT string_agg(query, E'\\n') FROM pg_stat_statements");
    assert!(statements.contains("set_data_encryption_key"), "{statements}");
    for secret in [&canary[5..], &mistyped[5..], passphrase, &canary[5..24], wrong] {
        assert!(!log.contains(secret), "a key in the server log:\n{log}");
        assert!(!statements.contains(secret), "a key in pg_stat_statements:\n{statements}");
    }
}

/// The keys of `db`'s current version, derived here from its key text and keyring row.
struct Derived {
    master: cellcrypt_core::MasterKey,
    data: cellcrypt_core::SecretKey,
    wrap: cellcrypt_core::SecretKey,
}

fn version_keys_of(c: &Cluster, db: &str, key: &str) -> Derived {
    let row = c.psql(db, "SELECT encode(kdf_salt, 'hex') || ' ' || kdf_memory_kib || ' ' || kdf_iterations || ' ' || kdf_parallelism FROM cellcrypt.keyring WHERE state = 'current'");
    let f: Vec<&str> = row.split_whitespace().collect();
    let salt: Vec<u8> = (0..f[0].len()).step_by(2).map(|i| u8::from_str_radix(&f[0][i..i + 2], 16).unwrap()).collect();
    let params = cellcrypt_core::KdfParams { m_cost_kib: f[1].parse().unwrap(), t_cost: f[2].parse().unwrap(), p_cost: f[3].parse().unwrap() };
    let master = cellcrypt_core::MasterKey::derive(&cellcrypt_core::AdminKey::parse(key).unwrap(), &salt, &params).unwrap();
    let fingerprint = c.psql(db, "SELECT fingerprint FROM cellcrypt.keyring WHERE state = 'current'");
    assert_eq!(master.fingerprint().to_string(), fingerprint.trim(), "the key derived here is the database's");
    let v = master.version_keys();
    Derived { master, data: v.data, wrap: v.wrap }
}

/// A core file of process `pid` of the cluster, made by gdb's gcore (the process goes on).
fn core_of(c: &Cluster, pid: i32) -> Vec<u8> {
    let prefix = c.dir.join("core");
    let out = std::process::Command::new("gcore").arg("-o").arg(&prefix).arg(pid.to_string()).output().expect("gdb's gcore (make setup installs gdb)");
    assert!(out.status.success(), "gcore {pid}: {}", String::from_utf8_lossy(&out.stderr));
    let file = std::path::PathBuf::from(format!("{}.{pid}", prefix.display()));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(bytes.len() > 1 << 20, "a core file of {} bytes", bytes.len());
    bytes
}

/// The text answers of `sql` run by `n` new sessions at the same moment.
fn at_once(c: &Cluster, n: usize, sql: &'static str) -> Vec<String> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let mut client = c.connect(Transport::Unix, "app");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                client.query_one(sql, &[]).map(|r| r.get::<_, String>(0)).unwrap_or_else(|e| panic!("{sql}: {e}"))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The child processes of process `pid` (zombies included), from /proc.
fn children_of(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let Some(after) = stat.rsplit_once(") ").map(|(_, a)| a) else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        if fields.get(1) == Some(&pid.to_string().as_str()) {
            out.push(stat.trim().to_owned());
        }
    }
    out
}

#[test]
fn a_hanging_or_failing_key_command_is_cancellable_leaves_no_process_and_runs_once() {
    let kms = cellcrypt_integration::server_dir("kms-hang", &[("key", "kms managed passphrase 5e2b7d91 c4a8 Xw3pL9 hang test")]);
    let k = kms.display();
    let command = format!(
        "pg_cellcrypt.key_command = 'echo run >> {k}/runs; if [ -f {k}/hang ]; then sleep 600; fi; if [ -f {k}/slow ]; then sleep 2; fi; if [ -f {k}/fail ]; then exit 3; fi; cat {k}/key'"
    );
    let c = Cluster::start("prov-hang", &["pg_cellcrypt.key_provider = command", &command, "pg_cellcrypt.key_command_timeout = 120"]);
    c.database_with_extension("app");
    fill(&c, "app", 30);
    let digest = c.psql("app", PLAINTEXT_DIGEST);
    c.restart();

    // A command that hangs: a query that needs the key waits for it, and a cancel ends the
    // wait at once, the command's whole process group with it, leaving no child behind.
    std::fs::write(kms.join("hang"), "").unwrap();
    let mut s = c.connect(Transport::Unix, "app");
    let pid: i32 = s.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let query = std::thread::spawn(move || {
        let r = s.query_one(PLAINTEXT_DIGEST, &[]);
        (r.map(|_| ()).map_err(|e| e.code().cloned()), std::time::Instant::now(), s)
    });
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(kms.join("runs")).unwrap_or_default().contains("run") {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the key command never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!children_of(pid).is_empty(), "the command runs under the backend");
    let cancelled_at = std::time::Instant::now();
    c.psql("postgres", &format!("SELECT pg_cancel_backend({pid})"));
    let (r, returned_at, s) = query.join().unwrap();
    assert_eq!(r, Err(Some(SqlState::QUERY_CANCELED)));
    let waited = returned_at - cancelled_at;
    assert!(waited < std::time::Duration::from_secs(1), "cancel took {waited:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(children_of(pid), Vec::<String>::new(), "no child (nor zombie) left");
    let sleeping = std::process::Command::new("pgrep").args(["-f", "sleep 600"]).output().unwrap();
    assert!(String::from_utf8_lossy(&sleeping.stdout).trim().is_empty(), "the command's own children were stopped too");

    // Terminated instead (a FATAL, which unwinds nothing): the command goes with the backend.
    let mut t = c.connect(Transport::Unix, "app");
    let tpid: i32 = t.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    std::fs::write(kms.join("runs"), "").unwrap();
    let hung = std::thread::spawn(move || t.query_one(PLAINTEXT_DIGEST, &[]).map(|_| ()).map_err(|e| e.to_string()));
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(kms.join("runs")).unwrap_or_default().contains("run") {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the key command never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    c.psql("postgres", &format!("SELECT pg_terminate_backend({tpid})"));
    assert!(hung.join().unwrap().is_err());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let sleeping = std::process::Command::new("pgrep").args(["-f", "sleep 600"]).output().unwrap();
    assert!(String::from_utf8_lossy(&sleeping.stdout).trim().is_empty(), "the command died with its terminated backend");
    std::fs::remove_file(kms.join("hang")).unwrap();

    // The KDF cannot be set below its floor (19 MiB, 2 passes), even by a superuser.
    let mut s = s;
    for setting in ["SET pg_cellcrypt.kdf_memory_kib = 1024", "SET pg_cellcrypt.kdf_iterations = 1"] {
        assert_eq!(db_error(s.batch_execute(setting)).code(), &SqlState::INVALID_PARAMETER_VALUE, "{setting}");
    }

    // A command that fails: 1,000 key uses in one query run it once, and reap it.
    std::fs::write(kms.join("fail"), "").unwrap();
    std::fs::write(kms.join("runs"), "").unwrap();
    let active: i64 = s.query_one("SELECT count(*) FROM generate_series(1, 1000) g WHERE is_data_encryption_active()", &[]).unwrap().get(0);
    assert_eq!(active, 0);
    assert_eq!(std::fs::read_to_string(kms.join("runs")).unwrap().lines().count(), 1, "the provider ran once for 1,000 calls");
    assert_eq!(children_of(pid), Vec::<String>::new(), "the failed command was reaped");

    // Eight new sessions at once while a slow command fails: one load runs at a time for the
    // database, the others wait for it and take its failure. The command runs once.
    let runs = || std::fs::read_to_string(kms.join("runs")).unwrap().lines().count();
    std::thread::sleep(std::time::Duration::from_millis(5200));
    std::fs::write(kms.join("slow"), "").unwrap();
    std::fs::write(kms.join("runs"), "").unwrap();
    assert_eq!(at_once(&c, 8, "SELECT is_data_encryption_active()::text"), vec!["false"; 8]);
    assert_eq!(runs(), 1, "one run of the failing command for eight sessions");
    // Fixed (once the few seconds a failure is remembered are over): eight sessions at once
    // read the data, and the slow command ran once for them.
    std::fs::remove_file(kms.join("fail")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5200));
    std::fs::write(kms.join("runs"), "").unwrap();
    assert_eq!(at_once(&c, 8, PLAINTEXT_DIGEST), vec![digest.trim().to_owned(); 8]);
    assert_eq!(runs(), 1, "one run of the command for eight sessions");
    std::fs::remove_file(kms.join("slow")).unwrap();
    // The session that saw the failure reads again too.
    let got: String = s.query_one(PLAINTEXT_DIGEST, &[]).unwrap().get(0);
    assert_eq!(got, digest.trim());
    drop(s);
    drop(c);
    let _ = std::fs::remove_dir_all(&kms);
}

#[test]
fn the_audit_record_rotates_by_size_keeps_every_file_and_reads_them_all_in_order() {
    let c = Cluster::start("audit-rotate", &["pg_cellcrypt.audit_max_size = 64kB"]);
    c.database_with_extension("app");
    let before: i64 = c.psql("app", "SELECT count(*) FROM data_encryption_audit").trim().parse().unwrap();
    // Each retrieval is one audit line (about 100 bytes): 1,000 of them pass 64 kB.
    c.psql("app", "SELECT count(retrieve_data_encryption_key()) FROM generate_series(1, 1000)");
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(c.key_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".audit"))
        .collect();
    assert!(files.len() >= 2, "the record was closed and started again: {files:?}");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 64 * 1024, "{} is {len} bytes", f.display());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(f).unwrap().permissions()) & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // Every line of every file, oldest first, through the view.
    let rows: i64 = c.psql("app", "SELECT count(*) FROM data_encryption_audit WHERE action = 'retrieve'").trim().parse().unwrap();
    assert_eq!(rows, 1000);
    let total: i64 = c.psql("app", "SELECT count(*) FROM data_encryption_audit").trim().parse().unwrap();
    assert_eq!(total, before + 1000);
    let ordered = c.psql("app", "SELECT bool_and(at >= prev) FROM (SELECT at, lag(at, 1, at) OVER () AS prev FROM data_encryption_audit) t");
    assert_eq!(ordered.trim(), "t", "oldest first across files");
}
