//! Discards wider than the activity log on a large replicated volume (two `tandemd replica`
//! processes on 127.0.0.x, no root). One NBD TRIM of 4 GiB − 4 KiB (what any NBD client
//! may send; mkfs.ext4 discards a whole device) once made the primary's activity-log
//! transaction list 1024 extents, which the metadata store refused: the healthy disk was
//! detached and the primary went Diskless. Now: the big TRIM and four 1 GiB TRIMs in
//! flight at once, then 4 KiB random writes at QD64 over the whole 8 GiB (every one a new
//! activity-log extent, pinned until the peer's barrier ack) with fio's verify; both
//! replicas stay UpToDate and connected.
//!
//! Needs fio with its nbd engine (scripts/install-test-deps); fails if missing.

// Test code: helpers panic to report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod replica_harness;

use replica_harness::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 8 << 30;

/// Sends every `(offset, len)` as an NBD TRIM before reading any reply (all in flight at
/// once), then checks that each was answered without error.
fn trims_in_flight(c: &mut NbdClient, trims: &[(u64, u32)]) {
    use tandem::frontend::nbd::proto::{CMD_TRIM, Request, SIMPLE_REPLY_MAGIC};
    let s = c.stream();
    for (i, &(offset, length)) in trims.iter().enumerate() {
        let req = Request {
            flags: 0,
            kind: CMD_TRIM,
            cookie: 1000 + u64::try_from(i).unwrap(),
            offset,
            length,
        };
        s.write_all(&req.encode()).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut answered = Vec::new();
    for _ in trims {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert_eq!(error, 0, "TRIM {cookie} failed with NBD error {error}");
        answered.push(cookie);
    }
    answered.sort_unstable();
    let expected: Vec<u64> = (0..trims.len())
        .map(|i| 1000 + u64::try_from(i).unwrap())
        .collect();
    assert_eq!(answered, expected);
}

#[test]
fn trims_of_gigabytes_and_scattered_writes_keep_both_replicas_up_to_date() {
    let fio = Command::new("sh")
        .args(["-c", "command -v fio"])
        .output()
        .unwrap();
    assert!(
        fio.status.success(),
        "fio is required (scripts/install-test-deps installs it)"
    );
    let dir = scratch("repl-trim");
    let (a, b) = synced_pair(&dir, SIZE, false, Duration::from_secs(300));

    let mut c = NbdClient::connect(a.nbd.unwrap(), "vol").unwrap();
    assert!(c.size >= SIZE - (64 << 20), "export of {} bytes", c.size);
    let gib: u64 = 1 << 30;
    let last_gib = c.size - gib;
    trims_in_flight(
        &mut c,
        &[
            (0, u32::try_from(4 * gib - 4096).unwrap()),
            (4 * gib, u32::try_from(gib).unwrap()),
            (5 * gib, u32::try_from(gib).unwrap()),
            (6 * gib, u32::try_from(gib).unwrap()),
            (last_gib, u32::try_from(gib).unwrap()),
        ],
    );
    drop(c);
    for r in [&a, &b] {
        assert_connected_up_to_date(r, "after the trims");
    }

    // Random 4 KiB writes over the whole volume at QD64, read back and verified.
    let uri = format!("nbd://{}/vol", a.nbd.unwrap());
    let out = Command::new("fio")
        .args([
            "--name=scattered",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=64",
            "--size=8g",
            "--io_size=48m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--output-format=json",
            // fio's verify state file goes where it runs: not into the checkout.
            "--verify_state_save=0",
        ])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fio verify failed: {}{}\nprimary log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        a.log_text()
    );
    for r in [&a, &b] {
        assert_connected_up_to_date(r, "after the writes");
        assert!(
            !r.log_text().contains("detached"),
            "a disk was detached:\n{}",
            r.log_text()
        );
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
