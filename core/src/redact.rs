//! Keeping keys out of log lines: helpers for the extension's `emit_log_hook`.
//!
//! They work on text only, so they live here, where they can be unit-tested without a server.

/// Replaces the contents of every single-quoted and dollar-quoted string with `<redacted>`.
pub fn redact_quoted(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // Skip to the closing quote; '' is an escaped quote, \' too in E'' strings.
                let mut j = i + 1;
                while j < b.len() {
                    if b[j] == b'\\' {
                        j += 2;
                        continue;
                    }
                    if b[j] == b'\'' {
                        if j + 1 < b.len() && b[j + 1] == b'\'' {
                            j += 2;
                            continue;
                        }
                        break;
                    }
                    j += 1;
                }
                out.push_str("'<redacted>'");
                i = j + 1;
            }
            b'$' => {
                // $tag$ ... $tag$
                let tag_end = b[i + 1..].iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'_')).map(|p| i + 1 + p);
                match tag_end {
                    Some(t) if b[t] == b'$' => {
                        let tag = &s[i..=t];
                        match s[t + 1..].find(tag) {
                            Some(end) => {
                                out.push_str(tag);
                                out.push_str("<redacted>");
                                out.push_str(tag);
                                i = t + 1 + end + tag.len();
                            }
                            None => {
                                out.push_str(tag);
                                out.push_str("<redacted>");
                                i = b.len();
                            }
                        }
                    }
                    _ => {
                        out.push('$');
                        i += 1;
                    }
                }
            }
            _ => {
                let ch = s[i..].chars().next().unwrap();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// Masks everything shaped like a generated key: `CCK1-` (any case) and the key characters,
/// dashes and spaces that follow it.
pub fn mask_generated_keys(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    if !lower.contains("cck1-") {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut lower_rest = lower.as_str();
    while let Some(p) = lower_rest.find("cck1-") {
        out.push_str(&rest[..p]);
        out.push_str("CCK1-<redacted>");
        let after = &rest[p + 5..];
        let skip = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == ' ')).unwrap_or(after.len());
        rest = &after[skip..];
        lower_rest = &lower_rest[p + 5 + skip..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_strings_are_redacted() {
        assert_eq!(
            redact_quoted("statement: SELECT set_data_encryption_key('my ''long'' passphrase here')"),
            "statement: SELECT set_data_encryption_key('<redacted>')"
        );
        assert_eq!(redact_quoted("parameters: $1 = 'abc', $2 = 'x'"), "parameters: $1 = '<redacted>', $2 = '<redacted>'");
        assert_eq!(redact_quoted("SELECT f($k$secret$k$) , $$x$$"), "SELECT f($k$<redacted>$k$) , $$<redacted>$$");
        assert_eq!(redact_quoted("SELECT f(E'a\\'b')"), "SELECT f(E'<redacted>')");
        assert_eq!(redact_quoted("unterminated 'abc"), "unterminated '<redacted>'");
    }

    #[test]
    fn generated_keys_are_masked() {
        assert_eq!(mask_generated_keys("key cck1-ABCD-EFGH-1234, end"), "key CCK1-<redacted>, end");
        assert_eq!(mask_generated_keys("nothing here"), "nothing here");
    }
}
