//! The cluster log: openraft, with tandem's storage and network adapters.
//!
//! - [`store`]: the log and vote on disk (JSON lines, fsync'd appends, atomic rewrites)
//!   and the state machine — [`ClusterState`](crate::cluster::state::ClusterState) — with
//!   snapshots. Both pass openraft's storage conformance suite.
//! - [`network`]: raft RPCs over the authenticated membership channel.

pub mod network;
pub mod store;

use crate::cluster::state::{Command, Outcome};
use crate::cluster::types::{Millis, NodeId};
use serde::{Deserialize, Serialize};

/// One entry of the cluster log: a command, who proposed it and when (for the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub command: Command,
    pub proposer: NodeId,
    pub at: Millis,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} by {}", self.command, self.proposer)
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the cluster log.
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The raft handle of one node.
pub type Raft = openraft::Raft<TypeConfig>;
