//! The status snapshot served on the control socket and rendered by `tandemctl status`,
//! and the event stream's records.

use super::orchestrator::{LocalAction, ReplicaReport};
use super::raft::store::AppliedEntry;
use super::state::FenceLogEntry;
use super::types::{Epoch, Incarnation, NodeId};
use serde::{Deserialize, Serialize};

/// One node as seen from the reporting node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub role: super::config::NodeRole,
    /// Up in the cluster log.
    pub up: bool,
    /// Heard within the failure timeout by the reporting node.
    pub alive: bool,
    pub incarnation: Incarnation,
    pub silence_ms: Option<u64>,
    pub leader: bool,
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: String,
    pub outdated: bool,
    /// The replica's last report (None if never heard).
    pub report: Option<ReplicaReport>,
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub primary: Option<String>,
    pub epoch: Epoch,
    pub pending_fence: Option<String>,
    pub switchover_to: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}

/// The whole picture from one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub node: String,
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    pub leader: Option<String>,
    pub quorate: bool,
    pub membership_epoch: Epoch,
    pub nodes: Vec<NodeStatus>,
    pub volumes: Vec<VolumeStatus>,
    pub fencing: Vec<FenceLogEntry>,
    pub failovers: u64,
    pub switchovers: u64,
    pub fence_operations: u64,
}

/// What happened, for `tandemctl events` and the demo's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    Started {
        incarnation: Incarnation,
    },
    Leader {
        leader: Option<NodeId>,
    },
    PeerAlive {
        peer: NodeId,
    },
    PeerSilent {
        peer: NodeId,
        silence_ms: u64,
    },
    Quorum {
        quorate: bool,
    },
    Applied {
        entry: AppliedEntry,
    },
    Action {
        action: LocalAction,
        error: Option<String>,
    },
    Stopping,
}

/// An event with its time (milliseconds since the Unix epoch) and node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub node: String,
    #[serde(flatten)]
    pub kind: EventKind,
}
