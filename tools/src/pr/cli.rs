//! `tandem-pr`'s command line: sg_persist's options (same spellings, short forms and hex
//! conventions) plus task-level subcommands, and their validation into a [`Request`].

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::fmt;
use tandem_fence::pr::transport_id::TransportId;
use tandem_fence::pr::{PrInAction, PrOutAction, PrOutCommand, ReservationType};
use tandem_fence::transport::Method;
use tandem_fence::{PrKey, PreemptFlavour};

/// Exit codes, shared with sg3_utils where the meaning is the same.
pub mod exit {
    pub const OK: i32 = 0;
    pub const BAD_ARGUMENTS: i32 = 1;
    pub const NOT_READY: i32 = 2;
    pub const ILLEGAL_REQUEST: i32 = 5;
    pub const UNIT_ATTENTION: i32 = 6;
    pub const NOT_SUPPORTED: i32 = 9;
    pub const DEVICE_ERROR: i32 = 15;
    pub const RESERVATION_CONFLICT: i32 = 24;
    pub const TIMEOUT: i32 = 33;
    pub const VERIFY_FAILED: i32 = 36;
    pub const FENCE_NOT_CONFIRMED: i32 = 37;
}

const AFTER_HELP: &str = "\
Without a subcommand tandem-pr behaves like sg_persist: 'tandem-pr DEVICE' reads the keys,
'--in' with -k/-r/-s/-c reads, '--out' with one service action changes reservations. Keys
are hex (with or without 0x), at most 8 bytes. DEVICE may be a SCSI disk (/dev/sdX), a SCSI
generic node (/dev/sgN), an NVMe namespace (/dev/nvmeXnY) or a multipath map (/dev/dm-N,
/dev/mapper/NAME: registrations go to every path).

Exit status:
   0  success
   1  bad arguments (unknown option, bad key or type, contradictory options)
   2  device not ready
   5  ILLEGAL REQUEST (unsupported field or service action)
   6  UNIT ATTENTION (not executed; run it again)
   9  not supported (invalid opcode; NVMe controller without reservations)
  15  device or transport error (cannot open, not a PR-capable device, I/O failure)
  24  RESERVATION CONFLICT
  33  timeout (the target did not answer; treated as stuck)
  36  verify: registration or reservation not as expected
  37  fence not confirmed, or own key missing (this node may have been fenced)

PR OUT TYPE codes: 1 write exclusive, 3 exclusive access, 5 write exclusive - registrants
only, 6 exclusive access - registrants only, 7 write exclusive - all registrants, 8 exclusive
access - all registrants (0, 2 and 4 are obsolete).";

/// Persistent reservations on SCSI and NVMe devices, sg_persist-compatible.
#[derive(Debug, Parser)]
#[command(
    name = "tandem-pr",
    version,
    about = "SCSI-3 and NVMe persistent reservations; sg_persist-compatible options plus fencing tasks",
    args_conflicts_with_subcommands = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub task: Option<Task>,

    #[command(flatten)]
    pub sg: SgOptions,

    #[command(flatten)]
    pub common: Common,
}

/// Options every command takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// How to reach the device: auto (SG_IO for SCSI, passthrough for NVMe), sg (SG_IO),
    /// ioctl (block-layer IOC_PR_* for PR OUT), nvme.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub transport: TransportArg,

    /// Timeout of each device command in milliseconds.
    #[arg(long, default_value_t = 10_000, global = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub timeout_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Auto,
    Sg,
    Ioctl,
    Nvme,
}

impl TransportArg {
    pub fn method(self) -> Method {
        match self {
            Self::Auto => Method::Auto,
            Self::Sg => Method::SgIo,
            Self::Ioctl => Method::BlockIoctl,
            Self::Nvme => Method::Nvme,
        }
    }
}

fn parse_key(text: &str) -> Result<PrKey, String> {
    text.parse::<PrKey>().map_err(|e| e.to_string())
}

/// sg_persist's `--prout-type`: a decimal 0-15.
fn parse_type(text: &str) -> Result<u8, String> {
    match text.trim().parse::<u8>() {
        Ok(t) if t <= 15 => Ok(t),
        _ => Err(format!(
            "`{text}` is not a TYPE code 0-15 (1 WE, 3 EA, 5 WERO, 6 EARO, 7 WEAR, 8 EAAR)"
        )),
    }
}

fn parse_reservation_type(text: &str) -> Result<ReservationType, String> {
    ReservationType::parse(text).ok_or_else(|| {
        format!("`{text}` is not a reservation type (1, 3, 5, 6, 7, 8 or WE, EA, WERO, EARO, WEAR, EAAR)")
    })
}

/// A hex number (sg_persist's `--relative-target-port`, `--alloc-length`).
fn parse_hex16(text: &str) -> Result<u16, String> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u16::from_str_radix(digits, 16).map_err(|_| format!("`{text}` is not a hex number 0-ffff"))
}

/// sg3_utils' `--maxlen`: decimal, or hex with 0x or a trailing h.
fn parse_maxlen(text: &str) -> Result<u16, String> {
    let t = text.trim();
    let value = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if let Some(hex) = t.strip_suffix('h').or_else(|| t.strip_suffix('H')) {
        u32::from_str_radix(hex, 16).ok()
    } else {
        t.parse::<u32>().ok()
    };
    value
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| format!("`{text}` is not a length 0-65535"))
}

/// The sg_persist options.
#[derive(Debug, Args, Clone, Default)]
pub struct SgOptions {
    /// DEVICE to send commands to.
    pub device: Option<String>,
    /// DEVICE given as an option.
    #[arg(short = 'd', long = "device", value_name = "DEVICE")]
    pub device_option: Option<String>,

    /// Request a PR IN command (the default).
    #[arg(short = 'i', long = "in")]
    pub r#in: bool,
    /// Request a PR OUT command.
    #[arg(short = 'o', long = "out")]
    pub out: bool,

    /// PR IN: Read Keys (the default).
    #[arg(short = 'k', long = "read-keys")]
    pub read_keys: bool,
    /// PR IN: Read Reservation.
    #[arg(short = 'r', long = "read-reservation")]
    pub read_reservation: bool,
    /// PR IN: Read Full Status.
    #[arg(short = 's', long = "read-full-status", visible_alias = "read-status")]
    pub read_full_status: bool,
    /// PR IN: Report Capabilities.
    #[arg(short = 'c', long = "report-capabilities")]
    pub report_capabilities: bool,

    /// PR OUT: Register.
    #[arg(short = 'G', long = "register")]
    pub register: bool,
    /// PR OUT: Register and Ignore Existing Key.
    #[arg(short = 'I', long = "register-ignore")]
    pub register_ignore: bool,
    /// PR OUT: Register and Move.
    #[arg(short = 'M', long = "register-move")]
    pub register_move: bool,
    /// PR OUT: Reserve.
    #[arg(short = 'R', long = "reserve")]
    pub reserve: bool,
    /// PR OUT: Release.
    #[arg(short = 'L', long = "release")]
    pub release: bool,
    /// PR OUT: Clear.
    #[arg(short = 'C', long = "clear")]
    pub clear: bool,
    /// PR OUT: Preempt.
    #[arg(short = 'P', long = "preempt")]
    pub preempt: bool,
    /// PR OUT: Preempt and Abort.
    #[arg(short = 'A', long = "preempt-abort")]
    pub preempt_abort: bool,
    /// PR OUT: Replace Lost Reservation.
    #[arg(short = 'z', long = "replace-lost", short_alias = 'x')]
    pub replace_lost: bool,

    /// PR OUT reservation key (hex).
    #[arg(short = 'K', long = "param-rk", value_name = "RK", value_parser = parse_key)]
    pub param_rk: Option<PrKey>,
    /// PR OUT service action reservation key (hex).
    #[arg(short = 'S', long = "param-sark", value_name = "SARK", value_parser = parse_key)]
    pub param_sark: Option<PrKey>,
    /// PR OUT TYPE field (decimal; see -hh).
    #[arg(short = 'T', long = "prout-type", value_name = "TYPE", value_parser = parse_type)]
    pub prout_type: Option<u8>,
    /// PR OUT parameter APTPL.
    #[arg(short = 'Z', long = "param-aptpl")]
    pub param_aptpl: bool,
    /// PR OUT parameter ALL_TG_PT.
    #[arg(short = 'Y', long = "param-alltgpt")]
    pub param_alltgpt: bool,
    /// PR OUT parameter SPEC_I_PT without TransportIDs (it is set automatically with
    /// --transport-id on REGISTER).
    #[arg(long = "param-spec-i-pt")]
    pub param_spec_i_pt: bool,
    /// Relative target port identifier for Register and Move (hex).
    #[arg(short = 'Q', long = "relative-target-port", value_name = "RTPI", value_parser = parse_hex16)]
    pub relative_target_port: Option<u16>,
    /// TransportID(s): sas,HEX  fcp,HEX  iqn.NAME[,i,0xISID]  hex bytes  file=NAME  - (stdin).
    #[arg(short = 'X', long = "transport-id", value_name = "TIDS")]
    pub transport_id: Vec<String>,
    /// Register and Move: unregister the sending I_T nexus afterwards.
    #[arg(short = 'U', long = "unreg")]
    pub unreg: bool,

    /// PR IN allocation length (hex).
    #[arg(short = 'l', long = "alloc-length", value_name = "LEN", value_parser = parse_hex16)]
    pub alloc_length: Option<u16>,
    /// PR IN allocation length (decimal; 0x or h suffix for hex).
    #[arg(short = 'm', long = "maxlen", value_name = "LEN", value_parser = parse_maxlen)]
    pub maxlen: Option<u16>,
    /// Print PR IN responses in hex.
    #[arg(short = 'H', long = "hex", action = ArgAction::Count)]
    pub hex: u8,
    /// Skip the INQUIRY.
    #[arg(short = 'n', long = "no-inquiry")]
    pub no_inquiry: bool,
    /// Open the device read-only.
    #[arg(short = 'y', long = "readonly")]
    pub readonly: bool,
    /// More output (CDBs, parameter lists).
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,
}

/// Node identity for task commands: a key, or what tandem derives one from.
#[derive(Debug, Args, Clone)]
pub struct KeyArgs {
    /// This node's reservation key (hex).
    #[arg(long, value_parser = parse_key, required_unless_present = "cluster_id")]
    pub key: Option<PrKey>,
    /// Derive the key from the cluster id ...
    #[arg(long, requires_all = ["node_id", "incarnation"], conflicts_with = "key")]
    pub cluster_id: Option<String>,
    /// ... the node id ...
    #[arg(long)]
    pub node_id: Option<u16>,
    /// ... and the node's membership incarnation.
    #[arg(long)]
    pub incarnation: Option<u32>,
}

impl KeyArgs {
    pub fn key(&self) -> Result<PrKey, UsageError> {
        match (self.key, &self.cluster_id, self.node_id, self.incarnation) {
            (Some(k), ..) if k.is_zero() => Err(UsageError("--key 0 is not a key".into())),
            (Some(k), ..) => Ok(k),
            (None, Some(c), Some(n), Some(i)) => Ok(PrKey::derive(c, n, i)),
            _ => Err(UsageError(
                "give --key, or --cluster-id with --node-id and --incarnation".into(),
            )),
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct PolicyArgs {
    /// Reservation type to establish (SCSI code or WE/EA/WERO/EARO/WEAR/EAAR).
    #[arg(long = "type", default_value = "5", value_parser = parse_reservation_type)]
    pub reservation_type: ReservationType,
    /// Register with APTPL (persist through power loss).
    #[arg(long)]
    pub aptpl: bool,
    /// Re-send a command this many times after UNIT ATTENTION or BUSY.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlavourArg {
    /// PREEMPT AND ABORT, falling back to PREEMPT on ILLEGAL REQUEST.
    Abort,
    /// Plain PREEMPT.
    Preempt,
}

impl FlavourArg {
    pub fn flavour(self) -> PreemptFlavour {
        match self {
            Self::Abort => PreemptFlavour::PreemptAndAbort,
            Self::Preempt => PreemptFlavour::Preempt,
        }
    }
}

/// Task-level commands.
#[derive(Debug, Subcommand)]
pub enum Task {
    /// Keys, reservation, registrations and capabilities of each device, with tandem keys
    /// decoded.
    Status {
        #[arg(required = true)]
        devices: Vec<String>,
        /// Mark keys of this cluster (decode node id and incarnation).
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Register this node's key on every path and reserve if nobody holds a reservation.
    Unfence {
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Remove VICTIM's registration (preempt) and confirm it is gone.
    Fence {
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        /// The key to remove (hex).
        #[arg(long, value_parser = parse_key)]
        victim: PrKey,
        /// abort: PREEMPT AND ABORT (PREEMPT if refused); preempt: plain PREEMPT.
        #[arg(long, value_enum, default_value = "abort")]
        flavour: FlavourArg,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Check that this node's key is registered and the reservation is as expected.
    Verify {
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Unregister this node's key on every path.
    Leave {
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Self-check: read the keys every period and report when this node's key is gone.
    Watch {
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        /// Check period in milliseconds.
        #[arg(long, default_value_t = 1000)]
        period_ms: u64,
        /// Exit (status 37) when the key is gone.
        #[arg(long)]
        exit_on_loss: bool,
        /// Stop after this many milliseconds (0: never).
        #[arg(long, default_value_t = 0)]
        duration_ms: u64,
    },
    /// Print the key tandem derives for a node.
    DeriveKey {
        #[arg(long)]
        cluster_id: String,
        #[arg(long)]
        node_id: u16,
        #[arg(long)]
        incarnation: u32,
    },
    /// Fence latency, in-process vs. fence_scsi's sg_persist subprocesses, same scenario.
    BenchFence {
        /// The fencing node's device (its own nexus).
        #[arg(long)]
        fencer: String,
        /// The victim's device (another nexus to the same LU).
        #[arg(long)]
        victim_device: String,
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        #[arg(long, value_enum, default_value = "preempt")]
        flavour: FlavourArg,
        /// sg_persist binary.
        #[arg(long, default_value = "sg_persist")]
        sg_persist: String,
    },
    /// Differential test: random PR command sequences against real nexuses and the
    /// emulator, compared step by step.
    #[command(hide = true)]
    Differential {
        /// 2 or 3 devices, one per I_T nexus to the same LU.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<String>,
        #[arg(long, default_value_t = 100)]
        sequences: u32,
        #[arg(long, default_value_t = 12)]
        steps: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Include PREEMPT AND ABORT (not on tcm_loop's queued submission).
        #[arg(long)]
        preempt_and_abort: bool,
        /// Write the JSON summary here too.
        #[arg(long)]
        summary: Option<String>,
    },
    /// Write one block with O_DIRECT and report what the device said.
    #[command(hide = true)]
    ProbeWrite {
        device: String,
        /// Byte offset (a multiple of 4096).
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
}

/// A command-line mistake (exit status 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A validated sg_persist-style request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    In {
        device: String,
        action: PrInAction,
        allocation_length: u16,
    },
    Out {
        device: String,
        command: PrOutCommand,
    },
}

impl SgOptions {
    /// Checks the options the way sg_persist does and builds the request.
    pub fn request(
        &self,
        read_stdin: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Request, UsageError> {
        let bad = |m: &str| Err(UsageError(m.to_owned()));
        let device = match (&self.device, &self.device_option) {
            (Some(_), Some(_)) => return bad("DEVICE given twice (argument and --device)"),
            (Some(d), None) | (None, Some(d)) => d.clone(),
            (None, None) => return bad("no device name given"),
        };
        let ins: Vec<PrInAction> = [
            (self.read_keys, PrInAction::ReadKeys),
            (self.read_reservation, PrInAction::ReadReservation),
            (self.read_full_status, PrInAction::ReadFullStatus),
            (self.report_capabilities, PrInAction::ReportCapabilities),
        ]
        .into_iter()
        .filter_map(|(on, a)| on.then_some(a))
        .collect();
        let outs: Vec<PrOutAction> = [
            (self.register, PrOutAction::Register),
            (
                self.register_ignore,
                PrOutAction::RegisterAndIgnoreExistingKey,
            ),
            (self.register_move, PrOutAction::RegisterAndMove),
            (self.reserve, PrOutAction::Reserve),
            (self.release, PrOutAction::Release),
            (self.clear, PrOutAction::Clear),
            (self.preempt, PrOutAction::Preempt),
            (self.preempt_abort, PrOutAction::PreemptAndAbort),
            (self.replace_lost, PrOutAction::ReplaceLostReservation),
        ]
        .into_iter()
        .filter_map(|(on, a)| on.then_some(a))
        .collect();
        if ins.len() + outs.len() > 1 {
            return bad("too many service actions given; choose one only");
        }
        if self.r#in && self.out {
            return bad("--in and --out contradict each other");
        }
        if let Some(&action) = outs.first() {
            if self.r#in {
                return bad("a PR OUT service action was given with --in");
            }
            if !self.out {
                return bad("PR OUT service actions need --out (as with sg_persist)");
            }
            let mut command = PrOutCommand::new(action);
            command.reservation_key = self.param_rk.unwrap_or(PrKey::ZERO);
            command.service_action_key = self.param_sark.unwrap_or(PrKey::ZERO);
            command.type_code = self.prout_type.unwrap_or(0);
            command.aptpl = self.param_aptpl;
            command.all_tg_pt = self.param_alltgpt;
            command.unreg = self.unreg;
            command.relative_target_port = self.relative_target_port.unwrap_or(0);
            let mut ids = Vec::new();
            for text in &self.transport_id {
                ids.extend(parse_transport_ids(text, &read_stdin)?);
            }
            if action == PrOutAction::RegisterAndMove {
                if ids.len() != 1 {
                    return bad(
                        "--register-move needs exactly one --transport-id (the destination)",
                    );
                }
                if command.type_code == 0 {
                    return bad("--register-move needs --prout-type");
                }
            } else if !ids.is_empty() {
                if !matches!(
                    action,
                    PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey
                ) {
                    return bad(
                        "--transport-id goes with --register (SPEC_I_PT) or --register-move",
                    );
                }
                command.spec_i_pt = true;
            }
            if self.param_spec_i_pt {
                command.spec_i_pt = true;
            }
            command.transport_ids = ids;
            if self.unreg && action != PrOutAction::RegisterAndMove {
                return bad("--unreg goes with --register-move only");
            }
            if action.uses_type() && self.prout_type.is_none() {
                return bad(&format!("{} needs --prout-type", action.name()));
            }
            return Ok(Request::Out { device, command });
        }
        if self.out {
            return bad("--out given without a PR OUT service action");
        }
        let length = match (self.alloc_length, self.maxlen) {
            (Some(_), Some(_)) => return bad("give --alloc-length or --maxlen, not both"),
            (Some(l), None) | (None, Some(l)) => l,
            (None, None) => 8192,
        };
        Ok(Request::In {
            device,
            action: ins.first().copied().unwrap_or(PrInAction::ReadKeys),
            allocation_length: length,
        })
    }
}

/// Expands one `--transport-id` argument: a TransportID, `file=NAME`, or `-` (stdin), the
/// latter two holding one TransportID per line (`#` comments allowed).
fn parse_transport_ids(
    text: &str,
    read: &impl Fn(&str) -> Result<String, String>,
) -> Result<Vec<TransportId>, UsageError> {
    let source = if text == "-" {
        Some("-")
    } else {
        text.strip_prefix("file=")
    };
    let one =
        |t: &str| TransportId::parse(t).map_err(|e| UsageError(format!("--transport-id: {e}")));
    match source {
        None => Ok(vec![one(text)?]),
        Some(name) => {
            let content =
                read(name).map_err(|e| UsageError(format!("--transport-id {text}: {e}")))?;
            content
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(one)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tandem-pr").chain(args.iter().copied()))
    }

    fn no_stdin(_: &str) -> Result<String, String> {
        Err("no input".into())
    }

    fn request(args: &[&str]) -> Result<Request, UsageError> {
        parse(args).unwrap().sg.request(no_stdin)
    }

    #[test]
    fn sg_persist_spellings() {
        assert_eq!(
            request(&["/dev/sdb"]).unwrap(),
            Request::In {
                device: "/dev/sdb".into(),
                action: PrInAction::ReadKeys,
                allocation_length: 8192
            }
        );
        let Request::Out { command, .. } =
            request(&["--out", "--register", "--param-sark=0xa1", "/dev/sdb"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            command,
            PrOutCommand::register(PrKey::ZERO, PrKey::new(0xa1))
        );
        let Request::Out { command, .. } = request(&[
            "-o", "-A", "-K", "b2", "-S", "a1", "-T", "5", "-d", "/dev/sdb",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(command.action, PrOutAction::PreemptAndAbort);
        assert_eq!(
            (
                command.reservation_key,
                command.service_action_key,
                command.type_code
            ),
            (PrKey::new(0xb2), PrKey::new(0xa1), 5)
        );
        assert!(matches!(
            request(&["--in", "--read-status", "/dev/sdb"]).unwrap(),
            Request::In {
                action: PrInAction::ReadFullStatus,
                ..
            }
        ));
        let Request::Out { command, .. } = request(&[
            "-o",
            "-G",
            "-S",
            "a1",
            "-X",
            "sas,5001405aabbccdd0",
            "-X",
            "iqn.2026.t:x",
            "/dev/sdb",
        ])
        .unwrap() else {
            panic!()
        };
        assert!(command.spec_i_pt);
        assert_eq!(command.transport_ids.len(), 2);
        assert!(matches!(
            request(&["-m", "0x40", "/dev/sdb"]).unwrap(),
            Request::In {
                allocation_length: 64,
                ..
            }
        ));
        assert!(matches!(
            request(&["-l", "40", "/dev/sdb"]).unwrap(),
            Request::In {
                allocation_length: 64,
                ..
            }
        ));
    }

    #[test]
    fn bad_arguments_are_refused_clearly() {
        let e = parse(&[
            "--out",
            "--register",
            "--param-sark=0x12345678901234567",
            "/dev/sdb",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("longer than 8 bytes"), "{e}");
        assert!(parse(&["-o", "-R", "-K", "zz", "/dev/sdb"]).is_err());
        assert!(parse(&["-o", "-R", "-K", "1", "-T", "16", "/dev/sdb"]).is_err());
        let e = request(&["-k", "-r", "/dev/sdb"]).unwrap_err();
        assert!(e.0.contains("too many service actions"), "{e}");
        assert!(
            request(&["--register", "-S", "1", "/dev/sdb"])
                .unwrap_err()
                .0
                .contains("--out")
        );
        assert!(request(&["--out", "/dev/sdb"]).is_err());
        assert!(
            request(&["-o", "-R", "-K", "1", "/dev/sdb"])
                .unwrap_err()
                .0
                .contains("--prout-type")
        );
        assert!(request(&[]).unwrap_err().0.contains("no device"));
        assert!(request(&["-o", "-M", "-K", "1", "-S", "2", "-T", "5", "/dev/sdb"]).is_err());
        assert!(request(&["-o", "-G", "-S", "1", "-X", "bogus tid", "/dev/sdb"]).is_err());
    }

    #[test]
    fn task_commands_parse() {
        let cli = parse(&[
            "fence",
            "/dev/sdb",
            "--key",
            "b2",
            "--victim",
            "a1",
            "--flavour",
            "preempt",
        ])
        .unwrap();
        let Some(Task::Fence {
            victim,
            flavour,
            key,
            ..
        }) = cli.task
        else {
            panic!()
        };
        assert_eq!((victim, flavour), (PrKey::new(0xa1), FlavourArg::Preempt));
        assert_eq!(key.key().unwrap(), PrKey::new(0xb2));
        let cli = parse(&[
            "unfence",
            "/dev/sdb",
            "--cluster-id",
            "c",
            "--node-id",
            "2",
            "--incarnation",
            "7",
        ])
        .unwrap();
        let Some(Task::Unfence { key, .. }) = cli.task else {
            panic!()
        };
        assert_eq!(key.key().unwrap(), PrKey::derive("c", 2, 7));
        assert!(
            parse(&["fence", "/dev/sdb", "--key", "b2"]).is_err(),
            "--victim required"
        );
        assert!(
            parse(&["unfence", "/dev/sdb"]).is_err(),
            "a key is required"
        );
    }
}
