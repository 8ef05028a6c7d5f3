//! Keeping keys out of log lines: helpers for the extension's `emit_log_hook`.
//!
//! They work on text only, so they live here, where they can be unit-tested without a server.

/// The byte ranges of the contents of every single-quoted and dollar-quoted string in `s`
/// (quotes and dollar tags excluded). An unterminated string runs to the end.
fn quoted_contents(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // Skip to the closing quote; '' is an escaped quote, and \' too, but only in
                // E'' strings: in a standard string a backslash is an ordinary character, and
                // taking it for an escape would end the string too late and leave the next
                // string's contents unredacted.
                let escapes = i > 0
                    && (b[i - 1] == b'E' || b[i - 1] == b'e')
                    && (i < 2 || !(b[i - 2].is_ascii_alphanumeric() || b[i - 2] == b'_' || b[i - 2] >= 0x80));
                let mut j = i + 1;
                while j < b.len() {
                    if escapes && b[j] == b'\\' {
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
                let end = j.min(b.len());
                spans.push((i + 1, end));
                i = end + 1;
            }
            b'$' => {
                // $tag$ ... $tag$
                let tag_end = b[i + 1..].iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'_')).map(|p| i + 1 + p);
                match tag_end {
                    Some(t) if b[t] == b'$' => {
                        let tag = &s[i..=t];
                        match s[t + 1..].find(tag) {
                            Some(end) => {
                                spans.push((t + 1, t + 1 + end));
                                i = t + 1 + end + tag.len();
                            }
                            None => {
                                spans.push((t + 1, b.len()));
                                i = b.len();
                            }
                        }
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    spans
}

/// Replaces the contents of every single-quoted and dollar-quoted string with `<redacted>`
/// (an unterminated one is closed).
pub fn redact_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for (start, end) in quoted_contents(s) {
        out.push_str(&s[at..start]);
        out.push_str("<redacted>");
        at = end;
    }
    out.push_str(&s[at..]);
    // An unterminated single-quoted string gets its closing quote.
    if let Some((start, end)) = quoted_contents(s).last() {
        if *end == s.len() && s.as_bytes()[start - 1] == b'\'' {
            out.push('\'');
        }
    }
    out
}

/// Replaces every byte of the contents of every single-quoted and dollar-quoted string with
/// `*`: the same length in bytes, so that offsets into the text (a statement's location in a
/// multi-statement string, as pg_stat_statements uses them) stay valid.
pub fn mask_quoted_same_length(s: &str) -> String {
    let mut out = s.as_bytes().to_vec();
    for (start, end) in quoted_contents(s) {
        out[start..end].fill(b'*');
    }
    // Only ASCII bytes were written over whole strings' contents, which start and end at
    // character boundaries (after and before an ASCII quote or tag).
    String::from_utf8(out).unwrap_or_else(|_| "*".repeat(s.len()))
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
        // A standard string ending in a backslash ends there: the next string is redacted too.
        assert_eq!(
            redact_quoted("SELECT 'a\\', set_data_encryption_key('secret passphrase')"),
            "SELECT '<redacted>', set_data_encryption_key('<redacted>')"
        );
        // An identifier ending in e before a quote is not an E'' string.
        assert_eq!(redact_quoted("SELECT type'x\\', f('s')"), "SELECT type'<redacted>', f('<redacted>')");
        assert_eq!(redact_quoted("SELECT e'a\\'b', f('s')"), "SELECT e'<redacted>', f('<redacted>')");
    }

    #[test]
    fn masking_keeps_the_length() {
        let q = "DO $$ BEGIN PERFORM set_data_encryption_key('ключ secret'); END $$; SELECT 'a''b', E'c\\'d'";
        let m = mask_quoted_same_length(q);
        assert_eq!(m.len(), q.len());
        assert!(!m.contains("secret") && !m.contains("ключ"), "{m}");
        assert!(m.starts_with("DO $$*") && m.ends_with("'****', E'****'"), "{m}");
    }

    #[test]
    fn generated_keys_are_masked() {
        assert_eq!(mask_generated_keys("key cck1-ABCD-EFGH-1234, end"), "key CCK1-<redacted>, end");
        assert_eq!(mask_generated_keys("nothing here"), "nothing here");
    }
}
