//! The roles the extension creates, and the one membership check every guarded call uses.

use pgrx::pg_sys;
use std::ffi::CStr;

/// May decrypt.
pub const READER: &CStr = c"data_encryption_reader";
/// May manage the data encryption key.
pub const ADMIN: &CStr = c"data_encryption_admin";

/// True when the current user is a superuser or has the privileges of `role`.
pub fn current_user_has(role: &CStr) -> bool {
    // SAFETY: catalog/cache lookups inside a transaction.
    unsafe {
        if pg_sys::superuser() {
            return true;
        }
        let oid = pg_sys::get_role_oid(role.as_ptr(), true);
        oid != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetUserId(), oid)
    }
}

// The roles, created if missing (they are cluster-wide and may exist already).
pgrx::extension_sql!(
    r#"
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'data_encryption_reader') THEN
        CREATE ROLE data_encryption_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'data_encryption_admin') THEN
        CREATE ROLE data_encryption_admin NOLOGIN;
    END IF;
END
$$;
"#,
    name = "roles"
);
