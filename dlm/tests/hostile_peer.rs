//! Malformed or hostile peer frames: the node drops the connection (with a log line)
//! and keeps serving; nothing panics and no lock state changes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_dlm::core::{Config, Message};
use tandem_dlm::shell::{Node, NodeConfig};
use tandem_dlm::wire::{self, Frame};
use tandem_dlm::{Epoch, Flags, Incarnation, LockId, Mode, NodeId, ResourceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` and expects the node to close the connection.
async fn expect_reset(addr: std::net::SocketAddr, bytes: &[u8], what: &str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {} // the node's own hello
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "connection not dropped after {what}");
}

fn frame(f: &Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::encode(f, &mut buf);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_drop_the_connection_and_nothing_else() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer_addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let node = Node::start(NodeConfig {
        node: NodeId(1),
        incarnation: Incarnation(1),
        listen: Some(addr),
        peers: [(NodeId(2), peer_addr)].into(),
        socket: None,
        socket_admin: false,
        core: Config::default(),
    })
    .await
    .unwrap();
    node.membership(Epoch(1), BTreeMap::from([(NodeId(1), Incarnation(1))]));
    let client = node.client();
    let held = client
        .lock("ls", b"r", Mode::PR, Flags::NONE)
        .await
        .unwrap();

    let hello = |node: u32| {
        frame(&Frame::Hello {
            node: NodeId(node),
            incarnation: Incarnation(5),
            peer_incarnation: Incarnation(0),
            receive_next: 0,
        })
    };
    // Garbage, an absurd length, a bad checksum, a bad version.
    expect_reset(addr, b"GET / HTTP/1.1\r\n\r\n", "garbage").await;
    expect_reset(addr, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], "a 4 GiB length").await;
    let mut bad_crc = hello(2);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 0x5a;
    expect_reset(addr, &bad_crc, "a bad checksum").await;
    // A well-formed hello from a node that is not configured.
    expect_reset(addr, &hello(9), "an unknown node").await;
    // A configured peer skipping sequence numbers, then one sending garbage mid-stream.
    let mut gap = hello(2);
    gap.extend(frame(&Frame::Ack { next: 1 }));
    gap.extend(frame(&Frame::Data {
        seq: 7,
        message: Message::RecoverDone { epoch: Epoch(1) },
    }));
    expect_reset(addr, &gap, "a sequence gap").await;
    let mut midway = hello(2);
    midway.extend(frame(&Frame::Ack { next: 1 }));
    midway.extend(frame(&Frame::Data {
        seq: 1,
        message: Message::Unlock {
            resource: ResourceKey::new("ls", b"r").unwrap(),
            lock: LockId(1),
            lvb: None,
        },
    }));
    midway.extend_from_slice(&[0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect_reset(addr, &midway, "garbage after valid frames").await;

    // The node still serves, and the forged unlock from a non-member changed nothing:
    // our PR lock still blocks an EX request.
    let status = node.status();
    assert_eq!(status.state, "running");
    assert_eq!(status.owned.len(), 1, "{status:?}");
    let other = node.client();
    let err = other
        .lock("ls", b"r", Mode::EX, Flags::NOQUEUE)
        .await
        .unwrap_err();
    assert!(err.is_status(tandem_dlm::Status::WouldBlock), "{err}");
    client.unlock_wait(held.lock, None).await.unwrap();
    let g = other
        .lock("ls", b"r", Mode::EX, Flags::NOQUEUE)
        .await
        .unwrap();
    assert_eq!(g.mode, Mode::EX);
}
