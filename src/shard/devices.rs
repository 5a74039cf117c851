//! Makes the session layer's device registry changes durable in the
//! shard's device log (`store::devices`): registrations, last online
//! times, marks of messages some devices answered, receipts kept and
//! handed out. Written at the end of every loop iteration that changed
//! something, before the iteration's message batch: a message removal on
//! disk never precedes the registration or marks that decided it.

use crate::config::Config;
use crate::session::Sessions;
use crate::store::devices::{DeviceLog, Record};
use crate::store::{fault, shard_dir, Durability};

/// The shard's device log.
pub(super) struct DeviceWriter {
    /// `None` with durability memory (the registry lives in memory, kept
    /// across a shard restart with the in-memory store).
    log: Option<DeviceLog>,
    /// Records not yet written (kept back by a full disk).
    records: Vec<Record>,
    /// Scratch: the session layer's new records.
    taken: Vec<Record>,
    /// The last write found the disk full.
    full: bool,
    id: usize,
    /// Cluster: keep the changed users' states in JetStream instead.
    cluster: bool,
    /// Cluster: users whose registry changed (a device registered or
    /// removed, a receipt kept or handed out) since the shard last
    /// published their states; taken by [`DeviceWriter::take_changed`].
    changed: Vec<u64>,
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
            taken: Vec::new(),
            full: false,
            id,
            cluster: config.cluster.is_some(),
            changed: Vec::new(),
        }
    }

    /// Cluster: moves the users changed since the last call into `out`.
    pub(super) fn take_changed(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.changed);
    }

    /// Replays the log again after a crash (the store was reopened): what
    /// the crashed iteration changed and did not write is gone, as from
    /// the message log. An error (the disk that crashed the shard may
    /// still fail) leaves everything as it was, for the supervisor to try
    /// again within the restart intensity.
    pub(super) fn reopen(
        &mut self,
        config: &Config,
        id: usize,
        sessions: &mut Sessions,
    ) -> std::io::Result<()> {
        if self.log.is_none() {
            return Ok(());
        }
        let durability = config.store_durability();
        let dir = shard_dir(&config.data_dir, id);
        let (log, state) = DeviceLog::open(&dir, durability == Durability::Fsync)?;
        sessions.restore_devices(state);
        self.log = Some(log);
        // What the crash kept back is as lost as the staged batch.
        self.records.clear();
        Ok(())
    }

    /// Gives back what a burst grew the record buffers to.
    pub(super) fn trim(&mut self, keep_bytes: usize) {
        crate::memory::trim_vec(&mut self.taken, keep_bytes);
        crate::memory::trim_vec(&mut self.records, keep_bytes);
        if let Some(log) = &mut self.log {
            log.trim(keep_bytes);
        }
    }

    /// Writes what the session layer changed since the last call (and
    /// what a full disk kept back before). A full disk (ENOSPC, EDQUOT)
    /// keeps the records for the next call, last online times dropped (a
    /// hint, and the only kind a quiet shard keeps making); any other
    /// write error leaves the file in an unknown state: the shard crashes
    /// and replays, as for a failed message log write.
    pub(super) fn flush(&mut self, sessions: &mut Sessions) {
        sessions.take_device_records(&mut self.taken);
        let kept_back = !self.records.is_empty();
        self.records.append(&mut self.taken);
        if self.records.is_empty() {
            return;
        }
        if kept_back {
            drop_arrived(&mut self.records);
        }
        let Some(log) = &mut self.log else {
            // Nothing to write here. A cluster keeps each changed user's
            // state in JetStream; last online times alone (every login and
            // logout) and marks do not make a user changed: they ride with
            // its next change (docs/CLUSTER.md, "Per-user state across
            // nodes").
            if self.cluster {
                self.changed
                    .extend(self.records.iter().filter_map(|r| match *r {
                        Record::Registered { user, .. }
                        | Record::Removed { user, .. }
                        | Record::Receipt { user, .. }
                        | Record::GroupKept { user, .. }
                        | Record::ReceiptsGot { user, .. } => Some(user),
                        // No outbox in a cluster: JetStream carries receipts.
                        Record::Seen { .. }
                        | Record::Delivered { .. }
                        | Record::Outbox { .. }
                        | Record::OutboxDone { .. } => None,
                    }));
            }
            self.records.clear();
            sessions.count_device_records(0);
            return;
        };
        let store = sessions.store();
        let queued = |user: u64, id: u64| {
            store
                .next_after(user, id.saturating_sub(1))
                .is_some_and(|m| m.server_id == id)
        };
        // A batch of last online times alone (logins and logouts) needs no
        // fsync of its own: a login storm costs a write per iteration. Nor
        // does the receipt outbox: its records are written before their
        // receipts leave, which is all a kill -9 needs, and ride the next
        // sync against a power loss (a sync of their own in each commit
        // quadrupled the median ACK latency of a 20 000 msg/s chat run:
        // results/receipts/).
        let sync = self.records.iter().any(|r| {
            !matches!(
                r,
                Record::Seen { .. } | Record::OutboxDone { .. } | Record::Outbox { .. }
            )
        });
        let written = if log.broken() {
            log.compact(queued)
        } else {
            Ok(())
        }
        .and_then(|()| log.append(&self.records, sync))
        .and_then(|()| {
            if log.wants_rewrite() {
                log.compact(queued)
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                let n = self.records.len();
                self.records.clear();
                sessions.count_device_records(n);
            }
            Err(e) if fault::is_no_space(&e) => {
                if !self.full {
                    log::warn!(
                        "shard {}: device log write found the disk full; retried each \
                         iteration: {e}",
                        self.id
                    );
                }
                self.full = true;
                self.records.retain(|r| !matches!(r, Record::Seen { .. }));
                return;
            }
            Err(e) => panic!("device log write failed: {e}"),
        }
        self.full = false;
    }
}

/// Drops from `records` (kept back by a full disk) each outbox receipt
/// whose arrival (`OutboxDone`) is among them too: neither needs the disk
/// any more, and a full disk is where their bytes count.
fn drop_arrived(records: &mut Vec<Record>) {
    let done: std::collections::HashSet<u64> = records
        .iter()
        .filter_map(|r| match r {
            Record::OutboxDone { seq } => Some(*seq),
            _ => None,
        })
        .collect();
    if done.is_empty() {
        return;
    }
    let staged: std::collections::HashSet<u64> = records
        .iter()
        .filter_map(|r| match r {
            Record::Outbox { seq, .. } if done.contains(seq) => Some(*seq),
            _ => None,
        })
        .collect();
    records.retain(|r| match r {
        Record::Outbox { seq, .. } | Record::OutboxDone { seq } => !staged.contains(seq),
        _ => true,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::devices::Out;

    #[test]
    fn a_receipt_that_arrived_while_kept_back_is_never_written() {
        let out = Out {
            user: 1,
            kind: 1,
            group: 0,
            id: 1025,
            peer: 2,
        };
        let mut records = vec![
            Record::Outbox { seq: 1, out },
            Record::Seen {
                user: 3,
                lane: 0,
                at_ms: 5,
            },
            Record::Outbox { seq: 2, out },
            // Seq 0 was written before the disk filled: its end stays.
            Record::OutboxDone { seq: 0 },
            Record::OutboxDone { seq: 1 },
        ];
        drop_arrived(&mut records);
        assert_eq!(
            records,
            [
                Record::Seen {
                    user: 3,
                    lane: 0,
                    at_ms: 5,
                },
                Record::Outbox { seq: 2, out },
                Record::OutboxDone { seq: 0 },
            ]
        );
    }
}
