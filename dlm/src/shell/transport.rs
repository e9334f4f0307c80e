//! Peer connections: reliable, ordered delivery of core messages between node
//! incarnations over any byte stream.
//!
//! Two nodes share one connection (the lower id dials, the higher accepts) carrying
//! both directions, so answers ride with the TCP acknowledgement of their request.
//! Every data frame has a per-direction sequence number; unacknowledged frames are kept
//! and sent again after a reconnect (each side's first Ack says where to resume), so a
//! dropped connection loses nothing as long as both incarnations live. A session
//! belongs to one incarnation of the peer: messages for an older incarnation are
//! dropped, never delivered to a new one.
//!
//! The stream is anything `AsyncRead + AsyncWrite` ([`Connector`]): plain TCP here, the
//! cluster's authenticated transport in `tandemd`. Accepted streams are handed to
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
    sender: std::sync::atomic::AtomicU64,
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

    /// The session `conn` now sends this peer's messages (a newer connection wins).
    fn claim(&self, conn: u64) {
        self.sender
            .store(conn, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_claimed_by(&self, conn: u64) -> bool {
        self.sender.load(std::sync::atomic::Ordering::Acquire) == conn
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

/// Keeps the session to `peer` up for the node's lifetime (only the node with the lower
/// id dials; the other accepts).
pub(crate) async fn run_outbound(shared: Arc<Shared>, connector: Arc<dyn Connector>, peer: NodeId) {
    let mut backoff = Duration::from_millis(20);
    loop {
        if shared.is_stopped() {
            return;
        }
        match connector.connect(peer).await {
            Ok(stream) => {
                backoff = Duration::from_millis(20);
                let span = tracing::info_span!("peer", node_id = %shared.me, peer = %peer);
                if let Err(e) = tracing::Instrument::instrument(
                    session(shared.clone(), stream, Some(peer)),
                    span,
                )
                .await
                {
                    tracing::debug!(peer = %peer, error = %e, "peer connection ended");
                }
            }
            Err(e) => tracing::trace!(peer = %peer, error = %e, "connecting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Serves one accepted connection.
pub(crate) async fn inbound_session(
    shared: Arc<Shared>,
    stream: BoxStream,
) -> Result<(), DlmError> {
    session(shared, stream, None).await
}

async fn next_frame(
    reader: &mut FrameReader<tokio::io::ReadHalf<BoxStream>>,
    what: &str,
) -> Result<Frame, DlmError> {
    match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
        Err(_) => Err(DlmError::DecodeFrame {
            reason: format!("no {what} within 5 s"),
        }),
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err(DlmError::DecodeFrame {
            reason: format!("connection closed before the {what}"),
        }),
        Ok(Err(e)) => Err(e),
    }
}

/// One connection between two nodes, carrying both directions:
///
/// ```text
///   both ways: Hello{node, incarnation} → Ack{next expected from you} → Data / Ack / Heartbeat
/// ```
/// A node's answers travel on the connection its requests came in on, so they carry
/// the TCP acknowledgement of the request (one packet fewer per message than one
/// connection per direction), and are written by the task that delivered the request.
/// This node's data frames are sent from the sequence number the peer's first Ack
/// names; the peer's are delivered in order, duplicates skipped, gaps refused.
async fn session(
    shared: Arc<Shared>,
    stream: BoxStream,
    expect: Option<NodeId>,
) -> Result<(), DlmError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let mut buf = Vec::with_capacity(64 * 1024);
    wire::encode(
        &Frame::Hello {
            node: shared.me,
            incarnation: shared.incarnation,
            peer_incarnation: Incarnation::default(),
            receive_next: 0,
        },
        &mut buf,
    );
    write_frames(&mut wr, &buf).await?;
    let (peer, inc) = match next_frame(&mut reader, "hello").await? {
        Frame::Hello {
            node, incarnation, ..
        } => (node, incarnation),
        other => {
            return Err(DlmError::DecodeFrame {
                reason: format!("expected hello, got {other:?}"),
            });
        }
    };
    if expect.is_some_and(|e| e != peer) || !shared.is_peer(peer) {
        return Err(DlmError::Handshake {
            peer,
            reason: "not the expected configured peer".into(),
        });
    }
    let outbox = shared.outbox(peer).ok_or(DlmError::Stopped)?;
    let (conn, receive_next) = shared.claim_receive(peer, inc);
    outbox.claim(conn);
    buf.clear();
    wire::encode(&Frame::Ack { next: receive_next }, &mut buf);
    write_frames(&mut wr, &buf).await?;
    let send_next = match next_frame(&mut reader, "resume point").await? {
        Frame::Ack { next } => next,
        other => {
            return Err(DlmError::DecodeFrame {
                reason: format!("expected the resume point, got {other:?}"),
            });
        }
    };
    shared.heard(peer, inc, None);
    outbox.resume(inc, send_next);
    let mut next_out = send_next.max(1);
    let mut next_in = receive_next;
    let mut acked = receive_next;
    let mut batch: Vec<Message> = Vec::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shared.is_stopped() || !outbox.is_claimed_by(conn) {
            return Ok(());
        }
        // Send what is queued (including answers to what was just delivered).
        buf.clear();
        match outbox.encode_from(inc, next_out, &mut buf) {
            Some(n) => next_out = n,
            None => {
                return Err(DlmError::Handshake {
                    peer,
                    reason: "messages queued for another incarnation".into(),
                });
            }
        }
        if next_in >= acked + 256 {
            wire::encode(&Frame::Ack { next: next_in }, &mut buf);
            acked = next_in;
        }
        if !buf.is_empty() {
            write_frames(&mut wr, &buf).await?;
            continue;
        }
        let mut heartbeat_in = false;
        tokio::select! {
            _ = outbox.notify.notified() => {}
            _ = heartbeat.tick() => {
                buf.clear();
                let (epoch, members) = shared.epoch_and_members();
                wire::encode(&Frame::Heartbeat { epoch, members }, &mut buf);
                write_frames(&mut wr, &buf).await?;
            }
            frame = reader.next() => {
                let Some(first) = frame? else {
                    return Ok(());
                };
                let mut frame = Some(first);
                while let Some(f) = frame {
                    match f {
                        Frame::Data { seq, message } => {
                            if seq > next_in {
                                return Err(DlmError::DecodeFrame {
                                    reason: format!(
                                        "sequence gap from {peer}: got {seq}, expected {next_in}"
                                    ),
                                });
                            }
                            if seq == next_in {
                                next_in += 1;
                                batch.push(message);
                            }
                        }
                        Frame::Ack { next } => outbox.ack(next),
                        Frame::Heartbeat { epoch, members } => {
                            heartbeat_in = true;
                            shared.heard(peer, inc, Some((epoch, members)));
                        }
                        Frame::Hello { .. } => {
                            return Err(DlmError::DecodeFrame {
                                reason: "a second hello".into(),
                            });
                        }
                    }
                    frame = reader.try_next()?;
                }
                if !batch.is_empty() {
                    if !shared.advance_receive(peer, inc, conn, next_in) {
                        return Ok(()); // superseded by a newer connection
                    }
                    shared.deliver(peer, inc, &mut batch);
                }
            }
        }
        if heartbeat_in && next_in > acked {
            buf.clear();
            wire::encode(&Frame::Ack { next: next_in }, &mut buf);
            write_frames(&mut wr, &buf).await?;
            acked = next_in;
        }
    }
}
