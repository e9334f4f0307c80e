//! Three `tandem-dlmd` processes on 127.0.0.1-3, clients hammering shared resources
//! through the unix-socket API, SIGKILL of the node mastering the hottest resource, the
//! test confirming its fencing; then: no two incompatible locks were ever held at the
//! same time (intervals measured by the clients, all in this process), and every request
//! of the surviving clients completed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_dlm::Mode;
use tandem_dlm::shell::SocketClient;
use tandem_dlm::shell::socket::Op;

const RESOURCES: [&str; 3] = ["hot0", "hot1", "hot2"];

struct Proc {
    id: u32,
    child: Child,
    socket: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn start(id: u32, addrs: &BTreeMap<u32, String>, dir: &Path) -> Proc {
    let socket = dir.join(format!("dlm-{id}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-dlmd"));
    cmd.arg("--id")
        .arg(id.to_string())
        .arg("--listen")
        .arg(&addrs[&id])
        .arg("--socket")
        .arg(&socket)
        .arg("--suspect-ms")
        .arg("600")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("node-{id}.log"))).unwrap(),
        ));
    for (p, a) in addrs {
        if *p != id {
            cmd.arg("--peer").arg(format!("{p}={a}"));
        }
    }
    Proc {
        id,
        child: cmd.spawn().unwrap(),
        socket,
    }
}

async fn status(socket: &Path) -> Option<tandem_dlm::shell::NodeStatus> {
    let mut c = SocketClient::connect(socket).await.ok()?;
    c.call(Op::Status).await.ok()?.node
}

async fn wait_running(
    socket: &Path,
    members: usize,
    deadline: Duration,
) -> tandem_dlm::shell::NodeStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = status(socket).await
            && s.state == "running"
            && s.members.len() == members
        {
            return s;
        }
        assert!(
            t0.elapsed() < deadline,
            "{} not running with {members} members after {deadline:?}: {:?}",
            socket.display(),
            status(socket).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One hold of a mode on a resource, as a client saw it.
#[derive(Debug, Clone)]
struct Hold {
    resource: &'static str,
    mode: Mode,
    from: Instant,
    to: Instant,
    who: String,
}

#[derive(Default)]
struct Log {
    holds: Vec<Hold>,
    requests: u64,
    completed: u64,
    failed_connections: u64,
    max_wait: Duration,
}

const MODES: [Mode; 6] = [Mode::NL, Mode::CR, Mode::CW, Mode::PR, Mode::PW, Mode::EX];

async fn hammer(socket: PathBuf, who: String, log: Arc<Mutex<Log>>, stop: Instant, seed: u64) {
    let Ok(mut c) = SocketClient::connect(&socket).await else {
        log.lock().unwrap().failed_connections += 1;
        return;
    };
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while Instant::now() < stop {
        let resource = RESOURCES[usize::try_from(next() % 3).unwrap()];
        let mode = MODES[usize::try_from(next() % 6).unwrap()];
        let t_req = Instant::now();
        log.lock().unwrap().requests += 1;
        let r = match c
            .call(Op::Lock {
                lockspace: "mp".into(),
                name: resource.into(),
                mode: mode.name().into(),
                flags: vec![],
            })
            .await
        {
            Ok(r) => r,
            Err(_) => {
                log.lock().unwrap().failed_connections += 1;
                return;
            }
        };
        let granted_at = Instant::now();
        assert_eq!(r.status.as_deref(), Some("granted"), "{who}: {r:?}");
        let lock = r.lock.unwrap();
        {
            let mut l = log.lock().unwrap();
            l.completed += 1;
            l.max_wait = l.max_wait.max(granted_at - t_req);
        }
        tokio::time::sleep(Duration::from_micros(next() % 2000)).await;
        let mut held = mode;
        let mut from = granted_at;
        if next() % 3 == 0 {
            let to = MODES[usize::try_from(next() % 6).unwrap()];
            let sent = Instant::now();
            log.lock().unwrap().holds.push(Hold {
                resource,
                mode: held,
                from,
                to: sent,
                who: who.clone(),
            });
            log.lock().unwrap().requests += 1;
            let r = match c
                .call(Op::Convert {
                    lock,
                    mode: to.name().into(),
                    flags: vec![],
                    lvb: None,
                })
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    log.lock().unwrap().failed_connections += 1;
                    return;
                }
            };
            let done = Instant::now();
            log.lock().unwrap().completed += 1;
            // While it waited the lock counted as the meet of both modes.
            log.lock().unwrap().holds.push(Hold {
                resource,
                mode: held.meet(to),
                from: sent,
                to: done,
                who: who.clone(),
            });
            if r.status.as_deref() == Some("granted") {
                held = to;
            } else {
                assert_eq!(r.status.as_deref(), Some("deadlock"), "{who}: {r:?}");
            }
            from = done;
            tokio::time::sleep(Duration::from_micros(next() % 1000)).await;
        }
        let released = Instant::now();
        log.lock().unwrap().holds.push(Hold {
            resource,
            mode: held,
            from,
            to: released,
            who: who.clone(),
        });
        log.lock().unwrap().requests += 1;
        match c.call(Op::Unlock { lock, lvb: None }).await {
            Ok(r) => {
                assert_eq!(r.status.as_deref(), Some("unlocked"), "{who}: {r:?}");
                log.lock().unwrap().completed += 1;
            }
            Err(_) => {
                log.lock().unwrap().failed_connections += 1;
                return;
            }
        }
    }
}

fn check_holds(holds: &[Hold]) -> usize {
    // Per resource, sorted by start: each hold only meets those starting before it ends.
    let mut sorted: Vec<&Hold> = holds.iter().collect();
    sorted.sort_by_key(|h| (h.resource, h.from));
    let mut checked = 0;
    for (i, a) in sorted.iter().enumerate() {
        for b in &sorted[i + 1..] {
            if b.resource != a.resource || b.from >= a.to {
                break;
            }
            if a.who == b.who {
                continue;
            }
            checked += 1;
            assert!(
                a.mode.is_compatible(b.mode),
                "incompatible holds on {}: {} {} {:?}..{:?} and {} {} {:?}..{:?}",
                a.resource,
                a.who,
                a.mode,
                a.from,
                a.to,
                b.who,
                b.mode,
                b.from,
                b.to
            );
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_sigkill_of_the_hot_master() {
    let dir = std::env::temp_dir().join(format!("tandem-dlm-mp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut addrs = BTreeMap::new();
    for id in 1..=3u32 {
        let ip = format!("127.0.0.{id}");
        addrs.insert(id, format!("{ip}:{}", free_port(&ip)));
    }
    let mut procs: Vec<Proc> = (1..=3).map(|id| start(id, &addrs, &dir)).collect();
    let mut incarnations = BTreeMap::new();
    for p in &procs {
        let s = wait_running(&p.socket, 3, Duration::from_secs(20)).await;
        incarnations.insert(p.id, s.incarnation);
    }

    let log = Arc::new(Mutex::new(Log::default()));
    let warmup = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    let mut seed = 1;
    for p in &procs {
        for c in 0..4 {
            seed += 7919;
            tasks.push((
                p.id,
                tokio::spawn(hammer(
                    p.socket.clone(),
                    format!("n{}c{c}", p.id),
                    log.clone(),
                    warmup + Duration::from_secs(6),
                    seed,
                )),
            ));
        }
    }
    tokio::time::sleep_until(warmup.into()).await;

    // The master of the hottest resource.
    let mut best = (0, 0);
    for p in &procs {
        if let Some(s) = status(&p.socket).await {
            let n = s.mastered.len() + s.mastered.iter().filter(|l| l.name == "hot0").count() * 10;
            if n >= best.1 {
                best = (p.id, n);
            }
        }
    }
    let victim = best.0;
    let victim_status = status(&procs[usize::try_from(victim - 1).unwrap()].socket)
        .await
        .unwrap();
    eprintln!(
        "killing node {victim} (masters {:?})",
        victim_status
            .mastered
            .iter()
            .map(|l| l.name.clone())
            .collect::<std::collections::BTreeSet<_>>()
    );
    let killed_at = Instant::now();
    let idx = procs.iter().position(|p| p.id == victim).unwrap();
    let mut dead = procs.remove(idx);
    dead.child.kill().unwrap(); // SIGKILL
    dead.child.wait().unwrap();

    // Play the fencer once the survivors wait for it.
    for p in &procs {
        let t0 = Instant::now();
        loop {
            let s = status(&p.socket).await.unwrap();
            if s.unfenced.contains(&victim)
                || (s.state == "running" && !s.members.contains(&victim))
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "node {} never noticed the kill: {s:?}",
                p.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let detected = killed_at.elapsed();
    for p in &procs {
        let mut c = SocketClient::connect(&p.socket).await.unwrap();
        c.call(Op::FenceConfirm {
            node: victim,
            incarnation: incarnations[&victim],
        })
        .await
        .unwrap();
    }
    for p in &procs {
        wait_running(&p.socket, 2, Duration::from_secs(10)).await;
    }
    let recovered = killed_at.elapsed();
    eprintln!("failure detected after {detected:?}, recovered {recovered:?} after the kill");

    // Every surviving client's requests complete.
    for (node, t) in tasks {
        let r = tokio::time::timeout(Duration::from_secs(30), t).await;
        assert!(r.is_ok(), "a client of node {node} is stuck");
        r.unwrap().unwrap();
    }
    let log = Arc::try_unwrap(log).ok().unwrap().into_inner().unwrap();
    let checked = check_holds(&log.holds);
    eprintln!(
        "{} requests, {} completed, {} holds, {} overlapping pairs (all compatible), {} client connections lost (on the killed node), longest wait {:?}",
        log.requests,
        log.completed,
        log.holds.len(),
        checked,
        log.failed_connections,
        log.max_wait
    );
    assert!(log.completed > 200, "too little traffic");
    assert!(
        log.failed_connections <= 4,
        "only the killed node's clients may fail"
    );
    // Nothing is left locked; both survivors agree on the membership.
    let mut epochs = Vec::new();
    for p in &procs {
        let s = status(&p.socket).await.unwrap();
        assert!(
            s.owned.is_empty(),
            "node {} still has locks: {:?}",
            p.id,
            s.owned
        );
        assert!(!s.members.contains(&victim));
        epochs.push(s.epoch);
    }
    assert!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "epochs differ: {epochs:?}"
    );

    // The victim restarts (a new incarnation), rejoins, and all three serve again.
    drop(dead);
    procs.push(start(victim, &addrs, &dir));
    let t0 = Instant::now();
    let mut statuses = Vec::new();
    for p in &procs {
        statuses.push(wait_running(&p.socket, 3, Duration::from_secs(20)).await);
    }
    eprintln!("node {victim} rejoined in {:?}", t0.elapsed());
    let rejoined = statuses.iter().find(|s| s.node == victim).unwrap();
    assert_ne!(
        rejoined.incarnation, incarnations[&victim],
        "same incarnation after a restart"
    );
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Instant::now() + Duration::from_millis(2000);
    let mut tasks = Vec::new();
    for p in &procs {
        for c in 0..3 {
            seed += 7919;
            tasks.push(tokio::spawn(hammer(
                p.socket.clone(),
                format!("n{}c{c}", p.id),
                log.clone(),
                stop,
                seed,
            )));
        }
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a client is stuck after the rejoin")
            .unwrap();
    }
    let log = Arc::try_unwrap(log).ok().unwrap().into_inner().unwrap();
    check_holds(&log.holds);
    assert_eq!(log.failed_connections, 0);
    assert!(log.completed > 100, "too little traffic after the rejoin");
    let mut epochs = Vec::new();
    for p in &procs {
        let s = status(&p.socket).await.unwrap();
        assert!(
            s.owned.is_empty(),
            "node {} still has locks: {:?}",
            p.id,
            s.owned
        );
        epochs.push(s.epoch);
    }
    assert!(
        epochs.windows(2).all(|w| w[0] == w[1]),
        "epochs differ after the rejoin: {epochs:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
