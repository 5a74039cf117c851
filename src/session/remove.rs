//! Removing a device of a user (issue 11): DEVICE_REMOVE from another of
//! its devices, or `device remove` by an operator ([`Event::RemoveDevice`]).
//!
//! Any registered device can be removed, online or not (`registry.rs`):
//! its session, if any, is closed with BYE(`device_removed`), the user's
//! other version 2 devices online get DEVICE_REMOVED, and it leaves the
//! registry durably: what only it still owed leaves the queue.

use super::*;

impl Sessions {
    /// The connection of device `device` of `user`, if it is online here.
    pub fn device_conn(&self, user: u64, device: u64) -> Option<ConnId> {
        (0..self.users.count(user))
            .map(|i| self.users.nth_conn(user, i))
            .find(|c| u64::from(self.slots[c.index()].device) == device)
    }

    /// The device ids of `user`'s sessions online here, in login order.
    pub fn devices_of(&self, user: u64) -> Vec<u32> {
        (0..self.users.count(user))
            .map(|i| self.slots[self.users.nth_conn(user, i).index()].device)
            .collect()
    }

    /// A DEVICE_REMOVE from logged-in `conn` of `user`: `false` when the
    /// connection is closed for it.
    pub(super) fn on_device_remove(
        &mut self,
        now: Now,
        conn: ConnId,
        user: u64,
        device: u64,
    ) -> bool {
        let s = self.slots[conn.index()];
        if s.version < proto::VERSION_2 {
            // Exactly what a version 1 server answered: the type was
            // unknown to it.
            self.stats.protocol_errors.inc();
            let text = proto::DecodeError::UnknownType(0x10).to_string();
            self.fail(now, conn, ErrorCode::UnknownType, 0, &text);
            return false;
        }
        if self.remove_device(now, user, device) {
            // A device may remove itself: its own BYE was just written.
            return u64::from(s.device) != device;
        }
        let text = format!("device {device} of user {user} is not registered");
        self.write(
            conn,
            &Frame::Error {
                code: ErrorCode::UnknownDevice,
                client_id: device,
                text: &text,
            },
        );
        true
    }

    /// Removes device `device` of `user`: BYE(`device_removed`) to its
    /// session if online, out of the registry with its copies, and
    /// DEVICE_REMOVED to the user's other version 2 devices online.
    /// `false` (and nothing done) if that device is not registered.
    pub(super) fn remove_device(&mut self, now: Now, user: u64, device: u64) -> bool {
        let registered = u32::try_from(device)
            .is_ok_and(|d| self.registered_devices(user).binary_search(&d).is_ok());
        if !registered {
            return false;
        }
        if let Some(gone) = self.device_conn(user, device) {
            // Closing first takes it out of the user's sessions (into the
            // registry's entry), so the notice below goes to the others.
            self.bye(now, gone, ByeReason::DeviceRemoved);
        }
        let removed = self.unregister(user, device).is_some();
        debug_assert!(removed, "a registered device has a registry entry offline");
        log::info!("shard {}: device {device} of user {user} removed", self.id);
        self.stats.devices_removed.inc();
        self.tell_removed(user, device);
        true
    }
}
