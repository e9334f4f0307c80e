//! The crate's error type.

use crate::types::NodeId;

/// Errors of the lock manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlmError {
    /// A resource name is empty or longer than 64 bytes.
    #[error("resource name of {len_bytes} bytes (must be 1..=64)")]
    InvalidName {
        /// Its length.
        len_bytes: usize,
    },
    /// A lock space name is empty, too long or not UTF-8.
    #[error("invalid lock space name {lockspace:?} (must be 1..=64 bytes of UTF-8)")]
    InvalidLockspace {
        /// The name.
        lockspace: String,
    },
    /// A frame from a peer could not be decoded.
    #[error("decoding a frame: {reason}")]
    DecodeFrame {
        /// What was wrong.
        reason: String,
    },
    /// A request finished with a status other than the one the API call needs.
    #[error("{op} on {resource}: {status}")]
    Request {
        /// lock, convert, unlock or cancel.
        op: &'static str,
        /// The resource.
        resource: String,
        /// How it ended.
        status: crate::types::Status,
    },
    /// Socket or file I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer connection handshake failed.
    #[error("handshake with node {peer}: {reason}")]
    Handshake {
        /// The peer.
        peer: NodeId,
        /// What was wrong.
        reason: String,
    },
    /// A client protocol line could not be parsed.
    #[error("client protocol: {reason}")]
    ClientProtocol {
        /// What was wrong.
        reason: String,
    },
    /// The node is shut down.
    #[error("the lock manager node has stopped")]
    Stopped,
}

impl DlmError {
    /// True if the error is a request that ended with this status.
    pub fn is_status(&self, status: crate::types::Status) -> bool {
        matches!(self, DlmError::Request { status: s, .. } if *s == status)
    }
}
