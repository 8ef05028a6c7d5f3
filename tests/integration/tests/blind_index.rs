//! Blind indexes against a real server: registration by an administrator, lookups through the
//! index from real clients, a unique constraint, and an index key rotation that other sessions
//! follow at once.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;

#[test]
fn lookups_uniqueness_and_rotation_across_sessions() {
    let c = Cluster::start("blind", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE customer (id int PRIMARY KEY, email encrypted_text, national_id encrypted_text, note encrypted_text); \
         INSERT INTO customer SELECT g, 'Customer' || g || '@Example.com', 'NID-' || (100000 + g), 'note ' || g FROM generate_series(1, 20000) g",
    );
    // Blind indexes are opt-in per column: an administrator registers each column first.
    let registered = c.psql("app", "SELECT register_blind_index('customer', 'email', 'lower_trim')");
    assert_eq!(
        registered.trim(),
        "registered: public.customer.email is blind-index column 1 (lower_trim); 20000 values bound. Index it with CREATE INDEX ON public.customer (blind_index(email));"
    );
    let registered = c.psql("app", "SELECT register_blind_index('customer', 'national_id')");
    assert!(registered.starts_with("registered: public.customer.national_id is blind-index column 2 (exact); 20000 values bound."), "{registered}");
    assert_eq!(
        c.psql("app", "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'customer'::regclass AND attnum > 0").trim(),
        "id integer, email encrypted_text(1), national_id encrypted_text(2), note encrypted_text"
    );
    c.psql(
        "app",
        "CREATE UNIQUE INDEX customer_email_bidx ON customer (blind_index(email)); \
         CREATE INDEX customer_nid_bidx ON customer (blind_index(national_id)); \
         ANALYZE customer",
    );
    // An application, not a reader, looks customers up with a text parameter.
    c.psql("app", "CREATE ROLE app LOGIN; GRANT SELECT, INSERT ON customer TO app");
    let mut app = c.connect_as(Transport::TcpSsl, "app", "app");
    let find = "SELECT id FROM customer WHERE blind_index(email) = blind_index($1::text, 'customer', 'email')";
    let plan: Vec<String> = app.query(&format!("EXPLAIN {}", find.replace("$1::text", "'x'")), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.join("\n").contains("customer_email_bidx"), "{plan:?}");
    let id: i32 = app.query_one(find, &[&" CUSTOMER1234@example.com"]).unwrap().get(0);
    assert_eq!(id, 1234);
    // Everyone sees which columns are registered; only administrators register, once per
    // column, and only encrypted_text columns. A column not registered has no blind index.
    let shown: Vec<String> = app
        .query("SELECT id, table_name, column_name, normalization, created_by::text FROM blind_index_columns ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| format!("{}|{}|{}|{}|{}", r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3), r.get::<_, String>(4)))
        .collect();
    assert_eq!(shown, ["1|public.customer|email|lower_trim|postgres", "2|public.customer|national_id|exact|postgres"]);
    assert_eq!(db_error(app.query("SELECT register_blind_index('customer', 'note')", &[])).code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert_eq!(db_error(app.query("SELECT blind_index(note) FROM customer WHERE id = 1", &[])).code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert_eq!(db_error(app.query("SELECT blind_index('note 1'::text, 'customer', 'note')", &[])).code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    let mut admin = c.connect(Transport::Unix, "app");
    assert_eq!(db_error(admin.query("SELECT register_blind_index('customer', 'email', 'lower_trim')", &[])).code(), &SqlState::DUPLICATE_OBJECT);
    assert_eq!(db_error(admin.query("SELECT register_blind_index('customer', 'id')", &[])).code(), &SqlState::DATATYPE_MISMATCH);
    drop(admin);
    let id: i32 = app.query_one("SELECT id FROM customer WHERE blind_index(national_id) = blind_index($1::text, 'customer', 'national_id')", &[&"NID-100042"]).unwrap().get(0);
    assert_eq!(id, 42);
    // The writer keeps the unique blind index up to date, and it refuses a duplicate.
    app.execute("INSERT INTO customer VALUES (20001, 'new@example.com', 'NID-1')", &[]).unwrap();
    let err = db_error(app.execute("INSERT INTO customer VALUES (20002, 'NEW@example.com ', 'NID-2')", &[]));
    assert_eq!(err.code(), &SqlState::UNIQUE_VIOLATION);
    // The application still cannot decrypt.
    assert_eq!(db_error(app.query("SELECT decrypt(email) FROM customer LIMIT 1", &[])).code(), &SqlState::INSUFFICIENT_PRIVILEGE);

    // Rotating the index key rebuilds both indexes; the application's session follows at once.
    let out = c.psql_raw("app", "SELECT rotate_blind_index_key()");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("2 indexes rebuilt"), "{stdout}");
    assert!(stderr.contains("rebuilt blind index public.customer_email_bidx (1 of 2)"), "{stderr}");
    let id: i32 = app.query_one(find, &[&"customer7@EXAMPLE.com"]).unwrap().get(0);
    assert_eq!(id, 7);
    let id: i32 = app.query_one(find, &[&"new@example.com"]).unwrap().get(0);
    assert_eq!(id, 20001);
    // Only administrators rotate, and only one rotation at a time.
    assert_eq!(db_error(app.query("SELECT rotate_blind_index_key()", &[])).code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    let mut a = c.connect(Transport::Unix, "app");
    a.batch_execute("BEGIN; SELECT rotate_blind_index_key()").unwrap();
    let mut b = c.connect(Transport::Unix, "app");
    assert_eq!(db_error(b.query("SELECT rotate_blind_index_key()", &[])).code(), &SqlState::LOCK_NOT_AVAILABLE);
    a.batch_execute("ROLLBACK").unwrap();
    // A data key change needs no rebuild.
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    let id: i32 = app.query_one(find, &[&"customer19999@example.com"]).unwrap().get(0);
    assert_eq!(id, 19999);
}
