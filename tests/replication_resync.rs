//! Two `tandemd replica` processes on 127.0.0.1/127.0.0.2 (no root): bitmap resync after
//! a disconnect copies only what changed, split brain is refused and resolved, and
//! garbage on the replication port is refused without touching the metadata.

// Test code: helpers panic to report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod replica_harness;

use replica_harness::*;
use std::io::Write;
use std::time::Duration;

const SIZE: u64 = 256 << 20;

fn pair(test: &str, extra_a: &[&str], extra_b: &[&str]) -> (std::path::PathBuf, Replica, Replica) {
    let dir = scratch(test);
    let a_img = create_backing(&dir, "a.img", SIZE, "vol", 1);
    let b_img = create_backing(&dir, "b.img", SIZE, "vol", 2);
    let addrs = PairAddrs::new();
    let a = Replica::start(&dir, "a", "vol", &a_img, addrs.a, addrs.b, true, extra_a);
    let b = Replica::start(&dir, "b", "vol", &b_img, addrs.b, addrs.a, true, extra_b);
    (dir, a, b)
}

fn data_size(r: &Replica) -> u64 {
    r.status()["size_bytes"].as_u64().unwrap()
}

/// Initial full sync from a forced primary, then in sync.
fn initial_sync(a: &Replica, b: &Replica) {
    a.wait_for("connection", Duration::from_secs(10), |s| {
        is_conn(s, "connected")
    });
    a.ok(&["primary", "vol", "--force"]);
    b.wait_for("initial sync", Duration::from_secs(60), |s| {
        is_conn(s, "connected") && s["disk"] == "up-to-date"
    });
    // A link that came up before the core's first clock tick once looked silent since
    // the epoch and was dropped at once.
    for r in [a, b] {
        assert!(
            !r.log_text().contains("peer timed out"),
            "a spurious ping timeout:\n{}",
            r.log_text()
        );
    }
}

#[test]
fn resync_after_disconnect_copies_only_dirty_blocks_and_sides_end_identical() {
    let (_dir, a, b) = pair("repl-resync", &[], &[]);
    initial_sync(&a, &b);
    let mut c = NbdClient::connect(a.nbd.unwrap(), "vol").unwrap();
    let size = c.size;
    assert_eq!(size, data_size(&a));
    // Some data while connected.
    let mut rng = Rng(7);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..8u64 {
        rng.fill(&mut buf);
        assert_eq!(c.write(i << 20, &buf), 0);
    }
    assert_eq!(c.flush(), 0);

    // Disconnect the secondary and write N MiB at random 4 KiB-aligned places.
    b.ok(&["disconnect", "vol"]);
    a.wait_for("primary alone", Duration::from_secs(10), |s| {
        !is_conn(s, "connected")
    });
    let mut dirty = std::collections::BTreeSet::new();
    let mut written = 0u64;
    let mut block = vec![0u8; 64 << 10];
    while written < 24 << 20 {
        let blocks = 1 + rng.next() % 16;
        let len = blocks * 4096;
        let off = (rng.next() % ((size - len) / 4096)) * 4096;
        rng.fill(&mut block[..usize::try_from(len).unwrap()]);
        assert_eq!(c.write(off, &block[..usize::try_from(len).unwrap()]), 0);
        for blk in off / 4096..(off + len) / 4096 {
            dirty.insert(blk);
        }
        written += len;
    }
    assert_eq!(c.flush(), 0);
    let dirty_bytes = dirty.len() as u64 * 4096;
    let before = a.status();
    let oos = before["out_of_sync_bytes"].as_u64().unwrap();
    assert!(
        oos >= dirty_bytes && oos <= dirty_bytes + (4 << 20),
        "primary tracks {oos} out-of-sync bytes for {dirty_bytes} dirty bytes"
    );
    let sent_before = before["stats"]["resync_sent_bytes"].as_u64().unwrap();

    // Reconnect: a bitmap resync, then identical copies.
    b.ok(&["connect", "vol"]);
    let out = b.ok(&["sync", "vol", "--timeout", "120"]);
    assert!(out.contains("in sync"), "{out}");
    let after = a.wait_for("in sync", Duration::from_secs(60), |s| {
        is_conn(s, "connected") && s["out_of_sync_bytes"] == 0 && s["peer_disk"] == "up-to-date"
    });
    let resynced = after["stats"]["resync_sent_bytes"].as_u64().unwrap() - sent_before;
    eprintln!("dirty {dirty_bytes} bytes, tracked {oos}, resynced {resynced}");
    assert!(resynced > 0, "nothing was resynced");
    assert!(
        resynced * 10 <= dirty_bytes * 11,
        "resynced {resynced} bytes for {dirty_bytes} dirty bytes (more than 1.1x)"
    );
    // Both sides identical by checksum (reads through the secondary too).
    drop(c);
    let data = data_size(&a);
    assert_eq!(
        sha256_prefix(&a.backing, data),
        sha256_prefix(&b.backing, data)
    );
}

#[test]
fn split_brain_is_refused_both_data_sets_survive_and_resolve_works() {
    let (_dir, a, b) = pair(
        "repl-split",
        &["--fencing", "dont-care"],
        &["--fencing", "dont-care"],
    );
    initial_sync(&a, &b);
    a.ok(&["disconnect", "vol"]);
    b.ok(&["disconnect", "vol"]);
    b.wait_for("standalone", Duration::from_secs(10), |s| {
        is_conn(s, "stand-alone")
    });
    b.ok(&["primary", "vol"]);
    // Both primary, both write different data at the same place.
    let mut ca = NbdClient::connect(a.nbd.unwrap(), "vol").unwrap();
    let mut cb = NbdClient::connect(b.nbd.unwrap(), "vol").unwrap();
    let pa = vec![0xaa_u8; 1 << 20];
    let pb = vec![0xbb_u8; 1 << 20];
    assert_eq!(ca.write(4 << 20, &pa), 0);
    assert_eq!(cb.write(4 << 20, &pb), 0);
    assert_eq!(cb.write(9 << 20, &pb), 0);
    assert_eq!(ca.flush(), 0);
    assert_eq!(cb.flush(), 0);
    drop(cb);
    b.ok(&["secondary", "vol"]);

    // Reconnect: both refuse with a clear reason and stay standalone.
    a.ok(&["connect", "vol"]);
    b.ok(&["connect", "vol"]);
    for r in [&a, &b] {
        let s = r.wait_for("split-brain refusal", Duration::from_secs(20), |s| {
            is_conn(s, "stand-alone")
                && s["last_refusal"]
                    .as_str()
                    .is_some_and(|m| m.contains("split brain"))
        });
        let reason = s["last_refusal"].as_str().unwrap();
        assert!(reason.contains("discard-my-data"), "{reason}");
    }
    // Both data sets intact.
    assert_eq!(ca.read(4 << 20, 4096), vec![0xaa; 4096]);
    let b_disk = std::fs::read(&b.backing).unwrap();
    assert!(b_disk[4 << 20..(4 << 20) + 4096].iter().all(|&x| x == 0xbb));
    assert!(b_disk[9 << 20..(9 << 20) + 4096].iter().all(|&x| x == 0xbb));

    // Resolve: b discards its changes; a's data wins on both.
    b.ok(&["resolve", "vol", "--discard-my-data"]);
    a.ok(&["connect", "vol"]);
    b.wait_for("resync after resolve", Duration::from_secs(60), |s| {
        is_conn(s, "connected") && s["disk"] == "up-to-date" && s["out_of_sync_bytes"] == 0
    });
    let data = data_size(&a);
    assert_eq!(
        sha256_prefix(&a.backing, data),
        sha256_prefix(&b.backing, data)
    );
    let b_disk = std::fs::read(&b.backing).unwrap();
    assert!(b_disk[4 << 20..(4 << 20) + 4096].iter().all(|&x| x == 0xaa));
    assert!(
        b_disk[9 << 20..(9 << 20) + 4096].iter().all(|&x| x != 0xbb),
        "b's discarded write survived"
    );
}

#[test]
fn garbage_on_the_replication_port_is_refused_and_metadata_stays_intact() {
    let (_dir, a, mut b) = pair("repl-garbage", &[], &[]);
    initial_sync(&a, &b);
    // Stop b; speak garbage to a in b's place: HTTP, random bytes, a frame for another
    // volume. The listener is the side with the larger address: 127.0.0.2 (b's) ...
    b.stop();
    let addr: std::net::SocketAddr = b.args
        [b.args.iter().position(|x| x == "--listen").unwrap() + 1]
        .parse()
        .unwrap();
    let listener = std::net::TcpListener::bind(addr).unwrap();
    // ... a dials b's address: accept its connections and answer with garbage.
    let feeds: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: tandem\r\n\r\n".to_vec(),
        {
            let mut r = Rng(3);
            let mut v = vec![0u8; 4096];
            r.fill(&mut v);
            v
        },
        {
            use tandem::replication::types::*;
            use tandem::replication::wire::*;
            let hello = Msg::Hello(Hello {
                volume_id: VolumeId::from_name("another-volume"),
                node_id: NodeId(2),
                size_bytes: data_size(&a),
                generations: GenerationIds::default(),
                role: Role::Secondary,
                disk: DiskState::UpToDate,
                epoch: Epoch(0),
                protocol: Protocol::C,
                bitmap_granularity: 4096,
                dirty_bits: 0,
                primary_since_ms: 0,
                primary_crashed: false,
                cache_lost: false,
                discard_my_data: false,
            });
            encode(&hello, &[])
        },
    ];
    let mut reasons = Vec::new();
    for feed in &feeds {
        listener.set_nonblocking(false).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(feed);
        // a must close the connection.
        let mut sink = [0u8; 65536];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::io::Read::read(&mut s, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => assert!(
                    std::time::Instant::now() < deadline,
                    "a kept talking to garbage"
                ),
            }
        }
        let st = a.wait_for("refusal", Duration::from_secs(10), |s| {
            !s["last_refusal"].is_null()
        });
        reasons.push(st["last_refusal"].as_str().unwrap().to_owned());
        a.ok(&["connect", "vol"]);
    }
    assert!(reasons[0].contains("bad magic"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("volume")), "{reasons:?}");
    assert!(
        a.status()["stats"]["peer_protocol_errors"]
            .as_u64()
            .unwrap()
            >= 2
    );
    drop(listener);
    // The metadata is intact and the real peer still syncs.
    let dump = std::process::Command::new(bin("tandemctl"))
        .args(["dump-md", "--json"])
        .arg(&b.backing)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    b.restart();
    b.wait_for("reconnect", Duration::from_secs(30), |s| {
        is_conn(s, "connected") && s["disk"] == "up-to-date"
    });
}

#[test]
fn replicas_created_zeroed_start_in_sync_without_an_initial_sync() {
    let dir = scratch("repl-zeroed");
    let a_img = create_backing_with(&dir, "a.img", SIZE, "vol", 1, &["--zeroed"]);
    let b_img = create_backing_with(&dir, "b.img", SIZE, "vol", 2, &["--zeroed"]);
    let addrs = PairAddrs::new();
    let a = Replica::start(&dir, "a", "vol", &a_img, addrs.a, addrs.b, true, &[]);
    let b = Replica::start(&dir, "b", "vol", &b_img, addrs.b, addrs.a, false, &[]);
    for r in [&a, &b] {
        r.wait_for("in sync at once", Duration::from_secs(10), |s| {
            is_conn(s, "connected") && s["disk"] == "up-to-date" && s["peer_disk"] == "up-to-date"
        });
    }
    // Up to date, so no --force: the cluster could promote it too.
    a.ok(&["primary", "vol"]);
    let mut c = NbdClient::connect(a.nbd.unwrap(), "vol").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    Rng(11).fill(&mut buf);
    assert_eq!(c.write(3 << 20, &buf), 0);
    assert_eq!(c.flush(), 0);
    a.ok(&["verify", "vol"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !a.log_text().contains("VerifyFinished") {
        assert!(
            std::time::Instant::now() < deadline,
            "the verify never finished:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = a.status();
    assert_eq!(s["verify_mismatched_bytes"], 0, "{s:#}");
    assert_eq!(
        s["stats"]["resync_sent_bytes"], 0,
        "no initial sync ran: {s:#}"
    );
    let data = data_size(&a);
    assert_eq!(
        sha256_prefix(&a.backing, data),
        sha256_prefix(&b.backing, data)
    );
}

#[test]
fn online_verify_finds_a_corrupted_block_and_a_reconnect_repairs_it() {
    use std::os::unix::fs::FileExt;
    let (_dir, a, b) = pair("repl-verify", &[], &[]);
    initial_sync(&a, &b);
    let mut c = NbdClient::connect(a.nbd.unwrap(), "vol").unwrap();
    let mut rng = Rng(5);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..4u64 {
        rng.fill(&mut buf);
        assert_eq!(c.write(i << 20, &buf), 0);
    }
    assert_eq!(c.flush(), 0);
    a.wait_for("in sync", Duration::from_secs(30), |s| {
        is_conn(s, "connected") && s["out_of_sync_bytes"] == 0
    });
    // Corrupt one block of the secondary behind tandem's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b.backing)
        .unwrap();
    f.write_all_at(&[0xee; 4096], (2 << 20) + 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);
    a.ok(&["verify", "vol"]);
    let s = a.wait_for("verify done", Duration::from_secs(60), |s| {
        is_conn(s, "connected") && s["verify_mismatched_bytes"].as_u64().unwrap_or(0) > 0
    });
    let mismatched = s["verify_mismatched_bytes"].as_u64().unwrap();
    assert!((4096..=1 << 20).contains(&mismatched), "{mismatched}");
    assert!(s["out_of_sync_bytes"].as_u64().unwrap() >= 4096, "{s:#}");
    // A reconnect resyncs the marked blocks from the primary.
    b.ok(&["disconnect", "vol"]);
    b.ok(&["connect", "vol"]);
    a.wait_for("repaired", Duration::from_secs(60), |s| {
        is_conn(s, "connected") && s["out_of_sync_bytes"] == 0 && s["peer_disk"] == "up-to-date"
    });
    let data = data_size(&a);
    assert_eq!(
        sha256_prefix(&a.backing, data),
        sha256_prefix(&b.backing, data)
    );
}

/// Hole 10's recovery command: a replica's metadata follows one cluster log; after the
/// cluster's state directory was created afresh, `tandemctl forget-cluster-log` on the
/// stopped replica drops the old log and its epoch (keeping the data's generations), so
/// the replica joins the new log at its next start.
#[test]
fn forget_cluster_log_drops_the_old_log_and_its_epoch_only() {
    use tandem::replication::types::{ClusterLogId, Epoch};
    use tandem::store::metadata::MetadataFile;
    let dir = scratch("repl-forget-log");
    let img = create_backing_with(&dir, "a.img", SIZE, "vol", 1, &["--zeroed"]);
    let mut md = MetadataFile::open(&img).unwrap();
    let mut sb = md.superblock().clone();
    sb.cluster_log = ClusterLogId(0xabcdef);
    sb.epoch = Epoch(41);
    md.write_superblock(&sb).unwrap();
    drop(md);
    let out = std::process::Command::new(bin("tandemctl"))
        .args(["forget-cluster-log", "--json"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["forgot_cluster_log"], "0000000000abcdef", "{said}");
    assert_eq!(said["forgot_epoch"], 41, "{said}");
    let after = MetadataFile::open(&img).unwrap().superblock().clone();
    assert_eq!(after.cluster_log, ClusterLogId::NONE);
    assert_eq!(after.epoch, Epoch(0));
    assert_eq!(
        after.generations, sb.generations,
        "the data's history stays"
    );
    assert_eq!(after.flags, sb.flags);
    // Bad input: a path with no metadata is refused with the reason.
    let out = std::process::Command::new(bin("tandemctl"))
        .args(["forget-cluster-log", "/nonexistent/backing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/backing"),
        "{out:?}"
    );
}
