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

// The roles, created if missing (they are cluster-wide and may exist already: made by this
// extension in another database, or by an administrator beforehand). A role of one of these
// names that someone could have made for themselves is refused, not adopted: one that can log
// in or has any role attribute, or on which a non-superuser holds ADMIN OPTION (PostgreSQL 16
// and later give that to the CREATEROLE role that creates a role). Whoever holds ADMIN OPTION
// could grant it to anyone later, so the extension's keys would be theirs.
pgrx::extension_sql!(
    r#"
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT a.rolname,
               a.rolsuper OR a.rolcanlogin OR a.rolcreaterole OR a.rolcreatedb OR a.rolreplication OR a.rolbypassrls AS powers,
               (SELECT pg_catalog.string_agg(h.rolname::pg_catalog.text, ', ')
                  FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles h ON h.oid OPERATOR(pg_catalog.=) m.member
                 WHERE m.roleid OPERATOR(pg_catalog.=) a.oid AND m.admin_option AND NOT h.rolsuper) AS admins
          FROM pg_catalog.pg_roles a
         WHERE a.rolname OPERATOR(pg_catalog.=) ANY ('{data_encryption_reader,data_encryption_admin}'::pg_catalog.name[])
    LOOP
        IF r.powers OR r.admins IS NOT NULL THEN
            RAISE EXCEPTION 'role "%" already exists, and pg_cellcrypt will not adopt it', r.rolname
                USING ERRCODE = 'duplicate_object',
                      DETAIL = CASE WHEN r.admins IS NOT NULL
                                    THEN pg_catalog.format('Non-superuser roles hold ADMIN OPTION on it (%s): they could grant it to anyone, themselves included.', r.admins)
                                    ELSE 'It can log in or has role attributes (SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS); pg_cellcrypt''s roles are plain NOLOGIN groups.' END,
                      HINT = pg_catalog.format('Find out who created role %I. If it is not yours, DROP ROLE %I; otherwise make it a plain group (ALTER ROLE %I NOLOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS) and revoke ADMIN OPTION on it from non-superusers. Then run CREATE EXTENSION pg_cellcrypt again.', r.rolname, r.rolname, r.rolname);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'data_encryption_reader') THEN
        CREATE ROLE data_encryption_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'data_encryption_admin') THEN
        CREATE ROLE data_encryption_admin NOLOGIN;
    END IF;
END
$$;
"#,
    name = "roles"
);
