//! The push thread of a build without the `push` feature (Cargo.toml): a
//! type with no values, so the server's code that starts, shows and joins
//! it is the same in every build.

use std::sync::Arc;

use super::{Notices, PushStats, NO_PUSH};
use crate::config::Config;

/// Stands for the push thread; none can exist in this build.
#[derive(Debug)]
pub enum Pusher {}

impl Pusher {
    /// `None` without a `push_url`; with one, refuses (this build has no
    /// HTTP client): the configuration's validation refuses it first.
    pub fn start(config: &Config) -> std::io::Result<Option<(Pusher, Notices)>> {
        match config.push_url {
            Some(_) => Err(std::io::Error::other(NO_PUSH)),
            None => Ok(None),
        }
    }

    /// The push counters, for the stats view.
    pub fn stats(&self) -> Arc<PushStats> {
        match *self {}
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        match self {}
    }
}
