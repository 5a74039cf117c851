//! Health checks for the metrics HTTP listener: `GET /healthz` and
//! `GET /readyz`, answered 200 `ok` or 503 with a one-line reason.
//!
//! Both read what the shards already publish (their supervisor state and
//! whether their store refuses writes), so a check costs the stats thread a
//! few loads and never waits on a shard:
//!
//! - `/healthz`: every shard is up and every store takes writes. A shard
//!   restarting or down, or a store short of disk space, makes it 503. This
//!   is the box's own health, for monitoring and alerts.
//! - `/readyz`: all of `/healthz`, and the server is not draining. A load
//!   balancer sends new clients only to a ready box; a draining one is
//!   healthy (nothing to restart) but should get no new clients.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use super::render::StatsView;
use crate::supervisor::ShardState;

/// Process-wide health flags that no shard counter carries. Shared by the
/// stats thread and whatever sets them (the `drain` command).
#[derive(Debug, Default)]
pub struct Health {
    /// The server is taking itself out of service: `/readyz` answers 503.
    draining: AtomicBool,
}

impl Health {
    /// Marks the server draining (or not any more): while set, `/readyz`
    /// answers 503 `draining` and `/healthz` is unchanged.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Whether the server is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Which question a health check answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `GET /healthz`: is every part of the server working?
    Health,
    /// `GET /readyz`: should this server get new clients?
    Ready,
}

/// Answers `probe` from `view`: `Ok(())`, or `Err` with every reason found,
/// on one line (`shard 1 restarting; shard 0 store refusing writes (disk
/// short)`), worst first within a shard.
pub fn check(view: &StatsView, probe: Probe) -> Result<(), String> {
    let mut reasons = String::new();
    let mut add = |reason: std::fmt::Arguments<'_>| {
        if !reasons.is_empty() {
            reasons.push_str("; ");
        }
        // `write!` to a String cannot fail.
        let _ = reasons.write_fmt(reason);
    };
    // Draining is set by the `drain` command (the operators' state) or
    // through [`Health::set_draining`] by an embedding program.
    let draining = view.health.draining() || view.ops.as_ref().is_some_and(|ops| ops.draining());
    if probe == Probe::Ready && draining {
        add(format_args!("draining"));
    }
    for (id, shard) in view.shards.iter().enumerate() {
        match ShardState::from_u64(shard.state.get()) {
            ShardState::Up => {}
            state => add(format_args!("shard {id} {}", state.as_str())),
        }
        if shard.disk_short.get() != 0 {
            add(format_args!(
                "shard {id} store refusing writes (disk short, {} bytes free)",
                shard.disk_free_bytes.get()
            ));
        }
    }
    match reasons.is_empty() {
        true => Ok(()),
        false => Err(reasons),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::render::tests::fake_view;
    use std::sync::Arc;

    #[test]
    fn healthy_until_something_breaks() {
        let view = fake_view();
        assert_eq!(check(&view, Probe::Health), Ok(()));
        assert_eq!(check(&view, Probe::Ready), Ok(()));

        view.shards[1].state.set(ShardState::Restarting as u64);
        let reason = "shard 1 restarting".to_string();
        assert_eq!(check(&view, Probe::Health), Err(reason.clone()));
        assert_eq!(check(&view, Probe::Ready), Err(reason));

        view.shards[1].state.set(ShardState::Down as u64);
        view.shards[0].disk_short.set(1);
        view.shards[0].disk_free_bytes.set(4096);
        let reason =
            "shard 0 store refusing writes (disk short, 4096 bytes free); shard 1 down".to_string();
        assert_eq!(check(&view, Probe::Health), Err(reason));
    }

    #[test]
    fn draining_is_ready_only() {
        let view = fake_view();
        view.health.set_draining(true);
        assert!(view.health.draining());
        assert_eq!(check(&view, Probe::Health), Ok(()));
        assert_eq!(check(&view, Probe::Ready), Err("draining".to_string()));
        view.shards[0].state.set(ShardState::Restarting as u64);
        assert_eq!(
            check(&view, Probe::Ready),
            Err("draining; shard 0 restarting".to_string())
        );
        view.shards[0].state.set(ShardState::Up as u64);
        view.health.set_draining(false);
        assert_eq!(check(&view, Probe::Ready), Ok(()));
    }

    #[test]
    fn the_drain_command_makes_the_server_not_ready() {
        let mut view = fake_view();
        let ops = Arc::new(crate::ops::Ops::new(
            view.shards.len(),
            crate::ops::Bans::in_memory(4),
        ));
        view.ops = Some(Arc::clone(&ops));
        assert_eq!(check(&view, Probe::Ready), Ok(()));
        assert!(ops.start_drain(std::time::Duration::from_secs(60)));
        assert_eq!(check(&view, Probe::Health), Ok(()));
        assert_eq!(check(&view, Probe::Ready), Err("draining".to_string()));
    }
}
