//! A small blocking client for the Tern protocol, for tests, examples and
//! load generators.
//!
//! [`Client`] owns one [`TcpStream`], a read buffer and a backlog of frames
//! that [`Client::recv_until`] skipped over. Frames are encoded and decoded by
//! the server's own codec, [`tern::proto`], so the client and the server can
//! never disagree about the wire format.
//!
//! Every receive waits for a bounded time: the read timeout (default
//! [`READ_TIMEOUT_DEFAULT`]) or the one passed to the call. A test that
//! expects a frame that never comes fails with [`ClientError::Timeout`]
//! instead of hanging.
//!
//! ```no_run
//! use tern::proto::OwnedFrame;
//! use tern_client::Client;
//!
//! # fn main() -> Result<(), tern_client::ClientError> {
//! let addr = "127.0.0.1:5222".parse().unwrap();
//! let (mut alice, info) = Client::login(addr, "v1.1.1900000000.<mac>")?;
//! println!("{} messages waiting", info.offline_count);
//! alice.send_msg(1, 2, b"hello")?;
//! let ack = alice.recv_until(|f| matches!(f, OwnedFrame::Ack { client_id: 1, .. }))?;
//! println!("{ack:?}");
//! # Ok(())
//! # }
//! ```
//!
//! For an app, [`session::Session`] adds what a real client needs on top:
//! reconnect with backoff, an outbox resent until ACKed, a duplicate filter,
//! DELIVERED once the app accepted a message, keepalive.
//!
//! TLS: [`Client::login_tls`] speaks TLS 1.3 (rustls, buffered client) to
//! the server's `tls_listen` port, with roots from [`tls_config`]. Reuse one
//! `ClientConfig` across connections and reconnects resume the session
//! ([`Client::tls_handshake_kind`] says `Resumed`).
#![deny(missing_docs)]

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use tern::proto::{self, DecodeError, ErrorCode, Frame, GroupFrame, Limits, OwnedFrame};

/// How long [`Client::connect`] waits for the TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a receive waits for a frame unless told otherwise
/// ([`Client::set_read_timeout`]).
pub const READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// How long a write may block on a full socket before it fails with
/// [`io::ErrorKind::WouldBlock`] or [`io::ErrorKind::TimedOut`]. A server
/// that stops reading cannot hang a test forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most frames the backlog holds. When [`Client::recv_until`] skips one more
/// frame than this, it gives up with [`ClientError::Unexpected`] carrying
/// that frame: the frame it waits for is drowned in others.
pub const BACKLOG_FRAMES_MAX: usize = 10_000;

/// Bytes asked of the socket per read. The read buffer holds at most one
/// partial frame plus one chunk, because the codec refuses frames longer
/// than [`Limits::frame_bytes_max`].
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// REDIRECTs [`Client::login_version`] follows in a row before it gives up
/// (while a partition changes owner, two nodes may briefly name each other).
pub const REDIRECTS_MAX: usize = 3;

/// The first address `host:port` resolves to.
fn resolve(addr: &str) -> io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("redirect address {addr:?} resolves to nothing"),
        )
    })
}

/// The shortest wait a read is given, so that a zero timeout still looks at
/// what the kernel has already received instead of reporting nothing.
const READ_WAIT_MIN: Duration = Duration::from_millis(1);

/// The `req` of a group request (0 for other group frames).
fn group_req(frame: &GroupFrame<&[u8]>) -> u64 {
    match *frame {
        GroupFrame::Create { req }
        | GroupFrame::Add { req, .. }
        | GroupFrame::Remove { req, .. }
        | GroupFrame::Leave { req, .. }
        | GroupFrame::Admin { req, .. }
        | GroupFrame::Members { req, .. } => req,
        _ => 0,
    }
}

/// Whether `f` answers the group request `req`: its GROUP_OK, a GROUP_LIST
/// of it, or an ERROR naming it.
fn answers(f: &OwnedFrame, req: u64) -> bool {
    match f {
        OwnedFrame::Group(GroupFrame::Ok { req: r, .. } | GroupFrame::List { req: r, .. }) => {
            *r == req
        }
        OwnedFrame::Error { client_id, .. } => *client_id == req,
        _ => false,
    }
}

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed (connect, read or write).
    Io(io::Error),
    /// The server sent bytes the codec refuses, or closed the connection in
    /// the middle of a frame (reported as [`DecodeError::Malformed`]).
    Decode(DecodeError),
    /// The server answered LOGIN with LOGIN_ERR.
    LoginRejected {
        /// The reason code from LOGIN_ERR.
        code: ErrorCode,
        /// The human-readable text from LOGIN_ERR.
        text: String,
    },
    /// A clustered server answered a version 2 LOGIN with REDIRECT: another
    /// node serves this user. [`Client::login_version`] follows it (up to
    /// [`REDIRECTS_MAX`] in a row); [`Client::login_here_version`] reports it.
    Redirected {
        /// The serving node's address, `host:port`, as the server sent it.
        addr: String,
    },
    /// The server closed the connection (end of stream or reset) and every
    /// frame it sent before has been returned.
    Closed,
    /// No matching frame arrived within the timeout.
    Timeout,
    /// A frame arrived that the call cannot accept, e.g. anything but
    /// LOGIN_OK/LOGIN_ERR in answer to LOGIN, or a frame that did not fit the
    /// backlog in [`Client::recv_until`].
    Unexpected(OwnedFrame),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Decode(e) => write!(f, "bad frame from server: {e}"),
            ClientError::LoginRejected { code, text } => {
                write!(f, "login rejected: {} ({text})", code.as_str())
            }
            ClientError::Redirected { addr } => write!(f, "redirected to {addr}"),
            ClientError::Closed => f.write_str("connection closed by server"),
            ClientError::Timeout => f.write_str("timed out waiting for a frame"),
            ClientError::Unexpected(frame) => {
                write!(f, "unexpected {} frame: {frame:?}", frame.as_frame().name())
            }
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(e),
            ClientError::Decode(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Decode(e)
    }
}

/// What LOGIN_OK told a freshly logged-in client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginInfo {
    /// The server's clock when it accepted the login, in unix milliseconds.
    pub server_time_ms: u64,
    /// Messages queued for this user while no device was connected; they
    /// follow as DELIVER frames.
    pub offline_count: u64,
}

/// A blocking connection to a Tern server.
///
/// Received frames come out in the order the server sent them, except that
/// [`recv_until`](Client::recv_until) takes the frame it waits for out of
/// turn; the frames it skipped stay in a backlog that every receive call
/// empties first.
pub struct Client {
    stream: TcpStream,
    /// TLS state when connected with [`Client::connect_tls`]; reads and
    /// writes then go through it.
    tls: Option<Box<ClientConnection>>,
    /// Received bytes; `read_buf[read_start..]` is not decoded yet and holds
    /// no complete frame whenever a read is issued.
    read_buf: Vec<u8>,
    /// Start of the undecoded bytes in `read_buf`, `0..=read_buf.len()`.
    read_start: usize,
    /// Frames skipped by `recv_until`, oldest first; at most
    /// [`BACKLOG_FRAMES_MAX`].
    backlog: VecDeque<OwnedFrame>,
    /// Reused encoding buffer, so each send is one `write_all`.
    write_buf: Vec<u8>,
    /// Limits applied when decoding the server's frames.
    limits: Limits,
    /// Default wait of `recv` and `recv_until`.
    read_timeout: Duration,
    /// The server closed the stream (EOF or reset); no further reads.
    eof: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("local", &self.stream.local_addr().ok())
            .field("peer", &self.stream.peer_addr().ok())
            .field("buffered_bytes", &(self.read_buf.len() - self.read_start))
            .field("backlog_frames", &self.backlog.len())
            .field("read_timeout", &self.read_timeout)
            .field("closed", &self.eof)
            .finish()
    }
}

impl Client {
    /// Opens a TCP connection to `addr` (waiting at most [`CONNECT_TIMEOUT`])
    /// without logging in. `TCP_NODELAY` is set, the read timeout is
    /// [`READ_TIMEOUT_DEFAULT`] and the write timeout [`WRITE_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        Client::from_stream(stream)
    }

    /// Wraps an already connected stream, applying the same socket options
    /// as [`connect`](Client::connect).
    pub fn from_stream(stream: TcpStream) -> io::Result<Client> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TIMEOUT_DEFAULT))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Client {
            stream,
            tls: None,
            read_buf: Vec::new(),
            read_start: 0,
            backlog: VecDeque::new(),
            write_buf: Vec::new(),
            limits: Limits::default(),
            read_timeout: READ_TIMEOUT_DEFAULT,
            eof: false,
        })
    }

    /// Connects, sends LOGIN (version [`proto::VERSION`], `token`) as the
    /// first write on the connection, and waits up to the read timeout for
    /// the answer.
    ///
    /// LOGIN_ERR becomes [`ClientError::LoginRejected`]; any other frame
    /// [`ClientError::Unexpected`]. Frames that arrive right behind
    /// LOGIN_OK (offline DELIVERs) stay buffered for the next receive.
    pub fn login(addr: SocketAddr, token: &str) -> Result<(Client, LoginInfo), ClientError> {
        Client::login_version(addr, token, proto::VERSION)
    }

    /// [`login`](Client::login) with protocol `version` in LOGIN
    /// ([`proto::VERSION_2`]: idempotent SEND, DELIVERs carry the
    /// sender's client_id; see docs/PROTOCOL.md, "Version 2").
    ///
    /// A REDIRECT (a clustered server, version 2) is followed: the same
    /// LOGIN goes to the named node, up to [`REDIRECTS_MAX`] times in a row;
    /// one more is returned as [`ClientError::Redirected`].
    pub fn login_version(
        addr: SocketAddr,
        token: &str,
        version: u8,
    ) -> Result<(Client, LoginInfo), ClientError> {
        let mut addr = addr;
        let mut redirects = 0;
        loop {
            let mut client = Client::connect(addr)?;
            match client.login_here_version(token, version) {
                Ok(info) => return Ok((client, info)),
                Err(ClientError::Redirected { addr: to }) if redirects < REDIRECTS_MAX => {
                    redirects += 1;
                    addr = resolve(&to)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens a TCP connection to a TLS listener and completes the TLS 1.3
    /// handshake for `server_name` (checked against the certificate) with
    /// `config` (see [`tls_config`]). A refused certificate is an
    /// [`ClientError::Io`] of kind `InvalidData` naming the reason.
    pub fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        config: &Arc<ClientConfig>,
    ) -> Result<Client, ClientError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server name {server_name:?}: {e}"),
            ))
        })?;
        let conn = ClientConnection::new(config.clone(), name)
            .map_err(|e| ClientError::Io(io::Error::other(e)))?;
        let mut client = Client::connect(addr)?;
        let mut conn = Box::new(conn);
        // Bounded by the socket's read and write timeouts.
        while conn.is_handshaking() {
            conn.complete_io(&mut client.stream)?;
        }
        client.tls = Some(conn);
        Ok(client)
    }

    /// [`connect_tls`](Client::connect_tls), then LOGIN like
    /// [`login`](Client::login).
    pub fn login_tls(
        addr: SocketAddr,
        server_name: &str,
        config: &Arc<ClientConfig>,
        token: &str,
    ) -> Result<(Client, LoginInfo), ClientError> {
        let mut client = Client::connect_tls(addr, server_name, config)?;
        let info = client.login_here(token)?;
        Ok((client, info))
    }

    /// TLS connections: whether the handshake was full or resumed.
    pub fn tls_handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.tls.as_ref().and_then(|t| t.handshake_kind())
    }

    /// TLS connections: the server's certificate chain, leaf first.
    pub fn tls_peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.tls
            .as_ref()
            .and_then(|t| t.peer_certificates())
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
    }

    /// Writes `bytes` through TLS when the connection has it.
    fn write_all_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.tls.as_mut() {
            None => self.stream.write_all(bytes),
            Some(tls) => {
                let mut s = rustls::Stream::new(&mut **tls, &mut self.stream);
                s.write_all(bytes)?;
                s.flush()
            }
        }
    }

    /// Sends LOGIN on this connection and waits for LOGIN_OK, like
    /// [`login`](Client::login) without the connect.
    pub fn login_here(&mut self, token: &str) -> Result<LoginInfo, ClientError> {
        self.login_here_version(token, proto::VERSION)
    }

    /// [`login_here`](Client::login_here) with protocol `version`.
    pub fn login_here_version(
        &mut self,
        token: &str,
        version: u8,
    ) -> Result<LoginInfo, ClientError> {
        self.send_frame(&Frame::Login {
            version,
            token: token.as_bytes(),
        })?;
        match self.recv()? {
            OwnedFrame::LoginOk {
                server_time_ms,
                offline_count,
            } => Ok(LoginInfo {
                server_time_ms,
                offline_count,
            }),
            OwnedFrame::LoginErr { code, text } => Err(ClientError::LoginRejected { code, text }),
            OwnedFrame::Redirect { addr } => Err(ClientError::Redirected { addr }),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Encodes `frame` and writes it whole, in one `write_all`.
    pub fn send_frame(&mut self, frame: &Frame<'_>) -> io::Result<()> {
        self.write_buf.clear();
        proto::encode(frame, &mut self.write_buf);
        let buf = std::mem::take(&mut self.write_buf);
        let result = self.write_all_bytes(&buf);
        self.write_buf = buf;
        result
    }

    /// Writes `bytes` as they are, for tests that feed the server malformed
    /// or split input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all_bytes(bytes)
    }

    /// Sends SEND{client_id, to, body}. The server answers with
    /// ACK{client_id, ..} or ERROR{code, client_id, ..}.
    pub fn send_msg(&mut self, client_id: u64, to: u64, body: &[u8]) -> io::Result<()> {
        self.send_frame(&Frame::Send {
            client_id,
            to,
            body,
        })
    }

    /// Sends DELIVERED{server_id}, the answer every DELIVER needs.
    pub fn send_delivered(&mut self, server_id: u64) -> io::Result<()> {
        self.send_frame(&Frame::Delivered { server_id })
    }

    /// Sends READ{server_id, from}: the message `server_id` from user `from`
    /// was shown to the reader.
    pub fn send_read(&mut self, server_id: u64, from: u64) -> io::Result<()> {
        self.send_frame(&Frame::Read { server_id, from })
    }

    /// Sends a group frame (protocol v2, docs/PROTOCOL.md "Groups"), e.g.
    /// GROUP_ADD or GROUP_READ; its answer comes like any frame.
    pub fn send_group(&mut self, frame: GroupFrame<&[u8]>) -> io::Result<()> {
        self.send_frame(&Frame::Group(frame))
    }

    /// Sends GROUP_SEND{client_id, group, body}. The server answers with
    /// ACK{client_id, server_id: the message's number in the group, ..} or
    /// ERROR{code, client_id, ..}.
    pub fn group_send(&mut self, client_id: u64, group: u64, body: &[u8]) -> io::Result<()> {
        self.send_group(GroupFrame::Send {
            client_id,
            group,
            body,
        })
    }

    /// Sends the group request `frame` (GROUP_CREATE, GROUP_ADD,
    /// GROUP_REMOVE, GROUP_LEAVE or GROUP_ADMIN, whose `req` it carries)
    /// and waits for its answer: the group GROUP_OK names, or
    /// [`ClientError::Unexpected`] with the ERROR. Frames that come
    /// meanwhile (group copies, receipts) go to the backlog.
    pub fn group_request(&mut self, frame: GroupFrame<&[u8]>) -> Result<u64, ClientError> {
        let req = group_req(&frame);
        self.send_group(frame)?;
        match self.recv_until(|f| answers(f, req))? {
            OwnedFrame::Group(GroupFrame::Ok { group, .. }) => Ok(group),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Sends GROUP_MEMBERS{req, group} and collects its GROUP_LIST frames:
    /// every member and whether it is an admin, or
    /// [`ClientError::Unexpected`] with the ERROR.
    pub fn group_members(&mut self, req: u64, group: u64) -> Result<Vec<(u64, bool)>, ClientError> {
        self.send_group(GroupFrame::Members { req, group })?;
        let mut members = Vec::new();
        loop {
            match self.recv_until(|f| answers(f, req))? {
                OwnedFrame::Group(GroupFrame::List { entries, left, .. }) => {
                    members.extend(proto::group::list_entries(&entries));
                    if left == 0 {
                        return Ok(members);
                    }
                }
                other => return Err(ClientError::Unexpected(other)),
            }
        }
    }

    /// Sends PING{nonce} and waits up to the read timeout for PONG{nonce};
    /// frames received meanwhile go to the backlog.
    pub fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        self.send_frame(&Frame::Ping { nonce })?;
        self.recv_until(|f| matches!(f, OwnedFrame::Pong { nonce: n } if *n == nonce))?;
        Ok(())
    }

    /// Returns the next frame: the oldest in the backlog, else the next from
    /// the server, waiting up to the read timeout.
    ///
    /// Fails with [`ClientError::Timeout`] if none arrives in time (the
    /// connection stays usable and no bytes are lost) and with
    /// [`ClientError::Closed`] once the server has closed and every frame it
    /// sent has been returned.
    pub fn recv(&mut self) -> Result<OwnedFrame, ClientError> {
        let timeout = self.read_timeout;
        self.recv_timeout(timeout)?.ok_or(ClientError::Timeout)
    }

    /// Like [`recv`](Client::recv), but waits up to `t` and returns
    /// `Ok(None)` when nothing arrived. A zero `t` still picks up a frame the
    /// kernel has already received.
    pub fn recv_timeout(&mut self, t: Duration) -> Result<Option<OwnedFrame>, ClientError> {
        if let Some(frame) = self.backlog.pop_front() {
            return Ok(Some(frame));
        }
        self.read_frame(deadline_after(t))
    }

    /// Sets how long [`recv`](Client::recv), [`recv_until`](Client::recv_until),
    /// [`ping`](Client::ping) and [`login_here`](Client::login_here) wait.
    pub fn set_read_timeout(&mut self, t: Duration) {
        self.read_timeout = t;
    }

    /// The current read timeout.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Receives frames until one matches `pred` and returns it, waiting up to
    /// the read timeout in total.
    ///
    /// The backlog is searched first. Frames that do not match are appended
    /// to the backlog, in order, and later receive calls return them, so a
    /// test waiting for an ACK does not lose a DELIVER that came first. On
    /// [`ClientError::Timeout`] or [`ClientError::Closed`] the skipped frames
    /// stay in the backlog for inspection.
    pub fn recv_until(
        &mut self,
        pred: impl FnMut(&OwnedFrame) -> bool,
    ) -> Result<OwnedFrame, ClientError> {
        let timeout = self.read_timeout;
        self.recv_until_timeout(timeout, pred)
    }

    /// [`recv_until`](Client::recv_until) with an explicit total wait `t`.
    pub fn recv_until_timeout(
        &mut self,
        t: Duration,
        mut pred: impl FnMut(&OwnedFrame) -> bool,
    ) -> Result<OwnedFrame, ClientError> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return Ok(self.backlog.remove(i).expect("index from position"));
        }
        let deadline = deadline_after(t);
        loop {
            let Some(frame) = self.read_frame(deadline)? else {
                return Err(ClientError::Timeout);
            };
            if pred(&frame) {
                return Ok(frame);
            }
            if self.backlog.len() >= BACKLOG_FRAMES_MAX {
                return Err(ClientError::Unexpected(frame));
            }
            self.backlog.push_back(frame);
        }
    }

    /// Reads until the server closes the connection (end of stream or
    /// reset), waiting up to `t`, and returns every frame received first,
    /// backlog included, in order.
    ///
    /// Fails with [`ClientError::Timeout`] if the connection is still open
    /// after `t`; the frames seen so far are then left in the backlog.
    pub fn wait_closed(&mut self, t: Duration) -> Result<Vec<OwnedFrame>, ClientError> {
        let deadline = deadline_after(t);
        let mut frames: Vec<OwnedFrame> = self.backlog.drain(..).collect();
        loop {
            match self.read_frame(deadline) {
                Ok(Some(frame)) => frames.push(frame),
                Err(ClientError::Closed) => return Ok(frames),
                Ok(None) => {
                    self.backlog.extend(frames);
                    return Err(ClientError::Timeout);
                }
                Err(e) => {
                    self.backlog.extend(frames);
                    return Err(e);
                }
            }
        }
    }

    /// Closes the writing half: the server sees end of stream while this
    /// client can still receive what it sends back.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// True once the server has closed the connection (end of stream or
    /// reset) as far as this client has read.
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// Frames waiting in the backlog.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// The limits used to decode the server's frames (default:
    /// [`Limits::default`]).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits used to decode the server's frames.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// The underlying stream, e.g. to set socket options. Reading from it
    /// directly bypasses the client's buffer and loses frame boundaries.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// A second handle to the same socket, e.g. for a writer thread while
    /// this client keeps reading. Frames written through both handles at
    /// once may interleave; serialise the writers. On a TLS connection the
    /// handle carries ciphertext: it is only good for socket options.
    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Gives up the client and returns its stream. Bytes already read but
    /// not yet returned as frames, and the backlog, are dropped (and the TLS
    /// state, on a TLS connection).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Decodes the next frame from the read buffer, reading from the socket
    /// until one is complete, the deadline passes (`Ok(None)`) or the
    /// server closes (`Closed`, or `Decode` if it closed mid-frame).
    fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Option<OwnedFrame>, ClientError> {
        let mut read_tried = false;
        loop {
            if let Some(frame) = self.decode_buffered()? {
                return Ok(Some(frame));
            }
            if self.eof {
                if self.read_start < self.read_buf.len() {
                    return Err(ClientError::Decode(DecodeError::Malformed(
                        "connection closed in the middle of a frame",
                    )));
                }
                return Err(ClientError::Closed);
            }
            let wait = match deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() && read_tried {
                        return Ok(None);
                    }
                    Some(left.max(READ_WAIT_MIN))
                }
            };
            read_tried = true;
            self.fill(wait)?;
        }
    }

    /// Decodes one complete frame from the buffer, if there is one.
    fn decode_buffered(&mut self) -> Result<Option<OwnedFrame>, ClientError> {
        debug_assert!(self.read_start <= self.read_buf.len());
        match proto::decode(&self.read_buf[self.read_start..], &self.limits)? {
            Some((frame, used)) => {
                debug_assert!(used > 0 && used <= self.read_buf.len() - self.read_start);
                let frame = frame.to_owned();
                self.read_start += used;
                if self.read_start == self.read_buf.len() {
                    self.read_buf.clear();
                    self.read_start = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Performs one read of up to [`READ_CHUNK_BYTES`], waiting at most
    /// `wait` (`None`: forever). A timeout is not an error: the caller checks
    /// its deadline. End of stream and resets set `eof`.
    fn fill(&mut self, wait: Option<Duration>) -> Result<(), ClientError> {
        // Only a partial frame is left; move it to the front.
        self.read_buf.drain(..self.read_start);
        self.read_start = 0;
        self.stream.set_read_timeout(wait)?;
        let len = self.read_buf.len();
        self.read_buf.resize(len + READ_CHUNK_BYTES, 0);
        let result = match self.tls.as_mut() {
            None => self.stream.read(&mut self.read_buf[len..]),
            Some(tls) => {
                rustls::Stream::new(&mut **tls, &mut self.stream).read(&mut self.read_buf[len..])
            }
        };
        let got = *result.as_ref().unwrap_or(&0);
        self.read_buf.truncate(len + got);
        match result {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            // SO_RCVTIMEO expiry shows up as EAGAIN (WouldBlock) on Unix and
            // as TimedOut on Windows.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // A signal interrupted the wait; the caller loops.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The server closed while our data was unread, or aborted: for a
            // client that is the same as end of stream.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        // TLS: the server closed without close_notify.
                        | io::ErrorKind::UnexpectedEof
                ) =>
            {
                self.eof = true
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
        Ok(())
    }
}

/// A TLS 1.3 client configuration trusting the CA certificates in the PEM
/// file `ca_pem`. Share it between connections: it holds the session cache
/// that lets reconnects resume.
pub fn tls_config(ca_pem: &Path) -> Result<Arc<ClientConfig>, ClientError> {
    let bad = |e: &dyn fmt::Display| {
        ClientError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("CA file {}: {e}", ca_pem.display()),
        ))
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no CERTIFICATE in the file"));
    }
    tls_config_with_roots(roots)
}

/// A TLS 1.3 client configuration trusting `roots`.
pub fn tls_config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Io(io::Error::other(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `now + t`, or `None` (wait forever) when that is beyond what `Instant`
/// can represent.
fn deadline_after(t: Duration) -> Option<Instant> {
    Instant::now().checked_add(t)
}

pub mod dedupe;
pub mod outbox;
pub mod session;
pub mod session_state;

#[cfg(test)]
mod tests;
