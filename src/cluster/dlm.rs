//! The lock manager inside `tandemd`: tandem-dlm's node, following the cluster's
//! membership, fenced through the cluster log, talking over the authenticated transport.
//!
//! - Peer connections are authenticated streams on the `dlm` channel of the transport.
//! - Membership: every change of who is up in the cluster log (membership epoch, and each
//!   member's incarnation) is handed to the DLM, which stops, recovers and resumes.
//! - Fencing: a member the log marked down (after the failure timeout, by which time it
//!   has lost its quorum lease and stopped writing) is confirmed fenced; the DLM drops
//!   its locks only then.
//! - Quorum: the moment this node stops hearing a majority (its quorum lease, shorter
//!   than the failure timeout after which the others may declare it dead and recover its
//!   locks), the lock manager tells its clients that every lock held here is in doubt.
//! - Clients: the unix socket (`tandemctl lock`, applications) at the node's DLM socket.

use super::node::{Node, NodeError};
use super::state::ClusterState;
use super::transport::{Channel, client_handshake};
use super::types::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tandem_dlm::shell::{BoxStream, ConnectFuture, Connector};
use tandem_dlm::types as dlm;

fn dlm_node(id: NodeId) -> dlm::NodeId {
    dlm::NodeId(u32::try_from(id.0).unwrap_or(u32::MAX))
}

/// Opens authenticated `dlm` channel connections to peers.
struct AuthConnector {
    node: Node,
    addresses: BTreeMap<dlm::NodeId, (NodeId, SocketAddr)>,
    bind: std::net::IpAddr,
}

impl Connector for AuthConnector {
    fn connect(&self, peer: dlm::NodeId) -> ConnectFuture<'_> {
        Box::pin(async move {
            let (id, address) = *self
                .addresses
                .get(&peer)
                .ok_or_else(|| std::io::Error::other(format!("unknown DLM peer {}", peer.0)))?;
            let socket = if address.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(self.bind, 0))?;
            let mut stream = socket.connect(address).await?;
            let _ = stream.set_nodelay(true);
            let creds = self.node.credentials().map_err(std::io::Error::other)?;
            client_handshake(&mut stream, &creds, id, &Channel::Dlm)
                .await
                .map_err(std::io::Error::other)?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

/// The running lock manager of this node. When the cluster ends this node's life (it
/// rejoins as a new incarnation), the lock manager restarts as that new life too: the
/// old one's locks were dropped by the survivors and its clients must start over.
pub struct DlmService {
    current: Arc<Mutex<Option<tandem_dlm::shell::Node>>>,
    socket: PathBuf,
}

impl std::fmt::Debug for DlmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlmService")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

async fn start_dlm(
    node: &Node,
    socket: &std::path::Path,
) -> Result<tandem_dlm::shell::Node, NodeError> {
    let config = node.config();
    let me = config
        .node(node.id())
        .ok_or_else(|| NodeError::UnknownNode(node.name().to_owned()))?
        .clone();
    let peers: BTreeMap<dlm::NodeId, SocketAddr> = config
        .nodes
        .iter()
        .filter(|n| n.id != me.id)
        .map(|n| (dlm_node(n.id), n.address))
        .collect();
    let addresses = config
        .nodes
        .iter()
        .filter(|n| n.id != me.id)
        .map(|n| (dlm_node(n.id), (n.id, n.address)))
        .collect();
    let dlm_config = tandem_dlm::shell::NodeConfig {
        node: dlm_node(me.id),
        incarnation: dlm::Incarnation(node.incarnation().0),
        listen: None,
        peers,
        socket: Some(socket.to_path_buf()),
        socket_admin: false,
        core: tandem_dlm::core::Config::default(),
    };
    let connector = Arc::new(AuthConnector {
        node: node.clone(),
        addresses,
        bind: me.address.ip(),
    });
    tandem_dlm::shell::Node::start_with(dlm_config, connector)
        .await
        .map_err(|e| NodeError::Propose(format!("starting the lock manager: {e}")))
}

impl DlmService {
    /// Starts the lock manager for `node`, serving clients on `socket`.
    pub async fn start(node: &Node, socket: PathBuf) -> Result<Self, NodeError> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|source| NodeError::StateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let first = start_dlm(node, &socket).await?;
        let current = Arc::new(Mutex::new(Some(first)));
        // Inbound peer connections, already authenticated by the transport.
        let mut inbound = node.accept_channel(Channel::Dlm);
        let for_inbound = Arc::clone(&current);
        tokio::spawn(async move {
            while let Some((_peer, stream)) = inbound.recv().await {
                if let Some(dlm) = for_inbound
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    dlm.serve_peer(Box::new(stream));
                }
            }
        });
        // The quorum verdict, on every cluster event (and at least every 100 ms).
        let mut events = node.events();
        let for_quorum = Arc::clone(&current);
        let quorum_node = node.clone();
        tokio::spawn(async move {
            loop {
                let quorate = quorum_node.is_quorate();
                if let Some(dlm) = for_quorum
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    dlm.set_quorate(quorate);
                }
                tokio::select! {
                    event = events.recv() => {
                        if matches!(event, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
            }
        });
        // Membership and fencing from the cluster log; a new life restarts the DLM.
        let mut state = node.watch_state();
        let for_membership = Arc::clone(&current);
        let cluster_node = node.clone();
        let path = socket.clone();
        tokio::spawn(async move {
            let mut incarnation = cluster_node.incarnation();
            let mut last_members: Option<BTreeMap<dlm::NodeId, dlm::Incarnation>> = None;
            let mut confirmed: BTreeSet<(NodeId, u64)> = BTreeSet::new();
            loop {
                if cluster_node.incarnation() != incarnation {
                    incarnation = cluster_node.incarnation();
                    tracing::warn!(%incarnation, "restarting the lock manager as this node's new life");
                    let old = for_membership
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    drop(old);
                    match start_dlm(&cluster_node, &path).await {
                        Ok(fresh) => {
                            *for_membership.lock().unwrap_or_else(|e| e.into_inner()) = Some(fresh)
                        }
                        Err(e) => tracing::error!(error = %e, "the lock manager did not restart"),
                    }
                    last_members = None;
                    confirmed.clear();
                }
                let current_state: Arc<ClusterState> = state.borrow_and_update().clone();
                let members: BTreeMap<dlm::NodeId, dlm::Incarnation> = current_state
                    .members
                    .iter()
                    .filter(|(_, m)| m.up)
                    .map(|(id, m)| (dlm_node(*id), dlm::Incarnation(m.incarnation.0)))
                    .collect();
                if let Some(dlm) = for_membership
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    if last_members.as_ref() != Some(&members) && !members.is_empty() {
                        dlm.membership(dlm::Epoch(current_state.epoch.0), members.clone());
                        last_members = Some(members);
                    }
                    for (id, member) in &current_state.members {
                        // Down in the log: declared dead after the failure timeout (its
                        // quorum lease expired earlier) or left in an orderly way.
                        if !member.up
                            && member.incarnation.0 > 0
                            && confirmed.insert((*id, member.incarnation.0))
                        {
                            dlm.fence_confirmed(
                                dlm_node(*id),
                                dlm::Incarnation(member.incarnation.0),
                            );
                        }
                    }
                }
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(Self { current, socket })
    }

    /// The client socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// An in-process client of the current life's lock manager.
    pub fn client(&self) -> Option<tandem_dlm::shell::LockClient> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|n| n.client())
    }
}
