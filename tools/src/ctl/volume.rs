//! `tandemctl replica ...`: drive a standalone replica (`tandemd replica`) through its
//! control socket — status, roles, connect/disconnect, split-brain resolution, verify,
//! the events stream, and an interactive resync progress bar.
//!
//! The socket is `--socket PATH`, else `/run/tandem/replica-VOLUME.sock`.

/// Writes a line to standard output (the tools' output; libraries never print).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

use anyhow::{Context, bail};
use clap::Subcommand;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem::replication::control::{Request, request};

/// `tandemctl replica` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Role, connection, disk states, generations and sync progress.
    Status {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Become primary (`--force`: also from an Inconsistent/Outdated disk).
    Primary {
        volume: String,
        #[arg(long)]
        force: bool,
    },
    /// Become secondary.
    Secondary { volume: String },
    /// Start connecting to the peer.
    Connect { volume: String },
    /// Drop the peer connection and stay standalone.
    Disconnect { volume: String },
    /// Resolve a split brain: run on the node whose changes are to be thrown away.
    Resolve {
        volume: String,
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Online verify: compare both copies by checksum, report out-of-sync blocks.
    Verify { volume: String },
    /// Resync rate limit in bytes/s (0 = unlimited).
    SetResyncRate { volume: String, bytes_per_sec: u64 },
    /// A live stream of state changes (JSON lines).
    Events { volume: String },
    /// Wait for a running resync with a progress bar (plain lines when not a terminal).
    Sync {
        volume: String,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

fn socket_for(socket: Option<&Path>, volume: &str) -> PathBuf {
    socket.map_or_else(
        || PathBuf::from(format!("/run/tandem/replica-{volume}.sock")),
        Path::to_path_buf,
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn call(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let reply = runtime()?
        .block_on(request(socket, req))
        .with_context(|| format!("asking the replica at {}", socket.display()))?;
    if reply["ok"] != serde_json::Value::Bool(true) {
        bail!(
            "{}",
            reply["error"].as_str().unwrap_or("the replica refused")
        );
    }
    Ok(reply)
}

fn simple(socket: &Path, req: &Request, what: &str) -> anyhow::Result<i32> {
    call(socket, req)?;
    say!("{what}");
    Ok(0)
}

/// Runs a `tandemctl replica` subcommand.
pub fn run(cmd: ReplicaCommand, socket: Option<&Path>) -> anyhow::Result<i32> {
    match cmd {
        ReplicaCommand::Status { volume, json } => {
            let reply = call(&socket_for(socket, &volume), &Request::Status)?;
            let status = &reply["status"];
            if json {
                say!("{}", serde_json::to_string_pretty(status)?);
            } else {
                print_status(status);
            }
            Ok(0)
        }
        ReplicaCommand::Primary { volume, force } => simple(
            &socket_for(socket, &volume),
            &Request::Primary { force },
            "primary",
        ),
        ReplicaCommand::Secondary { volume } => simple(
            &socket_for(socket, &volume),
            &Request::Secondary,
            "secondary",
        ),
        ReplicaCommand::Connect { volume } => simple(
            &socket_for(socket, &volume),
            &Request::Connect,
            "connecting",
        ),
        ReplicaCommand::Disconnect { volume } => simple(
            &socket_for(socket, &volume),
            &Request::Disconnect,
            "standalone",
        ),
        ReplicaCommand::Resolve {
            volume,
            discard_my_data,
        } => {
            if !discard_my_data {
                bail!(
                    "resolve needs --discard-my-data (run it on the node whose changes are to be thrown away)"
                );
            }
            simple(
                &socket_for(socket, &volume),
                &Request::DiscardMyData,
                "this node's changes will be discarded on reconnect; connecting",
            )
        }
        ReplicaCommand::Verify { volume } => simple(
            &socket_for(socket, &volume),
            &Request::Verify,
            "verify started",
        ),
        ReplicaCommand::SetResyncRate {
            volume,
            bytes_per_sec,
        } => simple(
            &socket_for(socket, &volume),
            &Request::SetResyncRate { bytes_per_sec },
            "rate set",
        ),
        ReplicaCommand::Events { volume } => events(&socket_for(socket, &volume)),
        ReplicaCommand::Sync { volume, timeout } => {
            sync_progress(&socket_for(socket, &volume), timeout)
        }
    }
}

fn print_status(s: &serde_json::Value) {
    let str_of = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    say!(
        "volume      {} ({})",
        str_of(&s["name"]),
        str_of(&s["volume_id"])
    );
    say!("node        {}", s["node_id"]);
    say!(
        "role        {} (peer {})",
        str_of(&s["role"]),
        if s["peer_role"].is_null() {
            "unknown".into()
        } else {
            str_of(&s["peer_role"])
        }
    );
    say!(
        "connection  {}{}",
        str_of(&s["connection"]),
        s["peer"]
            .as_str()
            .map(|p| format!(" via {p}"))
            .unwrap_or_default()
    );
    say!(
        "disk        {} (peer {})",
        str_of(&s["disk"]),
        str_of(&s["peer_disk"])
    );
    say!("protocol    {}", str_of(&s["protocol"]));
    let g = &s["generations"];
    say!(
        "generations current {:016X} bitmap {:016X}",
        g["current"].as_u64().unwrap_or(0),
        g["bitmap"].as_u64().unwrap_or(0)
    );
    say!("epoch       {}", s["epoch"]);
    say!("out of sync {} bytes", s["out_of_sync_bytes"]);
    if let Some(sync) = s["sync"].as_object() {
        say!(
            "sync        {} {:.1}% of {} bytes, {} B/s, eta {}",
            if sync["source"].as_bool() == Some(true) {
                "sending"
            } else {
                "receiving"
            },
            sync["percent"].as_f64().unwrap_or(0.0),
            sync["total_bytes"],
            sync["rate_bytes_per_sec"],
            sync["eta_secs"]
                .as_u64()
                .map_or_else(|| "?".into(), |e| format!("{e}s"))
        );
    }
    if s["io_suspended"].as_bool() == Some(true) {
        say!("I/O         suspended (waiting for fencing)");
    }
    if let Some(r) = s["last_refusal"].as_str() {
        say!("refused     {r}");
    }
}

fn events(socket: &Path) -> anyhow::Result<i32> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    runtime()?.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"cmd\":\"events\"}\n").await?;
        let mut lines = BufReader::new(r).lines();
        let mut out = std::io::stdout();
        while let Some(line) = lines.next_line().await? {
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        Ok(0)
    })
}

/// Draws `[#####.....] 42.0%  1.2 GiB/2.9 GiB  85 MiB/s  eta 20s`.
pub fn progress_line(percent: f64, done: u64, total: u64, rate: u64, eta: Option<u64>) -> String {
    const WIDTH: usize = 30;
    let clamped = percent.clamp(0.0, 100.0);
    // The bar is a display: rounding to a cell is fine.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let filled = ((clamped / 100.0) * WIDTH as f64).round() as usize;
    let bar: String = "#".repeat(filled.min(WIDTH)) + &".".repeat(WIDTH - filled.min(WIDTH));
    format!(
        "[{bar}] {clamped:5.1}%  {}/{}  {}/s  eta {}",
        human(done),
        human(total),
        human(rate),
        eta.map_or_else(|| "?".to_owned(), |e| format!("{e}s"))
    )
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 10 * 1024 && unit + 1 < UNITS.len() {
        v /= 1024;
        unit += 1;
    }
    format!("{v} {}", UNITS[unit])
}

fn sync_progress(socket: &Path, timeout: Option<u64>) -> anyhow::Result<i32> {
    let tty = std::io::stdout().is_terminal();
    let start = std::time::Instant::now();
    let mut saw_sync = false;
    let mut out = std::io::stdout();
    loop {
        let reply = call(socket, &Request::Status)?;
        let s = &reply["status"];
        let conn = s["connection"].as_str().unwrap_or("");
        match s["sync"].as_object() {
            Some(sync) => {
                saw_sync = true;
                let line = progress_line(
                    sync["percent"].as_f64().unwrap_or(0.0),
                    sync["done_bytes"].as_u64().unwrap_or(0),
                    sync["total_bytes"].as_u64().unwrap_or(0),
                    sync["rate_bytes_per_sec"].as_u64().unwrap_or(0),
                    sync["eta_secs"].as_u64(),
                );
                if tty {
                    write!(out, "\r\x1b[2K{line}")?;
                } else {
                    writeln!(out, "{line}")?;
                }
                out.flush()?;
            }
            None if conn == "connected" || conn == "verifying" => {
                if tty {
                    writeln!(out)?;
                }
                say!(
                    "{}",
                    if saw_sync {
                        "in sync"
                    } else {
                        "in sync (no resync was running)"
                    }
                );
                return Ok(0);
            }
            None => {}
        }
        if let Some(t) = timeout
            && start.elapsed() > Duration::from_secs(t)
        {
            if tty {
                writeln!(out)?;
            }
            bail!("not in sync after {t}s (connection {conn})");
        }
        std::thread::sleep(Duration::from_millis(if tty { 200 } else { 1000 }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_draws_a_bar() {
        let l = progress_line(50.0, 512 << 20, 1 << 30, 100 << 20, Some(5));
        assert!(l.starts_with("[###############...............]"), "{l}");
        assert!(
            l.contains("50.0%") && l.contains("512 MiB/1024 MiB") && l.contains("eta 5s"),
            "{l}"
        );
        assert!(progress_line(250.0, 0, 0, 0, None).contains("100.0%"));
    }
}
