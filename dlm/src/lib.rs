//! tandem's distributed lock manager.
//!
//! Lock spaces, resources by name, the six VMS/Linux modes, grant/convert/wait queues,
//! value blocks, blocking and completion callbacks — and recovery on membership change,
//! so that no two incompatible locks are ever granted anywhere in the cluster.
//!
//! - [`core`]: the sans-IO state machine ([`Dlm::step`]: events in, actions out);
//! - [`resource`]: one resource's queues on its master;
//! - [`wire`]: the peer frame codec;
//! - `shell` (feature `shell`, default): the tokio node (TCP transport, client API,
//!   unix-socket server) that `tandemd` embeds.
#![deny(unsafe_code)]

pub mod core;
pub mod error;
pub mod hash;
pub mod mode;
pub mod resource;
#[cfg(feature = "shell")]
pub mod shell;
pub mod types;
pub mod wire;

pub use crate::core::{Action, Completion, Dlm, Event, Message, Reply};
pub use error::DlmError;
pub use mode::Mode;
pub use types::{
    ClientId, Epoch, Flags, Incarnation, LockId, Lvb, LvbCopy, NodeId, ResourceKey, Status,
};
