//! Synchronous block replication between two nodes.
pub mod core;
pub mod decide;
pub mod types;
pub mod wire;
