//! Makes the session layer's device registry changes durable in the
//! shard's device log (`store::devices`): registrations, last online
//! times, marks of messages some devices answered, receipts kept and
//! handed out. Written at the end of every loop iteration that changed
//! something, before the iteration's message batch: a message removal on
//! disk never precedes the registration or marks that decided it.

use crate::config::Config;
use crate::session::Sessions;
use crate::store::devices::{DeviceLog, Record};
use crate::store::{shard_dir, Durability};

/// The shard's device log.
pub(super) struct DeviceWriter {
    /// `None` with durability memory (the registry lives in memory, kept
    /// across a shard restart with the in-memory store).
    log: Option<DeviceLog>,
    records: Vec<Record>,
}

impl DeviceWriter {
    /// Opens shard `id`'s device log and gives its state to `sessions`
    /// (whose store is recovered already). A log that cannot be opened is
    /// logged, and the registry then lives in memory only.
    pub(super) fn open(config: &Config, id: usize, sessions: &mut Sessions) -> DeviceWriter {
        let durability = config.store_durability();
        let log = if durability == Durability::Memory {
            None
        } else {
            let dir = shard_dir(&config.data_dir, id);
            match DeviceLog::open(&dir, durability == Durability::Fsync) {
                Ok((log, state)) => {
                    sessions.restore_devices(state);
                    Some(log)
                }
                Err(e) => {
                    log::error!(
                        "shard {id}: device log in {} not opened, the device registry is kept \
                         in memory only: {e}",
                        dir.display()
                    );
                    None
                }
            }
        };
        DeviceWriter {
            log,
            records: Vec::new(),
        }
    }

    /// Replays the log again after a crash (the store was reopened): what
    /// the crashed iteration changed and did not write is gone, as from
    /// the message log.
    pub(super) fn reopen(&mut self, config: &Config, id: usize, sessions: &mut Sessions) {
        if self.log.is_none() {
            return;
        }
        let durability = config.store_durability();
        let dir = shard_dir(&config.data_dir, id);
        match DeviceLog::open(&dir, durability == Durability::Fsync) {
            Ok((log, state)) => {
                sessions.restore_devices(state);
                self.log = Some(log);
            }
            Err(e) => panic!("device log in {} not reopened: {e}", dir.display()),
        }
    }

    /// Writes what the session layer changed since the last call. A write
    /// that fails leaves the file in an unknown state: the shard crashes
    /// and replays, as for a failed message log write.
    pub(super) fn flush(&mut self, sessions: &mut Sessions) {
        sessions.take_device_records(&mut self.records);
        if self.records.is_empty() {
            return;
        }
        let Some(log) = &mut self.log else {
            self.records.clear();
            return;
        };
        // A batch of last online times alone (logins and logouts) needs no
        // fsync of its own: a login storm costs a write per iteration.
        let sync = self
            .records
            .iter()
            .any(|r| !matches!(r, Record::Seen { .. }));
        if let Err(e) = log.append(&self.records, sync) {
            panic!("device log write failed: {e}");
        }
        sessions.count_device_records(self.records.len());
        self.records.clear();
        if log.wants_rewrite() {
            let store = sessions.store();
            let queued = |user: u64, id: u64| {
                store
                    .next_after(user, id.saturating_sub(1))
                    .is_some_and(|m| m.server_id == id)
            };
            if let Err(e) = log.compact(queued) {
                panic!("device log rewrite failed: {e}");
            }
        }
    }
}
