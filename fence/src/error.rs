//! `FenceError`, the crate's one error type, and the operations it names.

use crate::key::PrKey;
use crate::pr::DecodeError;
use crate::pr::nvme::NvmeStatus;
use crate::pr::sense::{ScsiStatus, Sense, SenseKey};
use crate::pr::{PrInAction, PrOutAction};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What was being done when something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    PrIn(PrInAction),
    PrOut(PrOutAction),
    Inquiry,
    NvmeIdentify,
    Fence,
    Unfence,
    Verify,
    SelfCheck,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PrIn(a) => a.fmt(f),
            Self::PrOut(a) => a.fmt(f),
            Self::Inquiry => f.write_str("INQUIRY"),
            Self::NvmeIdentify => f.write_str("NVMe Identify"),
            Self::Fence => f.write_str("fence"),
            Self::Unfence => f.write_str("unfence"),
            Self::Verify => f.write_str("verify"),
            Self::SelfCheck => f.write_str("self-check"),
        }
    }
}

/// Coarse classes of [`FenceError`], e.g. for exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    ReservationConflict,
    UnitAttention,
    NotReady,
    IllegalRequest,
    NotSupported,
    Timeout,
    /// Opening the device, the ioctl, the transport or a garbled answer.
    Device,
    BadArgument,
    /// A fence could not be confirmed, or our own registration is missing.
    Verification,
}

/// Everything that can go wrong in `tandem-fence`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    #[error("opening {device}")]
    Open {
        device: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{device}: {detail}")]
    WrongDeviceType { device: String, detail: String },

    /// The device answered RESERVATION CONFLICT (SCSI status 18h or NVMe 83h). For a node's
    /// own I/O this means it has been fenced.
    #[error("{op} on {device}: RESERVATION CONFLICT")]
    ReservationConflict { op: Operation, device: String },

    #[error("{op} on {device}: CHECK CONDITION, {sense}")]
    CheckCondition {
        op: Operation,
        device: String,
        sense: Sense,
    },

    #[error("{op} on {device}: SCSI status {status}")]
    Status {
        op: Operation,
        device: String,
        status: ScsiStatus,
    },

    #[error("{op} on {device}: NVMe status {status}")]
    Nvme {
        op: Operation,
        device: String,
        status: NvmeStatus,
    },

    #[error("{op} on {device}: not supported: {reason}")]
    NotSupported {
        op: Operation,
        device: String,
        reason: String,
    },

    /// The command did not complete in time; the target is treated as stuck.
    #[error("{op} on {device}: no answer within {timeout_ms} ms; the target looks stuck")]
    Timeout {
        op: Operation,
        device: String,
        timeout_ms: u64,
    },

    #[error("{op} on {device}: transport failure: {detail}")]
    Transport {
        op: Operation,
        device: String,
        detail: String,
    },

    #[error("{op} on {device}: ioctl failed")]
    Ioctl {
        op: Operation,
        device: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{op} on {device}: bad answer")]
    Decode {
        op: Operation,
        device: String,
        #[source]
        source: DecodeError,
    },

    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },

    /// After the preempt, the victim's key was still registered.
    #[error("fencing {victim} through {device}: the key is still registered after {method}")]
    FenceNotConfirmed {
        victim: PrKey,
        device: String,
        method: String,
    },

    /// Our own key is not registered, so we may not act (we may have been fenced).
    #[error("{op}: own key {key} is not registered on {device}; this node may have been fenced")]
    NotRegistered {
        op: Operation,
        key: PrKey,
        device: String,
    },

    #[error("{op}: every path failed: {}", join_failures(.failures))]
    AllPathsFailed {
        op: Operation,
        /// (path, error) per path.
        failures: Vec<(String, String)>,
    },

    #[error("{op}: no paths to operate on")]
    NoPaths { op: Operation },
}

fn join_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(path, e)| format!("{path}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl FenceError {
    /// RESERVATION CONFLICT: triggers self-fencing when it answers our own I/O.
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, Self::ReservationConflict { .. })
    }

    /// The sense data, for CHECK CONDITION.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            Self::CheckCondition { sense, .. } => Some(sense),
            _ => None,
        }
    }

    /// UNIT ATTENTION: the command was not executed; send it again.
    pub fn is_unit_attention(&self) -> bool {
        self.sense()
            .is_some_and(|s| s.key == SenseKey::UnitAttention)
    }

    /// ILLEGAL REQUEST (e.g. tgtd's answer to PREEMPT AND ABORT).
    pub fn is_illegal_request(&self) -> bool {
        self.sense().is_some_and(Sense::is_illegal_request)
    }

    /// The device does not implement the command at all.
    pub fn is_not_supported(&self) -> bool {
        match self {
            Self::NotSupported { .. } => true,
            Self::Nvme { status, .. } => status.is_invalid_opcode(),
            _ => self.sense().is_some_and(Sense::is_invalid_opcode),
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// Whether sending the same command again may succeed: UNIT ATTENTION, BUSY, TASK SET
    /// FULL, a unit becoming ready. A timeout is not retryable: a stuck target is a failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::CheckCondition { sense, .. } => {
                sense.key == SenseKey::UnitAttention
                    || (sense.key == SenseKey::NotReady && sense.asc == 0x04 && sense.ascq == 0x01)
            }
            Self::Status { status, .. } => {
                *status == ScsiStatus::BUSY || *status == ScsiStatus::TASK_SET_FULL
            }
            _ => false,
        }
    }

    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::ReservationConflict { .. } => ErrorKind::ReservationConflict,
            Self::CheckCondition { sense, .. } => match sense.key {
                SenseKey::UnitAttention => ErrorKind::UnitAttention,
                SenseKey::NotReady => ErrorKind::NotReady,
                SenseKey::IllegalRequest if sense.is_invalid_opcode() => ErrorKind::NotSupported,
                SenseKey::IllegalRequest => ErrorKind::IllegalRequest,
                _ => ErrorKind::Device,
            },
            Self::Nvme { status, .. } if status.is_invalid_opcode() => ErrorKind::NotSupported,
            Self::Nvme { status, .. } if status.is_invalid_field() => ErrorKind::IllegalRequest,
            Self::NotSupported { .. } => ErrorKind::NotSupported,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::InvalidArgument { .. } => ErrorKind::BadArgument,
            Self::FenceNotConfirmed { .. } | Self::NotRegistered { .. } => ErrorKind::Verification,
            Self::AllPathsFailed { .. } => ErrorKind::Device,
            _ => ErrorKind::Device,
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = FenceError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let ua = FenceError::CheckCondition {
            op: Operation::PrIn(PrInAction::ReadKeys),
            device: "/dev/sdb".into(),
            sense: Sense::new(SenseKey::UnitAttention, 0x2a, 0x05),
        };
        assert!(ua.is_unit_attention() && ua.is_retryable());
        assert_eq!(ua.kind(), ErrorKind::UnitAttention);
        assert!(ua.to_string().contains("Registrations preempted"), "{ua}");

        let conflict = FenceError::ReservationConflict {
            op: Operation::PrOut(PrOutAction::Reserve),
            device: "/dev/sdb".into(),
        };
        assert!(conflict.is_reservation_conflict() && !conflict.is_retryable());

        let pa_rejected = FenceError::CheckCondition {
            op: Operation::PrOut(PrOutAction::PreemptAndAbort),
            device: "/dev/sdc".into(),
            sense: Sense::new(SenseKey::IllegalRequest, 0x24, 0),
        };
        assert!(pa_rejected.is_illegal_request() && !pa_rejected.is_not_supported());

        let stuck = FenceError::Timeout {
            op: Operation::PrOut(PrOutAction::PreemptAndAbort),
            device: "/dev/sdb".into(),
            timeout_ms: 5000,
        };
        assert!(stuck.is_timeout() && !stuck.is_retryable());
        assert!(stuck.to_string().contains("stuck"));

        let nvme = FenceError::Nvme {
            op: Operation::PrIn(PrInAction::ReadKeys),
            device: "/dev/nvme0n1".into(),
            status: NvmeStatus::INVALID_OPCODE,
        };
        assert!(nvme.is_not_supported());
        assert_eq!(nvme.kind(), ErrorKind::NotSupported);
    }
}
