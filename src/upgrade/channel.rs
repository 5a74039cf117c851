//! The hand-over socket: a `SOCK_SEQPACKET` Unix socket pair (one packet
//! per [`Message`], descriptors attached with `SCM_RIGHTS`).
//!
//! Descriptors go in batches of at most [`FDS_PER_MESSAGE_MAX`], so the
//! receiver never holds more than one batch it has not yet taken over, and
//! a batch never passes the kernel's `SCM_MAX_FD`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::state::{self, Carried};
use super::wire::{
    Message, CARRIED_KIND, CARRIED_PACKET_BYTES_MAX, FDS_PER_MESSAGE_MAX, MESSAGE_BYTES_MAX,
};

/// One end of the hand-over socket.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// Turns -1 into the errno's `io::Error`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        check(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair succeeded: both are new descriptors we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Adopts an inherited descriptor (the successor's end, whose number
    /// came in the environment).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Sends `message` with `fds` attached (at most [`FDS_PER_MESSAGE_MAX`]).
    pub fn send(&self, message: Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(MESSAGE_BYTES_MAX);
        message.encode(&mut bytes);
        self.send_packet(&mut bytes, fds)
    }

    /// Sends carried connections (their sockets and session states, see
    /// [`state`]) in as few packets as fit: at most
    /// [`FDS_PER_MESSAGE_MAX`] connections and [`CARRIED_PACKET_BYTES_MAX`]
    /// bytes each. A connection too large for a packet of its own is an
    /// error (the caller checks [`state::packet_bytes`] first).
    pub fn send_carried(&self, carried: &[(OwnedFd, Carried)]) -> io::Result<()> {
        let mut rest = carried;
        let mut bytes = Vec::new();
        while !rest.is_empty() {
            // The longest prefix that fits one packet.
            let mut n = 0;
            let mut size = 1 + 2;
            while n < rest.len() && n < FDS_PER_MESSAGE_MAX {
                let more = state::record_bytes(&rest[n].1);
                if size + more > CARRIED_PACKET_BYTES_MAX {
                    break;
                }
                size += more;
                n += 1;
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "carried state over the packet limit",
                ));
            }
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            let states: Vec<Carried> = batch.iter().map(|(_, c)| c.clone()).collect();
            bytes.clear();
            bytes.push(CARRIED_KIND);
            state::encode(&states, &mut bytes);
            debug_assert_eq!(bytes.len(), size);
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(fd, _)| fd.as_fd()).collect();
            self.send_packet(&mut bytes, &fds)?;
        }
        Ok(())
    }

    /// Receives the next packet of carried connections sent by
    /// [`Channel::send_carried`], or the `Carried` message that ends them
    /// (`Err` of its count). `input_bytes_max` bounds each one's partial
    /// input (see [`state::decode`]).
    pub fn recv_carried(
        &self,
        input_bytes_max: usize,
        timeout: Duration,
    ) -> io::Result<Result<Vec<(OwnedFd, Carried)>, u32>> {
        let mut bytes = vec![0u8; CARRIED_PACKET_BYTES_MAX + 1];
        let (got, fds) = self.recv_packet(&mut bytes, timeout)?;
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        if bytes[0] != CARRIED_KIND {
            return match Message::decode(&bytes[..got]) {
                Ok(Message::Carried { count }) if fds.is_empty() => Ok(Err(count)),
                Ok(other) => Err(invalid(format!(
                    "expected carried connections, got {other:?} with {} descriptors",
                    fds.len()
                ))),
                Err(e) => Err(invalid(e.to_string())),
            };
        }
        let batch =
            state::decode(&bytes[1..got], input_bytes_max).map_err(|e| invalid(e.to_string()))?;
        if batch.len() != fds.len() {
            return Err(invalid(format!(
                "a packet of {} carried connections with {} descriptors",
                batch.len(),
                fds.len()
            )));
        }
        Ok(Ok(fds.into_iter().zip(batch).collect()))
    }

    /// Sends one packet with `fds` attached (at most
    /// [`FDS_PER_MESSAGE_MAX`]).
    fn send_packet(&self, bytes: &mut [u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        assert!(
            fds.len() <= FDS_PER_MESSAGE_MAX,
            "{} descriptors",
            fds.len()
        );
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let payload = std::mem::size_of_val(raw.as_slice()) as u32;
        let space = match raw.len() {
            0 => 0,
            // SAFETY: CMSG_SPACE only computes a size.
            _ => (unsafe { libc::CMSG_SPACE(payload) }) as usize,
        };
        // u64s keep the control buffer aligned for `cmsghdr`.
        let mut control = vec![0u64; space.div_ceil(8)];
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: `msg` points at `control`, alive and `space` bytes
            // long, which holds one header with `payload` bytes of data
            // (CMSG_SPACE); the descriptors are copied into it unaligned.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                assert!(!cmsg.is_null());
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    payload as usize,
                );
            }
        }
        loop {
            // SAFETY: `msg` points at `iov` (over `bytes`) and `control`,
            // all alive for the call. MSG_NOSIGNAL: a gone peer is EPIPE,
            // not a signal.
            let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if sent >= 0 {
                debug_assert_eq!(sent as usize, bytes.len(), "a packet goes whole");
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // `control` lives to here (the pointer in `msg` borrows it).
    }

    /// Sends `fds` in `Fds` messages of at most [`FDS_PER_MESSAGE_MAX`].
    pub fn send_fds(&self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        for batch in fds.chunks(FDS_PER_MESSAGE_MAX) {
            let count = batch.len() as u16;
            self.send(Message::Fds { count }, batch)?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next message and the descriptors sent
    /// with it (close-on-exec). `UnexpectedEof` when the peer closed its end
    /// (it exited), `TimedOut` when nothing came, `InvalidData` for a packet
    /// that is no message or whose descriptors were cut.
    pub fn recv(&self, timeout: Duration) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut bytes = [0u8; MESSAGE_BYTES_MAX + 1];
        let (got, fds) = self.recv_packet(&mut bytes, timeout)?;
        let message = Message::decode(&bytes[..got])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let want = match message {
            Message::Fds { count } => usize::from(count),
            _ => 0,
        };
        if fds.len() != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{message:?} came with {} descriptors", fds.len()),
            ));
        }
        Ok((message, fds))
    }

    /// Waits up to `timeout` for one packet into `bytes` (one byte longer
    /// than the longest packet expected, so a longer one shows as cut):
    /// its length, never 0, and its descriptors.
    fn recv_packet(
        &self,
        bytes: &mut [u8],
        timeout: Duration,
    ) -> io::Result<(usize, Vec<OwnedFd>)> {
        self.wait_readable(timeout)?;
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe {
            libc::CMSG_SPACE((FDS_PER_MESSAGE_MAX * std::mem::size_of::<RawFd>()) as u32)
        } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let got = loop {
            // SAFETY: `msg` points at `iov` (over `bytes`) and `control`,
            // both alive and of the lengths given.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // Take ownership of whatever arrived first, so an error below
        // closes them.
        let mut fds = Vec::new();
        // SAFETY: after recvmsg the headers in `control` are the kernel's;
        // CMSG_NXTHDR stops at `msg_controllen`. SCM_RIGHTS data is an
        // array of new descriptors this process now owns.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hand-over packet or its descriptors cut",
            ));
        }
        Ok((got, fds))
    }

    /// Receives `n` descriptors sent by [`Channel::send_fds`], waiting up to
    /// `timeout` for each batch.
    pub fn recv_fds(&self, n: usize, timeout: Duration) -> io::Result<Vec<OwnedFd>> {
        let mut all = Vec::with_capacity(n);
        while all.len() < n {
            match self.recv(timeout)? {
                (Message::Fds { .. }, fds) if all.len() + fds.len() <= n => all.extend(fds),
                (other, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("expected {} more descriptors, got {other:?}", n - all.len()),
                    ))
                }
            }
        }
        Ok(all)
    }

    /// Blocks until a packet (or the peer's close) can be read.
    fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            match check(unsafe { libc::poll(&mut pfd, 1, ms) }) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::state::Transport;
    use crate::upgrade::wire::FORMAT_VERSION;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn messages_and_descriptors_cross_in_batches() {
        let (a, b) = Channel::pair().unwrap();
        // 2 batches and a bit: 600 socket pairs, one end of each sent.
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..600).map(|_| UnixStream::pair().unwrap()).collect();
        let hello = Message::Hello {
            format: FORMAT_VERSION,
            pid: 7,
        };
        a.send(hello, &[]).unwrap();
        let sent: Vec<BorrowedFd<'_>> = pairs.iter().map(|(x, _)| x.as_fd()).collect();
        a.send_fds(&sent).unwrap();
        a.send(Message::Released, &[]).unwrap();

        assert_eq!(b.recv(WAIT).unwrap().0, hello);
        let got = b.recv_fds(pairs.len(), WAIT).unwrap();
        assert_eq!(got.len(), 600);
        assert_eq!(b.recv(WAIT).unwrap().0, Message::Released);
        // Each received descriptor is the same socket, in order.
        for (i, (fd, (_, peer))) in got.into_iter().zip(&pairs).enumerate() {
            let mut ours = UnixStream::from(fd);
            ours.write_all(&(i as u32).to_le_bytes()).unwrap();
            let mut buf = [0u8; 4];
            (&*peer).read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_le_bytes(buf), i as u32);
        }
    }

    #[test]
    fn carried_connections_cross_in_packed_batches_then_their_count() {
        let (a, b) = Channel::pair().unwrap();
        // Tern, WebSocket and MQTT ones in turn (their records differ in
        // size: the packing counts each whole).
        let state = |user: u64, output: usize| {
            let (transport, raw) = match user % 3 {
                0 => (Transport::Tern, Vec::new()),
                1 => (
                    Transport::WebSocket {
                        in_message: true,
                        message_bytes: 5,
                    },
                    vec![0x80; 4],
                ),
                _ => (
                    Transport::Mqtt {
                        mode: crate::mqtt::bridge::Mode::from_bytes([0x81, 30, 0, 0, 0]).unwrap(),
                        inflight: crate::mqtt::bridge::Inflight::from_entries(vec![(1, user)])
                            .unwrap(),
                    },
                    vec![0x30; 2],
                ),
            };
            Carried {
                user,
                device: 0,
                version: 2,
                input: vec![1; 3],
                output: vec![2; output],
                transport,
                raw,
            }
        };
        // 600 small ones (250, 250, then 100 with the next), then 3 with
        // 60 KiB of output each (2 fit beside the 100, the third goes alone).
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..603).map(|_| UnixStream::pair().unwrap()).collect();
        let sent: Vec<(OwnedFd, Carried)> = pairs
            .iter()
            .enumerate()
            .map(|(i, (x, _))| {
                let output = if i >= 600 { 60 * 1024 } else { 0 };
                (
                    x.as_fd().try_clone_to_owned().unwrap(),
                    state(i as u64 + 1, output),
                )
            })
            .collect();
        // The receiver runs beside: 200 KiB of packets exceed the socket's
        // buffer.
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut packets = 0;
            loop {
                match b.recv_carried(16, WAIT).unwrap() {
                    Ok(batch) => {
                        assert!(!batch.is_empty() && batch.len() <= FDS_PER_MESSAGE_MAX);
                        packets += 1;
                        got.extend(batch);
                    }
                    Err(count) => return (got, packets, count),
                }
            }
        });
        a.send_carried(&sent).unwrap();
        a.send(Message::Carried { count: 603 }, &[]).unwrap();
        let (got, packets, count) = receiver.join().unwrap();
        assert_eq!((got.len(), packets, count), (603, 4, 603));
        for (i, ((fd, c), (_, peer))) in got.into_iter().zip(&pairs).enumerate() {
            assert_eq!(c, sent[i].1);
            let mut ours = UnixStream::from(fd);
            ours.write_all(&(i as u32).to_le_bytes()).unwrap();
            let mut buf = [0u8; 4];
            (&*peer).read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_le_bytes(buf), i as u32);
        }
        // One too large for a packet of its own is refused, not cut.
        let (x, _y) = UnixStream::pair().unwrap();
        let huge = state(1, CARRIED_PACKET_BYTES_MAX);
        let err = a.send_carried(&[(x.into(), huge)]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_closed_peer_is_eof_and_silence_times_out() {
        let (a, b) = Channel::pair().unwrap();
        let err = b.recv(Duration::from_millis(20)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(a);
        let err = b.recv(WAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn descriptors_where_none_belong_are_refused() {
        let (a, b) = Channel::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        a.send(Message::Released, &[x.as_fd()]).unwrap();
        let err = b.recv(WAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Fewer descriptors than announced: an `Fds` where a message was due.
        a.send(Message::Released, &[]).unwrap();
        let err = b.recv_fds(1, WAIT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
