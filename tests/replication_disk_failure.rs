//! A disk that starts failing, on the host (no root, no VM): two replicas in this
//! process over TCP on 127.0.0.1, the primary's backing store behind a test double that
//! answers every I/O with EIO from a chosen moment. The primary detaches its disk
//! (Diskless) and the application's writes, flushes and reads go on through the peer
//! with no error; once the disk is back (the replica restarted on it) a resync from the
//! peer brings it up to date and both copies end byte-identical. The real-kernel
//! version (device-mapper's error target under ublk) is in vm_replication.rs.

// Test code: helpers panic to report a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod replica_harness;

use replica_harness::{PairAddrs, scratch};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem::error::TandemError;
use tandem::replication::core::Notice;
use tandem::replication::types::{ConnState, DiskState, NodeId, VolumeId};
use tandem::replication::{
    LocalFencer, PeerConnector, StoreLayer, TcpConnector, Volume, VolumeConfig,
};
use tandem::store::metadata::{CreateParams, MetadataFile};
use tandem::store::{AlignedBuf, BlockStore, Completion, Engine, IoDone, IoOp};

const SIZE: u64 = 64 << 20;

/// The backing store, until `failing` is set; then EIO for every operation (what a dead
/// disk or a lost path returns).
#[derive(Debug)]
struct FailingDisk {
    inner: Arc<dyn BlockStore>,
    failing: Arc<AtomicBool>,
}

impl BlockStore for FailingDisk {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn block_bytes(&self) -> u32 {
        self.inner.block_bytes()
    }
    fn submit(&self, op: IoOp, done: Completion) {
        if !self.failing.load(Ordering::Acquire) {
            return self.inner.submit(op, done);
        }
        let buf = match op {
            IoOp::Read { buf, .. } => Some(buf),
            _ => None,
        };
        done(IoDone {
            result: Err(TandemError::Io {
                what: "test double: the disk failed".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
            buf,
        });
    }
}

fn backing(dir: &Path, name: &str, node: u32) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut params = CreateParams::new(VolumeId::from_name("df"), NodeId(node));
    params.zeroed = true;
    MetadataFile::create(&path, &params).unwrap();
    path
}

async fn start(
    path: &Path,
    listen: SocketAddr,
    peer: SocketAddr,
    active: bool,
    layer: Option<StoreLayer>,
    failure_record: Option<PathBuf>,
) -> Volume {
    let mut config = VolumeConfig::new("df", path.to_owned());
    config.failure_record = failure_record;
    config.engine = Engine::Sync;
    config.ping_interval_ms = 200;
    config.ping_timeout_ms = 2000;
    config.store_layer = layer;
    let connector: Arc<dyn PeerConnector> =
        Arc::new(TcpConnector::new(listen, peer, active).await.unwrap());
    Volume::start(
        config,
        Some(connector),
        Arc::new(LocalFencer { allow: true }),
    )
    .await
    .unwrap()
}

async fn wait_for(what: &str, volume: &Volume, ok: impl Fn(ConnState, DiskState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = volume.status().await.unwrap();
        if ok(s.replica.connection, s.replica.disk) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {:?}/{:?} after 60 s: {s:?}",
            s.replica.connection,
            s.replica.disk
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seed ^ u8::try_from(i % 251).unwrap();
    }
    buf
}

async fn read(volume: &Volume, offset: u64, len: usize) -> Vec<u8> {
    volume
        .read(offset, u64::try_from(len).unwrap())
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_disk_fails_goes_diskless_and_a_resync_brings_it_back() {
    let dir = scratch("disk-failure");
    let (a_path, b_path) = (backing(&dir, "a.img", 1), backing(&dir, "b.img", 2));
    let PairAddrs { a: pa, b: pb } = PairAddrs::new();
    let failing = Arc::new(AtomicBool::new(false));
    let layer = failing_layer(&failing);
    let b = start(&b_path, pb, pa, false, None, None).await;
    let a = start(&a_path, pa, pb, true, Some(layer), None).await;
    in_sync("connected and up to date", &a, &b).await;
    a.promote(false).await.unwrap();

    const MIB: usize = 1 << 20;
    let before = pattern(1, MIB);
    a.write(0, Arc::new(pattern(1, MIB)), false).await.unwrap();
    a.flush().await.unwrap();

    // The disk dies: the application sees nothing of it.
    failing.store(true, Ordering::Release);
    let during = pattern(2, MIB);
    a.write(8 << 20, Arc::new(pattern(2, MIB)), false)
        .await
        .expect("a write while the primary's disk fails goes to the peer");
    a.flush().await.expect("a flush while the disk fails");
    let s = a.status().await.unwrap();
    assert_eq!(s.replica.disk, DiskState::Diskless, "{s:?}");
    assert_eq!(s.replica.connection, ConnState::Connected, "{s:?}");
    assert_eq!(
        read(&a, 0, MIB).await,
        before[..],
        "read of the earlier write"
    );
    assert_eq!(
        read(&a, 8 << 20, MIB).await,
        during[..],
        "read of the later write"
    );

    // The disk is back (a repaired path): the replica restarts on it and resyncs.
    a.shutdown().await.unwrap();
    failing.store(false, Ordering::Release);
    let a = start(&a_path, pa, pb, true, None, None).await;
    in_sync("in sync again", &a, &b).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let (ca, cb) = (data_of(&a_path), data_of(&b_path));
    assert!(ca == cb, "the copies differ after the resync");
    assert_eq!(&ca[8 << 20..(8 << 20) + MIB], &during[..]);
}

/// The same disk comes back after its failure with the metadata it had before (the
/// failure's own metadata write never reached it: seed 10821 of the simulation, where
/// the peer never learned of the failure either). The record in the state directory
/// makes it take a full sync, and goes once the disk's metadata says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_whose_failure_was_recorded_takes_a_full_sync_even_with_its_old_metadata() {
    let dir = scratch("disk-failure-record");
    let (a_path, b_path) = (backing(&dir, "a.img", 1), backing(&dir, "b.img", 2));
    let record = dir.join("state").join("df.disk-failed");
    let PairAddrs { a: pa, b: pb } = PairAddrs::new();
    let failing = Arc::new(AtomicBool::new(false));
    let layer = failing_layer(&failing);
    let b = start(&b_path, pb, pa, false, None, None).await;
    let a = start(&a_path, pa, pb, true, Some(layer), Some(record.clone())).await;
    in_sync("connected and up to date", &a, &b).await;
    a.promote(false).await.unwrap();
    const MIB: usize = 1 << 20;
    a.write(0, Arc::new(pattern(3, MIB)), false).await.unwrap();
    a.flush().await.unwrap();
    let data_size = data_size_of(&a_path);
    let old_metadata =
        std::fs::read(&a_path).unwrap()[usize::try_from(data_size).unwrap()..].to_vec();
    assert!(!record.exists(), "no failure yet, no record");

    failing.store(true, Ordering::Release);
    a.write(8 << 20, Arc::new(pattern(4, MIB)), false)
        .await
        .expect("a write while the primary's disk fails goes to the peer");
    wait_for("a diskless", &a, |_, d| d == DiskState::Diskless).await;
    a.shutdown().await.unwrap();
    assert!(
        record.exists(),
        "the failure is recorded in the state directory"
    );

    // The path comes back with the disk as it was before the failure, metadata included.
    failing.store(false, Ordering::Release);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&a_path)
            .unwrap();
        f.seek(SeekFrom::Start(data_size)).unwrap();
        f.write_all(&old_metadata).unwrap();
        f.sync_all().unwrap();
    }
    let stale = MetadataFile::open(&a_path).unwrap().superblock().clone();
    assert!(
        stale.flags.consistent,
        "the old metadata looks Consistent: {stale:?}"
    );
    let mut events = b.events();
    let a = start(&a_path, pa, pb, true, None, Some(record.clone())).await;
    in_sync("in sync again", &a, &b).await;
    let mut full = None;
    while let Ok(e) = events.try_recv() {
        if let Notice::SyncStarted {
            source: true,
            full: f,
            ..
        } = e.notice
        {
            full = Some(f);
        }
    }
    assert_eq!(
        full,
        Some(true),
        "the peer sent a full sync to the disk that had failed"
    );
    assert!(
        !record.exists(),
        "the record goes once the metadata says so"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let (ca, cb) = (data_of(&a_path), data_of(&b_path));
    assert!(ca == cb, "the copies differ after the resync");
}

fn failing_layer(failing: &Arc<AtomicBool>) -> StoreLayer {
    let failing = failing.clone();
    StoreLayer::new(move |inner| {
        Arc::new(FailingDisk {
            inner,
            failing: failing.clone(),
        })
    })
}

/// Waits until both replicas are connected and UpToDate.
async fn in_sync(what: &str, a: &Volume, b: &Volume) {
    for (name, v) in [("a", a), ("b", b)] {
        wait_for(&format!("{name} {what}"), v, |c, d| {
            c == ConnState::Connected && d == DiskState::UpToDate
        })
        .await;
    }
}

fn data_size_of(path: &Path) -> u64 {
    MetadataFile::open(path)
        .unwrap()
        .superblock()
        .data_size_bytes
}

/// A stopped replica's data (its backing file without the metadata).
fn data_of(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.truncate(usize::try_from(data_size_of(path)).unwrap());
    bytes
}
