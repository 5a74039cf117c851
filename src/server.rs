//! Starting and stopping a whole server: listeners, the ring mesh, one thread
//! per shard, and the stats socket.
//!
//! Accepting: every shard has its own listening socket on the same address
//! (`SO_REUSEPORT` on Linux, `SO_REUSEPORT_LB` on FreeBSD), so the kernel
//! spreads new connections over the shards and no acceptor thread is a
//! bottleneck or a single point of failure. A connection lands on any shard,
//! and moves to its user's home shard after LOGIN. The TLS listener
//! (`tls_listen`) is bound the same way, once per shard.

use std::io::Result as IoResult;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::claim::claim;
use crate::clock::Clock;
use crate::cluster::{self, Bridge, Owners, ShardLink};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::io::{Io, IoOptions, Listeners, PeerInfo, WakeHandle};
use crate::ops::{Bans, Ops};
use crate::push::Pusher;
use crate::ring::{self, Links};
use crate::shard::{open_store, Adopt, Msg, Shard, ShardParts};
use crate::stats::{Health, ShardStats, SocketAccess, StatsServer, StatsView};
use crate::supervisor::Fatal;
use crate::tls::TlsContext;
use crate::upgrade::state::Carried;
use crate::upgrade::UpgradeInfo;
use std::os::fd::OwnedFd;

/// What a process takes over from its predecessor (live upgrade, see
/// [`crate::upgrade`]); [`Handover::default`] for a fresh start.
#[derive(Debug, Default)]
pub struct Handover {
    /// The listening sockets, one [`Listeners`] per shard of the old
    /// process; `None` binds new ones.
    pub listeners: Option<Vec<Listeners>>,
    /// The process's generation and upgrade state (shown by `show info`).
    pub info: Arc<UpgradeInfo>,
    /// The predecessor's TLS session ticket keys, so its tickets resume
    /// here; `None` makes fresh ones.
    pub tickets: Option<crate::ticket::TicketKeys>,
}

/// What a shard waits for once every shard has reported: its ends of the
/// ring mesh, every shard's peer info, and (cluster) its bridge link.
type Start = (Links<Msg>, Vec<PeerInfo>, Option<ShardLink>);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    mqtt_addr: Option<SocketAddr>,
    mqtt_tls_addr: Option<SocketAddr>,
    tls: Option<Arc<TlsContext>>,
    stats_socket: PathBuf,
    stop: Arc<AtomicBool>,
    wakers: Vec<WakeHandle>,
    threads: Vec<JoinHandle<()>>,
    stats: Option<StatsServer>,
    /// The cluster bridge thread, with a `[cluster]` section only.
    bridge: Option<Bridge>,
    /// The push thread, with a `push_url` only.
    pusher: Option<Pusher>,
    /// Set when a shard gave up past its restart intensity.
    fatal: Arc<Fatal>,
    /// Set with `stop` for a live upgrade: the shards carry their logged-in
    /// plaintext connections and say BYE(upgrade) to the others.
    upgrade: Arc<AtomicBool>,
    /// Where the shards leave the connections they carry.
    carried_out: Arc<crate::shard::Carry>,
    /// Where connections carried from a predecessor wait for their shards.
    adopt: Arc<Adopt>,
    /// Copies of every shard's listening sockets, handed to a successor
    /// (or started on again when it fails). Dropped when shutdown begins:
    /// a stopping server refuses connects (an upgrading one has handed
    /// its copies over by then).
    listeners: std::sync::Mutex<Vec<Listeners>>,
    /// Held for the server's life: one process per data directory.
    /// Draining flag for `GET /readyz`, shared with the stats thread.
    health: Arc<Health>,
    _data_dir: Option<DataDir>,
}

impl Server {
    /// Validates `config`, binds the listeners and the stats socket, and
    /// starts the shards. Returns once the server accepts connections.
    pub fn start(config: Config) -> Result<Server, Box<dyn std::error::Error>> {
        Server::start_with(config, Handover::default())
    }

    /// [`Server::start`] taking over from a predecessor: its listening
    /// sockets are used as they are (no bind, no refused connect); shards
    /// beyond their count bind new ones beside them.
    pub fn start_with(
        mut config: Config,
        handover: Handover,
    ) -> Result<Server, Box<dyn std::error::Error>> {
        config.validate()?;
        // Settles `shards = 0` to the recorded count, so it comes first; the
        // limits are checked again against the count it settled on.
        let data_dir = DataDir::start(&mut config)?;
        config.validate()?;
        let stats_access = SocketAccess::from_config(&config)?;
        let config = Arc::new(config);
        let shards = config.shard_count();

        let retry = Duration::from_millis(config.listen_retry_ms);
        let mut inherited = handover.listeners.unwrap_or_default().into_iter();
        if inherited.len() > shards {
            log::warn!(
                "upgrade: {} listeners handed over for {shards} shards; connections waiting in \
                 the extra ones' backlogs are reset",
                inherited.len()
            );
        }
        let mut inherited_tls = Vec::new();
        let (mut inherited_ws, mut inherited_mqtt, mut inherited_mqtt_tls) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut plain = Vec::with_capacity(shards);
        for listeners in inherited.by_ref().take(shards) {
            plain.push(listeners.plain);
            inherited_tls.push(listeners.tls);
            inherited_ws.push(listeners.ws);
            inherited_mqtt.push(listeners.mqtt);
            inherited_mqtt_tls.push(listeners.mqtt_tls);
        }
        let first = match plain.first() {
            Some(_) => None,
            None => Some(
                claim(config.listen, retry, "listen")
                    .and_then(|addr| listen(addr, config.listen_backlog))
                    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?,
            ),
        };
        plain.extend(first);
        let addr = plain[0].local_addr()?;
        for _ in plain.len()..shards {
            plain.push(
                listen(addr, config.listen_backlog)
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
            );
        }
        // TLS: the certificate is read before anything listens, so a bad
        // file fails the start with an error naming it.
        // One certificate for both TLS listeners (Tern's and MQTT's).
        let tls = match config.tls_listen.or(config.mqtt_tls_listen) {
            Some(_) => Some(Arc::new(TlsContext::load_with_keys(
                &config.tls_cert,
                &config.tls_key,
                handover.tickets,
            )?)),
            None => None,
        };
        let mut tls_listeners: Vec<Option<TcpListener>> = (0..shards).map(|_| None).collect();
        let mut tls_addr = None;
        if let Some(want) = config.tls_listen {
            let first = match inherited_tls.first_mut().and_then(Option::take) {
                Some(first) => first,
                None => claim(want, retry, "tls_listen")
                    .and_then(|addr| listen(addr, config.listen_backlog))
                    .map_err(|e| format!("cannot listen on {want} (tls_listen): {e}"))?,
            };
            let bound = first.local_addr()?;
            tls_addr = Some(bound);
            tls_listeners[0] = Some(first);
            for (i, slot) in tls_listeners.iter_mut().enumerate().skip(1) {
                if let Some(kept) = inherited_tls.get_mut(i).and_then(Option::take) {
                    *slot = Some(kept);
                    continue;
                }
                *slot = Some(
                    listen(bound, config.listen_backlog)
                        .map_err(|e| format!("cannot listen on {bound} (tls_listen): {e}"))?,
                );
            }
        }
        // WebSocket and MQTT: bound like TLS, once per shard, or taken
        // over from a live upgrade's predecessor (see `per_shard`).
        let (ws_listeners, ws_addr) = per_shard(
            config.ws_listen,
            "ws_listen",
            shards,
            inherited_ws,
            retry,
            &config,
        )?;
        let (mqtt_listeners, mqtt_addr) = per_shard(
            config.mqtt_listen,
            "mqtt_listen",
            shards,
            inherited_mqtt,
            retry,
            &config,
        )?;
        let (mqtt_tls_listeners, mqtt_tls_addr) = per_shard(
            config.mqtt_tls_listen,
            "mqtt_tls_listen",
            shards,
            inherited_mqtt_tls,
            retry,
            &config,
        )?;
        let listeners: Vec<Listeners> = plain
            .into_iter()
            .zip(tls_listeners)
            .zip(ws_listeners)
            .zip(mqtt_listeners)
            .zip(mqtt_tls_listeners)
            .map(|((((plain, tls), ws), mqtt), mqtt_tls)| Listeners {
                plain,
                tls,
                ws,
                mqtt,
                mqtt_tls,
            })
            .collect();
        // Copies for a successor; taken before the shards own the sockets.
        let kept = listeners
            .iter()
            .map(Listeners::try_clone)
            .collect::<IoResult<Vec<_>>>()?;
        let upgrade = Arc::new(AtomicBool::new(false));
        let carried_out = Arc::new(crate::shard::Carry::new(shards));
        let adopt = Arc::new(Adopt::new(shards));
        // Each shard builds its backend on its own thread (an io_uring ring
        // belongs to the thread that submits to it), reports how to wake it,
        // then waits for its ends of the ring mesh.
        let stop = Arc::new(AtomicBool::new(false));
        let shard_stats: Vec<Arc<ShardStats>> = (0..shards).map(|_| Arc::default()).collect();
        let all_stats: Arc<[Arc<ShardStats>]> = shard_stats.clone().into();
        let fatal = Fatal::new();
        // Cluster: the partition table the bridge keeps and shards read.
        let owners = config
            .cluster
            .as_ref()
            .map(|c| Arc::new(Owners::new(c.partitions)));
        // The push thread ends once every shard's end of its queue is gone,
        // so only the shards hold one.
        let (pusher, notices) = Pusher::start(&config)?.unzip();
        // Operators' commands and bans; the bans file is read before any
        // shard takes a login.
        // With `durability = "memory"` nothing is kept, bans neither.
        let bans = if config.durability == crate::store::Durability::Memory {
            Bans::in_memory(config.bans_max)
        } else {
            let path = config.data_dir.join(crate::ops::BANS_FILE);
            Bans::open(&path, config.bans_max, Clock::Real.unix_ms())
                .map_err(|e| format!("bans file {}: {e}", path.display()))?
        };
        let ops = Arc::new(Ops::new(shards, bans));
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut start_txs = Vec::with_capacity(shards);
        let mut threads = Vec::with_capacity(shards);
        for (id, listener) in listeners.into_iter().enumerate() {
            let (start_tx, start_rx) = mpsc::channel::<Option<Start>>();
            start_txs.push(start_tx);
            let ready_tx = ready_tx.clone();
            let options = IoOptions {
                backend: config.io,
                shard: id,
                conns_max: config.conns_max.div_ceil(shards),
                ring_slots_max: config.uring_ring_slots_max,
                batch_wait: Duration::from_micros(config.uring_batch_wait_us.into()),
            };
            let stats = shard_stats[id].clone();
            let all_stats = all_stats.clone();
            let fatal = fatal.clone();
            let stop = stop.clone();
            let upgrade = upgrade.clone();
            let carried_out = carried_out.clone();
            let adopt = adopt.clone();
            let config = config.clone();
            let tls = tls.clone();
            let owners = owners.clone();
            let push = notices.clone();
            let ops = ops.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tern-shard-{id}"))
                .spawn(move || {
                    if config.pin_cores {
                        pin_to_core(id);
                    }
                    let mut io = match Io::new(listener, &options) {
                        Ok(io) => io,
                        Err(e) => {
                            let _ = ready_tx.send((id, Err(e)));
                            return;
                        }
                    };
                    let store = match open_store(&config, id, Clock::Real) {
                        Ok(store) => store,
                        Err(e) => {
                            let _ = ready_tx.send((id, Err(std::io::Error::other(e))));
                            return;
                        }
                    };
                    let groups = match crate::shard::open_group_log(&config, id) {
                        Ok(groups) => groups,
                        Err(e) => {
                            let why = format!("group log not opened: {e}");
                            let _ = ready_tx.send((id, Err(std::io::Error::other(why))));
                            return;
                        }
                    };
                    let _ = ready_tx.send((id, Ok((io.wake_handle(), io.peer_info(), io.name()))));
                    let Ok(Some((links, peers, bridge))) = start_rx.recv() else {
                        return; // another shard failed to start
                    };
                    io.set_peers(peers);
                    let parts = ShardParts {
                        io,
                        links,
                        stats,
                        stop,
                        upgrade,
                        config,
                        store,
                        groups,
                        tls,
                        peers: all_stats,
                        fatal,
                        clock: Clock::Real,
                        owners,
                        bridge,
                        push,
                        ops: Some(ops),
                        carry: carried_out.clone(),
                        adopt,
                    };
                    match Shard::new(parts).run() {
                        // Live upgrade: the store is closed; the kept
                        // connections go to the main thread from here.
                        Ok(Some(out)) => return carried_out.stream(out),
                        Ok(None) => log::debug!("shard {id} stopped"),
                        Err(e) => log::error!("shard {id} failed: {e}"),
                    }
                    carried_out.leave();
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        drop(notices);
        let mut wakers = vec![None; shards];
        let mut peers = vec![None; shards];
        let mut backend = "";
        let mut failure = None;
        for (id, ready) in ready_rx.iter().take(shards) {
            match ready {
                Ok((wake, peer, name)) => {
                    wakers[id] = Some(wake);
                    peers[id] = Some(peer);
                    backend = name;
                }
                Err(e) => failure = Some(format!("shard {id}: {e}")),
            }
        }
        if let Some(failure) = failure {
            for tx in &start_txs {
                let _ = tx.send(None);
            }
            for t in threads {
                let _ = t.join();
            }
            return Err(failure.into());
        }
        let wakers: Vec<WakeHandle> = wakers
            .into_iter()
            .map(|w| w.expect("every shard reported"))
            .collect();
        let peers: Vec<PeerInfo> = peers
            .into_iter()
            .map(|p| p.expect("every shard reported"))
            .collect();

        // Started before the stats socket so its counters are in the view;
        // nothing of the cluster runs without a `[cluster]` section.
        let mut shard_links: Vec<Option<ShardLink>> = (0..shards).map(|_| None).collect();
        let bridge = match &config.cluster {
            Some(cluster) => {
                let (links, ends) = cluster::links(config.ring_slots, wakers.clone());
                shard_links = links.into_iter().map(Some).collect();
                Some(Bridge::start(
                    cluster.clone(),
                    owners.clone().expect("made with the cluster section"),
                    ends,
                    (config.group_members_max, config.groups_per_user_max),
                )?)
            }
            None => None,
        };
        let health = Arc::new(Health::default());
        let view = Arc::new(StatsView {
            version: env!("CARGO_PKG_VERSION"),
            backend,
            started: Instant::now(),
            conns_max: config.conns_max,
            shards: shard_stats.clone(),
            tls: tls.clone(),
            cluster: bridge.as_ref().map(Bridge::stats),
            push: pusher.as_ref().map(Pusher::stats),
            upgrade: handover.info,
            health: Arc::clone(&health),
            ops: Some(ops.clone()),
        });
        ops.set_wakers(wakers.clone());
        adopt.set_wakers(wakers.clone());
        let stats = match StatsServer::spawn(
            &config.stats_socket,
            stats_access,
            config.metrics_listen,
            view,
        ) {
            Ok(stats) => stats,
            Err(e) => {
                for tx in &start_txs {
                    let _ = tx.send(None);
                }
                if let Some(bridge) = bridge {
                    bridge.stop();
                }
                return Err(format!("stats socket {}: {e}", config.stats_socket.display()).into());
            }
        };
        let links = ring::mesh(config.ring_slots, wakers.clone());
        for ((tx, links), bridge) in start_txs.iter().zip(links).zip(shard_links) {
            let _ = tx.send(Some((links, peers.clone(), bridge)));
        }
        log::info!(
            "tern {} listening on {addr}: {shards} shards, backend {}, stats at {}",
            env!("CARGO_PKG_VERSION"),
            backend,
            config.stats_socket.display()
        );
        if let Some(tls_addr) = tls_addr {
            log::info!("TLS 1.3 listening on {tls_addr}");
        }
        if let Some(ws_addr) = ws_addr {
            // "at", not "on": scripts take the first "listening on" line as
            // the client listener.
            log::info!("WebSocket listening at ws://{ws_addr}/");
        }
        if let Some(mqtt_addr) = mqtt_addr {
            log::info!("MQTT listening on {mqtt_addr}");
        }
        if let Some(mqtt_tls_addr) = mqtt_tls_addr {
            log::info!("MQTT over TLS listening on {mqtt_tls_addr}");
        }
        Ok(Server {
            addr,
            tls_addr,
            ws_addr,
            mqtt_addr,
            mqtt_tls_addr,
            tls,
            stats_socket: config.stats_socket.clone(),
            stop,
            wakers,
            threads,
            stats: Some(stats),
            bridge,
            pusher,
            fatal,
            upgrade,
            carried_out,
            adopt,
            listeners: std::sync::Mutex::new(kept),
            health,
            _data_dir: data_dir,
        })
    }

    /// The client listener's address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, when `tls_listen` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The WebSocket listener's address, when `ws_listen` is set.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The MQTT listener's address, when `mqtt_listen` is set.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The MQTT-over-TLS listener's address, when `mqtt_tls_listen` is set.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// Re-reads the TLS certificate and key (SIGHUP, `reload tls`). New
    /// handshakes use them; on error the old ones stay.
    pub fn reload_tls(&self) -> Result<String, String> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Err("TLS is not configured (no tls_listen or mqtt_tls_listen)".to_string()),
        }
    }

    /// The TLS session ticket keys now (for a successor), with TLS.
    pub fn ticket_keys(&self) -> Option<crate::ticket::TicketKeys> {
        self.tls.as_ref().map(|t| t.ticket_keys())
    }

    /// The health flags behind `GET /healthz` and `GET /readyz`:
    /// [`Health::set_draining`] takes the server out of `/readyz`.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Path of the stats socket.
    pub fn stats_socket(&self) -> &Path {
        &self.stats_socket
    }

    /// The HTTP metrics address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.stats.as_ref().and_then(StatsServer::metrics_addr)
    }

    /// Why the server must stop, once a shard gave up past its restart
    /// intensity; `None` while every shard is up or restarting.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.reason()
    }

    /// Calls `notify` (from a shard thread) when a shard gives up, so the
    /// owner can shut down and exit with
    /// [`EXIT_SHARD_DOWN`](crate::supervisor::EXIT_SHARD_DOWN).
    pub fn on_fatal(&self, notify: impl Fn() + Send + 'static) {
        self.fatal.on_set(notify);
    }

    /// Begins graceful shutdown: stop accepting, BYE(shutdown) to everyone,
    /// flush for up to `shutdown_grace_ms`. Returns at once; see [`Server::join`].
    pub fn shutdown(&self) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.stop.store(true, Ordering::Relaxed);
        for w in &self.wakers {
            w.wake();
        }
    }

    /// Copies of the listening sockets, one [`Listeners`] per shard, for a
    /// successor (live upgrade) and for starting again if it fails.
    pub fn listeners(&self) -> IoResult<Vec<Listeners>> {
        let kept = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().map(Listeners::try_clone).collect()
    }

    /// [`Server::shutdown`] for a live upgrade: every logged-in plaintext
    /// connection is frozen and kept for the successor (where the backend
    /// [carries](crate::io::Io::carries)); every other connection gets
    /// BYE(upgrade) instead of BYE(shutdown), so its client reconnects at
    /// once. Then [`Server::release`].
    pub fn shutdown_for_upgrade(&self) {
        self.upgrade.store(true, Ordering::Relaxed);
        self.shutdown();
    }

    /// Live upgrade, successor: queues a connection carried from the
    /// predecessor for its user's home shard, first waiting while
    /// [`ADOPT_QUEUED_MAX`](crate::shard::ADOPT_QUEUED_MAX) are queued.
    pub fn adopt(&self, fd: OwnedFd, carried: Carried) {
        let home = crate::shard::home_shard(carried.user, self.wakers.len());
        self.adopt.push(home, fd, carried);
    }

    /// After [`Server::shutdown_for_upgrade`]: waits until every shard has
    /// closed its store, then releases the stats socket and the data
    /// directory's lock. The shards go on queueing their kept connections
    /// ([`Carry::next`](crate::shard::Carry::next) on
    /// [`Released::carry`]); join them with [`Released::join`].
    pub fn release(mut self) -> Released {
        let shards = self.wakers.len();
        self.carried_out.wait_released(shards);
        self.stop_services();
        Released {
            carry: self.carried_out.clone(),
            shards,
            threads: std::mem::take(&mut self.threads),
        }
        // The data directory's lock goes with `self`.
    }

    /// Waits for every shard to finish, then closes the stats socket.
    /// Connections kept for a successor that was never released to are
    /// closed.
    pub fn join(mut self) {
        self.carried_out.abort();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a shard thread panicked");
            }
        }
        self.stop_services();
    }

    fn stop_services(&mut self) {
        if let Some(stats) = self.stats.take() {
            stats.stop();
        }
        if let Some(bridge) = self.bridge.take() {
            bridge.stop();
        }
        // The shards are gone, and their ends of the push queue with them.
        if let Some(pusher) = self.pusher.take() {
            pusher.join();
        }
    }
}

/// A server released for a live upgrade ([`Server::release`]): its shard
/// threads still send the connections they kept.
pub struct Released {
    /// Where the shards queue their kept connections.
    pub carry: Arc<crate::shard::Carry>,
    /// How many shards queue.
    pub shards: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Released {
    /// Waits for every shard thread to end (after the last batch was
    /// taken, or [`crate::shard::Carry::abort`]).
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a shard thread panicked");
            }
        }
    }
}

/// One listener per shard on `want` (the `key` listener: `ws_listen`,
/// `mqtt_listen`, `mqtt_tls_listen`), bound like TLS's: `inherited[i]`
/// (a live upgrade's predecessor's, so no connection attempt is refused
/// while the processes change) where there is one, else a new one beside
/// the first. Returns them and the bound address.
fn per_shard(
    want: Option<SocketAddr>,
    key: &str,
    shards: usize,
    mut inherited: Vec<Option<TcpListener>>,
    retry: Duration,
    config: &Config,
) -> Result<(Vec<Option<TcpListener>>, Option<SocketAddr>), String> {
    let mut listeners: Vec<Option<TcpListener>> = (0..shards).map(|_| None).collect();
    let Some(want) = want else {
        return Ok((listeners, None));
    };
    let first = match inherited.first_mut().and_then(Option::take) {
        Some(first) => first,
        None => claim(want, retry, key)
            .and_then(|addr| listen(addr, config.listen_backlog))
            .map_err(|e| format!("cannot listen on {want} ({key}): {e}"))?,
    };
    let bound = first.local_addr().map_err(|e| format!("{key}: {e}"))?;
    listeners[0] = Some(first);
    for (i, slot) in listeners.iter_mut().enumerate().skip(1) {
        if let Some(kept) = inherited.get_mut(i).and_then(Option::take) {
            *slot = Some(kept);
            continue;
        }
        *slot = Some(
            listen(bound, config.listen_backlog)
                .map_err(|e| format!("cannot listen on {bound} ({key}): {e}"))?,
        );
    }
    Ok((listeners, Some(bound)))
}

/// A listening socket that other shards can bind beside.
fn listen(addr: SocketAddr, backlog: u32) -> IoResult<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    reuse_port(&socket)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

#[cfg(target_os = "freebsd")]
fn reuse_port(socket: &Socket) -> IoResult<()> {
    // SO_REUSEPORT_LB: the kernel load-balances connections over the listeners.
    socket.set_reuse_port_lb(true)
}

#[cfg(not(target_os = "freebsd"))]
fn reuse_port(socket: &Socket) -> IoResult<()> {
    socket.set_reuse_port(true)
}

#[cfg(target_os = "linux")]
fn pin_to_core(core: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, and the call
    // only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core % libc::CPU_SETSIZE as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "cannot pin shard to core {core}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_to_core(core: usize) {
    log::warn!("pin_cores is only supported on Linux; shard {core} is not pinned");
}
