//! The cluster: configuration, membership and quorum, failover orchestration.
//!
//! ```text
//!   peers ──(authenticated transport)──► heartbeats ──► failure detector (pure)
//!                                        raft RPCs  ──► openraft: the cluster log
//!   cluster log (replicated ClusterState) ──► orchestrator (pure): fence, promote, outdate
//!   this node's view of the log ──► volumes (replication), resources, DLM membership
//! ```
//!
//! Every decision of a node — detector, quorum lease, rounds of orchestrator actions,
//! fencing, rejoin, orderly stop — is in [`node_core::NodeCore`], a sans-IO state
//! machine; [`node`] runs it for tandemd and `sim` runs the same core in a simulation.

pub mod config;
pub mod control;
pub mod daemon;
pub mod detector;
pub mod dlm;
pub mod fencing;
pub mod metrics;
pub mod node;
pub mod node_core;
pub mod orchestrator;
pub mod peers;
pub mod raft;
pub mod replica;
pub mod shared;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod state;
pub mod status;
pub mod transport;
pub mod types;
pub mod volume;

pub use config::{Config, ConfigError};
pub use types::{Epoch, Incarnation, Millis, NodeId};
