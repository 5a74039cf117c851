//! Makes the session layer's group changes and group messages durable in
//! the shard's group log (`store::groups`) right before each commit, so
//! their answers and fan-outs, which wait for that commit, never leave
//! before them; and rebuilds the groups from the log at start and after a
//! crash of the shard.

use crate::config::Config;
use crate::session::Sessions;
use crate::store::groups::{records_bytes, GroupLog, Record};
use crate::store::{shard_dir, Durability};

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

    /// Opens shard `id`'s group log and gives its groups to `sessions`.
    /// A log that cannot be read stops the shard (its groups and the
    /// messages it acknowledged would be lost): the panic goes to the
    /// supervisor, which retries within its restart limits.
    pub(super) fn open(config: &Config, id: usize, sessions: &mut Sessions) -> GroupWriter {
        let mut writer = GroupWriter {
            log: None,
            live_bytes: 0,
            records: Vec::new(),
        };
        if let Err(e) = writer.reopen(config, id, sessions) {
            panic!("shard {id}: group log not opened: {e}");
        }
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
        let durability = config.store_durability();
        if durability == Durability::Memory {
            // Nothing on disk: the groups in memory are all there is.
            return Ok(());
        }
        let dir = shard_dir(&config.data_dir, id);
        let (log, records) = GroupLog::open(&dir, durability == Durability::Fsync)?;
        sessions.restore_groups(&records);
        self.live_bytes = log.bytes();
        self.log = Some(log);
        Ok(())
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
