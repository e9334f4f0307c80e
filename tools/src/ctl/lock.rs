//! `tandemctl lock` and `tandemctl locks`: the lock manager from the shell.
//!
//! `tandemctl lock LOCKSPACE NAME --mode ex -- COMMAND...` holds a lock while COMMAND
//! runs, like flock(1), and exits with COMMAND's status (128+N if a signal N ended it).
//! The lock is held by the socket connection: if tandemctl dies, the lock manager
//! releases it. `tandemctl locks [--json]` lists this node's locks.
//!
//! If the lock falls in doubt while COMMAND runs — this node lost quorum, so the majority
//! may soon declare it dead and grant the lock elsewhere, or the lock manager went away —
//! COMMAND is stopped at once (SIGTERM, SIGKILL after `--grace` seconds), as sanlock does
//! with a lost lease, and tandemctl exits with status 3 ([`LOCK_LOST`]).
//!
//! The lock manager socket: `--socket PATH`, else `$TANDEM_DLM_SOCKET`, else
//! `/run/tandem/dlm.sock`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tandem_dlm::Mode;
use tandem_dlm::shell::socket::Op;
use tandem_dlm::shell::{LockInfo, NodeStatus, SocketClient};

/// Exit status when the lock fell in doubt and COMMAND was stopped.
pub const LOCK_LOST: i32 = 3;

/// Default lock manager socket.
pub const DEFAULT_SOCKET: &str = "/run/tandem/dlm.sock";

/// `tandemctl lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// Lock space.
    pub lockspace: String,
    /// Resource name.
    pub name: String,
    /// Mode: nl, cr, cw, pr, pw or ex.
    #[arg(long, default_value = "ex")]
    pub mode: Mode,
    /// Fail at once (exit 1) instead of waiting if the lock is busy.
    #[arg(long, short = 'n')]
    pub nowait: bool,
    /// Give up (exit 1) after waiting this many seconds.
    #[arg(long, short = 'w')]
    pub timeout: Option<f64>,
    /// When the lock falls in doubt, seconds between SIGTERM and SIGKILL of COMMAND.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// The command to run while holding the lock.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// `tandemctl locks`.
#[derive(Debug, Args)]
pub struct LocksArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn socket_path(socket: Option<&Path>) -> PathBuf {
    if let Some(s) = socket {
        return s.to_path_buf();
    }
    match std::env::var_os("TANDEM_DLM_SOCKET") {
        Some(s) => PathBuf::from(s),
        None => PathBuf::from(DEFAULT_SOCKET),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `tandemctl lock`; returns the exit code.
pub fn run_lock(args: LockArgs, socket: Option<&Path>) -> anyhow::Result<i32> {
    // Bad arguments are refused before anything is locked or started.
    let timeout = args
        .timeout
        .map(|secs| seconds("--timeout", secs))
        .transpose()?;
    let grace = seconds("--grace", args.grace)?;
    let path = socket_path(socket);
    let rt = runtime()?;
    let mut client = rt.block_on(SocketClient::connect(&path))?;
    let flags = if args.nowait {
        vec!["noqueue".to_owned()]
    } else {
        vec![]
    };
    let request = client.call(Op::Lock {
        lockspace: args.lockspace.clone(),
        name: args.name.clone(),
        mode: args.mode.name().to_owned(),
        flags,
    });
    let response = match timeout {
        None => rt.block_on(request)?,
        Some(limit) => match rt.block_on(async { tokio::time::timeout(limit, request).await }) {
            Ok(r) => r?,
            Err(_) => {
                eprintln!(
                    "tandemctl: {}/{} not granted within {} s",
                    args.lockspace,
                    args.name,
                    limit.as_secs_f64()
                );
                return Ok(1);
            }
        },
    };
    match response.status.as_deref() {
        Some("granted") => {}
        Some("would-block") => {
            eprintln!("tandemctl: {}/{} is busy", args.lockspace, args.name);
            return Ok(1);
        }
        other => bail!(
            "locking {}/{}: {}",
            args.lockspace,
            args.name,
            other.unwrap_or("no status")
        ),
    }
    let lock = response.lock.context("granted without a lock id")?;
    let (program, rest) = args.command.split_first().context("no command")?;
    let child = std::process::Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("running {program}"));
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            // Release even though the command could not start.
            let _ = rt.block_on(client.call(Op::Unlock { lock, lvb: None }));
            return Err(e);
        }
    };
    let code = match rt.block_on(watch(child, &mut client, grace)) {
        Watched::Exited(status) => exit_code(status?),
        Watched::Lost { reason, status } => {
            eprintln!(
                "tandemctl: {}/{} is in doubt ({reason}); stopped {program} ({})",
                args.lockspace,
                args.name,
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            );
            // The connection may be gone with the lock; nothing more to release then.
            let _ = rt.block_on(client.call(Op::Unlock { lock, lvb: None }));
            return Ok(LOCK_LOST);
        }
    };
    rt.block_on(client.call(Op::Unlock { lock, lvb: None }))
        .context("releasing the lock")?;
    Ok(code)
}

/// A duration given in seconds on the command line (`flag` names it in the error).
fn seconds(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        bail!("{flag} {secs} is not a number of seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How the command ended.
enum Watched {
    Exited(std::io::Result<std::process::ExitStatus>),
    /// The lock fell in doubt and the command was stopped.
    Lost {
        reason: String,
        status: std::io::Result<std::process::ExitStatus>,
    },
}

/// Waits for `child` while watching the lock manager: if the lock falls in doubt, stops
/// the child (SIGTERM, then SIGKILL after `grace`).
async fn watch(
    mut child: std::process::Child,
    client: &mut SocketClient,
    grace: Duration,
) -> Watched {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, mut exited) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let gone = |r: std::result::Result<std::io::Result<std::process::ExitStatus>, _>| {
        r.unwrap_or_else(|_| Err(std::io::Error::other("lost track of the command")))
    };
    let reason = loop {
        tokio::select! {
            status = &mut exited => return Watched::Exited(gone(status)),
            event = client.next_event() => match event {
                Ok(Some(e)) if e.event == "quorum-lost" => break "this node lost quorum".to_owned(),
                Ok(Some(_)) => {}
                Ok(None) => break "the lock manager closed the connection".to_owned(),
                Err(e) => break format!("the lock manager connection failed: {e}"),
            },
        }
    };
    let _ = kill(pid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, &mut exited).await {
        Ok(status) => gone(status),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            gone(exited.await)
        }
    };
    Watched::Lost { reason, status }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

/// Runs `tandemctl locks`.
pub fn run_locks(args: LocksArgs, socket: Option<&Path>) -> anyhow::Result<i32> {
    let path = socket_path(socket);
    let rt = runtime()?;
    let status = rt.block_on(async {
        let mut client = SocketClient::connect(&path).await?;
        client.call(Op::Status).await
    })?;
    let node = status.node.context("status without the node")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &node)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &node)?;
    }
    Ok(0)
}

fn write_table(out: &mut impl Write, node: &NodeStatus) -> anyhow::Result<()> {
    writeln!(
        out,
        "node {} ({}), epoch {}, members {:?}{}",
        node.node,
        node.state,
        node.epoch,
        node.members,
        if node.unfenced.is_empty() {
            String::new()
        } else {
            format!(", waiting for fencing of {:?}", node.unfenced)
        }
    )?;
    let rows = |title: &str, locks: &[LockInfo], out: &mut dyn Write| -> anyhow::Result<()> {
        writeln!(out, "\n{title}")?;
        if locks.is_empty() {
            writeln!(out, "  (none)")?;
            return Ok(());
        }
        writeln!(
            out,
            "  {:<16} {:<24} {:>6} {:>5} {:>7} {:<8} {:<9} {:<11} {:>6}",
            "LOCKSPACE",
            "NAME",
            "LOCK",
            "OWNER",
            "CLIENT",
            "GRANTED",
            "REQUESTED",
            "STATE",
            "MASTER"
        )?;
        for l in locks {
            writeln!(
                out,
                "  {:<16} {:<24} {:>6} {:>5} {:>7} {:<8} {:<9} {:<11} {:>6}",
                l.lockspace,
                l.name,
                l.lock,
                l.owner,
                l.client.map_or("-".to_owned(), |c| c.to_string()),
                l.granted.as_deref().unwrap_or("-"),
                l.requested.as_deref().unwrap_or("-"),
                l.state,
                l.master.map_or("?".to_owned(), |m| m.to_string()),
            )?;
        }
        Ok(())
    };
    rows("locks of this node's clients", &node.owned, out)?;
    rows("locks on resources this node masters", &node.mastered, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_both_views() {
        let lock = LockInfo {
            lockspace: "ls".into(),
            name: "vol0".into(),
            lock: "1a".into(),
            owner: 2,
            client: Some(7),
            granted: Some("ex".into()),
            requested: None,
            state: "granted".into(),
            master: Some(1),
        };
        let node = NodeStatus {
            node: 2,
            incarnation: 9,
            epoch: 3,
            state: "running".into(),
            members: vec![1, 2],
            unfenced: vec![],
            owned: vec![lock.clone()],
            mastered: vec![],
        };
        let mut out = Vec::new();
        write_table(&mut out, &node).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("node 2 (running), epoch 3"), "{text}");
        assert!(text.contains("vol0") && text.contains("  (none)"), "{text}");
    }

    #[test]
    fn socket_path_prefers_the_flag() {
        assert_eq!(
            socket_path(Some(Path::new("/x.sock"))),
            PathBuf::from("/x.sock")
        );
    }
}
