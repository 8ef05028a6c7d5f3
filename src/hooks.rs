//! `emit_log_hook`: the last look at every message before it reaches the server log and the
//! client. It keeps keys out of the log: when the statement being run mentions
//!    `set_data_encryption_key`, the statement is not logged with errors (`hide_stmt`), and every
//!    quoted string in PostgreSQL's own messages (the logged statement, its parameters, a syntax
//!    error), their detail and their context is replaced by `'<redacted>'`.
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

pub fn init() {
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
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

unsafe fn contains_key_function(p: *const std::ffi::c_char) -> bool {
    !p.is_null() && CStr::from_ptr(p).to_string_lossy().to_ascii_lowercase().contains(KEY_FUNCTION)
}

unsafe fn redact(e: &mut pg_sys::ErrorData) {
    let statement_has_key = contains_key_function(pg_sys::debug_query_string);
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
