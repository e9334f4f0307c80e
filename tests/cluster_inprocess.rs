//! The cluster layer in one process: three nodes (two data nodes with modelled replicas and
//! a witness) on 127.0.0.1, real openraft log on disk, real authenticated TCP transport.
//! The data path is not involved (see the multi-process tests for that); these check
//! membership, quorum, promotion, failover and switchover decisions end to end.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::cluster::config::Config;
use tandem::cluster::control::{self, Request};
use tandem::cluster::node::{Node, NodeOptions};
use tandem::cluster::orchestrator::{DiskState, ReplicaRole};
use tandem::cluster::volume::{MemoryDriver, VolumeDriver};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[cluster]
name = "inproc"
secret = "0123456789abcdef-inproc"
heartbeat_ms = 50
failure_timeout_ms = 400
quorum_lease_ms = 250
state_dir = "{dir}/{{node}}"
control_socket = "{dir}/{{node}}.sock"

[[node]]
id = 1
name = "alpha"
address = "127.0.0.1:{a}"
[[node]]
id = 2
name = "beta"
address = "127.0.0.1:{b}"
[[node]]
id = 3
name = "witness"
address = "127.0.0.1:{w}"
role = "witness"

[[volume]]
name = "vol0"
size = "16M"
nodes = ["alpha", "beta"]
backing = "{dir}/{{node}}/vol0.img"
"#,
        dir = dir.display(),
        a = free_port(),
        b = free_port(),
        w = free_port()
    );
    Config::parse("inproc.toml", &text).unwrap()
}

async fn start(config: &Config, name: &str, driver: Option<&MemoryDriver>) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut drivers: BTreeMap<String, Arc<dyn VolumeDriver>> = BTreeMap::new();
    if let Some(d) = driver {
        drivers.insert("vol0".into(), Arc::new(d.clone()));
    }
    let node = Node::start(NodeOptions {
        config: config.clone(),
        node: name.into(),
        drivers,
        fencer: None,
    })
    .await
    .unwrap();
    let path = config.control_socket(name);
    tokio::spawn(control::serve(node.clone(), path));
    node
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn primary(node: &Node) -> Option<tandem::cluster::NodeId> {
    node.state().volumes.get("vol0").and_then(|v| v.primary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_promote_fail_over_and_switch_over() {
    let dir = std::env::temp_dir().join(format!("tandem-inproc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = config(&dir);
    let (da, db) = (MemoryDriver::up_to_date(), MemoryDriver::up_to_date());
    let alpha = start(&config, "alpha", Some(&da)).await;
    let beta = start(&config, "beta", Some(&db)).await;
    let witness = start(&config, "witness", None).await;

    // The first replica in configuration order becomes primary, and its replica is promoted.
    wait_until("alpha primary", Duration::from_secs(10), || {
        primary(&witness) == Some(alpha.id())
    })
    .await;
    wait_until("alpha's replica promoted", Duration::from_secs(5), || {
        da.report().role == ReplicaRole::Primary
    })
    .await;
    assert_eq!(db.report().role, ReplicaRole::Secondary);
    let epoch_before = alpha.state().volumes["vol0"].epoch;

    // The status (through the real control socket) shows the whole picture.
    let reply = control::request(&config.control_socket("beta"), &Request::Status).unwrap();
    assert!(reply.ok, "{reply:?}");
    let status = reply.result.unwrap();
    assert_eq!(status["volumes"][0]["primary"], "alpha");
    assert_eq!(status["quorate"], true);

    // Bad control input is refused with a reason; the daemon carries on.
    let reply = control::request(
        &config.control_socket("beta"),
        &Request::Switchover {
            volume: "nope".into(),
            to: None,
        },
    )
    .unwrap();
    assert!(!reply.ok && reply.error.unwrap().contains("unknown volume"));
    let reply = control::request(
        &config.control_socket("beta"),
        &Request::Switchover {
            volume: "vol0".into(),
            to: Some("gamma".into()),
        },
    )
    .unwrap();
    assert!(!reply.ok && reply.error.unwrap().contains("unknown node"));

    // If beta joined after alpha's promotion it was marked Outdated (it missed nothing,
    // but the log cannot know): alpha's replica seeing it in sync clears that.
    wait_until("beta not outdated", Duration::from_secs(10), || {
        da.peer_resynced();
        !witness.state().volumes["vol0"]
            .outdated
            .contains(&beta.id())
    })
    .await;
    // Planned switchover: alpha demotes, beta is promoted, no fencing.
    let reply = tokio::task::spawn_blocking({
        let path = config.control_socket("witness");
        move || {
            control::request(
                &path,
                &Request::Switchover {
                    volume: "vol0".into(),
                    to: Some("beta".into()),
                },
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.result.unwrap()["primary"], "beta");
    wait_until("beta's replica promoted", Duration::from_secs(5), || {
        db.report().role == ReplicaRole::Primary
    })
    .await;
    wait_until("alpha's replica demoted", Duration::from_secs(5), || {
        da.report().role == ReplicaRole::Secondary
    })
    .await;
    assert!(
        alpha.state().fencing.is_empty(),
        "a switchover fences nobody"
    );
    assert!(alpha.state().volumes["vol0"].epoch > epoch_before);

    // Crash of the primary: the survivor fences (epoch) and is promoted.
    beta.halt().await;
    let crashed = Instant::now();
    wait_until("alpha primary again", Duration::from_secs(10), || {
        primary(&witness) == Some(alpha.id())
    })
    .await;
    wait_until("alpha's replica promoted", Duration::from_secs(5), || {
        da.report().role == ReplicaRole::Primary
    })
    .await;
    let failover = crashed.elapsed();
    let state = witness.state();
    let fence = state.fencing.back().expect("a fencing record");
    assert_eq!(fence.victim, beta.id());
    assert_eq!(fence.by, alpha.id());
    assert!(
        state.volumes["vol0"].outdated.contains(&beta.id()),
        "the lost primary must resync"
    );
    assert_eq!(state.failovers, 1);
    eprintln!("failover (crash to survivor promoted): {failover:?}");

    // The old primary comes back as a new life: it stays secondary.
    let db2 = MemoryDriver::up_to_date();
    db2.update(|r| r.disk = DiskState::Outdated);
    let beta2 = start(&config, "beta", Some(&db2)).await;
    assert!(beta2.incarnation() > beta.incarnation());
    wait_until("beta rejoined", Duration::from_secs(10), || {
        witness.state().is_up(beta2.id())
            && witness.state().members[&beta2.id()].incarnation == beta2.incarnation()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(primary(&witness), Some(alpha.id()));
    assert_eq!(db2.report().role, ReplicaRole::Secondary);
    // An Outdated node is refused as a switchover target.
    let reply = tokio::task::spawn_blocking({
        let path = config.control_socket("alpha");
        move || {
            control::request(
                &path,
                &Request::Switchover {
                    volume: "vol0".into(),
                    to: Some("beta".into()),
                },
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!reply.ok);
    assert!(
        reply
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not UpToDate"),
        "{reply:?}"
    );

    for n in [&alpha, &beta2, &witness] {
        n.halt().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_the_majority_suspends() {
    let dir = std::env::temp_dir().join(format!("tandem-inproc-q-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = config(&dir);
    let (da, db) = (MemoryDriver::up_to_date(), MemoryDriver::up_to_date());
    let alpha = start(&config, "alpha", Some(&da)).await;
    let beta = start(&config, "beta", Some(&db)).await;
    let witness = start(&config, "witness", None).await;
    wait_until("alpha promoted", Duration::from_secs(10), || {
        da.report().role == ReplicaRole::Primary
    })
    .await;
    // The majority disappears: alpha must stop acknowledging writes within its lease.
    beta.halt().await;
    witness.halt().await;
    let took = wait_until("alpha suspended", Duration::from_secs(5), || {
        da.report().suspended
    })
    .await;
    // A generous bound for loaded CI machines; without the lease it would never suspend.
    assert!(
        took < Duration::from_secs(2),
        "suspended after {took:?}; the lease is 250 ms"
    );
    alpha.halt().await;
    let _ = std::fs::remove_dir_all(&dir);
}
