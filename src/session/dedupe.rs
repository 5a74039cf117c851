//! Idempotent SEND (protocol v2), the session layer's side: a SEND from a
//! v2 sender carries its [`Origin`]; on the recipient's home shard, where
//! the message would be stored, the store's dedupe window says whether it
//! was taken already (answer the original ACK, store nothing) or is below
//! the window (refuse with `stale_client_id`). The check and the push are
//! made by the same shard thread, one SEND after the other, and a window
//! entry exists from the push on (before its commit): a retry that arrives
//! while the first copy waits for its commit gets the same ACK, which waits
//! for that commit too (and becomes `storage_full` if the commit rolls the
//! first copy back).

use crate::proto::ErrorCode;
use crate::shard::{ConnRef, Msg};
use crate::store::{Origin, Seen, Stored};

use super::Sessions;

impl Sessions {
    /// The answer to a SEND from `from` that is not to be stored: the
    /// original ACK of a retry, or the refusal of a stale client_id. `None`:
    /// a v1 SEND or a new one, store it.
    pub(super) fn retry_answer(
        &self,
        from: u64,
        reply: ConnRef,
        origin: Option<Origin>,
        sent_ns: u64,
    ) -> Option<Msg> {
        let origin = origin?;
        if crate::sim::planted(crate::sim::Planted::DedupeOff) {
            return None;
        }
        let client_id = origin.client_id;
        match self.store.seen(from, origin) {
            Seen::New => None,
            Seen::Taken { server_id, time_ms } => {
                self.stats.sends_deduped.inc();
                Some(Msg::Ack {
                    reply,
                    client_id,
                    server_id,
                    time_ms,
                    sent_ns,
                })
            }
            Seen::Stale { .. } => {
                self.stats.stale_client_ids.inc();
                Some(Msg::Reject {
                    reply,
                    client_id,
                    code: ErrorCode::StaleClientId,
                })
            }
        }
    }
}

/// The client_id a DELIVER to a connection of protocol `version` carries:
/// none for v1 (type 0x06), else the sender's (0 if it spoke v1).
pub(super) fn deliver_client_id(version: u8, msg: &Stored) -> Option<u64> {
    (version >= crate::proto::VERSION_2).then(|| msg.origin.map_or(0, |o| o.client_id))
}
