//! Replicas: a streaming standby made with pg_basebackup that reads with its own key provider,
//! refuses key calls, and follows a key change without a restart; and logical replication to a
//! subscriber restored with the same key.

use cellcrypt_integration::*;
use postgres::error::SqlState;
use std::process::Command;

const DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(decrypt(s) || '/' || decrypt(j)::text, ',' ORDER BY id)) FROM t";

/// A cluster whose database `app` has table `t` with `rows` rows, then runs `then` there.
fn populated(name: &str, setting: &str, rows: i32, then: &str) -> Cluster {
    let c = Cluster::start(name, &[setting]);
    c.database_with_extension("app");
    c.psql(
        "app",
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb); \
             INSERT INTO t SELECT g, 'secret ' || g, jsonb_build_object('g', g) FROM generate_series(1, {rows}) g; {then}"
        ),
    );
    c
}

/// Writes `key` where the standby's key command reads it (its "KMS"), readable by the server only.
fn put_in_kms(standby: &Cluster, key: &str) {
    let kms = standby.dir.join("kms");
    std::fs::create_dir_all(&kms).unwrap();
    std::fs::write(kms.join("key"), format!("{key}\n")).unwrap();
    let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&kms).status().unwrap().success()
        && Command::new("chmod").args(["-R", "go-rwx"]).arg(&kms).status().unwrap().success();
    assert!(ok);
}

#[test]
fn a_streaming_standby_reads_with_its_own_provider_and_follows_a_key_change() {
    let primary = populated("primary", "wal_level = replica", 500, "SELECT register_blind_index('t', 's'); CREATE INDEX t_bidx ON t (blind_index(s))");
    let key = primary.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let before = primary.psql("app", DIGEST);

    // The standby's provider: a key command reading its own copy of the key (as from a KMS).
    let standby = primary.standby("standby", &["pg_cellcrypt.key_provider = command"]);
    let command = format!("pg_cellcrypt.key_command = 'cat {}/kms/key'", standby.dir.display());
    put_in_kms(&standby, &key);
    let auto_conf = standby.dir.join("data/postgresql.auto.conf");
    let conf = std::fs::read_to_string(&auto_conf).unwrap();
    std::fs::write(&auto_conf, format!("{conf}{command}\n")).unwrap();
    assert!(Command::new("chown").args(["postgres:postgres"]).arg(&auto_conf).status().unwrap().success());
    standby.psql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    primary.wait_replayed_by(&standby);

    assert_eq!(standby.psql("app", "SELECT pg_is_in_recovery()").trim(), "t");
    assert_eq!(standby.psql("app", DIGEST), before, "the standby reads what the primary wrote");
    assert_eq!(standby.psql("app", "SELECT provider FROM data_encryption_status").trim(), "command");
    let found = standby.psql("app", "SET enable_seqscan = off; SELECT id FROM t WHERE blind_index(s) = blind_index('secret 42', 't', 's')");
    assert_eq!(found.trim(), "42", "blind-index lookups on the standby");

    // Key calls on the standby: a clear read-only error (25006), over a secure connection.
    let mut on_standby = standby.connect(Transport::TcpSsl, "app");
    for call in ["SELECT set_data_encryption_key(generate_data_encryption_key())", "SELECT rotate_blind_index_key()", "SELECT register_blind_index('t', 's')"] {
        let e = db_error(on_standby.query_one(call, &[]));
        assert_eq!(e.code(), &SqlState::READ_ONLY_SQL_TRANSACTION, "{call}");
        assert!(e.message().contains("cannot run on a standby"), "{}", e.message());
        assert!(e.hint().unwrap_or("").contains("primary"), "{:?}", e.hint());
    }
    let e = db_error(on_standby.batch_execute("CALL finish_data_encryption_reencryption()"));
    assert_eq!(e.code(), &SqlState::READ_ONLY_SQL_TRANSACTION);
    let shown: String = on_standby.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
    assert_eq!(shown, key, "the standby shows the key it holds");

    // A key change and an index key rotation on the primary, while a standby session stays open.
    let new_key = primary.psql("app", "SELECT generate_data_encryption_key()").trim().to_owned();
    primary.psql("app", &format!("SELECT set_data_encryption_key('{new_key}')"));
    primary.wait_reencrypted("app");
    primary.psql("app", "SELECT rotate_blind_index_key()");
    primary.psql("app", "INSERT INTO t VALUES (501, 'after the change', '{\"g\": 501}')");
    let after = primary.psql("app", DIGEST);
    primary.wait_replayed_by(&standby);
    // Until the standby's provider has the new key, reads say so (and which version they need).
    let e = db_error(on_standby.query_one("SELECT decrypt(s) FROM t WHERE id = 501", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(e.message().contains("holds a different key (key version 2)"), "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("standby"), "{:?}", e.hint());
    put_in_kms(&standby, &new_key);
    // A failed key load is remembered for up to 5 seconds (a KMS is not asked again for every
    // row); then the open session finds the new key.
    let started = std::time::Instant::now();
    let row = loop {
        match on_standby.query_one("SELECT decrypt(s), encryption_key_version(s) FROM t WHERE id = 501", &[]) {
            Ok(row) => break row,
            Err(e) => {
                assert_eq!(e.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE), "{e}");
                assert!(started.elapsed() < std::time::Duration::from_secs(10), "the standby did not pick up the new key: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    };
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), ("after the change".to_owned(), 2), "the open session follows the change");
    assert_eq!(standby.psql("app", DIGEST), after, "every value reads back on the standby, no restart");
    let found: i32 = on_standby
        .query_one("SELECT id FROM t WHERE blind_index(s) = blind_index('secret 7', 't', 's')", &[])
        .unwrap()
        .get(0);
    assert_eq!(found, 7, "lookups use the rotated index key the standby replayed");
    let restarts = standby.server_log().matches("database system is ready to accept read-only connections").count();
    assert_eq!(restarts, 1, "the standby was never restarted");
}

#[test]
fn logical_replication_to_a_subscriber_restored_with_the_same_key() {
    let publisher = populated("publisher", "wal_level = logical", 300, "SELECT register_blind_index('t', 's'); CREATE PUBLICATION pub FOR TABLE t");
    let key = publisher.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();

    // The subscriber: the publisher's database restored (its keyring comes with it), then the key.
    let subscriber = Cluster::start("subscriber", &[]);
    subscriber.createdb("app");
    let dump = publisher.pg_dump("app", &["--no-publications"]);
    let file = subscriber.dir.join("app.sql");
    std::fs::write(&file, dump).unwrap();
    subscriber.psql_file("app", &file);
    assert_eq!(subscriber.psql("app", "SELECT is_data_encryption_active()").trim(), "f", "no key yet");
    subscriber.psql("app", &format!("SELECT set_data_encryption_key('{key}')"));
    subscriber.psql(
        "app",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host={} port={} dbname=app user=postgres' PUBLICATION pub WITH (copy_data = false)",
            publisher.dir.display(),
            publisher.port
        ),
    );
    // Changes made on the publisher after the subscription, applied through the types' text I/O.
    publisher.psql(
        "app",
        "INSERT INTO t SELECT g, 'replicated ' || g, jsonb_build_object('r', g) FROM generate_series(301, 400) g; \
         UPDATE t SET s = 'updated ' || id WHERE id % 10 = 0; DELETE FROM t WHERE id = 5",
    );
    let caught_up = || {
        let expected = publisher.psql("app", DIGEST);
        let started = std::time::Instant::now();
        loop {
            let got = subscriber.psql_raw("app", DIGEST);
            if got.status.success() && String::from_utf8_lossy(&got.stdout) == expected {
                break;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the subscriber did not catch up: {}{}",
                String::from_utf8_lossy(&got.stdout),
                String::from_utf8_lossy(&got.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    caught_up();
    assert_eq!(subscriber.psql("app", "SELECT decrypt(s) FROM t WHERE id = 351").trim(), "replicated 351");
    assert_eq!(subscriber.psql("app", "SELECT decrypt(s) FROM t WHERE id = 20").trim(), "updated 20");
    // The registration came with the dump, and replicated values arrive bound to the column.
    assert_eq!(subscriber.psql("app", "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 's'").trim(), "encrypted_text(1)");
    subscriber.psql("app", "CREATE INDEX t_bidx ON t (blind_index(s))");
    for (value, id) in [("replicated 351", "351"), ("updated 20", "20"), ("secret 7", "7")] {
        let found = subscriber.psql("app", &format!("SET enable_seqscan = off; SELECT id FROM t WHERE blind_index(s) = blind_index('{value}', 't', 's')"));
        assert_eq!(found.trim(), id, "blind-index lookup of {value} on the subscriber");
    }
    // The envelopes travel as they are: the same bytes on both sides.
    let q = "SELECT md5(string_agg(s::text, ',' ORDER BY id)) FROM (SELECT id, format('%s', s) AS s FROM t) x";
    assert_eq!(subscriber.psql("app", q), publisher.psql("app", q));
    // The same with `binary = true`: the types' send and receive functions carry the envelopes
    // (the magic, then the envelope), and they arrive as they are, still bound to the column.
    subscriber.psql("app", "ALTER SUBSCRIPTION sub SET (binary = true)");
    publisher.psql(
        "app",
        "INSERT INTO t SELECT g, 'binary ' || g, jsonb_build_object('b', g) FROM generate_series(401, 450) g; \
         UPDATE t SET s = 'binary update ' || id WHERE id % 7 = 0",
    );
    caught_up();
    assert_eq!(subscriber.psql("app", q), publisher.psql("app", q), "binary replication keeps the envelopes");
    let found = subscriber.psql("app", "SET enable_seqscan = off; SELECT id FROM t WHERE blind_index(s) = blind_index('binary 430', 't', 's')");
    assert_eq!(found.trim(), "430", "blind-index lookup of a value replicated in binary");
    subscriber.psql("app", "DROP SUBSCRIPTION sub");
}
