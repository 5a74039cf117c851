//! A per-shard hashed timer wheel with O(1) insert and lazy expiry.
//!
//! Each connection has exactly one entry, placed in the slot of its deadline.
//! Activity does not touch the wheel: the shard only updates the connection's
//! last-activity tick. When a slot fires, each entry is checked against its
//! connection's real deadline and either expires or is re-inserted further
//! on. An idle connection therefore costs one entry (8 bytes) and one check
//! per timeout period, never a syscall.

use std::time::{Duration, Instant};

use crate::clock::Clock;

/// Length of one wheel tick.
pub const TICK: Duration = Duration::from_millis(100);
/// Slots in the wheel. Deadlines further out than `SLOTS` ticks land in an
/// earlier slot and are re-inserted when it fires.
const SLOTS: usize = 1024;

/// Capacity an emptied slot keeps (entries), so steady traffic does not
/// reallocate every tick.
const SLOT_KEEP_CAPACITY: usize = 64;

/// Time in ticks since the shard started. `u32` ticks of 100 ms cover 13 years.
pub type Tick = u32;

/// One timer entry: an opaque key and the generation it was armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Slot index of the connection.
    pub key: u32,
    /// Generation of the connection when armed; a stale entry is dropped.
    pub gen: u32,
}

/// The wheel.
pub struct Wheel {
    clock: Clock,
    start: Instant,
    slots: Vec<Vec<Entry>>,
    /// Next tick to fire (all earlier ticks have fired).
    next: Tick,
}

impl Wheel {
    /// An empty wheel whose tick 0 is now by `clock`.
    pub fn new(clock: Clock) -> Wheel {
        Wheel {
            start: clock.now(),
            clock,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            next: 0,
        }
    }

    /// The current tick.
    pub fn now(&self) -> Tick {
        ticks(self.clock.now().saturating_duration_since(self.start))
    }

    /// Arms `entry` to fire at `deadline` (or at the next tick if it has passed).
    pub fn insert(&mut self, entry: Entry, deadline: Tick) {
        let at = deadline.max(self.next);
        // Beyond one turn the entry lands early and is re-inserted.
        let at = at.min(self.next + SLOTS as Tick - 1);
        self.slots[at as usize % SLOTS].push(entry);
    }

    /// Moves every entry of the ticks that have passed into `fired`.
    pub fn expire(&mut self, fired: &mut Vec<Entry>) {
        self.expire_until(self.now(), fired);
    }

    fn expire_until(&mut self, now: Tick, fired: &mut Vec<Entry>) {
        while self.next <= now {
            let slot = &mut self.slots[self.next as usize % SLOTS];
            fired.append(slot);
            // A burst of connections must not leave every slot holding its
            // peak capacity for ever.
            if slot.capacity() > SLOT_KEEP_CAPACITY {
                slot.shrink_to(SLOT_KEEP_CAPACITY);
            }
            self.next += 1;
        }
    }

    /// Time until the next tick, for the event loop's timeout.
    pub fn until_next_tick(&self) -> Duration {
        let next_at = self.start + TICK * self.next;
        next_at.saturating_duration_since(self.clock.now())
    }
}

/// Converts a duration to whole ticks, rounding up.
pub fn ticks(d: Duration) -> Tick {
    d.as_millis().div_ceil(TICK.as_millis()) as Tick
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(Clock::Real);
        let e = Entry { key: 1, gen: 1 };
        w.insert(e, 2);
        let mut fired = vec![];
        w.expire_until(1, &mut fired);
        assert!(fired.is_empty());
        w.expire_until(2, &mut fired);
        assert_eq!(fired, vec![e]);
    }

    #[test]
    fn far_deadline_lands_within_one_turn() {
        let mut w = Wheel::new(Clock::Real);
        w.insert(Entry { key: 1, gen: 0 }, 10 * SLOTS as Tick);
        let count: usize = w.slots.iter().map(|s| s.len()).sum();
        assert_eq!(count, 1);
        assert_eq!(w.slots[SLOTS - 1].len(), 1);
    }

    #[test]
    fn past_deadline_fires_next_tick() {
        let mut w = Wheel::new(Clock::Real);
        w.next = 5;
        w.insert(Entry { key: 2, gen: 0 }, 1);
        assert_eq!(w.slots[5].len(), 1);
    }

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::ZERO), 0);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(TICK), 1);
        assert_eq!(ticks(TICK * 3 + Duration::from_millis(1)), 4);
    }
}
