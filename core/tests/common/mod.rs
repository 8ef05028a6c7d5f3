//! Helpers shared by the crypto core's integration tests.

use std::path::PathBuf;

/// The repository's `tests/vectors` folder.
pub fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("tests").join("vectors")
}

pub fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.trim()).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

/// Parses `Name = value` records separated by blank lines; `#` starts a comment line.
pub fn records(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not a `name = value` line: {line:?}"));
        cur.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn field<'a>(rec: &'a [(String, String)], name: &str) -> &'a str {
    rec.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("record lacks {name}"))
}
