//! Service actions and reservation types, with their SCSI, NVMe and `linux/pr.h` numbers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The only scope SPC-4 still defines: the whole logical unit.
pub const SCOPE_LU: u8 = 0;

/// PERSISTENT RESERVE IN service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrInAction {
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
    ReadFullStatus,
}

impl PrInAction {
    /// All four, in service-action order.
    pub const ALL: [Self; 4] = [
        Self::ReadKeys,
        Self::ReadReservation,
        Self::ReportCapabilities,
        Self::ReadFullStatus,
    ];

    /// SPC-4 service action code.
    pub const fn code(self) -> u8 {
        match self {
            Self::ReadKeys => 0,
            Self::ReadReservation => 1,
            Self::ReportCapabilities => 2,
            Self::ReadFullStatus => 3,
        }
    }

    /// The action with this code, if SPC-4 defines one.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::ReadKeys),
            1 => Some(Self::ReadReservation),
            2 => Some(Self::ReportCapabilities),
            3 => Some(Self::ReadFullStatus),
            _ => None,
        }
    }

    /// The SPC-4 name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ReadKeys => "READ KEYS",
            Self::ReadReservation => "READ RESERVATION",
            Self::ReportCapabilities => "REPORT CAPABILITIES",
            Self::ReadFullStatus => "READ FULL STATUS",
        }
    }
}

impl fmt::Display for PrInAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PR IN {}", self.name())
    }
}

/// PERSISTENT RESERVE OUT service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrOutAction {
    Register,
    Reserve,
    Release,
    Clear,
    Preempt,
    PreemptAndAbort,
    RegisterAndIgnoreExistingKey,
    RegisterAndMove,
    ReplaceLostReservation,
}

impl PrOutAction {
    /// Every action, in service-action order.
    pub const ALL: [Self; 9] = [
        Self::Register,
        Self::Reserve,
        Self::Release,
        Self::Clear,
        Self::Preempt,
        Self::PreemptAndAbort,
        Self::RegisterAndIgnoreExistingKey,
        Self::RegisterAndMove,
        Self::ReplaceLostReservation,
    ];

    /// SPC-4/SPC-5 service action code.
    pub const fn code(self) -> u8 {
        match self {
            Self::Register => 0,
            Self::Reserve => 1,
            Self::Release => 2,
            Self::Clear => 3,
            Self::Preempt => 4,
            Self::PreemptAndAbort => 5,
            Self::RegisterAndIgnoreExistingKey => 6,
            Self::RegisterAndMove => 7,
            Self::ReplaceLostReservation => 8,
        }
    }

    /// The action with this code, if SPC defines one.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Register),
            1 => Some(Self::Reserve),
            2 => Some(Self::Release),
            3 => Some(Self::Clear),
            4 => Some(Self::Preempt),
            5 => Some(Self::PreemptAndAbort),
            6 => Some(Self::RegisterAndIgnoreExistingKey),
            7 => Some(Self::RegisterAndMove),
            8 => Some(Self::ReplaceLostReservation),
            _ => None,
        }
    }

    /// The SPC-4 name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Register => "REGISTER",
            Self::Reserve => "RESERVE",
            Self::Release => "RELEASE",
            Self::Clear => "CLEAR",
            Self::Preempt => "PREEMPT",
            Self::PreemptAndAbort => "PREEMPT AND ABORT",
            Self::RegisterAndIgnoreExistingKey => "REGISTER AND IGNORE EXISTING KEY",
            Self::RegisterAndMove => "REGISTER AND MOVE",
            Self::ReplaceLostReservation => "REPLACE LOST RESERVATION",
        }
    }

    /// Whether the TYPE field of the CDB means something for this action.
    pub const fn uses_type(self) -> bool {
        matches!(
            self,
            Self::Reserve
                | Self::Release
                | Self::Preempt
                | Self::PreemptAndAbort
                | Self::ReplaceLostReservation
        )
    }
}

impl fmt::Display for PrOutAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PR OUT {}", self.name())
    }
}

/// The six persistent reservation types. The discriminants are the SCSI TYPE codes; NVMe and
/// the kernel's `linux/pr.h` number them differently (see [`Self::nvme_code`] and
/// [`Self::linux_pr_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReservationType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl ReservationType {
    /// All six, in SCSI code order.
    pub const ALL: [Self; 6] = [
        Self::WriteExclusive,
        Self::ExclusiveAccess,
        Self::WriteExclusiveRegistrantsOnly,
        Self::ExclusiveAccessRegistrantsOnly,
        Self::WriteExclusiveAllRegistrants,
        Self::ExclusiveAccessAllRegistrants,
    ];

    /// SCSI TYPE code (SPC-4 table "Persistent reservation type codes").
    pub const fn scsi_code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 3,
            Self::WriteExclusiveRegistrantsOnly => 5,
            Self::ExclusiveAccessRegistrantsOnly => 6,
            Self::WriteExclusiveAllRegistrants => 7,
            Self::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// The type with this SCSI code (0, 2 and 4 are obsolete, the rest reserved).
    pub const fn from_scsi(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::WriteExclusive),
            3 => Some(Self::ExclusiveAccess),
            5 => Some(Self::WriteExclusiveRegistrantsOnly),
            6 => Some(Self::ExclusiveAccessRegistrantsOnly),
            7 => Some(Self::WriteExclusiveAllRegistrants),
            8 => Some(Self::ExclusiveAccessAllRegistrants),
            _ => None,
        }
    }

    /// NVMe Reservation Type (RTYPE): 1..=6 in the order of [`Self::ALL`].
    pub const fn nvme_code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 2,
            Self::WriteExclusiveRegistrantsOnly => 3,
            Self::ExclusiveAccessRegistrantsOnly => 4,
            Self::WriteExclusiveAllRegistrants => 5,
            Self::ExclusiveAccessAllRegistrants => 6,
        }
    }

    /// The type with this NVMe RTYPE (0 means "no reservation" in a report).
    pub const fn from_nvme(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::WriteExclusive),
            2 => Some(Self::ExclusiveAccess),
            3 => Some(Self::WriteExclusiveRegistrantsOnly),
            4 => Some(Self::ExclusiveAccessRegistrantsOnly),
            5 => Some(Self::WriteExclusiveAllRegistrants),
            6 => Some(Self::ExclusiveAccessAllRegistrants),
            _ => None,
        }
    }

    /// `enum pr_type` of `linux/pr.h` (PR_WRITE_EXCLUSIVE = 1 ... PR_EXCLUSIVE_ACCESS_ALL_REGS
    /// = 6): the same numbering as NVMe, *not* the SCSI codes.
    pub const fn linux_pr_code(self) -> u32 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 2,
            Self::WriteExclusiveRegistrantsOnly => 3,
            Self::ExclusiveAccessRegistrantsOnly => 4,
            Self::WriteExclusiveAllRegistrants => 5,
            Self::ExclusiveAccessAllRegistrants => 6,
        }
    }

    /// Whether every registrant is a reservation holder (types 7 and 8).
    pub const fn is_all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether registered I_T nexuses may access the medium (types 5-8).
    pub const fn admits_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveRegistrantsOnly
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::WriteExclusiveAllRegistrants
                | Self::ExclusiveAccessAllRegistrants
        )
    }

    /// Whether non-holders may still read (the Write Exclusive family).
    pub const fn is_write_exclusive(self) -> bool {
        matches!(
            self,
            Self::WriteExclusive
                | Self::WriteExclusiveRegistrantsOnly
                | Self::WriteExclusiveAllRegistrants
        )
    }

    /// sg_persist's wording, so human output reads the same.
    pub const fn description(self) -> &'static str {
        match self {
            Self::WriteExclusive => "Write Exclusive",
            Self::ExclusiveAccess => "Exclusive Access",
            Self::WriteExclusiveRegistrantsOnly => "Write Exclusive, registrants only",
            Self::ExclusiveAccessRegistrantsOnly => "Exclusive Access, registrants only",
            Self::WriteExclusiveAllRegistrants => "Write Exclusive, all registrants",
            Self::ExclusiveAccessAllRegistrants => "Exclusive Access, all registrants",
        }
    }

    /// Short name for tables and logs: WE, EA, WERO, EARO, WEAR, EAAR.
    pub const fn short_name(self) -> &'static str {
        match self {
            Self::WriteExclusive => "WE",
            Self::ExclusiveAccess => "EA",
            Self::WriteExclusiveRegistrantsOnly => "WERO",
            Self::ExclusiveAccessRegistrantsOnly => "EARO",
            Self::WriteExclusiveAllRegistrants => "WEAR",
            Self::ExclusiveAccessAllRegistrants => "EAAR",
        }
    }

    /// Parses a short name (case-insensitive) or a SCSI code.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        if let Ok(code) = t.parse::<u8>() {
            return Self::from_scsi(code);
        }
        Self::ALL
            .into_iter()
            .find(|ty| ty.short_name().eq_ignore_ascii_case(t))
    }
}

impl fmt::Display for ReservationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// sg_persist's wording for any 4-bit TYPE code, including obsolete and reserved ones.
pub fn type_code_description(code: u8) -> String {
    match ReservationType::from_scsi(code) {
        Some(ty) => ty.description().to_owned(),
        None => match code {
            0 => "obsolete [0]".to_owned(),
            2 => "obsolete [2]".to_owned(),
            4 => "obsolete [4]".to_owned(),
            other => format!("reserved [0x{other:x}]"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_in_every_numbering() {
        for ty in ReservationType::ALL {
            assert_eq!(ReservationType::from_scsi(ty.scsi_code()), Some(ty));
            assert_eq!(ReservationType::from_nvme(ty.nvme_code()), Some(ty));
            assert_eq!(u32::from(ty.nvme_code()), ty.linux_pr_code());
            assert_eq!(ReservationType::parse(ty.short_name()), Some(ty));
        }
        for code in [0u8, 2, 4, 9, 15] {
            assert_eq!(ReservationType::from_scsi(code), None);
        }
        for action in PrOutAction::ALL {
            assert_eq!(PrOutAction::from_code(action.code()), Some(action));
        }
        for action in PrInAction::ALL {
            assert_eq!(PrInAction::from_code(action.code()), Some(action));
        }
    }

    #[test]
    fn the_fencing_type_differs_between_scsi_and_linux_pr_h() {
        let wero = ReservationType::WriteExclusiveRegistrantsOnly;
        assert_eq!(wero.scsi_code(), 5);
        assert_eq!(wero.nvme_code(), 3);
        assert_eq!(wero.linux_pr_code(), 3);
    }
}
