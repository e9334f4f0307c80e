//! The authenticated peer transport shared by membership, replication and the DLM.
//!
//! Every TCP connection between nodes starts with a mutual challenge-response: both sides
//! prove knowledge of the cluster secret with HMAC-SHA256 over fresh nonces, so neither a
//! peer without the secret nor a node of another cluster gets past the first frames, and
//! a recorded handshake cannot be replayed. After it, the stream belongs to the channel
//! named in the hello (membership, a volume's replication, the DLM), which frames its own
//! traffic.
//!
//! ```text
//!  client                                   server
//!    Hello{magic,version,cluster,from,to,channel,nonce_c} ──►
//!    ◄── Challenge{nonce_s, proof_s = HMAC(k, "server"|transcript)}
//!    Proof{proof_c = HMAC(k, "client"|transcript)} ──►
//!    ◄── Verdict{ok | refused: reason}
//! ```

use super::types::NodeId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: [u8; 4] = *b"TNDM";
const VERSION: u16 = 1;
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
/// Longest cluster or channel name on the wire.
const MAX_NAME: usize = 64;
/// A handshake that takes longer than this is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Heartbeats and the cluster log (raft RPCs).
    Membership,
    /// Replication of one volume.
    Replication(String),
    /// The distributed lock manager.
    Dlm,
}

impl Channel {
    fn encode(&self) -> (u8, &str) {
        match self {
            Channel::Membership => (1, ""),
            Channel::Replication(volume) => (2, volume.as_str()),
            Channel::Dlm => (3, ""),
        }
    }

    fn decode(kind: u8, name: String) -> Result<Self, HandshakeError> {
        match kind {
            1 => Ok(Channel::Membership),
            2 if !name.is_empty() => Ok(Channel::Replication(name)),
            3 => Ok(Channel::Dlm),
            _ => Err(HandshakeError::Malformed(format!("unknown channel {kind}"))),
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Channel::Membership => write!(f, "membership"),
            Channel::Replication(v) => write!(f, "replication/{v}"),
            Channel::Dlm => write!(f, "dlm"),
        }
    }
}

/// Why a handshake failed. The peer is told a short reason; the full one is logged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("not a tandem peer (bad magic)")]
    BadMagic,
    #[error("protocol version {0} is not supported (this node speaks {VERSION})")]
    Version(u16),
    #[error("peer belongs to cluster `{theirs}`, not `{ours}`")]
    WrongCluster { ours: String, theirs: String },
    #[error("peer claims to be node {claimed}, which is not in the configuration")]
    UnknownNode { claimed: NodeId },
    #[error("peer addressed node {to}, but this is node {me}")]
    WrongNode { to: NodeId, me: NodeId },
    #[error("peer failed to prove knowledge of the cluster secret")]
    BadProof,
    #[error("server refused the connection: {0}")]
    Refused(String),
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("handshake timed out")]
    Timeout,
    #[error("i/o during handshake")]
    Io(#[from] std::io::Error),
}

/// The identity and secret a node uses for its connections.
#[derive(Clone)]
pub struct Credentials {
    pub cluster: String,
    pub node: NodeId,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(cluster: &str, node: NodeId, secret: &[u8]) -> Self {
        Self {
            cluster: cluster.into(),
            node,
            secret: secret.to_vec(),
        }
    }

    fn proof(&self, role: &[u8], transcript: &[u8]) -> [u8; PROOF_LEN] {
        // HMAC accepts keys of any length; an error is impossible.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(role);
        mac.update(transcript);
        mac.finalize().into_bytes().into()
    }
}

/// Everything both sides sign: who, to whom, for what, and both nonces.
fn transcript(
    cluster: &str,
    from: NodeId,
    to: NodeId,
    channel: &Channel,
    nonce_c: &[u8; NONCE_LEN],
    nonce_s: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let (kind, name) = channel.encode();
    let mut t = Vec::with_capacity(128);
    t.extend_from_slice(&MAGIC);
    t.extend_from_slice(&VERSION.to_be_bytes());
    put_name(&mut t, cluster);
    t.extend_from_slice(&from.0.to_be_bytes());
    t.extend_from_slice(&to.0.to_be_bytes());
    t.push(kind);
    put_name(&mut t, name);
    t.extend_from_slice(nonce_c);
    t.extend_from_slice(nonce_s);
    t
}

fn put_name(buf: &mut Vec<u8>, name: &str) {
    let bytes = &name.as_bytes()[..name.len().min(MAX_NAME)];
    buf.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(bytes);
}

fn nonce() -> [u8; NONCE_LEN] {
    use rand::RngCore;
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_name<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HandshakeError> {
    let len = usize::from(s.read_u8().await?);
    if len > MAX_NAME {
        return Err(HandshakeError::Malformed(format!("name of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    String::from_utf8(buf).map_err(|_| HandshakeError::Malformed("name is not UTF-8".into()))
}

/// Opens the client side: proves ourselves to node `to` for `channel`, checks its proof.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    to: NodeId,
    channel: &Channel,
) -> Result<(), HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, client_steps(stream, creds, to, channel))
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

async fn client_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    to: NodeId,
    channel: &Channel,
) -> Result<(), HandshakeError> {
    let nonce_c = nonce();
    let (kind, name) = channel.encode();
    let mut hello = Vec::with_capacity(160);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_be_bytes());
    put_name(&mut hello, &creds.cluster);
    hello.extend_from_slice(&creds.node.0.to_be_bytes());
    hello.extend_from_slice(&to.0.to_be_bytes());
    hello.push(kind);
    put_name(&mut hello, name);
    hello.extend_from_slice(&nonce_c);
    stream.write_all(&hello).await?;
    stream.flush().await?;

    let status = stream.read_u8().await?;
    if status != 0 {
        let reason = read_name(stream)
            .await
            .unwrap_or_else(|_| "unreadable reason".into());
        return Err(HandshakeError::Refused(reason));
    }
    let mut nonce_s = [0u8; NONCE_LEN];
    stream.read_exact(&mut nonce_s).await?;
    let mut proof_s = [0u8; PROOF_LEN];
    stream.read_exact(&mut proof_s).await?;
    let t = transcript(&creds.cluster, creds.node, to, channel, &nonce_c, &nonce_s);
    if !constant_time_eq(&proof_s, &creds.proof(b"server", &t)) {
        // Close our side so the impostor learns at once that it was not believed.
        let _ = stream.shutdown().await;
        return Err(HandshakeError::BadProof);
    }
    stream.write_all(&creds.proof(b"client", &t)).await?;
    stream.flush().await?;
    match stream.read_u8().await? {
        0 => Ok(()),
        _ => Err(HandshakeError::Refused(
            read_name(stream)
                .await
                .unwrap_or_else(|_| "unreadable reason".into()),
        )),
    }
}

/// Accepts the server side: checks the hello and the client's proof. Returns who the peer
/// is and which channel it asked for. `is_member` says whether a node id is configured.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    is_member: impl Fn(NodeId) -> bool,
) -> Result<(NodeId, Channel), HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, server_steps(stream, creds, is_member))
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, error: HandshakeError) -> HandshakeError {
    // Tell the peer the short reason, but never anything about the secret.
    let mut reply = vec![1u8];
    put_name(&mut reply, &error.to_string());
    let _ = stream.write_all(&reply).await;
    let _ = stream.flush().await;
    error
}

async fn server_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    is_member: impl Fn(NodeId) -> bool,
) -> Result<(NodeId, Channel), HandshakeError> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await?;
    if magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = stream.read_u16().await?;
    if version != VERSION {
        return Err(refuse(stream, HandshakeError::Version(version)).await);
    }
    let cluster = read_name(stream).await?;
    let from = NodeId(stream.read_u64().await?);
    let to = NodeId(stream.read_u64().await?);
    let kind = stream.read_u8().await?;
    let name = read_name(stream).await?;
    let mut nonce_c = [0u8; NONCE_LEN];
    stream.read_exact(&mut nonce_c).await?;
    if cluster != creds.cluster {
        let e = HandshakeError::WrongCluster {
            ours: creds.cluster.clone(),
            theirs: cluster,
        };
        return Err(refuse(stream, e).await);
    }
    if to != creds.node {
        return Err(refuse(stream, HandshakeError::WrongNode { to, me: creds.node }).await);
    }
    if !is_member(from) || from == creds.node {
        return Err(refuse(stream, HandshakeError::UnknownNode { claimed: from }).await);
    }
    let channel = match Channel::decode(kind, name) {
        Ok(c) => c,
        Err(e) => return Err(refuse(stream, e).await),
    };
    let nonce_s = nonce();
    let t = transcript(&creds.cluster, from, to, &channel, &nonce_c, &nonce_s);
    let mut challenge = Vec::with_capacity(1 + NONCE_LEN + PROOF_LEN);
    challenge.push(0);
    challenge.extend_from_slice(&nonce_s);
    challenge.extend_from_slice(&creds.proof(b"server", &t));
    stream.write_all(&challenge).await?;
    stream.flush().await?;
    let mut proof_c = [0u8; PROOF_LEN];
    stream.read_exact(&mut proof_c).await?;
    if !constant_time_eq(&proof_c, &creds.proof(b"client", &t)) {
        return Err(refuse(stream, HandshakeError::BadProof).await);
    }
    stream.write_all(&[0]).await?;
    stream.flush().await?;
    Ok((from, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(cluster: &str, node: u64, secret: &str) -> Credentials {
        Credentials::new(cluster, NodeId(node), secret.as_bytes())
    }

    async fn pair(
        client: Credentials,
        server: Credentials,
        to: u64,
        channel: Channel,
    ) -> (
        Result<(), HandshakeError>,
        Result<(NodeId, Channel), HandshakeError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let members = [1u64, 2, 3];
        tokio::join!(
            client_handshake(&mut a, &client, NodeId(to), &channel),
            server_handshake(&mut b, &server, |n| members.contains(&n.0)),
        )
    }

    #[tokio::test]
    async fn same_secret_connects_and_names_peer_and_channel() {
        let secret = "0123456789abcdef0123";
        let (c, s) = pair(
            creds("demo", 1, secret),
            creds("demo", 2, secret),
            2,
            Channel::Replication("vol0".into()),
        )
        .await;
        c.unwrap();
        assert_eq!(s.unwrap(), (NodeId(1), Channel::Replication("vol0".into())));
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (c, s) = pair(
            creds("demo", 1, "attacker-secret-xxxxxxxx"),
            creds("demo", 2, "0123456789abcdef0123"),
            2,
            Channel::Membership,
        )
        .await;
        // The client sees the server's proof fail first and gives up.
        assert!(matches!(c, Err(HandshakeError::BadProof)), "{c:?}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn wrong_cluster_unknown_node_and_wrong_target_are_refused_with_reasons() {
        let secret = "0123456789abcdef0123";
        let (c, s) = pair(
            creds("other", 1, secret),
            creds("demo", 2, secret),
            2,
            Channel::Dlm,
        )
        .await;
        assert!(
            matches!(s, Err(HandshakeError::WrongCluster { .. })),
            "{s:?}"
        );
        let reason = c.unwrap_err().to_string();
        assert!(reason.contains("cluster `other`"), "{reason}");

        let (_c, s) = pair(
            creds("demo", 9, secret),
            creds("demo", 2, secret),
            2,
            Channel::Dlm,
        )
        .await;
        assert!(
            matches!(s, Err(HandshakeError::UnknownNode { .. })),
            "{s:?}"
        );

        let (_c, s) = pair(
            creds("demo", 1, secret),
            creds("demo", 2, secret),
            3,
            Channel::Dlm,
        )
        .await;
        assert!(matches!(s, Err(HandshakeError::WrongNode { .. })), "{s:?}");
    }

    #[tokio::test]
    async fn garbage_is_refused_without_panic() {
        let server = creds("demo", 2, "0123456789abcdef0123");
        for garbage in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"TNDM\x00\x07",
            b"TNDM\x00\x01\xff",
            b"",
        ] {
            let (mut a, mut b) = tokio::io::duplex(4096);
            a.write_all(garbage).await.unwrap();
            drop(a);
            let result = server_handshake(&mut b, &server, |_| true).await;
            assert!(result.is_err(), "{garbage:?} accepted");
        }
    }

    #[tokio::test]
    async fn a_replayed_client_proof_fails_against_a_fresh_nonce() {
        // Proofs depend on the server's fresh nonce, so two handshakes never share one.
        let c = creds("demo", 1, "0123456789abcdef0123");
        let t1 = transcript(
            "demo",
            NodeId(1),
            NodeId(2),
            &Channel::Dlm,
            &[1; 32],
            &nonce(),
        );
        let t2 = transcript(
            "demo",
            NodeId(1),
            NodeId(2),
            &Channel::Dlm,
            &[1; 32],
            &nonce(),
        );
        assert_ne!(c.proof(b"client", &t1), c.proof(b"client", &t2));
    }
}
