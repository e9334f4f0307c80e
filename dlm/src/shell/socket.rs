//! The local client protocol: JSON lines over a unix socket.
//!
//! One connection is one client: its locks are released when it closes. Requests carry
//! an `id` echoed in their response; several may be outstanding (a lock that waits does
//! not hold up the others). Blocking callbacks arrive as event lines.
//!
//! ```text
//! → {"id":1,"op":"lock","lockspace":"ls","name":"vol0","mode":"ex","flags":["noqueue"]}
//! ← {"id":1,"status":"granted","lock":7,"mode":"ex"}
//! ← {"event":"blocking","lock":7,"mode":"pr"}
//! ← {"event":"quorum-lost"}                  (every lock held here is in doubt: stop)
//! ← {"event":"quorum-regained"}
//! → {"id":2,"op":"convert","lock":7,"mode":"nl","flags":["valblk"],"lvb":"00ff.."}
//! → {"id":3,"op":"unlock","lock":7}
//! ← {"id":3,"status":"unlocked","lock":7}
//! → {"id":4,"op":"cancel","lock":9}          (the request of lock 9 then ends "canceled")
//! → {"id":5,"op":"status"}                   (node state and locks: `tandemctl locks`)
//! ```
//!
//! Admin operations (only with `socket_admin`, for the standalone daemon where the test
//! or the operator is the cluster layer): `{"op":"membership","epoch":E,"members":[[node,
//! incarnation],..]}`, `{"op":"fence-confirm","node":N,"incarnation":I}` and
//! `{"op":"quorum","quorate":false}`. Malformed
//! lines get an error response; they never end the connection or the node.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::core::{Completion, Event};
use crate::error::DlmError;
use crate::mode::Mode;
use crate::types::{Epoch, Flags, Incarnation, LockId, Lvb, NodeId, ResourceKey, Status};

use super::client::LockClient;
use super::node::{NodeStatus, Shared, status};

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Echoed in the response.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// A new lock.
    Lock {
        /// Lock space.
        lockspace: String,
        /// Resource name.
        name: String,
        /// nl, cr, cw, pr, pw, ex.
        mode: String,
        /// noqueue, valblk.
        #[serde(default)]
        flags: Vec<String>,
    },
    /// Convert a granted lock.
    Convert {
        /// The lock.
        lock: u64,
        /// Mode.
        mode: String,
        /// noqueue, quecvt, convdeadlk, valblk.
        #[serde(default)]
        flags: Vec<String>,
        /// Value block to write (hex).
        #[serde(default)]
        lvb: Option<String>,
    },
    /// Release a lock (answered at once: the master applies it in order).
    Unlock {
        /// The lock.
        lock: u64,
        /// Value block to write (hex).
        #[serde(default)]
        lvb: Option<String>,
    },
    /// Cancel a waiting request.
    Cancel {
        /// The lock.
        lock: u64,
    },
    /// Node state and locks.
    Status,
    /// Admin: a new membership.
    Membership {
        /// Epoch.
        epoch: u64,
        /// `[node, incarnation]` pairs.
        members: Vec<(u32, u64)>,
    },
    /// Admin: a departed node is fenced.
    FenceConfirm {
        /// Node.
        node: u32,
        /// Its fenced incarnation.
        incarnation: u64,
    },
    /// Admin: the cluster layer's quorum verdict for this node.
    Quorum {
        /// Does it hear a majority?
        quorate: bool,
    },
}

/// A response line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// How the request ended (granted, would-block, deadlock, canceled, unlocked, ok,
    /// invalid, busy, evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<u64>,
    /// Its mode now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Value block (hex), for VALBLK grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvb: Option<String>,
    /// Whether the value block is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvb_valid: Option<bool>,
    /// Demoted by CONVDEADLK.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub demoted: bool,
    /// A malformed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeStatus>,
}

/// An event line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventLine {
    /// "blocking", "quorum-lost" or "quorum-regained".
    pub event: String,
    /// The lock (blocking callbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<u64>,
    /// The mode waiting (blocking callbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl EventLine {
    fn quorum(quorate: bool) -> Self {
        Self {
            event: if quorate {
                "quorum-regained"
            } else {
                "quorum-lost"
            }
            .into(),
            lock: None,
            mode: None,
        }
    }
}

pub(crate) fn bind(path: &Path) -> Result<UnixListener, DlmError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| DlmError::Io {
        what: format!("binding {}", path.display()),
        source,
    })
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener, admin: bool) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let s = shared.clone();
                tokio::spawn(async move { connection(s, stream, admin).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a client connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn parse_flags(names: &[String]) -> Result<Flags, String> {
    let mut flags = Flags::NONE;
    for n in names {
        flags = flags.with(Flags::from_name(n).ok_or_else(|| format!("unknown flag {n:?}"))?);
    }
    Ok(flags)
}

fn parse_lvb(text: &Option<String>) -> Result<Option<Lvb>, String> {
    match text {
        None => Ok(None),
        Some(t) => Lvb::from_hex(t)
            .map(Some)
            .ok_or_else(|| format!("value block {t:?} is not up to 64 hex digits")),
    }
}

fn response(id: u64, outcome: Result<Completion, Status>) -> Response {
    match outcome {
        Ok(c) => Response {
            id,
            status: Some(c.status.name().to_owned()),
            lock: Some(c.lock.0),
            mode: c.mode.map(|m| m.name().to_owned()),
            lvb: c.lvb.map(|l| l.value.to_hex()),
            lvb_valid: c.lvb.map(|l| l.valid),
            demoted: c.demoted,
            ..Response::default()
        },
        Err(status) => Response {
            id,
            status: Some(status.name().to_owned()),
            ..Response::default()
        },
    }
}

fn error(id: u64, message: String) -> Response {
    Response {
        id,
        error: Some(message),
        ..Response::default()
    }
}

/// One client connection, in one task: requests are read and answered here (most end
/// in the step that made them); answers that come later and blocking callbacks arrive
/// through channels and are written by the same task.
async fn connection(shared: Arc<Shared>, stream: UnixStream, admin: bool) {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut client = LockClient::new(shared.clone());
    let Some(mut basts) = client.blocking_callbacks() else {
        return;
    };
    let mut lines = BufReader::new(rd).lines();
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut quorum = client.quorum();
    // A client that connects while quorum is lost hears it at once.
    if !*quorum.borrow_and_update() {
        quorum.mark_changed();
    }
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => request_line(&shared, &client, &tx, &line, admin),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "client connection");
                    break;
                }
            },
            Some(text) = rx.recv() => push_line(&mut out, &text),
            Some(b) = basts.recv() => push_event(&mut out, &EventLine {
                event: "blocking".into(),
                lock: Some(b.lock.0),
                mode: Some(b.mode.name().into()),
            }),
            Ok(()) = quorum.changed() => {
                let quorate = *quorum.borrow_and_update();
                push_event(&mut out, &EventLine::quorum(quorate));
            }
        }
        while let Ok(text) = rx.try_recv() {
            push_line(&mut out, &text);
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    drop(client);
}

fn push_line(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
}

fn push_event(out: &mut Vec<u8>, line: &EventLine) {
    if let Ok(text) = serde_json::to_string(line) {
        push_line(out, &text);
    }
}

fn request_line(
    shared: &Arc<Shared>,
    client: &LockClient,
    tx: &mpsc::UnboundedSender<String>,
    line: &str,
    admin: bool,
) {
    if line.trim().is_empty() {
        return;
    }
    match serde_json::from_str::<Request>(line) {
        Ok(request) => handle(shared, client, tx, request, admin),
        Err(e) => {
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            send(tx, &error(id, format!("bad request: {e}")));
        }
    }
}

fn send(tx: &mpsc::UnboundedSender<String>, r: &Response) {
    if let Ok(text) = serde_json::to_string(r) {
        let _ = tx.send(text);
    }
}

fn handle(
    shared: &Arc<Shared>,
    client: &LockClient,
    tx: &mpsc::UnboundedSender<String>,
    request: Request,
    admin: bool,
) {
    let id = request.id;
    let (event, lock) = match request.op {
        Op::Lock {
            lockspace,
            name,
            mode,
            flags,
        } => {
            let resource = match ResourceKey::new(&lockspace, name.as_bytes()) {
                Ok(r) => r,
                Err(e) => return send(tx, &error(id, e.to_string())),
            };
            let mode: Mode = match mode.parse() {
                Ok(m) => m,
                Err(e) => return send(tx, &error(id, format!("{e}"))),
            };
            let flags = match parse_flags(&flags) {
                Ok(f) => f,
                Err(e) => return send(tx, &error(id, e)),
            };
            let lock = client.allocate();
            (
                Event::Lock {
                    client: client.id(),
                    lock,
                    resource,
                    mode,
                    flags,
                },
                lock,
            )
        }
        Op::Convert {
            lock,
            mode,
            flags,
            lvb,
        } => {
            let mode: Mode = match mode.parse() {
                Ok(m) => m,
                Err(e) => return send(tx, &error(id, format!("{e}"))),
            };
            let (flags, lvb) = match (parse_flags(&flags), parse_lvb(&lvb)) {
                (Ok(f), Ok(l)) => (f, l),
                (Err(e), _) | (_, Err(e)) => return send(tx, &error(id, e)),
            };
            (
                Event::Convert {
                    client: client.id(),
                    lock: LockId(lock),
                    mode,
                    flags,
                    lvb,
                },
                LockId(lock),
            )
        }
        Op::Unlock { lock, lvb } => {
            let lvb = match parse_lvb(&lvb) {
                Ok(l) => l,
                Err(e) => return send(tx, &error(id, e)),
            };
            (
                Event::Unlock {
                    client: client.id(),
                    lock: LockId(lock),
                    lvb,
                },
                LockId(lock),
            )
        }
        Op::Cancel { lock } => {
            client.cancel(LockId(lock));
            return send(
                tx,
                &Response {
                    id,
                    status: Some("ok".into()),
                    lock: Some(lock),
                    ..Response::default()
                },
            );
        }
        Op::Status => {
            return send(
                tx,
                &Response {
                    id,
                    status: Some("ok".into()),
                    node: Some(status(shared)),
                    ..Response::default()
                },
            );
        }
        Op::Membership { epoch, members } => {
            if !admin {
                return send(
                    tx,
                    &error(id, "membership is not served on this socket".into()),
                );
            }
            let members = members
                .into_iter()
                .map(|(n, i)| (NodeId(n), Incarnation(i)))
                .collect();
            shared.step(Event::Membership {
                epoch: Epoch(epoch),
                members,
            });
            return send(tx, &ok(id));
        }
        Op::Quorum { quorate } => {
            if !admin {
                return send(tx, &error(id, "quorum is not served on this socket".into()));
            }
            shared.set_quorate(quorate);
            return send(tx, &ok(id));
        }
        Op::FenceConfirm { node, incarnation } => {
            if !admin {
                return send(
                    tx,
                    &error(id, "fence-confirm is not served on this socket".into()),
                );
            }
            tracing::info!(
                peer = node,
                incarnation,
                "fence confirmed by the admin socket"
            );
            shared.step(Event::FenceConfirmed {
                node: NodeId(node),
                incarnation: Incarnation(incarnation),
            });
            return send(tx, &ok(id));
        }
    };
    let mut rx = client.start(event, lock);
    // Most requests end in the step that made them: answer without a task.
    if let Ok(outcome) = rx.try_recv() {
        return send(tx, &response(id, outcome));
    }
    let tx = tx.clone();
    tokio::spawn(async move {
        let outcome = rx.await.unwrap_or(Err(Status::Evicted));
        send(&tx, &response(id, outcome));
    });
}

fn ok(id: u64) -> Response {
    Response {
        id,
        status: Some("ok".into()),
        ..Response::default()
    }
}

/// A client of the unix socket protocol (used by `tandemctl` and tests).
#[derive(Debug)]
pub struct SocketClient {
    reader: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
    events: Vec<EventLine>,
}

impl SocketClient {
    /// Connects.
    pub async fn connect(path: &Path) -> Result<SocketClient, DlmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| DlmError::Io {
                what: format!("connecting to the lock manager socket {}", path.display()),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        Ok(SocketClient {
            reader: BufReader::new(rd).lines(),
            writer: wr,
            next_id: 0,
            events: Vec::new(),
        })
    }

    /// Sends a request and waits for its response (event lines in between are kept).
    pub async fn call(&mut self, op: Op) -> Result<Response, DlmError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut text =
            serde_json::to_string(&Request { id, op }).map_err(|e| DlmError::ClientProtocol {
                reason: e.to_string(),
            })?;
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| DlmError::Io {
                what: "writing to the lock manager socket".into(),
                source,
            })?;
        loop {
            let line = self
                .read_line()
                .await?
                .ok_or_else(|| DlmError::ClientProtocol {
                    reason: "the lock manager closed the connection".into(),
                })?;
            if let Ok(ev) = serde_json::from_str::<EventLine>(&line) {
                self.events.push(ev);
                continue;
            }
            let r: Response =
                serde_json::from_str(&line).map_err(|e| DlmError::ClientProtocol {
                    reason: format!("bad response {line:?}: {e}"),
                })?;
            if r.id == id {
                if let Some(e) = &r.error {
                    return Err(DlmError::ClientProtocol { reason: e.clone() });
                }
                return Ok(r);
            }
        }
    }

    /// The next line from the lock manager; `None` once it closed the connection.
    async fn read_line(&mut self) -> Result<Option<String>, DlmError> {
        self.reader
            .next_line()
            .await
            .map_err(|source| DlmError::Io {
                what: "reading from the lock manager socket".into(),
                source,
            })
    }

    /// Event lines received so far.
    pub fn take_events(&mut self) -> Vec<EventLine> {
        std::mem::take(&mut self.events)
    }

    /// The next event line (one kept by [`call`](Self::call) first); `None` once the lock
    /// manager closed the connection (then every lock of this client is gone).
    pub async fn next_event(&mut self) -> Result<Option<EventLine>, DlmError> {
        if !self.events.is_empty() {
            return Ok(Some(self.events.remove(0)));
        }
        loop {
            let Some(line) = self.read_line().await? else {
                return Ok(None);
            };
            if let Ok(ev) = serde_json::from_str::<EventLine>(&line) {
                return Ok(Some(ev));
            }
            // A late response to an abandoned request: nothing waits for it.
        }
    }
}
