//! The demo cluster and the failover harness behind `tandemctl demo`, the multi-process
//! tests and the failover benchmark.
//!
//! Three `tandemd` processes on 127.0.0.1-3 (two data nodes and a witness) share the
//! embedded demo configuration; the volume is file-backed and exported over NBD, so no
//! root is needed. A workload writes checksummed 4 KiB blocks with FUA through the
//! primary's NBD export and remembers every acknowledged write; the primary is killed
//! with SIGKILL; the workload follows the volume to the survivor; at the end every
//! acknowledged write is read back and checked.

use crate::nbd_client::NbdClient;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tandem::cluster::config::{Config, DEMO_CONFIG};
use tandem::cluster::control::{self, Request};
use tandem::cluster::orchestrator::{DiskState, ReplicaRole};
use tandem::cluster::state::Command as LogCommand;
use tandem::cluster::status::{ClusterStatus, Event, EventKind};

/// The demo's volume.
pub const VOLUME: &str = "vol0";
const BLOCK: u64 = 4096;
const MAGIC: u64 = 0x7461_6e64_656d_4f4b; // "tandemOK"

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A running demo cluster.
#[derive(Debug)]
pub struct DemoCluster {
    pub dir: PathBuf,
    pub config: Config,
    tandemd: PathBuf,
    children: BTreeMap<String, Child>,
    /// Per node, a command that wraps tandemd (e.g. `ip netns exec NS`).
    wrappers: BTreeMap<String, Vec<String>>,
}

impl DemoCluster {
    /// Writes the demo configuration under `dir` and starts the three nodes.
    pub fn start(dir: &Path, tandemd: &Path) -> anyhow::Result<Self> {
        Self::start_with_port_offset(dir, tandemd, 0)
    }

    /// Like [`start`](Self::start), with every port moved by `offset` (so several demo
    /// clusters can run at once, as the tests do).
    pub fn start_with_port_offset(dir: &Path, tandemd: &Path, offset: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = DEMO_CONFIG.replace("{base}", &dir.display().to_string());
        for port in [7791u16, 9791, 10809] {
            let moved = port.checked_add(offset).context("port offset too large")?;
            text = text.replace(&format!(":{port}\""), &format!(":{moved}\""));
        }
        Self::start_custom(dir, tandemd, &text, BTreeMap::new())
    }

    /// Starts a cluster from configuration `text` (written to `DIR/tandem.toml`), each
    /// node's tandemd wrapped in `wrappers[node]` if given.
    pub fn start_custom(
        dir: &Path,
        tandemd: &Path,
        text: &str,
        wrappers: BTreeMap<String, Vec<String>>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("tandem.toml");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let config = Config::parse(&path.display().to_string(), text)?;
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            config,
            tandemd: tandemd.to_path_buf(),
            children: BTreeMap::new(),
            wrappers,
        };
        let names: Vec<String> = cluster
            .config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect();
        for name in names {
            cluster.start_node(&name)?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) one node's tandemd, logging to `DIR/NAME.log`.
    pub fn start_node(&mut self, name: &str) -> anyhow::Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = match self.wrappers.get(name).and_then(|w| w.split_first()) {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.tandemd);
                c
            }
            None => Command::new(&self.tandemd),
        };
        let child = command
            .args(["run", "--config"])
            .arg(self.dir.join("tandem.toml"))
            .args(["--node", name])
            .env(
                "TANDEM_LOG",
                std::env::var("TANDEM_LOG").unwrap_or_else(|_| "info,openraft=off".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.tandemd.display()))?;
        self.children.insert(name.to_owned(), child);
        Ok(())
    }

    /// Sends `signal` to a node's tandemd (SIGSTOP and SIGCONT model a paused process
    /// or a frozen VM).
    pub fn signal(&self, name: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self
            .children
            .get(name)
            .with_context(|| format!("{name} is not running"))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {name}"))?;
        Ok(())
    }

    /// Stops a node's tandemd in order (SIGTERM) and waits for it to exit (SIGKILL after
    /// `grace`); returns whether it exited by itself.
    pub fn terminate(&mut self, name: &str, grace: Duration) -> anyhow::Result<bool> {
        self.signal(name, nix::sys::signal::Signal::SIGTERM)?;
        let mut child = self
            .children
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().context("SIGKILL")?;
        let _ = child.wait();
        Ok(false)
    }

    /// SIGKILLs a node's tandemd (a crash: no demotion, no goodbye).
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self
            .children
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        child.kill().context("SIGKILL")?;
        let _ = child.wait();
        Ok(())
    }

    /// The control socket of `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.config.control_socket(name)
    }

    /// Status as `name` sees it.
    pub fn status(&self, name: &str) -> anyhow::Result<ClusterStatus> {
        let reply = control::request(&self.socket(name), &Request::Status)?;
        if !reply.ok {
            bail!("{}", reply.error.unwrap_or_default());
        }
        Ok(serde_json::from_value(reply.result.unwrap_or_default())?)
    }

    /// Status from the first node that answers (skipping `except`).
    pub fn any_status(&self, except: Option<&str>) -> Option<ClusterStatus> {
        self.children
            .keys()
            .filter(|n| Some(n.as_str()) != except)
            .find_map(|n| self.status(n).ok())
    }

    /// NBD address of `node`.
    pub fn nbd_address(&self, node: &str) -> Option<String> {
        self.config.volume(VOLUME)?.on_node(node)?.nbd
    }

    /// Waits until the volume has a primary and both replicas are UpToDate and connected.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.any_status(None)
                && let Some(v) = s.volumes.iter().find(|v| v.name == VOLUME)
                && let Some(primary) = &v.primary
                && v.replicas.iter().all(|r| {
                    r.report.as_ref().is_some_and(|rep| {
                        rep.disk == DiskState::UpToDate
                            && rep.connected
                            && !rep.syncing
                            && !rep.suspended
                    }) && !r.outdated
                })
                && v.replicas.iter().any(|r| {
                    r.node == *primary
                        && r.report
                            .as_ref()
                            .is_some_and(|rep| rep.role == ReplicaRole::Primary)
                })
            {
                return Ok(primary.clone());
            }
            if Instant::now() > deadline {
                let seen = self
                    .any_status(None)
                    .and_then(|s| s.volumes.into_iter().find(|v| v.name == VOLUME))
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_else(|| "no status".into());
                bail!(
                    "the cluster did not become healthy within {timeout:?} (last seen: {seen}); logs are in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every node (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) {
        for child in self.children.values() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in self.children.values_mut() {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for DemoCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A 4 KiB block that proves what it is: which block, which write, and a checksum.
pub fn block_content(block: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(BLOCK).unwrap_or(4096)];
    data[0..8].copy_from_slice(&MAGIC.to_be_bytes());
    data[8..16].copy_from_slice(&block.to_be_bytes());
    data[16..24].copy_from_slice(&seq.to_be_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    for chunk in data[28..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let crc = crc32fast::hash(&data[28..]);
    data[24..28].copy_from_slice(&crc.to_be_bytes());
    data
}

/// Decodes a block written by [`block_content`]: (block, seq) if intact.
pub fn decode_block(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() < 28 || data[0..8] != MAGIC.to_be_bytes() {
        return None;
    }
    let crc = u32::from_be_bytes(data[24..28].try_into().ok()?);
    if crc32fast::hash(&data[28..]) != crc {
        return None;
    }
    Some((
        u64::from_be_bytes(data[8..16].try_into().ok()?),
        u64::from_be_bytes(data[16..24].try_into().ok()?),
    ))
}

/// What the workload did.
#[derive(Debug, Default)]
pub struct WorkloadLog {
    /// block → highest acknowledged sequence number.
    pub acked: BTreeMap<u64, u64>,
    pub writes_acked: u64,
    pub writes_failed: u64,
    /// (time, node) of every successful (re)connection.
    pub connections: Vec<(u64, String)>,
    /// Time of each acknowledged write (ms), for the first write after a failure.
    pub ack_times: Vec<u64>,
}

/// A workload thread writing to whichever node is primary.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    pub log: Arc<Mutex<WorkloadLog>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub writes: Arc<AtomicU64>,
}

impl Workload {
    /// Starts writing random blocks of the first `blocks` of the volume; a write that
    /// takes over 2 s counts as failed (the client reconnects to whoever is primary).
    pub fn start(cluster: &DemoCluster, blocks: u64, seed: u64) -> Self {
        Self::start_with_io_timeout(cluster, blocks, seed, Duration::from_secs(2))
    }

    /// [`Workload::start`] with another per-request timeout (an application that waits
    /// out a suspension, as a kernel NBD device with its default timeout does).
    pub fn start_with_io_timeout(
        cluster: &DemoCluster,
        blocks: u64,
        seed: u64,
        io_timeout: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WorkloadLog::default()));
        let writes = Arc::new(AtomicU64::new(0));
        let sockets: Vec<(String, PathBuf, Option<String>)> = cluster
            .config
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    cluster.socket(&n.name),
                    cluster.nbd_address(&n.name),
                )
            })
            .collect();
        let (stop2, log2, writes2) = (Arc::clone(&stop), Arc::clone(&log), Arc::clone(&writes));
        let thread = std::thread::spawn(move || {
            let mut rng = seed | 1;
            let mut seq = 0u64;
            let mut client: Option<NbdClient> = None;
            while !stop2.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = connect_to_primary(&sockets, &log2, io_timeout);
                    if client.is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let block = rng % blocks;
                seq += 1;
                let data = block_content(block, seq);
                let Some(c) = client.as_mut() else { continue };
                match c.write(block * BLOCK, &data, true) {
                    Ok(()) => {
                        let mut l = log2.lock().unwrap_or_else(|e| e.into_inner());
                        l.acked.insert(block, seq);
                        l.writes_acked += 1;
                        l.ack_times.push(now_ms());
                        writes2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        log2.lock().unwrap_or_else(|e| e.into_inner()).writes_failed += 1;
                        client = None;
                    }
                }
            }
        });
        Self {
            stop,
            log,
            thread: Some(thread),
            writes,
        }
    }

    /// Stops the workload and returns its log.
    pub fn finish(mut self) -> WorkloadLog {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn connect_to_primary(
    sockets: &[(String, PathBuf, Option<String>)],
    log: &Mutex<WorkloadLog>,
    io_timeout: Duration,
) -> Option<NbdClient> {
    let primary = sockets.iter().find_map(|(_, socket, _)| {
        let reply = control::request(socket, &Request::Status).ok()?;
        let status: ClusterStatus = serde_json::from_value(reply.result?).ok()?;
        let volume = status.volumes.into_iter().find(|v| v.name == VOLUME)?;
        let primary = volume.primary?;
        // Only a primary that says it has taken over (promoted, not suspended).
        volume
            .replicas
            .iter()
            .find(|r| r.node == primary)
            .and_then(|r| r.report.as_ref())
            .filter(|r| r.role == ReplicaRole::Primary && !r.suspended)
            .map(|_| primary)
    })?;
    let address = sockets.iter().find(|(n, _, _)| *n == primary)?.2.clone()?;
    let client = NbdClient::connect(&address, io_timeout).ok()?;
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .connections
        .push((now_ms(), primary));
    Some(client)
}

/// Reads back every acknowledged block from the primary; returns the problems found.
pub fn verify(cluster: &DemoCluster, acked: &BTreeMap<u64, u64>) -> anyhow::Result<Vec<String>> {
    let primary = cluster
        .any_status(None)
        .and_then(|s| s.volumes.into_iter().find(|v| v.name == VOLUME))
        .and_then(|v| v.primary)
        .context("no primary to verify against")?;
    let address = cluster
        .nbd_address(&primary)
        .context("the primary has no NBD export")?;
    let mut client = NbdClient::connect(&address, Duration::from_secs(5))?;
    let mut problems = Vec::new();
    for (&block, &seq) in acked {
        let data = client.read(block * BLOCK, u32::try_from(BLOCK).unwrap_or(4096))?;
        match decode_block(&data) {
            Some((b, s)) if b == block && s >= seq => {}
            Some((b, s)) => problems.push(format!(
                "block {block}: holds block {b} write {s}, acknowledged write {seq} is lost"
            )),
            None => problems.push(format!(
                "block {block}: garbage where acknowledged write {seq} should be"
            )),
        }
    }
    Ok(problems)
}

/// Timestamps of one failover.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Timeline {
    pub killed_ms: u64,
    pub detected_ms: Option<u64>,
    pub fenced_ms: Option<u64>,
    pub promoted_ms: Option<u64>,
    pub first_write_ms: Option<u64>,
    pub victim: String,
    pub survivor: String,
}

impl Timeline {
    fn after(&self, t: Option<u64>) -> Option<u64> {
        t.map(|t| t.saturating_sub(self.killed_ms))
    }
    /// Milliseconds from the kill to the first write the survivor served.
    pub fn failover_ms(&self) -> Option<u64> {
        self.after(self.first_write_ms)
    }
}

/// Follows the event stream of `observer` until `stop`, collecting events.
fn collect_events(
    cluster: &DemoCluster,
    observer: &str,
) -> (Arc<Mutex<Vec<Event>>>, Arc<AtomicBool>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = cluster.socket(observer);
    let (events2, stop2) = (Arc::clone(&events), Arc::clone(&stop));
    std::thread::spawn(move || {
        let _ = control::follow_events(&socket, |e| {
            events2.lock().unwrap_or_else(|e| e.into_inner()).push(e);
            !stop2.load(Ordering::Relaxed)
        });
    });
    (events, stop)
}

/// Kills the primary under the workload and measures the failover.
pub fn fail_over(
    cluster: &mut DemoCluster,
    workload: &Workload,
    victim: &str,
) -> anyhow::Result<Timeline> {
    let survivor = cluster
        .config
        .volume(VOLUME)
        .and_then(|v| v.nodes.iter().find(|n| *n != victim).cloned())
        .context("no other replica")?;
    let victim_id = cluster.config.node_by_name(victim).context("victim")?.id;
    let survivor_id = cluster
        .config
        .node_by_name(&survivor)
        .context("survivor")?
        .id;
    let (events, stop_events) = collect_events(cluster, &survivor);
    std::thread::sleep(Duration::from_millis(100));
    let killed_ms = now_ms();
    cluster.kill(victim)?;
    let acked_at_kill = workload.writes.load(Ordering::Relaxed);
    // Wait for the survivor to serve writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_write_ms = loop {
        let log = workload.log.lock().unwrap_or_else(|e| e.into_inner());
        let moved = log
            .connections
            .iter()
            .find(|(t, n)| *t >= killed_ms && *n == survivor)
            .map(|(t, _)| *t);
        if let Some(connected_ms) = moved
            && workload.writes.load(Ordering::Relaxed) > acked_at_kill
            && let Some(first) = log.ack_times.iter().copied().find(|t| *t >= connected_ms)
        {
            break Some(first);
        }
        drop(log);
        if Instant::now() > deadline {
            bail!(
                "the survivor did not serve writes within 30 s; logs in {}",
                cluster.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(100));
    stop_events.store(true, Ordering::Relaxed);
    let events = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut timeline = Timeline {
        killed_ms,
        first_write_ms,
        victim: victim.to_owned(),
        survivor: survivor.clone(),
        ..Timeline::default()
    };
    for e in events.iter().filter(|e| e.at_ms >= killed_ms) {
        match &e.kind {
            EventKind::PeerSilent { peer, .. } if *peer == victim_id => {
                timeline.detected_ms.get_or_insert(e.at_ms);
            }
            EventKind::Applied { entry } => match &entry.proposal.command {
                LogCommand::MarkDown { node, .. } if *node == victim_id => {
                    timeline.detected_ms =
                        Some(timeline.detected_ms.map_or(e.at_ms, |d| d.min(e.at_ms)));
                }
                LogCommand::Fenced { entry: f } if f.victim == victim_id => {
                    timeline.fenced_ms.get_or_insert(e.at_ms);
                }
                LogCommand::Promote { node, .. } if *node == survivor_id => {
                    timeline.promoted_ms.get_or_insert(e.at_ms);
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(timeline)
}

/// Prints a timeline.
pub fn print_timeline(out: &mut impl Write, t: &Timeline) -> std::io::Result<()> {
    let show = |v: Option<u64>| v.map_or("-".to_owned(), |ms| format!("+{ms} ms"));
    writeln!(
        out,
        "  {:<32} +0 ms",
        format!("{} killed (SIGKILL)", t.victim)
    )?;
    writeln!(
        out,
        "  {:<32} {}",
        "failure detected",
        show(t.after(t.detected_ms))
    )?;
    writeln!(
        out,
        "  {:<32} {}",
        format!("{} fenced (epoch bump)", t.victim),
        show(t.after(t.fenced_ms))
    )?;
    writeln!(
        out,
        "  {:<32} {}",
        format!("{} promoted", t.survivor),
        show(t.after(t.promoted_ms))
    )?;
    writeln!(
        out,
        "  {:<32} {}",
        format!("first write served by {}", t.survivor),
        show(t.after(t.first_write_ms))
    )
}

/// Waits for a resync after a restart, drawing a progress bar on `out`.
pub fn wait_resync(
    cluster: &DemoCluster,
    out: &mut impl Write,
    timeout: Duration,
    show: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if cluster.wait_healthy(Duration::from_millis(1)).is_ok() {
            if show {
                if !last.is_empty() {
                    writeln!(out)?;
                }
                writeln!(out, "  resync done: both replicas UpToDate")?;
            }
            return Ok(());
        }
        if show
            && let Some(s) = cluster.any_status(None)
            && let Some(v) = s.volumes.iter().find(|v| v.name == VOLUME)
        {
            for r in &v.replicas {
                if let Some(p) = r.report.as_ref().and_then(|rep| rep.sync) {
                    let width = 30usize;
                    let percent = p.percent();
                    // Display only.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let filled = ((percent / 100.0) * width as f64) as usize;
                    let line = format!(
                        "\r  resync {} [{}{}] {percent:5.1}%  ETA {}",
                        r.node,
                        "#".repeat(filled.min(width)),
                        " ".repeat(width - filled.min(width)),
                        p.eta_secs().map_or("?".into(), |e| format!("{e}s"))
                    );
                    if line != last {
                        write!(out, "{line}")?;
                        out.flush()?;
                        last = line;
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("resync did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Compares the data part of both replicas' backing files.
pub fn compare_replicas(cluster: &DemoCluster) -> anyhow::Result<bool> {
    let volume = cluster.config.volume(VOLUME).context("volume")?;
    let size = usize::try_from(volume.size_bytes()).unwrap_or(usize::MAX);
    let mut digests = Vec::new();
    for node in &volume.nodes {
        let backing = volume.on_node(node).context("replica")?.backing;
        let data =
            std::fs::read(&backing).with_context(|| format!("reading {}", backing.display()))?;
        let part = data
            .get(..size)
            .context("backing file shorter than the volume")?;
        digests.push(crc32fast::hash(part));
    }
    Ok(digests.windows(2).all(|w| w[0] == w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_prove_what_they_are_and_damage_is_seen() {
        let data = block_content(17, 4242);
        assert_eq!(decode_block(&data), Some((17, 4242)));
        let mut damaged = data.clone();
        damaged[1000] ^= 1;
        assert_eq!(decode_block(&damaged), None);
        assert_eq!(decode_block(&vec![0u8; 4096]), None);
        assert_ne!(block_content(1, 1), block_content(1, 2));
    }
}
