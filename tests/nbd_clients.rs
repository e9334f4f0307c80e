//! Real NBD clients on the host against a replicated volume (two `tandemd replica`
//! processes on 127.0.0.1/127.0.0.2, no root): qemu-img convert/compare, nbdcopy
//! round trips, nbdinfo; then the secondary's backing file must hold the same bytes.
//! Garbage from an NBD client is refused with a reason and the server keeps serving.
//!
//! Needs qemu-img (qemu-utils) and nbdcopy/nbdinfo (libnbd-bin); fails if missing.

// Test code: helpers panic to report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod replica_harness;

use replica_harness::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 128 << 20;

fn tool(name: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} is required (scripts/install-test-deps installs it)"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[test]
fn qemu_img_nbdcopy_and_nbdinfo_round_trip_and_the_secondary_holds_the_same_bytes() {
    let qemu_img = tool("qemu-img");
    let nbdcopy = tool("nbdcopy");
    let nbdinfo = tool("nbdinfo");
    let dir = scratch("nbd-clients");
    let (a, b) = synced_pair(&dir, SIZE, false, Duration::from_secs(60));
    let url = format!("nbd://{}/vol", a.nbd.unwrap());
    let size = a.status()["size_bytes"].as_u64().unwrap();

    let info = run(Command::new(&nbdinfo).arg("--json").arg(&url));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(size), "{info:#}");
    assert_eq!(export["can_flush"], true, "{info:#}");
    assert_eq!(export["can_fua"], true, "{info:#}");
    assert_eq!(export["can_trim"], true, "{info:#}");
    assert_eq!(export["can_zero"], true, "{info:#}");

    // A source image of random data with a hole, the size of the export.
    let src = dir.join("src.img");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut rng = Rng(11);
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..(size >> 20) {
            if i % 7 == 3 {
                buf.fill(0);
            } else {
                rng.fill(&mut buf);
            }
            f.write_all(&buf).unwrap();
        }
        let rest = usize::try_from(size % (1 << 20)).unwrap();
        rng.fill(&mut buf[..rest]);
        f.write_all(&buf[..rest]).unwrap();
    }
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw", "-W"])
        .arg(&src)
        .arg(&url));
    let cmp = run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&url));
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // nbdcopy: out of the volume into a file, and a second image into the volume.
    let back = dir.join("back.img");
    run(Command::new(&nbdcopy).arg(&url).arg(&back));
    assert_eq!(sha256_prefix(&src, size), sha256_prefix(&back, size));
    let src2 = dir.join("src2.img");
    {
        let mut f = std::fs::File::create(&src2).unwrap();
        let mut rng = Rng(12);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left.min(1 << 20)).unwrap();
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    }
    run(Command::new(&nbdcopy).arg("--flush").arg(&src2).arg(&url));
    let cmp = run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src2)
        .arg(&url));
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // The secondary's backing file holds exactly the same data.
    a.wait_for("in sync", Duration::from_secs(30), |s| {
        is_conn(s, "connected") && s["out_of_sync_bytes"] == 0
    });
    assert_eq!(sha256_prefix(&src2, size), sha256_prefix(&b.backing, size));
    assert_eq!(
        sha256_prefix(&a.backing, size),
        sha256_prefix(&b.backing, size)
    );
}

#[test]
fn garbage_from_an_nbd_client_is_refused_and_the_server_keeps_serving() {
    use tandem::frontend::nbd::proto::*;
    let dir = scratch("nbd-garbage");
    let a_img = create_backing(&dir, "a.img", 32 << 20, "vol", 1);
    let b_img = create_backing(&dir, "b.img", 32 << 20, "vol", 2);
    let addrs = PairAddrs::new();
    let a = Replica::start(&dir, "a", "vol", &a_img, addrs.a, addrs.b, true, &[]);
    let _b = Replica::start(&dir, "b", "vol", &b_img, addrs.b, addrs.a, false, &[]);
    a.wait_for("connected", Duration::from_secs(10), |s| {
        is_conn(s, "connected")
    });
    a.ok(&["primary", "vol", "--force"]);
    let addr = a.nbd.unwrap();

    // Not an NBD client at all: the server closes after the bad option magic.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(b"\0\0\0\x03GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // An unknown export is refused with ERR_UNKNOWN.
    let err = NbdClient::connect(addr, "nope")
        .err()
        .expect("unknown export accepted");
    assert!(err.to_string().contains("unknown export"), "{err}");

    // Out-of-range and misaligned requests get EINVAL; the connection goes on.
    let mut c = NbdClient::connect(addr, "vol").unwrap();
    let size = c.size;
    assert_eq!(c.write(size, &[0u8; 4096]), EINVAL);
    assert_eq!(c.write(100, &[0u8; 512]), EINVAL);
    assert_eq!(c.write(4096, &[7u8; 4096]), 0);
    assert_eq!(c.read(4096, 4096), vec![7u8; 4096]);

    // A request with a bad magic, and an oversized write, close that connection only.
    c.stream().write_all(&[0x55; 28]).unwrap();
    let mut buf = [0u8; 16];
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(c.stream().read(&mut buf), Ok(0) | Err(_)));
    let mut c = NbdClient::connect(addr, "vol").unwrap();
    let huge = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: u32::MAX,
    };
    c.stream().write_all(&huge.encode()).unwrap();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(c.stream().read(&mut buf), Ok(0) | Err(_)));
    // The refusals are logged with their reason (the log is written asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = a.log_text();
        if (log.contains("bad request magic") && log.contains("exceeds the"))
            || std::time::Instant::now() > deadline
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(log.contains("bad request magic"), "{log}");
    assert!(log.contains("exceeds the"), "{log}");

    // Still serving, metadata intact.
    let mut c = NbdClient::connect(addr, "vol").unwrap();
    assert_eq!(c.read(4096, 4096), vec![7u8; 4096]);
    let dump = Command::new(bin("tandemctl"))
        .args(["dump-md", "--json"])
        .arg(&a_img)
        .output()
        .unwrap();
    assert!(dump.status.success());
}
