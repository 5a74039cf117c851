//! The session layer's side of push notices (`crate::push`): when a
//! message is queued for a registered device that is offline, one
//! [`Notice`] per such device is offered to the push thread. Offering never blocks; the push thread
//! spaces and batches the POSTs.

use crate::push::{Notice, Notices};

use super::Sessions;

impl Sessions {
    /// Sends push notices through `notices` from now on (`None`: no push
    /// gateway configured). Set once, by the shard, before the first event.
    pub fn set_push(&mut self, notices: Option<Notices>) {
        self.push = notices;
    }

    /// The hook: messages were queued (and committed) for `device` of
    /// `user`, which is offline; `waiting` messages wait for it, the oldest
    /// since `oldest_ms` (Unix ms). Called once per commit per device, not
    /// per message: once per registered device of `user` that is offline
    /// (whether or not another of its devices is online), with what waits
    /// for that device (messages it has not answered). A user with no
    /// registered device is named as device 0.
    pub(super) fn queued_offline(
        &mut self,
        user: u64,
        device: u32,
        waiting: usize,
        oldest_ms: u64,
    ) {
        let Some(push) = &self.push else {
            return;
        };
        push.offer(Notice {
            user,
            device,
            waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
            oldest_ms,
        });
    }
}
