//! Paths to an [`Emulator`]: the same CDB (or NVMe) bytes and the same error handling as a
//! real device, so tests and the cluster simulation exercise the real transport code. Each
//! path has fault switches: a dead path, a stuck target, and a target that refuses PREEMPT
//! AND ABORT with ILLEGAL REQUEST (as tgtd does).

use super::nvme::{NvmePr, NvmeSubmit};
use super::scsi::{RawScsiResult, ScsiPr, ScsiSubmit};
use crate::Operation;
use crate::emulator::{Emulator, NexusId};
use crate::error::{FenceError, Result};
use crate::pr::PrOutAction;
use crate::pr::cdb::PERSISTENT_RESERVE_OUT;
use crate::pr::nvme::{NvmeCommandWords, NvmeStatus};
use crate::pr::sense::{Sense, SenseKey};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Failure switches of one emulated path.
#[derive(Debug, Default)]
pub struct PathFaults {
    /// Every command fails as if the link were gone (host status DID_NO_CONNECT).
    pub down: AtomicBool,
    /// Every command times out (a stuck target).
    pub stuck: AtomicBool,
    /// PREEMPT AND ABORT is refused with ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub reject_preempt_and_abort: AtomicBool,
}

impl PathFaults {
    fn check(&self, op: Operation, name: &str) -> Result<()> {
        if self.stuck.load(Ordering::SeqCst) {
            return Err(FenceError::Timeout {
                op,
                device: name.to_owned(),
                timeout_ms: 0,
            });
        }
        Ok(())
    }
}

fn lock(lu: &Mutex<Emulator>) -> std::sync::MutexGuard<'_, Emulator> {
    lu.lock().unwrap_or_else(|e| e.into_inner())
}

/// SCSI commands into one emulator nexus.
#[derive(Debug, Clone)]
pub struct EmulatorScsi {
    lu: Arc<Mutex<Emulator>>,
    nexus: NexusId,
    name: String,
    faults: Arc<PathFaults>,
}

impl ScsiSubmit for EmulatorScsi {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(
        &self,
        op: Operation,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> Result<RawScsiResult> {
        self.faults.check(op, &self.name)?;
        if self.faults.down.load(Ordering::SeqCst) {
            return Ok(RawScsiResult {
                host_status: 0x01,
                ..RawScsiResult::default()
            });
        }
        if self.faults.reject_preempt_and_abort.load(Ordering::SeqCst)
            && cdb.first() == Some(&PERSISTENT_RESERVE_OUT)
            && cdb.get(1).map(|b| b & 0x1f) == Some(PrOutAction::PreemptAndAbort.code())
        {
            return Ok(RawScsiResult {
                status: 0x02,
                sense: Sense::new(SenseKey::IllegalRequest, 0x24, 0).encode(),
                ..RawScsiResult::default()
            });
        }
        let resp = lock(&self.lu).execute(self.nexus, cdb, data_out);
        let mut data = resp.data;
        data.truncate(data_in_len);
        Ok(RawScsiResult {
            status: resp.status.0,
            host_status: 0,
            driver_status: 0,
            sense: resp.sense.map(|s| s.encode()).unwrap_or_default(),
            data,
            overrun: 0,
        })
    }
}

/// A SCSI path to an emulated LU.
pub type EmulatedPath = ScsiPr<EmulatorScsi>;

impl EmulatedPath {
    /// A path through `nexus` of `lu`, called `name` in errors and records.
    pub fn connect(lu: &Arc<Mutex<Emulator>>, nexus: NexusId, name: &str) -> Self {
        ScsiPr::new(
            EmulatorScsi {
                lu: Arc::clone(lu),
                nexus,
                name: name.to_owned(),
                faults: Arc::new(PathFaults::default()),
            },
            1000,
        )
    }

    /// This path's failure switches.
    pub fn faults(&self) -> &Arc<PathFaults> {
        &self.submitter().faults
    }

    pub fn nexus(&self) -> NexusId {
        self.submitter().nexus
    }
}

/// NVMe commands into one emulator host.
#[derive(Debug, Clone)]
pub struct EmulatorNvme {
    lu: Arc<Mutex<Emulator>>,
    host: NexusId,
    name: String,
    faults: Arc<PathFaults>,
    /// Whether Identify Controller claims reservation support (ONCS bit 5). When false the
    /// emulated controller also answers every reservation command with Invalid Command
    /// Opcode, like Linux 6.12's nvmet.
    reservations: Arc<AtomicBool>,
}

impl NvmeSubmit for EmulatorNvme {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(&self, op: Operation, words: &NvmeCommandWords) -> Result<(NvmeStatus, Vec<u8>)> {
        self.faults.check(op, &self.name)?;
        if self.faults.down.load(Ordering::SeqCst) {
            return Err(FenceError::Transport {
                op,
                device: self.name.clone(),
                detail: "path down".to_owned(),
            });
        }
        if !self.reservations.load(Ordering::SeqCst) {
            return Ok((NvmeStatus(0x4001), Vec::new()));
        }
        let c = lock(&self.lu).nvme_execute(self.host, words);
        Ok((c.status, c.data))
    }

    fn identify_controller(&self) -> Result<Vec<u8>> {
        let mut id = vec![0u8; 4096];
        if self.reservations.load(Ordering::SeqCst) {
            id[520] = 1 << 5;
        }
        Ok(id)
    }

    fn identify_namespace(&self) -> Result<Vec<u8>> {
        let mut id = vec![0u8; 4096];
        if self.reservations.load(Ordering::SeqCst) {
            id[31] = 0x7f;
        }
        Ok(id)
    }
}

/// An NVMe path to an emulated namespace.
pub type EmulatedNvmePath = NvmePr<EmulatorNvme>;

impl EmulatedNvmePath {
    pub fn connect(lu: &Arc<Mutex<Emulator>>, host: NexusId, name: &str) -> Self {
        NvmePr::new(EmulatorNvme {
            lu: Arc::clone(lu),
            host,
            name: name.to_owned(),
            faults: Arc::new(PathFaults::default()),
            reservations: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Makes the controller claim no reservation support (ONCS bit 5 clear).
    pub fn without_reservations(self) -> Self {
        self.submitter().reservations.store(false, Ordering::SeqCst);
        self
    }

    pub fn faults(&self) -> &Arc<PathFaults> {
        &self.submitter().faults
    }
}
