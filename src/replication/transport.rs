//! Peer transport: how a volume gets a connected byte stream to its peer, and the tasks
//! that move frames over it.
//!
//! The seam for the cluster is [`PeerConnector`]: it hands the volume an already
//! connected [`PeerStream`] (any `AsyncRead + AsyncWrite`), so the cluster can wrap the
//! TCP socket in its authenticated transport. [`TcpConnector`] is the plain TCP connector
//! of standalone mode: the node with the lower node id dials, the other one listens.

use super::wire::{self, HEADER_BYTES, Header, Msg};
use crate::error::{Result, TandemError};
use crate::store::{AlignedBuf, DataBuf};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connected, ordered, reliable byte stream to the peer.
pub trait PeerStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerStream for T {}

/// A boxed future, as returned by the connector and fencing traits.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Produces connections to the peer; called again after every disconnect.
pub trait PeerConnector: Send + Sync + std::fmt::Debug + 'static {
    /// Resolves once a connection to the peer is up (dialled or accepted), with a label
    /// for logs. Implementations retry on their own and resolve only on success.
    fn connect(&self) -> BoxFuture<(Box<dyn PeerStream>, String)>;
}

/// Plain TCP for standalone replicas: the active side dials `peer`, the passive side
/// accepts on `listen` (only connections from the peer's IP address).
#[derive(Debug)]
pub struct TcpConnector {
    listener: Option<Arc<tokio::net::TcpListener>>,
    listen: SocketAddr,
    peer: SocketAddr,
    active: bool,
}

impl TcpConnector {
    /// Binds `listen` now (so the port is known to be ours); `active` dials `peer`.
    pub async fn new(listen: SocketAddr, peer: SocketAddr, active: bool) -> Result<Self> {
        let listener = if active {
            None
        } else {
            let socket = tokio::net::TcpSocket::new_v4()
                .and_then(|s| {
                    s.set_reuseaddr(true)?;
                    Ok(s)
                })
                .map_err(TandemError::io(format!("creating a socket for {listen}")))?;
            socket.bind(listen).map_err(TandemError::io(format!(
                "binding the replication port {listen}"
            )))?;
            Some(Arc::new(socket.listen(16).map_err(TandemError::io(
                format!("listening on the replication port {listen}"),
            ))?))
        };
        Ok(Self {
            listener,
            listen,
            peer,
            active,
        })
    }
}

impl PeerConnector for TcpConnector {
    fn connect(&self) -> BoxFuture<(Box<dyn PeerStream>, String)> {
        let peer = self.peer;
        let local = self.listen.ip();
        let listener = self.listener.clone();
        let active = self.active;
        Box::pin(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let attempt: std::io::Result<(tokio::net::TcpStream, SocketAddr)> = if active {
                    // Dial from our own address: the peer accepts only it.
                    dial(local, peer).await.map(|s| (s, peer))
                } else if let Some(l) = &listener {
                    l.accept().await
                } else {
                    Err(std::io::Error::other("no listener"))
                };
                match attempt {
                    Ok((stream, from)) if active || from.ip() == peer.ip() => {
                        let _ = stream.set_nodelay(true);
                        let label = format!("tcp {from}");
                        return (Box::new(stream) as Box<dyn PeerStream>, label);
                    }
                    Ok((_, from)) => {
                        tracing::warn!(peer = %from, expected = %peer, "refused a replication connection from an unknown address");
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "replication connect failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(1000));
                    }
                }
            }
        })
    }
}

async fn dial(local: std::net::IpAddr, peer: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if peer.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(peer).await
}

/// A frame read from the peer.
#[derive(Debug)]
pub struct InFrame {
    pub msg: Msg,
    /// Data payload (Data, ResyncData, ReadReply), aligned for O_DIRECT.
    pub data: Option<AlignedBuf>,
    /// Other payload bytes (bitmap words, refusal text).
    pub inline: Vec<u8>,
}

/// Reads one frame; `Err` names what was wrong (garbage is refused, never trusted).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::result::Result<InFrame, String> {
    let mut hb = [0u8; HEADER_BYTES];
    r.read_exact(&mut hb)
        .await
        .map_err(|e| format!("connection lost: {e}"))?;
    let header = Header::decode(&hb).map_err(|e| format!("refused frame from peer: {e}"))?;
    let mut fixed = vec![0u8; header.fixed_len()];
    r.read_exact(&mut fixed)
        .await
        .map_err(|e| format!("connection lost: {e}"))?;
    let payload_len = header.payload_len();
    let data_kind = matches!(header.kind, 3 | 14 | 23);
    let (data, inline) = if data_kind && payload_len > 0 {
        let mut buf = AlignedBuf::for_overwrite(payload_len);
        r.read_exact(&mut buf)
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        (Some(buf), Vec::new())
    } else {
        let mut v = vec![0u8; payload_len];
        r.read_exact(&mut v)
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        (None, v)
    };
    let payload: &[u8] = data.as_deref().unwrap_or(&inline);
    header
        .verify(&fixed, payload)
        .map_err(|e| format!("refused frame from peer: {e}"))?;
    let msg = wire::decode(&header, &fixed, payload)
        .map_err(|e| format!("refused frame from peer: {e}"))?;
    if let Some(need) = msg.data_len()
        && need != payload.len()
    {
        return Err(format!(
            "refused frame from peer: {} announces {need} data bytes but carries {}",
            msg.name(),
            payload.len()
        ));
    }
    Ok(InFrame { msg, data, inline })
}

/// A frame to write: encoded header and fixed fields, then an optional payload.
#[derive(Debug)]
pub struct OutFrame {
    pub head: Vec<u8>,
    pub payload: Option<OutPayload>,
}

/// Payload of an outgoing frame.
#[derive(Debug)]
pub enum OutPayload {
    Shared(DataBuf),
    Owned(Vec<u8>),
}

impl OutPayload {
    fn bytes(&self) -> &[u8] {
        match self {
            OutPayload::Shared(b) => b,
            OutPayload::Owned(v) => v,
        }
    }
}

/// Writes frames from `rx` until it closes or the stream fails; batches small frames and
/// flushes only when no frame is waiting.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<OutFrame>,
) -> std::io::Result<()> {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, w);
    while let Some(frame) = rx.recv().await {
        let mut next = Some(frame);
        while let Some(f) = next.take() {
            w.write_all(&f.head).await?;
            if let Some(p) = &f.payload {
                w.write_all(p.bytes()).await?;
            }
            next = rx.try_recv().ok();
            if next.is_none() {
                // Let the tasks that are ready run first: they often have more frames
                // for this batch (one send instead of one per frame). Costs a re-poll
                // when nothing else is ready.
                tokio::task::yield_now().await;
                next = rx.try_recv().ok();
            }
        }
        w.flush().await?;
    }
    w.flush().await?;
    w.shutdown().await
}

/// Encodes `msg` with its payload into a frame.
pub fn frame(msg: &Msg, payload: Option<OutPayload>) -> OutFrame {
    let bytes: &[u8] = payload.as_ref().map_or(&[], OutPayload::bytes);
    OutFrame {
        head: wire::encode(msg, bytes),
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_cross_a_stream_and_garbage_is_refused_with_a_reason() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(a, rx));
        let data = Arc::new(AlignedBuf::copy_from(&[9u8; 4096]));
        tx.send(frame(
            &Msg::Data {
                seq: 1,
                offset: 0,
                len: 4096,
                fua: true,
                barrier: 1,
            },
            Some(OutPayload::Shared(data)),
        ))
        .unwrap();
        tx.send(frame(&Msg::Ping, None)).unwrap();
        drop(tx);
        writer.await.unwrap().unwrap();
        let f = read_frame(&mut b).await.unwrap();
        assert!(matches!(f.msg, Msg::Data { len: 4096, .. }));
        assert!(f.data.unwrap().iter().all(|&x| x == 9));
        assert_eq!(read_frame(&mut b).await.unwrap().msg, Msg::Ping);

        let (mut c, mut d) = tokio::io::duplex(1024);
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let err = read_frame(&mut d).await.unwrap_err();
        assert!(err.contains("bad magic"), "{err}");
    }
}
