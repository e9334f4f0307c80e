//! The fencing policy: what a node does with persistent reservations, decided here once so
//! the daemon, the CLI and the simulation behave alike.
//!
//! ```text
//!  unfence  ──► REGISTER AND IGNORE EXISTING KEY (own key) on every path
//!               └─ no reservation? RESERVE Write Exclusive – Registrants Only (SCSI 5 / NVMe 3)
//!  fence(v) ──► READ KEYS: own key there? (else refuse: we may be the fenced one)
//!               ├─ v gone already ──────────────────────────────► record: already-gone
//!               └─ PREEMPT AND ABORT v ── ILLEGAL REQUEST ──► PREEMPT v   (record says so)
//!                  READ KEYS: v gone? (else FenceNotConfirmed); no reservation? RESERVE
//!  verify   ──► own key registered, reservation of the expected type present
//! ```
//!
//! Every command is retried (immediately, up to a limit) when the device answers UNIT
//! ATTENTION or BUSY; a command that times out ends the call with an error: a stuck target is
//! a fence failure, never a success. The policy has no clock: callers pass the time that
//! goes into the records, so a deterministic simulation can drive it with the emulator.

mod self_check;

#[cfg(feature = "shell")]
pub use self_check::SelfCheckTask;
pub use self_check::{SelfCheck, SelfCheckEvent, SelfCheckState};

use crate::Operation;
use crate::error::{FenceError, Result};
use crate::key::{KeyParts, PrKey};
use crate::pr::data::{KeyList, Reservation, ReservationInfo};
use crate::pr::{PrOutAction, PrOutCommand, ReservationType};
use crate::transport::{OpenOptions, PrTransport, open_paths};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How to take a victim's registration away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreemptFlavour {
    /// PREEMPT AND ABORT (also aborts the victim's queued commands); falls back to PREEMPT
    /// when the target refuses it with ILLEGAL REQUEST (tgtd does).
    #[default]
    PreemptAndAbort,
    /// Plain PREEMPT (for LIO tcm_loop on 6.12, where PREEMPT AND ABORT deadlocks).
    Preempt,
}

/// Settings of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceSettings {
    /// The reservation unfence establishes and fence re-establishes.
    pub reservation_type: ReservationType,
    pub preempt: PreemptFlavour,
    /// Ask registrations to persist through power loss.
    pub aptpl: bool,
    /// How many times one command is re-sent after UNIT ATTENTION or BUSY.
    pub retries: u32,
}

impl Default for FenceSettings {
    fn default() -> Self {
        Self {
            reservation_type: ReservationType::WriteExclusiveRegistrantsOnly,
            preempt: PreemptFlavour::PreemptAndAbort,
            aptpl: false,
            retries: 5,
        }
    }
}

/// How a fence was carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum FenceMethod {
    PreemptAndAbort,
    Preempt,
    /// PREEMPT AND ABORT was refused; plain PREEMPT did it.
    PreemptAfterAbortRefused {
        refusal: String,
    },
    /// The key was not registered when we looked (fenced before, or never registered).
    AlreadyGone,
}

/// The record of one fence, for the cluster log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// The fencing node's key.
    pub who: PrKey,
    /// The victim, read from its key (meaningful when it is a tandem key).
    pub whom: KeyParts,
    /// The key that was removed.
    pub key: PrKey,
    /// PRgeneration after the key was confirmed gone.
    pub generation: u32,
    /// Caller-supplied time of the fence (Unix milliseconds).
    pub time_ms: u64,
    #[serde(flatten)]
    pub method: FenceMethod,
    /// The path the fence went through.
    pub path: String,
    /// The reservation afterwards.
    pub reservation: Option<Reservation>,
    /// Anything else worth logging (retries, a reservation re-established, ...).
    pub notes: Vec<String>,
}

/// The outcome on one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathOutcome {
    pub path: String,
    pub error: Option<String>,
}

/// The record of an unfence (joining).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfenceRecord {
    pub key: PrKey,
    pub generation: u32,
    pub time_ms: u64,
    /// Registration result per path.
    pub paths: Vec<PathOutcome>,
    /// The reservation afterwards.
    pub reservation: Option<Reservation>,
    /// Whether this unfence created the reservation.
    pub reserved: bool,
    pub notes: Vec<String>,
}

impl UnfenceRecord {
    /// Registered on every path.
    pub fn is_complete(&self) -> bool {
        self.paths.iter().all(|p| p.error.is_none())
    }
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub key: PrKey,
    pub generation: u32,
    pub registered: bool,
    pub reservation: Option<Reservation>,
    /// Whether the reservation's key is ours (always false for all-registrants types).
    pub holder: bool,
    /// Problems found; empty means all is as expected.
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Errors after which trying another path makes sense.
fn is_path_failure(e: &FenceError) -> bool {
    matches!(
        e,
        FenceError::Transport { .. }
            | FenceError::Ioctl { .. }
            | FenceError::Open { .. }
            | FenceError::AllPathsFailed { .. }
    )
}

/// One node's fencing on one LU (all its paths).
#[derive(Debug, Clone)]
pub struct FencePolicy {
    own: PrKey,
    settings: FenceSettings,
    paths: Vec<Arc<dyn PrTransport>>,
}

impl FencePolicy {
    /// A policy for the node holding key `own`, on `paths` (every path to one LU).
    pub fn new(
        own: PrKey,
        paths: Vec<Arc<dyn PrTransport>>,
        settings: FenceSettings,
    ) -> Result<Self> {
        if own.is_zero() {
            return Err(FenceError::InvalidArgument {
                what: "reservation key",
                reason: "zero means \"no key\" in SPC-4".to_owned(),
            });
        }
        if paths.is_empty() {
            return Err(FenceError::NoPaths {
                op: Operation::Unfence,
            });
        }
        Ok(Self {
            own,
            settings,
            paths,
        })
    }

    /// Opens every path of every device in `devices` (multipath maps expand to their
    /// members) and builds a policy over them.
    pub fn open(
        own: PrKey,
        devices: &[&str],
        options: &OpenOptions,
        settings: FenceSettings,
    ) -> Result<Self> {
        let mut paths: Vec<Arc<dyn PrTransport>> = Vec::new();
        for device in devices {
            for p in open_paths(device, options)? {
                paths.push(Arc::from(p));
            }
        }
        Self::new(own, paths, settings)
    }

    pub fn key(&self) -> PrKey {
        self.own
    }

    pub fn settings(&self) -> &FenceSettings {
        &self.settings
    }

    pub fn paths(&self) -> &[Arc<dyn PrTransport>] {
        &self.paths
    }

    /// Runs `f` again while it fails with UNIT ATTENTION or BUSY, up to the retry limit;
    /// counts retries into `retried`.
    fn retrying<T>(&self, retried: &mut u32, f: impl Fn() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            match f() {
                Err(e) if e.is_retryable() && attempt < self.settings.retries => {
                    attempt += 1;
                    *retried += 1;
                }
                other => return other,
            }
        }
    }

    /// READ KEYS through the first path that answers.
    pub fn read_keys(&self) -> Result<KeyList> {
        let mut retried = 0;
        self.first_path(Operation::PrIn(crate::pr::PrInAction::ReadKeys), |path| {
            self.retrying(&mut retried, || path.read_keys())
        })
        .map(|(keys, _)| keys)
    }

    /// Runs `f` on paths in order until one does not fail with a path failure.
    fn first_path<T>(
        &self,
        op: Operation,
        mut f: impl FnMut(&dyn PrTransport) -> Result<T>,
    ) -> Result<(T, String)> {
        let mut failures = Vec::new();
        for path in &self.paths {
            match f(path.as_ref()) {
                Ok(v) => return Ok((v, path.name().to_owned())),
                Err(e) if is_path_failure(&e) => {
                    failures.push((path.name().to_owned(), e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Err(FenceError::AllPathsFailed { op, failures })
    }

    /// Registers our key on every path and makes sure a reservation of the configured type
    /// exists. Succeeds if at least one path registered; the record lists any that failed.
    pub fn unfence(&self, time_ms: u64) -> Result<UnfenceRecord> {
        let mut retried = 0u32;
        let register = PrOutCommand::register_and_ignore(self.own).with_aptpl(self.settings.aptpl);
        let mut outcomes = Vec::new();
        let mut working: Option<&Arc<dyn PrTransport>> = None;
        for path in &self.paths {
            match self.retrying(&mut retried, || path.pr_out(&register)) {
                Ok(()) => {
                    working.get_or_insert(path);
                    outcomes.push(PathOutcome {
                        path: path.name().to_owned(),
                        error: None,
                    });
                }
                Err(e) if e.is_timeout() => return Err(e),
                Err(e) => outcomes.push(PathOutcome {
                    path: path.name().to_owned(),
                    error: Some(e.to_string()),
                }),
            }
        }
        let Some(path) = working else {
            return Err(FenceError::AllPathsFailed {
                op: Operation::Unfence,
                failures: outcomes
                    .into_iter()
                    .map(|o| (o.path, o.error.unwrap_or_default()))
                    .collect(),
            });
        };
        let mut notes = Vec::new();
        let (info, reserved) = self.ensure_reservation(path.as_ref(), &mut retried, &mut notes)?;
        let keys = self.retrying(&mut retried, || path.read_keys())?;
        if !keys.contains(self.own) {
            return Err(FenceError::NotRegistered {
                op: Operation::Unfence,
                key: self.own,
                device: path.name().to_owned(),
            });
        }
        if retried > 0 {
            notes.push(format!(
                "{retried} command(s) re-sent after UNIT ATTENTION or BUSY"
            ));
        }
        Ok(UnfenceRecord {
            key: self.own,
            generation: keys.generation.max(info.generation),
            time_ms,
            paths: outcomes,
            reservation: info.reservation,
            reserved,
            notes,
        })
    }

    /// Reserves with our key when there is no reservation. Returns the reservation after,
    /// and whether we created it.
    fn ensure_reservation(
        &self,
        path: &dyn PrTransport,
        retried: &mut u32,
        notes: &mut Vec<String>,
    ) -> Result<(ReservationInfo, bool)> {
        let wanted = self.settings.reservation_type;
        let info = self.retrying(retried, || path.read_reservation())?;
        if let Some(r) = info.reservation {
            if r.type_code != wanted.scsi_code() {
                notes.push(format!(
                    "the LU holds a {} reservation, not the configured {wanted}",
                    r.type_description()
                ));
            }
            return Ok((info, false));
        }
        match self.retrying(retried, || {
            path.pr_out(&PrOutCommand::reserve(self.own, wanted))
        }) {
            Ok(()) => {
                notes.push(format!("reserved {wanted} with key {}", self.own));
                let after = self.retrying(retried, || path.read_reservation())?;
                Ok((after, true))
            }
            // Someone else reserved between our read and our RESERVE: fine, as long as there
            // is a reservation now.
            Err(e) if e.is_reservation_conflict() => {
                let after = self.retrying(retried, || path.read_reservation())?;
                if after.reservation.is_none() {
                    return Err(e);
                }
                notes.push("another node reserved first".to_owned());
                Ok((after, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Removes `victim`'s registration (every I_T nexus registered with it) and confirms it
    /// is gone. Idempotent: a key that is already gone gives an `AlreadyGone` record.
    pub fn fence(&self, victim: PrKey, time_ms: u64) -> Result<FenceRecord> {
        if victim.is_zero() {
            return Err(FenceError::InvalidArgument {
                what: "victim key",
                reason: "zero is not a key".to_owned(),
            });
        }
        if victim == self.own {
            return Err(FenceError::InvalidArgument {
                what: "victim key",
                reason: format!("{victim} is this node's own key"),
            });
        }
        let mut failures = Vec::new();
        for path in &self.paths {
            match self.fence_via(path.as_ref(), victim, time_ms) {
                Ok(record) => return Ok(record),
                Err(e) if e.is_timeout() => return Err(e),
                // A path that is down, or whose nexus is not registered with our key.
                Err(e) if is_path_failure(&e) || e.is_reservation_conflict() => {
                    failures.push((path.name().to_owned(), e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Err(FenceError::AllPathsFailed {
            op: Operation::Fence,
            failures,
        })
    }

    fn fence_via(
        &self,
        path: &dyn PrTransport,
        victim: PrKey,
        time_ms: u64,
    ) -> Result<FenceRecord> {
        let mut retried = 0u32;
        let mut notes = Vec::new();
        let ty = self.settings.reservation_type;
        let keys = self.retrying(&mut retried, || path.read_keys())?;
        if !keys.contains(self.own) {
            return Err(FenceError::NotRegistered {
                op: Operation::Fence,
                key: self.own,
                device: path.name().to_owned(),
            });
        }
        let mut method = FenceMethod::AlreadyGone;
        if keys.contains(victim) {
            let preempt = PrOutCommand::preempt(self.own, victim, ty);
            let abort = PrOutCommand::preempt_and_abort(self.own, victim, ty);
            let outcome = match self.settings.preempt {
                PreemptFlavour::Preempt => {
                    method = FenceMethod::Preempt;
                    self.retrying(&mut retried, || path.pr_out(&preempt))
                }
                PreemptFlavour::PreemptAndAbort => {
                    method = FenceMethod::PreemptAndAbort;
                    match self.retrying(&mut retried, || path.pr_out(&abort)) {
                        Err(e) if e.is_illegal_request() => {
                            method = FenceMethod::PreemptAfterAbortRefused {
                                refusal: e.to_string(),
                            };
                            self.retrying(&mut retried, || path.pr_out(&preempt))
                        }
                        other => other,
                    }
                }
            };
            if let Err(e) = outcome {
                // A conflict also comes back when the victim's key vanished between our READ
                // KEYS and the PREEMPT (another node fenced it): look before failing.
                if !e.is_reservation_conflict() {
                    return Err(e);
                }
                let now = self.retrying(&mut retried, || path.read_keys())?;
                if now.contains(victim) || !now.contains(self.own) {
                    return Err(e);
                }
                notes.push(format!(
                    "the key disappeared before our {}",
                    preempt.action.name()
                ));
                method = FenceMethod::AlreadyGone;
            }
        }
        let after = self.retrying(&mut retried, || path.read_keys())?;
        if after.contains(victim) {
            return Err(FenceError::FenceNotConfirmed {
                victim,
                device: path.name().to_owned(),
                method: match &method {
                    FenceMethod::PreemptAndAbort => PrOutAction::PreemptAndAbort.name().to_owned(),
                    _ => PrOutAction::Preempt.name().to_owned(),
                },
            });
        }
        if !after.contains(self.own) {
            return Err(FenceError::NotRegistered {
                op: Operation::Fence,
                key: self.own,
                device: path.name().to_owned(),
            });
        }
        let (info, _) = self.ensure_reservation(path, &mut retried, &mut notes)?;
        if retried > 0 {
            notes.push(format!(
                "{retried} command(s) re-sent after UNIT ATTENTION or BUSY"
            ));
        }
        Ok(FenceRecord {
            who: self.own,
            whom: victim.parts(),
            key: victim,
            generation: after.generation.max(info.generation),
            time_ms,
            method,
            path: path.name().to_owned(),
            reservation: info.reservation,
            notes,
        })
    }

    /// Checks that our key is registered and a reservation of the configured type exists.
    pub fn verify(&self) -> Result<Verification> {
        let mut retried = 0;
        let ((keys, info), _) = self.first_path(Operation::Verify, |path| {
            let keys = self.retrying(&mut retried, || path.read_keys())?;
            let info = self.retrying(&mut retried, || path.read_reservation())?;
            Ok((keys, info))
        })?;
        let registered = keys.contains(self.own);
        let mut problems = Vec::new();
        if !registered {
            problems.push(format!("own key {} is not registered", self.own));
        }
        let wanted = self.settings.reservation_type;
        match info.reservation {
            None => problems.push(format!("there is no reservation (expected {wanted})")),
            Some(r) if r.type_code != wanted.scsi_code() => problems.push(format!(
                "the reservation is {}, expected {wanted}",
                r.type_description()
            )),
            Some(_) => {}
        }
        Ok(Verification {
            key: self.own,
            generation: info.generation.max(keys.generation),
            registered,
            reservation: info.reservation,
            holder: info.reservation.is_some_and(|r| r.key == self.own),
            problems,
        })
    }

    /// Unregisters our key on every path (leaving the cluster cleanly). If we held a
    /// registrants-only reservation it is released with the last registration.
    pub fn leave(&self) -> Result<Vec<PathOutcome>> {
        let mut retried = 0;
        let unregister = PrOutCommand::register_and_ignore(PrKey::ZERO);
        let outcomes: Vec<PathOutcome> = self
            .paths
            .iter()
            .map(|path| PathOutcome {
                path: path.name().to_owned(),
                error: self
                    .retrying(&mut retried, || path.pr_out(&unregister))
                    .err()
                    .map(|e| e.to_string()),
            })
            .collect();
        if outcomes.iter().all(|o| o.error.is_some()) {
            return Err(FenceError::AllPathsFailed {
                op: Operation::Unfence,
                failures: outcomes
                    .into_iter()
                    .map(|o| (o.path, o.error.unwrap_or_default()))
                    .collect(),
            });
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests;
