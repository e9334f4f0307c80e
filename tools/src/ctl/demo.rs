//! `tandemctl demo`: the local demo cluster, and (`--runs N`) the failover benchmark.

use crate::demo::{self, DemoCluster, Timeline, VOLUME, Workload};
use anyhow::{Context, bail};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the nodes keep their state, logs and backing files (default: a new temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seconds of workload before the primary is killed.
    #[arg(long, default_value_t = 3)]
    pub before: u64,
    /// Seconds of workload on the survivor before the old primary comes back.
    #[arg(long, default_value_t = 3)]
    pub after: u64,
    /// Failover benchmark: kill the primary this many times and report min/median/max.
    #[arg(long)]
    pub runs: Option<u32>,
    /// Keep the directory afterwards.
    #[arg(long)]
    pub keep: bool,
    /// The tandemd binary (default: next to tandemctl).
    #[arg(long)]
    pub tandemd: Option<PathBuf>,
}

fn tandemd_path(args: &DemoArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.tandemd {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating tandemctl")?;
    let path = exe.with_file_name("tandemd");
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release --bins) or pass --tandemd",
            path.display()
        );
    }
    Ok(path)
}

/// Runs the demo; the exit code is 0 only if every acknowledged write was found.
pub fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let tandemd = tandemd_path(&args)?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = std::io::stdout().lock();
    let started = Instant::now();
    writeln!(
        out,
        "tandem demo: 3 nodes on 127.0.0.1-3 (alpha, beta: data; witness: votes), volume {VOLUME} over NBD"
    )?;
    writeln!(out, "  state, logs and backing files in {}", dir.display())?;
    let mut cluster = DemoCluster::start(&dir, &tandemd)?;
    let primary = cluster.wait_healthy(Duration::from_secs(60))?;
    writeln!(
        out,
        "  cluster up in {:.1} s: {primary} is primary, both replicas UpToDate",
        started.elapsed().as_secs_f64()
    )?;
    let result = match args.runs {
        Some(runs) => benchmark(&mut cluster, runs, &mut out),
        None => showcase(&mut cluster, &args, primary, &mut out),
    };
    cluster.stop();
    if !args.keep && result.as_ref().is_ok_and(|code| *code == 0) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        writeln!(out, "  (kept {})", dir.display())?;
    }
    result
}

fn showcase(
    cluster: &mut DemoCluster,
    args: &DemoArgs,
    primary: String,
    out: &mut impl Write,
) -> anyhow::Result<i32> {
    let workload = Workload::start(cluster, 4096, 0x5eed);
    writeln!(
        out,
        "  workload: checksummed 4 KiB writes with FUA through {primary}'s NBD export"
    )?;
    std::thread::sleep(Duration::from_secs(args.before));
    writeln!(
        out,
        "  {} writes acknowledged so far; killing {primary} (SIGKILL)",
        workload.writes.load(std::sync::atomic::Ordering::Relaxed)
    )?;
    let timeline = demo::fail_over(cluster, &workload, &primary)?;
    writeln!(out, "\nfailover timeline")?;
    demo::print_timeline(out, &timeline)?;
    std::thread::sleep(Duration::from_secs(args.after));
    writeln!(
        out,
        "\nrestarting {primary}: it rejoins as a new life, stays secondary and resyncs"
    )?;
    cluster.start_node(&primary)?;
    demo::wait_resync(cluster, out, Duration::from_secs(120), true)?;
    let log = workload.finish();
    writeln!(
        out,
        "\nverification: {} writes acknowledged ({} failed during the failover), {} distinct blocks",
        log.writes_acked,
        log.writes_failed,
        log.acked.len()
    )?;
    let problems = demo::verify(cluster, &log.acked)?;
    let identical = demo::compare_replicas(cluster)?;
    for p in problems.iter().take(10) {
        writeln!(out, "  LOST: {p}")?;
    }
    writeln!(
        out,
        "  acknowledged writes present on the primary: {}",
        if problems.is_empty() {
            "all"
        } else {
            "NOT ALL"
        }
    )?;
    writeln!(
        out,
        "  replicas byte-identical after resync: {}",
        if identical { "yes" } else { "NO" }
    )?;
    let ok = problems.is_empty() && identical;
    writeln!(out, "\n{}", if ok { "demo passed" } else { "demo FAILED" })?;
    Ok(if ok { 0 } else { 1 })
}

fn stats(values: &mut [u64]) -> String {
    values.sort_unstable();
    if values.is_empty() {
        return "-".into();
    }
    format!(
        "{:>6} {:>6} {:>6}",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1]
    )
}

fn benchmark(cluster: &mut DemoCluster, runs: u32, out: &mut impl Write) -> anyhow::Result<i32> {
    let workload = Workload::start(cluster, 1024, 0xbe7c);
    let mut timelines: Vec<Timeline> = Vec::new();
    for run in 1..=runs {
        let primary = cluster.wait_healthy(Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_millis(500));
        let t = demo::fail_over(cluster, &workload, &primary)?;
        writeln!(
            out,
            "  run {run:>2}: {primary} killed, first write on {} after {} ms",
            t.survivor,
            t.failover_ms().unwrap_or(0)
        )?;
        timelines.push(t);
        cluster.start_node(&primary)?;
    }
    cluster.wait_healthy(Duration::from_secs(120))?;
    let log = workload.finish();
    let problems = demo::verify(cluster, &log.acked)?;
    let c = &cluster.config.cluster;
    writeln!(
        out,
        "\nfailover over {runs} runs (ms from SIGKILL)        min    med    max"
    )?;
    let series = |f: &dyn Fn(&Timeline) -> Option<u64>| -> Vec<u64> {
        timelines.iter().filter_map(f).collect()
    };
    writeln!(
        out,
        "  failure detected                   {}",
        stats(&mut series(&|t| t.detected_ms.map(|v| v - t.killed_ms)))
    )?;
    writeln!(
        out,
        "  fenced                             {}",
        stats(&mut series(&|t| t.fenced_ms.map(|v| v - t.killed_ms)))
    )?;
    writeln!(
        out,
        "  promoted                           {}",
        stats(&mut series(&|t| t.promoted_ms.map(|v| v - t.killed_ms)))
    )?;
    writeln!(
        out,
        "  first write served                 {}",
        stats(&mut series(&Timeline::failover_ms))
    )?;
    writeln!(
        out,
        "configured: heartbeat {} ms, failure timeout {} ms, quorum lease {} ms (Pacemaker+DRBD: corosync token 3000 ms + consensus + fencing + promote)",
        c.heartbeat_ms, c.failure_timeout_ms, c.quorum_lease_ms
    )?;
    writeln!(
        out,
        "writes acknowledged {}, lost {}",
        log.writes_acked,
        problems.len()
    )?;
    Ok(if problems.is_empty() { 0 } else { 1 })
}
