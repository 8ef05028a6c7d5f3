//! What a release ships agrees with itself: META.json (PGXN), Cargo.toml, the control file and
//! the install and upgrade scripts in sql/.

use cellcrypt_integration::{cargo_version, repo};

#[test]
fn meta_json_control_file_and_upgrade_scripts_agree_with_cargo_toml() {
    let version = cargo_version();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo().join("META.json")).unwrap()).expect("META.json is JSON");
    assert_eq!(meta["name"], "pg_cellcrypt");
    assert_eq!(meta["version"], version.as_str(), "META.json version");
    assert_eq!(meta["provides"]["pg_cellcrypt"]["version"], version.as_str(), "META.json provides.pg_cellcrypt.version");
    assert_eq!(meta["meta-spec"]["version"], "1.0.0");
    for key in ["abstract", "maintainer", "license", "provides", "meta-spec"] {
        assert!(!meta[key].is_null(), "META.json lacks the required key {key}");
    }
    let control = std::fs::read_to_string(repo().join("pg_cellcrypt.control")).unwrap();
    assert!(control.contains("default_version = '@CARGO_VERSION@'"), "the control file takes its version from Cargo.toml");

    // Every earlier release kept in sql/ reaches this version through the upgrade scripts.
    let names: Vec<String> = std::fs::read_dir(repo().join("sql")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let steps: Vec<(String, String)> = names
        .iter()
        .filter_map(|n| n.strip_prefix("pg_cellcrypt--")?.strip_suffix(".sql")?.split_once("--").map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    let released: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix("pg_cellcrypt--")?.strip_suffix(".sql").filter(|v| !v.contains("--")).map(str::to_owned))
        .collect();
    assert!(released.contains(&"0.1.0".to_owned()), "sql/ keeps the 0.1.0 install script: {names:?}");
    assert!(!released.contains(&version), "this version's install script is generated, not kept in sql/");
    for from in &released {
        let mut at = from.clone();
        let mut hops = 0;
        while at != version {
            at = steps.iter().find(|(a, _)| *a == at).unwrap_or_else(|| panic!("no upgrade script from {at} (on the way from {from} to {version})")).1.clone();
            hops += 1;
            assert!(hops < 100, "upgrade scripts loop");
        }
    }
    // The upgrade script cannot be run by hand through psql by mistake.
    for (a, b) in &steps {
        let text = std::fs::read_to_string(repo().join(format!("sql/pg_cellcrypt--{a}--{b}.sql"))).unwrap();
        assert!(text.contains("\\echo Use \"ALTER EXTENSION pg_cellcrypt UPDATE\" to load this file. \\quit"), "{a}--{b}");
    }
}
