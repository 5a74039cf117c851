//! `tern store reshard`: re-homes every queued message of a data directory
//! for another shard count, offline, so that a changed core count (or a
//! changed `shards`) strands nothing.
//!
//! # Crash safety
//!
//! The job runs under the data directory's lock (no server can use the
//! directory meanwhile) in three phases; `tern.meta` (see
//! [`crate::datadir`]) marks the one commit point.
//!
//! 1. **Build.** Every `shard-<K>` log present is replayed; each queued
//!    message is pushed, with its server id, sender, time and body, into a
//!    new log `reshard.new/shard-<J>` with `J = home_shard(user, N)`, each
//!    user's messages in id order (a v2 message with its origin, so its
//!    dedupe window entry moves with it). The dedupe window entries whose
//!    messages are gone (idempotent SEND) go to every new log, their
//!    recipient being unknown. Each user's last seen and privacy setting
//!    (the shard's presence log, `presence.rec`) and its registered
//!    devices, marks and waiting receipts (the device log, `devices.rec`)
//!    go to its new home shard's directory, and so does each group (the
//!    group log, `groups.rec`: members, admins, order, and the messages
//!    still waiting for their fan-out, sent again to the members of now).
//!    The new logs continue their ids above
//!    every id the old logs handed out. Everything is fsynced (files,
//!    `reshard.new`, the data directory). The old logs are not changed
//!    (beyond what any start does: a torn tail cut, the id watermark).
//! 2. **Commit point.** `tern.meta` is replaced atomically with one that
//!    says `reshard M N`: from now on the new layout is the truth.
//! 3. **Switch.** Every `shard-<K>` directory is renamed into `reshard.old/`
//!    (then the directories are fsynced), every `reshard.new/shard-<J>` is
//!    renamed to `shard-<J>` (fsync), `tern.meta` is replaced with `shards
//!    N` (no `reshard` line), and `reshard.old` and `reshard.new` are
//!    deleted.
//!
//! Killed at any point, a second run finishes the job:
//! - before the commit point, `tern.meta` has no `reshard` line: the
//!   partial `reshard.new` is deleted and the build starts again from the
//!   untouched old logs;
//! - after it, the switch is redone from where it stopped: while
//!   `reshard.new` still holds all `N` new logs, no new log has moved in,
//!   so every `shard-<K>` present is old and goes to `reshard.old`;
//!   otherwise every old log is already in `reshard.old` and the remaining
//!   new ones move in;
//! - after the last `tern.meta` write only the deletion of leftovers is
//!   left, which the next run (or `tern serve`) does.
//!
//! Each message is in exactly one layout at the commit point, so nothing is
//! lost and nothing duplicated. The job holds every queued message in memory
//! (like a server start does) plus one new shard's copy.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::datadir::{self, DataDir, Meta, RETIRED_DIR, STAGING_DIR};
use crate::privacy;
use crate::shard::home_shard;
use crate::store::{
    self, devices, groups, presence, Durability, LogOptions, LogStore, PushError, Store, Stored,
};

/// Messages pushed into a new log per `commit` (one fsync each).
const COMMIT_EVERY_MESSAGES: usize = 4096;
/// Time between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a finished [`reshard`] did; its `Display` is the summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Shards before (the recorded count, or the one an interrupted run was
    /// switching to).
    pub from: usize,
    /// Shards now.
    pub to: usize,
    /// Messages re-homed (0 when there was nothing to do).
    pub messages: usize,
    /// Users they belong to.
    pub users: usize,
    /// An interrupted earlier run was finished first.
    pub finished_interrupted: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.finished_interrupted {
            f.write_str("finished the interrupted reshard; ")?;
        }
        if self.from == self.to {
            write!(f, "the data directory has {} shards already", self.to)
        } else {
            write!(
                f,
                "re-homed {} messages of {} users from {} to {} shards",
                self.messages, self.users, self.from, self.to
            )
        }
    }
}

/// Re-homes every queued message of `data_dir` for `shards` shards (see the
/// module docs). `repair` skips corrupt records in the old logs, like
/// `tern serve --repair`. Refused while a server uses the directory.
pub fn reshard(data_dir: &Path, shards: usize, repair: bool) -> Result<Report, String> {
    if shards == 0 {
        return Err("--shards must be at least 1".to_string());
    }
    // Server ids carry the shard in their low 10 bits (as Config checks).
    if shards > 1024 {
        return Err("--shards must be at most 1024".to_string());
    }
    if !data_dir.is_dir() {
        return Err(format!(
            "data_dir {}: no such directory",
            data_dir.display()
        ));
    }
    let mut dir = DataDir::open(data_dir)?;
    let mut report = Report::default();
    if let Some(Meta {
        reshard: Some((from, to)),
        ..
    }) = dir.meta()
    {
        log::info!("finishing the interrupted reshard from {from} to {to} shards");
        switch(&mut dir, from, to)?;
        report.finished_interrupted = true;
    }
    dir.remove_leftovers(true)?;
    let Some(meta) = dir.meta() else {
        // No log at all: nothing is homed, just record the count.
        let path = dir.path().to_path_buf();
        dir.write_meta(Meta {
            shards,
            store_format: store::log::FORMAT_VERSION,
            reshard: None,
        })?;
        log::info!(
            "{}: no message logs; recorded {shards} shards",
            path.display()
        );
        report.from = shards;
        report.to = shards;
        return Ok(report);
    };
    report.from = meta.shards;
    report.to = shards;
    if meta.shards == shards {
        return Ok(report);
    }
    let (messages, users) = build(&dir, shards, repair)?;
    report.messages = messages;
    report.users = users;
    crash_point("staged");
    dir.write_meta(Meta {
        reshard: Some((meta.shards, shards)),
        ..meta
    })?;
    crash_point("committed");
    switch(&mut dir, meta.shards, shards)?;
    dir.remove_leftovers(false)?;
    Ok(report)
}

/// Phase 1: writes the new layout into `reshard.new`, durably. Returns the
/// messages and users re-homed.
fn build(dir: &DataDir, shards: usize, repair: bool) -> Result<(usize, usize), String> {
    let started = Instant::now();
    let options = LogOptions {
        durability: Durability::Fsync,
        // Move every queue whole, however long: the server's own limits
        // apply to new pushes only.
        queue_len_max: usize::MAX,
        disk_bytes_max: 0,
        repair,
        ..LogOptions::default()
    };
    let mut old = Vec::new();
    // Last seen and privacy, per new shard (each user is in one old log).
    let mut seen = vec![std::collections::HashMap::new(); shards];
    // Registered devices, marks and waiting receipts, per new shard (server
    // ids are kept, so marks still name their messages).
    let mut registry = vec![devices::State::default(); shards];
    // The groups of every old shard, re-homed below.
    let mut old_groups = Vec::new();
    for k in dir.shard_dirs()? {
        let path = store::shard_dir(dir.path(), k);
        let (log, recovery) = LogStore::open(&path, options.clone())
            .map_err(|e| format!("old log {}: {e}", path.display()))?;
        log::info!("read {}: {recovery}", path.display());
        old.push(log);
        let (state, ..) = presence::read(&path)
            .map_err(|e| format!("old presence log {}: {e}", path.display()))?;
        for (user, s) in state {
            seen[home_shard(user, shards)].insert(user, s);
        }
        let (state, ..) =
            devices::read(&path).map_err(|e| format!("old device log {}: {e}", path.display()))?;
        state.rehome(&mut registry, |user| home_shard(user, shards));
        let (records, ..) =
            groups::read(&path).map_err(|e| format!("old group log {}: {e}", path.display()))?;
        old_groups.push(records);
    }
    let new_groups = groups::rehome(&old_groups, shards);
    // New ids continue above every id any old log handed out, so no id is
    // ever reused for a user (clients drop duplicates by id).
    let id_floor = old.iter().map(LogStore::max_server_id).max().unwrap_or(0);
    // Each new shard's messages as (user, message), from every old log.
    let mut homed: Vec<Vec<(u64, &Stored)>> = vec![Vec::new(); shards];
    for log in &old {
        for (user, msg) in log.queued() {
            homed[home_shard(user, shards)].push((user, msg));
        }
    }
    let total: usize = homed.iter().map(Vec::len).sum();
    let mut users = 0;
    let mut copied = 0;
    let mut last_progress = Instant::now();

    let staging = dir.path().join(STAGING_DIR);
    privacy::create_dir(&staging).map_err(|e| format!("create {}: {e}", staging.display()))?;
    for (j, mut messages) in homed.into_iter().enumerate() {
        // Per user in id order: a user whose messages sit in several old
        // logs (stranded by an earlier change of the count) gets one queue.
        messages.sort_unstable_by_key(|(user, msg)| (*user, msg.server_id));
        let path = store::shard_dir(&staging, j);
        privacy::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let (mut log, _) = LogStore::open(&path, options.clone()).map_err(|e| failed(&path, e))?;
        log.raise_server_id(id_floor);
        let mut previous = None;
        for (i, (user, msg)) in messages.iter().enumerate() {
            if previous != Some(*user) {
                users += 1;
                previous = Some(*user);
            }
            log.push(*user, (*msg).clone()).map_err(|e| match e {
                PushError::StorageFull(_) => disk_full(&path, "no room for another message"),
                e => failed(&path, e),
            })?;
            copied += 1;
            crash_point("message");
            if (i + 1) % COMMIT_EVERY_MESSAGES == 0 {
                commit(&mut log, &path)?;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                log::info!("reshard: {copied} of {total} messages copied");
            }
        }
        // Dedupe windows whose messages are gone: the recipient is not
        // known any more, so every new log gets them (a retry finds its
        // window wherever its recipient now lives).
        for old_log in &old {
            for taken in old_log.taken() {
                log.keep_taken(taken);
            }
        }
        commit(&mut log, &path)?;
        assert_eq!(log.total(), messages.len(), "every message pushed once");
        presence::PresenceLog::create(&path, &seen[j]).map_err(|e| failed(&path, e))?;
        devices::DeviceLog::create(&path, &registry[j]).map_err(|e| failed(&path, e))?;
        groups::create(&path, &new_groups[j]).map_err(|e| failed(&path, e))?;
        // The log's own files are synced by its commits; make sure of their
        // directory entries too before the commit point.
        datadir::sync_dir(&path)?;
        crash_point("shard built");
    }
    datadir::sync_dir(&staging)?;
    datadir::sync_dir(dir.path())?;
    log::info!(
        "reshard: {copied} messages of {users} users copied into {} in {} ms",
        staging.display(),
        started.elapsed().as_millis()
    );
    Ok((copied, users))
}

/// Commits a new log; a write that found the disk full (the log rolled its
/// batch back) fails the build like any other error.
fn commit(log: &mut LogStore, path: &Path) -> Result<(), String> {
    let mut refused = Vec::new();
    log.commit(&mut refused).map_err(|e| failed(path, e))?;
    if !refused.is_empty() {
        return Err(disk_full(
            path,
            &format!("{} messages not written", refused.len()),
        ));
    }
    if log.has_uncommitted() {
        // Its id watermark could not be written.
        return Err(disk_full(path, "meta not written"));
    }
    Ok(())
}

/// The error of a build that failed writing the new log in `path`.
fn failed(path: &Path, e: impl std::fmt::Display) -> String {
    format!(
        "new log {}: {e}. The old layout is untouched; fix the cause and run the reshard again",
        path.display()
    )
}

/// The error of a build that ran out of disk space in `path`.
fn disk_full(path: &Path, detail: &str) -> String {
    format!(
        "new log {}: the disk is full ({detail}). The old layout is untouched; make room for one \
         more copy of the queued messages and run the reshard again",
        path.display()
    )
}

/// Phase 3: moves the old layout out and the new one in (idempotent; see
/// the module docs), then records `to` shards.
fn switch(dir: &mut DataDir, from: usize, to: usize) -> Result<(), String> {
    let root = dir.path().to_path_buf();
    let staging = root.join(STAGING_DIR);
    let retired = root.join(RETIRED_DIR);
    let rename = |a: &Path, b: &Path| {
        std::fs::rename(a, b).map_err(|e| format!("rename {} to {}: {e}", a.display(), b.display()))
    };
    let staged = if staging.is_dir() {
        datadir::shard_dirs_in(&staging)?
    } else {
        Vec::new()
    };
    if staged.len() == to {
        privacy::create_dir(&retired).map_err(|e| format!("create {}: {e}", retired.display()))?;
        for k in dir.shard_dirs()? {
            rename(&store::shard_dir(&root, k), &store::shard_dir(&retired, k))?;
            crash_point("old log moved out");
        }
        datadir::sync_dir(&retired)?;
        datadir::sync_dir(&root)?;
    }
    for j in staged {
        rename(&store::shard_dir(&staging, j), &store::shard_dir(&root, j))?;
        crash_point("new log moved in");
    }
    datadir::sync_dir(&root)?;
    if staging.is_dir() {
        datadir::sync_dir(&staging)?;
    }
    // Only a hand-made change of the directories during the switch can
    // leave anything else in place.
    let present = dir.shard_dirs()?;
    if present != (0..to).collect::<Vec<_>>() {
        return Err(format!(
            "{}: after switching to {to} shards the shard directories present are {present:?}, \
             not 0 to {}: the data directory was changed while a reshard was switching. The old \
             logs are in {}, the new ones were in {}; restore one layout by hand",
            root.display(),
            to - 1,
            retired.display(),
            staging.display()
        ));
    }
    dir.write_meta(Meta {
        shards: to,
        store_format: store::log::FORMAT_VERSION,
        reshard: None,
    })?;
    log::info!("switched {} from {from} to {to} shards", root.display());
    crash_point("recorded");
    Ok(())
}

/// Debug builds: with `TERN_RESHARD_PAUSE_AT=K`, the K-th call (counting
/// from 1) prints `reshard: paused at crash point K (<what>)` on stderr and
/// waits (up to a minute, then aborts) to be killed, so tests can SIGKILL
/// the job at every step. Release builds: nothing.
fn crash_point(what: &str) {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static AT: OnceLock<Option<u64>> = OnceLock::new();
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let at = AT.get_or_init(|| {
            std::env::var("TERN_RESHARD_PAUSE_AT")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        if *at == Some(call) {
            eprintln!("reshard: paused at crash point {call} ({what})");
            std::thread::sleep(Duration::from_secs(60));
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = what;
}
