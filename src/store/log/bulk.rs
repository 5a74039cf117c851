//! What offline tools (`tern store reshard`) need from a [`LogStore`] beyond
//! the [`Store`](crate::store::Store) trait: reading every queued message
//! and every dedupe window entry that outlived its message, and continuing
//! the id sequence after ids handed out elsewhere.

use super::{Loc, LogStore, Origin, Staged, Stored, Taken, WLoc, TAKEN_BYTES};

/// A protocol v2 SEND taken: sender, origin, server id, time (ms).
pub type TakenSend = (u64, Origin, u64, u64);

impl LogStore {
    /// Every queued message (staged pushes included) with its recipient:
    /// each user's messages together and in queue (id) order; users in no
    /// particular order.
    pub fn queued(&self) -> impl Iterator<Item = (u64, &Stored)> + '_ {
        self.queues
            .iter()
            .flat_map(|(&user, queue)| queue.iter().map(move |entry| (user, &entry.msg)))
    }

    /// The dedupe window entries whose message is gone (those of queued
    /// messages come with [`queued`](LogStore::queued)).
    pub fn taken(&self) -> impl Iterator<Item = TakenSend> + '_ {
        self.windows
            .iter()
            .filter(|(_, _, t)| t.loc.orphan)
            .map(|(from, origin, t)| (from, origin, t.server_id, t.time_ms))
    }

    /// Stages a window entry for a SEND taken in another log (a reshard
    /// moves windows with the messages), written as a `Taken` record by the
    /// next commit. An entry the window has already is kept as it is.
    pub fn keep_taken(&mut self, (from, origin, server_id, time_ms): TakenSend) {
        if self.windows.get(from, origin).is_some() {
            return;
        }
        let at = u32::try_from(self.staged.len()).expect("a batch under 2^32 records");
        let taken = Taken {
            client_id: origin.client_id,
            server_id,
            time_ms,
            loc: WLoc {
                loc: Loc::Staged(at),
                orphan: true,
            },
        };
        self.windows.insert(from, origin, taken);
        self.staged.push(Staged::Taken { from, origin });
        self.staged_records += 1;
        self.staged_bytes += TAKEN_BYTES;
    }

    /// Makes [`max_server_id`](crate::store::Store::max_server_id) at least
    /// `floor`, so the shard owning this log numbers new messages above
    /// every id in `floor`'s range. Durable from the next `commit` on (it
    /// raises the watermark in `meta`).
    pub fn raise_server_id(&mut self, floor: u64) {
        if floor > self.server_id_max {
            self.server_id_max = floor;
            // The next commit looks at the watermark even with nothing staged.
            self.maintenance = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LogOptions, Store};

    fn msg(server_id: u64) -> Stored {
        Stored {
            server_id,
            from: 7,
            time_ms: 1000 + server_id,
            origin: None,
            body: vec![server_id as u8; 3].into(),
        }
    }

    #[test]
    fn queued_lists_every_message_by_user_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LogStore::open(tmp.path(), LogOptions::default()).unwrap();
        for id in 1..=9 {
            log.push(id % 3, msg(id)).unwrap();
        }
        log.remove(1, 4).unwrap();
        log.commit(&mut Vec::new()).unwrap();
        drop(log);
        let (log, _) = LogStore::open(tmp.path(), LogOptions::default()).unwrap();
        let mut seen: Vec<(u64, u64)> = log.queued().map(|(u, m)| (u, m.server_id)).collect();
        // Each user's messages are together and in order.
        let mut users: Vec<u64> = seen.iter().map(|&(u, _)| u).collect();
        users.dedup();
        assert_eq!(users.len(), 3, "{seen:?}");
        seen.sort_unstable();
        assert_eq!(
            seen,
            [
                (0, 3),
                (0, 6),
                (0, 9),
                (1, 1),
                (1, 7),
                (2, 2),
                (2, 5),
                (2, 8)
            ]
        );
        assert!(log.queued().all(|(_, m)| *m == msg(m.server_id)));
    }

    #[test]
    fn taken_entries_move_to_another_log() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LogStore::open(tmp.path().join("a"), LogOptions::default()).unwrap();
        let origin = Origin {
            device: 0,
            client_id: 5,
        };
        log.push(
            1,
            Stored {
                origin: Some(origin),
                ..msg(1024)
            },
        )
        .unwrap();
        log.commit(&mut Vec::new()).unwrap();
        assert_eq!(log.taken().count(), 0, "its message is queued");
        log.remove(1, 1024).unwrap();
        log.commit(&mut Vec::new()).unwrap();
        let taken: Vec<TakenSend> = log.taken().collect();
        assert_eq!(taken, [(7, origin, 1024, 2024)]);
        let (mut other, _) = LogStore::open(tmp.path().join("b"), LogOptions::default()).unwrap();
        other.keep_taken(taken[0]);
        other.keep_taken(taken[0]);
        other.commit(&mut Vec::new()).unwrap();
        drop(other);
        let (other, _) = LogStore::open(tmp.path().join("b"), LogOptions::default()).unwrap();
        assert_eq!(
            other.seen(7, origin),
            crate::store::Seen::Taken {
                server_id: 1024,
                time_ms: 2024
            }
        );
    }

    #[test]
    fn raised_id_floor_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = LogStore::open(tmp.path(), LogOptions::default()).unwrap();
        log.raise_server_id(1 << 40);
        log.raise_server_id(5); // never lowers
        assert_eq!(log.max_server_id(), 1 << 40);
        assert!(log.has_uncommitted());
        log.commit(&mut Vec::new()).unwrap();
        drop(log);
        let (log, _) = LogStore::open(tmp.path(), LogOptions::default()).unwrap();
        assert!(log.max_server_id() >= 1 << 40);
    }
}
