//! Interactive chat client, the one the README's 60-second tour uses.
//!
//! ```text
//! cargo run -p tern-client --example chat -- --addr 127.0.0.1:5222 --token <TOKEN> [--read]
//! ```
//!
//! It logs in and prints LOGIN_OK, then sends every stdin line of the form
//! `<to-user> <text>` as a message and prints every frame the server sends:
//!
//! ```text
//! ✓  #1 accepted by the server (id 17)     ACK
//! ✓✓ 17 delivered to 42                    RECEIPT delivered
//! ✓✓ 17 read by 42                         RECEIPT read (blue on a terminal)
//! from 42: hello                           DELIVER
//! ```
//!
//! Every DELIVER is answered with DELIVERED at once, and with `--read` also
//! with READ, as if the user had seen it. End of stdin (Ctrl-D) waits briefly
//! for the outstanding ACKs, then exits.
//!
//! Threads, no async runtime: a stdin thread feeds lines to the main thread,
//! a reader thread owns the [`Client`] and prints what arrives, and both write
//! through one mutex-guarded clone of the socket so frames never interleave.

use std::error::Error;
use std::io::{self, BufRead, IsTerminal, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tern::proto::{self, Frame, Limits, OwnedFrame, ReceiptKind};
use tern_client::{Client, ClientError};

const USAGE: &str = "\
usage: chat --token <TOKEN> [--addr <ADDR>] [--read]

  --addr <ADDR>    server address (default 127.0.0.1:5222)
  --token <TOKEN>  login token (v1.<user>.<expiry>.<mac>); default: $TERN_TOKEN
  --read           send READ for every message received, as well as DELIVERED
  -h, --help       show this help

Then type `<to-user> <text>` lines; end of input (Ctrl-D) quits.";

/// Where to connect when `--addr` is not given.
const ADDR_DEFAULT: &str = "127.0.0.1:5222";

/// The reader sends PING after this long without hearing from the server,
/// well inside the server's default 5-minute idle timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);

/// After end of stdin, how long to wait for the ACKs of messages just sent.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Parsed command line.
struct Args {
    addr: SocketAddr,
    token: String,
    read: bool,
}

/// What the main thread waits for.
enum Event {
    /// A line from stdin (without its line ending).
    Line(String),
    /// Stdin ended, or failed.
    StdinDone(Option<io::Error>),
    /// The server answered one of our SENDs (ACK, or ERROR with its client id).
    Answered,
    /// The reader stopped: the connection is gone. Carries the reason, or
    /// `None` when we closed it ourselves.
    ReaderDone(Option<String>),
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chat: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments; `Ok(None)` means help was asked for.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut addr = None;
    let mut token = None;
    let mut read = false;
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--addr" => addr = Some(value("--addr")?),
            "--token" => token = Some(value("--token")?),
            "--read" if inline.is_none() => read = true,
            "--read" => return Err("--read takes no value".to_string()),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let addr = addr.as_deref().unwrap_or(ADDR_DEFAULT);
    let addr = addr
        .parse()
        .map_err(|e| format!("--addr {addr:?}: {e} (expected e.g. 127.0.0.1:5222)"))?;
    let token = match token {
        Some(token) => token,
        None => std::env::var("TERN_TOKEN")
            .map_err(|_| "--token is required (or set TERN_TOKEN)".to_string())?,
    };
    Ok(Some(Args { addr, token, read }))
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let (client, info) = Client::login(args.addr, &args.token)?;
    println!(
        "LOGIN_OK server_time_ms={} offline_count={}",
        info.server_time_ms, info.offline_count
    );
    let interactive = io::stdin().is_terminal();
    if interactive {
        eprintln!("type `<to-user> <text>` and press Enter; Ctrl-D quits");
    }

    let writer = Arc::new(Mutex::new(client.try_clone_stream()?));
    let quitting = Arc::new(AtomicBool::new(false));
    let (events, inbox) = mpsc::channel();

    let reader = {
        let writer = Arc::clone(&writer);
        let quitting = Arc::clone(&quitting);
        let events = events.clone();
        let style = Style::detect();
        thread::spawn(move || read_loop(client, &writer, &quitting, &events, args.read, style))
    };
    {
        let events = events.clone();
        // Not joined: it may sit in a blocking stdin read when we exit.
        thread::spawn(move || read_stdin(&events));
    }
    drop(events);

    let body_bytes_max = Limits::default().body_bytes_max;
    let mut client_id: u64 = 0;
    let mut unanswered: u64 = 0;
    // Set at end of stdin: how long we still wait for answers.
    let mut stdin_done_at: Option<Instant> = None;
    let outcome = loop {
        if stdin_done_at.is_some() && unanswered == 0 {
            break Ok(());
        }
        let event = match stdin_done_at {
            None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => inbox.recv_timeout(ANSWER_WAIT.saturating_sub(t.elapsed())),
        };
        match event {
            Ok(Event::Line(line)) => {
                let Some((to, text)) = parse_line(&line) else {
                    continue;
                };
                if text.len() > body_bytes_max {
                    eprintln!(
                        "chat: message of {} bytes is over the {body_bytes_max}-byte limit",
                        text.len()
                    );
                    continue;
                }
                client_id += 1;
                write_frame(
                    &writer,
                    &Frame::Send {
                        client_id,
                        to,
                        body: text.as_bytes(),
                    },
                )?;
                unanswered += 1;
            }
            Ok(Event::StdinDone(error)) => {
                if let Some(e) = error {
                    eprintln!("chat: reading stdin: {e}");
                }
                stdin_done_at = Some(Instant::now());
            }
            Ok(Event::Answered) => unanswered = unanswered.saturating_sub(1),
            Ok(Event::ReaderDone(reason)) => {
                break Err(reason
                    .unwrap_or_else(|| "connection closed".to_string())
                    .into())
            }
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("chat: {unanswered} message(s) not acknowledged yet; quitting anyway");
                break Ok(());
            }
            Err(RecvTimeoutError::Disconnected) => {
                unreachable!("the reader always reports before it ends")
            }
        }
    };

    // Wake the reader out of its blocking read and let it finish quietly.
    quitting.store(true, Ordering::SeqCst);
    let _ = lock(&writer).shutdown(Shutdown::Both);
    let _ = reader.join();
    outcome
}

/// Splits `<to-user> <text>`. Blank lines give `None`; a line that is not in
/// that form is reported on stderr and gives `None` too.
fn parse_line(line: &str) -> Option<(u64, &str)> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (to, text) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let text = text.trim_start();
    match to.parse::<u64>() {
        Ok(to) if to != 0 && !text.is_empty() => Some((to, text)),
        _ => {
            eprintln!("chat: expected `<to-user> <text>`, e.g. `42 hello`");
            None
        }
    }
}

/// Forwards stdin lines to the main thread until end of input.
fn read_stdin(events: &mpsc::Sender<Event>) {
    let mut stdin = io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        let done = match stdin.read_until(b'\n', &mut line) {
            Ok(0) => Some(None),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Some(Some(e)),
        };
        let event = match done {
            Some(error) => Event::StdinDone(error),
            None => Event::Line(String::from_utf8_lossy(&line).into_owned()),
        };
        let last = matches!(event, Event::StdinDone(_));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// Receives and prints frames, answering DELIVER (and PING) on the spot,
/// until the connection ends. Always reports `ReaderDone` last.
fn read_loop(
    mut client: Client,
    writer: &Mutex<TcpStream>,
    quitting: &AtomicBool,
    events: &mpsc::Sender<Event>,
    send_read: bool,
    style: Style,
) {
    client.set_read_timeout(KEEPALIVE_INTERVAL);
    let mut ping_nonce: u64 = 0;
    let reason = loop {
        let frame = match client.recv() {
            Ok(frame) => frame,
            Err(ClientError::Timeout) => {
                ping_nonce += 1;
                if let Err(e) = write_frame(writer, &Frame::Ping { nonce: ping_nonce }) {
                    break Some(format!("sending PING: {e}"));
                }
                continue;
            }
            Err(ClientError::Closed) => break Some("connection closed by server".to_string()),
            Err(e) => break Some(e.to_string()),
        };
        if let Err(e) = show_and_answer(&frame, writer, events, send_read, style) {
            break Some(format!("answering {}: {e}", frame.as_frame().name()));
        }
    };
    let reason = if quitting.load(Ordering::SeqCst) {
        None
    } else {
        reason
    };
    let _ = events.send(Event::ReaderDone(reason));
}

/// Prints one frame in a readable form and sends whatever it calls for.
fn show_and_answer(
    frame: &OwnedFrame,
    writer: &Mutex<TcpStream>,
    events: &mpsc::Sender<Event>,
    send_read: bool,
    style: Style,
) -> io::Result<()> {
    match frame {
        OwnedFrame::Ack {
            client_id,
            server_id,
            ..
        } => {
            println!("✓  #{client_id} accepted by the server (id {server_id})");
            let _ = events.send(Event::Answered);
        }
        OwnedFrame::Receipt {
            kind: ReceiptKind::Delivered,
            server_id,
            peer,
        } => println!("✓✓ {server_id} delivered to {peer}"),
        OwnedFrame::Receipt {
            kind: ReceiptKind::Read,
            server_id,
            peer,
        } => println!("{} {server_id} read by {peer}", style.blue("✓✓")),
        OwnedFrame::Deliver {
            server_id,
            from,
            body,
            ..
        } => {
            println!("from {from}: {}", String::from_utf8_lossy(body));
            write_frame(
                writer,
                &Frame::Delivered {
                    server_id: *server_id,
                },
            )?;
            if send_read {
                write_frame(
                    writer,
                    &Frame::Read {
                        server_id: *server_id,
                        from: *from,
                    },
                )?;
            }
        }
        OwnedFrame::Error {
            code,
            client_id,
            text,
        } => {
            if *client_id == 0 {
                println!("ERROR {code}: {text}");
            } else {
                println!("✗  #{client_id} refused: {code}: {text}");
                let _ = events.send(Event::Answered);
            }
        }
        OwnedFrame::Bye { reason } => println!("BYE {reason}"),
        OwnedFrame::Ping { nonce } => write_frame(writer, &Frame::Pong { nonce: *nonce })?,
        OwnedFrame::Pong { .. } => {}
        other => println!("unexpected {}: {other:?}", other.as_frame().name()),
    }
    Ok(())
}

/// Encodes `frame` and writes it whole while holding the writer lock, so
/// frames from the two threads never interleave.
fn write_frame(writer: &Mutex<TcpStream>, frame: &Frame<'_>) -> io::Result<()> {
    let mut out = Vec::with_capacity(proto::encoded_len(frame));
    proto::encode(frame, &mut out);
    lock(writer).write_all(&out)
}

/// Locks the writer; a panic in the other thread does not corrupt a stream
/// handle, so a poisoned lock is still usable.
fn lock(writer: &Mutex<TcpStream>) -> std::sync::MutexGuard<'_, TcpStream> {
    writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Terminal colours, on only when stdout is a terminal and `NO_COLOR` is unset.
#[derive(Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn detect() -> Style {
        Style {
            color: io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn blue(self, s: &str) -> String {
        if self.color {
            format!("\x1b[34m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}
