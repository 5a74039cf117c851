//! The push thread's devices: which have a notice waiting, which were
//! POSTed lately and must wait out `push_interval_ms`. Pure (the time is
//! passed in), so the spacing and folding are unit-tested without a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use foldhash::HashMap;

use super::Notice;

/// A device: user and device id.
type Key = (u64, u32);

/// One device the table keeps.
#[derive(Clone, Copy, Debug)]
struct Device {
    /// The latest notice not POSTed yet: (messages waiting, oldest Unix ms).
    waiting: Option<(u32, u64)>,
    /// POSTed within the last interval: in `spaced`, not in `ready`.
    spaced: bool,
}

/// Devices with a notice waiting or POSTed within the last interval.
///
/// Every device is in at most one of `ready` (waiting, may go in the next
/// POST) and `spaced` (POSTed, in POST order, so the front is always the
/// first to come out), so both are bounded by `devices_max`.
pub(super) struct Table {
    devices: HashMap<Key, Device>,
    ready: VecDeque<Key>,
    spaced: VecDeque<(Instant, Key)>,
    interval: Duration,
    devices_max: usize,
    /// Devices with `waiting` set.
    pending: usize,
}

impl Table {
    /// An empty table spacing POSTs per device by `interval`, keeping at
    /// most `devices_max` devices.
    pub(super) fn new(interval: Duration, devices_max: usize) -> Table {
        assert!(devices_max > 0);
        Table {
            devices: HashMap::default(),
            ready: VecDeque::new(),
            spaced: VecDeque::new(),
            interval,
            devices_max,
            pending: 0,
        }
    }

    /// Takes `n`: the device's waiting notice becomes `n` (the newest
    /// counts are the true ones). Returns false, dropping it, when the
    /// device is new and the table full.
    pub(super) fn note(&mut self, n: &Notice) -> bool {
        let key = (n.user, n.device);
        let fresh = !self.devices.contains_key(&key);
        if fresh && self.devices.len() >= self.devices_max {
            return false;
        }
        let d = self.devices.entry(key).or_insert(Device {
            waiting: None,
            spaced: false,
        });
        if d.waiting.is_none() {
            self.pending += 1;
        }
        d.waiting = Some((n.waiting, n.oldest_ms));
        if fresh {
            self.ready.push_back(key);
        }
        true
    }

    /// Ends the spacing of devices POSTed `interval` before `now`: those
    /// with a new notice become ready, the others are forgotten.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.spaced.front() {
            if now.saturating_duration_since(at) < self.interval {
                break;
            }
            self.spaced.pop_front();
            let d = self.devices.get_mut(&key).expect("a spaced device is kept");
            debug_assert!(d.spaced);
            d.spaced = false;
            if d.waiting.is_some() {
                self.ready.push_back(key);
            } else {
                self.devices.remove(&key);
            }
        }
        crate::memory::shrink_map(&mut self.devices);
    }

    /// Moves up to `max` ready devices' notices into `out` and spaces them
    /// from `now`.
    pub(super) fn take(&mut self, now: Instant, max: usize, out: &mut Vec<Notice>) {
        while out.len() < max {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let d = self.devices.get_mut(&key).expect("a ready device is kept");
            let (waiting, oldest_ms) = d.waiting.take().expect("a ready device waits");
            d.spaced = true;
            self.pending -= 1;
            self.spaced.push_back((now, key));
            out.push(Notice {
                user: key.0,
                device: key.1,
                waiting,
                oldest_ms,
            });
        }
    }

    /// Whether a device may go in a POST now.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// When the next device's spacing ends, if any is spaced.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.spaced.front().map(|&(at, _)| at + self.interval)
    }

    /// Devices with a notice waiting.
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// Devices kept (waiting or spaced).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(user: u64, waiting: u32) -> Notice {
        Notice {
            user,
            device: 0,
            waiting,
            oldest_ms: 1000 + user,
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_device_is_posted_once_per_interval_with_its_newest_counts() {
        let t0 = Instant::now();
        let mut t = Table::new(SEC, 8);
        let mut out = Vec::new();
        assert!(t.note(&notice(1, 1)));
        t.take(t0, 10, &mut out);
        assert_eq!(out, [notice(1, 1)]);
        // Three more messages within the interval: folded, not ready.
        for w in 2..=4 {
            assert!(t.note(&notice(1, w)));
        }
        assert!(!t.has_ready());
        assert_eq!(t.pending(), 1);
        assert_eq!(t.next_expiry(), Some(t0 + SEC));
        t.expire(t0 + SEC - Duration::from_millis(1));
        assert!(!t.has_ready());
        t.expire(t0 + SEC);
        out.clear();
        t.take(t0 + SEC, 10, &mut out);
        assert_eq!(out, [notice(1, 4)]);
        assert_eq!(t.pending(), 0);
        // Nothing new in the next interval: forgotten, so the next notice
        // goes at once.
        t.expire(t0 + 2 * SEC);
        assert_eq!(t.len(), 0);
        assert_eq!(t.next_expiry(), None);
        assert!(t.note(&notice(1, 5)));
        assert!(t.has_ready());
    }

    #[test]
    fn devices_due_together_share_a_post_up_to_the_batch_max() {
        let now = Instant::now();
        let mut t = Table::new(SEC, 8);
        for user in 1..=5 {
            assert!(t.note(&notice(user, 1)));
        }
        let mut out = Vec::new();
        t.take(now, 3, &mut out);
        assert_eq!(out.iter().map(|n| n.user).collect::<Vec<_>>(), [1, 2, 3]);
        out.clear();
        t.take(now, 3, &mut out);
        assert_eq!(out.iter().map(|n| n.user).collect::<Vec<_>>(), [4, 5]);
        assert!(!t.has_ready());
    }

    #[test]
    fn a_full_table_drops_new_devices_but_folds_known_ones() {
        let now = Instant::now();
        let mut t = Table::new(SEC, 1);
        assert!(t.note(&notice(1, 1)));
        assert!(!t.note(&notice(2, 1)));
        assert!(t.note(&notice(1, 2)));
        let mut out = Vec::new();
        t.take(now, 10, &mut out);
        assert_eq!(out, [notice(1, 2)]);
        // Spaced devices count too, until their interval ends.
        assert!(!t.note(&notice(2, 1)));
        t.expire(now + SEC);
        assert!(t.note(&notice(2, 1)));
    }

    #[test]
    fn interval_zero_only_folds_what_arrives_between_posts() {
        let now = Instant::now();
        let mut t = Table::new(Duration::ZERO, 4);
        let mut out = Vec::new();
        t.note(&notice(1, 1));
        t.note(&notice(1, 2));
        t.take(now, 10, &mut out);
        assert_eq!(out, [notice(1, 2)]);
        t.note(&notice(1, 3));
        t.expire(now);
        out.clear();
        t.take(now, 10, &mut out);
        assert_eq!(out, [notice(1, 3)]);
    }
}
