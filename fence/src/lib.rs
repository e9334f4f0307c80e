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
//!
//! How the daemon uses it (here on an emulated LU; on real disks build the policy with
//! [`FencePolicy::open`] from device paths — multipath maps expand to their paths):
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tandem_fence::emulator::{Emulator, NexusInfo};
//! use tandem_fence::transport::{EmulatedPath, PrTransport};
//! use tandem_fence::{FenceMethod, FencePolicy, FenceSettings, PrKey};
//!
//! let mut lu = Emulator::new();
//! let (na, nb) = (lu.add_nexus(NexusInfo::sas(0xa, 1)), lu.add_nexus(NexusInfo::sas(0xb, 2)));
//! let lu = Arc::new(Mutex::new(lu));
//! let path = |n, name| Arc::new(EmulatedPath::connect(&lu, n, name)) as Arc<dyn PrTransport>;
//! let settings = FenceSettings::default(); // WERO, PREEMPT AND ABORT with fallback
//! let a = FencePolicy::new(PrKey::derive("prod", 1, 1), vec![path(na, "a")], settings.clone())?;
//! let b = FencePolicy::new(PrKey::derive("prod", 2, 1), vec![path(nb, "b")], settings)?;
//! a.unfence(1_000)?; // registers, and reserves: nobody held a reservation
//! b.unfence(1_001)?; // registers
//! let record = b.fence(a.key(), 5_000)?; // node 1 stopped answering
//! assert_eq!((record.whom.node_id, record.method), (1, FenceMethod::PreemptAndAbort));
//! assert!(!a.verify()?.registered);
//! # Ok::<(), tandem_fence::FenceError>(())
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
