//! `tern-loadgen`: Tern's load generator.
//!
//! One process opens up to millions of connections (io_uring direct
//! descriptors on Linux, so the open-files limit does not bind), logs them
//! in, keeps them alive, sends chat messages on a fixed schedule and measures
//! latency from each message's intended send time (no coordinated omission),
//! and tracks every message to report loss, duplicates and reordering.
//!
//! Subcommands: `connect`, `chat`, `offline`, `storm`, and `sink` (a
//! connection sink for the "one process opens 1,000,000 connections" check).
//! Exit status: 0 fine, 1 messages lost or reordered, 2 bad usage or setup,
//! 3 connections failed or a storm did not recover. Messages not delivered
//! within the drain window but not proven lost do not change it.

mod addr;
mod driver;
mod engine;
mod group;
mod ledger;
mod report;
mod run;
mod saturate;
mod sched;
mod sink;
mod sysinfo;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit status: everything as expected.
pub const EXIT_OK: i32 = 0;
/// Exit status: messages were lost (ACKed, and missing after their recipient
/// drained its queue to empty), reordered or corrupted.
pub const EXIT_LOST: i32 = 1;
/// Exit status: bad arguments or the engine could not start.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: connections failed, or a storm did not recover in time.
pub const EXIT_CONN_FAILED: i32 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "tern-loadgen",
    version,
    about = "Load generator for the Tern messaging server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ramp to --conns logged-in connections, hold them (keepalive PINGs), close.
    Connect(ConnectArgs),
    /// Hold connections and send --msg-rate messages/s between random pairs.
    Chat(ChatArgs),
    /// Send to offline users, then log them in and check every message arrives in order.
    Offline(OfflineArgs),
    /// Reset every connection at once and measure how long until all are back.
    Storm(StormArgs),
    /// Accept and hold connections (io_uring multishot accept, direct descriptors).
    Sink(sink::SinkArgs),
    /// Closed loop, window stepped: highest msgs/s with all four ticks under a deliver p99 bound.
    Saturate(saturate::SaturateArgs),
    /// One sender, one group of --members (protocol v2): msgs/s, delivery p50/p99 and server CPU per delivered copy; --one-to-one for the 1:1 baseline.
    Group(group::GroupArgs),
}

/// The protocol spoken on each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Tern's own protocol (docs/PROTOCOL.md), version 2.
    Tern,
    /// MQTT 3.1.1, QoS 1: each user publishes to `u/<to>` and subscribes
    /// to its own `u/<id>` (docs/MQTT.md; loadgen/README.md, "MQTT").
    Mqtt,
}

/// Which engine drives the sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// io_uring with direct descriptors (Linux).
    Uring,
    /// mio (epoll/kqueue) with ordinary sockets; bounded by the open-files limit.
    Poll,
}

#[cfg(target_os = "linux")]
const ENGINE_DEFAULT: &str = "uring";
#[cfg(not(target_os = "linux"))]
const ENGINE_DEFAULT: &str = "poll";

#[cfg(target_os = "linux")]
const SOURCE_DEFAULT: &str = "127.0.0.2-127.0.0.250";
// Other systems have only 127.0.0.1 on the loopback interface by default.
#[cfg(not(target_os = "linux"))]
const SOURCE_DEFAULT: &str = "127.0.0.1";

fn duration(s: &str) -> Result<Duration, String> {
    sched::parse_duration(s)
}

fn rate(s: &str) -> Result<f64, String> {
    sched::parse_rate(s)
}

fn bytes(s: &str) -> Result<u64, String> {
    sysinfo::parse_bytes(s)
}

/// Options every client scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server addresses: ADDR:PORT[,ADDR:PORT...] or ADDR:PORT-PORT.
    #[arg(long, default_value = "127.0.0.1:5222")]
    pub server: String,
    /// Source addresses, round-robin: a range A-B and/or a comma list.
    #[arg(long, default_value = SOURCE_DEFAULT)]
    pub source: String,
    /// Connections (users) to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: u64,
    /// Connections opened per second, e.g. 50000/s (0 = as fast as possible).
    #[arg(long, default_value = "10000/s", value_parser = rate)]
    pub rate: f64,
    /// Open connections exactly on the tick instead of jittered within it.
    #[arg(long)]
    pub no_jitter: bool,
    /// I/O engine.
    #[arg(long, value_enum, default_value = ENGINE_DEFAULT)]
    pub engine: EngineKind,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Connects and logins in progress per worker, at most.
    #[arg(long, default_value_t = 10_000)]
    pub inflight_max: u32,
    /// Give up a connect after this long.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Stop opening connections when MemAvailable falls below this.
    #[arg(long, default_value = "3GiB", value_parser = bytes)]
    pub mem_floor: u64,
    /// Speak TLS 1.3 to the server (its `tls_listen` port); needs --tls-ca
    /// or --tls-insecure.
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Accept any server certificate (tests and benchmarks only).
    #[arg(long)]
    pub tls_insecure: bool,
    /// Name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
    /// Speak WebSocket to the server (its `ws_listen` port): the HTTP
    /// upgrade, then Tern frames in masked binary messages. With `--tls`,
    /// WebSocket over TLS (same as `--wss`).
    #[arg(long)]
    pub ws: bool,
    /// Speak WebSocket over TLS 1.3 to the server's `tls_listen` port
    /// (`wss://`): `--ws --tls` in one flag; needs --tls-ca or --tls-insecure.
    #[arg(long)]
    pub wss: bool,
    /// `Origin` header of the WebSocket upgrade (none without it).
    #[arg(long)]
    pub ws_origin: Option<String>,
    /// Protocol spoken to the server: `tern` (its own, `listen`/`tls_listen`
    /// port) or `mqtt` (MQTT 3.1.1 QoS 1: Tern's `mqtt_listen` port, or any
    /// MQTT broker with --broker generic). `connect`, `chat` and `storm`.
    #[arg(long, value_enum, default_value = "tern")]
    pub protocol: Protocol,
    /// With --protocol mqtt, the broker: `tern` (user name = user id,
    /// password = token) or `generic` (no user name or password: a broker
    /// with authentication off, such as mosquitto with allow_anonymous).
    #[arg(long, value_enum, default_value = "tern")]
    pub broker: engine::mqtt::Broker,
    /// Token secret (default: the server's development secret).
    #[arg(long, default_value = tern::config::DEV_TOKEN_SECRET, env = "TERN_TOKEN_SECRET")]
    pub secret: String,
    /// User id of the first connection; connection i is user user_base + i.
    #[arg(long, default_value_t = 1_000_000)]
    pub user_base: u64,
    /// Keepalive: PING every logged-in connection once per this interval
    /// (e.g. 60s, a phone's keepalive), spread evenly over the interval in
    /// 10 ms steps, not all at once (0 = never).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub ping_every: Duration,
    /// After LOGIN_OK, each connection watches this many users' presence
    /// (SUBSCRIBE to the next N users of the run, wrapping; protocol v2).
    #[arg(long, default_value_t = 0)]
    pub subscribe: u32,
    /// Give up waiting for the ramp after this long (0 = twice the ramp time plus 60 s).
    #[arg(long, default_value = "0", value_parser = duration)]
    pub ramp_timeout: Duration,
    /// Hard limit on the whole run; everything is closed when it passes.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub max_time: Duration,
    /// Write the full report (percentile spectra, counters, command line) here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No per-second progress lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// uring: fixed-file slots per ring (0 = RLIMIT_NOFILE - 64).
    #[arg(long, default_value_t = 0)]
    pub ring_slots: u32,
    /// uring: provided receive buffers per ring (power of two).
    #[arg(long, default_value_t = 1024)]
    pub recv_bufs: u16,
    /// uring: bytes per provided receive buffer.
    #[arg(long, default_value_t = 1024)]
    pub recv_buf_bytes: u32,
}

/// `connect` options.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Hold the connections this long before closing.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub hold: Duration,
    /// Raw TCP connections: no LOGIN, no receive (for `sink`).
    #[arg(long)]
    pub raw: bool,
    /// Connections per user, each logging in as another device of it
    /// (`v2.` device tokens): --conns 1000 --devices 2 is 500 users with
    /// 2 devices online each. 1: one user per connection (`v1.` tokens).
    #[arg(long, default_value_t = 1)]
    pub devices: u64,
}

/// `chat` options.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Messages per second over all connections.
    #[arg(long, default_value = "1000/s", value_parser = rate)]
    pub msg_rate: f64,
    /// How long to send.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub duration: Duration,
    /// Message body bytes (at least 20: run id, message number, sender).
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// After the last send, wait this long at most for ACKs, deliveries and receipts.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub drain: Duration,
    /// After the drain window: recipients still missing ACKed messages log in
    /// again and drain their queues, for at most this long (0 = skip; the
    /// missing messages are then reported unverified, never lost).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub final_drain: Duration,
    /// Wait this long after the ramp before sending.
    #[arg(long, default_value = "0", value_parser = duration)]
    pub settle: Duration,
    /// Most messages in one run (bounds the ledger: 2 bytes per message).
    #[arg(long, default_value_t = 100_000_000)]
    pub msgs_max: u64,
    /// Cut connections at random while sending, this many per second over
    /// all connections (0 = never): each cut resets the connection, which
    /// reconnects and logs in again; every user then runs the client's
    /// session logic (outbox resent after reconnects, duplicate filter).
    #[arg(long, default_value = "0", value_parser = rate)]
    pub cut_rate: f64,
}

/// `offline` options.
#[derive(Args, Debug)]
pub struct OfflineArgs {
    /// --conns senders; as many receivers (users after them) start offline.
    #[command(flatten)]
    pub common: Common,
    /// Messages each sender sends to its offline receiver (the server queues
    /// at most queue_len_max, default 1000, per user).
    #[arg(long, default_value_t = 10)]
    pub per_user: u64,
    /// Messages per second over all senders.
    #[arg(long, default_value = "5000/s", value_parser = rate)]
    pub msg_rate: f64,
    /// Message body bytes (at least 20).
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// Wait this long at most for ACKs, and again for deliveries.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub drain: Duration,
    /// After the drain window: receivers still missing ACKed messages log in
    /// again and drain their queues, for at most this long (0 = skip).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub final_drain: Duration,
    /// Log in only the first N receivers after the sends (default: all); the
    /// others stay offline for the whole run, so their messages are still
    /// queued when the drain window closes and arrive in the final drain.
    #[arg(long)]
    pub login_receivers: Option<u64>,
}

/// `storm` options.
#[derive(Args, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Hold after the ramp and between storms.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub hold: Duration,
    /// Reconnect delay spread: `on` (5s), `off` (reconnect at once), or a duration.
    #[arg(long, default_value = "on")]
    pub jitter: String,
    /// Storms in a row.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// A storm that has not recovered after this long counts as failed.
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub storm_timeout: Duration,
}

/// Parses `--jitter`: on, off, or a duration.
pub fn parse_jitter(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "on" | "yes" | "true" => Ok(Duration::from_secs(5)),
        "off" | "no" | "false" => Ok(Duration::ZERO),
        other => sched::parse_duration(other),
    }
}

fn main() {
    let cli = Cli::parse();
    let argv: Vec<String> = std::env::args().collect();
    let status = match cli.cmd {
        Command::Connect(a) => run::connect(a, &argv),
        Command::Chat(a) => run::chat(a, &argv),
        Command::Offline(a) => run::offline(a, &argv),
        Command::Storm(a) => run::storm(a, &argv),
        Command::Sink(a) => sink::run(a, &argv),
        Command::Saturate(a) => saturate::run(a, &argv).map_err(Into::into),
        Command::Group(a) => group::run(a),
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tern-loadgen: {e}");
            EXIT_USAGE
        }
    };
    std::process::exit(status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "tern-loadgen",
            "chat",
            "--conns",
            "10",
            "--msg-rate",
            "50/s",
            "--duration",
            "2s",
        ])
        .unwrap();
        match cli.cmd {
            Command::Chat(a) => {
                assert_eq!(a.common.conns, 10);
                assert_eq!(a.msg_rate, 50.0);
                assert_eq!(a.duration, Duration::from_secs(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jitter_values() {
        assert_eq!(parse_jitter("on").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_jitter("off").unwrap(), Duration::ZERO);
        assert_eq!(parse_jitter("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_jitter("sometimes").is_err());
    }
}
