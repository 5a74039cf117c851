//! Tern: a messaging edge server built to hold millions of mostly idle connections.
//!
//! The layout follows the architecture: [`proto`] is the pure codec,
//! [`token`] the login credentials, [`config`] every limit, [`io`] the one
//! boundary to the operating system, [`ring`] the cross-shard SPSC mesh,
//! [`session`] the pure protocol logic of a shard's connections and users
//! (events in, actions out), [`shard`] a core's event loop executing it,
//! [`store`] the store-and-forward queues, [`supervisor`] the restart rules of a crashed
//! shard, [`memory`] how drained structures and the allocator give memory
//! back, [`datadir`] the data directory as a whole (lock, privacy, recorded
//! shard count), [`group`] the groups a shard homes and their rules, [`reshard`] re-homing its messages for another shard count,
//! [`privacy`] the mode checks on private files, [`push`] the push notices
//! for offline devices and their thread, [`stats`] the counters and
//! the stats socket, [`ops`] the operators' runtime commands on it
//! (kick, ban, drain), and [`server`] ties them together ([`claim`] checks its
//! listen addresses). [`clock`] is where a shard reads the time, real or
//! simulated, and [`sim`] the deterministic simulator that runs the real
//! shards over a simulated network, clock and disk.
#![deny(missing_docs)]

pub mod claim;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod datadir;
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod io;
pub mod limit;
pub mod memory;
pub mod mqtt;
pub mod notify;
pub mod ops;
pub mod privacy;
pub mod proto;
pub mod push;
pub mod reshard;
pub mod ring;
pub mod server;
pub mod session;
pub mod shard;
pub mod sim;
pub mod stats;
pub mod store;
pub mod supervisor;
pub mod ticket;
pub mod timer;
pub mod tls;
pub mod token;
pub mod upgrade;
pub mod ws;
