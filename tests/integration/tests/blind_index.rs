//! Blind indexes against a real server: lookups through the index from real clients, a
//! unique constraint, and an index key rotation that other sessions follow at once.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;

#[test]
fn lookups_uniqueness_and_rotation_across_sessions() {
    let c = Cluster::start("blind", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE customer (id int PRIMARY KEY, email encrypted_text, national_id encrypted_text); \
         INSERT INTO customer SELECT g, 'Customer' || g || '@Example.com', 'NID-' || (100000 + g) FROM generate_series(1, 20000) g; \
         CREATE UNIQUE INDEX customer_email_bidx ON customer (blind_index(email, 'lower_trim')); \
         CREATE INDEX customer_nid_bidx ON customer (blind_index(national_id)); \
         ANALYZE customer",
    );
    // An application, not a reader, looks customers up with a text parameter.
    c.psql("app", "CREATE ROLE app LOGIN; GRANT SELECT, INSERT ON customer TO app");
    let mut app = c.connect_as(Transport::TcpSsl, "app", "app");
    let find = "SELECT id FROM customer WHERE blind_index(email, 'lower_trim') = blind_index($1::text, 'lower_trim')";
    let plan: Vec<String> = app.query(&format!("EXPLAIN {}", find.replace("$1::text", "'x'")), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.join("\n").contains("customer_email_bidx"), "{plan:?}");
    let id: i32 = app.query_one(find, &[&" CUSTOMER1234@example.com"]).unwrap().get(0);
    assert_eq!(id, 1234);
    let id: i32 = app.query_one("SELECT id FROM customer WHERE blind_index(national_id) = blind_index($1::text)", &[&"NID-100042"]).unwrap().get(0);
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
    assert!(stderr.contains("rebuilt blind index customer_email_bidx (1 of 2)"), "{stderr}");
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
