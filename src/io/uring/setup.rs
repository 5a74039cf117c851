//! Building the backend: the kernel checks (version, opcodes), the
//! fixed-file table size from RLIMIT_NOFILE, the choice between one ring
//! and several, ring 0 and the eventfd.

use std::net::TcpListener;

use super::*;

impl Io {
    /// Creates the backend around a bound, listening socket. Call it on the
    /// shard's thread: the rings are single-issuer. Fails with a clear error
    /// when the kernel lacks something we need.
    pub fn new(listeners: Listeners, options: &IoOptions) -> io::Result<Io> {
        check_kernel()?;
        let mut slots = nofile_limit()?.min(SLOTS_PER_RING_KERNEL_MAX);
        if options.ring_slots_max > 0 {
            slots = slots.min(options.ring_slots_max as u64);
        }
        let slots = slots as u32;
        if slots < SLOTS_PER_RING_MIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fixed-file tables of {slots} slots are too small (RLIMIT_NOFILE?)"),
            ));
        }
        let listeners = listeners.into_array();
        let listener_count = listeners.iter().flatten().count() as u32;
        // Ring 0's CQ bounds one accept burst; the bursts of all listeners
        // together take at most half the table.
        let control_cq = prev_power_of_two(slots / (2 * listener_count))
            .clamp(CONTROL_CQ_ENTRIES_MIN, CONTROL_CQ_ENTRIES_MAX);
        let accept_margin_slots = listener_count * (control_cq + 1);
        if accept_margin_slots > slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fixed-file tables of {slots} slots are too small for {listener_count} listeners (RLIMIT_NOFILE?)"),
            ));
        }
        let conns_max = options.conns_max.max(1) as u64;
        let one_ring = conns_max + accept_margin_slots as u64 <= slots as u64;
        let data_rings_max = if one_ring {
            0
        } else {
            // One spare: handoffs bring more than a shard's share, and closing
            // connections hold their slots for a moment.
            (conns_max.div_ceil(slots as u64) as usize + 1).min(tag::RINGS_MAX - 1)
        };

        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(ring::with_context(io::Error::last_os_error(), "eventfd"));
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let bufs = if one_ring { RECV_BUFS_SINGLE_RING } else { 0 };
        let ring0 = Ring::new(
            SQ_ENTRIES.min(control_cq),
            control_cq,
            slots,
            bufs,
            RECV_BUF_BYTES,
            (!one_ring).then(|| efd.as_raw_fd()),
        )?;
        let carry_ops = probe(&ring0)?;
        let batch_wait = if options.batch_wait.is_zero() || ring0.has_min_wait() {
            options.batch_wait
        } else {
            if options.shard == 0 {
                log::warn!("uring_batch_wait_us ignored: this kernel has no io_uring min-wait (Linux 6.12+)");
            }
            Duration::ZERO
        };
        for listener in listeners.iter().flatten() {
            set_nodelay(listener);
        }
        // SAFETY: plain syscall on the ring's live descriptor; checked below.
        let dup = unsafe { libc::fcntl(ring0.fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(ring::with_context(
                io::Error::last_os_error(),
                "dup ring fd",
            ));
        }
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        let me = PeerInfo(Arc::new(unsafe { OwnedFd::from_raw_fd(dup) }));
        if options.shard == 0 {
            log::info!(
                "io_uring: {:?} task running, {} slots per ring, {}",
                ring0.taskrun(),
                slots,
                if one_ring {
                    "one ring per shard".to_string()
                } else {
                    format!("up to {data_rings_max} data rings per shard")
                }
            );
        }
        let peer_lens = peer::lens(&listeners);
        let mut io = Io {
            shard: options.shard,
            rings: vec![ring0],
            batch_wait,
            last_reaped: 0,
            data_rings_max,
            slots_per_ring: slots,
            accept_margin_slots,
            listeners,
            accept: Default::default(),
            wake: WakeHandle(Arc::new(efd)),
            wake_buf: Box::new(0),
            wake_armed: false,
            me,
            peers: Vec::new(),
            conns: Slab::new(),
            visible: 0,
            next_gen: 1,
            events: VecDeque::new(),
            rearm: Vec::new(),
            retry: Vec::new(),
            retry_at: None,
            handoffs_in: HashMap::new(),
            handoffs_out: HashMap::new(),
            handoff_seq: 0,
            cqes: Vec::new(),
            refused: 0,
            peer_query: true,
            peer_lens,
            peer_ips: HashMap::new(),
            recv_no_buffers: 0,
            spare_sends: Vec::new(),
            carry_ops,
            installed: HashMap::new(),
            installs: HashMap::new(),
        };
        if !one_ring {
            // One data ring up front: fail now rather than on the first accept.
            io.add_data_ring()?;
        }
        Ok(io)
    }
}

/// The largest power of two <= `n` (1 for 0).
pub(super) fn prev_power_of_two(n: u32) -> u32 {
    if n == 0 {
        1
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// RLIMIT_NOFILE's soft limit: the most slots one fixed-file table may have.
fn nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(ring::with_context(io::Error::last_os_error(), "getrlimit"));
    }
    Ok(lim.rlim_cur)
}

/// Multishot receive and MSG_RING fd passing need Linux 6.0.
fn check_kernel() -> io::Result<()> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we pass.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(ring::with_context(io::Error::last_os_error(), "uname"));
    }
    let release: String = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < (6, 0) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("kernel {release} is older than 6.0 (multishot receive, MSG_RING fd passing)"),
        ));
    }
    Ok(())
}

/// Checks that ring 0's kernel knows every opcode we use; true when it
/// also has those that carry connections across a live upgrade.
fn probe(ring: &Ring) -> io::Result<bool> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ring::with_context(e, "io_uring probe"))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Read::CODE, "READ"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::MsgRingSendFd::CODE, "MSG_RING"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    // FIXED_FD_INSTALL came with Linux 6.8: without it, live upgrade ends
    // this backend's connections with BYE(upgrade) instead.
    Ok(probe.is_supported(opcode::FixedFdInstall::CODE)
        && probe.is_supported(opcode::FilesUpdate::CODE))
}

/// TCP_NODELAY on the listener: accepted sockets inherit it (small frames,
/// latency matters more than packet count).
fn set_nodelay(listener: &TcpListener) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::warn!(
            "TCP_NODELAY on the listener: {}",
            io::Error::last_os_error()
        );
    }
}
