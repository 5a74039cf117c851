//! Offline-delivery ledger: queue messages to offline users, write down
//! exactly what the server ACKed, and later check that those users receive
//! exactly that. The systemd test (`tuning/linux/systemd-test.sh`) uses it
//! across restarts, `kill -9` and reboots of the server.
//!
//! ```text
//! ledger send  --addr A --secret S --batch NAME --to FIRST-LAST --per-user M --ledger FILE [--from U]
//! ledger check --addr A --secret S --batch NAME --ledger FILE
//! ```
//!
//! `send` logs in as user `--from` (default 1), sends `--per-user` messages
//! to each user of `FIRST-LAST` (who must not be connected), waits for every
//! ACK and appends one line per ACKed message to FILE:
//! `batch <TAB> to <TAB> server_id <TAB> body`.
//!
//! `check` logs in as each recipient of the batch in FILE and requires
//! LOGIN_OK's `offline_count` and the DELIVER frames that follow to be
//! exactly the ledger's messages for that user, in order, with the same
//! server ids, sender and bodies, and nothing after them. It answers each
//! with DELIVERED (so the queue ends empty) and confirms with a PING.
//!
//! Exit status: 0 all good; 1 a message was not ACKed (send) or was lost,
//! changed, duplicated or unexpected (check); 2 bad usage, connection or
//! login failure.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tern::proto::OwnedFrame;
use tern_client::Client;

const USAGE: &str = "\
usage: ledger send  --addr A --secret S --batch NAME --to FIRST-LAST --per-user M --ledger FILE [--from U]
       ledger check --addr A --secret S --batch NAME --ledger FILE";

/// Lifetime of the tokens this tool mints.
const TOKEN_TTL_S: u64 = 3600;

/// How long `send` waits for all ACKs, and `check` for one user's DELIVERs.
const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// After the expected DELIVERs, how long `check` listens for extra ones.
const EXTRA_WAIT: Duration = Duration::from_millis(300);

/// Most messages one `send` may queue (keeps every run bounded).
const MESSAGES_MAX: u64 = 100_000;

/// Parsed command line.
struct Args {
    command: String,
    addr: SocketAddr,
    secret: String,
    batch: String,
    to: (u64, u64),
    per_user: u64,
    ledger: PathBuf,
    from: u64,
}

/// One ACKed message, as written to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    to: u64,
    server_id: u64,
    body: String,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("ledger: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "send" => send(&args),
        _ => check(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ledger {} {}: {e}", args.command, args.batch);
            ExitCode::from(2)
        }
    }
}

/// Parses `COMMAND --flag value ...`; every flag is required unless noted.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, Box<dyn Error>> {
    let command = it.next().ok_or("missing command")?;
    if command != "send" && command != "check" {
        return Err(format!("unknown command {command:?}").into());
    }
    let mut flags = BTreeMap::new();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        flags.insert(name.to_string(), value);
    }
    let mut take = |name: &str| -> Result<String, Box<dyn Error>> {
        flags
            .remove(name)
            .ok_or_else(|| format!("--{name} is required").into())
    };
    let addr = take("addr")?.parse()?;
    let secret = take("secret")?;
    let batch = take("batch")?;
    if batch.contains(['\t', '\n']) {
        return Err("--batch must not contain tabs or newlines".into());
    }
    let ledger = PathBuf::from(take("ledger")?);
    let (mut to, mut per_user, mut from) = ((0u64, 0u64), 0u64, 1u64);
    if command == "send" {
        let range = take("to")?;
        let (first, last) = range.split_once('-').ok_or("--to wants FIRST-LAST")?;
        to = (first.parse()?, last.parse()?);
        per_user = take("per-user")?.parse()?;
        if let Ok(f) = take("from") {
            from = f.parse()?;
        }
        let users = to.1.checked_sub(to.0).ok_or("--to: LAST < FIRST")? + 1;
        if to.0 == 0 || from == 0 || per_user == 0 || users.saturating_mul(per_user) > MESSAGES_MAX
        {
            return Err(format!(
                "user ids start at 1, --per-user at least 1, at most {MESSAGES_MAX} messages"
            )
            .into());
        }
        if (to.0..=to.1).contains(&from) {
            return Err("--from must not be one of the recipients".into());
        }
    }
    if let Some(name) = flags.keys().next() {
        return Err(format!("unknown flag --{name}").into());
    }
    Ok(Args {
        command,
        addr,
        secret,
        batch,
        to,
        per_user,
        ledger,
        from,
    })
}

/// A login token for `user`, valid for [`TOKEN_TTL_S`].
fn token(args: &Args, user: u64) -> String {
    tern::token::mint(
        args.secret.as_bytes(),
        user,
        tern::token::now_unix_s() + TOKEN_TTL_S,
    )
}

/// Queues the batch and appends every ACKed message to the ledger.
/// Returns false if any message was not ACKed.
fn send(args: &Args) -> Result<bool, Box<dyn Error>> {
    let (mut client, _) = Client::login(args.addr, &token(args, args.from))?;
    let mut pending = BTreeMap::new();
    let mut client_id = 0;
    for to in args.to.0..=args.to.1 {
        for seq in 1..=args.per_user {
            client_id += 1;
            let body = format!("{} to {to} #{seq}", args.batch);
            client.send_msg(client_id, to, body.as_bytes())?;
            pending.insert(client_id, (to, body));
        }
    }
    let total = pending.len();
    let mut ledger = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.ledger)
        .map_err(|e| format!("cannot open {}: {e}", args.ledger.display()))?;
    let deadline = Instant::now() + ANSWER_WAIT;
    let mut refused = 0;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = match client.recv_timeout(left)? {
            Some(frame) => frame,
            None => break,
        };
        match frame {
            OwnedFrame::Ack {
                client_id,
                server_id,
                ..
            } => {
                let Some((to, body)) = pending.remove(&client_id) else {
                    eprintln!("ledger send: ACK for unknown client id {client_id}");
                    return Ok(false);
                };
                writeln!(ledger, "{}\t{to}\t{server_id}\t{body}", args.batch)?;
            }
            OwnedFrame::Error {
                client_id,
                code,
                text,
            } => {
                eprintln!("ledger send: message {client_id} refused: {code:?} {text}");
                pending.remove(&client_id);
                refused += 1;
            }
            _ => {}
        }
    }
    ledger.sync_all()?;
    let acked = total - pending.len() - refused;
    println!(
        "ledger send {}: {acked} of {total} messages ACKed to users {}-{} ({refused} refused, {} unanswered)",
        args.batch,
        args.to.0,
        args.to.1,
        pending.len()
    );
    Ok(acked == total)
}

/// Reads the ledger's entries of one batch, grouped by recipient in order.
fn read_batch(args: &Args) -> Result<BTreeMap<u64, Vec<Entry>>, Box<dyn Error>> {
    let text = std::fs::read_to_string(&args.ledger)
        .map_err(|e| format!("cannot read {}: {e}", args.ledger.display()))?;
    let mut by_user: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.splitn(4, '\t').collect();
        let [batch, to, server_id, body] = fields[..] else {
            return Err(format!("{}:{}: malformed line", args.ledger.display(), n + 1).into());
        };
        if batch != args.batch {
            continue;
        }
        let entry = Entry {
            to: to.parse()?,
            server_id: server_id.parse()?,
            body: body.to_string(),
        };
        by_user.entry(entry.to).or_default().push(entry);
    }
    Ok(by_user)
}

/// Logs in as every recipient of the batch and compares what arrives with
/// the ledger. Returns false on any difference.
fn check(args: &Args) -> Result<bool, Box<dyn Error>> {
    let by_user = read_batch(args)?;
    if by_user.is_empty() {
        return Err(format!("no messages of batch {} in the ledger", args.batch).into());
    }
    let (mut expected_total, mut delivered, mut faults) = (0, 0, 0);
    for (&user, want) in &by_user {
        expected_total += want.len();
        let (mut client, info) = Client::login(args.addr, &token(args, user))?;
        if info.offline_count != want.len() as u64 {
            eprintln!(
                "ledger check: user {user}: LOGIN_OK says {} waiting, the ledger has {}",
                info.offline_count,
                want.len()
            );
            faults += 1;
        }
        // The server announces how many follow; wait for those, then listen
        // a little longer so that a miscount cannot hide an extra one.
        let announced = usize::try_from(info.offline_count).unwrap_or(usize::MAX);
        let deadline = Instant::now() + ANSWER_WAIT;
        let mut got = Vec::new();
        while got.len() < announced {
            let left = deadline.saturating_duration_since(Instant::now());
            match client.recv_timeout(left)? {
                Some(OwnedFrame::Deliver {
                    server_id, body, ..
                }) => got.push((server_id, body)),
                Some(_) => {}
                None => break,
            }
        }
        while let Some(frame) = client.recv_timeout(EXTRA_WAIT)? {
            if let OwnedFrame::Deliver {
                server_id, body, ..
            } = frame
            {
                got.push((server_id, body));
            }
        }
        for (server_id, _) in &got {
            client.send_delivered(*server_id)?;
        }
        // PONG comes after the server has handled every DELIVERED above.
        client.ping(1)?;
        for (i, w) in want.iter().enumerate() {
            match got.get(i) {
                Some((id, body)) if *id == w.server_id && body == w.body.as_bytes() => {
                    delivered += 1
                }
                Some((id, body)) => {
                    eprintln!(
                        "ledger check: user {user}: message {} is id {id} {:?}, the ledger has id {} {:?}",
                        i + 1,
                        String::from_utf8_lossy(body),
                        w.server_id,
                        w.body
                    );
                    faults += 1;
                }
                None => {
                    eprintln!(
                        "ledger check: user {user}: LOST id {} {:?}",
                        w.server_id, w.body
                    );
                    faults += 1;
                }
            }
        }
        // Anything after the expected messages is a duplicate or a stranger.
        for (id, body) in got.iter().skip(want.len()) {
            eprintln!(
                "ledger check: user {user}: unexpected extra DELIVER id {id} {:?}",
                String::from_utf8_lossy(body)
            );
            faults += 1;
        }
    }
    println!(
        "ledger check {}: {delivered} of {expected_total} ACKed messages delivered as ACKed to {} users, {faults} faults",
        args.batch,
        by_user.len()
    );
    Ok(faults == 0 && delivered == expected_total)
}
