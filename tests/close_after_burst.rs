//! A client that closes its socket right after a burst of traffic is seen as
//! closed on every backend: its user goes offline, its connection slot is
//! freed, and messages sent to it afterwards wait for its next login.
//!
//! The closes come with the burst still in flight: a plain close (FIN, or RST
//! when the server's answers are unread), a half-close while the server still
//! has answers to send, and an abortive close (SO_LINGER 0, RST).

mod common;

use common::*;
use std::time::Duration;

use tern::proto::OwnedFrame;
use tern_client::Client;

/// Clients closing together in one round.
const CLIENTS: u64 = 12;
/// Rounds per way of closing: the close races the server's reads.
const ROUNDS: u64 = 6;
/// SENDs in each client's burst.
const BURST: u64 = 48;
/// Body of a burst message.
const BODY_BYTES: usize = 512;
/// The user that sends the probes after the closes.
const PROBER: u64 = 1;

/// How a client ends its connection after the burst.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// `close` at once, answers unread (the kernel sends FIN or RST).
    Close,
    /// FIN first, then read until the server closes; the server still has
    /// ACKs to send when it sees the end of input.
    HalfClose,
    /// SO_LINGER 0: RST at once.
    Reset,
}

/// Users of one round: a block per ending and round, so none is reused.
fn users(ending: Ending, round: u64) -> Vec<u64> {
    let base = 1000 + (ending as u64) * 10_000 + round * 100;
    (base..base + CLIENTS).collect()
}

/// Logs `users` in and ends them with [`burst_and_close`], each sending
/// to the next.
fn ring_burst_and_close(srv: &TestServer, users: &[u64], ending: Ending) {
    let clients = users
        .iter()
        .enumerate()
        .map(|(i, &u)| (srv.login(u), users[(i + 1) % users.len()]))
        .collect();
    burst_and_close(clients, ending);
}

/// Has each client send a pipelined burst to its peer (confirming what it
/// got so far), and ends them all `ending`, without waiting for answers.
fn burst_and_close(mut clients: Vec<(Client, u64)>, ending: Ending) {
    for (client, to) in &mut clients {
        for n in 0..BURST {
            client
                .send_msg(n + 1, *to, &indexed_body(n, BODY_BYTES))
                .unwrap();
        }
    }
    // DELIVEREDs for a few frames that already arrived, still without
    // waiting; the rest stays unread.
    for (client, _) in &mut clients {
        for _ in 0..4 {
            let Ok(Some(frame)) = client.recv_timeout(Duration::ZERO) else {
                break;
            };
            if let OwnedFrame::Deliver { server_id, .. } = frame {
                let _ = client.send_delivered(server_id);
            }
        }
    }
    for (client, _) in clients {
        match ending {
            Ending::Close => drop(client),
            Ending::HalfClose => {
                let mut client = client;
                client.shutdown_write().unwrap();
                client
                    .wait_closed(WAIT)
                    .unwrap_or_else(|e| panic!("server kept a half-closed connection: {e}"));
            }
            Ending::Reset => {
                socket2::SockRef::from(client.stream())
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(client);
            }
        }
    }
}

/// After the closes: nobody online, no connection open, a probe to each
/// user is queued, and each gets its probe at its next login.
fn expect_offline(srv: &TestServer, users: &[u64], ending: Ending, round: u64) {
    let ok = wait_for(|| srv.info_u64("Users_online") == 0 && srv.info_u64("Conns") == 0);
    assert!(
        ok,
        "{ending:?}, round {round}: closed clients stayed: Users_online {}, Conns {}",
        srv.info_u64("Users_online"),
        srv.info_u64("Conns"),
    );
    let mut prober = srv.login(PROBER);
    // Client ids must not repeat across rounds (they would be deduplicated):
    // the receiver's id is unique.
    for &user in users {
        prober.send_msg(user, user, b"probe").unwrap();
        recv_ack(&mut prober, user);
    }
    drop(prober);
    let n = users.len() as u64;
    // `Queued` is a gauge published by each shard's timer, so it is only
    // checked to reach the probes, not counted exactly.
    let mut last = 0;
    let stored = wait_for(|| {
        last = srv.info_u64("Queued");
        last >= n
    });
    assert!(
        stored,
        "{ending:?}, round {round}: {n} probes to offline users, Queued {last}"
    );
    for &user in users {
        let mut client = srv.login(user);
        let probe = loop {
            let d = recv_deliver(&mut client);
            client.send_delivered(d.server_id).unwrap();
            if d.from == PROBER {
                break d;
            }
        };
        assert_eq!(probe.body, b"probe", "{ending:?}: user {user}");
    }
    srv.wait_info("Users_online", |u| u == 0);
}

#[test]
fn clients_closing_after_a_burst_go_offline() {
    let srv = TestServer::start();
    for ending in [Ending::Close, Ending::HalfClose, Ending::Reset] {
        for round in 0..ROUNDS {
            let users = users(ending, round);
            ring_burst_and_close(&srv, &users, ending);
            expect_offline(&srv, &users, ending, round);
        }
    }
}

/// The server's output to a client is backed up (the client reads nothing)
/// when the client sends a burst and closes: the connection still ends.
#[test]
fn client_closing_with_output_pending_goes_offline() {
    let srv = TestServer::start();
    for ending in [Ending::Close, Ending::HalfClose, Ending::Reset] {
        for round in 0..ROUNDS {
            let (reader, writer) = (2 + round * 2, 3 + round * 2);
            let reader = reader + (ending as u64) * 1000;
            let writer = writer + (ending as u64) * 1000;
            let quiet = srv.login(reader);
            let mut loud = srv.login(writer);
            // 96 KiB towards `quiet`, which never reads: under the
            // per-connection output limit, so nothing is closed for it.
            for n in 0..48 {
                loud.send_msg(n + 1, reader, &indexed_body(n, 2048))
                    .unwrap();
            }
            for n in 0..48 {
                recv_ack(&mut loud, n + 1);
            }
            drop(loud);
            burst_and_close(vec![(quiet, writer)], ending);
            expect_offline(&srv, &[reader, writer], ending, round);
        }
    }
}
