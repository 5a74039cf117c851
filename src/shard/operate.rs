//! The shard's side of the operators' commands ([`crate::ops`]): answering
//! `show user` and `kick user` from its mailbox, and its part of a drain.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::io::ConnId;
use crate::ops::{describe, Answer, Cmd, ConnRow, Request, Top};
use crate::proto::{self, ByeReason, Frame};
use crate::session::{Event, State};

use super::Shard;

/// Session slots a `show conns` looks at per loop iteration, so that a
/// shard with a million connections answers over a few hundred iterations
/// instead of stalling one.
pub(super) const SCAN_SLOTS_PER_ITERATION: usize = 4096;

/// A `show conns` being worked through.
#[derive(Debug)]
pub(super) struct Scan {
    request: Request,
    top: Top,
    /// The next session slot to look at.
    cursor: usize,
}

/// This shard's progress through a drain: its sessions are closed at an
/// even pace, so that clients spread their reconnects over the drain's
/// duration instead of all coming back at once. Idle sessions go first (a
/// pass over the slots closing those with nothing in flight either way),
/// then the rest in slot order: a client in the middle of a conversation
/// keeps its connection the longest.
#[derive(Debug)]
pub(super) struct Draining {
    /// When this shard saw the drain begin.
    started: Instant,
    /// Over how long every session is closed.
    over: Duration,
    /// Sessions open when it began: the pace is `total / over`.
    total: usize,
    /// Sessions closed so far.
    closed: usize,
    /// The next session slot to look at.
    cursor: usize,
    /// Whether the pass over idle sessions is through and every session
    /// left is closed now, busy or not.
    busy_pass: bool,
}

impl Shard {
    /// Serves the requests in this shard's mailbox and, while draining,
    /// closes the sessions now due.
    pub(super) fn serve_ops(&mut self) {
        let Some(ops) = self.ops.clone() else {
            return;
        };
        let mut requests = std::mem::take(&mut self.requests);
        ops.take(self.id, &mut requests);
        for request in requests.drain(..) {
            let text = match request.cmd {
                Cmd::ShowUser(user) => self.show_user(user, ops.banned(user, self.now.unix_ms)),
                Cmd::Kick { user, reason } => self.kick(user, reason),
                Cmd::RemoveDevice { user, device } => self.remove_device(user, device),
                Cmd::Conns { sort, limit } => {
                    self.scans.push(Scan {
                        request,
                        top: Top::new(sort, limit),
                        cursor: 0,
                    });
                    continue;
                }
            };
            request.answer(Answer::Text(text));
        }
        self.requests = requests;
        let version = ops.traces_version();
        if version != self.traces_seen {
            self.traced = ops.traces();
            self.traces_seen = version;
        }
        if !self.traced.is_empty() {
            let now = Instant::now();
            self.traced.retain(|t| t.until > now);
        }
        if !self.scans.is_empty() {
            self.advance_scans();
        }
        if ops.draining() {
            self.drain_step(&ops);
        }
    }

    /// What `show user` says about `user`, whose home this shard is.
    fn show_user(&self, user: u64, banned: bool) -> String {
        let store = self.sessions.store();
        let queued = store.len(user);
        let mut out = String::new();
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            writeln!(out, "{key}: {value}").expect("writing to a String");
        };
        line("User", &user);
        line("Shard", &self.id);
        line("Banned", &yes_no(banned));
        match self.sessions.conn_of(user) {
            Some(conn) => {
                line("Online", &"yes");
                line("Connection", &conn.0);
                line("Backend", &self.io.name());
                line("Tls", &yes_no(self.conns.is_tls(conn)));
                let (inflight, inflight_bytes) = self.sessions.window(user).unwrap_or((0, 0));
                line("Delivers_in_flight", &inflight);
                line("Delivers_in_flight_bytes", &inflight_bytes);
                line("Out_pending_bytes", &self.conns.out_pending(conn));
            }
            None => line("Online", &"no"),
        }
        // The ids `device remove` takes.
        let devices: Vec<String> = self
            .sessions
            .devices_of(user)
            .iter()
            .map(u32::to_string)
            .collect();
        line("Devices_online", &devices.join(" "));
        let registered: Vec<String> = self
            .sessions
            .registered_devices(user)
            .iter()
            .map(u32::to_string)
            .collect();
        line("Devices_registered", &registered.join(" "));
        // One line per session (device) online, in the order they joined.
        for (conn, device) in self.sessions.conns_of(user).into_iter().zip(devices) {
            let (inflight, _) = self.sessions.window_of(user, conn).unwrap_or((0, 0));
            let peer = self
                .io
                .peer_addr(conn)
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            let transport = match (self.conns.is_tls(conn), self.conns.is_ws(conn)) {
                (true, _) => "tls",
                (false, true) => "ws",
                (false, false) => "tcp",
            };
            line(
                "Session",
                &format_args!(
                    "device={device} conn={} transport={transport} peer={peer} \
                     delivers_in_flight={inflight} out_pending_bytes={}",
                    conn.0,
                    self.conns.out_pending(conn)
                ),
            );
        }
        if self.sessions.conn_of(user).is_none() {
            // Last seen (presence): when the user's last device went
            // offline, kept durably; 0 = not seen offline by this server.
            let seen = self
                .sessions
                .presence_state()
                .get(&user)
                .map_or(0, |s| s.last_seen_ms);
            line("Last_seen_unix_ms", &seen);
        }
        line("Queued", &queued);
        let oldest_ms = store
            .next_after(user, 0)
            .map_or(0, |m| self.now.unix_ms.saturating_sub(m.time_ms));
        line("Oldest_queued_age_ms", &oldest_ms);
        line("Receipts_pending", &self.sessions.receipts_kept(user));
        out
    }

    /// Logs `frame`, which went `dir` ("in" or "out") on `conn`, if its
    /// user is traced. Callers check that someone is traced first.
    pub(super) fn trace(&self, conn: ConnId, dir: &str, frame: &Frame<'_>) {
        let user = self.sessions.user_in(conn);
        if let Some(t) = self.traced.iter().find(|t| t.user == user && user != 0) {
            log::info!(
                target: "tern::trace",
                "trace user {user} shard {} conn {} {dir} {}",
                self.id,
                conn.0,
                describe(frame, t.bodies)
            );
        }
    }

    /// [`Shard::trace`] for each frame of encoded output `bytes`.
    pub(super) fn trace_out(&self, conn: ConnId, bytes: &[u8]) {
        let user = self.sessions.user_in(conn);
        if !self.traced.iter().any(|t| t.user == user && user != 0) {
            return;
        }
        let limits = self.sessions.limits();
        let mut at = 0;
        // Bounded: each pass consumes a frame or stops.
        while at < bytes.len() {
            match proto::decode(&bytes[at..], limits) {
                Ok(Some((frame, used))) => {
                    self.trace(conn, "out", &frame);
                    at += used;
                }
                _ => break,
            }
        }
    }

    /// Looks at the next [`SCAN_SLOTS_PER_ITERATION`] slots for each
    /// `show conns` in progress, and answers those that are through.
    fn advance_scans(&mut self) {
        let slots = self.sessions.slots();
        let store = self.sessions.store();
        for scan in &mut self.scans {
            let end = slots.min(scan.cursor + SCAN_SLOTS_PER_ITERATION);
            for i in scan.cursor..end {
                let conn = ConnId(i as u32);
                if self.sessions.state(conn) != State::Active {
                    continue;
                }
                let Some(user) = self.sessions.user_of(conn) else {
                    continue;
                };
                let oldest_age_ms = store
                    .next_after(user, 0)
                    .map_or(0, |m| self.now.unix_ms.saturating_sub(m.time_ms));
                scan.top.offer(ConnRow {
                    shard: self.id,
                    conn: conn.0,
                    user,
                    queued: store.len(user),
                    oldest_age_ms,
                    inflight: self.sessions.window(user).map_or(0, |w| w.0),
                    out_pending_bytes: self.conns.out_pending(conn),
                });
            }
            scan.cursor = end;
        }
        let (done, going): (Vec<Scan>, Vec<Scan>) = std::mem::take(&mut self.scans)
            .into_iter()
            .partition(|scan| scan.cursor >= slots);
        self.scans = going;
        for scan in done {
            let (rows, seen) = scan.top.finish();
            scan.request.answer(Answer::Rows(rows, seen));
        }
    }

    /// Closes `user`'s connections (every device) with BYE(`reason`). What is queued for it
    /// stays queued, and DELIVERs it had not answered are sent again at its
    /// next login.
    fn kick(&mut self, user: u64, reason: ByeReason) -> String {
        // Every online device of the user: a ban must leave none connected.
        let conns = self.sessions.conns_of(user);
        let conns_len = conns.len();
        if conns.is_empty() {
            return format!("User {user} is not online.\n");
        }
        log::info!(
            "shard {}: user {user} closed with BYE({reason}) ({} sessions)",
            self.id,
            conns.len()
        );
        for conn in conns {
            self.event(Event::Bye { conn, reason });
        }
        if reason == ByeReason::Kicked {
            self.stats.kicks.add(conns_len as u64);
        }
        format!("User {user} closed with BYE({reason}).\n")
    }

    /// Removes device `device` of `user` (see [`Event::RemoveDevice`]).
    fn remove_device(&mut self, user: u64, device: u64) -> String {
        let registered = u32::try_from(device)
            .is_ok_and(|d| self.sessions.registered_devices(user).contains(&d));
        if !registered {
            return format!("Device {device} of user {user} is not registered (unknown_device).\n");
        }
        let online = self.sessions.device_conn(user, device).is_some();
        self.event(Event::RemoveDevice { user, device });
        if online {
            format!("Device {device} of user {user} removed: closed with BYE(device_removed).\n")
        } else {
            format!("Device {device} of user {user} removed (it was offline).\n")
        }
    }

    /// Closes the sessions due by now in this drain, at most one pass over
    /// the slots in all.
    fn drain_step(&mut self, ops: &crate::ops::Ops) {
        let now = self.clock.now();
        let draining = match &mut self.drain {
            Some(draining) => draining,
            None => {
                let over = ops.drain_state().map_or(Duration::ZERO, |d| d.over);
                let total = (0..self.sessions.slots())
                    .filter(|&i| open(self.sessions.state(ConnId(i as u32))))
                    .count();
                log::info!(
                    "shard {}: draining {total} sessions over {} s",
                    self.id,
                    over.as_secs()
                );
                self.drain.insert(Draining {
                    started: now,
                    over,
                    total,
                    closed: 0,
                    cursor: 0,
                    busy_pass: false,
                })
            }
        };
        let due = due(draining, now);
        let (mut closed, mut cursor, mut busy_pass) =
            (draining.closed, draining.cursor, draining.busy_pass);
        let slots = self.sessions.slots();
        while closed < due {
            if cursor >= slots {
                if busy_pass {
                    break;
                }
                busy_pass = true;
                cursor = 0;
                continue;
            }
            let conn = ConnId(cursor as u32);
            cursor += 1;
            if open(self.sessions.state(conn)) && (busy_pass || self.is_idle(conn)) {
                closed += 1;
                self.event(Event::Bye {
                    conn,
                    reason: ByeReason::Moving,
                });
            }
        }
        let draining = self.drain.as_mut().expect("set above");
        draining.closed = closed;
        draining.cursor = cursor;
        draining.busy_pass = busy_pass;
    }

    /// Whether `conn` has nothing under way: no DELIVER unanswered, no
    /// output unsent, no partial frame read (a drain closes these first).
    fn is_idle(&self, conn: ConnId) -> bool {
        let inflight = self
            .sessions
            .user_of(conn)
            .and_then(|user| self.sessions.window_of(user, conn))
            .map_or(0, |w| w.0);
        inflight == 0 && !self.conns.has_bufs(conn)
    }
}

/// Sessions that should have been closed `now` in this drain: a share of
/// the total growing evenly with the time, all of them once it is over.
fn due(d: &Draining, now: Instant) -> usize {
    let elapsed = now.saturating_duration_since(d.started);
    if elapsed >= d.over {
        return usize::MAX;
    }
    let share = d.total as u128 * elapsed.as_nanos() / d.over.as_nanos().max(1);
    (share as usize).max(1)
}

/// Whether a session in `state` is still to be closed by a drain.
fn open(state: State) -> bool {
    matches!(state, State::Login | State::Active)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_pace() {
        let t0 = Instant::now();
        let d = Draining {
            started: t0,
            over: Duration::from_secs(10),
            total: 1000,
            closed: 0,
            cursor: 0,
            busy_pass: false,
        };
        assert_eq!(due(&d, t0), 1);
        assert_eq!(due(&d, t0 + Duration::from_secs(1)), 100);
        assert_eq!(due(&d, t0 + Duration::from_secs(5)), 500);
        assert_eq!(due(&d, t0 + Duration::from_secs(10)), usize::MAX);
        let instant = Draining {
            over: Duration::ZERO,
            ..d
        };
        assert_eq!(due(&instant, t0), usize::MAX);
    }
}
