//! The adversarial suite: real clusters attacked by hostile *ordinary* roles.
//!
//! * hostile objects that shadow pg_catalog's operators, functions and aggregates on the
//!   caller's search_path (the CVE-2018-1058 class), reaching every entry point of the
//!   extension, and on a database-level search_path reaching the re-encryption worker;
//! * table owners' code (triggers of every firing mode, expression indexes, CHECK and domain
//!   constraints, generated columns, row level security) during re-encryption;
//! * standbys serving non-superusers; the extension's locks out of SQL's reach; pre-existing
//!   roles with the extension's role names; the audit record flooded with refusals; refusal
//!   hints whatever the message language;
//! * blind indexes only for registered columns: an ordinary role cannot give a value it cannot
//!   decrypt a blind index, and a hostile table owner gains nothing from a registration.
//!
//! Every hostile function, when it runs as anyone other than its owner, reports itself with a
//! WARNING (`cellcrypt-escalation-probe who=<current_user>`: in the server log even when the
//! transaction rolls back), a row in `public.escalation_log`, and tries `ALTER ROLE <owner>
//! SUPERUSER` and `GRANT data_encryption_admin TO <owner>` (errors swallowed). A test fails
//! when any role's attributes or memberships change, or when hostile code ran as a superuser
//! or as a role that was not the one calling.

use cellcrypt_integration::*;
use postgres::error::{DbError, SqlState};
use postgres::{Client, SimpleQueryMessage};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Key derivation is slow by default; the tests need it fast.

fn start(name: &str, extra: &[&str]) -> Cluster {
    let mut conf: Vec<&str> = Vec::new();
    conf.extend_from_slice(extra);
    Cluster::start(name, &conf)
}

/// A superuser session over the Unix socket with a safe search_path, for setting up and
/// checking (never for the calls under attack).
fn superuser(c: &Cluster, db: &str) -> Client {
    let mut client = c.connect(Transport::Unix, db);
    client.batch_execute("SET search_path = pg_catalog, public").unwrap();
    client
}

/// A session of `user` over the Unix socket with `search_path` set to `path`.
fn session(c: &Cluster, db: &str, user: &str, path: &str) -> Client {
    let mut client = c.connect_as(Transport::Unix, db, user);
    client.batch_execute(&format!("SET search_path = {path}")).unwrap();
    client
}

/// Every row of every result of `sql` (simple protocol, text format), one line per row with
/// `|` between columns.
fn try_rows(client: &mut Client, sql: &str) -> Result<String, postgres::Error> {
    let mut out = String::new();
    for m in client.simple_query(sql)? {
        if let SimpleQueryMessage::Row(r) = m {
            let cols: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect();
            out.push_str(&cols.join("|"));
            out.push('\n');
        }
    }
    Ok(out)
}

fn rows(client: &mut Client, sql: &str) -> String {
    try_rows(client, sql).unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
}

fn one(client: &mut Client, sql: &str) -> String {
    rows(client, sql).trim_end().to_owned()
}

fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {} (detail: {:?}, hint: {:?})", db.code().code(), db.message(), db.detail(), db.hint()),
        None => e.to_string(),
    }
}

/// The call must succeed.
fn ok<T>(r: Result<T, postgres::Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {}", describe(&e)))
}

/// The call must fail with `code`; returns the server's error.
fn refused<T: std::fmt::Debug>(r: Result<T, postgres::Error>, code: &SqlState, what: &str) -> DbError {
    match r {
        Ok(v) => panic!("{what}: expected SQLSTATE {}, but it succeeded: {v:?}", code.code()),
        Err(e) => {
            let db = e.as_db_error().cloned().unwrap_or_else(|| panic!("{what}: not a server error: {e}"));
            assert_eq!(db.code(), code, "{what}: {}", describe(&e));
            db
        }
    }
}

const LOG_TABLE: &str = "CREATE TABLE public.escalation_log (who text, at text); GRANT INSERT ON public.escalation_log TO PUBLIC;";

const ROLES: &str = "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication FROM pg_catalog.pg_roles ORDER BY 1";
const MEMBERS: &str = "SELECT roleid::pg_catalog.regrole, member::pg_catalog.regrole, admin_option FROM pg_catalog.pg_auth_members ORDER BY 1, 2";

/// The roles of the hostile functions' reports in the server log.
fn probes(c: &Cluster) -> Vec<String> {
    let log = c.server_log();
    let marker = "cellcrypt-escalation-probe who=";
    log.match_indices(marker)
        .filter_map(|(i, _)| {
            let who: String = log[i + marker.len()..].chars().take_while(|ch| !ch.is_whitespace()).collect();
            (!who.is_empty() && !who.starts_with('%')).then_some(who)
        })
        .collect()
}

/// Who may do what, before the attack.
struct Baseline {
    roles: String,
    members: String,
    superusers: Vec<String>,
}

impl Baseline {
    fn take(su: &mut Client) -> Baseline {
        Baseline {
            roles: rows(su, ROLES),
            members: rows(su, MEMBERS),
            superusers: rows(su, "SELECT rolname FROM pg_catalog.pg_roles WHERE rolsuper").lines().map(str::to_owned).collect(),
        }
    }

    /// No role gained an attribute or a membership, and hostile code ran only as one of
    /// `callers` (a caller running its own search_path's code with its own rights is not an
    /// escalation), never as a superuser. `su` must be connected to the database holding the
    /// escalation log.
    fn check(&self, c: &Cluster, su: &mut Client, callers: &[&str], step: &str) {
        let roles = rows(su, ROLES);
        assert!(roles == self.roles, "{step}: role attributes changed\nbefore:\n{}\nafter:\n{roles}", self.roles);
        let members = rows(su, MEMBERS);
        assert!(members == self.members, "{step}: role memberships changed\nbefore:\n{}\nafter:\n{members}", self.members);
        let logged = rows(su, "SELECT who, count(*) FROM public.escalation_log GROUP BY 1 ORDER BY 1");
        for line in logged.lines() {
            let who = line.split('|').next().unwrap_or("");
            assert!(
                !self.superusers.iter().any(|s| s == who) && callers.contains(&who),
                "{step}: hostile code ran as {who} (escalation_log: {logged:?}; expected only {callers:?})"
            );
        }
        for who in probes(c) {
            assert!(
                !self.superusers.contains(&who) && callers.contains(&who.as_str()),
                "{step}: hostile code ran as {who} (server log; expected only {callers:?})"
            );
        }
    }
}

/// Hostile objects in `schema`, owned by `owner`: operators for every type the extension's
/// internal SQL compares, and look-alikes of functions and aggregates it calls. Each does what
/// the original does, after reporting itself (see the module documentation) when it runs as
/// anyone but `owner`. Their bodies name pg_catalog's operators explicitly, so they work
/// whatever the search_path.
fn hostile_objects(schema: &str, owner: &str) -> String {
    let guard = format!("IF current_user OPERATOR(pg_catalog.<>) '{owner}'::pg_catalog.name THEN PERFORM {schema}.cc_probe(); END IF;");
    let mut sql = format!(
        r#"
CREATE FUNCTION {schema}.cc_probe() RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    RAISE WARNING 'cellcrypt-escalation-probe who=% session=%', current_user, session_user;
    BEGIN
        INSERT INTO public.escalation_log (who, at) VALUES (current_user, pg_catalog.clock_timestamp()::pg_catalog.text);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        ALTER ROLE {owner} SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        GRANT data_encryption_admin TO {owner};
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END
$f$;
"#
    );
    let mut operators: Vec<(&str, &str, &str, &str)> = Vec::new();
    for (tag, ty) in [("text", "text"), ("name", "name"), ("int4", "integer"), ("oid", "oid"), ("int8", "bigint"), ("bool", "boolean"), ("char", "\"char\"")] {
        operators.push(("eq", "=", tag, ty));
        operators.push(("ne", "<>", tag, ty));
    }
    for (optag, op) in [("ge", ">="), ("lt", "<"), ("gt", ">"), ("le", "<=")] {
        operators.push((optag, op, "tid", "tid"));
    }
    for (optag, op) in [("lt", "<"), ("gt", ">")] {
        operators.push((optag, op, "timestamptz", "timestamptz"));
    }
    for (optag, op, tag, ty) in operators {
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.cc_{optag}_{tag}({ty}, {ty}) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN {guard} RETURN $1 OPERATOR(pg_catalog.{op}) $2; END $f$;\n\
             CREATE OPERATOR {schema}.{op} (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = {schema}.cc_{optag}_{tag});\n"
        ));
    }
    for (name, args, returns, body) in [
        ("now", "", "timestamptz", "pg_catalog.now()"),
        ("clock_timestamp", "", "timestamptz", "pg_catalog.clock_timestamp()"),
        ("current_database", "", "name", "pg_catalog.current_database()"),
        ("pg_backend_pid", "", "integer", "pg_catalog.pg_backend_pid()"),
        ("quote_ident", "text", "text", "pg_catalog.quote_ident($1)"),
    ] {
        sql.push_str(&format!("CREATE FUNCTION {schema}.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $f$ BEGIN {guard} RETURN {body}; END $f$;\n"));
    }
    sql.push_str(&format!(
        r#"
CREATE FUNCTION {schema}.cc_count_sf(bigint) RETURNS bigint LANGUAGE plpgsql AS $f$ BEGIN {guard} RETURN $1 OPERATOR(pg_catalog.+) 1; END $f$;
CREATE AGGREGATE {schema}.count(*) (SFUNC = {schema}.cc_count_sf, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION {schema}.cc_max_int4(integer, integer) RETURNS integer LANGUAGE plpgsql STRICT AS $f$ BEGIN {guard} RETURN pg_catalog.int4larger($1, $2); END $f$;
CREATE AGGREGATE {schema}.max(integer) (SFUNC = {schema}.cc_max_int4, STYPE = integer);
CREATE FUNCTION {schema}.cc_max_int8(bigint, bigint) RETURNS bigint LANGUAGE plpgsql STRICT AS $f$ BEGIN {guard} RETURN pg_catalog.int8larger($1, $2); END $f$;
CREATE AGGREGATE {schema}.max(bigint) (SFUNC = {schema}.cc_max_int8, STYPE = bigint);
CREATE FUNCTION {schema}.cc_min_tstz(timestamptz, timestamptz) RETURNS timestamptz LANGUAGE plpgsql STRICT AS $f$ BEGIN {guard} RETURN pg_catalog.timestamptz_smaller($1, $2); END $f$;
CREATE AGGREGATE {schema}.min(timestamptz) (SFUNC = {schema}.cc_min_tstz, STYPE = timestamptz);
CREATE FUNCTION {schema}.cc_sum_int8(numeric, bigint) RETURNS numeric LANGUAGE plpgsql AS $f$
BEGIN
    {guard}
    IF $2 IS NULL THEN RETURN $1; END IF;
    IF $1 IS NULL THEN RETURN $2::pg_catalog.numeric; END IF;
    RETURN $1 OPERATOR(pg_catalog.+) $2::pg_catalog.numeric;
END $f$;
CREATE AGGREGATE {schema}.sum(bigint) (SFUNC = {schema}.cc_sum_int8, STYPE = numeric);
"#
    ));
    sql
}

/// The schemas `=(integer,integer)`, `=(text,text)`, `now()` and `count(*)` resolve to in this
/// session: proof that the hostile objects shadow pg_catalog's there.
const SHADOWED: &str = "SELECT (SELECT n.nspname FROM pg_catalog.pg_operator o, pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) o.oprnamespace AND o.oid OPERATOR(pg_catalog.=) pg_catalog.to_regoperator('=(integer,integer)')::pg_catalog.oid), \
                               (SELECT n.nspname FROM pg_catalog.pg_operator o, pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) o.oprnamespace AND o.oid OPERATOR(pg_catalog.=) pg_catalog.to_regoperator('=(text,text)')::pg_catalog.oid), \
                               (SELECT n.nspname FROM pg_catalog.pg_proc p, pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) p.pronamespace AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('now()')::pg_catalog.oid), \
                               (SELECT n.nspname FROM pg_catalog.pg_proc p, pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) p.pronamespace AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('count()')::pg_catalog.oid)";

fn assert_shadowed(client: &mut Client, schema: &str, who: &str) {
    assert_eq!(one(client, SHADOWED), [schema; 4].join("|"), "the hostile objects must shadow pg_catalog's in {who}'s session");
}

const NOT_ALLOWED: SqlState = SqlState::INSUFFICIENT_PRIVILEGE;

/// 1. The caller's search_path, full of hostile look-alikes, never runs with the rights of
/// anyone but the caller, whatever entry point an ordinary role, a reader or an administrator
/// calls.
#[test]
fn hostile_objects_on_the_callers_search_path_never_run_with_elevated_rights() {
    let c = start("adv-searchpath", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        &format!(
            "{LOG_TABLE} \
             CREATE ROLE mallory LOGIN; GRANT CREATE ON SCHEMA public TO mallory; \
             CREATE ROLE adam LOGIN IN ROLE data_encryption_admin; \
             CREATE ROLE rhea LOGIN IN ROLE data_encryption_reader; \
             CREATE TABLE secrets (id int PRIMARY KEY, s encrypted_text); \
             INSERT INTO secrets SELECT g, 'secret ' || g FROM generate_series(1, 50) g; \
             SELECT register_blind_index('secrets', 's'); CREATE INDEX secrets_bidx ON secrets (blind_index(s)); \
             GRANT SELECT, INSERT ON secrets TO rhea"
        ),
    );
    {
        let mut m = c.connect_as(Transport::Unix, "app", "mallory");
        ok(m.batch_execute("CREATE TABLE public.mallory_t (id int, s encrypted_text, j encrypted_jsonb, note encrypted_text); INSERT INTO public.mallory_t VALUES (0, 'before', '{}')"), "mallory's table");
        ok(m.batch_execute(&hostile_objects("public", "mallory")), "mallory's hostile objects");
    }
    let mut su = superuser(&c, "app");
    let base = Baseline::take(&mut su);
    let callers = ["mallory", "adam", "rhea"];
    let path = "public, pg_catalog";

    // A superuser registers a column of mallory's table for a blind index: the registration
    // binds its values and rewrites the table as mallory, her hostile objects in place.
    let msg = one(&mut su, "SELECT public.register_blind_index('public.mallory_t', 's')");
    assert!(msg.starts_with("registered: public.mallory_t.s is blind-index column 2 (exact); 1 values bound."), "{msg}");
    base.check(&c, &mut su, &callers, "after a superuser registered a column of mallory's table");

    // Mallory, an ordinary role, through every entry point she can reach.
    let mut m = session(&c, "app", "mallory", path);
    assert_shadowed(&mut m, "public", "mallory");
    let mut step = |m: &mut Client, what: &str, sql: &str, expect: Option<&SqlState>| {
        match expect {
            None => {
                ok(try_rows(m, sql), &format!("mallory: {what}"));
            }
            Some(code) => {
                refused(try_rows(m, sql), code, &format!("mallory: {what}"));
            }
        }
        base.check(&c, &mut su, &callers, &format!("after mallory's {what}"));
    };
    step(&mut m, "is_data_encryption_active()", "SELECT is_data_encryption_active()", None);
    step(&mut m, "generate_data_encryption_key()", "SELECT generate_data_encryption_key()", None);
    step(&mut m, "INSERT of literals", "INSERT INTO mallory_t VALUES (1, 'mallory secret', '{\"a\": 1}')", None);
    step(&mut m, "INSERT of typed plaintext", "INSERT INTO mallory_t (id, s) VALUES (2, 'typed'::text)", None);
    step(&mut m, "encryption_key_version(col)", "SELECT encryption_key_version(s), encryption_key_version(j) FROM mallory_t", None);
    step(&mut m, "blind_index(col)", "SELECT blind_index(s), blind_index('x'::text, 'mallory_t', 's') FROM mallory_t", None);
    step(&mut m, "blind_index() lookup on an unregistered column", "SELECT blind_index('x'::text, 'mallory_t', 'note')", Some(&NOT_ALLOWED));
    step(&mut m, "register_blind_index()", "SELECT register_blind_index('mallory_t', 'note')", Some(&NOT_ALLOWED));
    step(&mut m, "decrypt(col)", "SELECT decrypt(s) FROM mallory_t", Some(&NOT_ALLOWED));
    step(&mut m, "cast to text", "SELECT s::text FROM mallory_t", Some(&NOT_ALLOWED));
    step(&mut m, "set_data_encryption_key()", "SELECT set_data_encryption_key(generate_data_encryption_key())", Some(&NOT_ALLOWED));
    step(&mut m, "retrieve_data_encryption_key()", "SELECT retrieve_data_encryption_key()", Some(&NOT_ALLOWED));
    step(&mut m, "data_encryption_status", "SELECT * FROM data_encryption_status", Some(&NOT_ALLOWED));
    step(&mut m, "data_encryption_audit", "SELECT * FROM data_encryption_audit", Some(&NOT_ALLOWED));
    step(&mut m, "data_encryption_progress", "SELECT * FROM data_encryption_progress", Some(&NOT_ALLOWED));
    step(&mut m, "rotate_blind_index_key()", "SELECT rotate_blind_index_key()", Some(&NOT_ALLOWED));
    step(&mut m, "CALL finish_data_encryption_reencryption()", "CALL finish_data_encryption_reencryption()", Some(&NOT_ALLOWED));
    drop(m);

    // A reader with the same search_path.
    let mut r = session(&c, "app", "rhea", path);
    assert_shadowed(&mut r, "public", "rhea");
    ok(try_rows(&mut r, "SELECT is_data_encryption_active()"), "rhea: is_data_encryption_active()");
    let plain = ok(try_rows(&mut r, "SELECT decrypt(s) FROM secrets ORDER BY id"), "rhea: decrypt");
    assert_eq!(plain.lines().count(), 50);
    assert_eq!(plain.lines().next(), Some("secret 1"));
    ok(try_rows(&mut r, "INSERT INTO secrets VALUES (100, 'written by rhea')"), "rhea: INSERT");
    assert_eq!(ok(try_rows(&mut r, "SELECT id FROM secrets WHERE blind_index(s) = blind_index('secret 7', 'secrets', 's')"), "rhea: blind-index lookup"), "7\n");
    refused(try_rows(&mut r, "SELECT set_data_encryption_key(generate_data_encryption_key())"), &NOT_ALLOWED, "rhea: set_data_encryption_key");
    refused(try_rows(&mut r, "SELECT * FROM data_encryption_status"), &NOT_ALLOWED, "rhea: data_encryption_status");
    base.check(&c, &mut su, &callers, "after the reader's calls");

    // An administrator with the same search_path, over the Unix socket.
    let mut a = session(&c, "app", "adam", path);
    assert_shadowed(&mut a, "public", "adam");
    let steps: [(&str, &str); 9] = [
        ("is_data_encryption_active()", "SELECT is_data_encryption_active()"),
        ("set_data_encryption_key()", "SELECT set_data_encryption_key(generate_data_encryption_key())"),
        ("data_encryption_status", "SELECT * FROM data_encryption_status"),
        ("retrieve_data_encryption_key()", "SELECT retrieve_data_encryption_key()"),
        ("data_encryption_audit", "SELECT * FROM data_encryption_audit"),
        ("data_encryption_progress", "SELECT * FROM data_encryption_progress"),
        ("rotate_blind_index_key()", "SELECT rotate_blind_index_key()"),
        ("register_blind_index()", "SELECT register_blind_index('mallory_t', 'note')"),
        ("CALL finish_data_encryption_reencryption()", "CALL finish_data_encryption_reencryption()"),
    ];
    for (what, sql) in steps {
        let out = ok(try_rows(&mut a, sql), &format!("adam: {what}"));
        match what {
            "set_data_encryption_key()" => assert!(out.starts_with("changed"), "{out}"),
            "retrieve_data_encryption_key()" => assert!(out.starts_with("CCK1-"), "a generated key: {}", out.len()),
            "rotate_blind_index_key()" => assert!(out.starts_with("rotated"), "{out}"),
            "register_blind_index()" => assert!(out.starts_with("registered: public.mallory_t.note is blind-index column 3"), "{out}"),
            _ => {}
        }
        base.check(&c, &mut su, &callers, &format!("after adam's {what}"));
    }
    refused(try_rows(&mut a, "SELECT decrypt(s) FROM secrets"), &NOT_ALLOWED, "adam: decrypt (an administrator is not a reader)");
    drop(a);

    // The change completed, and every value moved to the new key.
    c.wait_reencrypted("app");
    assert_eq!(one(&mut su, "SELECT key_version, reencryption FROM public.data_encryption_status"), "2|complete");
    assert_eq!(
        one(&mut su, "SELECT (SELECT count(*) FROM public.secrets WHERE public.encryption_key_version(s) <> 2) + (SELECT count(*) FROM public.mallory_t WHERE public.encryption_key_version(s) <> 2)"),
        "0"
    );
    assert_eq!(one(&mut su, "SELECT string_agg(public.decrypt(s), ',' ORDER BY id) FROM public.mallory_t"), "before,mallory secret,typed");
    let mut r = session(&c, "app", "rhea", path);
    assert_eq!(ok(try_rows(&mut r, "SELECT id FROM secrets WHERE blind_index(s) = blind_index('secret 9', 'secrets', 's')"), "rhea: lookup after the rotation"), "9\n");
    assert_eq!(
        one(&mut su, "SELECT string_agg(id::text, ',' ORDER BY id) FROM public.mallory_t WHERE public.blind_index(s) = ANY (ARRAY[public.blind_index('mallory secret', 'public.mallory_t', 's'), public.blind_index('typed', 'public.mallory_t', 's')])"),
        "1,2",
        "what mallory wrote to her registered column, found by its blind index"
    );
    base.check(&c, &mut su, &callers, "at the end");
}

/// 2. A database-level search_path set by the database's (non-superuser) owner reaches every
/// session, the re-encryption worker's included; the worker must not run it as a superuser.
#[test]
fn a_hostile_database_search_path_does_not_reach_the_worker() {
    let c = start("adv-dbpath", &[]);
    c.psql("postgres", "CREATE ROLE dbo LOGIN");
    c.psql("postgres", "CREATE DATABASE app2 OWNER dbo");
    c.psql("app2", &format!("CREATE EXTENSION pg_cellcrypt; {LOG_TABLE}"));
    {
        let mut d = c.connect_as(Transport::Unix, "app2", "dbo");
        ok(
            d.batch_execute(
                "CREATE TABLE public.t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, note text); \
                 INSERT INTO public.t SELECT g, 'value ' || g, jsonb_build_object('g', g), 'plain ' || g FROM generate_series(1, 300) g",
            ),
            "dbo's table",
        );
        // Blind indexes are opt-in: a superuser registers dbo's column first.
        c.psql("app2", "SELECT register_blind_index('public.t', 's')");
        ok(d.batch_execute("CREATE INDEX t_bidx ON public.t (blind_index(s)); CREATE SCHEMA evil"), "dbo's blind index");
        ok(d.batch_execute(&hostile_objects("evil", "dbo")), "dbo's hostile objects");
        ok(d.batch_execute("ALTER DATABASE app2 SET search_path = evil, public, pg_catalog"), "ALTER DATABASE SET search_path");
    }
    // Every new session now starts with the hostile path.
    {
        let mut fresh = c.connect_as(Transport::Unix, "app2", "dbo");
        assert_eq!(one(&mut fresh, "SHOW search_path"), "evil, public, pg_catalog");
        assert_shadowed(&mut fresh, "evil", "dbo");
    }
    let mut su = superuser(&c, "app2");
    let base = Baseline::take(&mut su);
    let digest_sql = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s) || '/' || public.decrypt(j)::text || '/' || note, ',' ORDER BY id)) FROM public.t";
    let digest = one(&mut su, digest_sql);
    assert!(digest.starts_with("300:"), "{digest}");

    // The superuser's own session is pinned: only the worker meets the database's search_path.
    let msg = one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())");
    assert!(msg.starts_with("changed"), "{msg}");
    let started = Instant::now();
    loop {
        let s = one(&mut su, "SELECT reencryption FROM public.data_encryption_status");
        if s == "complete" {
            break;
        }
        base.check(&c, &mut su, &["dbo"], "while the worker re-encrypts");
        assert!(started.elapsed() < Duration::from_secs(120), "re-encryption did not finish: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    base.check(&c, &mut su, &["dbo"], "after the worker re-encrypted app2");
    assert_eq!(one(&mut su, "SELECT key_version FROM public.data_encryption_status"), "2");
    assert_eq!(
        one(&mut su, "SELECT count(*) FROM public.t WHERE public.encryption_key_version(s) <> 2 OR public.encryption_key_version(j) <> 2"),
        "0",
        "values left under the old key"
    );
    assert_eq!(one(&mut su, digest_sql), digest, "every value reads back as before");
    assert_eq!(
        one(&mut su, "SELECT id FROM public.t WHERE public.blind_index(s) = public.blind_index('value 5', 'public.t', 's')"),
        "5",
        "the re-encrypted values keep their blind index"
    );
}

/// Tom's probe, `public.tom_probe(what)`: records who runs it (and `what` called it) in the
/// escalation log, reports itself when that is not tom, and tries to make tom a superuser.
macro_rules! tom_probe_sql {
    () => {
        r#"
CREATE FUNCTION public.tom_probe(what text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    IF current_user OPERATOR(pg_catalog.<>) 'tom'::pg_catalog.name THEN
        RAISE WARNING 'cellcrypt-escalation-probe who=% via=%', current_user, what;
    END IF;
    BEGIN
        INSERT INTO public.escalation_log (who, at) VALUES (current_user, what);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        ALTER ROLE tom SUPERUSER;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        GRANT data_encryption_admin TO tom;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END
$f$;
"#
    };
}

/// Tom's table: every kind of owner code PostgreSQL runs on an UPDATE, each reporting who it
/// runs as and trying to make tom a superuser. (The escalation log table must exist.)
const TOM_OBJECTS: &str = concat!(
    tom_probe_sql!(),
    r#"
CREATE FUNCTION public.tom_trigger() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.tom_probe('trigger ' || TG_NAME);
    RETURN NEW;
END
$f$;
-- IMMUTABLE as indexes and generated columns require; the side effects are the point.
CREATE FUNCTION public.tom_index(v encrypted_text) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN
    PERFORM public.tom_probe('index');
    RETURN 1;
END
$f$;
CREATE FUNCTION public.tom_generated(v encrypted_text) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN
    PERFORM public.tom_probe('generated column');
    RETURN 2;
END
$f$;
CREATE FUNCTION public.tom_check(n integer) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN RETURN public.tom_probe('check'); END $f$;
CREATE FUNCTION public.tom_domain_check(n integer) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN RETURN public.tom_probe('domain'); END $f$;
CREATE FUNCTION public.tom_policy(id integer) RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN RETURN public.tom_probe('policy'); END $f$;
CREATE DOMAIN public.tom_dom AS integer CHECK (public.tom_domain_check(VALUE));
CREATE TABLE public.t (
    id integer PRIMARY KEY,
    s encrypted_text,
    n integer CONSTRAINT n_check CHECK (public.tom_check(n)),
    d public.tom_dom,
    g integer GENERATED ALWAYS AS (public.tom_generated(s)) STORED
);
CREATE INDEX t_expression ON public.t (public.tom_index(s));
CREATE TRIGGER t_always BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.tom_trigger();
CREATE TRIGGER t_replica BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.tom_trigger();
CREATE TRIGGER t_ordinary BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.tom_trigger();
ALTER TABLE public.t ENABLE ALWAYS TRIGGER t_always;
ALTER TABLE public.t ENABLE REPLICA TRIGGER t_replica;
INSERT INTO public.t (id, s, n, d) SELECT g, 'tom secret ' || g, g, g FROM generate_series(1, 200) g;
ALTER TABLE public.t ENABLE ROW LEVEL SECURITY;
CREATE POLICY t_policy ON public.t USING (public.tom_policy(id));
"#
);

const TOM_DIGEST: &str = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s) || '/' || n || '/' || d || '/' || g, ',' ORDER BY id)) FROM public.t";

/// A database with the extension, the escalation log and tom's table.
fn toms_database(c: &Cluster, db: &str) {
    c.database_with_extension(db);
    c.psql(db, &format!("{LOG_TABLE} GRANT CREATE ON SCHEMA public TO tom"));
    let mut tom = c.connect_as(Transport::Unix, db, "tom");
    ok(tom.batch_execute(TOM_OBJECTS), "tom's table");
}

/// After a key change in `db`: no escalation, the change complete, no value left under an
/// older key, and the same plaintext.
fn assert_toms_table_reencrypted(c: &Cluster, db: &str, su: &mut Client, base: &Baseline, digest: &str, how: &str) {
    base.check(c, su, &["tom"], how);
    assert_eq!(one(su, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'tom'"), "f", "{how}: tom is not a superuser");
    assert_eq!(one(su, "SELECT reencryption FROM public.data_encryption_status"), "complete", "{how}");
    let version = one(su, "SELECT key_version FROM public.data_encryption_status");
    assert_eq!(version, "2", "{how}");
    assert_eq!(one(su, &format!("SELECT count(*) FROM public.t WHERE public.encryption_key_version(s) <> {version}")), "0", "{how}: values left under the old key");
    assert_eq!(one(su, TOM_DIGEST), digest, "{how}: every value reads back as before");
    eprintln!("{how} in {db}: tom's code ran as: {}", rows(su, "SELECT who || ' ' || at || ' x' || count(*) FROM public.escalation_log GROUP BY who, at ORDER BY 1").replace('\n', "; "));
}

/// 3. Re-encryption meets a table owner's triggers (ALWAYS, REPLICA, ordinary), expression
/// index, CHECK and domain constraints, generated column and row level security: whatever of
/// it runs, runs as the owner, whether the worker or an administrator's foreground procedure
/// does the work.
#[test]
fn reencryption_runs_table_owners_code_only_with_the_owners_rights() {
    let c = start("adv-owners", &[]);
    c.psql("postgres", "CREATE ROLE tom LOGIN");

    // The background worker.
    toms_database(&c, "own_bg");
    c.psql("own_bg", "CREATE ROLE ada LOGIN IN ROLE data_encryption_admin");
    let mut su = superuser(&c, "own_bg");
    let base = Baseline::take(&mut su);
    let digest = one(&mut su, TOM_DIGEST);
    assert!(digest.starts_with("200:"), "{digest}");
    assert!(one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())").starts_with("changed"));
    c.wait_reencrypted("own_bg");
    assert_toms_table_reencrypted(&c, "own_bg", &mut su, &base, &digest, "re-encryption by the worker");

    // The foreground procedure, called by an administrator who is not a superuser. The worker
    // is slowed to one small batch a minute, so the procedure does the work.
    toms_database(&c, "own_fg");
    let mut su_bg = su;
    for setting in ["ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = '60s'", "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 10", "SELECT pg_reload_conf()"] {
        su_bg.batch_execute(setting).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut su = superuser(&c, "own_fg");
    let base = Baseline::take(&mut su);
    let digest = one(&mut su, TOM_DIGEST);
    let mut ada = c.connect_as(Transport::Unix, "own_fg", "ada");
    let msg = ok(try_rows(&mut ada, "SELECT set_data_encryption_key(generate_data_encryption_key())"), "ada: set_data_encryption_key");
    assert!(msg.starts_with("changed"), "{msg}");
    ok(ada.batch_execute("CALL finish_data_encryption_reencryption()"), "ada: CALL finish_data_encryption_reencryption()");
    assert_toms_table_reencrypted(&c, "own_fg", &mut su, &base, &digest, "re-encryption by the foreground procedure");
}

/// 3b. An owner who forces row level security on his table hides rows from himself: the
/// re-encryption must not skip them and call the change complete.
#[test]
fn forced_row_level_security_blocks_the_reencryption_instead_of_skipping_rows() {
    let c = start("adv-forcerls", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE ROLE tom LOGIN; GRANT CREATE ON SCHEMA public TO tom");
    let mut tom = c.connect_as(Transport::Unix, "app", "tom");
    ok(
        tom.batch_execute(
            "CREATE TABLE public.r (id int PRIMARY KEY, s encrypted_text); \
             INSERT INTO public.r SELECT g, 'row ' || g FROM generate_series(1, 200) g; \
             ALTER TABLE public.r ENABLE ROW LEVEL SECURITY; ALTER TABLE public.r FORCE ROW LEVEL SECURITY; \
             CREATE POLICY half ON public.r USING (id % 2 = 0)",
        ),
        "tom's table",
    );
    assert_eq!(one(&mut tom, "SELECT count(*) FROM public.r"), "100", "the policy hides half the rows from tom");
    drop(tom);
    let mut su = superuser(&c, "app");
    let digest_sql = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s), ',' ORDER BY id)) FROM public.r";
    let digest = one(&mut su, digest_sql);
    assert!(digest.starts_with("200:"), "{digest}");
    let old = "SELECT count(*) FROM public.r WHERE public.encryption_key_version(s) <> (SELECT key_version FROM public.data_encryption_status)";

    assert!(one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())").starts_with("changed"));
    let started = Instant::now();
    let status = loop {
        let s = one(&mut su, "SELECT reencryption FROM public.data_encryption_status");
        if s.starts_with("blocked") {
            break s;
        }
        assert!(
            s != "complete",
            "re-encryption reported complete ({} rows under the old key) although FORCE ROW LEVEL SECURITY hides half the rows from the owner: it must block",
            one(&mut su, old)
        );
        assert!(started.elapsed() < Duration::from_secs(30), "re-encryption never said it was blocked: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("with FORCE ROW LEVEL SECURITY: {status}");
    assert_ne!(one(&mut su, old), "0", "blocked, so rows are left under the old key");
    // It stays so (longer than the worker's retry interval), never claiming completion.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let s = one(&mut su, "SELECT reencryption FROM public.data_encryption_status");
        assert!(s != "complete" || one(&mut su, old) == "0", "reported complete with rows under the old key");
        std::thread::sleep(Duration::from_millis(250));
    }

    // Once the owner's rows are visible to him again, the change completes.
    su.batch_execute("ALTER TABLE public.r NO FORCE ROW LEVEL SECURITY").unwrap();
    c.wait_reencrypted("app");
    assert_eq!(one(&mut su, old), "0", "values left under the old key");
    assert_eq!(one(&mut su, digest_sql), digest);
}

/// No backtrace, source path or Rust location in an error a client sees.
fn assert_clean(e: &DbError, what: &str) {
    for text in [e.message(), e.detail().unwrap_or(""), e.hint().unwrap_or("")] {
        for bad in ["backtrace", "src/", ".rs:"] {
            assert!(!text.contains(bad), "{what}: the error shows {bad:?}: {} (detail: {:?}, hint: {:?})", e.message(), e.detail(), e.hint());
        }
    }
}

/// The call must succeed; an error fails the test, after checking it leaks nothing internal.
fn ok_clean<T>(r: Result<T, postgres::Error>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        if let Some(db) = e.as_db_error() {
            assert_clean(db, what);
        }
        panic!("{what} failed: {}", describe(&e))
    })
}

/// 4. A streaming standby serves readers and ordinary roles that are not superusers.
#[test]
fn a_standby_serves_roles_that_are_not_superusers() {
    let primary = start("adv-primary", &["wal_level = replica"]);
    primary.database_with_extension("app");
    primary.psql(
        "app",
        "CREATE ROLE rita LOGIN IN ROLE data_encryption_reader; CREATE ROLE nora LOGIN; \
         CREATE TABLE t (id int PRIMARY KEY, s encrypted_text); \
         INSERT INTO t SELECT g, 'secret ' || g FROM generate_series(1, 100) g; \
         SELECT register_blind_index('t', 's'); CREATE INDEX t_bidx ON t (blind_index(s)); GRANT SELECT ON t TO rita, nora",
    );
    // mallory's look-alikes, replicated to the standby like everything else.
    primary.psql("app", &format!("{LOG_TABLE} CREATE ROLE mallory LOGIN; GRANT CREATE ON SCHEMA public TO mallory"));
    {
        let mut m = primary.connect_as(Transport::Unix, "app", "mallory");
        ok(m.batch_execute(&hostile_objects("public", "mallory")), "mallory's look-alikes");
    }
    let digest_sql = "SELECT count(*) || ':' || md5(string_agg(decrypt(s), ',' ORDER BY id)) FROM t";
    let expected = primary.psql("app", digest_sql).trim().to_owned();

    // The standby's key: the primary's key files, copied into its own key directory.
    let standby = primary.standby("adv-standby", &[]);
    let mut copied = 0;
    for entry in std::fs::read_dir(primary.key_dir()).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "key") {
            let target = standby.key_dir().join(p.file_name().unwrap());
            std::fs::copy(&p, &target).unwrap();
            assert!(Command::new("chown").arg("postgres:postgres").arg(&target).status().unwrap().success());
            assert!(Command::new("chmod").arg("600").arg(&target).status().unwrap().success());
            copied += 1;
        }
    }
    assert!(copied > 0, "no key file in {}", primary.key_dir().display());
    primary.wait_replayed_by(&standby);

    // The reader is the first to use the key on the standby.
    let mut rita = standby.connect_as(Transport::Unix, "app", "rita");
    let active: bool = ok_clean(rita.query_one("SELECT is_data_encryption_active()", &[]), "rita: is_data_encryption_active()").get(0);
    assert!(active, "the standby has the key");
    let one_value: String = ok_clean(rita.query_one("SELECT decrypt(s) FROM t WHERE id = 1", &[]), "rita: decrypt, first transaction").get(0);
    assert_eq!(one_value, "secret 1");
    ok_clean(rita.batch_execute("BEGIN"), "rita: BEGIN");
    let two: String = ok_clean(rita.query_one("SELECT decrypt(s) FROM t WHERE id = 2", &[]), "rita: decrypt, second transaction").get(0);
    let digest: String = ok_clean(rita.query_one(digest_sql, &[]), "rita: decrypt every row, second transaction").get(0);
    ok_clean(rita.batch_execute("COMMIT"), "rita: COMMIT");
    assert_eq!((two.as_str(), digest.as_str()), ("secret 2", expected.as_str()));
    let digest: String = ok_clean(rita.query_one(digest_sql, &[]), "rita: decrypt every row, third transaction").get(0);
    assert_eq!(digest, expected);
    let found: i32 = ok_clean(rita.query_one("SELECT id FROM t WHERE blind_index(s) = blind_index('secret 42', 't', 's')", &[]), "rita: blind-index lookup").get(0);
    assert_eq!(found, 42);
    let mut over_ssl = standby.connect_as(Transport::TcpSsl, "app", "rita");
    let three: String = ok_clean(over_ssl.query_one("SELECT decrypt(s) FROM t WHERE id = 3", &[]), "rita over SSL: decrypt, in a new session").get(0);
    assert_eq!(three, "secret 3");

    // An ordinary role: what anyone may do works, decrypting is refused cleanly.
    let mut nora = standby.connect_as(Transport::Unix, "app", "nora");
    let active: bool = ok_clean(nora.query_one("SELECT is_data_encryption_active()", &[]), "nora: is_data_encryption_active()").get(0);
    assert!(active);
    let found: i32 = ok_clean(nora.query_one("SELECT id FROM t WHERE blind_index(s) = blind_index('secret 17', 't', 's')", &[]), "nora: blind-index lookup").get(0);
    assert_eq!(found, 17);
    let version: i32 = ok_clean(nora.query_one("SELECT encryption_key_version(s) FROM t WHERE id = 1", &[]), "nora: encryption_key_version").get(0);
    assert_eq!(version, 1);
    let e = refused(nora.query_one("SELECT decrypt(s) FROM t WHERE id = 1", &[]), &NOT_ALLOWED, "nora: decrypt on the standby");
    assert_clean(&e, "nora: decrypt on the standby");
    // And again, in a later transaction of the reader's session.
    let again: String = ok_clean(rita.query_one("SELECT decrypt(s) FROM t WHERE id = 4", &[]), "rita: decrypt, fourth transaction").get(0);
    assert_eq!(again, "secret 4");

    // With mallory's look-alikes first on the search_path, on the standby: what the extension
    // runs on its own behalf (the keyring and registration reads, as the extension's owner)
    // never runs them; only the callers' own queries may.
    for who in ["nora", "rita", "mallory"] {
        let mut s = session(&standby, "app", who, "public, pg_catalog");
        assert_shadowed(&mut s, "public", who);
        let active: bool = ok_clean(s.query_one("SELECT public.is_data_encryption_active()", &[]), &format!("{who}: is_data_encryption_active() with look-alikes")).get(0);
        assert!(active);
        let _: Vec<u8> = ok_clean(s.query_one("SELECT public.blind_index('secret 5', 'public.t', 's')", &[]), &format!("{who}: lookup with look-alikes")).get(0);
    }
    for who in probes(&standby) {
        assert!(["nora", "rita", "mallory"].contains(&who.as_str()), "hostile code ran on the standby as {who}");
    }
}

/// 5. Locks an ordinary role can take from SQL do not stop key changes, index key rotations or
/// re-encryption; two administrators racing still get one change and a clear 55P03.
#[test]
fn the_extensions_locks_are_out_of_sqls_reach() {
    let c = start("adv-locks", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE ROLE mallory LOGIN; CREATE TABLE t (id int PRIMARY KEY, s encrypted_text); \
         INSERT INTO t SELECT g, 'value ' || g FROM generate_series(1, 300) g; \
         SELECT register_blind_index('t', 's'); CREATE INDEX t_bidx ON t (blind_index(s))",
    );
    let old = "SELECT count(*) FROM t WHERE encryption_key_version(s) <> (SELECT key_version FROM data_encryption_status)";
    let mut admin = c.connect(Transport::Unix, "app");
    admin.batch_execute("SET statement_timeout = '20s'").unwrap();
    let change = |admin: &mut Client, what: &str| {
        let msg: String = ok(admin.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]), &format!("{what}: set_data_encryption_key")).get(0);
        assert!(msg.starts_with("changed"), "{what}: {msg}");
        let msg: String = ok(admin.query_one("SELECT rotate_blind_index_key()", &[]), &format!("{what}: rotate_blind_index_key")).get(0);
        assert!(msg.starts_with("rotated"), "{what}: {msg}");
    };

    // Session-level advisory locks on the keys the extension used to lock with.
    let mut m = c.connect_as(Transport::Unix, "app", "mallory");
    ok(m.batch_execute("SELECT pg_advisory_lock(1667464497, 1); SELECT pg_advisory_lock(1667464497, 2)"), "mallory's session locks");
    change(&mut admin, "while mallory holds session-level advisory locks");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", old).trim(), "0");

    // Transaction-level ones, in a transaction left open.
    ok(m.batch_execute("SELECT pg_advisory_unlock_all(); BEGIN; SELECT pg_advisory_xact_lock(1667464497, 1); SELECT pg_advisory_xact_lock(1667464497, 2)"), "mallory's transaction locks");
    change(&mut admin, "while mallory holds transaction-level advisory locks");
    ok(m.batch_execute("COMMIT"), "mallory's COMMIT");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", old).trim(), "0");
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "3");
    assert_eq!(c.psql("app", "SELECT id FROM t WHERE blind_index(s) = blind_index('value 5', 't', 's')").trim(), "5");

    // Two administrators at once: the second is refused at once with 55P03.
    let mut a = c.connect(Transport::Unix, "app");
    let mut b = c.connect(Transport::TcpSsl, "app");
    b.batch_execute("SET statement_timeout = '15s'").unwrap();
    ok(a.batch_execute("BEGIN"), "A: BEGIN");
    let msg: String = ok(a.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]), "A: set_data_encryption_key").get(0);
    assert!(msg.starts_with("changed"), "{msg}");
    let asked = Instant::now();
    let e = refused(b.query_one("SELECT set_data_encryption_key(generate_data_encryption_key())", &[]), &SqlState::LOCK_NOT_AVAILABLE, "B: a second change meanwhile");
    assert!(asked.elapsed() < Duration::from_secs(10), "B waited {:?} instead of failing at once", asked.elapsed());
    eprintln!("the second administrator: {} ({:?})", e.message(), e.detail());
    ok(a.batch_execute("COMMIT"), "A: COMMIT");
    c.wait_reencrypted("app");
    assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status").trim(), "4");
    assert_eq!(c.psql("app", old).trim(), "0");
}

/// 6. Roles with the extension's names that someone else made beforehand (and may control)
/// are refused at CREATE EXTENSION; the roles the extension made itself are reused in the
/// cluster's other databases.
#[test]
fn create_extension_refuses_preexisting_roles_it_did_not_create() {
    let c = start("adv-roles", &[]);
    c.psql("postgres", "CREATE ROLE carol LOGIN CREATEROLE");
    c.createdb("app");
    let mut carol = c.connect_as(Transport::Unix, "postgres", "carol");
    // Up to PostgreSQL 15 a CREATEROLE role grants itself what it likes; from 16 its creator
    // holds ADMIN OPTION on a role it creates, and may not grant that to itself again.
    if c.server_major() <= 15 {
        ok(carol.batch_execute("CREATE ROLE data_encryption_admin; GRANT data_encryption_admin TO carol WITH ADMIN OPTION"), "carol's role");
    } else {
        ok(carol.batch_execute("CREATE ROLE data_encryption_admin"), "carol's role");
    }
    assert_eq!(
        c.psql("postgres", "SELECT bool_or(admin_option) FROM pg_auth_members WHERE roleid = 'data_encryption_admin'::regrole AND member = 'carol'::regrole").trim(),
        "t",
        "carol holds ADMIN OPTION on the role she made"
    );
    // CREATE EXTENSION with the default search_path (the pinned one would name pg_catalog).
    let mut su = c.connect(Transport::Unix, "app");
    let no_extension = "SELECT count(*) FROM pg_extension WHERE extname = 'pg_cellcrypt'";

    let e = refused(su.batch_execute("CREATE EXTENSION pg_cellcrypt"), &SqlState::DUPLICATE_OBJECT, "CREATE EXTENSION with carol's data_encryption_admin");
    assert!(!e.hint().unwrap_or("").trim().is_empty(), "a hint says what to do: {e:?}");
    eprintln!("pre-existing data_encryption_admin: {} (detail: {:?}, hint: {:?})", e.message(), e.detail(), e.hint());
    assert_eq!(one(&mut su, no_extension), "0");

    su.batch_execute("DROP ROLE data_encryption_admin").unwrap();
    ok(carol.batch_execute("CREATE ROLE data_encryption_reader LOGIN"), "carol's login role");
    let e = refused(su.batch_execute("CREATE EXTENSION pg_cellcrypt"), &SqlState::DUPLICATE_OBJECT, "CREATE EXTENSION with a LOGIN data_encryption_reader");
    assert!(!e.hint().unwrap_or("").trim().is_empty(), "a hint says what to do: {e:?}");
    assert_eq!(one(&mut su, no_extension), "0");

    su.batch_execute("DROP ROLE data_encryption_reader").unwrap();
    ok(su.batch_execute("CREATE EXTENSION pg_cellcrypt"), "CREATE EXTENSION once the roles are gone");
    assert_eq!(
        one(&mut su, "SELECT string_agg(rolname || ':' || rolcanlogin, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('data_encryption_admin', 'data_encryption_reader')"),
        "data_encryption_admin:false,data_encryption_reader:false"
    );
    assert_eq!(one(&mut su, "SELECT count(*) FROM pg_auth_members WHERE member = 'carol'::regrole"), "0", "carol is a member of nothing");
    c.createdb("second");
    let mut second = c.connect(Transport::Unix, "second");
    ok(second.batch_execute("CREATE EXTENSION pg_cellcrypt"), "CREATE EXTENSION in a second database, with the roles the extension made");
    assert_eq!(one(&mut second, "SELECT is_data_encryption_active()"), "t");
}

/// Waits for the next wall-clock minute when this one is past `latest` seconds.
fn early_in_a_minute(latest: u64) {
    let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60;
    if second > latest {
        std::thread::sleep(Duration::from_secs(61 - second));
    }
}

/// 7. A role flooding refused key calls cannot flood the audit record.
#[test]
fn the_audit_of_refused_calls_is_rate_bounded() {
    let c = start("adv-audit", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE ROLE nadia LOGIN");
    // A bound per wall-clock minute must not be met twice: start early in a minute.
    early_in_a_minute(50);
    let mut n = c.connect_as(Transport::Unix, "app", "nadia");
    let started = Instant::now();
    for i in 0..300 {
        refused(n.query_one("SELECT set_data_encryption_key('x')", &[]), &NOT_ALLOWED, &format!("refused call {i}"));
    }
    eprintln!("300 refused calls in {:?}", started.elapsed());
    let recorded: i64 = c.psql("app", "SELECT count(*) FROM data_encryption_audit WHERE outcome = 'refused'").trim().parse().unwrap();
    assert!((1..=61).contains(&recorded), "{recorded} refusals recorded for 300 refused calls (at most 60 a minute plus one line saying more were not recorded)");
}

/// The refusals of a role with no privileges each carry a hint naming the role to ask for.
fn assert_refusal_hints(c: &Cluster, what: &str) {
    c.database_with_extension("app");
    c.psql("app", "CREATE ROLE nemo LOGIN; CREATE TABLE t (id int, s encrypted_text); INSERT INTO t VALUES (1, 'x'); GRANT SELECT ON t TO nemo");
    let mut n = c.connect_as(Transport::Unix, "app", "nemo");
    for (sql, role) in [
        ("SELECT decrypt(s) FROM t", "data_encryption_reader"),
        ("SELECT s::text FROM t", "data_encryption_reader"),
        ("SELECT set_data_encryption_key(generate_data_encryption_key())", "data_encryption_admin"),
        ("SELECT * FROM data_encryption_status", "data_encryption_admin"),
        ("SELECT * FROM data_encryption_audit", "data_encryption_admin"),
        ("SELECT retrieve_data_encryption_key()", "data_encryption_admin"),
        ("SELECT rotate_blind_index_key()", "data_encryption_admin"),
        ("CALL finish_data_encryption_reencryption()", "data_encryption_admin"),
    ] {
        let e = refused(n.query(sql, &[]), &NOT_ALLOWED, &format!("{what}: {sql}"));
        assert!(e.hint().unwrap_or("").contains(role), "{what}: {sql}: the hint must name {role}: {} (hint: {:?})", e.message(), e.hint());
    }
}

/// A non-English UTF-8 locale of this machine for which PostgreSQL has a message catalog.
fn non_english_locale() -> Option<String> {
    let out = Command::new("locale").arg("-a").output().ok()?;
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut candidates: Vec<&str> = all
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            let lang = l.split(['_', '.', '@']).next().unwrap_or("");
            (lower.ends_with(".utf8") || lower.ends_with(".utf-8"))
                && !["c", "en", "posix"].contains(&lang.to_ascii_lowercase().as_str())
                && Path::new(&format!("/usr/share/locale/{lang}/LC_MESSAGES/postgres-15.mo")).exists()
        })
        .collect();
    candidates.sort_by_key(|l| !l.starts_with("de_"));
    candidates.first().map(|l| l.to_string())
}

/// 8. Refusals name the role to ask for in their hint, whatever the message language.
#[test]
fn refusal_hints_name_the_role_whatever_the_message_language() {
    let c = start("adv-hints", &[]);
    assert_refusal_hints(&c, "default lc_messages");
    drop(c);
    match non_english_locale() {
        Some(locale) => {
            let c = start("adv-hints-l10n", &[&format!("lc_messages = '{locale}'")]);
            assert_refusal_hints(&c, &format!("lc_messages = '{locale}'"));
        }
        None => eprintln!(
            "note: no non-English UTF-8 locale with a PostgreSQL message catalog on this machine (locale -a); the translated-messages part of this test was skipped"
        ),
    }
}

/// A value given as the envelope bytes of an `encrypted_text` bind parameter in binary format
/// (the binary magic, then the envelope), as a driver would send a value it read in binary.
#[derive(Debug)]
struct Envelope(Vec<u8>);

impl postgres::types::ToSql for Envelope {
    fn to_sql(&self, _: &postgres::types::Type, out: &mut postgres::types::private::BytesMut) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(b"\xCC\xCCcc");
        out.extend_from_slice(&self.0);
        Ok(postgres::types::IsNull::No)
    }
    fn accepts(ty: &postgres::types::Type) -> bool {
        ty.name() == "encrypted_text"
    }
    postgres::types::to_sql_checked!();
}

/// The ids of the rows of `people` whose `column` has the blind index `value` would have there.
fn find(client: &mut Client, column: &str, value: &str) -> String {
    one(client, &format!("SELECT string_agg(id::text, ',' ORDER BY id) FROM people WHERE blind_index({column}) = blind_index('{value}', 'people', '{column}')"))
}

/// Every lookup of `expected` (column, value looked up, ids found) through `client`.
fn assert_found(client: &mut Client, expected: &[(&str, &str, &str)], when: &str) {
    for (column, value, ids) in expected {
        assert_eq!(find(client, column, value), *ids, "{when}: the lookup of {value:?} in {column}");
    }
}

/// Tom's second table, for a blind index: an ALWAYS and an ordinary trigger, an expression
/// index, a CHECK constraint and a row level security policy, all calling his functions (those
/// of [`TOM_OBJECTS`], which must exist).
const TOM_BLIND_TABLE: &str = r#"
CREATE TABLE public.u (
    id integer PRIMARY KEY,
    s encrypted_text,
    s2 encrypted_text,
    n integer CONSTRAINT u_check CHECK (public.tom_check(n))
);
CREATE INDEX u_expression ON public.u (public.tom_index(s));
CREATE INDEX u_expression2 ON public.u (public.tom_index(s2));
CREATE TRIGGER u_always BEFORE INSERT OR UPDATE ON public.u FOR EACH ROW EXECUTE FUNCTION public.tom_trigger();
CREATE TRIGGER u_ordinary BEFORE INSERT OR UPDATE ON public.u FOR EACH ROW EXECUTE FUNCTION public.tom_trigger();
ALTER TABLE public.u ENABLE ALWAYS TRIGGER u_always;
INSERT INTO public.u SELECT g, 'tom value ' || g, 'Tom Other ' || g, g FROM generate_series(1, 150) g;
ALTER TABLE public.u ENABLE ROW LEVEL SECURITY;
CREATE POLICY u_policy ON public.u USING (public.tom_policy(id));
"#;

/// 9. Blind indexes exist only for the columns an administrator registered. A value gets one
/// only by being written to such a column as plaintext, or copied there by a role that may
/// decrypt it: an ordinary role cannot give a blind index to a value it cannot decrypt, nor
/// link equal values of two registered columns. The bindings survive a key change, an index
/// key rotation and a dump restored in another cluster; and a hostile table owner gains
/// nothing from an administrator registering his column.
#[test]
fn blind_indexes_exist_only_for_registered_columns() {
    let c = start("adv-bidx", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE ROLE wendy LOGIN; CREATE ROLE rhea LOGIN IN ROLE data_encryption_reader; \
         CREATE TABLE people (id int PRIMARY KEY, email encrypted_text, backup encrypted_text, ssn encrypted_text); \
         INSERT INTO people SELECT g, 'User' || g || '@Example.com', 'user' || g || '@example.com', 'ssn-' || g FROM generate_series(1, 100) g; \
         GRANT SELECT, INSERT, UPDATE ON people TO wendy, rhea",
    );
    let mut su = superuser(&c, "app");
    let msg = one(&mut su, "SELECT public.register_blind_index('people', 'email', 'lower_trim')");
    assert_eq!(
        msg,
        "registered: public.people.email is blind-index column 1 (lower_trim); 100 values bound. Index it with CREATE INDEX ON public.people (blind_index(email));"
    );
    let msg = one(&mut su, "SELECT public.register_blind_index('people', 'backup', 'lower_trim')");
    assert!(msg.starts_with("registered: public.people.backup is blind-index column 2 (lower_trim); 100 values bound."), "{msg}");
    ok(
        su.batch_execute("CREATE INDEX people_email_bidx ON people (public.blind_index(email)); CREATE INDEX people_backup_bidx ON people (public.blind_index(backup))"),
        "the blind indexes",
    );
    let types = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'public.people'::regclass AND attnum > 0";
    assert_eq!(one(&mut su, types), "id integer, email encrypted_text(1), backup encrypted_text(2), ssn encrypted_text");

    // Wendy may read and write the table, but not decrypt.
    let mut w = session(&c, "app", "wendy", "public, pg_catalog");
    refused(w.query("SELECT decrypt(ssn) FROM people WHERE id = 1", &[]), &NOT_ALLOWED, "wendy: decrypt");
    // No blind index for a column that is not registered, nor for a value copied out of one.
    for sql in [
        "SELECT blind_index(ssn) FROM people WHERE id = 1",
        "SELECT blind_index(x) FROM (SELECT ssn AS x FROM people WHERE id = 1) s",
        "SELECT blind_index(ssn) = blind_index('ssn-1', 'people', 'email') FROM people WHERE id = 1",
    ] {
        let e = refused(w.query(sql, &[]), &NOT_ALLOWED, &format!("wendy: {sql}"));
        assert_eq!(e.message(), "permission denied to compute the blind index of a value from a column not registered for a blind index", "{sql}");
    }
    refused(w.query("SELECT blind_index('ssn-1', 'people', 'ssn')", &[]), &NOT_ALLOWED, "wendy: a lookup on the unregistered column");
    // Nor by copying an envelope into a registered column (from an unregistered one, or from
    // the other registered one), however it is sent.
    let copy_denied = "permission denied to copy an encrypted value into a column with a blind index";
    let ssn_text = one(&mut w, "SELECT format('%s', ssn) FROM people WHERE id = 4");
    assert!(ssn_text.starts_with("$cc$"), "{ssn_text}");
    let ssn_bytes: Vec<u8> = ok(w.query_one("SELECT decode(substr(format('%s', ssn), 5), 'base64') FROM people WHERE id = 5", &[]), "wendy: an envelope's bytes").get(0);
    for sql in [
        "INSERT INTO people (id, email) SELECT 1000, ssn FROM people WHERE id = 1".to_owned(),
        "UPDATE people SET email = ssn WHERE id = 2".to_owned(),
        "UPDATE people SET backup = email WHERE id = 3".to_owned(),
        "INSERT INTO people (id, backup) SELECT 1001, email FROM people WHERE id = 3".to_owned(),
        format!("INSERT INTO people (id, email) VALUES (1002, '{ssn_text}')"),
        format!("UPDATE people SET email = '{ssn_text}'::encrypted_text WHERE id = 4"),
        "SELECT blind_index(ssn::encrypted_text(1)) FROM people WHERE id = 1".to_owned(),
    ] {
        let e = refused(w.execute(sql.as_str(), &[]), &NOT_ALLOWED, &format!("wendy: {sql}"));
        assert_eq!(e.message(), copy_denied, "{sql}");
    }
    let e = refused(w.execute("UPDATE people SET email = $1 WHERE id = 5", &[&Envelope(ssn_bytes)]), &NOT_ALLOWED, "wendy: an envelope as a binary parameter");
    assert_eq!(e.message(), copy_denied);
    assert_eq!(one(&mut su, "SELECT count(*) FROM public.people WHERE id >= 1000"), "0");
    assert_eq!(
        one(&mut su, "SELECT string_agg(id::text, ',' ORDER BY id) FROM public.people WHERE id <= 5 AND public.decrypt(email) = 'User' || id || '@Example.com' AND public.decrypt(backup) = 'user' || id || '@example.com'"),
        "1,2,3,4,5",
        "the refused copies changed nothing"
    );

    // Plaintext she writes to a registered column is bound to it, however it is sent, and
    // found by its blind index.
    ok(w.batch_execute("INSERT INTO people (id, email, backup) VALUES (201, ' Literal@Example.com', 'literal@example.com')"), "wendy: a literal");
    ok(w.execute("INSERT INTO people (id, email) VALUES ($1, $2::text)", &[&202i32, &"Param@Example.com"]), "wendy: a text parameter");
    let typed = ok(w.prepare_typed("INSERT INTO people (id, email) VALUES ($1, $2)", &[postgres::types::Type::INT4, postgres::types::Type::TEXT]), "prepare");
    ok(w.execute(&typed, &[&203i32, &"typed@example.com"]), "wendy: a parameter declared text");
    let varchar = ok(w.prepare_typed("INSERT INTO people (id, email) VALUES ($1, $2)", &[postgres::types::Type::INT4, postgres::types::Type::VARCHAR]), "prepare");
    ok(w.execute(&varchar, &[&204i32, &"varchar@example.com"]), "wendy: a varchar parameter");
    {
        use std::io::Write;
        let mut copy = ok(w.copy_in("COPY people (id, email, backup) FROM STDIN"), "wendy: COPY FROM STDIN");
        copy.write_all(b"205\tcopied@example.com\tcopied@example.com\n206\tCopied2@Example.com\t\\N\n").unwrap();
        assert_eq!(ok(copy.finish(), "wendy: COPY FROM STDIN"), 2);
    }
    ok(w.batch_execute("UPDATE people SET email = 'updated@example.com' WHERE id = 6"), "wendy: an UPDATE of plaintext");
    let mut expected: Vec<(&str, &str, &str)> = vec![
        ("email", "user7@example.com", "7"),
        ("email", " USER99@EXAMPLE.COM ", "99"),
        ("backup", "User8@Example.com", "8"),
        ("email", "literal@example.com", "201"),
        ("backup", "LITERAL@example.com", "201"),
        ("email", "param@example.com", "202"),
        ("email", "typed@example.com", "203"),
        ("email", "varchar@example.com", "204"),
        ("email", "copied@example.com", "205"),
        ("backup", "copied@example.com", "205"),
        ("email", "copied2@example.com", "206"),
        ("email", "updated@example.com", "6"),
    ];
    assert_found(&mut w, &expected, "wendy's writes");
    assert_eq!(find(&mut w, "email", "user6@example.com"), "NULL", "the updated row no longer matches its old value");

    // Equal plaintexts in two registered columns have different blind indexes: each column
    // hashes under its own key.
    assert_eq!(one(&mut w, "SELECT bool_or(blind_index(email) = blind_index(backup)) FROM people WHERE id <= 100"), "f");
    assert_eq!(
        one(&mut w, "SELECT blind_index('user10@example.com', 'people', 'email') = blind_index('user10@example.com', 'people', 'backup')"),
        "f"
    );
    assert_eq!(one(&mut w, "SELECT count(*) FROM people p JOIN people q ON blind_index(p.email) = blind_index(q.backup)"), "0");

    // A reader and a superuser may copy: the copy is bound to the column, and found.
    let mut r = session(&c, "app", "rhea", "public, pg_catalog");
    ok(r.batch_execute("UPDATE people SET email = ssn WHERE id = 20"), "rhea: copying into a registered column");
    ok(su.batch_execute("INSERT INTO public.people (id, email) SELECT 300, ssn FROM public.people WHERE id = 30; UPDATE public.people SET backup = ssn WHERE id = 31"), "the superuser: copying");
    ok(su.batch_execute("UPDATE public.people SET backup = email WHERE id = 32"), "the superuser: copying between registered columns");
    expected.extend([("email", "ssn-20", "20"), ("email", "SSN-30", "300"), ("backup", "ssn-31", "31"), ("backup", "user32@example.com", "32")]);
    assert_found(&mut w, &expected, "after the copies of a reader and a superuser");
    refused(w.query("SELECT blind_index(ssn) FROM people WHERE id = 30", &[]), &NOT_ALLOWED, "wendy: the copied value's source is still unregistered");

    // A data key change (every value re-encrypted) and an index key rotation (every blind
    // index rebuilt): the bindings and the lookups hold.
    assert!(one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())").starts_with("changed"));
    c.wait_reencrypted("app");
    assert_eq!(one(&mut su, "SELECT count(*) FROM public.people WHERE public.encryption_key_version(email) <> 2 OR public.encryption_key_version(backup) <> 2"), "0");
    assert_found(&mut w, &expected, "after the data key change");
    let msg = one(&mut su, "SELECT public.rotate_blind_index_key()");
    assert!(msg.starts_with("rotated") && msg.contains("2 indexes rebuilt"), "{msg}");
    assert_found(&mut w, &expected, "after the index key rotation");
    refused(w.query("SELECT blind_index(ssn) FROM people WHERE id = 1", &[]), &NOT_ALLOWED, "wendy: an unregistered column, after the key changes");
    let e = refused(w.execute("UPDATE people SET email = ssn WHERE id = 2", &[]), &NOT_ALLOWED, "wendy: copying, after the key changes");
    assert_eq!(e.message(), copy_denied);
    let ins = ok(w.execute("INSERT INTO people (id, email) VALUES ($1, $2::text)", &[&207i32, &"after@example.com"]), "wendy: a write after the key changes");
    assert_eq!(ins, 1);
    expected.push(("email", "after@example.com", "207"));
    assert_found(&mut w, &expected, "a write after the key changes");

    // A dump restored in another cluster, in the documented steps (pre-data and data, the key,
    // then post-data, where the indexes are built): the columns stay registered and bound.
    let key = one(&mut su, "SELECT public.retrieve_data_encryption_key()");
    let registrations = "SELECT string_agg(concat_ws('|', id, table_name, column_name, normalization, created_at, created_by), E'\\n' ORDER BY id) FROM public.blind_index_columns";
    let source_registrations = one(&mut su, registrations);
    let b = start("adv-bidx-restore", &[]);
    b.psql("postgres", "CREATE ROLE wendy LOGIN; CREATE ROLE rhea LOGIN");
    b.createdb("restored");
    let pre = b.dir.join("pre.sql");
    let post = b.dir.join("post.sql");
    std::fs::write(&pre, c.pg_dump("app", &["--section=pre-data", "--section=data"])).unwrap();
    std::fs::write(&post, c.pg_dump("app", &["--section=post-data"])).unwrap();
    b.psql_file("restored", &pre);
    assert_eq!(b.psql("restored", "SELECT is_data_encryption_active()").trim(), "f");
    assert!(b.psql("restored", &format!("SELECT set_data_encryption_key('{key}')")).starts_with("restored"));
    b.psql_file("restored", &post);
    let mut bsu = superuser(&b, "restored");
    assert_eq!(one(&mut bsu, types), "id integer, email encrypted_text(1), backup encrypted_text(2), ssn encrypted_text");
    assert_eq!(one(&mut bsu, registrations), source_registrations, "the registrations were restored");
    let mut bw = session(&b, "restored", "wendy", "public, pg_catalog");
    assert_found(&mut bw, &expected, "in the restored database");
    ok(bw.batch_execute("SET enable_seqscan = off"), "enable_seqscan");
    let plan = rows(&mut bw, "EXPLAIN SELECT id FROM people WHERE blind_index(email) = blind_index('user7@example.com', 'people', 'email')");
    assert!(plan.contains("people_email_bidx"), "{plan}");
    assert_found(&mut bw, &expected, "in the restored database, through the restored indexes");
    refused(bw.query("SELECT blind_index(ssn) FROM people WHERE id = 1", &[]), &NOT_ALLOWED, "wendy, restored: an unregistered column");
    let e = refused(bw.execute("UPDATE people SET backup = ssn WHERE id = 2", &[]), &NOT_ALLOWED, "wendy, restored: copying");
    assert_eq!(e.message(), copy_denied);
    let msg = one(&mut bsu, "SELECT public.register_blind_index('people', 'ssn')");
    assert!(msg.starts_with("registered: public.people.ssn is blind-index column 3 (exact);"), "a new registration after the restore takes a new id: {msg}");
    assert_eq!(one(&mut bw, "SELECT id FROM people WHERE blind_index(ssn) = blind_index('ssn-42', 'people', 'ssn')"), "42");
    drop((bw, bsu, b));

    // A hostile table owner: tom's code runs when his column is registered (by a superuser,
    // then by an administrator who is not one: registering a column that holds values also
    // takes the reader role), and only as tom; every value is bound.
    c.psql("postgres", "CREATE ROLE tom LOGIN; CREATE ROLE ada LOGIN IN ROLE data_encryption_admin, data_encryption_reader");
    toms_database(&c, "toms");
    {
        let mut tom = c.connect_as(Transport::Unix, "toms", "tom");
        ok(tom.batch_execute(TOM_BLIND_TABLE), "tom's second table");
    }
    let mut su = superuser(&c, "toms");
    let base = Baseline::take(&mut su);
    let mut tom = c.connect_as(Transport::Unix, "toms", "tom");
    refused(tom.query("SELECT register_blind_index('public.u', 's')", &[]), &NOT_ALLOWED, "tom: registering his own column");
    let msg = one(&mut su, "SELECT public.register_blind_index('public.u', 's')");
    assert!(msg.starts_with("registered: public.u.s is blind-index column 1 (exact); 150 values bound."), "{msg}");
    base.check(&c, &mut su, &["tom"], "after a superuser registered tom's column");
    let mut ada = c.connect_as(Transport::Unix, "toms", "ada");
    let msg = ok(try_rows(&mut ada, "SELECT register_blind_index('public.u', 's2', 'lower')"), "ada: register_blind_index");
    assert!(msg.starts_with("registered: public.u.s2 is blind-index column 2 (lower); 150 values bound."), "{msg}");
    base.check(&c, &mut su, &["tom"], "after an administrator registered tom's column");
    assert_eq!(one(&mut su, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'tom'"), "f");
    assert_eq!(one(&mut su, "SELECT count(*) FROM pg_catalog.pg_auth_members WHERE member = 'tom'::pg_catalog.regrole"), "0");
    eprintln!("registration: tom's code ran as: {}", rows(&mut su, "SELECT who || ' ' || at || ' x' || count(*) FROM public.escalation_log GROUP BY who, at ORDER BY 1").replace('\n', "; "));
    // Every value the columns held was bound: tom (no reader) finds each by its blind index.
    assert_eq!(
        one(&mut tom, "SELECT count(*) FROM public.u WHERE public.blind_index(s) = public.blind_index('tom value ' || id, 'public.u', 's') AND public.blind_index(s2) = public.blind_index('TOM OTHER ' || id, 'public.u', 's2')"),
        "150"
    );
    assert_eq!(one(&mut tom, "SELECT id FROM public.u WHERE public.blind_index(s) = public.blind_index('tom value 77', 'public.u', 's')"), "77");
    // And his triggers and index gave him no way to copy values into the columns.
    let e = refused(tom.execute("UPDATE public.u SET s = (SELECT t.s FROM public.t WHERE t.id = 1) WHERE id = 1", &[]), &NOT_ALLOWED, "tom: copying into his registered column");
    assert_eq!(e.message(), copy_denied);
    refused(tom.execute("UPDATE public.u SET s = s2 WHERE id = 2", &[]), &NOT_ALLOWED, "tom: copying between his registered columns");
    base.check(&c, &mut su, &["tom"], "at the end");
}

/// Tom's look-alikes (after his probe, [`tom_probe_sql`]) of what an install script, a
/// procedure or a view may call unqualified: `format` (whose `VARIADIC "any"` loses to an
/// exact match of any schema), operators whose argument types have no exact match in
/// pg_catalog, and some that have one (harmless only while pg_catalog comes first). Each runs
/// `public.tom_probe()`, then does what pg_catalog's does; every name in their bodies is
/// qualified.
const INSTALL_LOOKALIKES: &str = concat!(
    tom_probe_sql!(),
    r#"
CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('format(text,text)'); RETURN pg_catalog.format($1, $2); END $f$;
CREATE FUNCTION public.format(text, text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('format(text,text,text)'); RETURN pg_catalog.format($1, $2, $3); END $f$;
CREATE FUNCTION public.format(text, text, text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('format(text,text,text,text)'); RETURN pg_catalog.format($1, $2, $3, $4); END $f$;
CREATE FUNCTION public.format(text, text, text, text, text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('format(text,text,text,text,text,text)'); RETURN pg_catalog.format($1, $2, $3, $4, $5, $6); END $f$;
CREATE FUNCTION public.tom_textcat(text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('||(text,text)'); RETURN $1 OPERATOR(pg_catalog.||) $2; END $f$;
CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.tom_textcat);
CREATE FUNCTION public.tom_mul_real(real, integer) RETURNS real LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('*(real,integer)'); RETURN $1 OPERATOR(pg_catalog.*) $2::pg_catalog.float4; END $f$;
CREATE OPERATOR public.* (LEFTARG = real, RIGHTARG = integer, FUNCTION = public.tom_mul_real);
CREATE FUNCTION public.tom_mul_double(double precision, integer) RETURNS double precision LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('*(double precision,integer)'); RETURN $1 OPERATOR(pg_catalog.*) $2::pg_catalog.float8; END $f$;
CREATE OPERATOR public.* (LEFTARG = double precision, RIGHTARG = integer, FUNCTION = public.tom_mul_double);
CREATE FUNCTION public.tom_mod(bigint, integer) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('%(bigint,integer)'); RETURN $1 OPERATOR(pg_catalog.%) $2::pg_catalog.int8; END $f$;
CREATE OPERATOR public.% (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = public.tom_mod);
CREATE FUNCTION public.tom_text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('=(text,text)'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.tom_text_eq);
CREATE FUNCTION public.tom_int_gt(integer, integer) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('>(integer,integer)'); RETURN $1 OPERATOR(pg_catalog.>) $2; END $f$;
CREATE OPERATOR public.> (LEFTARG = integer, RIGHTARG = integer, FUNCTION = public.tom_int_gt);
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.tom_probe('now()'); RETURN pg_catalog.now(); END $f$;
"#
);

/// What tom's probes recorded as run by someone other than tom (escalation log and server
/// log), empty when nothing was.
fn not_run_by_tom(c: &Cluster, su: &mut Client) -> String {
    let logged = rows(su, "SELECT who || ' via ' || at || ' x' || count(*) FROM public.escalation_log WHERE who <> 'tom' GROUP BY who, at ORDER BY 1");
    let warnings = probes(c);
    if logged.is_empty() && warnings.is_empty() {
        String::new()
    } else {
        format!("escalation log:\n{logged}server log: {} probe warnings, as {:?}", warnings.len(), warnings.iter().collect::<std::collections::BTreeSet<_>>())
    }
}

/// 10. CREATE EXTENSION, as a superuser types it (default search_path), in a database owned by
/// an ordinary role who planted look-alikes in its public schema: none of his code runs, not
/// in the install script, nor later in the extension's procedure and views called by a
/// (non-superuser) administrator and a superuser with their default search_path.
#[test]
fn create_extension_in_a_hostile_owners_database_runs_none_of_his_code() {
    let c = start("adv-install", &[]);
    c.psql("postgres", "CREATE ROLE tom LOGIN");
    c.psql("postgres", "CREATE DATABASE z OWNER tom");
    c.psql("z", LOG_TABLE);
    {
        let mut tom = c.connect_as(Transport::Unix, "z", "tom");
        assert_eq!(one(&mut tom, "SHOW search_path"), "\"$user\", public");
        ok(tom.batch_execute(INSTALL_LOOKALIKES), "tom's look-alikes");
        // On the default search_path, they win where pg_catalog has no exact match.
        ok(tom.batch_execute("SELECT format('%s', 'a'::text), format('%s%s', 'a'::text, 'b'::text), 7::bigint % 3, 1.5::real * 2, 1.5::float8 * 2"), "tom calling his look-alikes");
    }
    let mut su = superuser(&c, "z");
    let mut shadowing: Vec<String> = rows(&mut su, "SELECT DISTINCT at FROM public.escalation_log WHERE who = 'tom'").lines().map(str::to_owned).collect();
    shadowing.sort();
    assert_eq!(shadowing, ["%(bigint,integer)", "*(double precision,integer)", "*(real,integer)", "format(text,text)", "format(text,text,text)"], "tom's look-alikes must shadow pg_catalog's");
    let tom_role = "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication FROM pg_catalog.pg_roles WHERE rolname = 'tom'";
    let tom_before = one(&mut su, tom_role);
    let members_before = rows(&mut su, MEMBERS);

    let mut installer = c.connect(Transport::Unix, "z");
    assert_eq!(one(&mut installer, "SHOW search_path"), "\"$user\", public");
    ok(installer.batch_execute("CREATE EXTENSION pg_cellcrypt"), "CREATE EXTENSION in tom's database");
    let ran = not_run_by_tom(&c, &mut su);
    assert_eq!(one(&mut su, tom_role), tom_before, "CREATE EXTENSION changed tom's attributes; tom's code ran as:\n{ran}");
    assert_eq!(rows(&mut su, MEMBERS), members_before, "CREATE EXTENSION changed role memberships; tom's code ran as:\n{ran}");
    assert!(ran.is_empty(), "tom's code ran during CREATE EXTENSION:\n{ran}");

    // Tom's table with encrypted columns, an administrator who is not a superuser, and a
    // worker slowed to one small batch a minute, so that the procedure does the work.
    c.psql("postgres", "CREATE ROLE adam LOGIN IN ROLE data_encryption_admin");
    {
        let mut tom = c.connect_as(Transport::Unix, "z", "tom");
        ok(
            tom.batch_execute(
                "CREATE TABLE public.tt (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb); \
                 INSERT INTO public.tt SELECT g, 'value ' || g, jsonb_build_object('g', g) FROM generate_series(1, 300) g",
            ),
            "tom's table",
        );
    }
    for setting in ["ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = '60s'", "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 10", "SELECT pg_reload_conf()"] {
        su.batch_execute(setting).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let base = Baseline::take(&mut su);
    let digest_sql = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s) || '/' || public.decrypt(j)::text, ',' ORDER BY id)) FROM public.tt";
    let digest = one(&mut su, digest_sql);
    assert!(digest.starts_with("300:"), "{digest}");

    let msg = one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())");
    assert!(msg.starts_with("changed"), "{msg}");
    base.check(&c, &mut su, &["tom"], "after the key change");
    let mut adam = c.connect_as(Transport::Unix, "z", "adam");
    assert_eq!(one(&mut adam, "SHOW search_path"), "\"$user\", public");
    let progress = ok(try_rows(&mut adam, "SELECT * FROM data_encryption_progress"), "adam: data_encryption_progress");
    assert!(progress.contains("tt|2|pending"), "a job under way: {progress}");
    base.check(&c, &mut su, &["tom"], "after adam's SELECT * FROM data_encryption_progress");
    ok(try_rows(&mut installer, "SELECT * FROM data_encryption_progress"), "the superuser: data_encryption_progress");
    base.check(&c, &mut su, &["tom"], "after the superuser's SELECT * FROM data_encryption_progress");
    ok(adam.batch_execute("CALL finish_data_encryption_reencryption()"), "adam: CALL finish_data_encryption_reencryption()");
    base.check(&c, &mut su, &["tom"], "after adam's CALL finish_data_encryption_reencryption()");
    ok(try_rows(&mut adam, "SELECT * FROM data_encryption_progress"), "adam: data_encryption_progress, afterwards");
    base.check(&c, &mut su, &["tom"], "after adam's second SELECT * FROM data_encryption_progress");

    c.wait_reencrypted("z");
    assert_eq!(one(&mut su, "SELECT count(*) FROM public.tt WHERE public.encryption_key_version(s) <> 2 OR public.encryption_key_version(j) <> 2"), "0");
    assert_eq!(one(&mut su, digest_sql), digest, "every value reads back as before");
    assert_eq!(one(&mut su, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'tom'"), "f");
    let ran = not_run_by_tom(&c, &mut su);
    assert!(ran.is_empty(), "tom's code ran as someone else:\n{ran}");
    base.check(&c, &mut su, &["tom"], "at the end");
}

/// 11. Registering a column that holds values binds every one of them to a blind index, so it
/// takes the right to decrypt them: an administrator who is not a reader may register only an
/// empty column. Otherwise a table owner could copy envelopes he cannot read into his own
/// column and have it registered, then test guesses against them.
#[test]
fn registering_a_column_that_holds_values_takes_a_reader() {
    let c = start("adv-bidx-nonempty", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE ROLE tom LOGIN; CREATE ROLE ada LOGIN IN ROLE data_encryption_admin; \
         CREATE ROLE rena LOGIN IN ROLE data_encryption_admin, data_encryption_reader; \
         GRANT CREATE ON SCHEMA public TO tom; \
         CREATE TABLE public.hr (id int PRIMARY KEY, ssn encrypted_text); \
         INSERT INTO public.hr SELECT g, 'ssn-' || g FROM generate_series(1, 50) g; GRANT SELECT ON public.hr TO tom",
    );
    let mut tom = c.connect_as(Transport::Unix, "app", "tom");
    ok(
        tom.batch_execute(
            "CREATE TABLE public.tomt (id int, email encrypted_text); INSERT INTO public.tomt SELECT id, ssn FROM public.hr; \
             CREATE TABLE public.tom_empty (id int, email encrypted_text)",
        ),
        "tom's tables, one holding copies of hr.ssn",
    );
    refused(tom.query("SELECT blind_index(email) FROM tomt", &[]), &NOT_ALLOWED, "tom: blind_index of his copies");
    let mut su = superuser(&c, "app");
    let types = "SELECT string_agg(attrelid::regclass || '.' || attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attrelid::regclass::text) \
                 FROM pg_attribute WHERE attrelid IN ('public.tomt'::regclass, 'public.hr'::regclass) AND attname IN ('email', 'ssn')";
    let types_before = one(&mut su, types);

    let mut ada = c.connect_as(Transport::Unix, "app", "ada");
    let e = refused(try_rows(&mut ada, "SELECT register_blind_index('tomt', 'email')"), &NOT_ALLOWED, "ada (an administrator, not a reader): registering tom's column of copied values");
    assert!(e.hint().unwrap_or("").contains("data_encryption_reader"), "the hint names data_encryption_reader: {} (hint: {:?})", e.message(), e.hint());
    assert_eq!(one(&mut su, types), types_before, "the refused registration changed nothing");
    assert_eq!(one(&mut su, "SELECT count(*) FROM public.blind_index_columns"), "0");
    // So tom has no oracle for the values he copied.
    refused(tom.query("SELECT blind_index(email) FROM tomt", &[]), &NOT_ALLOWED, "tom: blind_index of his copies, after the refusal");
    refused(tom.query("SELECT blind_index('ssn-7', 'tomt', 'email')", &[]), &NOT_ALLOWED, "tom: a guess, after the refusal");

    // An empty column she may register; a reader-administrator may register one with values.
    let msg = ok(try_rows(&mut ada, "SELECT register_blind_index('tom_empty', 'email')"), "ada: registering an empty column");
    assert!(msg.starts_with("registered: public.tom_empty.email is blind-index column") && msg.contains("; 0 values bound."), "{msg}");
    let mut rena = c.connect_as(Transport::Unix, "app", "rena");
    let msg = ok(try_rows(&mut rena, "SELECT register_blind_index('hr', 'ssn')"), "rena (administrator and reader): registering hr.ssn");
    assert!(msg.contains("; 50 values bound."), "{msg}");
    assert_eq!(one(&mut su, "SELECT id FROM public.hr WHERE public.blind_index(ssn) = public.blind_index('ssn-7', 'public.hr', 'ssn')"), "7");
    // Tom's copies stay unbound.
    refused(tom.query("SELECT blind_index(email) FROM tomt", &[]), &NOT_ALLOWED, "tom: blind_index of his copies, hr.ssn registered");
}

/// 12a. A registered column's type changes for a whole inheritance tree at once and its
/// values are rewritten by ctid, so registration is refused, with nothing changed, for a
/// table with inheritance children, an inheritance child and a partition.
#[test]
fn register_blind_index_refuses_inheritance_and_partition_trees() {
    let c = start("adv-bidx-inherit", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE par (id int, c encrypted_text); CREATE TABLE kid () INHERITS (par); \
         INSERT INTO par SELECT g, 'parent ' || g FROM generate_series(1, 20) g; \
         INSERT INTO kid SELECT g, 'child ' || g FROM generate_series(1, 20) g; \
         CREATE TABLE pt (id int, c encrypted_text) PARTITION BY RANGE (id); \
         CREATE TABLE pt_1 PARTITION OF pt FOR VALUES FROM (0) TO (100); \
         INSERT INTO pt SELECT g, 'partition ' || g FROM generate_series(1, 20) g",
    );
    let mut su = superuser(&c, "app");
    let values = "SELECT string_agg(tableoid::regclass || ':' || id || ':' || public.decrypt(c), ',' ORDER BY tableoid::regclass::text, id) FROM \
                  (SELECT tableoid, id, c FROM public.par UNION ALL SELECT tableoid, id, c FROM public.pt) v";
    let types = "SELECT string_agg(attrelid::regclass || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attrelid::regclass::text) \
                 FROM pg_attribute WHERE attrelid IN ('public.par'::regclass, 'public.kid'::regclass, 'public.pt'::regclass, 'public.pt_1'::regclass) AND attname = 'c'";
    let (values_before, types_before) = (one(&mut su, values), one(&mut su, types));
    let mut failures = Vec::new();
    for (table, what) in [("par", "a table with an inheritance child"), ("kid", "an inheritance child"), ("pt_1", "a partition")] {
        match try_rows(&mut su, &format!("SELECT public.register_blind_index('{table}', 'c')")) {
            Ok(out) => failures.push(format!("{what} ({table}): registered: {}", out.trim_end())),
            Err(e) if e.as_db_error().map(|d| d.code()) == Some(&SqlState::FEATURE_NOT_SUPPORTED) => {}
            Err(e) => failures.push(format!("{what} ({table}): expected 0A000, got {}", describe(&e))),
        }
    }
    let (values_after, types_after) = (one(&mut su, values), one(&mut su, types));
    if values_after != values_before {
        failures.push(format!("values changed:\nbefore: {values_before}\nafter:  {values_after}"));
    }
    if types_after != types_before {
        failures.push(format!("column types changed: before: {types_before}; after: {types_after}"));
    }
    let parent_one = one(&mut su, "SELECT public.decrypt(c) FROM ONLY public.par WHERE id = 1");
    let child_one = one(&mut su, "SELECT public.decrypt(c) FROM public.kid WHERE id = 1");
    if (parent_one.as_str(), child_one.as_str()) != ("parent 1", "child 1") {
        failures.push(format!("row 1 of par holds {parent_one:?}, row 1 of kid holds {child_one:?}"));
    }
    let registered = one(&mut su, "SELECT count(*) FROM public.blind_index_columns");
    if registered != "0" {
        failures.push(format!("{registered} registrations recorded"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// 12b. Re-encryption of an inheritance tree whose child has another owner than its parent:
/// each table is rewritten as its own owner (the parent's rewrite does not reach the child's
/// rows), and every value reads back as before, in its own table.
#[test]
fn reencryption_of_an_inheritance_tree_runs_each_table_as_its_own_owner() {
    let c = start("adv-inherit-owners", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        &format!(
            "{LOG_TABLE} CREATE ROLE tom LOGIN; CREATE ROLE tina LOGIN; \
             CREATE FUNCTION public.who_probe() RETURNS trigger LANGUAGE plpgsql AS $f$ \
             BEGIN INSERT INTO public.escalation_log (who, at) VALUES (current_user, TG_TABLE_NAME); RETURN NEW; END $f$; \
             CREATE TABLE public.tp (id int, s encrypted_text); CREATE TABLE public.tc () INHERITS (public.tp); \
             INSERT INTO public.tp SELECT g, 'parent ' || g FROM generate_series(1, 200) g; \
             INSERT INTO public.tc SELECT g, 'child ' || g FROM generate_series(1, 200) g; \
             CREATE TRIGGER tp_always BEFORE UPDATE ON public.tp FOR EACH ROW EXECUTE FUNCTION public.who_probe(); \
             CREATE TRIGGER tc_always BEFORE UPDATE ON public.tc FOR EACH ROW EXECUTE FUNCTION public.who_probe(); \
             ALTER TABLE public.tp ENABLE ALWAYS TRIGGER tp_always; ALTER TABLE public.tc ENABLE ALWAYS TRIGGER tc_always; \
             ALTER TABLE public.tp OWNER TO tom; ALTER TABLE public.tc OWNER TO tina"
        ),
    );
    let mut su = superuser(&c, "app");
    let parent_digest = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s), ',' ORDER BY id)) FROM ONLY public.tp";
    let child_digest = "SELECT count(*) || ':' || md5(string_agg(public.decrypt(s), ',' ORDER BY id)) FROM public.tc";
    let (parent_before, child_before) = (one(&mut su, parent_digest), one(&mut su, child_digest));
    assert!(parent_before.starts_with("200:") && child_before.starts_with("200:"), "{parent_before} {child_before}");

    assert!(one(&mut su, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())").starts_with("changed"));
    c.wait_reencrypted("app");
    let ran_as = |su: &mut Client, table: &str| one(su, &format!("SELECT coalesce(string_agg(DISTINCT who, ','), 'nobody') FROM public.escalation_log WHERE at = '{table}'"));
    let (parent_ran_as, child_ran_as) = (ran_as(&mut su, "tp"), ran_as(&mut su, "tc"));
    assert_eq!(
        (parent_ran_as.as_str(), child_ran_as.as_str()),
        ("tom", "tina"),
        "the ALWAYS triggers of the parent (tom's) and of the child (tina's) ran as these roles"
    );
    assert_eq!(one(&mut su, "SELECT count(*) FROM public.tp WHERE public.encryption_key_version(s) <> 2"), "0", "values left under the old key");
    assert_eq!((one(&mut su, parent_digest), one(&mut su, child_digest)), (parent_before, child_before), "every value reads back as before");
    assert_eq!(one(&mut su, "SELECT public.decrypt(s) FROM ONLY public.tp WHERE id = 1"), "parent 1");
    assert_eq!(one(&mut su, "SELECT public.decrypt(s) FROM public.tc WHERE id = 1"), "child 1");
}

/// 13. Another session's temporary table with an index on `blind_index(...)` (which no other
/// session can rebuild) does not stop a rotation of the blind-index key.
#[test]
fn another_sessions_temporary_blind_index_does_not_stop_a_rotation() {
    let c = start("adv-rotate-temp", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE TABLE people (id int PRIMARY KEY, email encrypted_text); \
         INSERT INTO people SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 50) g; \
         SELECT register_blind_index('people', 'email'); CREATE INDEX people_email_bidx ON people (blind_index(email))",
    );
    let lookup = "SELECT id FROM public.people WHERE public.blind_index(email) = public.blind_index('user7@example.com', 'public.people', 'email')";
    let mut other = superuser(&c, "app");
    ok(
        other.batch_execute(
            "CREATE TEMP TABLE people_copy AS SELECT id, email FROM public.people; \
             CREATE INDEX people_copy_bidx ON people_copy (public.blind_index(email))",
        ),
        "another session's temporary copy, with a blind index",
    );
    assert_eq!(one(&mut other, "SELECT id FROM people_copy WHERE public.blind_index(email) = public.blind_index('user7@example.com', 'public.people', 'email')"), "7");

    let mut su = superuser(&c, "app");
    let msg = ok(try_rows(&mut su, "SELECT public.rotate_blind_index_key()"), "rotate_blind_index_key() while another session holds a temporary table with a blind index");
    assert!(msg.starts_with("rotated: "), "{msg}");
    assert_eq!(one(&mut su, lookup), "7", "a lookup after the rotation");
    ok(su.batch_execute("SET enable_seqscan = off"), "enable_seqscan");
    let plan = rows(&mut su, &format!("EXPLAIN {lookup}"));
    assert!(plan.contains("people_email_bidx"), "{plan}");
    assert_eq!(one(&mut su, lookup), "7", "a lookup through the rebuilt index");
    let mut fresh = superuser(&c, "app");
    assert_eq!(one(&mut fresh, lookup), "7", "a lookup in a new session");
    drop(other);
}

/// 14. The bound on recorded refusals is per role: one role's flood does not hide another
/// role's refusal.
#[test]
fn one_roles_flood_of_refusals_does_not_hide_another_roles() {
    let c = start("adv-audit-roles", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE ROLE mallory LOGIN; CREATE ROLE rita LOGIN");
    // A bound per wall-clock minute: the flood and rita's call must fall in the same minute.
    early_in_a_minute(45);
    let mut m = c.connect_as(Transport::Unix, "app", "mallory");
    for i in 0..70 {
        refused(m.query_one("SELECT retrieve_data_encryption_key()", &[]), &NOT_ALLOWED, &format!("mallory: refused call {i}"));
    }
    let mut r = c.connect_as(Transport::Unix, "app", "rita");
    refused(r.query_one("SELECT retrieve_data_encryption_key()", &[]), &NOT_ALLOWED, "rita: one refused call");
    let count = |role: &str| -> i64 {
        c.psql("app", &format!("SELECT count(*) FROM data_encryption_audit WHERE session_role = '{role}' AND outcome = 'refused'")).trim().parse().unwrap()
    };
    let (mallory, rita) = (count("mallory"), count("rita"));
    assert!(rita >= 1, "rita's refused call is not in the audit record (mallory's 70 refusals left {mallory} lines)");
    assert!((1..=61).contains(&mallory), "{mallory} lines for mallory's 70 refused calls (at most 60 a minute and a note)");
}

/// 15. `blind_index(value, table, column)` resolves the column each call names, even when one
/// call site sees several: an unregistered or missing column is never hashed as a registered
/// one of the same table.
#[test]
fn a_blind_index_lookup_resolves_each_column_it_is_given() {
    let c = start("adv-bidx-lookup", &[]);
    c.database_with_extension("app");
    c.psql(
        "app",
        "CREATE ROLE tom LOGIN; CREATE TABLE tomt (id int, email encrypted_text, note encrypted_text); \
         INSERT INTO tomt VALUES (1, 'x', 'x'); SELECT register_blind_index('tomt', 'email'); GRANT SELECT ON tomt TO tom",
    );
    let mut tom = c.connect_as(Transport::Unix, "app", "tom");
    let registered = one(&mut tom, "SELECT encode(blind_index('x', 'tomt', 'email'), 'hex')");
    assert_eq!(registered.len(), 32, "{registered}");
    for (list, codes) in [
        ("('email'::name), ('id'), ('nonexistent')", [SqlState::INSUFFICIENT_PRIVILEGE, SqlState::UNDEFINED_COLUMN]),
        ("('email'::name), ('note')", [SqlState::INSUFFICIENT_PRIVILEGE, SqlState::INSUFFICIENT_PRIVILEGE]),
        ("('email'::name), ('nonexistent')", [SqlState::UNDEFINED_COLUMN, SqlState::UNDEFINED_COLUMN]),
    ] {
        let sql = format!("SELECT c, encode(blind_index('x', 'tomt', c), 'hex') FROM (VALUES {list}) v(c)");
        match try_rows(&mut tom, &sql) {
            Ok(out) => panic!("{sql}: expected SQLSTATE {} or {}, but it succeeded:\n{out}", codes[0].code(), codes[1].code()),
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().clone());
                assert!(code.as_ref().is_some_and(|c| codes.contains(c)), "{sql}: {}", describe(&e));
            }
        }
    }
}

/// 16. A blind-index column id is never reused, even when the registration that took it rolled
/// back: a session that computed blind indexes under that id (with that registration's
/// normalization) and a new session compute the same for the column registered next.
#[test]
fn blind_index_column_ids_are_never_reused_after_a_rollback() {
    let c = start("adv-bidx-rollback", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t2 (id int, c encrypted_text); CREATE TABLE t3 (id int, c encrypted_text)");
    let column_id = |msg: &str| -> String {
        msg.split("blind-index column ").nth(1).map(|r| r.chars().take_while(char::is_ascii_digit).collect()).unwrap_or_else(|| panic!("no id in {msg:?}"))
    };
    let hash = |client: &mut Client| one(client, "SELECT encode(public.blind_index('ABC', 'public.t3', 'c'), 'hex')");
    let mut s = superuser(&c, "app");
    ok(s.batch_execute("BEGIN"), "BEGIN");
    let t2_id = column_id(&one(&mut s, "SELECT public.register_blind_index('t2', 'c', 'lower')"));
    one(&mut s, "SELECT public.blind_index('ABC', 'public.t2', 'c')");
    ok(s.batch_execute("ROLLBACK"), "ROLLBACK");
    assert_eq!(one(&mut s, "SELECT count(*) FROM public.blind_index_columns"), "0");
    let msg = one(&mut s, "SELECT public.register_blind_index('t3', 'c', 'exact')");
    let t3_id = one(&mut s, "SELECT id FROM public.blind_index_columns WHERE column_name = 'c'");
    assert_eq!(column_id(&msg), t3_id, "{msg}");
    let here = hash(&mut s);
    let mut fresh = superuser(&c, "app");
    let there = hash(&mut fresh);
    assert_eq!(here, there, "blind_index('ABC', 't3', 'c') in the session that rolled back t2's registration (id {t2_id}, 'lower') and in a new one (t3: id {t3_id}, 'exact')");
    assert_ne!(t3_id, t2_id, "t3 took the id of t2's rolled-back registration");
}

/// The schema the extension's objects are in now (the database owner may have renamed it).
fn extension_schema(client: &mut Client) -> String {
    one(
        client,
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n \
         ON n.oid OPERATOR(pg_catalog.=) e.extnamespace WHERE e.extname OPERATOR(pg_catalog.=) 'pg_cellcrypt'",
    )
}

/// Mal's look-alike of a function the worker's SQL may name, `evil.<name>(public.encrypted_text)`:
/// tries to make mal a superuser, reports who runs it, and answers 0 (no key version).
fn escalating_lookalike(name: &str) -> String {
    format!(
        "CREATE FUNCTION evil.{name}(public.encrypted_text) RETURNS int LANGUAGE plpgsql AS $f$ \
         BEGIN BEGIN EXECUTE 'ALTER ROLE mal SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END; \
         RAISE WARNING 'cellcrypt-escalation-probe who=%', current_user; RETURN 0; END $f$;"
    )
}

/// 17. The owner of a database (an ordinary role) swaps the extension's schema for one of her
/// own while the worker re-encrypts a superuser's table: `public` becomes `real_public`, her
/// schema of look-alikes becomes `public`. The worker's statements name only `cellcrypt.*` and
/// `pg_catalog.*` (and it keeps schemas from being renamed while it names and runs a statement,
/// so her rename may have to wait, or time out): none of her code runs as anyone but her, and
/// the change completes with every value under the new key.
#[test]
fn a_database_owner_renaming_schemas_under_the_worker_gains_nothing() {
    let c = start("adv-rename", &["pg_cellcrypt.reencrypt_batch_size = 100", "pg_cellcrypt.reencrypt_pause = '200ms'"]);
    c.psql("postgres", &format!("CREATE ROLE mal LOGIN; {LOG_TABLE}"));
    c.psql("postgres", "CREATE DATABASE esc OWNER mal");
    c.psql(
        "esc",
        "CREATE EXTENSION pg_cellcrypt; CREATE TABLE public.secrets (id int PRIMARY KEY, c encrypted_text); \
         INSERT INTO public.secrets SELECT g, 'secret ' || g FROM generate_series(1, 20000) g; ANALYZE public.secrets",
    );
    {
        let mut m = c.connect_as(Transport::Unix, "esc", "mal");
        ok(m.batch_execute("CREATE SCHEMA evil"), "mal: CREATE SCHEMA evil");
        for name in ["encryption_key_version", "key_version"] {
            ok(m.batch_execute(&escalating_lookalike(name)), &format!("mal: evil.{name}"));
        }
        ok(m.batch_execute(&hostile_objects("evil", "mal")), "mal: her other look-alikes in evil");
    }
    // The escalation log and the role checks live in the postgres database: esc's public schema
    // is about to change hands.
    let mut su = superuser(&c, "postgres");
    let base = Baseline::take(&mut su);
    let mut s = c.connect(Transport::Unix, "esc");
    s.batch_execute("SET search_path = pg_catalog").unwrap();
    let digest_sql = |schema: &str| format!("SELECT count(*) || ':' || md5(string_agg(id || '=' || {schema}.decrypt(c), ',' ORDER BY id)) FROM {schema}.secrets");
    let digest = one(&mut s, &digest_sql("public"));
    assert!(digest.starts_with("20000:"), "{digest}");

    let msg = one(&mut s, "SELECT public.set_data_encryption_key(public.generate_data_encryption_key())");
    assert!(msg.starts_with("changed"), "{msg}");
    let started = Instant::now();
    while one(&mut s, "SELECT coalesce(sum(cells_done), 0) FROM public.data_encryption_progress") == "0" {
        assert!(started.elapsed() < Duration::from_secs(15), "the worker did not start re-encrypting");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The swap, while the worker runs. It may wait for the worker, or time out: either is fine.
    let mut m = c.connect_as(Transport::Unix, "esc", "mal");
    ok(m.batch_execute("SET statement_timeout = '10s'"), "mal: statement_timeout");
    let swap = m.batch_execute("BEGIN; ALTER SCHEMA public RENAME TO real_public; ALTER SCHEMA evil RENAME TO public; COMMIT");
    match &swap {
        Ok(()) => eprintln!("mal's schema swap committed"),
        Err(e) => {
            eprintln!("mal's schema swap failed: {}", describe(e));
            let _ = m.batch_execute("ROLLBACK");
        }
    }
    drop(m);
    // Several of the worker's batches after the swap.
    std::thread::sleep(Duration::from_millis(2500));
    base.check(&c, &mut su, &["mal"], "while the worker re-encrypted after mal's schema swap");
    assert_eq!(one(&mut su, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'mal'"), "f", "mal became a superuser");

    // Then let the worker finish quickly.
    for setting in ["ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = 0", "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 1000000", "SELECT pg_reload_conf()"] {
        su.batch_execute(setting).unwrap();
    }
    let ext = extension_schema(&mut s);
    assert_eq!(ext, if swap.is_ok() { "real_public" } else { "public" });
    let started = Instant::now();
    loop {
        let status = one(&mut s, &format!("SELECT reencryption FROM {ext}.data_encryption_status"));
        if status == "complete" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "re-encryption did not finish: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    base.check(&c, &mut su, &["mal"], "after the change completed");
    assert_eq!(one(&mut su, "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'mal'"), "f", "mal became a superuser");
    assert_eq!(one(&mut s, &format!("SELECT key_version FROM {ext}.data_encryption_status")), "2");
    assert_eq!(
        one(&mut s, &format!("SELECT count(*) FROM {ext}.secrets WHERE {ext}.encryption_key_version(c) <> 2")),
        "0",
        "values left under the old key"
    );
    assert_eq!(one(&mut s, &digest_sql(&ext)), digest, "every value reads back as before");
}

/// 18. A database made with the OID of a dropped one (CREATE DATABASE ... OID n, as pg_upgrade
/// does) by an ordinary role gets a key of its own at CREATE EXTENSION, never the key the
/// dropped database left behind under that OID.
#[test]
fn a_database_reusing_a_dropped_databases_oid_does_not_get_its_key() {
    let c = start("adv-oid-reuse", &[]);
    // CREATE DATABASE ... OID (what makes the reuse happen at once) exists from PostgreSQL 15;
    // on 14 an OID comes back only after the counter wraps around, which a test cannot force.
    if c.server_major() < 15 {
        eprintln!("PostgreSQL 14: CREATE DATABASE ... OID does not exist; the reuse cannot be forced");
        return;
    }
    c.psql("postgres", "CREATE ROLE mallory LOGIN");
    c.database_with_extension("victim");
    c.psql("victim", "CREATE TABLE s (id int, c encrypted_text); INSERT INTO s VALUES (1, 'victim secret')");
    let k1 = c.psql("victim", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    assert!(k1.starts_with("CCK1-"), "a generated key: {}", k1.len());
    let oid = c.psql("postgres", "SELECT oid FROM pg_database WHERE datname = 'victim'").trim().to_owned();
    c.psql("postgres", "DROP DATABASE victim");
    c.psql("postgres", &format!("CREATE DATABASE mall OID {oid} OWNER mallory"));
    assert_eq!(c.psql("postgres", "SELECT oid FROM pg_database WHERE datname = 'mall'").trim(), oid);
    let out = c.psql_raw("mall", "CREATE EXTENSION pg_cellcrypt");
    assert!(out.status.success(), "CREATE EXTENSION in mall: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("CREATE EXTENSION in mall: {}", String::from_utf8_lossy(&out.stderr).trim());
    let key = c.psql("mall", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    assert!(key.starts_with("CCK1-"), "a generated key: {}", key.len());
    assert_ne!(key, k1, "mall (OID {oid}) got the key of the dropped database victim");
}
