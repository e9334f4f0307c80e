//! The control socket of a standalone replica: one JSON object per line each way.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"primary","force":false}`, `{"cmd":"secondary"}`,
//! `{"cmd":"connect"}`, `{"cmd":"disconnect"}`, `{"cmd":"discard-my-data"}`,
//! `{"cmd":"verify"}`, `{"cmd":"outdate"}`, `{"cmd":"set-epoch","epoch":N}`,
//! `{"cmd":"set-resync-rate","bytes_per_sec":N}`, `{"cmd":"events"}` (then a stream of
//! event lines). Replies: `{"ok":true, ...}` or `{"ok":false,"error":"..."}`. A malformed
//! line gets an error reply naming the problem; the connection stays usable.

use super::Volume;
use super::types::Epoch;
use crate::error::{Result, TandemError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Primary {
        #[serde(default)]
        force: bool,
    },
    Secondary,
    Connect,
    Disconnect,
    DiscardMyData,
    Verify,
    Outdate,
    SetEpoch {
        epoch: u64,
    },
    SetResyncRate {
        bytes_per_sec: u64,
    },
    Events,
}

/// Serves the control socket at `path` for `volume` until the task is dropped.
pub async fn serve(path: &Path, volume: Volume) -> Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path).map_err(TandemError::io(format!(
            "removing the stale control socket {}",
            path.display()
        )))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(TandemError::io(format!("creating {}", dir.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| TandemError::Control {
        what: format!("binding {}", path.display()),
        source,
    })?;
    let path: PathBuf = path.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let v = volume.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client(stream, v).await {
                            tracing::debug!(error = %e, "control client ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(socket = %path.display(), error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn client(stream: tokio::net::UnixStream, volume: Volume) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let reply = serde_json::json!({"ok": false, "error": format!("bad request: {e}")});
                w.write_all(format!("{reply}\n").as_bytes()).await?;
                continue;
            }
        };
        if request == Request::Events {
            let mut rx = volume.events();
            w.write_all(b"{\"ok\":true}\n").await?;
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let line = serde_json::to_string(&ev).unwrap_or_default();
                        w.write_all(format!("{line}\n").as_bytes()).await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let line = serde_json::json!({"event": "lagged", "missed": n});
                        w.write_all(format!("{line}\n").as_bytes()).await?;
                    }
                    Err(_) => return Ok(()),
                }
            }
        }
        let reply = handle(&volume, request).await;
        w.write_all(format!("{reply}\n").as_bytes()).await?;
    }
    Ok(())
}

async fn handle(volume: &Volume, request: Request) -> serde_json::Value {
    let result = match request {
        Request::Status => match volume.status().await {
            Ok(s) => return serde_json::json!({"ok": true, "status": s}),
            Err(e) => Err(e),
        },
        Request::Primary { force } => volume.promote(force).await,
        Request::Secondary => volume.demote().await,
        Request::Connect => volume.connect().await,
        Request::Disconnect => volume.disconnect().await,
        Request::DiscardMyData => volume.discard_my_data().await,
        Request::Verify => volume.verify().await,
        Request::Outdate => volume.outdate().await,
        Request::SetEpoch { epoch } => volume.set_epoch(Epoch(epoch)).await,
        Request::SetResyncRate { bytes_per_sec } => volume.set_resync_rate(bytes_per_sec).await,
        Request::Events => Ok(()),
    };
    match result {
        Ok(()) => serde_json::json!({"ok": true}),
        Err(e) => serde_json::json!({"ok": false, "error": super::error_chain(&e)}),
    }
}

/// Client side: sends one request to the socket and returns the reply object.
pub async fn request(path: &Path, request: &Request) -> Result<serde_json::Value> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| TandemError::Control {
            what: format!("connecting to {}", path.display()),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let line = serde_json::to_string(request)
        .map_err(|e| TandemError::BadControlRequest(e.to_string()))?;
    w.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|source| TandemError::Control {
            what: "sending a request".into(),
            source,
        })?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines
        .next_line()
        .await
        .map_err(|source| TandemError::Control {
            what: "reading the reply".into(),
            source,
        })?
        .ok_or_else(|| TandemError::BadControlRequest("the replica closed the socket".into()))?;
    serde_json::from_str(&reply)
        .map_err(|e| TandemError::BadControlRequest(format!("unreadable reply `{reply}`: {e}")))
}
