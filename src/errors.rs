//! How pg_cellcrypt raises errors: always a SQLSTATE, a message that says what happened, and
//! where it helps a detail and a hint that say what to do. No message ever carries key material
//! or plaintext.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises an ERROR. Never returns.
#[track_caller]
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, detail: Option<&str>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "pg_cellcrypt");
    if let Some(d) = detail {
        report = report.set_detail(d.to_owned());
    }
    if let Some(h) = hint {
        report = report.set_hint(h.to_owned());
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// A value claims to be an envelope (starts with `$cc$`) but is not well-formed: 22P02.
pub fn invalid_envelope(type_name: &str, reason: &dyn std::fmt::Display) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        format!("invalid input syntax for type {type_name}: malformed encrypted value: {reason}"),
        Some("Text that starts with \"$cc$\" is read as an already encrypted value (as pg_dump writes it) and must be a complete, well-formed envelope."),
        Some("To store plaintext that starts with \"$cc$\", cast it from its plain type, e.g. '...'::text::encrypted_text, which always encrypts."),
    )
}

/// A binary (send/recv) value that is not a well-formed envelope: 22P03.
pub fn invalid_binary_envelope(type_name: &str, reason: &dyn std::fmt::Display) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
        format!("invalid binary value for type {type_name}: {reason}"),
        Some("In binary, an encrypted value is the four bytes CC CC 63 63 followed by the envelope (as binary COPY and binary results give it); anything else is taken as plaintext in the plain type's binary format."),
        Some("Send the value as binary COPY or a binary result gave it, or send the plaintext (text or binary format), which is encrypted."),
    )
}

/// Authentication failed: XX001, saying nothing about the plaintext.
pub fn decryption_failed(type_name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!("could not decrypt a value of type {type_name}: the encrypted value is corrupted or was tampered with"),
        Some("The value's authentication tag does not match: it was altered, truncated, moved from another column type or database, or encrypted under a different key with the same key id."),
        Some("Restore the row from a backup. No plaintext was returned."),
    )
}

/// A plaintext did not parse as its plain type. The value itself is not echoed.
pub fn invalid_plaintext(type_name: &str, plain_type: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        format!("invalid input syntax for type {type_name}: the value is not a valid {plain_type}"),
        Some("The value is not shown, so it cannot leak into the server log."),
        Some(&format!("Check the value against the rules of type {plain_type}.")),
    )
}

/// Binary plaintext the plain type's receive function refused: 22P03, its reason not shown (it
/// may quote the value).
pub fn invalid_binary_plaintext(type_name: &str, plain_type: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
        format!("invalid binary value for type {type_name}: not a valid {plain_type} in binary format, nor an envelope"),
        Some("The value is not shown, so it cannot leak into the server log. In binary, an encrypted value is the four bytes CC CC 63 63 followed by the envelope; anything else is taken as plaintext in the plain type's binary format."),
        Some(&format!("Send the value as type {plain_type} in binary format, or in text format.")),
    )
}

/// Not allowed to decrypt: 42501.
pub fn decrypt_denied() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        "permission denied to decrypt: only superusers and members of role data_encryption_reader may decrypt",
        None,
        Some("Ask an administrator to run GRANT data_encryption_reader TO <your role>."),
    )
}

/// A value names a key version this database does not have: 42704, naming the version.
pub fn unknown_key_version(type_name: &str, key_id: u32, versions: &[u32], doing: &str, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("cannot {doing} a value of type {type_name}: it was encrypted under key version {key_id}, which this database does not have"),
        Some(&format!("This database's key versions in use: {versions:?}.")),
        Some(hint),
    )
}
