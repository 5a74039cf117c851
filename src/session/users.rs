//! The users logged in on this, their home shard: which connection each is
//! on, its delivery window, and receipts waiting for users who are offline.

// foldhash, not std's SipHash: these maps are looked up for every frame,
// and SipHash was ~13 % of a pipelined message's CPU
// (results/saturation/profile/). Only authenticated logins insert keys.
use foldhash::HashMap;

use crate::io::ConnId;
use crate::proto::ReceiptKind;

/// A logged-in user on its home shard.
#[derive(Debug)]
pub(super) struct Online {
    pub(super) conn: ConnId,
    /// Highest server id already sent as DELIVER on this connection.
    pub(super) sent_upto: u64,
    /// DELIVERs sent on this connection and not yet answered.
    pub(super) inflight: u32,
    /// Their encoded bytes, at most `deliver_inflight_bytes_max` (but one
    /// DELIVER always goes). Sits in `Online`'s padding: no idle cost.
    pub(super) inflight_bytes: u32,
    /// Queued messages were left unsent by the last pump (in-flight cap or
    /// output budget): the connection is catching up on a backlog.
    pub(super) held: bool,
}

// The delivery window's counters fit in what an online user cost before.
const _: () = assert!(std::mem::size_of::<Online>() <= 24);

impl Online {
    /// A fresh session of a user: nothing sent yet.
    fn new(conn: ConnId) -> Online {
        Online {
            conn,
            sent_upto: 0,
            inflight: 0,
            inflight_bytes: 0,
            held: false,
        }
    }
}

/// A delivery or read receipt waiting for its (offline) recipient.
#[derive(Clone, Copy, Debug)]
pub(super) struct PendingReceipt {
    pub(super) kind: ReceiptKind,
    pub(super) server_id: u64,
    pub(super) peer: u64,
}

/// Who is online on this shard, and what waits for those who are not.
#[derive(Default)]
pub(super) struct Users {
    online: HashMap<u64, Online>,
    /// Receipts for users who were offline when they came, sent at login.
    receipts: HashMap<u64, Vec<PendingReceipt>>,
}

impl Users {
    /// The connection `user` is logged in on here, if any.
    pub(super) fn conn_of(&self, user: u64) -> Option<ConnId> {
        self.online.get(&user).map(|o| o.conn)
    }

    /// `user`'s session and delivery window, if online.
    pub(super) fn get_mut(&mut self, user: u64) -> Option<&mut Online> {
        self.online.get_mut(&user)
    }

    /// Makes `conn` the session of `user` (replacing any other).
    pub(super) fn go_online(&mut self, user: u64, conn: ConnId) {
        self.online.insert(user, Online::new(conn));
    }

    /// Takes `user` offline if `conn` is its session; returns whether it was.
    pub(super) fn go_offline(&mut self, user: u64, conn: ConnId) -> bool {
        if self.online.get(&user).is_some_and(|o| o.conn == conn) {
            self.online.remove(&user);
            crate::memory::shrink_map(&mut self.online);
            return true;
        }
        false
    }

    /// `user`'s DELIVERs in flight and their bytes, if online.
    pub(super) fn window(&self, user: u64) -> Option<(u32, u32)> {
        self.online
            .get(&user)
            .map(|o| (o.inflight, o.inflight_bytes))
    }

    /// Users online.
    pub(super) fn len(&self) -> usize {
        self.online.len()
    }

    /// The receipts kept for `user` while it was offline.
    pub(super) fn take_receipts(&mut self, user: u64) -> Vec<PendingReceipt> {
        let taken = self.receipts.remove(&user).unwrap_or_default();
        crate::memory::shrink_map(&mut self.receipts);
        taken
    }

    /// Keeps a receipt for offline `user`, at most `len_max` of them;
    /// returns false (dropped) past that.
    pub(super) fn keep_receipt(&mut self, user: u64, r: PendingReceipt, len_max: usize) -> bool {
        let pending = self.receipts.entry(user).or_default();
        if pending.len() < len_max {
            pending.push(r);
            return true;
        }
        false
    }

    /// Receipts kept for `user`.
    pub(super) fn receipts_of(&self, user: u64) -> usize {
        self.receipts.get(&user).map_or(0, Vec::len)
    }

    /// Forgets everyone (after a crash).
    pub(super) fn clear(&mut self) {
        self.online.clear();
        self.receipts.clear();
    }
}
