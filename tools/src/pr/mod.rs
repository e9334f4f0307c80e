//! `tandem-pr`: persistent reservations from the command line.
//!
//! Scripts that call sg_persist can call tandem-pr with the same options and get the same
//! human output (plus `--json`, NVMe devices and multipath maps); the task subcommands
//! (`status`, `unfence`, `fence`, `verify`, `leave`, `watch`) run tandem's fencing policy;
//! `bench-fence` compares fence latency in-process and the fence_scsi way.
//!
//! Besides device paths, every command accepts `emulator:FILE@N`: nexus N of an emulated LU
//! whose state lives in FILE (created with three nexuses when missing), for trying things
//! without a SAN.

mod bench;
pub mod cli;
mod differential;
pub mod output;
mod probe;
mod tasks;

use clap::Parser;
use clap::error::ErrorKind;
use cli::{Cli, Request, UsageError, exit};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tandem_fence::emulator::{Emulator, NexusId, NexusInfo};
use tandem_fence::pr::{PrInAction, PrOutAction, PrOutCommand};
use tandem_fence::transport::{EmulatedPath, OpenOptions, PrTransport, open, open_paths};
use tandem_fence::{ErrorKind as FenceKind, FenceError};

/// Runs tandem-pr with the process arguments; returns the exit status.
pub fn main() -> i32 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    run(std::env::args_os(), &mut out, &mut err)
}

/// Runs tandem-pr with `args` (program name first), writing to `out` and `err`.
pub fn run(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let cli = match Cli::try_parse_from(subcommand_first(args.into_iter().collect())) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = write!(out, "{e}");
            return exit::OK;
        }
        Err(e) => {
            let _ = write!(err, "{e}");
            return exit::BAD_ARGUMENTS;
        }
    };
    let result = match &cli.task {
        Some(task) => tasks::run(task, &cli.common, out, err),
        None => run_sg(&cli, out, err),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            let _ = writeln!(
                err,
                "tandem-pr: {e}\nRun 'tandem-pr --help' for the options."
            );
            exit::BAD_ARGUMENTS
        }
        Err(Failure::Fence(e)) => {
            let code = exit_code(&e);
            if cli.common.json {
                let _ = writeln!(
                    out,
                    "{}",
                    json!({ "error": e.to_string(), "kind": e.kind(), "exit_status": code })
                );
            }
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            let _ = writeln!(err, "tandem-pr: {text}");
            if let Some(hint) = hint(&e) {
                let _ = writeln!(err, "tandem-pr: {hint}");
            }
            code
        }
        Err(Failure::Other(e)) => {
            let _ = writeln!(err, "tandem-pr: {e:#}");
            exit::DEVICE_ERROR
        }
    }
}

/// Moves a subcommand named after global options (`tandem-pr --json status DEV`) to the
/// front, where clap expects it; the options still apply, being global.
fn subcommand_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let position = args
        .iter()
        .skip(1)
        .position(|a| a.to_str().is_some_and(|a| names.iter().any(|n| n == a)));
    if let Some(p) = position {
        let at = p + 1;
        let before_are_options = args[1..at].iter().enumerate().all(|(i, a)| {
            let a = a.to_string_lossy();
            a.starts_with('-')
                || (i > 0
                    && matches!(
                        args[i].to_string_lossy().as_ref(),
                        "--transport" | "--timeout-ms"
                    ))
        });
        if at > 1 && before_are_options {
            let sub = args.remove(at);
            args.insert(1, sub);
        }
    }
    args
}

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    Usage(UsageError),
    Fence(FenceError),
    Other(anyhow::Error),
}

impl From<FenceError> for Failure {
    fn from(e: FenceError) -> Self {
        Self::Fence(e)
    }
}

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Self {
        Self::Usage(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::Other(e.into())
    }
}

/// The exit status for an error (see `--help`).
pub fn exit_code(e: &FenceError) -> i32 {
    match e.kind() {
        FenceKind::ReservationConflict => exit::RESERVATION_CONFLICT,
        FenceKind::UnitAttention => exit::UNIT_ATTENTION,
        FenceKind::NotReady => exit::NOT_READY,
        FenceKind::IllegalRequest => exit::ILLEGAL_REQUEST,
        FenceKind::NotSupported => exit::NOT_SUPPORTED,
        FenceKind::Timeout => exit::TIMEOUT,
        FenceKind::BadArgument => exit::BAD_ARGUMENTS,
        FenceKind::Verification => exit::FENCE_NOT_CONFIRMED,
        _ => exit::DEVICE_ERROR,
    }
}

fn hint(e: &FenceError) -> Option<&'static str> {
    Some(match e.kind() {
        FenceKind::UnitAttention => "the command was not executed; run it again",
        FenceKind::ReservationConflict => {
            "the key, type or registration does not allow this (or another node holds the reservation)"
        }
        FenceKind::NotReady => "LIO answers NOT READY to an unregistered I_T nexus; register first",
        FenceKind::Timeout => "the target did not answer in time; it is treated as stuck",
        _ => return None,
    })
}

/// Nexus N of an LU emulated in a state file (created with three SAS nexuses when
/// missing). Every command takes an exclusive lock on `FILE.lock`, loads the state, runs,
/// and saves it, so several tandem-pr processes can share one emulated LU.
#[derive(Debug)]
pub(crate) struct FileEmulatorPath {
    name: String,
    file: PathBuf,
    nexus: u16,
}

impl FileEmulatorPath {
    fn open(name: &str, file: &str, nexus: u16) -> Result<Self, Failure> {
        let path = Self {
            name: name.to_owned(),
            file: file.into(),
            nexus,
        };
        let count =
            path.with_lu(|lu| Ok(lu.lock().unwrap_or_else(|e| e.into_inner()).nexus_count()))?;
        if usize::from(nexus) >= count {
            return Err(UsageError(format!(
                "{name}: the emulated LU has {count} nexuses (0-{})",
                count.saturating_sub(1)
            ))
            .into());
        }
        Ok(path)
    }

    fn lock_error(&self, what: &str, e: impl std::fmt::Display) -> FenceError {
        FenceError::Open {
            device: self.name.clone(),
            source: std::io::Error::other(format!("{what} {}: {e}", self.file.display())),
        }
    }

    /// Runs `f` on the LU under the lock and saves the state afterwards.
    fn with_lu<T>(
        &self,
        f: impl FnOnce(&Arc<Mutex<Emulator>>) -> tandem_fence::Result<T>,
    ) -> tandem_fence::Result<T> {
        let lock_path = self.file.with_extension("lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.lock_error("opening the lock of", e))?;
        let _guard = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| self.lock_error("locking", e))?;
        let lu = match std::fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice::<Emulator>(&bytes)
                .map_err(|e| self.lock_error("reading the emulator state", e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut lu = Emulator::new();
                for i in 0..3u16 {
                    lu.add_nexus(NexusInfo::sas(0x5001_4050_0000_0000 + u64::from(i), i + 1));
                }
                lu
            }
            Err(e) => return Err(self.lock_error("reading", e)),
        };
        let lu = Arc::new(Mutex::new(lu));
        // Failed commands change state too (a reported UNIT ATTENTION is gone): save always.
        let result = f(&lu);
        let state = serde_json::to_vec_pretty(&*lu.lock().unwrap_or_else(|e| e.into_inner()))
            .map_err(|e| self.lock_error("encoding", e))?;
        std::fs::write(&self.file, state).map_err(|e| self.lock_error("writing", e))?;
        result
    }

    fn path(&self, lu: &Arc<Mutex<Emulator>>) -> EmulatedPath {
        EmulatedPath::connect(lu, NexusId(self.nexus), &self.name)
    }
}

impl PrTransport for FileEmulatorPath {
    fn name(&self) -> &str {
        &self.name
    }

    fn pr_in(&self, action: PrInAction) -> tandem_fence::Result<tandem_fence::pr::data::PrInData> {
        self.with_lu(|lu| self.path(lu).pr_in(action))
    }

    fn pr_out(&self, command: &PrOutCommand) -> tandem_fence::Result<()> {
        self.with_lu(|lu| self.path(lu).pr_out(command))
    }

    fn pr_in_raw(
        &self,
        action: PrInAction,
        allocation_length: u16,
    ) -> tandem_fence::Result<(tandem_fence::pr::data::PrInData, Vec<u8>)> {
        self.with_lu(|lu| self.path(lu).pr_in_raw(action, allocation_length))
    }

    fn inquiry(&self) -> tandem_fence::Result<Option<tandem_fence::pr::inquiry::InquiryData>> {
        self.with_lu(|lu| self.path(lu).inquiry())
    }
}

/// Opens devices for one command.
#[derive(Debug, Default)]
pub(crate) struct Opened;

impl Opened {
    /// Opens one device (an emulated nexus, or a path through `open`).
    pub(crate) fn open(
        &mut self,
        device: &str,
        options: &OpenOptions,
    ) -> Result<Box<dyn PrTransport>, Failure> {
        if let Some((file, nexus)) = parse_emulator(device)? {
            return Ok(Box::new(FileEmulatorPath::open(device, &file, nexus)?));
        }
        Ok(open(device, options)?)
    }

    /// Opens every path of a device (multipath members separately).
    pub(crate) fn open_paths(
        &mut self,
        device: &str,
        options: &OpenOptions,
    ) -> Result<Vec<Box<dyn PrTransport>>, Failure> {
        if parse_emulator(device)?.is_some() {
            return Ok(vec![self.open(device, options)?]);
        }
        Ok(open_paths(device, options)?)
    }
}

/// `emulator:FILE@N` → (FILE, N).
fn parse_emulator(device: &str) -> Result<Option<(String, u16)>, Failure> {
    let Some(rest) = device.strip_prefix("emulator:") else {
        return Ok(None);
    };
    let (file, nexus) = rest
        .rsplit_once('@')
        .ok_or_else(|| UsageError(format!("{device}: expected emulator:FILE@NEXUS")))?;
    let nexus = nexus
        .parse::<u16>()
        .map_err(|_| UsageError(format!("{device}: nexus `{nexus}` is not a number")))?;
    Ok(Some((file.to_owned(), nexus)))
}

pub(crate) fn open_options(common: &cli::Common, read_only: bool) -> OpenOptions {
    OpenOptions {
        method: common.transport.method(),
        timeout_ms: common.timeout_ms,
        read_only,
    }
}

fn bytes_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// sg_persist's words for service actions in its messages.
fn action_words(action: PrOutAction) -> &'static str {
    match action {
        PrOutAction::Register => "Register",
        PrOutAction::Reserve => "Reserve",
        PrOutAction::Release => "Release",
        PrOutAction::Clear => "Clear",
        PrOutAction::Preempt => "Preempt",
        PrOutAction::PreemptAndAbort => "Preempt and abort",
        PrOutAction::RegisterAndIgnoreExistingKey => "Register and ignore existing key",
        PrOutAction::RegisterAndMove => "register and move",
        PrOutAction::ReplaceLostReservation => "Replace lost reservation",
    }
}

fn in_words(action: PrInAction) -> &'static str {
    match action {
        PrInAction::ReadKeys => "Read keys",
        PrInAction::ReadReservation => "Read reservation",
        PrInAction::ReportCapabilities => "Report capabilities",
        PrInAction::ReadFullStatus => "Read full status",
    }
}

/// The sg_persist-compatible path: one PR IN or PR OUT command.
fn run_sg(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, Failure> {
    let sg = &cli.sg;
    let request = sg.request(|name| {
        if name == "-" {
            std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())
        } else {
            std::fs::read_to_string(name).map_err(|e| e.to_string())
        }
    })?;
    let read_only = sg.readonly && matches!(request, Request::In { .. });
    let options = open_options(&cli.common, read_only);
    let device = match &request {
        Request::In { device, .. } | Request::Out { device, .. } => device.clone(),
    };
    let mut opened = Opened;
    let transport = opened.open(&device, &options)?;
    let json = cli.common.json;
    if !sg.no_inquiry && !json {
        if sg.verbose > 0 {
            writeln!(out, "    inquiry cdb: [12 00 00 00 60 00]")?;
        }
        if let Some(inq) = transport.inquiry()? {
            write!(out, "{}", output::inquiry(&inq))?;
        }
    }
    match request {
        Request::In {
            action,
            allocation_length,
            ..
        } => {
            if sg.verbose > 0 && !json {
                let cdb = tandem_fence::pr::cdb::PrInCdb {
                    service_action: action.code(),
                    allocation_length,
                    control: 0,
                };
                writeln!(
                    out,
                    "    Persistent reservation in cdb: [{}]",
                    bytes_hex(&cdb.encode())
                )?;
            }
            match transport.pr_in_raw(action, allocation_length) {
                Ok((data, raw)) => {
                    if json {
                        writeln!(out, "{}", output::pr_in_json(&device, &data, None))?;
                    } else if sg.hex > 0 {
                        write!(out, "{}", output::pr_in_hex(&data, &raw))?;
                    } else {
                        write!(out, "{}", output::pr_in(&data, None))?;
                    }
                    Ok(exit::OK)
                }
                Err(e) => {
                    if !json {
                        let _ = writeln!(err, "PR in ({}): {}", in_words(action), short_error(&e));
                    }
                    Err(e.into())
                }
            }
        }
        Request::Out { command, .. } => {
            if sg.verbose > 0 && !json {
                let (cdb, params) = command.to_scsi();
                writeln!(
                    out,
                    "    Persistent reservation out cdb: [{}]",
                    bytes_hex(&cdb)
                )?;
                if sg.verbose > 1 {
                    writeln!(out, "    Persistent reservation out parameters:")?;
                    write!(out, "{}", output::hex_dump(&params))?;
                }
            }
            match transport.pr_out(&command) {
                Ok(()) => {
                    if json {
                        writeln!(out, "{}", out_json(&device, &command))?;
                    } else if sg.verbose > 0 {
                        writeln!(
                            out,
                            "PR out: command ({}) successful",
                            action_words(command.action)
                        )?;
                    }
                    Ok(exit::OK)
                }
                Err(e) => {
                    if !json {
                        let _ = writeln!(
                            err,
                            "PR out ({}): {}",
                            action_words(command.action),
                            short_error(&e)
                        );
                    }
                    Err(e.into())
                }
            }
        }
    }
}

fn out_json(device: &str, command: &PrOutCommand) -> serde_json::Value {
    json!({
        "device": device,
        "action": command.action,
        "reservation_key": command.reservation_key,
        "service_action_key": command.service_action_key,
        "type": command.type_code,
        "ok": true,
    })
}

/// sg_persist's one-word reasons.
fn short_error(e: &FenceError) -> String {
    match e.kind() {
        FenceKind::ReservationConflict => "Reservation conflict".into(),
        FenceKind::UnitAttention => "Unit attention".into(),
        FenceKind::NotReady => "Device not ready".into(),
        FenceKind::IllegalRequest => {
            "bad field in cdb or parameter list (perhaps unsupported service action)".into()
        }
        FenceKind::NotSupported => "command not supported".into(),
        FenceKind::Timeout => "timed out".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tandem_pr(args: &[&str]) -> (i32, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run(
            std::iter::once("tandem-pr")
                .chain(args.iter().copied())
                .map(Into::into),
            &mut out,
            &mut err,
        );
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn global_options_may_come_before_the_subcommand() {
        let args = |v: &[&str]| {
            v.iter()
                .map(|s| std::ffi::OsString::from(*s))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            subcommand_first(args(&[
                "tandem-pr",
                "--transport",
                "ioctl",
                "unfence",
                "/dev/sdb"
            ])),
            args(&["tandem-pr", "unfence", "--transport", "ioctl", "/dev/sdb"])
        );
        assert_eq!(
            subcommand_first(args(&["tandem-pr", "-k", "/dev/sdb"])),
            args(&["tandem-pr", "-k", "/dev/sdb"])
        );
        // A device argument before a word that happens to be a subcommand name stays put.
        assert_eq!(
            subcommand_first(args(&["tandem-pr", "/dev/sdb", "status"])),
            args(&["tandem-pr", "/dev/sdb", "status"])
        );
    }

    #[test]
    fn emulated_lu_through_the_sg_persist_interface() {
        let dir = std::env::temp_dir().join(format!("tandem-pr-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("lu.json");
        let dev = |n: u16| format!("emulator:{}@{n}", state.display());
        let (a, b) = (dev(0), dev(1));
        assert_eq!(
            tandem_pr(&["--out", "--register", "--param-sark=0xa1", &a]).0,
            0
        );
        assert_eq!(tandem_pr(&["-o", "-G", "-S", "b2", &b]).0, 0);
        let (code, out, _) = tandem_pr(&["-k", &b]);
        assert_eq!(code, 0);
        assert!(
            out.contains("2 registered reservation keys follow:\n    0xa1\n    0xb2"),
            "{out}"
        );
        assert!(out.contains("TANDEM"), "INQUIRY line: {out}");
        assert_eq!(
            tandem_pr(&[
                "--out",
                "--reserve",
                "--param-rk=0xa1",
                "--prout-type=5",
                &a
            ])
            .0,
            0
        );
        let (code, _, err) = tandem_pr(&[
            "--out",
            "--reserve",
            "--param-rk=0xb2",
            "--prout-type=5",
            &b,
        ]);
        assert_eq!(code, exit::RESERVATION_CONFLICT, "{err}");
        assert!(err.contains("Reservation conflict"), "{err}");
        let (code, out, _) = tandem_pr(&["-r", "--json", &b]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["reservation"]["key"], "0x00000000000000a1");
        assert_eq!(v["reservation"]["type"], 5);
        // The victim sees REGISTRATIONS PREEMPTED once, like sg_persist would.
        assert_eq!(
            tandem_pr(&["-o", "-P", "-K", "b2", "-S", "a1", "-T", "5", &b]).0,
            0
        );
        let (code, _, err) = tandem_pr(&["-n", "-k", &a]);
        assert_eq!(code, exit::UNIT_ATTENTION, "{err}");
        assert!(err.contains("Registrations preempted"), "{err}");
        let (code, out, _) = tandem_pr(&["-n", "-k", &a]);
        assert_eq!(code, 0);
        assert!(
            out.contains("1 registered reservation key follows:\n    0xb2"),
            "{out}"
        );
        // Bad input.
        assert_eq!(
            tandem_pr(&["-o", "-G", "-S", "0x12345678901234567", &a]).0,
            exit::BAD_ARGUMENTS
        );
        assert_eq!(tandem_pr(&["-k", "-r", &a]).0, exit::BAD_ARGUMENTS);
        assert_eq!(
            tandem_pr(&["-k", "emulator:nowhere"]).0,
            exit::BAD_ARGUMENTS
        );
        assert_eq!(tandem_pr(&["-k", &dev(7)]).0, exit::BAD_ARGUMENTS);
        let (code, _, err) = tandem_pr(&["-k", "/dev/null"]);
        assert_eq!(code, exit::DEVICE_ERROR, "{err}");
        assert!(err.contains("character device"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
