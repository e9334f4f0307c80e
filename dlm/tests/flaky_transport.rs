//! Peer connections that break every few kilobytes: sessions reconnect, resend what was
//! not acknowledged, skip what was, and clients on both nodes keep getting exclusive
//! locks that never overlap.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tandem_dlm::core::Config;
use tandem_dlm::shell::{BoxStream, ConnectFuture, Connector, Node, NodeConfig};
use tandem_dlm::{Epoch, Flags, Incarnation, Mode, NodeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TCP stream that fails after `budget` bytes in either direction.
struct Flaky {
    inner: tokio::net::TcpStream,
    budget: usize,
}

impl AsyncRead for Flaky {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.budget == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "flaky")));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.budget = self.budget.saturating_sub(n);
        r
    }
}

impl AsyncWrite for Flaky {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.budget == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "flaky")));
        }
        let n = buf.len().min(self.budget);
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(w)) = r {
            self.budget -= w;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// (resource, client, held from, held until).
type Hold = (usize, usize, Instant, Instant);

struct FlakyConnector {
    addrs: BTreeMap<NodeId, SocketAddr>,
    connects: AtomicUsize,
    seed: AtomicU64,
}

impl Connector for FlakyConnector {
    fn connect(&self, peer: NodeId) -> ConnectFuture<'_> {
        let addr = self.addrs[&peer];
        self.connects.fetch_add(1, Ordering::Relaxed);
        let seed = self.seed.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        Box::pin(async move {
            let inner = tokio::net::TcpStream::connect(addr).await?;
            inner.set_nodelay(true)?;
            let budget = 2000 + usize::try_from(seed % 6000).unwrap();
            Ok(Box::new(Flaky { inner, budget }) as BoxStream)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_broken_connections_without_losing_or_repeating_messages() {
    let free = |ip: &str| {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let a1 = free("127.0.0.1");
    let a2 = free("127.0.0.2");
    let peers: BTreeMap<NodeId, SocketAddr> = [(NodeId(1), a1), (NodeId(2), a2)].into();
    let connector = Arc::new(FlakyConnector {
        addrs: peers.clone(),
        connects: AtomicUsize::new(0),
        seed: AtomicU64::new(12345),
    });
    let config = |id: u32, listen| NodeConfig {
        node: NodeId(id),
        incarnation: Incarnation(u64::from(id)),
        listen: Some(listen),
        peers: peers.clone(),
        socket: None,
        socket_admin: false,
        core: Config::default(),
    };
    // Node 1 dials (lower id): its connector breaks the connection.
    let n1 = Arc::new(
        Node::start_with(config(1, a1), connector.clone())
            .await
            .unwrap(),
    );
    let n2 = Arc::new(Node::start(config(2, a2)).await.unwrap());
    let members: BTreeMap<NodeId, Incarnation> =
        [(NodeId(1), Incarnation(1)), (NodeId(2), Incarnation(2))].into();
    n1.membership(Epoch(1), members.clone());
    n2.membership(Epoch(1), members);
    let t0 = Instant::now();
    while n1.status().state != "running" || n2.status().state != "running" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "recovery did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holds: Arc<Mutex<Vec<Hold>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..8usize {
        let node = if c % 2 == 0 { n1.clone() } else { n2.clone() };
        let holds = holds.clone();
        tasks.push(tokio::spawn(async move {
            let client = node.client();
            for i in 0..150usize {
                let r = (c + i) % 3;
                let g = tokio::time::timeout(
                    Duration::from_secs(20),
                    client.lock("flaky", format!("r{r}").as_bytes(), Mode::EX, Flags::NONE),
                )
                .await
                .expect("a lock request never completed")
                .unwrap();
                let from = Instant::now();
                tokio::task::yield_now().await;
                let to = Instant::now();
                client.unlock(g.lock, None).unwrap();
                holds.lock().unwrap().push((r, c, from, to));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut holds = holds.lock().unwrap().clone();
    holds.sort_by_key(|h| (h.0, h.2));
    for w in holds.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.0 == b.0 {
            assert!(
                b.2 >= a.3 || a.1 == b.1,
                "two EX holders of r{} overlap",
                a.0
            );
        }
    }
    assert_eq!(holds.len(), 8 * 150);
    let connects = connector.connects.load(Ordering::Relaxed);
    eprintln!("{} lock cycles over {connects} connections", holds.len());
    assert!(
        connects > 5,
        "the connection never broke ({connects} connects)"
    );
}
