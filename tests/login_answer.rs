//! Every LOGIN gets its answer frame before the connection closes, also
//! right after other connections ended with a close (issue 15).
//!
//! A refused LOGIN (here: an unsupported version, LOGIN_ERR then close) is
//! shut down by the server and closed by the client at once. On io_uring
//! the server's SHUTDOWN could still be in the kernel's worker pool when
//! the slot was CLOSEd and handed to the next accepted connection, which was
//! then shut down instead: its LOGIN saw a bare close, no frame.

mod common;

use common::*;
use std::time::{Duration, Instant};

use tern::proto::{ErrorCode, VERSION_2};
use tern_client::{Client, ClientError};

/// Rounds of logins; each round's sessions are dropped at its end.
const ROUNDS: u64 = 20;
/// Connections per round, alternately refused and logged in.
const LOGINS: u64 = 40;
/// Bound on the whole loop, whatever the machine's load.
const LOOP_MAX: Duration = Duration::from_secs(60);

#[test]
fn a_login_after_refused_logins_closed_by_their_clients_is_answered() {
    let server = TestServer::start();
    let started = Instant::now();
    let mut kept = Vec::new();
    for round in 0..ROUNDS {
        if started.elapsed() > LOOP_MAX {
            break;
        }
        for user in 1..=LOGINS {
            let mut client = Client::connect(server.addr).expect("connect");
            if user % 2 == 0 {
                // LOGIN_ERR, then the server shuts down; the client closes.
                match client.login_here_version(&token(user), 99) {
                    Err(ClientError::LoginRejected { code, .. }) => {
                        assert_eq!(code, ErrorCode::BadVersion, "round {round} user {user}")
                    }
                    other => panic!("round {round} user {user}: {:?}", other.map(|_| ())),
                }
                continue;
            }
            match client.login_here_version(&token(user), VERSION_2) {
                Ok(_) => kept.push(client),
                Err(e) => panic!("round {round} user {user}: no LOGIN_OK: {e}"),
            }
        }
        kept.clear();
    }
}
