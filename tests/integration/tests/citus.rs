//! pg_cellcrypt on a Citus cluster: a coordinator and two workers (three real servers on this
//! machine, SSL on, Citus connecting over SSL), `make test-citus`. The encrypted types in
//! distributed and reference tables through every write path, `decrypt()` pushed down to the
//! workers, blind-index uniqueness per tenant, one key identity for the cluster, key changes on
//! every node or none (also under a concurrent multi-shard write load), a node added and shards
//! rebalanced after a change, and a move of the whole cluster with pg_dump.
//!
//! The key provider is `file`; each worker gets a copy of the coordinator's key file under its
//! own name (`<system identifier>_<database oid>.key`), as an administrator would copy it.

use cellcrypt_integration::{db_error, Cluster, Transport};
use postgres::error::SqlState;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Citus first in shared_preload_libraries (it must be), 2PC room, SSL between the nodes.
const CONF: &[&str] = &[
    "shared_preload_libraries = 'citus,pg_cellcrypt'",
    "max_prepared_transactions = 100",
    "citus.node_conninfo = 'sslmode=require'",
    "log_statement = 'all'",
];

struct Citus {
    coordinator: Cluster,
    workers: Vec<Cluster>,
}

/// This node's key file for database `app`.
fn key_file(c: &Cluster) -> PathBuf {
    let sysid = c.psql("app", "SELECT system_identifier FROM pg_catalog.pg_control_system()");
    let oid = c.psql("app", "SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()");
    c.key_dir().join(format!("{}_{}.key", sysid.trim(), oid.trim()))
}

/// A node with Citus in database `app`.
fn node(name: &str) -> Cluster {
    let c = Cluster::start(name, CONF);
    c.createdb("app");
    c.psql("app", "CREATE EXTENSION citus");
    c
}

impl Citus {
    /// A coordinator and `workers` workers, pg_cellcrypt created on the coordinator (Citus
    /// creates it on the workers, which take the coordinator's keyring), each worker given a copy
    /// of the key file.
    fn start(name: &str, workers: usize) -> Citus {
        Citus::start_as(name, workers, "postgres")
    }

    /// As [`Citus::start`], with pg_cellcrypt created by superuser `creator` (Citus' connections
    /// are per role: one who does not own citus creates it over connections of its own).
    fn start_as(name: &str, workers: usize, creator: &str) -> Citus {
        let coordinator = node(&format!("{name}-c"));
        let workers: Vec<Cluster> = (0..workers).map(|i| node(&format!("{name}-w{i}"))).collect();
        coordinator.psql("app", &format!("SELECT citus_set_coordinator_host('127.0.0.1', {})", coordinator.port));
        for w in &workers {
            coordinator.psql("app", &format!("SELECT citus_add_node('127.0.0.1', {})", w.port));
        }
        if creator != "postgres" {
            coordinator.psql("app", &format!("CREATE ROLE {creator} SUPERUSER LOGIN"));
        }
        let mut as_creator = coordinator.connect_as(Transport::Unix, "app", creator);
        as_creator.batch_execute("CREATE EXTENSION pg_cellcrypt").unwrap();
        let c = Citus { coordinator, workers };
        for w in &c.workers {
            c.copy_key_file_to(w);
        }
        c
    }

    fn copy_key_file_to(&self, w: &Cluster) {
        let to = key_file(w);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(key_file(&self.coordinator), &to).unwrap();
        assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(to.parent().unwrap()).status().unwrap().success());
        assert!(Command::new("chmod").arg("600").arg(&to).status().unwrap().success());
    }

    fn nodes(&self) -> impl Iterator<Item = &Cluster> {
        std::iter::once(&self.coordinator).chain(self.workers.iter())
    }

    /// Every node's keyring, as `version:state` pairs.
    fn keyrings(&self) -> Vec<String> {
        self.nodes()
            .map(|n| n.psql("app", "SELECT string_agg(key_version || ':' || state || ':' || fingerprint, ',' ORDER BY key_version) FROM cellcrypt.keyring").trim().to_owned())
            .collect()
    }

    fn wait_complete(&self) {
        assert!(
            self.coordinator.wait_until("app", "SELECT reencryption LIKE 'complete%' FROM data_encryption_status", 180),
            "the cluster's re-encryption did not finish: {}",
            self.coordinator.psql("app", "SELECT reencryption FROM data_encryption_status")
        );
    }
}

/// `ALTER SYSTEM SET` each of `settings` on `n`, then reload.
fn settings(n: &Cluster, settings: &[&str]) {
    for setting in settings {
        n.psql("app", &format!("ALTER SYSTEM SET {setting}"));
    }
    n.psql("app", "SELECT pg_reload_conf()");
}

/// The same rows into an encrypted table and a plain one, through every write path.
const TABLES: &str = "CREATE TABLE t (tenant int, id int, s encrypted_text, j encrypted_jsonb, n encrypted_numeric, i encrypted_int8, \
        d encrypted_date, ts encrypted_timestamptz, b encrypted_bytea, PRIMARY KEY (tenant, id)); \
     CREATE TABLE p (tenant int, id int, s text, j jsonb, n numeric, i int8, d date, ts timestamptz, b bytea, PRIMARY KEY (tenant, id)); \
     SELECT create_distributed_table('t', 'tenant', shard_count => 8); \
     SELECT create_distributed_table('p', 'tenant', colocate_with => 't'); \
     CREATE TABLE ref (code text PRIMARY KEY, s encrypted_text, n encrypted_numeric); \
     CREATE TABLE ref_plain (code text PRIMARY KEY, s text, n numeric); \
     SELECT create_reference_table('ref'); SELECT create_reference_table('ref_plain')";

/// A distributed table of 3000 rows over 7 tenants, and the digest of its decrypted values.
const ACCT: &str = "CREATE TABLE acct (tenant int, id int, email encrypted_text, PRIMARY KEY (tenant, id)); \
     SELECT create_distributed_table('acct', 'tenant'); \
     INSERT INTO acct SELECT g % 7, g, 'user' || g FROM generate_series(1, 3000) g";
const ACCT_DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email), ',' ORDER BY id)) FROM acct";

fn fill(table: &str, from: i32, to: i32) -> String {
    format!(
        "INSERT INTO {table} SELECT g % 13, g, 'value ' || g, jsonb_build_object('g', g), g * 1.5, g::int8 * 1000000007, \
         date '2000-01-01' + g, timestamptz '2024-02-29 12:00:00+00' + g * interval '1 hour', decode(md5(g::text), 'hex') \
         FROM generate_series({from}, {to}) g"
    )
}

fn digest(table: &str, decrypt: bool) -> String {
    let v = |c: &str| if decrypt { format!("decrypt({c})") } else { c.to_owned() };
    format!(
        "SELECT count(*) || ':' || md5(string_agg(tenant || '/' || id || '=' || {} || '/' || {}::text || '/' || {} || '/' || {} || '/' || {} \
         || '/' || {} || '/' || encode({}, 'hex'), ',' ORDER BY tenant, id)) FROM {table}",
        v("s"),
        v("j"),
        v("n"),
        v("i"),
        v("d"),
        v("ts"),
        v("b")
    )
}

/// Every encrypted type in a distributed (and a reference) table: INSERT with literals and with
/// parameters, COPY, INSERT ... SELECT (pushed down and through the coordinator), UPDATE (a
/// literal and a parameter, router and multi-shard) and upsert give the same plaintext as the
/// same statements on plain columns; decrypt() runs on the workers; a role without
/// data_encryption_reader is refused there too.
#[test]
fn distributed_and_reference_tables_through_every_write_path() {
    let c = Citus::start("paths", 2);
    let co = &c.coordinator;
    co.psql("app", TABLES);
    for table in ["t", "p"] {
        co.psql("app", &fill(table, 1, 400));
    }
    // Parameters (typed as the plain types: what JDBC and sqlx send).
    let mut s = co.connect(Transport::TcpSsl, "app");
    for table in ["t", "p"] {
        let st = s
            .prepare(&format!(
                "INSERT INTO {table} (tenant, id, s, j, n, i, d, ts, b) VALUES ($1, $2, $3::text, $4::text::jsonb, $5::text::numeric, $6::int8, $7::text::date, $8::text::timestamptz, $9::bytea)"
            ))
            .unwrap();
        for g in 401..=450i32 {
            let b: Vec<u8> = vec![g as u8, 0, 255];
            s.execute(
                &st,
                &[&(g % 13), &g, &format!("param {g}"), &format!("{{\"p\": {g}}}"), &format!("{g}.25"), &(g as i64 * 3), &"2031-01-02", &"2031-01-02 03:04:05+00", &b],
            )
            .unwrap();
        }
    }
    // COPY, text format.
    for table in ["t", "p"] {
        let mut w = s.copy_in(&format!("COPY {table} (tenant, id, s, j, n, i, d, ts, b) FROM STDIN")).unwrap();
        use std::io::Write;
        for g in 451..=500 {
            writeln!(w, "{}\t{g}\tcopied {g}\t{{\"c\": {g}}}\t{g}.5\t{}\t2032-02-03\t2032-02-03 04:05:06+00\t\\\\x0102{:02x}", g % 13, g * 7, g % 256).unwrap();
        }
        w.finish().unwrap();
    }
    // INSERT ... SELECT: pushed down (same tenant), and through the coordinator (new tenants).
    co.psql("app", "INSERT INTO t SELECT tenant, id + 10000, s, j, n, i, d, ts, b FROM t WHERE id <= 100");
    co.psql("app", "INSERT INTO p SELECT tenant, id + 10000, s, j, n, i, d, ts, b FROM p WHERE id <= 100");
    co.psql("app", "INSERT INTO t SELECT tenant + 100, id, s, j, n, i, d, ts, b FROM t WHERE id BETWEEN 101 AND 150");
    co.psql("app", "INSERT INTO p SELECT tenant + 100, id, s, j, n, i, d, ts, b FROM p WHERE id BETWEEN 101 AND 150");
    // UPDATE: a literal (router), a parameter (router), a literal over every shard; upsert.
    // The new value is an untyped literal or parameter, which the type's input function seals
    // on the coordinator (a typed one, $1::text, goes through encrypt(), VOLATILE, which Citus
    // refuses in an UPDATE: see below).
    for table in ["t", "p"] {
        co.psql("app", &format!("UPDATE {table} SET s = 'updated', n = '99.5' WHERE tenant = 1 AND id = 1"));
        co.psql("app", &format!("PREPARE u AS UPDATE {table} SET s = $3 WHERE tenant = $1 AND id = $2; EXECUTE u(2, 2, 'updated by parameter')"));
        co.psql("app", &format!("UPDATE {table} SET j = '{{\"all\": true}}' WHERE id BETWEEN 300 AND 320"));
        co.psql(
            "app",
            &format!("INSERT INTO {table} (tenant, id, s) VALUES (3, 3, 'upserted'), (4, 90000, 'inserted') ON CONFLICT (tenant, id) DO UPDATE SET s = EXCLUDED.s"),
        );
    }
    assert_eq!(co.psql("app", &digest("t", true)), co.psql("app", &digest("p", false)), "the encrypted table holds the plain table's values");
    // Citus' own refusal of a VOLATILE function in an UPDATE, nothing changed.
    let e = db_error(s.execute("UPDATE t SET s = $1::text WHERE tenant = 2 AND id = 2", &[&"typed"]));
    assert!(e.message().contains("must not be VOLATILE"), "{}", e.message());
    assert_eq!(co.psql("app", "SELECT decrypt(s) FROM t WHERE tenant = 2 AND id = 2").trim(), "updated by parameter");
    assert!(co.psql("app", "SELECT count(*) FROM t").trim().parse::<i32>().unwrap() > 600);

    // Reference table.
    co.psql("app", "INSERT INTO ref VALUES ('DE', 'berlin', 1.5), ('FR', 'paris', 2.5); INSERT INTO ref_plain VALUES ('DE', 'berlin', 1.5), ('FR', 'paris', 2.5)");
    co.psql("app", "UPDATE ref SET s = 'lyon' WHERE code = 'FR'; UPDATE ref_plain SET s = 'lyon' WHERE code = 'FR'");
    let join = |e: &str| format!("SELECT string_agg(t.id || ':' || {e}, ',' ORDER BY t.id) FROM t JOIN ref r ON r.code = CASE WHEN t.id % 2 = 0 THEN 'DE' ELSE 'FR' END WHERE t.id <= 10");
    assert_eq!(co.psql("app", &join("decrypt(r.s)")), co.psql("app", &join("CASE WHEN t.id % 2 = 0 THEN 'berlin' ELSE 'lyon' END")));

    // decrypt() runs on the workers: in a router query, and in a multi-shard filter.
    let router = co.psql("app", "EXPLAIN (VERBOSE, COSTS OFF) SELECT decrypt(s) FROM t WHERE tenant = 5");
    assert!(router.contains("Task Count: 1") && router.contains("public.decrypt(s)"), "{router}");
    let multi = co.psql("app", "EXPLAIN (VERBOSE, COSTS OFF) SELECT count(*) FROM t WHERE decrypt(s) LIKE 'value 1%'");
    assert!(multi.contains("Task Count: 8") && multi.contains("WHERE (public.decrypt(s)"), "{multi}");
    assert_eq!(co.psql("app", "SELECT count(*) FROM t WHERE decrypt(s) LIKE 'value 1%'"), co.psql("app", "SELECT count(*) FROM p WHERE s LIKE 'value 1%'"));

    // Roles (Citus propagates them and their memberships): a reader decrypts on the workers, a
    // role without data_encryption_reader is refused there, with the usual SQLSTATE.
    co.psql("app", "CREATE ROLE app_reader LOGIN; CREATE ROLE app_writer LOGIN; GRANT SELECT, INSERT, UPDATE ON t TO app_reader, app_writer; GRANT data_encryption_reader TO app_reader");
    let mut reader = co.connect_as(Transport::TcpSsl, "app", "app_reader");
    let n: i64 = reader.query_one("SELECT count(*) FROM t WHERE decrypt(s) LIKE 'value%'", &[]).unwrap().get(0);
    assert!(n > 400);
    // Values written to the encrypted table only (the plain table's are in the workers' logs).
    co.psql("app", "INSERT INTO t (tenant, id, s) VALUES (8, 888888, 'a literal for t only')");
    co.psql("app", "PREPARE v AS UPDATE t SET s = $1 WHERE tenant = 8 AND id = 888888; EXECUTE v('a parameter for t only')");
    let mut writer = co.connect_as(Transport::TcpSsl, "app", "app_writer");
    writer.execute("INSERT INTO t (tenant, id, s) VALUES ($1, $2, $3::text)", &[&7i32, &777777i32, &"from a writer"]).unwrap();
    writer.batch_execute("UPDATE t SET s = 'updated by a writer' WHERE tenant = 7 AND id = 777777").unwrap();
    let e = db_error(writer.query("SELECT decrypt(s) FROM t WHERE tenant = 7", &[]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("data_encryption_reader"), "{:?}", e.hint());
    assert_eq!(co.psql("app", "SELECT decrypt(s) FROM t WHERE tenant = 7 AND id = 777777").trim(), "updated by a writer");

    // No plaintext reached the workers' statements: the coordinator sealed literals and
    // parameters, the workers got envelopes.
    for w in &c.workers {
        let log = w.server_log();
        assert!(log.contains("INSERT INTO public.t_") || log.contains("COPY public.t_"), "the workers log their statements");
        for secret in ["a literal for t only", "a parameter for t only", "from a writer", "updated by a writer"] {
            assert!(!log.contains(secret), "{secret} in a worker's log");
        }
    }
}

/// A blind index with UNIQUE over the distribution column and the blind index: one value per
/// tenant, lookups routed to one shard and answered by its index.
#[test]
fn blind_index_unique_per_tenant_on_a_distributed_table() {
    // Created by a superuser who does not own the citus extension.
    let c = Citus::start_as("blind", 2, "dba");
    let keyrings = c.keyrings();
    assert!(!keyrings[0].is_empty() && keyrings.iter().all(|k| k == &keyrings[0]), "every worker took the keyring: {keyrings:?}");
    let co = &c.coordinator;
    co.psql(
        "app",
        "CREATE TABLE users (tenant int, id int, email encrypted_text, PRIMARY KEY (tenant, id)); \
         SELECT register_blind_index('users', 'email', 'lower_trim'); \
         CREATE UNIQUE INDEX users_email ON users (tenant, blind_index(email)); \
         SELECT create_distributed_table('users', 'tenant')",
    );
    // Every worker has the registration (the coordinator shared it).
    for w in &c.workers {
        assert_eq!(w.psql("app", "SELECT id || ':' || normalization FROM cellcrypt.blind_index_column").trim(), "1:lower_trim");
    }
    co.psql("app", "INSERT INTO users SELECT g % 5, g, 'user' || g || '@example.com' FROM generate_series(1, 500) g");
    co.psql("app", "INSERT INTO users VALUES (1, 100001, 'shared@example.com'), (2, 100002, 'shared@example.com')");
    let mut s = co.connect(Transport::TcpSsl, "app");
    let e = db_error(s.execute("INSERT INTO users VALUES (1, 100003, $1::text)", &[&"  SHARED@example.com"]));
    assert_eq!(e.code(), &SqlState::UNIQUE_VIOLATION, "{}", e.message());
    let e = db_error(s.execute("INSERT INTO users VALUES (3, 100004, 'User3@Example.com ')", &[]));
    assert_eq!(e.code(), &SqlState::UNIQUE_VIOLATION, "{}", e.message());
    // An upsert on the blind index's constraint, and an UPDATE with a parameter.
    co.psql("app", "PREPARE m AS UPDATE users SET email = $1 WHERE tenant = 2 AND id = 100002; EXECUTE m('moved@example.com')");
    s.execute("INSERT INTO users VALUES (2, 100005, 'shared@example.com')", &[]).unwrap();
    let q = "SELECT string_agg(id::text, ',' ORDER BY id) FROM users WHERE tenant = 1 AND blind_index(email) = blind_index(' Shared@Example.com', 'users', 'email')";
    assert_eq!(co.psql("app", q).trim(), "100001");
    let plan = co.psql("app", &format!("SET enable_seqscan = off; EXPLAIN (COSTS OFF) {q}"));
    assert!(plan.contains("Task Count: 1") && plan.contains("Index") && plan.contains("users_email_"), "{plan}");
    assert_eq!(co.psql("app", "SELECT count(*) FROM users").trim(), "503");
    assert_eq!(co.psql("app", "SELECT count(*) FROM (SELECT tenant, blind_index(email) FROM users GROUP BY 1, 2) s").trim(), "503");
}

/// One key identity: an envelope sealed on the coordinator or on a worker opens on every node;
/// in a database outside the cluster it is XX001.
#[test]
fn envelopes_open_on_every_node_and_nowhere_else() {
    let c = Citus::start("identity", 2);
    let fingerprints = c.keyrings();
    assert!(fingerprints.iter().all(|f| f == &fingerprints[0] && f.starts_with("1:current:")), "{fingerprints:?}");
    let sealed_on = |n: &Cluster, v: &str| n.psql("app", &format!("SELECT format('%s', encrypt('{v}'::text))")).trim().to_owned();
    let envelopes = [
        ("coordinator", sealed_on(&c.coordinator, "sealed on the coordinator")),
        ("worker 0", sealed_on(&c.workers[0], "sealed on worker 0")),
        ("worker 1", sealed_on(&c.workers[1], "sealed on worker 1")),
    ];
    for (origin, env) in &envelopes {
        for n in c.nodes() {
            let plain = n.psql("app", &format!("SELECT decrypt('{env}'::encrypted_text)"));
            assert!(plain.trim().starts_with("sealed on"), "{origin}'s envelope on port {}: {plain}", n.port);
        }
    }
    let outside = Cluster::start("identity-outside", &[]);
    outside.database_with_extension("app");
    for (origin, env) in &envelopes {
        let mut s = outside.connect(Transport::Unix, "app");
        let e = db_error(s.query_one(&format!("SELECT decrypt('{env}'::encrypted_text)"), &[]));
        assert_eq!(e.code(), &SqlState::DATA_CORRUPTED, "{origin}: {}", e.message());
    }
}

/// `set_data_encryption_key` on the coordinator under a concurrent multi-shard write load: every
/// node takes the new key in one distributed transaction, each re-encrypts its own shards, the
/// coordinator reports the whole cluster, and every committed value reads back the same, after
/// a restart of every node too. The key never reaches a worker's log.
#[test]
fn a_key_change_reaches_every_node_under_concurrent_multi_shard_writes() {
    let c = Citus::start("change", 2);
    let co = &c.coordinator;
    for w in &c.workers {
        settings(w, &["pg_cellcrypt.reencrypt_batch_size = 100", "pg_cellcrypt.reencrypt_pause = '100ms'"]);
    }
    co.psql(
        "app",
        "CREATE TABLE acct (tenant int, id int, email encrypted_text, salary encrypted_numeric, PRIMARY KEY (tenant, id)); \
         SELECT create_distributed_table('acct', 'tenant', shard_count => 8); \
         INSERT INTO acct SELECT g % 31, g, 'user' || g || '@example.com', g * 1.25 FROM generate_series(1, 20000) g; \
         CREATE TABLE rates (code text PRIMARY KEY, rate encrypted_numeric); SELECT create_reference_table('rates'); \
         INSERT INTO rates SELECT 'c' || g, g / 7.0 FROM generate_series(1, 50) g",
    );
    let original = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email) || '/' || decrypt(salary), ',' ORDER BY id)) FROM acct WHERE id <= 20000";
    let rates = "SELECT md5(string_agg(code || decrypt(rate)::text, ',' ORDER BY code)) FROM rates";
    let before = (co.psql("app", original), co.psql("app", rates));
    // An envelope under key version 1, kept aside: after the change it is copied onto another
    // node, which has re-encrypted everything by then, and must still open there.
    let old_envelope = co.psql("app", "SELECT format('%s', email) FROM acct WHERE id = 1").trim().to_owned();

    // Writers: multi-shard INSERTs (each a distributed transaction over several workers) and
    // multi-shard UPDATEs of their own rows, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let mut writers = Vec::new();
    for k in 0..2i32 {
        let (stop, written) = (stop.clone(), written.clone());
        let cfg_port = co.port;
        let dir = co.dir.clone();
        writers.push(std::thread::spawn(move || {
            let mut s = postgres::Config::new().user("postgres").dbname("app").host_path(&dir).port(cfg_port).connect(postgres::NoTls).unwrap();
            let mut next = 1_000_000 + k * 1_000_000;
            while !stop.load(Ordering::SeqCst) {
                let ids: Vec<i32> = (next..next + 20).collect();
                s.execute(
                    "INSERT INTO acct (tenant, id, email, salary) SELECT i % 31, i, 'w' || i, (i % 1000)::numeric FROM unnest($1::int[]) i",
                    &[&ids],
                )
                .unwrap();
                s.execute("UPDATE acct SET salary = '7' WHERE id = ANY($1::int[])", &[&ids[..5].to_vec()]).unwrap();
                next += 20;
                written.fetch_add(20, Ordering::SeqCst);
            }
            next
        }));
    }
    // A copier: INSERT ... SELECT of existing envelopes onto other shards (the tenant shifted),
    // across the change: old-key values copied onto nodes that may have re-encrypted already.
    co.psql("app", "CREATE TABLE copies (tenant int, id int, email encrypted_text, PRIMARY KEY (tenant, id)); SELECT create_distributed_table('copies', 'tenant', colocate_with => 'acct')");
    let copied = Arc::new(AtomicI64::new(0));
    {
        let (stop, copied, dir, port) = (stop.clone(), copied.clone(), co.dir.clone(), co.port);
        writers.push(std::thread::spawn(move || {
            let mut s = postgres::Config::new().user("postgres").dbname("app").host_path(&dir).port(port).connect(postgres::NoTls).unwrap();
            let mut from = 1;
            while !stop.load(Ordering::SeqCst) && from < 20000 {
                let n = s
                    .execute("INSERT INTO copies SELECT (tenant + 1) % 31, id, email FROM acct WHERE id BETWEEN $1 AND $1 + 199", &[&from])
                    .unwrap();
                copied.fetch_add(n as i64, Ordering::SeqCst);
                from += 200;
            }
            from
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut admin = co.connect(Transport::TcpSsl, "app");
    let key: String = admin.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
    let written_before = written.load(Ordering::SeqCst);
    let msg: String = admin.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap().get(0);
    let written_at_change = written.load(Ordering::SeqCst);
    assert!(msg.contains("changed: key version 2") && msg.contains("2 workers"), "{msg}");
    // Every node has the new keyring at once.
    for k in c.keyrings() {
        assert!(k.starts_with("1:previous:") && k.contains(",2:current:"), "{k}");
    }
    // The coordinator reports the cluster while the workers re-encrypt.
    let status = co.psql("app", "SELECT reencryption FROM data_encryption_status");
    let progress = co.psql("app", "SELECT count(DISTINCT node) FROM data_encryption_progress WHERE node <> 'local' AND table_name = 'acct'::regclass");
    // (The workers re-encrypt slowly here: 100 rows per batch, 100 ms apart, about 10 s each.)
    assert!(status.starts_with("running on the cluster"), "{status}");
    assert_eq!(progress.trim(), "2", "progress of both workers' shards ({status})");
    c.wait_complete();
    let written_at_end = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let ends: Vec<i32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let n = written.load(Ordering::SeqCst);
    assert!(written_before > 0 && written_at_end > written_at_change, "the writers ran before and during the re-encryption ({written_before}, {written_at_change}, {written_at_end})");
    // The old envelope, copied onto another tenant's shard now that every node is done.
    co.psql("app", &format!("INSERT INTO copies VALUES (17, 1, '{old_envelope}'::encrypted_text)"));
    assert_eq!(co.psql("app", "SELECT decrypt(email) FROM copies WHERE tenant = 17 AND id = 1").trim(), "user1@example.com");
    copied.fetch_add(1, Ordering::SeqCst);

    let check = || {
        assert_eq!((co.psql("app", original), co.psql("app", rates)), before, "every value written before the change");
        let ws = co.psql("app", "SELECT count(*) || ':' || count(*) FILTER (WHERE decrypt(email) = 'w' || id AND decrypt(salary) IN ((id % 1000)::numeric, 7)) FROM acct WHERE id > 20000");
        assert_eq!(ws.trim(), format!("{n}:{n}"), "every row the writers committed (up to {ends:?})");
        assert_eq!(co.psql("app", "SELECT string_agg(DISTINCT encryption_key_version(email)::text || '/' || encryption_key_version(salary)::text, ',') FROM acct").trim(), "2/2");
        assert_eq!(co.psql("app", "SELECT string_agg(DISTINCT encryption_key_version(rate)::text, ',') FROM rates").trim(), "2");
        let c = copied.load(Ordering::SeqCst);
        assert_eq!(
            co.psql("app", "SELECT count(*) || ':' || count(*) FILTER (WHERE decrypt(email) = 'user' || id || '@example.com') FROM copies").trim(),
            format!("{c}:{c}"),
            "every envelope copied across shards during the change opens"
        );
    };
    check();
    // On a cluster older versions are kept (wrapped under the current key), on every node.
    for k in c.keyrings() {
        assert!(k.starts_with("1:previous:") && k.contains(",2:current:"), "{k}");
    }
    assert!(co.psql("app", "SELECT reencryption FROM data_encryption_status").starts_with("complete (coordinator and 2 workers)"));
    // Every node, restarted: every committed value from fresh sessions.
    for n in c.nodes() {
        n.restart();
    }
    check();
    // The key never reached a worker's log or its statement statistics.
    for w in &c.workers {
        let log = w.server_log();
        assert!(log.contains("_cluster_set_data_encryption_key"), "the worker logged the call (masked)");
        assert!(!log.contains(&key[5..]), "the key is in a worker's log");
    }
    assert!(!co.server_log().contains(&key[5..]));
}

/// A change reaches every node or none: a worker that cannot take it (its key file lost) makes
/// the whole change roll back, on the coordinator and on the other worker too; a node that is
/// down makes it refuse up front; only one change at a time, and only from the coordinator.
#[test]
fn a_change_is_all_or_none_single_flight_and_refused_with_a_node_down() {
    let c = Citus::start("allornone", 2);
    let co = &c.coordinator;
    co.psql("app", ACCT);
    let digest = ACCT_DIGEST;
    let before = co.psql("app", digest);
    let keyrings = c.keyrings();
    // The changes below come from an administrator who is not a superuser (Citus creates the
    // role on the workers too); the workers' side runs as Citus' extension owner either way.
    co.psql("app", "CREATE ROLE key_admin LOGIN IN ROLE data_encryption_admin");
    let mut admin = co.connect_as(Transport::TcpSsl, "app", "key_admin");
    assert_eq!(admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).unwrap().get::<_, bool>(0), false);

    // A worker that cannot load its key: nothing changes anywhere.
    let file = key_file(&c.workers[1]);
    let aside = file.with_extension("aside");
    std::fs::rename(&file, &aside).unwrap();
    c.workers[1].restart();
    let e = db_error(admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert_eq!(c.keyrings(), keyrings, "no node changed");
    std::fs::rename(&aside, &file).unwrap();
    assert_eq!(co.psql("app", digest), before);
    for w in &c.workers {
        assert_eq!(w.psql("app", "SELECT count(*) FROM pg_prepared_xacts").trim(), "0", "nothing left prepared on a worker");
    }

    // A change rolled back on the coordinator, whole or to a savepoint, or in a PL/pgSQL block
    // that catches an error after it: no node changes, every value still reads.
    co.psql("app", "BEGIN; SELECT set_data_encryption_key(generate_data_encryption_key()); ROLLBACK");
    assert_eq!(c.keyrings(), keyrings, "after ROLLBACK");
    co.psql("app", "BEGIN; SAVEPOINT s; SELECT set_data_encryption_key(generate_data_encryption_key()); ROLLBACK TO SAVEPOINT s; COMMIT");
    assert_eq!(c.keyrings(), keyrings, "after ROLLBACK TO SAVEPOINT");
    co.psql(
        "app",
        "DO $$ BEGIN PERFORM set_data_encryption_key(generate_data_encryption_key()); RAISE EXCEPTION 'undo'; \
         EXCEPTION WHEN raise_exception THEN NULL; END $$",
    );
    assert_eq!(c.keyrings(), keyrings, "after an EXCEPTION block");
    for n in c.nodes() {
        assert_eq!(n.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    }
    assert_eq!(co.psql("app", digest), before);

    // A worker down: refused before anything starts, naming it.
    c.workers[0].stop();
    let e = db_error(admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert!(e.message().contains("needs every node") && e.detail().unwrap_or("").contains(&format!("127.0.0.1:{}", c.workers[0].port)), "{:?}", e.detail());
    c.workers[0].start_again();
    assert_eq!(c.keyrings(), keyrings);

    // Key changes come from the coordinator only; blind-index key rotations are refused.
    let mut on_worker = c.workers[0].connect(Transport::TcpSsl, "app");
    let e = db_error(on_worker.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{}", e.message());
    let e = db_error(admin.query_one("SELECT rotate_blind_index_key()", &[]));
    assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{}", e.message());
    // The internal entry points: administrators only, and only where they belong.
    co.psql("app", "CREATE ROLE mallory LOGIN");
    let mut mallory = c.workers[0].connect_as(Transport::TcpSsl, "app", "mallory");
    let e = db_error(mallory.execute("SELECT cellcrypt._cluster_set_data_encryption_key('[]', '[]', 'x')", &[]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    let e = db_error(mallory.execute("SELECT cellcrypt._adopt_cluster_keyring('[]', '[]', '[]')", &[]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    let e = db_error(admin.execute("SELECT cellcrypt._adopt_cluster_keyring('[]', '[]', '[]')", &[]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    let e = db_error(co.connect(Transport::TcpSsl, "app").execute("SELECT cellcrypt._adopt_cluster_keyring('[]', '[]', '[]')", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    // An administrator on a worker cannot rewrite its keyring through the coordinator's entry
    // point (a keyring of one row, no blind-index key): refused, nothing changed.
    let current_row = c.workers[0].psql(
        "app",
        "SELECT jsonb_agg(to_jsonb(k) - '{restored,restored_by}'::text[]) FROM cellcrypt.keyring k WHERE state = 'current'",
    );
    let e = db_error(on_worker.execute(
        "SELECT cellcrypt._cluster_set_data_encryption_key($1, '[]', generate_data_encryption_key())",
        &[&current_row.trim()],
    ));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert_eq!(c.keyrings(), keyrings);
    // A worker that has the cluster's keyring refuses another one.
    let e = db_error(on_worker.execute(
        "SELECT cellcrypt._adopt_cluster_keyring('[{\"key_version\": 1, \"fingerprint\": \"00000000-00000000-00000000-00000000\", \"kdf_salt\": \"\\\\x00\", \"kdf_memory_kib\": 0, \"kdf_iterations\": 0, \"kdf_parallelism\": 0, \"state\": \"current\", \"provider\": \"file\"}]', '[]', '[]')",
        &[],
    ));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert_eq!(c.keyrings(), keyrings);
    // Looking like Citus (its application_name) does not help: an administrator who is not a
    // superuser is refused, and a superuser still gets only the content checks.
    co.psql("app", "CREATE ROLE worker_admin LOGIN IN ROLE data_encryption_admin");
    let like_citus = |user: &str| {
        let mut cfg = c.workers[0].config(Transport::Unix, "app");
        cfg.user(user).application_name("citus_internal gpid=10000000001");
        cfg.connect(postgres::NoTls).unwrap()
    };
    let mut fake = like_citus("worker_admin");
    let e = db_error(fake.execute("SELECT cellcrypt._cluster_set_data_encryption_key($1, '[]', generate_data_encryption_key())", &[&current_row.trim()]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    let e = db_error(fake.execute("SELECT cellcrypt._adopt_cluster_keyring('[]', '[]', '[]')", &[]));
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{}", e.message());
    let mut fake_super = like_citus("postgres");
    let e = db_error(fake_super.execute("SELECT cellcrypt._cluster_set_data_encryption_key($1, '[]', generate_data_encryption_key())", &[&current_row.trim()]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert!(e.message().contains("not this worker's keyring with one new version"), "{}", e.message());
    assert_eq!(c.keyrings(), keyrings);

    // One change at a time, cluster-wide: a second one while the workers re-encrypt is refused.
    // (One worker reads string literals the old way: what the coordinator sends reads the same.)
    for w in &c.workers {
        settings(w, &["pg_cellcrypt.reencrypt_batch_size = 10", "pg_cellcrypt.reencrypt_pause = '200ms'"]);
    }
    settings(&c.workers[1], &["standard_conforming_strings = off"]);
    admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]).unwrap();
    let e = db_error(admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]));
    assert_eq!(e.code(), &SqlState::LOCK_NOT_AVAILABLE, "{}", e.message());
    // Every worker crashes (immediate stop) in the middle of its re-encryption: after the
    // restart each resumes, and nothing is lost.
    for w in &c.workers {
        w.stop_immediate();
        w.start_again();
    }
    for w in &c.workers {
        settings(w, &["pg_cellcrypt.reencrypt_batch_size = 1000", "pg_cellcrypt.reencrypt_pause = '10ms'"]);
    }
    c.wait_complete();
    assert_eq!(co.psql("app", digest), before);
}

/// A worker dies when `COMMIT PREPARED` of its part of a key change arrives (its part is
/// prepared, the coordinator has committed): the change stands on the coordinator, the worker
/// restarts with its part still prepared and its old keyring, and Citus' recovery commits it
/// there; then the worker takes the new key and re-encrypts its shards, and every value, also
/// the ones written in between, reads.
#[test]
fn a_worker_that_dies_before_commit_prepared_takes_the_change_at_recovery() {
    let c = Citus::start("prepared", 2);
    let co = &c.coordinator;
    // Only the recovery this test calls commits the worker's part.
    settings(co, &["citus.recover_2pc_interval = -1"]);
    co.psql("app", ACCT);
    let digest = ACCT_DIGEST;
    let before = co.psql("app", digest);
    let old_keyring = c.workers[1].psql("app", "SELECT string_agg(key_version || ':' || state, ',' ORDER BY key_version) FROM cellcrypt.keyring");

    let w = &c.workers[1];
    let armed = w.dir.join("data/pg_cellcrypt.crash");
    std::fs::write(&armed, "cluster:before_commit_prepared").unwrap();
    assert!(Command::new("chown").arg("postgres:postgres").arg(&armed).status().unwrap().success());
    co.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(!armed.exists(), "the worker reached COMMIT PREPARED");
    // Back after the crash: the point's message, then the postmaster's recovery, then SELECT 1.
    let started = std::time::Instant::now();
    loop {
        let log = w.server_log();
        let recovered = log
            .rfind("pg_cellcrypt: crash point cluster:before_commit_prepared")
            .is_some_and(|at| log[at..].contains("terminated by signal 9") && log[at..].contains("database system is ready to accept connections"));
        if recovered && w.psql_raw("app", "SELECT 1").status.success() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the worker did not crash and come back:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The worker: its part prepared, its committed keyring the old one; the coordinator's status
    // says the cluster is not on one version.
    assert_eq!(w.psql("app", "SELECT count(*) FROM pg_prepared_xacts").trim(), "1");
    assert_eq!(w.psql("app", "SELECT string_agg(key_version || ':' || state, ',' ORDER BY key_version) FROM cellcrypt.keyring"), old_keyring);
    assert_eq!(co.psql("app", "SELECT reencryption LIKE 'complete%' FROM data_encryption_status").trim(), "f");
    // Writes go on meanwhile (sealed on the coordinator under the new key).
    co.psql("app", "INSERT INTO acct SELECT g % 7, g, 'between' || g FROM generate_series(3001, 3100) g");
    // Those on the waiting worker's shards do not open there until its part commits (42704,
    // saying how to finish the change); nothing is lost.
    let mut reader = co.connect(Transport::TcpSsl, "app");
    let e = db_error(reader.query_one("SELECT count(*) FROM acct WHERE id > 3000 AND decrypt(email) = 'between' || id", &[]));
    assert_eq!(e.code(), &SqlState::UNDEFINED_OBJECT, "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("recover_prepared_transactions()"), "{:?}", e.hint());

    co.psql("app", "SELECT recover_prepared_transactions()");
    assert_eq!(w.psql("app", "SELECT count(*) FROM pg_prepared_xacts").trim(), "0");
    let keyrings = c.keyrings();
    assert!(keyrings.iter().all(|k| k == &keyrings[0]), "every node has the new keyring: {keyrings:?}");
    c.wait_complete();
    assert_eq!(co.psql("app", "SELECT count(*) FROM acct WHERE id > 3000 AND decrypt(email) = 'between' || id").trim(), "100");
    co.psql("app", "DELETE FROM acct WHERE id > 3000");
    assert_eq!(co.psql("app", digest), before);
    for n in c.nodes() {
        n.restart();
    }
    assert_eq!(c.coordinator.psql("app", digest), before);
}

/// After a change: a node added with citus_add_node takes the cluster's keyring (and a copy of
/// the key file), shards are rebalanced onto it, and every value stays readable.
#[test]
fn a_node_added_and_shards_rebalanced_after_a_change_keep_every_value() {
    let mut c = Citus::start("rebalance", 2);
    let co = &c.coordinator;
    co.psql(
        "app",
        "CREATE TABLE acct (tenant int, id int, email encrypted_text, note encrypted_jsonb, PRIMARY KEY (tenant, id)); \
         SELECT create_distributed_table('acct', 'tenant', shard_count => 12); \
         INSERT INTO acct SELECT g % 50, g, 'user' || g, jsonb_build_object('g', g) FROM generate_series(1, 6000) g",
    );
    let digest = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email) || decrypt(note)::text, ',' ORDER BY id)) FROM acct";
    let before = co.psql("app", digest);
    co.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_complete();

    // A node an administrator prepared by hand: pg_cellcrypt created there alone (a key of its
    // own) and a local table holding a value under that key.
    let added = node("rebalance-w2");
    added.psql("app", "CREATE EXTENSION pg_cellcrypt; CREATE TABLE local_note (s encrypted_text); INSERT INTO local_note VALUES ('own key')");
    let own = added.psql("app", "SELECT string_agg(key_version || ':' || fingerprint, ',') FROM cellcrypt.keyring");
    let co = &c.coordinator;
    co.psql("app", &format!("SELECT citus_add_node('127.0.0.1', {})", added.port));
    let keyrings = c.keyrings();
    // Sharing would orphan that value: refused (55000) for the whole cluster, nothing changed.
    let mut admin = co.connect(Transport::TcpSsl, "app");
    let e = db_error(admin.query_one("SELECT share_data_encryption_keyring()", &[]));
    assert_eq!(e.code(), &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, "{}", e.message());
    assert!(e.message().contains("keyring of its own"), "{}", e.message());
    assert_eq!(added.psql("app", "SELECT string_agg(key_version || ':' || fingerprint, ',') FROM cellcrypt.keyring"), own);
    assert_eq!(added.psql("app", "SELECT decrypt(s) FROM local_note").trim(), "own key");
    assert_eq!(c.keyrings(), keyrings);
    // Without values under its own key, the cluster's keyring takes its place.
    added.psql("app", "DROP TABLE local_note");
    let shared = co.psql("app", "SELECT share_data_encryption_keyring()");
    assert!(shared.contains("3 workers"), "{shared}");
    assert_eq!(
        added.psql("app", "SELECT string_agg(key_version || ':' || fingerprint, ',' ORDER BY key_version) FROM cellcrypt.keyring"),
        co.psql("app", "SELECT string_agg(key_version || ':' || fingerprint, ',' ORDER BY key_version) FROM cellcrypt.keyring"),
    );
    c.copy_key_file_to(&added);
    assert_eq!(added.psql("app", "SELECT is_data_encryption_active()").trim(), "t");
    co.psql("app", "SELECT rebalance_table_shards('acct', shard_transfer_mode => 'block_writes')");
    let placed = co.psql("app", &format!("SELECT count(*) FROM pg_dist_shard_placement WHERE nodeport = {}", added.port));
    assert!(placed.trim().parse::<i32>().unwrap() > 0, "shards moved to the new node");
    assert_eq!(co.psql("app", digest), before);
    co.psql("app", "INSERT INTO acct SELECT g % 50, g, 'later' || g, '{}' FROM generate_series(6001, 6100) g");
    assert_eq!(co.psql("app", "SELECT count(*) FROM acct WHERE decrypt(email) LIKE 'later%'").trim(), "100");
    c.workers.push(added);
    for n in c.nodes() {
        n.restart();
    }
    assert_eq!(c.coordinator.psql("app", "SELECT count(*) FROM acct WHERE id <= 6000 AND decrypt(email) = 'user' || id").trim(), "6000");
}

/// pg_dump of the coordinator moves the cluster: restored into a new coordinator the data is
/// unreadable until the key is restored; then new workers take the keyring and the tables are
/// distributed again, every value intact.
#[test]
fn pg_dump_of_the_coordinator_moves_the_whole_cluster() {
    let c = Citus::start("move", 2);
    let co = &c.coordinator;
    co.psql(
        "app",
        "CREATE TABLE acct (tenant int, id int, email encrypted_text, salary encrypted_numeric, PRIMARY KEY (tenant, id)); \
         SELECT create_distributed_table('acct', 'tenant'); \
         INSERT INTO acct SELECT g % 9, g, 'user' || g, g * 2.5 FROM generate_series(1, 2000) g; \
         CREATE TABLE ref (code text PRIMARY KEY, s encrypted_text); SELECT create_reference_table('ref'); \
         INSERT INTO ref VALUES ('a', 'alpha'), ('b', 'beta')",
    );
    let digest = |n: &Cluster| {
        n.psql("app", "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email) || '/' || decrypt(salary), ',' ORDER BY id)) FROM acct")
            + &n.psql("app", "SELECT string_agg(code || decrypt(s), ',' ORDER BY code) FROM ref")
    };
    let before = digest(co);
    let mut admin = co.connect(Transport::TcpSsl, "app");
    let key: String = admin.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
    let dump = co.dir.join("app.dump");
    co.pg_dump("app", &["-Fc", "-f", dump.to_str().unwrap()]);

    // The new cluster: its coordinator first, alone.
    let nco = node("move-new-c");
    nco.psql("app", "CREATE EXTENSION pg_cellcrypt");
    nco.pg_restore("app", &dump);
    assert_eq!(nco.psql("app", "SELECT is_data_encryption_active()").trim(), "f");
    let mut nadmin = nco.connect(Transport::TcpSsl, "app");
    let restored: String = nadmin.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap().get(0);
    assert!(restored.starts_with("restored"), "{restored}");
    assert_eq!(digest(&nco), before, "restored on the new coordinator");
    // Then its workers: they take the keyring, get the key file, and the tables are distributed.
    let nws: Vec<Cluster> = (0..2).map(|i| node(&format!("move-new-w{i}"))).collect();
    nco.psql("app", &format!("SELECT citus_set_coordinator_host('127.0.0.1', {})", nco.port));
    for w in &nws {
        nco.psql("app", &format!("SELECT citus_add_node('127.0.0.1', {})", w.port));
    }
    let shared = nco.psql("app", "SELECT share_data_encryption_keyring()");
    assert!(shared.contains("2 workers"), "{shared}");
    let new = Citus { coordinator: nco, workers: nws };
    for w in &new.workers {
        new.copy_key_file_to(w);
    }
    new.coordinator.psql(
        "app",
        "SELECT create_distributed_table('acct', 'tenant'); SELECT create_reference_table('ref')",
    );
    assert_eq!(digest(&new.coordinator), before, "distributed again on the new cluster");
    let k = new.keyrings();
    assert!(k.iter().all(|x| x == &k[0]), "{k:?}");
}
