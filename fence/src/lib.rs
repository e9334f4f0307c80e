//! SCSI-3 (SPC-4) and NVMe persistent reservations, and the fencing policy tandem builds on
//! them.
//!
//! ```text
//!  policy      FencePolicy: unfence / fence / verify, SelfCheck      (pure decisions, time passed in)
//!     │ PrTransport (sync: SG_IO blocks, so callers use a blocking thread)
//!  transport   SgDevice (SG_IO)  BlockPr (IOC_PR_* + SG_IO reads)  NvmeDevice  Multipath  EmulatedPath
//!     │
//!  sys         the only unsafe code: sg_io_hdr, linux/pr.h, nvme_passthru_cmd ioctls
//!  pr          bytes: CDBs, parameter lists, PR IN data, sense, TransportIDs, NVMe structures
//!  emulator    an in-memory SPC-4 device server (LIO's behaviour) for tests and simulation
//! ```
#![deny(unsafe_code)]

pub mod emulator;
mod error;
mod key;
pub mod policy;
pub mod pr;
mod sys;
pub mod transport;

pub use error::{ErrorKind, FenceError, Operation, Result};
pub use key::{KeyParts, ParseKeyError, PrKey};
#[cfg(feature = "shell")]
pub use policy::SelfCheckTask;
pub use policy::{
    FenceMethod, FencePolicy, FenceRecord, FenceSettings, PathOutcome, PreemptFlavour, SelfCheck,
    SelfCheckEvent, UnfenceRecord, Verification,
};
pub use transport::PrTransport;
