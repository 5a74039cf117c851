//! The data directory as a whole: who may use it, where it lives, and what
//! layout its logs were written for.
//!
//! ```text
//! <data_dir>/            mode 0700; refused at start if group or others have access
//! <data_dir>/lock        flock'ed by the one process using the directory
//! <data_dir>/tern.meta   the recorded layout (below)
//! <data_dir>/shard-<N>/  shard N's message log (see `store::log`), mode 0700
//! ```
//!
//! # `tern.meta`
//!
//! A few `key value` lines, written at the first start and replaced
//! atomically (write `tern.meta.tmp`, fsync, rename, fsync the directory):
//!
//! ```text
//! tern data directory
//! format 1            the format of this file
//! store_format 1      the message log format (store::log::FORMAT_VERSION)
//! shards 2            how many shards the logs are homed for
//! reshard 2 3         only while `tern store reshard` switches layouts
//! ```
//!
//! Users are homed by `home_shard(user, shards)`, so queued messages are
//! only found again under the shard count they were written with. At start
//! ([`DataDir::start`]):
//!
//! - `shards = 0` (the default, "one per core") takes the recorded count.
//! - An explicit `shards` equal to the recorded count starts.
//! - An explicit other count starts only if no shard log holds a queued
//!   message (the new count is recorded); otherwise the start is refused
//!   with an error naming `tern store reshard` (see [`crate::reshard`]).
//! - A data directory without `tern.meta` (written by an earlier version)
//!   gets one: with `shard-<N>` directories present, the recorded count is
//!   the highest `N` plus one; with none, the count this start resolves to.
//! - A `reshard` line (an interrupted reshard) refuses the start until
//!   `tern store reshard` has finished the job.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::privacy;
use crate::store::{self, Durability, LogStore, Store};

/// Name of the layout record in the data directory.
pub const META_FILE: &str = "tern.meta";
/// Format of `tern.meta` this build writes and reads.
pub const META_FORMAT: u32 = 1;
const META_TMP: &str = "tern.meta.tmp";
const META_MAGIC: &str = "tern data directory";
const LOCK_FILE: &str = "lock";
/// How long a start waits for the data directory's lock before refusing:
/// long enough for a stopping process (or a forked child about to exec) to
/// let go; a second server on a directory in use is refused after it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// `tern store reshard` builds the new layout here.
pub(crate) const STAGING_DIR: &str = "reshard.new";
/// `tern store reshard` moves the old layout here before deleting it.
pub(crate) const RETIRED_DIR: &str = "reshard.old";

/// What `tern.meta` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Shards the logs are homed for; at least 1.
    pub shards: usize,
    /// Message log format version ([`store::log::FORMAT_VERSION`]).
    pub store_format: u32,
    /// `(from, to)` while a reshard switches from `from` to `to` shards:
    /// the new layout is complete in `reshard.new` and must be moved in.
    pub reshard: Option<(usize, usize)>,
}

impl Meta {
    fn new(shards: usize) -> Meta {
        Meta {
            shards,
            store_format: store::log::FORMAT_VERSION,
            reshard: None,
        }
    }

    fn to_text(self) -> String {
        let mut text = format!(
            "{META_MAGIC}\nformat {META_FORMAT}\nstore_format {}\nshards {}\n",
            self.store_format, self.shards
        );
        if let Some((from, to)) = self.reshard {
            text.push_str(&format!("reshard {from} {to}\n"));
        }
        text
    }

    fn parse(text: &str) -> Result<Meta, String> {
        let mut lines = text.lines();
        if lines.next() != Some(META_MAGIC) {
            return Err(format!("does not start with {META_MAGIC:?}"));
        }
        let mut format = None;
        let mut store_format = None;
        let mut shards = None;
        let mut reshard = None;
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let number = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| format!("bad value in line {line:?}"))
            };
            match key {
                "format" => format = Some(number(value)?),
                "store_format" => store_format = Some(number(value)?),
                "shards" => shards = Some(number(value)?),
                "reshard" => {
                    let (from, to) = value
                        .split_once(' ')
                        .ok_or_else(|| format!("bad line {line:?}"))?;
                    reshard = Some((number(from)?, number(to)?));
                }
                _ => return Err(format!("unknown line {line:?}")),
            }
        }
        match format {
            Some(f) if f == META_FORMAT as usize => {}
            Some(f) => return Err(format!("format {f}, this build reads format {META_FORMAT}")),
            None => return Err("no format line".to_string()),
        }
        let shards = shards.filter(|&n| n >= 1).ok_or("no valid shards line")?;
        let store_format = store_format.ok_or("no store_format line")? as u32;
        if reshard.is_some_and(|(from, to)| from == 0 || to == 0) {
            return Err("reshard with 0 shards".to_string());
        }
        Ok(Meta {
            shards,
            store_format,
            reshard,
        })
    }
}

/// An open, locked data directory. The lock is held until it is dropped.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// None: no `tern.meta` and no shard log yet, so nothing is homed.
    meta: Option<Meta>,
    _lock: File,
}

impl DataDir {
    /// Opens the data directory for `tern serve`: creates it (0700) if
    /// missing, checks its mode, takes the lock, settles the shard count
    /// (see the module docs) and writes it into `config.shards`, creates the
    /// shard directories (0700) and warns if the directory is on tmpfs or
    /// under a runtime directory. `None`, touching nothing, with
    /// `durability = "memory"`.
    pub fn start(config: &mut Config) -> Result<Option<DataDir>, String> {
        if config.durability == Durability::Memory {
            return Ok(None);
        }
        let path = config.data_dir.clone();
        privacy::create_dir(&path).map_err(|e| format!("data_dir {}: {e}", path.display()))?;
        let mut dir = DataDir::open(&path)?;
        let Some(meta) = dir.meta else {
            dir.write_meta(Meta::new(config.shard_count()))?;
            config.shards = config.shard_count();
            dir.create_shard_dirs(config.shards)?;
            warn_if_volatile(&path);
            return Ok(Some(dir));
        };
        if let Some((from, to)) = meta.reshard {
            return Err(format!(
                "data_dir {}: a `tern store reshard` from {from} to {to} shards was interrupted. \
                 Finish it first: tern store reshard --data-dir {} --shards {to}",
                path.display(),
                path.display()
            ));
        }
        dir.remove_leftovers(true)?;
        if meta.store_format != store::log::FORMAT_VERSION {
            return Err(format!(
                "data_dir {}: {META_FILE} records message log format {}, this build reads \
                 format {}",
                path.display(),
                meta.store_format,
                store::log::FORMAT_VERSION
            ));
        }
        let recorded = meta.shards;
        if config.shards == 0 {
            if recorded != config.shard_count() {
                log::info!(
                    "shards = 0: using the {recorded} shards recorded in {} ({} cores available)",
                    dir.meta_path().display(),
                    config.shard_count()
                );
            }
            config.shards = recorded;
        } else if config.shards != recorded {
            let (queued, id_max) = dir.scan_logs(config)?;
            if queued > 0 {
                return Err(format!(
                    "data_dir {} holds {queued} queued messages homed for {recorded} shards \
                     (recorded in {}), but shards = {} was asked: their users would not find \
                     them. Either move them with the server stopped: tern store reshard \
                     --data-dir {} --shards {}; or start with --shards 0 to use the recorded \
                     {recorded}",
                    path.display(),
                    dir.meta_path().display(),
                    config.shards,
                    path.display(),
                    config.shards
                ));
            }
            // Last seen and privacy settings are homed like messages: a
            // hidden user must not turn visible because the count changed.
            let moved = dir.rehome_presence(config.shards)?;
            // So are registered devices and the receipts waiting for them.
            dir.rehome_devices(config.shards)?;
            if moved > 0 {
                log::info!(
                    "data_dir {}: last seen and privacy of {moved} users moved to their home \
                     shards of {}",
                    path.display(),
                    config.shards
                );
            }
            log::info!(
                "data_dir {} holds no queued message: recording {} shards instead of {recorded}",
                path.display(),
                config.shards
            );
            dir.raise_ids(config, id_max)?;
            dir.write_meta(Meta::new(config.shards))?;
        }
        dir.create_shard_dirs(config.shards)?;
        warn_if_volatile(&path);
        Ok(Some(dir))
    }

    /// Before a start with another shard count (no message queued): moves
    /// every user's last seen and privacy record to its home shard of
    /// `shards`; returns the number of users. Each new file replaces the old
    /// one atomically and holds copies only, so a crash part way leaves
    /// every record in some file and the next start (tern.meta still names
    /// the old count) does it again.
    fn rehome_presence(&self, shards: usize) -> Result<usize, String> {
        use crate::store::presence::{self, PresenceLog};
        let old = self.shard_dirs()?;
        let mut homed = vec![std::collections::HashMap::new(); shards];
        for &k in &old {
            let path = store::shard_dir(&self.path, k);
            let (state, ..) = presence::read(&path)
                .map_err(|e| format!("presence log in {}: {e}", path.display()))?;
            for (user, seen) in state {
                homed[crate::shard::home_shard(user, shards)].insert(user, seen);
            }
        }
        let users = homed.iter().map(|h| h.len()).sum();
        if users == 0 {
            return Ok(0);
        }
        for (j, state) in homed.iter().enumerate() {
            let path = store::shard_dir(&self.path, j);
            PresenceLog::create(&path, state)
                .map_err(|e| format!("presence log in {}: {e}", path.display()))?;
        }
        for k in old.into_iter().filter(|&k| k >= shards) {
            let path = store::shard_dir(&self.path, k).join(presence::FILE_NAME);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("remove {}: {e}", path.display())),
            }
        }
        Ok(users)
    }

    /// Before a start with another shard count (no message queued, so no
    /// marks): moves every user's registered devices and waiting receipts
    /// to its home shard of `shards`, as [`DataDir::rehome_presence`] does
    /// with presence.
    fn rehome_devices(&self, shards: usize) -> Result<(), String> {
        use crate::store::devices::{self, DeviceLog, State};
        let old = self.shard_dirs()?;
        let mut homed = vec![State::default(); shards];
        for &k in &old {
            let path = store::shard_dir(&self.path, k);
            let (state, ..) = devices::read(&path)
                .map_err(|e| format!("device log in {}: {e}", path.display()))?;
            state.rehome(&mut homed, |user| crate::shard::home_shard(user, shards));
        }
        if homed.iter().all(State::is_empty) {
            return Ok(());
        }
        for (j, state) in homed.iter().enumerate() {
            let path = store::shard_dir(&self.path, j);
            DeviceLog::create(&path, state)
                .map_err(|e| format!("device log in {}: {e}", path.display()))?;
        }
        for k in old.into_iter().filter(|&k| k >= shards) {
            let path = store::shard_dir(&self.path, k).join(devices::FILE_NAME);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("remove {}: {e}", path.display())),
            }
        }
        Ok(())
    }

    /// Creates `shard-0` to `shard-<shards - 1>` (0700) where missing.
    fn create_shard_dirs(&self, shards: usize) -> Result<(), String> {
        for shard in 0..shards {
            let shard_dir = store::shard_dir(&self.path, shard);
            privacy::create_dir(&shard_dir)
                .map_err(|e| format!("data_dir {}: {e}", shard_dir.display()))?;
        }
        Ok(())
    }

    /// Opens an existing data directory: checks its mode, takes the lock,
    /// and reads `tern.meta` (writing it first, from the `shard-<N>`
    /// directories present, when it is missing and there are some).
    /// Refused while another process holds the lock.
    pub fn open(path: &Path) -> Result<DataDir, String> {
        use std::os::fd::AsRawFd;
        privacy::check_dir(path, "data_dir")?;
        let lock_path = path.join(LOCK_FILE);
        let lock = privacy::create_file_options()
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // A process that is exiting, or a child forked by one that has not
        // yet exec'd, holds the lock for a moment: wait a little before
        // calling the directory taken.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK)
                || std::time::Instant::now() >= deadline
            {
                return Err(format!(
                    "data_dir {} is in use by another tern process ({error}); stop it first",
                    path.display(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut dir = DataDir {
            path: path.to_path_buf(),
            meta: None,
            _lock: lock,
        };
        let meta_path = dir.meta_path();
        match std::fs::read_to_string(&meta_path) {
            Ok(text) => {
                dir.meta = Some(Meta::parse(&text).map_err(|e| {
                    format!(
                        "{}: {e}; it records the data directory's layout and is written by \
                         tern only",
                        meta_path.display()
                    )
                })?);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The highest shard directory present is the last shard
                // that logged anything; without any, nothing is homed yet.
                if let Some(&last) = dir.shard_dirs()?.last() {
                    let shards = last + 1;
                    log::info!(
                        "data_dir {}: no {META_FILE} (written by an earlier version): recording \
                         {shards} shards from the shard directories present",
                        path.display()
                    );
                    dir.write_meta(Meta::new(shards))?;
                }
            }
            Err(e) => return Err(format!("{}: {e}", meta_path.display())),
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `tern.meta` records; `None` for a directory without it and
    /// without shard logs (nothing is homed yet).
    pub fn meta(&self) -> Option<Meta> {
        self.meta
    }

    fn meta_path(&self) -> PathBuf {
        self.path.join(META_FILE)
    }

    /// Replaces `tern.meta` atomically and durably.
    pub(crate) fn write_meta(&mut self, meta: Meta) -> Result<(), String> {
        let tmp = self.path.join(META_TMP);
        let at = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| format!("write {}: {e}", p.display())
        };
        let mut file = privacy::create_file_options()
            .open(&tmp)
            .map_err(at(&tmp))?;
        file.write_all(meta.to_text().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(at(&tmp))?;
        let path = self.meta_path();
        std::fs::rename(&tmp, &path).map_err(at(&path))?;
        sync_dir(&self.path)?;
        self.meta = Some(meta);
        Ok(())
    }

    /// The `N` of every `shard-<N>` directory present, ascending.
    pub(crate) fn shard_dirs(&self) -> Result<Vec<usize>, String> {
        shard_dirs_in(&self.path)
    }

    /// Removes what a finished or abandoned reshard left behind (only when
    /// no reshard is switching; see [`crate::reshard`]), with a log line
    /// for each when `announce`.
    pub(crate) fn remove_leftovers(&self, announce: bool) -> Result<(), String> {
        debug_assert!(self.meta.is_none_or(|m| m.reshard.is_none()));
        for name in [STAGING_DIR, RETIRED_DIR] {
            let leftover = self.path.join(name);
            if leftover.exists() {
                if announce {
                    log::info!(
                        "removing {}, left by an interrupted or finished reshard",
                        leftover.display()
                    );
                }
                std::fs::remove_dir_all(&leftover)
                    .map_err(|e| format!("remove {}: {e}", leftover.display()))?;
            }
        }
        Ok(())
    }

    /// Messages queued in every shard log present, and the highest id any
    /// of them handed out (a full replay of each).
    fn scan_logs(&self, config: &Config) -> Result<(usize, u64), String> {
        let (mut queued, mut id_max) = (0, 0);
        for shard in self.shard_dirs()? {
            let (log, _) =
                LogStore::open(store::shard_dir(&self.path, shard), config.log_options())
                    .map_err(|e| e.to_string())?;
            queued += log.total();
            id_max = id_max.max(log.max_server_id());
        }
        Ok((queued, id_max))
    }

    /// Makes the logs of shards `0..config.shards` (created if missing, as
    /// after a reshard to fewer shards) number new messages above `id_max`:
    /// users move between shards with the count, and must never get an id
    /// they got before.
    fn raise_ids(&self, config: &Config, id_max: u64) -> Result<(), String> {
        self.create_shard_dirs(config.shards)?;
        for shard in 0..config.shards {
            let path = store::shard_dir(&self.path, shard);
            let (mut log, _) =
                LogStore::open(&path, config.log_options()).map_err(|e| e.to_string())?;
            log.raise_server_id(id_max);
            // Nothing is staged, so nothing can be refused; but a full disk
            // can leave the new watermark unwritten.
            log.commit(&mut Vec::new())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if log.has_uncommitted() {
                return Err(format!(
                    "{}: cannot record the id watermark (is the disk full?)",
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// The `N` of every `shard-<N>` directory in `dir`, ascending.
pub(crate) fn shard_dirs_in(dir: &Path) -> Result<Vec<usize>, String> {
    let list = |e: std::io::Error| format!("list {}: {e}", dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list)? {
        let entry = entry.map_err(list)?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.file_type().map_err(list)?.is_dir() {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Makes the entries of directory `dir` (created, renamed, removed) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("sync directory {}: {e}", dir.display()))
}

/// One warning line when `path` would not outlive a reboot.
fn warn_if_volatile(path: &Path) {
    if let Some(why) = volatile_place(path) {
        log::warn!(
            "data_dir {} is {why}: queued messages will not survive a reboot. Put data_dir on a \
             disk (e.g. /var/lib/tern), or set durability = \"memory\" if that is meant",
            path.display()
        );
    }
}

/// Why files under `path` would not outlive a reboot, if they would not: on
/// a memory file system, or under a directory the system empties.
fn volatile_place(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let mut why = Vec::new();
    if let Some(fs) = memory_fs(&real) {
        why.push(format!("on {fs} (memory)"));
    }
    const RUNTIME: [&str; 4] = ["/run", "/var/run", "/tmp", "/dev/shm"];
    if let Some(root) = RUNTIME.iter().find(|r| real.starts_with(r)) {
        why.push(format!("under {root}, which the system empties"));
    }
    (!why.is_empty()).then(|| why.join(" and "))
}

/// The name of the memory file system `path` is on, if it is on one.
#[cfg(target_os = "linux")]
fn memory_fs(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    // Not in the libc crate: include/uapi/linux/magic.h.
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain data, zeroed is a valid value; the call writes
    // into it and reads the NUL-terminated path, which outlives the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return None;
    }
    // f_type and the magic constants differ in width between architectures.
    #[allow(clippy::unnecessary_cast)]
    let (kind, tmpfs) = (buf.f_type as i64, libc::TMPFS_MAGIC as i64);
    match kind {
        k if k == tmpfs => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

/// The name of the memory file system `path` is on, if it is on one.
#[cfg(target_os = "freebsd")]
fn memory_fs(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain data, zeroed is a valid value; the call writes
    // into it and reads the NUL-terminated path, which outlives the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return None;
    }
    // SAFETY: the kernel NUL-terminates f_fstypename within the array.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.f_fstypename.as_ptr()) };
    (name.to_bytes() == b"tmpfs").then_some("tmpfs")
}

/// Other systems: not detected.
#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
fn memory_fs(_path: &Path) -> Option<&'static str> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_junk() {
        for meta in [
            Meta::new(3),
            Meta {
                reshard: Some((2, 5)),
                ..Meta::new(2)
            },
        ] {
            assert_eq!(Meta::parse(&meta.to_text()), Ok(meta));
        }
        for bad in [
            "",
            "tern data directory\nformat 2\nstore_format 1\nshards 2\n",
            "tern data directory\nformat 1\nstore_format 1\nshards 0\n",
            "tern data directory\nformat 1\nstore_format 1\n",
            "tern data directory\nformat 1\nstore_format 1\nshards 2\ncolour blue\n",
            "tern data directory\nformat 1\nstore_format 1\nshards 2\nreshard 2\n",
        ] {
            assert!(Meta::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_meta_is_inferred_from_shard_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        privacy::create_dir(&data).unwrap();
        for n in [0, 3] {
            std::fs::create_dir(data.join(format!("shard-{n}"))).unwrap();
        }
        std::fs::create_dir(data.join("shard-x")).unwrap();
        let dir = DataDir::open(&data).unwrap();
        assert_eq!(dir.meta(), Some(Meta::new(4)));
        drop(dir);
        let text = std::fs::read_to_string(data.join(META_FILE)).unwrap();
        assert_eq!(Meta::parse(&text).unwrap(), Meta::new(4));

        let empty = tmp.path().join("empty");
        privacy::create_dir(&empty).unwrap();
        assert_eq!(DataDir::open(&empty).unwrap().meta(), None);
        assert!(!empty.join(META_FILE).exists());
    }

    #[test]
    fn lock_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        privacy::create_dir(&data).unwrap();
        let first = DataDir::open(&data).unwrap();
        let e = DataDir::open(&data).unwrap_err();
        assert!(e.contains("in use"), "{e}");
        drop(first);
        DataDir::open(&data).unwrap();
    }

    #[test]
    fn runtime_dirs_are_named() {
        let tmp = tempfile::tempdir_in("/tmp").unwrap();
        let why = volatile_place(tmp.path()).unwrap();
        assert!(why.contains("under /tmp"), "{why}");
        let here = std::env::current_dir().unwrap();
        if !here.starts_with("/tmp") && memory_fs(&here).is_none() {
            assert_eq!(volatile_place(&here), None);
        }
    }
}
