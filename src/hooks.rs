//! `emit_log_hook`: the last look at every message before it reaches the server log and the
//! client. It keeps keys out of the log: when the statement being run mentions
//!    `set_data_encryption_key` (itself, or through `EXECUTE` of a prepared statement that
//!    does), or a key call runs in it, the statement is not logged with errors (`hide_stmt`), and every
//!    quoted string in PostgreSQL's own messages (the logged statement, its parameters, a syntax
//!    error), their detail and their context is replaced by `'<redacted>'`.
//!
//! And [`hide_statement_text`], which every key call runs first, replaces the statement text
//! that `pg_stat_activity.query` shows (during the call and after it, while the session is
//! idle) by the same text with every string constant masked byte for byte (`'****'`), whatever
//! form the call took; a statement naming the key function that fails before the call gets the
//! same. The `ProcessUtility` hook masks utility statements (a `DO` block) the same way before
//! `pg_stat_statements` stores them.
//!    That covers `log_statement`, `log_min_duration_statement`, `log_min_error_statement` and
//!    the parameters the extended protocol logs. Independently, anything shaped like a
//!    generated key (`CCK1-` followed by key characters) is masked in every message.
//!
//! Refusals need nothing from this hook: every guarded function checks the caller's role itself
//! (`policy.rs`) and raises its own 42501 with a hint and an audit record, so nothing depends on
//! the text of a message, which `lc_messages` translates.

use pgrx::pg_sys;
use std::ffi::{c_char, CStr, CString};

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;
static mut PREV_PROCESS_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
        PREV_PROCESS_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility_hook);
    }
}

extern "C-unwind" {
    /// PostgreSQL's own, called directly: an error in it travels on as PostgreSQL raised it
    /// (context, position, table and constraint names), not through a Rust panic.
    #[link_name = "standard_ProcessUtility"]
    fn raw_standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// A utility statement that names the key function (a `DO` block, a `CALL`, `EXPLAIN ANALYZE`)
/// goes on with its text's string constants masked byte for byte, and a query id computed from
/// that text, so that what comes after this hook (`pg_stat_statements` keeps utility statements'
/// texts verbatim) never sees the key. The statement itself is already parsed and runs as
/// written. Hooks run in the reverse order of `shared_preload_libraries`: list pg_cellcrypt
/// after pg_stat_statements. This function owns nothing that needs dropping, so an error
/// raised below it passes through untouched.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let Masked { pstmt, query_string } = masked_utility(pstmt, query_string);
    if cfg!(feature = "fault_injection") && commit_prepared(pstmt) {
        before_commit_prepared();
    }
    match PREV_PROCESS_UTILITY_HOOK {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => raw_standard_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
    }
    after_utility(pstmt);
}

/// Crash point `cluster:before_commit_prepared` (fault-injection builds).
#[pgrx::pg_guard]
extern "C-unwind" fn before_commit_prepared() {
    crate::fault::point("cluster:before_commit_prepared");
}

/// True for `COMMIT PREPARED` on a server where Citus is loaded.
unsafe fn commit_prepared(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    if pstmt.is_null() || (*pstmt).utilityStmt.is_null() || !crate::citus::loaded() {
        return false;
    }
    let stmt = (*pstmt).utilityStmt;
    (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt
        && (*(stmt as *mut pg_sys::TransactionStmt)).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
}

/// After `CREATE EXTENSION pg_cellcrypt` on a Citus coordinator (Citus, loaded before
/// pg_cellcrypt, has created the extension on the workers by now, in this transaction): the
/// workers take the coordinator's keyring in the same transaction (citus.rs). After `COMMIT
/// PREPARED` (a Citus worker committing its part of a distributed transaction, which may have
/// been a key change): see `key_admin::after_commit_prepared`.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn after_utility(pstmt: *mut pg_sys::PlannedStmt) {
    if commit_prepared(pstmt) {
        if crate::store::extension_oid() != pg_sys::InvalidOid {
            crate::key_admin::after_commit_prepared();
        }
        return;
    }
    if pstmt.is_null() || !crate::citus::loaded() {
        return;
    }
    let stmt = (*pstmt).utilityStmt;
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreateExtensionStmt {
        return;
    }
    let create = stmt as *mut pg_sys::CreateExtensionStmt;
    if (*create).extname.is_null() || std::ffi::CStr::from_ptr((*create).extname).to_bytes() != b"pg_cellcrypt" {
        return;
    }
    if !crate::citus::internal_backend() && crate::store::keyring_has_rows() {
        crate::citus::share_keyring();
    }
}

/// The statement and text to pass on: unchanged, or for a statement that names the key
/// function, a palloc'd masked copy of the text (in the current memory context, the lifetime
/// PostgreSQL gives query strings) and a flat copy of the statement with the masked text's
/// query id.
#[repr(C)]
struct Masked {
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn masked_utility(pstmt: *mut pg_sys::PlannedStmt, query_string: *const c_char) -> Masked {
    if query_string.is_null() || !(contains_key_function(query_string) || crate::gucs::REDACT_ALL_LOG_LITERALS.get()) {
        return Masked { pstmt, query_string };
    }
    let len = CStr::from_ptr(query_string).to_bytes().len();
    let copy = pg_sys::palloc(len + 1) as *mut u8;
    std::ptr::copy_nonoverlapping(query_string as *const u8, copy, len + 1);
    let bytes = std::slice::from_raw_parts_mut(copy, len);
    cellcrypt_core::redact::mask_quoted_in_place(bytes, !pg_sys::standard_conforming_strings);
    let mut stmt = pstmt;
    // The query id PostgreSQL computed hashes the raw text, key included: a fast, unsalted
    // hash anyone reading the statistics could test guesses against. It becomes a hash of this
    // statement's own masked text (an id of 0, no id computed, stays 0).
    if !pstmt.is_null() && (*pstmt).queryId != 0 {
        use std::hash::{Hash, Hasher};
        let start = ((*pstmt).stmt_location.max(0) as usize).min(len);
        let end = if (*pstmt).stmt_len > 0 { (start + (*pstmt).stmt_len as usize).min(len) } else { len };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes[start..end].hash(&mut h);
        stmt = pg_sys::palloc(std::mem::size_of::<pg_sys::PlannedStmt>()) as *mut pg_sys::PlannedStmt;
        std::ptr::copy_nonoverlapping(pstmt, stmt, 1);
        // (u64 up to PostgreSQL 17, i64 from 18: the same 64 bits either way.)
        (*stmt).queryId = (h.finish() | 1) as _;
    }
    Masked { pstmt: stmt, query_string: copy as *const c_char }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    if let Some(e) = edata.as_mut() {
        redact(e);
    }
    if let Some(prev) = PREV_EMIT_LOG_HOOK {
        prev(edata);
    }
}

const KEY_FUNCTION: &[u8] = b"set_data_encryption_key";

thread_local! {
    /// The start time of the top-level statement in which a key call ran: that statement's
    /// messages are redacted whatever its text (a SQL function, a DO block, EXECUTE), up to and
    /// including its duration line, and no other statement's.
    static KEY_CALL: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

fn key_call_in_this_statement() -> bool {
    // SAFETY: a plain read of the transaction state.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    KEY_CALL.with(|k| k.get() != 0 && k.get() == now)
}

/// Run first by every function that takes a key: the statement's text in `pg_stat_activity`
/// becomes the text with every string constant masked, byte for byte (no byte of the key stays
/// in shared memory), and this statement's messages are redacted from here on.
pub fn hide_statement_text() {
    // SAFETY: a plain read of the transaction state.
    KEY_CALL.with(|k| k.set(unsafe { pg_sys::GetCurrentStatementStartTimestamp() }));
    // SAFETY: debug_query_string is the statement being run (or NULL).
    unsafe { hide_activity(pg_sys::debug_query_string) };
}

/// Reports `text`, string constants masked, as this backend's `pg_stat_activity.query`. Its
/// query id becomes 0: PostgreSQL computed it from the raw text, and a fast hash of a text
/// that holds the key would let a reader of pg_stat_activity test guesses offline.
unsafe fn hide_activity(text: *const c_char) {
    if text.is_null() {
        return;
    }
    let mut bytes = CStr::from_ptr(text).to_bytes().to_vec();
    cellcrypt_core::redact::mask_quoted_in_place(&mut bytes, !pg_sys::standard_conforming_strings);
    if let Ok(c) = CString::new(bytes) {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c.as_ptr());
    }
}

/// Whether `b` contains the key function's name, ASCII case-insensitively.
fn names_key_function(b: &[u8]) -> bool {
    b.windows(KEY_FUNCTION.len()).any(|w| w.eq_ignore_ascii_case(KEY_FUNCTION))
}

unsafe fn contains_key_function(p: *const c_char) -> bool {
    if p.is_null() {
        return false;
    }
    let text = CStr::from_ptr(p).to_bytes();
    names_key_function(text) || executes_key_function(text)
}

/// True when SQL text `text` runs `EXECUTE <name>` (anywhere: after other statements, a
/// comment, EXPLAIN ANALYZE, CREATE TABLE AS) of a prepared statement of this session whose own
/// text names the key function (log_statement logs the EXECUTE before it runs).
unsafe fn executes_key_function(text: &[u8]) -> bool {
    let word = b"execute";
    // Most statements have no EXECUTE at all: spare them the masked copy below, which every
    // log message and every utility statement would otherwise pay for.
    if !text.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word)) {
        return false;
    }
    // Find the keyword outside strings: in the masked text, strings are asterisks. (One inside
    // a comment or a quoted identifier only costs a look-up.)
    let mut masked = text.to_vec();
    cellcrypt_core::redact::mask_quoted_in_place(&mut masked, !pg_sys::standard_conforming_strings);
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut i = 0;
    while i + word.len() <= masked.len() {
        let at_word = masked[i..i + word.len()].eq_ignore_ascii_case(word)
            && (i == 0 || !ident(masked[i - 1]))
            && masked.get(i + word.len()).is_some_and(|c| !ident(*c) && *c != b'$');
        if at_word {
            // Whitespace and comments may stand between the keyword and the name.
            let mut j = i + word.len();
            loop {
                if j < text.len() && text[j].is_ascii_whitespace() {
                    j += 1;
                } else if text[j..].starts_with(b"--") {
                    j = text[j..].iter().position(|&c| c == b'\n').map_or(text.len(), |p| j + p + 1);
                } else if text[j..].starts_with(b"/*") {
                    j = text[j + 2..].windows(2).position(|w| w == b"*/").map_or(text.len(), |p| j + 2 + p + 2);
                } else {
                    break;
                }
            }
            let name: Vec<u8> = if text.get(j) == Some(&b'"') {
                // A quoted name keeps its case; "" is a quote in it.
                let mut n = Vec::new();
                let mut k = j + 1;
                while k < text.len() {
                    if text[k] == b'"' {
                        if text.get(k + 1) == Some(&b'"') {
                            n.push(b'"');
                            k += 2;
                            continue;
                        }
                        break;
                    }
                    n.push(text[k]);
                    k += 1;
                }
                n
            } else {
                text[j..].iter().take_while(|c| ident(**c) || **c == b'$').map(|c| c.to_ascii_lowercase()).collect()
            };
            if !name.is_empty() {
                if let Ok(c) = CString::new(name) {
                    let ps = pg_sys::FetchPreparedStatement(c.as_ptr(), false);
                    if !ps.is_null()
                        && !(*ps).plansource.is_null()
                        && !(*(*ps).plansource).query_string.is_null()
                        && names_key_function(CStr::from_ptr((*(*ps).plansource).query_string).to_bytes())
                    {
                        return true;
                    }
                }
            }
        }
        i += 1;
    }
    false
}

unsafe fn redact(e: &mut pg_sys::ErrorData) {
    let named = contains_key_function(pg_sys::debug_query_string);
    let statement_has_key = named || key_call_in_this_statement();
    let redact_all = crate::gucs::REDACT_ALL_LOG_LITERALS.get();
    // The STATEMENT line PostgreSQL adds to a message (an error, or a LOG line under
    // log_min_error_statement) quotes the raw text: left out.
    if statement_has_key || redact_all {
        e.hide_stmt = true;
    }
    // A statement that names the key function (or any, with redact_all_log_literals) and fails
    // before the call is reached (a syntax error, a missing table): pg_stat_activity must not
    // keep its text either.
    if (named || redact_all) && e.elevel >= pg_sys::PGERROR as i32 {
        hide_activity(pg_sys::debug_query_string);
    }
    // Our own message, detail and hint never carry a key (see errors.rs) and are left whole;
    // PostgreSQL's own (the logged statement, its parameters, a syntax error) are redacted, and
    // so are the context and the internal query of every message, ours included: PostgreSQL
    // writes those, quoting the calling SQL (`SQL statement "SELECT set_data_encryption_key(...)"`).
    let ours = !e.filename.is_null() && CStr::from_ptr(e.filename).to_bytes().ends_with(b".rs");
    let backslash_quote = !pg_sys::standard_conforming_strings;
    let fields: [(&mut *mut c_char, bool, bool); 6] = [
        (&mut e.message, !ours, false),
        (&mut e.detail, !ours, false),
        (&mut e.hint, !ours, false),
        (&mut e.detail_log, !ours, false),
        (&mut e.context, true, true),
        (&mut e.internalquery, true, false),
    ];
    for (field, redact_strings, sql_in_quotes) in fields {
        if field.is_null() {
            continue;
        }
        let text = CStr::from_ptr(*field).to_string_lossy();
        let mut out = cellcrypt_core::redact::mask_generated_keys(&text);
        if (statement_has_key || redact_all) && redact_strings {
            out = if sql_in_quotes {
                cellcrypt_core::redact::redact_quoted_sql(&out)
            } else {
                cellcrypt_core::redact::redact_quoted_with(&out, backslash_quote)
            };
        }
        if out != text {
            if let Ok(c) = CString::new(out) {
                *field = pg_sys::pstrdup(c.as_ptr());
            }
        }
    }
}
