//! Key providers: where a database's current key lives outside the database.
//!
//! Chosen with `pg_cellcrypt.key_provider`:
//!
//! | provider | where the key is | after a restart | on a key change |
//! |---|---|---|---|
//! | `file` (default) | `<key_directory>/<system identifier>_<database oid>.key`, mode 0600 in a 0700 directory, written atomically and fsynced | read from the file, no manual step | the extension writes the new key |
//! | `command` | printed by `pg_cellcrypt.key_command` (a KMS, Vault or HSM client): one bare key, or the key file's format | the command is run, no manual step | the extension never writes through it: the administrator adds the new key to the key source first, and the change is refused until the command prints it |
//! | `none` | only in shared memory | must be restored with `set_data_encryption_key` | held in shared memory |
//!
//! Whatever the provider, a key is accepted only when it matches the fingerprint stored in the
//! database, and the shared key cache ([`crate::key_cache`]) spares other backends the provider
//! and the key derivation once one backend has the key.
//!
//! Naming the key file after the cluster's system identifier means a database restored into
//! another cluster never picks up a key it was not given. `pg_upgrade` is the one copy that
//! should: it copies `cellcrypt.key_location` with the tables, and the first use of the key in
//! the upgraded cluster copies the old cluster's key file under the new name
//! ([`file::read_all`]).

use crate::gucs::{self, KeyProvider};
use pgrx::pg_sys;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The provider in effect.
pub fn current() -> KeyProvider {
    gucs::KEY_PROVIDER.get()
}

pub fn name(p: KeyProvider) -> &'static str {
    match p {
        KeyProvider::File => "file",
        KeyProvider::Command => "command",
        KeyProvider::None => "none",
    }
}

/// The keys the provider has for this database, as `(version, key text)`. A bare key (as a
/// command prints it) has version `None`: it is meant to be the current one.
pub fn read() -> Result<Vec<(Option<u32>, Zeroizing<String>)>, String> {
    match current() {
        KeyProvider::File => Ok(file::read_all()?.into_iter().map(|(v, k)| (Some(v), k)).collect()),
        KeyProvider::Command => command::keys(),
        KeyProvider::None => Ok(Vec::new()),
    }
}

/// What identifies the key source as it is now, without reading it: the provider settings and,
/// for the `file` provider, the key file's inode, size and modification time. A failed key load
/// is retried at once when this changes (a reload with another command, a key file copied in).
pub fn stamp() -> u64 {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name(current()).hash(&mut h);
    gucs::key_command().hash(&mut h);
    gucs::key_directory().hash(&mut h);
    if current() == KeyProvider::File {
        std::fs::metadata(file::path()).ok().map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec())).hash(&mut h);
    }
    h.finish()
}

/// The `file` provider.
pub mod file {
    use super::*;

    /// `<key_directory>/<system identifier>_<database oid>.key`
    pub fn path() -> PathBuf {
        // SAFETY: plain reads of backend globals.
        let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
        gucs::key_directory().join(format!("{sysid}_{}.key", dboid.to_u32()))
    }

    /// Every `(version, key)` the file holds. A missing file holds nothing, unless this cluster
    /// was made from another by `pg_upgrade` (see [`after_upgrade`]).
    pub fn read_all() -> Result<Vec<(u32, Zeroizing<String>)>, String> {
        match read_file(&path())? {
            Some(entries) => Ok(entries),
            None => after_upgrade(),
        }
    }

    fn read_file(p: &std::path::Path) -> Result<Option<Vec<(u32, Zeroizing<String>)>>, String> {
        let text = match std::fs::read_to_string(p) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("could not read key file \"{}\": {e}", p.display())),
        };
        parse(&text).map(Some).map_err(|()| format!("key file \"{}\" is malformed", p.display()))
    }

    /// The keys of a database whose tables `pg_upgrade` copied from another cluster. The
    /// upgrade gives the cluster a new system identifier, so this cluster's key file name is
    /// not the one the key was written under; `cellcrypt.key_location` (copied with the tables,
    /// never by pg_dump) names the system identifiers and key directories the file was last
    /// written under. When it names another system identifier for this very database OID and
    /// this very table (pg_upgrade keeps database and table OIDs), the old file, in the old key
    /// directory or in this one, is read; its key is verified against the keyring; then it is
    /// copied under this cluster's name, never over a file already there. The same step copies
    /// the old cluster's key files of every other database of this cluster (templates
    /// included, whose keys nobody loads), so the old key directory is needed once only. A dump
    /// restored elsewhere, a template copy or a base backup never gets a key this way.
    fn after_upgrade() -> Result<Vec<(u32, Zeroizing<String>)>, String> {
        let Some(recorded) = crate::store::key_location() else { return Ok(Vec::new()) };
        let here = crate::store::this_key_location();
        if recorded.database_oid != here.database_oid || recorded.table_oid != here.table_oid {
            return Ok(Vec::new());
        }
        let mut error = None;
        for (sysid, dir) in recorded.origins() {
            // A system identifier is a number: anything else is not a name to build a path from.
            if sysid == here.system_identifier || sysid.parse::<u64>().is_err() {
                continue;
            }
            let name = format!("{sysid}_{}.key", here.database_oid.to_u32());
            for dir in [PathBuf::from(dir), gucs::key_directory()] {
                let from = dir.join(&name);
                let entries = match read_file(&from) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        error.get_or_insert(e);
                        continue;
                    }
                };
                if !crate::keys::file_holds_current_key(&entries) {
                    continue;
                }
                let kept = match write_new(&entries) {
                    Ok(true) => {
                        pgrx::log!(
                            "pg_cellcrypt: this cluster was upgraded from system identifier {sysid}: key file \"{}\" copied to \"{}\"",
                            from.display(),
                            path().display()
                        );
                        copy_siblings(&dir, &sysid);
                        entries
                    }
                    // A key call wrote this cluster's file meanwhile: it is the one to use.
                    Ok(false) => return read_file(&path()).map(Option::unwrap_or_default),
                    Err(e) => {
                        pgrx::warning!("pg_cellcrypt: read the key file \"{}\" of the cluster this one was upgraded from, but {e}", from.display());
                        entries
                    }
                };
                return Ok(kept);
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(Vec::new()),
        }
    }

    /// After an upgrade: copies the old cluster's key files (`<sysid>_<oid>.key` in `dir`) of
    /// the databases of this cluster whose keys nothing loads at start (templates, and
    /// databases that do not accept connections) under this cluster's names, where none
    /// exists. The others adopt their own, verified, when their worker starts.
    fn copy_siblings(dir: &std::path::Path, sysid: &str) {
        let Ok(list) = std::fs::read_dir(dir) else { return };
        // SAFETY: plain reads of backend globals.
        let (here, me) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
        let prefix = format!("{sysid}_");
        for entry in list.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(oid) = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".key")).and_then(|o| o.parse::<u32>().ok()) else {
                continue;
            };
            let oid = pg_sys::Oid::from(oid);
            if oid == me || !unvisited_database(oid) {
                continue;
            }
            let target = gucs::key_directory().join(format!("{here}_{}.key", oid.to_u32()));
            let copied = read_file(&entry.path()).and_then(|e| write_new_at(&target, &e.unwrap_or_default()));
            match copied {
                Ok(true) => pgrx::log!("pg_cellcrypt: key file \"{}\" copied to \"{}\"", entry.path().display(), target.display()),
                Ok(false) => {}
                Err(e) => pgrx::warning!("pg_cellcrypt: could not copy the key file \"{}\" of the cluster this one was upgraded from: {e}", entry.path().display()),
            }
        }
    }

    /// The key file format: `<version> <key>` per line; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Result<Vec<(u32, Zeroizing<String>)>, ()> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (v, k) = line.split_once(' ').ok_or(())?;
            let v: u32 = v.parse().map_err(|_| ())?;
            out.push((v, Zeroizing::new(k.trim().to_owned())));
        }
        Ok(out)
    }

    /// The first line the extension writes; a command's output that starts with it is read in
    /// this format.
    pub const HEADER: &str = "# pg_cellcrypt";

    /// True for a database of this cluster whose key no worker loads at start: a template, or
    /// one that does not accept connections.
    fn unvisited_database(oid: pg_sys::Oid) -> bool {
        // SAFETY: a syscache lookup inside a transaction, released below.
        unsafe {
            let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::DATABASEOID as i32, pg_sys::Datum::from(oid));
            if tup.is_null() {
                return false;
            }
            let db = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
            let unvisited = (*db).datistemplate || !(*db).datallowconn;
            pg_sys::ReleaseSysCache(tup);
            unvisited
        }
    }

    /// Creates this database's key file with `entries`, unless it exists: true when written.
    fn write_new(entries: &[(u32, Zeroizing<String>)]) -> Result<bool, String> {
        write_new_at(&path(), entries)
    }

    /// Creates key file `p` with `entries` atomically and durably, never replacing a file that
    /// is there (a key call may have written it meanwhile): true when written.
    fn write_new_at(p: &std::path::Path, entries: &[(u32, Zeroizing<String>)]) -> Result<bool, String> {
        let refs: Vec<(u32, &str)> = entries.iter().map(|(v, k)| (*v, k.as_str())).collect();
        write_file(p, &refs, false)
    }

    /// Replaces the file's contents atomically and durably: temporary file, fsync, rename,
    /// fsync of the directory. A crash leaves either the old or the new file, never a mix.
    pub fn write_all(entries: &[(u32, &str)]) -> Result<(), String> {
        write_file(&path(), entries, true).map(|_| ())
    }

    /// Writes key file `p` through a temporary file; with `replace` false, links it in only
    /// where no file is (false when one was).
    fn write_file(p: &std::path::Path, entries: &[(u32, &str)], replace: bool) -> Result<bool, String> {
        let p = p.to_path_buf();
        let dir = p.parent().expect("key path has a directory").to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("could not create key directory \"{}\": {e}", dir.display()))?;
        let mut body = Zeroizing::new(String::from(
            "# pg_cellcrypt data encryption keys, one '<version> <key>' per line. Keep this file secret and back it up:\n# without it the encrypted data of this database cannot be read.\n",
        ));
        for (v, k) in entries {
            body.push_str(&format!("{v} {k}\n"));
        }
        let tmp = dir.join(format!(".{}.tmp{}", p.file_name().unwrap().to_string_lossy(), std::process::id()));
        let write = || -> std::io::Result<bool> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            let written = if replace {
                std::fs::rename(&tmp, &p)?;
                true
            } else {
                // link() fails where a file exists: nothing is ever replaced. Where the file
                // system has no hard links, an exclusive create does the same (not atomic
                // against a crash, which at worst leaves a file the keyring rejects).
                let linked = match std::fs::hard_link(&tmp, &p) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(_) => match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p) {
                        Ok(mut f) => {
                            f.write_all(body.as_bytes())?;
                            f.sync_all()?;
                            true
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                        Err(e) => return Err(e),
                    },
                };
                std::fs::remove_file(&tmp)?;
                linked
            };
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(written)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("could not write key file \"{}\": {e}", p.display())
        })
    }
}

/// The `command` provider.
pub mod command {
    use super::*;

    /// The keys the command prints: either one bare key (the current one), or, when its output
    /// starts with a line beginning `# pg_cellcrypt`, the key file format (`<version> <key>` per
    /// line), which can hold the current key and the next one while a change is made.
    pub fn keys() -> Result<Vec<(Option<u32>, Zeroizing<String>)>, String> {
        let out = run()?;
        if out.starts_with(super::file::HEADER) {
            let entries = super::file::parse(&out).map_err(|()| "pg_cellcrypt.key_command printed a malformed key list".to_owned())?;
            Ok(entries.into_iter().map(|(v, k)| (Some(v), k)).collect())
        } else if out.chars().any(char::is_control) {
            Err(format!(
                "pg_cellcrypt.key_command printed several lines (or control characters) without a first line starting with \"{}\": print one key, or the key file format",
                super::file::HEADER
            ))
        } else {
            Ok(vec![(None, out)])
        }
    }

    /// The process group of the command running now (0: none), for [`kill_running`].
    static RUNNING: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

    /// Kills the process group of a command still running when this backend exits: a FATAL
    /// (pg_terminate_backend, a shutdown) leaves without unwinding, so [`Reaped`] cannot.
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn kill_running(_code: i32, _arg: pg_sys::Datum) {
        let pgid = RUNNING.swap(0, std::sync::atomic::Ordering::SeqCst);
        if pgid > 0 {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }

    /// The command's process: when dropped, its whole process group is killed while its
    /// leader is not yet reaped (so the group id cannot have been reused), then it is reaped.
    /// No process is left behind, and no zombie.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let pgid = self.0.id() as libc::pid_t;
            // SAFETY: signals the process group this backend created (process_group(0)), and
            // the leader itself (it may have left the group); neither id can have been reused,
            // the leader being unreaped.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
                libc::kill(pgid, libc::SIGKILL);
            }
            let _ = self.0.wait();
            RUNNING.store(0, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The exit of process `pid`, if it has exited, without reaping it (`WNOWAIT`): its exit
    /// code, or None when a signal ended it.
    fn exited(pid: libc::pid_t) -> Result<Option<Option<i32>>, String> {
        // SAFETY: waitid on our own child, with a zeroed siginfo it fills.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) != 0 {
                return Err(format!("could not wait for pg_cellcrypt.key_command: {}", std::io::Error::last_os_error()));
            }
            if info.si_pid() == 0 {
                return Ok(None);
            }
            Ok(Some((info.si_code == libc::CLD_EXITED).then(|| info.si_status())))
        }
    }

    /// Sleeps up to `d` on the latch, then lets a pending cancel or terminate raise.
    fn wait_interruptibly(d: Duration) {
        // SAFETY: the backend's own latch; CHECK_FOR_INTERRUPTS raises through pgrx's guard,
        // which unwinds this function's frames (and so kills the command, see Reaped).
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                d.as_millis() as libc::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
        // A background worker is told to stop by SIGTERM, which raises nothing: it exits (to be
        // started again), and kill_running stops the command.
        // SAFETY: a backend global; sigterm_received is only asked in a background worker.
        if unsafe { !pg_sys::MyBgworkerEntry.is_null() } && pgrx::bgworkers::BackgroundWorker::sigterm_received() {
            unsafe { pg_sys::proc_exit(1) };
        }
    }

    /// Runs `pg_cellcrypt.key_command` with `sh -c` and returns what it printed, trimmed. The
    /// command learns which key is wanted from its environment:
    /// `PG_CELLCRYPT_DATABASE` (name), `PG_CELLCRYPT_DATABASE_OID`, `PG_CELLCRYPT_SYSTEM_IDENTIFIER`.
    /// Its stderr goes to the server log; its stdout is never logged.
    pub fn run() -> Result<Zeroizing<String>, String> {
        let cmd = gucs::key_command().ok_or_else(|| "pg_cellcrypt.key_provider is \"command\" but pg_cellcrypt.key_command is empty".to_owned())?;
        // SAFETY: backend globals and a syscache lookup inside a transaction.
        let (sysid, dboid, dbname) = unsafe {
            let oid = pg_sys::MyDatabaseId;
            let n = pg_sys::get_database_name(oid);
            let name = if n.is_null() { String::new() } else { std::ffi::CStr::from_ptr(n).to_string_lossy().into_owned() };
            (pg_sys::GetSystemIdentifier(), oid.to_u32(), name)
        };
        // SAFETY: pre_exec runs async-signal-safe calls only (prctl, getppid, close_range,
        // getrlimit, fcntl, _exit).
        let parent = unsafe { libc::getpid() };
        let child = unsafe {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .env("PG_CELLCRYPT_DATABASE", dbname)
                .env("PG_CELLCRYPT_DATABASE_OID", dboid.to_string())
                .env("PG_CELLCRYPT_SYSTEM_IDENTIFIER", sysid.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                // Its own process group, so that a timeout or a cancel stops what it started too;
                // killed if this backend dies; none of the backend's files (the client's socket,
                // data files) kept open in it.
                .process_group(0)
                .pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The backend may have died between fork and prctl.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0 {
                        // An older kernel: mark them one by one.
                        let mut limit: libc::rlimit = std::mem::zeroed();
                        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur.min(1 << 20) as i32 } else { 4096 };
                        for fd in 3..max {
                            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        }
                    }
                    Ok(())
                })
                .spawn()
                .map_err(|e| format!("could not run pg_cellcrypt.key_command: {e}"))?
        };
        // From here on, however this function is left (an error, a timeout, a query cancel that
        // raises out of the wait below), the command's process group is killed and reaped.
        static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !REGISTERED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: registers a callback run at this backend's exit.
            unsafe { pg_sys::on_proc_exit(Some(kill_running), pg_sys::Datum::from(0)) };
        }
        RUNNING.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
        let mut child = Reaped(child);
        // Read without blocking, so a command that hangs is stopped at the timeout.
        let mut stdout = child.0.stdout.take().expect("piped stdout");
        {
            use std::os::fd::AsRawFd;
            let fd = stdout.as_raw_fd();
            // SAFETY: fcntl on a pipe we own.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        }
        let mut out = Zeroizing::new(Vec::new());
        let mut chunk = Zeroizing::new([0u8; 4096]);
        let started = Instant::now();
        let timeout = Duration::from_secs(gucs::KEY_COMMAND_TIMEOUT.get().max(1) as u64);
        let mut eof = false;
        let status = loop {
            while !eof {
                match stdout.read(&mut chunk[..]) {
                    Ok(0) => eof = true,
                    Ok(n) if out.len() + n <= 64 * 1024 => out.extend_from_slice(&chunk[..n]),
                    Ok(_) => return Err("pg_cellcrypt.key_command printed more than 64 kB".to_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("could not read the output of pg_cellcrypt.key_command: {e}")),
                }
            }
            match exited(child.0.id() as libc::pid_t)? {
                Some(code) if eof => break code,
                _ if started.elapsed() > timeout => {
                    return Err(format!("pg_cellcrypt.key_command did not finish within {} seconds (pg_cellcrypt.key_command_timeout)", timeout.as_secs()))
                }
                _ => wait_interruptibly(Duration::from_millis(5)),
            }
        };
        drop(child);
        match status {
            Some(0) => {}
            Some(code) => return Err(format!("pg_cellcrypt.key_command failed (exit status {code})")),
            None => return Err("pg_cellcrypt.key_command was ended by a signal".to_owned()),
        }
        let text = std::str::from_utf8(&out).map_err(|_| "pg_cellcrypt.key_command printed something that is not UTF-8".to_owned())?;
        let key = Zeroizing::new(text.trim().to_owned());
        if key.is_empty() {
            return Err("pg_cellcrypt.key_command printed nothing".to_owned());
        }
        Ok(key)
    }
}
