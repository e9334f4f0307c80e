//! Synchronous block replication between two nodes.
pub mod types;
