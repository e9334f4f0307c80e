//! Lock modes, the compatibility matrix and the lock value block rules.
//!
//! The six modes and their matrix are the VMS/Linux DLM ones:
//!
//! ```text
//!        NL  CR  CW  PR  PW  EX
//!   NL   1   1   1   1   1   1
//!   CR   1   1   1   1   1   0
//!   CW   1   1   1   0   0   0
//!   PR   1   1   0   1   0   0
//!   PW   1   1   0   0   0   0
//!   EX   1   0   0   0   0   0
//! ```

use std::fmt;
use std::str::FromStr;

/// A lock mode, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Null: no access, keeps the resource (and its value block) alive.
    NL = 0,
    /// Concurrent read.
    CR = 1,
    /// Concurrent write.
    CW = 2,
    /// Protected read (shared).
    PR = 3,
    /// Protected write (update).
    PW = 4,
    /// Exclusive.
    EX = 5,
}

const COMPAT: [[bool; 6]; 6] = [
    [true, true, true, true, true, true],
    [true, true, true, true, true, false],
    [true, true, true, false, false, false],
    [true, true, false, true, false, false],
    [true, true, false, false, false, false],
    [true, false, false, false, false, false],
];

/// Conversions that QUECVT may be used with (granted row, requested column): the "up"
/// conversions, as in the Linux DLM.
const QUECVT_VALID: [[bool; 6]; 6] = [
    [false, true, true, true, true, true],
    [false, false, true, true, true, true],
    [false, false, false, true, true, true],
    [false, false, true, false, true, true],
    [false, false, false, false, false, true],
    [false, false, false, false, false, false],
];

/// What happens to the value block when a lock goes from one mode to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvbOp {
    /// The holder receives the resource's value block.
    Read,
    /// The holder's value block is written to the resource.
    Write,
    /// Nothing moves.
    None,
}

impl Mode {
    /// All modes, weakest first.
    pub const ALL: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

    fn index(self) -> usize {
        self as usize
    }

    /// The mode with this wire number.
    pub fn from_u8(value: u8) -> Option<Mode> {
        Mode::ALL.get(usize::from(value)).copied()
    }

    /// The wire number of this mode.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// True if a lock granted in `self` allows another lock in `other` at the same time.
    pub fn is_compatible(self, other: Mode) -> bool {
        COMPAT[self.index()][other.index()]
    }

    /// True if going from `self` to `to` never needs anything else released: every mode
    /// compatible with `self` is compatible with `to`. Such a conversion is always granted
    /// at once, and the caller gives up `self` when it asks for it.
    pub fn is_down_to(self, to: Mode) -> bool {
        Mode::ALL
            .iter()
            .all(|&m| !self.is_compatible(m) || to.is_compatible(m))
    }

    /// The strongest mode both `self` and `other` go down to: what a holder converting
    /// from one to the other may rely on until the conversion completes (the lock is in
    /// `self` on the master until granted, in `other` right after, and the holder learns
    /// which only from the completion). For up-conversions that is `self`, for
    /// down-conversions `other`, for CW↔PR it is CR.
    pub fn meet(self, other: Mode) -> Mode {
        Mode::ALL
            .iter()
            .rev()
            .copied()
            .find(|&m| self.is_down_to(m) && other.is_down_to(m))
            .unwrap_or(Mode::NL)
    }

    /// True if QUECVT may be used for a conversion from `self` to `to`.
    pub fn allows_quecvt_to(self, to: Mode) -> bool {
        QUECVT_VALID[self.index()][to.index()]
    }

    /// The value block movement when a lock granted in `from` (None: a new lock) is granted
    /// `to` (the Linux `dlm_lvb_operations` table).
    pub fn lvb_op(from: Option<Mode>, to: Mode) -> LvbOp {
        match from {
            None => LvbOp::Read,
            Some(Mode::EX) => LvbOp::Write,
            Some(Mode::PW) if to == Mode::EX => LvbOp::Read,
            Some(Mode::PW) => LvbOp::Write,
            Some(g) if to > g => LvbOp::Read,
            Some(_) => LvbOp::None,
        }
    }

    /// True for the modes whose holders may write the value block (PW, EX).
    pub fn writes_lvb(self) -> bool {
        self >= Mode::PW
    }

    /// Lower-case name (`nl` .. `ex`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::NL => "nl",
            Mode::CR => "cr",
            Mode::CW => "cw",
            Mode::PR => "pr",
            Mode::PW => "pw",
            Mode::EX => "ex",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is not one of nl, cr, cw, pr, pw, ex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lock mode {0:?} (expected nl, cr, cw, pr, pw or ex)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(text: &str) -> Result<Mode, UnknownMode> {
        match text.to_ascii_lowercase().as_str() {
            "nl" => Ok(Mode::NL),
            "cr" => Ok(Mode::CR),
            "cw" => Ok(Mode::CW),
            "pr" => Ok(Mode::PR),
            "pw" => Ok(Mode::PW),
            "ex" => Ok(Mode::EX),
            _ => Err(UnknownMode(text.to_owned())),
        }
    }
}

/// A set of modes (bit per mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ModeSet(u8);

impl ModeSet {
    /// The empty set.
    pub const EMPTY: ModeSet = ModeSet(0);

    /// True if `mode` is in the set.
    pub fn contains(self, mode: Mode) -> bool {
        self.0 & (1 << mode.as_u8()) != 0
    }

    /// Adds `mode`.
    pub fn insert(&mut self, mode: Mode) {
        self.0 |= 1 << mode.as_u8();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `testdata/compat.txt`: a header row of modes, then one row per granted mode.
    #[test]
    fn compatibility_matrix_matches_table() {
        let text = include_str!("../testdata/compat.txt");
        let mut rows = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let header: Vec<Mode> = rows
            .next()
            .unwrap()
            .split_whitespace()
            .map(|m| m.parse().unwrap())
            .collect();
        assert_eq!(header, Mode::ALL);
        let mut seen = 0;
        for row in rows {
            let mut cells = row.split_whitespace();
            let granted: Mode = cells.next().unwrap().parse().unwrap();
            for (requested, cell) in header.iter().zip(cells) {
                let expect = cell == "1";
                assert_eq!(
                    granted.is_compatible(*requested),
                    expect,
                    "{granted} vs {requested}"
                );
                assert_eq!(requested.is_compatible(granted), expect, "symmetry");
            }
            seen += 1;
        }
        assert_eq!(seen, 6);
    }

    #[test]
    fn down_conversions() {
        use Mode::*;
        for m in Mode::ALL {
            assert!(m.is_down_to(NL), "{m}->NL");
            assert!(m.is_down_to(m));
        }
        assert!(EX.is_down_to(PR));
        assert!(PW.is_down_to(CW));
        assert!(PW.is_down_to(PR));
        assert!(!PR.is_down_to(CW));
        assert!(!CW.is_down_to(PR));
        assert!(!PR.is_down_to(PW));
        assert!(CW.is_down_to(CR));
    }

    #[test]
    fn meet_of_modes() {
        use Mode::*;
        assert_eq!(PR.meet(EX), PR);
        assert_eq!(EX.meet(PR), PR);
        assert_eq!(CW.meet(PR), CR);
        assert_eq!(PR.meet(CW), CR);
        assert_eq!(PW.meet(CW), CW);
        assert_eq!(NL.meet(EX), NL);
        for a in Mode::ALL {
            assert_eq!(a.meet(a), a);
        }
    }

    #[test]
    fn lvb_operations_follow_linux_table() {
        use Mode::*;
        assert_eq!(Mode::lvb_op(None, NL), LvbOp::Read);
        assert_eq!(Mode::lvb_op(Some(NL), EX), LvbOp::Read);
        assert_eq!(Mode::lvb_op(Some(PR), CR), LvbOp::None);
        assert_eq!(Mode::lvb_op(Some(PW), EX), LvbOp::Read);
        assert_eq!(Mode::lvb_op(Some(PW), PW), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(PW), NL), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(EX), EX), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(EX), NL), LvbOp::Write);
        assert_eq!(Mode::lvb_op(Some(CR), CR), LvbOp::None);
    }

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>().unwrap(), m);
            assert_eq!(Mode::from_u8(m.as_u8()), Some(m));
        }
        assert!("xx".parse::<Mode>().is_err());
        assert_eq!(Mode::from_u8(6), None);
    }
}
