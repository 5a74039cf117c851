//! The state machine of an exactly-once session, without I/O: events in,
//! what to send out. [`crate::session::Session`] drives one over a blocking
//! connection; the load generator drives one per simulated user from its
//! event loop.
//!
//! - **Send:** [`SessionState::send`] gives a message the next client id
//!   and keeps it in the [`Outbox`] until [`SessionState::on_ack`] (or a
//!   final refusal) removes it.
//! - **Reconnect:** after every login the driver writes
//!   [`SessionState::resend`]: every kept message, in order, with its
//!   original client id (the server's idempotent SEND answers a message it
//!   already stored with its original ACK).
//! - **Refusals:** [`SessionState::on_refused`] tells a temporary refusal
//!   (send again later, same client id) from a final one (dropped).
//! - **Receive:** [`SessionState::on_deliver`] runs the [`Dedupe`] filter
//!   and says whether to show the message, answer DELIVERED at once, or do
//!   nothing; [`SessionState::accept`] records that the app stored it.

use std::io;

use tern::proto::ErrorCode;

use crate::dedupe::{Dedupe, Incoming};
use crate::outbox::{is_retryable, MemOutbox, Outbox, Outgoing};

/// What a refused SEND comes to ([`SessionState::on_refused`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A temporary code: send the message again later, same client id.
    Retry,
    /// A final code: the message left the outbox (`None`: it was not there).
    Final(Option<Outgoing>),
}

/// One user's exactly-once bookkeeping. See the module docs.
#[derive(Debug)]
pub struct SessionState<O: Outbox = MemOutbox> {
    outbox: O,
    next_client_id: u64,
    dedupe: Dedupe,
}

impl<O: Outbox> SessionState<O> {
    /// State over `outbox`: new client ids start at `first_client_id`, or
    /// above the outbox's last one if that is higher. The duplicate filter
    /// remembers `dedupe_window` messages (at least 1).
    pub fn new(outbox: O, first_client_id: u64, dedupe_window: usize) -> SessionState<O> {
        let next_client_id = first_client_id.max(outbox.last_client_id() + 1);
        SessionState {
            outbox,
            next_client_id,
            dedupe: Dedupe::new(dedupe_window),
        }
    }

    /// Keeps a message for `to` under the next client id and returns it;
    /// the driver writes the SEND if connected (else [`resend`](Self::resend)
    /// does after the login).
    pub fn send(&mut self, to: u64, body: &[u8]) -> io::Result<u64> {
        let client_id = self.next_client_id;
        self.outbox.push(Outgoing {
            client_id,
            to,
            body: body.to_vec(),
        })?;
        self.next_client_id += 1;
        Ok(client_id)
    }

    /// What to write after a login: every message not ACKed, oldest first,
    /// each with its original client id.
    pub fn resend(&self) -> Vec<Outgoing> {
        self.outbox.pending()
    }

    /// The kept message `client_id` (to send again after a retry wait).
    pub fn pending(&self, client_id: u64) -> Option<Outgoing> {
        self.outbox.get(client_id)
    }

    /// An ACK for `client_id`: the message leaves the outbox and is
    /// returned (`None`: not kept, e.g. a second ACK for a resent SEND).
    pub fn on_ack(&mut self, client_id: u64) -> io::Result<Option<Outgoing>> {
        let msg = self.outbox.get(client_id);
        if msg.is_some() {
            self.outbox.remove(client_id)?;
        }
        Ok(msg)
    }

    /// An ERROR with `code` for the SEND `client_id`.
    pub fn on_refused(&mut self, client_id: u64, code: ErrorCode) -> io::Result<Refusal> {
        if is_retryable(code) {
            return Ok(Refusal::Retry);
        }
        let msg = self.outbox.get(client_id);
        if msg.is_some() {
            self.outbox.remove(client_id)?;
        }
        Ok(Refusal::Final(msg))
    }

    /// A DELIVER of `server_id` from `from` with the sender's `client_id`
    /// (v2): show it, answer DELIVERED at once, or ignore it.
    pub fn on_deliver(&mut self, server_id: u64, from: u64, client_id: Option<u64>) -> Incoming {
        self.dedupe.deliver(server_id, from, client_id)
    }

    /// The app stored `server_id`; the driver writes DELIVERED.
    pub fn accept(&mut self, server_id: u64) {
        self.dedupe.accept(server_id);
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// The client id the next [`send`](Self::send) takes.
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        SessionState::new(MemOutbox::default(), 100, 16)
    }

    #[test]
    fn unacked_messages_are_resent_in_order_with_their_ids() {
        let mut s = state();
        let a = s.send(2, b"a").unwrap();
        let b = s.send(3, b"b").unwrap();
        let c = s.send(2, b"c").unwrap();
        assert_eq!((a, b, c), (100, 101, 102));
        // b's ACK arrived; the connection dropped before a's and c's.
        assert_eq!(s.on_ack(b).unwrap().map(|m| m.body), Some(b"b".to_vec()));
        let again: Vec<(u64, u64, Vec<u8>)> = s
            .resend()
            .into_iter()
            .map(|m| (m.client_id, m.to, m.body))
            .collect();
        assert_eq!(again, [(100, 2, b"a".to_vec()), (102, 2, b"c".to_vec())]);
        // The resent SEND is ACKed again: the second ACK finds nothing.
        assert!(s.on_ack(a).unwrap().is_some());
        assert!(s.on_ack(a).unwrap().is_none());
        assert_eq!(s.resend().len(), 1);
    }

    #[test]
    fn client_ids_continue_above_the_outbox() {
        let mut o = MemOutbox::default();
        o.push(Outgoing {
            client_id: 500,
            to: 1,
            body: vec![],
        })
        .unwrap();
        let mut s = SessionState::new(o, 100, 16);
        assert_eq!(s.next_client_id(), 501);
        assert_eq!(s.send(1, b"x").unwrap(), 501);
        assert_eq!(s.resend().len(), 2);
    }

    #[test]
    fn temporary_refusals_keep_the_message_final_ones_drop_it() {
        let mut s = state();
        let a = s.send(2, b"a").unwrap();
        let b = s.send(2, b"b").unwrap();
        assert_eq!(
            s.on_refused(a, ErrorCode::StorageFull).unwrap(),
            Refusal::Retry
        );
        assert_eq!(s.pending(a).map(|m| m.client_id), Some(a));
        let Refusal::Final(Some(m)) = s.on_refused(b, ErrorCode::BadRecipient).unwrap() else {
            panic!("bad_recipient is final");
        };
        assert_eq!(m.client_id, b);
        assert_eq!(
            s.on_refused(b, ErrorCode::StaleClientId).unwrap(),
            Refusal::Final(None)
        );
        let ids: Vec<u64> = s.resend().iter().map(|m| m.client_id).collect();
        assert_eq!(ids, [a]);
    }

    #[test]
    fn redeliveries_are_filtered_and_answered() {
        let mut s = state();
        assert_eq!(s.on_deliver(7, 1, Some(40)), Incoming::Show);
        s.accept(7);
        // The DELIVERED was lost in a cut: the server delivers it again.
        assert_eq!(s.on_deliver(7, 1, Some(40)), Incoming::AnswerDelivered);
        // The sender's resend was stored twice (a v1-style gap): same origin.
        assert_eq!(s.on_deliver(8, 1, Some(40)), Incoming::AnswerDelivered);
        assert_eq!(s.on_deliver(9, 1, Some(41)), Incoming::Show);
    }
}
