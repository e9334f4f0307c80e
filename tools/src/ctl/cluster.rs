//! `tandemctl status | volumes | events | switchover | resolve | check-config`: talking to
//! a running `tandemd` over its control socket.

use anyhow::{Context, bail};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use tandem::cluster::config::{Config, NodeRole};
use tandem::cluster::control::{self, Request};
use tandem::cluster::orchestrator::{DiskState, ReplicaRole};
use tandem::cluster::status::{ClusterStatus, Event, EventKind};

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/tandem/tandem.toml";

/// Which daemon to talk to.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Control socket of the daemon (default: from the configuration and node name).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Cluster configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Node whose daemon to ask (default: this host's name).
    #[arg(long, global = true)]
    pub node: Option<String>,
}

impl Target {
    /// The lock manager socket for `tandemctl lock/locks`: `--socket`, else (when the
    /// configuration file exists) this node's `dlm_socket` from it; `None` leaves the
    /// choice to `$TANDEM_DLM_SOCKET` or the default.
    pub fn dlm_socket(&self) -> Option<PathBuf> {
        if let Some(s) = &self.socket {
            return Some(s.clone());
        }
        if std::env::var_os("TANDEM_DLM_SOCKET").is_some() {
            return None;
        }
        let config = Config::load(&self.config).ok()?;
        let node = match &self.node {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .ok()?
                .to_string_lossy()
                .into_owned(),
        };
        config.node_by_name(&node)?;
        Some(config.dlm_socket(&node))
    }

    /// The control socket to use.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let config = Config::load(&self.config)?;
        let node = match &self.node {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .context("reading the host name")?
                .to_string_lossy()
                .into_owned(),
        };
        if config.node_by_name(&node).is_none() {
            bail!(
                "node `{node}` is not in {}; pass --node NAME",
                self.config.display()
            );
        }
        Ok(config.control_socket(&node))
    }
}

fn ask(target: &Target, request: &Request) -> anyhow::Result<serde_json::Value> {
    let socket = target.socket()?;
    let reply = control::request(&socket, request).with_context(|| {
        format!(
            "cannot talk to tandemd at {} (is it running?)",
            socket.display()
        )
    })?;
    if reply.ok {
        Ok(reply.result.unwrap_or(serde_json::Value::Null))
    } else {
        bail!("{}", reply.error.unwrap_or_else(|| "request failed".into()))
    }
}

/// Fetches the status snapshot.
pub fn fetch_status(target: &Target) -> anyhow::Result<ClusterStatus> {
    let value = ask(target, &Request::Status)?;
    serde_json::from_value(value).context("undecodable status from tandemd")
}

fn disk(d: DiskState) -> &'static str {
    match d {
        DiskState::Diskless => "Diskless",
        DiskState::Inconsistent => "Inconsistent",
        DiskState::Outdated => "Outdated",
        DiskState::Consistent => "Consistent",
        DiskState::UpToDate => "UpToDate",
        DiskState::Failed => "Failed",
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Human-readable byte counts.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 10 * 1024 && unit + 1 < UNITS.len() {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// Renders the status as the `tandemctl status` table.
pub fn render_status(s: &ClusterStatus, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "cluster {}  seen from {} (node {}, incarnation {})  leader {}  quorum {}  membership epoch {}",
        s.cluster,
        s.node,
        s.node_id,
        s.incarnation,
        s.leader.as_deref().unwrap_or("-"),
        if s.quorate { "yes" } else { "NO" },
        s.membership_epoch
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:<8} {:<6} {:<6} {:<12} {:>10}",
        "NODE", "ROLE", "STATE", "ALIVE", "INCARNATION", "SILENCE"
    )?;
    for n in &s.nodes {
        let role = match n.role {
            NodeRole::Data => "data",
            NodeRole::Witness => "witness",
        };
        let silence = n.silence_ms.map_or("never".into(), |ms| format!("{ms} ms"));
        let name = if n.leader {
            format!("{}*", n.name)
        } else {
            n.name.clone()
        };
        writeln!(
            out,
            "{:<12} {:<8} {:<6} {:<6} {:<12} {:>10}",
            name,
            role,
            if n.up { "up" } else { "down" },
            if n.alive { "yes" } else { "no" },
            n.incarnation,
            silence
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<10} {:<8} {:>6}  {:<10} {:<10} {:<13} {:<12} {:<24} {:>12}",
        "VOLUME",
        "PRIMARY",
        "EPOCH",
        "REPLICA",
        "ROLE",
        "DISK",
        "CONNECTION",
        "SYNC",
        "OUT-OF-SYNC"
    )?;
    for v in &s.volumes {
        for (i, r) in v.replicas.iter().enumerate() {
            let (volume, primary, epoch) = if i == 0 {
                (
                    v.name.clone(),
                    v.primary.clone().unwrap_or_else(|| "-".into()),
                    v.epoch.to_string(),
                )
            } else {
                (String::new(), String::new(), String::new())
            };
            let (role, disk_state, connection, sync, oos): (
                String,
                String,
                String,
                String,
                String,
            ) = match &r.report {
                None => (
                    "?".into(),
                    "unknown".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
                Some(rep) => {
                    let role = match rep.role {
                        ReplicaRole::Primary if rep.suspended => "Primary(suspended)".to_owned(),
                        ReplicaRole::Primary => "Primary".to_owned(),
                        ReplicaRole::Secondary => "Secondary".to_owned(),
                    };
                    let mut d = disk(rep.disk).to_owned();
                    if r.outdated && rep.disk == DiskState::UpToDate {
                        d = "UpToDate(log:Outdated)".into();
                    }
                    let sync = match rep.sync {
                        Some(p) => format!(
                            "{:.1}% ETA {}",
                            p.percent(),
                            p.eta_secs().map_or("?".into(), |e| format!("{e}s"))
                        ),
                        None if rep.syncing => "syncing".into(),
                        None => "-".into(),
                    };
                    (
                        role,
                        d,
                        if rep.connected {
                            "Connected".into()
                        } else {
                            "StandAlone".into()
                        },
                        sync,
                        bytes(rep.out_of_sync_bytes),
                    )
                }
            };
            writeln!(
                out,
                "{volume:<10} {primary:<8} {epoch:>6}  {:<10} {role:<10} {disk_state:<13} {connection:<12} {sync:<24} {oos:>12}",
                r.node
            )?;
        }
        if let Some(victim) = &v.pending_fence {
            writeln!(out, "{:<10} waiting for {victim} to be fenced", "")?;
        }
        if let Some(to) = &v.switchover_to {
            writeln!(out, "{:<10} switching over to {to}", "")?;
        }
    }
    if !s.fencing.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "FENCING (newest last)   failovers {}  switchovers {}",
            s.failovers, s.switchovers
        )?;
        for f in s.fencing.iter().rev().take(5).rev() {
            let victim = s
                .nodes
                .iter()
                .find(|n| n.id == f.victim)
                .map_or(f.victim.to_string(), |n| n.name.clone());
            let by = s
                .nodes
                .iter()
                .find(|n| n.id == f.by)
                .map_or(f.by.to_string(), |n| n.name.clone());
            let method = match &f.method {
                tandem::cluster::state::FenceMethod::Epoch => "epoch bump".to_owned(),
                tandem::cluster::state::FenceMethod::Reservation { detail } => {
                    format!("reservation: {detail}")
                }
            };
            writeln!(
                out,
                "  {}  {}  {victim} (incarnation {}) fenced by {by}: {method}",
                utc(f.at.0),
                f.volume,
                f.victim_incarnation
            )?;
        }
    }
    Ok(())
}

/// `tandemctl status`.
pub fn status(target: &Target, json: bool) -> anyhow::Result<i32> {
    let s = fetch_status(target)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        render_status(&s, &mut out)?;
    }
    Ok(0)
}

/// `tandemctl volumes`.
pub fn volumes(target: &Target, json: bool) -> anyhow::Result<i32> {
    let s = fetch_status(target)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s.volumes)?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "{:<10} {:<8} {:>6} {:<20} {:<20}",
        "VOLUME", "PRIMARY", "EPOCH", "UP-TO-DATE", "OUTDATED"
    )?;
    for v in &s.volumes {
        let names = |outdated: bool| {
            v.replicas
                .iter()
                .filter(|r| r.outdated == outdated)
                .map(|r| r.node.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(
            out,
            "{:<10} {:<8} {:>6} {:<20} {:<20}",
            v.name,
            v.primary.as_deref().unwrap_or("-"),
            v.epoch,
            names(false),
            names(true)
        )?;
    }
    Ok(0)
}

/// `tandemctl events`: a live stream, one line per event (like `drbdsetup events2`).
pub fn events(target: &Target, json: bool) -> anyhow::Result<i32> {
    let socket = target.socket()?;
    let mut out = std::io::stdout().lock();
    control::follow_events(&socket, |event| {
        let line = if json {
            serde_json::to_string(&event).unwrap_or_default()
        } else {
            describe_event(&event)
        };
        writeln!(out, "{line}").is_ok() && out.flush().is_ok()
    })
    .with_context(|| format!("following events at {}", socket.display()))?;
    Ok(0)
}

/// One event as a line of text.
pub fn describe_event(e: &Event) -> String {
    let what = match &e.kind {
        EventKind::Started { incarnation } => format!("started (incarnation {incarnation})"),
        EventKind::Leader { leader } => {
            format!("leader {}", leader.map_or("none".into(), |l| l.to_string()))
        }
        EventKind::PeerAlive { peer } => format!("peer {peer} alive"),
        EventKind::PeerSilent { peer, silence_ms } => {
            format!("peer {peer} silent for {silence_ms} ms")
        }
        EventKind::Quorum { quorate } => {
            format!("quorum {}", if *quorate { "gained" } else { "LOST" })
        }
        EventKind::Applied { entry } => format!(
            "log #{} {} by {}: {}",
            entry.index,
            serde_json::to_string(&entry.proposal.command).unwrap_or_default(),
            entry.proposal.proposer,
            match &entry.outcome {
                tandem::cluster::state::Outcome::Applied => "applied".to_owned(),
                tandem::cluster::state::Outcome::Rejected { reason } =>
                    format!("rejected ({reason})"),
            }
        ),
        EventKind::Action { action, error } => format!(
            "action {}{}",
            serde_json::to_string(action).unwrap_or_default(),
            error
                .as_ref()
                .map_or(String::new(), |e| format!(" FAILED: {e}"))
        ),
        EventKind::Stopping => "stopping".into(),
    };
    format!("{} {} {what}", utc(e.at_ms), e.node)
}

/// `tandemctl switchover VOLUME [--to NODE]`.
pub fn switchover(
    target: &Target,
    volume: &str,
    to: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let result = ask(
        target,
        &Request::Switchover {
            volume: volume.into(),
            to,
        },
    )?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{result}")?;
    } else {
        writeln!(
            out,
            "{volume}: primary is now {} (switchover took {} ms)",
            result["primary"].as_str().unwrap_or("?"),
            result["took_ms"]
        )?;
    }
    Ok(0)
}

/// `tandemctl resolve VOLUME --discard-my-data`.
pub fn resolve(target: &Target, volume: &str, discard_my_data: bool) -> anyhow::Result<i32> {
    if !discard_my_data {
        bail!("say which side loses: run this on the victim node with --discard-my-data");
    }
    ask(
        target,
        &Request::Resolve {
            volume: volume.into(),
        },
    )?;
    writeln!(
        std::io::stdout().lock(),
        "{volume}: local changes discarded; resyncing from the peer"
    )?;
    Ok(0)
}

/// `tandemctl check-config [FILE]`.
pub fn check_config(path: &Path) -> anyhow::Result<i32> {
    let config = Config::load(path)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: valid — cluster {}, {} nodes ({} data, {} witness), {} volumes",
        path.display(),
        config.cluster.name,
        config.nodes.len(),
        config
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Data)
            .count(),
        config
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Witness)
            .count(),
        config.volumes.len()
    )?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_795_750_560_342), "2026-11-27 03:36:00.342");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn byte_counts_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64 MiB");
    }
}
