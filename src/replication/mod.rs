//! Synchronous block replication between two nodes (DRBD-class, in userspace).
//!
//! | module | what |
//! |--------|------|
//! | [`core`] | the replica state machine (sans-IO): roles, links, disks, writes, resync |
//! | [`metadata_io`] | the core's metadata actions on a metadata region (shell and simulator) |
//! | [`decide`] | sync direction and split-brain detection from generation ids |
//! | [`wire`] | the peer protocol's frames (magic, version, crc) |
//! | [`transport`] | connected peer streams ([`PeerConnector`]) and frame I/O |
//! | [`volume`] | the [`Volume`] handle: I/O, roles, status, events, fencing hook |
//! | `shell` | the async task running a core against the store, metadata and peer |
//! | [`control`] | the JSON-lines control socket of a standalone replica |
//! | [`types`] | identifiers and states |

pub mod control;
pub mod core;
pub mod decide;
pub mod latency;
pub mod lease;
pub mod metadata_io;
mod shell;
pub mod transport;
pub mod types;
pub mod volume;
pub mod wire;

pub use shell::{digest, error_chain};
pub use transport::{PeerConnector, PeerStream, TcpConnector};
pub use volume::{
    Fencer, LocalFencer, MetadataLocation, StoreLayer, Volume, VolumeConfig, VolumeEvent,
    VolumeStatus,
};
