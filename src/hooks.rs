//! `emit_log_hook`: the last look at every error before it reaches the log and the client.
//!
//! When PostgreSQL itself refuses EXECUTE on one of our guarded functions ("permission denied
//! for function decrypt"), the hook adds a hint that names the role that grants it, so every
//! refusal tells the user what to ask for.

use pgrx::pg_sys;
use std::ffi::CStr;

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once, single-threaded, in the postmaster.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
    }
}

/// Refusals by PostgreSQL's EXECUTE check, and the hint that names the role to ask for.
const ROLE_HINTS: [(&[u8], &CStr); 2] = [
    (
        b"permission denied for function decrypt",
        c"Only superusers and members of role data_encryption_reader may decrypt. Ask an administrator to run GRANT data_encryption_reader TO <your role>.",
    ),
    (
        b"permission denied for function retrieve_data_encryption_key",
        c"Only superusers and members of role data_encryption_admin manage the data encryption key. Ask an administrator to run GRANT data_encryption_admin TO <your role>.",
    ),
];

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    if let Some(e) = edata.as_mut() {
        if e.sqlerrcode == PERMISSION_DENIED_CODE && !e.message.is_null() && e.hint.is_null() {
            let msg = CStr::from_ptr(e.message).to_bytes();
            if let Some((_, hint)) = ROLE_HINTS.iter().find(|(prefix, _)| msg.starts_with(prefix)) {
                // ErrorData strings live in ErrorContext, where the hook is called.
                e.hint = pg_sys::pstrdup(hint.as_ptr());
            }
        }
    }
    if let Some(prev) = PREV_EMIT_LOG_HOOK {
        prev(edata);
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
