//! A real network partition: each tandemd runs in its own network namespace, joined by
//! veth pairs on a bridge the test creates (addresses 10.213.N.0/24, private to the test).
//! Taking the primary's link down isolates it: it must stop acknowledging writes, the
//! majority must fence it and promote the other replica, and no acknowledged write may
//! be lost — checked through the epochs, the replicas' roles and the data itself.
//!
//! Needs root and iproute2 (./scripts/test runs as root); fails, never skips, without.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use tandem::cluster::orchestrator::ReplicaRole;
use tandem_tools::demo::{self, DemoCluster, VOLUME, Workload};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (`ip`) must be installed");
    assert!(
        out.status.success(),
        "`ip {}` failed (root needed): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces on one bridge; removed on drop.
struct Net {
    tag: String,
    names: Vec<String>,
}

impl Net {
    fn new(tag: &str, subnet: u8) -> Self {
        let bridge = format!("tb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        let mut names = Vec::new();
        for (i, node) in ["alpha", "beta", "witness"].into_iter().enumerate() {
            let ns = format!("t{tag}{node}");
            let host_end = format!("t{tag}h{i}");
            let ns_end = format!("t{tag}n{i}");
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ]);
            ip(&["link", "set", &ns_end, "netns", &ns]);
            ip(&["link", "set", &host_end, "master", &bridge, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.213.{subnet}.{}/24", i + 1),
                "dev",
                &ns_end,
            ]);
            ip(&["-n", &ns, "link", "set", &ns_end, "up"]);
            names.push(ns);
        }
        Self {
            tag: tag.to_owned(),
            names,
        }
    }

    /// Takes node `i`'s link up or down (from the bridge's side).
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &format!("t{}h{i}", self.tag),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("tb{}", self.tag)])
            .status();
    }
}

fn config(dir: &std::path::Path, subnet: u8, failure_timeout_ms: u64) -> String {
    format!(
        r#"
[cluster]
name = "partition"
secret = "partition-test-secret-0123456789"
heartbeat_ms = 100
failure_timeout_ms = {failure_timeout_ms}
quorum_lease_ms = 500
state_dir = "{d}/{{node}}"
control_socket = "{d}/{{node}}/control.sock"
dlm_socket = "{d}/{{node}}/dlm.sock"

[[node]]
id = 1
name = "alpha"
address = "10.213.{s}.1:7791"
[[node]]
id = 2
name = "beta"
address = "10.213.{s}.2:7791"
[[node]]
id = 3
name = "witness"
address = "10.213.{s}.3:7791"
role = "witness"

[[volume]]
name = "vol0"
size = "32M"
nodes = ["alpha", "beta"]
backing = "{d}/{{node}}/vol0.img"
nbd = "{d}/{{node}}/nbd.sock"
"#,
        d = dir.display(),
        s = subnet
    )
}

/// Three tandemd in their namespaces (alpha, beta, witness) with a failure timeout of
/// `failure_timeout_ms`.
fn start_cluster(failure_timeout_ms: u64) -> (Net, DemoCluster, std::path::PathBuf) {
    let tag = format!("{}", std::process::id() % 10_000);
    let subnet = u8::try_from(std::process::id() % 200 + 20).expect("below 220");
    let net = Net::new(&tag, subnet);
    let dir = std::env::temp_dir().join(format!("tandem-partition-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    let wrappers: BTreeMap<String, Vec<String>> = ["alpha", "beta", "witness"]
        .iter()
        .zip(&net.names)
        .map(|(node, ns)| {
            (
                (*node).to_owned(),
                vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()],
            )
        })
        .collect();
    let tandemd = tandem_testbed::workspace_binary("tandemd").expect("tandemd is built");
    let c = DemoCluster::start_custom(
        &dir,
        &tandemd,
        &config(&dir, subnet, failure_timeout_ms),
        wrappers,
    )
    .expect("the three nodes start");
    (net, c, dir)
}

/// `tandemctl lock part guarded [extra] -- sh -c script` against `node`'s lock manager.
fn lock_command(
    dir: &std::path::Path,
    node: &str,
    extra: &[&str],
    script: &str,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .arg("--socket")
        .arg(dir.join(node).join("dlm.sock"))
        .args(["lock", "part", "guarded", "--grace", "0.2"])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .spawn()
        .expect("tandemctl starts")
}

fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        assert!(
            t.elapsed() < timeout,
            "{what} did not finish in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The replica report of `node` for the volume, as `node` itself sees it.
fn report_of(c: &DemoCluster, node: &str) -> Option<tandem::cluster::orchestrator::ReplicaReport> {
    c.status(node)
        .ok()
        .and_then(|s| s.volumes.into_iter().find(|v| v.name == VOLUME))
        .and_then(|v| v.replicas.into_iter().find(|r| r.node == node))
        .and_then(|r| r.report)
}

#[test]
fn a_short_quorum_loss_suspends_the_primary_and_costs_a_pause_not_an_error() {
    // Lease 500 ms, failure timeout 4 s: a 1.5 s cut makes the primary lose quorum (it
    // must suspend: acknowledge nothing) but is too short for the others to declare it
    // dead. When the link returns, the leader confirms the primary and the held writes
    // complete: the application sees a pause, never an I/O error.
    let (net, c, dir) = start_cluster(4000);
    let old = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let index = if old == "alpha" { 0 } else { 1 };
    let epoch_before = report_of(&c, &old).unwrap().epoch;
    // Like a kernel NBD device (30 s default): the application waits out the pause.
    let workload = Workload::start_with_io_timeout(&c, 1024, 11, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));

    net.link(index, false);
    let cut = Instant::now();
    let acked = || workload.writes.load(std::sync::atomic::Ordering::Relaxed);
    let mut suspended_after = None;
    // Acks counted once the suspension is seen (plus a moment for a reply already on
    // the wire): nothing may be acknowledged after that while it stays suspended.
    let mut baseline = None;
    let mut acked_while_suspended = Vec::new();
    while cut.elapsed() < Duration::from_millis(1500) {
        let r = report_of(&c, &old);
        let suspended = r
            .as_ref()
            .is_some_and(|r| r.role == ReplicaRole::Primary && r.suspended);
        match (suspended, suspended_after, baseline) {
            (true, None, _) => suspended_after = Some(cut.elapsed()),
            (true, Some(at), None) if cut.elapsed() > at + Duration::from_millis(200) => {
                baseline = Some(acked());
            }
            (true, _, Some(base)) if acked() != base => acked_while_suspended.push(acked() - base),
            (false, Some(_), _) => panic!("the primary resumed without quorum: {r:?}"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    net.link(index, true);
    let suspended_after = suspended_after.expect("the primary never suspended without quorum");
    assert!(
        baseline.is_some(),
        "suspended too late to watch it ({suspended_after:?})"
    );
    assert!(
        acked_while_suspended.is_empty(),
        "writes were acknowledged while suspended: {acked_while_suspended:?}"
    );
    // Quorum is back: same primary, same epoch, I/O resumed, writes flowing again.
    let healed = Instant::now();
    let resumed_after = loop {
        let r = report_of(&c, &old);
        if let Some(r) = &r
            && r.role == ReplicaRole::Primary
            && !r.suspended
        {
            assert_eq!(r.epoch, epoch_before, "the primary was replaced: {r:?}");
            break healed.elapsed();
        }
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "the primary did not resume: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let resumed_count = workload.writes.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    while workload.writes.load(std::sync::atomic::Ordering::Relaxed) < resumed_count + 50 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "writes did not flow again after the quorum came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "suspended {suspended_after:?} after the cut; resumed {resumed_after:?} after the heal"
    );
    assert_eq!(c.wait_healthy(Duration::from_secs(60)).unwrap(), old);
    let log = workload.finish();
    assert_eq!(
        log.writes_failed, 0,
        "a quorum blip must not fail application writes"
    );
    let lost = demo::verify(&c, &log.acked).unwrap();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        demo::compare_replicas(&c).unwrap(),
        "replicas differ after the blip"
    );
    drop(c);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_isolated_primary_stops_and_the_majority_takes_over_without_losing_writes() {
    let (net, c, dir) = start_cluster(800);
    let old = c.wait_healthy(Duration::from_secs(60)).unwrap();
    let index = if old == "alpha" { 0 } else { 1 };
    let other = if old == "alpha" { "beta" } else { "alpha" };
    let workload = Workload::start(&c, 1024, 7);
    // A lock user on the old primary: its command stamps the time while it runs.
    let stamps = dir.join("stamps");
    std::fs::create_dir_all(&stamps).unwrap();
    let holder_stamp = stamps.join("holder");
    let mut holder = lock_command(
        &dir,
        &old,
        &[],
        &format!(
            "trap 'exit 143' TERM; while true; do date +%s%N > {f}.tmp; mv {f}.tmp {f}; sleep 0.01; done",
            f = holder_stamp.display()
        ),
    );
    let t = Instant::now();
    while !holder_stamp.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the lock holder never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));

    net.link(index, false);
    let cut = Instant::now();
    // Someone on the majority side wants the same lock.
    let contender_stamp = stamps.join("contender");
    let mut contender = lock_command(
        &dir,
        other,
        &["-w", "60"],
        &format!("date +%s%N > {}", contender_stamp.display()),
    );
    // Watch both sides until the majority has promoted the other replica.
    let mut two_primaries = Vec::new();
    let mut old_suspended_after = None;
    loop {
        let mine = c.status(&old).ok();
        let theirs = c.status(other).ok();
        let role = |s: &Option<tandem::cluster::status::ClusterStatus>, node: &str| {
            s.as_ref()
                .and_then(|s| s.volumes.iter().find(|v| v.name == VOLUME).cloned())
                .and_then(|v| v.replicas.into_iter().find(|r| r.node == node))
                .and_then(|r| r.report)
        };
        let (a, b) = (role(&mine, &old), role(&theirs, other));
        if let (Some(a), Some(b)) = (&a, &b)
            && a.role == ReplicaRole::Primary
            && !a.suspended
            && b.role == ReplicaRole::Primary
            && !b.suspended
            && a.epoch == b.epoch
        {
            two_primaries.push(format!("{a:?} / {b:?}"));
        }
        if old_suspended_after.is_none()
            && a.as_ref()
                .is_some_and(|a| a.suspended || a.role == ReplicaRole::Secondary)
        {
            old_suspended_after = Some(cut.elapsed());
        }
        if b.as_ref()
            .is_some_and(|b| b.role == ReplicaRole::Primary && !b.suspended)
        {
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the majority never promoted {other}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let takeover = cut.elapsed();
    assert!(
        two_primaries.is_empty(),
        "two writable primaries at one epoch: {two_primaries:?}"
    );
    // The lock: the isolated node's holder was stopped (its lock in doubt) before the
    // majority's contender ran with it.
    let holder_status = wait_exit(&mut holder, Duration::from_secs(30), "the lock holder");
    assert_eq!(
        holder_status.code(),
        Some(3),
        "the holder was not told its lock was lost"
    );
    let contender_status = wait_exit(&mut contender, Duration::from_secs(60), "the contender");
    assert!(
        contender_status.success(),
        "the contender never got the lock"
    );
    let stamp = |p: &std::path::Path| -> u128 {
        std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
    };
    let (held_until, taken_at) = (stamp(&holder_stamp), stamp(&contender_stamp));
    assert!(
        held_until < taken_at,
        "the isolated holder still ran at {held_until} after the contender got the lock at {taken_at}"
    );
    eprintln!(
        "lock holder stopped {} ms before the contender got the lock",
        (taken_at - held_until) / 1_000_000
    );
    let suspended = old_suspended_after.expect("the isolated primary never stopped");
    eprintln!("isolated primary stopped after {suspended:?}; {other} took over after {takeover:?}");
    let status = c.status(other).unwrap();
    let volume = status.volumes.iter().find(|v| v.name == VOLUME).unwrap();
    assert_eq!(volume.primary.as_deref(), Some(other));
    assert!(
        status.fencing.iter().any(|f| f.volume == VOLUME),
        "no fencing recorded: {:?}",
        status.fencing
    );
    // The isolated side has no quorum and says so.
    assert!(!c.status(&old).unwrap().quorate);
    std::thread::sleep(Duration::from_secs(2));

    // Heal: the old primary rejoins as a new life, stays secondary and resyncs.
    net.link(index, true);
    let primary = c.wait_healthy(Duration::from_secs(90)).unwrap();
    assert_eq!(primary, other);
    let log = workload.finish();
    let lost = demo::verify(&c, &log.acked).unwrap();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost across the partition: {lost:?}"
    );
    assert!(
        demo::compare_replicas(&c).unwrap(),
        "replicas differ after the partition healed"
    );
    // The ex-primary's lock manager restarted with its new life and serves locks again,
    // in the same lock space as the others.
    // (A client that reaches the old life's lock manager while it restarts is told
    // `evicted` and tries again, as an application would.)
    for node in [old.as_str(), other] {
        let started = Instant::now();
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_tandemctl"))
                .arg("--socket")
                .arg(dir.join(node).join("dlm.sock"))
                .args([
                    "lock",
                    "-w",
                    "30",
                    "after-heal",
                    "res",
                    "--mode",
                    "ex",
                    "--",
                    "true",
                ])
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tandemctl lock on {node} after the heal: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(c);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
