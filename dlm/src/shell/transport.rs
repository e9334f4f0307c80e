//! Peer connections: reliable, ordered delivery of core messages between node
//! incarnations over any byte stream.
//!
//! Each node opens one *outbound* connection to every peer and sends its messages there;
//! the peer answers with acknowledgements on the same connection. Every data frame has a
//! per-session sequence number; unacknowledged frames are kept and sent again after a
//! reconnect (the peer's Hello says where to resume), so a dropped TCP connection loses
//! nothing as long as both incarnations live. A session belongs to one incarnation of
//! the peer: messages for an older incarnation are dropped, never delivered to a new one.
//!
//! The stream is anything `AsyncRead + AsyncWrite` ([`Connector`]): plain TCP here, the
//! cluster's authenticated transport in `tandemd`. Inbound streams are handed to
//! [`crate::shell::Node::serve_peer`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::core::Message;
use crate::error::DlmError;
use crate::types::{Incarnation, NodeId};
use crate::wire::{self, Frame};

use super::node::Shared;

/// A connected byte stream to a peer.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> PeerStream for T {}

/// A boxed peer stream.
pub type BoxStream = Box<dyn PeerStream>;

/// A future returning a connected stream.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send + 'a>>;

/// Opens outbound connections to peers.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `peer`.
    fn connect(&self, peer: NodeId) -> ConnectFuture<'_>;
}

/// Plain TCP to fixed addresses.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addrs: BTreeMap<NodeId, SocketAddr>,
}

impl TcpConnector {
    /// Connects to these addresses.
    pub fn new(addrs: BTreeMap<NodeId, SocketAddr>) -> TcpConnector {
        TcpConnector { addrs }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, peer: NodeId) -> ConnectFuture<'_> {
        let addr = self.addrs.get(&peer).copied();
        Box::pin(async move {
            let addr =
                addr.ok_or_else(|| io::Error::other(format!("no address for node {peer}")))?;
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

#[derive(Debug, Default)]
struct OutState {
    peer_inc: Option<Incarnation>,
    next_seq: u64,
    queue: VecDeque<(u64, Message)>,
}

/// Messages waiting for (or sent to and not yet acknowledged by) one peer.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    notify: Notify,
}

impl Outbox {
    /// Queues a message for incarnation `inc` of the peer.
    pub(crate) fn push(&self, inc: Incarnation, message: Message) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.peer_inc != Some(inc) {
            s.peer_inc = Some(inc);
            s.next_seq = 1;
            s.queue.clear();
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        s.queue.push_back((seq, message));
        drop(s);
        self.notify.notify_one();
    }

    /// The peer incarnation the queue is for; adopts `inc` if it differs (the older
    /// incarnation's messages are dropped). Drops what the peer already has.
    fn resume(&self, inc: Incarnation, receive_next: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.peer_inc != Some(inc) {
            s.peer_inc = Some(inc);
            s.next_seq = 1;
            s.queue.clear();
        }
        while s.queue.front().is_some_and(|(seq, _)| *seq < receive_next) {
            s.queue.pop_front();
        }
    }

    fn ack(&self, next: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.queue.front().is_some_and(|(seq, _)| *seq < next) {
            s.queue.pop_front();
        }
    }

    fn incarnation(&self) -> Option<Incarnation> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peer_inc
    }

    /// Encodes the frames from `from` on into `buf`; returns the next sequence number,
    /// or None if the queue now belongs to another incarnation than `inc`.
    fn encode_from(&self, inc: Incarnation, from: u64, buf: &mut Vec<u8>) -> Option<u64> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.peer_inc != Some(inc) {
            return None;
        }
        let mut next = from;
        for (seq, message) in s.queue.iter().filter(|(seq, _)| *seq >= from) {
            wire::encode(
                &Frame::Data {
                    seq: *seq,
                    message: message.clone(),
                },
                buf,
            );
            next = seq + 1;
            if buf.len() > 256 * 1024 {
                break;
            }
        }
        Some(next)
    }
}

/// Reads frames from a stream with a reusable buffer.
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
        }
    }

    /// Decodes a frame already buffered, without reading.
    pub(crate) fn try_next(&mut self) -> Result<Option<Frame>, DlmError> {
        match wire::decode(&self.buf[self.start..])? {
            Some((frame, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// The next frame; Ok(None) at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, DlmError> {
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(Some(f));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self
                .inner
                .read(&mut chunk)
                .await
                .map_err(|source| DlmError::Io {
                    what: "reading from a peer".into(),
                    source,
                })?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(DlmError::DecodeFrame {
                    reason: "connection closed inside a frame".into(),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> Result<(), DlmError> {
    w.write_all(buf).await.map_err(|source| DlmError::Io {
        what: "writing to a peer".into(),
        source,
    })
}

const HEARTBEAT: Duration = Duration::from_millis(100);

/// Keeps an outbound session to `peer` up for the node's lifetime.
pub(crate) async fn run_outbound(shared: Arc<Shared>, connector: Arc<dyn Connector>, peer: NodeId) {
    let mut backoff = Duration::from_millis(20);
    loop {
        if shared.is_stopped() {
            return;
        }
        match connector.connect(peer).await {
            Ok(stream) => {
                backoff = Duration::from_millis(20);
                if let Err(e) = outbound_session(&shared, peer, stream).await {
                    tracing::debug!(peer = %peer, error = %e, "outbound connection ended");
                }
            }
            Err(e) => tracing::trace!(peer = %peer, error = %e, "connecting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

async fn outbound_session(
    shared: &Arc<Shared>,
    peer: NodeId,
    stream: BoxStream,
) -> Result<(), DlmError> {
    let outbox = shared.outbox(peer).ok_or(DlmError::Stopped)?;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let mut buf = Vec::with_capacity(64 * 1024);
    wire::encode(
        &Frame::Hello {
            node: shared.me,
            incarnation: shared.incarnation,
            peer_incarnation: outbox.incarnation().unwrap_or_default(),
            receive_next: 0,
        },
        &mut buf,
    );
    write_frames(&mut wr, &buf).await?;
    let hello = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .map_err(|_| DlmError::Handshake {
            peer,
            reason: "no hello within 5 s".into(),
        })??;
    let (inc, receive_next) = match hello {
        Some(Frame::Hello {
            node,
            incarnation,
            receive_next,
            ..
        }) if node == peer => (incarnation, receive_next),
        other => {
            return Err(DlmError::Handshake {
                peer,
                reason: format!("expected hello from {peer}, got {other:?}"),
            });
        }
    };
    shared.heard(peer, inc, None);
    outbox.resume(inc, receive_next);
    let mut next = receive_next.max(1);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        buf.clear();
        match outbox.encode_from(inc, next, &mut buf) {
            Some(n) => next = n,
            None => {
                return Err(DlmError::Handshake {
                    peer,
                    reason: "messages queued for another incarnation".into(),
                });
            }
        }
        if !buf.is_empty() {
            write_frames(&mut wr, &buf).await?;
            continue;
        }
        if shared.is_stopped() {
            return Ok(());
        }
        tokio::select! {
            _ = outbox.notify.notified() => {}
            _ = heartbeat.tick() => {
                buf.clear();
                let (epoch, members) = shared.epoch_and_members();
                wire::encode(&Frame::Heartbeat { epoch, members }, &mut buf);
                write_frames(&mut wr, &buf).await?;
            }
            frame = reader.next() => match frame? {
                Some(Frame::Ack { next: acked }) => outbox.ack(acked),
                Some(Frame::Heartbeat { epoch, members }) => shared.heard(peer, inc, Some((epoch, members))),
                Some(other) => {
                    return Err(DlmError::DecodeFrame {
                        reason: format!("unexpected {other:?} on an outbound connection"),
                    });
                }
                None => return Ok(()),
            },
        }
    }
}

/// Serves one inbound connection: the peer's messages, in order, into the core.
pub(crate) async fn inbound_session(
    shared: Arc<Shared>,
    stream: BoxStream,
) -> Result<(), DlmError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let hello = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .map_err(|_| DlmError::DecodeFrame {
            reason: "no hello within 5 s".into(),
        })??;
    let Some(Frame::Hello {
        node: peer,
        incarnation,
        ..
    }) = hello
    else {
        return Err(DlmError::DecodeFrame {
            reason: format!("expected hello, got {hello:?}"),
        });
    };
    if !shared.is_peer(peer) {
        return Err(DlmError::Handshake {
            peer,
            reason: "not a configured peer".into(),
        });
    }
    let (conn, receive_next) = shared.claim_receive(peer, incarnation);
    let mut buf = Vec::with_capacity(4096);
    wire::encode(
        &Frame::Hello {
            node: shared.me,
            incarnation: shared.incarnation,
            peer_incarnation: incarnation,
            receive_next,
        },
        &mut buf,
    );
    write_frames(&mut wr, &buf).await?;
    shared.heard(peer, incarnation, None);
    let mut next = receive_next;
    let mut acked = receive_next;
    let mut batch: Vec<Message> = Vec::new();
    loop {
        let Some(first) = reader.next().await? else {
            return Ok(());
        };
        let mut frame = Some(first);
        let mut heartbeat = false;
        while let Some(f) = frame {
            match f {
                Frame::Data { seq, message } => {
                    if seq > next {
                        return Err(DlmError::DecodeFrame {
                            reason: format!("sequence gap from {peer}: got {seq}, expected {next}"),
                        });
                    }
                    if seq == next {
                        next += 1;
                        batch.push(message);
                    }
                }
                Frame::Heartbeat { epoch, members } => {
                    heartbeat = true;
                    shared.heard(peer, incarnation, Some((epoch, members)));
                }
                other => {
                    return Err(DlmError::DecodeFrame {
                        reason: format!("unexpected {other:?} on an inbound connection"),
                    });
                }
            }
            frame = reader.try_next()?;
        }
        if !batch.is_empty() {
            if !shared.advance_receive(peer, incarnation, conn, next) {
                return Ok(()); // superseded by a newer connection
            }
            shared.deliver(peer, incarnation, &mut batch);
        }
        // Acknowledge lazily (every 256 frames, and with every heartbeat of the peer):
        // an ack per message would cost a write on the request path.
        if next >= acked + 256 || (heartbeat && next > acked) {
            buf.clear();
            wire::encode(&Frame::Ack { next }, &mut buf);
            write_frames(&mut wr, &buf).await?;
            acked = next;
        }
    }
}
