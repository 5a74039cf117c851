//! The session layer's vocabulary: the time it is given, what it may ask
//! ([`Env`]), the [`Event`]s it takes and the [`Action`]s it returns.

use crate::cluster::Owner;
use crate::io::ConnId;
use crate::proto::{self, Frame};
use crate::shard::Msg;
use crate::timer::{Entry, Tick};

/// The time of an event, passed in by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// The timer wheel's tick (see [`crate::timer`]).
    pub tick: Tick,
    /// Wall-clock milliseconds since the Unix epoch (server times, token
    /// expiry).
    pub unix_ms: u64,
    /// Monotonic nanoseconds ([`crate::clock::Clock::mono_ns`]): latency
    /// histograms only.
    pub mono_ns: u64,
}

/// What the session layer may ask about the rest of the server.
pub trait Env {
    /// Whether shard `shard` takes messages (it is this one, or it is up).
    fn up(&self, shard: usize) -> bool;
    /// Whether the outbox towards `shard` (never this one) has room for a
    /// SEND; when not, the sender is not read until it has.
    fn has_room(&self, shard: usize) -> bool;
    /// Bytes written to `conn` that it has not sent yet.
    fn out_pending(&self, conn: ConnId) -> usize;
    /// Which node serves `user`: always [`Owner::Here`] on a standalone
    /// server; in a cluster, the owner of the user's partition.
    fn owner(&self, user: u64) -> Owner<'_>;
    /// Cluster: whether the ring to the bridge takes a SEND now (when not,
    /// the sender is not read until it does). Standalone: unused.
    fn bridge_has_room(&self) -> bool;
    /// Whether an operator banned `user` (at `now_ms`, Unix milliseconds):
    /// its logins are refused with `banned`. None is, unless overridden.
    fn banned(&self, _user: u64, _now_ms: u64) -> bool {
        false
    }
    /// How long `conn` may stay silent once logged in, milliseconds, when
    /// not `idle_timeout_ms` (an MQTT connection: 1.5 times its keepalive).
    fn silence_ms_max(&self, _conn: ConnId) -> Option<u64> {
        None
    }
    /// The most DELIVERs `conn` may have unanswered, when fewer than
    /// `deliver_inflight_max` (an MQTT 5 client's Receive Maximum).
    fn inflight_max(&self, _conn: ConnId) -> Option<usize> {
        None
    }
}

/// An [`Env`] where every shard is up, every outbox has room and output
/// leaves at once: for tests and fuzzing.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenEnv;

impl Env for OpenEnv {
    fn up(&self, _shard: usize) -> bool {
        true
    }
    fn has_room(&self, _shard: usize) -> bool {
        true
    }
    fn out_pending(&self, _conn: ConnId) -> usize {
        0
    }
    fn owner(&self, _user: u64) -> Owner<'_> {
        Owner::Here
    }
    fn bridge_has_room(&self) -> bool {
        true
    }
}

/// Something that happened to this shard's connections or users.
#[derive(Debug)]
pub enum Event<'a> {
    /// A connection was accepted (or attached after a handoff): it waits
    /// for its LOGIN. Its slot must be free.
    Opened(ConnId),
    /// `conn`, just opened, is a handoff: another shard verified its LOGIN
    /// as `user`, whose home is here.
    HandedOver {
        /// The connection.
        conn: ConnId,
        /// The user its token proved.
        user: u64,
        /// The user's device its token named (0 for a v1 token).
        device: u32,
        /// The protocol version its LOGIN asked for (1 or 2).
        version: u8,
        /// The session was carried from a predecessor process (live
        /// upgrade): its client had LOGIN_OK long ago and gets no second
        /// one; what it has not DELIVERED is sent again from the store.
        resumed: bool,
    },
    /// Bytes arrived for `conn` (before they are decoded): marks activity.
    /// [`Flow::Stop`] means drop them (the connection is closing or gone).
    Received(ConnId),
    /// A frame decoded from `conn`'s input; `rest` is the input after it
    /// (what a LOGIN that moves the connection takes along).
    Frame {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame<'a>,
        /// Undecoded input after the frame.
        rest: &'a [u8],
    },
    /// `conn`'s input cannot be decoded.
    Undecodable {
        /// The connection.
        conn: ConnId,
        /// Why.
        error: proto::DecodeError,
    },
    /// A message from another shard (or this one), never a handoff.
    Msg(Msg),
    /// A connection's timer fired.
    Timer(Entry),
    /// Deliveries to `conn` stop (`on: false`; what was sent still waits
    /// for its DELIVERED) or go on (`on: true`: what waits is sent now).
    /// A connection starts with them on. The MQTT listener turns them off
    /// at accept and on when the client subscribes to its inbox.
    Deliveries {
        /// The connection.
        conn: ConnId,
        /// Whether messages are sent to it.
        on: bool,
    },
    /// `conn`'s unsent output passed `conn_out_bytes_max` after a flush.
    Slow(ConnId),
    /// `conn` failed below the protocol (TLS): flush what it has, close.
    Failed(ConnId),
    /// An operator closes `conn` with BYE(`reason`) (kick, ban, drain);
    /// ignored unless it is logging in or logged in.
    Bye {
        /// The connection.
        conn: ConnId,
        /// Why, as the client is told.
        reason: proto::ByeReason,
    },
    /// `conn` is gone (peer closed, send failed) or must go now.
    Closed(ConnId),
    /// An operator removes device `device` of `user` (homed here), online
    /// or not: its session (if any) gets BYE(`device_removed`), the user's
    /// other version 2 devices DEVICE_REMOVED, and it leaves the registry
    /// with its copies. Nothing happens if it is not registered (see
    /// [`Sessions::registered_devices`]).
    RemoveDevice {
        /// The user.
        user: u64,
        /// The device its token names.
        device: u64,
    },
    /// Periodic (about once a second): one bounded pass of the
    /// `device_idle_days_max` expiry over at most this many users of the
    /// device registry.
    ExpireDevices(usize),
    /// A closing `conn`'s output is flushed and its write side shut.
    WriteShut(ConnId),
    /// The store wrote the batch of everything staged so far and its sync
    /// is in flight: the answers waiting now (ACKs, receipts, new messages
    /// to send) wait for that sync's [`Event::Committed`]; those that come
    /// after wait for the commit after it. At most one batch is sealed.
    Sealed,
    /// The store committed: the batch sealed by [`Event::Sealed`], or, with
    /// none sealed, everything staged so far. Its answers leave now; its new
    /// messages go to their recipients. `refused` holds the server ids of
    /// pushes it rolled back (disk full).
    Committed {
        /// Pushes rolled back.
        refused: &'a [u64],
    },
    /// Graceful shutdown: BYE(shutdown) to `Some(conn)`, or to every
    /// connection not already closing.
    Shutdown(Option<ConnId>),
    /// Cluster: this node lost partitions. Every logged-in user whose
    /// [`Env::owner`] is no longer here gets BYE(moved) (fencing: nothing
    /// more is delivered to or taken from them here).
    Moved,
}

/// What the caller does with the rest of a connection's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next frame.
    Next,
    /// Back-pressure: keep this frame and the rest, stop reading until
    /// retried.
    Blocked,
    /// Stop: the connection was closed or moved.
    Stop,
}

/// What the shard must do, in order, after an event.
#[derive(Debug)]
pub enum Action {
    /// Write `bytes` of [`Sessions::wire`](super::Sessions::wire) (encoded frames) to `conn`.
    Write {
        /// The connection.
        conn: ConnId,
        /// Range of the wire buffer.
        bytes: std::ops::Range<usize>,
    },
    /// Queue `msg` for shard `dst` (never this one).
    Route {
        /// Destination shard.
        dst: usize,
        /// The message.
        msg: Msg,
    },
    /// Cluster: hand `msg` to the bridge (a SEND to publish, a receipt for
    /// a sender, or [`Msg::Done`]).
    Cluster(Msg),
    /// `conn`'s LOGIN proved `user`, whose home is shard `home`: move the
    /// socket there with the input after the LOGIN frame. Its session slot
    /// is already free.
    Handoff {
        /// The connection.
        conn: ConnId,
        /// The user.
        user: u64,
        /// The user's device its token named.
        device: u32,
        /// The protocol version its LOGIN asked for.
        version: u8,
        /// The user's home shard.
        home: usize,
    },
    /// (Re-)arm `conn`'s timer entry to fire at `deadline`.
    Arm {
        /// The timer entry (slot index and generation).
        entry: Entry,
        /// When.
        deadline: Tick,
    },
    /// `conn` is logged in on its home shard (the backend may read it
    /// differently from now on).
    Established(ConnId),
    /// Drop `conn`'s unread input, flush its output, shut its write side,
    /// and read (and drop) until it closes or its linger timer fires.
    CloseAfterFlush(ConnId),
    /// Close `conn` now; its session slot is already free.
    CloseNow(ConnId),
    /// A LOGIN on `conn` failed (bad or expired token): count it against
    /// the connection's source address. The connection is already closing.
    LoginFailed(ConnId),
}
