//! Server configuration: every limit lives here, with its unit and default.
//!
//! Field names put the unit last (`frame_bytes_max`, `idle_timeout_ms`) so the
//! memory and time budget of a deployment can be read in one place. The
//! relations between limits are checked by [`Config::validate`] at start-up,
//! so a bad combination fails at boot rather than under load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::io::Backend;
use crate::store::{Durability, LogOptions};

/// The token secret used when none is configured. Anyone can mint tokens for
/// it, so the server logs a loud warning when it runs with this value.
pub const DEV_TOKEN_SECRET: &str = "tern-development-secret-do-not-use-in-production";

/// Longest delay before a shard restart, ms (also the cap of the doubling).
pub const SHARD_RESTART_BACKOFF_MS_MAX: u64 = 10_000;

/// Most listening sockets the kernel balances new connections over on one
/// address and port, if it has such a cap. Every shard binds its own. On
/// FreeBSD an `SO_REUSEPORT_LB` group holds at most 256 sockets
/// (`INPCBLBGROUP_SIZMAX` in sys/netinet/in_pcb.c): a later bind succeeds,
/// but that socket never gets a connection.
#[cfg(target_os = "freebsd")]
const SHARDS_PER_PORT_MAX: Option<usize> = Some(256);
/// Linux's `SO_REUSEPORT` groups have no cap below our own 1024.
#[cfg(not(target_os = "freebsd"))]
const SHARDS_PER_PORT_MAX: Option<usize> = None;

/// Largest `uring_batch_wait_us`: batching is for microseconds, not a delay.
const URING_BATCH_WAIT_US_MAX: u32 = 10_000;

/// Largest `deliver_inflight_bytes_max` (counted in 32 bits per user).
const DELIVER_INFLIGHT_BYTES_MAX: usize = 1 << 30;

/// Largest burst of a per-user rate (`sends_burst_max`, ...): a bucket
/// counts thousandths of a token in 32 bits.
const RATE_BURST_MAX: u32 = 4_000_000;

/// Largest `delivered_recent_max`.
const DELIVERED_RECENT_MAX: usize = 1 << 16;
/// Largest `group_members_max`: a group's member list crosses a ring per
/// message, and GROUP_MEMBERS lists them all.
const GROUP_MEMBERS_MAX: usize = 1 << 16;
/// Largest `presence_subs_max`: a subscriber's list is scanned per SUBSCRIBE.
const PRESENCE_SUBS_MAX: usize = 1 << 16;

/// Largest `devices_per_user_max`: the devices that still owe a DELIVERED
/// for a message are one bit each of a `u32`.
pub const DEVICES_PER_USER_MAX: usize = 32;

/// Largest `deliver_inflight_max` (counted in 32 bits per user).
const DELIVER_INFLIGHT_MAX: usize = 1 << 20;

/// Largest `push_batch_max`: one POST stays well under a megabyte.
const PUSH_BATCH_MAX: usize = 10_000;

/// Largest `push_retries_max`: with the doubling backoff, a dead gateway
/// holds one batch for at most 2^16 backoffs.
const PUSH_RETRIES_MAX: u32 = 16;

/// Effective server configuration (TOML file, then command-line flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener address. Default `127.0.0.1:5222`. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Number of shards (event-loop threads). Default 0: the count recorded
    /// in the data directory (`tern.meta`), or one per available core when
    /// none is recorded. An explicit count other than the recorded one
    /// starts only on a data directory without queued messages; see
    /// `tern store reshard`. At most 1024; on FreeBSD at most 256, because
    /// every shard has its own listening socket on the port and an
    /// `SO_REUSEPORT_LB` group holds at most 256 (a shard past that would
    /// bind but never accept). The limit applies to the resolved count, so
    /// `shards = 0` on a box with more than 256 cores needs an explicit value.
    pub shards: usize,
    /// I/O backend: `auto` (io_uring where the kernel supports it, else
    /// poll), `uring`, or `poll` (epoll/kqueue). Default `auto`.
    pub io: Backend,
    /// Pin shard N to core N. Default false.
    pub pin_cores: bool,
    /// io_uring only: a busy shard lets completions gather for up to this
    /// many microseconds before its thread wakes (sooner once 32 have come;
    /// the kernel's min-wait, Linux 6.12+, ignored with one log line on
    /// older kernels). Fewer wake-ups and less CPU per message under load, at
    /// up to this much more latency per hop; a shard that is not busy still
    /// wakes on the first completion. 0 = off (default); at most 10000.
    pub uring_batch_wait_us: u32,
    /// Path of the stats Unix socket. Default `./tern.sock`.
    pub stats_socket: PathBuf,
    /// Optional TLS listener address (TLS 1.3, rustls), beside the plaintext
    /// one. Port 0 picks a free port. Default none: no TLS.
    pub tls_listen: Option<SocketAddr>,
    /// PEM file with the server's certificate chain (leaf first). Required
    /// with `tls_listen`; re-read by `reload tls` and SIGHUP. Default empty.
    pub tls_cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    /// Required with `tls_listen`; re-read with `tls_cert`. Default empty.
    pub tls_key: PathBuf,
    /// Optional WebSocket listener address (RFC 6455, plaintext), beside the
    /// others: browsers connect here. A port of its own, so the plaintext
    /// listener never peeks at first bytes to tell the two apart. Port 0
    /// picks a free port. Default none: no WebSocket.
    pub ws_listen: Option<SocketAddr>,
    /// Optional MQTT 3.1.1 / 5.0 listener address (plaintext), beside the
    /// others: MQTT clients connect here, user name = user id, password =
    /// a Tern token (docs/MQTT.md). Port 0 picks a free port. Default
    /// none: no MQTT.
    pub mqtt_listen: Option<SocketAddr>,
    /// Optional MQTT over TLS listener address (TLS 1.3, the `tls_cert` /
    /// `tls_key` certificate, also without `tls_listen`): the same MQTT as
    /// `mqtt_listen` inside TLS (docs/MQTT.md). Port 0 picks a free port.
    /// Default none.
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// `Origin` values a WebSocket upgrade may carry (exact match, e.g.
    /// `"https://chat.example.org"`); others get 403. Empty (the default)
    /// allows any origin, and requests without one.
    pub ws_origins: Vec<String>,
    /// Optional `ADDR` serving Prometheus metrics over HTTP at `/metrics`. Default none.
    pub metrics_listen: Option<SocketAddr>,
    /// Secret for HMAC-SHA256 login tokens. Default: a development secret (warned about).
    pub token_secret: String,
    /// Largest frame a client may send, in bytes (length prefix excluded). Default 65536.
    pub frame_bytes_max: usize,
    /// Largest message body, in bytes. Default 65000; at most
    /// `frame_bytes_max - 41`, room for the other fields of a v2 DELIVER.
    pub body_bytes_max: usize,
    /// Messages held per user (offline plus not yet acknowledged by the device). Default 1000.
    pub queue_len_max: usize,
    /// Devices registered to one user (online or not, each with its own
    /// session and delivery window while online); a LOGIN of one more
    /// device gets LOGIN_ERR `too_many_devices` until one is removed or
    /// expires. Default 4; 1 to 32 (a message's answering devices are a
    /// 32-bit mask).
    pub devices_per_user_max: usize,
    /// Days a registered device may stay offline: past it, it is dropped
    /// from the registry with its copies of the messages (as a removal),
    /// checked about once a second over a bounded slice of the users.
    /// Fractional days are taken (0.0001 days is 8.64 s, for tests); 0 =
    /// never. Default 30.
    pub device_idle_days_max: f64,
    /// Bytes of unsent output a connection may hold before it is closed with
    /// `BYE(slow)`. Default 262144 (256 KiB).
    pub conn_out_bytes_max: usize,
    /// DELIVER frames sent to a device and not yet answered with DELIVERED;
    /// further messages wait in the queue. Default 4096: a backlog drains at
    /// about one window per round trip (results/slow-link: 10,000 messages
    /// in 1.54 s at 300 ms). At most 1048576.
    pub deliver_inflight_max: usize,
    /// A logged-in connection that sends nothing for this long is closed with
    /// `BYE(idle)`. Clients keep it open with PING. Default 300000 (5 min).
    pub idle_timeout_ms: u64,
    /// A connection that has not completed LOGIN within this time is closed. Default 10000.
    pub login_timeout_ms: u64,
    /// Slots in each cross-shard SPSC ring (one ring per ordered pair of shards). Default 1024 (80 bytes each).
    pub ring_slots: usize,
    /// Most connections the whole process holds; further accepts are closed at
    /// once. Default 1000000.
    pub conns_max: usize,
    /// New connections accepted per second per shard; the excess is closed at
    /// once. 0 means no limit. Default 20000.
    pub accept_rate_per_s_max: u32,
    /// Listen backlog passed to listen(2). Default 4096.
    pub listen_backlog: u32,
    /// On SIGTERM/SIGINT, how long shards keep flushing output before exiting. Default 2000.
    pub shutdown_grace_ms: u64,
    /// Directory of the store-and-forward logs (one `shard-N` directory per
    /// shard). Default `./tern-data`. Not touched with `durability = "memory"`.
    pub data_dir: PathBuf,
    /// When a message counts as stored, i.e. when its sender gets the ACK:
    /// `fsync` (on disk: survives power loss; one fdatasync per loop
    /// iteration that stored anything), `os` (written to the kernel: survives
    /// a crash of Tern, not of the machine), `memory` (survives nothing; no
    /// disk). Default `fsync`.
    pub durability: Durability,
    /// Size at which a log segment is sealed and a new one started, bytes. Default 67108864 (64 MiB).
    pub segment_bytes_max: u64,
    /// Disk budget of each shard's log, bytes; past it SENDs to queued users
    /// get ERROR(storage_full). 0 = unlimited (default).
    pub disk_bytes_max: u64,
    /// Share of dead bytes (0.0-1.0) past which a sealed segment is
    /// rewritten. Default 0.5.
    pub compact_dead_ratio: f64,
    /// Skip corrupt records in the middle of a log at start-up instead of
    /// refusing to start (the `--repair` flag). Default false.
    pub repair: bool,
    /// Free space to leave on the data dir's filesystem, bytes: SENDs that
    /// would take it lower get ERROR(storage_full) (deliveries and receipts
    /// go on, and SENDs are taken again once space is back). The space under
    /// it is kept for delivery records and compaction, which free space.
    /// Default 0 = auto: 5% of the filesystem, at most 64 MiB.
    pub disk_free_bytes_min: u64,
    /// Restarts of one shard allowed within `shard_restart_period_ms`
    /// (OTP's restart intensity); one more and the process exits with status
    /// 70 so the service manager restarts it or pages someone. Default 5.
    pub shard_restarts_max: u32,
    /// The window of `shard_restarts_max`, in milliseconds. Default 60000.
    pub shard_restart_period_ms: u64,
    /// Delay before a crashed shard restarts, in milliseconds, doubled for
    /// each earlier restart within the period (at most 10 s); a reopen of its
    /// store that fails is retried after the same delay. Default 100.
    pub shard_restart_backoff_ms: u64,
    /// Test knob, not a config key: slots per io_uring fixed-file table at
    /// most (0, the default: RLIMIT_NOFILE). A small value forces several
    /// rings per shard with few connections.
    #[serde(skip)]
    #[doc(hidden)]
    pub uring_ring_slots_max: usize,
    /// Permission bits of the stats socket, set before it accepts anyone:
    /// an octal string (`"0660"`) or an integer (`0o660`). Default `"0600"`
    /// (owner only, whatever the umask). Must include `0600`, at most `0777`.
    pub stats_socket_mode: FileMode,
    /// Group of the stats socket: a group name, or a numeric gid. Default
    /// none: the server process's group. Pair it with `stats_socket_mode =
    /// "0660"` to let that group run `tern stats`.
    pub stats_socket_group: Option<Group>,
    /// At start-up, how long a listen address that is busy but has nobody
    /// accepting on it (a killed server's sockets still being released, as
    /// io_uring does for up to a second after kill -9) is retried before the
    /// start fails. A live listener is refused at once. Default 5000; 0 = no
    /// retry.
    pub listen_retry_ms: u64,
    /// How often each shard asks the allocator to return the memory it
    /// freed to the operating system, ms (see `crate::memory`): without it a
    /// shard that went quiet after a burst keeps its peak. Each time costs a
    /// walk of the shard's heap pages, well under a millisecond. Default
    /// 5000; 0 = never.
    pub memory_release_ms: u64,
    /// Bytes of DELIVER frames sent to a device and not yet answered with
    /// DELIVERED (besides the `deliver_inflight_max` count); further messages
    /// wait in the queue. One DELIVER always goes when none is in flight.
    /// Default 1048576 (1 MiB); at least `frame_bytes_max`.
    pub deliver_inflight_bytes_max: usize,
    /// SENDs a logged-in user may make per second (token bucket refill);
    /// past it a SEND gets `ERROR(rate_limited, client_id)` and is not
    /// taken. 0 = no limit. Default 1000.
    pub sends_per_s_max: u32,
    /// SENDs a user may make at once before `sends_per_s_max` applies (the
    /// bucket's size). 1 to 4000000 while the rate is on. Default 10000.
    pub sends_burst_max: u32,
    /// READ and DELIVERED frames (the ones that make receipts) a user may
    /// send per second; past it the frame gets `ERROR(rate_limited, 0)` and
    /// is not taken. 0 = no limit. Default 2000.
    pub receipts_per_s_max: u32,
    /// READ and DELIVERED frames at once before `receipts_per_s_max`
    /// applies. 1 to 4000000 while the rate is on. Default 20000.
    pub receipts_burst_max: u32,
    /// PINGs a user may send per second; past it a PING gets
    /// `ERROR(rate_limited, 0)` and no PONG. 0 = no limit. Default 10.
    pub pings_per_s_max: u32,
    /// PINGs at once before `pings_per_s_max` applies. At least 1 when the
    /// rate is on (at most 4000000). Default 100.
    pub pings_burst_max: u32,
    /// A connection whose frames are refused as `rate_limited` more than
    /// this many times within `rate_refusals_window_ms` is closed with
    /// `BYE(rate_limited)`. 0 = never closed for it. Default 100.
    pub rate_refusals_max: u32,
    /// The window of `rate_refusals_max`, ms. Default 10000; at least 1
    /// while `rate_refusals_max` is on.
    pub rate_refusals_window_ms: u64,
    /// Messages remembered per logged-in user as delivered to it in this
    /// login (server id and sender, 16 bytes each): READ is accepted only
    /// for one of them, and a repeated DELIVERED for one of them is
    /// ignored; other READs and DELIVEREDs get `ERROR(unknown_message)`.
    /// 0 = no check (any READ is relayed, as before). Default 1024; at most
    /// 65536.
    pub delivered_recent_max: usize,
    /// Failed logins (bad or expired token) from one address within a
    /// minute, per shard, past which the address is refused for
    /// `addr_ban_ms`. 0 = no limit. Default 20.
    pub addr_logins_failed_max: u32,
    /// How long an address stays refused after too many failed logins, ms.
    /// Default 60000.
    pub addr_ban_ms: u64,
    /// New connections per second from one address, per shard; the excess
    /// is refused at accept. 0 = no limit. Default 1000.
    pub addr_conns_per_s_max: u32,
    /// Connections from one address that have not logged in yet, per
    /// shard; further ones are refused at accept. 0 = no limit.
    /// Default 1000.
    pub addr_pending_max: u32,
    /// Addresses each shard tracks for the per-address limits; while full,
    /// connections from addresses not in it are refused. At least 1.
    /// Default 65536 (about 64 bytes each).
    pub addr_table_max: usize,
    /// Connections not logged in yet, whole process (each shard takes an
    /// equal share, rounded up). At the cap a new connection closes the
    /// oldest one not logged in on its shard, so a swarm of silent
    /// connections cannot keep real clients from logging in. 0 = no limit.
    /// Default 100000.
    pub pending_max: usize,
    /// Push gateway (docs/OPERATIONS.md, "Push for offline devices"): when a
    /// message is queued for an offline device, a JSON notice (user,
    /// device, messages waiting, oldest waiting time; never the body) is
    /// POSTed here, `http://` or `https://`. Default none: no pushes.
    pub push_url: Option<String>,
    /// Key of the HMAC-SHA256 signature of every push POST (header
    /// `X-Tern-Signature: sha256=<hex>`). Required, at least 16 bytes, when
    /// `push_url` is set. Default none.
    pub push_secret: Option<String>,
    /// Least time between two POSTs about the same device, ms; notices in
    /// between are folded into the next one. 0 = no spacing. Default 10000.
    pub push_interval_ms: u64,
    /// Notices waiting for the push thread, whole process; a shard never
    /// waits: past this they are dropped and counted. At least 1.
    /// Default 4096.
    pub push_queue_len_max: usize,
    /// Devices the push thread keeps (waiting for a POST or spaced after
    /// one, about 80 bytes each); notices for further devices are dropped
    /// and counted. At least 1. Default 65536.
    pub push_devices_max: usize,
    /// Most devices named in one POST. 1 to 10000. Default 100.
    pub push_batch_max: usize,
    /// Retries of a POST that failed (no answer, or not 2xx) before its
    /// notices are dropped and counted. At most 16. Default 3.
    pub push_retries_max: u32,
    /// Wait before the first retry, ms, doubled per retry. At least 1.
    /// Default 500.
    pub push_retry_backoff_ms: u64,
    /// Time a POST may take (connecting and answering), ms. At least 1.
    /// Default 5000.
    pub push_timeout_ms: u64,
    /// Users a connection may watch with SUBSCRIBE (protocol v2) at once;
    /// one more gets `ERROR(presence_subs_full)`. 0 = presence off (every
    /// SUBSCRIBE refused). Default 512; at most 65536.
    pub presence_subs_max: usize,
    /// Members a group may have (protocol v2 groups); a GROUP_ADD past it
    /// gets `ERROR(group_full)`. Default 1024; 1 to 65536.
    pub group_members_max: usize,
    /// Groups homed on one shard a user may be a member of (the
    /// server-wide bound is this times `shards`); a GROUP_CREATE or
    /// GROUP_ADD past it gets `ERROR(too_many_groups)`. Default 256; at
    /// least 1.
    pub groups_per_user_max: usize,
    /// Least time between two durable writes of one user's last seen, s:
    /// a user going offline is written at the next flush, flushes being at
    /// most one per this period per shard, so a crash loses at most this
    /// much of last seen and an idle shard writes nothing. 0 = at the next
    /// loop iteration. Default 60.
    pub last_seen_write_s: u64,
    /// SUBSCRIBE, UNSUBSCRIBE, PRIVACY and TYPING frames a user may send
    /// per second; past it the frame gets `ERROR(rate_limited, 0)` and is
    /// not taken. 0 = no limit. Default 20.
    pub presence_frames_per_s_max: u32,
    /// Those frames at once before `presence_frames_per_s_max` applies
    /// (room for a full subscription list right after login). 1 to 4000000
    /// while the rate is on. Default 1024.
    pub presence_frames_burst_max: u32,
    /// Users banned at once by the operator (`ban user` on the stats
    /// socket), count; each costs about 40 bytes in memory and 24 in
    /// `<data_dir>/bans`. A ban past it is refused. Default 100000.
    pub bans_max: usize,
    /// Optional `[cluster]` table: membership of a Tern cluster on NATS
    /// JetStream (docs/CLUSTER.md). Default none: standalone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Unix permission bits of a file the server creates (`stats_socket_mode`).
/// In TOML an octal string (`"0660"`, `"660"` or `"0o660"`) or an integer
/// (`0o660`); printed as a 4-digit octal string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FileMode, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileMode;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an octal mode such as \"0600\" or 0o600")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileMode, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileMode, E> {
                u32::try_from(v)
                    .map(FileMode)
                    .map_err(|_| E::custom(format!("{v} is not a file mode")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileMode, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl std::str::FromStr for FileMode {
    type Err = String;
    fn from_str(text: &str) -> Result<FileMode, String> {
        let digits = text.strip_prefix("0o").unwrap_or(text);
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|_| !digits.is_empty())
            .map(FileMode)
            .ok_or_else(|| format!("{text:?} is not an octal mode such as \"0600\""))
    }
}

impl From<FileMode> for String {
    fn from(mode: FileMode) -> String {
        format!("{:04o}", mode.0)
    }
}

/// A Unix group: a name looked up at start-up, or a numeric gid (an integer,
/// or a string of digits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Group {
    /// A numeric group id.
    Id(u32),
    /// A group name (a string of digits means that gid).
    Name(String),
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Group, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Group;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a group name or a numeric gid")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Group, E> {
                Ok(Group::Name(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Group, E> {
                u32::try_from(v)
                    .map(Group::Id)
                    .map_err(|_| E::custom(format!("{v} is not a gid (0 to 4294967295)")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Group, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl std::str::FromStr for Group {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Group, Self::Err> {
        Ok(Group::Name(text.to_string()))
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Group::Id(gid) => write!(f, "{gid}"),
            Group::Name(name) => write!(f, "{name}"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5222)),
            shards: 0,
            io: Backend::Auto,
            pin_cores: false,
            uring_batch_wait_us: 0,
            stats_socket: PathBuf::from("tern.sock"),
            metrics_listen: None,
            tls_listen: None,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            ws_listen: None,
            mqtt_listen: None,
            mqtt_tls_listen: None,
            ws_origins: Vec::new(),
            token_secret: DEV_TOKEN_SECRET.to_string(),
            frame_bytes_max: 65536,
            body_bytes_max: 65000,
            queue_len_max: 1000,
            devices_per_user_max: 4,
            device_idle_days_max: 30.0,
            conn_out_bytes_max: 256 * 1024,
            deliver_inflight_max: 4096,
            idle_timeout_ms: 300_000,
            login_timeout_ms: 10_000,
            ring_slots: 1024,
            conns_max: 1_000_000,
            accept_rate_per_s_max: 20_000,
            listen_backlog: 4096,
            shutdown_grace_ms: 2000,
            data_dir: PathBuf::from("tern-data"),
            durability: Durability::Fsync,
            segment_bytes_max: 64 * 1024 * 1024,
            disk_bytes_max: 0,
            compact_dead_ratio: 0.5,
            repair: false,
            disk_free_bytes_min: 0,
            shard_restarts_max: 5,
            shard_restart_period_ms: 60_000,
            shard_restart_backoff_ms: 100,
            uring_ring_slots_max: 0,
            stats_socket_mode: FileMode(0o600),
            stats_socket_group: None,
            listen_retry_ms: 5000,
            memory_release_ms: 5000,
            deliver_inflight_bytes_max: 1024 * 1024,
            sends_per_s_max: 1000,
            sends_burst_max: 10_000,
            receipts_per_s_max: 2000,
            receipts_burst_max: 20_000,
            pings_per_s_max: 10,
            pings_burst_max: 100,
            rate_refusals_max: 100,
            rate_refusals_window_ms: 10_000,
            delivered_recent_max: 1024,
            addr_logins_failed_max: 20,
            addr_ban_ms: 60_000,
            addr_conns_per_s_max: 1000,
            addr_pending_max: 1000,
            addr_table_max: 65_536,
            pending_max: 100_000,
            push_url: None,
            push_secret: None,
            push_interval_ms: 10_000,
            push_queue_len_max: 4096,
            push_devices_max: 65_536,
            push_batch_max: 100,
            push_retries_max: 3,
            push_retry_backoff_ms: 500,
            push_timeout_ms: 5000,
            presence_subs_max: 512,
            group_members_max: 1024,
            groups_per_user_max: 256,
            last_seen_write_s: 60,
            presence_frames_per_s_max: 20,
            presence_frames_burst_max: 1024,
            bans_max: 100_000,
            cluster: None,
        }
    }
}

/// A configuration that cannot run, naming the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key at fault (as written in TOML), or `""` for a file-level error.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Bytes a SEND or DELIVER frame needs besides its body: type byte plus the
/// largest varints for message id, user id, time and (a protocol v2
/// DELIVER) the sender's client_id, 10 bytes each.
pub const FRAME_OVERHEAD_BYTES_MAX: usize = 1 + 4 * 10;

impl Config {
    /// Parses TOML text; unknown keys and wrong types are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let key = e.span().and_then(|span| key_at(text, span.start));
            let message = e.message().to_string() + &span_hint(text, e.span());
            bad(key.unwrap_or(""), message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("", format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|mut e| {
            e.message = format!("{}: {}", path.display(), e.message);
            e
        })
    }

    /// Renders the configuration as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config always serialises")
    }

    /// Checks each limit and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards > 1024 {
            return Err(bad("shards", "at most 1024 shards"));
        }
        check_shards_per_port(self.shards, self.shard_count(), SHARDS_PER_PORT_MAX)?;
        if self.token_secret.len() < 16 {
            return Err(bad("token_secret", "must be at least 16 bytes"));
        }
        if self.frame_bytes_max < 64 || self.frame_bytes_max > 16 * 1024 * 1024 {
            return Err(bad("frame_bytes_max", "must be between 64 and 16777216"));
        }
        if self.body_bytes_max == 0 {
            return Err(bad("body_bytes_max", "must be at least 1"));
        }
        if self.body_bytes_max + FRAME_OVERHEAD_BYTES_MAX > self.frame_bytes_max {
            return Err(bad(
                "body_bytes_max",
                format!(
                    "must be at most frame_bytes_max - {FRAME_OVERHEAD_BYTES_MAX} = {} so a DELIVER of it fits in a frame",
                    self.frame_bytes_max.saturating_sub(FRAME_OVERHEAD_BYTES_MAX)
                ),
            ));
        }
        if self.queue_len_max == 0 {
            return Err(bad("queue_len_max", "must be at least 1"));
        }
        if !(1..=DEVICES_PER_USER_MAX).contains(&self.devices_per_user_max) {
            return Err(bad(
                "devices_per_user_max",
                format!("must be 1 to {DEVICES_PER_USER_MAX}"),
            ));
        }
        if !(self.device_idle_days_max.is_finite() && self.device_idle_days_max >= 0.0) {
            return Err(bad(
                "device_idle_days_max",
                "must be 0 or a positive number of days",
            ));
        }
        if self.conn_out_bytes_max < self.frame_bytes_max + 16 {
            return Err(bad(
                "conn_out_bytes_max",
                "must hold at least one largest frame (frame_bytes_max + 16)",
            ));
        }
        if self.deliver_inflight_max == 0 {
            return Err(bad("deliver_inflight_max", "must be at least 1"));
        }
        if self.idle_timeout_ms < 1000 {
            return Err(bad("idle_timeout_ms", "must be at least 1000"));
        }
        if self.login_timeout_ms < 100 {
            return Err(bad("login_timeout_ms", "must be at least 100"));
        }
        if self.ring_slots < 2 {
            return Err(bad("ring_slots", "must be at least 2"));
        }
        if self.uring_batch_wait_us > URING_BATCH_WAIT_US_MAX {
            return Err(bad(
                "uring_batch_wait_us",
                format!("must be at most {URING_BATCH_WAIT_US_MAX}: every hop of a busy shard may wait this long"),
            ));
        }
        if self.conns_max == 0 {
            return Err(bad("conns_max", "must be at least 1"));
        }
        if self.shard_restart_period_ms == 0 {
            return Err(bad("shard_restart_period_ms", "must be at least 1"));
        }
        if self.shard_restart_backoff_ms > SHARD_RESTART_BACKOFF_MS_MAX {
            return Err(bad(
                "shard_restart_backoff_ms",
                format!("must be at most {SHARD_RESTART_BACKOFF_MS_MAX}"),
            ));
        }
        if self.listen_backlog == 0 {
            return Err(bad("listen_backlog", "must be at least 1"));
        }
        if let Some(tls) = self.tls_listen {
            // With SO_REUSEPORT both would bind, and the kernel would mix
            // TLS and plaintext clients on one port.
            if tls == self.listen && tls.port() != 0 {
                return Err(bad("tls_listen", "must differ from listen"));
            }
            if self.tls_cert.as_os_str().is_empty() {
                return Err(bad("tls_cert", "is required with tls_listen"));
            }
            if self.tls_key.as_os_str().is_empty() {
                return Err(bad("tls_key", "is required with tls_listen"));
            }
        }
        if let Some(ws) = self.ws_listen {
            // As for TLS: one port, one protocol.
            if ws.port() != 0 && (ws == self.listen || Some(ws) == self.tls_listen) {
                return Err(bad("ws_listen", "must differ from listen and tls_listen"));
            }
        }
        if let Some(mqtt) = self.mqtt_listen {
            let taken = [Some(self.listen), self.tls_listen, self.ws_listen];
            if mqtt.port() != 0 && taken.contains(&Some(mqtt)) {
                return Err(bad(
                    "mqtt_listen",
                    "must differ from listen, tls_listen and ws_listen",
                ));
            }
        }
        if let Some(mqtt_tls) = self.mqtt_tls_listen {
            let taken = [
                Some(self.listen),
                self.tls_listen,
                self.ws_listen,
                self.mqtt_listen,
            ];
            if mqtt_tls.port() != 0 && taken.contains(&Some(mqtt_tls)) {
                return Err(bad(
                    "mqtt_tls_listen",
                    "must differ from listen, tls_listen, ws_listen and mqtt_listen",
                ));
            }
            if self.tls_cert.as_os_str().is_empty() {
                return Err(bad("tls_cert", "is required with mqtt_tls_listen"));
            }
            if self.tls_key.as_os_str().is_empty() {
                return Err(bad("tls_key", "is required with mqtt_tls_listen"));
            }
        }
        if self.mqtt_listen.is_some() || self.mqtt_tls_listen.is_some() {
            // An MQTT packet id is 16 bits: the window must leave ids free.
            if self.deliver_inflight_max > usize::from(u16::MAX) - 1 {
                return Err(bad(
                    "deliver_inflight_max",
                    "must be below 65535 with mqtt_listen (MQTT packet ids are 16 bits)",
                ));
            }
        }
        if self.body_bytes_max > crate::store::BODY_BYTES_MAX {
            return Err(bad(
                "body_bytes_max",
                format!(
                    "the store takes bodies of at most {} bytes",
                    crate::store::BODY_BYTES_MAX
                ),
            ));
        }
        let mode = self.stats_socket_mode.0;
        if mode > 0o777 || mode & 0o600 != 0o600 {
            return Err(bad(
                "stats_socket_mode",
                format!("{mode:04o}: must be between 0600 and 0777 and include 0600 (the owner reads and writes)"),
            ));
        }
        if matches!(&self.stats_socket_group, Some(Group::Name(name)) if name.is_empty()) {
            return Err(bad("stats_socket_group", "must not be empty"));
        }
        if self.deliver_inflight_bytes_max < self.frame_bytes_max
            || self.deliver_inflight_bytes_max > DELIVER_INFLIGHT_BYTES_MAX
        {
            return Err(bad(
                "deliver_inflight_bytes_max",
                format!("must be between frame_bytes_max (one largest DELIVER) and {DELIVER_INFLIGHT_BYTES_MAX}"),
            ));
        }
        if self.deliver_inflight_max > DELIVER_INFLIGHT_MAX {
            return Err(bad(
                "deliver_inflight_max",
                format!("must be at most {DELIVER_INFLIGHT_MAX}"),
            ));
        }
        for (key, per_s, burst) in [
            (
                "sends_burst_max",
                self.sends_per_s_max,
                self.sends_burst_max,
            ),
            (
                "receipts_burst_max",
                self.receipts_per_s_max,
                self.receipts_burst_max,
            ),
            (
                "pings_burst_max",
                self.pings_per_s_max,
                self.pings_burst_max,
            ),
            (
                "presence_frames_burst_max",
                self.presence_frames_per_s_max,
                self.presence_frames_burst_max,
            ),
        ] {
            // Milli-tokens are counted in 32 bits.
            if per_s > 0 && !(1..=RATE_BURST_MAX).contains(&burst) {
                return Err(bad(
                    key,
                    format!("must be between 1 and {RATE_BURST_MAX} while its rate is on"),
                ));
            }
        }
        if self.rate_refusals_max > 0 && self.rate_refusals_window_ms == 0 {
            return Err(bad("rate_refusals_window_ms", "must be at least 1"));
        }
        if self.presence_subs_max > PRESENCE_SUBS_MAX {
            return Err(bad(
                "presence_subs_max",
                format!("must be at most {PRESENCE_SUBS_MAX}"),
            ));
        }
        if !(1..=GROUP_MEMBERS_MAX).contains(&self.group_members_max) {
            return Err(bad(
                "group_members_max",
                format!("must be between 1 and {GROUP_MEMBERS_MAX}"),
            ));
        }
        if self.groups_per_user_max == 0 {
            return Err(bad("groups_per_user_max", "must be at least 1"));
        }
        if self.delivered_recent_max > DELIVERED_RECENT_MAX {
            return Err(bad(
                "delivered_recent_max",
                format!("must be at most {DELIVERED_RECENT_MAX}"),
            ));
        }
        if self.addr_table_max == 0 {
            return Err(bad("addr_table_max", "must be at least 1"));
        }
        if let Err(crate::store::StoreError::Options { field, reason }) =
            self.log_options().validate()
        {
            return Err(bad(field, reason));
        }
        self.validate_push()?;
        if let Some(cluster) = &self.cluster {
            // A build without the NATS client cannot run the section: refused
            // here, before anything binds (Cargo.toml, `cluster` feature).
            if !cfg!(feature = "cluster") {
                return Err(bad("cluster", crate::cluster::NO_CLUSTER));
            }
            cluster.validate()?;
        }
        Ok(())
    }

    /// The `push_*` keys: checked whether or not `push_url` is set, so a
    /// bad value fails at boot, not when the URL is added.
    fn validate_push(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.push_url {
            // Likewise without the HTTP client (`push` feature).
            if !cfg!(feature = "push") {
                return Err(bad("push_url", crate::push::NO_PUSH));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(bad("push_url", "must start with http:// or https://"));
            }
            if self.push_secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(bad(
                    "push_secret",
                    "must be at least 16 bytes when push_url is set",
                ));
            }
        }
        if self.push_queue_len_max == 0 {
            return Err(bad("push_queue_len_max", "must be at least 1"));
        }
        if self.push_devices_max == 0 {
            return Err(bad("push_devices_max", "must be at least 1"));
        }
        if !(1..=PUSH_BATCH_MAX).contains(&self.push_batch_max) {
            return Err(bad(
                "push_batch_max",
                format!("must be between 1 and {PUSH_BATCH_MAX}"),
            ));
        }
        if self.push_retries_max > PUSH_RETRIES_MAX {
            return Err(bad(
                "push_retries_max",
                format!("must be at most {PUSH_RETRIES_MAX}"),
            ));
        }
        if self.push_retry_backoff_ms == 0 {
            return Err(bad("push_retry_backoff_ms", "must be at least 1"));
        }
        if self.push_timeout_ms == 0 {
            return Err(bad("push_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// The store options this configuration implies.
    pub fn log_options(&self) -> LogOptions {
        // A cluster's messages are durable in JetStream, which also bounds
        // them (docs/CLUSTER.md): the local store only holds them.
        let clustered = self.cluster.is_some();
        LogOptions {
            durability: self.store_durability(),
            queue_len_max: if clustered {
                usize::MAX
            } else {
                self.queue_len_max
            },
            segment_bytes_max: self.segment_bytes_max,
            disk_bytes_max: self.disk_bytes_max,
            disk_free_bytes_min: self.disk_free_bytes_min,
            compact_dead_ratio: self.compact_dead_ratio,
            repair: self.repair,
        }
    }

    /// What the local store does: `durability`, except in a cluster, where
    /// JetStream is the durable store and the local one runs in memory.
    pub fn store_durability(&self) -> Durability {
        if self.cluster.is_some() {
            Durability::Memory
        } else {
            self.durability
        }
    }

    /// Shard count after resolving 0 to the number of available cores.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.shards
        }
    }

    /// How long to wait before restart number `n` (1-based) of a shard
    /// within the restart period: the backoff, doubled per earlier restart.
    pub fn shard_restart_delay(&self, n: u32) -> Duration {
        let ms = self
            .shard_restart_backoff_ms
            .saturating_mul(1u64 << n.saturating_sub(1).min(20))
            .min(SHARD_RESTART_BACKOFF_MS_MAX);
        Duration::from_millis(ms)
    }

    /// `device_idle_days_max` in milliseconds; 0 = never.
    pub fn device_idle_ms(&self) -> u64 {
        (self.device_idle_days_max * 86_400_000.0) as u64
    }

    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The per-address limits of each shard's table.
    pub fn addr_limits(&self) -> crate::limit::addr::AddrLimits {
        crate::limit::addr::AddrLimits {
            logins_failed_max: self.addr_logins_failed_max,
            ban_ms: self.addr_ban_ms,
            conns_per_s_max: self.addr_conns_per_s_max,
            pending_max: self.addr_pending_max,
            addrs_max: self.addr_table_max,
        }
    }

    /// `login_timeout_ms` as a duration.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }

    /// True when the token secret is the public development one.
    pub fn uses_dev_secret(&self) -> bool {
        self.token_secret == DEV_TOKEN_SECRET
    }
}

/// Refuses more shards than one port's load-balancing group can hold
/// (`max`, see [`SHARDS_PER_PORT_MAX`]). `shards` is the configured value,
/// `resolved` what 0 turns into on this box.
fn check_shards_per_port(
    shards: usize,
    resolved: usize,
    max: Option<usize>,
) -> Result<(), ConfigError> {
    let Some(max) = max else { return Ok(()) };
    if resolved <= max {
        return Ok(());
    }
    let what = if shards == 0 {
        format!("shards = 0 means one per core, {resolved} here")
    } else {
        format!("{resolved} shards")
    };
    Err(bad(
        "shards",
        format!(
            "{what}, but SO_REUSEPORT_LB spreads connections over at most {max} listening sockets per address and port (one per shard); shards past {max} would never accept. Set shards = {max} or less"
        ),
    ))
}

/// The key of the `key = value` line containing byte `at`, if it has one.
fn key_at(text: &str, at: usize) -> Option<&str> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(key)
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = Config::from_toml("queue_len_max = \"lots\"").unwrap_err();
        assert!(e.to_string().contains("queue_len_max"), "{e}");
    }

    #[test]
    fn relation_body_within_frame() {
        let e = Config::from_toml(
            "frame_bytes_max = 1000\nbody_bytes_max = 990\nconn_out_bytes_max = 100000",
        )
        .unwrap_err();
        assert_eq!(e.key, "body_bytes_max");
    }

    #[test]
    fn ws_listen_needs_a_port_of_its_own() {
        let e = Config::from_toml("listen = \"127.0.0.1:5222\"\nws_listen = \"127.0.0.1:5222\"")
            .unwrap_err();
        assert_eq!(e.key, "ws_listen");
        let c = Config::from_toml(
            "ws_listen = \"127.0.0.1:5280\"\nws_origins = [\"https://chat.example\"]",
        )
        .unwrap();
        assert_eq!(c.ws_origins, ["https://chat.example"]);
    }

    #[test]
    fn mqtt_tls_listen_needs_the_certificate_and_a_port_of_its_own() {
        let e = Config::from_toml("mqtt_tls_listen = \"127.0.0.1:8883\"").unwrap_err();
        assert_eq!(e.key, "tls_cert");
        let e = Config::from_toml("mqtt_tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"")
            .unwrap_err();
        assert_eq!(e.key, "tls_key");
        let e = Config::from_toml(
            "mqtt_listen = \"127.0.0.1:1883\"\nmqtt_tls_listen = \"127.0.0.1:1883\"\n\
             tls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
        )
        .unwrap_err();
        assert_eq!(e.key, "mqtt_tls_listen");
        let c = Config::from_toml(
            "mqtt_tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
        )
        .unwrap();
        assert_eq!(c.mqtt_tls_listen, Some("127.0.0.1:8883".parse().unwrap()));
        assert_eq!(c.tls_listen, None);
    }

    #[test]
    fn mqtt_listen_needs_a_port_of_its_own_and_16_bit_packet_ids() {
        for other in ["", "ws_listen = \"127.0.0.1:5280\"\n"] {
            let mqtt = if other.is_empty() { "5222" } else { "5280" };
            let e = Config::from_toml(&format!(
                "listen = \"127.0.0.1:5222\"\n{other}mqtt_listen = \"127.0.0.1:{mqtt}\""
            ))
            .unwrap_err();
            assert_eq!(e.key, "mqtt_listen");
        }
        let e = Config::from_toml("mqtt_listen = \"127.0.0.1:1883\"\ndeliver_inflight_max = 65535")
            .unwrap_err();
        assert_eq!(e.key, "deliver_inflight_max");
        let c = Config::from_toml("mqtt_listen = \"127.0.0.1:1883\"").unwrap();
        assert_eq!(c.mqtt_listen, Some("127.0.0.1:1883".parse().unwrap()));
        // Without mqtt_listen the window may be larger.
        Config::from_toml("deliver_inflight_max = 65535").unwrap();
    }

    #[test]
    fn tls_listen_needs_cert_and_key() {
        let e = Config::from_toml("tls_listen = \"127.0.0.1:0\"").unwrap_err();
        assert_eq!(e.key, "tls_cert");
        let e =
            Config::from_toml("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"").unwrap_err();
        assert_eq!(e.key, "tls_key");
        let e = Config::from_toml(
            "listen = \"127.0.0.1:5222\"\ntls_listen = \"127.0.0.1:5222\"\ntls_cert = \"c\"\ntls_key = \"k\"",
        )
        .unwrap_err();
        assert_eq!(e.key, "tls_listen");
    }

    #[test]
    fn batch_wait_is_bounded() {
        Config::from_toml("uring_batch_wait_us = 10000").unwrap();
        let e = Config::from_toml("uring_batch_wait_us = 10001").unwrap_err();
        assert_eq!(e.key, "uring_batch_wait_us");
    }

    #[test]
    fn stats_socket_mode_is_octal_text_or_integer() {
        for text in [
            "stats_socket_mode = \"0660\"",
            "stats_socket_mode = \"660\"",
            "stats_socket_mode = \"0o660\"",
            "stats_socket_mode = 0o660",
            "stats_socket_mode = 432",
        ] {
            let c = Config::from_toml(text).unwrap();
            assert_eq!(c.stats_socket_mode, FileMode(0o660), "{text}");
            assert!(c.to_toml().contains("stats_socket_mode = \"0660\""));
        }
        for bad in [
            "\"0680\"", "\"rw\"", "\"\"", "0o1600", "0o400", "0o060", "-1", "true",
        ] {
            let e = Config::from_toml(&format!("stats_socket_mode = {bad}")).unwrap_err();
            assert_eq!(e.key, "stats_socket_mode", "{bad}: {e}");
        }
    }

    #[test]
    fn stats_socket_group_is_a_name_or_a_gid() {
        let c = Config::from_toml("stats_socket_group = \"tern\"").unwrap();
        assert_eq!(c.stats_socket_group, Some(Group::Name("tern".into())));
        let c = Config::from_toml("stats_socket_group = 1001").unwrap();
        assert_eq!(c.stats_socket_group, Some(Group::Id(1001)));
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        for bad in ["\"\"", "-1", "true"] {
            let e = Config::from_toml(&format!("stats_socket_group = {bad}")).unwrap_err();
            assert_eq!(e.key, "stats_socket_group", "{bad}: {e}");
        }
    }

    #[test]
    fn abuse_limits_are_checked_and_zero_is_off() {
        let e = Config::from_toml("sends_per_s_max = 5\nsends_burst_max = 0").unwrap_err();
        assert_eq!(e.key, "sends_burst_max");
        let e = Config::from_toml("pings_burst_max = 4000001").unwrap_err();
        assert_eq!(e.key, "pings_burst_max");
        let e = Config::from_toml("rate_refusals_window_ms = 0").unwrap_err();
        assert_eq!(e.key, "rate_refusals_window_ms");
        let e = Config::from_toml("addr_table_max = 0").unwrap_err();
        assert_eq!(e.key, "addr_table_max");
        let e = Config::from_toml("delivered_recent_max = 65537").unwrap_err();
        assert_eq!(e.key, "delivered_recent_max");
        let off = "sends_per_s_max = 0\nsends_burst_max = 0\nreceipts_per_s_max = 0\n\
                   receipts_burst_max = 0\npings_per_s_max = 0\npings_burst_max = 0\n\
                   rate_refusals_max = 0\nrate_refusals_window_ms = 0\n\
                   delivered_recent_max = 0\naddr_logins_failed_max = 0\naddr_ban_ms = 0\n\
                   addr_conns_per_s_max = 0\naddr_pending_max = 0\npending_max = 0";
        Config::from_toml(off).expect("0 turns each limit off");
    }

    #[test]
    fn inflight_bytes_hold_a_frame() {
        let e = Config::from_toml("deliver_inflight_bytes_max = 1000").unwrap_err();
        assert_eq!(e.key, "deliver_inflight_bytes_max");
    }

    #[test]
    fn shards_capped_by_the_port_group() {
        check_shards_per_port(256, 256, Some(256)).unwrap();
        check_shards_per_port(0, 256, Some(256)).unwrap();
        check_shards_per_port(1024, 1024, None).unwrap();
        let e = check_shards_per_port(257, 257, Some(256)).unwrap_err();
        assert_eq!(e.key, "shards");
        assert!(e.message.contains("SO_REUSEPORT_LB"), "{e}");
        assert!(e.message.contains("Set shards = 256 or less"), "{e}");
        let e = check_shards_per_port(0, 300, Some(256)).unwrap_err();
        assert!(e.message.contains("one per core, 300 here"), "{e}");
    }

    /// A build without the network clients (`cargo build
    /// --no-default-features`) refuses at start what needs them, naming the
    /// feature; a default build takes the same text.
    #[test]
    fn cluster_and_push_url_need_their_features() {
        let cluster = "[cluster]\nnode_id = \"a\"\nnats_urls = [\"nats://127.0.0.1:4222\"]\n\
                       public_addr = \"127.0.0.1:5222\"";
        let result = Config::from_toml(cluster);
        if cfg!(feature = "cluster") {
            assert_eq!(result.unwrap().cluster.unwrap().node_id, "a");
        } else {
            assert_eq!(
                result.unwrap_err().to_string(),
                "`cluster`: this build has no cluster support: rebuild with --features cluster"
            );
        }
        let push = "push_url = \"http://127.0.0.1:8080/push\"\npush_secret = \"0123456789abcdef\"";
        let result = Config::from_toml(push);
        if cfg!(feature = "push") {
            assert!(result.unwrap().push_url.is_some());
        } else {
            assert_eq!(
                result.unwrap_err().to_string(),
                "`push_url`: this build has no push support: rebuild with --features push"
            );
        }
    }

    /// The cap is enforced by `validate` on FreeBSD only.
    #[test]
    fn shards_257_on_this_os() {
        let result = Config::from_toml("shards = 257");
        if cfg!(target_os = "freebsd") {
            let e = result.unwrap_err();
            assert_eq!(e.key, "shards");
            assert!(
                e.to_string()
                    .starts_with("`shards`: 257 shards, but SO_REUSEPORT_LB"),
                "{e}"
            );
        } else {
            result.unwrap();
        }
        Config::from_toml("shards = 256").unwrap();
    }

    #[test]
    fn out_cap_holds_a_frame() {
        let e = Config::from_toml("conn_out_bytes_max = 100").unwrap_err();
        assert_eq!(e.key, "conn_out_bytes_max");
    }
}
