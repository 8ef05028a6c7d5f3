//! `emit_log_hook`: the last look at every message before it reaches the server log and the
//! client. It does three things:
//!
//! 1. **Keeps keys out of the log.** When the statement being run mentions
//!    `set_data_encryption_key`, the statement is not logged with errors (`hide_stmt`), and every
//!    quoted string in PostgreSQL's own messages (the logged statement, its parameters, a syntax
//!    error), their detail and their context is replaced by `'<redacted>'`.
//!    That covers `log_statement`, `log_min_duration_statement`, `log_min_error_statement` and
//!    the parameters the extended protocol logs. Independently, anything shaped like a
//!    generated key (`CCK1-` followed by key characters) is masked in every message.
//! 2. **Names the role in refusals.** When PostgreSQL itself refuses EXECUTE on one of our
//!    guarded functions ("permission denied for function decrypt"), it adds a hint that names
//!    the role that grants it.
//! 3. **Audits refused key calls.** Such a refusal of a key function is also recorded in the
//!    audit record, since our own code never ran.

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

const READER_HINT: &CStr = c"Only superusers and members of role data_encryption_reader may decrypt. Ask an administrator to run GRANT data_encryption_reader TO <your role>.";
const ADMIN_HINT: &CStr = c"Only superusers and members of role data_encryption_admin manage the data encryption key. Ask an administrator to run GRANT data_encryption_admin TO <your role>.";

/// Refusals by PostgreSQL's privilege checks: the hint that names the role to ask for, and
/// whether the refusal is an audited key call.
const ROLE_HINTS: [(&str, &CStr, bool); 7] = [
    ("permission denied for function decrypt", READER_HINT, false),
    ("permission denied for function retrieve_data_encryption_key", ADMIN_HINT, true),
    ("permission denied for function set_data_encryption_key", ADMIN_HINT, true),
    ("permission denied for function data_encryption_status", ADMIN_HINT, false),
    ("permission denied for function data_encryption_audit", ADMIN_HINT, false),
    ("permission denied for view data_encryption_status", ADMIN_HINT, false),
    ("permission denied for view data_encryption_audit", ADMIN_HINT, false),
];

const KEY_FUNCTION: &str = "set_data_encryption_key";

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    if let Some(e) = edata.as_mut() {
        redact(e);
        if e.sqlerrcode == PERMISSION_DENIED_CODE && !e.message.is_null() && e.hint.is_null() {
            let msg = CStr::from_ptr(e.message).to_string_lossy();
            if let Some((prefix, hint, audited)) = ROLE_HINTS.iter().find(|(prefix, _, _)| msg.starts_with(prefix)) {
                // ErrorData strings live in ErrorContext, where the hook is called.
                e.hint = pg_sys::pstrdup(hint.as_ptr());
                if *audited && pg_sys::IsTransactionState() {
                    let function = prefix.rsplit(' ').next().unwrap_or(prefix);
                    crate::audit::record(&crate::audit::Event {
                        action: &format!("{function}()"),
                        outcome: "refused",
                        key_version: None,
                        fingerprint: None,
                        detail: "EXECUTE privilege denied (not a member of data_encryption_admin)",
                    });
                }
            }
        }
    }
    if let Some(prev) = PREV_EMIT_LOG_HOOK {
        prev(edata);
    }
}

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

/// MAKE_SQLSTATE('4','2','5','0','1')
const PERMISSION_DENIED_CODE: i32 = sqlstate(*b"42501");

const fn sqlstate(c: [u8; 5]) -> i32 {
    let mut r = 0i32;
    let mut i = 0;
    while i < 5 {
        r |= (((c[i] - b'0') & 0x3F) as i32) << (6 * i);
        i += 1;
    }
    r
}
