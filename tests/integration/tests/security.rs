//! The security and fault suite: canaries in every output a deployment produces, tampering with
//! stored envelopes at the SQL level, the privileges matrix, limits, and a backend lost in the
//! middle of a write. (Fuzzing of the crypto core is `make fuzz`.)

use cellcrypt_integration::*;
use postgres::error::SqlState;
use postgres::types::Type;

fn generate(c: &Cluster, db: &str) -> String {
    c.psql(db, "SELECT generate_data_encryption_key()").trim().to_owned()
}

/// Every file of the data directory (heap, TOAST, indexes, WAL, pg_stat_statements' texts...).
fn data_files(c: &Cluster) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    read_tree(&c.dir.join("data"))
}

fn assert_absent(what: &str, secret: &str, files: &[(std::path::PathBuf, Vec<u8>)]) {
    for (p, b) in files {
        assert!(!contains(b, secret.as_bytes()), "{what} found in {}", p.display());
    }
}

const CANARY_TABLE: &str = "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, secret encrypted_text, doc encrypted_jsonb, photo encrypted_bytea)";

/// The workload both canary tests run: writes through bind parameters (as drivers send them),
/// reads, a lookup by plaintext, and the error paths: a unique violation and a NOT NULL
/// violation on rows carrying plaintext, and a tampered value that fails to decrypt.
fn canary_workload(client: &mut postgres::Client, tag: &str, id0: i32) -> Vec<String> {
    let canaries: Vec<String> = (0..5).map(|i| format!("PLAIN-{tag}-{i}-Xq7Wm3")).collect();
    let ins = client
        .prepare_typed("INSERT INTO people VALUES ($1, $2, $3, $4, $5)", &[Type::INT4, Type::TEXT, Type::TEXT, Type::JSONB, Type::BYTEA])
        .unwrap();
    let doc = serde_json_like(&canaries[1]);
    client.execute(&ins, &[&id0, &"visible name", &canaries[0], &doc, &canaries[2].as_bytes().to_vec()]).unwrap();
    let row = client.query_one("SELECT decrypt(secret), decrypt(doc)::text, decrypt(photo) FROM people WHERE id = $1", &[&id0]).unwrap();
    assert_eq!(row.get::<_, String>(0), canaries[0]);
    // A lookup by plaintext: the value is a bind parameter of the comparison.
    let n: i64 = client.query_one("SELECT count(*) FROM people WHERE decrypt(secret) = $1", &[&canaries[0]]).unwrap().get(0);
    assert_eq!(n, 1);
    // A unique violation on a row whose encrypted column carries a canary.
    let e = db_error(client.execute(&ins, &[&id0, &"dup", &canaries[3], &doc, &Vec::<u8>::new()]));
    assert_eq!(e.code(), &SqlState::UNIQUE_VIOLATION);
    // A NOT NULL violation: PostgreSQL prints the failing row, where our columns show envelopes.
    let null_name = client.prepare_typed("INSERT INTO people (id, name, secret) VALUES ($1, NULL, $2)", &[Type::INT4, Type::TEXT]).unwrap();
    let e = db_error(client.execute(&null_name, &[&(id0 + 1), &canaries[4]]));
    assert_eq!(e.code(), &SqlState::NOT_NULL_VIOLATION);
    let detail = e.detail().unwrap_or("").to_owned();
    assert!(detail.contains("$cc$") && !detail.contains(&canaries[4]), "{detail}");
    // A failed decrypt: one byte of the ciphertext flipped in place.
    client
        .execute(
            "UPDATE people SET photo = cellcrypt_test.tampered(photo, 30) WHERE id = $1",
            &[&id0],
        )
        .unwrap();
    let e = db_error(client.query_one("SELECT decrypt(photo) FROM people WHERE id = $1", &[&id0]));
    assert_eq!(e.code(), &SqlState::DATA_CORRUPTED);
    canaries
}

/// `{"note": "<s>"}` as a JSON value, without a JSON crate.
fn serde_json_like(s: &str) -> JsonText {
    JsonText(format!("{{\"note\": \"{s}\"}}"))
}

/// A JSON document already in text form, sent as a jsonb parameter.
#[derive(Debug)]
struct JsonText(String);

impl postgres::types::ToSql for JsonText {
    fn to_sql(&self, _: &Type, out: &mut postgres::types::private::BytesMut) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]); // jsonb binary format version
        out.extend_from_slice(self.0.as_bytes());
        Ok(postgres::types::IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    postgres::types::to_sql_checked!();
}

/// SQL helpers for tampering, installed in a schema of their own: the envelope of a value as
/// bytes, and a value rebuilt from bytes through the type's input function (which accepts an
/// envelope's text form, as a dump does).
const TAMPER_HELPERS: &str = r#"
CREATE SCHEMA cellcrypt_test;
CREATE FUNCTION cellcrypt_test.env(anyelement) RETURNS bytea LANGUAGE sql IMMUTABLE
    AS $$ SELECT decode(substr(format('%s', $1), 5), 'base64') $$;
CREATE FUNCTION cellcrypt_test.txt(bytea) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT '$cc$' || translate(encode($1, 'base64'), E'\n', '') $$;
CREATE FUNCTION cellcrypt_test.tampered(v anyelement, byte int) RETURNS anyelement LANGUAGE plpgsql AS $$
DECLARE b bytea := cellcrypt_test.env(v);
BEGIN
    b := set_byte(b, byte, get_byte(b, byte) # 1);
    EXECUTE format('SELECT %L::%s', cellcrypt_test.txt(b), pg_typeof(v)) INTO v;
    RETURN v;
END $$;
GRANT USAGE ON SCHEMA cellcrypt_test TO PUBLIC;
"#;

/// A cluster with pg_stat_statements and auto_explain loaded and `settings` applied, and a
/// database `app` with the canary table and the tampering helpers.
fn canary_cluster(name: &str, settings: &[&str]) -> Cluster {
    let mut conf = vec!["shared_preload_libraries = 'pg_cellcrypt,pg_stat_statements,auto_explain'"];
    conf.extend_from_slice(settings);
    let c = Cluster::start(name, &conf);
    c.database_with_extension("app");
    c.psql("app", "CREATE EXTENSION pg_stat_statements");
    c.psql("app", TAMPER_HELPERS);
    c.psql("app", CANARY_TABLE);
    c
}

#[test]
fn canaries_reach_no_log_statistics_file_wal_or_dump() {
    let c = canary_cluster(
        "canaries",
        &[
            "log_statement = all",
            "log_min_duration_statement = 0",
            "log_min_error_statement = debug1",
            "log_parameter_max_length = -1",
            "log_parameter_max_length_on_error = -1",
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_analyze = on",
            "auto_explain.log_verbose = on",
            "auto_explain.log_nested_statements = on",
            "wal_level = replica",
        ],
    );
    // The key canary, set over the extended protocol (a bind parameter) and then again in the
    // SQL text of the simple protocol, after a change to another key in between.
    let key = generate(&c, "app");
    let other = generate(&c, "app");
    let mut ssl = c.connect(Transport::TcpSsl, "app");
    ssl.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap();
    c.wait_reencrypted("app");
    ssl.query_one("SELECT set_data_encryption_key($1)", &[&other]).unwrap();
    c.wait_reencrypted("app");
    c.psql("app", &format!("SELECT set_data_encryption_key('{key}')"));
    c.wait_reencrypted("app");
    let canaries = canary_workload(&mut ssl, "all", 1);
    // A wrong key, then the right one, restoring a dump in another database of the cluster.
    let dump = c.pg_dump("app", &[]);
    c.createdb("restored");
    let file = c.dir.join("app.sql");
    std::fs::write(&file, &dump).unwrap();
    c.psql_file("restored", &file);
    let wrong = generate(&c, "app");
    let mut restored = c.connect(Transport::TcpSsl, "restored");
    let e = db_error(restored.query_one("SELECT set_data_encryption_key($1)", &[&wrong]));
    assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE);
    assert!(!c.psql_raw("restored", &format!("SELECT set_data_encryption_key('{wrong}')")).status.success());
    c.psql("restored", &format!("SELECT set_data_encryption_key('{key}')"));
    let back: String = restored.query_one("SELECT decrypt(secret) FROM people WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(back, canaries[0]);
    c.psql("app", "CHECKPOINT");

    let log = c.server_log();
    // The settings did their work: statements, plans and parameters were logged.
    assert!(log.contains("set_data_encryption_key") && log.contains("Query Text:") && log.contains("parameters: $1"), "logging is not on");
    let statements = c.psql("app", "SELECT string_agg(query, E'\\n') FROM pg_stat_statements");
    assert!(statements.contains("set_data_encryption_key") && statements.contains("INSERT INTO people"), "{statements}");
    let files = data_files(&c);
    assert!(files.iter().any(|(_, b)| contains(b, b"visible name")), "the grep of the data directory works");
    let dumps = [dump, c.pg_dump("restored", &[])];
    // The key canary (and the wrong key) appear nowhere: log, statistics, data files, dumps.
    for secret in [&key[5..], &other[5..], &wrong[5..]] {
        assert!(!log.contains(secret), "a key in the server log");
        assert!(!statements.contains(secret), "a key in pg_stat_statements");
        assert_absent("a key", secret, &files);
        for d in &dumps {
            assert!(!d.contains(secret), "a key in a dump");
        }
    }
    // Plaintext canaries appear in no relation file, WAL segment or dump. (With every
    // statement and parameter logged, the log does carry them: see the next test.)
    for p in &canaries {
        assert_absent("a plaintext canary", p, &files);
        assert!(!statements.contains(p.as_str()), "plaintext in pg_stat_statements");
        for d in &dumps {
            assert!(!d.contains(p.as_str()), "plaintext in a dump");
        }
    }
    assert!(log.contains(&canaries[0]), "with log_parameter_max_length = -1 the bound plaintext is logged; the next test shows the settings that prevent it");
}

/// The settings the README recommends keep bound plaintext out of the log, while errors and
/// DDL are still logged.
#[test]
fn the_documented_log_settings_keep_plaintext_out_of_the_log() {
    let c = canary_cluster(
        "quietlog",
        &[
            "log_statement = ddl",
            "log_min_duration_statement = -1",
            "log_min_error_statement = error",
            "log_parameter_max_length = 0",
            "log_parameter_max_length_on_error = 0",
            "auto_explain.log_min_duration = -1",
        ],
    );
    let mut client = c.connect(Transport::TcpSsl, "app");
    let canaries = canary_workload(&mut client, "quiet", 1);
    let log = c.server_log();
    assert!(log.contains("CREATE TABLE people"), "DDL is logged");
    assert!(log.contains("duplicate key value violates unique constraint") && log.contains("STATEMENT:  INSERT INTO people"), "errors and their statements are logged");
    for p in &canaries {
        assert!(!log.contains(p.as_str()), "plaintext canary {p} in the log:\n{log}");
    }
}

/// The SQLSTATE of `SELECT decrypt(<expr>)`, or `decrypted:<plaintext>`.
fn decrypt_outcome(client: &mut postgres::Client, expr: &str) -> String {
    match client.query_one(&format!("SELECT decrypt({expr})::text"), &[]) {
        Ok(row) => format!("decrypted:{}", row.get::<_, String>(0)),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("{expr}: {e}"));
            assert!(!db.message().contains("secret-") && !db.detail().unwrap_or("").contains("secret-"), "plaintext in an error: {db:?}");
            db.code().code().to_owned()
        }
    }
}

#[test]
fn tampered_envelopes_give_their_documented_error_and_never_wrong_plaintext() {
    let c = Cluster::start("tamper", &[]);
    c.database_with_extension("app");
    c.database_with_extension("other");
    c.psql("app", TAMPER_HELPERS);
    c.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, a encrypted_text, b encrypted_text, n encrypted_int8, j encrypted_jsonb, y encrypted_bytea); \
         INSERT INTO t SELECT g, 'secret-a-' || g, 'secret-b-' || g, g, jsonb_build_object('k', 'secret-j-' || g), convert_to('secret-y-' || g, 'UTF8') FROM generate_series(1, 3) g; \
         CREATE TABLE outcome (pos int, bit int, state text)",
    );
    let mut client = c.connect(Transport::Unix, "app");
    let len: i32 = client.query_one("SELECT octet_length(cellcrypt_test.env(a)) FROM t WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(len, "secret-a-1".len() as i32 + 45);

    // Every byte of the envelope, each with a different bit flipped.
    client
        .batch_execute(
            "DO $$ DECLARE e bytea; pos int; bit int; st text; BEGIN
               SELECT cellcrypt_test.env(a) INTO e FROM t WHERE id = 1;
               FOR pos IN 0 .. octet_length(e) - 1 LOOP
                 bit := pos % 8;
                 BEGIN
                   EXECUTE format('SELECT decrypt(%L::encrypted_text)', cellcrypt_test.txt(set_byte(e, pos, get_byte(e, pos) # (1 << bit)))) INTO st;
                   st := 'decrypted:' || st;
                 EXCEPTION WHEN OTHERS THEN st := SQLSTATE;
                 END;
                 INSERT INTO outcome VALUES (pos, bit, st);
               END LOOP;
             END $$",
        )
        .unwrap();
    let rows = client.query("SELECT pos, state FROM outcome ORDER BY pos", &[]).unwrap();
    assert_eq!(rows.len(), len as usize);
    for r in rows {
        let (pos, state): (i32, String) = (r.get(0), r.get(1));
        let expected = match pos {
            0 => "22P02",      // the format version: refused by the input function
            1..=2 => "XX001",  // the blind-index binding (authenticated): authentication fails
            3..=4 => "42704",  // the key version: no such key
            _ => "XX001",      // nonce, ciphertext, tag: authentication fails
        };
        assert_eq!(state, expected, "byte {pos} flipped");
    }

    // Truncated to every shorter length: malformed below the 45-byte overhead, then a failed tag.
    for keep in 0..len {
        let text: String = client
            .query_one(&format!("SELECT cellcrypt_test.txt(substr(cellcrypt_test.env(a), 1, {keep})) FROM t WHERE id = 1"), &[])
            .unwrap()
            .get(0);
        let state = decrypt_outcome(&mut client, &format!("'{text}'::encrypted_text"));
        let expected = if keep < 45 { "22P02" } else { "XX001" };
        assert_eq!(state, expected, "truncated to {keep} bytes");
    }

    // Moved to another row or another column of the same type: envelopes are bound to their
    // type, encoding and database key, not to their row (README, threat model). The value
    // moves whole: the other row's plaintext, never a mix.
    assert_eq!(decrypt_outcome(&mut client, "(SELECT a FROM t WHERE id = 2)"), "decrypted:secret-a-2");
    client.batch_execute("UPDATE t SET a = (SELECT a FROM t WHERE id = 2), b = (SELECT a FROM t WHERE id = 3) WHERE id = 1").unwrap();
    assert_eq!(decrypt_outcome(&mut client, "(SELECT a FROM t WHERE id = 1)"), "decrypted:secret-a-2");
    assert_eq!(decrypt_outcome(&mut client, "(SELECT b FROM t WHERE id = 1)"), "decrypted:secret-a-3");
    // Moved to a column of another type: the type is in the AAD.
    for (column, ty) in [("n", "encrypted_int8"), ("j", "encrypted_jsonb"), ("y", "encrypted_bytea")] {
        client
            .batch_execute(&format!(
                "DO $$ BEGIN EXECUTE format('UPDATE t SET {column} = %L::{ty} WHERE id = 2', (SELECT cellcrypt_test.txt(cellcrypt_test.env(a)) FROM t WHERE id = 2)); END $$"
            ))
            .unwrap();
        assert_eq!(decrypt_outcome(&mut client, &format!("(SELECT {column} FROM t WHERE id = 2)")), "XX001", "text envelope in {ty}");
    }
    // From another database: another key under the same version number.
    let foreign = c.psql("other", "CREATE TABLE f (a encrypted_text); INSERT INTO f VALUES ('secret-other'); SELECT a FROM f");
    assert!(foreign.trim().starts_with("$cc$"));
    assert_eq!(decrypt_outcome(&mut client, &format!("'{}'::encrypted_text", foreign.trim())), "XX001");

    // A key change with those cells in place: what cannot be decrypted cannot be re-encrypted.
    // The work stops at that batch and says where, in the status and progress views and as an
    // error from the foreground procedure; nothing is lost, and it resumes once the row is fixed.
    let old = c.psql("app", "SELECT a FROM t WHERE id = 3").trim().to_owned();
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    let started = std::time::Instant::now();
    let status = loop {
        let s = c.psql("app", "SELECT reencryption FROM data_encryption_status");
        if s.starts_with("blocked") {
            break s;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "never blocked: {s}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.contains("could not decrypt") && status.contains("of public.t: SELECT ctid FROM public.t WHERE ctid >= '(0,0)'"), "{status}");
    assert!(c.psql("app", "SELECT blocked_by FROM data_encryption_progress").contains("could not decrypt"));
    let e = db_error(client.batch_execute("CALL finish_data_encryption_reencryption()"));
    assert_eq!(e.code(), &SqlState::DATA_CORRUPTED);
    assert!(e.message().contains("re-encryption is blocked") && e.hint().unwrap_or("").contains("delete it"), "{e:?}");
    assert_eq!(decrypt_outcome(&mut client, "(SELECT a FROM t WHERE id = 3)"), "decrypted:secret-a-3", "readable meanwhile");
    c.psql("app", "UPDATE t SET n = NULL, j = NULL, y = NULL WHERE id = 2");
    c.wait_reencrypted("app");
    // Replayed after the key change retired the key it was sealed under.
    c.psql("app", &format!("UPDATE t SET a = '{old}' WHERE id = 3"));
    let e = db_error(client.query_one("SELECT decrypt(a) FROM t WHERE id = 3", &[]));
    assert_eq!(e.code(), &SqlState::UNDEFINED_OBJECT);
    assert!(e.message().contains("key version 1"), "{}", e.message());
    assert_eq!(c.psql("app", "SELECT encryption_key_version(a) FROM t WHERE id = 3").trim(), "1");
    // The rows nobody touched are intact.
    assert_eq!(decrypt_outcome(&mut client, "(SELECT a FROM t WHERE id = 2)"), "decrypted:secret-a-2");
}

/// Roles of the privileges matrix, in column order.
const ROLES: [&str; 5] = ["nobody", "reader", "admin", "owner", "postgres"];

/// Every function, view, cast and table of the extension, as a probe, with who may use it:
/// `y` allowed, `-` refused with 42501. The README's privileges table is this table.
const MATRIX: &[(&str, &str, &str)] = &[
    // (what, probe, nobody reader admin owner superuser)
    ("decrypt(encrypted_text)", "SELECT decrypt(s) FROM t", "-y--y"),
    ("cast encrypted_text AS text", "SELECT s::text FROM t", "-y--y"),
    ("decrypt(encrypted_bytea)", "SELECT decrypt(y) FROM t", "-y--y"),
    ("decrypt(encrypted_int8) in WHERE", "SELECT id FROM t WHERE decrypt(n) = 7", "-y--y"),
    ("encrypt(text), assignment cast on INSERT", "INSERT INTO t (id, s) VALUES (2, 'new')", "yyyyy"),
    ("encrypt(int8)", "SELECT encrypt(7::int8)", "yyyyy"),
    ("SELECT of the envelopes (text form)", "SELECT s, y, n FROM t", "yyyyy"),
    ("encryption_key_version(encrypted_text)", "SELECT encryption_key_version(s) FROM t", "yyyyy"),
    ("blind_index(encrypted_text) of a registered column", "SELECT blind_index(s) FROM t", "yyyyy"),
    ("blind_index(text, table, column) lookup", "SELECT blind_index('x', 't', 's')", "yyyyy"),
    ("blind_index of an unregistered column", "SELECT blind_index(u) FROM t", "-----"),
    ("blind_index(text, table, column) of an unregistered column", "SELECT blind_index('x', 't', 'u')", "-----"),
    ("copying an envelope into a registered column", "INSERT INTO t (id, s) SELECT 3, u FROM t", "-y--y"),
    ("blind_index_columns (view)", "SELECT * FROM blind_index_columns", "yyyyy"),
    ("register_blind_index() of an empty column", "SELECT register_blind_index('t', 'e')", "--y-y"),
    ("register_blind_index() of a column that holds values", "SELECT register_blind_index('t', 'u')", "----y"),
    ("is_data_encryption_active()", "SELECT is_data_encryption_active()", "yyyyy"),
    ("generate_data_encryption_key()", "SELECT generate_data_encryption_key()", "yyyyy"),
    ("retrieve_data_encryption_key()", "SELECT retrieve_data_encryption_key()", "--y-y"),
    ("set_data_encryption_key(text)", "SELECT set_data_encryption_key('{key}')", "--y-y"),
    ("data_encryption_status (view)", "SELECT * FROM data_encryption_status", "--y-y"),
    ("data_encryption_status()", "SELECT * FROM data_encryption_status()", "--y-y"),
    ("data_encryption_audit (view): the audit record", "SELECT * FROM data_encryption_audit", "--y-y"),
    ("data_encryption_audit()", "SELECT * FROM data_encryption_audit()", "--y-y"),
    ("data_encryption_progress (view)", "SELECT * FROM data_encryption_progress", "--y-y"),
    ("rotate_blind_index_key()", "SELECT rotate_blind_index_key()", "--y-y"),
    ("CALL finish_data_encryption_reencryption()", "CALL finish_data_encryption_reencryption()", "--y-y"),
    ("cellcrypt.keyring (table)", "SELECT * FROM cellcrypt.keyring", "----y"),
    ("cellcrypt.index_key (table)", "SELECT * FROM cellcrypt.index_key", "----y"),
    ("cellcrypt.reencryption_job (table)", "SELECT * FROM cellcrypt.reencryption_job", "----y"),
    ("cellcrypt.blind_index_column (table)", "SELECT * FROM cellcrypt.blind_index_column", "----y"),
    ("cellcrypt.reencrypt(encrypted_text), outside a batch", "SELECT cellcrypt.reencrypt(s) FROM t", "-----"),
    ("cellcrypt._reencrypt_step()", "SELECT cellcrypt._reencrypt_step()", "--y-y"),
    ("cellcrypt._initialize()", "SELECT cellcrypt._initialize()", "----y"),
    ("cellcrypt.key_location (table)", "SELECT * FROM cellcrypt.key_location", "----y"),
    ("cellcrypt.opens(encrypted_text), outside a restore's check", "SELECT cellcrypt.opens(s) FROM t", "-----"),
    ("cellcrypt._refuse_restore_over_live_data()", "SELECT cellcrypt._refuse_restore_over_live_data() FROM t WHERE false", "----y"),
    ("share_data_encryption_keyring() (Citus; nothing to share here)", "SELECT share_data_encryption_keyring()", "--y-y"),
    ("cellcrypt._workers_progress() (Citus; no workers here)", "SELECT * FROM cellcrypt._workers_progress()", "--y-y"),
];

const README_BEGIN: &str = "<!-- privileges matrix: generated by tests/integration/tests/security.rs -->";
const README_END: &str = "<!-- end of the privileges matrix -->";

/// The README's privileges table is the one this suite measured: rendered from the rows, it must
/// stand between the markers. With CELLCRYPT_REGENERATE_README=1 the test writes it there.
fn readme_matrix_is(rows: &[(&str, String)]) {
    let mut table = String::from("| object | nobody | reader | admin | table owner | superuser |\n|---|:-:|:-:|:-:|:-:|:-:|\n");
    for (what, line) in rows {
        let cells: Vec<String> = line.chars().map(|c| c.to_string()).collect();
        table.push_str(&format!("| {what} | {} |\n", cells.join(" | ")));
    }
    let path = repo().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (Some(b), Some(e)) = (readme.find(README_BEGIN), readme.find(README_END)) else { panic!("README.md lacks the privileges matrix markers") };
    let current = &readme[b + README_BEGIN.len()..e];
    let wanted = format!("\n{table}");
    if current == wanted {
        return;
    }
    if std::env::var_os("CELLCRYPT_REGENERATE_README").is_some() {
        std::fs::write(&path, format!("{}{wanted}{}", &readme[..b + README_BEGIN.len()], &readme[e..])).unwrap();
        return;
    }
    panic!("README.md's privileges matrix is not the one this suite measured; run this test with CELLCRYPT_REGENERATE_README=1 to regenerate it. Measured:\n{table}");
}

/// Runs `probe` as each of [`ROLES`]: `y` where it succeeds, `-` where it is refused with 42501
/// (any other error fails the test). Each probe runs in a transaction rolled back, except a
/// procedure call, which commits.
fn who_may(client: &mut postgres::Client, probe: &str) -> String {
    let mut line = String::new();
    for role in ROLES {
        client.batch_execute(&format!("SET ROLE {role}")).unwrap();
        let r = if probe.starts_with("CALL") { client.batch_execute(probe) } else { client.batch_execute(&format!("BEGIN; {probe}; ROLLBACK")) };
        let _ = client.batch_execute("ROLLBACK; RESET ROLE");
        line.push(match r {
            Ok(()) => 'y',
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => '-',
            Err(e) => panic!("{probe} as {role}: {e}"),
        });
    }
    line
}

#[test]
fn privileges_matrix() {
    let c = Cluster::start("privileges", &[]);
    c.database_with_extension("app");
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    c.psql(
        "app",
        "CREATE ROLE nobody LOGIN; CREATE ROLE reader LOGIN IN ROLE data_encryption_reader; \
         CREATE ROLE admin LOGIN IN ROLE data_encryption_admin; CREATE ROLE owner LOGIN; \
         CREATE TABLE t (id int, s encrypted_text, y encrypted_bytea, n encrypted_int8, u encrypted_text, e encrypted_text); \
         INSERT INTO t VALUES (1, 'secret', 'bytes', 7, 'unregistered'); \
         SELECT register_blind_index('t', 's'); CREATE INDEX ON t (blind_index(s)); \
         ALTER TABLE t OWNER TO owner; GRANT SELECT, INSERT ON t TO PUBLIC",
    );
    let mut client = c.connect(Transport::Unix, "app");
    let mut got = String::new();
    let mut want = String::new();
    let mut got_rows = Vec::new();
    for (what, probe, expected) in MATRIX {
        let line = who_may(&mut client, &probe.replace("{key}", &key));
        got.push_str(&format!("{what:50} {line}\n"));
        got_rows.push((*what, line.clone()));
        want.push_str(&format!("{what:50} {expected}\n"));
    }
    assert_eq!(got, want, "the privileges matrix (roles: {ROLES:?})");
    readme_matrix_is(&got_rows);

    // Every cast the extension defines, each way: casts to an encrypted type (encrypting) are
    // anyone's, casts from one (decrypting) readers' and superusers' only.
    let casts = c.psql(
        "app",
        "SELECT format_type(castsource, NULL) || '|' || format_type(casttarget, NULL) FROM pg_cast \
         WHERE castsource IN (SELECT oid FROM pg_type WHERE typname LIKE 'encrypted\\_%') OR casttarget IN (SELECT oid FROM pg_type WHERE typname LIKE 'encrypted\\_%') ORDER BY 1",
    );
    let mut n = 0;
    for line in casts.lines().filter(|l| !l.is_empty()) {
        let (source, target) = line.split_once('|').unwrap();
        let sample = |ty: &str| cellcrypt_integration::SAMPLES.iter().find(|(t, _)| *t == ty).map(|(_, v)| format!("{v}::{ty}"));
        let (probe, expected) = if source == "encrypted_text" && target == "encrypted_text" {
            // The length coercion to a registered column's encrypted_text(<id>): it binds the
            // value to the column, so copying an existing envelope there needs the reader role.
            ("SELECT CAST(u AS encrypted_text(1)) FROM t".to_owned(), "-y--y")
        } else if source.starts_with("encrypted_") {
            let plain = c.psql("app", &format!("SELECT format_type(casttarget, NULL) FROM pg_cast WHERE castsource = '{source}'::regtype AND casttarget = '{target}'::regtype"));
            let value = sample(plain.trim()).unwrap_or_else(|| panic!("no sample value for {}", plain.trim()));
            (format!("SELECT CAST(CAST({value} AS {source}) AS {target})"), "-y--y")
        } else {
            let value = sample(source).unwrap_or_else(|| panic!("no sample value for {source}"));
            (format!("SELECT CAST({value} AS {target})"), "yyyyy")
        };
        assert_eq!(who_may(&mut client, &probe), expected, "{probe}");
        n += 1;
    }
    // Encrypting: from each plain type, and from every type pg_cast lets PostgreSQL assign to
    // it (asserted type by type in tests/integration/tests/drivers.rs).
    assert!(n >= 40, "{n} casts: 7 decrypting, 1 binding to a registered column, the rest encrypting");

    // SECURITY DEFINER functions of the extension all pin their search_path, so a caller's
    // search_path cannot turn one against its owner.
    let definers = c.psql(
        "app",
        "SELECT count(*) FILTER (WHERE p.prosecdef), count(*) FILTER (WHERE p.prosecdef AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog%', false)) \
         FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' \
         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_cellcrypt'",
    );
    // Two: the re-encryption procedure's reports, which read the job table for administrators.
    assert_eq!(definers.trim(), "2|0", "SECURITY DEFINER functions (all, without a pinned search_path)");
    // Every function of the extension is covered by a probe above or is a type's I/O function.
    let functions = c.psql(
        "app",
        "SELECT string_agg(DISTINCT p.proname, ',' ORDER BY p.proname) FROM pg_proc p \
         JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' \
         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_cellcrypt' \
         WHERE p.proname !~ '^encrypted_.*_(in|out|recv|send)$'",
    );
    let probed: Vec<&str> = MATRIX.iter().map(|(_, p, _)| *p).collect();
    for f in functions.trim().split(',') {
        let covered = probed.iter().any(|p| p.contains(&format!("{f}("))) || f.contains("_to_encrypted_") || ["_before_insert_from_dump", "_keyring_write_is_internal", "_check_ddl", "_holds_encrypted", "_reencryption_totals", "_reencryption_blocked_by", "_reencryption_report", "bind_to_column", "encrypted_text_typmod_in", "encrypted_text_typmod_out",
            // A Citus worker's entry points: who may call them, and where, is tested in citus.rs.
            "_adopt_cluster_keyring", "_cluster_set_data_encryption_key"].contains(&f);
        assert!(covered, "function {f} is not in the privileges matrix");
    }
    // The audit record on disk: readable by the server's OS user only.
    for (p, _) in read_tree(&c.key_dir()) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions()) & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
}

/// Anonymous (private) resident memory of a server process, in KiB: what a leak would grow.
fn rss_anon_kib(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("RssAnon:")).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()).unwrap()
}

#[test]
fn limits_round_trip_and_memory_stays_bounded() {
    let c = Cluster::start("limits", &["shared_buffers = 256MB"]);
    c.database_with_extension("app");
    let mut client = c.connect(Transport::Unix, "app");

    // A 100 MB value each way: sent as a bind parameter and read back through the driver, and
    // built and checked inside the server.
    let big: Vec<u8> = (0..100u32 * 1024 * 1024).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    client.batch_execute("CREATE TABLE big (id int, y encrypted_bytea, s encrypted_text)").unwrap();
    let ins = client.prepare_typed("INSERT INTO big (id, y) VALUES (1, $1)", &[Type::BYTEA]).unwrap();
    client.execute(&ins, &[&big]).unwrap();
    let back: Vec<u8> = client.query_one("SELECT decrypt(y) FROM big WHERE id = 1", &[]).unwrap().get(0);
    assert!(back == big, "the 100 MB value came back different");
    drop(back);
    client.batch_execute("INSERT INTO big (id, s) SELECT 2, repeat('0123456789abcdef', 100 * 1024 * 1024 / 16)").unwrap();
    let same: bool = client.query_one("SELECT md5(decrypt(s)) = md5(repeat('0123456789abcdef', 100 * 1024 * 1024 / 16)) AND octet_length(s::text) = 104857600 FROM big WHERE id = 2", &[]).unwrap().get(0);
    assert!(same);
    let stored: i32 = client.query_one("SELECT pg_column_size(y) FROM big WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(stored, 100 * 1024 * 1024 + 45, "stored as one envelope, 45 bytes over the plaintext, uncompressed");

    // 50 encrypted columns, full rows and NULL-heavy rows, and empty values.
    let cols: Vec<String> = (0..50).map(|i| format!("c{i} {}", ["encrypted_text", "encrypted_bytea", "encrypted_int8", "encrypted_jsonb", "encrypted_numeric"][i % 5])).collect();
    client.batch_execute(&format!("CREATE TABLE wide (id int, {})", cols.join(", "))).unwrap();
    let values = |g: &str| -> Vec<String> {
        (0..50)
            .map(|i| match i % 5 {
                0 => format!("'t{i}-' || {g}"),
                1 => format!("convert_to('b{i}-' || {g}, 'UTF8')"),
                2 => format!("{g}::int8 * {i}"),
                3 => format!("jsonb_build_object('c', {i}, 'g', {g})"),
                _ => format!("{g}::numeric / 7 + {i}"),
            })
            .collect()
    };
    client.batch_execute(&format!("INSERT INTO wide SELECT g, {} FROM generate_series(1, 500) g", values("g").join(", "))).unwrap();
    // NULL-heavy: one column set in 49 of 50 NULLs, a different one per row.
    let sparse = (0..50).map(|i| format!("CASE WHEN g % 50 = {i} THEN {} END", values("g")[i])).collect::<Vec<_>>().join(", ");
    client.batch_execute(&format!("INSERT INTO wide SELECT g, {sparse} FROM generate_series(1001, 2000) g")).unwrap();
    let decrypted = (0..50).map(|i| format!("decrypt(c{i})::text")).collect::<Vec<_>>().join(" || '|' || ");
    let plain = values("id").iter().map(|v| format!("({v})::text")).collect::<Vec<_>>().join(" || '|' || ");
    let (full_ok, nulls, sparse_ok): (bool, i64, bool) = {
        let r = client
            .query_one(
                &format!(
                    "SELECT bool_and({decrypted} = {plain}) FILTER (WHERE id <= 500), \
                            sum(({}) ) FILTER (WHERE id > 1000), \
                            bool_and(coalesce({}, 'none') = coalesce({}, 'none')) FILTER (WHERE id > 1000) FROM wide",
                    (0..50).map(|i| format!("(c{i} IS NULL)::int")).collect::<Vec<_>>().join(" + "),
                    (0..50).map(|i| format!("decrypt(c{i})::text")).collect::<Vec<_>>().join(", "),
                    (0..50).map(|i| format!("CASE WHEN id % 50 = {i} THEN ({})::text END", values("id")[i])).collect::<Vec<_>>().join(", "),
                ),
                &[],
            )
            .unwrap();
        (r.get(0), r.get::<_, i64>(1), r.get(2))
    };
    assert!(full_ok, "50 columns round trip");
    assert_eq!(nulls, 1000 * 49, "NULLs stay NULL");
    assert!(sparse_ok, "the one set column of each sparse row round-trips");
    client
        .batch_execute("CREATE TABLE empty (t encrypted_text, b encrypted_bytea, j encrypted_jsonb); INSERT INTO empty VALUES ('', '', '{}'), ('', ''::bytea, '[]')")
        .unwrap();
    let r = client.query_one("SELECT bool_and(decrypt(t) = ''), bool_and(octet_length(decrypt(b)) = 0), string_agg(decrypt(j)::text, ',') FROM empty", &[]).unwrap();
    assert!(r.get::<_, bool>(0) && r.get::<_, bool>(1));
    assert_eq!(r.get::<_, String>(2), "{},[]");

    // A million-row scan: the backend's private memory after the scan is what it was before
    // (measured), and a second scan does not add to it.
    client.batch_execute("CREATE TABLE million (c encrypted_text); INSERT INTO million SELECT repeat(md5(g::text), 3) || 'abcd' FROM generate_series(1, 1000000) g").unwrap();
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let scan = "SELECT sum(length(decrypt(c)))::bigint FROM million";
    let first: i64 = client.query_one(scan, &[]).unwrap().get(0);
    assert_eq!(first, 100 * 1_000_000);
    let before = rss_anon_kib(pid);
    for _ in 0..2 {
        let _: i64 = client.query_one(scan, &[]).unwrap().get(0);
    }
    let after = rss_anon_kib(pid);
    eprintln!("backend private memory around two million-row decrypting scans: {before} KiB -> {after} KiB");
    // A leak of one byte per value would add ~1950 KiB; the plaintexts alone are 190 MiB.
    assert!(after - before < 1024, "backend memory grew by {} KiB over two million-row scans", after - before);
}

#[test]
fn a_backend_killed_in_the_middle_of_a_write_leaves_no_half_written_cell() {
    let c = Cluster::start("lostbackend", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (id int, c encrypted_text, y encrypted_bytea); INSERT INTO t SELECT g, 'committed ' || g, NULL FROM generate_series(1, 1000) g");
    let digest = "SELECT count(*) || ':' || md5(string_agg(decrypt(c) || coalesce(md5(decrypt(y)), ''), ',' ORDER BY id)) FROM t";
    let before = c.psql("app", digest);
    for (what, write) in [
        ("many rows", "INSERT INTO t SELECT g, 'uncommitted ' || g, NULL FROM generate_series(2000, 3000000) g"),
        ("one 200 MB value", "INSERT INTO t SELECT 0, 'big', convert_to(repeat('v', 200 * 1024 * 1024), 'UTF8')"),
        ("an update of every row", "UPDATE t SET c = c || ' updated', y = convert_to(repeat('u', 500000), 'UTF8')"),
    ] {
        let mut writer = c.connect(Transport::Unix, "app");
        let pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let sql = write.to_owned();
        let handle = std::thread::spawn(move || writer.batch_execute(&sql));
        // Wait until the write is under way (it has taken a transaction id), then SIGKILL it.
        let mut client = c.connect(Transport::Unix, "app");
        let started = std::time::Instant::now();
        loop {
            let busy: bool = client
                .query_one("SELECT coalesce((SELECT backend_xid IS NOT NULL AND state = 'active' FROM pg_stat_activity WHERE pid = $1), false)", &[&pid])
                .unwrap()
                .get(0);
            if busy {
                break;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "{what}: the write never started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        assert!(killed.success());
        assert!(handle.join().unwrap().is_err(), "{what}: the killed write must fail");
        drop(client);
        // The postmaster reinitializes after a backend's crash; wait for it to take connections.
        let started = std::time::Instant::now();
        let after = loop {
            let out = c.psql_raw("app", digest);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "{what}: the server did not come back");
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert_eq!(after, before, "{what}: every committed cell reads back as it was, and nothing of the killed write is visible");
    }
    assert!(c.server_log().contains("terminated by signal 9"), "the backend really crashed");
}
