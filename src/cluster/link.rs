//! Shards ↔ bridge (docs/CLUSTER.md, "The bridge"): per shard one bounded
//! SPSC ring each way (`rtrb`, like the shard mesh). A shard wakes the
//! bridge through a tokio [`Notify`] (safe to call from any thread; a wake
//! with nobody waiting is kept as a permit); the bridge wakes a shard
//! through the shard's own [`WakeHandle`], as shards wake each other.

use std::collections::VecDeque;
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};
use tokio::sync::Notify;

use crate::io::WakeHandle;
use crate::shard::Msg;

/// A shard's end.
pub struct ShardLink {
    to_bridge: Producer<Msg>,
    from_bridge: Consumer<Msg>,
    bridge: Arc<Notify>,
    /// Receipts and acks that found the ring full: sent first next time.
    /// SENDs never wait here: the session layer holds the sender back
    /// while [`ShardLink::has_room`] is false.
    overflow: VecDeque<Msg>,
    pushed: bool,
}

impl std::fmt::Debug for ShardLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLink")
            .field("overflow", &self.overflow.len())
            .finish()
    }
}

impl ShardLink {
    /// Whether a SEND can go to the bridge now.
    pub fn has_room(&self) -> bool {
        self.overflow.is_empty() && self.to_bridge.slots() > 0
    }

    /// Queues `msg` for the bridge (behind any overflow).
    pub fn send(&mut self, msg: Msg) {
        if self.overflow.is_empty() {
            match self.to_bridge.push(msg) {
                Ok(()) => self.pushed = true,
                Err(rtrb::PushError::Full(msg)) => self.overflow.push_back(msg),
            }
        } else {
            self.overflow.push_back(msg);
        }
    }

    /// Moves what overflowed into the ring as far as it has room, and wakes
    /// the bridge if anything was pushed since the last call. Once per loop
    /// iteration.
    pub fn flush(&mut self) {
        while let Some(msg) = self.overflow.pop_front() {
            if let Err(rtrb::PushError::Full(msg)) = self.to_bridge.push(msg) {
                self.overflow.push_front(msg);
                break;
            }
            self.pushed = true;
        }
        if std::mem::take(&mut self.pushed) {
            self.bridge.notify_one();
        }
    }

    /// The next message from the bridge.
    pub fn pop(&mut self) -> Option<Msg> {
        self.from_bridge.pop().ok()
    }
}

/// The bridge's ends: from and to every shard.
pub struct BridgeEnds {
    /// `from_shards[i]`: what shard `i` sends.
    pub from_shards: Vec<Consumer<Msg>>,
    /// `to_shards[i]`: towards shard `i`.
    pub to_shards: Vec<Producer<Msg>>,
    /// How to wake shard `i` after pushing to it.
    pub wakers: Vec<WakeHandle>,
    /// Raised by shards that pushed.
    pub notify: Arc<Notify>,
}

/// Rings of `slots` entries between the bridge and each of the shards that
/// `wakers` wake; element `i` of the first result belongs to shard `i`.
pub fn links(slots: usize, wakers: Vec<WakeHandle>) -> (Vec<ShardLink>, BridgeEnds) {
    let notify = Arc::new(Notify::new());
    let mut shard_links = Vec::with_capacity(wakers.len());
    let (mut from_shards, mut to_shards) = (Vec::new(), Vec::new());
    for _ in &wakers {
        let (up_tx, up_rx) = RingBuffer::new(slots);
        let (down_tx, down_rx) = RingBuffer::new(slots);
        shard_links.push(ShardLink {
            to_bridge: up_tx,
            from_bridge: down_rx,
            bridge: notify.clone(),
            overflow: VecDeque::new(),
            pushed: false,
        });
        from_shards.push(up_rx);
        to_shards.push(down_tx);
    }
    let ends = BridgeEnds {
        from_shards,
        to_shards,
        wakers,
        notify,
    };
    (shard_links, ends)
}
