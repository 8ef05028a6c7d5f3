// In-database tests (`cargo pgrx test`): each runs inside one transaction of a pgrx-managed
// server that preloads the extension.

use pgrx::prelude::*;

fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql).expect("query failed").expect("NULL result")
}

/// The text form of an encrypted expression, as a quoted SQL literal: feeding it back as an
/// untyped literal goes through the type's input function, as a restored dump does. (A cast
/// from text would encrypt the envelope text itself.)
fn envelope_literal(expr: &str) -> String {
    let text: String = one(&format!("SELECT format('%s', {expr})"));
    pgrx::spi::quote_literal(text)
}

#[pg_test]
fn encryption_is_active_after_create_extension() {
    assert!(one::<bool>("SELECT is_data_encryption_active()"));
    assert_eq!(one::<i64>("SELECT count(*) FROM cellcrypt.keyring WHERE state = 'current'"), 1);
}

#[pg_test]
fn every_type_round_trips() {
    let cases = [
        ("encrypted_text", "text", "'héllo wörld'"),
        ("encrypted_text", "text", "''"),
        ("encrypted_bytea", "bytea", "'\\xdeadbeef00'::bytea"),
        ("encrypted_bytea", "bytea", "''::bytea"),
        ("encrypted_jsonb", "jsonb", "'{\"a\": [1, 2, {\"b\": null}]}'::jsonb"),
        ("encrypted_jsonb", "jsonb", "'{}'::jsonb"),
        ("encrypted_numeric", "numeric", "-12345678901234567890.000042"),
        ("encrypted_numeric", "numeric", "'NaN'::numeric"),
        ("encrypted_date", "date", "'2024-02-29'::date"),
        ("encrypted_date", "date", "'infinity'::date"),
        ("encrypted_timestamptz", "timestamptz", "'2024-01-01 12:34:56.789012+02'::timestamptz"),
        ("encrypted_int8", "int8", "(-9223372036854775808)::int8"),
    ];
    for (enc, plain, value) in cases {
        // through the cast from the plain type, and through decrypt() and the explicit cast back
        let same: bool = one(&format!(
            "SELECT decrypt(({value})::{plain}::{enc}) IS NOT DISTINCT FROM ({value})::{plain} \
                AND (({value})::{plain}::{enc})::{plain} IS NOT DISTINCT FROM ({value})::{plain}"
        ));
        assert!(same, "{enc} did not round-trip {value}");
        // through the text form (what pg_dump writes) read back by the input function
        let lit = envelope_literal(&format!("({value})::{plain}::{enc}"));
        let via_text: bool = one(&format!("SELECT decrypt({lit}::{enc}) IS NOT DISTINCT FROM ({value})::{plain}"));
        assert!(via_text, "{enc} text form did not round-trip {value}");
    }
}

#[pg_test]
fn untyped_literals_encrypt_and_null_stays_null() {
    Spi::run("CREATE TABLE lit (t encrypted_text, j encrypted_jsonb, n encrypted_numeric, i encrypted_int8, d encrypted_date)").unwrap();
    Spi::run("INSERT INTO lit VALUES ('plain', '{\"k\": 1}', 1.5, 42, '2020-01-01'), (NULL, NULL, NULL, NULL, NULL)").unwrap();
    assert_eq!(one::<String>("SELECT decrypt(t) FROM lit WHERE t IS NOT NULL"), "plain");
    assert_eq!(one::<String>("SELECT decrypt(j)::text FROM lit WHERE j IS NOT NULL"), "{\"k\": 1}");
    assert_eq!(one::<i64>("SELECT decrypt(i) FROM lit WHERE i IS NOT NULL"), 42);
    assert_eq!(one::<i64>("SELECT count(*) FROM lit WHERE t IS NULL AND j IS NULL AND n IS NULL AND i IS NULL AND d IS NULL"), 1);
}

/// Every way PostgreSQL can hand over a stored value: short and 4-byte headers inline,
/// compressed inline, out of line (compressed or not). Values are read from tables, so the
/// functions see the stored form, not a freshly built one.
#[pg_test]
fn every_stored_form_of_a_value_round_trips() {
    Spi::run(
        "CREATE TABLE forms (id int, t text, b bytea); \
         CREATE TABLE forms_main (id int, t text); ALTER TABLE forms_main ALTER t SET STORAGE main; \
         CREATE TABLE forms_ext (id int, t text); ALTER TABLE forms_ext ALTER t SET STORAGE external; \
         INSERT INTO forms VALUES (1, 'short', '\\x01'), (2, repeat('x', 200), decode(repeat('ab', 200), 'hex')), \
                                  (3, repeat('compressible ', 100000), decode(repeat('cd', 100000), 'hex'));\
         INSERT INTO forms (id, t, b) SELECT 4, string_agg(md5(g::text), ''), decode(string_agg(md5(g::text), ''), 'hex') FROM generate_series(1, 3000) g; \
         INSERT INTO forms_main VALUES (5, repeat('main ', 1000)); \
         INSERT INTO forms_ext SELECT 6, string_agg(md5(g::text), '') FROM generate_series(1, 3000) g; \
         INSERT INTO forms_ext SELECT 7, repeat('y', 50000); \
         CREATE TABLE sealed AS SELECT id, t::encrypted_text AS t, b::encrypted_bytea AS b FROM forms \
             UNION ALL SELECT id, t::encrypted_text, NULL FROM forms_main UNION ALL SELECT id, t::encrypted_text, NULL FROM forms_ext",
    )
    .unwrap();
    // The stored forms are what the test means them to be.
    assert!(one::<bool>("SELECT pg_column_compression(t) IS NOT NULL AND pg_column_size(t) < 10000 FROM forms_main"));
    assert!(one::<bool>("SELECT pg_column_compression(t) IS NULL AND pg_column_size(t) > 90000 FROM forms_ext WHERE id = 6"));
    assert!(one::<bool>("SELECT pg_column_compression(t) IS NOT NULL FROM forms WHERE id = 3"));
    assert_eq!(one::<i64>("SELECT count(*) FROM sealed"), 7);
    let same = "SELECT count(*) FROM sealed s LEFT JOIN (SELECT id, t, b FROM forms UNION ALL SELECT id, t, NULL FROM forms_main \
                UNION ALL SELECT id, t, NULL FROM forms_ext) p USING (id) \
                WHERE decrypt(s.t) = p.t AND decrypt(s.b) IS NOT DISTINCT FROM p.b AND encryption_key_version(s.t) IS NOT NULL";
    assert_eq!(one::<i64>(same), 7);
}

#[pg_test]
fn select_shows_only_the_envelope_and_nonces_differ() {
    Spi::run("CREATE TABLE env (c encrypted_text)").unwrap();
    Spi::run("INSERT INTO env SELECT 'same secret'::text FROM generate_series(1, 50)").unwrap();
    assert_eq!(one::<i64>("SELECT count(DISTINCT format('%s', c)) FROM env"), 50);
    assert_eq!(one::<i64>("SELECT count(*) FROM env WHERE format('%s', c) LIKE '$cc$%' AND format('%s', c) NOT LIKE '%same secret%'"), 50);
}

#[pg_test]
fn overhead_is_the_envelopes_45_bytes_plus_the_varlena_header() {
    for len in [0, 1, 100, 126, 127, 1000, 100_000] {
        let overhead: i32 = one(&format!(
            "SELECT pg_column_size(repeat('x', {len})::encrypted_text) - {len}"
        ));
        assert!((46..=49).contains(&overhead), "overhead {overhead} for a {len}-byte value");
    }
    assert_eq!(one::<String>("SELECT typstorage::text FROM pg_type WHERE typname = 'encrypted_text'"), "e");
}

#[pg_test]
fn a_value_cannot_move_between_types() {
    // an encrypted_text envelope presented as encrypted_bytea: the AAD binds the type
    let lit = envelope_literal("'abc'::text::encrypted_text");
    let r = PgTryBuilder::new(|| Spi::get_one::<Vec<u8>>(&format!("SELECT decrypt({lit}::encrypted_bytea)")).map(|_| "decrypted"))
    .catch_others(|e| match e {
        pg_sys::panic::CaughtError::PostgresError(r) => {
            assert_eq!(r.sql_error_code(), PgSqlErrorCode::ERRCODE_DATA_CORRUPTED);
            Ok("refused")
        }
        _ => Ok("other error"),
    })
    .execute();
    assert_eq!(r.unwrap(), "refused");
}

#[pg_test(error = "invalid input syntax for type encrypted_text: malformed encrypted value: envelope is 3 bytes long, shorter than the 33 bytes of header, nonce and tag")]
fn malformed_envelope_is_22p02() {
    Spi::run("SELECT '$cc$AQAA'::encrypted_text").unwrap();
}

#[pg_test(error = "invalid input syntax for type encrypted_numeric: the value is not a valid numeric")]
fn invalid_plaintext_is_not_echoed() {
    Spi::run("SELECT 'twelve'::encrypted_numeric").unwrap();
}

#[pg_test(error = "could not decrypt a value of type encrypted_text: the encrypted value is corrupted or was tampered with")]
fn tampered_ciphertext_is_xx001() {
    // overwrite one base64 group inside the ciphertext (characters 29..32 = envelope bytes 18..20)
    let lit = envelope_literal("overlay(format('%s', 'secret value'::text::encrypted_text) placing 'AAAA' from 29 for 4)");
    Spi::run(&format!("SELECT decrypt({lit}::encrypted_text)")).unwrap();
}

#[pg_test]
fn decrypt_requires_the_reader_role() {
    Spi::run("CREATE ROLE cc_test_nobody").unwrap();
    Spi::run("CREATE ROLE cc_test_reader IN ROLE data_encryption_reader").unwrap();
    Spi::run("CREATE TABLE guarded (c encrypted_text); INSERT INTO guarded VALUES ('top secret')").unwrap();
    Spi::run("GRANT SELECT ON guarded TO cc_test_nobody, cc_test_reader").unwrap();
    Spi::run("SET LOCAL ROLE cc_test_reader").unwrap();
    assert_eq!(one::<String>("SELECT decrypt(c) FROM guarded"), "top secret");
    assert_eq!(one::<String>("SELECT c::text FROM guarded"), "top secret");
    Spi::run("RESET ROLE").unwrap();
    // Every decrypting function checks the role itself: EXECUTE (PUBLIC's) does not let
    // cc_test_nobody decrypt (granting_execute_alone_does_not_allow_decrypting, and the
    // integration privileges matrix, check the refusal and its hint).
    let public_exec: i64 = one(
        "SELECT count(*) FROM pg_proc WHERE proname = 'decrypt' AND has_function_privilege('cc_test_nobody', oid, 'EXECUTE')",
    );
    assert_eq!(public_exec, 7);
    assert_eq!(one::<i64>("SELECT count(*) FROM pg_proc WHERE proname = 'decrypt' AND pronamespace = 'public'::regnamespace"), 7);
}

#[pg_test(error = "permission denied to decrypt: only superusers and members of role data_encryption_reader may decrypt")]
fn granting_execute_alone_does_not_allow_decrypting() {
    Spi::run("CREATE ROLE cc_test_sneaky").unwrap();
    Spi::run("GRANT EXECUTE ON FUNCTION decrypt(encrypted_text) TO cc_test_sneaky").unwrap();
    Spi::run("SET LOCAL ROLE cc_test_sneaky").unwrap();
    Spi::run("SELECT decrypt('x'::text::encrypted_text)").unwrap();
}

#[pg_test]
fn declarations_are_truthful() {
    // encryption volatile (never memoized: equal plaintexts never share a ciphertext), decryption stable, all parallel safe
    assert_eq!(one::<i64>("SELECT count(*) FROM pg_proc WHERE proname = 'encrypt' AND provolatile = 'v' AND proparallel = 's'"), 7);
    assert_eq!(one::<i64>("SELECT count(*) FROM pg_proc WHERE proname = 'decrypt' AND provolatile = 's' AND proparallel = 's'"), 7);
    // no comparison operators on randomized ciphertext
    assert_eq!(one::<i64>("SELECT count(*) FROM pg_operator WHERE oprleft::regtype::text LIKE 'encrypted_%'"), 0);
}

#[pg_test]
fn generated_keys_are_copy_safe() {
    let k: String = one("SELECT generate_data_encryption_key()");
    assert!(k.is_ascii() && k.starts_with("CCK1-"), "{k}");
    assert_eq!(k.split('-').count(), 16);
    // a cast from the plain type always encrypts, even text that looks like an envelope
    let lit = envelope_literal("'abc'::text::encrypted_text");
    let twice: String = one(&format!("SELECT decrypt({lit}::text::encrypted_text)"));
    assert!(twice.starts_with("$cc$"));
    assert_ne!(k, one::<String>("SELECT generate_data_encryption_key()"));
}

/// An envelope literal of `expr` with its key id (bytes 1..5) replaced.
fn envelope_with_key_id(expr: &str, key_id: u32) -> String {
    let b = key_id.to_be_bytes();
    one::<String>(&format!(
        "SELECT quote_literal('$cc$' || translate(encode(set_byte(set_byte(set_byte(set_byte(\
             decode(substr(format('%s', {expr}), 5), 'base64'), 1, {}), 2, {}), 3, {}), 4, {}), 'base64'), E'\\n', ''))",
        b[0], b[1], b[2], b[3]
    ))
}

#[pg_test(error = "cannot decrypt a value of type encrypted_text: it was encrypted under key version 9, which this database does not have")]
fn unknown_key_id_is_named() {
    let lit = envelope_with_key_id("'under another key'::text::encrypted_text", 9);
    Spi::run(&format!("SELECT decrypt({lit}::encrypted_text)")).unwrap();
}

#[pg_test]
fn insert_on_conflict_do_update_encrypts() {
    Spi::run("CREATE TABLE upsert (id int PRIMARY KEY, s encrypted_text)").unwrap();
    Spi::run("INSERT INTO upsert VALUES (1, 'first')").unwrap();
    Spi::run("INSERT INTO upsert VALUES (1, 'second') ON CONFLICT (id) DO UPDATE SET s = EXCLUDED.s").unwrap();
    Spi::run("INSERT INTO upsert VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET s = decrypt(upsert.s) || ' and third'").unwrap();
    assert_eq!(one::<String>("SELECT decrypt(s) FROM upsert WHERE id = 1"), "second and third");
    assert_eq!(one::<i64>("SELECT count(*) FROM upsert WHERE format('%s', s) LIKE '$cc$%'"), 1);
}

#[pg_test]
fn text_copy_of_plaintext_encrypts() {
    Spi::run("CREATE TABLE copied (id int, s encrypted_text, j encrypted_jsonb)").unwrap();
    // COPY FROM a program's output: plaintext lines, parsed by the types' input function
    Spi::run("COPY copied FROM PROGRAM 'printf ''1\\tcopy secret\\t{\"a\": 1}\\n2\\t\\\\N\\t{}\\n''' (FORMAT text)").unwrap();
    assert_eq!(one::<String>("SELECT decrypt(s) FROM copied WHERE id = 1"), "copy secret");
    assert_eq!(one::<String>("SELECT decrypt(j)::text FROM copied WHERE id = 2"), "{}");
    assert_eq!(one::<i64>("SELECT count(*) FROM copied WHERE s IS NULL"), 1);
    assert_eq!(one::<i64>("SELECT count(*) FROM copied WHERE format('%s', s) LIKE '%copy secret%'"), 0);
}

/// Key calls need a secure transport; the pgrx test client connects over plain TCP. Tests run
/// concurrently, so tests that change the key first wait for each other on an advisory lock of
/// their own (the extension's own key-change lock cannot be taken from SQL, and
/// set_data_encryption_key would refuse a second change with 55P03).
fn allow_plain_tcp() {
    Spi::run("SET pg_cellcrypt.require_secure_transport = off").unwrap();
    Spi::run("SELECT pg_advisory_xact_lock(1667464497, 1)").unwrap();
}

/// Runs re-encryption steps in this transaction until every table is verified. (Retiring the
/// old key waits for older transactions to end, which the integration tests cover.)
fn reencrypt_tables() -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let s: String = one("SELECT cellcrypt._reencrypt_step()");
        let stop = s == "waiting" || s == "done" || s == "idle";
        seen.push(s);
        if stop {
            break;
        }
    }
    seen
}

#[pg_test]
fn a_key_change_reencrypts_every_value_in_batches_and_old_envelopes_stay_readable() {
    allow_plain_tcp();
    Spi::run("SET pg_cellcrypt.reencrypt_batch_size = 10").unwrap();
    Spi::run("CREATE TABLE kc (id int, t encrypted_text, j encrypted_jsonb, n encrypted_int8)").unwrap();
    Spi::run("INSERT INTO kc SELECT g, 'secret ' || g, jsonb_build_object('g', g), g FROM generate_series(1, 500) g").unwrap();
    Spi::run("INSERT INTO kc VALUES (0, NULL, NULL, NULL)").unwrap();
    Spi::run("CREATE TABLE kp (id int, s encrypted_text) PARTITION BY RANGE (id)").unwrap();
    Spi::run("CREATE TABLE kp1 PARTITION OF kp FOR VALUES FROM (0) TO (100); CREATE TABLE kp2 PARTITION OF kp FOR VALUES FROM (100) TO (200)").unwrap();
    Spi::run("INSERT INTO kp SELECT g, 'part ' || g FROM generate_series(0, 199) g").unwrap();
    Spi::run("ANALYZE kc, kp").unwrap();
    let old_envelope = envelope_literal("'kept aside'::text::encrypted_text");
    let fp1: String = one("SELECT fingerprint FROM cellcrypt.keyring WHERE state = 'current'");
    let msg: String = one("SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(msg.starts_with("changed: key version 2") && msg.contains("3 tables will be re-encrypted"), "{msg}");
    // new writes use the new key at once; existing values wait for the batches
    assert_eq!(one::<i32>("SELECT encryption_key_version('new'::text::encrypted_text)"), 2);
    assert_eq!(one::<i64>("SELECT count(*) FROM kc WHERE encryption_key_version(t) = 1"), 500);
    // A row the application rewrote in part: its t is under the new key already, its j and n
    // are not. Only the values actually moved are counted.
    Spi::run("UPDATE kc SET t = 'secret ' || id WHERE id = 7").unwrap();
    let moved = 500 * 3 + 200 - 1;
    let steps = reencrypt_tables();
    let batches = steps.iter().filter(|s| *s == "batch").count();
    assert!(batches >= 10, "small batches: {steps:?}");
    assert!(matches!(steps.last().map(String::as_str), Some("waiting") | Some("done")), "{steps:?}");
    // every value is now under version 2 and decrypts to what it was
    assert_eq!(one::<i64>("SELECT count(*) FROM kc WHERE encryption_key_version(t) = 2 AND encryption_key_version(j) = 2 AND encryption_key_version(n) = 2"), 500);
    assert_eq!(one::<i64>("SELECT count(*) FROM kc WHERE decrypt(t) = 'secret ' || id AND (decrypt(j)->>'g')::int = id AND decrypt(n) = id"), 500);
    assert_eq!(one::<i64>("SELECT count(*) FROM kp WHERE encryption_key_version(s) = 2 AND decrypt(s) = 'part ' || id"), 200);
    assert_eq!(one::<i64>("SELECT count(*) FROM kc WHERE t IS NULL"), 1);
    if steps.last().map(String::as_str) == Some("done") {
        // No older transaction was running: the old key is already retired.
        assert_eq!(one::<String>("SELECT state FROM cellcrypt.keyring WHERE key_version = 1"), "retired");
        assert_eq!(one::<i64>("SELECT reencrypted_values FROM cellcrypt.keyring WHERE key_version = 2"), moved);
        assert_eq!(one::<i64>("SELECT count(*) FROM data_encryption_progress"), 0);
        return;
    }
    // Older transactions (other tests) still run: the work waits for them before retiring.
    assert_eq!(one::<i64>("SELECT sum(cells_done)::bigint FROM data_encryption_progress"), moved);
    assert_eq!(one::<i64>("SELECT count(*) FROM data_encryption_progress WHERE state = 'verified' AND cells_remaining = 0"), 3);
    // until the old key is retired, an envelope made under it still opens
    assert_eq!(one::<String>(&format!("SELECT decrypt({old_envelope}::encrypted_text)")), "kept aside");
    // the keyring keeps the old version's fingerprint, its data key only wrapped
    assert_eq!(one::<String>("SELECT state FROM cellcrypt.keyring WHERE key_version = 1"), "previous");
    assert_eq!(one::<String>("SELECT fingerprint FROM cellcrypt.keyring WHERE key_version = 1"), fp1);
    assert_eq!(one::<i32>("SELECT length(wrapped_data_key) FROM cellcrypt.keyring WHERE key_version = 1"), 5 + 24 + 32 + 16);
}

#[pg_test]
fn reencryption_fires_no_ordinary_trigger_and_restores_the_replication_role() {
    allow_plain_tcp();
    Spi::run("CREATE TABLE trg (id int, s encrypted_text); CREATE TABLE trg_log (id int)").unwrap();
    Spi::run("CREATE FUNCTION trg_note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO trg_log VALUES (NEW.id); RETURN NEW; END $$").unwrap();
    Spi::run("CREATE TRIGGER trg_note BEFORE UPDATE ON trg FOR EACH ROW EXECUTE FUNCTION trg_note()").unwrap();
    Spi::run("INSERT INTO trg SELECT g, 'value ' || g FROM generate_series(1, 50) g").unwrap();
    // 'local' fires ordinary triggers, as 'origin' does; the work must not, and must put it back.
    Spi::run("SET session_replication_role = local").unwrap();
    Spi::run("SELECT set_data_encryption_key(generate_data_encryption_key())").unwrap();
    let steps = reencrypt_tables();
    assert!(steps.iter().any(|s| s == "batch"), "{steps:?}");
    assert_eq!(one::<i64>("SELECT count(*) FROM trg WHERE encryption_key_version(s) = 2 AND decrypt(s) = 'value ' || id"), 50);
    assert_eq!(one::<i64>("SELECT count(*) FROM trg_log"), 0);
    assert_eq!(one::<String>("SHOW session_replication_role"), "local");
    // the application's own updates still fire it
    Spi::run("UPDATE trg SET s = 'changed' WHERE id = 1").unwrap();
    assert_eq!(one::<i64>("SELECT count(*) FROM trg_log"), 1);
}

#[pg_test]
fn setting_the_current_key_again_changes_nothing() {
    allow_plain_tcp();
    let key: String = one("SELECT retrieve_data_encryption_key()");
    let msg: String = one(&format!("SELECT set_data_encryption_key({})", pgrx::spi::quote_literal(&key)));
    assert!(msg.starts_with("unchanged"), "{msg}");
    assert_eq!(one::<i64>("SELECT count(*) FROM cellcrypt.keyring"), 1);
}

#[cfg(not(feature = "fips"))]
#[pg_test(error = "the key is not acceptable: key is too short: 9 characters, at least 20 required")]
fn a_weak_key_is_refused() {
    allow_plain_tcp();
    Spi::run("SELECT set_data_encryption_key('too short')").unwrap();
}

/// A FIPS build takes generated keys only: any passphrase is refused, before its strength is
/// looked at.
#[cfg(feature = "fips")]
#[pg_test(error = "the key is not acceptable: this is a FIPS build, which accepts only generated keys (from generate_data_encryption_key()), not passphrases")]
fn a_weak_key_is_refused() {
    allow_plain_tcp();
    Spi::run("SELECT set_data_encryption_key('too short')").unwrap();
}

#[pg_test]
fn status_shows_the_current_key() {
    allow_plain_tcp();
    Spi::run("SELECT set_data_encryption_key(generate_data_encryption_key())").unwrap();
    let (active, version, fp): (Option<bool>, Option<i32>, Option<String>) =
        Spi::get_three("SELECT active, key_version, fingerprint FROM data_encryption_status").unwrap();
    assert_eq!(active, Some(true));
    assert_eq!(version, Some(2));
    assert_eq!(fp.unwrap(), one::<String>("SELECT fingerprint FROM cellcrypt.keyring WHERE state = 'current'"));
    assert_eq!(one::<String>("SELECT previous_key_versions::text FROM data_encryption_status"), "{1}");
    assert_eq!(one::<String>("SELECT provider FROM data_encryption_status"), "file");
    // no table has encrypted columns, so nothing waits; the old version awaits retirement
    assert!(one::<String>("SELECT reencryption FROM data_encryption_status").starts_with("pending"));
}

fn blind_table(rows: i32) {
    Spi::run("CREATE TABLE bi (id int, email encrypted_text, other encrypted_text)").unwrap();
    Spi::run(&format!("INSERT INTO bi SELECT g, 'User' || g || '@Example.com', 'User' || g || '@Example.com' FROM generate_series(1, {rows}) g")).unwrap();
    let msg: String = one("SELECT register_blind_index('bi', 'email', 'lower_trim')");
    assert!(msg.contains(&format!("{rows} values bound")), "{msg}");
    Spi::run("CREATE INDEX bi_email ON bi (blind_index(email))").unwrap();
    Spi::run("ANALYZE bi").unwrap();
}

fn lookup(email: &str) -> Option<i32> {
    Spi::get_one::<i32>(&format!(
        "SELECT (SELECT id FROM bi WHERE blind_index(email) = blind_index({}, 'bi', 'email'))",
        pgrx::spi::quote_literal(email)
    ))
    .unwrap()
}

#[pg_test]
fn a_blind_index_answers_equality_lookups_through_an_index_scan() {
    blind_table(5000);
    let explain: Vec<String> = Spi::connect(|c| {
        c.select("EXPLAIN SELECT id FROM bi WHERE blind_index(email) = blind_index('user77@example.com', 'bi', 'email')", None, &[])
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
    });
    let explain = explain.join("\n");
    assert!(explain.contains("Index Scan using bi_email") || explain.contains("Bitmap Index Scan on bi_email"), "{explain}");
    // normalization: case and surrounding spaces do not matter under lower_trim
    assert_eq!(lookup("  USER77@example.COM "), Some(77));
    assert_eq!(lookup("user4999@example.com"), Some(4999));
    assert_eq!(lookup("nobody@example.com"), None);
    assert_eq!(one::<i32>("SELECT length(blind_index('x', 'bi', 'email'))"), 16);
    // Plaintext written later is bound to the column and found.
    Spi::run("INSERT INTO bi (id, email) VALUES (6000, 'later@example.com')").unwrap();
    assert_eq!(lookup("LATER@example.com"), Some(6000));
}

#[pg_test(error = "permission denied to compute the blind index of a value from a column not registered for a blind index")]
fn a_column_that_is_not_registered_has_no_blind_index() {
    // `other` holds the same plaintexts as the registered `email`, but is not registered.
    blind_table(10);
    Spi::run("SELECT blind_index(other) FROM bi").unwrap();
}

#[pg_test]
fn each_registered_column_hashes_under_its_own_key() {
    Spi::run("CREATE TABLE two (a encrypted_text, b encrypted_text)").unwrap();
    Spi::run("SELECT register_blind_index('two', 'a'), register_blind_index('two', 'b')").unwrap();
    Spi::run("INSERT INTO two VALUES ('same', 'same')").unwrap();
    assert!(!one::<bool>("SELECT blind_index(a) = blind_index(b) FROM two"), "equal values in two columns do not link");
    assert!(one::<bool>("SELECT blind_index(a) = blind_index('same', 'two', 'a') AND blind_index(b) = blind_index('same', 'two', 'b') FROM two"));
    // exact is exact
    assert!(!one::<bool>("SELECT blind_index('Same', 'two', 'a') = blind_index('same', 'two', 'a')"));
    // The column's type names its registration (ids come from a sequence shared by every test).
    assert!(one::<bool>(
        "SELECT format_type(atttypid, atttypmod) = 'encrypted_text(' || (SELECT id FROM blind_index_columns WHERE table_name = 'public.two' AND column_name = 'a') || ')' \
         FROM pg_attribute WHERE attrelid = 'two'::regclass AND attname = 'a'"
    ));
}

#[pg_test(error = "column \"a\" of table public.two is already registered for a blind index")]
fn a_column_is_registered_once() {
    Spi::run("CREATE TABLE two (a encrypted_text)").unwrap();
    Spi::run("SELECT register_blind_index('two', 'a')").unwrap();
    Spi::run("SELECT register_blind_index('two', 'a')").unwrap();
}

#[pg_test(error = "duplicate key value violates unique constraint \"bi_unique\"")]
fn a_unique_blind_index_enforces_unique_plaintext() {
    Spi::run("CREATE TABLE bi (id int, email encrypted_text)").unwrap();
    Spi::run("SELECT register_blind_index('bi', 'email', 'lower_trim')").unwrap();
    Spi::run("CREATE UNIQUE INDEX bi_unique ON bi (blind_index(email))").unwrap();
    Spi::run("INSERT INTO bi VALUES (1, 'alice@example.com'), (2, 'bob@example.com')").unwrap();
    Spi::run("INSERT INTO bi VALUES (3, ' Alice@Example.com')").unwrap();
}

#[pg_test(error = "unknown blind index normalization \"upper\"")]
fn an_unknown_normalization_is_refused() {
    Spi::run("CREATE TABLE bn (email encrypted_text)").unwrap();
    Spi::run("SELECT register_blind_index('bn', 'email', 'upper')").unwrap();
}

#[pg_test]
fn blind_indexes_survive_a_data_key_change_and_are_rebuilt_by_an_index_key_rotation() {
    allow_plain_tcp();
    blind_table(3000);
    let before: String = one("SELECT encode(blind_index('user5@example.com', 'bi', 'email'), 'hex')");
    // A data key change leaves the index key, and so every blind index, as it was.
    Spi::run("SELECT set_data_encryption_key(generate_data_encryption_key())").unwrap();
    assert_eq!(one::<String>("SELECT encode(blind_index('user5@example.com', 'bi', 'email'), 'hex')"), before);
    assert_eq!(lookup("user5@example.com"), Some(5));
    reencrypt_tables();
    assert_eq!(one::<i64>("SELECT count(*) FROM bi WHERE encryption_key_version(email) = 2"), 3000);
    Spi::run("SET enable_seqscan = off").unwrap();
    assert_eq!(lookup("user2500@example.com"), Some(2500));
    // Re-encryption keeps each value bound to its column.
    assert_eq!(one::<i64>("SELECT count(*) FROM bi WHERE blind_index(email) = blind_index('user' || id || '@example.com', 'bi', 'email')"), 3000);
    // Rotating the index key changes every blind index and rebuilds the indexes that use them.
    let msg: String = one("SELECT rotate_blind_index_key()");
    assert!(msg.starts_with("rotated: blind-index key version 2") && msg.contains("1 indexes rebuilt"), "{msg}");
    assert_ne!(one::<String>("SELECT encode(blind_index('user5@example.com', 'bi', 'email'), 'hex')"), before);
    assert_eq!(lookup("user5@example.com"), Some(5));
    assert_eq!(lookup("USER2999@example.com"), Some(2999));
    assert_eq!(one::<i64>("SELECT count(*) FROM bi WHERE blind_index(email) = blind_index('user' || id || '@example.com', 'bi', 'email')"), 3000);
    assert_eq!(one::<String>("SELECT string_agg(state, ',' ORDER BY key_version) FROM cellcrypt.index_key"), "retired,current");
    assert!(one::<bool>("SELECT wrapped_key IS NULL FROM cellcrypt.index_key WHERE key_version = 1"));
}

#[pg_test(error = "cannot rotate the blind-index key: column public.bg.email_bidx stores blind indexes computed with the current key")]
fn a_rotation_refuses_stored_blind_index_columns() {
    allow_plain_tcp();
    Spi::run("CREATE TABLE bg (email encrypted_text)").unwrap();
    Spi::run("SELECT register_blind_index('bg', 'email')").unwrap();
    Spi::run("ALTER TABLE bg ADD COLUMN email_bidx bytea GENERATED ALWAYS AS (blind_index(email)) STORED").unwrap();
    Spi::run("INSERT INTO bg (email) VALUES ('a@example.com')").unwrap();
    Spi::run("SELECT rotate_blind_index_key()").unwrap();
}

/// The failure a key load records in shared memory for the backends waiting on it decodes to
/// the same failure, messages holding the field separator included.
#[pg_test]
fn key_load_failures_round_trip_through_shared_memory() {
    use crate::keys::{failure_round_trips, KeyUnavailable, Underivable};
    let sep = '\u{1f}';
    for e in [
        KeyUnavailable::NoKeyConfigured,
        KeyUnavailable::NotInProvider { version: 3, fingerprint: "ab12".into() },
        KeyUnavailable::FingerprintMismatch { version: 4, expected: "ab".into(), found: "cd".into() },
        KeyUnavailable::ProviderError(format!("the command failed: a{sep}b{sep}c")),
        KeyUnavailable::NotDerivable(Underivable::Fips, format!("key version 1: x{sep}y")),
        KeyUnavailable::NotDerivable(Underivable::Damaged, "key version 2: out of range".into()),
        KeyUnavailable::NotDerivable(Underivable::WrongKind, "key version 5".into()),
    ] {
        assert!(failure_round_trips(&e));
    }
}
