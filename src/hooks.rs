//! `emit_log_hook`: the last look at every message before it reaches the server log and the
//! client. It keeps keys out of the log: when the statement being run mentions
//!    `set_data_encryption_key` (itself, or through `EXECUTE` of a prepared statement that
//!    does), or a key call runs in it, the statement is not logged with errors (`hide_stmt`), and every
//!    quoted string in PostgreSQL's own messages (the logged statement, its parameters, a syntax
//!    error), their detail and their context is replaced by `'<redacted>'`.
//!
//! And [`hide_statement_text`], which every key call runs first, replaces the statement text
//! that `pg_stat_activity.query` shows (during the call and after it, while the session is
//! idle) by the same text with its literals redacted, whatever form the call took.
//!    That covers `log_statement`, `log_min_duration_statement`, `log_min_error_statement` and
//!    the parameters the extended protocol logs. Independently, anything shaped like a
//!    generated key (`CCK1-` followed by key characters) is masked in every message.
//!
//! Refusals need nothing from this hook: every guarded function checks the caller's role itself
//! (`policy.rs`) and raises its own 42501 with a hint and an audit record, so nothing depends on
//! the text of a message, which `lc_messages` translates.

use pgrx::pg_sys;
use std::ffi::{CStr, CString};

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

/// A utility statement that calls the key function (a `DO` block, a `CALL`, `EXPLAIN ANALYZE`)
/// goes on with its text's literals masked, byte for byte, so that what comes after this hook
/// (`pg_stat_statements` keeps utility statements' texts verbatim, `pg_stat_activity`) never
/// sees the key. The statement itself is already parsed and runs as written. Hooks run in the
/// reverse order of `shared_preload_libraries`: list pg_cellcrypt after pg_stat_statements.
#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let masked = (!query_string.is_null() && contains_key_function(query_string)).then(|| {
        let text = CStr::from_ptr(query_string).to_string_lossy();
        CString::new(cellcrypt_core::redact::mask_quoted_same_length(&text)).ok()
    });
    let text = match &masked {
        Some(Some(c)) => c.as_ptr(),
        _ => query_string,
    };
    match PREV_PROCESS_UTILITY_HOOK {
        Some(prev) => prev(pstmt, text, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(pstmt, text, read_only_tree, context, params, query_env, dest, qc),
    }
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

const KEY_FUNCTION: &str = "set_data_encryption_key";

thread_local! {
    /// Set by a key call for the rest of its transaction: messages of the statement are redacted
    /// whatever its text (a SQL function, a DO block, EXECUTE of a prepared statement).
    static KEY_CALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The transaction ended: the next statements are not key calls until one says so.
pub fn end_of_transaction() {
    KEY_CALL.with(|k| k.set(false));
}

/// Run first by every function that takes a key: the statement's text in `pg_stat_activity`
/// becomes the text with every quoted string (and anything shaped like a generated key)
/// redacted, and this transaction's messages are redacted from here on.
pub fn hide_statement_text() {
    KEY_CALL.with(|k| k.set(true));
    // SAFETY: debug_query_string is the statement being run (or NULL); pgstat_report_activity
    // copies the text into this backend's own pg_stat_activity entry.
    unsafe {
        let p = pg_sys::debug_query_string;
        if p.is_null() {
            return;
        }
        let text = CStr::from_ptr(p).to_string_lossy();
        let hidden = cellcrypt_core::redact::redact_quoted(&cellcrypt_core::redact::mask_generated_keys(&text));
        if let Ok(c) = CString::new(hidden) {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, c.as_ptr());
        }
    }
}

unsafe fn contains_key_function(p: *const std::ffi::c_char) -> bool {
    if p.is_null() {
        return false;
    }
    let text = CStr::from_ptr(p).to_string_lossy().to_ascii_lowercase();
    text.contains(KEY_FUNCTION) || executes_key_function(&text)
}

/// True when `text` is `EXECUTE <name> ...` of a prepared statement of this session whose own
/// text calls the key function (log_statement logs the EXECUTE before it runs).
unsafe fn executes_key_function(text: &str) -> bool {
    let t = text.trim_start();
    let Some(rest) = t.strip_prefix("execute") else { return false };
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return false;
    }
    let rest = rest.trim_start();
    let name: String = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next().unwrap_or("").to_owned()
    } else {
        rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$').collect()
    };
    if name.is_empty() {
        return false;
    }
    let Ok(c) = CString::new(name) else { return false };
    let ps = pg_sys::FetchPreparedStatement(c.as_ptr(), false);
    if ps.is_null() || (*ps).plansource.is_null() || (*(*ps).plansource).query_string.is_null() {
        return false;
    }
    CStr::from_ptr((*(*ps).plansource).query_string).to_string_lossy().to_ascii_lowercase().contains(KEY_FUNCTION)
}

unsafe fn redact(e: &mut pg_sys::ErrorData) {
    let statement_has_key = KEY_CALL.with(|k| k.get()) || contains_key_function(pg_sys::debug_query_string);
    if statement_has_key {
        e.hide_stmt = true;
    }
    // Our own messages never carry a key (see errors.rs) and are left whole; PostgreSQL's own
    // (the logged statement, its parameters, a syntax error) are redacted.
    let ours = !e.filename.is_null() && CStr::from_ptr(e.filename).to_bytes().ends_with(b".rs");
    let statement_has_key = statement_has_key && !ours;
    for field in [&mut e.message, &mut e.detail, &mut e.context, &mut e.hint, &mut e.detail_log] {
        if field.is_null() {
            continue;
        }
        let text = CStr::from_ptr(*field).to_string_lossy();
        let mut out = cellcrypt_core::redact::mask_generated_keys(&text);
        if statement_has_key {
            out = cellcrypt_core::redact::redact_quoted(&out);
        }
        if out != text {
            if let Ok(c) = CString::new(out) {
                *field = pg_sys::pstrdup(c.as_ptr());
            }
        }
    }
}
