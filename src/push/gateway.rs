//! The push thread: takes notices from the shards, keeps them in a
//! [`Table`], and POSTs them to the push gateway. It is the only place that
//! waits on the network for a push; shards only ever `try_send`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::table::Table;
use super::wire::{body_json, signature, SIGNATURE_HEADER};
use super::{Notice, Notices, PushStats};
use crate::config::Config;

/// Most bytes of a gateway's answer read (and thrown away) so its
/// connection can be reused.
const ANSWER_BYTES_MAX: u64 = 64 * 1024;

/// The `push_*` settings the thread runs with.
#[derive(Clone, Debug)]
struct Settings {
    url: String,
    secret: Vec<u8>,
    interval: Duration,
    queue_len_max: usize,
    devices_max: usize,
    batch_max: usize,
    retries_max: u32,
    backoff: Duration,
    timeout: Duration,
}

/// The running push thread. It ends once every [`Notices`] is dropped
/// (every shard has stopped); notices it still holds then are not sent.
#[derive(Debug)]
pub struct Pusher {
    thread: Option<JoinHandle<()>>,
    stats: Arc<PushStats>,
}

impl Pusher {
    /// Starts the push thread when `push_url` is set, returning it and the
    /// queue's sending end (clone it per shard); `None` without a URL.
    pub fn start(config: &Config) -> std::io::Result<Option<(Pusher, Notices)>> {
        let (Some(url), Some(secret)) = (&config.push_url, &config.push_secret) else {
            return Ok(None);
        };
        let settings = Settings {
            url: url.clone(),
            secret: secret.as_bytes().to_vec(),
            interval: Duration::from_millis(config.push_interval_ms),
            queue_len_max: config.push_queue_len_max,
            devices_max: config.push_devices_max,
            batch_max: config.push_batch_max,
            retries_max: config.push_retries_max,
            backoff: Duration::from_millis(config.push_retry_backoff_ms),
            timeout: Duration::from_millis(config.push_timeout_ms),
        };
        let stats = Arc::new(PushStats::default());
        let (notices, rx) = Notices::channel(settings.queue_len_max, stats.clone());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("tern-push".into())
            .spawn(move || run(rx, &settings, &thread_stats))?;
        let pusher = Pusher {
            thread: Some(thread),
            stats,
        };
        Ok(Some((pusher, notices)))
    }

    /// The push counters, for the stats view.
    pub fn stats(&self) -> Arc<PushStats> {
        self.stats.clone()
    }

    /// Waits for the thread to end; call once every [`Notices`] is gone,
    /// else this waits for that. At most one POST (`push_timeout_ms`) is
    /// in flight.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the push thread panicked");
            }
        }
    }
}

/// A batch that failed and waits for its next attempt.
struct Retry {
    /// Attempts that failed so far (1..=retries_max).
    failed: u32,
    at: Instant,
}

/// The thread's loop: fold notices in, POST what is due, one POST at a time
/// (a batch being retried holds the next ones back, so a gateway that is
/// down gets one attempt per backoff, not one per notice).
fn run(rx: Receiver<Notice>, s: &Settings, stats: &PushStats) {
    let agent = ureq::AgentBuilder::new()
        .timeout(s.timeout)
        .redirects(0)
        .user_agent(concat!("tern/", env!("CARGO_PKG_VERSION")))
        .build();
    let mut table = Table::new(s.interval, s.devices_max);
    let mut batch: Vec<Notice> = Vec::with_capacity(s.batch_max);
    let mut retry: Option<Retry> = None;
    let note = |table: &mut Table, n: Notice| {
        if !table.note(&n) {
            stats.table_full.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        let now = Instant::now();
        let post_at = match &retry {
            Some(r) => Some(r.at),
            None => table.has_ready().then_some(now),
        };
        let wake = match (post_at, table.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let first = match wake {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match first {
            Ok(n) => note(&mut table, n),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // What else is queued, at most one queue's worth per turn.
        for n in rx.try_iter().take(s.queue_len_max) {
            note(&mut table, n);
        }
        let now = Instant::now();
        table.expire(now);
        let due = match &retry {
            Some(r) => now >= r.at,
            None => {
                batch.clear();
                table.take(now, s.batch_max, &mut batch);
                !batch.is_empty()
            }
        };
        if due {
            match post(&agent, s, &batch) {
                Ok(()) => {
                    stats.posts.fetch_add(1, Ordering::Relaxed);
                    stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    retry = None;
                    batch.clear();
                }
                Err(e) => {
                    stats.post_failures.fetch_add(1, Ordering::Relaxed);
                    let failed = retry.as_ref().map_or(1, |r| r.failed + 1);
                    if failed > s.retries_max {
                        log::warn!(
                            "push gateway: {} notices dropped after {failed} failed attempts, \
                             the last: {e}",
                            batch.len()
                        );
                        stats
                            .given_up
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        retry = None;
                        batch.clear();
                    } else {
                        log::debug!("push gateway: attempt {failed} failed: {e}");
                        let wait = s.backoff.saturating_mul(1 << (failed - 1).min(16));
                        retry = Some(Retry {
                            failed,
                            at: Instant::now() + wait,
                        });
                    }
                }
            }
        }
        stats
            .pending
            .store((table.pending() + batch.len()) as u64, Ordering::Relaxed);
    }
    stats.pending.store(0, Ordering::Relaxed);
}

/// One signed POST of `batch`; `Err` says why it did not succeed.
fn post(agent: &ureq::Agent, s: &Settings, batch: &[Notice]) -> Result<(), String> {
    let sent_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let body = body_json(sent_ms, batch);
    let answer = agent
        .post(&s.url)
        .set("Content-Type", "application/json")
        .set(SIGNATURE_HEADER, &signature(&s.secret, body.as_bytes()))
        .send_string(&body);
    match answer {
        Ok(response) => {
            let status = response.status();
            // Read the answer so the connection can serve the next POST.
            let _ = std::io::copy(
                &mut std::io::Read::take(response.into_reader(), ANSWER_BYTES_MAX),
                &mut std::io::sink(),
            );
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        }
        Err(ureq::Error::Status(status, _)) => Err(format!("answered {status}")),
        Err(e) => Err(e.to_string()),
    }
}
