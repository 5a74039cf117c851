//! Operators' runtime commands on the stats socket: look a user up, kick
//! and ban users, change the log level and drain the server, all without a
//! restart (modelled on HAProxy's runtime API and ejabberdctl).
//!
//! One [`Ops`] is shared by the stats thread and every shard. The stats
//! thread parses a command ([`Ops::answer`]); what only a shard can do
//! (`show user`, `kick user`) goes to the user's home shard as a
//! [`Request`] in that shard's mailbox, and the stats thread waits for the
//! answer. A shard takes its requests once per loop iteration (it is woken
//! for them), so a command never stops a loop for longer than its own work.
//! Bans ([`Bans`]) and the drain flag are read by shards directly.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::io::WakeHandle;
use crate::proto::{ByeReason, Frame};
use crate::shard::home_shard;

/// How long `drain` takes to close every session when no duration is
/// given.
pub const DRAIN_DEFAULT: Duration = Duration::from_secs(60);

/// Longest duration a command accepts (`ban … for`, `drain for`): a year.
pub const DURATION_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// How long the stats thread waits for a shard's answer. Below the stats
/// socket's own time per client, so the operator always gets a line back.
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Requests that may wait in one shard's mailbox; more are refused (the
/// stats thread serves one client at a time, so this is never reached
/// unless a shard is stuck).
const MAILBOX_MAX: usize = 16;

/// Rows `show conns` lists when no `limit` is given.
pub const CONNS_LIMIT_DEFAULT: usize = 10;

/// Most rows `show conns` lists.
pub const CONNS_LIMIT_MAX: usize = 1000;

/// How long `trace user` logs when no duration is given.
pub const TRACE_DEFAULT: Duration = Duration::from_secs(60);

/// Users traced at once.
pub const TRACES_MAX: usize = 16;

/// Most body bytes a trace line shows (`bodies`).
pub const TRACE_BODY_BYTES_MAX: usize = 256;

/// The name of the bans file in the data directory.
pub const BANS_FILE: &str = "bans";

/// What a shard is asked to do for the stats socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Describe `user` (`show user`), whose home this shard is.
    ShowUser(u64),
    /// Close `user`'s connection with BYE(`reason`).
    Kick {
        /// The user.
        user: u64,
        /// What its connection is told.
        reason: ByeReason,
    },
    /// Remove device `device` of `user` (`device remove`): its session
    /// gets BYE(`device_removed`), the user's other devices DEVICE_REMOVED.
    RemoveDevice {
        /// The user.
        user: u64,
        /// The device its token names.
        device: u64,
    },
    /// This shard's top `limit` logged-in connections by `sort`
    /// (`show conns`), answered with [`Answer::Rows`].
    Conns {
        /// The key, largest first.
        sort: Sort,
        /// Rows wanted.
        limit: usize,
    },
}

/// What `show conns` sorts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Messages queued for the connection's user (in flight included).
    Queue,
    /// Age of the oldest message queued for its user.
    Age,
    /// Output written to it and not sent yet (a slow reader).
    Bytes,
}

/// One logged-in connection as `show conns` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRow {
    /// Its shard.
    pub shard: usize,
    /// Its slot on that shard.
    pub conn: u32,
    /// Its user.
    pub user: u64,
    /// Messages queued for the user.
    pub queued: usize,
    /// Age of the oldest of them, ms (0 when none).
    pub oldest_age_ms: u64,
    /// DELIVERs sent and not answered yet.
    pub inflight: u32,
    /// Output not sent yet, bytes.
    pub out_pending_bytes: usize,
}

impl ConnRow {
    /// The value `sort` orders by.
    pub fn key(&self, sort: Sort) -> u64 {
        match sort {
            Sort::Queue => self.queued as u64,
            Sort::Age => self.oldest_age_ms,
            Sort::Bytes => self.out_pending_bytes as u64,
        }
    }
}

/// Keeps the `limit` rows with the largest keys of those offered, in
/// bounded memory (at most twice `limit`).
#[derive(Debug)]
pub struct Top {
    sort: Sort,
    limit: usize,
    rows: Vec<ConnRow>,
    /// Rows offered in all.
    pub seen: usize,
}

impl Top {
    /// Empty, keeping `limit` rows by `sort`.
    pub fn new(sort: Sort, limit: usize) -> Top {
        Top {
            sort,
            limit,
            rows: Vec::new(),
            seen: 0,
        }
    }

    /// Offers one row.
    pub fn offer(&mut self, row: ConnRow) {
        self.seen += 1;
        if self.limit == 0 {
            return;
        }
        self.rows.push(row);
        if self.rows.len() >= 2 * self.limit {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let sort = self.sort;
        self.rows.sort_unstable_by(|a, b| {
            b.key(sort)
                .cmp(&a.key(sort))
                .then((a.shard, a.conn).cmp(&(b.shard, b.conn)))
        });
        self.rows.truncate(self.limit);
    }

    /// The kept rows, largest key first.
    pub fn finish(mut self) -> (Vec<ConnRow>, usize) {
        self.trim();
        (self.rows, self.seen)
    }
}

/// A shard's answer.
#[derive(Debug)]
pub enum Answer {
    /// Text for the operator, as is.
    Text(String),
    /// `show conns`: the shard's top rows, and how many it looked at.
    Rows(Vec<ConnRow>, usize),
}

/// One command for one shard, with the way back to the stats thread.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub cmd: Cmd,
    reply: SyncSender<Answer>,
}

impl Request {
    /// Sends the answer back; a stats thread that stopped waiting (timed
    /// out) just does not get it.
    pub fn answer(self, answer: Answer) {
        let _ = self.reply.send(answer);
    }
}

/// A drain in progress: since when, and how long closing every session
/// should take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// When `drain` was given.
    pub started: Instant,
    /// Over how long the sessions are closed.
    pub over: Duration,
}

/// One user traced: every frame of its connection goes to the log until
/// `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The user.
    pub user: u64,
    /// When tracing it stops.
    pub until: Instant,
    /// Whether message bodies are logged too (escaped, cut at
    /// [`TRACE_BODY_BYTES_MAX`]); tokens never are.
    pub bodies: bool,
}

/// State shared by the stats thread and the shards.
#[derive(Debug)]
pub struct Ops {
    shards: usize,
    /// Per shard: requests waiting for it.
    mailboxes: Vec<Mutex<Vec<Request>>>,
    /// Per shard: how to interrupt its wait (set once the shards run).
    wakers: OnceLock<Vec<WakeHandle>>,
    bans: Bans,
    /// Set by `drain`, never cleared (a drained server is restarted).
    draining: AtomicBool,
    drain: Mutex<Option<Drain>>,
    /// The users traced; shards copy the list when `traces_version` moves.
    traces: Mutex<Vec<Trace>>,
    traces_version: AtomicUsize,
}

impl Ops {
    /// Shared state for `shards` shards, with these bans.
    pub fn new(shards: usize, bans: Bans) -> Ops {
        Ops {
            shards,
            mailboxes: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            wakers: OnceLock::new(),
            bans,
            draining: AtomicBool::new(false),
            drain: Mutex::new(None),
            traces: Mutex::new(Vec::new()),
            traces_version: AtomicUsize::new(0),
        }
    }

    /// Lets requests wake the shards; called once they run.
    pub fn set_wakers(&self, wakers: Vec<WakeHandle>) {
        debug_assert_eq!(wakers.len(), self.shards);
        let _ = self.wakers.set(wakers);
    }

    /// Whether `drain` was given: the server refuses new connections and is
    /// closing its sessions. For health checks (`/readyz`) too.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The drain in progress, if any.
    pub fn drain_state(&self) -> Option<Drain> {
        *self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Begins draining: every session is closed with BYE(`moving`) within
    /// `over`. A second call changes nothing and returns false.
    pub fn start_drain(&self, over: Duration) -> bool {
        let mut drain = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        if drain.is_some() {
            return false;
        }
        *drain = Some(Drain {
            started: Instant::now(),
            over,
        });
        self.draining.store(true, Ordering::Relaxed);
        self.wake_all();
        true
    }

    /// Changes each time the traced users change: a shard copies
    /// [`Ops::traces`] when it sees a new value.
    pub fn traces_version(&self) -> usize {
        self.traces_version.load(Ordering::Acquire)
    }

    /// The users traced now.
    pub fn traces(&self) -> Vec<Trace> {
        let now = Instant::now();
        let traces = self.traces.lock().unwrap_or_else(|e| e.into_inner());
        traces.iter().filter(|t| t.until > now).copied().collect()
    }

    /// Traces `user` for `over` (zero stops it).
    fn trace(&self, user: u64, over: Duration, bodies: bool) -> String {
        let now = Instant::now();
        let mut traces = self.traces.lock().unwrap_or_else(|e| e.into_inner());
        traces.retain(|t| t.until > now && t.user != user);
        let answer = if over.is_zero() {
            format!("User {user} is not traced.\n")
        } else if traces.len() >= TRACES_MAX {
            return format!("{TRACES_MAX} users are traced already; stop one with `for 0s`.\n");
        } else {
            traces.push(Trace {
                user,
                until: now + over,
                bodies,
            });
            let what = if bodies {
                "frames and bodies"
            } else {
                "frames"
            };
            format!(
                "Tracing user {user} for {} s: its {what} go to the log.\n",
                over.as_secs()
            )
        };
        drop(traces);
        self.traces_version.fetch_add(1, Ordering::Release);
        self.wake_all();
        answer
    }

    /// The bans.
    pub fn bans(&self) -> &Bans {
        &self.bans
    }

    /// Users banned now (bans that ran out not counted): `show info`'s
    /// `Bans` and the `tern_bans` gauge.
    pub fn bans_now(&self) -> usize {
        self.bans.list(unix_ms()).len()
    }

    /// Whether `user` is banned at `now_ms` (Unix milliseconds).
    pub fn banned(&self, user: u64, now_ms: u64) -> bool {
        self.bans.is_banned(user, now_ms)
    }

    /// Moves shard `shard`'s waiting requests into `into`.
    pub fn take(&self, shard: usize, into: &mut Vec<Request>) {
        let mut mailbox = self.mailboxes[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        into.append(&mut mailbox);
    }

    fn wake_all(&self) {
        for waker in self.wakers.get().into_iter().flatten() {
            waker.wake();
        }
    }

    /// Puts `cmd` in shard `shard`'s mailbox and wakes it; the answer
    /// comes on the receiver.
    fn post(&self, shard: usize, cmd: Cmd) -> Result<Receiver<Answer>, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut mailbox = self.mailboxes[shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if mailbox.len() >= MAILBOX_MAX {
                return Err(format!(
                    "Shard {shard} is not taking commands now (mailbox full).\n"
                ));
            }
            mailbox.push(Request { cmd, reply: tx });
        }
        if let Some(waker) = self.wakers.get().and_then(|w| w.get(shard)) {
            waker.wake();
        }
        Ok(rx)
    }

    /// Waits for shard `shard`'s answer on `rx`, until `deadline`.
    fn wait(shard: usize, rx: &Receiver<Answer>, deadline: Instant) -> Result<Answer, String> {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| {
                format!(
                    "Shard {shard} did not answer within {} ms (restarting or stopped?).\n",
                    SHARD_ANSWER_TIMEOUT.as_millis()
                )
            })
    }

    /// Asks shard `shard` to do `cmd` and waits for its text answer.
    fn ask(&self, shard: usize, cmd: Cmd) -> String {
        let deadline = Instant::now() + SHARD_ANSWER_TIMEOUT;
        match self
            .post(shard, cmd)
            .and_then(|rx| Ops::wait(shard, &rx, deadline))
        {
            Ok(Answer::Text(text)) | Err(text) => text,
            Ok(Answer::Rows(..)) => unreachable!("only `Cmd::Conns` is answered with rows"),
        }
    }

    /// `show conns`: every shard looks at its connections at once (a
    /// bounded number of slots per loop iteration), then the rows are
    /// merged.
    fn conns(&self, sort: Sort, limit: usize) -> String {
        let deadline = Instant::now() + SHARD_ANSWER_TIMEOUT;
        let posted: Vec<_> = (0..self.shards)
            .map(|shard| self.post(shard, Cmd::Conns { sort, limit }))
            .collect();
        let mut top = Top::new(sort, limit);
        let mut seen = 0;
        for (shard, rx) in posted.into_iter().enumerate() {
            match rx.and_then(|rx| Ops::wait(shard, &rx, deadline)) {
                Ok(Answer::Rows(rows, n)) => {
                    seen += n;
                    rows.into_iter().for_each(|row| top.offer(row));
                }
                Ok(Answer::Text(text)) | Err(text) => return text,
            }
        }
        let (rows, _) = top.finish();
        let name = match sort {
            Sort::Queue => "queue",
            Sort::Age => "age",
            Sort::Bytes => "bytes",
        };
        let mut out = format!(
            "Conns: {} of {seen} logged in, by {name}\n\
             shard conn user queued oldest_age_ms inflight out_pending_bytes\n",
            rows.len()
        );
        for r in rows {
            writeln!(
                out,
                "{} {} {} {} {} {} {}",
                r.shard, r.conn, r.user, r.queued, r.oldest_age_ms, r.inflight, r.out_pending_bytes
            )
            .expect("writing to a String");
        }
        out
    }

    /// The answer to an operator command, or `None` when `words` is not
    /// one of these commands.
    pub fn answer(&self, words: &[&str]) -> Option<String> {
        let now_ms = unix_ms();
        Some(match words {
            ["show", "user", user] => match parse_user(user) {
                Ok(user) => self.ask(home_shard(user, self.shards), Cmd::ShowUser(user)),
                Err(e) => e,
            },
            ["kick", "user", user, ..] => match parse_user(user) {
                Ok(user) => self.kick(user, ByeReason::Kicked, &words[3..]),
                Err(e) => e,
            },
            ["device", "remove", user, device] => match (parse_user(user), device.parse()) {
                (Err(e), _) => e,
                (Ok(user), Ok(device)) => {
                    log::info!("operator removes device {device} of user {user}");
                    let cmd = Cmd::RemoveDevice { user, device };
                    self.ask(home_shard(user, self.shards), cmd)
                }
                (Ok(_), Err(_)) => format!(
                    "Not a device id: '{device}' (a number from 0 to {}).\n",
                    u32::MAX
                ),
            },
            ["ban", "user", user, rest @ ..] => match (parse_user(user), rest) {
                (Err(e), _) => e,
                (Ok(user), []) => self.ban(user, None, now_ms),
                (Ok(user), ["for", duration]) => match parse_duration(duration) {
                    Ok(d) => self.ban(user, Some(d), now_ms),
                    Err(e) => e,
                },
                _ => "Usage: ban user U [for DURATION]\n".to_string(),
            },
            ["unban", "user", user] => match parse_user(user) {
                Ok(user) => match self.bans.unban(user) {
                    Ok(true) => format!("User {user} unbanned.\n"),
                    Ok(false) => format!("User {user} was not banned.\n"),
                    Err(e) => format!("Unban failed, the ban stays: {e}\n"),
                },
                Err(e) => e,
            },
            ["show", "bans"] => self.render_bans(now_ms),
            ["show", "conns", rest @ ..] => match parse_conns(rest) {
                Ok((sort, limit)) => self.conns(sort, limit),
                Err(e) => e,
            },
            ["trace", "user", user, rest @ ..] => match (parse_user(user), parse_trace(rest)) {
                (Ok(user), Ok((over, bodies))) => self.trace(user, over, bodies),
                (Err(e), _) | (_, Err(e)) => e,
            },
            ["set", "log", "level", level] => match level.parse::<log::LevelFilter>() {
                Ok(level) => {
                    log::set_max_level(level);
                    format!("Log level set to {level}.\n")
                }
                Err(_) => format!(
                    "Unknown log level '{level}': off, error, warn, info, debug or trace.\n"
                ),
            },
            ["drain"] => self.drain_answer(DRAIN_DEFAULT),
            ["drain", "for", duration] => match parse_duration(duration) {
                Ok(d) => self.drain_answer(d),
                Err(e) => e,
            },
            _ => return None,
        })
    }

    fn kick(&self, user: u64, reason: ByeReason, why: &[&str]) -> String {
        if !why.is_empty() {
            log::info!("operator kicks user {user}: {}", why.join(" "));
        }
        self.ask(home_shard(user, self.shards), Cmd::Kick { user, reason })
    }

    fn ban(&self, user: u64, over: Option<Duration>, now_ms: u64) -> String {
        let until_ms = over.map_or(0, |d| now_ms.saturating_add(d.as_millis() as u64).max(1));
        if let Err(e) = self.bans.ban(user, until_ms, now_ms) {
            return format!("Ban failed: {e}\n");
        }
        let how_long = match over {
            None => "until unbanned".to_string(),
            Some(d) => format!("for {} s", d.as_secs()),
        };
        log::info!("operator bans user {user} {how_long}");
        let kicked = self.kick(user, ByeReason::Kicked, &[]);
        format!("User {user} banned {how_long}. {kicked}")
    }

    fn render_bans(&self, now_ms: u64) -> String {
        let bans = self.bans.list(now_ms);
        let mut out = format!("Bans: {} (at most {})\n", bans.len(), self.bans.max);
        for (user, until_ms) in bans {
            match until_ms {
                0 => writeln!(out, "{user} forever"),
                until => writeln!(out, "{user} {} s left", (until - now_ms).div_ceil(1000)),
            }
            .expect("writing to a String");
        }
        out
    }

    fn drain_answer(&self, over: Duration) -> String {
        if self.start_drain(over) {
            log::warn!(
                "draining: new connections refused, sessions closed within {} s",
                over.as_secs()
            );
            format!(
                "Draining: new connections get BYE(moving), sessions are closed within {} s.\n",
                over.as_secs()
            )
        } else {
            "Already draining.\n".to_string()
        }
    }
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_user(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(user) if user != 0 => Ok(user),
        _ => Err(format!(
            "Not a user id: '{text}' (a number from 1 to {}).\n",
            u64::MAX
        )),
    }
}

/// Parses `show conns`'s options: `[sort by queue|age|bytes] [limit N]`.
fn parse_conns(words: &[&str]) -> Result<(Sort, usize), String> {
    let usage = || {
        format!(
            "Usage: show conns [sort by queue|age|bytes] [limit N] (N at most {CONNS_LIMIT_MAX}).\n"
        )
    };
    let (mut sort, mut limit) = (Sort::Queue, CONNS_LIMIT_DEFAULT);
    let mut rest = words;
    if let ["sort", "by", key, tail @ ..] = rest {
        sort = match *key {
            "queue" => Sort::Queue,
            "age" => Sort::Age,
            "bytes" => Sort::Bytes,
            _ => return Err(usage()),
        };
        rest = tail;
    }
    if let ["limit", n, tail @ ..] = rest {
        limit = n.parse().map_err(|_| usage())?;
        rest = tail;
    }
    if !rest.is_empty() || limit > CONNS_LIMIT_MAX {
        return Err(usage());
    }
    Ok((sort, limit))
}

/// Parses `trace user U`'s options: `[for DURATION] [bodies]`.
fn parse_trace(words: &[&str]) -> Result<(Duration, bool), String> {
    let (over, rest) = match words {
        ["for", d, rest @ ..] => (parse_duration(d)?, rest),
        rest => (TRACE_DEFAULT, rest),
    };
    match rest {
        [] => Ok((over, false)),
        ["bodies"] => Ok((over, true)),
        _ => Err("Usage: trace user U [for DURATION] [bodies]\n".to_string()),
    }
}

/// One trace line's description of `frame`: its type and fields, sizes
/// for bytes; bodies (escaped, cut) only when asked, tokens never.
pub fn describe(frame: &Frame<'_>, bodies: bool) -> String {
    let body = |b: &[u8]| {
        if bodies {
            let shown = &b[..b.len().min(TRACE_BODY_BYTES_MAX)];
            format!("body={} B \"{}\"", b.len(), shown.escape_ascii())
        } else {
            format!("body={} B", b.len())
        }
    };
    match *frame {
        Frame::Login { version, token } => {
            format!("LOGIN version={version} token={} B", token.len())
        }
        Frame::Send {
            client_id,
            to,
            body: b,
        } => format!("SEND client_id={client_id} to={to} {}", body(b)),
        Frame::Deliver {
            server_id,
            from,
            server_time_ms,
            client_id,
            body: b,
        } => {
            let client_id = client_id.map_or("-".to_string(), |c| c.to_string());
            format!(
                "DELIVER server_id={server_id} from={from} server_time_ms={server_time_ms} \
                 client_id={client_id} {}",
                body(b)
            )
        }
        ref other => format!("{} {other:?}", other.name()),
    }
}

/// Parses `30s`, `5m`, `2h`, `7d` or `500ms` (a bare number is seconds),
/// from zero up to [`DURATION_MAX`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("Not a duration: '{text}' (e.g. 500ms, 30s, 5m, 2h, 7d; at most 366d).\n");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms_per = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(ms_per).ok_or_else(bad)?;
    let d = Duration::from_millis(ms);
    if d > DURATION_MAX {
        return Err(bad());
    }
    Ok(d)
}

/// Banned users, kept in memory for the login check and in a file in the
/// data directory so that they survive a restart or a crash.
///
/// The file is text, one ban per line: the user id and when the ban ends
/// (Unix milliseconds, `0` for never), after a header line. It is replaced
/// whole on every change (written beside, synced, renamed, directory
/// synced), so a crash leaves the old list or the new one, never a mix.
#[derive(Debug)]
pub struct Bans {
    /// The file; `None` keeps bans in memory only (tests, simulation).
    path: Option<PathBuf>,
    /// Most bans held (`bans_max`).
    max: usize,
    /// User to the end of its ban (Unix ms, 0 = never).
    map: RwLock<HashMap<u64, u64>>,
    /// Bans held, so that logins skip the lock while there are none.
    count: AtomicUsize,
}

/// The first line of a bans file.
const BANS_HEADER: &str = "# tern bans v1: user until_unix_ms (0 = until unbanned)";

impl Bans {
    /// No bans, none written anywhere.
    pub fn in_memory(max: usize) -> Bans {
        Bans {
            path: None,
            max,
            map: RwLock::new(HashMap::new()),
            count: AtomicUsize::new(0),
        }
    }

    /// Loads the bans kept at `path` (none if it does not exist), dropping
    /// those over at `now_ms`.
    ///
    /// # Errors
    ///
    /// Reading the file, or a line that is not a ban (the file is not ours
    /// or was edited wrongly: refusing to start beats forgetting bans), or
    /// more bans than `max`.
    pub fn open(path: &Path, max: usize, now_ms: u64) -> io::Result<Bans> {
        let mut map = HashMap::new();
        match fs::read_to_string(path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let bad = || {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} line {}: not `USER UNTIL_MS`: {line:?}",
                                path.display(),
                                i + 1
                            ),
                        )
                    };
                    let mut parts = line.split_whitespace();
                    let (Some(user), Some(until), None) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        return Err(bad());
                    };
                    let user: u64 = user.parse().map_err(|_| bad())?;
                    let until: u64 = until.parse().map_err(|_| bad())?;
                    if until == 0 || until > now_ms {
                        map.insert(user, until);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if map.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bans, more than bans_max = {max}",
                    path.display(),
                    map.len()
                ),
            ));
        }
        Ok(Bans {
            path: Some(path.to_path_buf()),
            max,
            count: AtomicUsize::new(map.len()),
            map: RwLock::new(map),
        })
    }

    /// Bans held, some possibly over (they are dropped at the next ban or
    /// start); for a gauge.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no ban is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `user` is banned at `now_ms`.
    pub fn is_banned(&self, user: u64, now_ms: u64) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&user)
            .is_some_and(|&until| until == 0 || now_ms < until)
    }

    /// Bans `user` until `until_ms` (0: until unbanned), replacing an
    /// earlier ban of it, and writes the list down before returning.
    ///
    /// # Errors
    ///
    /// `bans_max` bans held already (after dropping those over), or the
    /// file could not be written; then nothing changed.
    pub fn ban(&self, user: u64, until_ms: u64, now_ms: u64) -> Result<(), String> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until == 0 || *until > now_ms);
        if !map.contains_key(&user) && map.len() >= self.max {
            self.count.store(map.len(), Ordering::Relaxed);
            return Err(format!(
                "{} users are banned already (bans_max); unban some first",
                map.len()
            ));
        }
        let before = map.insert(user, until_ms);
        if let Err(e) = self.persist(&map) {
            match before {
                Some(until) => map.insert(user, until),
                None => map.remove(&user),
            };
            return Err(e);
        }
        self.count.store(map.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Lifts `user`'s ban; false when it had none.
    ///
    /// # Errors
    ///
    /// The file could not be written; then the ban stays.
    pub fn unban(&self, user: u64) -> Result<bool, String> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let Some(until) = map.remove(&user) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&map) {
            map.insert(user, until);
            return Err(e);
        }
        self.count.store(map.len(), Ordering::Relaxed);
        Ok(true)
    }

    /// The bans in force at `now_ms`, by user id.
    pub fn list(&self, now_ms: u64) -> Vec<(u64, u64)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut bans: Vec<(u64, u64)> = map
            .iter()
            .filter(|(_, &until)| until == 0 || until > now_ms)
            .map(|(&user, &until)| (user, until))
            .collect();
        bans.sort_unstable();
        bans
    }

    /// Replaces the file with `map`, atomically and durably.
    fn persist(&self, map: &HashMap<u64, u64>) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut bans: Vec<(&u64, &u64)> = map.iter().collect();
        bans.sort_unstable();
        let mut text = String::with_capacity(BANS_HEADER.len() + 1 + bans.len() * 24);
        text.push_str(BANS_HEADER);
        text.push('\n');
        for (user, until) in bans {
            writeln!(text, "{user} {until}").expect("writing to a String");
        }
        write_atomically(path, text.as_bytes())
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or
/// the new one: a temporary file beside it, synced, renamed over it, and
/// the directory synced so the rename itself is durable.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("366d"), Ok(DURATION_MAX));
        for bad in [
            "",
            "s",
            "-1s",
            "1w",
            "1.5s",
            "367d",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bans_expire_are_bounded_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(BANS_FILE);
        let bans = Bans::open(&path, 2, 1_000).unwrap();
        assert!(!bans.is_banned(7, 1_000));
        bans.ban(7, 0, 1_000).unwrap();
        bans.ban(8, 5_000, 1_000).unwrap();
        assert!(bans.is_banned(7, 1_000) && bans.is_banned(8, 4_999));
        assert!(!bans.is_banned(8, 5_000));
        // Full: a third user is refused, the same user is re-banned.
        assert!(bans.ban(9, 0, 1_000).unwrap_err().contains("bans_max"));
        bans.ban(8, 9_000, 1_000).unwrap();
        // Once 8's ban is over it no longer takes room.
        bans.ban(9, 0, 9_000).unwrap();
        assert_eq!(bans.list(9_000), vec![(7, 0), (9, 0)]);
        assert_eq!(bans.len(), 2);
        drop(bans);
        let again = Bans::open(&path, 2, 9_000).unwrap();
        assert_eq!(again.list(9_000), vec![(7, 0), (9, 0)]);
        assert_eq!(again.unban(7), Ok(true));
        assert_eq!(again.unban(7), Ok(false));
        let third = Bans::open(&path, 2, 9_000).unwrap();
        assert_eq!(third.list(9_000), vec![(9, 0)]);
        // Over the bound, or not ours: refuse to start.
        assert!(Bans::open(&path, 0, 9_000).is_err());
        fs::write(&path, "7 forever\n").unwrap();
        assert!(Bans::open(&path, 2, 9_000).is_err());
    }

    #[test]
    fn conns_options_and_top() {
        assert_eq!(parse_conns(&[]), Ok((Sort::Queue, CONNS_LIMIT_DEFAULT)));
        assert_eq!(
            parse_conns(&["sort", "by", "age", "limit", "3"]),
            Ok((Sort::Age, 3))
        );
        assert_eq!(parse_conns(&["limit", "0"]), Ok((Sort::Queue, 0)));
        for bad in [
            &["sort", "by", "name"][..],
            &["limit", "1001"],
            &["limit", "3", "sort", "by", "age"],
            &["limit"],
        ] {
            assert!(parse_conns(bad).is_err(), "{bad:?}");
        }
        let row = |conn: u32, queued: usize| ConnRow {
            shard: 0,
            conn,
            user: conn as u64 + 100,
            queued,
            oldest_age_ms: 0,
            inflight: 0,
            out_pending_bytes: 0,
        };
        let mut top = Top::new(Sort::Queue, 2);
        for (conn, queued) in [(1, 5), (2, 9), (3, 1), (4, 9), (5, 7)] {
            top.offer(row(conn, queued));
        }
        let (rows, seen) = top.finish();
        assert_eq!(seen, 5);
        assert_eq!(rows, vec![row(2, 9), row(4, 9)]);
        let mut none = Top::new(Sort::Queue, 0);
        none.offer(row(1, 1));
        assert_eq!(none.finish(), (vec![], 1));
    }

    #[test]
    fn trace_lines() {
        assert_eq!(parse_trace(&[]), Ok((TRACE_DEFAULT, false)));
        assert_eq!(
            parse_trace(&["for", "5m", "bodies"]),
            Ok((Duration::from_secs(300), true))
        );
        assert!(parse_trace(&["bodies", "for", "5m"]).is_err());
        let login = Frame::Login {
            version: 2,
            token: b"v1.42.1767225600.SECRETMAC",
        };
        assert_eq!(describe(&login, true), "LOGIN version=2 token=26 B");
        let send = Frame::Send {
            client_id: 3,
            to: 5,
            body: b"hi\n",
        };
        assert_eq!(describe(&send, false), "SEND client_id=3 to=5 body=3 B");
        assert_eq!(
            describe(&send, true),
            "SEND client_id=3 to=5 body=3 B \"hi\\n\""
        );
        let ack = Frame::Ack {
            client_id: 3,
            server_id: 9,
            server_time_ms: 1,
        };
        assert_eq!(
            describe(&ack, false),
            "ACK Ack { client_id: 3, server_id: 9, server_time_ms: 1 }"
        );
        let ops = Ops::new(1, Bans::in_memory(1));
        let v = ops.traces_version();
        assert!(ops
            .trace(7, Duration::from_secs(9), false)
            .starts_with("Tracing user 7"));
        assert_eq!(ops.traces().len(), 1);
        assert!(ops.traces_version() != v);
        assert_eq!(
            ops.trace(7, Duration::ZERO, false),
            "User 7 is not traced.\n"
        );
        assert!(ops.traces().is_empty());
    }

    #[test]
    fn commands_parse() {
        let ops = Ops::new(2, Bans::in_memory(4));
        let say = |line: &str| {
            let words: Vec<&str> = line.split_whitespace().collect();
            ops.answer(&words)
        };
        assert_eq!(say("show info"), None);
        assert!(say("show user x").unwrap().starts_with("Not a user id"));
        assert!(say("ban user 0").unwrap().starts_with("Not a user id"));
        assert!(say("ban user 5 for ever")
            .unwrap()
            .starts_with("Not a duration"));
        assert!(say("ban user 5 during 1s").unwrap().starts_with("Usage"));
        assert!(say("device remove 0 1")
            .unwrap()
            .starts_with("Not a user id"));
        assert!(say("device remove 5 x")
            .unwrap()
            .starts_with("Not a device id"));
        assert_eq!(say("device remove 5"), None);
        assert!(say("set log level loud")
            .unwrap()
            .starts_with("Unknown log level"));
        assert!(say("show bans").unwrap().starts_with("Bans: 0 (at most 4)"));
        assert_eq!(say("unban user 5").unwrap(), "User 5 was not banned.\n");
        assert!(!ops.draining());
        assert!(say("drain for 10s").unwrap().starts_with("Draining"));
        assert!(ops.draining());
        assert_eq!(ops.drain_state().unwrap().over, Duration::from_secs(10));
        assert_eq!(say("drain").unwrap(), "Already draining.\n");
    }
}
