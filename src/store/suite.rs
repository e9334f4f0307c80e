//! The backing-store trait suite: every [`BlockStore`] implementation must pass it.

use super::*;

fn temp_file(tag: &str, size: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-suite-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("backing");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

fn run(store: &dyn BlockStore, op: IoOp) -> IoDone {
    run_blocking(store, op)
}

fn pattern(seed: u8, len: usize) -> DataBuf {
    let data: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect();
    Arc::new(AlignedBuf::copy_from(&data))
}

/// The suite proper.
fn suite(engine: Engine) {
    let size = 8u64 << 20;
    let path = temp_file(&format!("{engine:?}"), size);
    let mut config = StoreConfig::new(&path);
    config.engine = engine;
    config.limit_bytes = Some(size - 4096);
    let store = open(&config).unwrap();
    assert_eq!(
        store.size_bytes(),
        size - 4096,
        "limit_bytes caps the data area"
    );
    assert!(store.block_bytes() >= 512);

    // Write, FUA write, flush, read back.
    let a = pattern(1, 65536);
    assert!(
        run(
            &*store,
            IoOp::Write {
                offset: 4096,
                buf: a.clone(),
                fua: false
            }
        )
        .result
        .is_ok()
    );
    let b = pattern(9, 4096);
    assert!(
        run(
            &*store,
            IoOp::Write {
                offset: 1 << 20,
                buf: b.clone(),
                fua: true
            }
        )
        .result
        .is_ok()
    );
    assert!(run(&*store, IoOp::Flush).result.is_ok());
    let done = run(
        &*store,
        IoOp::Read {
            offset: 4096,
            buf: AlignedBuf::zeroed(65536),
        },
    );
    assert_eq!(&done.buf.unwrap()[..], &a[..]);
    let done = run(
        &*store,
        IoOp::Read {
            offset: 1 << 20,
            buf: AlignedBuf::zeroed(4096),
        },
    );
    assert_eq!(&done.buf.unwrap()[..], &b[..]);

    // Discard and write-zeroes read back as zeroes.
    assert!(
        run(
            &*store,
            IoOp::Discard {
                offset: 4096,
                len_bytes: 8192
            }
        )
        .result
        .is_ok()
    );
    assert!(
        run(
            &*store,
            IoOp::WriteZeroes {
                offset: 1 << 20,
                len_bytes: 4096
            }
        )
        .result
        .is_ok()
    );
    let done = run(
        &*store,
        IoOp::Read {
            offset: 4096,
            buf: AlignedBuf::zeroed(16384),
        },
    );
    let buf = done.buf.unwrap();
    assert!(buf[..8192].iter().all(|&x| x == 0));
    assert_eq!(&buf[8192..], &a[8192..16384]);
    let done = run(
        &*store,
        IoOp::Read {
            offset: 1 << 20,
            buf: AlignedBuf::zeroed(4096),
        },
    );
    assert!(done.buf.unwrap().iter().all(|&x| x == 0));

    // Out of range, unaligned and beyond-the-limit requests are refused, not attempted.
    for op in [
        IoOp::Read {
            offset: size,
            buf: AlignedBuf::zeroed(4096),
        },
        IoOp::Write {
            offset: 100,
            buf: pattern(0, 512),
            fua: false,
        },
        IoOp::Write {
            offset: size - 4096,
            buf: pattern(0, 4096),
            fua: false,
        },
        IoOp::Discard {
            offset: u64::MAX - 511,
            len_bytes: 1024,
        },
    ] {
        let done = run(&*store, op);
        match done.result {
            Err(TandemError::InvalidRequest(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // Many concurrent requests complete, each exactly once, with the right data.
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..200u64 {
        let tx = tx.clone();
        store.submit(
            IoOp::Write {
                offset: (i % 100) * 4096 + (2 << 20),
                buf: pattern(u8::try_from(i % 256).unwrap(), 4096),
                fua: false,
            },
            Box::new(move |d| tx.send((i, d.result.is_ok())).unwrap()),
        );
    }
    drop(tx);
    let results: Vec<_> = rx.iter().collect();
    assert_eq!(results.len(), 200);
    assert!(results.iter().all(|(_, ok)| *ok));
    drop(store);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn uring_store_passes_the_trait_suite() {
    suite(Engine::Uring);
}

#[test]
fn sync_store_passes_the_trait_suite() {
    suite(Engine::Sync);
}

#[test]
fn a_failing_device_reports_an_error_and_never_panics() {
    // /dev/full fails every write with ENOSPC: the store must report it as a data write
    // failure (what detaches the disk), for both engines.
    for engine in [Engine::Uring, Engine::Sync] {
        let mut config = StoreConfig::new(Path::new("/dev/full"));
        config.engine = engine;
        config.direct = false;
        config.limit_bytes = Some(1 << 20);
        let Ok(store) = open(&config) else {
            panic!("/dev/full must open");
        };
        // /dev/full has size 0 as seen by seek; nothing fits, so every write is refused
        // as out of range or fails with ENOSPC — either way an error, never a panic.
        let done = run(
            &*store,
            IoOp::Write {
                offset: 0,
                buf: pattern(1, 4096),
                fua: false,
            },
        );
        assert!(done.result.is_err(), "{engine:?}");
    }
}

#[test]
fn zeroing_falls_back_when_the_filesystem_cannot_fallocate() {
    use std::os::unix::fs::FileExt;
    let path = temp_file("zero-fallback", 1 << 20);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&[0x5a; 65536], 4096).unwrap();
    zero_range_fallback(&file, 8192, 16384).unwrap();
    let mut back = vec![0u8; 65536];
    file.read_exact_at(&mut back, 4096).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0x5a));
    assert!(back[4096..20480].iter().all(|&b| b == 0));
    assert!(back[20480..].iter().all(|&b| b == 0x5a));
    assert!(is_unsupported(&std::io::Error::from_raw_os_error(
        libc::EOPNOTSUPP
    )));
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
