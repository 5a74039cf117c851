//! Dedupe windows: what makes a protocol v2 SEND idempotent.
//!
//! A v2 SEND is identified by its [`Origin`] (the sender's device and its
//! client_id) and its sender. Client ids increase per sender device, so
//! the store keeps, per sender device, only the SENDs taken whose client_id
//! is among the last [`WINDOW`] ids up to the highest one taken (`H`):
//! `H - WINDOW < client_id <= H`. Within that range it knows exactly which
//! ids were taken (and as which message); below it, it cannot tell, so a
//! SEND there is [`Seen::Stale`]. Each entry is 32 bytes (and 4 bytes of
//! location in the log store); a sender device that never sent with v2 has
//! no window at all.
//!
//! The windows are kept per store, that is per shard: a sender's SENDs to
//! recipients homed on different shards have a window on each. A retry goes
//! to the same recipient, so to the same window.

// foldhash, not std's SipHash: looked up for every v2 SEND.
use foldhash::HashMap;

use super::Origin;

/// How many client ids below and including the highest one taken a window
/// covers: a SEND whose client_id is `WINDOW` or more below it is refused.
pub const WINDOW: u64 = 32;

/// What the store knows of a v2 SEND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not taken: store it.
    New,
    /// Taken already as `server_id` at `time_ms`: answer with that ACK.
    Taken {
        /// The message's server id.
        server_id: u64,
        /// When it was taken, ms since the Unix epoch.
        time_ms: u64,
    },
    /// Below the window: it may have been taken, nobody can tell.
    Stale {
        /// The highest client_id taken from this sender device.
        highest: u64,
    },
}

/// One SEND taken, and where `L` says its durable copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken<L> {
    pub client_id: u64,
    pub server_id: u64,
    pub time_ms: u64,
    pub loc: L,
}

/// The windows of every sender device that sent to this store with v2:
/// `(sender, device)` to its entries, sorted by client_id, at most
/// [`WINDOW`] once pruned.
#[derive(Debug)]
pub(crate) struct Windows<L> {
    map: HashMap<(u64, u32), Vec<Taken<L>>>,
}

impl<L> Default for Windows<L> {
    fn default() -> Self {
        Windows {
            map: HashMap::default(),
        }
    }
}

impl<L: Copy> Windows<L> {
    /// Whether `from`'s SEND `origin` was taken.
    pub fn seen(&self, from: u64, origin: Origin) -> Seen {
        let Some(w) = self.map.get(&(from, origin.device)) else {
            return Seen::New;
        };
        let Some(highest) = w.last().map(|t| t.client_id) else {
            return Seen::New;
        };
        match w.binary_search_by_key(&origin.client_id, |t| t.client_id) {
            Ok(i) => Seen::Taken {
                server_id: w[i].server_id,
                time_ms: w[i].time_ms,
            },
            Err(_) if origin.client_id < highest && highest - origin.client_id >= WINDOW => {
                Seen::Stale { highest }
            }
            Err(_) => Seen::New,
        }
    }

    /// Adds (or replaces, on replay) the entry of `from`'s `origin`;
    /// returns the one it replaced. Does not prune: see [`Windows::prune`].
    pub fn insert(&mut self, from: u64, origin: Origin, t: Taken<L>) -> Option<Taken<L>> {
        debug_assert_eq!(origin.client_id, t.client_id);
        let w = self.map.entry((from, origin.device)).or_default();
        match w.binary_search_by_key(&t.client_id, |e| e.client_id) {
            Ok(i) => Some(std::mem::replace(&mut w[i], t)),
            Err(i) => {
                // Grown one at a time: a window stays near WINDOW + 1
                // entries, where doubling would leave it at 64.
                w.reserve_exact(1);
                w.insert(i, t);
                None
            }
        }
    }

    /// The entry of `from`'s `origin`, if the window has it.
    pub fn get(&self, from: u64, origin: Origin) -> Option<&Taken<L>> {
        let w = self.map.get(&(from, origin.device))?;
        let i = w
            .binary_search_by_key(&origin.client_id, |e| e.client_id)
            .ok()?;
        w.get(i)
    }

    /// The same, to change its location.
    pub fn get_mut(&mut self, from: u64, origin: Origin) -> Option<&mut Taken<L>> {
        let w = self.map.get_mut(&(from, origin.device))?;
        let i = w
            .binary_search_by_key(&origin.client_id, |e| e.client_id)
            .ok()?;
        w.get_mut(i)
    }

    /// Takes the entry of `from`'s `origin` out (a push rolled back).
    pub fn remove(&mut self, from: u64, origin: Origin) -> Option<Taken<L>> {
        let key = (from, origin.device);
        let w = self.map.get_mut(&key)?;
        let i = w
            .binary_search_by_key(&origin.client_id, |e| e.client_id)
            .ok()?;
        let t = w.remove(i);
        if w.is_empty() {
            self.map.remove(&key);
        }
        Some(t)
    }

    /// Drops the entries of `(from, device)` that fell below its window,
    /// handing each to `evicted`. The highest entry always stays.
    pub fn prune(&mut self, from: u64, device: u32, mut evicted: impl FnMut(Taken<L>)) {
        let Some(w) = self.map.get_mut(&(from, device)) else {
            return;
        };
        let Some(highest) = w.last().map(|t| t.client_id) else {
            return;
        };
        let keep = w.partition_point(|t| highest - t.client_id >= WINDOW);
        for t in w.drain(..keep) {
            evicted(t);
        }
        // A batch of many SENDs from one sender grew it past the window.
        if w.capacity() > WINDOW as usize * 3 / 2 {
            w.shrink_to(WINDOW as usize + 1);
        }
    }

    /// Prunes every window (after a replay).
    pub fn prune_all(&mut self, mut evicted: impl FnMut(Taken<L>)) {
        let keys: Vec<(u64, u32)> = self.map.keys().copied().collect();
        for (from, device) in keys {
            self.prune(from, device, &mut evicted);
        }
    }

    /// Every entry with its sender and origin.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Origin, &Taken<L>)> + '_ {
        self.map.iter().flat_map(|(&(from, device), w)| {
            w.iter().map(move |t| {
                (
                    from,
                    Origin {
                        device,
                        client_id: t.client_id,
                    },
                    t,
                )
            })
        })
    }

    /// Sender devices with a window.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(client_id: u64) -> Origin {
        Origin {
            device: 0,
            client_id,
        }
    }

    fn t(client_id: u64) -> Taken<()> {
        Taken {
            client_id,
            server_id: client_id.wrapping_mul(1024),
            time_ms: client_id.wrapping_add(5),
            loc: (),
        }
    }

    #[test]
    fn new_taken_and_stale() {
        let mut w = Windows::default();
        assert_eq!(w.seen(1, o(5)), Seen::New);
        for id in [10, 40, 41] {
            w.insert(1, o(id), t(id));
            w.prune(1, 0, |_| {});
        }
        // 41 - 10 = 31 < WINDOW: 10 is still in.
        assert_eq!(
            w.seen(1, o(10)),
            Seen::Taken {
                server_id: 10 * 1024,
                time_ms: 15
            }
        );
        // Never taken but inside the window: new.
        assert_eq!(w.seen(1, o(20)), Seen::New);
        assert_eq!(w.seen(1, o(9)), Seen::Stale { highest: 41 });
        assert_eq!(w.seen(1, o(0)), Seen::Stale { highest: 41 });
        assert_eq!(w.seen(1, o(42)), Seen::New);
        // Another device or sender has its own window.
        assert_eq!(
            w.seen(
                1,
                Origin {
                    device: 1,
                    client_id: 9
                }
            ),
            Seen::New
        );
        assert_eq!(w.seen(2, o(9)), Seen::New);
        let mut gone = Vec::new();
        w.insert(1, o(42), t(42));
        w.prune(1, 0, |e| gone.push(e.client_id));
        assert_eq!(gone, [10]);
        assert_eq!(w.seen(1, o(10)), Seen::Stale { highest: 42 });
    }

    #[test]
    fn edges_near_zero_and_u64_max() {
        let mut w = Windows::default();
        w.insert(1, o(u64::MAX), t(u64::MAX));
        assert_eq!(w.seen(1, o(u64::MAX - WINDOW + 1)), Seen::New);
        assert!(matches!(
            w.seen(1, o(u64::MAX - WINDOW)),
            Seen::Stale { .. }
        ));
        let mut w = Windows::default();
        w.insert(1, o(0), t(0));
        assert!(matches!(w.seen(1, o(0)), Seen::Taken { .. }));
        w.insert(1, o(WINDOW), t(WINDOW));
        let mut gone = 0;
        w.prune(1, 0, |_| gone += 1);
        assert_eq!(gone, 1);
        assert_eq!(w.seen(1, o(0)), Seen::Stale { highest: WINDOW });
    }

    /// What a v2 sender device costs a shard it sent to, in memory, once
    /// it sent WINDOW messages or more (the figure in
    /// results/exactly-once/README.md): the map entry plus the entries.
    #[test]
    fn bytes_per_sender_window() {
        let mut w = Windows::default();
        for cid in 1..=1000 {
            w.insert(1, o(cid), t(cid));
            w.prune(1, 0, |_| {});
        }
        let v = &w.map[&(1, 0)];
        assert_eq!(v.len(), WINDOW as usize);
        assert!(v.capacity() <= WINDOW as usize + 1, "{}", v.capacity());
        // The log store's entries are 40 bytes (with their location).
        assert_eq!(std::mem::size_of::<Taken<[u32; 3]>>(), 40);
    }

    #[test]
    fn remove_and_replace() {
        let mut w = Windows::default();
        w.insert(1, o(3), t(3));
        assert_eq!(w.insert(1, o(3), t(3)), Some(t(3)));
        assert_eq!(w.remove(1, o(3)), Some(t(3)));
        assert_eq!(w.len(), 0, "an empty window is dropped");
        assert_eq!(w.remove(1, o(3)), None);
    }
}
