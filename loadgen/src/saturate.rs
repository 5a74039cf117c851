//! `saturate`: the highest rate with all four ticks whose deliver p99 stays
//! under a bound, and what each message costs the server in CPU.
//!
//! A closed loop on one thread (mio): each of `--users` logged-in users keeps
//! up to W messages in flight, a message leaving the window when its read
//! receipt comes back (SEND → ACK → DELIVER → DELIVERED → RECEIPT(delivered)
//! → READ → RECEIPT(read)). The window steps through `--windows`, and each
//! step reports the rates of the four ticks, the deliver latency (from the
//! SEND written to the DELIVER read, the send time riding in the body), the
//! server's CPU per message from /proc/<pid>/stat and the load generator's
//! own CPU, flagged when it is the bottleneck.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use tern::proto::{self, Frame, Limits, ReceiptKind};

/// The load generator is called the bottleneck at this share of the one
/// core it runs on.
const BOTTLENECK_CPU: f64 = 0.90;
/// Readable connections handled before the answers so far are written.
/// Writing only after a whole poll's worth (thousands of connections in the
/// chat shape) left the server idle while we read, and us idle while it
/// worked: the two took turns instead of overlapping.
const FLUSH_EVERY_EVENTS: usize = 64;

/// Who sends to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Many users, each message to a random other user.
    Chat,
    /// Few users, many messages each: user 2k and 2k+1 send to each other.
    Pipelined,
}

/// `saturate` options.
#[derive(Args, Debug)]
pub struct SaturateArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:5222")]
    pub server: SocketAddr,
    /// chat or pipelined.
    #[arg(long, value_enum, default_value = "chat")]
    pub shape: Shape,
    /// Logged-in users; every one sends and receives (default: chat 2000,
    /// pipelined 2).
    #[arg(long)]
    pub users: Option<u64>,
    /// Messages in flight per sender, one step each, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub windows: Vec<u32>,
    /// How long each step measures.
    #[arg(long, default_value = "3s", value_parser = crate::duration)]
    pub step_time: Duration,
    /// Traffic before each step's measurement starts (not counted).
    #[arg(long, default_value = "500ms", value_parser = crate::duration)]
    pub warmup: Duration,
    /// The deliver p99 a step must stay under to count.
    #[arg(long, default_value = "10ms", value_parser = crate::duration)]
    pub p99_bound: Duration,
    /// The server's pid, for its CPU per message (/proc/<pid>/stat).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Message body bytes (at least 8: the send time).
    #[arg(long, default_value_t = 32)]
    pub body_bytes: usize,
    /// Token secret (default: the server's development secret).
    #[arg(long, default_value = tern::config::DEV_TOKEN_SECRET, env = "TERN_TOKEN_SECRET")]
    pub secret: String,
    /// User id of the first user; user i is user_base + i.
    #[arg(long, default_value_t = 2_000_000)]
    pub user_base: u64,
    /// Hard limit on the whole run.
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    pub max_time: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One step's figures.
#[derive(Debug, Serialize)]
pub struct Step {
    /// Messages in flight per sender.
    pub window: u32,
    /// Seconds measured.
    pub seconds: f64,
    /// Messages with all four ticks (read receipt back) per second.
    pub msgs_per_s: f64,
    /// ACKs per second.
    pub acks_per_s: f64,
    /// DELIVERs per second.
    pub delivers_per_s: f64,
    /// Delivery receipts per second.
    pub receipts_delivered_per_s: f64,
    /// Read receipts per second.
    pub receipts_read_per_s: f64,
    /// Deliver latency, SEND written to DELIVER read: median, µs.
    pub deliver_p50_us: u64,
    /// Deliver latency, 99th percentile, µs.
    pub deliver_p99_us: u64,
    /// Server CPU (user + system) per message with all four ticks, µs;
    /// null without --server-pid or /proc.
    pub server_cpu_us_per_msg: Option<f64>,
    /// Server CPU over the step, percent of one core.
    pub server_cpu_percent: Option<f64>,
    /// The load generator's CPU over the step, percent of one core.
    pub loadgen_cpu_percent: Option<f64>,
    /// The load generator used at least 90 % of its one core.
    pub loadgen_bottleneck: bool,
    /// Deliver p99 under --p99-bound.
    pub within_bound: bool,
    /// ERROR frames received (refused SENDs and the like).
    pub errors: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// chat or pipelined.
    pub shape: Shape,
    /// Logged-in users.
    pub users: u64,
    /// Body bytes.
    pub body_bytes: usize,
    /// The bound, µs.
    pub p99_bound_us: u64,
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// The highest msgs/s of a step within the bound (null if none was).
    pub best_msgs_per_s: Option<f64>,
    /// That step's window.
    pub best_window: Option<u32>,
    /// That step's server CPU per message, µs.
    pub best_server_cpu_us_per_msg: Option<f64>,
    /// The command line.
    pub command: Vec<String>,
}

/// Tick counters of the current step.
#[derive(Default)]
struct Ticks {
    acks: u64,
    delivers: u64,
    delivered: u64,
    read: u64,
    errors: u64,
}

struct Conn {
    stream: TcpStream,
    user: u64,
    logged_in: bool,
    inflight: u32,
    next_client_id: u64,
    input: Vec<u8>,
    output: Vec<u8>,
}

/// The run's state: connections, counters and the deliver histogram.
struct Loop {
    conns: Vec<Conn>,
    by_user: HashMap<u64, usize>,
    shape: Shape,
    body_bytes: usize,
    window: u32,
    ticks: Ticks,
    deliver: Histogram<u64>,
    start: Instant,
    rng: u64,
    limits: Limits,
    dirty: Vec<usize>,
}

/// CPU seconds (user + system) of `/proc/<pid>/stat`; `None` without /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after its ')' are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

impl Loop {
    fn next_rand(&mut self) -> u64 {
        // xorshift64: enough to pick peers.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn peer_of(&mut self, i: usize) -> u64 {
        let n = self.conns.len();
        let j = match self.shape {
            Shape::Pipelined => i ^ 1,
            Shape::Chat => {
                let r = (self.next_rand() % (n as u64 - 1)) as usize;
                if r >= i {
                    r + 1
                } else {
                    r
                }
            }
        };
        self.conns[j.min(n - 1)].user
    }

    /// Tops connection `i`'s window up with SENDs.
    fn fill(&mut self, i: usize) {
        if !self.conns[i].logged_in {
            return;
        }
        let mut body = vec![0u8; self.body_bytes];
        while self.conns[i].inflight < self.window {
            let to = self.peer_of(i);
            let sent = self.start.elapsed().as_nanos() as u64;
            body[..8].copy_from_slice(&sent.to_le_bytes());
            let c = &mut self.conns[i];
            c.next_client_id += 1;
            let frame = Frame::Send {
                client_id: c.next_client_id,
                to,
                body: &body,
            };
            proto::encode(&frame, &mut c.output);
            c.inflight += 1;
        }
        self.dirty.push(i);
    }

    /// Reads what connection `i` has and answers it.
    fn on_readable(&mut self, i: usize) -> io::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        let mut closed = false;
        loop {
            match self.conns[i].stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.conns[i].input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let input = std::mem::take(&mut self.conns[i].input);
        let mut at = 0;
        let mut refill = false;
        while let Some((frame, used)) = proto::decode(&input[at..], &self.limits)
            .map_err(|e| io::Error::other(e.to_string()))?
        {
            at += used;
            match frame {
                Frame::LoginOk { .. } => {
                    self.conns[i].logged_in = true;
                    refill = true;
                }
                Frame::LoginErr { code, text } => {
                    return Err(io::Error::other(format!("login refused: {code:?} {text}")))
                }
                Frame::Ack { .. } => self.ticks.acks += 1,
                Frame::Deliver {
                    server_id,
                    from,
                    body,
                    ..
                } => {
                    self.ticks.delivers += 1;
                    if let Some(sent) = body.get(..8) {
                        let sent = u64::from_le_bytes(sent.try_into().unwrap_or([0; 8]));
                        let now = self.start.elapsed().as_nanos() as u64;
                        let _ = self
                            .deliver
                            .record(now.saturating_sub(sent).max(1000) / 1000);
                    }
                    let out = &mut self.conns[i].output;
                    proto::encode(&Frame::Delivered { server_id }, out);
                    proto::encode(&Frame::Read { server_id, from }, out);
                    self.dirty.push(i);
                }
                Frame::Receipt {
                    kind: ReceiptKind::Delivered,
                    ..
                } => self.ticks.delivered += 1,
                Frame::Receipt {
                    kind: ReceiptKind::Read,
                    ..
                } => {
                    self.ticks.read += 1;
                    let c = &mut self.conns[i];
                    c.inflight = c.inflight.saturating_sub(1);
                    refill = true;
                }
                Frame::Ping { nonce } => {
                    proto::encode(&Frame::Pong { nonce }, &mut self.conns[i].output);
                    self.dirty.push(i);
                }
                Frame::Error { code, text, .. } => {
                    // A refused SEND never gets its receipts: free its place.
                    if self.ticks.errors == 0 {
                        eprintln!("tern-loadgen: first ERROR: {code:?} {text}");
                    }
                    self.ticks.errors += 1;
                    let c = &mut self.conns[i];
                    c.inflight = c.inflight.saturating_sub(1);
                    refill = true;
                }
                Frame::Bye { reason } => {
                    return Err(io::Error::other(format!("server said BYE({reason})")))
                }
                _ => {}
            }
        }
        if closed {
            return Err(io::Error::other("the server closed a connection"));
        }
        let mut input = input;
        input.drain(..at);
        self.conns[i].input = input;
        if refill {
            self.fill(i);
        }
        Ok(())
    }

    /// Writes what waits on the connections touched since the last call.
    fn flush(&mut self) -> io::Result<()> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &i in &dirty {
            let c = &mut self.conns[i];
            while !c.output.is_empty() {
                match c.stream.write(&c.output) {
                    Ok(n) => {
                        c.output.drain(..n);
                    }
                    // The writable event calls back.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
        Ok(())
    }
}

/// Runs `saturate`; the exit status.
pub fn run(a: SaturateArgs, argv: &[String]) -> io::Result<i32> {
    let users = a.users.unwrap_or(match a.shape {
        Shape::Chat => 2000,
        Shape::Pipelined => 2,
    });
    if users < 2 || a.body_bytes < 8 || a.windows.is_empty() || a.windows.contains(&0) {
        return Err(io::Error::other(
            "need --users >= 2, --body-bytes >= 8 and windows >= 1",
        ));
    }
    let deadline = Instant::now() + a.max_time;
    let mut poll = Poll::new()?;
    let mut lp = Loop {
        conns: Vec::with_capacity(users as usize),
        by_user: HashMap::new(),
        shape: a.shape,
        body_bytes: a.body_bytes,
        window: a.windows[0],
        ticks: Ticks::default(),
        deliver: Histogram::new_with_bounds(1, 60_000_000, 3).map_err(io::Error::other)?,
        start: Instant::now(),
        rng: 0x9E37_79B9_7F4A_7C15,
        limits: Limits::default(),
        dirty: Vec::new(),
    };
    let expires = tern::token::now_unix_s() + 3600;
    for i in 0..users {
        let user = a.user_base + i;
        let mut stream = TcpStream::connect(a.server)?;
        // Small frames each way: Nagle plus delayed ACKs would add 40 ms.
        stream.set_nodelay(true)?;
        poll.registry().register(
            &mut stream,
            Token(i as usize),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let token = tern::token::mint(a.secret.as_bytes(), user, expires);
        let mut output = Vec::new();
        proto::encode(
            &Frame::Login {
                version: proto::VERSION,
                token: token.as_bytes(),
            },
            &mut output,
        );
        lp.by_user.insert(user, i as usize);
        lp.conns.push(Conn {
            stream,
            user,
            logged_in: false,
            inflight: 0,
            next_client_id: 0,
            input: Vec::new(),
            output,
        });
    }
    let mut events = Events::with_capacity(4096);
    let mut steps = Vec::new();
    let pid = a.server_pid.map(|p| p.to_string());
    // Log everyone in before the first step.
    let login_deadline = Instant::now() + Duration::from_secs(60);
    while lp.conns.iter().any(|c| !c.logged_in) {
        if Instant::now() > login_deadline.min(deadline) {
            return Err(io::Error::other("logins did not complete within 60 s"));
        }
        turn(&mut poll, &mut events, &mut lp)?;
    }
    for &window in &a.windows {
        lp.window = window;
        for i in 0..lp.conns.len() {
            lp.fill(i);
        }
        let warm_end = Instant::now() + a.warmup;
        while Instant::now() < warm_end.min(deadline) {
            turn(&mut poll, &mut events, &mut lp)?;
        }
        lp.ticks = Ticks::default();
        lp.deliver.reset();
        let server0 = pid.as_deref().and_then(cpu_seconds);
        let self0 = cpu_seconds("self");
        let t0 = Instant::now();
        let end = t0 + a.step_time;
        while Instant::now() < end.min(deadline) {
            turn(&mut poll, &mut events, &mut lp)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let server = server0.zip(pid.as_deref().and_then(cpu_seconds));
        let me = self0.zip(cpu_seconds("self"));
        let t = &lp.ticks;
        let p99 = lp.deliver.value_at_quantile(0.99);
        let loadgen = me.map(|(a, b)| (b - a) / secs * 100.0);
        let step = Step {
            window,
            seconds: secs,
            msgs_per_s: t.read as f64 / secs,
            acks_per_s: t.acks as f64 / secs,
            delivers_per_s: t.delivers as f64 / secs,
            receipts_delivered_per_s: t.delivered as f64 / secs,
            receipts_read_per_s: t.read as f64 / secs,
            deliver_p50_us: lp.deliver.value_at_quantile(0.5),
            deliver_p99_us: p99,
            server_cpu_us_per_msg: server
                .filter(|_| t.read > 0)
                .map(|(a, b)| (b - a) * 1e6 / t.read as f64),
            server_cpu_percent: server.map(|(a, b)| (b - a) / secs * 100.0),
            loadgen_cpu_percent: loadgen,
            loadgen_bottleneck: loadgen.is_some_and(|p| p >= BOTTLENECK_CPU * 100.0),
            within_bound: t.read > 0 && p99 <= a.p99_bound.as_micros() as u64,
            errors: t.errors,
        };
        print_step(&step);
        steps.push(step);
        if Instant::now() >= deadline {
            eprintln!("tern-loadgen: --max-time reached, stopping the ramp");
            break;
        }
    }
    let best = steps
        .iter()
        .filter(|s| s.within_bound)
        .max_by(|x, y| x.msgs_per_s.total_cmp(&y.msgs_per_s));
    match best {
        Some(b) => println!(
            "highest rate within deliver p99 <= {} us: {:.0} msgs/s (window {}), server CPU {} us/msg",
            a.p99_bound.as_micros(),
            b.msgs_per_s,
            b.window,
            b.server_cpu_us_per_msg
                .map_or("n/a".to_string(), |c| format!("{c:.2}"))
        ),
        None => println!(
            "no step kept deliver p99 <= {} us",
            a.p99_bound.as_micros()
        ),
    }
    let report = Report {
        shape: a.shape,
        users,
        body_bytes: a.body_bytes,
        p99_bound_us: a.p99_bound.as_micros() as u64,
        best_msgs_per_s: best.map(|b| b.msgs_per_s),
        best_window: best.map(|b| b.window),
        best_server_cpu_us_per_msg: best.and_then(|b| b.server_cpu_us_per_msg),
        steps,
        command: argv.to_vec(),
    };
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(io::Error::other)?;
        std::fs::write(path, text + "\n")?;
    }
    Ok(crate::EXIT_OK)
}

/// One poll: read, answer, write.
fn turn(poll: &mut Poll, events: &mut Events, lp: &mut Loop) -> io::Result<()> {
    poll.poll(events, Some(Duration::from_millis(10)))?;
    for (n, ev) in events.iter().enumerate() {
        let i = ev.token().0;
        if ev.is_readable() {
            lp.on_readable(i)?;
        }
        if ev.is_writable() {
            lp.dirty.push(i);
        }
        if (n + 1) % FLUSH_EVERY_EVENTS == 0 {
            lp.flush()?;
        }
    }
    lp.flush()
}

fn print_step(s: &Step) {
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    println!(
        "window {:>4}: {:>9.0} msgs/s (ack {:.0} deliver {:.0} delivered {:.0} read {:.0}/s) \
         deliver p50 {} us p99 {} us, server {} us/msg ({}% CPU), loadgen {}% CPU{}",
        s.window,
        s.msgs_per_s,
        s.acks_per_s,
        s.delivers_per_s,
        s.receipts_delivered_per_s,
        s.receipts_read_per_s,
        s.deliver_p50_us,
        s.deliver_p99_us,
        opt(s.server_cpu_us_per_msg),
        opt(s.server_cpu_percent),
        opt(s.loadgen_cpu_percent),
        if s.within_bound { "" } else { " [over bound]" },
    );
    if s.loadgen_bottleneck {
        println!("warning: load generator is the bottleneck");
    }
}
