//! Model-based tests of the replication core, driven by the seeded simulation.

use super::*;

fn runs(base: u64, count: u64, cfg: &SimConfig) -> SimReport {
    if std::env::var("TANDEM_SIM_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let forced = std::env::var("TANDEM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let seeds: Vec<u64> = match forced {
        Some(s) => vec![s],
        // TANDEM_SIM_SEEDS=n widens the search (soak runs); TANDEM_LONG=1 runs 20,000 per
        // run of `runs` (120,000 over the six); the default, 9,000 in all, is what CI
        // runs: enough that most issue-12 holes reintroduced one at a time fail in it
        // (hole 4 first at protocol A's 1,986th run, hence 2,000 each for A and B).
        None => {
            let long = std::env::var("TANDEM_LONG").is_ok_and(|v| v == "1");
            let count = std::env::var("TANDEM_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(if long { 20_000 } else { count });
            (0..count).map(|i| base + i).collect()
        }
    };
    let mut total = SimReport::default();
    let mut runs_done = 0;
    for seed in seeds {
        let report = run(seed, cfg.clone())
            .unwrap_or_else(|e| panic!("{e}\nreplay with TANDEM_SEED={seed}"));
        total.acked_writes += report.acked_writes;
        total.acked_trims += report.acked_trims;
        total.crashes += report.crashes;
        total.failovers += report.failovers;
        total.resyncs += report.resyncs;
        total.partitions += report.partitions;
        total.flushes += report.flushes;
        total.fully_checked += report.fully_checked;
        total.fence_failures += report.fence_failures;
        total.step_downs += report.step_downs;
        total.quorum_holds += report.quorum_holds;
        total.quorum_resumes += report.quorum_resumes;
        total.resets += report.resets;
        total.pauses += report.pauses;
        total.shutdowns += report.shutdowns;
        total.switchovers += report.switchovers;
        total.bad_replies += report.bad_replies;
        total.disk_failures += report.disk_failures;
        total.disks_replaced += report.disks_replaced;
        total.torn_metadata += report.torn_metadata;
        total.large_volumes += report.large_volumes;
        total.received_checked += report.received_checked;
        total.logs_lost += report.logs_lost;
        total.foreign_log_refusals += report.foreign_log_refusals;
        total.failed_metadata += report.failed_metadata;
        runs_done += 1;
    }
    eprintln!("{total:?}");
    if forced.is_some() {
        // One replayed seed proves nothing about the mix.
        return total;
    }
    // With protocol C most runs must get the full acknowledged-write check (not only
    // convergence); protocols A and B do not promise it.
    assert!(
        cfg.protocol != Protocol::C || total.fully_checked * 3 >= runs_done,
        "only {} of {runs_done} runs were fully checked: {total:?}",
        total.fully_checked
    );
    // The runs must have exercised what they claim to test.
    assert!(total.acked_writes > 100, "{total:?}");
    assert!(total.flushes > 10, "{total:?}");
    assert!(total.acked_trims > 0, "{total:?}");
    // ... and the newer fault kinds.
    assert!(
        total.resets > 0 && total.pauses > 0 && total.shutdowns > 0 && total.switchovers > 0,
        "{total:?}"
    );
    assert!(
        !cfg.disk_failures
            || total.disk_failures > 0 && total.disks_replaced > 0 && total.failed_metadata > 0,
        "{total:?}"
    );
    // Metadata goes through the real encoders onto a device a power loss can interrupt.
    assert!(total.torn_metadata > 0, "{total:?}");
    // Protocol A: failovers check that the new primary's received writes all landed.
    assert!(
        cfg.protocol != Protocol::A || runs_done < 64 || total.received_checked > 0,
        "{total:?}"
    );
    // The cluster's log is lost now and then, and the replicas refuse the new one.
    assert!(
        !cfg.lifecycle || runs_done < 200 || total.logs_lost > 0 && total.foreign_log_refusals > 0,
        "{total:?}"
    );
    // Some volumes have 16k extents and more.
    assert!(
        !cfg.large_volumes || runs_done < 64 || total.large_volumes > 0,
        "{total:?}"
    );
    total
}

#[test]
fn protocol_c_keeps_every_acknowledged_write_through_crashes_and_partitions() {
    let cfg = SimConfig::default();
    let _ = runs(1000, 2500, &cfg);
}

#[test]
fn checksum_resync_converges_too() {
    let cfg = SimConfig {
        checksum_resync: true,
        ..SimConfig::default()
    };
    let _ = runs(5000, 500, &cfg);
}

#[test]
fn protocol_a_survivors_hold_a_prefix_and_the_copies_converge() {
    // Protocol A may lose writes acknowledged just before a primary crash (its trade-off)
    // but the survivor holds a prefix of the stream, and the copies converge after every
    // resync.
    let cfg = SimConfig {
        protocol: Protocol::A,
        ..SimConfig::default()
    };
    let _ = runs(9000, 2000, &cfg);
}

#[test]
fn protocol_b_keeps_what_it_acknowledged_while_the_secondary_lives() {
    // B acknowledges on receipt: what it acknowledged survives a primary's crash while the
    // secondary lives; the copies converge after every resync.
    let cfg = SimConfig {
        protocol: Protocol::B,
        ..SimConfig::default()
    };
    let _ = runs(9000, 2000, &cfg);
}

#[test]
fn failovers_crashes_and_resyncs_happen_in_the_runs() {
    let cfg = SimConfig {
        crash_percent: 3,
        partition_percent: 3,
        steps: 2000,
        ..SimConfig::default()
    };
    let mut crashes = 0;
    let mut failovers = 0;
    let mut resyncs = 0;
    for seed in 0..12 {
        let r = run(20_000 + seed, cfg.clone())
            .unwrap_or_else(|e| panic!("{e}\nreplay with TANDEM_SEED={}", 20_000 + seed));
        crashes += r.crashes;
        failovers += r.failovers;
        resyncs += r.resyncs;
    }
    assert!(
        crashes > 5 && failovers > 1 && resyncs > 5,
        "crashes {crashes} failovers {failovers} resyncs {resyncs}"
    );
}

/// Failovers that step the old primary down, while the cluster often cannot record an
/// outdate (no leader) and the link breaks now and then.
fn fencing_trouble() -> SimConfig {
    SimConfig {
        fence_fail_percent: 40,
        fence_latency_ms: 30,
        step_down: true,
        partition_percent: 4,
        ..SimConfig::default()
    }
}

#[test]
fn writes_during_resyncs_complete_while_the_cluster_cannot_fence() {
    // The partition test's stall: after a failover (the old primary stepped down), the
    // new primary reconnects and writes while the cluster log cannot record an outdate
    // (no leader). Every write must still complete once the link is stable, and every
    // resync finish (`heal` fails the run otherwise).
    let cfg = fencing_trouble();
    let total = runs(30_000, 1000, &cfg);
    // Unless one seed is replayed, the runs must have hit what they are about.
    if std::env::var("TANDEM_SEED").is_err() {
        assert!(
            total.fence_failures > 10 && total.step_downs > 2 && total.resyncs > 10,
            "{total:?}"
        );
    }
}

#[test]
fn a_primary_without_quorum_acknowledges_nothing_and_what_it_held_completes_or_fails() {
    // DRBD's on-no-quorum suspend-io: the sim panics on any acknowledgement from a held
    // primary; `heal` fails the run if held I/O never finishes; the end-of-run check
    // proves every write acknowledged after a resume is on the survivor.
    let cfg = SimConfig {
        quorum_loss: true,
        step_down: true,
        partition_percent: 3,
        ..SimConfig::default()
    };
    let total = runs(40_000, 1000, &cfg);
    if std::env::var("TANDEM_SEED").is_err() {
        assert!(
            total.quorum_holds > 100 && total.quorum_resumes > 50 && total.failovers > 10,
            "{total:?}"
        );
    }
}

#[test]
fn regression_seeds_stay_fixed() {
    // Found by the first model (no stalls, pauses, resets or lifecycle actions):
    // 1323: a stale write from the fenced primary, still being applied on the node just
    // promoted, overtook the new primary's acknowledged write to the same block.
    run(1323, SimConfig::first_model()).unwrap_or_else(|e| panic!("{e}"));
    // 31176: after a reconnect the writes waiting for the fencing gate were resent in
    // request-id order, not the order they started; a trim piece (ids of its own) that
    // started before an overlapping write reached the peer after it and zeroed it there.
    let first_fencing_trouble = SimConfig {
        stalls: false,
        pauses: false,
        resets: false,
        lifecycle: false,
        ..fencing_trouble()
    };
    run(31_176, first_fencing_trouble).unwrap_or_else(|e| panic!("{e}"));

    // Found while stalls, pauses, resets, shutdowns, switchovers, verifies, read checks,
    // per-protocol durability and the flush-on-issue disk model joined the mix; each
    // failed on the code before its fix with the model as it was then (the model grew
    // after some of them, so a seed's schedule today may reach its bug differently).
    let protocol = |protocol| SimConfig {
        protocol,
        ..SimConfig::default()
    };
    let quorum = SimConfig {
        quorum_loss: true,
        step_down: true,
        partition_percent: 3,
        ..SimConfig::default()
    };
    let checksum = SimConfig {
        checksum_resync: true,
        ..SimConfig::default()
    };
    let cases: &[(u64, SimConfig, &str)] = &[
        (
            1011,
            SimConfig::default(),
            "a shutdown started writes waiting for room after Stopped",
        ),
        (
            1025,
            SimConfig::default(),
            "a fenced primary's stalled write landed over resync data",
        ),
        (
            40_009,
            quorum.clone(),
            "a resync read ran under a received write still landing",
        ),
        (
            1223,
            SimConfig::default(),
            "a shutdown with a write still landing called itself clean",
        ),
        (
            9018,
            protocol(Protocol::B),
            "a new primary read before the writes it had acknowledged on receipt landed",
        ),
        (
            30_077,
            fencing_trouble(),
            "an aborted resync start pushed the peer's generation out of the history",
        ),
        (
            9019,
            protocol(Protocol::B),
            "a deposed, outdated primary became the new primary's sync source",
        ),
        (
            5113,
            checksum.clone(),
            "a resync checksum read ran under a write still landing",
        ),
        (
            30_147,
            fencing_trouble(),
            "a secondary that lost power became the source for a cleanly stopped primary's writes",
        ),
        (
            1301,
            SimConfig::default(),
            "a resync's end cleared the crash guard of a write still landing",
        ),
        (
            10_002,
            protocol(Protocol::B),
            "a shutdown dropped received writes it had acknowledged on receipt",
        ),
        (
            1570,
            SimConfig::default(),
            "a shutdown kept the connection's resync end, adopted after the disconnect",
        ),
        (
            9590,
            protocol(Protocol::B),
            "a write waiting for a verify range never ran once the verify passed it",
        ),
        (
            5152,
            checksum.clone(),
            "a checksum compare of a lost connection answered 'in sync' on the next one",
        ),
        (
            13_404,
            protocol(Protocol::B),
            "a verify read on the secondary ran under a write still landing (false mismatch)",
        ),
        (
            33_450,
            fencing_trouble(),
            "a volume shutting down swallowed its promotion: the cluster deposed the old primary for it",
        ),
        (
            33_706,
            fencing_trouble(),
            "a crashed primary stopped cleanly before its resync and lost its crash flag",
        ),
        (
            34_947,
            fencing_trouble(),
            "a stale outdate record made a current secondary the target of a crashed primary",
        ),
        (
            14_102,
            protocol(Protocol::B),
            "a deposed crashed primary became the source once its replacement had stopped",
        ),
        (
            46_266,
            quorum.clone(),
            "a new primary crashed and lost a write of the old primary it was still landing",
        ),
        (
            15_751,
            protocol(Protocol::B),
            "a primary cut off again and again pushed its peer's generation out of the history",
        ),
        (
            18_526,
            SimConfig::default(),
            "(the model) a connection made while both nodes stopped outlived them",
        ),
        (
            38_103,
            fencing_trouble(),
            "a primary that stopped with unconfirmed writes became its replacement's source",
        ),
    ];
    for (seed, cfg, what) in cases {
        // Each runs in the mix it was found with (before disks failed in it; the
        // schedules changed once metadata I/O took time).
        let cfg = SimConfig {
            disk_failures: false,
            ..cfg.clone()
        };
        run(*seed, cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // Found once disks failed in the mix: a disk back after a failure took a bitmap
    // resync. (The diskless peer's barrier ack, found at 2479 by an earlier draft of the
    // disk-failure model, is the core test
    // `a_diskless_peers_barrier_ack_does_not_confirm_what_its_failed_disk_held`.)
    let checksum = SimConfig {
        checksum_resync: true,
        ..SimConfig::default()
    };
    for (seed, cfg) in [(15_687, checksum.clone()), (1765, SimConfig::default())] {
        run(seed, cfg).unwrap_or_else(|e| {
            panic!("a disk back after a failure took a bitmap resync and kept stale blocks: {e}")
        });
    }
    run(15_741, checksum.clone()).unwrap_or_else(|e| {
        panic!("a diskless primary acknowledged a write whose only copy was on its dead disk: {e}")
    });

    // Found once metadata went through the real encoders onto a device that takes time,
    // fails with a dead disk and tears writes in a power loss, with a busy process
    // holding its inputs back (each failed on the code before its fix, in this model).
    let ab = [Protocol::A, Protocol::B].map(protocol);
    let cases: Vec<(u64, SimConfig, &str)> = vec![
        (
            1265,
            SimConfig::default(),
            "a diskless primary's write landed on its peer after the link broke, unmarked",
        ),
        (5013, checksum, "(the same, checksum resync)"),
        (9477, ab[0].clone(), "(the same, protocol A)"),
        (9477, ab[1].clone(), "(the same, protocol B)"),
        (
            1034,
            SimConfig::default(),
            "a replacement that lost power before taking the role became the deposed primary's source",
        ),
        (30_410, fencing_trouble(), "(the same, fencing trouble)"),
        (
            1954,
            SimConfig::default(),
            "a crash flag cleared before a flush; the cache then lost a landed write",
        ),
        // Found by the long run (TANDEM_LONG=1) of this model.
        (
            10_161,
            SimConfig::default(),
            "a write landing late cleared the mark of what the peer's failed disk lost",
        ),
        (
            35_151,
            fencing_trouble(),
            "a secondary lost power with a diskless primary's marks still in memory",
        ),
        (
            17_228,
            SimConfig {
                checksum_resync: true,
                ..SimConfig::default()
            },
            "(the model) a deposed primary's flush promised what its replacement acknowledged",
        ),
        (
            18_207,
            ab[0].clone(),
            "(the model) heal called the pair settled with writes queued in a busy process",
        ),
        (
            1008,
            SimConfig::default(),
            "(issue 12, hole 5) a clean shutdown forgot the writes its peer had not confirmed",
        ),
        (
            9319,
            ab[1].clone(),
            "(issue 12, hole 4) protocol B dropped a write it had acknowledged on receipt \
             when the link broke before the write started",
        ),
        (
            9666,
            ab[0].clone(),
            "(issue 12, hole 6) a barrier ack from before the wrap completed a flush waiting \
             on a barrier after it",
        ),
        (
            11_072,
            ab[0].clone(),
            "(the model) a deposed protocol A primary's late acknowledgement raised the floor \
             its replacement's copy had already reset",
        ),
        (
            9230,
            ab[1].clone(),
            "a restarted replica whose cache was lost was promoted before it had synced \
             with its peer, and overwrote a write the peer held",
        ),
        (
            5073,
            SimConfig {
                checksum_resync: true,
                ..SimConfig::default()
            },
            "the metadata device failed after the link: a write confirmed nowhere waited \
             for ever",
        ),
        (
            10_821,
            ab[1].clone(),
            "a disk that failed under a write only its peer got came back with its old \
             metadata, in sync by every record, and kept the stale block",
        ),
    ];
    for (seed, cfg, what) in cases {
        run(seed, cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}
