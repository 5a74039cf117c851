//! The messages a client has handed to the server and not seen ACKed: the
//! send half of exactly-once delivery, shared by [`crate::session::Session`]
//! and the load generator through [`crate::session_state::SessionState`].

use std::collections::VecDeque;
use std::io;

use tern::proto::ErrorCode;

/// A message the app handed to the session, not yet ACKed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Its client id (increasing per session).
    pub client_id: u64,
    /// The recipient.
    pub to: u64,
    /// The body.
    pub body: Vec<u8>,
}

/// Where a session keeps the messages it has not seen ACKed. Implement it
/// over a file or a database to keep them across app restarts; a `push`
/// must be durable before it returns.
pub trait Outbox {
    /// Keeps `msg` (its client id is above every earlier one).
    fn push(&mut self, msg: Outgoing) -> io::Result<()>;
    /// Forgets the message `client_id` (ACKed, or refused for good).
    fn remove(&mut self, client_id: u64) -> io::Result<()>;
    /// The messages kept, oldest first.
    fn pending(&self) -> Vec<Outgoing>;
    /// The highest client id ever pushed (0 = none); new ids go above it.
    fn last_client_id(&self) -> u64;
    /// The kept message `client_id`, if any.
    fn get(&self, client_id: u64) -> Option<Outgoing> {
        self.pending()
            .into_iter()
            .find(|m| m.client_id == client_id)
    }
    /// How many messages are kept.
    fn len(&self) -> usize {
        self.pending().len()
    }
    /// Whether no message is kept.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An [`Outbox`] in memory: lost with the process. Empty, it allocates
/// nothing.
#[derive(Debug, Default)]
pub struct MemOutbox {
    msgs: VecDeque<Outgoing>,
    last: u64,
}

impl Outbox for MemOutbox {
    fn push(&mut self, msg: Outgoing) -> io::Result<()> {
        self.last = self.last.max(msg.client_id);
        self.msgs.push_back(msg);
        Ok(())
    }

    fn remove(&mut self, client_id: u64) -> io::Result<()> {
        if let Some(at) = self.msgs.iter().position(|m| m.client_id == client_id) {
            self.msgs.remove(at);
        }
        if self.msgs.is_empty() {
            // Give the memory back: a load generator holds 100k+ of these.
            self.msgs = VecDeque::new();
        }
        Ok(())
    }

    fn pending(&self) -> Vec<Outgoing> {
        self.msgs.iter().cloned().collect()
    }

    fn last_client_id(&self) -> u64 {
        self.last
    }

    fn get(&self, client_id: u64) -> Option<Outgoing> {
        self.msgs.iter().find(|m| m.client_id == client_id).cloned()
    }

    fn len(&self) -> usize {
        self.msgs.len()
    }
}

/// Whether a SEND refused with `code` may succeed later unchanged.
pub fn is_retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::StorageFull
            | ErrorCode::QueueFull
            | ErrorCode::Unavailable
            | ErrorCode::RateLimited
            | ErrorCode::Internal
    )
}

/// Whether an ERROR with `client_id` 0 refused one frame and left the
/// connection open (docs/HARDENING.md), rather than ending it.
pub fn is_frame_refusal(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::RateLimited | ErrorCode::UnknownMessage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_outbox_keeps_order_and_the_last_id() {
        let mut o = MemOutbox::default();
        for id in [5, 6, 7] {
            o.push(Outgoing {
                client_id: id,
                to: 1,
                body: vec![],
            })
            .unwrap();
        }
        o.remove(6).unwrap();
        let ids: Vec<u64> = o.pending().iter().map(|m| m.client_id).collect();
        assert_eq!(ids, [5, 7]);
        assert_eq!(o.get(7).map(|m| m.client_id), Some(7));
        assert_eq!(o.get(6), None);
        o.remove(5).unwrap();
        o.remove(7).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.last_client_id(), 7);
    }

    #[test]
    fn retryable_codes() {
        assert!(is_retryable(ErrorCode::StorageFull));
        assert!(is_retryable(ErrorCode::Unavailable));
        assert!(!is_retryable(ErrorCode::BadRecipient));
        assert!(!is_retryable(ErrorCode::TooLarge));
    }

    #[test]
    fn frame_refusals_keep_the_connection() {
        assert!(is_frame_refusal(ErrorCode::RateLimited));
        assert!(is_frame_refusal(ErrorCode::UnknownMessage));
        assert!(!is_frame_refusal(ErrorCode::Malformed));
    }
}
