//! `tandem-dlm-bench`: lock manager benchmarks, printed side by side.
//!
//! ```text
//! tandem-dlm-bench all                 local, remote latency vs TCP ping-pong, throughput
//! tandem-dlm-bench local  [--ops N]    lock+unlock of one resource mastered here
//! tandem-dlm-bench remote [--ops N]    lock+unlock of a resource mastered by another node
//! tandem-dlm-bench throughput [--clients C] [--secs S]
//! tandem-dlm-bench kernel [--ops N]    the same local workload on the kernel DLM (libdlm;
//!                                      needs root, dlm_controld and corosync running)
//! ```
//! Each "op" is one lock+unlock pair (EX). Remote unlocks do not wait for the master (the
//! release counts when asked), so a remote pair costs one round trip.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tandem_dlm::core::{Config, Dlm, Event, NodeState};
use tandem_dlm::shell::socket::Op;
use tandem_dlm::shell::{LockClient, Node, NodeConfig, SocketClient};
use tandem_dlm::{ClientId, Epoch, Flags, Incarnation, Mode, NodeId, ResourceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(unsafe_code)]
mod libdlm;

#[derive(Debug, Parser)]
#[command(name = "tandem-dlm-bench", about)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Everything but the kernel DLM.
    All {
        #[arg(long, default_value_t = 200_000)]
        ops: u64,
    },
    /// Local lock+unlock.
    Local {
        #[arg(long, default_value_t = 1_000_000)]
        ops: u64,
    },
    /// Remote lock+unlock latency against a TCP ping-pong.
    Remote {
        #[arg(long, default_value_t = 20_000)]
        ops: u64,
    },
    /// Remote lock+unlock throughput with many clients.
    Throughput {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// The kernel DLM through libdlm, one node.
    Kernel {
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
    },
}

fn rate(ops: u64, took: Duration) -> f64 {
    ops as f64 / took.as_secs_f64()
}

/// The core alone: events in, actions out, no I/O.
fn core_local(ops: u64) -> f64 {
    let mut d = Dlm::new(NodeId(1), Incarnation(1), Config::default());
    let members: BTreeMap<NodeId, Incarnation> = [(NodeId(1), Incarnation(1))].into();
    d.step(Event::Membership {
        epoch: Epoch(1),
        members,
    });
    let resource = ResourceKey::new("bench", b"r").unwrap_or_else(|_| unreachable!());
    let client = ClientId(1);
    let mut out = Vec::with_capacity(8);
    let t0 = Instant::now();
    for _ in 0..ops {
        let lock = d.allocate_lock_id();
        d.step_append(
            Event::Lock {
                client,
                lock,
                resource: resource.clone(),
                mode: Mode::EX,
                flags: Flags::NONE,
            },
            &mut out,
        );
        d.step_append(
            Event::Unlock {
                client,
                lock,
                lvb: None,
            },
            &mut out,
        );
        out.clear();
    }
    rate(ops, t0.elapsed())
}

async fn single_node(socket: Option<std::path::PathBuf>) -> anyhow::Result<Node> {
    let node = Node::start(NodeConfig {
        node: NodeId(1),
        incarnation: Incarnation(1),
        listen: None,
        peers: BTreeMap::new(),
        socket,
        socket_admin: false,
        core: Config::default(),
    })
    .await?;
    node.membership(Epoch(1), [(NodeId(1), Incarnation(1))].into());
    Ok(node)
}

async fn api_local(ops: u64) -> anyhow::Result<f64> {
    let node = single_node(None).await?;
    let client = node.client();
    let t0 = Instant::now();
    for _ in 0..ops {
        let g = client.lock("bench", b"r", Mode::EX, Flags::NONE).await?;
        client.unlock(g.lock, None)?;
    }
    Ok(rate(ops, t0.elapsed()))
}

async fn socket_local(ops: u64) -> anyhow::Result<f64> {
    let path = std::env::temp_dir().join(format!("tandem-dlm-bench-{}.sock", std::process::id()));
    let node = single_node(Some(path.clone())).await?;
    let mut c = SocketClient::connect(&path).await?;
    let t0 = Instant::now();
    for _ in 0..ops {
        let r = c
            .call(Op::Lock {
                lockspace: "bench".into(),
                name: "r".into(),
                mode: "ex".into(),
                flags: vec![],
            })
            .await?;
        let lock = r.lock.context("no lock")?;
        c.call(Op::Unlock { lock, lvb: None }).await?;
    }
    let r = rate(ops, t0.elapsed());
    drop(node);
    Ok(r)
}

fn free_addr(ip: &str) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    Ok(l.local_addr()?)
}

/// Two nodes on 127.0.0.1 and 127.0.0.2, running.
async fn two_nodes() -> anyhow::Result<(Node, Node)> {
    let a1 = free_addr("127.0.0.1")?;
    let a2 = free_addr("127.0.0.2")?;
    let peers: BTreeMap<NodeId, SocketAddr> = [(NodeId(1), a1), (NodeId(2), a2)].into();
    let mk = |id: u32, listen: SocketAddr| NodeConfig {
        node: NodeId(id),
        incarnation: Incarnation(u64::from(id)),
        listen: Some(listen),
        peers: peers.clone(),
        socket: None,
        socket_admin: false,
        core: Config { toss_ms: 600_000 },
    };
    let n1 = Node::start(mk(1, a1)).await?;
    let n2 = Node::start(mk(2, a2)).await?;
    let members: BTreeMap<NodeId, Incarnation> =
        [(NodeId(1), Incarnation(1)), (NodeId(2), Incarnation(2))].into();
    n1.membership(Epoch(1), members.clone());
    n2.membership(Epoch(1), members);
    let t0 = Instant::now();
    while n1.status().state != "running" || n2.status().state != "running" {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the two nodes did not finish recovery");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((n1, n2))
}

/// Makes `owner` master of `name` (first requester) and checks it.
async fn master_on(owner: &LockClient, node: &Node, name: &str) -> anyhow::Result<()> {
    let g = owner
        .lock("bench", name.as_bytes(), Mode::NL, Flags::NONE)
        .await?;
    owner.unlock_wait(g.lock, None).await?;
    if !node.status().mastered.iter().any(|l| l.name == name) && node.status().owned.is_empty() {
        // Mastered and empty resources have no lock rows; check through a held lock.
        let g = owner
            .lock("bench", name.as_bytes(), Mode::NL, Flags::NONE)
            .await?;
        let mastered = node.status().mastered.iter().any(|l| l.name == name);
        owner.unlock_wait(g.lock, None).await?;
        if !mastered {
            bail!("{name} is not mastered where it was first locked");
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (sorted.len() - 1) * per_mille.min(1000) / 1000;
    sorted[i]
}

async fn tcp_ping_pong(ops: u64) -> anyhow::Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut times = Vec::with_capacity(usize::try_from(ops).unwrap_or(0));
    for _ in 0..ops {
        let t = Instant::now();
        s.write_all(&buf).await?;
        s.read_exact(&mut buf).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

/// The same exchange over two one-way connections (requests on one, answers on the
/// other), the way the lock manager's peer sessions are laid out: answers cannot carry
/// the TCP acknowledgement of the request, so every message costs an extra packet.
async fn tcp_two_way_ping_pong(ops: u64) -> anyhow::Result<Vec<Duration>> {
    let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a1 = l1.local_addr()?;
    let a2 = l2.local_addr()?;
    tokio::spawn(async move {
        let Ok((mut rx, _)) = l1.accept().await else {
            return;
        };
        let Ok(mut tx) = tokio::net::TcpStream::connect(a2).await else {
            return;
        };
        let _ = rx.set_nodelay(true);
        let _ = tx.set_nodelay(true);
        let mut buf = [0u8; 64];
        while rx.read_exact(&mut buf).await.is_ok() {
            if tx.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut tx = tokio::net::TcpStream::connect(a1).await?;
    tx.set_nodelay(true)?;
    let (mut rx, _) = l2.accept().await?;
    rx.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut times = Vec::with_capacity(usize::try_from(ops).unwrap_or(0));
    for _ in 0..ops {
        let t = Instant::now();
        tx.write_all(&buf).await?;
        rx.read_exact(&mut buf).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

struct RemoteResult {
    dlm: Vec<Duration>,
    tcp: Vec<Duration>,
    tcp_two_way: Vec<Duration>,
}

async fn remote_latency(ops: u64) -> anyhow::Result<RemoteResult> {
    let (n1, n2) = two_nodes().await?;
    let c1 = n1.client();
    master_on(&c1, &n1, "r").await?;
    let c2 = n2.client();
    // Warm up the master cache and connections.
    for _ in 0..1000 {
        let g = c2.lock("bench", b"r", Mode::EX, Flags::NONE).await?;
        c2.unlock(g.lock, None)?;
    }
    let mut dlm = Vec::with_capacity(usize::try_from(ops).unwrap_or(0));
    for _ in 0..ops {
        let t = Instant::now();
        let g = c2.lock("bench", b"r", Mode::EX, Flags::NONE).await?;
        c2.unlock(g.lock, None)?;
        dlm.push(t.elapsed());
    }
    dlm.sort();
    if !n1
        .status()
        .mastered
        .iter()
        .all(|l| l.owner == 2 || l.owner == 1)
    {
        bail!("unexpected lock owners");
    }
    let tcp = tcp_ping_pong(ops).await?;
    let tcp_two_way = tcp_two_way_ping_pong(ops).await?;
    Ok(RemoteResult {
        dlm,
        tcp,
        tcp_two_way,
    })
}

async fn remote_throughput(clients: usize, secs: f64) -> anyhow::Result<f64> {
    let (n1, n2) = two_nodes().await?;
    let n1 = Arc::new(n1);
    let n2 = Arc::new(n2);
    // Half the clients on each node, each on its own resource mastered by the other.
    let mut setup = Vec::new();
    for i in 0..clients {
        let (master, user) = if i % 2 == 0 { (&n1, &n2) } else { (&n2, &n1) };
        let name = format!("t{i}");
        let mc = master.client();
        master_on(&mc, master, &name).await?;
        setup.push((user.clone(), name));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (node, name) in setup {
        let stop = stop.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let c = node.client();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(g) = c
                    .lock("bench", name.as_bytes(), Mode::EX, Flags::NONE)
                    .await
                else {
                    break;
                };
                if c.unlock(g.lock, None).is_err() {
                    break;
                }
                n += 1;
            }
            count.fetch_add(n, Ordering::Relaxed);
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    Ok(rate(count.load(Ordering::Relaxed), t0.elapsed()))
}

fn show(name: &str, value: String, goal: &str) {
    let mut out = std::io::stdout().lock();
    let _ = std::io::Write::write_fmt(&mut out, format_args!("{name:<58} {value:>22}   {goal}\n"));
}

async fn local(ops: u64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    show(
        "local lock+unlock, core only (sans-IO), 1 thread",
        format!("{:.0} ops/s", core_local(ops)),
        "goal >= 1,000,000 per core",
    );
    show(
        "local lock+unlock, async client API, 1 task",
        format!("{:.0} ops/s", api_local(ops / 2).await?),
        "",
    );
    show(
        "local lock+unlock, unix socket (JSON lines), 1 client",
        format!("{:.0} ops/s", socket_local(ops / 20).await?),
        "",
    );
    show("cores", cores.to_string(), "");
    Ok(())
}

async fn remote(ops: u64) -> anyhow::Result<()> {
    let r = remote_latency(ops).await?;
    let dm = percentile(&r.dlm, 500);
    let tm = percentile(&r.tcp, 500);
    show("remote lock+unlock latency, median", format!("{dm:?}"), "");
    show(
        "remote lock+unlock latency, p99",
        format!("{:?}", percentile(&r.dlm, 990)),
        "",
    );
    show(
        "raw TCP ping-pong (64 B) round trip, median",
        format!("{tm:?}"),
        "",
    );
    show(
        "raw TCP ping-pong round trip, p99",
        format!("{:?}", percentile(&r.tcp, 990)),
        "",
    );
    let t2 = percentile(&r.tcp_two_way, 500);
    show(
        "TCP ping-pong over two one-way connections, median",
        format!("{t2:?}"),
        "",
    );
    show(
        "remote lock+unlock / TCP round trip (median)",
        format!("{:.2}x", dm.as_secs_f64() / tm.as_secs_f64().max(1e-9)),
        "goal <= 1.2x",
    );
    Ok(())
}

async fn throughput(clients: usize, secs: f64) -> anyhow::Result<()> {
    let ops = remote_throughput(clients, secs).await?;
    show(
        &format!("remote lock+unlock throughput, {clients} clients, 2 nodes"),
        format!("{ops:.0} ops/s"),
        "goal >= 100,000 on 2 cores",
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let What::Kernel { ops } = args.what {
        let r = libdlm::bench(ops)?;
        show(
            "kernel DLM (libdlm_lt) local lock+unlock, 1 thread",
            format!("{r:.0} ops/s"),
            "",
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(bench_threads())
        .enable_all()
        .build()?;
    // Everything runs as runtime tasks (like the clients of a node do), not on the
    // thread that blocks on the runtime.
    let what = args.what;
    rt.block_on(async move { tokio::spawn(async move { run(what).await }).await? })?;
    let _ = NodeState::Running;
    Ok(())
}

async fn run(what: What) -> anyhow::Result<()> {
    {
        match what {
            What::All { ops } => {
                local(ops * 5).await?;
                remote(ops / 10).await?;
                throughput(64, 3.0).await
            }
            What::Local { ops } => local(ops).await,
            What::Remote { ops } => remote(ops).await,
            What::Throughput { clients, secs } => throughput(clients, secs).await,
            What::Kernel { .. } => Ok(()),
        }
    }
}

/// Worker threads of the benchmark runtime (`TANDEM_BENCH_THREADS`, default 2).
fn bench_threads() -> usize {
    std::env::var("TANDEM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}
