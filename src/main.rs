//! The `tern` binary: `serve`, `token`, `stats`, `upgrade`, `check-config`,
//! `store reshard`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tern::config::Config;
use tern::server::{Handover, Server};
use tern::shard::Next;
use tern::upgrade::{Successor, Taker, UpgradeInfo};

mod demo;
mod demo_web;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tern: a messaging edge server for millions of mostly idle connections.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. With no arguments it uses the embedded defaults:
    /// listen on 127.0.0.1:5222, stats socket ./tern.sock, development token secret.
    Serve(Box<ServeArgs>),
    /// Mint a login token for a user with the configured secret.
    Token(TokenArgs),
    /// Ask a running server's stats socket (default command: `show info`).
    Stats(StatsArgs),
    /// Live upgrade: the running server hands its listening sockets and
    /// data directory to a new process of BINARY (default: its own path,
    /// re-read from disk), started with the same arguments. Logged-in
    /// plaintext connections (Tern, WebSocket, MQTT) move to it as they
    /// are (either backend; io_uring needs Linux 6.8); the others get
    /// BYE(upgrade) and reconnect to it
    /// (TLS ones resume their sessions: the ticket keys pass); no connect is
    /// refused, nothing acknowledged is lost. A successor that fails (bad
    /// configuration, a crash) leaves the old process serving. Waits for
    /// the outcome: exit status 0 once the new process serves, 1 (with the
    /// reason) if the old one goes on. The same as SIGUSR2 or the stats
    /// command `upgrade [BINARY]`.
    Upgrade(UpgradeArgs),
    /// Validate a configuration file; exits non-zero naming the bad key.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Offline maintenance of a data directory (the server must be stopped).
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Re-home every queued message for another shard count.
    ///
    /// A data directory records the shard count its messages are homed for
    /// (DATA_DIR/tern.meta). `tern serve` refuses an explicit --shards that
    /// differs from it while messages are queued; run this, with the server
    /// stopped, to move every queued message to its home shard under the
    /// new count (server ids, senders, times, bodies and each user's order
    /// are kept), then start with the new --shards (or --shards 0).
    ///
    /// Crash-safe: the new layout is built beside the old one and switched
    /// in atomically; if the command is killed, run it again with the same
    /// arguments and it finishes the job, losing and duplicating nothing.
    /// Refused while a server holds the data directory's lock. Progress goes
    /// to stderr; exit status 0 on success (also when there is nothing to do),
    /// 1 with a message on error.
    Reshard(ReshardArgs),
}

#[derive(Args)]
struct ReshardArgs {
    /// The data directory (`data_dir` of the server).
    #[arg(long)]
    data_dir: PathBuf,
    /// The new shard count (1 to 1024).
    #[arg(long)]
    shards: usize,
    /// Skip corrupt records in the old logs instead of stopping (their
    /// messages are lost), as `tern serve --repair` does.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Read the configuration from this TOML file; flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// After start-up, run two built-in clients through a message exchange
    /// and print the ticks, to show the server working. It keeps serving,
    /// and serves the web chat page at --demo-http (with a WebSocket
    /// listener, 127.0.0.1:5280 unless --ws-listen is given, and a
    /// DEMO-ONLY endpoint that mints tokens for users 1001-1004).
    #[arg(long)]
    demo: bool,
    /// Where --demo serves the web chat page (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5380", requires = "demo")]
    demo_http: SocketAddr,
    #[command(flatten)]
    overrides: Overrides,
}

/// One flag per configuration key (see `--print-config` for the defaults).
#[derive(Args)]
struct Overrides {
    /// Client listener address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Shards (event-loop threads); 0 = the count recorded in the data
    /// directory, else one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// I/O backend: auto, uring or poll.
    #[arg(long)]
    io: Option<tern::io::Backend>,
    /// Pin shard N to core N (Linux).
    #[arg(long)]
    pin_cores: bool,
    /// io_uring: let completions gather up to this many µs on a busy shard (0 = off).
    #[arg(long)]
    uring_batch_wait_us: Option<u32>,
    /// Stats socket path.
    #[arg(long)]
    stats_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TLS listener address (needs --tls-cert and --tls-key).
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// WebSocket listener address (plaintext, for browsers).
    #[arg(long)]
    ws_listen: Option<SocketAddr>,
    /// MQTT 3.1.1/5.0 listener address (plaintext; docs/MQTT.md).
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS listener address (TLS 1.3, the --tls-cert and
    /// --tls-key certificate; docs/MQTT.md).
    #[arg(long)]
    mqtt_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listeners.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Token secret (prefer the environment variable).
    #[arg(long, env = "TERN_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// URL push notices for offline devices are POSTed to (http:// or https://).
    #[arg(long)]
    push_url: Option<String>,
    /// Key of the push POSTs' HMAC signature (prefer the environment variable).
    #[arg(long, env = "TERN_PUSH_SECRET", hide_env_values = true)]
    push_secret: Option<String>,
    /// Largest client frame, bytes.
    #[arg(long)]
    frame_bytes_max: Option<usize>,
    /// Largest message body, bytes.
    #[arg(long)]
    body_bytes_max: Option<usize>,
    /// Messages held per user (offline and unacknowledged).
    #[arg(long)]
    queue_len_max: Option<usize>,
    /// Unsent output bytes per connection before BYE(slow).
    #[arg(long)]
    conn_out_bytes_max: Option<usize>,
    /// DELIVERs outstanding per connection before the rest wait in the queue.
    #[arg(long)]
    deliver_inflight_max: Option<usize>,
    /// Close a logged-in connection silent this long, ms.
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Close a connection that has not logged in within this time, ms.
    #[arg(long)]
    login_timeout_ms: Option<u64>,
    /// Slots per cross-shard ring.
    #[arg(long)]
    ring_slots: Option<usize>,
    /// Connections per process at most.
    #[arg(long)]
    conns_max: Option<usize>,
    /// New connections per second per shard at most (0 = no limit).
    #[arg(long)]
    accept_rate_per_s_max: Option<u32>,
    /// listen(2) backlog.
    #[arg(long)]
    listen_backlog: Option<u32>,
    /// Graceful shutdown flush time, ms.
    #[arg(long)]
    shutdown_grace_ms: Option<u64>,
    /// Directory of the message logs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// fsync (default), os or memory: when a message counts as stored.
    #[arg(long)]
    durability: Option<tern::store::Durability>,
    /// Log segment size, bytes.
    #[arg(long)]
    segment_bytes_max: Option<u64>,
    /// Disk budget per shard log, bytes (0 = unlimited).
    #[arg(long)]
    disk_bytes_max: Option<u64>,
    /// Dead share past which a segment is rewritten (0.0-1.0).
    #[arg(long)]
    compact_dead_ratio: Option<f64>,
    /// Skip corrupt records in the middle of a log instead of refusing to start.
    #[arg(long)]
    repair: bool,
    /// Stats socket permission bits, octal (default 0600).
    #[arg(long)]
    stats_socket_mode: Option<tern::config::FileMode>,
    /// Stats socket group: a name or a gid (default: the process's group).
    #[arg(long)]
    stats_socket_group: Option<tern::config::Group>,
    /// Retry a listen address held by nobody accepting (a killed server's) this long, ms.
    #[arg(long)]
    listen_retry_ms: Option<u64>,
    /// Bytes of DELIVERs outstanding per connection before the rest wait in the queue.
    #[arg(long)]
    deliver_inflight_bytes_max: Option<usize>,
    /// Free space to leave on the data dir's filesystem, bytes; SENDs past it
    /// get storage_full (0 = auto: 5% of the filesystem, at most 64 MiB).
    #[arg(long)]
    disk_free_bytes_min: Option<u64>,
    /// Restarts of one shard within --shard-restart-period-ms before the
    /// process exits with status 70.
    #[arg(long)]
    shard_restarts_max: Option<u32>,
    /// Window of --shard-restarts-max, ms.
    #[arg(long)]
    shard_restart_period_ms: Option<u64>,
    /// First delay before a shard restart, ms (doubles per restart, at most 10 s).
    #[arg(long)]
    shard_restart_backoff_ms: Option<u64>,
    /// SENDs per second per user (0 = no limit).
    #[arg(long)]
    sends_per_s_max: Option<u32>,
    /// SENDs at once per user before the rate applies.
    #[arg(long)]
    sends_burst_max: Option<u32>,
    /// READ and DELIVERED frames per second per user (0 = no limit).
    #[arg(long)]
    receipts_per_s_max: Option<u32>,
    /// READ and DELIVERED frames at once per user before the rate applies.
    #[arg(long)]
    receipts_burst_max: Option<u32>,
    /// PINGs per second per user (0 = no limit).
    #[arg(long)]
    pings_per_s_max: Option<u32>,
    /// PINGs at once per user before the rate applies.
    #[arg(long)]
    pings_burst_max: Option<u32>,
    /// Rate refusals within --rate-refusals-window-ms before BYE(rate_limited) (0 = never).
    #[arg(long)]
    rate_refusals_max: Option<u32>,
    /// Window of --rate-refusals-max, ms.
    #[arg(long)]
    rate_refusals_window_ms: Option<u64>,
    /// Messages remembered per user as delivered in this login, for READ checks (0 = no check).
    #[arg(long)]
    delivered_recent_max: Option<usize>,
    /// Failed logins per address per minute per shard before a ban (0 = no limit).
    #[arg(long)]
    addr_logins_failed_max: Option<u32>,
    /// How long a banned address is refused, ms.
    #[arg(long)]
    addr_ban_ms: Option<u64>,
    /// New connections per second per address per shard (0 = no limit).
    #[arg(long)]
    addr_conns_per_s_max: Option<u32>,
    /// Connections not logged in per address per shard (0 = no limit).
    #[arg(long)]
    addr_pending_max: Option<u32>,
    /// Addresses tracked per shard for the per-address limits.
    #[arg(long)]
    addr_table_max: Option<usize>,
    /// Connections not logged in, whole process (0 = no limit).
    #[arg(long)]
    pending_max: Option<usize>,
    /// Members a group may have.
    #[arg(long)]
    group_members_max: Option<usize>,
    /// Groups homed on one shard a user may be a member of.
    #[arg(long)]
    groups_per_user_max: Option<usize>,
}

impl Overrides {
    fn apply(self, c: &mut Config) {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            listen,
            shards,
            io,
            uring_batch_wait_us,
            stats_socket,
            token_secret,
            frame_bytes_max,
            body_bytes_max,
            queue_len_max,
            group_members_max,
            groups_per_user_max,
            conn_out_bytes_max,
            deliver_inflight_max,
            idle_timeout_ms,
            login_timeout_ms,
            ring_slots,
            conns_max,
            accept_rate_per_s_max,
            listen_backlog,
            shutdown_grace_ms,
            data_dir,
            durability,
            segment_bytes_max,
            disk_bytes_max,
            compact_dead_ratio,
            stats_socket_mode,
            listen_retry_ms,
            deliver_inflight_bytes_max,
            disk_free_bytes_min,
            shard_restarts_max,
            shard_restart_period_ms,
            shard_restart_backoff_ms,
            sends_per_s_max,
            sends_burst_max,
            receipts_per_s_max,
            receipts_burst_max,
            pings_per_s_max,
            pings_burst_max,
            rate_refusals_max,
            rate_refusals_window_ms,
            delivered_recent_max,
            addr_logins_failed_max,
            addr_ban_ms,
            addr_conns_per_s_max,
            addr_pending_max,
            addr_table_max,
            pending_max
        );
        if self.stats_socket_group.is_some() {
            c.stats_socket_group = self.stats_socket_group;
        }
        c.repair |= self.repair;
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        if self.tls_listen.is_some() {
            c.tls_listen = self.tls_listen;
        }
        if self.ws_listen.is_some() {
            c.ws_listen = self.ws_listen;
        }
        if self.mqtt_listen.is_some() {
            c.mqtt_listen = self.mqtt_listen;
        }
        if self.mqtt_tls_listen.is_some() {
            c.mqtt_tls_listen = self.mqtt_tls_listen;
        }
        if self.push_url.is_some() {
            c.push_url = self.push_url;
        }
        if self.push_secret.is_some() {
            c.push_secret = self.push_secret;
        }
        if let Some(path) = &self.tls_cert {
            c.tls_cert = path.clone();
        }
        if let Some(path) = &self.tls_key {
            c.tls_key = path.clone();
        }
        c.pin_cores |= self.pin_cores;
    }
}

#[derive(Args)]
struct TokenArgs {
    /// User id (a positive integer).
    #[arg(long)]
    user: u64,
    /// Device of the user (0 to 4294967295): mints a `v2.` token naming it.
    /// Without it the token is a `v1.` one, which logs in as device 0.
    #[arg(long)]
    device: Option<u32>,
    /// Lifetime: 90s, 15m, 24h, 7d or plain seconds.
    #[arg(long, default_value = "24h", value_parser = tern::token::parse_ttl)]
    ttl: std::time::Duration,
    /// Take the secret from this configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The secret (prefer the environment variable).
    #[arg(long, env = "TERN_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
}

#[derive(Args)]
struct UpgradeArgs {
    /// Stats socket path of the running server.
    #[arg(long, short, default_value = "tern.sock")]
    socket: PathBuf,
    /// The new binary (default: the running server's own path).
    #[arg(long)]
    binary: Option<PathBuf>,
}

#[derive(Args)]
struct StatsArgs {
    /// Stats socket path.
    #[arg(long, short, default_value = "tern.sock")]
    socket: PathBuf,
    /// Command: `help` lists them (`show info`, `show user U`, `kick user U`,
    /// `ban user U`, `drain`, ...).
    command: Vec<String>,
}

fn main() -> ExitCode {
    // Without RUST_LOG every record reaches the logger and the level is
    // set globally, so that `set log level` on the stats socket can raise
    // it as well as lower it; RUST_LOG's filter stays the ceiling.
    let env = env_logger::Env::default();
    let rust_log = std::env::var_os(env_logger::DEFAULT_FILTER_ENV).is_some();
    env_logger::Builder::from_env(env.default_filter_or("trace")).init();
    if !rust_log {
        log::set_max_level(log::LevelFilter::Info);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
        Command::Stats(args) => stats(args),
        Command::Upgrade(args) => upgrade(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Store(StoreCommand::Reshard(args)) => reshard(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn load(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    })
}

fn serve(args: ServeArgs) -> Result<()> {
    // Started by a live upgrade: the hand-over socket is in the environment.
    let taker = Taker::from_env()?;
    let mut config = load(args.config.as_deref())?;
    args.overrides.apply(&mut config);
    if args.demo && config.ws_listen.is_none() {
        // The demo page needs a WebSocket listener.
        config.ws_listen = Some(SocketAddr::from(([127, 0, 0, 1], 5280)));
    }
    config.validate()?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    if config.uses_dev_secret() {
        log::warn!(
            "USING THE PUBLIC DEVELOPMENT TOKEN SECRET: anyone can log in as anyone. \
             Set token_secret in the config or TERN_TOKEN_SECRET for any real use."
        );
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])?;
    let secret = config.token_secret.clone();
    let faults = tern::store::fault::inject_from_env()?;
    if faults > 0 {
        log::warn!("TERN_FAILPOINTS: {faults} injected store faults (testing only)");
    }
    // The successor's own path, read now: a binary replaced on disk later
    // is what the next upgrade starts.
    let binary = std::env::current_exe()?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (handover, taker) = match taker {
        None => (Handover::default(), None),
        Some(taker) => {
            // The configuration is valid: take the listeners, wait for the
            // data directory, then start on them.
            let began = Instant::now();
            let (generation, listeners, tickets) = taker.hello()?;
            taker.released()?;
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() };
            let info = UpgradeInfo::taken_over(
                generation + 1,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                // Until the carried connections are all in (`info.end` below).
                format!("{TAKING_OVER} from pid {parent} (generation {generation})"),
            );
            let handover = Handover {
                listeners: Some(listeners),
                info: Arc::new(info),
                tickets,
            };
            (handover, Some((taker, parent, began)))
        }
    };
    let info = handover.info.clone();
    // SIGUSR2 is caught from here on (`signals` above) and handled once the
    // wait below runs: the stats socket, up as soon as the server starts,
    // may take `upgrade` at once.
    info.enable_signal();
    let rollback_config = config.clone();
    let frame_bytes_max = config.frame_bytes_max;
    let mut server = Server::start_with(config, handover)?;
    if let Some((taker, parent, began)) = taker {
        // Serving already: the carried connections come in now, each
        // installed on its user's home shard as it arrives.
        let generation = info.generation;
        let carried = taker.take_carried(frame_bytes_max, |fd, c| server.adopt(fd, c));
        let last = match carried {
            Ok(n) => format!(
                "took over from pid {parent} (generation {}) in {} ms, {n} connections carried",
                generation - 1,
                began.elapsed().as_millis()
            ),
            Err(why) => {
                // The old process is gone or failed: this one serves on;
                // the connections that did not come reconnect.
                log::error!("upgrade: {why}");
                format!(
                    "took over from pid {parent} (generation {}), carrying failed: {why}",
                    generation - 1
                )
            }
        };
        log::info!("upgrade: {last}");
        info.end(last);
        // systemd (Type=notify, NotifyAccess=all) follows the service to
        // this process before the old one exits.
        ready(&format!("MAINPID={}\nREADY=1", std::process::id()));
        if let Err(why) = taker.serving() {
            log::error!("upgrade: {why}");
        }
        log::info!("upgrade: generation {generation} serving");
    } else {
        ready("READY=1");
    }
    // A shard that gives up past its restart intensity ends the wait below.
    let handle = signals.handle();
    let closer = handle.clone();
    server.on_fatal(move || closer.close());
    if args.demo {
        let addr = server.local_addr();
        if let Some(ws_addr) = server.ws_addr() {
            let page = demo_web::spawn(args.demo_http, secret.as_bytes(), ws_addr.port())?;
            log::info!("demo chat page at http://{page}/ (open it in two browser windows)");
        }
        std::thread::spawn(move || demo::run(addr, secret.as_bytes()));
    }
    for signal in signals.forever() {
        if signal == signal_hook::consts::SIGUSR2 {
            let binary = info.begin().unwrap_or_else(|| binary.clone());
            match hand_over(server, &binary, &argv, &info) {
                Ok(pid) => {
                    log::info!("upgrade: pid {pid} serves now; this process exits");
                    return Ok(());
                }
                Err(failed) => {
                    let (kept, why) = *failed;
                    log::error!("upgrade to {} failed: {why}", binary.display());
                    server = match kept {
                        Kept::Serving(server) => *server,
                        Kept::Listeners(listeners, tickets) => {
                            log::error!("upgrade: starting again on the same listeners");
                            // Carried connections that did not go were
                            // closed: their clients reconnect.
                            let handover = Handover {
                                listeners: Some(listeners),
                                info: info.clone(),
                                // Tickets this process gave out resume.
                                tickets,
                            };
                            let server = Server::start_with(rollback_config.clone(), handover)?;
                            let closer = handle.clone();
                            server.on_fatal(move || closer.close());
                            // The main process again, should the successor
                            // have said otherwise before it failed.
                            ready(&format!("MAINPID={}\nREADY=1", std::process::id()));
                            server
                        }
                    };
                    info.end(format!("failed: {why}; this process serves on"));
                }
            }
            continue;
        }
        if signal == signal_hook::consts::SIGHUP {
            // Reload the TLS certificate; a bad file keeps the old one.
            match server.reload_tls() {
                Ok(what) => log::info!("SIGHUP: {what}"),
                Err(e) => {
                    log::error!("SIGHUP: TLS reload failed, keeping the old certificate: {e}")
                }
            }
            continue;
        }
        log::info!("signal {signal}: shutting down");
        ready("STOPPING=1");
        break;
    }
    server.shutdown();
    let fatal = server.fatal();
    server.join();
    if let Some(reason) = fatal {
        log::error!("stopped: {reason}");
        std::process::exit(tern::supervisor::EXIT_SHARD_DOWN.into());
    }
    log::info!("stopped");
    Ok(())
}

/// Tells the service manager `state` (`tern::notify`); a failure is only
/// logged (the server serves either way).
fn ready(state: &str) {
    if let Err(e) = tern::notify::notify(state) {
        log::warn!("sd_notify {state:?}: {e}");
    }
}

/// `Last_upgrade` of a successor that serves while the carried connections
/// still come in.
const TAKING_OVER: &str = "taking over";

/// What the old process has left after a failed upgrade.
enum Kept {
    /// It never stopped serving.
    Serving(Box<Server>),
    /// It stopped (and released the data directory) before the successor
    /// failed: the listening sockets to start again on.
    /// The TLS ticket keys go with them, so its tickets still resume.
    Listeners(Vec<tern::io::Listeners>, Option<tern::ticket::TicketKeys>),
}

/// Runs a live upgrade (see [`tern::upgrade`]): the successor's pid once it
/// serves, or what is left to serve on and why it failed.
fn hand_over(
    server: Server,
    binary: &Path,
    argv: &[OsString],
    info: &UpgradeInfo,
) -> std::result::Result<u32, Box<(Kept, String)>> {
    let began = Instant::now();
    // systemd sets INVOCATION_ID in a unit's processes. Under a unit that
    // does not listen for readiness (Type=simple, no NOTIFY_SOCKET) the old
    // process's exit would end the service and systemd would stop the
    // successor with it: refuse rather than go down. Under Type=notify the
    // successor tells systemd its pid first (`tern::notify`).
    if std::env::var_os("INVOCATION_ID").is_some() && !tern::notify::listening() {
        let why = "refused under systemd: the unit would stop the successor when this process \
                   exits (Type=simple); use the shipped Type=notify unit with \
                   NotifyAccess=all, or `systemctl restart tern`"
            .to_string();
        return Err(Box::new((Kept::Serving(Box::new(server)), why)));
    }
    log::info!(
        "upgrade: starting {} (generation {})",
        binary.display(),
        info.generation + 1
    );
    let listeners = match server.listeners() {
        Ok(listeners) => listeners,
        Err(e) => {
            let why = format!("copying the listeners: {e}");
            return Err(Box::new((Kept::Serving(Box::new(server)), why)));
        }
    };
    let mut successor = match Successor::start(binary, argv) {
        Ok(successor) => successor,
        Err(why) => return Err(Box::new((Kept::Serving(Box::new(server)), why))),
    };
    let tickets = server.ticket_keys();
    if let Err(why) = successor.send_listeners(info.generation, &listeners, tickets) {
        let why = successor.abandon(why);
        return Err(Box::new((Kept::Serving(Box::new(server)), why)));
    }
    log::info!(
        "upgrade: pid {} has the listeners; stopping the shards",
        successor.pid
    );
    server.shutdown_for_upgrade();
    let released = server.release();
    if let Err(why) = successor.release() {
        released.carry.abort();
        released.join();
        let why = successor.abandon(why);
        return Err(Box::new((Kept::Listeners(listeners, tickets), why)));
    }
    // The successor opens the data directory and serves while the kept
    // connections go, a batch at a time.
    let mut count: u32 = 0;
    let failed = loop {
        match released
            .carry
            .next(released.shards, tern::upgrade::STEP_WAIT)
        {
            Next::Batch(batch) => {
                let n = batch.len();
                if let Err(why) = successor.send_carried(&batch) {
                    break Some(why);
                }
                // Our copies close here: the successor holds them.
                drop(batch);
                released.carry.sent(n);
                count = count.saturating_add(n as u32);
            }
            Next::Done => break None,
            Next::TimedOut => break Some("the shards queued nothing in time".to_string()),
        }
    };
    if let Some(why) = failed {
        released.carry.abort();
        released.join();
        let why = successor.abandon(why);
        return Err(Box::new((Kept::Listeners(listeners, tickets), why)));
    }
    released.join();
    log::info!("upgrade: {count} connections carried");
    match successor.finish(count) {
        Ok(pid) => {
            log::info!(
                "upgrade: hand-over to pid {pid} took {} ms",
                began.elapsed().as_millis()
            );
            Ok(pid)
        }
        Err(why) => Err(Box::new((Kept::Listeners(listeners, tickets), why))),
    }
}

/// `tern upgrade`: asks the server, then watches `show info` until the new
/// process serves (its pid answers) or the old one reports the failure.
fn upgrade(args: UpgradeArgs) -> Result<()> {
    let info = |text: &str, key: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
            .map(str::to_string)
    };
    let before = tern::stats::query(&args.socket, "show info")
        .map_err(|e| format!("cannot query {}: {e}", args.socket.display()))?;
    let old_pid = info(&before, "Pid").ok_or("the server does not report its Pid")?;
    let command = match &args.binary {
        // The server may run in another directory: give it an absolute path.
        Some(path) => format!("upgrade {}", std::path::absolute(path)?.display()),
        None => "upgrade".to_string(),
    };
    let answer = tern::stats::query(&args.socket, &command)?;
    if !answer.starts_with("upgrade started") {
        return Err(answer.trim_end().to_string().into());
    }
    let deadline = Instant::now() + tern::upgrade::HELLO_WAIT + tern::upgrade::SERVING_WAIT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        // The stats socket is gone for a moment while the processes switch.
        let Ok(now) = tern::stats::query(&args.socket, "show info") else {
            continue;
        };
        let last = info(&now, "Last_upgrade").unwrap_or_default();
        match info(&now, "Pid") {
            // The successor serves, but its predecessor's connections
            // still come: wait for them too.
            Some(pid) if pid != old_pid && !last.starts_with(TAKING_OVER) => {
                println!("upgraded: pid {old_pid} -> pid {pid}: {last}");
                return Ok(());
            }
            _ if last.starts_with("failed") => {
                return Err(format!("pid {old_pid} serves on: {last}").into())
            }
            _ => {}
        }
    }
    Err("no outcome in time; see the server's log".into())
}

fn token(args: TokenArgs) -> Result<()> {
    let secret = match args.token_secret {
        Some(s) => s,
        None => load(args.config.as_deref())?.token_secret,
    };
    if secret == tern::config::DEV_TOKEN_SECRET {
        eprintln!("tern: warning: minting with the public development secret");
    }
    if args.user == 0 {
        return Err("user id 0 is reserved".into());
    }
    let expires = tern::token::now_unix_s() + args.ttl.as_secs();
    let token = match args.device {
        Some(device) => tern::token::mint_device(secret.as_bytes(), args.user, device, expires),
        None => tern::token::mint(secret.as_bytes(), args.user, expires),
    };
    println!("{token}");
    Ok(())
}

fn stats(args: StatsArgs) -> Result<()> {
    let command = if args.command.is_empty() {
        "show info".to_string()
    } else {
        args.command.join(" ")
    };
    let answer = tern::stats::query(&args.socket, &command).map_err(|e| {
        format!(
            "cannot query {}: {e} (is tern serving there?)",
            args.socket.display()
        )
    })?;
    print!("{answer}");
    Ok(())
}

fn check_config(file: &Path) -> Result<()> {
    Config::from_file(file)?;
    println!("{}: ok", file.display());
    Ok(())
}

fn reshard(args: ReshardArgs) -> Result<()> {
    let report = tern::reshard::reshard(&args.data_dir, args.shards, args.repair)?;
    println!("{}: {report}", args.data_dir.display());
    Ok(())
}
