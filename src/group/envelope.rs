//! How a group message's copy sits in a member's queue: an ordinary queued
//! message (so it is durable, replayed, delivered, re-delivered and removed
//! like any other) whose sender is user 0, which never exists, and whose
//! body is this envelope. User 0 marks the copy as a group one; the
//! envelope says which group, its number in the group's order, the real
//! sender and what to deliver (a message, or a membership event).
//!
//! ```text
//! varint group, varint msg, varint from, varint client_id,
//! varint event (0: a message, else a GroupEvent number), varint subject,
//! body: rest (a message's body; empty for an event)
//! ```

use crate::proto::{put_varint, varint_len, GroupEvent};

/// The sender id that marks a queued copy as a group one.
pub const GROUP_SENDER: u64 = 0;

/// One group copy, borrowing its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The group.
    pub group: u64,
    /// Its number in the group's order.
    pub msg: u64,
    /// The sender (the actor, for an event).
    pub from: u64,
    /// The sender's client_id (0 for an event).
    pub client_id: u64,
    /// `None`: a message; else a membership event.
    pub event: Option<GroupEvent>,
    /// The event's subject (0 for a message).
    pub subject: u64,
    /// A message's body.
    pub body: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Bytes [`Envelope::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        varint_len(self.group)
            + varint_len(self.msg)
            + varint_len(self.from)
            + varint_len(self.client_id)
            + 1
            + varint_len(self.subject)
            + self.body.len()
    }

    /// Appends the envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = out.len();
        for v in [self.group, self.msg, self.from, self.client_id] {
            put_varint(v, out);
        }
        out.push(self.event.map_or(0, |e| e as u8));
        put_varint(self.subject, out);
        out.extend_from_slice(self.body);
        debug_assert_eq!(out.len() - at, self.encoded_len());
        debug_assert_eq!(Envelope::decode(&out[at..]), Some(*self));
    }

    /// The envelope in `bytes`; `None` if they are not one (never from
    /// bytes [`Envelope::encode`] wrote).
    pub fn decode(bytes: &'a [u8]) -> Option<Envelope<'a>> {
        let mut at = bytes;
        let mut next = || -> Option<u64> {
            let mut v = 0u64;
            for i in 0..10 {
                let (&b, rest) = at.split_first()?;
                at = rest;
                v |= u64::from(b & 0x7f).checked_shl(7 * i)?;
                if b & 0x80 == 0 {
                    return Some(v);
                }
            }
            None
        };
        let (group, msg, from, client_id) = (next()?, next()?, next()?, next()?);
        let event = match next()? {
            0 => None,
            e => Some(GroupEvent::from_u64(e)?),
        };
        let subject = next()?;
        Some(Envelope {
            group,
            msg,
            from,
            client_id,
            event,
            subject,
            body: at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_messages_and_events() {
        let cases = [
            Envelope {
                group: 1025,
                msg: 1,
                from: 17,
                client_id: 7,
                event: None,
                subject: 0,
                body: b"hello",
            },
            Envelope {
                group: u64::MAX,
                msg: u64::MAX,
                from: u64::MAX,
                client_id: 0,
                event: Some(GroupEvent::Unadmin),
                subject: u64::MAX,
                body: b"",
            },
        ];
        for e in cases {
            let mut out = vec![0xee];
            e.encode(&mut out);
            assert_eq!(out.len(), 1 + e.encoded_len());
            assert_eq!(Envelope::decode(&out[1..]), Some(e));
        }
        // Not an envelope: cut short, an unknown event.
        assert_eq!(Envelope::decode(&[1, 2, 3]), None);
        assert_eq!(Envelope::decode(&[1, 2, 3, 4, 9, 0]), None);
        assert_eq!(Envelope::decode(&[0xff; 12]), None);
    }
}
