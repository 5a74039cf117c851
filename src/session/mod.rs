//! The pure protocol layer of a shard: events in, actions out.
//!
//! [`Sessions`] holds what the protocol needs of every connection on one
//! shard (a 24-byte slot), the users homed here who are online
//! (`users.rs`), receipts waiting for users who are offline, the abuse
//! limits (`guard.rs`: per-user rates, receipts only for delivered
//! messages), and the shard's [`Store`]. Its one entry point,
//! [`Sessions::on_event`], takes the time (never read here), an [`Env`]
//! (the few questions it may ask about the rest of the server) and one
//! [`Event`]; it returns a [`Flow`] and leaves [`Action`]s for the caller to
//! execute in order. It never touches a socket,
//! the I/O backend, a ring, TLS or the clock, so it is tested (and fuzzed)
//! with no sockets at all. The shard (`crate::shard`) executes the actions.
//!
//! Store pushes and removals go through the [`Store`] trait: a `LogStore`
//! only stages them, and the shard commits them once per loop iteration,
//! then reports [`Event::Committed`]. When the commit's sync runs off the
//! loop, the shard reports [`Event::Sealed`] as it starts (the answers
//! waiting so far belong to that batch) and `Committed` when it is done;
//! answers to what happens in between wait for the next commit.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Owner;
use crate::config::Config;
use crate::io::ConnId;
use crate::proto::{self, ByeReason, ErrorCode, Frame};
use crate::shard::{home_shard, Msg};
use crate::stats::ShardStats;
use crate::store::Store;
use crate::timer::{self, Entry, Tick};
use crate::token;

mod dedupe;
mod deliver;
mod event;
mod groups;
mod guard;
mod outbox;
mod presence;
mod push;
mod registry;
mod remove;
mod state;
#[cfg(test)]
mod tests;
mod users;

pub use event::{Action, Env, Event, Flow, Now, OpenEnv};
pub use outbox::BridgeReceipt;
use users::Users;

/// In debug builds, a SEND to this user panics inside the session handler, so
/// tests can check that a panic closes only that connection.
#[cfg(debug_assertions)]
pub const PANIC_USER: u64 = u64::MAX;

/// In debug builds, a SEND to this user crashes the whole shard (outside any
/// one connection's handling), so tests can check the supervisor: the shard
/// restarts, replays its log, and the other shards go on.
#[cfg(debug_assertions)]
pub const CRASH_USER: u64 = u64::MAX - 1;

/// After an error or BYE, how long a closing connection may take to read
/// what we sent before it is closed anyway.
const LINGER: Duration = Duration::from_secs(2);
/// Slots added at least when the slot table grows.
const SLOTS_GROWTH_MIN: usize = 1024;

/// What waits for the batch whose sync is in flight (see
/// [`Event::Sealed`]): `Sessions::replies`, `fresh` and `fresh_sent` as they
/// were when it was sealed.
#[derive(Debug, Default)]
struct Sealed {
    replies: Vec<(usize, Msg)>,
    fresh: Vec<u64>,
    fresh_sent: Vec<(u64, u64, u64)>,
}

/// Which SEND a kept copy belongs to: the sender's connection, its
/// generation, and the SEND's client_id.
type CopyKey = (ConnId, u32, u64);

/// A kept copy of a SEND: the sending user, the recipient and the body.
type SentCopy = (u64, u64, Box<[u8]>);

/// A connection's protocol state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum State {
    /// Slot unused.
    #[default]
    Free,
    /// Connected, LOGIN not seen yet.
    Login,
    /// Logged in, on its home shard.
    Active,
    /// Flushing a last ERROR or BYE; input is discarded.
    Closing,
    /// Closing, output flushed and the write side shut: lingering until the
    /// peer closes or the linger timer fires.
    Shut,
}

impl State {
    /// Closing or shut: input is dropped.
    pub fn is_closing(self) -> bool {
        matches!(self, State::Closing | State::Shut)
    }
}

/// The session layer's part of one connection. Kept small: with the
/// shard's slot and a timer entry, it is what an idle connection costs.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Generation of the connection in this slot; 0 when free.
    gen: u32,
    /// Tick of the last input (Login: of the accept; closing: when closing
    /// began).
    last_rx: Tick,
    /// Logged-in user, 0 before LOGIN.
    user: u64,
    /// The user's device its token named (0 for a v1 token, and before
    /// LOGIN): its v2 SENDs are deduplicated per device.
    device: u32,
    state: State,
    /// Protocol version of its LOGIN (0 before LOGIN): 2 makes its SENDs
    /// idempotent and its DELIVERs carry the sender's client_id.
    version: u8,
    /// Nothing is delivered to it until [`Event::Deliveries`] turns them
    /// on: an MQTT connection that has not subscribed to its inbox.
    paused: bool,
}

/// Who a new session is: what its LOGIN (or the hand-over that brought
/// it) established.
#[derive(Clone, Copy, Debug)]
struct Who {
    user: u64,
    device: u32,
    version: u8,
}

/// The session layer of one shard: every connection's protocol state, the
/// users online here, and their queues.
pub struct Sessions {
    id: usize,
    shards: usize,
    config: Arc<Config>,
    limits: proto::Limits,
    slots: Vec<Slot>,
    users: Users,
    /// Registered devices, marks and waiting receipts (`registry.rs`).
    registry: registry::Registry,
    /// Wall-clock ms of the event being handled (`Now::unix_ms`).
    now_ms: u64,
    /// Rate limits and the delivered messages READs may name.
    guard: guard::Guard,
    /// Presence subscriptions, last seen and privacy (`presence.rs`).
    presence: presence::Presence,
    /// The groups homed here and their staged changes (`groups.rs`).
    groups: groups::GroupState,
    store: Box<dyn Store + Send>,
    /// Answers (ACK, refusals) to messages stored in this iteration, and
    /// receipts for messages removed in it: they leave only once the store
    /// committed them.
    replies: Vec<(usize, Msg)>,
    /// Users who got new messages this iteration: their connections are
    /// sent them once the commit made them durable.
    fresh: Vec<u64>,
    /// The messages stored this iteration: recipient, server id, and when
    /// their SEND was decoded (for the send-to-deliver histogram).
    fresh_sent: Vec<(u64, u64, u64)>,
    /// Copies of version 2 SENDs in flight from users with another version
    /// 2 device online, by (sender connection, generation, client_id):
    /// user, recipient and body, sent to those devices as SENT with the
    /// ACK (`deliver.rs`, `keep_copy`).
    copies: foldhash::HashMap<CopyKey, SentCopy>,
    /// Scratch of the registry: the server ids a device's removal lets go.
    done_ids: Vec<u64>,
    /// Scratch of `on_committed`: bytes written per connection by this
    /// commit's answers; kept between commits so it does not allocate.
    written: foldhash::HashMap<ConnId, usize>,
    /// `Some` between [`Event::Sealed`] and [`Event::Committed`]: the
    /// answers, fresh users and fresh messages of the batch being synced.
    sealed: Option<Sealed>,
    /// Cluster: receipt records from JetStream taken this iteration, for
    /// the shard to tell the bridge when each may be acked
    /// ([`Sessions::take_bridge_receipts`]).
    bridge_receipts: Vec<BridgeReceipt>,
    next_gen: u32,
    next_seq: u64,
    /// Set by the debug crash hook; the shard panics outside connection
    /// handling.
    crash: bool,
    stats: Arc<ShardStats>,
    /// Encoded frames of `actions`' writes.
    wire: Vec<u8>,
    actions: Vec<Action>,
    idle_ticks: Tick,
    login_ticks: Tick,
    linger_ticks: Tick,
    /// Where push notices for offline devices go; `None` without a
    /// `push_url` (see `push.rs`).
    push: Option<crate::push::Notices>,
    /// The BYE reason [`Event::Shutdown`] sends: `shutdown`, or `upgrade`
    /// when the process hands over to a new binary.
    shutdown_reason: ByeReason,
}

/// Bytes of the session layer's per-connection slot (24): with the shard's
/// slot, what every connection costs, idle or not.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

// The session layer's share of the 256-byte budget per connection.
const _: () = assert!(SLOT_BYTES <= 24);

impl Sessions {
    /// The session layer of shard `id` of `shards`, over `store` (already
    /// recovered), counting into `stats`.
    pub fn new(
        config: Arc<Config>,
        id: usize,
        shards: usize,
        store: Box<dyn Store + Send>,
        stats: Arc<ShardStats>,
    ) -> Sessions {
        assert!(id < shards, "shard {id} of {shards}");
        Sessions {
            id,
            shards,
            limits: proto::Limits {
                frame_bytes_max: config.frame_bytes_max,
                body_bytes_max: config.body_bytes_max,
            },
            slots: Vec::new(),
            users: Users::default(),
            registry: registry::Registry::default(),
            now_ms: 0,
            guard: guard::Guard::new(&config),
            presence: presence::Presence::default(),
            groups: groups::GroupState::new(
                id,
                shards,
                config.group_members_max,
                config.groups_per_user_max,
            ),
            next_seq: (store.max_server_id() >> 10) + 1,
            store,
            replies: Vec::new(),
            fresh: Vec::new(),
            fresh_sent: Vec::new(),
            copies: foldhash::HashMap::default(),
            done_ids: Vec::new(),
            written: foldhash::HashMap::default(),
            sealed: None,
            bridge_receipts: Vec::new(),
            next_gen: 1,
            crash: false,
            stats,
            wire: Vec::new(),
            actions: Vec::new(),
            idle_ticks: timer::ticks(config.idle_timeout()),
            login_ticks: timer::ticks(config.login_timeout()),
            linger_ticks: timer::ticks(LINGER),
            push: None,
            shutdown_reason: ByeReason::Shutdown,
            config,
        }
    }

    /// Handles one event. The actions it leads to are in [`Sessions::actions`]
    /// (replacing those of the previous event) until the next call.
    pub fn on_event(&mut self, now: Now, env: &dyn Env, event: Event<'_>) -> Flow {
        self.actions.clear();
        self.wire.clear();
        self.now_ms = now.unix_ms;
        let flow = self.handle(now, env, event);
        self.settle_presence(now, env);
        flow
    }

    fn handle(&mut self, now: Now, env: &dyn Env, event: Event<'_>) -> Flow {
        match event {
            Event::Opened(conn) => {
                self.open(now, env, conn);
                Flow::Next
            }
            Event::HandedOver {
                conn,
                user,
                device,
                version,
                resumed,
            } => {
                if self.state(conn) != State::Login {
                    debug_assert!(false, "handoff into slot {} not just opened", conn.0);
                    return Flow::Stop;
                }
                let who = Who {
                    user,
                    device,
                    version,
                };
                self.install(now, env, conn, who, !resumed);
                Flow::Next
            }
            Event::Received(conn) => self.on_received(now, conn),
            Event::Frame { conn, frame, rest } => self.on_frame(now, env, conn, frame, rest),
            Event::Undecodable { conn, error } => {
                self.stats.protocol_errors.inc();
                let text = error.to_string();
                self.fail(now, conn, error.code(), 0, &text);
                Flow::Stop
            }
            Event::Msg(msg) => {
                self.on_msg(now, env, msg);
                Flow::Next
            }
            Event::Timer(entry) => {
                self.on_timer(now, env, entry);
                Flow::Next
            }
            Event::Deliveries { conn, on } => {
                let Some(s) = self.slots.get_mut(conn.index()) else {
                    return Flow::Next;
                };
                if s.state == State::Free {
                    return Flow::Next;
                }
                let resume = s.paused && on;
                s.paused = !on;
                if resume && s.state == State::Active {
                    let user = s.user;
                    self.pump_one(env, user, conn, false, None);
                }
                Flow::Next
            }
            Event::Slow(conn) => {
                if self.state(conn) == State::Active {
                    // Undelivered messages stay queued; nothing more is written here.
                    self.stats.slow_closes.inc();
                    log::info!(
                        "shard {}: closing slow reader (user {})",
                        self.id,
                        self.slots[conn.index()].user
                    );
                    self.bye(now, conn, ByeReason::Slow);
                }
                Flow::Stop
            }
            Event::Failed(conn) => {
                self.close_after_flush(now, conn);
                Flow::Stop
            }
            Event::Bye { conn, reason } => {
                if matches!(self.state(conn), State::Login | State::Active) {
                    self.bye(now, conn, reason);
                }
                Flow::Stop
            }
            Event::Closed(conn) => {
                self.close_now(conn);
                Flow::Stop
            }
            Event::RemoveDevice { user, device } => {
                self.remove_device(now, user, device);
                Flow::Next
            }
            Event::ExpireDevices(budget) => {
                self.expire_devices(now, budget);
                Flow::Next
            }
            Event::WriteShut(conn) => {
                if let Some(s) = self.slots.get_mut(conn.index()) {
                    if s.state == State::Closing {
                        s.state = State::Shut;
                    }
                }
                Flow::Stop
            }
            Event::Sealed => {
                assert!(
                    self.sealed.is_none(),
                    "a second batch sealed before the first committed"
                );
                self.sealed = Some(Sealed {
                    replies: std::mem::take(&mut self.replies),
                    fresh: std::mem::take(&mut self.fresh),
                    fresh_sent: std::mem::take(&mut self.fresh_sent),
                });
                Flow::Next
            }
            Event::Committed { refused } => {
                match self.sealed.take() {
                    Some(sealed) => {
                        // What came after the seal waits for the next commit.
                        let replies = std::mem::replace(&mut self.replies, sealed.replies);
                        let fresh = std::mem::replace(&mut self.fresh, sealed.fresh);
                        let sent = std::mem::replace(&mut self.fresh_sent, sealed.fresh_sent);
                        self.on_committed(now, env, refused);
                        debug_assert!(self.replies.is_empty() && self.fresh.is_empty());
                        self.replies = replies;
                        self.fresh = fresh;
                        self.fresh_sent = sent;
                    }
                    None => self.on_committed(now, env, refused),
                }
                Flow::Next
            }
            Event::Shutdown(Some(conn)) => {
                // A connection already closing has sent its last frame
                // (found by the session fuzzer: a second BYE after it).
                if matches!(self.state(conn), State::Login | State::Active) {
                    self.bye(now, conn, self.shutdown_reason);
                }
                Flow::Stop
            }
            Event::Moved => {
                for i in 0..self.slots.len() {
                    let s = &self.slots[i];
                    if s.state == State::Active && env.owner(s.user) != Owner::Here {
                        self.stats.moved_closes.inc();
                        self.bye(now, ConnId(i as u32), ByeReason::Moved);
                    }
                }
                // Their subscribers see them go offline first; then the
                // subscriptions follow the users to their new node.
                self.settle_presence(now, env);
                self.presence_moved(env);
                Flow::Next
            }
            Event::Shutdown(None) => {
                for i in 0..self.slots.len() {
                    if matches!(self.slots[i].state, State::Login | State::Active) {
                        self.bye(now, ConnId(i as u32), self.shutdown_reason);
                    }
                }
                Flow::Next
            }
        }
    }

    /// The user, device and protocol version of `conn` when it is logged
    /// in and not closing.
    pub fn logged_in(&self, conn: ConnId) -> Option<(u64, u32, u8)> {
        let s = self.slots.get(conn.index())?;
        (s.state == State::Active).then_some((s.user, s.device, s.version))
    }

    /// Whether every open connection is logged in and not closing: a shard
    /// carrying its sessions to a successor has then said its last words
    /// to every other connection.
    pub fn only_active_left(&self) -> bool {
        self.slots
            .iter()
            .all(|s| matches!(s.state, State::Free | State::Active))
    }

    /// Gives back what the reused action and frame buffers (and the
    /// store's batch buffers) grew to beyond `keep_bytes` each (the shard
    /// calls it every `memory_release_ms`).
    pub fn trim(&mut self, keep_bytes: usize) {
        use crate::memory::trim_vec;
        trim_vec(&mut self.wire, keep_bytes);
        trim_vec(&mut self.actions, keep_bytes);
        trim_vec(&mut self.fresh, keep_bytes);
        trim_vec(&mut self.fresh_sent, keep_bytes);
        trim_vec(&mut self.registry.records, keep_bytes);
        self.registry.outbox.trim();
        crate::memory::shrink_map(&mut self.copies);
        self.store.trim(keep_bytes);
    }

    /// The actions of the last event, to execute in order.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }

    /// The encoded frames the last event's [`Action::Write`]s point into.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Moves the last event's actions and frames out (swapping in `actions`
    /// and `wire`, emptied, so their allocations are reused).
    pub fn take_actions(&mut self, actions: &mut Vec<Action>, wire: &mut Vec<u8>) {
        actions.clear();
        wire.clear();
        std::mem::swap(actions, &mut self.actions);
        std::mem::swap(wire, &mut self.wire);
    }

    // ---- state, for the shard and for invariant checks -------------------

    /// `conn`'s protocol state ([`State::Free`] for a slot never used).
    pub fn state(&self, conn: ConnId) -> State {
        self.slots
            .get(conn.index())
            .map_or(State::Free, |s| s.state)
    }

    /// The generation of the connection in `conn`'s slot (0: free).
    pub fn gen(&self, conn: ConnId) -> u32 {
        self.slots.get(conn.index()).map_or(0, |s| s.gen)
    }

    /// The user `conn` logged in as, also while it closes (0: none yet);
    /// for tracing its last frames.
    pub fn user_in(&self, conn: ConnId) -> u64 {
        self.slots.get(conn.index()).map_or(0, |s| s.user)
    }

    /// The user logged in on `conn`, if it is active.
    pub fn user_of(&self, conn: ConnId) -> Option<u64> {
        let s = self.slots.get(conn.index())?;
        (s.state == State::Active).then_some(s.user)
    }

    /// The connection of `user`'s first online device here, if any.
    pub fn conn_of(&self, user: u64) -> Option<ConnId> {
        self.users.conn_of(user)
    }

    /// The delivery window of `user`'s first online device, if any:
    /// DELIVERs unanswered and their bytes.
    pub fn window(&self, user: u64) -> Option<(u32, u32)> {
        self.users.window(user)
    }

    /// The delivery window of `user`'s device on `conn`, if that is one of
    /// its sessions: DELIVERs unanswered and their bytes.
    pub fn window_of(&self, user: u64, conn: ConnId) -> Option<(u32, u32)> {
        self.users
            .get(user, conn)
            .map(|o| (o.inflight, o.inflight_bytes))
    }

    /// Users online on this shard.
    pub fn users_online(&self) -> usize {
        self.users.len()
    }

    /// Sessions online on this shard: every online device of every user.
    pub fn sessions_online(&self) -> usize {
        self.users.sessions()
    }

    /// The connections of `user`'s online devices here.
    pub fn conns_of(&self, user: u64) -> Vec<ConnId> {
        (0..self.users.count(user))
            .map(|i| self.users.nth_conn(user, i))
            .collect()
    }

    /// Users with rate buckets, and online users with delivered messages
    /// remembered for READ checks: what the abuse guard holds.
    pub fn guard_sizes(&self) -> (usize, usize) {
        self.guard.sizes()
    }

    /// Slots in the table (free or not).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The decoder's limits.
    pub fn limits(&self) -> &proto::Limits {
        &self.limits
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The store, to commit it.
    pub fn store_mut(&mut self) -> &mut dyn Store {
        &mut *self.store
    }

    /// Sets the BYE reason of the next [`Event::Shutdown`]s: `upgrade` when
    /// the process hands over to a new binary (clients reconnect at once),
    /// `shutdown` otherwise (the default).
    pub fn set_shutdown_reason(&mut self, reason: ByeReason) {
        self.shutdown_reason = reason;
    }

    /// Replaces the store with one reopened (replayed) after a crash; server
    /// ids go on above both.
    pub fn replace_store(&mut self, store: Box<dyn Store + Send>) {
        self.next_seq = self.next_seq.max((store.max_server_id() >> 10) + 1);
        self.store = store;
    }

    /// Whether the debug crash hook fired since the last [`Sessions::reset`].
    pub fn crash_requested(&self) -> bool {
        self.crash
    }

    /// Forgets every connection and user after a crash. Answers that waited
    /// for a commit that never came are routed anyway (left as actions):
    /// with `kept_store` (an in-memory store, kept as it is) as they are,
    /// else ACKs become `ERROR(internal)`: not stored, so not acknowledged.
    pub fn reset(&mut self, now: Now, env: &dyn Env, kept_store: bool) {
        self.actions.clear();
        self.wire.clear();
        self.now_ms = now.unix_ms;
        // Registrations kept in sessions only (a user online alone) move to
        // the registry; a durable store's shard then restores the registry
        // from its log instead.
        self.registry_keep_online();
        self.slots.clear();
        self.users.clear();
        self.copies.clear();
        // Cluster: receipt records taken and not yet answered; the bridge
        // hears below that they are lost.
        self.bridge_receipts.clear();
        self.guard.clear();
        self.presence.clear();
        // Senders on this shard lose their connection and resend anyway;
        // senders on other shards keep theirs and would wait forever, so
        // they hear it was not stored: ERROR(internal), resend (a duplicate
        // if a failed commit did write it).
        let sealed = self.sealed.take().map_or_else(Vec::new, |s| s.replies);
        let replies = std::mem::take(&mut self.replies);
        for (dst, msg) in sealed.into_iter().chain(replies) {
            if dst == self.id {
                continue;
            }
            let msg = match msg {
                Msg::Ack {
                    reply, client_id, ..
                } if !kept_store => Msg::Reject {
                    reply,
                    client_id,
                    code: ErrorCode::Internal,
                },
                // Groups: a change or message may not be in the group log
                // (the log replayed says); what is there goes out again
                // from the replay, the rest is refused.
                Msg::GroupDone { reply, answer } if !kept_store => Msg::GroupDone {
                    reply,
                    answer: groups::lost(answer),
                },
                Msg::GroupFan { .. } if !kept_store => continue,
                // Receipts this shard said it has may not be in its device
                // log: their outboxes send them again (asked below).
                Msg::ReceiptsTaken { .. } if !kept_store => continue,
                // Copies not committed here: their home sends them again.
                Msg::GroupStored {
                    group, msg, shard, ..
                } if !kept_store => Msg::GroupStored {
                    group,
                    msg,
                    shard,
                    stored: false,
                },
                other => other,
            };
            self.route(now, env, dst, msg);
        }
        if self.config.cluster.is_some() {
            // Receipt records taken and not yet written (the crash closed
            // every connection) or kept in a stored state are lost: the
            // bridge has JetStream bring them again.
            let shard = self.id as u16;
            self.actions
                .push(Action::Cluster(Msg::ReceiptsResend { shard }));
        } else if !kept_store {
            // Receipts taken from the rings and not yet written are lost
            // with the crash: every other shard sends its outbox's for
            // users homed here again (this shard's own, its replay does).
            let me = self.id;
            for dst in (0..self.shards).filter(|&d| d != me) {
                let shard = me as u16;
                self.route(now, env, dst, Msg::ReceiptsResend { shard });
            }
        }
        self.crash = false;
        self.fresh.clear();
        self.fresh_sent.clear();
        self.stats.conns.set(0);
        self.stats.users_online.set(0);
        self.stats.presence_subs.set(0);
        self.stats.sessions_online.set(0);
    }

    // ---- connections -------------------------------------------------------

    fn open(&mut self, now: Now, env: &dyn Env, conn: ConnId) {
        grow_slots(&mut self.slots, conn.index());
        let gen = self.next_gen;
        self.next_gen = self.next_gen.checked_add(1).unwrap_or(1);
        let s = &mut self.slots[conn.index()];
        debug_assert_eq!(s.gen, 0, "slot {} reused while open", conn.0);
        *s = Slot {
            gen,
            state: State::Login,
            last_rx: now.tick,
            user: 0,
            device: 0,
            version: 0,
            paused: false,
        };
        // The one timer entry must fire by whichever deadline can come
        // first: the login deadline now, or the idle deadline if the LOGIN
        // succeeds. `on_timer` re-arms it at the real deadline of the state
        // it finds, so firing early is harmless but firing late is not.
        // (An MQTT connection handed over with a short keepalive: its own.)
        let silence = env.silence_ms_max(conn).map_or(self.idle_ticks, |ms| {
            timer::ticks(Duration::from_millis(ms))
        });
        let deadline = now.tick + self.login_ticks.min(silence);
        self.actions.push(Action::Arm {
            entry: Entry { key: conn.0, gen },
            deadline,
        });
        self.stats.conns.inc();
    }

    fn on_received(&mut self, now: Now, conn: ConnId) -> Flow {
        let Some(s) = self.slots.get_mut(conn.index()) else {
            return Flow::Stop;
        };
        match s.state {
            // Read and drop what a closing peer still sends.
            State::Free | State::Closing | State::Shut => Flow::Stop,
            // The login timeout runs from the accept: trickling bytes does
            // not extend it.
            State::Login => Flow::Next,
            State::Active => {
                s.last_rx = now.tick;
                Flow::Next
            }
        }
    }

    fn on_frame(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        frame: Frame<'_>,
        rest: &[u8],
    ) -> Flow {
        let Some(&s) = self.slots.get(conn.index()) else {
            return Flow::Stop; // never opened: nothing to answer
        };
        if s.state == State::Active {
            if let Some(flow) = self.limit(now, env, conn, s.user, &frame) {
                return flow;
            }
        }
        match (s.state, frame) {
            (State::Login, Frame::Login { version, token }) => {
                self.on_login(now, env, conn, version, token, rest)
            }
            (State::Login, other) => {
                self.stats.protocol_errors.inc();
                let text = format!("{} before LOGIN", other.name());
                self.fail(now, conn, ErrorCode::NotLoggedIn, 0, &text);
                Flow::Stop
            }
            (
                State::Active,
                Frame::Send {
                    client_id,
                    to,
                    body,
                },
            ) => self.on_send(now, env, conn, client_id, to, body),
            (State::Active, Frame::Delivered { server_id }) => {
                self.on_delivered(env, conn, s.user, server_id);
                Flow::Next
            }
            (State::Active, Frame::Read { server_id, from }) => {
                self.on_read(conn, s.user, server_id, from);
                Flow::Next
            }
            (State::Active, Frame::Ping { nonce }) => {
                self.write(conn, &Frame::Pong { nonce });
                Flow::Next
            }
            (State::Active, Frame::Pong { .. }) => Flow::Next,
            (State::Active, Frame::DeviceRemove { device }) => {
                if self.on_device_remove(now, conn, s.user, device) {
                    Flow::Next
                } else {
                    Flow::Stop
                }
            }
            (
                State::Active,
                frame @ (Frame::Subscribe { .. }
                | Frame::Unsubscribe { .. }
                | Frame::Presence { .. }
                | Frame::Privacy { .. }
                | Frame::Typing { .. }),
            ) => {
                if self.on_presence_frame(now, env, conn, s.user, frame) {
                    Flow::Next
                } else {
                    Flow::Stop
                }
            }
            (State::Active, Frame::Group(g)) => self.on_group_frame(now, env, conn, s.user, g),
            (State::Active, Frame::Login { .. }) => {
                self.stats.protocol_errors.inc();
                self.fail(
                    now,
                    conn,
                    ErrorCode::AlreadyLoggedIn,
                    0,
                    "already logged in",
                );
                Flow::Stop
            }
            (State::Active, Frame::Bye { .. }) => {
                self.close_now(conn);
                Flow::Stop
            }
            (State::Free | State::Closing | State::Shut, _) => Flow::Stop,
            (_, other) => {
                self.stats.protocol_errors.inc();
                let text = format!("{} is not valid here", other.name());
                self.fail(now, conn, ErrorCode::BadState, 0, &text);
                Flow::Stop
            }
        }
    }

    fn on_login(
        &mut self,
        now: Now,
        env: &dyn Env,
        conn: ConnId,
        version: u8,
        token: &[u8],
        rest: &[u8],
    ) -> Flow {
        if !(proto::VERSION..=proto::VERSION_MAX).contains(&version) {
            self.stats.logins_failed.inc();
            self.stats.login_failures_bad_version.inc();
            let text = format!(
                "protocol version {version} not supported, this server speaks {} to {}",
                proto::VERSION,
                proto::VERSION_MAX
            );
            self.login_err(now, conn, ErrorCode::BadVersion, &text);
            return Flow::Stop;
        }
        let token::Claims { user, device } = match token::verify_device(
            self.config.token_secret.as_bytes(),
            token,
            now.unix_ms / 1000,
        ) {
            Ok(claims) => claims,
            Err(e) => {
                self.stats.logins_failed.inc();
                let code = match e {
                    token::TokenError::Expired => {
                        self.stats.login_failures_token_expired.inc();
                        ErrorCode::TokenExpired
                    }
                    token::TokenError::Malformed | token::TokenError::BadSignature => {
                        self.stats.login_failures_bad_token.inc();
                        ErrorCode::BadToken
                    }
                };
                // Counted against the source address by the shard.
                self.actions.push(Action::LoginFailed(conn));
                self.login_err(now, conn, code, &e.to_string());
                return Flow::Stop;
            }
        };
        if env.banned(user, now.unix_ms) {
            self.stats.logins_failed.inc();
            self.stats.login_failures_banned.inc();
            let text = format!("user {user} is banned by the operator");
            self.login_err(now, conn, ErrorCode::Banned, &text);
            return Flow::Stop;
        }
        match env.owner(user) {
            Owner::Here => {}
            Owner::Elsewhere { node, addr } => {
                self.stats.redirects.inc();
                if version >= proto::VERSION_2 {
                    self.write(conn, &Frame::Redirect { addr });
                    self.close_after_flush(now, conn);
                } else {
                    let text = format!("user {user} is served by node {node} at {addr}");
                    self.login_err(now, conn, ErrorCode::OtherNode, &text);
                }
                return Flow::Stop;
            }
            Owner::Nobody => {
                self.stats.unavailable.inc();
                self.login_err(
                    now,
                    conn,
                    ErrorCode::Unavailable,
                    "no node serves your partition right now (it is changing owner), retry later",
                );
                return Flow::Stop;
            }
        }
        let home = home_shard(user, self.shards);
        if !env.up(home) {
            self.stats.unavailable.inc();
            self.login_err(
                now,
                conn,
                ErrorCode::Unavailable,
                "your home shard is restarting, retry later",
            );
            return Flow::Stop;
        }
        if home == self.id {
            let who = Who {
                user,
                device,
                version,
            };
            if !self.install(now, env, conn, who, true) {
                return Flow::Stop;
            }
            if !rest.is_empty() {
                // What followed the LOGIN is the logged-in session's input.
                self.slots[conn.index()].last_rx = now.tick;
            }
            return Flow::Next;
        }
        // The socket moves home with whatever followed the LOGIN frame.
        self.slots[conn.index()] = Slot::default();
        self.stats.conns.sub(1);
        self.stats.handoffs_out.inc();
        self.actions.push(Action::Handoff {
            conn,
            user,
            device,
            version,
            home,
        });
        Flow::Stop
    }

    /// Makes `conn` the session of `device` of `user` on this, its home
    /// shard: it replaces the session of the same device, or joins those of
    /// the user's other devices; a new device is registered, up to
    /// `devices_per_user_max` registered devices. Returns false (LOGIN_ERR
    /// `too_many_devices` sent) past that. `greet` sends LOGIN_OK
    /// (not to a session carried from a predecessor).
    fn install(&mut self, now: Now, env: &dyn Env, conn: ConnId, who: Who, greet: bool) -> bool {
        let Who {
            user,
            device,
            version,
        } = who;
        let online = self.users.count(user);
        // A user is online while any device is: a joining or replacing
        // device sends no PRESENCE.
        let replacing = online > 0;
        let same = (0..online)
            .map(|i| self.users.nth_conn(user, i))
            .find(|c| self.slots[c.index()].device == device);
        if let Some(old) = same {
            self.write(
                old,
                &Frame::Bye {
                    reason: ByeReason::Replaced,
                },
            );
            self.close_after_flush(now, old);
        }
        let lane = match self.login_lane(user, device) {
            Ok(lane) => lane,
            Err(registered) => {
                self.stats.logins_failed.inc();
                self.stats.login_failures_too_many_devices.inc();
                let text = format!(
                    "user {user} has {registered} devices registered, the most this server \
                     allows (devices_per_user_max); remove one with DEVICE_REMOVE"
                );
                self.login_err(now, conn, ErrorCode::TooManyDevices, &text);
                return false;
            }
        };
        self.stats.logins_ok.inc();
        self.actions.push(Action::Established(conn));
        let s = &mut self.slots[conn.index()];
        s.user = user;
        s.device = device;
        s.state = State::Active;
        s.version = version;
        self.users.go_online(user, conn, lane);
        self.stats.users_online.set(self.users.len() as u64);
        self.stats.sessions_online.set(self.users.sessions() as u64);
        if greet {
            // What waits for this device (others may have answered some).
            let offline_count = self.waiting_for(user, lane).map_or(0, |(n, _)| n as u64);
            self.write(
                conn,
                &Frame::LoginOk {
                    server_time_ms: now.unix_ms,
                    offline_count,
                },
            );
        }
        self.give_receipts(user, conn, lane);
        if !replacing {
            self.presence_online(now, env, user);
        }
        self.pump_one(env, user, conn, false, None);
        true
    }

    fn on_timer(&mut self, now: Now, env: &dyn Env, entry: Entry) {
        let conn = ConnId(entry.key);
        let Some(s) = self.slots.get(conn.index()) else {
            return;
        };
        if s.gen != entry.gen {
            return; // the connection is gone; its slot may be reused
        }
        let ticks = match s.state {
            State::Free => return,
            State::Login => self.login_ticks,
            State::Active => env.silence_ms_max(conn).map_or(self.idle_ticks, |ms| {
                timer::ticks(Duration::from_millis(ms))
            }),
            State::Closing | State::Shut => self.linger_ticks,
        };
        let deadline = s.last_rx + ticks;
        if s.state == State::Active {
            self.guard.settle(s.user, now.unix_ms);
        }
        if deadline > now.tick {
            self.actions.push(Action::Arm { entry, deadline });
            return;
        }
        if s.state == State::Active {
            self.stats.idle_closes.inc();
            self.bye(now, conn, ByeReason::Idle);
        } else {
            self.close_now(conn);
        }
    }

    // ---- output and closing -------------------------------------------------

    /// Writes `frame` to `conn`; an ERROR or LOGIN_ERR text is cut to fit
    /// `frame_bytes_max`.
    fn write(&mut self, conn: ConnId, frame: &Frame<'_>) {
        let at = self.wire.len();
        proto::encode(
            &fit_text(*frame, self.limits.frame_bytes_max),
            &mut self.wire,
        );
        self.actions.push(Action::Write {
            conn,
            bytes: at..self.wire.len(),
        });
    }

    /// Bytes this event wrote to `conn` so far (not yet in its output).
    fn written(&self, conn: ConnId) -> usize {
        self.actions
            .iter()
            .map(|a| match a {
                Action::Write { conn: c, bytes } if *c == conn => bytes.len(),
                _ => 0,
            })
            .sum()
    }

    /// Sends ERROR and closes once it is flushed.
    fn fail(&mut self, now: Now, conn: ConnId, code: ErrorCode, client_id: u64, text: &str) {
        self.write(
            conn,
            &Frame::Error {
                code,
                client_id,
                text,
            },
        );
        self.close_after_flush(now, conn);
    }

    fn login_err(&mut self, now: Now, conn: ConnId, code: ErrorCode, text: &str) {
        self.write(conn, &Frame::LoginErr { code, text });
        self.close_after_flush(now, conn);
    }

    fn bye(&mut self, now: Now, conn: ConnId, reason: ByeReason) {
        self.write(conn, &Frame::Bye { reason });
        self.close_after_flush(now, conn);
    }

    /// Leaves the session: no more frames are handled or messages delivered;
    /// pending output is flushed, then the write side is shut down and the
    /// peer gets `LINGER` to close before we do.
    fn close_after_flush(&mut self, now: Now, conn: ConnId) {
        self.go_offline(conn);
        let Some(s) = self.slots.get_mut(conn.index()) else {
            return;
        };
        if s.state == State::Free || s.state.is_closing() {
            return;
        }
        s.state = State::Closing;
        s.last_rx = now.tick;
        let gen = s.gen;
        self.actions.push(Action::CloseAfterFlush(conn));
        self.actions.push(Action::Arm {
            entry: Entry { key: conn.0, gen },
            deadline: now.tick + self.linger_ticks,
        });
    }

    /// Takes `conn`'s session of its user offline, if it is one: its
    /// device stays registered and owes what it owed; once the user's last
    /// device leaves, what was delivered to it is forgotten.
    fn go_offline(&mut self, conn: ConnId) {
        let Some(s) = self.slots.get(conn.index()) else {
            return;
        };
        let (user, gen, device) = (s.user, s.gen, s.device);
        if user == 0 {
            return;
        }
        self.guard.forget(conn);
        if let Some(lane) = self.users.go_offline(user, conn) {
            self.registry_offline(user, device, lane);
            self.presence_gone(user, conn, gen);
            self.stats.users_online.set(self.users.len() as u64);
            self.stats.sessions_online.set(self.users.sessions() as u64);
        }
    }

    /// Closes at once and frees the slot.
    fn close_now(&mut self, conn: ConnId) {
        if self.state(conn) == State::Free {
            return;
        }
        self.go_offline(conn);
        self.slots[conn.index()] = Slot::default();
        self.actions.push(Action::CloseNow(conn));
        self.stats.conns.sub(1);
        self.stats.closed.inc();
    }
}

/// Makes `slots` hold index `index`, growing by an eighth rather than
/// doubling: the slot tables are most of an idle connection's cost, and
/// doubling leaves up to half of them unused. The shard grows its own slot
/// table the same way.
pub(crate) fn grow_slots<T: Default>(slots: &mut Vec<T>, index: usize) {
    if slots.len() <= index {
        let want = index + 1;
        if want > slots.capacity() {
            let extra = (want / 8).max(SLOTS_GROWTH_MIN);
            slots.reserve_exact(want - slots.len() + extra);
        }
        slots.resize_with(want, T::default);
    }
}

/// `frame` with its ERROR or LOGIN_ERR text cut at a character boundary so
/// that `L` is at most `frame_bytes_max`: the peer refuses a larger frame,
/// and the text is only for humans (at 64 bytes, the smallest limit, some
/// texts do not fit whole).
fn fit_text(frame: Frame<'_>, frame_bytes_max: usize) -> Frame<'_> {
    // Only frames with a text can be cut; the others (every ACK, RECEIPT)
    // skip the length pass that `encode` no longer needs either.
    if !matches!(frame, Frame::Error { .. } | Frame::LoginErr { .. }) {
        return frame;
    }
    let over = frame.payload_len().saturating_sub(frame_bytes_max);
    let cut = |text: &str| {
        let mut end = text.len().saturating_sub(over);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        end
    };
    match frame {
        Frame::Error {
            code,
            client_id,
            text,
        } if over > 0 => Frame::Error {
            code,
            client_id,
            text: &text[..cut(text)],
        },
        Frame::LoginErr { code, text } if over > 0 => Frame::LoginErr {
            code,
            text: &text[..cut(text)],
        },
        _ => frame,
    }
}
