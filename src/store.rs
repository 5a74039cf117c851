//! Store-and-forward queues: every message between ACK and DELIVERED.
//!
//! A message is pushed on its recipient's home shard when the server takes
//! responsibility for it (that is when the sender gets its ACK) and removed
//! only when the recipient's device answers DELIVERED. While the recipient is
//! online the same queue feeds its connection, so a connection that drops
//! before acknowledging leaves the message queued for the next login.
//!
//! [`Store`] is the interface a shard uses; [`MemStore`] keeps the queues in
//! memory. A durable store (an append-only log per shard) implements the same
//! trait.

use std::collections::{HashMap, VecDeque};

/// A message held for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Server-assigned id, increasing within one recipient's queue.
    pub server_id: u64,
    /// Sender's user id.
    pub from: u64,
    /// When the server accepted it, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The opaque message body.
    pub body: Box<[u8]>,
}

/// The queues of the users homed on one shard.
pub trait Store {
    /// Appends `msg` to `user`'s queue; hands it back when the queue is full.
    /// Ids must increase within a queue.
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), Stored>;
    /// Removes the message `server_id` from `user`'s queue (DELIVERED).
    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored>;
    /// The first message of `user` with an id greater than `after`.
    fn next_after(&self, user: u64, after: u64) -> Option<&Stored>;
    /// Messages queued for `user`.
    fn len(&self, user: u64) -> usize;
    /// Messages queued on this shard.
    fn total(&self) -> usize;
}

/// In-memory queues. A user with an empty queue has no entry at all.
pub struct MemStore {
    queues: HashMap<u64, VecDeque<Stored>>,
    len_max: usize,
    total: usize,
}

impl MemStore {
    /// Empty store holding at most `len_max` messages per user.
    pub fn new(len_max: usize) -> MemStore {
        assert!(len_max >= 1);
        MemStore {
            queues: HashMap::new(),
            len_max,
            total: 0,
        }
    }
}

impl Store for MemStore {
    fn push(&mut self, user: u64, msg: Stored) -> Result<(), Stored> {
        let queue = self.queues.entry(user).or_default();
        if queue.len() >= self.len_max {
            return Err(msg);
        }
        debug_assert!(queue
            .back()
            .is_none_or(|last| last.server_id < msg.server_id));
        queue.push_back(msg);
        self.total += 1;
        Ok(())
    }

    fn remove(&mut self, user: u64, server_id: u64) -> Option<Stored> {
        let queue = self.queues.get_mut(&user)?;
        let at = queue
            .binary_search_by_key(&server_id, |m| m.server_id)
            .ok()?;
        let msg = queue.remove(at)?;
        self.total -= 1;
        if queue.is_empty() {
            self.queues.remove(&user);
        }
        Some(msg)
    }

    fn next_after(&self, user: u64, after: u64) -> Option<&Stored> {
        let queue = self.queues.get(&user)?;
        let at = queue.partition_point(|m| m.server_id <= after);
        queue.get(at)
    }

    fn len(&self, user: u64) -> usize {
        self.queues.get(&user).map_or(0, VecDeque::len)
    }

    fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64) -> Stored {
        Stored {
            server_id: id,
            from: 9,
            time_ms: 0,
            body: Box::new([id as u8]),
        }
    }

    #[test]
    fn full_queue_hands_message_back() {
        let mut s = MemStore::new(1);
        s.push(1, msg(1)).unwrap();
        assert_eq!(s.push(1, msg(2)), Err(msg(2)));
        // Other users are not affected.
        s.push(2, msg(3)).unwrap();
        assert_eq!(s.total(), 2);
    }

    #[test]
    fn remove_and_iterate_in_order() {
        let mut s = MemStore::new(10);
        for id in [3, 5, 8] {
            s.push(7, msg(id)).unwrap();
        }
        assert_eq!(s.next_after(7, 0).unwrap().server_id, 3);
        assert_eq!(s.next_after(7, 3).unwrap().server_id, 5);
        assert_eq!(s.next_after(7, 4).unwrap().server_id, 5);
        assert!(s.next_after(7, 8).is_none());
        assert_eq!(s.remove(7, 5), Some(msg(5)));
        assert_eq!(s.remove(7, 5), None);
        assert_eq!(s.next_after(7, 3).unwrap().server_id, 8);
        assert_eq!(s.len(7), 2);
        s.remove(7, 3).unwrap();
        s.remove(7, 8).unwrap();
        assert_eq!(s.len(7), 0);
        assert_eq!(s.total(), 0);
        assert!(s.queues.is_empty(), "empty queues are dropped");
    }

    #[test]
    fn unknown_user_or_id() {
        let mut s = MemStore::new(10);
        assert_eq!(s.remove(1, 1), None);
        assert!(s.next_after(1, 0).is_none());
        assert_eq!(s.len(1), 0);
    }
}
