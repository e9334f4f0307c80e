//! Membership-channel messaging between nodes: heartbeats and request/reply RPCs.
//!
//! Each node keeps one outbound connection per peer (it sends heartbeats and requests
//! there and reads replies) and serves the peers' inbound connections (reads heartbeats
//! and requests, writes replies). Frames are a 4-byte big-endian length and a JSON body.
//! A peer that sends garbage is logged (rate-limited by reconnect backoff) and dropped.

use super::orchestrator::NodeReport;
use super::raft::network::{RaftReply, RaftRpc};
use super::transport::{Channel, Credentials, client_handshake};
use super::types::{Incarnation, Millis, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Largest frame accepted on the membership channel.
pub const MAX_FRAME: usize = 16 << 20;

/// A node's periodic "I am alive" with its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: NodeId,
    pub incarnation: Incarnation,
    pub report: NodeReport,
    /// When the sender sent it, on the sender's monotonic clock.
    #[serde(default)]
    pub sent_at: Millis,
    /// For each peer, the `sent_at` of the latest heartbeat the sender heard from it: the
    /// peer learns which of its own heartbeats got through, on its own clock, and anchors
    /// its quorum lease there (see [`super::detector::Detector`]).
    #[serde(default)]
    pub echoes: BTreeMap<NodeId, Echoed>,
    /// The peers among `echoes` whose current life the sender's log holds up: only these
    /// echoes let a peer serve I/O (a life the cluster ended — its node paused or cut
    /// off while the others failed over — gets echoes for quorum, never a lease).
    #[serde(default)]
    pub endorsed: std::collections::BTreeSet<NodeId>,
    /// The sender's view of each peer: what its log says of the peer's life, and the
    /// newest life it endorsed. A node taking over from a fenced primary waits until
    /// enough views prove that life can hold no lease any more.
    #[serde(default)]
    pub views: BTreeMap<NodeId, PeerView>,
}

/// The latest heartbeat a node heard from a peer: which life of the peer sent it, and
/// when on that life's clock (each life's monotonic clock starts again at zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Echoed {
    pub life: Incarnation,
    pub sent_at: Millis,
}

/// One node's view of a peer, sent in its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerView {
    /// The peer's life as the sender's log records it, and whether it is up there.
    pub life: Incarnation,
    pub up: bool,
    /// The newest life of the peer the sender endorsed, and how long before this
    /// heartbeat the sender heard that life's latest endorsed heartbeat.
    pub endorsed: Option<(Incarnation, u64)>,
}

impl PeerView {
    /// The sender's log holds `life` (or a later one) as ended: it never endorses it again.
    pub fn ended(&self, life: Incarnation) -> bool {
        self.life > life || (self.life == life && !self.up)
    }
}

/// Everything sent on a membership connection. Externally tagged on purpose: serde's
/// internally tagged enums buffer their content and then cannot read openraft's maps with
/// integer keys back from JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerMessage {
    Heartbeat(Heartbeat),
    Request { id: u64, rpc: RaftRpc },
    Reply { id: u64, reply: RaftReply },
}

/// Why a message did not reach a peer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    #[error("node {0} is not in the configuration")]
    Unknown(NodeId),
    #[error("node {0} did not answer in {1:?}")]
    Timeout(NodeId, Duration),
    #[error("connection to node {0} closed before it answered")]
    Closed(NodeId),
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &PeerMessage,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; malformed frames are `InvalidData` errors naming the problem.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<PeerMessage> {
    let len = usize::try_from(r.read_u32().await?).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("undecodable frame: {e}"),
        )
    })
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<RaftReply>>>>;

/// The outbound side of the connection to one peer.
#[derive(Debug)]
struct Link {
    tx: mpsc::Sender<PeerMessage>,
    pending: Pending,
    connected: Arc<AtomicBool>,
}

/// Outbound connections to every peer, kept up with reconnects.
#[derive(Debug)]
pub struct Peers {
    links: BTreeMap<NodeId, Link>,
    next_id: AtomicU64,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Peers {
    /// Starts a connection task per peer. Must run inside a tokio runtime.
    pub fn start(
        creds: Credentials,
        peers: &BTreeMap<NodeId, SocketAddr>,
        bind: Option<std::net::IpAddr>,
    ) -> Arc<Self> {
        let mut links = BTreeMap::new();
        let (stop, _) = tokio::sync::watch::channel(false);
        for (&node, &address) in peers {
            if node == creds.node {
                continue;
            }
            let (tx, rx) = mpsc::channel(256);
            let pending: Pending = Arc::default();
            let connected = Arc::new(AtomicBool::new(false));
            let mut stopped = stop.subscribe();
            let task = run_link(
                creds.clone(),
                node,
                address,
                bind,
                rx,
                Arc::clone(&pending),
                Arc::clone(&connected),
            );
            tokio::spawn(async move {
                tokio::select! {
                    () = task => {}
                    _ = stopped.wait_for(|&stopped| stopped) => {}
                }
            });
            links.insert(
                node,
                Link {
                    tx,
                    pending,
                    connected,
                },
            );
        }
        Arc::new(Self {
            links,
            next_id: AtomicU64::new(1),
            stop,
        })
    }

    /// Closes every outbound connection for good.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        for link in self.links.values() {
            link.connected.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the outbound connection to `node` is up.
    pub fn is_connected(&self, node: NodeId) -> bool {
        self.links
            .get(&node)
            .is_some_and(|l| l.connected.load(Ordering::Relaxed))
    }

    /// Sends a heartbeat to `node` if connected; drops it otherwise (the next one follows).
    pub fn heartbeat(&self, node: NodeId, heartbeat: Heartbeat) {
        if let Some(link) = self.links.get(&node)
            && link.connected.load(Ordering::Relaxed)
        {
            let _ = link.tx.try_send(PeerMessage::Heartbeat(heartbeat));
        }
    }

    /// Sends `rpc` to `node` and waits for its reply.
    pub async fn request(
        &self,
        node: NodeId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> Result<RaftReply, PeerError> {
        let link = self.links.get(&node).ok_or(PeerError::Unknown(node))?;
        if !link.connected.load(Ordering::Relaxed) {
            return Err(PeerError::NotConnected(node));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        link.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, reply_tx);
        let cleanup = || {
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        };
        if link
            .tx
            .send(PeerMessage::Request { id, rpc })
            .await
            .is_err()
        {
            cleanup();
            return Err(PeerError::NotConnected(node));
        }
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(PeerError::Closed(node)),
            Err(_) => {
                cleanup();
                Err(PeerError::Timeout(node, timeout))
            }
        }
    }
}

async fn connect(
    creds: &Credentials,
    node: NodeId,
    address: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, String> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = bind {
        // Originate from our own address, so peers (and tests on 127.0.0.x) see who we are.
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| e.to_string())?;
    }
    let mut stream = tokio::time::timeout(Duration::from_secs(1), socket.connect(address))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    client_handshake(&mut stream, creds, node, &Channel::Membership)
        .await
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

async fn run_link(
    creds: Credentials,
    node: NodeId,
    address: SocketAddr,
    bind: Option<std::net::IpAddr>,
    mut rx: mpsc::Receiver<PeerMessage>,
    pending: Pending,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut last_error = String::new();
    loop {
        let stream = match connect(&creds, node, address, bind).await {
            Ok(s) => s,
            Err(e) => {
                if e != last_error {
                    tracing::debug!(peer = %node, %address, error = %e, "cannot reach peer");
                    last_error = e;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                // Drain what piled up while disconnected: requests were refused already.
                while rx.try_recv().is_ok() {}
                continue;
            }
        };
        tracing::info!(peer = %node, %address, "connected to peer");
        backoff = Duration::from_millis(50);
        last_error.clear();
        let (mut reader, mut writer) = stream.into_split();
        connected.store(true, Ordering::Relaxed);
        let reply_pending = Arc::clone(&pending);
        let mut read_task = tokio::spawn(async move {
            loop {
                match read_frame(&mut reader).await {
                    Ok(PeerMessage::Reply { id, reply }) => {
                        let waiter = reply_pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply);
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(peer = %node, message = ?other, "unexpected message on an outbound link; dropping the connection");
                        return;
                    }
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            tracing::warn!(peer = %node, error = %e, "peer connection failed");
                        }
                        return;
                    }
                }
            }
        });
        loop {
            tokio::select! {
                _ = &mut read_task => break,
                message = rx.recv() => {
                    let Some(message) = message else {
                        read_task.abort();
                        return;
                    };
                    if let Err(e) = write_frame(&mut writer, &message).await {
                        tracing::debug!(peer = %node, error = %e, "write to peer failed");
                        read_task.abort();
                        break;
                    }
                }
            }
        }
        connected.store(false, Ordering::Relaxed);
        // Everyone waiting for a reply on this connection gets `Closed`.
        pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
        tracing::info!(peer = %node, "disconnected from peer");
    }
}

/// What a node does with inbound membership traffic.
pub trait Inbound: Send + Sync + 'static {
    /// A heartbeat arrived from `from`.
    fn heartbeat(&self, heartbeat: Heartbeat);
    /// An RPC arrived; the reply goes back on the same connection.
    fn rpc(
        &self,
        from: NodeId,
        rpc: RaftRpc,
    ) -> impl std::future::Future<Output = RaftReply> + Send;
}

/// Serves one authenticated inbound membership connection from `from` until it closes
/// or `stop` turns true.
pub async fn serve_inbound<S, H>(
    stream: S,
    from: NodeId,
    handler: Arc<H>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: Inbound,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (reply_tx, mut reply_rx) = mpsc::channel::<PeerMessage>(256);
    let writer_task = tokio::spawn(async move {
        while let Some(message) = reply_rx.recv().await {
            if write_frame(&mut writer, &message).await.is_err() {
                break;
            }
        }
    });
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut reader) => f,
            // wait_for, not changed(): a stop sent before this connection subscribed
            // (accepted just as the node halted) must end it too, or it serves a dead node
            // forever and its peer never reconnects to the node's next life.
            _ = stop.wait_for(|&stopped| stopped) => break,
        };
        match frame {
            Ok(PeerMessage::Heartbeat(hb)) => {
                if hb.from != from {
                    tracing::warn!(peer = %from, claimed = %hb.from, "heartbeat under another node's name; closing");
                    break;
                }
                handler.heartbeat(hb);
            }
            Ok(PeerMessage::Request { id, rpc }) => {
                let handler = Arc::clone(&handler);
                let reply_tx = reply_tx.clone();
                tokio::spawn(async move {
                    let reply = handler.rpc(from, rpc).await;
                    let _ = reply_tx.send(PeerMessage::Reply { id, reply }).await;
                });
            }
            Ok(PeerMessage::Reply { .. }) => {
                tracing::warn!(peer = %from, "reply on an inbound connection; closing");
                break;
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::warn!(peer = %from, error = %e, "dropping inbound peer connection");
                }
                break;
            }
        }
    }
    drop(reply_tx);
    let _ = writer_task.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let hb = Heartbeat {
            from: NodeId(1),
            incarnation: Incarnation(7),
            report: NodeReport::default(),
            sent_at: Millis(1234),
            echoes: BTreeMap::from([(
                NodeId(2),
                Echoed {
                    life: Incarnation(3),
                    sent_at: Millis(99),
                },
            )]),
            endorsed: [NodeId(2)].into(),
            views: BTreeMap::from([(
                NodeId(2),
                PeerView {
                    life: Incarnation(3),
                    up: true,
                    endorsed: Some((Incarnation(3), 40)),
                },
            )]),
        };
        write_frame(&mut a, &PeerMessage::Heartbeat(hb.clone()))
            .await
            .unwrap();
        match read_frame(&mut b).await.unwrap() {
            PeerMessage::Heartbeat(got) => assert_eq!(got, hb),
            other => panic!("{other:?}"),
        }
        a.write_all(&[0, 0, 0, 3, b'x', b'y', b'z']).await.unwrap();
        let err = read_frame(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    struct Silent;
    impl Inbound for Silent {
        fn heartbeat(&self, _: Heartbeat) {}
        async fn rpc(&self, _: NodeId, _: RaftRpc) -> RaftReply {
            unreachable!("no request is sent in this test")
        }
    }

    /// A connection accepted just as the node halted subscribes to the stop signal after
    /// it was sent. It once kept serving the dead node's stopped raft for good, and its
    /// peer never reconnected to the node's next life (seen as a flaky in-process cluster
    /// test under load: "timed out waiting for beta rejoined").
    #[tokio::test]
    async fn a_connection_accepted_as_the_node_stops_ends_at_once() {
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        stop_tx.send_replace(true);
        let stop = stop_tx.subscribe();
        let (_client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            serve_inbound(server, NodeId(2), Arc::new(Silent), stop),
        )
        .await;
        assert!(served.is_ok(), "the connection outlived its node's stop");
    }
}
