//! `TandemError`: the one error enum of the `tandem` library.
//!
//! Variants are named after the operation that failed and carry its context (volume, peer,
//! offset, path); the cause sits in `#[source]`, never repeated in the message. Module
//! errors (`FixtureError`, wire and metadata decode errors) convert into it.

use std::path::PathBuf;

/// Result alias of the `tandem` library.
pub type Result<T, E = TandemError> = std::result::Result<T, E>;

/// Everything that can fail in the `tandem` library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TandemError {
    /// A storage fixture operation failed.
    #[error(transparent)]
    Fixture(#[from] crate::fixture::FixtureError),
    /// Opening a backing file or device failed.
    #[error("opening backing store {path}")]
    OpenBacking {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Setting up an io_uring instance failed.
    #[error("setting up io_uring for {what}")]
    SetupRing {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A data read from the backing store failed.
    #[error("reading {len_bytes} bytes at offset {offset} of the backing store")]
    ReadData {
        offset: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    /// A data write to the backing store failed.
    #[error("writing {len_bytes} bytes at offset {offset} of the backing store")]
    WriteData {
        offset: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    /// A flush (fdatasync) of the backing store failed.
    #[error("flushing the backing store")]
    FlushData {
        #[source]
        source: std::io::Error,
    },
    /// Discarding or zeroing a range of the backing store failed.
    #[error("deallocating {len_bytes} bytes at offset {offset} of the backing store")]
    Deallocate {
        offset: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    /// The store's I/O thread is gone (the store was closed or its thread died).
    #[error("the backing store's I/O thread is gone")]
    StoreClosed,
    /// A request did not fit the device (unaligned, out of range, too large).
    #[error("invalid I/O request: {0}")]
    InvalidRequest(String),
    /// Reading on-disk metadata failed.
    #[error("reading metadata from {path}")]
    ReadMetadata {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing on-disk metadata failed.
    #[error("writing metadata to {path}")]
    WriteMetadata {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// On-disk metadata is missing, corrupt or of another version.
    #[error("metadata on {path} is not usable: {reason}")]
    BadMetadata { path: PathBuf, reason: String },
    /// Bytes from a peer were refused (garbage, wrong volume, out-of-range offsets ...).
    #[error("refused message from peer: {0}")]
    PeerProtocol(String),
    /// The peer connection failed.
    #[error("peer connection {peer}")]
    PeerIo {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    /// Bytes from an NBD client were refused.
    #[error("refused NBD client request: {0}")]
    NbdProtocol(String),
    /// An NBD connection failed.
    #[error("NBD connection")]
    NbdIo {
        #[source]
        source: std::io::Error,
    },
    /// A volume operation was refused in the volume's current state.
    #[error("volume {volume}: {operation} refused: {reason}")]
    VolumeState {
        volume: String,
        operation: String,
        reason: String,
    },
    /// The volume's I/O failed (no usable disk, fenced, suspended then aborted ...).
    #[error("volume {volume}: I/O failed: {reason}")]
    VolumeIo { volume: String, reason: String },
    /// The volume task is gone.
    #[error("volume {0} is shut down")]
    VolumeGone(String),
    /// The control socket failed or got a bad request.
    #[error("control socket {what}")]
    Control {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A control request was malformed or named something unknown.
    #[error("bad control request: {0}")]
    BadControlRequest(String),
    /// The ublk frontend failed.
    #[error("ublk device: {what}")]
    Ublk { what: String },
    /// Configuration or command-line input is invalid.
    #[error("invalid configuration: {0}")]
    BadConfig(String),
    /// Any other I/O failure, with what was being done.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl TandemError {
    /// Wraps an `io::Error` with a description of what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// Is this a failure of the backing device (which detaches the disk)?
    pub fn is_backing_failure(&self) -> bool {
        matches!(
            self,
            Self::ReadData { .. }
                | Self::WriteData { .. }
                | Self::FlushData { .. }
                | Self::Deallocate { .. }
                | Self::StoreClosed
        )
    }

    /// Is this a refusal of bad input from a peer or a client (never a local fault)?
    pub fn is_refused_input(&self) -> bool {
        matches!(self, Self::PeerProtocol(_) | Self::NbdProtocol(_))
    }
}
