//! A bounded chat load for the fault tests: a few users, one thread each,
//! every user sending a fixed number of messages round robin to the others
//! and acknowledging (DELIVERED) what it receives. Each user behaves as a
//! real client does through faults: on a closed connection or BYE it logs
//! in again through any node (REDIRECT followed, `unavailable` retried),
//! and it sends a SEND again, with the same `client_id`, until that SEND is
//! ACKed. [`Outcome::check`] then holds the cluster to the protocol's
//! promise: every ACKed message delivered, per-sender order kept,
//! duplicates only with the same server id.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern::proto::{ErrorCode, OwnedFrame, VERSION_2};
use tern_client::Client;

use super::common::{body_index, indexed_body, token};

/// Upper bound for a whole run, faults and takeovers included.
const RUN: Duration = Duration::from_secs(120);

/// How long a user waits between attempts after `unavailable` or a failed
/// login.
const BACKOFF: Duration = Duration::from_millis(100);

/// One ACKed message: (recipient, sender, index, server id).
type Acked = (u64, u64, u64, u64);

/// What the user threads share.
#[derive(Default)]
struct Shared {
    acked: Mutex<Vec<Acked>>,
    acked_count: AtomicU64,
    senders_done: AtomicUsize,
}

/// A running chat load.
pub struct Chat {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<UserLog>>,
    users: usize,
}

/// What one user saw.
struct UserLog {
    user: u64,
    /// Every DELIVER as (sender, index, server id), in arrival order.
    received: Vec<(u64, u64, u64)>,
    /// SENDs answered `unavailable` (retried).
    unavailable: u64,
    /// Logins after the first.
    relogins: u64,
}

/// What a finished run saw.
pub struct Outcome {
    acked: Vec<Acked>,
    logs: Vec<UserLog>,
}

impl Chat {
    /// Starts `users` users (ids `first..`), each sending `per_user`
    /// messages, logging in through `entries` (user i starts at entry
    /// i mod len).
    pub fn start(entries: &[SocketAddr], first: u64, users: usize, per_user: u64) -> Chat {
        assert!(users >= 2);
        let ids: Vec<u64> = (first..first + users as u64).collect();
        let shared = Arc::new(Shared::default());
        let deadline = Instant::now() + RUN;
        let threads = (0..users)
            .map(|i| {
                let (ids, shared) = (ids.clone(), shared.clone());
                let entries = entries.to_vec();
                std::thread::spawn(move || {
                    let mut user = User {
                        me: ids[i],
                        entries,
                        entry: i,
                        deadline,
                        log: UserLog {
                            user: ids[i],
                            received: Vec::new(),
                            unavailable: 0,
                            relogins: 0,
                        },
                    };
                    user.run(&ids, i, per_user, &shared);
                    user.log
                })
            })
            .collect();
        Chat {
            shared,
            threads,
            users,
        }
    }

    /// Messages ACKed so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked_count.load(Ordering::Relaxed)
    }

    /// Waits until `n` messages are ACKed (bounded by the run's deadline).
    pub fn wait_acked(&self, n: u64) {
        let deadline = Instant::now() + RUN;
        while self.acked() < n {
            assert!(Instant::now() < deadline, "only {} ACKed", self.acked());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every user to send everything and receive everything ACKed
    /// for it.
    pub fn finish(self) -> Outcome {
        let logs: Vec<UserLog> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("a user thread panicked"))
            .collect();
        assert_eq!(logs.len(), self.users);
        let acked = std::mem::take(&mut *self.shared.acked.lock().unwrap());
        Outcome { acked, logs }
    }
}

impl Outcome {
    /// Every ACKed message arrived at its recipient with the ACK's server
    /// id, the sender and the index; a server id always names the same
    /// message; per sender, each recipient's first copies arrive in send
    /// order. Returns (messages ACKed, duplicates received, SENDs answered
    /// `unavailable`, logins after the first).
    pub fn check(&self) -> (usize, usize, u64, u64) {
        let mut duplicates = 0;
        let mut by_id: HashMap<u64, (u64, u64, u64)> = HashMap::new();
        for log in &self.logs {
            let mut seen = HashSet::new();
            let mut last: HashMap<u64, u64> = HashMap::new();
            for &(from, index, id) in &log.received {
                let named = by_id.entry(id).or_insert((log.user, from, index));
                assert_eq!(
                    *named,
                    (log.user, from, index),
                    "server id {id} names two messages"
                );
                if !seen.insert(id) {
                    duplicates += 1;
                    continue;
                }
                let before = last.insert(from, index).unwrap_or(0);
                assert!(
                    index > before,
                    "user {} got {from}'s message {index} (server id {id}) after {before}; \
                     from {from} it got (index, server id) {:?}",
                    log.user,
                    log.received
                        .iter()
                        .filter(|r| r.0 == from)
                        .map(|r| (r.1, r.2))
                        .collect::<Vec<_>>()
                );
            }
        }
        for &(to, from, index, id) in &self.acked {
            assert_eq!(
                by_id.get(&id),
                Some(&(to, from, index)),
                "ACKed message {index} from {from} to {to} (server id {id}) never delivered"
            );
        }
        let unavailable = self.logs.iter().map(|l| l.unavailable).sum();
        let relogins = self.logs.iter().map(|l| l.relogins).sum();
        (self.acked.len(), duplicates, unavailable, relogins)
    }
}

/// One user's thread.
struct User {
    me: u64,
    entries: Vec<SocketAddr>,
    /// The entry tried next.
    entry: usize,
    deadline: Instant,
    log: UserLog,
}

impl User {
    fn run(&mut self, ids: &[u64], i: usize, per_user: u64, shared: &Shared) {
        let others = ids.len() - 1;
        let mut client = self.login();
        // The SEND waiting for its ACK: (client_id = index, recipient).
        let mut in_flight: Option<(u64, u64)> = None;
        let mut next = 1;
        let mut done = false;
        loop {
            assert!(
                Instant::now() < self.deadline,
                "user {}: sent {}, received {}, not finished in {RUN:?}",
                self.me,
                next - 1,
                self.log.received.len()
            );
            if in_flight.is_none() && next <= per_user {
                let (index, to) = (next, ids[(i + 1 + (next as usize % others)) % ids.len()]);
                next += 1;
                in_flight = Some((index, to));
                if client.send_msg(index, to, &indexed_body(index, 0)).is_err() {
                    client = self.login_again(in_flight);
                }
            }
            if in_flight.is_none() && next > per_user && !done {
                done = true;
                shared.senders_done.fetch_add(1, Ordering::AcqRel);
            }
            if done && self.has_all(shared, ids.len()) {
                return;
            }
            match client.recv_timeout(BACKOFF) {
                Ok(None) => {}
                Ok(Some(OwnedFrame::Ack {
                    client_id,
                    server_id,
                    ..
                })) => {
                    if let Some((index, to)) = in_flight.filter(|&(c, _)| c == client_id) {
                        shared
                            .acked
                            .lock()
                            .unwrap()
                            .push((to, self.me, index, server_id));
                        shared.acked_count.fetch_add(1, Ordering::AcqRel);
                        in_flight = None;
                    }
                }
                Ok(Some(OwnedFrame::Error {
                    code, client_id, ..
                })) if client_id != 0 => {
                    let Some((index, to)) = in_flight.filter(|&(c, _)| c == client_id) else {
                        continue;
                    };
                    assert_eq!(
                        code,
                        ErrorCode::Unavailable,
                        "user {}: SEND {index}",
                        self.me
                    );
                    self.log.unavailable += 1;
                    std::thread::sleep(BACKOFF);
                    if client.send_msg(index, to, &indexed_body(index, 0)).is_err() {
                        client = self.login_again(in_flight);
                    }
                }
                Ok(Some(OwnedFrame::Deliver {
                    server_id,
                    from,
                    body,
                    ..
                })) => {
                    self.log.received.push((from, body_index(&body), server_id));
                    if client.send_delivered(server_id).is_err() {
                        client = self.login_again(in_flight);
                    }
                }
                Ok(Some(OwnedFrame::Bye { .. })) | Err(_) => client = self.login_again(in_flight),
                // Receipts, and ERRORs without a client_id (a DELIVERED for
                // a message of an earlier connection): nothing to do.
                Ok(Some(_)) => {}
            }
        }
    }

    /// Whether every sender is done and this user holds every message ACKed
    /// for it.
    fn has_all(&self, shared: &Shared, users: usize) -> bool {
        if shared.senders_done.load(Ordering::Acquire) < users {
            return false;
        }
        let got: HashSet<u64> = self.log.received.iter().map(|r| r.2).collect();
        let acked = shared.acked.lock().unwrap();
        acked
            .iter()
            .filter(|a| a.0 == self.me)
            .all(|a| got.contains(&a.3))
    }

    /// Logs in again and sends the SEND in flight again, same client_id.
    fn login_again(&mut self, in_flight: Option<(u64, u64)>) -> Client {
        self.log.relogins += 1;
        loop {
            let mut client = self.login();
            match in_flight {
                Some((index, to))
                    if client.send_msg(index, to, &indexed_body(index, 0)).is_err() => {}
                _ => return client,
            }
        }
    }

    /// A version 2 LOGIN through the entries in turn, REDIRECT followed,
    /// until one succeeds (bounded by the run's deadline).
    fn login(&mut self) -> Client {
        let mut last = None;
        while Instant::now() < self.deadline {
            let addr = self.entries[self.entry % self.entries.len()];
            match Client::login_version(addr, &token(self.me), VERSION_2) {
                Ok((client, _)) => return client,
                // Unavailable, a REDIRECT to a dead node, a dead entry.
                Err(e) => last = Some(e),
            }
            self.entry += 1;
            std::thread::sleep(BACKOFF);
        }
        panic!("user {} never logged in again: {last:?}", self.me);
    }
}
