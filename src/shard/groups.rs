//! Makes the session layer's group changes and group messages durable in
//! the shard's group log (`store::groups`) right before each commit, so
//! their answers and fan-outs, which wait for that commit, never leave
//! before them; and rebuilds the groups from the log at start and after a
//! crash of the shard.

use crate::config::Config;
use crate::session::Sessions;
use crate::store::groups::{records_bytes, GroupLog, Record};
use crate::store::{shard_dir, Durability};

/// A shard's group log as opened, with the records it holds; `None`
/// with durability memory (groups live in memory only).
pub type OpenedGroupLog = Option<(GroupLog, Vec<Record>)>;

/// Opens shard `id`'s group log. The server does it before the shard
/// reports ready, next to the message store, so a log that cannot be read
/// fails the start with its reason (a shard thread that panicked while
/// starting would leave the process up with a dead shard).
pub fn open_group_log(config: &Config, id: usize) -> std::io::Result<OpenedGroupLog> {
    let durability = config.store_durability();
    if durability == Durability::Memory {
        return Ok(None);
    }
    let dir = shard_dir(&config.data_dir, id);
    GroupLog::open(&dir, durability == Durability::Fsync).map(Some)
}

/// The shard's group log.
pub(super) struct GroupWriter {
    /// `None` with durability memory (groups live in memory only).
    log: Option<GroupLog>,
    /// Bytes the log held after its last rewrite (or replay): it is
    /// rewritten when it grows past twice that.
    live_bytes: u64,
    records: Vec<Record>,
}

impl GroupWriter {
    /// Gives back what a burst grew the record buffers to.
    pub(super) fn trim(&mut self, keep_bytes: usize) {
        crate::memory::trim_vec(&mut self.records, keep_bytes);
        if let Some(log) = &mut self.log {
            log.trim(keep_bytes);
        }
    }

    /// Gives the groups of `opened` (see [`open_group_log`]) to `sessions`.
    pub(super) fn open(opened: OpenedGroupLog, sessions: &mut Sessions) -> GroupWriter {
        let mut writer = GroupWriter {
            log: None,
            live_bytes: 0,
            records: Vec::new(),
        };
        writer.install(opened, sessions);
        writer
    }

    /// Reads the log again (after a crash of the shard: what was staged
    /// and not written is gone, as its answers are).
    pub(super) fn reopen(
        &mut self,
        config: &Config,
        id: usize,
        sessions: &mut Sessions,
    ) -> std::io::Result<()> {
        let opened = open_group_log(config, id)?;
        self.install(opened, sessions);
        Ok(())
    }

    /// Takes `opened` as the log and its groups as the shard's; with
    /// nothing on disk (durability memory) the groups in memory are all
    /// there is.
    fn install(&mut self, opened: OpenedGroupLog, sessions: &mut Sessions) {
        if let Some((log, records)) = opened {
            sessions.restore_groups(&records);
            self.live_bytes = log.bytes();
            self.log = Some(log);
        }
    }

    /// Writes what the session layer staged (synced when any of it is a
    /// change or a message). A failed write panics: the shard restarts
    /// from its logs, and nothing staged was answered.
    pub(super) fn flush(&mut self, sessions: &mut Sessions) {
        self.records.clear();
        let urgent = sessions.take_group_records(&mut self.records);
        let Some(log) = &mut self.log else {
            return;
        };
        if !self.records.is_empty() {
            if let Err(e) = log.append(&self.records, urgent) {
                panic!("group log write failed: {e}");
            }
        }
        if log.wants_rewrite(self.live_bytes) && !sessions.groups_pending() {
            self.records.clear();
            sessions.group_snapshot(&mut self.records);
            if let Err(e) = log.rewrite(&self.records) {
                panic!("group log rewrite failed: {e}");
            }
            self.live_bytes = records_bytes(&self.records);
        }
    }
}
