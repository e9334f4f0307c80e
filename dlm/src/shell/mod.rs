//! The async shell around the core (feature `shell`): a [`Node`] with its peer
//! transport, the client API and the unix-socket server.
//!
//! Embedding (tandemd):
//! ```text
//!   let node = Node::start(NodeConfig { node, incarnation, listen, peers, socket, .. }).await?;
//!   node.membership(epoch, members);          // every membership entry of the cluster log
//!   node.fence_confirmed(node_id, incarnation); // every fencing record of the cluster log
//!   node.serve_peer(stream);                  // inbound peer streams, if not listening itself
//!   let client = node.client();               // in-process locking
//! ```

mod client;
mod node;
pub mod socket;
mod transport;

pub use client::{BlockingNotice, Granted, LockClient};
pub use node::{LockInfo, Node, NodeConfig, NodeStatus, PeerSeen, membership_fingerprint};
pub use socket::SocketClient;
pub use transport::{BoxStream, ConnectFuture, Connector, PeerStream, TcpConnector};
