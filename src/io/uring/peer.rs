//! The source address of an accepted connection, for the per-address
//! limits: a direct descriptor has no fd for getpeername(2), so the
//! backend asks with getsockopt(SO_PEERNAME) as a uring command on the
//! fixed file (Linux 6.7+), and reports the connection Accepted once the
//! answer is in (before its first receive is armed). The address waits in
//! `peer_ips` for [`Io::peer_ip`].
//!
//! On a kernel that refuses the command, the first refusal turns the query
//! off for this shard (one log line) and connections are reported without
//! an address: the per-address limits then skip them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::send::SendBuf;
use super::*;

/// The uring socket command getsockopt (`SOCKET_URING_OP_GETSOCKOPT` in
/// linux/io_uring.h; setsockopt is 3).
const SOCKET_URING_OP_GETSOCKOPT: u32 = 2;

/// Bytes of `sockaddr_in` and `sockaddr_in6`.
const SOCKADDR_IN_BYTES: u32 = 16;
const SOCKADDR_IN6_BYTES: u32 = 28;

/// The socket address size of each listener's family, by
/// [`Listener::index`]: SO_PEERNAME refuses a buffer longer than the
/// address, so the query asks for exactly this.
pub(super) fn lens(listeners: &[Option<TcpListener>; LISTENERS]) -> [u32; LISTENERS] {
    listeners
        .each_ref()
        .map(|l| match l.as_ref().and_then(|l| l.local_addr().ok()) {
            Some(SocketAddr::V6(_)) => SOCKADDR_IN6_BYTES,
            _ => SOCKADDR_IN_BYTES,
        })
}

/// The IP address in a `sockaddr_in` or `sockaddr_in6` (IPv4-mapped
/// addresses as IPv4).
fn parse(addr: &[u8]) -> Option<IpAddr> {
    let family = i32::from(u16::from_ne_bytes(addr.get(..2)?.try_into().ok()?));
    match family {
        libc::AF_INET => {
            let octets: [u8; 4] = addr.get(4..8)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        libc::AF_INET6 => {
            let octets: [u8; 16] = addr.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical())
        }
        _ => None,
    }
}

/// A getsockopt uring command: the crate builds only setsockopt, whose
/// SQE has the same fields; the command number (`cmd_op`, bytes 8..12 of
/// the SQE) is what tells them apart.
fn getsockopt(entry: squeue::Entry) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the 64-byte
    // `io_uring_sqe`, plain integers and unions of them, so every byte
    // pattern is a valid value and the round trip through bytes is exact.
    let mut bytes: [u8; 64] = unsafe { std::mem::transmute(entry) };
    let op = SOCKET_URING_OP_GETSOCKOPT;
    bytes[8..12].copy_from_slice(&op.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

impl Io {
    /// Asks for the source address of `key`, accepted and in its final ring.
    pub(super) fn submit_peer(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        let which = c.listener();
        let len = self.peer_lens[which.index()];
        // The connection is not visible yet, so its send buffer is free to
        // hold the answer until the final completion (zombies keep it too).
        let mut buf = Box::new(SendBuf::zeroed(len as usize));
        let entry = opcode::SetSockOpt::new(
            types::Fixed(c.slot),
            libc::SOL_SOCKET as u32,
            libc::SO_PEERNAME as u32,
            buf.as_mut_ptr().cast_const().cast(),
            len,
        )
        .build();
        c.out = Some(buf);
        self.push_conn_op(key, getsockopt(entry), Op::Peer);
    }

    /// The answer to [`Io::submit_peer`]: the connection is reported.
    pub(super) fn on_peer(&mut self, t: Tag, res: i32) {
        let Some(c) = self.conn_of(t) else {
            return;
        };
        c.ops = c.ops.saturating_sub(1);
        let buf = c.out.take();
        let key = t.key;
        if c.state != State::Live {
            self.maybe_free(key); // closed meanwhile (the backend is dropping)
            return;
        }
        self.peer_ips.remove(&key);
        if res >= 0 {
            if let Some(ip) = buf.as_ref().and_then(|b| parse(b.bytes())) {
                self.peer_ips.insert(key, ip);
            }
        } else {
            match -res {
                // The peer is already gone: its receive will say so.
                libc::ENOTCONN => {}
                // No socket commands (before 6.7) or not this one.
                libc::EINVAL | libc::EOPNOTSUPP => {
                    self.peer_query = false;
                    log::warn!(
                        "shard {}: the kernel does not answer getsockopt(SO_PEERNAME) on \
                         io_uring (errno {}): per-address limits are off on this shard",
                        self.shard,
                        -res
                    );
                }
                e => log::debug!(
                    "shard {}: source address of connection {key}: errno {e}",
                    self.shard
                ),
            }
        }
        self.report_accepted(key);
        self.queue_rearm(key);
    }

    /// Makes an accepted connection visible and reports it.
    pub(super) fn report_accepted(&mut self, key: u32) {
        let c = &mut self.conns[key as usize];
        c.clear(flag::FROM_ACCEPT);
        c.set(flag::VISIBLE);
        self.visible += 1;
        let gen = c.gen;
        self.events.push_back(Event::Accepted(key, gen));
    }

    /// The source address of `conn`, just reported Accepted (taken once).
    pub fn peer_ip(&mut self, conn: ConnId) -> Option<IpAddr> {
        self.peer_ips.remove(&conn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_families() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 9]);
        assert_eq!(parse(&v4), Some(IpAddr::from([127, 0, 0, 9])));
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        let mapped = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped();
        v6[8..24].copy_from_slice(&mapped.octets());
        assert_eq!(parse(&v6), Some(IpAddr::from([10, 1, 2, 3])));
        assert_eq!(parse(&[0u8; 16]), None);
        assert_eq!(parse(&[]), None);
    }
}
