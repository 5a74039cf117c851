//! Limits on what one client, or one address, may do: the defences
//! against abusive clients (see docs/HARDENING.md).
//!
//! Everything here is pure bookkeeping with time passed in as an argument
//! (milliseconds on the shard's clock), so it is unit-tested without sockets
//! and without sleeping:
//!
//! - [`bucket`]: token buckets, for per-connection rates (SENDs, READs,
//!   PINGs per second, with a burst);
//! - [`addr`]: per-source-address state (failed logins per minute and the
//!   refusal that follows, connections per second, connections not yet
//!   logged in).

pub mod addr;
pub mod bucket;
