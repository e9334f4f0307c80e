//! `probe-write`: one O_DIRECT write of 4 KiB, reporting what the kernel said. A fenced node
//! gets EBADE ("Invalid exchange"): the block layer's errno for RESERVATION CONFLICT.

use super::Failure;
use super::cli::exit;
use nix::fcntl::OFlag;
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

const BLOCK: usize = 4096;

pub(crate) fn run(
    device: &str,
    offset: u64,
    json: bool,
    out: &mut dyn Write,
) -> Result<i32, Failure> {
    if !offset.is_multiple_of(4096) {
        return Err(
            super::cli::UsageError(format!("--offset {offset} is not a multiple of 4096")).into(),
        );
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(device)
        .map_err(|e| anyhow::anyhow!("opening {device} for O_DIRECT writes: {e}"))?;
    // O_DIRECT needs an aligned buffer: take the aligned 4 KiB inside a larger one.
    let mut storage = vec![0u8; 2 * BLOCK];
    let start = storage.as_ptr().align_offset(BLOCK);
    let buf = &mut storage[start..start + BLOCK];
    buf.fill(0x7a);
    let result = file.write_at(buf, offset);
    let (code, errno, error) = match &result {
        Ok(n) if *n == BLOCK => (exit::OK, None, None),
        Ok(n) => (
            exit::DEVICE_ERROR,
            None,
            Some(format!("short write: {n} of {BLOCK} bytes")),
        ),
        Err(e) => (
            if e.raw_os_error() == Some(nix::libc::EBADE) {
                exit::RESERVATION_CONFLICT
            } else {
                exit::DEVICE_ERROR
            },
            e.raw_os_error(),
            Some(e.to_string()),
        ),
    };
    let conflict = code == exit::RESERVATION_CONFLICT;
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "device": device,
                "offset": offset,
                "ok": code == exit::OK,
                "errno": errno,
                "error": error,
                "reservation_conflict": conflict,
            })
        )?;
    } else if let Some(error) = &error {
        writeln!(
            out,
            "{device}: write at {offset} failed: {error}{}",
            if conflict {
                " (reservation conflict)"
            } else {
                ""
            }
        )?;
    } else {
        writeln!(out, "{device}: wrote {BLOCK} bytes at {offset}")?;
    }
    Ok(code)
}
