//! The receive half of exactly-once delivery: which DELIVERs the app has
//! already been shown, by server id and by (sender, client id), over a
//! bounded window of the latest messages.

use std::collections::{HashMap, VecDeque};

/// What to do with one DELIVER ([`Dedupe::deliver`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// New: show it to the app (DELIVERED goes once the app accepts it).
    Show,
    /// Already shown: answer DELIVERED at once, show nothing. Either the app
    /// accepted it before a drop (the server did not hear the DELIVERED), or
    /// it is a second copy under another server id.
    AnswerDelivered,
    /// Shown and not accepted yet: the app has it; do nothing.
    Ignore,
}

/// The messages the app has been shown, oldest first, bounded: by server
/// id, and by (sender, client id) when the DELIVER carried one. Its maps
/// allocate on first use, so an idle one costs a few words.
#[derive(Debug)]
pub struct Dedupe {
    window: usize,
    order: VecDeque<(u64, Option<(u64, u64)>)>,
    /// server id -> accepted by the app.
    seen: HashMap<u64, bool>,
    /// (sender, client id) -> the server id it was shown under.
    origins: HashMap<(u64, u64), u64>,
}

impl Dedupe {
    /// A filter remembering the last `window` messages (at least 1).
    pub fn new(window: usize) -> Dedupe {
        Dedupe {
            window: window.max(1),
            order: VecDeque::new(),
            seen: HashMap::new(),
            origins: HashMap::new(),
        }
    }

    /// Judges a DELIVER of `server_id` from `from` carrying the sender's
    /// `client_id` (v2; `None` or 0: a v1 sender, only the server id counts).
    pub fn deliver(&mut self, server_id: u64, from: u64, client_id: Option<u64>) -> Incoming {
        let origin = client_id.filter(|&c| c != 0).map(|c| (from, c));
        let known = self.seen.contains_key(&server_id);
        match self.check(server_id, origin) {
            None => Incoming::Show,
            Some(accepted) if accepted || !known => Incoming::AnswerDelivered,
            Some(_) => Incoming::Ignore,
        }
    }

    /// The app stored `server_id`: a later copy is answered DELIVERED.
    pub fn accept(&mut self, server_id: u64) {
        if let Some(accepted) = self.seen.get_mut(&server_id) {
            *accepted = true;
        }
    }

    /// `None`: new (now remembered); `Some(accepted)`: seen before, under
    /// this server id or (same sender and client id) another one.
    fn check(&mut self, server_id: u64, origin: Option<(u64, u64)>) -> Option<bool> {
        if let Some(&accepted) = self.seen.get(&server_id) {
            return Some(accepted);
        }
        if let Some(first) = origin.and_then(|o| self.origins.get(&o)) {
            return Some(self.seen.get(first).copied().unwrap_or(true));
        }
        if self.order.len() >= self.window {
            if let Some((old, old_origin)) = self.order.pop_front() {
                self.seen.remove(&old);
                if let Some(o) = old_origin {
                    self.origins.remove(&o);
                }
            }
        }
        self.order.push_back((server_id, origin));
        self.seen.insert(server_id, false);
        if let Some(o) = origin {
            self.origins.insert(o, server_id);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_remembers_a_bounded_window() {
        let mut d = Dedupe::new(2);
        assert_eq!(d.check(10, None), None);
        assert_eq!(d.check(10, None), Some(false));
        d.accept(10);
        assert_eq!(d.check(10, None), Some(true));
        assert_eq!(d.check(11, None), None);
        assert_eq!(d.check(12, None), None); // 10 leaves the window
        assert_eq!(d.check(10, None), None);
    }

    #[test]
    fn dedupe_by_sender_and_client_id() {
        let mut d = Dedupe::new(2);
        assert_eq!(d.check(10, Some((1, 77))), None);
        // The same message under another server id.
        assert_eq!(d.check(20, Some((1, 77))), Some(false));
        d.accept(10);
        assert_eq!(d.check(20, Some((1, 77))), Some(true));
        // Another sender's 77 is another message.
        assert_eq!(d.check(30, Some((2, 77))), None);
        assert_eq!(d.check(40, None), None); // (1, 77) leaves the window
        assert_eq!(d.check(50, Some((1, 77))), None);
    }

    #[test]
    fn verdicts() {
        let mut d = Dedupe::new(8);
        assert_eq!(d.deliver(10, 1, Some(5)), Incoming::Show);
        // Shown, not accepted: the app has it.
        assert_eq!(d.deliver(10, 1, Some(5)), Incoming::Ignore);
        // Another server id, same origin: answer for the app.
        assert_eq!(d.deliver(11, 1, Some(5)), Incoming::AnswerDelivered);
        d.accept(10);
        // Accepted before a drop: the server did not hear it.
        assert_eq!(d.deliver(10, 1, Some(5)), Incoming::AnswerDelivered);
        // Client id 0 names nothing: a v1 sender.
        assert_eq!(d.deliver(12, 1, Some(0)), Incoming::Show);
        assert_eq!(d.deliver(13, 1, Some(0)), Incoming::Show);
    }
}
