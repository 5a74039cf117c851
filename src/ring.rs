//! The cross-shard mesh: one bounded SPSC ring per ordered pair of shards.
//!
//! Built once as `rings[dst][src]` and split so that each shard holds the
//! producers of the rings it writes and the consumers of the rings it reads.
//! The rings themselves are `rtrb`'s (producer and consumer indices on
//! separate cache lines, `push` hands the value back when full). This module
//! adds the wake-up protocol: a consumer about to sleep raises its `sleeping`
//! flag and re-checks its rings; a producer that pushed reads the flag and
//! wakes the consumer only if it is asleep, once per batch.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::io::WakeHandle;

/// What a shard knows of another: how to wake it.
struct Peer {
    wake: WakeHandle,
    /// True while that shard is (about to be) blocked in its poll.
    sleeping: Arc<AtomicBool>,
}

/// One shard's ends of the mesh. `Send` (it moves to the shard's thread) but
/// used by that thread only.
pub struct Links<T> {
    id: usize,
    /// `out[dst]`: ring from this shard to `dst`; `None` on the diagonal.
    out: Vec<Option<Producer<T>>>,
    /// `inp[src]`: ring from `src` to this shard; `None` on the diagonal.
    inp: Vec<Option<Consumer<T>>>,
    peers: Vec<Peer>,
    /// Destinations pushed to since the last [`Links::notify`].
    pushed: Vec<bool>,
}

/// Builds the mesh for `wakers.len()` shards with `slots` entries per ring.
/// Element `i` of the result belongs to shard `i`.
pub fn mesh<T>(slots: usize, wakers: Vec<WakeHandle>) -> Vec<Links<T>> {
    assert!(slots >= 1, "ring needs at least one slot");
    let n = wakers.len();
    let sleeping: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect();
    // producers[src][dst], consumers[dst][src]
    let mut producers: Vec<Vec<Option<Producer<T>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut consumers: Vec<Vec<Option<Consumer<T>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for dst in 0..n {
        for src in 0..n {
            if src != dst {
                let (p, c) = RingBuffer::new(slots);
                producers[src][dst] = Some(p);
                consumers[dst][src] = Some(c);
            }
        }
    }
    producers
        .into_iter()
        .zip(consumers)
        .enumerate()
        .map(|(id, (out, inp))| Links {
            id,
            out,
            inp,
            peers: wakers
                .iter()
                .zip(&sleeping)
                .map(|(wake, sleeping)| Peer {
                    wake: wake.clone(),
                    sleeping: sleeping.clone(),
                })
                .collect(),
            pushed: vec![false; n],
        })
        .collect()
}

impl<T> Links<T> {
    /// This shard's id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Number of shards in the mesh.
    pub fn shards(&self) -> usize {
        self.out.len()
    }

    /// Pushes `item` towards `dst`; gives it back when the ring is full.
    /// Sending to oneself is a bug: local work never crosses a ring.
    pub fn try_push(&mut self, dst: usize, item: T) -> Result<(), T> {
        debug_assert_ne!(dst, self.id, "self-send through a ring");
        let ring = self.out[dst].as_mut().expect("ring to self");
        match ring.push(item) {
            Ok(()) => {
                self.pushed[dst] = true;
                Ok(())
            }
            Err(rtrb::PushError::Full(item)) => Err(item),
        }
    }

    /// Free slots in the ring towards `dst`.
    pub fn free_slots(&self, dst: usize) -> usize {
        self.out[dst].as_ref().map_or(0, |p| p.slots())
    }

    /// Wakes every destination pushed to since the last call, if it sleeps.
    pub fn notify(&mut self) {
        // Pairs with the fence in `prepare_sleep`: either we see the flag, or
        // the sleeper sees our pushes.
        fence(Ordering::SeqCst);
        for (dst, pushed) in self.pushed.iter_mut().enumerate() {
            if std::mem::take(pushed) && self.peers[dst].sleeping.load(Ordering::Relaxed) {
                self.peers[dst].wake.wake();
            }
        }
    }

    /// Takes the next item from `src`, if any.
    pub fn pop(&mut self, src: usize) -> Option<T> {
        self.inp[src].as_mut()?.pop().ok()
    }

    /// Items waiting in the rings into this shard.
    pub fn in_depth(&self) -> usize {
        self.inp.iter().flatten().map(|c| c.slots()).sum()
    }

    /// Items waiting in the rings out of this shard.
    pub fn out_depth(&self) -> usize {
        self.out
            .iter()
            .flatten()
            .map(|p| p.buffer().capacity() - p.slots())
            .sum()
    }

    /// Announces that this shard is going to block. Returns false (and stays
    /// awake) when an inbound ring already has items.
    pub fn prepare_sleep(&self) -> bool {
        let me = &self.peers[self.id].sleeping;
        me.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.inp.iter().flatten().any(|c| !c.is_empty()) {
            me.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Announces that this shard is running again.
    pub fn awake(&self) {
        self.peers[self.id].sleeping.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wakers(n: usize) -> (Vec<crate::io::Io>, Vec<WakeHandle>) {
        let ios: Vec<_> = (0..n)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let options = crate::io::IoOptions {
                    backend: crate::io::Backend::Poll,
                    shard: 0,
                    conns_max: 1,
                    ring_slots_max: 0,
                    batch_wait: std::time::Duration::ZERO,
                };
                crate::io::Io::new(crate::io::Listeners::plain(l), &options).unwrap()
            })
            .collect();
        let w = ios.iter().map(|io| io.wake_handle()).collect();
        (ios, w)
    }

    #[test]
    fn full_ring_hands_item_back() {
        let (_ios, w) = wakers(2);
        let mut links = mesh::<u32>(1, w);
        let mut l1 = links.pop().unwrap();
        let mut l0 = links.pop().unwrap();
        assert_eq!(l0.try_push(1, 7), Ok(()));
        assert_eq!(l0.try_push(1, 8), Err(8));
        assert_eq!(l0.free_slots(1), 0);
        assert_eq!(l1.in_depth(), 1);
        assert_eq!(l1.pop(0), Some(7));
        assert_eq!(l1.pop(0), None);
        assert_eq!(l0.try_push(1, 8), Ok(()));
    }

    #[test]
    fn sleeping_consumer_sees_items_instead_of_sleeping() {
        let (_ios, w) = wakers(2);
        let mut links = mesh::<u32>(4, w);
        let l1 = links.pop().unwrap();
        let mut l0 = links.pop().unwrap();
        assert!(l1.prepare_sleep());
        l0.try_push(1, 1).unwrap();
        l0.notify();
        assert!(!l1.prepare_sleep());
        l1.awake();
    }

    #[test]
    fn ordered_across_threads() {
        let (_ios, w) = wakers(3);
        let mut links = mesh::<u64>(16, w);
        let mut l2 = links.pop().unwrap();
        let _l1 = links.pop().unwrap();
        let mut l0 = links.pop().unwrap();
        const N: u64 = 100_000;
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                if l0.try_push(2, i).is_ok() {
                    i += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < N {
            match l2.pop(0) {
                Some(v) => {
                    assert_eq!(v, expect);
                    expect += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        t.join().unwrap();
    }

    #[test]
    #[should_panic]
    #[cfg(debug_assertions)]
    fn self_send_is_a_bug() {
        let (_ios, w) = wakers(2);
        let mut links = mesh::<u32>(2, w);
        let _ = links[0].try_push(0, 1);
    }
}
