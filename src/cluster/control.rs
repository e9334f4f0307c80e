//! The control socket: JSON lines over a unix socket, served by `tandemd`, spoken by
//! `tandemctl`.
//!
//! ```text
//! → {"cmd":"status"}                               ← {"ok":true,"result":{ClusterStatus}}
//! → {"cmd":"events"}                               ← one Event per line, until closed
//! → {"cmd":"switchover","volume":"vol0","to":null} ← {"ok":true,"result":{"primary":"beta","took_ms":812}}
//! → {"cmd":"resolve","volume":"vol0"}              ← {"ok":true,"result":null}
//! ```
//! Bad requests get `{"ok":false,"error":"..."}` naming the problem; the daemon carries on.

use super::node::Node;
use super::state::{Command, Outcome};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Events,
    Switchover { volume: String, to: Option<String> },
    Resolve { volume: String },
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

/// Serves the control socket at `path` for `node` until the task is dropped.
pub async fn serve(node: Node, path: PathBuf) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let node = node.clone();
        tokio::spawn(async move {
            let (reader, mut writer) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                let request = match serde_json::from_str::<Request>(&line) {
                    Ok(r) => r,
                    Err(e) => {
                        let reply = Reply::error(format!(
                            "bad request `{}`: {e}",
                            line.chars().take(200).collect::<String>()
                        ));
                        if send(&mut writer, &reply).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                if request == Request::Events {
                    stream_events(&node, &mut writer).await;
                    return;
                }
                let reply = handle(&node, request).await;
                if send(&mut writer, &reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await
}

async fn stream_events<W: tokio::io::AsyncWrite + Unpin>(node: &Node, writer: &mut W) {
    let mut events = node.events();
    loop {
        match events.recv().await {
            Ok(event) => {
                if send(writer, &event).await.is_err() {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "event subscriber too slow");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn handle(node: &Node, request: Request) -> Reply {
    match request {
        Request::Status => match serde_json::to_value(node.status()) {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::error(e.to_string()),
        },
        Request::Events => Reply::error("events are streamed"),
        Request::Switchover { volume, to } => switchover(node, &volume, to.as_deref()).await,
        Request::Resolve { volume } => match node.driver(&volume) {
            None if node.config().volume(&volume).is_none() => {
                Reply::error(format!("unknown volume `{volume}`"))
            }
            None => Reply::error(format!(
                "node {} holds no replica of `{volume}`",
                node.name()
            )),
            Some(driver) => match driver.discard_my_data().await {
                Ok(()) => Reply::ok(serde_json::Value::Null),
                Err(e) => Reply::error(e),
            },
        },
    }
}

async fn switchover(node: &Node, volume: &str, to: Option<&str>) -> Reply {
    let config = node.config();
    if config.volume(volume).is_none() {
        return Reply::error(format!("unknown volume `{volume}`"));
    }
    let target = match to {
        None => None,
        Some(name) => match config.node_by_name(name) {
            Some(n) => Some(n.id),
            None => return Reply::error(format!("unknown node `{name}`")),
        },
    };
    let started = Instant::now();
    let from = node.state().volumes.get(volume).and_then(|v| v.primary);
    match node
        .propose(Command::RequestSwitchover {
            volume: volume.to_owned(),
            to: target,
        })
        .await
    {
        Ok(Outcome::Applied) => {}
        Ok(Outcome::Rejected { reason }) => {
            return Reply::error(format!("switchover refused: {reason}"));
        }
        Err(e) => return Reply::error(format!("switchover not recorded: {e}")),
    }
    // Done when someone other than the old primary (the target, if one was named) is
    // primary. This node's copy of the log may lag the leader's: wait on it.
    let mut state = node.watch_state();
    let deadline = Duration::from_secs(30);
    let result = tokio::time::timeout(deadline, async {
        loop {
            let done = {
                let s = state.borrow_and_update();
                s.volumes.get(volume).is_some_and(|v| {
                    v.primary.is_some()
                        && v.primary != from
                        && target.is_none_or(|t| v.primary == Some(t))
                })
            };
            if done || state.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let primary = node
        .state()
        .volumes
        .get(volume)
        .and_then(|v| v.primary)
        .and_then(|id| config.node(id))
        .map(|n| n.name.clone());
    match result {
        Ok(()) => Reply::ok(serde_json::json!({
            "volume": volume,
            "primary": primary,
            "took_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })),
        Err(_) => Reply::error(format!(
            "switchover of `{volume}` did not complete within {deadline:?}; primary is {primary:?}"
        )),
    }
}

/// Client side: sends one request and returns the reply.
pub fn request(path: &Path, request: &Request) -> std::io::Result<Reply> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("undecodable reply from {}: {e}", path.display()),
        )
    })
}

/// Client side: follows the event stream, calling `each` per event until it returns false.
pub fn follow_events(
    path: &Path,
    mut each: impl FnMut(super::status::Event) -> bool,
) -> std::io::Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.write_all(b"{\"cmd\":\"events\"}\n")?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        match serde_json::from_str(&line) {
            Ok(event) => {
                if !each(event) {
                    break;
                }
            }
            Err(e) => tracing::warn!(error = %e, "undecodable event"),
        }
    }
    Ok(())
}
