//! Removing a device of a user (issue 11): DEVICE_REMOVE from another of
//! its devices, or `device remove` by an operator ([`Event::RemoveDevice`]).
//!
//! Without the durable device registry (not built yet), the devices a user
//! has are the ones online here, on its home shard: removing one closes
//! its session with BYE(`device_removed`) and tells the user's other
//! version 2 devices online with DEVICE_REMOVED. What was queued for the
//! user stays queued, exactly as when that device goes offline.

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
        let text = format!("device {device} of user {user} is not online");
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
    /// session and DEVICE_REMOVED to the user's other version 2 devices
    /// online. `false` (and nothing done) if that device is not online.
    pub(super) fn remove_device(&mut self, now: Now, user: u64, device: u64) -> bool {
        let Some(gone) = self.device_conn(user, device) else {
            return false;
        };
        log::info!("shard {}: device {device} of user {user} removed", self.id);
        self.stats.devices_removed.inc();
        // Closing first takes it out of the user's sessions, so the notice
        // below goes to the others only.
        self.bye(now, gone, ByeReason::DeviceRemoved);
        for conn in self.conns_of(user) {
            if self.slots[conn.index()].version >= proto::VERSION_2 {
                self.write(conn, &Frame::DeviceRemoved { device });
            }
        }
        true
    }
}
