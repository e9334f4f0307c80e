//! Multi-process cluster tests: three `tandemd` processes on 127.0.0.1-3 (two data
//! nodes, a witness), a file-backed replicated volume, a checksummed write workload over
//! NBD, and real SIGKILLs. Every test ends by reading back every acknowledged write.

use std::time::Duration;
use tandem_tools::demo::{self, DemoCluster, VOLUME, Workload};

fn cluster(test: &str, offset: u16) -> DemoCluster {
    let tandemd = tandem_testbed::workspace_binary("tandemd").expect("tandemd is built");
    let dir = std::env::temp_dir().join(format!("tandem-mp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    DemoCluster::start_with_port_offset(&dir, &tandemd, offset).expect("cluster starts")
}

fn scrape(address: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut page = String::new();
    stream.read_to_string(&mut page).expect("response");
    page
}

fn primary_of(cluster: &DemoCluster) -> Option<String> {
    cluster
        .any_status(None)?
        .volumes
        .into_iter()
        .find(|v| v.name == VOLUME)?
        .primary
}

#[test]
fn sigkill_of_the_primary_under_load_loses_no_acknowledged_write() {
    let mut c = cluster("kill", 100);
    let primary = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let workload = Workload::start(&c, 2048, 1);
    std::thread::sleep(Duration::from_secs(2));
    let timeline = demo::fail_over(&mut c, &workload, &primary).unwrap();
    let failover = timeline.failover_ms().expect("the survivor served writes");
    eprintln!("failover: {timeline:?} ({failover} ms)");
    assert!(
        timeline.fenced_ms.is_some() && timeline.promoted_ms.is_some(),
        "{timeline:?}"
    );
    assert!(
        timeline.fenced_ms <= timeline.promoted_ms,
        "promoted before the fencing was recorded: {timeline:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    c.start_node(&primary).unwrap();
    c.wait_healthy(Duration::from_secs(90)).unwrap();
    assert_ne!(
        primary_of(&c).as_deref(),
        Some(primary.as_str()),
        "the old primary came back as primary"
    );
    let log = workload.finish();
    assert!(
        log.writes_acked > 100,
        "the workload barely ran: {}",
        log.writes_acked
    );
    let lost = demo::verify(&c, &log.acked).unwrap();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        demo::compare_replicas(&c).unwrap(),
        "replicas differ after resync"
    );
    // The fencing is in the cluster log, for the record.
    let status = c.any_status(None).unwrap();
    assert_eq!(status.failovers, 1);
    assert_eq!(status.fencing.len(), 1);
}

#[test]
fn losing_the_witness_does_not_interrupt_the_data() {
    let mut c = cluster("witness", 200);
    let primary = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let workload = Workload::start(&c, 1024, 2);
    std::thread::sleep(Duration::from_millis(500));
    c.kill("witness").unwrap();
    let before = workload.writes.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    let after = workload.writes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        after > before + 50,
        "writes stalled without the witness: {before} -> {after}"
    );
    assert_eq!(primary_of(&c).as_deref(), Some(primary.as_str()));
    let status = c.status(&primary).unwrap();
    assert!(status.quorate, "two of three nodes are a majority");
    assert_eq!(status.failovers, 0);
    // The primary's Prometheus endpoint counts the acknowledged writes' latency.
    let metrics_address = c.config.node_by_name(&primary).unwrap().metrics.unwrap();
    let page = scrape(metrics_address);
    let count_line = page
        .lines()
        .find(|l| l.starts_with("tandem_write_latency_seconds_count{"))
        .unwrap_or_else(|| panic!("no write latency histogram in:\n{page}"));
    let counted: u64 = count_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(counted > 50, "{count_line}");
    assert!(page.contains("tandem_quorate{"), "{page}");
    let log = workload.finish();
    assert_eq!(
        log.writes_failed, 0,
        "no write may fail when only the witness goes"
    );
    assert!(demo::verify(&c, &log.acked).unwrap().is_empty());
}

#[test]
fn after_both_data_nodes_restart_the_newest_data_wins() {
    let mut c = cluster("restart", 300);
    let first = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let second = if first == "alpha" { "beta" } else { "alpha" }.to_owned();
    let workload = Workload::start(&c, 1024, 3);
    std::thread::sleep(Duration::from_secs(1));
    // The secondary dies; the primary records it Outdated and writes on alone.
    c.kill(&second).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let log = workload.finish();
    let alone = log
        .ack_times
        .iter()
        .filter(|t| **t > log.ack_times.first().copied().unwrap_or(0) + 1000)
        .count();
    assert!(
        alone > 50,
        "the primary did not go on writing alone ({alone} writes)"
    );
    // Now the primary dies too: the only copy of the newest data is on it.
    c.kill(&first).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The stale node comes back first: it must not be promoted (it would silently lose
    // the newest writes).
    c.start_node(&second).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(primary_of(&c), None, "the Outdated node was promoted");
    let status = c.any_status(None).unwrap();
    let record = status.volumes.iter().find(|v| v.name == VOLUME).unwrap();
    assert!(
        record
            .replicas
            .iter()
            .any(|r| r.node == second && r.outdated),
        "{record:?}"
    );
    // The node with the newest data returns: it becomes primary, the other resyncs.
    c.start_node(&first).unwrap();
    let primary = c.wait_healthy(Duration::from_secs(90)).unwrap();
    assert_eq!(primary, first);
    let lost = demo::verify(&c, &log.acked).unwrap();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(demo::compare_replicas(&c).unwrap());
}

/// The primary's node as `status` says it has taken over (promoted, not suspended).
fn serving_primary(c: &DemoCluster, except: &str) -> Option<String> {
    let status = c.any_status(Some(except))?;
    let volume = status.volumes.into_iter().find(|v| v.name == VOLUME)?;
    let primary = volume.primary?;
    let serving = volume.replicas.iter().any(|r| {
        r.node == primary
            && r.report.as_ref().is_some_and(|rep| {
                rep.role == tandem::cluster::orchestrator::ReplicaRole::Primary && !rep.suspended
            })
    });
    (serving && primary != except).then_some(primary)
}

#[test]
fn a_primary_paused_past_its_lease_serves_no_stale_read_when_it_resumes() {
    use nix::sys::signal::Signal;
    use tandem_tools::nbd_client::NbdClient;
    let c = cluster("pause", 400);
    let old = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let io_timeout = Duration::from_secs(30);
    let mut held = NbdClient::connect(&c.nbd_address(&old).unwrap(), io_timeout).unwrap();
    let before = vec![b'O'; 4096];
    held.write(0, &before, true).unwrap();
    assert_eq!(held.read(0, 4096).unwrap(), before);

    // Stop the primary for three failure timeouts; the others replace it.
    let failure_timeout = Duration::from_millis(c.config.cluster.failure_timeout_ms);
    c.signal(&old, Signal::SIGSTOP).unwrap();
    let stopped = std::time::Instant::now();
    let new = loop {
        if let Some(p) = serving_primary(&c, &old) {
            break p;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "nobody replaced the stopped primary"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut fresh = NbdClient::connect(&c.nbd_address(&new).unwrap(), io_timeout).unwrap();
    let after = vec![b'N'; 4096];
    fresh.write(0, &after, true).unwrap();
    if let Some(left) = (failure_timeout * 3).checked_sub(stopped.elapsed()) {
        std::thread::sleep(left);
    }

    // Resumed, the old primary must not answer from its old copy.
    c.signal(&old, Signal::SIGCONT).unwrap();
    match held.read(0, 4096) {
        Ok(data) => assert_eq!(
            data, after,
            "the resumed old primary served a stale read (block 0 was rewritten through {new})"
        ),
        Err(e) => eprintln!("the held connection's read failed, as it may: {e}"),
    }
    // And the new primary still has it.
    assert_eq!(fresh.read(0, 4096).unwrap(), after);
}

#[test]
fn a_degraded_primary_restarted_under_load_is_primary_again_and_loses_nothing() {
    use std::sync::atomic::Ordering;
    let mut c = cluster("degraded", 500);
    let primary = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let peer = ["alpha", "beta"]
        .into_iter()
        .find(|n| *n != primary)
        .unwrap();
    c.kill(peer).unwrap();
    let workload = Workload::start(&c, 2048, 7);
    // The primary goes on alone (its peer recorded Outdated) under a steady load.
    let started = std::time::Instant::now();
    while workload.writes.load(Ordering::Relaxed) < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the primary did not go on alone"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A routine restart of the only good copy, writes in flight.
    assert!(
        c.terminate(&primary, Duration::from_secs(20)).unwrap(),
        "tandemd did not stop on SIGTERM"
    );
    c.start_node(&primary).unwrap();
    let restarted = std::time::Instant::now();
    let before = workload.writes.load(Ordering::Relaxed);
    while workload.writes.load(Ordering::Relaxed) < before + 50 {
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "{primary} was not primary again 15 s after its restart: {:?}",
            c.status(&primary).ok().map(|s| s.volumes)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "serving again {} ms after the restart",
        restarted.elapsed().as_millis()
    );
    let log = workload.finish();
    let problems = demo::verify(&c, &log.acked).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}
