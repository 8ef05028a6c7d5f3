//! Scenarios on real clusters: preload requirement, every transport, parameterized writes,
//! no plaintext on disk or in dumps, restarts, dumps, binary COPY, migrations, concurrency,
//! a missing key.

use cellcrypt_integration::*;
use postgres::error::SqlState;
use postgres::types::Type;

/// The suites run against the major `make test-integration PG=N` chose (CELLCRYPT_PGBIN), with
/// this version of the extension installed in it, and the server says so.
#[test]
fn the_server_is_the_major_under_test_with_this_build() {
    let c = Cluster::start("major", &[]);
    let major = c.server_major();
    assert_eq!(major, pg_major(), "server {major}, pg_config of {}", pgbin().display());
    if let Ok(want) = std::env::var("CELLCRYPT_EXPECT_MAJOR") {
        assert_eq!(major.to_string(), want, "make asked for PostgreSQL {want}");
    }
    let version = cargo_version();
    c.createdb("v");
    c.psql("v", "CREATE EXTENSION pg_cellcrypt");
    assert_eq!(c.psql("v", "SELECT extversion FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), version);
    // The library loads and works in this major (its hooks, shared memory and log redaction
    // are exercised by the keys, security and reencryption suites).
    assert_eq!(c.psql("v", "SELECT is_data_encryption_active()").trim(), "t");
    // What the DDL check and re-encryption count as the encrypted types (the extension's member
    // base types; 17+ also lists array and row types as members): exactly the seven.
    assert_eq!(
        c.psql(
            "v",
            "SELECT string_agg(y.typname, ',' ORDER BY y.typname) FROM pg_depend d JOIN pg_type y ON y.oid = d.objid \
             WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_cellcrypt') \
               AND d.classid = 'pg_type'::regclass AND d.deptype = 'e' AND y.typtype = 'b' AND y.typelem = 0"
        )
        .trim(),
        "encrypted_bytea,encrypted_date,encrypted_int8,encrypted_jsonb,encrypted_numeric,encrypted_text,encrypted_timestamptz"
    );
    assert_eq!(c.psql("v", "SELECT decrypt('x'::text::encrypted_text)").trim(), "x");
}

#[test]
fn library_must_be_preloaded() {
    let c = Cluster::start("nopreload", &["shared_preload_libraries = ''"]);
    let mut client = c.connect(Transport::Unix, "postgres");
    let err = client.batch_execute("CREATE EXTENSION pg_cellcrypt").unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(db.message().contains("shared_preload_libraries"), "{}", db.message());
    assert!(db.hint().unwrap_or("").contains("shared_preload_libraries = 'pg_cellcrypt'"), "{:?}", db.hint());
}

#[test]
fn parameterized_writes_over_every_transport() {
    let c = Cluster::start("transports", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE accounts (id int, token encrypted_text, note encrypted_text, blob encrypted_bytea, amount encrypted_int8)");
    for (i, how) in ALL_TRANSPORTS.into_iter().enumerate() {
        let mut client = c.connect(how, "app");
        let ssl: bool = client.query_one("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)", &[]).unwrap().get(0);
        assert_eq!(ssl, how == Transport::TcpSsl, "SSL state over {how:?}");
        // Parameters typed as the plain types, as drivers send them: text (psycopg, sqlx),
        // varchar (JDBC setString), bytea, int8.
        let stmt = client
            .prepare_typed(
                "INSERT INTO accounts VALUES ($1, $2, $3, $4, $5)",
                &[Type::INT4, Type::TEXT, Type::VARCHAR, Type::BYTEA, Type::INT8],
            )
            .unwrap();
        let token = format!("tok-{how:?}-ß✓");
        client.execute(&stmt, &[&(i as i32), &token, &"varchar note", &vec![0u8, 1, 2, 255], &(-42i64 * i as i64)]).unwrap();
        let row = client
            .query_one("SELECT decrypt(token), decrypt(note), decrypt(blob), decrypt(amount), format('%s', token) FROM accounts WHERE id = $1", &[&(i as i32)])
            .unwrap();
        assert_eq!(row.get::<_, String>(0), token);
        assert_eq!(row.get::<_, String>(1), "varchar note");
        assert_eq!(row.get::<_, Vec<u8>>(2), vec![0u8, 1, 2, 255]);
        assert_eq!(row.get::<_, i64>(3), -42 * i as i64);
        let shown: String = row.get(4);
        assert!(shown.starts_with("$cc$") && !shown.contains("tok-"), "SELECT shows {shown}");
    }
    // numeric, date, timestamptz and jsonb parameters, typed, through a prepared statement
    c.psql(
        "app",
        "CREATE TABLE typed (n encrypted_numeric, d encrypted_date, ts encrypted_timestamptz, j encrypted_jsonb); \
         PREPARE ins(numeric, date, timestamptz, jsonb) AS INSERT INTO typed VALUES ($1, $2, $3, $4); \
         EXECUTE ins(3.14159, '2030-12-31', '2030-12-31 23:59:59.5+00', '{\"x\": [true, null]}');",
    );
    let out = c.psql("app", "SET TimeZone = 'UTC'; SELECT decrypt(n), decrypt(d), decrypt(ts), decrypt(j) FROM typed");
    assert_eq!(out.trim(), "3.14159|2030-12-31|2030-12-31 23:59:59.5+00|{\"x\": [true, null]}");
}

#[test]
fn no_plaintext_in_heap_wal_or_dump() {
    let c = Cluster::start("canary", &["wal_level = replica"]);
    c.database_with_extension("app");
    let secret = "CANARY-9f8e7d6c-secret-plaintext";
    let control = "CONTROL-1a2b3c4d-plain-column";
    let mut client = c.connect(Transport::TcpSsl, "app");
    client.batch_execute("CREATE TABLE t (id int, s encrypted_text, j encrypted_jsonb, p text)").unwrap();
    let stmt = client.prepare_typed("INSERT INTO t VALUES ($1, $2, ('{\"k\": \"' || $2 || '\"}')::jsonb, $3)", &[Type::INT4, Type::TEXT, Type::TEXT]).unwrap();
    for i in 0..20 {
        client.execute(&stmt, &[&i, &secret, &control]).unwrap();
    }
    // A large value goes to TOAST (storage EXTERNAL: never compressed).
    client.execute("INSERT INTO t VALUES (100, repeat($1, 500)::text, NULL, NULL)", &[&secret]).unwrap();
    client.batch_execute("CHECKPOINT").unwrap();
    let heap = std::fs::read(c.relation_file("app", "t")).unwrap();
    assert!(contains(&heap, control.as_bytes()), "the plain column must be found: the grep works");
    assert!(!contains(&heap, secret.as_bytes()), "plaintext canary in the heap");
    let toast_rel = c.psql("app", "SELECT reltoastrelid::regclass FROM pg_class WHERE relname = 't'");
    let toast = std::fs::read(c.relation_file("app", toast_rel.trim())).unwrap();
    assert!(toast.len() > 8192, "the long value was toasted");
    assert!(!contains(&toast, secret.as_bytes()), "plaintext canary in TOAST");
    let wal = read_tree(&c.dir.join("data/pg_wal"));
    assert!(wal.iter().any(|(_, b)| contains(b, control.as_bytes())), "the plain column must be in the WAL: the grep works");
    for (p, b) in &wal {
        assert!(!contains(b, secret.as_bytes()), "plaintext canary in WAL segment {}", p.display());
    }
    let dump = c.pg_dump("app", &[]);
    assert!(dump.contains(control) && dump.contains("$cc$"));
    assert!(!dump.contains(secret), "plaintext canary in pg_dump output");
    assert_eq!(c.psql("app", "SELECT count(*) FROM t WHERE decrypt(s) LIKE 'CANARY-9f8e7d6c%'").trim(), "21");
}

#[test]
fn data_stays_readable_across_restarts() {
    let c = Cluster::start("restart", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (s encrypted_text); INSERT INTO t SELECT 'row ' || g FROM generate_series(1, 100) g");
    let before = c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY decrypt(s))) FROM t");
    c.restart();
    assert_eq!(c.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    assert_eq!(c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY decrypt(s))) FROM t"), before);
    c.stop_immediate();
    c.start_again();
    assert_eq!(c.psql("app", "SELECT md5(string_agg(decrypt(s), ',' ORDER BY decrypt(s))) FROM t"), before);
}

#[test]
fn dump_restore_and_binary_copy_round_trip() {
    let c = Cluster::start("dump", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, b encrypted_bytea, n encrypted_numeric); \
         INSERT INTO t SELECT g, 'value ' || g, jsonb_build_object('g', g), decode(md5(g::text), 'hex'), g * 1.5 FROM generate_series(1, 200) g; \
         INSERT INTO t VALUES (0, '', '{}', '', NULL);",
    );
    let digest = "SELECT md5(string_agg(concat_ws('|', id, decrypt(s), decrypt(j), decrypt(b), decrypt(n)), ';' ORDER BY id)) FROM t";
    let before = c.psql("app", digest);
    // pg_dump of the table, the table dropped, the dump restored with psql: same plaintext
    let dump = c.pg_dump("app", &["-t", "t"]);
    c.psql("app", "DROP TABLE t");
    let file = c.dir.join("t.sql");
    std::fs::write(&file, dump).unwrap();
    c.psql_file("app", &file);
    assert_eq!(c.psql("app", digest), before);
    // binary COPY out and back in (send/recv)
    let bin = c.dir.join("t.bin");
    c.psql("app", &format!("COPY t TO '{}' (FORMAT binary)", bin.display()));
    c.psql("app", &format!("CREATE TABLE t2 (LIKE t); COPY t2 FROM '{}' (FORMAT binary)", bin.display()));
    assert_eq!(c.psql("app", &digest.replace("FROM t", "FROM t2")), before);
    // ... the very envelopes, not values encrypted again.
    let envelopes = "SELECT md5(string_agg(concat_ws('|', id, format('%s', s), format('%s', j), format('%s', b), format('%s', n)), ';' ORDER BY id)) FROM t";
    assert_eq!(c.psql("app", &envelopes.replace("FROM t", "FROM t2")), c.psql("app", envelopes));
}

#[test]
fn alter_column_type_migrates_in_place() {
    let c = Cluster::start("migrate", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE people (id int PRIMARY KEY, national_id text, profile jsonb); \
         INSERT INTO people SELECT g, 'NID-' || g, jsonb_build_object('id', g) FROM generate_series(1, 500) g;",
    );
    let before = c.psql("app", "SELECT md5(string_agg(national_id || profile::text, ',' ORDER BY id)) FROM people");
    c.psql(
        "app",
        "ALTER TABLE people ALTER COLUMN national_id TYPE encrypted_text USING national_id::encrypted_text, \
                            ALTER COLUMN profile TYPE encrypted_jsonb USING profile::encrypted_jsonb; \
         ALTER TABLE people ADD COLUMN salary encrypted_numeric;",
    );
    let described = c.psql("app", "SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'people'::regclass AND attnum > 0");
    assert_eq!(described.trim(), "id:integer,national_id:encrypted_text,profile:encrypted_jsonb,salary:encrypted_numeric");
    assert_eq!(c.psql("app", "SELECT count(*) FROM people WHERE format('%s', national_id) LIKE 'NID-%'").trim(), "0");
    assert_eq!(c.psql("app", "SELECT md5(string_agg(decrypt(national_id) || decrypt(profile)::text, ',' ORDER BY id)) FROM people"), before);
    c.psql(
        "app",
        "ALTER TABLE people ALTER COLUMN national_id TYPE text USING decrypt(national_id), \
                            ALTER COLUMN profile TYPE jsonb USING decrypt(profile)",
    );
    assert_eq!(c.psql("app", "SELECT md5(string_agg(national_id || profile::text, ',' ORDER BY id)) FROM people"), before);
}

#[test]
fn two_concurrent_sessions_write_and_read() {
    let c = Cluster::start("concurrent", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (who text, n int, s encrypted_text)");
    let threads: Vec<_> = [Transport::Tcp, Transport::TcpSsl]
        .into_iter()
        .map(|how| {
            let mut client = c.connect(how, "app");
            std::thread::spawn(move || {
                let stmt = client.prepare_typed("INSERT INTO t VALUES ($1, $2, $3)", &[Type::TEXT, Type::INT4, Type::TEXT]).unwrap();
                for n in 0..300 {
                    let who = format!("{how:?}");
                    client.execute(&stmt, &[&who, &n, &format!("{who}-{n}")]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ok = c.psql("app", "SELECT count(*) FILTER (WHERE decrypt(s) = who || '-' || n), count(DISTINCT format('%s', s)) FROM t");
    assert_eq!(ok.trim(), "600|600");
}

#[test]
fn missing_key_means_55000_and_unreadable_data() {
    let c = Cluster::start("nokey", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (s encrypted_text); INSERT INTO t VALUES ('needs the key')");
    let key_files: Vec<_> = std::fs::read_dir(c.key_dir()).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "key")).collect();
    assert_eq!(key_files.len(), 1, "one key file per database: {key_files:?}");
    let key_file = &key_files[0];
    let meta = std::fs::metadata(key_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(!key_file.starts_with(c.dir.join("data")), "the key lives outside the data directory");
    let aside = c.dir.join("key.aside");
    std::fs::rename(key_file, &aside).unwrap();
    c.restart();
    let mut client = c.connect(Transport::Unix, "app");
    let active: bool = client.query_one("SELECT is_data_encryption_active()", &[]).unwrap().get(0);
    assert!(!active);
    for sql in ["SELECT decrypt(s) FROM t", "INSERT INTO t VALUES ('new')"] {
        let err = client.batch_execute(sql).unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{sql}: {}", db.message());
        assert!(db.hint().unwrap_or("").contains("set_data_encryption_key"), "{sql}: {:?}", db.hint());
    }
    // the envelope is still shown, and still safe to show
    let shown: String = client.query_one("SELECT format('%s', s) FROM t", &[]).unwrap().get(0);
    assert!(shown.starts_with("$cc$"));
    std::fs::rename(&aside, key_file).unwrap();
    c.restart();
    assert_eq!(c.psql("app", "SELECT decrypt(s) FROM t").trim(), "needs the key");
}

#[test]
fn unprivileged_roles_write_but_only_readers_decrypt() {
    let c = Cluster::start("roles", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE ROLE writer LOGIN; CREATE ROLE reader LOGIN IN ROLE data_encryption_reader; \
         CREATE TABLE t (s encrypted_text); GRANT SELECT, INSERT ON t TO writer, reader;",
    );
    // A fresh backend of a role with no privilege on the extension's internals loads the key.
    let mut writer = c.connect_as(Transport::TcpSsl, "app", "writer");
    writer.execute("INSERT INTO t VALUES ($1::text)", &[&"written by writer"]).unwrap();
    let err = writer.query_one("SELECT decrypt(s) FROM t", &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(db.hint().unwrap_or("").contains("data_encryption_reader"), "{:?}", db.hint());
    let err = writer.query_one("SELECT s::text FROM t", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    let mut reader = c.connect_as(Transport::Unix, "app", "reader");
    let plain: String = reader.query_one("SELECT decrypt(s) FROM t", &[]).unwrap().get(0);
    assert_eq!(plain, "written by writer");
}

#[test]
fn retrieving_the_key_needs_a_secure_connection_and_the_admin_role() {
    let c = Cluster::start("retrieve", &[]);
    c.database_with_extension("app");
    let key_file = std::fs::read_dir(c.key_dir()).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "key")).unwrap();
    let on_disk = std::fs::read_to_string(&key_file).unwrap();
    // TCP without SSL is refused, with a hint
    let mut plain = c.connect(Transport::Tcp, "app");
    let err = plain.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code(), &SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
    assert!(db.message().contains("requires a secure connection"), "{}", db.message());
    assert!(db.hint().unwrap_or("").contains("SSL"), "{:?}", db.hint());
    // SSL and the Unix socket are allowed, and give the key the provider holds
    let mut keys = Vec::new();
    for how in [Transport::TcpSsl, Transport::Unix] {
        let key: String = c.connect(how, "app").query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
        assert!(key.starts_with("CCK1-") && on_disk.contains(&key), "{how:?}");
        keys.push(key);
    }
    assert_eq!(keys[0], keys[1]);
    // a superuser may relax the rule for the session
    plain.batch_execute("SET pg_cellcrypt.require_secure_transport = off").unwrap();
    let key: String = plain.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
    assert_eq!(key, keys[0]);
    // roles: PUBLIC refused with a hint naming data_encryption_admin; members allowed
    c.psql("app", "CREATE ROLE clerk LOGIN; CREATE ROLE keeper LOGIN IN ROLE data_encryption_admin");
    let mut clerk = c.connect_as(Transport::Unix, "app", "clerk");
    let err = clerk.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(db.hint().unwrap_or("").contains("data_encryption_admin"), "{:?}", db.hint());
    let err = clerk.batch_execute("SET pg_cellcrypt.require_secure_transport = off").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    let key: String = c.connect_as(Transport::Unix, "app", "keeper").query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
    assert_eq!(key, keys[0]);
    // A key file swapped for another key is never shown. No memory holds the key text
    // (shared memory keeps derived keys only), so retrieval reads the file each time, checks
    // what it finds against the fingerprint and refuses, while the server runs and after a
    // restart; the data stays readable meanwhile.
    let mut admin = c.connect(Transport::Unix, "app");
    admin.batch_execute("CREATE TABLE kept (s encrypted_text); INSERT INTO kept VALUES ('still readable')").unwrap();
    let other: String = admin.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
    std::fs::write(&key_file, on_disk.replace(&keys[0], &other)).unwrap();
    for restart in [false, true] {
        if restart {
            drop(admin);
            c.restart();
            admin = c.connect(Transport::Unix, "app");
        } else {
            let read: String = admin.query_one("SELECT decrypt(s) FROM kept", &[]).unwrap().get(0);
            assert_eq!(read, "still readable");
            // A change now would leave no copy of the key it replaces: refused (55000), saying
            // how to repair the file. Setting the current key again writes it back.
            let fresh: String = admin.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
            let e = db_error(admin.query_one("SELECT set_data_encryption_key($1)", &[&fresh]));
            assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
            assert!(e.hint().unwrap_or("").contains("set_data_encryption_key('<the current key>')"), "{:?}", e.hint());
            let msg: String = admin.query_one("SELECT set_data_encryption_key($1)", &[&keys[0]]).unwrap().get(0);
            assert!(msg.contains("holds it again"), "{msg}");
            assert!(std::fs::read_to_string(&key_file).unwrap().contains(&keys[0]));
            let shown: String = admin.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
            assert_eq!(shown, keys[0]);
            // Swapped again, for the restart.
            std::fs::write(&key_file, on_disk.replace(&keys[0], &other)).unwrap();
        }
        let err = admin.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap_err();
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", db.message());
        assert!(db.detail().unwrap_or("").contains("Expected fingerprint"), "{:?}", db.detail());
        assert!(!db.message().contains(&other) && !db.detail().unwrap_or("").contains(&other));
    }
    std::fs::write(&key_file, &on_disk).unwrap();
}

#[test]
fn pg_dump_into_a_second_cluster_arrives_unreadable() {
    let a = Cluster::start("origin", &[]);
    let b = Cluster::start("elsewhere", &[]);
    a.database_with_extension("app");
    a.psql("app", "CREATE TABLE t (id int, s encrypted_text); INSERT INTO t SELECT g, 'moved secret ' || g FROM generate_series(1, 50) g");
    let envelopes = "SELECT md5(string_agg(format('%s', s), ',' ORDER BY id)) FROM t";
    let before = a.psql("app", envelopes);
    let file = b.dir.join("app.sql");
    std::fs::write(&file, a.pg_dump("app", &[])).unwrap();
    b.createdb("app");
    b.psql_file("app", &file);
    // The ciphertext arrives byte for byte, and the other cluster's key cannot open it.
    assert_eq!(b.psql("app", envelopes), before);
    let out = b.psql_raw("app", "SELECT decrypt(s) FROM t LIMIT 1");
    assert!(!out.status.success(), "decrypted in a cluster that never had the key: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("moved secret"));
    assert_eq!(a.psql("app", "SELECT decrypt(s) FROM t WHERE id = 7").trim(), "moved secret 7");
}
