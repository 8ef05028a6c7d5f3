//! What drivers send, as the server sees it: parameters typed as something other than the
//! column's plain type, and the assignment casts that take them (derived from pg_cast).

use cellcrypt_integration::{Cluster, Transport, SAMPLES};
use postgres::types::Type;


/// Every type with an implicit or assignment cast to a plain type (pg_cast, as the extension
/// reads it) can be assigned to the encrypted type, in a time zone with a daylight-saving gap:
/// the stored plaintext equals what the plain column stores, for a literal and for a parameter
/// the client typed as the source type (as psycopg types Python ints as smallint and floats as
/// float8).
#[test]
fn every_assignment_to_a_plain_type_works_on_its_encrypted_type() {
    let c = Cluster::start("assign", &[]);
    c.database_with_extension("app");
    let pairs = c.psql(
        "app",
        "SELECT format_type(c.castsource, NULL) || '|' || k FROM unnest(ARRAY['text', 'bytea', 'jsonb', 'numeric', 'date', 'timestamptz', 'int8']) k \
         JOIN pg_cast c ON c.casttarget = k::regtype JOIN pg_type s ON s.oid = c.castsource \
         WHERE c.castcontext IN ('a', 'i') AND c.castsource <> c.casttarget AND s.typtype = 'b' AND s.typcategory <> 'Z' \
           AND s.typname NOT IN ('char', 'pg_node_tree', 'pg_ndistinct', 'pg_dependencies', 'pg_mcv_list') \
           AND s.typnamespace = 'pg_catalog'::regnamespace ORDER BY 1",
    );
    let mut client = c.connect(Transport::TcpSsl, "app");
    client.batch_execute("SET TimeZone = 'America/New_York'").unwrap();
    let mut checked = 0;
    for line in pairs.lines().filter(|l| !l.is_empty()) {
        let (source, plain) = line.split_once('|').unwrap();
        let sample = SAMPLES.iter().find(|(t, _)| *t == source).map(|(_, v)| *v).unwrap_or_else(|| panic!("no sample for {source}"));
        let cast = c.psql("app", &format!("SELECT count(*) FROM pg_cast WHERE castsource = '{source}'::regtype AND casttarget = 'encrypted_{plain}'::regtype AND castcontext = 'a'"));
        assert_eq!(cast.trim(), "1", "an assignment cast from {source} to encrypted_{plain}");
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS p, e; CREATE TABLE p (id int, v {plain}); CREATE TABLE e (id int, v encrypted_{plain}); \
                 INSERT INTO p VALUES (1, CAST({sample} AS {source})); INSERT INTO e VALUES (1, CAST({sample} AS {source}));"
            ))
            .unwrap_or_else(|e| panic!("{source} into encrypted_{plain}: {e}"));
        // The same value sent as a typed parameter, where the postgres crate can type it.
        let typed: Option<(Type, Box<dyn postgres::types::ToSql + Sync>)> = match source {
            "smallint" => Some((Type::INT2, Box::new(7i16))),
            "integer" => Some((Type::INT4, Box::new(-7i32))),
            "bigint" => Some((Type::INT8, Box::new(9007199254740993i64))),
            "real" => Some((Type::FLOAT4, Box::new(5.5f32))),
            "double precision" => Some((Type::FLOAT8, Box::new(1234567.125f64))),
            "character varying" => Some((Type::VARCHAR, Box::new("varchar value"))),
            "name" => Some((Type::NAME, Box::new("a name"))),
            "boolean" => Some((Type::BOOL, Box::new(true))),
            _ => None,
        };
        if let Some((ty, value)) = typed {
            for table in ["p", "e"] {
                let stmt = client.prepare_typed(&format!("INSERT INTO {table} VALUES (2, $1)"), &[ty.clone()]).unwrap();
                client.execute(&stmt, &[value.as_ref()]).unwrap_or_else(|e| panic!("a {source} parameter into {table}: {e}"));
            }
        }
        let same: bool = client
            .query_one(
                "SELECT array_agg(p.v::text ORDER BY p.id) IS NOT DISTINCT FROM (SELECT array_agg(decrypt(e.v)::text ORDER BY e.id) FROM e) FROM p",
                &[],
            )
            .unwrap()
            .get(0);
        let shown = c.psql("app", "SELECT (SELECT string_agg(v::text, ',' ORDER BY id) FROM p) || ' / ' || (SELECT string_agg(decrypt(v)::text, ',' ORDER BY id) FROM e)");
        assert!(same, "{source} into {plain} and encrypted_{plain} differ: {shown}");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} assignment casts checked");
    println!("assignment casts checked against the plain columns: {checked}");
}

/// Standard base64 with padding, as the text form of an envelope writes it.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// Bytes sent as they are, for a parameter of any type, in binary format.
#[derive(Debug)]
struct Raw(Vec<u8>);

impl postgres::types::ToSql for Raw {
    fn to_sql(&self, _: &Type, out: &mut postgres::types::private::BytesMut) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(postgres::types::IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A driver that sends plaintext in binary for a parameter the server typed as the encrypted
/// type (node-postgres sends a Buffer so; others an int8 as 8 bytes) gets it encrypted, as the
/// plain column would take it. A value read in binary (the magic, then the envelope) goes back
/// in unchanged, as binary COPY does; a damaged one is refused with 22P03.
#[test]
fn binary_parameters_carry_plaintext_or_envelopes() {
    let c = Cluster::start("binary", &[]);
    c.database_with_extension("app");
    let mut client = c.connect(Transport::TcpSsl, "app");
    let cases = [
        ("bytea", "byteasend", "'\\x0001ff6162'::bytea"),
        ("bytea", "byteasend", "''::bytea"),
        ("text", "textsend", "'binary text é'"),
        ("int8", "int8send", "-9007199254740993"),
        ("numeric", "numeric_send", "-12345.678900"),
        ("date", "date_send", "'2030-03-10'::date"),
        ("timestamptz", "timestamptz_send", "'2030-03-10 02:30:00.123456+00'::timestamptz"),
        ("jsonb", "jsonb_send", "'{\"a\": [1, 2.5, \"x\"]}'::jsonb"),
    ];
    for (i, (plain, send, sample)) in cases.iter().enumerate() {
        let table = format!("b{i}");
        client.batch_execute(&format!("CREATE TABLE {table} (id int, v encrypted_{plain}, p {plain})")).unwrap();
        // The plain type's binary form of the sample, as the server's own send function makes it.
        let binary: Vec<u8> = client.query_one(&format!("SELECT {send}({sample})"), &[]).unwrap().get(0);
        let n = client
            .execute(&format!("INSERT INTO {table} VALUES (1, $1, {sample})"), &[&Raw(binary.clone())])
            .unwrap_or_else(|e| panic!("binary {plain} plaintext: {e}"));
        assert_eq!(n, 1);
        let same: bool = client.query_one(&format!("SELECT decrypt(v) IS NOT DISTINCT FROM p FROM {table}"), &[]).unwrap().get(0);
        assert!(same, "binary {plain} plaintext stored as sent");
        // Read in binary: the magic and the envelope; sent back, the same envelope.
        let Raw(read) = client.query_one(&format!("SELECT v FROM {table}"), &[]).unwrap().get(0);
        assert_eq!(&read[..4], b"\xCC\xCCcc", "{plain}: the binary form starts with the magic");
        let text: String = client.query_one(&format!("SELECT format('%s', v) FROM {table}"), &[]).unwrap().get(0);
        assert_eq!(text, format!("$cc${}", base64(&read[4..])), "{plain}: the bytes after the magic are the envelope itself");
        // The bare envelope, as builds before the magic sent it: it opens here as this type, so
        // it is taken as the envelope, not encrypted again.
        client.execute(&format!("INSERT INTO {table} SELECT 4, $1, p FROM {table} WHERE id = 1"), &[&Raw(read[4..].to_vec())]).unwrap();
        let kept: bool = client.query_one(&format!("SELECT format('%s', v) = $1 AND decrypt(v) IS NOT DISTINCT FROM p FROM {table} WHERE id = 4"), &[&text]).unwrap().get(0);
        assert!(kept, "{plain}: a bare envelope from an earlier build kept as it is");
        client.execute(&format!("INSERT INTO {table} SELECT 2, $1, p FROM {table}"), &[&Raw(read.clone())]).unwrap();
        let same: bool = client
            .query_one(&format!("SELECT count(DISTINCT format('%s', v)) = 1 AND bool_and(decrypt(v) IS NOT DISTINCT FROM p) FROM {table}"), &[])
            .unwrap()
            .get(0);
        assert!(same, "{plain}: the envelope read in binary went back in unchanged");
        // A damaged envelope after the magic is refused, saying what the binary format is.
        let mut bad = read.clone();
        bad.truncate(10);
        let e = client.execute(&format!("INSERT INTO {table} VALUES (3, $1, NULL)"), &[&Raw(bad)]).unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(db.code().code(), "22P03", "{}", db.message());
        assert!(db.detail().unwrap_or("").contains("CC CC 63 63"), "{:?}", db.detail());
    }
    // A bare envelope of another type does not open as bytea: it is plaintext, encrypted.
    client.batch_execute("CREATE TABLE other (v encrypted_text); INSERT INTO other VALUES ('a text value'); CREATE TABLE bb (v encrypted_bytea)").unwrap();
    let Raw(text_env) = client.query_one("SELECT v FROM other", &[]).unwrap().get(0);
    client.execute("INSERT INTO bb VALUES ($1)", &[&Raw(text_env[4..].to_vec())]).unwrap();
    let stored: Vec<u8> = client.query_one("SELECT decrypt(v) FROM bb", &[]).unwrap().get(0);
    assert_eq!(stored, text_env[4..].to_vec(), "stored as the bytes sent");
    // Binary plaintext its plain type refuses: 22P03, the value not quoted (jsonb's own error
    // would quote it).
    client.batch_execute("CREATE TABLE jj (v encrypted_jsonb)").unwrap();
    let mut bad_json = vec![1u8];
    bad_json.extend_from_slice(b"{\"ssn\": \"123-45-6789\", \"x\": \"\\u0000\"}");
    let e = client.execute("INSERT INTO jj VALUES ($1)", &[&Raw(bad_json)]).unwrap_err();
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(db.code().code(), "22P03", "{}", db.message());
    let said = format!("{} {:?} {:?} {:?}", db.message(), db.detail(), db.hint(), db.where_());
    assert!(!said.contains("123-45-6789"), "{said}");
    assert!(!c.server_log().contains("123-45-6789"), "the value reached the server log");
    // Into a column registered for a blind index, binary plaintext is bound to the column (the
    // lookup finds it), as text plaintext is; binary COPY keeps the bound envelopes.
    client
        .batch_execute("CREATE TABLE reg (id int, email encrypted_text); INSERT INTO reg VALUES (0, 'seed@example.com'); SELECT register_blind_index('reg', 'email', 'lower_trim')")
        .unwrap();
    client.execute("INSERT INTO reg VALUES (1, $1)", &[&Raw(b"Alice@Example.com".to_vec())]).unwrap();
    let found: String = client
        .query_one("SELECT string_agg(id::text, ',' ORDER BY id) FROM reg WHERE blind_index(email) = blind_index(' alice@example.com', 'reg', 'email')", &[])
        .unwrap()
        .get(0);
    assert_eq!(found, "1", "binary plaintext bound to the registered column");
    let bin = c.dir.join("reg.bin");
    client.batch_execute(&format!("COPY reg TO '{}' (FORMAT binary); CREATE TABLE reg2 (LIKE reg); COPY reg2 FROM '{}' (FORMAT binary)", bin.display(), bin.display())).unwrap_or_else(|e| panic!("{e}"));
    let same: bool = client
        .query_one("SELECT array_agg(format('%s', email) ORDER BY id) = (SELECT array_agg(format('%s', email) ORDER BY id) FROM reg2) FROM reg", &[])
        .unwrap()
        .get(0);
    assert!(same, "binary COPY of a registered column keeps its envelopes");
    // Plaintext that is not the plain type's binary format is refused as the plain type refuses it.
    client.batch_execute("CREATE TABLE i (v encrypted_int8)").unwrap();
    let e = client.execute("INSERT INTO i VALUES ($1)", &[&Raw(vec![0; 9])]).unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "22P03", "{e}");
    assert_eq!(c.psql("app", "SELECT count(*) FROM i").trim(), "0");
}

/// The role the driver programs connect as.
const APP_ROLE: &str = "app_writer";

/// Runs one driver program of `tests/drivers` against `c`'s database `app`, as [`APP_ROLE`], and returns the
/// number of checks it reports after `label`.
fn run_matrix(c: &Cluster, label: &str, program: &str, args: &[&str]) -> usize {
    let repo = cellcrypt_integration::repo();
    let out = std::process::Command::new(repo.join(program))
        .args(args)
        .current_dir(&repo)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", c.port.to_string())
        .env("PGDATABASE", "app")
        .env("PGUSER", APP_ROLE)
        .output()
        .unwrap_or_else(|e| panic!("{program} (make install-drivers installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{label}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    print!("{stdout}");
    let line = stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no summary from {label}:\n{stdout}"));
    line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// The driver matrix, on an SSL cluster, as an application's role (no superuser), each driver
/// installed from its ordinary registry by
/// `make install-drivers`: psycopg 3 (text and binary cursors), psycopg2, asyncpg (with the
/// README's codec setup), SQLAlchemy, node-postgres, knex and pgJDBC (every setter), each
/// inserting, updating and upserting a native value of every encrypted type through
/// parameters and prepared statements, reading it back with decrypt() compared with the same
/// calls into a plain column, and reading the envelope.
#[test]
fn every_driver_writes_and_reads_encrypted_columns_as_plain_ones() {
    let c = Cluster::start("drivers", &[]);
    c.database_with_extension("app");
    // An application's role, not a superuser: it creates its tables and reads plaintext as a
    // member of data_encryption_reader, nothing more.
    c.psql("app", &format!("CREATE ROLE {APP_ROLE} LOGIN IN ROLE data_encryption_reader; GRANT CREATE ON SCHEMA public TO {APP_ROLE}"));
    let python = run_matrix(&c, "python drivers:", "target/drivers/venv/bin/python", &["tests/drivers/python/matrix.py"]);
    assert!(python >= 140, "{python} Python checks");
    let node = run_matrix(&c, "node drivers:", "/usr/bin/env", &["node", "tests/drivers/node/matrix.js"]);
    assert!(node >= 49, "{node} Node.js checks");
    let java = run_matrix(&c, "java drivers:", "/usr/bin/env", &["java", "-cp", "/usr/share/java/postgresql.jar:target/drivers/java", "Matrix", "127.0.0.1", &c.port.to_string(), "app", APP_ROLE]);
    assert!(java >= 51, "{java} JDBC checks");
}

/// The `postgres` crate types each parameter as the server infers it (the encrypted type) and
/// checks the Rust value against it, so a plain Rust value needs the plain type named: a cast
/// in the SQL (`$1::int8`) or `prepare_typed`. So written, it behaves as with a plain column.
#[test]
fn the_postgres_crate_writes_and_reads_with_the_plain_type_named() {
    let c = Cluster::start("pgcrate", &[]);
    c.database_with_extension("app");
    let mut client = c.connect(Transport::TcpSsl, "app");
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_900_000_000_123_456);
    let cases: Vec<(&str, Box<dyn postgres::types::ToSql + Sync>, Type)> = vec![
        ("text", Box::new("héllo wörld"), Type::TEXT),
        ("bytea", Box::new(vec![0u8, 1, 255]), Type::BYTEA),
        ("int8", Box::new(1i64 << 40), Type::INT8),
        ("int8", Box::new(7i32), Type::INT4),
        ("numeric", Box::new(5.5f64), Type::FLOAT8),
        ("timestamptz", Box::new(at), Type::TIMESTAMPTZ),
        ("timestamptz", Box::new(chrono::DateTime::<chrono::Utc>::from_timestamp(1_900_000_000, 123_456_000).unwrap()), Type::TIMESTAMPTZ),
        ("date", Box::new(chrono::NaiveDate::from_ymd_opt(2030, 3, 10).unwrap()), Type::DATE),
        ("jsonb", Box::new(serde_json::json!({"a": [1, 2.5, "x"], "b": null})), Type::JSONB),
    ];
    for (i, (plain, value, ty)) in cases.iter().enumerate() {
        let (p, e) = (format!("rp{i}"), format!("re{i}"));
        client.batch_execute(&format!("CREATE TABLE {p} (id int PRIMARY KEY, v {plain}); CREATE TABLE {e} (id int PRIMARY KEY, v encrypted_{plain})")).unwrap();
        for t in [&p, &e] {
            // Named in the SQL ...
            client.execute(&format!("INSERT INTO {t} VALUES (1, $1::{})", ty.name()), &[value.as_ref()]).unwrap_or_else(|x| panic!("{plain} into {t}: {x}"));
            // ... or with prepare_typed, for an insert, an update and an upsert.
            let ins = client.prepare_typed(&format!("INSERT INTO {t} VALUES (2, $1)"), &[ty.clone()]).unwrap();
            client.execute(&ins, &[value.as_ref()]).unwrap();
            let upd = client.prepare_typed(&format!("UPDATE {t} SET v = $1 WHERE id = 2"), &[ty.clone()]).unwrap();
            client.execute(&upd, &[value.as_ref()]).unwrap();
            let ups = client.prepare_typed(&format!("INSERT INTO {t} VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"), &[ty.clone()]).unwrap();
            client.execute(&ups, &[value.as_ref()]).unwrap();
        }
        let same: bool = client
            .query_one(&format!("SELECT array_agg(v::text ORDER BY id) = (SELECT array_agg(decrypt(v)::text ORDER BY id) FROM {e}) FROM {p}"), &[])
            .unwrap()
            .get(0);
        assert!(same, "{plain} from {ty}");
        // Unnamed, the crate refuses the Rust value before anything is sent (as it would for
        // any type it does not know); nothing is written.
        let refused = client.execute(&format!("INSERT INTO {e} VALUES (3, $1)"), &[value.as_ref()]).unwrap_err();
        let why = format!("{refused:?}");
        assert!(refused.as_db_error().is_none() && why.contains("WrongType") && why.contains("encrypted_"), "{why}");
        let Raw(read) = client.query_one(&format!("SELECT v FROM {e} WHERE id = 1"), &[]).unwrap().get(0);
        assert_eq!(&read[..4], b"\xCC\xCCcc");
    }
}

/// sqlx types each parameter by the Rust value bound to it (Parse carries its type), so plain
/// Rust values go into encrypted columns with no setup, by the assignment casts, as into plain
/// columns: for every encrypted type (strings, bytes, integers, floats, chrono dates and times,
/// `Json`), an insert, an update and an upsert, read back with decrypt() and as the envelope.
#[test]
fn sqlx_writes_and_reads_encrypted_columns_as_plain_ones() {
    let c = Cluster::start("sqlx", &[]);
    c.database_with_extension("app");
    let url = format!("postgres://postgres@127.0.0.1:{}/app?sslmode=require", c.port);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut checks = 0;
        macro_rules! case {
            ($plain:expr, $first:expr, $second:expr) => {{
                let (p, e) = (format!("sx_p_{}", checks), format!("sx_e_{}", checks));
                sqlx::raw_sql(&format!("CREATE TABLE {p} (id int PRIMARY KEY, v {}); CREATE TABLE {e} (id int PRIMARY KEY, v encrypted_{})", $plain, $plain))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                for t in [&p, &e] {
                    for id in [1, 2] {
                        sqlx::query(&format!("INSERT INTO {t} VALUES ($1, $2)")).bind(id).bind($first).execute(&mut conn).await
                            .unwrap_or_else(|x| panic!("{} into {t}: {x}", $plain));
                    }
                    sqlx::query(&format!("UPDATE {t} SET v = $1 WHERE id = 2")).bind($second).execute(&mut conn).await.unwrap();
                    sqlx::query(&format!("INSERT INTO {t} VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")).bind($second).execute(&mut conn).await.unwrap();
                }
                let same: bool = sqlx::query_scalar(&format!(
                    "SELECT array_agg(v::text ORDER BY id) = (SELECT array_agg(decrypt(v)::text ORDER BY id) FROM {e}) FROM {p}"
                ))
                .fetch_one(&mut conn)
                .await
                .unwrap();
                assert!(same, "{}", $plain);
                let envelope: String = sqlx::query_scalar(&format!("SELECT format($$%s$$, v) FROM {e} WHERE id = 1")).fetch_one(&mut conn).await.unwrap();
                assert!(envelope.starts_with("$cc$"), "{envelope}");
                checks += 1;
            }};
        }
        case!("text", "héllo wörld", String::from("second"));
        case!("bytea", vec![0u8, 1, 255], vec![0xccu8, 0xcc]);
        case!("int8", 7i16, 1i64 << 40);
        case!("int8", 7i32, -1i64);
        case!("numeric", 5.5f64, 7i32);
        case!("numeric", 1i64 << 40, 0.25f32);
        case!("date", chrono::NaiveDate::from_ymd_opt(2030, 3, 10).unwrap(), chrono::NaiveDate::from_ymd_opt(1999, 12, 31).unwrap());
        case!(
            "timestamptz",
            chrono::DateTime::<chrono::Utc>::from_timestamp(1_900_000_000, 123_456_000).unwrap(),
            chrono::DateTime::<chrono::Utc>::from_timestamp(1_000_000_000, 0).unwrap()
        );
        case!("jsonb", sqlx::types::Json(serde_json::json!({"a": [1, 2.5, "x"]})), sqlx::types::Json(serde_json::json!({"b": null})));
        assert_eq!(checks, 9);
    });
}
