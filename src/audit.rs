//! The audit record of key operations.
//!
//! Every set, restore, retrieve and refused attempt appends one line to
//! `<key_directory>/<system identifier>_<database oid>.audit`: when, who (session and current
//! role), the client address, the action, the outcome, the key version and fingerprint, and a
//! reason. The record lives outside the database on purpose: a refused or failed call rolls its
//! transaction back, and a table row written by it would vanish with it. A change's outcome is
//! recorded twice: `started` when the call ran, then `committed` or `rolled back` when its
//! transaction ended.
//!
//! The record never holds a key: callers pass only versions, fingerprints and reasons that are
//! built by this extension. Administrators read it through the `data_encryption_audit` view;
//! PUBLIC cannot. Lines are tab-separated, with `\t`, `\n` and `\\` escaped.
//!
//! The file is append-only. At `pg_cellcrypt.audit_max_size` it is closed (renamed
//! `<name>.<unix microseconds>`, kept) and a new one started; the view reads every file, oldest
//! first, line by line.

use crate::backend_local::BackendLocal;
use pgrx::prelude::*;
use std::cell::RefCell;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgLwLock};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

/// One event.
pub struct Event<'a> {
    pub action: &'a str,
    pub outcome: &'a str,
    pub key_version: Option<u32>,
    pub fingerprint: Option<&'a str>,
    pub detail: &'a str,
}

fn path() -> std::path::PathBuf {
    // SAFETY: backend globals.
    let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
    crate::gucs::key_directory().join(format!("{sysid}_{}.audit", dboid.to_u32()))
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A role's name. Looked up only inside a transaction (an event is also recorded from the
/// commit and abort callbacks, where catalogs must not be read): names found are remembered, so
/// those records still name the roles the transaction's own records named.
fn role_name(oid: pg_sys::Oid) -> String {
    static NAMES: BackendLocal<RefCell<Vec<(pg_sys::Oid, String)>>> = BackendLocal::new(RefCell::new(Vec::new()));
    // SAFETY: a backend state check; GetUserNameFromId with noerr returns NULL for a dropped role.
    unsafe {
        if !pg_sys::IsTransactionState() {
            return NAMES
                .with(|n| n.borrow().iter().find(|(o, _)| *o == oid).map(|(_, n)| n.clone()))
                .unwrap_or_else(|| format!("role {}", oid.to_u32()));
        }
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            return format!("role {}", oid.to_u32());
        }
        let name = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        NAMES.with(|n| {
            let mut n = n.borrow_mut();
            n.retain(|(o, _)| *o != oid);
            if n.len() >= 16 {
                n.remove(0);
            }
            n.push((oid, name.clone()));
        });
        name
    }
}

/// The client's address: an IP address, `local` for a Unix socket, or empty for no client.
pub fn client_address() -> String {
    // SAFETY: MyBEEntry is this backend's own status entry; the address is a sockaddr_storage
    // whose family says how to read it.
    unsafe {
        if pg_sys::MyProcPort.is_null() {
            return String::new();
        }
        let Some(entry) = pg_sys::MyBEEntry.as_ref() else { return String::new() };
        let ss = &entry.st_clientaddr.addr as *const _ as *const libc::sockaddr_storage;
        match i32::from((*ss).ss_family) {
            libc::AF_UNIX => "local".to_owned(),
            libc::AF_INET => {
                let sin = &*(ss as *const libc::sockaddr_in);
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string()
            }
            libc::AF_INET6 => {
                let sin6 = &*(ss as *const libc::sockaddr_in6);
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_string()
            }
            _ => String::new(),
        }
    }
}

/// Refused calls recorded per minute and role. Anyone can make calls that are refused, so
/// recording each would let any role grow the file and its fsyncs without bound; counting per
/// role keeps one role's flood from hiding another's refusals.
pub const REFUSALS_PER_MINUTE: u32 = 60;

/// Roles counted at once; beyond that, the role whose count is oldest gives way.
const REFUSAL_SLOTS: usize = 64;

/// One role's refused calls in one minute.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct RefusalSlot {
    role: u32,
    minute: u32,
    count: u32,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct RefusalSlots([RefusalSlot; REFUSAL_SLOTS]);

impl Default for RefusalSlots {
    fn default() -> Self {
        RefusalSlots([RefusalSlot { role: 0, minute: 0, count: 0 }; REFUSAL_SLOTS])
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for RefusalSlots {}

static REFUSALS: PgLwLock<RefusalSlots> = unsafe { PgLwLock::new(c"pg_cellcrypt refused calls") };

/// Requests the shared memory; from `_PG_init`.
pub fn init() {
    pg_shmem_init!(REFUSALS);
}

/// How many refused calls of `role` this one is in the current minute (1 for the first).
fn count_refusal(role: u32, now_secs: u64) -> u32 {
    let minute = (now_secs / 60) as u32;
    let mut slots = REFUSALS.exclusive();
    let slots = &mut slots.0;
    let i = slots
        .iter()
        .position(|s| s.role == role && s.count > 0)
        .unwrap_or_else(|| (0..REFUSAL_SLOTS).min_by_key(|&i| (slots[i].count > 0, slots[i].minute)).unwrap_or(0));
    let slot = &mut slots[i];
    if slot.role != role || slot.minute != minute {
        *slot = RefusalSlot { role, minute, count: 0 };
    }
    slot.count = slot.count.saturating_add(1);
    slot.count
}

/// Appends one event, durably. Refused calls are recorded up to [`REFUSALS_PER_MINUTE`] a
/// minute per session role; that role's next one in that minute is recorded as a note that
/// further ones are not. Never raises: an audit failure is reported as a WARNING and the
/// operation's own outcome stands. Safe to call from error and transaction-end callbacks.
pub fn record(e: &Event) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let bounded;
    let e = if e.outcome == "refused" {
        // SAFETY: a backend global.
        let role = unsafe { pg_sys::GetSessionUserId() }.to_u32();
        match count_refusal(role, (now / 1_000_000) as u64) {
            n if n <= REFUSALS_PER_MINUTE => e,
            n if n == REFUSALS_PER_MINUTE + 1 => {
                bounded = Event {
                    action: e.action,
                    outcome: "refused",
                    key_version: None,
                    fingerprint: None,
                    detail: "more refused calls of this role in this minute: they are not recorded (at most 60 a minute per role are)",
                };
                &bounded
            }
            _ => return,
        }
    } else {
        e
    };
    // SAFETY: backend globals.
    let (session, current) = unsafe { (pg_sys::GetSessionUserId(), pg_sys::GetUserId()) };
    let line = format!(
        "{now}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
        escape(&role_name(session)),
        escape(&role_name(current)),
        escape(&client_address()),
        escape(e.action),
        escape(e.outcome),
        e.key_version.map(|v| v.to_string()).unwrap_or_default(),
        escape(e.fingerprint.unwrap_or("")),
        escape(e.detail),
    );
    let p = path();
    if let Err(err) = append(&p, line.as_bytes()) {
        pgrx::warning!("pg_cellcrypt could not write its audit record \"{}\": {err}", p.display());
    }
}

/// Appends `line` to the audit file `p`, under an exclusive `flock` of the file, so that writers
/// of all backends take turns. When the line would take the file past
/// `pg_cellcrypt.audit_max_size`, the file is first renamed `<name>.<unix microseconds>` (kept,
/// never rewritten) and a new one started. A writer that opened a file another one has just
/// renamed notices (another inode at the path) and opens the new one.
fn append(p: &std::path::Path, line: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    if let Some(dir) = p.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let max = crate::gucs::AUDIT_MAX_SIZE_KB.get().max(64) as u64 * 1024;
    loop {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(p)?;
        // SAFETY: flock on a descriptor we own; released when it is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mine = f.metadata()?;
        match std::fs::metadata(p) {
            Ok(m) if m.ino() == mine.ino() => {}
            // Renamed by another writer since it was opened: open the new file.
            _ => continue,
        }
        if mine.len() > 0 && mine.len() + line.len() as u64 > max {
            match close(p) {
                Ok(()) => continue,
                // A file that cannot be closed (the directory not writable) keeps growing:
                // losing records would be worse.
                Err(e) => pgrx::warning!("pg_cellcrypt could not start a new audit file after \"{}\": {e}", p.display()),
            }
        }
        if let Err(e) = f.write_all(line) {
            // Never leave half a line: the next record would merge with it. (The lock is held.)
            let _ = f.set_len(mine.len());
            return Err(e);
        }
        return f.sync_data();
    }
}

/// Renames the current audit file `<name>.<unix microseconds>`, never over an existing one (a
/// stamp already taken, the clock stepped back: the next free one above the newest), under the
/// writers' lock.
fn close(p: &std::path::Path) -> std::io::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let newest = files().iter().rev().nth(1).and_then(|f| f.extension()).and_then(|e| e.to_str()).and_then(|e| e.parse::<u128>().ok()).unwrap_or(0);
    let mut stamp = now.max(newest + 1);
    let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let closed = loop {
        let c = p.with_file_name(format!("{name}.{stamp:020}"));
        if !c.exists() {
            break c;
        }
        stamp += 1;
    };
    std::fs::rename(p, &closed)?;
    if let Some(dir) = p.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The audit files of this database, oldest first: the closed ones (`<name>.<time>`, in time
/// order), then the current one.
fn files() -> Vec<std::path::PathBuf> {
    let p = path();
    let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut closed: Vec<std::path::PathBuf> = p
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|list| {
            list.flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(&name)).and_then(|r| r.strip_prefix('.')).is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                })
                .collect()
        })
        .unwrap_or_default();
    closed.sort();
    closed.push(p);
    closed
}

fn io_error(e: std::io::Error) -> ! {
    crate::errors::raise(
        pgrx::PgSqlErrorCode::ERRCODE_IO_ERROR,
        format!("could not read the pg_cellcrypt audit record: {e}"),
        None,
        Some("Check pg_cellcrypt.key_directory and its permissions."),
    )
}

/// `data_encryption_audit()`: the audit record of this database, oldest first.
/// Superusers and `data_encryption_admin` only (EXECUTE is revoked from PUBLIC).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn data_encryption_audit() -> TableIterator<
    'static,
    (
        name!(at, pgrx::datum::TimestampWithTimeZone),
        name!(session_role, String),
        name!(current_role, String),
        name!(client_addr, String),
        name!(action, String),
        name!(outcome, String),
        name!(key_version, Option<i32>),
        name!(fingerprint, Option<String>),
        name!(detail, String),
    ),
> {
    crate::policy::require_admin("data_encryption_audit()");
    // Read line by line, file after file, as rows are asked for, each file opened only when
    // reached: memory and open files stay bounded whatever the record's size. The current file
    // is opened first: should it be closed (renamed) right after, it shows up in the listing
    // made next as well, and is read once (by inode).
    use std::os::unix::fs::MetadataExt;
    let current = match std::fs::File::open(path()) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => io_error(e),
    };
    let current_ino = current.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.ino());
    let mut closed = files();
    closed.pop();
    let readers = closed
        .into_iter()
        .filter_map(move |f| match std::fs::File::open(&f) {
            Ok(file) if file.metadata().ok().map(|m| m.ino()) == current_ino => None,
            Ok(file) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => io_error(e),
        })
        .chain(current)
        .map(std::io::BufReader::new);
    let rows = readers.flat_map(|mut r| {
        std::iter::from_fn(move || {
            let mut buf = Vec::new();
            match std::io::BufRead::read_until(&mut r, b'\n', &mut buf) {
                Ok(0) => None,
                Ok(_) => Some(String::from_utf8_lossy(&buf).trim_end_matches('\n').to_owned()),
                Err(e) => io_error(e),
            }
        })
    })
    .filter_map(|line| {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 9 {
            return None;
        }
        let micros: i64 = f[0].parse().unwrap_or(0);
        // Unix epoch to PostgreSQL epoch (2000-01-01).
        let pg_micros = micros - 946_684_800_000_000;
        let at = pgrx::datum::TimestampWithTimeZone::try_from(pg_micros).unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::try_from(0i64).unwrap());
        Some((
            at,
            unescape(f[1]),
            unescape(f[2]),
            unescape(f[3]),
            unescape(f[4]),
            unescape(f[5]),
            f[6].parse::<i32>().ok(),
            Some(unescape(f[7])).filter(|s| !s.is_empty()),
            unescape(f[8]),
        ))
    });
    TableIterator::new(rows)
}
