//! Interactive chat client, the one the README's 60-second tour uses.
//!
//! ```text
//! cargo run -p tern-client --example chat -- --addr 127.0.0.1:5222 --token <TOKEN> [--read]
//! ```
//!
//! It logs in and prints LOGIN_OK, then sends every stdin line of the form
//! `<to-user> <text>` as a message and prints what the server sends:
//!
//! ```text
//! ✓  #1 accepted by the server (id 17)     ACK
//! ✓✓ 17 delivered to 42                    RECEIPT delivered
//! ✓✓ 17 read by 42                         RECEIPT read (blue on a terminal)
//! from 42: hello                           DELIVER
//! ```
//!
//! It runs on [`Session`]: a dropped connection is re-established with
//! backoff, messages not yet ACKed are sent again, a message delivered twice
//! is shown once, and a PING keeps a quiet connection open. Every message is
//! accepted (DELIVERED) as soon as it is printed, and with `--read` also
//! answered with READ, as if the user had seen it. End of stdin (Ctrl-D)
//! waits briefly for the outstanding ACKs, then exits.
//!
//! Two threads, no async runtime: a stdin thread feeds lines to the main
//! thread, which polls the session between lines.

use std::collections::HashMap;
use std::error::Error;
use std::io::{self, BufRead, IsTerminal};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::mpsc::{self, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use tern::proto::{Limits, ReceiptKind};
use tern_client::session::{Event, Session, SessionConfig};

const USAGE: &str = "\
usage: chat --token <TOKEN> [--addr <ADDR>] [--read]

  --addr <ADDR>    server address (default 127.0.0.1:5222)
  --token <TOKEN>  login token (v1.<user>.<expiry>.<mac>); default: $TERN_TOKEN
  --read           send READ for every message received, as well as DELIVERED
  -h, --help       show this help

Then type `<to-user> <text>` lines; end of input (Ctrl-D) quits.";

/// Where to connect when `--addr` is not given.
const ADDR_DEFAULT: &str = "127.0.0.1:5222";

/// After end of stdin, how long to wait for the ACKs of messages just sent.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// How long one poll of the session waits before stdin is looked at again.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// Parsed command line.
struct Args {
    addr: SocketAddr,
    token: String,
    read: bool,
}

/// What the stdin thread reports.
enum Input {
    /// A line (without its line ending).
    Line(String),
    /// Stdin ended, or failed.
    Done(Option<io::Error>),
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
    let mut session = Session::new(SessionConfig::new(args.addr, &args.token));
    if io::stdin().is_terminal() {
        eprintln!("type `<to-user> <text>` and press Enter; Ctrl-D quits");
    }
    let (input, lines) = mpsc::channel();
    // Not joined: it may sit in a blocking stdin read when we exit.
    thread::spawn(move || read_stdin(&input));

    let style = Style::detect();
    let body_bytes_max = Limits::default().body_bytes_max;
    // The session's client ids are large; the user sees #1, #2, ...
    let mut numbers: HashMap<u64, u64> = HashMap::new();
    // Set at end of stdin: how long we still wait for answers.
    let mut stdin_done_at: Option<Instant> = None;
    loop {
        if let Some(t) = stdin_done_at {
            if session.outbox_len() == 0 {
                return Ok(());
            }
            if t.elapsed() >= ANSWER_WAIT {
                eprintln!(
                    "chat: {} message(s) not acknowledged yet; quitting anyway",
                    session.outbox_len()
                );
                return Ok(());
            }
        }
        loop {
            match lines.try_recv() {
                Ok(Input::Line(line)) => {
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
                    let id = session.send(to, text.as_bytes())?;
                    numbers.insert(id, numbers.len() as u64 + 1);
                }
                Ok(Input::Done(error)) => {
                    if let Some(e) = error {
                        eprintln!("chat: reading stdin: {e}");
                    }
                    stdin_done_at = Some(Instant::now());
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let number = |numbers: &HashMap<u64, u64>, id: u64| numbers.get(&id).copied().unwrap_or(0);
        match session.poll(POLL_SLICE)? {
            Some(Event::Connected { offline_count }) => {
                println!("LOGIN_OK offline_count={offline_count}")
            }
            Some(Event::Disconnected { reason }) => {
                eprintln!("chat: disconnected ({reason}); reconnecting")
            }
            Some(Event::Acked {
                client_id,
                server_id,
                ..
            }) => println!(
                "✓  #{} accepted by the server (id {server_id})",
                number(&numbers, client_id)
            ),
            Some(Event::Retrying { client_id, code }) => println!(
                "…  #{} refused for now ({code}), sent again shortly",
                number(&numbers, client_id)
            ),
            Some(Event::Refused {
                client_id,
                code,
                text,
            }) => println!(
                "✗  #{} refused: {code}: {text}",
                number(&numbers, client_id)
            ),
            Some(Event::Message {
                server_id,
                from,
                body,
                ..
            }) => {
                println!("from {from}: {}", String::from_utf8_lossy(&body));
                session.accept(server_id)?;
                if args.read {
                    session.read(server_id, from);
                }
            }
            Some(Event::Receipt {
                kind: ReceiptKind::Delivered,
                server_id,
                peer,
            }) => println!("✓✓ {server_id} delivered to {peer}"),
            Some(Event::Receipt {
                kind: ReceiptKind::Read,
                server_id,
                peer,
            }) => println!("{} {server_id} read by {peer}", style.blue("✓✓")),
            None => {}
        }
    }
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
fn read_stdin(input: &mpsc::Sender<Input>) {
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
            Some(error) => Input::Done(error),
            None => Input::Line(String::from_utf8_lossy(&line).into_owned()),
        };
        let last = matches!(event, Input::Done(_));
        if input.send(event).is_err() || last {
            return;
        }
    }
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
