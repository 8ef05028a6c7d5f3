//! Keeping keys out of log lines: helpers for the extension's `emit_log_hook`.
//!
//! They work on text only, so they live here, where they can be unit-tested without a server.

/// The byte ranges of the contents of every single-quoted and dollar-quoted string constant in
/// SQL text `b` (quotes and dollar tags excluded), scanned as PostgreSQL's lexer does: `--` and
/// nested `/* */` comments and `"quoted identifiers"` are skipped (an apostrophe in them starts
/// nothing), `''` is a quote inside a string, and a backslash escapes the next byte in `E''`
/// strings, and in every string when `backslash_quote` (`standard_conforming_strings = off`).
/// An unterminated string runs to the end.
fn quoted_contents(b: &[u8], backslash_quote: bool) -> Vec<(usize, usize)> {
    quoted_contents_as(b, backslash_quote, true)
}

/// As [`quoted_contents`]; without `sql`, comments and double quotes are ordinary characters
/// (a message quotes a token in double quotes: `at or near "'the start of a string"`).
fn quoted_contents_as(b: &[u8], backslash_quote: bool, sql: bool) -> Vec<(usize, usize)> {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'-' if sql && b.get(i + 1) == Some(&b'-') => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p + 1);
            }
            b'/' if sql && b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' if sql => {
                // A quoted identifier; "" is a quote inside it.
                let mut j = i + 1;
                while j < b.len() {
                    if b[j] == b'"' {
                        if b.get(j + 1) == Some(&b'"') {
                            j += 2;
                            continue;
                        }
                        break;
                    }
                    j += 1;
                }
                i = j + 1;
            }
            b'\'' => {
                let escapes = backslash_quote
                    || (i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e') && (i < 2 || !ident(b[i - 2])));
                let mut j = i + 1;
                while j < b.len() {
                    if escapes && b[j] == b'\\' {
                        j += 2;
                        continue;
                    }
                    if b[j] == b'\'' {
                        if b.get(j + 1) == Some(&b'\'') {
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
            c if sql && (c.is_ascii_alphabetic() || c == b'_' || c >= 0x80) => {
                // An identifier or keyword, whole: `$` inside one (a$$t$) starts nothing.
                while i < b.len() && (ident(b[i]) || b[i] == b'$') {
                    i += 1;
                }
            }
            b'$' if i == 0 || !ident(b[i - 1]) => {
                // $tag$ ... $tag$: a tag is empty, or an identifier that does not start with a digit.
                let t = b[i + 1..].iter().position(|&c| !ident(c)).map_or(b.len(), |p| i + 1 + p);
                let tag_ok = t < b.len() && b[t] == b'$' && !b.get(i + 1).is_some_and(|c| c.is_ascii_digit());
                if !tag_ok {
                    i += 1;
                    continue;
                }
                let tag = &b[i..=t];
                match b[t + 1..].windows(tag.len()).position(|w| w == tag) {
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
    spans
}

/// Replaces the contents of every single-quoted and dollar-quoted string with `<redacted>`
/// (an unterminated one is closed). For log messages; `backslash_quote` as in
/// [`quoted_contents`].
pub fn redact_quoted(s: &str) -> String {
    redact_quoted_with(s, false)
}

/// For a log message, which may hold SQL text or quote a token: the strings found reading it as
/// SQL, and then those found reading it as plain text, so that neither reading's blind spot
/// (an apostrophe in a quoted identifier, a string's start quoted in a message) leaks.
pub fn redact_quoted_with(s: &str, backslash_quote: bool) -> String {
    let mut out = s.to_owned();
    // Both readings of backslashes (see mask_quoted_in_place), as SQL and as plain text.
    for (bq, sql) in [(backslash_quote, true), (!backslash_quote, true), (backslash_quote, false), (!backslash_quote, false)] {
        out = redact_spans(&out, &quoted_contents_as(out.as_bytes(), bq, sql));
    }
    out
}

/// For a message's CONTEXT, which quotes SQL in double quotes (`SQL statement "..."`): the whole
/// quoted text of each line is replaced, since an apostrophe in a comment or identifier inside
/// it can pair with the wrong quote under any single reading.
pub fn redact_quoted_sql(s: &str) -> String {
    s.lines()
        .map(|line| match (line.find('"'), line.rfind('"')) {
            (Some(a), Some(b)) if b > a => format!("{}\"<redacted>\"{}", &line[..a], &line[b + 1..]),
            _ => redact_quoted(line),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn redact_spans(s: &str, spans: &[(usize, usize)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for (start, end) in spans {
        out.push_str(&s[at..*start]);
        out.push_str("<redacted>");
        at = *end;
    }
    out.push_str(&s[at..]);
    // An unterminated single-quoted string gets its closing quote.
    if let Some((start, end)) = spans.last() {
        if *end == s.len() && s.as_bytes()[start - 1] == b'\'' {
            out.push('\'');
        }
    }
    out
}

/// Replaces every byte of the contents of every string constant in SQL text `b` with `*`, in
/// place: the same length in bytes, whatever the encoding, so that offsets into the text (a
/// statement's location in a multi-statement string, as pg_stat_statements uses them) stay
/// valid, and no byte of the original remains.
pub fn mask_quoted_in_place(b: &mut [u8], backslash_quote: bool) {
    // Both readings of backslashes: the text may have been lexed under another setting of
    // standard_conforming_strings than the one in force now. Masking too much is harmless.
    let mut spans = quoted_contents(b, backslash_quote);
    spans.extend(quoted_contents(b, !backslash_quote));
    for (start, end) in spans {
        b[start..end].fill(b'*');
    }
}

/// [`mask_quoted_in_place`] on a copy of `s`.
pub fn mask_quoted_same_length(s: &str) -> String {
    let mut out = s.as_bytes().to_vec();
    mask_quoted_in_place(&mut out, false);
    // Whole strings' contents, which start and end at ASCII quotes or tags, became ASCII.
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
        assert_eq!(
            redact_quoted("unterminated quoted string at or near \"'my secret passphrase)\""),
            "unterminated quoted string at or near \"'<redacted>'"
        );
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
    fn comments_and_quoted_identifiers_do_not_throw_the_scanner_off() {
        for q in [
            "/* rotate Bob's key */ SELECT set_data_encryption_key('my very secret passphrase')",
            "-- Bob's key\nSELECT set_data_encryption_key('my very secret passphrase')",
            "SELECT 1 AS \"it's\", set_data_encryption_key('my very secret passphrase')",
            "/* nested /* it's */ still a comment's */ SELECT f('my very secret passphrase')",
            "SELECT f($é$my very secret passphrase$é$)",
        ] {
            let r = redact_quoted(q);
            assert!(!r.contains("secret"), "{q} -> {r}");
            let m = mask_quoted_same_length(q);
            assert!(!m.contains("secret") && m.len() == q.len(), "{q} -> {m}");
        }
        // With standard_conforming_strings off, a backslash escapes a quote in any string.
        let q = "SELECT f('abc\\'def secret')";
        assert!(redact_quoted(q).contains("secret"), "read as a standard string, the quote ends it");
        assert!(!redact_quoted_with(q, true).contains("secret"));
        // $1 is a parameter, not a dollar quote; a$$t$ is an identifier.
        assert_eq!(redact_quoted("SELECT f($1, 'x')"), "SELECT f($1, '<redacted>')");
        let m = mask_quoted_same_length("SELECT a$$t$, 'x$t$', set_data_encryption_key('secret')");
        assert!(!m.contains("secret"), "{m}");
        // Lexed with standard_conforming_strings on, masked with it off (and the reverse).
        let q = "SET standard_conforming_strings = off; SELECT 'a\\', set_data_encryption_key('secret')";
        let mut b = q.as_bytes().to_vec();
        mask_quoted_in_place(&mut b, true);
        assert!(!String::from_utf8(b).unwrap().contains("secret"));
        // CONTEXT quoting SQL with an apostrophe in a comment.
        let c = redact_quoted_sql("SQL statement \"SELECT /* Bob's */ set_data_encryption_key('secret')\"\nPL/pgSQL function inline_code_block line 1 at PERFORM");
        assert!(!c.contains("secret") && c.contains("line 1 at PERFORM"), "{c}");
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
