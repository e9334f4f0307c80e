//! openraft's network over tandem's membership channel.

use super::{Proposal, TypeConfig};
use crate::cluster::peers::{PeerError, Peers};
use crate::cluster::state::Outcome;
use crate::cluster::types::NodeId;
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A request on the membership channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A follower forwards a proposal to the leader.
    Propose(Proposal),
}

/// The reply to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Propose(Result<Outcome, String>),
}

/// Creates per-peer raft clients over [`Peers`].
#[derive(Debug, Clone)]
pub struct Network {
    peers: Arc<Peers>,
}

impl Network {
    pub fn new(peers: Arc<Peers>) -> Self {
        Self { peers }
    }
}

/// openraft's client for one peer.
#[derive(Debug)]
pub struct PeerClient {
    peers: Arc<Peers>,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        PeerClient {
            peers: Arc::clone(&self.peers),
            target: NodeId(target),
        }
    }
}

fn unreachable<E: std::error::Error>(e: &PeerError) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn mismatch<E: std::error::Error>(target: NodeId) -> RPCError<u64, BasicNode, E> {
    let e = std::io::Error::other(format!("node {target} answered a different RPC"));
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .peers
            .request(self.target, RaftRpc::Append(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::Append(Ok(r))) => Ok(r),
            Ok(RaftReply::Append(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target.0, e)))
            }
            Ok(_) => Err(mismatch(self.target)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .peers
            .request(self.target, RaftRpc::Snapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::Snapshot(Ok(r))) => Ok(r),
            Ok(RaftReply::Snapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target.0, e)))
            }
            Ok(_) => Err(mismatch(self.target)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self
            .peers
            .request(self.target, RaftRpc::Vote(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftReply::Vote(Ok(r))) => Ok(r),
            Ok(RaftReply::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target.0, e)))
            }
            Ok(_) => Err(mismatch(self.target)),
            Err(e) => Err(unreachable(&e)),
        }
    }
}
