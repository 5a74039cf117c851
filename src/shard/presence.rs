//! Makes the session layer's last seen and privacy changes durable in the
//! shard's presence log (`store::presence`), at most once per
//! `last_seen_write_s` (a privacy change at once): an idle shard writes
//! nothing, and a busy one writes one batch per period, whatever the
//! number of logins and logouts in it.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::session::Sessions;
use crate::store::presence::{PresenceLog, Record};
use crate::store::{shard_dir, Durability};

/// The shard's presence log and when it was last written.
pub(super) struct PresenceWriter {
    /// `None` with durability memory (nothing is written), or when the log
    /// could not be opened (logged; presence then lives in memory only).
    log: Option<PresenceLog>,
    every: Duration,
    flushed: Instant,
    /// The last flush failed: the next one rewrites the file whole.
    failed: bool,
    records: Vec<Record>,
    /// Cluster: keep the changed users' states in JetStream instead.
    cluster: bool,
    /// Cluster: users whose last seen or privacy changed since the shard
    /// last published their states.
    changed: Vec<u64>,
}

impl PresenceWriter {
    /// Opens shard `id`'s presence log and gives its state to `sessions`.
    pub(super) fn open(config: &Config, id: usize, sessions: &mut Sessions, now: Instant) -> Self {
        let durability = config.store_durability();
        let log = if durability == Durability::Memory {
            None
        } else {
            let dir = shard_dir(&config.data_dir, id);
            match PresenceLog::open(&dir, durability == Durability::Fsync) {
                Ok((log, state)) => {
                    sessions.restore_presence(state);
                    Some(log)
                }
                Err(e) => {
                    log::error!(
                        "shard {id}: presence log in {} not opened, last seen kept in memory only: {e}",
                        dir.display()
                    );
                    None
                }
            }
        };
        PresenceWriter {
            log,
            every: Duration::from_secs(config.last_seen_write_s),
            flushed: now,
            failed: false,
            records: Vec::new(),
            cluster: config.cluster.is_some(),
            changed: Vec::new(),
        }
    }

    /// Cluster: moves the users changed since the last call into `out`.
    pub(super) fn take_changed(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.changed);
    }

    /// Writes what changed if it is due (`force`: whatever the period).
    pub(super) fn flush(&mut self, sessions: &mut Sessions, now: Instant, force: bool) {
        let (dirty, urgent) = sessions.presence_pending();
        if !(dirty || self.failed) {
            return;
        }
        if !(force || urgent || now.saturating_duration_since(self.flushed) >= self.every) {
            return;
        }
        self.flushed = now;
        sessions.take_presence_records(&mut self.records);
        let Some(log) = &mut self.log else {
            // A cluster keeps them in JetStream, at the same pace.
            if self.cluster {
                self.changed.extend(self.records.iter().map(|r| match *r {
                    Record::LastSeen { user, .. } | Record::Privacy { user, .. } => user,
                }));
            }
            return;
        };
        match log.flush(&self.records, sessions.presence_state()) {
            Ok(()) => {
                self.failed = false;
                sessions.count_presence_records(self.records.len());
            }
            Err(e) => {
                // Kept in memory; the next flush rewrites the whole state.
                self.failed = true;
                log::error!("presence log write failed, retried at the next flush: {e}");
            }
        }
    }
}
