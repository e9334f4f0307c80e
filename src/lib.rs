//! tandem: highly available block storage in one userspace daemon.
//!
//! This library holds the daemon's pieces — replication, cluster membership, frontends and
//! resources — so that `tandemd`, `tandemctl` and the tests share one implementation.
#![deny(unsafe_code)]

pub mod cluster;
pub mod error;
pub mod fixture;
pub mod frontend;
pub mod replica;
pub mod replication;
pub mod resources;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod store;

pub use error::{Result, TandemError};
